import atexit
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# The tests never reach a model hub: they see an HF cache of their own (built by hand, hf_cache below), offline.
# Set before anything imports huggingface_hub, which reads these once; every process a test starts inherits them.
HF_CACHE = Path(tempfile.mkdtemp(prefix="cso-tests-hf-"))
atexit.register(shutil.rmtree, HF_CACHE, True)
os.environ.update(HF_HUB_CACHE=str(HF_CACHE), HF_HUB_OFFLINE="1")

import pytest  # noqa: E402
import yaml  # noqa: E402

from cso_dist.util.paths import data_dir  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on a 2-core machine: one thread each (torch reads this at import,
    # and every process a test starts inherits it), so the workers never oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = os.environ.get("CSO_TEST_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# the hardware recipes (configs/*.yaml): the main job's (demo.yaml) and the studies' (study*.yaml) configs are
# run by their own tests (test_cli.py, test_study.py); a study's header command runs the whole study
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.stem != "demo" and not p.stem.startswith("study"))
TIERS = ("slow", "distributed", "slurm")  # everything else is `unit`: the edit loop's fast tier


# the longest files first, so that under `make test`'s two workers none of them starts last
LONGEST_FIRST = (
    "test_slurm.py",
    "test_sharded.py",
    "test_distributed.py",
    "test_device_kit.py",
    "test_fsdp2.py",
    "test_pack.py",
    "test_real_model.py",
    "test_study.py",
    "test_eval.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items):
    """Tiers: test_distributed.py and test_sharded.py are `distributed` (several processes), a test that needs the
    `slurm` fixture is `slurm`, `slow` is marked by hand (over ~5 s on 2 cores), the rest is `unit`."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: the order within a file is kept
    for item in items:
        if item.path.name in ("test_distributed.py", "test_sharded.py"):
            item.add_marker(pytest.mark.distributed)
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


def run_cli(*args, env=None, check=False, cwd=None):
    """Run the real `cso-dist` entry point in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "cso_dist.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cso-dist {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def esconv_dir():
    """The real ESConv corpus. Missing: a skip that names the fetch command, or a failure under CI=true (a CI
    run without its data must not end green)."""
    d = data_dir() / "esconv"
    if not (d / "train.jsonl").is_file():
        why = f"ESConv not found in {d}: run `cso-dist data fetch esconv` (online) or set CSO_DATA_DIR"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    return d


def hub_snapshot(repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Put `folder` into the tests' HF cache as `repo_id` at `revision`, in huggingface_hub's layout:
    models--org--name/refs/<revision> holding a commit hash, snapshots/<hash>/ holding the files. The hash."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = HF_CACHE / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """The tests' HF cache holding a tiny Qwen2 (the real Qwen2.5 vocabulary) under every Hub id the recipes
    name; (cache folder, {id: snapshot})."""
    from cso_dist.models import build_tiny_model

    tiny = build_tiny_model("qwen2", tmp_path_factory.mktemp("hub-src") / "model", tokenizer="qwen", hidden_size=32)
    models = [(yaml.safe_load(p.read_text()) or {}).get("model") or {} for p in (REPO / "configs").rglob("*.yaml")]
    ids = sorted({m["path"] for m in models if m.get("path")})
    return HF_CACHE, {i: hub_snapshot(i, tiny) for i in ids}


@pytest.fixture(scope="session")
def qwen_tok():
    from cso_dist.models import qwen_tokenizer

    return qwen_tokenizer("chatml")


def tiny_run_data(root, esconv_dir, n_train: int = 6, n_valid: int = 2, hidden_size: int = 32):
    """ESConv train/valid preference dialogues (first n of each) and a tiny Qwen2 with a BPE trained on
    ESConv text, under `root` (train.jsonl, valid.jsonl, model/); returns the model folder."""
    from cso_dist.config import DataConfig
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.models import build_tiny_model

    train, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="train"))
    valid, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    write_dialogues(Path(root) / "train.jsonl", train[:n_train])
    write_dialogues(Path(root) / "valid.jsonl", valid[:n_valid])
    texts = [m.text for d in train[:200] for m in d.messages]
    return build_tiny_model(
        "qwen2", Path(root) / "model", tokenizer="bpe", bpe_texts=texts, hidden_size=hidden_size, seed=0
    )


def training_pairs(dialogues) -> set:
    """(history texts, preferred text, non-preferred text) of every training pair."""
    return {
        (tuple(m.text for m in d.messages[:i]), d.messages[i].text, o.text)
        for d in dialogues
        for i in d.turn_indices()
        for o in d.messages[i].rejected
    }


def run_overrides(root, name: str, **over) -> dict:
    """Dotted overrides (strings) of a short DPO run on tiny_run_data(root): 4 steps of 3 micro-batches."""
    root = Path(root)
    base = {
        "model.path": root / "model",
        "train.train_file": root / "train.jsonl",
        "train.ref_cache": root / "refcache",
        "run.out_dir": root / name,
        "data.max_length": 512,
        "pack.max_tokens": 1024,
        "train.lr": 3e-3,
        "train.warmup_ratio": 0.0,
        "train.max_steps": 4,
        "train.grad_accum": 3,
    }
    return {k: str(v) for k, v in {**base, **over}.items()}


def argv(over: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in over.items()]


def cfg_of(over: dict):
    from cso_dist.config import load_config, parse_overrides

    return load_config(None, parse_overrides(argv(over)))


# a very small ESC-Pro search (tests): a few iterations, short answers, deterministic, checkpoint every iteration
MCTS_SMALL = [
    "--mcts.min_iterations",
    "2",
    "--mcts.max_iterations",
    "3",
    "--mcts.rollout_turns",
    "2",
    "--mcts.max_new_tokens",
    "12",
    "--mcts.scorer_max_tokens",
    "12",
    "--mcts.judge_max_tokens",
    "8",
    "--mcts.parse_retries",
    "1",
    "--mcts.temperature",
    "0",
    "--mcts.workers",
    "1",
    "--mcts.batch_size",
    "1",
    "--mcts.checkpoint_every",
    "1",
]


# ---------------------------------------------------------------- multi-process runs (torchrun, deepspeed)
BIN = Path(sys.executable).parent
LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list, nproc: int = 2, launcher: str = "torchrun", wait: bool = True):
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",  # its store binds port 0: no port picked as free and then taken by another test
            "-m",
            "cso_dist.cli",
            *map(str, args),
        ]
    else:  # the deepspeed launcher (appends --local_rank=N to our arguments)
        cmd = [
            str(BIN / "deepspeed"),
            f"--num_gpus={nproc}",
            f"--master_port={free_port()}",
            "--module",
            "cso_dist.cli",
            *map(str, args),
        ]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, env=LAUNCH_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    proc = subprocess.run(cmd, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        said = [x for x in lines if x.startswith("cso-dist:")]  # our one-line errors, above torchrun's own report
        tail = "\n".join(said + lines[-40:])
        raise AssertionError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")
    return proc


def kill_job(marker: str) -> int:
    """SIGKILL every process whose command line holds `marker`: a torchrun launcher and its workers, which run in
    sessions of their own (as scancel or a lost node ends a whole job). The number killed."""
    import signal

    n = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in argv:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                n += 1
            except ProcessLookupError:
                pass
    return n


def train_killed_after_step_2(over: dict) -> None:
    """A 2-rank torchrun `train` with `over`, SIGKILLed (launcher and both workers) once its step-2 checkpoint is
    complete, as scancel or a lost node would end it."""
    import signal
    import time

    run = Path(over["run.out_dir"])
    proc = launch(["train", *argv(over)], wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "step-0000002" / "state.json").is_file():
            assert kill_job(f"--run.out_dir={run}") == 3  # the launcher and both workers
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (run / "final").exists()


def run_main(argv: list, capsys) -> tuple[int | None, str, str]:
    """cso_dist.cli.main in this process: (exit code, stdout, stderr); an exception escaping it -- a traceback -- is
    (None, "", "Traceback <type>: <message>")."""
    from cso_dist.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: BLE001 - an escaping exception is what the tests look for
        return None, "", f"Traceback {type(e).__name__}: {e}"
    out = capsys.readouterr()
    return rc, out.out, out.err
