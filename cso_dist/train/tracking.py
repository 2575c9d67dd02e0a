"""Metrics: a JSONL file in the run directory, and Weights & Biases when asked (never fatal)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cso_dist.util.io import atomic_write_text, read_jsonl


class Tracker:
    """Writes one JSON object per logging step to <run>/metrics.jsonl; mirrors to W&B (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        wandb_on: bool = False,
        project: str = "cso_dist",
        group: str = "",
        name: str = "",
        rank: int = 0,
        resume_step: int | None = None,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.rank = rank
        self.wandb = None
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():  # drop what came after the checkpoint (and a torn line)
            keep = [m for m in read_metrics(run_dir) if m.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in keep))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        if wandb_on:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=project,
                    group=group or None,
                    name=name or run_dir.name,
                    config=config,
                    dir=str(run_dir),
                    resume="allow",
                    id=_wandb_id(run_dir),
                )
            except Exception as e:  # tracking must never stop training
                print(
                    f"cso-dist: warning: W&B disabled ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                    file=sys.stderr,
                )
                self.wandb = None

    def log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics.get("step"))
            except Exception as e:
                print(f"cso-dist: warning: W&B log failed, continuing without it ({type(e).__name__})", file=sys.stderr)
                self.wandb = None

    def close(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except Exception:
                pass
            self.wandb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, typ, exc, tb) -> None:
        """Closed however the run ends: a failure marks the W&B run failed (exit code 1); a stop for preemption
        (cso_dist.train.preempt.Preempted) does not, it resumes."""
        from cso_dist.train.preempt import Preempted

        self.close(0 if typ is None or issubclass(typ, Preempted) else 1)


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    f = run_dir / ".wandb_id"
    if f.is_file():
        return f.read_text().strip()
    rid = os.urandom(6).hex()
    atomic_write_text(f, rid)
    return rid


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (appended step by step: a last line cut by a kill is left out)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [row for _, row in read_jsonl(p, "a metrics file", fields={"step": int}, torn_tail=True)]
