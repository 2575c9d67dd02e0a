"""Atomic, keep-last-k training checkpoints: trainable weights, optimizer, scheduler, RNG, data position."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from cso_dist.util.errors import CsoError
from cso_dist.util.io import sha256_file

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


HASH_LIMIT = 256 << 20  # files up to this size get a sha256 in state.json; every file gets its size


def seal(folder: Path, state: dict) -> None:
    """Write state.json last, with the size (and for files up to HASH_LIMIT the sha256) of every file
    in the folder, so a truncated or damaged checkpoint is recognised on load (verify)."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "state.json"):
        size = f.stat().st_size
        files[str(f.relative_to(folder))] = [size, sha256_file(f) if size <= HASH_LIMIT else None]
    (folder / "state.json").write_text(json.dumps({**state, "files": files}, indent=2))


def verify(path: Path) -> str:
    """'' when the checkpoint is whole, else what is wrong with it."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    for name, (size, digest) in (state.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if digest is not None and sha256_file(f) != digest:
            return f"{name} does not match its sha256"
    return ""


def latest_good(ckpt_dir: Path, say=print) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are named (and skipped)."""
    for p in reversed(list_checkpoints(ckpt_dir)):
        problem = verify(p)
        if not problem:
            return p
        say(f"note: checkpoint {p} is damaged ({problem}); trying the one before it")
    return None


def clean_partial(ckpt_dir: Path) -> None:
    """Remove temporary folders that an interrupted or failed checkpoint write left behind."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f".{PREFIX}*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)


def write_failed(ckpt_dir: Path, step: int, e: BaseException) -> CsoError:
    last = list_checkpoints(ckpt_dir)
    where = f"resume continues from {last[-1].name}" if last else "no earlier checkpoint: a rerun starts over"
    what = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    with contextlib.suppress(OSError):
        if shutil.disk_usage(ckpt_dir).free < 16 << 20:  # torch.save says "unexpected pos ..." on a full disk
            what = "No space left on device"
    return CsoError(f"checkpoint step {step} not written ({what}) in {ckpt_dir}; the partial write is removed, {where}")


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep_last: int) -> Path:
    """Write checkpoints/step-NNNNNNN atomically (temp folder + rename), then prune to keep_last. A write
    that fails (full disk) removes its temporary folder and raises a one-line CsoError."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        seal(tmp, {"step": step, **extra})
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(ckpt_dir, step, e) from None
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
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :].split("-")[0]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    state = json.loads((path / "state.json").read_text())
    weights = torch.load(path / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise CsoError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unknown[:3]} "
            "(different model.finetune or model.path?)"
        )
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu"))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state
