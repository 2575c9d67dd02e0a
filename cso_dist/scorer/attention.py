"""Tree attention: attention that costs what the prefix trie attends (pack.attention).

A packed trie row (cso_dist.pack.trie) attends in a fixed shape: no query sees another unit, a trunk
token sees its unit's trunk up to itself, and a branch token sees its history (a prefix of the trunk)
plus its own branch so far. The methods:

  dense  one [T, T] boolean mask over the row, run by the model's own attention (sdpa / eager):
         the reference; its work is T^2 whatever the tree attends.
  tree   SDPA per segment of the row: each unit's trunk as plain causal attention (is_causal, no mask),
         and each turn's branches as one call against [history ; branches] with a small
         [branches x (history + branches)] mask. Nothing across units or above the diagonal is computed
         and no [T, T] tensor exists. Runs on CPU and GPU (any SDPA kernel).
  flex   FlexAttention with a BlockMask built from the same intervals: 128 x 128 blocks that are fully
         masked are skipped. Compiled on CUDA; elsewhere it runs FlexAttention's unfused reference
         (exact, dense work, forward only: for exactness tests, not for speed or training).
  auto   tree, unless the model soft-caps attention logits (gemma2), which SDPA cannot: dense then.

`use_attention(model, method)` registers the two attention functions with transformers (an explicit call, the
first time a model asks for them) and sets a loaded model's attention implementation; `trie_logps` reads it
back (`method_of`) and passes the tree plan or the BlockMask (cso_dist.pack.tree_plan). The registered
implementations run plain SDPA for every other call (generation, per-pair rows), so a model set to tree
attention works everywhere.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cso_dist.errors import ConfigError, CsoError
from cso_dist.pack.tree_plan import TreePlan, tree_block_mask, tree_plan
from cso_dist.scorer import ATTENTION
from cso_dist.scorer.device import unwrap

if TYPE_CHECKING:
    from cso_dist.pack.trie import TrieBatch


_NAMES = {"tree": "cso_tree", "flex": "cso_flex"}  # registered attention implementation per method
# The 4-D "mask" a tree call passes to the decoder: transformers returns a 4-D mask as it is, so no
# [T, T] mask is built for the row; the attention function reads the plan instead.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


# ---------------------------------------------------------------- the registered attention functions
def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _tree_sdpa(query, key, value, plan: TreePlan, scaling, dropout: float) -> torch.Tensor:
    """[1, H, T, D] query, [1, Hkv, T, D] key/value -> [1, T, H, D], segment by segment. The queries split
    into the segments (they tile the row); every segment's keys -- its history, then its own rows -- come
    from one index_select, so backward is one split and one index_add, not a [T]-sized gradient per slice."""
    gqa = query.shape[1] != key.shape[1]
    qs = query.split(plan.q_sizes, dim=2)
    ks = key.index_select(2, plan.key_index).split(plan.k_sizes, dim=2)
    vs = value.index_select(2, plan.key_index).split(plan.k_sizes, dim=2)
    outs = []
    for s, q, k, v in zip(plan.segments, qs, ks, vs):
        causal = s.mask is None
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=s.mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


@functools.cache
def _flex_kernel(compiled: bool):
    """FlexAttention, compiled once per process for CUDA (the unfused reference elsewhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex(query, key, value, block_mask, scaling, softcap) -> torch.Tensor:
    fn = _flex_kernel(query.is_cuda)
    score_mod = None
    if softcap:

        def score_mod(score, b, h, q, k):
            return torch.tanh(score / softcap) * softcap

    out = fn(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def _check_tree(plan: TreePlan, kwargs: dict) -> None:
    if kwargs.get("softcap"):
        raise CsoError("pack.attention tree: this model soft-caps attention logits, which SDPA cannot; use auto")
    window = kwargs.get("sliding_window")
    if window and plan.longest > window:
        raise CsoError(
            f"pack.attention tree: a query sees {plan.longest} keys, more than the model's sliding window "
            f"({window}); use pack.attention dense"
        )


def tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as cso_tree and cso_flex: a tree plan (kwarg cso_tree) runs per
    segment, a BlockMask runs FlexAttention, anything else is plain SDPA."""
    plan = kwargs.pop("cso_tree", None)
    if plan is not None:
        _check_tree(plan, kwargs)
        return _tree_sdpa(query, key, value, plan, scaling, dropout), None
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(attention_mask, BlockMask):
        if dropout:
            raise CsoError("pack.attention flex: attention dropout is not supported; set it to 0")
        if not query.is_cuda and torch.is_grad_enabled() and query.requires_grad:
            raise CsoError("pack.attention flex: FlexAttention has no backward on CPU; use pack.attention tree")
        return _flex(query, key, value, attention_mask, scaling, kwargs.get("softcap")), None
    return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Register cso_tree and cso_flex with transformers (idempotent): called by use_attention before a model is
    set to one of them, never at import."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    for name in _NAMES.values():
        AttentionInterface.register(name, tree_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


# ---------------------------------------------------------------- choosing a model's method
def resolve(method: str, model) -> str:
    """`method` for this model: auto -> tree, or dense where the model soft-caps attention logits."""
    if method not in ATTENTION:
        raise ConfigError(f"pack.attention: '{method}' is not one of {', '.join(ATTENTION)}")
    cfg = unwrap(model).config
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if method == "auto":
        return "dense" if softcap else "tree"
    if method == "tree" and softcap:
        raise ConfigError(
            f"pack.attention: tree cannot soft-cap attention logits ({cfg.model_type}); use auto, dense or flex"
        )
    return method


def use_attention(model, method: str) -> str:
    """Set a loaded model's attention for trie rows to `method` (resolved); returns the method used. dense
    keeps the model's own implementation (sdpa where tree or flex was set before)."""
    method, hf = resolve(method, model), unwrap(model)
    if method in _NAMES:
        register()
        hf.set_attn_implementation(_NAMES[method])
    elif hf.config._attn_implementation in _NAMES.values():
        hf.set_attn_implementation("sdpa")
    return method


def method_of(model) -> str:
    """tree, flex or dense: what trie_logps runs for this model."""
    impl = getattr(unwrap(model).config, "_attn_implementation", None)
    return next((m for m, n in _NAMES.items() if n == impl), "dense")


def decoder_mask_kwargs(model, batch: TrieBatch, device, dense_dtype: torch.dtype) -> dict:
    """The attention arguments a decoder call over `batch` gets under the model's method. Tensors stay on the CPU
    (cso_dist.scorer.device.feed moves them with the other inputs); the tree plan and the BlockMask, which the attention
    function reads itself, are built for `device`."""
    method = method_of(model)
    if method == "tree":
        return {"attention_mask": _NO_MASK, "cso_tree": tree_plan(batch).to(device)}
    if method == "flex":
        return {"attention_mask": tree_block_mask(batch, device)}
    return {"attention_mask": batch.attention_mask(dense_dtype)}
