"""Attention plans of a packed trie row, read from its per-token intervals (cso_dist.pack.trie.TrieBatch): the
segments tree attention runs (tree_plan) and FlexAttention's BlockMask (tree_block_mask), with the rows flex
runs (padded_row, to cso_dist.pack.buckets' lengths). Pure data: the attention functions that use them live in
cso_dist.scorer.attention.

A packed row attends in a fixed shape: no query sees another unit, a trunk token sees its unit's trunk up to
itself, and a branch token sees its history (a prefix of the trunk) plus its own branch so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cso_dist.util.errors import CsoError


if TYPE_CHECKING:
    from cso_dist.pack.trie import TrieBatch


@dataclass(frozen=True)
class Segment:
    """Rows [q0, q1) attend keys [k0, k1) (their history, all visible) followed by keys [q0, q1) under
    `mask` ([q1 - q0, (k1 - k0) + (q1 - q0)] bool); mask None = plain causal over [q0, q1) (a trunk)."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: torch.Tensor | None


@dataclass
class TreePlan:
    segments: list[Segment]
    longest: int  # the most keys any query sees (for sliding-window models)
    key_index: torch.Tensor  # every segment's keys, history then own rows, in segment order
    q_sizes: list[int]
    k_sizes: list[int]

    @classmethod
    def of(cls, segments: list[Segment], longest: int) -> "TreePlan":
        idx = [torch.arange(a, b) for s in segments for a, b in ((s.k0, s.k1), (s.q0, s.q1))]
        key_index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        return cls(
            segments, longest, key_index, [s.q1 - s.q0 for s in segments], [s.k1 - s.k0 + s.q1 - s.q0 for s in segments]
        )

    def per_token(self) -> tuple[float, float]:
        """(key rows, branch-mask elements) per row token: what `cso-dist plan` calls tree_keys and tree_mask."""
        T = sum(self.q_sizes)
        masks = sum(0 if s.mask is None else s.mask.numel() for s in self.segments)
        return (sum(self.k_sizes) / T, masks / T) if T else (1.0, 0.0)

    def to(self, device) -> "TreePlan":
        segs = [Segment(s.q0, s.q1, s.k0, s.k1, None if s.mask is None else s.mask.to(device)) for s in self.segments]
        return TreePlan(segs, self.longest, self.key_index.to(device), self.q_sizes, self.k_sizes)


def tree_plan(batch: TrieBatch) -> TreePlan:
    """The row's segments, read from the batch's per-token intervals: a token sees [ctx_lo, ctx_hi) and
    [own_lo, itself]; a trunk token has ctx_hi = itself + 1. A run of trunk tokens of one unit is one causal
    segment; a run of branch tokens sharing (ctx_lo, ctx_hi) -- one turn's replies -- is one masked segment."""
    lo, hi, own = (np.asarray(t.numpy(), dtype=np.int64) for t in (batch.ctx_lo, batch.ctx_hi, batch.own_lo))
    T = len(lo)
    q = np.arange(T)
    trunk = hi == q + 1
    if T == 0:
        return TreePlan.of([], 0)
    new = np.ones(T, dtype=bool)
    new[1:] = (trunk[1:] != trunk[:-1]) | (lo[1:] != lo[:-1]) | (~trunk[1:] & (hi[1:] != hi[:-1]))
    starts = np.flatnonzero(new).tolist() + [T]
    segs, longest = [], 0
    for a, b in zip(starts[:-1], starts[1:]):
        if trunk[a]:
            if lo[a] != a:
                raise CsoError(f"tree attention: trunk rows {a}..{b} do not start their unit ({lo[a]})")
            segs.append(Segment(a, b, a, a, None))
            longest = max(longest, b - a)
            continue
        k0, k1 = int(lo[a]), int(hi[a])
        n = b - a
        i = torch.arange(n)
        rel = torch.from_numpy(own[a:b] - a)
        branch = (i[None, :] >= rel[:, None]) & (i[None, :] <= i[:, None])  # own branch, causal
        mask = torch.cat([torch.ones(n, k1 - k0, dtype=torch.bool), branch], dim=1)
        segs.append(Segment(a, b, k0, k1, mask))
        longest = max(longest, (k1 - k0) + int((i - rel).max()) + 1)
    return TreePlan.of(segs, longest)


def padded_row(batch: TrieBatch, length: int) -> TrieBatch:
    """`batch` with its row padded to `length` tokens. A padding token attends to nothing (its interval
    [q+1, q+1) is empty and it has no own range up to itself), no token attends to it, and nothing is predicted from
    it or scored on it, so every reply's log-prob and its gradient are those of the unpadded row."""
    from cso_dist.pack.trie import TrieBatch

    n = length - batch.n_tokens
    if n < 0:
        raise CsoError(f"padded_row: a row of {batch.n_tokens} tokens cannot be padded to {length}")
    if n == 0:
        return batch
    after = torch.arange(batch.n_tokens + 1, length + 1)  # q + 1 for every padding position q
    zeros = torch.zeros(1, n, dtype=torch.long)
    return TrieBatch(
        torch.cat([batch.input_ids, zeros], dim=1),
        torch.cat([batch.position_ids, zeros], dim=1),
        torch.cat([batch.ctx_lo, after]),
        torch.cat([batch.ctx_hi, after]),
        torch.cat([batch.own_lo, after]),
        batch.pred_idx,
        batch.target_ids,
        batch.token_reply,
        batch.reply_ids,
        batch.reply_tokens,
        length,
    )


def tree_block_mask(batch: TrieBatch, device, block_size: int = 128, compiled: bool = False):
    """FlexAttention BlockMask of the row: the same rule as TrieBatch.allowed, as a mask_mod. `compiled`: built by
    create_block_mask's compiled path (one kernel over the [T/128, T/128] blocks, not T x T Python-level work)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lo, hi, own = (t.to(device) for t in (batch.ctx_lo, batch.ctx_hi, batch.own_lo))

    def mask_mod(b, h, q, k):
        return (k >= lo[q]) & ((k < hi[q]) | ((k >= own[q]) & (k <= q)))

    T = batch.n_tokens
    return create_block_mask(mask_mod, None, None, T, T, device=device, BLOCK_SIZE=block_size, _compile=compiled)


def longest_keys(batch: TrieBatch) -> int:
    """The most keys any query of the row sees (for a model's sliding window): a trunk token sees its unit up to
    itself, a branch token its history and its branch up to itself."""
    if batch.n_tokens == 0:
        return 0
    q = torch.arange(batch.n_tokens)
    trunk = batch.ctx_hi == q + 1
    seen = torch.where(trunk, q + 1 - batch.ctx_lo, (batch.ctx_hi - batch.ctx_lo) + (q + 1 - batch.own_lo))
    return int(seen.clamp(min=0).max())
