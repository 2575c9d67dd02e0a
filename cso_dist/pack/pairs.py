"""The plain per-pair layout: the reference implementation and the baseline.

Each pair is two padded rows, history + chosen and history + rejected, run through the
model's ordinary forward with a 2-D padding mask and full logits -- exactly what per-pair DPO
trainers do. Histories are truncated by the same policy as the trie layout
(cso_dist.data.render.turn_examples), so both layouts score identical token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import Renderer, turn_examples
from cso_dist.data.strategies import StrategySet
from cso_dist.pack.types import ReplyId


@dataclass
class PairRow:
    reply_id: ReplyId
    history: list[int]
    reply: list[int]

    def __len__(self) -> int:
        return len(self.history) + len(self.reply)


def dialogue_pair_rows(
    d: PrefDialogue, renderer: Renderer, sset: StrategySet, max_length: int | None = None
) -> list[list[PairRow]]:
    """Per target turn with negatives, its rows: chosen first, then each rejected reply."""
    out = []
    for ex in turn_examples(d, renderer, sset, max_length):
        if not ex.rejected:
            continue
        rows = [PairRow(ReplyId(d.id, ex.turn, "c"), ex.history, ex.chosen)]
        rows += [PairRow(ReplyId(d.id, ex.turn, f"r{k}"), ex.history, r) for k, r in enumerate(ex.rejected)]
        out.append(rows)
    return out


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    reply_mask: torch.Tensor  # [B, L] 1 on reply tokens (targets)
    reply_ids: list[ReplyId]
    reply_tokens: torch.Tensor  # [B]
    n_tokens: int  # tokens processed including padding


def collate_pairs(rows: list[PairRow], pad_id: int) -> PairBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    rep = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        seq = r.history + r.reply
        ids[b, : len(seq)] = torch.tensor(seq)
        att[b, : len(seq)] = 1
        rep[b, len(r.history) : len(seq)] = 1
    return PairBatch(ids, att, rep, [r.reply_id for r in rows], rep.sum(1), len(rows) * width)
