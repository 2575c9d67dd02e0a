"""Runs and sweeps through submitit: Slurm (one task per GPU, several nodes), or local / debug
execution on a laptop with the same code path.

    from cso_dist.config import load_config
    from cso_dist.launch import submit_run, submit_sweep, collect, table
    cfg = load_config("cfg.yaml")
    jobs = submit_sweep(cfg, {"train.method": ["dpo", "ipo"], "train.beta": [0.1, 0.5]})
    print(table(collect(jobs)))

Preemption and time limits: submitit sends USR2 before the limit (slurm.signal_delay_s); the
trainer saves a checkpoint at the next step boundary, then hands over to submitit's handler,
which requeues the job (`TrainJob` is Checkpointable) at most slurm.max_num_timeout times after
time-outs; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from cso_dist.config import Config, load_config, parse_overrides
from cso_dist.io import atomic_write_text
from cso_dist.launch.sbatch import check_no_secrets
from cso_dist.errors import CsoError
from cso_dist.preempt import Preempted

CLUSTERS = ("slurm", "local", "debug")


def _train(config_path: str) -> dict:
    """The body of one job (every task): the distributed environment from Slurm, then train."""
    import submitit

    from cso_dist.train import run_train  # torch: in the job, not in the launching process

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
    cfg = load_config(config_path, {})
    try:
        return run_train(cfg, resume="auto", progress=False)
    except Preempted as e:
        print(f"cso_dist: {e}", flush=True)
        if callable(e.previous):  # submitit's handler: checkpoint() -> requeue -> exit (rank 0)
            e.previous(e.signum, None)
        raise


class TrainJob:
    """Picklable, Checkpointable callable: requeues itself with the same arguments (training resumes
    from its latest checkpoint, as every start uses resume="auto")."""

    def __call__(self, config_path: str) -> dict:
        return _train(config_path)

    def checkpoint(self, config_path: str):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(), config_path)


def sweep_runs(cfg: Config, grid: dict[str, list]) -> list[tuple[str, dict[str, str]]]:
    """Every combination of the grid as (run name, dotted overrides): its own run.out_dir under the
    base run directory, W&B group = the base run's name, W&B name = the run name."""
    if not grid:
        raise CsoError("sweep: the grid is empty (give KEY=V1,V2 pairs)")
    base = Path(cfg.run.out_dir)
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
        over = {k: str(v) for k, v in zip(keys, values)}
        over.update({"run.out_dir": str(base / name), "track.group": cfg.track.group or base.name, "track.name": name})
        runs.append((name, over))
    return runs


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["train.beta=0.1,0.5", "run.seed=0,1"] -> {"train.beta": ["0.1", "0.5"], "run.seed": ["0", "1"]}"""
    grid: dict[str, list[str]] = {}
    for it in items:
        if "=" not in it:
            raise CsoError(f"--sweep {it!r}: expected KEY=V1,V2,...")
        k, v = it.split("=", 1)
        grid[k.strip()] = [x.strip() for x in v.split(",") if x.strip()]
    return grid


def _run_config(cfg: Config, over: dict[str, str]) -> Config:
    """cfg with dotted overrides applied (validated like any config)."""
    base = {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() for k, v in d.items()}
    base.update(parse_overrides([f"--{k}={v}" for k, v in over.items()]))
    return load_config(None, base)


def executor(cfg: Config, cluster: str = "slurm", folder: Path | None = None, name: str = ""):
    import submitit

    if cluster not in CLUSTERS:
        raise CsoError(f"launch: cluster must be one of {', '.join(CLUSTERS)}")
    s = cfg.slurm
    folder = folder or Path(cfg.run.out_dir) / "submitit"
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, slurm_max_num_timeout=s.max_num_timeout)
    workers = max(s.gpus_per_node, 1)
    params: dict = {
        "name": name or f"cso-{Path(cfg.run.out_dir).name}",
        "timeout_min": s.time_min,
        "nodes": s.nodes,
        "tasks_per_node": workers,
        "cpus_per_task": s.cpus_per_task,
    }
    if cluster == "slurm":
        params.update(
            {
                "slurm_signal_delay_s": s.signal_delay_s,
                "slurm_array_parallelism": s.array_parallelism,
                "slurm_setup": list(s.setup) + [f"export OMP_NUM_THREADS={max(s.cpus_per_task, 1)}"],
            }
        )
        if s.gpus_per_node:
            params["gpus_per_node"] = s.gpus_per_node
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(s, key):
                params[f"slurm_{key}"] = getattr(s, key)
        extra = dict(x.lstrip("-").split("=", 1) for x in s.extra if "=" in x)
        if extra:
            params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def _config_file(cfg: Config) -> str:
    d = Path(cfg.run.out_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    path = d / "launch-config.yaml"
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    check_no_secrets(text, path)
    atomic_write_text(path, text, mode=0o600)  # may hold values of the environment (slurm.setup)
    return str(path)


@dataclass
class Run:
    name: str
    cfg: Config
    job: object  # submitit.Job


def submit_run(cfg: Config, cluster: str = "slurm") -> Run:
    """Submit one training run (nodes x gpus_per_node tasks)."""
    ex = executor(cfg, cluster)
    job = ex.submit(TrainJob(), _config_file(cfg))
    return Run(Path(cfg.run.out_dir).name, cfg, job)


def submit_sweep(cfg: Config, grid: dict[str, list], cluster: str = "slurm") -> list[Run]:
    """One run per grid point, submitted together as one job array (Slurm)."""
    runs = [(name, _run_config(cfg, over)) for name, over in sweep_runs(cfg, grid)]
    ex = executor(cfg, cluster, folder=Path(cfg.run.out_dir) / "submitit", name=f"cso-{Path(cfg.run.out_dir).name}")
    paths = [_config_file(c) for _, c in runs]
    jobs = []
    with ex.batch():
        for p in paths:
            jobs.append(ex.submit(TrainJob(), p))
    return [Run(name, c, j) for (name, c), j in zip(runs, jobs)]


TABLE_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval/loss",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
)


def collect(runs: list[Run]) -> list[dict]:
    """Wait for every run; one row per run: its name, job id, state and final metrics, or its error
    (first line) and the path of the job's log."""
    rows = []
    for r in runs:
        row = {"run": r.name, "job": r.job.job_id}
        try:
            summary = r.job.results()[0]  # task 0 (rank 0) of a multi-task job
            row.update({"state": "COMPLETED", **{k: summary.get(k) for k in TABLE_KEYS if k in summary}})
        except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError / UncompletedJobError
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            row.update({"state": "FAILED", "error": cause.strip()[:300], "log": str(r.job.paths.stderr)})
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A plain-text table of collect() rows (metrics to 4 significant digits)."""
    cols = ["run", "job", "state", *[k for k in TABLE_KEYS if any(k in r for r in rows)]]
    if any("error" in r for r in rows):
        cols += ["error", "log"]

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def write_results(runs_dir: Path, rows: list[dict]) -> Path:
    path = Path(runs_dir) / "sweep-results.json"
    atomic_write_text(path, json.dumps(rows, indent=2))
    return path


__all__ = [
    "TrainJob",
    "submit_run",
    "submit_sweep",
    "collect",
    "table",
    "sweep_runs",
    "parse_grid",
    "executor",
    "write_results",
]
