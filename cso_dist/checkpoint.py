"""Atomic, keep-last-k training checkpoints: trainable weights, optimizer, scheduler, RNG, data position."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from cso_dist.errors import CsoError

PREFIX = "step-"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# environment variables that select CPU kernels (and so fp32 reduction order) besides the thread count
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def numeric_conditions(world_size: int, engine: str) -> dict:
    """What a run's fp32 bits depend on besides its inputs: a resume under the same conditions
    reproduces the uninterrupted curve bit for bit; under others, within fp32 rounding."""
    cond = {
        "torch": torch.__version__,
        "engine": engine,
        "world_size": world_size,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        cond["gpu"] = torch.cuda.get_device_name()
    cond.update({k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)})
    return cond


def condition_changes(saved: dict | None, now: dict) -> str:
    """'threads 1 -> 2, ...' for the conditions that differ ('' when none or nothing was saved)."""
    if not saved:
        return ""
    keys = sorted(set(saved) | set(now), key=lambda k: (k not in now, k))
    return ", ".join(f"{k} {saved.get(k, '-')} -> {now.get(k, '-')}" for k in keys if saved.get(k) != now.get(k))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep_last: int) -> Path:
    """Write checkpoints/step-NNNNNNN atomically (temp folder + rename), then prune to keep_last."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    state = json.loads((path / "state.json").read_text())
    weights = torch.load(path / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise CsoError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unknown[:3]} "
            "(different model.method or model.path?)"
        )
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu"))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state
