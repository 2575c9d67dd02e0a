"""The scorer as the engines call it: the Scorer module (what DDP and DeepSpeed wrap), with by_reply, the one form
reference log-probs take."""

from __future__ import annotations

import torch

from cso_dist.pack.pairs import PairBatch
from cso_dist.pack.trie import TrieBatch
from cso_dist.scorer.attention import FlexRows, use_attention
from cso_dist.scorer.logps import score


class Scorer(torch.nn.Module):
    """Per-reply log-probs of one micro-batch (trie or per-pair) as a module forward, so DDP and DeepSpeed see a
    normal module call (their hooks gather / all-reduce around it). It holds how the model runs: the attention
    of trie rows (scorer.attention, resolved for `device` and set on the model here: `attention`) and the
    autocast dtype (`amp`: precision bf16-mixed); nothing of it is stored on the model."""

    def __init__(
        self,
        model: torch.nn.Module,
        chunk: int = 2048,
        device: torch.device | None = None,
        flex: FlexRows | None = None,
        attention: str = "auto",
        amp: torch.dtype | None = None,
    ):
        super().__init__()
        self.model, self.chunk, self.device, self.flex, self.amp = model, chunk, device, flex, amp
        self.attention = use_attention(model, attention, device)

    def forward(self, batch: TrieBatch | PairBatch, n_chunks: int = 0) -> torch.Tensor:
        return score(self.model, batch, self.chunk, self.device, n_chunks, self.flex, self.attention, self.amp)


def by_reply(batch: TrieBatch | PairBatch, logps: torch.Tensor, into: dict | None = None) -> dict:
    """reply id (without a copy marker) -> (summed log-prob, token count), the form the reference cache holds; a
    copy of a chosen reply scores as its original, so the first one is kept."""
    out = {} if into is None else into
    for rid, v, n in zip(batch.reply_ids, logps.tolist(), batch.reply_tokens.tolist()):
        out.setdefault(rid.key, (float(v), int(n)))
    return out
