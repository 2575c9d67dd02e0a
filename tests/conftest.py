import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cso_dist.paths import data_dir

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, check=False, cwd=None):
    """Run the real `cso-dist` entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "cso_dist.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)
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
        pytest.skip(f"ESConv not found in {d}: set CSO_DATA_DIR or place ../shared/data/esconv")
    return d


@pytest.fixture(scope="session")
def qwen_tok():
    from cso_dist.models import qwen_tokenizer

    return qwen_tokenizer("chatml")
