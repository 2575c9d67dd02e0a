"""`cso-dist plan`: per-GPU memory of a CSO training job before you queue it.

Model states follow DeepSpeed's own accounting (`estimate_zero{2,3}_model_states_mem_needs`):
bf16 weights, fp32 master weights and Adam moments, 16-bit + 32-bit gradient partitions.
Activations follow what autograd saves in an HF decoder layer, measured with saved-tensor
hooks on this project's models (tests/test_plan.py checks the estimate against the measured
peak memory of tiny models): per token and layer two RMSNorms (12·h bytes each), q, the
repeated k and v, and the attention output (4·heads·head_dim·b), the log-sum-exp, and the
gated MLP (4·intermediate·b). The trie layout's overhead depends on pack.attention: dense
keeps a boolean [L x L] mask that SDPA turns into an additive mask in the compute dtype,
saved once per layer for backward; tree (the default) keeps no [L x L] tensor -- each
turn's branches attend a gathered copy of their history's keys and values (`tree_keys`
key rows per row token, instead of the repeated k and v) under a small mask
(`tree_mask` elements per row token, additive per layer). With gradient checkpointing only
each layer's input stays, plus one layer recomputed in backward. The LM head runs on reply
tokens only, `logit_chunk` at a time.

Byte counts use b = 2 (bf16 compute). Card and host sizes are read as GiB (an "80 GB" card
has 80 GiB); "fits" keeps 10% of them for the CUDA context, NCCL buffers and fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cso_dist.config import LORA_TARGETS, LoraSettings
from cso_dist.errors import ConfigError
from cso_dist.models import FINETUNES
from cso_dist.scorer import ATTENTION
from cso_dist.engines import ENGINES

GIB = 2**30
HEADROOM = 0.10  # of the card: CUDA context, NCCL buffers, allocator fragmentation

ZERO_STAGES = (0, 2, 3)  # --zero: 0 = the torch engine (DDP), 2 / 3 = DeepSpeed ZeRO
OFFLOADS = ("none", "optimizer", "params")  # --offload: DeepSpeed CPU offload (params: parameters and optimizer)
PLAN_ATTENTION = tuple(a for a in ATTENTION if a != "auto")  # --attention: a method the plan can cost


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that decide its memory."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    norms_per_layer: int = 2  # gemma2: 4 (pre/post attention and MLP)
    eager: bool = False  # attention scores materialised (gemma2 soft-capping runs eager)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every projection of one layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        per = sum(a * b for a, b in self.linears().values())
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layers * (per + bias)

    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * self.norms_per_layer * self.hidden + self.hidden
        return emb + self.linear_params() + norms

    def largest_layer(self) -> int:
        """DeepSpeed's `largest_layer_params`: the biggest single module (the embedding here)."""
        return max(self.vocab * self.hidden, max(a * b for a, b in self.linears().values()))

    def lora_params(self, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        lin = self.linears()
        return self.layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets if t in lin)


# The paper's models and the usual sizes. Numbers from each model's published config.json.
PRESETS: dict[str, Shape] = {
    "7b": Shape("Qwen2.5-7B", 3584, 28, 28, 4, 128, 18944, 152064, qkv_bias=True),
    "8b": Shape("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256),
    "9b": Shape("Gemma-2-9B", 3584, 42, 16, 8, 256, 14336, 256000, tied=True, norms_per_layer=4, eager=True),
    "13b": Shape("Llama-2-13B", 5120, 40, 40, 40, 128, 13824, 32000),
    "34b": Shape("CodeLlama-34B", 8192, 48, 64, 8, 128, 22016, 32000),
    "70b": Shape("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256),
}


def shape_from_hf_config(path: str | Path) -> Shape:
    """A Shape from an HF `config.json`, the folder holding it, or a Hub id in the HF cache."""
    p = Path(path)
    if not p.exists():
        from cso_dist.models import hub  # (imports torch: only for a name that is no file here)

        p = hub.resolve(str(path), key="plan --model") if hub.is_hub_id(str(path)) else p
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"plan: --model {path}: not a preset ({', '.join(PRESETS)}) and no config.json there")
    try:
        c = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"plan: {p}: bad JSON: {e}") from None
    c = c.get("text_config", c)
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if k not in c]
    if missing:
        raise ConfigError(f"plan: {p}: field {missing[0]} missing (a decoder-only LM config is needed)")
    mt = str(c.get("model_type", ""))
    heads = int(c["num_attention_heads"])
    return Shape(
        name=mt or p.parent.name,
        hidden=int(c["hidden_size"]),
        layers=int(c["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        intermediate=int(c["intermediate_size"]),
        vocab=int(c["vocab_size"]),
        tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bool(c.get("attention_bias", mt.startswith("qwen2"))),
        norms_per_layer=4 if mt.startswith("gemma2") or mt.startswith("gemma3") else 2,
        eager=mt.startswith("gemma2"),
    )


def resolve_shape(model: str) -> Shape:
    return PRESETS[model.lower()] if model.lower() in PRESETS else shape_from_hf_config(model)


@dataclass
class Setup:
    method: str = "full"  # full | lora | qlora
    zero: int = 3  # 0 = torch engine (one process or DDP, nothing sharded); 2; 3
    offload: str = "none"  # none | optimizer | params (params implies optimizer, ZeRO-3 only)
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_gb: float = 80.0
    cpu_mem_gb: float = 1024.0  # host memory per node (CPU offload)
    seq_len: int = 4096  # tokens of one packed row (pack.max_tokens)
    micro_batch: int = 1  # packed rows per forward
    checkpointing: bool = True
    lora_r: int = LoraSettings.r
    lora_dropout: float = LoraSettings.dropout
    lora_targets: tuple[str, ...] = LORA_TARGETS
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit | paged_adamw (torch engine)
    logit_chunk: int = 2048
    bytes_per_el: int = 2  # bf16 compute; 4 = fp32
    attention: str = "tree"  # pack.attention over trie rows: tree | flex (no masks, no gathered keys) | dense
    # key rows and branch-mask elements per row token under tree attention: measured on 150 ESConv train
    # dialogues (K = 3) at 4,096-8,192-token rows and data.max_length 2,048, at most 6.4 and 590 (median
    # 4.5 and 400); at max_length 1,024, at most 4.9 and 490. Set them from your data for a tighter plan.
    tree_keys: float = 6.5
    tree_mask: float = 600.0

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def check(self) -> None:
        if self.method not in FINETUNES:
            raise ConfigError(f"plan: --method {self.method}: must be one of {', '.join(FINETUNES)}")
        if self.zero not in ZERO_STAGES:
            raise ConfigError(f"plan: --zero {self.zero}: must be 0 (torch engine), 2 or 3")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"plan: --offload {self.offload}: must be one of {', '.join(OFFLOADS)}")
        if self.method == "qlora" and self.zero:
            raise ConfigError("plan: --method qlora runs on the torch engine: use --zero 0")
        if self.offload != "none" and self.zero == 0:
            raise ConfigError("plan: --offload needs DeepSpeed (--zero 2 or 3)")
        if self.offload == "params" and self.zero != 3:
            raise ConfigError("plan: --offload params needs --zero 3")
        for k in ("gpus_per_node", "nodes", "seq_len", "micro_batch", "lora_r", "logit_chunk"):
            if getattr(self, k) < 1:
                raise ConfigError(f"plan: --{k.replace('_', '-')} must be >= 1")
        if self.gpu_mem_gb <= 0:
            raise ConfigError("plan: --gpu-mem must be > 0")
        if self.attention not in PLAN_ATTENTION:
            raise ConfigError(f"plan: --attention {self.attention}: must be one of {', '.join(PLAN_ATTENTION)}")
        if not (self.tree_keys >= 1 and self.tree_mask >= 0):
            raise ConfigError("plan: --tree-keys must be >= 1 and --tree-mask >= 0")


def _opt_bytes(optimizer: str) -> int:
    """Optimizer-state bytes per fp32 trainable parameter on the torch engine."""
    return 2 if "8bit" in optimizer else 8


def model_states(shape: Shape, s: Setup) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states (DeepSpeed's accounting)."""
    P, n, b = shape.params(), s.gpus, s.bytes_per_el
    gather = 4 * shape.largest_layer() if s.zero == 3 else 0  # ZeRO-3 all-gather / prefetch buffers
    if s.method == "qlora":  # nf4 (double quant: 4.127 bits) for projections, bf16 for the rest; fp32 adapters
        lin = shape.linear_params()
        T = shape.lora_params(s.lora_r, s.lora_targets)
        return {
            "params": lin * 4.127 / 8 + (P - lin) * b + 4 * T,
            "gradients": 4 * T,
            "optimizer": _opt_bytes(s.optimizer) * T,
        }
    if s.method == "lora":
        T = shape.lora_params(s.lora_r, s.lora_targets)
        if s.zero == 0:
            return {"params": P * b + 4 * T, "gradients": 4 * T, "optimizer": _opt_bytes(s.optimizer) * T}
        base = P * b / (n if s.zero == 3 else 1) + gather
        if s.offload == "params":
            base = gather
        off = s.offload != "none"
        return {"params": base + 2 * T, "gradients": 0 if off else 6 * T / n, "optimizer": 0 if off else 12 * T / n}
    if s.zero == 0:  # torch engine: weights, gradients and both Adam moments in the compute dtype
        return {"params": P * b, "gradients": P * b, "optimizer": 2 * P * b}
    if s.zero == 2:
        off = s.offload != "none"
        return {"params": 2 * P, "gradients": 0 if off else 6 * P / n, "optimizer": 0 if off else 12 * P / n}
    params = 0 if s.offload == "params" else 2 * P / n
    off = s.offload != "none"
    return {"params": params + gather, "gradients": 0 if off else 4 * P / n, "optimizer": 0 if off else 12 * P / n}


def layer_bytes_per_token(shape: Shape, s: Setup) -> float:
    """What autograd keeps per token for one decoder layer (see the module docstring)."""
    b, h, qd = s.bytes_per_el, shape.hidden, shape.heads * shape.head_dim
    norms = shape.norms_per_layer * (12 * h + 4)
    if _tree(shape, s):  # q and the output, plus the gathered (tree) or plain (flex) keys and values, not repeated
        attn = 2 * qd * b + 2 * _key_rows(s) * shape.kv_heads * shape.head_dim * b + 4 * shape.heads
    else:  # q, the repeated k and v, the output
        attn = 4 * qd * b + 4 * shape.heads
    mlp = 4 * shape.intermediate * b
    extra = 0.0
    if s.method in ("lora", "qlora"):
        lin = shape.linears()
        targets = [t for t in s.lora_targets if t in lin]
        extra = len(targets) * s.lora_r * b  # lora_A outputs
        if s.lora_dropout > 0:  # each target's dropout keeps its own copy of the input and a mask
            extra += sum((b + 1) * lin[t][0] for t in targets)
    return norms + attn + mlp + extra


def _tree(shape: Shape, s: Setup) -> bool:
    """Whether trie rows run tree (or flex) attention: pack.attention auto picks dense for eager models."""
    return s.attention != "dense" and not shape.eager


def _key_rows(s: Setup) -> float:
    """Key/value rows a layer keeps per row token: tree gathers each turn's history again; flex reads k, v."""
    return max(s.tree_keys, 1.0) if s.attention == "tree" else 1.0


def activations(shape: Shape, s: Setup, checkpointing: bool) -> dict[str, float]:
    """Per-GPU activation bytes of one micro-batch. The parts, and `peak`: what is held
    throughout backward (`saved`, the kept tree masks) plus the larger of the two phases that
    never overlap, the LM head over the reply tokens and the backward of one layer (with
    checkpointing: that layer recomputed, its mask, and the gradients flowing through it)."""
    b, h, L, B = s.bytes_per_el, shape.hidden, s.seq_len, s.micro_batch
    T = B * L
    per_layer = T * layer_bytes_per_token(shape, s)
    if _tree(shape, s):  # the branch masks (bool), and their additive form that SDPA saves with each layer
        bool_mask = T * s.tree_mask if s.attention == "tree" else 0.0
        mask_layer = bool_mask * b
    else:  # one boolean [L x L] mask, and the additive [L x L] mask SDPA saves with each layer
        bool_mask, mask_layer = B * L * L, B * L * L * b
    per_layer += 3 * B * shape.heads * L * L * b if shape.eager else 0  # scores, soft-capped, probs
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
    working = T * 2 * (h + shape.intermediate) * b  # gradients flowing through one layer in backward
    if s.method == "qlora":
        working += 2 * max(x * y for x, y in shape.linears().values()) * b  # a dequantised weight, twice
    chunk = min(s.logit_chunk, T)
    head = chunk * shape.vocab * (b + 12)  # logits, fp32 upcast, log-softmax, its gradient
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
    budget = s.gpu_mem_gb * GIB * (1 - HEADROOM)
    out = {
        "model": shape.name,
        "params": shape.params(),
        "setup": dataclasses.asdict(s),
        "per_gpu_gib": {k: v / GIB for k, v in ms.items()},
        "budget_gib": budget / GIB,
    }
    if s.method in ("lora", "qlora"):
        out["trainable_params"] = shape.lora_params(s.lora_r, s.lora_targets)
    for ck in (False, True):
        a = activations(shape, s, ck)
        total = states + a["peak"]
        out["checkpointing" if ck else "no_checkpointing"] = {
            "activations_gib": {k: v / GIB for k, v in a.items()},
            "total_gib": total / GIB,
            "fits": total <= budget,
        }
    chosen = out["checkpointing" if s.checkpointing else "no_checkpointing"]
    out["total_gib"], out["fits"] = chosen["total_gib"], chosen["fits"]
    host = _cpu_offload(shape, s)
    out["cpu_offload_gib_per_node"] = host / GIB
    out["host_fits"] = host <= s.cpu_mem_gb * GIB * (1 - HEADROOM)
    out["fits"] = out["fits"] and out["host_fits"]
    return out


def _cpu_offload(shape: Shape, s: Setup) -> float:
    """Host memory per node that offload needs (DeepSpeed: 16 or 18 bytes/param over the nodes, x1.5 buffers)."""
    if s.offload == "none":
        return 0.0
    T = shape.params() if s.method == "full" else shape.lora_params(s.lora_r, s.lora_targets)
    return T * (18 if s.offload == "params" else 16) / s.nodes * 1.5


def _candidates(s: Setup, same_gpus: bool = False):
    """Cheaper first: fewer GPUs, then no offload, then no checkpointing, then ZeRO-2 before 3."""
    # QLoRA: the torch engine only; full fine-tuning: ZeRO (DDP holds a whole optimizer state per GPU); LoRA: any
    zeros = (0,) if s.method == "qlora" else tuple(z for z in ZERO_STAGES if z) if s.method == "full" else ZERO_STAGES
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


def _describe(best: dict) -> str:
    eng = "torch engine" if best["zero"] == 0 else f"ZeRO-{best['zero']}, offload {best['offload']}"
    return (
        f"{best['nodes']} node(s) x {best['gpus_per_node']} GPU(s), {eng}, "
        f"checkpointing {'on' if best['checkpointing'] else 'off'} ({best['total_gib']:.1f} GiB per GPU)"
    )


def format_plan(p: dict, best: dict | None, here: dict | None = None) -> str:
    s = p["setup"]
    eng = "torch engine (DDP)" if s["zero"] == 0 else f"DeepSpeed ZeRO-{s['zero']}, offload {s['offload']}"
    lines = [
        f"{p['model']}: {p['params'] / 1e9:.2f} B parameters"
        + (
            f", {p['trainable_params'] / 1e6:.1f} M trainable (LoRA r={s['lora_r']})" if "trainable_params" in p else ""
        ),
        f"{s['method']} on {s['nodes']} node(s) x {s['gpus_per_node']} GPU(s) of {s['gpu_mem_gb']:g} GB, {eng}; "
        f"micro-batch {s['micro_batch']} x {s['seq_len']} tokens",
        "",
        f"{'per GPU (GiB)':<34}{'no checkpointing':>18}{'checkpointing':>16}",
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
        + (_describe(best) if best else "none up to 64 nodes (lower --seq-len / --micro-batch, or another --method)")
    )
    return "\n".join(lines)


def setup_from_config(cfg) -> tuple[Shape, Setup]:
    """The shape and setup a run config describes (its `plan` section names the model and card)."""

    if not cfg.plan.model:
        raise ConfigError("config: plan.model: set it to a preset (7b, 8b, 9b, 13b, 34b, 70b) or an HF config path")
    zero, offload = ENGINES[cfg.dist.engine].sharding(cfg)
    m, t = cfg.model, cfg.train
    s = Setup(
        method=m.finetune,
        zero=zero,
        offload=offload,
        gpus_per_node=max(cfg.slurm.gpus_per_node, 1),
        nodes=cfg.slurm.nodes,
        gpu_mem_gb=cfg.plan.gpu_mem_gb,
        cpu_mem_gb=cfg.plan.cpu_mem_gb,
        seq_len=cfg.pack.max_tokens,
        micro_batch=1,
        checkpointing=t.gradient_checkpointing,
        lora_r=m.lora_r,
        lora_dropout=m.lora_dropout,
        lora_targets=tuple(m.lora_target_modules),
        optimizer=t.optimizer,
        logit_chunk=cfg.pack.logit_chunk,
        bytes_per_el=2 if m.precision == "bf16" else 4,
        attention="dense" if cfg.pack.attention == "dense" else "flex" if cfg.pack.attention == "flex" else "tree",
    )
    return resolve_shape(cfg.plan.model), s
