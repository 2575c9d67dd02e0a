"""Faults around a run folder: starting over an existing run, resuming with another config, damaged and
unwritable checkpoints, SIGTERM, and job files of refused or simultaneous launches."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cso_dist.engines.checkpoint import latest_good, list_checkpoints, verify
from cso_dist.config import load_config
from cso_dist.util.errors import CsoError
from cso_dist.train.tracking import read_metrics
from cso_dist.train.loop import run_train
from conftest import REPO, run_cli, tiny_run_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("faults")
    model = tiny_run_data(root, esconv_dir, n_train=6, n_valid=2)
    return root, model


def over(setup, out: Path, **extra) -> dict:
    root, model = setup
    base = {
        "model.path": str(model),
        "train.train_file": str(root / "train.jsonl"),
        "train.ref_cache": str(root / "refcache"),
        "run.out_dir": str(out),
        "data.max_length": 512,
        "pack.max_tokens": 1024,
        "train.lr": 3e-3,
        "train.warmup_ratio": 0.0,
        "train.max_steps": 3,
        "train.save_every": 1,
        "train.keep_last": 3,
    }
    return {**base, **extra}


def train(setup, out: Path, resume=False, overwrite=False, **extra) -> dict:
    return run_train(load_config(None, over(setup, out, **extra)), resume=resume, progress=False, overwrite=overwrite)


@pytest.mark.slow
def test_a_run_folder_is_kept_unless_resumed_or_overwritten(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(setup, out)
    first = [m["loss"] for m in read_metrics(out)]
    with pytest.raises(CsoError, match=r"already holds a run \(checkpoint step-0000002\): --resume .* --overwrite"):
        train(setup, out, **{"train.lr": 1e-3})
    assert [m["loss"] for m in read_metrics(out)] == first  # untouched
    train(setup, out, overwrite=True, **{"train.lr": 1e-3})
    assert [m["loss"] for m in read_metrics(out)] != first and len(read_metrics(out)) == 3

    # a resume compares the config with the run's: what changes the run's meaning is refused, naming the key
    for key, value in [
        ("train.lr", 3e-4),
        ("model.finetune", "lora"),
        ("train.method", "ipo"),
        ("pack.layout", "pair"),
        ("data.max_length", 256),
    ]:
        with pytest.raises(CsoError, match=rf"--resume: {key} differ"):
            train(setup, out, resume=True, **{"train.lr": 1e-3, key: value})
    capsys.readouterr()
    train(setup, out, resume=True, **{"train.lr": 1e-3, "train.max_steps": 4, "train.log_every": 2})
    said = capsys.readouterr().out
    assert "note: resuming with changed train.log_every, train.max_steps" in said, said
    assert read_metrics(out)[-1]["step"] == 4 and list_checkpoints(out / "checkpoints")[-1].name == "step-0000003"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated trainable.pt", "garbage state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path, capsys, damage):
    out = tmp_path / "run"
    train(setup, out)  # checkpoints after steps 1 and 2 (the last step writes the final model)
    last = list_checkpoints(out / "checkpoints")[-1]
    assert not verify(last)
    if damage.startswith("truncated"):
        data = (last / "trainable.pt").read_bytes()
        (last / "trainable.pt").write_bytes(data[: len(data) // 2])
    else:
        (last / "state.json").write_text("{not json")
    assert verify(last)
    assert latest_good(out / "checkpoints", lambda *_: None).name == "step-0000001"
    capsys.readouterr()
    train(setup, out, resume=True)
    said = capsys.readouterr().out
    assert f"checkpoint {last} is damaged" in said and "resumed from" in said and "step-0000001" in said, said
    assert not verify(list_checkpoints(out / "checkpoints")[-1])


def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_leaves_the_run_resumable(setup, tmp_path):
    probe = tmp_path / "probe"
    train(setup, probe, **{"train.max_steps": 2})
    size = sum(f.stat().st_size for f in list_checkpoints(probe / "checkpoints")[0].rglob("*") if f.is_file())
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    if not _mount_tmpfs(ckpts, int(size * 1.5) // 1024):  # room for one checkpoint, not two
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(CsoError) as e:
            train(setup, out, **{"train.max_steps": 3})
        msg = str(e.value)
        assert "\n" not in msg and "checkpoint step 2 not written (No space left on device)" in msg, msg
        assert "resume continues from step-0000001" in msg
        assert [p.name for p in ckpts.iterdir()] == ["step-0000001"]  # the partial write is gone
        assert not verify(ckpts / "step-0000001")
        # resumable: the next checkpoint only at the end (the final model is written outside the full disk)
        summary = train(setup, out, resume=True, **{"train.max_steps": 3, "train.save_every": 0})
        assert Path(summary["final"]).is_dir() and read_metrics(out)[-1]["step"] == 3
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], capture_output=True)  # lazy: a loaded checkpoint may be mapped


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_at_a_step_boundary_with_a_checkpoint(setup, tmp_path, sig):
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in over(setup, out, **{"train.max_steps": 200, "train.save_every": 0}).items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cso_dist.cli", "train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 3, (stdout[-1000:], stderr[-1000:])
    assert f"on {signal.Signals(sig).name}: checkpoint" in stderr and "Traceback" not in stderr
    done = list_checkpoints(out / "checkpoints")
    assert len(done) == 1 and not verify(done[0])
    step = int(done[0].name.split("-")[1])
    assert 1 <= step < 200
    resumed = run_cli("train", *args, "--resume", "--train.max_steps", str(step + 1), env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and f"resumed from {done[0]}" in resumed.stdout, resumed.stderr[-1000:]


def test_job_files_are_unique_private_and_not_written_when_refused(tmp_path, monkeypatch):
    from cso_dist.launch.sbatch import write_job

    cfg = load_config(None, {"run.out_dir": str(tmp_path / "run")})
    scripts = [write_job(cfg, "train") for _ in range(3)]  # well within one second
    assert len({s.name for s in scripts}) == 3
    files = sorted((tmp_path / "run" / "slurm").iterdir())
    assert len(files) == 6  # 3 scripts + 3 configs, none overwritten
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, (f, oct(f.stat().st_mode))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    leaky = load_config(
        None, {"run.out_dir": str(tmp_path / "leak"), "slurm.setup": ["export T=hf_secret_token_value"]}
    )
    with pytest.raises(CsoError, match=r"refusing to write the value of \$HF_TOKEN"):
        write_job(leaky, "train")
    assert not (tmp_path / "leak" / "slurm").exists() or not any((tmp_path / "leak" / "slurm").iterdir())
    shutil.rmtree(tmp_path / "run")
