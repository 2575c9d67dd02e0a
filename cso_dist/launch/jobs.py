"""Runs and sweeps through submitit: Slurm (one task per GPU, several nodes), or local / debug
execution on a laptop with the same code path.

    from cso_dist.config import load_config
    from cso_dist.launch import submit_run, submit_sweep, collect, table
    cfg = load_config("cfg.yaml")
    jobs = submit_sweep(cfg, {"train.method": ["dpo", "ipo"], "train.beta": [0.1, 0.5]})
    print(table(collect(jobs)))

A run whose folder already holds its finished result (the same config: cso_dist.train.rundir.finished_run)
is not submitted again: a rerun of a sweep submits only what is missing, and collect() reads the
rest from disk. Off the cluster (local), a sweep runs slurm.array_parallelism jobs at a time.

Preemption and time limits: submitit sends USR2 before the limit (slurm.signal_delay_s); the
trainer saves a checkpoint at the next step boundary, then hands over to submitit's handler,
which requeues the job (`TrainJob` is Checkpointable) at most slurm.max_num_timeout times after
time-outs; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

from cso_dist.config import FAMILIES, TRAINING_SECTIONS, Config, load_config, parse_overrides
from cso_dist.util.io import atomic_write_text
from cso_dist.launch import CLUSTERS, HERE
from cso_dist.launch.sbatch import check_no_secrets
from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.train.preempt import Preempted


def _train(config_path: str) -> dict:
    """The body of one job (every task): the distributed environment from Slurm, then train."""
    import submitit

    from cso_dist.train.loop import run_train  # torch: in the job, not in the launching process

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
    cfg = load_config(config_path, {})
    try:
        return run_train(cfg, resume="auto", progress=False)
    except Preempted as e:
        print(f"cso_dist: {e}", flush=True)
        if callable(e.previous):  # submitit's handler: checkpoint() -> requeue -> exit (rank 0)
            _hand_over(e.previous, e.signum)
        raise


def _hand_over(handler, signum: int) -> None:
    """Run submitit's preemption handler. `scontrol requeue` runs inside the job, and the requeue it asks for
    makes Slurm SIGTERM the job's processes, scontrol among them when it has not exited yet (seen on a real
    Slurm). That SIGTERM means the requeue was taken: exit as submitit does after a requeue (no result file, so
    the requeued job's result is the job's result), not with the error that would end the job as failed."""
    import signal
    import subprocess
    import sys

    try:
        handler(signum, None)
    except subprocess.CalledProcessError as err:
        cmd = list(err.cmd) if isinstance(err.cmd, (list, tuple)) else []
        if cmd[:2] != ["scontrol", "requeue"] or err.returncode != -signal.SIGTERM:
            raise
        print("cso_dist: scontrol requeue ended by the requeue's own SIGTERM: the job is requeued", flush=True)
        sys.exit(-1)


class TrainJob:
    """Picklable, Checkpointable callable: requeues itself with the same arguments (training resumes
    from its latest checkpoint, as every start uses resume="auto")."""

    config_name = "launch-config.yaml"  # the run config it reads, written into run.out_dir

    def __call__(self, config_path: str) -> dict:
        return _train(config_path)

    def checkpoint(self, config_path: str):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(), config_path)

    @staticmethod
    def finished(cfg: Config) -> dict | None:
        from cso_dist.train.rundir import finished_run  # torch (checkpoint): not in the launcher unless asked

        return finished_run(cfg)

    @staticmethod
    def here(cfg: Config) -> dict:  # the job in this process (run_batch's HERE), with its progress shown
        from cso_dist.train.loop import run_train

        return run_train(cfg, resume="auto")


class EvalJob:
    """Evaluates model.path on tasks [(name, data file, mode)] into <run.out_dir>/eval/ (cso_dist.eval.report.
    evaluate_tasks); a requeued or rerun job completes partial prediction files."""

    config_name = "eval-config.yaml"

    def __call__(self, config_path: str, tasks: list) -> dict:
        from cso_dist.eval.score import evaluate_tasks  # torch: in the job

        return evaluate_tasks(load_config(config_path, {}), tasks, progress=False)

    def checkpoint(self, config_path: str, tasks: list):
        import submitit

        return submitit.helpers.DelayedSubmission(EvalJob(), config_path, tasks)

    @staticmethod
    def finished(cfg: Config, tasks: list) -> dict | None:
        from cso_dist.eval.score import finished_tasks

        return finished_tasks(cfg, tasks)

    @staticmethod
    def here(cfg: Config, tasks: list) -> dict:
        from cso_dist.eval.score import evaluate_tasks

        return evaluate_tasks(cfg, tasks)


def sweep_runs(cfg: Config, grid: dict[str, list]) -> list[tuple[str, dict[str, str]]]:
    """Every combination of the grid as (run name, dotted overrides): its own run.out_dir under the
    base run directory, W&B group = the base run's name, W&B name = the run name."""
    if not grid:
        raise CsoError("sweep: the grid is empty (give KEY=V1,V2 pairs)")
    base = Path(cfg.run.out_dir)
    keys = list(grid)
    runs, seen = [], {}
    for values in itertools.product(*(grid[k] for k in keys)):
        # one folder name under the sweep folder, whatever the values hold (a path, "..", spaces)
        name = "_".join(f"{k.split('.')[-1]}={_name_part(str(v))}" for k, v in zip(keys, values))
        over = {k: str(v) for k, v in zip(keys, values)}
        if name in seen:
            raise CsoError(f"sweep: points {seen[name]} and {over} would share the run folder {base / name}")
        seen[name] = dict(over)
        over.update({"run.out_dir": str(base / name), "track.group": cfg.track.group or base.name, "track.name": name})
        runs.append((name, over))
    return runs


def _name_part(value: str) -> str:
    """A sweep value as part of a folder name: letters, digits and . _ + - = kept, the rest "_", no "..";
    a long value keeps its end and a hash of the whole."""
    part = re.sub(r"[^A-Za-z0-9._+=-]", "_", value).replace("..", "_")
    if len(part) > 60:
        part = f"{part[-40:]}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"
    return part


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["train.beta=0.1,0.5", "run.seed=0,1"] -> {"train.beta": ["0.1", "0.5"], "run.seed": ["0", "1"]}. Every
    value is kept, an empty one too ("train.lr=" -> [""]): sweep_points refuses it, naming the axis."""
    grid: dict[str, list[str]] = {}
    for it in items:
        k, eq, v = it.partition("=")
        k = k.strip()
        if not eq or not k:
            raise ConfigError(f"--sweep {it!r}: expected KEY=V1,V2,...")
        if k in grid:
            raise ConfigError(f"--sweep {it}: the axis {k} is given twice; give it once, with every value")
        grid[k] = [x.strip() for x in v.split(",")]
    return grid


SWEEP_OWNED = ("run.out_dir", "track.group", "track.name")  # set for each point by sweep_runs


def sweep_points(cfg: Config, grid: dict[str, list] | list[str]) -> list[tuple[str, dict[str, str], Config]]:
    """The runs of a sweep, checked before anything is written or submitted: `launch sbatch --sweep` and
    `launch submitit` (submit_sweep, its --dry-run) both take their runs from here. `grid`: --sweep KEY=V1,V2
    items, or {key: [values]}. Each point: (run name, its dotted overrides (sweep_runs), its config loaded as
    its job will load it). An empty grid, axis or value, a key the sweep cannot set, an unknown key and a bad
    value are one-line errors naming the axis and the value (or the point, for a combination refused)."""
    grid = parse_grid(grid) if isinstance(grid, list) else grid
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"sweep {key}: expected a list of values, got {values!r}")
        given = f"{key}={','.join(map(str, values))}"
        section, dot, name = key.partition(".")
        if not values:
            raise ConfigError(f"sweep {key}: the axis has no values")
        if any(not str(v).strip() for v in values):
            raise ConfigError(f"sweep {given}: an empty value (an unset shell variable?); every value must be given")
        twice = next((v for i, v in enumerate(map(str, values)) if v in map(str, values[:i])), None)
        if twice is not None:
            raise ConfigError(f"sweep {given}: the value {twice} is given twice")
        if not dot or not name:
            raise ConfigError(f"sweep {given}: expected a dotted config key (section.key=V1,V2)")
        if section in FAMILIES["all"] and section not in TRAINING_SECTIONS:
            raise ConfigError(
                f"sweep {given}: the {section} section is one for the whole sweep; set it without --sweep"
            )
        if key in SWEEP_OWNED:
            raise ConfigError(f"sweep {given}: {key} is set for each point by the sweep itself")
    points = []
    for run, over in sweep_runs(cfg, grid):
        swept = {k: over[k] for k in grid}
        try:
            points.append((run, over, run_config(cfg, over)))
        except CsoError as e:  # ConfigError, or a file a key names (dist.deepspeed_config)
            msg = str(e).removeprefix("config: ")
            axis = next((k for k in swept if _names_key(msg, k)), None)
            if axis is None:
                where = "point " + " ".join(f"{k}={v}" for k, v in swept.items())
            else:
                where, msg = f"{axis}={swept[axis]}", msg.removeprefix(f"{axis}: ")
            raise ConfigError(f"sweep {where}: {msg}") from None
    return points


def _names_key(msg: str, key: str) -> bool:
    """Whether a load_config error is about `key`: "train.lr: ...", "unknown key 'train.nope'" or, for a section
    that does not exist, "unknown key 'trian'"."""
    return msg.startswith((f"{key}: ", f"unknown key '{key}'", f"unknown key '{key.split('.')[0]}'"))


def run_config(cfg: Config, over: dict[str, str]) -> Config:
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


def _config_file(cfg: Config, name: str = "launch-config.yaml") -> str:
    d = Path(cfg.run.out_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    check_no_secrets(text, path)
    atomic_write_text(path, text, mode=0o600)  # may hold values of the environment (slurm.setup)
    return str(path)


@dataclass
class Run:
    name: str
    cfg: Config
    job: object  # submitit.Job; None when the run had finished before (its result is `done`)
    done: dict | None = None


def submit_run(cfg: Config, cluster: str = "slurm") -> Run:
    """Submit one training run (nodes x gpus_per_node tasks)."""
    ex = executor(cfg, cluster)
    job = ex.submit(TrainJob(), _config_file(cfg))
    return Run(Path(cfg.run.out_dir).name, cfg, job)


def submit_jobs(
    cfg: Config,
    items: list[tuple[str, Config, tuple]],
    job=None,
    cluster: str = "slurm",
    folder: Path | None = None,
    rerun: bool = False,
    verbose: bool = False,
) -> list[Run]:
    """One job per item (name, run config, extra arguments): job(<run config file>, *extra), submitted
    together as one job array on Slurm; locally in waves of slurm.array_parallelism jobs, each wave
    waited for. An item whose result is already there (job.finished) is not submitted unless `rerun`.
    verbose: print each submission as it happens (a wave's comes when the one before has finished)."""
    job = job or TrainJob()
    runs, todo = [], []
    for name, c, extra in items:
        done = None if rerun else job.finished(c, *extra)
        runs.append(Run(name, c, None, done))
        if done is None:
            todo.append((len(runs) - 1, c, extra))
    if not todo:
        return runs
    ex = executor(
        cfg, cluster, folder=folder or Path(cfg.run.out_dir) / "submitit", name=f"cso-{Path(cfg.run.out_dir).name}"
    )
    files = [_config_file(c, job.config_name) for _, c, _ in todo]
    wave = len(todo) if cluster == "slurm" else cfg.slurm.array_parallelism
    for start in range(0, len(todo), wave):
        part = list(zip(todo[start : start + wave], files[start : start + wave]))
        with ex.batch():
            submitted = [ex.submit(job, path, *extra) for (_, _, extra), path in part]
        for ((i, _, _), _), j in zip(part, submitted):
            runs[i].job = j
            if verbose:
                print(f"submitted {runs[i].name}: job {j.job_id} -> {runs[i].cfg.run.out_dir}", flush=True)
        if cluster == "local" and start + wave < len(todo):
            for j in submitted:
                j.wait()
    return runs


def submit_sweep(
    cfg: Config, grid: dict[str, list] | list[str], cluster: str = "slurm", rerun: bool = False, verbose: bool = False
) -> list[Run]:
    """One run per grid point (sweep_points: every point checked before anything is submitted), submitted
    together as one job array (Slurm); finished points are skipped."""
    items = [(name, c, ()) for name, _, c in sweep_points(cfg, grid)]
    return submit_jobs(cfg, items, TrainJob(), cluster, rerun=rerun, verbose=verbose)


TABLE_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval/loss",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
)


def collect(runs: list[Run], keys: tuple[str, ...] = TABLE_KEYS) -> list[dict]:
    """Wait for every run; one row per run: its name, job id, state and final metrics (`keys`), or its error
    (first line) and the path of the job's log. A run finished before reads as job "earlier"."""
    rows = []
    for r in runs:
        if r.job is None:
            rows.append({"run": r.name, "job": "earlier", "state": "COMPLETED", **_pick(r.done or {}, keys)})
            continue
        row = {"run": r.name, "job": r.job.job_id}
        try:
            summary = r.job.results()[0]  # task 0 (rank 0) of a multi-task job
            r.done = summary
            row.update({"state": "COMPLETED", **_pick(summary, keys)})
        except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError / UncompletedJobError
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            row.update({"state": "FAILED", "error": cause.strip()[:300], "log": str(r.job.paths.stderr)})
        rows.append(row)
    return rows


def _pick(summary: dict, keys: tuple[str, ...]) -> dict:
    return {k: summary.get(k) for k in keys if k in summary}


def table(rows: list[dict], keys: tuple[str, ...] = TABLE_KEYS) -> str:
    """A plain-text table of collect() rows (metrics to 4 significant digits)."""
    cols = ["run", "job", "state", *[k for k in keys if any(k in r for r in rows)]]
    if any("error" in r for r in rows):
        cols += ["error", "log"]

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


class _Here:
    """A job run in this process (HERE), read by collect() like a submitit job."""

    job_id, paths = HERE, SimpleNamespace(stderr="the output above")

    def __init__(self, job, cfg: Config, extra: tuple, keep_going: bool):
        try:
            self.out = [job.here(cfg, *extra)]
        except Exception as e:  # noqa: BLE001 - a run that may fail is a result (run_batch's may_fail)
            if not keep_going:
                raise
            self.out = e

    def results(self) -> list[dict]:
        if isinstance(self.out, Exception):
            raise self.out
        return self.out


def run_batch(
    cfg: Config,
    title: str,
    items: list[tuple[str, Config, tuple]],
    job,
    cluster: str,
    folder: Path,
    may_fail: bool = False,
    keys: tuple[str, ...] = TABLE_KEYS,
) -> list[dict]:
    """Run a batch of jobs (items as submit_jobs's; finished ones are skipped) on `cluster` (CLUSTERS, or HERE:
    one after another in this process), wait, print their table; collect()'s rows, each with the run's folder
    ("dir") and result ("result"). A failed run ends the batch with an error naming it and its log, unless
    `may_fail` (a sweep point that diverges is a result), when it ends it only if every run failed."""
    t0 = time.time()
    print(f"== {title}: {len(items)} runs", flush=True)
    if cluster == HERE:
        runs = [Run(name, c, None, job.finished(c, *x)) for name, c, x in items]
        for r, (_, c, x) in zip(runs, items):
            if r.done is None:
                print(f"running {r.name} -> {c.run.out_dir}", flush=True)
                r.job = _Here(job, c, x, may_fail)
    else:
        runs = submit_jobs(cfg, items, job, cluster, folder=folder, verbose=True)
    new = sum(r.job is not None for r in runs)
    print(f"   {len(runs) - new} finished before, {new} {'run' if cluster == HERE else 'submitted'}", flush=True)
    rows = collect(runs, keys)
    print(table(rows, keys), flush=True)
    failed = [r for r in rows if r["state"] != "COMPLETED"]
    if failed and (not may_fail or len(failed) == len(rows)):
        raise CsoError(
            f"{title}: {len(failed)} of {len(rows)} runs failed, first {failed[0]['run']}: "
            f"{failed[0].get('error', '')} (log {failed[0].get('log', '')}); fix it and rerun (finished runs are kept)"
        )
    if new:
        print(f"   ({time.time() - t0:.0f} s)", flush=True)
    for r, row in zip(runs, rows):
        row.update(dir=str(r.cfg.run.out_dir), result=r.done or {})
    return rows


def write_results(runs_dir: Path, rows: list[dict]) -> Path:
    path = Path(runs_dir) / "sweep-results.json"
    atomic_write_text(path, json.dumps(rows, indent=2))
    return path


__all__ = [
    "TrainJob",
    "EvalJob",
    "Run",
    "submit_jobs",
    "submit_run",
    "submit_sweep",
    "run_batch",
    "collect",
    "table",
    "sweep_runs",
    "sweep_points",
    "parse_grid",
    "executor",
    "write_results",
]
