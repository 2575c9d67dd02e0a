"""The ESC-Pro build on Slurm: seeds split across the tasks of one job array (submitit), outputs merged.

Each task runs `build(..., shard=(i, n))` on every n-th seed into `<out>.part-i-of-n.json`, with
the answer cache shared by all tasks (`<out>.work/cache`); when all are done the parts are merged
into `<out>`. A task that fails or is requeued resumes from its tree checkpoints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from cso_dist.config import Config, load_config
from cso_dist.util.io import atomic_write_text
from cso_dist.util.errors import CsoError
from cso_dist.launch.jobs import executor
from cso_dist.mcts.build import build, merge, work_dir


def part_path(out: Path, i: int, n: int) -> Path:
    return out.with_name(f"{out.stem}.part-{i}-of-{n}{out.suffix}")


def _build_shard(config_path: str, seeds: str, out_part: str, i: int, n: int) -> dict:
    return build(load_config(config_path, {}), seeds, out_part, (i, n), progress=False)


def submit_build(cfg: Config, seeds: str, out: str | Path, tasks: int, cluster: str = "slurm"):
    """Submit `tasks` array tasks; returns (jobs, part paths)."""
    if tasks < 1:
        raise CsoError("mcts submit: --tasks must be >= 1")
    out = Path(out).resolve()
    work = work_dir(out)
    m = dataclasses.replace(cfg.mcts, cache_dir=cfg.mcts.cache_dir or str(work / "cache"))
    cfg = dataclasses.replace(cfg, mcts=m)
    cfg_path = work / "mcts-config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ex = executor(cfg, cluster, folder=work / "submitit", name=f"cso-mcts-{out.stem}")
    ex.update_parameters(tasks_per_node=1, nodes=1)
    parts = [part_path(out, i, tasks) for i in range(tasks)]
    with ex.batch():
        jobs = [
            ex.submit(_build_shard, str(cfg_path), str(Path(seeds).resolve()), str(p), i, tasks)
            for i, p in enumerate(parts)
        ]
    return jobs, parts


def collect_build(jobs, parts: list[Path], out: str | Path) -> tuple[list[dict], int]:
    """Wait for every task (a failure raises with its log path), then merge the parts into `out`."""
    reports = []
    for j in jobs:
        try:
            reports.append(j.result())
        except Exception as e:  # submitit's FailedJobError: first line + the log to read
            raise CsoError(
                f"mcts: array task {j.job_id} failed: {str(e).strip().splitlines()[-1][:300]} (log: {j.paths.stderr})"
            ) from None
    return reports, merge(parts, out)
