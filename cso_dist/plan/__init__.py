"""`cso-dist plan`: per-GPU memory of every stage of a CSO run before you queue it.

The training step (cso_dist.plan.training): model states follow DeepSpeed's own accounting
(`estimate_zero{2,3}_model_states_mem_needs`): bf16 weights, fp32 master weights and Adam moments, 16-bit +
32-bit gradient partitions. Activations follow what autograd saves in an HF decoder layer, measured with
saved-tensor hooks on this project's models (tests/test_plan.py checks the estimate against the measured peak
memory of tiny models): per token and layer two RMSNorms (12·h bytes each), q, the repeated k and v, and the
attention output (4·heads·head_dim·b), the log-sum-exp, and the gated MLP (4·intermediate·b). The trie layout's
overhead depends on scorer.attention: dense keeps a boolean [L x L] mask that SDPA turns into an additive mask in
the compute dtype, saved once per layer for backward; tree (the default) keeps no [L x L] tensor -- each turn's
branches attend a gathered copy of their history's keys and values (`tree_keys` key rows per row token, instead
of the repeated k and v) under a small mask (`tree_mask` elements per row token, additive per layer). With
gradient checkpointing only each layer's input stays, plus one layer recomputed in backward. The LM head runs on
reply tokens only, `logit_chunk` at a time.

The other stages (cso_dist.plan.stages): the reference precompute, likelihood evaluation and generation run
forward only through the same engine, with the same sharding; export needs host memory.

Byte counts use b = 2 (bf16 compute). Card and host sizes are read as GiB (an "80 GB" card has 80 GiB); "fits"
keeps 10% of them for the CUDA context, NCCL buffers and fragmentation.
"""

from cso_dist.plan.shapes import PRESETS, Shape, resolve_shape, shape_from_hf_config
from cso_dist.plan.stages import all_fit, format_stages, stage_problems, stages
from cso_dist.plan.training import (
    GIB,
    HEADROOM,
    OFFLOADS,
    PLAN_ATTENTION,
    ZERO_STAGES,
    Setup,
    activations,
    budget,
    cheapest,
    format_plan,
    host_budget,
    layer_bytes_per_token,
    model_states,
    plan,
    setup_from_config,
)

__all__ = [
    "GIB",
    "HEADROOM",
    "OFFLOADS",
    "PLAN_ATTENTION",
    "PRESETS",
    "ZERO_STAGES",
    "Setup",
    "Shape",
    "activations",
    "all_fit",
    "budget",
    "cheapest",
    "format_plan",
    "format_stages",
    "host_budget",
    "layer_bytes_per_token",
    "model_states",
    "plan",
    "resolve_shape",
    "setup_from_config",
    "shape_from_hf_config",
    "stage_problems",
    "stages",
]
