"""The 27 cases a new user and an attacker found (issue 27), each with the behaviour it now has: job scripts that
cannot be hijacked, one writer per output, results that know what made them, degenerate input refused with one
line, and every pair from the CSO authors' KTO rows. Refusals follow tests/test_fuzz.py's rule: exit code != 0,
one line on stderr, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, argv, run_cli, run_overrides, tiny_run_data, training_pairs, write_jsonl
from test_fuzz import _check, _run, _written

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.data.export import pair_rows
from cso_dist.data.strategies import load_strategy_set
from cso_dist.util.io import one_writer


def _refused(capsys, argv: list[str], watch: Path, expect: str) -> str:
    """Run the CLI in-process; it must refuse by test_fuzz's rule, with `expect` in its one line."""
    before = {p for p in watch.rglob("*") if p.is_file()} if watch.exists() else set()
    capsys.readouterr()  # what the test itself printed before
    rc, _, err = _run([str(a) for a in argv], capsys)
    failures: list[str] = []
    _check(" ".join(map(str, argv[:3])), rc, err, _written(watch, before) if watch.exists() else [], failures)
    assert not failures, failures
    assert expect in err, err
    return err.strip()


# ---------------------------------------------------------------- job scripts (12 cases)
INJECT = "gpu\ntouch /tmp/cso-injected"


@pytest.mark.parametrize(
    "case,extra,key",
    [
        ("--partition with a newline", ["--partition", INJECT], "slurm.partition"),
        ("--account with a newline", ["--account", INJECT], "slurm.account"),
        ("--qos with a newline", ["--qos", INJECT], "slurm.qos"),
        ("slurm.extra with a newline", ["--slurm.extra", f"--constraint={INJECT}"], "slurm.extra[0]"),
        ("--partition with a space", ["--partition", "gpu --uid=0"], "slurm.partition"),
        ("--account with a space", ["--account", "a --uid=0"], "slurm.account"),
        ("--qos with a space", ["--qos", "q --uid=0"], "slurm.qos"),
        ("slurm.extra with a space", ["--slurm.extra", "--constraint=a --uid=0"], "slurm.extra[0]"),
    ],
)
def test_sbatch_values_that_would_break_out_of_their_line_are_refused_by_flag(tmp_path, capsys, case, extra, key):
    run_dir = tmp_path / "run"
    err = _refused(capsys, ["launch", "sbatch", "--run.out_dir", run_dir, "--dry-run", *extra], tmp_path, key)
    assert not (run_dir / "slurm").exists(), err


@pytest.mark.parametrize(
    "section", [{"slurm": {"partition": INJECT}}, {"slurm": {"qos": INJECT}}, {"slurm": {"extra": [INJECT]}}]
)
def test_sbatch_values_from_a_config_file_are_refused_too(tmp_path, capsys, section):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**section, "run": {"out_dir": str(tmp_path / "run")}}))
    _refused(capsys, ["launch", "sbatch", cfg, "--dry-run"], tmp_path / "run", "holds a control character")


def test_a_newline_in_the_run_folder_is_refused_at_load(tmp_path, capsys):
    """It would reach --job-name and --output (YAML allows it)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "a\ntouch x")}}))
    _refused(capsys, ["launch", "sbatch", cfg, "--dry-run"], tmp_path, "run.out_dir")


def printf_q(text: str) -> str:
    """bash's printf %q of `text` (how the stubs log an argument)."""
    return subprocess.run(["bash", "-c", 'printf %q "$1"', "_", text], capture_output=True, text=True).stdout


def _stub_bin(folder: Path) -> Path:
    """srun / scontrol that record their arguments (one line per call) and do nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "scontrol"):
        stub = folder / name
        log = 'printf "%s" "$(basename "$0")" >> "$STUB_LOG"; printf " [%q]" "$@" >> "$STUB_LOG"; echo >> "$STUB_LOG"'
        stub.write_text(f"#!/bin/bash\n{log}\n")
        stub.chmod(0o755)
    return folder


@pytest.mark.parametrize("template", ["train", "qlora", "precompute", "sweep"])
def test_rendered_scripts_run_only_what_they_say(tmp_path, capsys, template):
    """A run folder with spaces, quotes for the shell and a `$(...)` in its name, rendered and executed with stub
    srun / scontrol: every #SBATCH line comes before the first command (sbatch stops reading there), the one
    srun call carries the config path as one argument, and nothing else runs."""
    # a sweep's point folders travel as words of its sweep file: no whitespace there (refused with one line)
    name = "a'b;$(touch${IFS}PWNED)c" if template == "sweep" else "a'b $(touch PWNED) c"
    run_dir = tmp_path / "my runs" / name if template != "sweep" else tmp_path / name
    extra = ["--sweep", "train.beta=0.1,0.2"] if template == "sweep" else []
    rc, out, err = _run(
        ["launch", "sbatch", "--run.out_dir", str(run_dir), "--template", template, "--dry-run", *extra], capsys
    )
    assert rc == 0, err
    script = next((run_dir / "slurm").glob(f"{template}-*.sbatch"))
    lines = script.read_text().splitlines()
    first_cmd = next(i for i, x in enumerate(lines[1:], 1) if x.strip() and not x.startswith("#"))
    assert all(not x.startswith("#SBATCH") for x in lines[first_cmd:])
    assert any("--requeue" in x for x in lines[:first_cmd]) == (template != "precompute")
    log = tmp_path / "stub.log"
    env = {
        **os.environ,
        "PATH": f"{_stub_bin(tmp_path / 'bin')}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_ARRAY_TASK_ID": "0",
    }
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()  # %q: one line per call
    srun = [c for c in calls if c.startswith("srun ")]
    others = [c for c in calls if not c.startswith("srun ")]
    assert len(srun) == 1 and others == (["scontrol [show] [hostnames] [node1]"] if template == "train" else []), calls
    config = next((run_dir / "slurm").glob("config-*.yaml"))
    assert f"[{printf_q(str(config))}]" in srun[0], srun[0]  # the config path: one argument, whatever it holds
    assert not list(work.iterdir()) and not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_a_sweep_value_cannot_send_a_run_folder_outside_the_sweep_folder(tmp_path, capsys):
    base = tmp_path / "sweep"
    rc, _, err = _run(
        [
            "launch",
            "sbatch",
            "--run.out_dir",
            str(base),
            "--template",
            "sweep",
            "--dry-run",
            "--sweep",
            "model.path=/m/../../../../../../tmp/elsewhere,/m/b",
        ],
        capsys,
    )
    assert rc == 0, err
    lines = next((base / "slurm").glob("sweep-*.txt")).read_text().splitlines()
    dirs = [Path(next(a for a in line.split() if a.startswith("--run.out_dir=")).split("=", 1)[1]) for line in lines]
    assert len(dirs) == 2
    for d in dirs:
        assert d.resolve().parent == base.resolve(), d


# ---------------------------------------------------------------- data loss (2 cases)
def test_model_import_keeps_a_folder_that_is_not_its_own(tmp_path, capsys):
    """A non-empty --out that is not an import of this file is refused; --overwrite (or an earlier import of the
    same file) passes the check -- here the file is then refused as no model, and the folder is untouched."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    pytest.importorskip("gguf")
    _refused(capsys, ["model", "import", gguf, "--out", out], out, "--overwrite")
    err = _refused(capsys, ["model", "import", gguf, "--out", out, "--overwrite"], out, "cannot read it as a GGUF")
    assert (out / "notes.txt").read_text() == "mine", err
    from cso_dist.util.io import sha256_file

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    info = {"source_bytes": gguf.stat().st_size, "source_sha256": sha256_file(gguf)}
    (earlier / "cso_import.json").write_text(json.dumps(info))
    _refused(capsys, ["model", "import", gguf, "--out", earlier], earlier, "cannot read it as a GGUF")


@pytest.fixture(scope="module")
def root(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("field")
    tiny_run_data(root, esconv_dir, n_train=2, n_valid=2)
    return root


@pytest.mark.slow
def test_one_writer_per_run_folder_and_a_dead_writer_blocks_nothing(root):
    """A second `train` into a running run's folder is refused with one line naming the first; after the first
    is SIGKILLed, --resume goes on (the kernel dropped its lock)."""
    over = run_overrides(root, "locked", **{"train.max_steps": 400, "train.save_every": 1, "train.grad_accum": 1})
    first = subprocess.Popen(
        [sys.executable, "-m", "cso_dist.cli", "train", *argv(over)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ckpts = Path(over["run.out_dir"]) / "checkpoints"
    deadline = time.time() + 300
    from cso_dist.engines.checkpoint import list_checkpoints

    while time.time() < deadline and first.poll() is None and not list_checkpoints(ckpts):
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second started"
    second = run_cli("train", *argv(over), "--resume")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode != 0 and "in use by cso-dist train (pid" in second.stderr, second.stderr[-2000:]
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    at = int(list_checkpoints(ckpts)[-1].name.split("-")[1])
    more = {**over, "train.max_steps": str(at + 2)}
    resumed = run_cli("train", *argv(more), "--resume", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_the_lock_names_its_holder_and_frees_on_exit(tmp_path):
    from cso_dist.util.errors import CsoError

    lock = tmp_path / "out" / ".cso-lock"
    with one_writer(lock, "cso-dist eval generate"):
        with pytest.raises(CsoError, match=r"in use by cso-dist eval generate \(pid \d+ on .*, since "):
            with one_writer(lock, "another"):
                pass
    with one_writer(lock, "again"):  # released
        pass


# ---------------------------------------------------------------- stale results (5 cases)
def _eval(root, name: str, model: Path, data: Path | None = None, out: Path | None = None, split: str = "valid"):
    over = run_overrides(root, name, **{"model.path": model, "eval.max_dialogues": 1})
    args = ["eval", "generate", *argv(over), "--mode", "likelihood", "--split", split]
    args += (["--data", data] if data else []) + (["--out", out] if out else [])
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_pred_files_know_their_model_and_data(root, esconv_dir):
    from cso_dist.models import build_tiny_model

    other = build_tiny_model("qwen2", root / "other-model", tokenizer="bpe", bpe_texts=["a b c"] * 50, seed=1)
    valid = root / "valid.jsonl"
    first = _eval(root, "ev", root / "model", data=valid)
    assert first.returncode == 0, first.stderr[-2000:]
    pred = root / "ev" / "eval" / "pred-valid-likelihood.jsonl"  # named after the --data file
    assert pred.is_file() and json.loads(pred.with_name(pred.name + ".origin.json").read_text())["data_sha256"]
    rows = pred.read_text()
    again = _eval(root, "ev", other, data=valid)  # another model into the same file
    assert again.returncode != 0 and "came from model" in again.stderr, again.stderr[-2000:]
    assert len(again.stderr.strip().splitlines()) == 1 and pred.read_text() == rows
    changed = root / "valid-copy" / "valid.jsonl"  # the same ids, another file (one dialogue edited)
    changed.parent.mkdir(exist_ok=True)
    lines = valid.read_text().splitlines()
    changed.write_text("\n".join([lines[0].replace("a", "e", 1)] + lines[1:]) + "\n")
    mixed = _eval(root, "ev", root / "model", data=changed)
    assert mixed.returncode != 0 and "came from data" in mixed.stderr and pred.read_text() == rows, mixed.stderr
    split = _eval(root, "ev", root / "model", split="test")  # no --data: named after the split
    assert split.returncode == 0 and (root / "ev" / "eval" / "pred-test-likelihood.jsonl").is_file(), split.stderr


# ---------------------------------------------------------------- degenerate input (6 cases)
def _no_negatives(root) -> Path:
    rows = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    for r in rows:
        for m in r["messages"]:
            m.pop("rejected", None)
    return write_jsonl(root / "no-negatives.jsonl", rows)


def test_a_preference_method_without_pairs_is_an_error(root, capsys):
    over = run_overrides(root, "noneg", **{"train.train_file": _no_negatives(root)})
    _refused(capsys, ["train", *argv(over)], root, "no supporter turn has a non-preferred reply")


def test_data_pairs_with_nothing_to_write_is_an_error(root, capsys):
    out = root / "pairs-out" / "dpo.jsonl"
    _refused(capsys, ["data", "pairs", _no_negatives(root), "--format", "dpo", "--out", out], root, "no DPO row")
    assert not out.exists()


def test_an_empty_seeds_file_is_an_error(root, capsys):
    seeds = root / "empty-seeds.jsonl"
    seeds.write_text("")
    out = root / "mcts-empty" / "ESC-Pro.json"
    _refused(
        capsys,
        ["mcts", "build", "--seeds", seeds, "--backend", "hf", "--model", root / "model", "--out", out],
        root / "mcts-empty",
        "no seed dialogues",
    )


@pytest.mark.parametrize("damage", ["no weights", "no tokenizer", "adapter base gone"])
def test_dry_run_checks_weights_tokenizer_and_an_adapters_base(root, capsys, tmp_path, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    if damage == "no weights":
        for p in model.glob("*.safetensors"):
            p.unlink()
        expect = "has no weights"
    elif damage == "no tokenizer":
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (model / name).unlink(missing_ok=True)
        expect = "has no tokenizer files"
    else:
        from cso_dist.models import load_model

        lora = load_model(model, "lora", "fp32")
        lora.save_pretrained(tmp_path / "adapter")
        shutil.rmtree(model)
        model = tmp_path / "adapter"
        expect = "does not exist"
    over = run_overrides(root, "dry", **{"model.path": model})
    _refused(capsys, ["train", *argv(over), "--dry-run"], root, expect)


# ---------------------------------------------------------------- tracebacks (2 cases)
def test_a_model_without_tokenizer_files_gives_one_line_not_a_traceback(root, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model / name).unlink(missing_ok=True)
    over = run_overrides(root, "notok", **{"model.path": model})
    _refused(capsys, ["train", *argv(over)], root, "loads empty")


def test_a_server_answering_200_with_no_json_gives_one_line(esconv_dir, tmp_path, capsys):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotJson(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"<html>welcome to the proxy</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotJson)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text((esconv_dir / "test.jsonl").read_text().splitlines()[0] + "\n")
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:  # the build's work folder (lock, checkpoints) may stay: a failed build resumes from it
        args = ["mcts", "build", "--seeds", seeds, "--backend", "openai", "--model", "m", "--base-url", url]
        rc, _, err = _run([str(a) for a in [*args, "--out", tmp_path / "o" / "x.json", "--mcts.workers", "1"]], capsys)
    finally:
        server.shutdown()
    assert rc not in (None, 0) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert url in err and "not JSON" in err and not (tmp_path / "o" / "x.json").exists(), err


# ---------------------------------------------------------------- the CSO authors' KTO rows
def _authors_kto(records: list[dict]) -> list[dict]:
    """change_data_kto.py as its authors document it: per ESC-Pro record and assistant turn, the preferred reply
    (label true) and each negative (label false) after the same history, then duplicate rows dropped across the
    whole file (first kept)."""
    rows, seen = [], set()
    for rec in records:
        msgs = rec["messages"]
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            history = [{"role": x["role"], "content": _content(x)} for x in msgs[:i]]
            block = [(history + [{"role": "assistant", "content": _content(m)}], True)]
            block += [(history + [{"role": "assistant", "content": _content(n)}], False) for n in m.get("negative", [])]
            for messages, label in block:
                row = {"messages": messages, "label": label}
                key = json.dumps(row, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
    return rows


def _content(m: dict) -> str:
    return f"({m['strategy']}) {m['content']}" if m.get("strategy") else m["content"]


def _tree_records() -> list[dict]:
    """ESC-Pro records of one MCTS tree whose preferred paths diverge at the second supporter turn: both paths
    share the first turn (and its negatives); each keeps its own later turns."""
    s = ["Emotional Validation", "Affirmation", "Share Information", "Reframe Negative Thoughts"]

    def sup(text, strat, negs):
        return {"role": "assistant", "content": text, "strategy": strat, "negative": negs}

    neg = lambda t, k: {"content": t, "strategy": s[k]}  # noqa: E731
    opening = [
        {"role": "user", "content": "I failed my exam."},
        sup("That sounds painful.", s[0], [neg("Study more.", 2), neg("Think positive.", 3)]),
        {"role": "user", "content": "I studied a lot."},
    ]
    a = opening + [sup("You clearly worked hard.", s[1], [neg("Exams vary.", 2), neg("It's fine.", 3)])]
    a += [{"role": "user", "content": "Thanks."}, sup("I'm here for you.", s[0], [neg("Okay.", 2)])]
    b = opening + [sup("Your effort matters.", s[1], [neg("Exams vary.", 2), neg("It's fine.", 3)])]
    b += [{"role": "user", "content": "Maybe."}, sup("What would help now?", s[3], [neg("Try again.", 2)])]
    return [
        {"description": "exam", "scene": "school", "messages": a},
        {"description": "exam", "scene": "school", "messages": b},
    ]


def test_kto_rows_from_the_authors_converter_keep_every_pair(tmp_path):
    """Diverging preferred paths share a history and its negatives: the converter's dedup drops the second
    path's false rows, and its true row stands far below the first's. Pairing by history recovers every pair
    the ESC-Pro records hold; `data pairs --format kto` writes each distinct row once, as the converter does."""
    records = _tree_records()
    src = tmp_path / "escpro.json"
    src.write_text(json.dumps(records))
    want, _ = build_dialogues(DataConfig(source="escpro", input=str(src)))
    assert len(training_pairs(want)) == 8
    rows = _authors_kto(records)
    # 6 false rows, not 9: the shared first turn's negatives come once, and so do the second turn's, whose history
    # both paths share: the second path's true row there has no false row after it
    assert sum(not r["label"] for r in rows) == 6
    f = write_jsonl(tmp_path / "kto.jsonl", rows)
    got, _ = build_dialogues(DataConfig(source="kto-rows", input=str(f), strategies="escpro"))
    assert training_pairs(got) == training_pairs(want)
    ours = list(pair_rows(want, load_strategy_set("escpro"), "kto"))
    keys = [json.dumps(r, sort_keys=True) for r in ours]
    assert len(keys) == len(set(keys)) == len({json.dumps(r, sort_keys=True) for r in rows})
    back, _ = build_dialogues(DataConfig(source="kto-rows", input=str(write_jsonl(tmp_path / "ours.jsonl", ours))))
    assert training_pairs(back) == training_pairs(want)
