"""The run folder of `cso-dist train`: what a start, a resume and an overwrite may find there.

- A start into a folder that already holds a run (checkpoints, metrics.jsonl or a final model) is
  refused: `--resume` continues it, `--overwrite` starts over (its checkpoints, metrics and final
  model are removed; data and reference caches stay).
- The run's resolved config is written to `resolved-config.yaml` (RUN_CONFIG), a name of its own, so a user's
  `config.yaml` in the folder is never replaced; a run folder from before (its `config.yaml`) is still read.
- A resume compares the config with the run's resolved config. Keys that change what the run means
  (model, data, method and loss, layout, reference, optimizer and schedule, seed) must be equal;
  the others (RESUMABLE: step limits, logging, evaluation, checkpointing, engine, tracking, and the
  run folder's own path: a moved or copied run) may change, and the run says which did.
- One writer at a time: `train` holds RUN_LOCK (a kernel lock, dropped when its process dies) for the run.
- The checkpoint resumed from is the newest one that verifies (checkpoint.verify); damaged newer
  ones are named and skipped. Temporary folders of failed or interrupted writes are removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from cso_dist.engines.checkpoint import clean_partial, latest_good, list_checkpoints
from cso_dist.config import TrainingConfig
from cso_dist.config.file import renamed_keys
from cso_dist.util.errors import CsoError
from cso_dist.util.io import atomic_write_text
from cso_dist.train.preempt import STOPPED_FILE

# dotted keys (or whole sections, "dist.") that may differ between a run and its resume
RESUMABLE = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.eval_file",
    "train.eval_max_dialogues",
    "train.final",
    "train.gradient_checkpointing",
    "run.out_dir",  # a run folder moved or copied is the same run
    "dist.",
    "refcache.",
    "eval.",
    "track.",
)
RUN_FILES = ("metrics.jsonl", "final", STOPPED_FILE)
RUN_LOCK = ".cso-lock"  # held by the run's writer for its life (cso_dist.util.io.one_writer)
RUN_CONFIG = "resolved-config.yaml"  # the run's config as it ran (every key, base files merged)
OLD_RUN_CONFIG = "config.yaml"  # what run folders written before 2026-12-06 call it


def run_config_file(run_dir: Path) -> Path:
    """The resolved config a run folder holds: RUN_CONFIG, or an older run's config.yaml (when the folder holds a
    run and no RUN_CONFIG; a user's own config.yaml in a folder that holds no run is not a run's)."""
    new = Path(run_dir) / RUN_CONFIG
    old = Path(run_dir) / OLD_RUN_CONFIG
    return old if not new.is_file() and old.is_file() and holds_run(Path(run_dir)) else new


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(keys that may not change but did, keys that may change and did), over the training sections."""
    renamed = renamed_keys(TrainingConfig)  # a run written before a key was renamed compares under the new name
    # a run written before a key existed had its default
    a = {**_flat(TrainingConfig().to_dict()), **{renamed.get(k, k): v for k, v in _flat(old).items()}}
    b = _flat(new)
    sections = {f.split(".")[0] for f in b}
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] in sections and a.get(k) != b.get(k))
    allowed = [k for k in keys if any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)]
    return [k for k in keys if k not in allowed], allowed


def holds_run(run_dir: Path) -> str:
    """What in run_dir shows a training run ('' if nothing)."""
    done = list_checkpoints(run_dir / "checkpoints")
    if done:
        return f"checkpoint {done[-1].name}"
    return next((name for name in RUN_FILES if (run_dir / name).exists()), "")


def check_request(cfg: TrainingConfig, resume: bool | str, overwrite: bool, main: bool) -> str | None:
    """Read-only: refuse a request the run folder cannot serve (both flags; a resume whose config changes the
    run's meaning; a new run into a folder that holds one, without --overwrite). What the folder holds (holds_run).
    Runs before the data is read, so the folder's answer comes first; open_run asks again under the lock."""
    run_dir = Path(cfg.run.out_dir)
    if resume and overwrite:
        raise CsoError("--resume and --overwrite: give one")
    if run_dir.exists() and not run_dir.is_dir():
        raise CsoError(f"run.out_dir: {run_dir} is a file, not a folder; give a folder for the run")
    found = holds_run(run_dir)
    if resume and found:
        old_file = run_config_file(run_dir)
        if old_file.is_file():
            fixed, changed = config_changes(yaml.safe_load(old_file.read_text()) or {}, cfg.to_dict())
            if fixed:
                raise CsoError(
                    f"--resume: {', '.join(fixed[:6])} differ from the run's {old_file}: they change what the run "
                    "means; resume with the run's values, or start a new run (another run.out_dir, or --overwrite)"
                )
            if changed and main:
                print(f"note: resuming with changed {', '.join(changed)} (these may change on resume)")
    if not resume and found and not overwrite:
        raise CsoError(f"{run_dir} already holds a run ({found}): --resume continues it, --overwrite starts it over")
    return found


def open_run(cfg: TrainingConfig, resume: bool | str, overwrite: bool, main: bool) -> Path | None:
    """Check the run folder against the request (check_request), write the resolved config (RUN_CONFIG, rank 0);
    the checkpoint to resume from."""
    run_dir = Path(cfg.run.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    found = check_request(cfg, resume, overwrite, main=False)
    resume_from = None
    if resume and found:
        if main:
            clean_partial(ckpt_dir)
        resume_from = latest_good(ckpt_dir, print if main else (lambda *_: None))
        if resume_from is None and list_checkpoints(ckpt_dir):
            raise CsoError(f"--resume: no checkpoint in {ckpt_dir} verifies (all are damaged)")
    if resume is True and resume_from is None:
        raise CsoError(f"--resume: no checkpoint in {ckpt_dir}")
    if not resume and found and main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for name in RUN_FILES:
            p = run_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(ckpt_dir)
        atomic_write_text(run_dir / RUN_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return resume_from


def finished_run(cfg: TrainingConfig) -> dict | None:
    """The summary of the finished run in run.out_dir when it is this config's run (its final output and
    summary.json are there, and its resolved config differs only in keys that may change: RESUMABLE); else None."""
    run_dir = Path(cfg.run.out_dir)
    summary, old = run_dir / "summary.json", run_config_file(run_dir)
    if not ((run_dir / "final").exists() and summary.is_file() and old.is_file()):
        return None
    fixed, _ = config_changes(yaml.safe_load(old.read_text()) or {}, cfg.to_dict())
    if fixed:
        return None
    try:
        return json.loads(summary.read_text())
    except ValueError:
        return None
