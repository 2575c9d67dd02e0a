"""Model shapes for the planner: the numbers of a decoder-only transformer that decide its memory, the presets of
the paper's models, and any HF config.json (a file, its folder, or a Hub id in the HF cache)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cso_dist.models import LORA_TARGETS
from cso_dist.util.errors import ConfigError


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
