"""Dialogues laid out for the model: as trie units (LaidOut, lay_out; shared by precompute, training and eval) and
a training split's two layouts (TrieLayout, PairLayout), whose micro-batches cso_dist.scorer runs."""

from __future__ import annotations

from dataclasses import dataclass

from cso_dist.util.progress import progress as progress_bar

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import Renderer, tokenize_dialogue
from cso_dist.data.strategies import StrategySet
from cso_dist.pack.pairs import PairBatch, PairRow, collate_pairs, dialogue_pair_rows
from cso_dist.pack.trie import TrieBatch, collate_trie, dialogue_units, kl_completions, pack_units
from cso_dist.pack.types import Unit


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


# ---------------------------------------------------------------- the two layouts of a training split
class TrieLayout:
    """Each dialogue as prefix-trie units; an epoch's micro-batches pack units in dialogue order up to
    `max_tokens`. batches(order) -> TrieBatch list (cso_dist.scorer.score runs one)."""

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
