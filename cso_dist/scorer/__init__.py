"""Running the model on laid-out dialogues: the one place that owns device placement and autocast
(cso_dist.scorer.device), the attention implementation of trie rows (cso_dist.scorer.attention) and the forward
of both layouts (cso_dist.scorer.logps); the Scorer (cso_dist.scorer.run) holds a model's attention kind and
autocast dtype.

The engines (cso_dist.engines) run every forward through here -- training (their `Scorer`), the live reference,
precompute, likelihood eval -- and so does generation; cso_dist.pack only builds the rows they run on.
"""

from __future__ import annotations

from cso_dist.util.lazy import lazy_exports

# scorer.attention: how trie rows attend (cso_dist.scorer.attention)
ATTENTION = ("auto", "dense", "tree", "flex")

__all__ = [
    "ATTENTION",
    "Scorer",
    "autocast",
    "by_reply",
    "default_device",
    "feed",
    "model_device",
    "pair_logps",
    "resolve",
    "score",
    "to_model",
    "trie_logps",
    "unwrap",
    "use_attention",
]
__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(("Scorer", "by_reply"), "run"),
        **dict.fromkeys(("resolve", "use_attention"), "attention"),
        **dict.fromkeys(("autocast", "default_device", "feed", "model_device", "to_model", "unwrap"), "device"),
        **dict.fromkeys(("pair_logps", "score", "trie_logps"), "logps"),
    },
)
