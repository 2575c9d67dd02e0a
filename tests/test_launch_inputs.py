"""What the launchers take from a user, checked at one boundary (issue 38).

Sweeps: `launch sbatch --sweep` and `launch submitit` (its --dry-run, and submit_sweep from Python) take
their points from one function, cso_dist.launch.sweep_points, which loads every point's config before
anything is written or submitted. A refused sweep follows tests/test_fuzz.py's rule: exit code 2, one line
on stderr (naming the axis and the value), no traceback, and nothing written under the run folder (no
script, no config, no sweep file, no submitit folder).

Templates: the sbatch templates are package data; a wheel built from the sources and unpacked outside the
repository renders every one of them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cso_dist.config import load_config
from cso_dist.util.errors import ConfigError
from cso_dist.launch import submit_sweep, sweep_points
from cso_dist.launch.sbatch import TEMPLATES
from conftest import REPO, run_main

LAUNCHERS = {
    "sbatch": ["launch", "sbatch", "--dry-run"],
    "submitit --dry-run": ["launch", "submitit", "--dry-run"],
    "submitit": ["launch", "submitit", "--cluster", "debug", "--no-wait"],  # refused before anything is submitted
}

# (case, --sweep items, what the one line says: the axis and the value)
REFUSED = [
    ("unknown key", ["train.nope=1"], "sweep train.nope=1: unknown key 'train.nope'"),
    ("unknown section", ["trian.lr=1e-4"], "sweep trian.lr=1e-4: unknown key 'trian' (did you mean 'train'?)"),
    ("not a number", ["train.lr=abc"], "sweep train.lr=abc: expected a number, got 'abc'"),
    ("out of range", ["train.lr=1e-4,-1"], "sweep train.lr=-1: must be > 0"),
    ("not a choice", ["train.method=dpo,ppo"], "sweep train.method=ppo: "),
    ("empty axis (an unset shell variable)", ["train.lr="], "sweep train.lr=: an empty value"),
    ("empty value", ["train.lr=1e-4,"], "sweep train.lr=1e-4,: an empty value"),
    ("empty value between two", ["run.seed=0,,1"], "sweep run.seed=0,,1: an empty value"),
    ("axis given twice", ["train.lr=1e-4", "train.lr=2e-4"], "--sweep train.lr=2e-4: the axis train.lr is given twice"),
    ("value given twice", ["train.lr=1e-4,1e-4"], "sweep train.lr=1e-4,1e-4: the value 1e-4 is given twice"),
    ("no values", ["train.lr"], "--sweep 'train.lr': expected KEY=V1,V2"),
    ("not a dotted key", ["lr=1e-4"], "sweep lr=1e-4: expected a dotted config key"),
    ("a key of the whole sweep", ["slurm.nodes=1,2"], "sweep slurm.nodes=1,2: the slurm section is one for the whole"),
    ("a key the sweep sets", ["run.out_dir=a,b"], "sweep run.out_dir=a,b: run.out_dir is set for each point"),
    (
        "a combination refused",
        ["train.method=sft,dpo", "train.label_smoothing=0.1"],
        "sweep train.label_smoothing=0.1: read by dpo only, and train.method is sft",
    ),
]


def _files(folder: Path) -> list[Path]:
    """Everything under folder: files and folders (a refused launch leaves not even an empty run folder)."""
    return sorted(folder.rglob("*")) if folder.exists() else []


_run = run_main


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("case,items,said", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_bad_sweep_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, launcher, case, items, said):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder either
    run = tmp_path / "run"
    sweeps = [a for it in items for a in ("--sweep", it)]
    rc, _, err = _run([*LAUNCHERS[launcher], "--run.out_dir", str(run), *sweeps], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("cso-dist: error: ") and said in lines[0], err
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    "case,items,said",
    [
        ("a secret", ["model.path=secret-value-123456,b"], "refusing to write the value of $WANDB_API_KEY"),
        ("whitespace", ["model.path=a b,c"], "sweep values cannot contain whitespace or control characters ('--"),
    ],
)
def test_a_sweep_file_that_cannot_be_written_writes_nothing(tmp_path, capsys, monkeypatch, case, items, said):
    """Valid points whose sweep file is refused (sbatch only: the file carries them as words)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "secret-value-123456")
    sweeps = [a for it in items for a in ("--sweep", it)]
    rc, _, err = _run(["launch", "sbatch", "--dry-run", "--run.out_dir", str(tmp_path / "run"), *sweeps], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and said in err, err
    assert _files(tmp_path) == []


def test_an_empty_axis_is_refused_by_the_dry_run_not_dropped(tmp_path, capsys):
    """It used to list the base run as the sweep ("1 of 1 run(s) would be submitted")."""
    rc, out, err = _run(
        ["launch", "submitit", "--dry-run", "--run.out_dir", str(tmp_path / "run"), "--sweep", "train.lr="], capsys
    )
    assert rc == 2 and "would submit" not in out and "train.lr=" in err, out + err


def test_submit_sweep_from_python_checks_every_point_before_submitting(tmp_path):
    cfg = load_config(None, {"run.out_dir": str(tmp_path / "run")})
    for grid, said in [
        ({"train.lr": []}, "sweep train.lr: the axis has no values"),
        ({"train.lr": "1e-4"}, "sweep train.lr: expected a list of values, got '1e-4'"),
        ({"train.lr": [1e-4, "abc"]}, "sweep train.lr=abc: expected a number, got 'abc'"),
        ({"train.lr": [1e-4], "train.nope": [1]}, "sweep train.nope=1: unknown key 'train.nope'"),
    ]:
        with pytest.raises(ConfigError) as e:
            submit_sweep(cfg, grid, "debug")
        assert str(e.value).startswith(said) and "\n" not in str(e.value), str(e.value)
    assert _files(tmp_path) == []


def test_both_launchers_list_the_same_points(tmp_path, capsys):
    run = tmp_path / "run"
    sweeps = ["--sweep", "train.lr=1e-4,2e-4", "--sweep", "run.seed=0,1"]
    rc, out, err = _run(["launch", "submitit", "--dry-run", "--run.out_dir", str(run), *sweeps], capsys)
    assert rc == 0, err
    listed = re.findall(r"^would submit: (\S+) -> (\S+)$", out, re.M)
    assert "4 of 4 run(s) would be submitted" in out and _files(tmp_path) == []
    rc, out, err = _run(["launch", "sbatch", "--dry-run", "--run.out_dir", str(run), *sweeps], capsys)
    assert rc == 0, err
    lines = next((run / "slurm").glob("sweep-*.txt")).read_text().splitlines()
    rows = [dict(a[2:].split("=", 1) for a in line.split()) for line in lines]
    assert [(r["track.name"], r["run.out_dir"]) for r in rows] == listed
    assert [(r["train.lr"], r["run.seed"]) for r in rows] == [
        ("1e-4", "0"),
        ("1e-4", "1"),
        ("2e-4", "0"),
        ("2e-4", "1"),
    ]
    assert "#SBATCH --array=0-3%" in next((run / "slurm").glob("sweep-*.sbatch")).read_text()
    points = sweep_points(load_config(None, {"run.out_dir": str(run)}), sweeps[1::2])
    assert [(name, c.run.out_dir) for name, _, c in points] == listed
    assert [c.train.lr for _, _, c in points] == [1e-4, 1e-4, 2e-4, 2e-4]


@pytest.mark.slow
def test_an_installed_wheel_renders_every_template(tmp_path):
    """The wheel of the sources, unpacked outside the repository (dependencies from this environment): every
    template renders there, read from the package, not from a checkout."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "cso_dist", src / "cso_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cso_dist-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    for t in TEMPLATES:
        assert f"cso_dist/launch/templates/{t}.sbatch" in names, sorted(names)
    assert "cso_dist/launch/templates/_requeue.sh" in names
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=away, env=env)

    where = cli("-c", "import cso_dist.launch.sbatch as s; print(s.__file__)")
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    for t in TEMPLATES:
        extra = {"sweep": ["--sweep", "train.beta=0.1,0.2"], "eval": ["--split", "valid"]}.get(t, [])
        run = away / f"run-{t}"
        proc = cli(
            "-m", "cso_dist.cli", "launch", "sbatch", "--template", t, "--dry-run", f"--run.out_dir={run}", *extra
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        script = Path(re.search(r"# written to (\S+)", proc.stdout).group(1))
        text = script.read_text()
        assert script.parent == run / "slurm" and text.startswith("#!/bin/bash") and "{{" not in text, text
        assert f"#SBATCH --job-name=cso-run-{t}" in text, text
        assert ("scontrol requeue" in text) == (t not in ("precompute", "eval")), text  # _requeue.sh, read too
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not (REPO / "slurm").exists()
