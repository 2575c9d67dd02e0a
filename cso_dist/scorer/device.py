"""Where models run: the device a process computes on, the device a loaded model sits on, and the one call that
moves a model's inputs there and runs it under the caller's autocast (the scorer holds it: cso_dist.scorer.run).

Every path that runs a model -- trie and per-pair scoring (training, the live reference, precompute, likelihood
eval), generation, the MCTS backend, the GPU kit -- calls `feed` (or `to_model` for tensors it indexes the
model's outputs with). Data is built on the CPU; nothing else in the package moves it. tests/test_device.py runs
each of those paths with the model on another device than its data.
"""

from __future__ import annotations

import contextlib
import os

import torch


def default_device(local_rank: int | None = None) -> str:
    """This process's device: the GPU of its local rank (LOCAL_RANK when not given), else the CPU."""
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def unwrap(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper and a PEFT model."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def model_device(model) -> torch.device:
    """Where `model` computes when nobody says otherwise: its weights' device. An engine whose weights are sharded
    (ZeRO-3: a rank holds a slice, gathered per layer) names its device itself (the `device` arguments below)."""
    return next(unwrap(model).parameters()).device


def autocast(amp: torch.dtype | None, device: torch.device):
    """torch.autocast to `amp` on `device` (the compute dtype of precision bf16-mixed: cso_dist.models.AUTOCAST),
    else nothing."""
    kind = torch.device(device).type
    if amp is None or kind not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=amp)


def to_model(model, *tensors: torch.Tensor, device: torch.device | None = None) -> list[torch.Tensor]:
    """`tensors` on the model's device (`device`, default its weights'): the one place inputs move."""
    device = device or model_device(model)
    return [t.to(device, non_blocking=True) for t in tensors]


def feed(model, fn, /, device: torch.device | None = None, amp: torch.dtype | None = None, **inputs):
    """fn(**inputs) -- the model, its decoder or its generate() -- with every tensor among `inputs` moved to the
    model's device (`device`, default its weights') and under autocast to `amp` (None: none). Other values
    (caches, a tree plan built for the device) pass as they are."""
    device = device or model_device(model)
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with autocast(amp, device):
        return fn(**moved)


def cache_kw(model) -> str:
    """The name a model's forward and generate() take a key/value cache by ("cache" since transformers 5.2x,
    "past_key_values" before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def cache_of(out):
    """The key/value cache a forward returned, under either name."""
    return getattr(out, "cache", None) or out.past_key_values
