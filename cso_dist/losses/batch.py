"""From per-reply log-probs of one micro-batch to the training loss and TRL-named metrics, for any method: the
parts every method shares (the reply structure, the optional NLL term, the step's normalisation) and one
function per objective (cso_dist.losses.Method.objective: nll, pairwise, kto), so nothing here or in the
trainer asks which method runs.

Layout-agnostic: replies come as ids in batch order ("d:t:c", "d:t:r<k>", "d:t:kl", and
"d:t:c#k" copies of a chosen reply). A rejected or mismatched reply pairs with the latest
chosen reply (original or copy) of its turn before it -- by construction the one in its own
unit. The first (un-copied) chosen reply is the one that counts for NLL/SFT and KTO.

Losses are summed per micro-batch and divided by the whole optimizer step's count of what the objective
averages over (pairs; chosen replies for nll; chosen + rejected replies for kto), so gradient accumulation
weighs every pair alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cso_dist import losses as L
from cso_dist.losses.functions import sft_nll
from cso_dist.pack.types import ReplyId

if TYPE_CHECKING:
    from cso_dist.config import TrainConfig


@dataclass
class Structure:
    """Index structure of the replies of one micro-batch."""

    chosen: list[int] = field(default_factory=list)  # primary chosen replies
    pair_c: list[int] = field(default_factory=list)  # (chosen, rejected) pairs
    pair_r: list[int] = field(default_factory=list)
    kl: list[int] = field(default_factory=list)  # KTO mismatched completions

    @property
    def counts(self) -> dict:
        return {"chosen": len(self.chosen), "pairs": len(self.pair_r), "examples": len(self.chosen) + len(self.pair_r)}


def structure(reply_ids: list[ReplyId]) -> Structure:
    s = Structure()
    last_chosen: dict[tuple[str, int], int] = {}
    for i, rid in enumerate(map(ReplyId.parse, reply_ids)):  # ids from a layout are ReplyIds already
        if rid.kind == "c":
            last_chosen[rid.turn_key] = i
            if not rid.copy:
                s.chosen.append(i)
        elif rid.kind == "kl":
            s.kl.append(i)
        else:
            if rid.turn_key not in last_chosen:
                raise ValueError(f"reply {rid} has no chosen reply of its turn before it in the batch")
            s.pair_c.append(last_chosen[rid.turn_key])
            s.pair_r.append(i)
    return s


COUNTS = ("chosen", "pairs", "examples")  # what a step's losses are normalised by (Structure.counts)


@dataclass
class Replies:
    """One micro-batch's replies for an objective: log-probs, token counts, structure, reference lookup."""

    logps: torch.Tensor
    ntok: torch.Tensor
    s: Structure
    reply_ids: list[ReplyId]
    ref: dict[str, tuple[float, int]] | None

    def idx(self, xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=self.logps.device)

    def refs(self, ix: list[int]) -> torch.Tensor:
        """Reference log-probs of replies `ix` (a copy of a chosen reply reads its original's)."""
        vals = [self.ref[ReplyId.parse(self.reply_ids[i]).key][0] for i in ix]
        return torch.tensor(vals, dtype=self.logps.dtype, device=self.logps.device)


def hyperparameters(spec: L.Method, cfg: TrainConfig, beta: float) -> dict[str, float]:
    """The keyword hyperparameters of a method's loss: beta (resolved), and each train.<key> the method declares
    (Method.keys: label_smoothing, gamma_beta_ratio, desirable_weight, ...)."""
    return {**{k: getattr(cfg, k) for k in spec.keys}, "beta": beta}


def micro_loss(
    cfg: TrainConfig,
    reply_ids: list[ReplyId],
    logps: torch.Tensor,
    ntok: torch.Tensor,
    ref: dict[str, tuple[float, int]] | None,
    norm: dict[str, int],
) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (already divided by the step's counts) and metric sums."""
    spec = L.method(cfg.method)
    x = Replies(logps, ntok.to(logps.device).float(), structure(reply_ids), reply_ids, ref)
    c = x.idx(x.s.chosen)
    total = logps.sum() * 0.0
    m: dict[str, float] = {}
    nll_c = sft_nll(logps[c], x.ntok[c]) if len(x.s.chosen) else logps.new_zeros(0)
    w = 1.0 if spec.objective == "nll" else cfg.nll_weight  # SFT's loss is the NLL; the others may add it
    if w > 0:
        total = total + w * nll_c.sum() / max(norm["chosen"], 1)
        m["nll_sum"] = float(nll_c.detach().sum())
    m["logps_chosen_sum"] = float(logps[c].detach().sum())
    if spec.objective == "nll":
        return total, m
    loss, rc, rr, more = OBJECTIVES[spec.objective](
        spec, x, hyperparameters(spec, cfg, L.resolved_beta(spec.name, cfg.beta))
    )
    lc, lr = logps[x.idx(x.s.pair_c)], logps[x.idx(x.s.pair_r)]
    m.update(
        {
            "rewards_chosen_sum": float(rc.sum()),
            "rewards_rejected_sum": float(rr.sum()),
            "accuracies_sum": float((rc > rr).float().sum()),
            "margins_sum": float((rc - rr).sum()),
            "logps_pair_chosen_sum": float(lc.detach().sum()),
            "logps_rejected_sum": float(lr.detach().sum()),
            **more,
        }
    )
    return total + loss / max(norm[NORM[spec.objective]], 1), m


def pairwise(spec: L.Method, x: Replies, hp: dict) -> tuple:
    """Each rejected reply against its turn's chosen reply: (summed loss, chosen rewards, rejected rewards, {})."""
    pc, pr = x.idx(x.s.pair_c), x.idx(x.s.pair_r)
    inputs = {
        "chosen_logps": x.logps[pc],
        "rejected_logps": x.logps[pr],
        "chosen_len": x.ntok[pc],
        "rejected_len": x.ntok[pr],
    }
    if spec.needs_reference:
        inputs.update(ref_chosen_logps=x.refs(x.s.pair_c), ref_rejected_logps=x.refs(x.s.pair_r))
    out = spec.loss(**{k: v for k, v in inputs.items() if k in spec.params}, **hp)
    per_pair = out.losses + (out.nll if out.nll is not None else 0.0)
    return per_pair.sum(), out.chosen_rewards.detach(), out.rejected_rewards.detach(), {}


def kto(spec: L.Method, x: Replies, hp: dict) -> tuple:
    """Every chosen reply desirable, every rejected one undesirable, the mismatched completions for the reference
    point; rewards for logging pairwise (each rejected reply against its turn's chosen reply)."""
    dev, logps, s = x.logps.device, x.logps, x.s
    c, pr = x.idx(s.chosen), x.idx(s.pair_r)
    ex = torch.cat([c, pr])
    desirable = torch.cat(
        [torch.ones(len(c), dtype=torch.bool, device=dev), torch.zeros(len(pr), dtype=torch.bool, device=dev)]
    )
    out = spec.loss(logps[ex], x.refs(s.chosen + s.pair_r), desirable, logps[x.idx(s.kl)].detach(), x.refs(s.kl), **hp)
    rew = out.rewards.detach()
    pos = {int(i): k for k, i in enumerate(c.tolist())}
    beta = hp["beta"]
    rc = (
        torch.stack([rew[pos[i]] if i in pos else beta * (logps[i].detach() - x.refs([i])[0]) for i in s.pair_c])
        if s.pair_c
        else rew.new_zeros(0)
    )
    kl = float(out.kl) if out.kl is not None else 0.0
    return out.losses.sum(), rc, rew[len(c) :], {"kl": kl}


OBJECTIVES = {"pairwise": pairwise, "kto": kto}  # "nll" is micro_loss's shared NLL term alone
NORM = {"nll": "chosen", "pairwise": "pairs", "kto": "examples"}  # the step count each objective averages over


def finish_metrics(sums: dict, counts: dict, method: str) -> dict:
    """Metric sums of a step (or an evaluation) -> TRL-named means."""
    objective = L.method(method).objective
    n_pairs, n_chosen = max(counts.get("pairs", 0), 1), max(counts.get("chosen", 0), 1)
    out = {"loss": sums.get("loss", 0.0)}
    if objective == "nll" or "nll_sum" in sums:
        out["nll"] = sums.get("nll_sum", 0.0) / n_chosen
    if objective == "nll":
        out["logps/chosen"] = sums.get("logps_chosen_sum", 0.0) / n_chosen
        return out
    out.update(
        {
            "rewards/chosen": sums.get("rewards_chosen_sum", 0.0) / n_pairs,
            "rewards/rejected": sums.get("rewards_rejected_sum", 0.0) / n_pairs,
            "rewards/accuracies": sums.get("accuracies_sum", 0.0) / n_pairs,
            "rewards/margins": sums.get("margins_sum", 0.0) / n_pairs,
            "logps/chosen": sums.get("logps_pair_chosen_sum", 0.0) / n_pairs,
            "logps/rejected": sums.get("logps_rejected_sum", 0.0) / n_pairs,
        }
    )
    if objective == "kto":
        out["kl"] = sums.get("kl", 0.0) / max(sums.get("micro_batches", 1), 1)
    return out
