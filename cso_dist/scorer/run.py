"""The scorer as the trainer and precompute call it: the Scorer module (what DDP and DeepSpeed wrap) and
score_units (every reply of a list of trie units, batched by token budget), with by_reply, the one form reference
log-probs take."""

from __future__ import annotations

import torch

from cso_dist.pack.pairs import PairBatch
from cso_dist.pack.trie import TrieBatch, collate_trie, pack_units
from cso_dist.pack.types import Unit
from cso_dist.progress import progress as progress_bar
from cso_dist.scorer.logps import score, trie_logps


class Scorer(torch.nn.Module):
    """Per-reply log-probs of one micro-batch (trie or per-pair) as a module forward, so DDP and DeepSpeed see a
    normal module call (their hooks gather / all-reduce around it)."""

    def __init__(self, model: torch.nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch: TrieBatch | PairBatch) -> torch.Tensor:
        return score(self.model, batch, self.chunk)


def by_reply(batch: TrieBatch | PairBatch, logps: torch.Tensor, into: dict | None = None) -> dict:
    """reply id (without a copy marker) -> (summed log-prob, token count), the form the reference cache holds; a
    copy of a chosen reply scores as its original, so the first one is kept."""
    out = {} if into is None else into
    for rid, v, n in zip(batch.reply_ids, logps.tolist(), batch.reply_tokens.tolist()):
        out.setdefault(rid.key, (float(v), int(n)))
    return out


@torch.no_grad()
def score_units(
    model, units: list[Unit], max_tokens: int, chunk: int = 2048, progress: bool = True, desc: str = "scoring"
) -> dict[str, tuple[float, int]]:
    """reply id -> (summed log-prob, token count) for every reply of `units`, batched by token budget."""
    out: dict[str, tuple[float, int]] = {}
    total = sum(len(u) for u in units)
    with progress_bar(total=total, desc=desc, unit="tok", enabled=progress, unit_scale=True) as bar:
        for b in pack_units(units, max_tokens):
            tb = collate_trie(b)
            by_reply(tb, trie_logps(model, tb, chunk), out)
            bar.update(tb.n_tokens)
    return out
