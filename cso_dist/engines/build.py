"""Constructing an engine by name (ENGINES); a checkpoint's weights consolidated by the engine that wrote it;
and what callers of a collective engine need: ranks that run the same forwards (`lockstep`, `fill`)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cso_dist.engines import dist
from cso_dist.engines.dist import World
from cso_dist.engines import ENGINES, Engine
from cso_dist.util.errors import CsoError

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig
from cso_dist.pack import filler_batch


def engine_class(name: str):
    return importlib.import_module(f"cso_dist.engines.{ENGINES[name].module}").ENGINE


def _checkpoint_state(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text())
    name = state.setdefault("engine", "torch")  # checkpoints from before there was a second engine
    if name not in ENGINES:
        raise CsoError(f"{path}: written by an unknown engine '{name}' (one of {', '.join(ENGINES)})")
    return state


def build_engine(
    cfg: TrainingConfig, world: World, total_steps: int, resume_from: Path | None = None, device: str | None = None
) -> Engine:
    """The training engine of dist.engine, resuming from `resume_from` (a checkpoint of the same engine).
    `device`: the torch engine's (default: the local rank's GPU, else the CPU)."""
    if resume_from is not None:
        state = _checkpoint_state(resume_from)
        if state["engine"] != cfg.dist.engine:
            raise CsoError(
                f"{resume_from} was written by the {state['engine']} engine; resume it with "
                f"dist.engine={state['engine']} (or export it with cso-dist export)"
            )
        finetune = state.get("finetune", state.get("method"))  # "method": what checkpoints before 2026-12 call it
        if finetune not in (None, cfg.model.finetune):
            raise CsoError(
                f"{resume_from} was written by a model.finetune {finetune} run; this run is {cfg.model.finetune}: "
                f"resume with model.finetune={finetune}"
            )
    cls = engine_class(cfg.dist.engine)
    return cls(cfg, world, total_steps=total_steps, resume_from=resume_from, device=device)


def build_scorer(cfg: TrainingConfig, world: World, finetune: str | None = None, device: str | None = None) -> Engine:
    """A scoring engine of dist.engine: the model of kind `finetune` (default model.finetune) placed as training
    places it (ZeRO-3: partitioned over the ranks), in eval mode, without an optimizer."""
    return engine_class(cfg.dist.engine)(cfg, world, device=device, finetune=finetune)


def checkpoint_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a checkpoint folder (step-NNNNNNN), consolidated by the engine that wrote it, and its name."""
    if not (ckpt / "state.json").is_file():
        raise CsoError(f"{ckpt}: not a complete checkpoint (no state.json)")
    name = _checkpoint_state(ckpt)["engine"]
    return engine_class(name).checkpoint_weights(ckpt), name


def lockstep(engine: Engine, forwards: int, head_calls: int) -> tuple[int, int]:
    """(forwards, LM-head calls per forward) this rank runs. Under a collective engine: the most any rank needs (one
    all-reduce; a rank with fewer forwards runs `fill` for the rest, each forward pads its LM-head calls to the
    count). Else its own forwards, and 0: the scorer's own calls."""
    if not engine.collective:
        return forwards, 0
    return tuple(dist.max_over_ranks([forwards, head_calls]))


def fill(engine: Engine, n: int, head_calls: int) -> None:
    """`n` forwards of a filler row, discarded: a collective engine's rank keeps step with the others."""
    batch = filler_batch()
    for _ in range(n):
        engine.score(batch, head_calls)


def held(param_bytes: dict[str, int]) -> str:
    """What a rank held (engine.param_bytes), as a report line says it."""
    peak, whole = param_bytes["peak"], param_bytes["whole"]
    return (
        f"parameters held: {peak / 2**20:,.1f} MiB at most, of the model's {whole / 2**20:,.1f} MiB "
        f"({peak:,} of {whole:,} bytes)"
    )
