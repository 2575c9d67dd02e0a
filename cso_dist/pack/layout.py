"""Dialogues laid out for the model (LaidOut, lay_out) and scored unit by unit (score_units): shared by precompute,
training and eval."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import Renderer, tokenize_dialogue
from cso_dist.data.strategies import StrategySet
from cso_dist.pack.logps import trie_logps
from cso_dist.pack.trie import Unit, collate_trie, dialogue_units, kl_completions, pack_units


@dataclass
class LaidOut:
    dialogues: list[PrefDialogue]
    units: list[list[Unit]]  # per dialogue, in dialogue order

    def all_units(self, indices: list[int] | None = None) -> list[Unit]:
        idx = range(len(self.units)) if indices is None else indices
        return [u for i in idx for u in self.units[i]]


def lay_out(dialogues: list[PrefDialogue], renderer: Renderer, sset: StrategySet, max_tokens: int,
            max_length: int | None, kl: bool = True, progress: bool = True) -> LaidOut:
    """Tokenise every dialogue and lay it out as trie units (with KTO mismatched branches when `kl`)."""
    toks = [tokenize_dialogue(d, renderer, sset)
            for d in tqdm(dialogues, desc="tokenising", unit="dlg", disable=None if progress else True)]
    kls = kl_completions(list(zip(dialogues, toks))) if kl else {}
    units = [dialogue_units(d, renderer, sset, max_tokens, max_length, kls.get(d.id), t)
             for d, t in zip(dialogues, toks)]
    return LaidOut(dialogues, units)


@torch.no_grad()
def score_units(model, units: list[Unit], max_tokens: int, chunk: int = 2048,
                progress: bool = True, desc: str = "scoring") -> dict[str, tuple[float, int]]:
    """reply id -> (summed log-prob, token count) for every reply of `units`, batched by token budget."""
    out: dict[str, tuple[float, int]] = {}
    batches = pack_units(units, max_tokens)
    total = sum(len(u) for u in units)
    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=None if progress else True) as bar:
        for b in batches:
            tb = collate_trie(b)
            lp = trie_logps(model, tb, chunk).tolist()
            for rid, v, n in zip(tb.reply_ids, lp, tb.reply_tokens.tolist()):
                out.setdefault(rid.key, (v, n))  # copies of a chosen reply score the same
            bar.update(tb.n_tokens)
    return out
