"""From per-reply log-probs of one micro-batch to the training loss and TRL-named metrics.

Layout-agnostic: replies come as ids in batch order ("d:t:c", "d:t:r<k>", "d:t:kl", and
"d:t:c#k" copies of a chosen reply). A rejected or mismatched reply pairs with the latest
chosen reply (original or copy) of its turn before it -- by construction the one in its own
unit. The first (un-copied) chosen reply is the one that counts for NLL/SFT and KTO.

Losses are summed per micro-batch and divided by the whole optimizer step's count of pairs
(chosen replies for SFT, examples for KTO), so gradient accumulation weighs every pair alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cso_dist import losses as L
from cso_dist.config import TrainConfig
from cso_dist.pack.trie import ReplyId


@dataclass
class Structure:
    """Index structure of the replies of one micro-batch."""

    chosen: list[int] = field(default_factory=list)  # primary chosen replies
    pair_c: list[int] = field(default_factory=list)  # (chosen, rejected) pairs
    pair_r: list[int] = field(default_factory=list)
    kl: list[int] = field(default_factory=list)  # KTO mismatched completions

    @property
    def counts(self) -> dict:
        return {"chosen": len(self.chosen), "pairs": len(self.pair_r), "kto": len(self.chosen) + len(self.pair_r)}


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


def hyperparameters(spec: L.Method, cfg: TrainConfig, beta: float) -> dict[str, float]:
    """The keyword hyperparameters of a method's loss: beta (resolved), and each other defaulted parameter
    from the train.<same name> config key (label_smoothing, gamma_beta_ratio, desirable_weight, ...)."""
    out = {k: getattr(cfg, k) for k in spec.defaults if hasattr(cfg, k)}
    out["beta"] = beta
    return out


def micro_loss(
    cfg: TrainConfig,
    reply_ids: list[ReplyId],
    logps: torch.Tensor,
    ntok: torch.Tensor,
    ref: dict[str, tuple[float, int]] | None,
    norm: dict[str, int],
) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (already divided by the step's counts) and metric sums."""
    s = structure(reply_ids)
    method, beta = cfg.method, L.resolved_beta(cfg.method, cfg.beta)
    spec = L.method(method)
    dev = logps.device
    ntok = ntok.to(dev).float()
    idx = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731

    def refs(ix: list[int]) -> torch.Tensor:
        return torch.tensor([ref[ReplyId.parse(reply_ids[i]).key][0] for i in ix], dtype=logps.dtype, device=dev)

    c, pc, pr = idx(s.chosen), idx(s.pair_c), idx(s.pair_r)
    m: dict[str, float] = {}
    total = logps.sum() * 0.0
    nll_c = L.sft_nll(logps[c], ntok[c]) if len(s.chosen) else logps.new_zeros(0)
    if method == "sft" or cfg.nll_weight > 0:
        w = 1.0 if method == "sft" else cfg.nll_weight
        total = total + w * nll_c.sum() / max(norm["chosen"], 1)
        m["nll_sum"] = float(nll_c.detach().sum())
    m["logps_chosen_sum"] = float(logps[c].detach().sum())
    if method == "sft":
        return total, m
    lc, lr, nc, nr = logps[pc], logps[pr], ntok[pc], ntok[pr]
    if method == "kto":
        ex = torch.cat([c, pr])
        desirable = torch.cat(
            [torch.ones(len(c), dtype=torch.bool, device=dev), torch.zeros(len(pr), dtype=torch.bool, device=dev)]
        )
        kl_ix = idx(s.kl)
        out = spec.loss(
            logps[ex],
            refs(s.chosen + s.pair_r),
            desirable,
            logps[kl_ix].detach(),
            refs(s.kl),
            **hyperparameters(spec, cfg, beta),
        )
        total = total + out.losses.sum() / max(norm["kto"], 1)
        # pairwise rewards for logging: each rejected reply against its turn's chosen reply
        rew = out.rewards.detach()
        pos = {int(i): k for k, i in enumerate(c.tolist())}
        rc = (
            torch.stack([rew[pos[i]] if i in pos else beta * (logps[i].detach() - refs([i])[0]) for i in s.pair_c])
            if s.pair_c
            else rew.new_zeros(0)
        )
        rr = rew[len(c) :]
        m["kl"] = float(out.kl) if out.kl is not None else 0.0
    else:
        inputs = {"chosen_logps": lc, "rejected_logps": lr, "chosen_len": nc, "rejected_len": nr}
        if spec.needs_reference:
            inputs.update(ref_chosen_logps=refs(s.pair_c), ref_rejected_logps=refs(s.pair_r))
        out = spec.loss(**{k: v for k, v in inputs.items() if k in spec.params}, **hyperparameters(spec, cfg, beta))
        per_pair = out.losses + (out.nll if out.nll is not None else 0.0)
        total = total + per_pair.sum() / max(norm["pairs"], 1)
        rc, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    m.update(
        {
            "rewards_chosen_sum": float(rc.sum()),
            "rewards_rejected_sum": float(rr.sum()),
            "accuracies_sum": float((rc > rr).float().sum()),
            "margins_sum": float((rc - rr).sum()),
            "logps_pair_chosen_sum": float(lc.detach().sum()),
            "logps_rejected_sum": float(lr.detach().sum()),
        }
    )
    return total, m


def finish_metrics(sums: dict, counts: dict, method: str) -> dict:
    """Metric sums of a step (or an evaluation) -> TRL-named means."""
    n_pairs, n_chosen = max(counts.get("pairs", 0), 1), max(counts.get("chosen", 0), 1)
    out = {"loss": sums.get("loss", 0.0)}
    if method == "sft" or "nll_sum" in sums:
        out["nll"] = sums.get("nll_sum", 0.0) / n_chosen
    if method == "sft":
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
    if method == "kto":
        out["kl"] = sums.get("kl", 0.0) / max(sums.get("micro_batches", 1), 1)
    return out
