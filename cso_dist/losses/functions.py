"""Preference-optimisation losses (DPO, IPO, SimPO, ORPO, KTO) and the SFT/NLL term, per example.

Conventions shared by every function:
- Log-probs are SUMMED completion log-probs (one value per example); ``*_len`` are the
  completion token counts (int or float tensors, clamped to >= 1 so an empty completion
  cannot divide by zero). All inputs are 1-D tensors of the same shape.
- Nothing is reduced: ``LossOutput.losses`` holds one loss per example; the caller takes
  the mean (or a token-weighted sum) and adds the optional NLL term itself:
  ``total = losses + nll_weight * sft_nll(chosen_logps, chosen_len)``
  (for ORPO: ``total = losses + out.nll``, the paper's NLL_chosen − λ·log σ(log_odds)).
- Low-precision inputs (bf16/fp16) are computed in fp32 (fp64 inputs stay fp64); outputs
  come back in that compute dtype and gradients flow back to the original tensors.
- Rewards are detached and only for logging (TRL's conventions, see each function).
Semantics follow TRL (DPOTrainer / CPOTrainer / ORPOTrainer / KTOTrainer) unless noted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ORPO_EPS = 1e-6  # ORPO clamps average log-probs to <= -ORPO_EPS so log(1 - p) stays finite
_LN2 = math.log(2.0)


@dataclass
class LossOutput:
    """Per-example losses plus detached logging quantities.

    losses: per-example loss (for ORPO the odds-ratio part −β·log σ(log_odds) only).
    chosen_rewards / rejected_rewards: detached rewards. DPO/IPO/SimPO/ORPO: one value per
        pair. KTO: the subsets ``rewards[desirable]`` / ``rewards[~desirable]``, which may be
        EMPTY tensors (log sums and counts, not means, to avoid NaN).
    nll: ORPO only, per-example −avg log p(chosen) (weight 1 in ORPO); None elsewhere.
    rewards / desirable: KTO only, β(logp − ref) for every example in input order and the
        bool mask saying which examples are desirable.
    kl: KTO only, the reference point z actually used (detached, clamped >= 0, 0-dim).
    log_odds: ORPO only, detached per-example log odds ratio (TRL logs its mean).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll: Tensor | None = None
    rewards: Tensor | None = None
    desirable: Tensor | None = None
    kl: Tensor | None = None
    log_odds: Tensor | None = None


def _up(x: Tensor) -> Tensor:
    """Compute dtype: fp64 stays fp64, everything else (bf16, fp16, ints) becomes fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _lens(n: Tensor, like: Tensor) -> Tensor:
    return n.to(like.dtype).clamp_min(1.0)


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"loss inputs must have the same shape, got {shapes}")


def dpo(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (sigmoid) loss with optional conservative label smoothing ε (cDPO).

    Δ = (logp_c − ref_c) − (logp_r − ref_r);
    loss = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ); at Δ = 0 the loss is ln 2 for every ε.
    Rewards: β(logp − ref) for chosen and rejected.
    """
    _same_shape(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    c_ratio = _up(chosen_logps) - _up(ref_chosen_logps)
    r_ratio = _up(rejected_logps) - _up(ref_rejected_logps)
    logits = beta * (c_ratio - r_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, beta * c_ratio.detach(), beta * r_ratio.detach())


def ipo(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """IPO loss on length-normalised log-ratios (as TRL; OpenRLHF does not normalise).

    h = (logp_c − ref_c)/|y_c| − (logp_r − ref_r)/|y_r|;  loss = (h − 1/(2β))².
    Rewards: β·(logp − ref)/|y| — the normalised log-ratio the loss sees, which is what
    TRL logs for IPO (it divides log-probs by length before computing rewards).
    """
    _same_shape(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_len=chosen_len,
        rejected_len=rejected_len,
    )
    c = _up(chosen_logps)
    c_ratio = (c - _up(ref_chosen_logps)) / _lens(chosen_len, c)
    r_ratio = (_up(rejected_logps) - _up(ref_rejected_logps)) / _lens(rejected_len, c)
    losses = (c_ratio - r_ratio - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, beta * c_ratio.detach(), beta * r_ratio.detach())


def simpo(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float = 2.5,
    gamma_beta_ratio: float = 0.55,
) -> LossOutput:
    """SimPO (reference-free) loss, pure form without TRL/CPO's default NLL term.

    a = logp/|y| (average per-token log-prob); γ = gamma_beta_ratio·β;
    loss = −log σ(β(a_c − a_r) − γ). Rewards: β·a (TRL CPO convention).
    """
    _same_shape(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_len=chosen_len, rejected_len=rejected_len
    )
    c = _up(chosen_logps)
    avg_c = c / _lens(chosen_len, c)
    avg_r = _up(rejected_logps) / _lens(rejected_len, c)
    losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma_beta_ratio * beta)
    return LossOutput(losses, beta * avg_c.detach(), beta * avg_r.detach())


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x <= 0, stable: log1p(−eˣ) for x < −ln2, else log(−expm1(x)).

    Each branch only sees inputs in its own range (double-where), so the unused branch
    cannot put NaN into the gradient. Returns −inf at x = 0 (callers clamp x first).
    """
    low = x < -_LN2
    x_low = torch.where(low, x, torch.full_like(x, -1.0))
    x_high = torch.where(low, torch.full_like(x, -0.5), x)
    return torch.where(low, torch.log1p(-torch.exp(x_low)), torch.log(-torch.expm1(x_high)))


def orpo(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_len: Tensor, rejected_len: Tensor, beta: float = 0.1
) -> LossOutput:
    """ORPO odds-ratio term, with its NLL term returned separately (fp32 or fp64).

    a = logp/|y| clamped to <= −ORPO_EPS (a → 0⁻ would make log(1 − eᵃ) = −inf);
    log_odds = (a_c − a_r) − (log1mexp(a_c) − log1mexp(a_r));
    losses = −β·log σ(log_odds) (β is ORPO's λ); nll = −a_c (unclamped), per example.
    TRL's NLL is a token mean over the whole batch; ours is per example, so weight it by
    chosen_len before averaging if you want TRL's exact number. Total = losses + nll.
    Rewards: β·a (TRL convention, unclamped).
    """
    _same_shape(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_len=chosen_len, rejected_len=rejected_len
    )
    c = _up(chosen_logps)
    avg_c = c / _lens(chosen_len, c)
    avg_r = _up(rejected_logps) / _lens(rejected_len, c)
    ac, ar = avg_c.clamp_max(-ORPO_EPS), avg_r.clamp_max(-ORPO_EPS)
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    losses = -beta * F.logsigmoid(log_odds)
    return LossOutput(losses, beta * avg_c.detach(), beta * avg_r.detach(), nll=-avg_c, log_odds=log_odds.detach())


def kto_kl(kl_policy_logps: Tensor | None, kl_ref_logps: Tensor | None) -> Tensor:
    """Raw KTO reference point: detached mean(kl_policy − kl_ref), 0 for empty/None input.

    NOT clamped: to average across ranks, all-reduce this raw value (or sum and count),
    then pass the average as ``kto(..., kl=...)``, which clamps it at >= 0.
    """
    if kl_policy_logps is None or kl_ref_logps is None or kl_policy_logps.numel() == 0:
        dtype = torch.float32 if kl_policy_logps is None else _up(kl_policy_logps).dtype
        device = None if kl_policy_logps is None else kl_policy_logps.device
        return torch.zeros((), dtype=dtype, device=device)
    _same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    return (_up(kl_policy_logps) - _up(kl_ref_logps)).detach().mean()


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor | None,
    kl_ref_logps: Tensor | None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    *,
    kl: Tensor | float | None = None,
) -> LossOutput:
    """KTO loss, one value per example in input order (no group reductions, so micro-batches
    holding only desirable or only undesirable examples are fine).

    r = logp − ref; z = max(0, kl if given else mean(kl_policy − kl_ref)), detached
    (0 when the KL tensors are empty/None, e.g. batch size 1 has no mismatched pair);
    desirable: w_D·(1 − σ(β(r − z))); undesirable: w_U·(1 − σ(β(z − r))).
    Rewards: ``rewards`` = β·r for every example, ``desirable`` the mask;
    chosen_rewards / rejected_rewards are the (possibly empty) masked subsets.
    """
    _same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto: desirable must be a bool tensor, got {desirable.dtype}")
    logratio = _up(policy_logps) - _up(ref_logps)
    if kl is None:
        z = kto_kl(kl_policy_logps, kl_ref_logps)
    else:
        z = torch.as_tensor(kl).detach()
    z = z.to(device=logratio.device, dtype=logratio.dtype).clamp_min(0.0)
    d_loss = desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - z)))
    u_loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - logratio)))
    losses = torch.where(desirable, d_loss, u_loss)
    rewards = beta * logratio.detach()
    return LossOutput(losses, rewards[desirable], rewards[~desirable], rewards=rewards, desirable=desirable, kl=z)


def sft_nll(chosen_logps: Tensor, chosen_len: Tensor) -> Tensor:
    """Per-example token-averaged NLL, −logp_c/|y_c|: the SFT loss (method "sft") and the
    optional extra term of any method: total = loss + nll_weight · nll."""
    _same_shape(chosen_logps=chosen_logps, chosen_len=chosen_len)
    c = _up(chosen_logps)
    return -c / _lens(chosen_len, c)
