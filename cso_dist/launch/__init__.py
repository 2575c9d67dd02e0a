"""Launching on Slurm: rendered sbatch scripts (sbatch.py) and submitit runs and sweeps (jobs.py)."""

from cso_dist.util.lazy import lazy_exports

CLUSTERS = ("slurm", "local", "debug")  # where submitit runs go (cso_dist.launch.jobs): Slurm, local processes, inline
HERE = "inline"  # run_batch's other place: this process, one job after another (no submitit)

__all__ = [
    "CLUSTERS",
    "HERE",
    "TrainJob",
    "collect",
    "parse_grid",
    "submit_run",
    "submit_sweep",
    "sweep_points",
    "sweep_runs",
    "table",
]
__getattr__ = lazy_exports(
    __name__,
    dict.fromkeys(
        ("TrainJob", "collect", "parse_grid", "submit_run", "submit_sweep", "sweep_points", "sweep_runs", "table"),
        "jobs",
    ),
)
