"""Where the datasets live: $CSO_DATA_DIR, else ../shared/data when it exists."""
from __future__ import annotations

import os
from pathlib import Path

from cso_dist.errors import CsoError

REPO_ROOT = Path(__file__).resolve().parents[1]
ESCONV_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")


def data_dir() -> Path:
    """$CSO_DATA_DIR if set; else ../shared/data beside the checkout (or the working directory)."""
    env = os.environ.get("CSO_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), REPO_ROOT):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand.is_dir():
            return cand
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def esconv_dir() -> Path:
    """The folder holding ESConv's HF split; a clear error naming where to put it when absent."""
    d = data_dir() / "esconv"
    missing = [f for f in ESCONV_FILES if not (d / f).is_file()]
    if missing:
        where = "$CSO_DATA_DIR" if os.environ.get("CSO_DATA_DIR") else "the default ../shared/data"
        raise CsoError(f"ESConv not found: {d} lacks {', '.join(missing)} ({where}). Put the ESConv HF split "
                       f"(train.jsonl, valid.jsonl, test.jsonl) in {d}, set CSO_DATA_DIR to a folder whose "
                       f"esconv/ holds them, or run `cso-dist data fetch esconv` when online")
    return d
