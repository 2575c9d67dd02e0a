"""Prefix-trie layout: one token sequence per dialogue, non-preferred replies as branches.

A *unit* is one dialogue (or a piece of one) laid out as a trunk -- the preferred path from
the start of the dialogue -- followed by branches, each a non-preferred reply (or a KTO
mismatched completion) that hangs after its turn's history. Attention: causal along the
trunk; a branch token sees the trunk up to its history and the earlier tokens of its own
branch; nothing sees a branch. A branch's position ids continue from its history's length.
So one forward pass gives the exact log-probs of every chosen and rejected reply.

Units are packed several per micro-batch (one row, block-diagonal) up to a token budget.
A dialogue longer than the budget is split at turn boundaries: each piece re-emits the
history it needs (the trunk always starts at the dialogue's start), and a single turn whose
replies do not fit together is split over several pieces, each re-emitting the history and the
chosen reply (scored again as a copy "<id>#k"), so no reply is lost and every (chosen,
rejected) pair lies inside one unit. Turns whose
history + longest reply exceed data.max_length use the truncated history of
cso_dist.data.render (oldest messages dropped) in a unit of their own, exactly as the
per-pair layout does.

Reply ids (ReplyId): "<dialogue>:<turn>:c" (chosen), ":r<k>" (k-th non-preferred), ":kl" (KTO
mismatched); "<id>#k" marks a re-emitted copy of a chosen reply (its `key` drops the marker).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import DialogueTokens, Renderer, tokenize_dialogue, truncate_turn
from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import CsoError
from cso_dist.pack.types import ReplyId, Span, Unit


@dataclass
class _Turn:
    turn: int
    trunk: list[int]  # the trunk this turn needs: dialogue start .. end of its chosen reply
    hist: int  # length of the history inside that trunk
    chosen_id: ReplyId
    branches: list[tuple[ReplyId, list[int]]]  # (reply id, tokens)


def _turns(
    d: PrefDialogue,
    toks: DialogueTokens,
    renderer: Renderer,
    sset: StrategySet,
    max_length: int | None,
    kl: dict[int, list[int]],
) -> list[_Turn]:
    full = toks.full()
    out, hist = [], len(toks.prefix)
    ends = {}
    for j in range(len(d.messages)):
        ends[j] = hist + len(toks.head[j])
        hist = ends[j] + len(toks.body[j])
    for i in d.turn_indices():
        h, body, rej = ends[i], toks.body[i], toks.rejected.get(i, [])
        longest = max([len(body)] + [len(r) for r in rej])
        if max_length and h + longest > max_length:
            hist_ids, body, rej, _ = truncate_turn(d, renderer, sset, i, longest, max_length)
            trunk, h = hist_ids + body, len(hist_ids)
        else:
            trunk = full[: h + len(body)]
        branches = [(ReplyId(d.id, i, f"r{k}"), r) for k, r in enumerate(rej)]
        if i in kl:
            room = (max_length - h) if max_length else len(kl[i])
            if room > 0:
                branches.append((ReplyId(d.id, i, "kl"), kl[i][:room]))
        out.append(_Turn(i, trunk, h, ReplyId(d.id, i, "c"), branches))
    return out


def _new_unit(did: str, trunk: list[int]) -> Unit:
    return Unit(did, list(trunk), list(range(len(trunk))), len(trunk))


def _add_branch(u: Unit, rid: ReplyId, toks: list[int], ctx: int) -> None:
    u.spans.append(Span(rid, len(u.tokens), len(toks), ctx))
    u.tokens.extend(toks)
    u.positions.extend(range(ctx, ctx + len(toks)))


def dialogue_units(
    d: PrefDialogue,
    renderer: Renderer,
    sset: StrategySet,
    max_tokens: int,
    max_length: int | None = None,
    kl: dict[int, list[int]] | None = None,
    toks: DialogueTokens | None = None,
) -> list[Unit]:
    """Lay out one dialogue as units of at most `max_tokens` tokens each."""
    toks = toks or tokenize_dialogue(d, renderer, sset)
    units: list[Unit] = []
    cur: Unit | None = None  # open unit: trunk of the dialogue, extended turn by turn
    pending: list[tuple[ReplyId, list[int], int]] = []  # branches of the open unit, appended at close

    def close() -> None:
        nonlocal cur, pending
        if cur is not None:
            for rid, btoks, ctx in pending:
                _add_branch(cur, rid, btoks, ctx)
            units.append(cur)
        cur, pending = None, []

    for t in _turns(d, toks, renderer, sset, max_length, kl or {}):
        chosen = Span(t.chosen_id, t.hist, len(t.trunk) - t.hist, t.hist)
        extends = (
            cur is not None
            and t.trunk[: cur.trunk_len] == cur.tokens[: cur.trunk_len]
            and len(t.trunk) >= cur.trunk_len
        )
        need = len(t.trunk) + sum(len(b) for _, b in t.branches)
        if extends and need + sum(len(b) for _, b, _ in pending) <= max_tokens:
            cur.tokens = list(t.trunk)
            cur.positions = list(range(len(t.trunk)))
            cur.trunk_len = len(t.trunk)
            cur.spans.append(chosen)
            pending.extend((rid, b, t.hist) for rid, b in t.branches)
            continue
        close()
        cur = _new_unit(d.id, t.trunk)
        cur.spans.append(chosen)
        copies = 0
        for rid, b in t.branches:
            if cur.trunk_len + sum(len(x) for _, x, _ in pending) + len(b) > max_tokens:
                # the turn's replies do not fit together: continue in a new unit that re-emits the
                # history and the chosen reply (a copy, "<id>#k"), so every pair stays in one unit
                close()
                copies += 1
                cur = _new_unit(d.id, t.trunk)
                cur.spans.append(Span(t.chosen_id.with_copy(copies), chosen.start, chosen.length, chosen.ctx))
            if len(cur) + len(b) > max_tokens:
                raise CsoError(
                    f"{d.id}: turn {t.turn}: history + chosen ({len(t.trunk)} tokens) + a reply of "
                    f"{len(b)} tokens exceed pack.max_tokens={max_tokens}; raise pack.max_tokens"
                )
            pending.append((rid, b, t.hist))
        if len(t.trunk) > max_tokens:
            raise CsoError(f"{d.id}: turn {t.turn}: {len(t.trunk)} tokens exceed pack.max_tokens={max_tokens}")
    close()
    return units


def kl_completions(all_tokens: list[tuple[PrefDialogue, DialogueTokens]]) -> dict[str, dict[int, list[int]]]:
    """KTO's mismatched completions: each turn is paired with the chosen reply of the next turn of the
    dataset (cyclic), a deterministic choice independent of batching. Empty when there is one turn."""
    turns = [(d.id, i, toks.body[i]) for d, toks in all_tokens for i in d.turn_indices()]
    out: dict[str, dict[int, list[int]]] = {}
    if len(turns) < 2:
        return out
    for g, (did, i, _) in enumerate(turns):
        out.setdefault(did, {})[i] = turns[(g + 1) % len(turns)][2]
    return out


def pack_units(units: list[Unit], max_tokens: int) -> list[list[Unit]]:
    """Greedy, order-preserving packing of units into micro-batches of at most `max_tokens` tokens."""
    batches: list[list[Unit]] = []
    cur: list[Unit] = []
    size = 0
    for u in units:
        if cur and size + len(u) > max_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += len(u)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class TrieBatch:
    """A packed micro-batch: one row of tokens, and where each reply token is predicted from."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    ctx_lo: torch.Tensor  # [T] a token sees [ctx_lo, ctx_hi) ...
    ctx_hi: torch.Tensor  # [T]
    own_lo: torch.Tensor  # [T] ... and [own_lo, itself]
    pred_idx: torch.Tensor  # [N] row index whose logits predict reply token n
    target_ids: torch.Tensor  # [N]
    token_reply: torch.Tensor  # [N] which reply token n belongs to
    reply_ids: list[ReplyId]
    reply_tokens: torch.Tensor  # [R]
    n_tokens: int

    def allowed(self) -> torch.Tensor:
        """[T, T] bool: query q sees key k iff k is in [ctx_lo, ctx_hi) or in [own_lo, q]. As ctx_hi <= own_lo
        <= q, that is the causal mask cut to the token's own unit (k >= ctx_lo) minus the gap
        [ctx_hi, own_lo) of branch tokens, blanked per run of rows sharing one gap (3x faster than
        four [T, T] comparisons; it is built for every micro-batch)."""
        T = self.n_tokens
        k = torch.arange(T)
        allowed = torch.ones(T, T, dtype=torch.bool).tril_()
        allowed &= k >= self.ctx_lo[:, None]
        gap = (self.own_lo > self.ctx_hi) & (self.own_lo <= k)  # branch tokens (trunk: own_lo = unit end)
        rows = torch.nonzero(gap).squeeze(1).tolist()
        hi, own = self.ctx_hi.tolist(), self.own_lo.tolist()
        view = allowed.numpy()  # same memory; numpy fills small blocks without waking a thread pool
        start = 0
        for i in range(1, len(rows) + 1):
            r0 = rows[start]
            if i == len(rows) or rows[i] != rows[i - 1] + 1 or (hi[rows[i]], own[rows[i]]) != (hi[r0], own[r0]):
                view[r0 : rows[i - 1] + 1, hi[r0] : own[r0]] = False
                start = i
        return allowed

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """4-D mask [1, 1, T, T]. `dtype` bool: True where a query may attend a key (SDPA);
        a float dtype: additive, 0 where allowed and dtype-min elsewhere (eager attention)."""
        allowed = self.allowed()
        if dtype == torch.bool:
            return allowed[None, None]
        mask = torch.zeros(self.n_tokens, self.n_tokens, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]


def collate_trie(units: list[Unit]) -> TrieBatch:
    ids, pos, lo, hi, own = [], [], [], [], []
    pred, tgt, which, rids, rtok = [], [], [], [], []
    off = 0
    for u in units:
        n = len(u)
        ids.extend(u.tokens)
        pos.extend(u.positions)
        lo.extend([off] * n)
        # trunk token q sees [0, q]; a branch token sees [0, ctx) and its branch so far
        branch_of = [None] * n
        for s in u.spans:
            if s.start >= u.trunk_len:
                for j in range(s.start, s.start + s.length):
                    branch_of[j] = s
        for j in range(n):
            s = branch_of[j]
            if s is None:
                hi.append(off + j + 1)
                own.append(off + n)  # empty own range
            else:
                hi.append(off + s.ctx)
                own.append(off + s.start)
        for s in u.spans:
            r = len(rids)
            rids.append(s.reply_id)
            rtok.append(s.length)
            for j in range(s.length):
                pred.append(off + (s.ctx - 1 if j == 0 else s.start + j - 1))
                tgt.append(u.tokens[s.start + j])
                which.append(r)
        off += n
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return TrieBatch(t(ids)[None], t(pos)[None], t(lo), t(hi), t(own), t(pred), t(tgt), t(which), rids, t(rtok), off)


def filler_batch() -> TrieBatch:
    """A two-token row with one one-token reply: what a rank with no work left runs while the others still score,
    when every forward is a collective (ZeRO-3 gathers each layer from all ranks). Its result is discarded."""
    return collate_trie([Unit("-", [0, 0], [0, 1], 2, [Span(ReplyId("-", 0, "c"), 1, 1, 1)])])


def head_chunks(batch, chunk: int) -> int:
    """How many LM-head calls the trie scorer makes for `batch` -- a TrieBatch, or the units it is collated from --
    (its reply tokens, `chunk` at a time); 0 for a per-pair batch (full logits in one call)."""
    if isinstance(batch, TrieBatch):
        n = len(batch.pred_idx)
    elif isinstance(batch, list):
        n = sum(s.length for u in batch for s in u.spans)
    else:
        return 0
    return -(-n // chunk)
