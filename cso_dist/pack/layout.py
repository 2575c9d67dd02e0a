"""Dialogues laid out for the model (LaidOut, lay_out) and scored unit by unit (score_units): shared by precompute,
training and eval."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from cso_dist.progress import progress as progress_bar

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import Renderer, tokenize_dialogue
from cso_dist.data.strategies import StrategySet
from cso_dist.pack.logps import trie_logps
from cso_dist.pack.pairs import PairBatch, PairRow, collate_pairs, dialogue_pair_rows
from cso_dist.pack.trie import TrieBatch, Unit, collate_trie, dialogue_units, kl_completions, pack_units


@dataclass
class LaidOut:
    dialogues: list[PrefDialogue]
    units: list[list[Unit]]  # per dialogue, in dialogue order

    def all_units(self, indices: list[int] | None = None) -> list[Unit]:
        idx = range(len(self.units)) if indices is None else indices
        return [u for i in idx for u in self.units[i]]


def lay_out(
    dialogues: list[PrefDialogue],
    renderer: Renderer,
    sset: StrategySet,
    max_tokens: int,
    max_length: int | None,
    kl: bool = True,
    progress: bool = True,
) -> LaidOut:
    """Tokenise every dialogue and lay it out as trie units (with KTO mismatched branches when `kl`)."""
    toks = [
        tokenize_dialogue(d, renderer, sset)
        for d in progress_bar(dialogues, desc="tokenising", unit="dlg", enabled=progress)
    ]
    kls = kl_completions(list(zip(dialogues, toks))) if kl else {}
    units = [
        dialogue_units(d, renderer, sset, max_tokens, max_length, kls.get(d.id), t) for d, t in zip(dialogues, toks)
    ]
    return LaidOut(dialogues, units)


@torch.no_grad()
def score_units(
    model, units: list[Unit], max_tokens: int, chunk: int = 2048, progress: bool = True, desc: str = "scoring"
) -> dict[str, tuple[float, int]]:
    """reply id -> (summed log-prob, token count) for every reply of `units`, batched by token budget."""
    out: dict[str, tuple[float, int]] = {}
    batches = pack_units(units, max_tokens)
    total = sum(len(u) for u in units)
    with progress_bar(total=total, desc=desc, unit="tok", enabled=progress, unit_scale=True) as bar:
        for b in batches:
            tb = collate_trie(b)
            lp = trie_logps(model, tb, chunk).tolist()
            for rid, v, n in zip(tb.reply_ids, lp, tb.reply_tokens.tolist()):
                out.setdefault(rid.key, (v, n))  # copies of a chosen reply score the same
            bar.update(tb.n_tokens)
    return out


# ---------------------------------------------------------------- the two layouts of a training split
class TrieLayout:
    """Each dialogue as prefix-trie units; an epoch's micro-batches pack units in dialogue order up to
    `max_tokens`. batches(order) -> TrieBatch list; each batch answers .logps(model, chunk)."""

    kind = "trie"

    def __init__(
        self,
        dialogues: list[PrefDialogue],
        renderer: Renderer,
        sset: StrategySet,
        max_tokens: int,
        max_length: int | None,
        kl: bool = False,
        progress: bool = True,
    ):
        self.max_tokens = max_tokens
        self.items: list[list[Unit]] = lay_out(
            dialogues, renderer, sset, max_tokens, max_length, kl=kl, progress=progress
        ).units

    def batches(self, order: list[int]) -> list[TrieBatch]:
        units = [u for i in order for u in self.items[i]]
        return [collate_trie(b) for b in pack_units(units, self.max_tokens)]


class PairLayout:
    """The per-pair baseline: (history + reply) rows, a turn's rows in one micro-batch, padded rows up to
    `max_tokens` (rows x width). batches(order) -> PairBatch list."""

    kind = "pair"

    def __init__(
        self,
        dialogues: list[PrefDialogue],
        renderer: Renderer,
        sset: StrategySet,
        max_tokens: int,
        max_length: int | None,
    ):
        self.max_tokens = max_tokens
        self.pad = renderer.tokenizer.pad_token_id or 0
        self.items: list[list[list[PairRow]]] = [dialogue_pair_rows(d, renderer, sset, max_length) for d in dialogues]

    def batches(self, order: list[int]) -> list[PairBatch]:
        out, cur = [], []
        for turn in (t for i in order for t in self.items[i]):
            if cur and (len(cur) + len(turn)) * max(len(r) for r in cur + turn) > self.max_tokens:
                out.append(collate_pairs(cur, self.pad))
                cur = []
            cur.extend(turn)
        if cur:
            out.append(collate_pairs(cur, self.pad))
        return out
