"""What the benchmark scripts share: the machine a figure came from, cached tiny models, the
same-pairs training overrides. Scripts import it as `benchlib` (they run from scripts/)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cso_dist.engines.checkpoint import numeric_conditions  # noqa: E402
from cso_dist.data.esconv import esconv_texts  # noqa: E402
from cso_dist.models import build_tiny_model  # noqa: E402
from cso_dist.util.machine import machine as cpu_model  # noqa: E402


def machine(**extra) -> dict:
    """Where a figure came from: CPU, cores, threads, kernel family and library versions, load."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
        **{k: v for k, v in numeric_conditions(1, "torch").items() if k not in ("engine", "world_size")},
        **extra,
    }


# dense bf16 peak FLOP/s of the cards MFU is reported against (the longest matching name wins: GH200 over H200)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_bf16(device_name: str) -> float | None:
    """The card's dense bf16 peak from its CUDA device name, or None for a card not in PEAK_BF16."""
    return next((PEAK_BF16[k] for k in sorted(PEAK_BF16, key=len, reverse=True) if k in device_name), None)


def tiny_model(work: Path, tokenizer: str = "qwen", log=print, **shape) -> Path:
    """A tiny random Qwen2 under `work`, built once per shape (hidden_size, num_layers, ...)."""
    name = "-".join([f"tiny-{tokenizer}", *(f"{k}{v}" for k, v in sorted(shape.items()))])
    model = work / name
    if not (model / "config.json").is_file():
        log(f"building {model.name}")
        texts = esconv_texts() if tokenizer == "bpe" else None
        build_tiny_model("qwen2", model, tokenizer=tokenizer, bpe_texts=texts, **shape)
    return model


def same_pairs_overrides(max_length: int, max_tokens: int, epochs: int) -> dict:
    """DPO with one optimizer step per epoch over all pairs: two layouts update on exactly the same
    pairs, so their losses must agree at every step (the first is ln 2 for both)."""
    return {
        "train.method": "dpo",
        "data.max_length": max_length,
        "pack.max_tokens": max_tokens,
        "train.epochs": epochs,
        "train.lr": 1e-3,
        "train.log_every": 1,
        "train.warmup_ratio": 0.0,
        "train.schedule": "constant",
        "train.grad_accum": 100000,
    }
