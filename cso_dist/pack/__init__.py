"""Tokenised preference dialogues -> model inputs: the prefix-trie layout and the per-pair baseline."""

from cso_dist.pack.layout import LaidOut, PairLayout, TrieLayout, lay_out, score_units
from cso_dist.pack.logps import trie_logps
from cso_dist.pack.pairs import PairBatch, PairRow, collate_pairs, dialogue_pair_rows, pair_logps
from cso_dist.pack.trie import ReplyId, Span, TrieBatch, Unit, collate_trie, dialogue_units, kl_completions, pack_units

__all__ = [
    "LaidOut",
    "PairBatch",
    "PairLayout",
    "PairRow",
    "ReplyId",
    "Span",
    "TrieBatch",
    "TrieLayout",
    "Unit",
    "collate_pairs",
    "collate_trie",
    "dialogue_pair_rows",
    "dialogue_units",
    "kl_completions",
    "lay_out",
    "pack_units",
    "pair_logps",
    "score_units",
    "trie_logps",
]
