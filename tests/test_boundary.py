"""One boundary for untrusted input (issue 38): locks that follow no links, writes that never cut a file the command
did not write, timeouts on every network call, paths expanded one way, and values checked at load. Every refusal
follows tests/test_fuzz.py's rule: exit code != 0, one line on stderr, no traceback, nothing written or cut (the
bytes of every file involved are compared before and after)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, argv, cfg_of, run_overrides, tiny_run_data
from test_fuzz import _check, _run

from cso_dist.config import load_config
from cso_dist.util.errors import CsoError
from cso_dist.util.io import one_writer


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def _refused(capsys, argv: list, watch: Path, expect: str) -> str:
    """Run the CLI in-process: refused by test_fuzz's rule with `expect` in its one line; under `watch` no file is
    written, changed or removed."""
    before = _snapshot(watch)
    capsys.readouterr()
    rc, _, err = _run([str(a) for a in argv], capsys)
    failures: list[str] = []
    after = _snapshot(watch)
    _check(" ".join(map(str, argv[:3])), rc, err, [p for p in after if p not in before], failures)
    failures += [f"changed or removed {p}" for p in before if after.get(p) != before[p]]
    assert not failures, failures
    assert expect in err, err
    return err.strip()


@pytest.fixture(scope="module")
def root(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("boundary")
    tiny_run_data(root, esconv_dir, n_train=2, n_valid=1)
    return root


# ---------------------------------------------------------------- locks (security)
def test_a_lock_that_is_a_link_is_not_followed_and_nothing_outside_is_cut(root, tmp_path, capsys):
    """A run folder's .cso-lock planted as a symbolic link to a file elsewhere: train refuses, the file is intact."""
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's notes\n" * 10)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".cso-lock").symlink_to(precious)
    over = run_overrides(root, "x", **{"run.out_dir": run, "train.max_steps": 1})
    _refused(capsys, ["train", *argv(over)], tmp_path, "is a symbolic link")
    assert precious.read_text() == "the user's notes\n" * 10


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_path_that_is_not_a_regular_file_is_one_line(tmp_path, kind):
    lock = tmp_path / ".cso-lock"
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    with pytest.raises(CsoError, match=r"\.cso-lock: cannot take this lock \((it is a folder|not a regular file)\)"):
        with one_writer(lock, "test"):
            pass


def test_a_lock_is_never_truncated(tmp_path):
    """The holder's record is written over the lock's first bytes, in place: a longer earlier record is covered,
    not cut (a lock file is never truncated), and the holder is still read back."""
    lock = tmp_path / ".cso-lock"
    lock.write_text("x" * 3000)
    with one_writer(lock, "first"):
        assert lock.stat().st_size == 3000
        with pytest.raises(CsoError, match=r"in use by first \(pid"):
            with one_writer(lock, "second"):
                pass


def test_an_out_dir_that_is_a_file_is_one_line(root, tmp_path, capsys):
    target = tmp_path / "not-a-folder"
    target.write_text("keep me\n")
    over = run_overrides(root, "x", **{"run.out_dir": target, "train.max_steps": 1})
    _refused(capsys, ["train", *argv(over)], tmp_path, "is a file, not a folder")


# ---------------------------------------------------------------- data loss
def test_eval_generate_never_cuts_its_data_or_another_file(root, tmp_path, capsys):
    data = tmp_path / "dialogues.jsonl"
    data.write_bytes((root / "valid.jsonl").read_bytes())
    other = tmp_path / "notes.yaml"
    other.write_text("# my notes\nmodel:\n  path: x\n")
    over = {k: v for k, v in run_overrides(root, "x").items() if not k.startswith("train.")}
    base = ["eval", "generate", *argv(over), "--data", data, "--mode", "likelihood"]
    _refused(capsys, [*base, "--out", data], tmp_path, "is this command's input")
    _refused(capsys, [*base, "--out", other], tmp_path, "is not a PRED file")
    link = tmp_path / "same-data.jsonl"
    os.link(data, link)  # the same file by another name
    _refused(capsys, [*base, "--out", link], tmp_path, "is this command's input")


def test_commands_refuse_an_output_that_is_not_their_own_kind(root, tmp_path, capsys):
    """data build, data pairs, export and eval report replace an existing output only when it is their own kind."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 not a model")
    _refused(
        capsys,
        ["data", "build", "--data.input", root / "valid.jsonl", "--from", "escpro", "--out", notes],
        tmp_path,
        "is not a preference-dialogue file",
    )  # noqa: E501
    _refused(
        capsys,
        ["data", "pairs", root / "valid.jsonl", "--format", "dpo", "--out", notes],
        tmp_path,
        "not a file of pair rows",
    )  # noqa: E501
    _refused(capsys, ["export", root / "nothing", "--out", folder], tmp_path, "is a folder that is not a model folder")
    _refused(capsys, ["eval", "report", root, "--out", folder], tmp_path, "is a folder that is not a report")


def test_train_never_replaces_the_users_config_in_its_run_folder(root, tmp_path):
    """run.out_dir set to the folder that holds the user's own config.yaml: the run's resolved config has a name of
    its own; the user's file (comments, base: lines) is untouched."""
    run = tmp_path / "myrun"
    run.mkdir()
    mine = "# my recipe\nbase: [other.yaml]\ntrain:\n  lr: 0.003\n"
    (run / "config.yaml").write_text(mine)
    over = run_overrides(root, "x", **{"run.out_dir": run, "train.max_steps": 1, "train.grad_accum": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "cso_dist.cli", "train", *argv(over)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "config.yaml").read_text() == mine
    resolved = load_config(run / "resolved-config.yaml", {})
    assert resolved.train.lr == 3e-3 and resolved.run.out_dir == str(run)


# ---------------------------------------------------------------- network calls have timeouts
@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("command", [["model", "download", "org/name"], ["data", "fetch", "esconv"]])
def test_a_hub_that_never_answers_ends_in_one_line_naming_it_and_the_setting(silent_server, tmp_path, command):
    env = {
        **os.environ,
        "HF_ENDPOINT": silent_server,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    extra = ["--dest", str(tmp_path / "data")] if command[0] == "data" else []
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "cso_dist.cli", *command, *extra], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and time.time() - t0 < 60, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert silent_server in lines[0] and "HF_HUB_DOWNLOAD_TIMEOUT" in lines[0], lines[0]
    assert not (tmp_path / "data" / "esconv").exists()


# ---------------------------------------------------------------- paths and values, at load
def test_every_path_key_expands_home_the_same_way(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        None, {"run.out_dir": "~/runs/x", "model.path": "~/m", "train.train_file": "~/d.jsonl", "mcts.cache_dir": "~/c"}
    )
    assert (cfg.run.out_dir, cfg.model.path) == (f"{tmp_path}/runs/x", f"{tmp_path}/m")
    assert (cfg.train.train_file, cfg.mcts.cache_dir) == (f"{tmp_path}/d.jsonl", f"{tmp_path}/c")
    assert load_config(None, {"run.out_dir": "$HOME/x"}).run.out_dir == "$HOME/x"  # variables: the shell's


@pytest.mark.parametrize(
    "over,expect",
    [
        ({"run.seed": -1}, "run.seed: -1 is not in [0, 2^32)"),
        ({"run.seed": 2**32}, "run.seed: 4294967296 is not in [0, 2^32)"),
        ({"data.seed": 2**40}, "data.seed: 1099511627776 is not in [0, 2^32)"),
        ({"study.seeds": "0,-3"}, "study.seeds[1]: -3 is not in [0, 2^32)"),
        ({"mcts.seed": -5}, "mcts.seed: -5 is not in [0, 2^32)"),
        ({"dist.engine": "deepspeed", "dist.deepspeed_config": "zero9"}, "'zero9' is neither a file nor one of"),
        ({"model.path": "org/name-"}, "model.path: 'org/name-' is neither a folder here nor a valid Hub id"),
        ({"model.path": "org/na--me"}, "Cannot have -- or .. in repo_id"),
        ({"model.path": "a/b/c"}, "'a/b/c' is neither a folder here nor a valid Hub id"),
        ({"model.path": "org/name@rev"}, "'org/name@rev' is neither a folder here nor a valid Hub id"),
        ({"model.path": "org/" + "n" * 300}, "nnn...' is neither a folder here nor a valid Hub id"),
        ({"data.generator": "x/y/z"}, "data.generator: 'x/y/z' is neither a folder"),
    ],
)
def test_bad_values_fail_at_load_naming_the_key(tmp_path, capsys, over, expect):
    """At load (`config show` loads every section), so `train --dry-run` and every job refuse them before work."""
    _refused(capsys, ["config", "show", "--run.out_dir", tmp_path / "r", *argv(over)], tmp_path, expect)


@pytest.mark.parametrize("name", ["org/name-", "org/na--me", "a/b/c", "org/name@rev", "o/" + "n" * 300, "../x"])
def test_model_download_of_a_malformed_hub_id_is_one_line(tmp_path, capsys, name):
    _refused(capsys, ["model", "download", name], tmp_path, "model download: '")


def test_a_base_chain_or_a_nesting_far_too_deep_is_one_line(tmp_path, capsys):
    for k in range(1000):
        (tmp_path / f"c{k}.yaml").write_text(f"base: c{k + 1}.yaml\n" if k < 999 else "train:\n  lr: 0.1\n")
    err = _refused(capsys, ["config", "show", tmp_path / "c0.yaml"], tmp_path, "base: files nest more than 8 deep")
    assert "c0.yaml -> c1.yaml" in err
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n" + "".join("  " * (k + 1) + f"k{k}:\n" for k in range(1000)) + "  " * 1001 + "x: 1\n")
    _refused(capsys, ["config", "show", deep], tmp_path, "nested far too deep for a config")
    flow = tmp_path / "flow.yaml"
    flow.write_text("train: " + "[" * 1000 + "]" * 1000 + "\n")
    _refused(capsys, ["config", "show", flow], tmp_path, "config: ")


def test_study_config_paths_and_values_come_from_the_same_loader(monkeypatch, tmp_path):
    """A sweep point or a study run is loaded by the same loader: ~ and seeds alike (spot check of one key)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = cfg_of({"study.generator": "~/writer", "study.sources": "generated", "run.seed": "7"})
    assert cfg.study.generator == f"{tmp_path}/writer" and cfg.run.seed == 7


def test_a_genuine_internal_error_is_one_line_naming_the_file_with_its_traceback(monkeypatch, capsys):
    """A bug of ours (here: a command that raises a plain RuntimeError) is not dressed up as a user error: exit 1,
    one line that says it is internal and names the file that holds the whole traceback."""
    from cso_dist import commands
    from cso_dist.cli import main

    def broken(args, extra):
        raise RuntimeError("an index went out of range\nsecond line")

    monkeypatch.setattr(commands, "cmd_config_show", broken)
    capsys.readouterr()
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cso-dist: internal error: RuntimeError: an index went out of range ")
    saved = Path(err[0].split("(traceback in ")[1].split(";")[0])
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text
    saved.unlink()


@pytest.mark.parametrize("axis", ["dpo train.lr=1e-3,", "dpo train.lr=,1e-3", "dpo train.lr=1e-3,,2e-3"])
def test_a_study_sweep_with_an_empty_value_is_refused_not_dropped(tmp_path, capsys, axis):
    """The study's own grid (study.sweep) reads values as the launchers' sweeps do: an empty one is an error."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"study:\n  losses: [dpo]\n  sweep: ['{axis}']\n")
    _refused(capsys, ["config", "show", cfg], tmp_path, "an empty value (an unset shell variable?)")
