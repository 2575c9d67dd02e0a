"""`cso-dist launch sbatch`: render a job template (cso_dist/launch/templates/, package data: they ship in the
wheel) into a reviewable script, then submit it.

The script is written to <run.out_dir>/slurm/<template>-<time>.sbatch. Resources come from the
config's `slurm` section (and the command's flags); the run's config is saved beside the script
and passed by path. Secrets never enter the script: W&B and other credentials travel in the
job's environment (sbatch exports the submitting shell's environment by default).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from cso_dist.config import Config
from cso_dist.util.io import atomic_write_text
from cso_dist.util.errors import CsoError

TEMPLATES = ("train", "qlora", "precompute", "eval", "sweep")
PER_GPU_TASKS = ("precompute", "eval")  # one srun task per GPU (ranks from SLURM_PROCID), no requeue
SECRET_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")


def _header(cfg: Config, name: str, log: Path, template: str) -> list[str]:
    s = cfg.slurm
    nodes = 1 if template in ("qlora", "sweep") else s.nodes
    gpus = 1 if template == "qlora" else s.gpus_per_node
    tasks = max(gpus, 1) if template in PER_GPU_TASKS else 1
    lines = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={s.cpus_per_task}",
        f"--time={s.time_min}",
        f"--output={_sbatch_path(log)}",
        "--open-mode=append",
    ]
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    if s.mem_gb:
        lines.append(f"--mem={s.mem_gb}G")
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            lines.append(f"--{key}={getattr(s, key)}")
    if template not in PER_GPU_TASKS:
        lines += [f"--signal=B:USR1@{s.signal_delay_s}", "--requeue"]
    lines += [x if x.startswith("--") else f"--{x}" for x in s.extra]
    return [f"#SBATCH {x}" for x in lines]


def _sbatch_path(path: Path) -> str:
    """A path as one #SBATCH value: double-quoted when it holds whitespace (sbatch reads quotes there)."""
    text = str(path)
    if '"' in text or "\\" in text:
        raise CsoError(f"launch: run.out_dir: {text!r} holds a quote or backslash, which an #SBATCH line cannot carry")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def template_text(name: str) -> str:
    """A file of the package's templates/ (read through importlib.resources: an installed wheel, a zip, a checkout)."""
    path = resources.files(__package__) / "templates" / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CsoError(
            f"launch: {path}: the job template is missing from this installation; reinstall cso_dist"
        ) from None


def check_no_secrets(text: str, where: Path) -> None:
    """Refuse to write the value of a credential variable of this environment into a generated file."""
    for var in SECRET_VARS:
        value = os.environ.get(var, "")
        if len(value) >= 8 and value in text:
            raise CsoError(
                f"{where}: refusing to write the value of ${var} into a job file; pass secrets through the environment"
            )


def render(
    cfg: Config,
    template: str,
    config_path: Path,
    overrides: list[str],
    sweep_file: Path | None = None,
    n_tasks: int = 0,
) -> str:
    """The text of a job script from templates/<template>.sbatch."""
    if template not in TEMPLATES:
        raise CsoError(f"launch: unknown template '{template}' (one of {', '.join(TEMPLATES)})")
    run_dir = Path(cfg.run.out_dir).resolve()
    name = "cso-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", run_dir.name)  # one token, whatever the folder is called
    log = run_dir / "slurm" / ("%x-%A_%a.out" if template == "sweep" else "%x-%j.out")
    body, tail = template_text(f"{template}.sbatch"), template_text("_requeue.sh")
    values = {
        "header": "\n".join(_header(cfg, name, log, template)),
        "setup": "\n".join(cfg.slurm.setup),
        "run_dir": shlex.quote(str(run_dir)),
        "python": shlex.quote(sys.executable),
        "args": " ".join(shlex.quote(a) for a in [str(config_path), *overrides]),
        "nodes": str(cfg.slurm.nodes),
        "workers": str(max(cfg.slurm.gpus_per_node, 1)),
        "omp_threads": str(max(cfg.slurm.cpus_per_task // max(cfg.slurm.gpus_per_node, 1), 1)),
        "sweep_file": shlex.quote(str(sweep_file)) if sweep_file else "",
        "last_task": str(max(n_tasks - 1, 0)),
        "parallelism": str(cfg.slurm.array_parallelism),
        "run_and_requeue": tail,
    }
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], body)
    return text


def _unique_stamp(d: Path, template: str) -> str:
    """Second-resolution time, made unique in the folder (two launches in one second get two names)."""
    base = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        stamp = base if k == 0 else f"{base}-{k}"
        if not any(
            (d / f"{stem}-{stamp}{ext}").exists()
            for stem, ext in ((template, ".sbatch"), ("config", ".yaml"), ("sweep", ".txt"))
        ):
            return stamp
    raise CsoError(f"launch: {d}: more than 1000 scripts written in one second")


def write_job(
    cfg: Config, template: str, overrides: list[str] | None = None, sweep: list[list[str]] | None = None
) -> Path:
    """Write the run's config and the rendered script under <run>/slurm/; returns the script path. Everything
    is rendered and checked first: a refused script writes nothing. The files are readable by their owner
    only (they may hold values of the environment, e.g. in slurm.setup)."""
    run_dir = Path(cfg.run.out_dir).resolve()
    d = run_dir / "slurm"
    if sweep is not None:  # a line of the sweep file is one task's overrides, read as words
        for row in sweep:
            bad = [a for a in row if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in a)]
            if bad:
                raise CsoError(f"launch: sweep values cannot contain whitespace or control characters ({bad[0]!r})")
    stamp = _unique_stamp(d, template)
    config_path, script = d / f"config-{stamp}.yaml", d / f"{template}-{stamp}.sbatch"
    sweep_file = d / f"sweep-{stamp}.txt" if sweep is not None else None
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    sweep_text = "".join(" ".join(row) + "\n" for row in sweep or [])
    text = render(cfg, template, config_path, list(overrides or []), sweep_file, len(sweep or []))
    check_no_secrets(text + config_text + sweep_text, script)
    d.mkdir(parents=True, exist_ok=True)  # only now: a refused script leaves no folder either
    atomic_write_text(config_path, config_text, mode=0o600)
    if sweep_file is not None:
        atomic_write_text(sweep_file, sweep_text, mode=0o600)
    atomic_write_text(script, text, mode=0o700)
    return script


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise CsoError(
            "launch: sbatch not found (is Slurm installed here? use --dry-run to only write the script)"
        ) from None
    if out.returncode != 0:
        raise CsoError(f"launch: sbatch {script} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return out.stdout.strip().split(";")[0]
