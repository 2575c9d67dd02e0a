"""The training step's plan: model states (DeepSpeed's accounting), activations kept for backward, the fastest and
the cheapest setup that fit. The terms shared with the other stages (the weights one GPU holds under a sharding,
one layer's attention tensors, the trie masks) have their home here; cso_dist.plan.stages reuses them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cso_dist.models import LORA_TARGETS, LoraSettings
from cso_dist.engines import ENGINES
from cso_dist.engines.dsconfig import ZERO_STAGES as DS_ZERO_STAGES
from cso_dist.util.errors import ConfigError
from cso_dist.losses import needs_reference
from cso_dist.models import FINETUNES
from cso_dist.pack.buckets import bucket_length
from cso_dist.plan.shapes import Shape, resolve_shape
from cso_dist.scorer import ATTENTION

GIB = 2**30
HEADROOM = 0.10  # of the card: CUDA context, NCCL buffers, allocator fragmentation
NF4_BITS = 4.127  # bits per 4-bit (NF4, double-quantised) projection weight

ZERO_STAGES = (0, *DS_ZERO_STAGES)  # --zero: 0 = the torch engine (DDP), else the deepspeed engine's
OFFLOADS = ("none", "optimizer", "params")  # --offload: DeepSpeed CPU offload (params: parameters and optimizer)
PLAN_ATTENTION = tuple(a for a in ATTENTION if a != "auto")  # --attention: a method the plan can cost


@dataclass
class Setup:
    finetune: str = "full"  # full | lora | qlora (model.finetune)
    zero: int = 3  # 0 = torch engine (one process or DDP, nothing sharded); 2; 3
    offload: str = "none"  # none | optimizer | params (params implies optimizer, ZeRO-3 only)
    engine: str = "deepspeed"  # the sharded engine (dist.engine; ENGINES): its gather buffers and its name
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_gb: float = 80.0
    cpu_mem_gb: float = 1024.0  # host memory per node (CPU offload, export)
    seq_len: int = 4096  # tokens of one packed row (pack.max_tokens)
    micro_batch: int = 1  # packed rows per forward
    checkpointing: bool = True
    lora_r: int = LoraSettings.r
    lora_dropout: float = LoraSettings.dropout
    lora_targets: tuple[str, ...] = LORA_TARGETS
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit | paged_adamw (torch engine)
    logit_chunk: int = 2048
    bytes_per_el: int = 2  # bf16 compute; 4 = fp32
    attention: str = (
        "flex"  # scorer.attention over trie rows: flex (auto on CUDA; no masks, no gathered keys) | tree | dense
    )
    # key rows and branch-mask elements per row token under tree attention: measured on 150 ESConv train
    # dialogues (K = 3) at 4,096-8,192-token rows and data.max_length 2,048, at most 6.4 and 590 (median
    # 4.5 and 400); at max_length 1,024, at most 4.9 and 490. Set them from your data for a tighter plan.
    tree_keys: float = 6.5
    tree_mask: float = 600.0
    # the other stages (cso_dist.plan.stages)
    reference_cache: bool = True  # the run precomputes reference log-probs (train.method and train.reference)
    max_length: int = 2048  # data.max_length: tokens of one prompt at evaluation
    eval_batch: int = 16  # eval.batch_size: prompts per generate()
    max_new_tokens: int = 64  # eval.max_new_tokens
    eval_served: bool = False  # eval.backend openai: generation runs on the user's server
    final: str = "merged"  # train.final: merged | adapter (LoRA/QLoRA)

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def check(self) -> None:
        if self.finetune not in FINETUNES:
            raise ConfigError(f"plan: --finetune {self.finetune}: must be one of {', '.join(FINETUNES)}")
        if self.zero not in ZERO_STAGES:
            raise ConfigError(f"plan: --zero {self.zero}: must be 0 (torch engine), 2 or 3")
        if self.engine not in ENGINES:
            raise ConfigError(f"plan: engine '{self.engine}' is not one of {', '.join(ENGINES)}")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"plan: --offload {self.offload}: must be one of {', '.join(OFFLOADS)}")
        if self.finetune == "qlora" and self.zero:
            raise ConfigError("plan: --finetune qlora runs on the torch engine: use --zero 0")
        if self.offload != "none" and self.zero == 0:
            raise ConfigError("plan: --offload needs DeepSpeed (--zero 2 or 3)")
        if self.offload == "params" and self.zero != 3:
            raise ConfigError("plan: --offload params needs --zero 3")
        for k in ("gpus_per_node", "nodes", "seq_len", "micro_batch", "lora_r", "logit_chunk", "max_length"):
            if getattr(self, k) < 1:
                raise ConfigError(f"plan: --{k.replace('_', '-')} must be >= 1")
        if self.eval_batch < 1:
            raise ConfigError("plan: --eval-batch must be >= 1")
        if self.gpu_mem_gb <= 0:
            raise ConfigError("plan: --gpu-mem must be > 0")
        if self.attention not in PLAN_ATTENTION:
            raise ConfigError(f"plan: --attention {self.attention}: must be one of {', '.join(PLAN_ATTENTION)}")
        if not (self.tree_keys >= 1 and self.tree_mask >= 0):
            raise ConfigError("plan: --tree-keys must be >= 1 and --tree-mask >= 0")


def budget(s: Setup) -> float:
    """Usable bytes of one GPU (the card read as GiB, less the headroom)."""
    return s.gpu_mem_gb * GIB * (1 - HEADROOM)


def host_budget(s: Setup) -> float:
    """Usable host bytes of one node."""
    return s.cpu_mem_gb * GIB * (1 - HEADROOM)


def _opt_bytes(optimizer: str) -> int:
    """Optimizer-state bytes per fp32 trainable parameter on the torch engine."""
    return 2 if "8bit" in optimizer else 8


def gather(shape: Shape, s: Setup) -> float:
    """ZeRO-3's all-gather / prefetch buffers: one layer gathered and the next prefetched (DeepSpeed: 4 bytes per
    parameter of the largest layer). FSDP2 (engine fsdp2): the rest of the root group (embeddings, LM head, final
    norm) gathered for the whole forward, and the current and the next decoder layer, in the compute dtype."""
    if s.zero != 3:
        return 0
    if ENGINES[s.engine].root_gathered:
        emb = shape.vocab * shape.hidden * (1 if shape.tied else 2)
        layer = (shape.params() - emb) / shape.layers
        return (emb + 2 * layer) * s.bytes_per_el * (1 - 1 / s.gpus)
    return 4 * shape.largest_layer()


def base_weights(shape: Shape, s: Setup) -> float:
    """Per-GPU bytes of the model's own weights (no adapters) under the setup's sharding: NF4 projections for QLoRA,
    the compute dtype otherwise; ZeRO-3 keeps 1 / GPUs of them plus the gather buffers (none with parameter
    offload); the torch engine and ZeRO-2 keep all of them."""
    P, b = shape.params(), s.bytes_per_el
    if s.finetune == "qlora":  # nf4 (double quant) for projections, the compute dtype for the rest
        lin = shape.linear_params()
        return lin * NF4_BITS / 8 + (P - lin) * b
    if s.zero == 3:
        return (0 if s.offload == "params" else P * b / s.gpus) + gather(shape, s)
    return P * b


def adapter_params(shape: Shape, s: Setup) -> int:
    """LoRA parameters (0 for full fine-tuning)."""
    return shape.lora_params(s.lora_r, s.lora_targets) if s.finetune != "full" else 0


def model_states(shape: Shape, s: Setup) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states (DeepSpeed's accounting)."""
    P, n = shape.params(), s.gpus
    w, T = base_weights(shape, s), adapter_params(shape, s)
    if s.finetune == "qlora" or (s.finetune == "lora" and s.zero == 0):  # fp32 adapters and their Adam states
        return {"params": w + 4 * T, "gradients": 4 * T, "optimizer": _opt_bytes(s.optimizer) * T}
    off = s.offload != "none"
    if s.finetune == "lora":  # DeepSpeed: bf16 adapters, fp32 master copies partitioned
        return {"params": w + 2 * T, "gradients": 0 if off else 6 * T / n, "optimizer": 0 if off else 12 * T / n}
    if s.zero == 0:  # torch engine: weights, gradients and both Adam moments in the compute dtype
        return {"params": w, "gradients": w, "optimizer": 2 * w}
    if s.zero == 2:
        return {"params": w, "gradients": 0 if off else 6 * P / n, "optimizer": 0 if off else 12 * P / n}
    return {"params": w, "gradients": 0 if off else 4 * P / n, "optimizer": 0 if off else 12 * P / n}


def attention_bytes_per_token(shape: Shape, s: Setup, tree: bool) -> float:
    """One layer's attention tensors per token: q and the output, plus the gathered (tree) or plain (flex) keys and
    values, not repeated; or (dense, and plain causal attention) q, the repeated k and v, the output. And the
    log-sum-exp."""
    b, qd = s.bytes_per_el, shape.heads * shape.head_dim
    if tree:
        return 2 * qd * b + 2 * _key_rows(s) * shape.kv_heads * shape.head_dim * b + 4 * shape.heads
    return 4 * qd * b + 4 * shape.heads


def layer_bytes_per_token(shape: Shape, s: Setup) -> float:
    """What autograd keeps per token for one decoder layer (see the package docstring)."""
    b, h = s.bytes_per_el, shape.hidden
    norms = shape.norms_per_layer * (12 * h + 4)
    attn = attention_bytes_per_token(shape, s, _tree(shape, s))
    mlp = 4 * shape.intermediate * b
    extra = 0.0
    if s.finetune in ("lora", "qlora"):
        lin = shape.linears()
        targets = [t for t in s.lora_targets if t in lin]
        extra = len(targets) * s.lora_r * b  # lora_A outputs
        if s.lora_dropout > 0:  # each target's dropout keeps its own copy of the input and a mask
            extra += sum((b + 1) * lin[t][0] for t in targets)
    return norms + attn + mlp + extra


def _tree(shape: Shape, s: Setup) -> bool:
    """Whether trie rows run tree (or flex) attention: scorer.attention auto picks dense for eager models."""
    return s.attention != "dense" and not shape.eager


def _key_rows(s: Setup) -> float:
    """Key/value rows a layer keeps per row token: tree gathers each turn's history again; flex reads k, v."""
    return max(s.tree_keys, 1.0) if s.attention == "tree" else 1.0


def trie_masks(shape: Shape, s: Setup) -> tuple[float, float]:
    """(the boolean masks of a micro-batch, the additive mask SDPA makes of them per layer) in bytes: tree, the
    branch masks; dense, one [L x L] mask; flex, none."""
    b, L, B = s.bytes_per_el, s.seq_len, s.micro_batch
    if _tree(shape, s):
        bool_mask = B * L * s.tree_mask if s.attention == "tree" else 0.0
        return bool_mask, bool_mask * b
    return B * L * L, B * L * L * b


def eager_scores(shape: Shape, rows: int, length: int, b: int) -> float:
    """Attention scores an eager model materialises per layer: scores, soft-capped, probabilities."""
    return 3 * rows * shape.heads * length * length * b if shape.eager else 0.0


def dequantised(shape: Shape, s: Setup) -> float:
    """QLoRA: the largest projection dequantised for its matmul (0 otherwise)."""
    return max(x * y for x, y in shape.linears().values()) * s.bytes_per_el if s.finetune == "qlora" else 0.0


def lm_head(shape: Shape, s: Setup, tokens: int) -> float:
    """The LM head over `logit_chunk` reply tokens at a time: logits, fp32 upcast, log-softmax, its gradient."""
    return min(s.logit_chunk, tokens) * shape.vocab * (s.bytes_per_el + 12)


def activations(shape: Shape, s: Setup, checkpointing: bool) -> dict[str, float]:
    """Per-GPU activation bytes of one micro-batch. The parts, and `peak`: what is held
    throughout backward (`saved`, the kept tree masks) plus the larger of the two phases that
    never overlap, the LM head over the reply tokens and the backward of one layer (with
    checkpointing: that layer recomputed, its mask, and the gradients flowing through it)."""
    b, h, L, B = s.bytes_per_el, shape.hidden, s.seq_len, s.micro_batch
    T = B * L
    per_layer = T * layer_bytes_per_token(shape, s) + eager_scores(shape, B, L, b)
    bool_mask, mask_layer = trie_masks(shape, s)
    # tree: the history key/value rows a layer gathers beyond one per token (part of per_layer already)
    extra_keys = T * 2 * (_key_rows(s) - 1) * shape.kv_heads * shape.head_dim * b if _tree(shape, s) else 0.0
    if checkpointing:
        saved = shape.layers * T * h * b  # each layer's input
        recompute = per_layer + mask_layer
        kept_masks = bool_mask
    else:
        saved = shape.layers * per_layer
        recompute = 0.0
        kept_masks = bool_mask + shape.layers * mask_layer
    saved += T * (12 * h + 2 * shape.head_dim * b)  # final norm, rotary tables
    working = T * 2 * (h + shape.intermediate) * b + 2 * dequantised(shape, s)  # gradients through one layer
    head = lm_head(shape, s, T)
    peak = saved + kept_masks + max(head, recompute + working)
    return {
        "saved": saved,
        "recompute": recompute,
        "working": working,
        "lm_head": head,
        "trie_mask": kept_masks
        + (mask_layer if checkpointing else 0)
        + extra_keys * (1 if checkpointing else shape.layers),
        "peak": peak,
    }


def plan(shape: Shape, s: Setup) -> dict:
    s.check()
    ms = model_states(shape, s)
    states = sum(ms.values())
    usable = budget(s)
    out = {
        "model": shape.name,
        "params": shape.params(),
        "setup": dataclasses.asdict(s),
        "per_gpu_gib": {k: v / GIB for k, v in ms.items()},
        "budget_gib": usable / GIB,
    }
    if s.finetune in ("lora", "qlora"):
        out["trainable_params"] = adapter_params(shape, s)
    for ck in (False, True):
        a = activations(shape, s, ck)
        total = states + a["peak"]
        out["checkpointing" if ck else "no_checkpointing"] = {
            "activations_gib": {k: v / GIB for k, v in a.items()},
            "total_gib": total / GIB,
            "fits": total <= usable,
        }
    chosen = out["checkpointing" if s.checkpointing else "no_checkpointing"]
    out["total_gib"], out["fits"] = chosen["total_gib"], chosen["fits"]
    host = _cpu_offload(shape, s)
    out["cpu_offload_gib_per_node"] = host / GIB
    out["host_fits"] = host <= host_budget(s)
    out["fits"] = out["fits"] and out["host_fits"]
    return out


def _cpu_offload(shape: Shape, s: Setup) -> float:
    """Host memory per node that offload needs (DeepSpeed: 16 or 18 bytes/param over the nodes, x1.5 buffers)."""
    if s.offload == "none":
        return 0.0
    T = shape.params() if s.finetune == "full" else adapter_params(shape, s)
    return T * (18 if s.offload == "params" else 16) / s.nodes * 1.5


def _candidates(s: Setup, same_gpus: bool = False):
    """Cheaper first: fewer GPUs, then no offload, then no checkpointing, then ZeRO-2 before 3."""
    # QLoRA: the torch engine only; full fine-tuning: ZeRO (DDP holds a whole optimizer state per GPU); LoRA: any
    zeros = (
        (0,) if s.finetune == "qlora" else tuple(z for z in ZERO_STAGES if z) if s.finetune == "full" else ZERO_STAGES
    )
    gpn_options = sorted({g for g in (1, 2, 4, 8) if g <= max(8, s.gpus_per_node)} | {s.gpus_per_node})
    layouts = sorted(
        {(nodes, g) for nodes in (1, 2, 4, 8, 16, 32, 64) for g in gpn_options if nodes == 1 or g == max(gpn_options)},
        key=lambda x: x[0] * x[1],
    )
    if same_gpus:
        layouts = [(s.nodes, s.gpus_per_node)]
    for nodes, g in layouts:
        for offload in OFFLOADS:
            for ck in (False, True):
                for z in zeros:
                    c = dataclasses.replace(s, nodes=nodes, gpus_per_node=g, zero=z, offload=offload, checkpointing=ck)
                    try:
                        c.check()
                    except ConfigError:
                        continue
                    yield c


def cheapest(shape: Shape, s: Setup, same_gpus: bool = False) -> dict | None:
    """The first setup (in `_candidates` order) that fits the same card, seq_len and micro-batch;
    `same_gpus`: the fastest one on the given nodes x GPUs."""
    for c in _candidates(s, same_gpus):
        p = plan(shape, c)
        if p["fits"]:
            return {
                "nodes": c.nodes,
                "gpus_per_node": c.gpus_per_node,
                "zero": c.zero,
                "offload": c.offload,
                "checkpointing": c.checkpointing,
                "total_gib": p["total_gib"],
            }
    return None


def engine_words(zero: int, offload: str) -> str:
    return "torch engine" if zero == 0 else f"ZeRO-{zero}, offload {offload}"


def _describe(best: dict) -> str:
    return (
        f"{best['nodes']} node(s) x {best['gpus_per_node']} GPU(s), {engine_words(best['zero'], best['offload'])}, "
        f"checkpointing {'on' if best['checkpointing'] else 'off'} ({best['total_gib']:.1f} GiB per GPU)"
    )


def format_plan(p: dict, best: dict | None, here: dict | None = None) -> str:
    """The training table and the fastest and cheapest setups (cso_dist.plan.stages formats the other stages)."""
    s = p["setup"]
    spec = ENGINES[s.get("engine", "deepspeed")]
    eng = "torch engine (DDP)" if s["zero"] == 0 else spec.label.format(stage=s["zero"], offload=s["offload"])
    lines = [
        f"{p['model']}: {p['params'] / 1e9:.2f} B parameters"
        + (
            f", {p['trainable_params'] / 1e6:.1f} M trainable (LoRA r={s['lora_r']})" if "trainable_params" in p else ""
        ),
        f"{s['finetune']} on {s['nodes']} node(s) x {s['gpus_per_node']} GPU(s) of {s['gpu_mem_gb']:g} GB, {eng}; "
        f"micro-batch {s['micro_batch']} x {s['seq_len']} tokens",
        "",
        f"{'training step, per GPU (GiB)':<34}{'no checkpointing':>18}{'checkpointing':>16}",
    ]
    for k, v in p["per_gpu_gib"].items():
        lines.append(f"  {k:<32}{v:>18.2f}{v:>16.2f}")
    a0, a1 = p["no_checkpointing"]["activations_gib"], p["checkpointing"]["activations_gib"]
    names = {
        "saved": "activations kept for backward",
        "recompute": "one layer recomputed (ckpt)",
        "working": "backward working set",
        "lm_head": "LM head (reply tokens, chunked)",
        "trie_mask": "trie-layout overhead",  # dense: the [L x L] masks; tree: branch masks + history keys
        "peak": "activation peak",
    }
    for k, label in names.items():
        lines.append(f"  {label:<32}{a0[k]:>18.2f}{a1[k]:>16.2f}")
    t0, t1 = p["no_checkpointing"], p["checkpointing"]
    lines.append(f"  {'total':<32}{t0['total_gib']:>18.2f}{t1['total_gib']:>16.2f}")
    yn = {True: "yes", False: "NO"}
    lines.append(
        f"  {'fits in ' + format(p['budget_gib'], '.1f') + ' GiB usable':<32}{yn[t0['fits']]:>18}{yn[t1['fits']]:>16}"
    )
    if p["cpu_offload_gib_per_node"]:
        lines.append(
            f"  host memory for offload: {p['cpu_offload_gib_per_node']:.0f} GiB per node of "
            f"{s['cpu_mem_gb']:g} GB ({'fits' if p['host_fits'] else 'does NOT fit'})"
        )
    lines.append("")
    lines.append("fastest setup on these GPUs: " + (_describe(here) if here else "none fits"))
    lines.append(
        "cheapest setup that fits (fewest GPUs; offload costs speed): "
        + (_describe(best) if best else "none up to 64 nodes (lower --seq-len / --micro-batch, or another --finetune)")
    )
    return "\n".join(lines)


def setup_from_config(cfg) -> tuple[Shape, Setup]:
    """The shape and setup a run config describes (its `plan` section names the model and card)."""

    if not cfg.plan.model:
        raise ConfigError("config: plan.model: set it to a preset (7b, 8b, 9b, 13b, 34b, 70b) or an HF config path")
    zero, offload = ENGINES[cfg.dist.engine].sharding(cfg)
    m, t = cfg.model, cfg.train
    flex = cfg.scorer.attention in ("auto", "flex")  # auto is flex on the GPUs a plan is for
    s = Setup(
        finetune=m.finetune,
        zero=zero,
        offload=offload,
        engine=cfg.dist.engine,
        gpus_per_node=max(cfg.slurm.gpus_per_node, 1),
        nodes=cfg.slurm.nodes,
        gpu_mem_gb=cfg.plan.gpu_mem_gb,
        cpu_mem_gb=cfg.plan.cpu_mem_gb,
        seq_len=bucket_length(cfg.pack.max_tokens, cfg.pack.bucket) if flex else cfg.pack.max_tokens,
        micro_batch=1,
        checkpointing=t.gradient_checkpointing,
        lora_r=m.lora_r,
        lora_dropout=m.lora_dropout,
        lora_targets=tuple(m.lora_target_modules),
        optimizer=t.optimizer,
        logit_chunk=cfg.scorer.logit_chunk,
        bytes_per_el=2 if m.precision == "bf16" else 4,
        attention="flex" if flex else cfg.scorer.attention,
        reference_cache=needs_reference(t.method) and t.reference == "cache",
        max_length=cfg.data.max_length,
        eval_batch=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        eval_served=cfg.eval.backend == "openai",
        final=t.final,
    )
    return resolve_shape(cfg.plan.model), s
