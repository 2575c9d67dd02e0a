"""Tokenised preference dialogues -> model inputs, as pure data: the prefix-trie layout and the per-pair baseline
(token rows, position ids, attention plans, reply indices). Nothing here runs a model: cso_dist.scorer does."""

from cso_dist.util.lazy import lazy_exports

LAYOUTS = ("trie", "pair")  # pack.layout: the prefix trie (TrieLayout), the per-pair baseline (PairLayout)

__all__ = [
    "LAYOUTS",
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
    "filler_batch",
    "head_chunks",
    "kl_completions",
    "lay_out",
    "pack_units",
]
__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(("LaidOut", "PairLayout", "TrieLayout", "lay_out"), "layout"),
        **dict.fromkeys(("PairBatch", "PairRow", "collate_pairs", "dialogue_pair_rows"), "pairs"),
        **dict.fromkeys(
            (
                "TrieBatch",
                "collate_trie",
                "dialogue_units",
                "filler_batch",
                "head_chunks",
                "kl_completions",
                "pack_units",
            ),
            "trie",
        ),
        **dict.fromkeys(("ReplyId", "Span", "Unit"), "types"),
    },
)
