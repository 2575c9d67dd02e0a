"""Launching on Slurm: rendered sbatch scripts (sbatch.py) and submitit runs and sweeps (jobs.py)."""

from cso_dist.launch.jobs import TrainJob, collect, parse_grid, submit_run, submit_sweep, sweep_runs, table

__all__ = ["TrainJob", "collect", "parse_grid", "submit_run", "submit_sweep", "sweep_runs", "table"]
