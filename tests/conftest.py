import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cso_dist.paths import data_dir

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on a 2-core machine: one thread each (torch reads this at import,
    # and every process a test starts inherits it), so the workers never oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = os.environ.get("CSO_TEST_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TIERS = ("slow", "distributed", "slurm")  # everything else is `unit`: the edit loop's fast tier


# the longest files first, so that under `make test`'s two workers none of them starts last
LONGEST_FIRST = ("test_distributed.py", "test_slurm.py", "test_real_model.py", "test_train.py", "test_eval.py")


def pytest_collection_modifyitems(config, items):
    """Tiers: test_distributed.py is `distributed` (several processes), a test that needs the `slurm`
    fixture is `slurm`, `slow` is marked by hand (over ~5 s on 2 cores), the rest is `unit`."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: the order within a file is kept
    for item in items:
        if item.path.name == "test_distributed.py":
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
    d = data_dir() / "esconv"
    if not (d / "train.jsonl").is_file():
        pytest.skip(f"ESConv not found in {d}: set CSO_DATA_DIR or run `cso-dist data fetch esconv`")
    return d


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
