"""Tree attention: attention that costs what the prefix trie attends (scorer.attention).

A packed trie row (cso_dist.pack.trie) attends in a fixed shape: no query sees another unit, a trunk
token sees its unit's trunk up to itself, and a branch token sees its history (a prefix of the trunk)
plus its own branch so far. The kinds:

  dense  one [T, T] boolean mask over the row, run by the model's own attention (sdpa / eager):
         the reference; its work is T^2 whatever the tree attends.
  tree   SDPA per segment of the row: each unit's trunk as plain causal attention (is_causal, no mask),
         and each turn's branches as one call against [history ; branches] with a small
         [branches x (history + branches)] mask. Nothing across units or above the diagonal is computed
         and no [T, T] tensor exists. Runs on CPU and GPU (any SDPA kernel).
  flex   FlexAttention with a BlockMask built from the same intervals: 128 x 128 blocks that are fully
         masked are skipped. Compiled (torch.compile, fullgraph, static shapes), the block mask by
         create_block_mask's compiled path. Compiled code is specialised to a row length, so rows run
         padded to a multiple of pack.bucket (cso_dist.pack.tree_plan.padded_row): a run compiles at most
         twice per bucket (with and without gradients), says how many times it did, and a run that meets
         dynamo's recompile limit stops with an error naming pack.bucket instead of falling back to the
         eager kernel (the full score matrix). On CPU FlexAttention has no backward: scoring only.
  auto   flex on CUDA (3.4x tree's DPO step on the Qwen2.5-1.5B shape, H200, docs/training.md); on CPU tree,
         or dense where the model soft-caps attention logits (gemma2), which SDPA cannot.

`use_attention(model, kind)` registers the two attention functions with transformers (an explicit call, the
first time a model asks for them), sets a loaded model's attention implementation and returns the kind it
resolved; the Scorer (cso_dist.scorer.run) calls it and holds the kind, and `trie_logps` is given it and passes
the tree plan or the BlockMask (cso_dist.pack.tree_plan). The registered
implementations run plain SDPA for every other call (generation, per-pair rows), so a model set to tree
attention works everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.pack.buckets import bucket_count, bucket_length
from cso_dist.pack.tree_plan import TreePlan, longest_keys, padded_row, tree_block_mask, tree_plan
from cso_dist.scorer import ATTENTION
from cso_dist.scorer.device import unwrap

if TYPE_CHECKING:
    from cso_dist.pack.trie import TrieBatch


_NAMES = {"tree": "cso_tree", "flex": "cso_flex"}  # registered attention implementation per kind
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
    """FlexAttention compiled (static shapes, one graph: meeting the recompile limit raises rather than running
    eagerly), or its unfused reference (exactness tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True) if compiled else flex_attention


def _flex(query, key, value, block_mask, scaling, softcap, compiled: bool = True) -> torch.Tensor:
    fn = _flex_kernel(compiled)
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


def _check_window(kind: str, longest: int, window) -> None:
    if window and longest > window:
        raise CsoError(
            f"scorer.attention {kind}: a query sees {longest} keys, more than the model's sliding window "
            f"({window}); use scorer.attention dense"
        )


def _check_tree(plan: TreePlan, kwargs: dict) -> None:
    if kwargs.get("softcap"):
        raise CsoError("scorer.attention tree: this model soft-caps attention logits, which SDPA cannot; use auto")
    _check_window("tree", plan.longest, kwargs.get("sliding_window"))


def tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as cso_tree and cso_flex: a tree plan (kwarg cso_tree) runs per
    segment, a BlockMask with its FlexRows (kwarg cso_flex) runs FlexAttention, anything else is plain SDPA."""
    plan = kwargs.pop("cso_tree", None)
    if plan is not None:
        _check_tree(plan, kwargs)
        return _tree_sdpa(query, key, value, plan, scaling, dropout), None
    flex = kwargs.pop("cso_flex", None)
    if flex is not None:
        if dropout:
            raise CsoError("scorer.attention flex: attention dropout is not supported; set it to 0")
        if not query.is_cuda and torch.is_grad_enabled() and query.requires_grad:
            raise CsoError("scorer.attention flex: FlexAttention has no backward on CPU; use scorer.attention tree")
        return _flex(query, key, value, attention_mask, scaling, kwargs.get("softcap"), flex.compiled), None
    return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Register cso_tree and cso_flex with transformers (idempotent): called by use_attention before a model is
    set to one of them, never at import."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    for name in _NAMES.values():
        AttentionInterface.register(name, tree_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


# ---------------------------------------------------------------- choosing a model's kind
def on_cuda(device=None) -> bool:
    """Whether a model placed on `device` computes on a GPU ("" or None: where the engine will put it, a GPU when
    there is one)."""
    return torch.device(device).type == "cuda" if device else torch.cuda.is_available()


def resolve(kind: str, model, cuda: bool = False) -> str:
    """`kind` for this model: auto -> flex on CUDA (`cuda`); elsewhere tree, or dense where the model soft-caps
    attention logits."""
    if kind not in ATTENTION:
        raise ConfigError(f"scorer.attention: '{kind}' is not one of {', '.join(ATTENTION)}")
    cfg = unwrap(model).config
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if kind == "auto":
        return "flex" if cuda else "dense" if softcap else "tree"
    if kind == "tree" and softcap:
        raise ConfigError(
            f"scorer.attention: tree cannot soft-cap attention logits ({cfg.model_type}); use auto, dense or flex"
        )
    return kind


def use_attention(model, kind: str, device=None) -> str:
    """Set a loaded model's attention for trie rows to `kind` (resolved for a model on `device`: on_cuda);
    returns the kind used. dense keeps the model's own implementation (sdpa where tree or flex was set before)."""
    kind, hf = resolve(kind, model, on_cuda(device)), unwrap(model)
    if kind in _NAMES:
        register()
        hf.set_attn_implementation(_NAMES[kind])
    elif hf.config._attn_implementation in _NAMES.values():
        hf.set_attn_implementation("sdpa")
    return kind


def decoder_mask_kwargs(
    kind: str, model, batch: TrieBatch, device, dense_dtype: torch.dtype, flex: FlexRows
) -> tuple[TrieBatch, dict]:
    """The row a decoder call runs and the attention arguments it gets under `kind` (what use_attention set on
    the model): the batch itself with the tree plan or the dense mask, or under flex the row padded to its bucket
    with its BlockMask (built once per micro-batch: FlexRows.prepare). Tensors stay on the CPU
    (cso_dist.scorer.device.feed moves them with the other inputs); the tree plan and the BlockMask, which the
    attention function reads itself, are built for `device`. A tree or flex kind on a model set to another
    attention is refused: its own attention would ignore the plan and attend across the branches."""
    if kind not in ("dense", *_NAMES):
        raise CsoError(f"scorer: attention kind '{kind}' is not one of dense, {', '.join(_NAMES)}")
    impl = getattr(unwrap(model).config, "_attn_implementation", None)
    if kind in _NAMES and impl != _NAMES[kind]:
        raise CsoError(f"scorer: {kind} attention asked, but the model runs {impl}: set it with use_attention")
    if kind == "tree":
        return batch, {"attention_mask": _NO_MASK, "cso_tree": tree_plan(batch).to(device)}
    if kind == "flex":
        row, block_mask = flex.prepare(batch, device, getattr(unwrap(model).config, "sliding_window", None))
        return row, {"attention_mask": block_mask, "cso_flex": flex}
    return batch, {"attention_mask": batch.attention_mask(dense_dtype)}


# ---------------------------------------------------------------- flex: bounded compilation
@dataclass(frozen=True)
class FlexRows:
    """How flex runs trie rows: padded to a multiple of `bucket` tokens (0: each row at its own length), compiled,
    with at most `limit` compilations of one piece of code (dynamo's recompile limit, raised for the run)."""

    bucket: int = 1024
    limit: int = 8
    compiled: bool = True
    # the last micro-batch's padded row and BlockMask: the policy's forward and the live reference's share them
    last: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, max_tokens: int, bucket: int) -> "FlexRows":
        """A run's rows of at most `max_tokens` tokens: two compilations per length (with and without gradients),
        and 8 more (dynamo's default) for other models or dtypes scored in the same process; dynamo's default when
        rows run at their own lengths."""
        n = bucket_count(max_tokens, bucket)
        return cls(bucket, 2 * n + 8 if n else 8)

    def prepare(self, batch: TrieBatch, device, window=None) -> tuple:
        """(the row padded to its bucket, its BlockMask on `device`), built once for the last micro-batch asked
        for; compiled: create_block_mask's compiled path. A model's sliding window shorter than what a query sees
        is refused."""
        key = (id(batch), str(device))
        hit = self.last.get(key)
        if hit is not None and hit[0] is batch:
            return hit[1], hit[2]
        _check_window("flex", longest_keys(batch), window)
        row = padded_row(batch, bucket_length(batch.n_tokens, self.bucket)) if self.compiled else batch
        mask = tree_block_mask(row, device, compiled=self.compiled)
        self.last.clear()
        self.last[key] = (batch, row, mask)
        return row, mask

    @contextlib.contextmanager
    def compiling(self):
        """The scope of one forward: dynamo's recompile limit at `limit`; meeting it is a one-line error naming
        pack.bucket, never a silent fall back to the eager kernel."""
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            with torch._dynamo.config.patch(recompile_limit=self.limit, fail_on_recompile_limit_hit=True):
                yield
        except FailOnRecompileLimitHit as e:
            how = f"pack.bucket is {self.bucket}" if self.bucket else "pack.bucket is 0 (each row at its own length)"
            raise CsoError(
                f"pack.bucket: compiled FlexAttention met more row lengths than its recompile limit ({self.limit}) "
                f"allows, and would fall back to its eager kernel; {how}: raise it (a run compiles at most twice per "
                "multiple of pack.bucket up to pack.max_tokens)"
            ) from e


def compile_count() -> int:
    """Graphs torch.compile built in this process so far (dynamo's counters): what a run reports as its
    compilations."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
