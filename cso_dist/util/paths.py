"""Where the datasets live: $CSO_DATA_DIR, else the user cache (~/.cache/cso_dist/data, or under
$XDG_CACHE_HOME), which `cso-dist data fetch` fills. A developers' checkout may instead find a
`shared/data` folder beside it (used only when the user cache has no ESConv)."""

from __future__ import annotations

import os
from pathlib import Path

from cso_dist.util.errors import CsoError

REPO_ROOT = Path(__file__).resolve().parents[1]
ESCONV_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")


def user_cache_dir(kind: str, env_var: str) -> Path:
    """A per-user folder: $<env_var> if set, else <cache>/cso_dist/<kind> (<cache>: $XDG_CACHE_HOME or ~/.cache)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "cso_dist" / kind


def user_data_dir() -> Path:
    """The per-user data folder: $CSO_DATA_DIR if set, else <cache>/cso_dist/data."""
    return user_cache_dir("data", "CSO_DATA_DIR")


def data_dir() -> Path:
    """user_data_dir(); without $CSO_DATA_DIR and with no ESConv in the user cache, a developers'
    ../shared/data beside the checkout (or the working directory) when it exists."""
    user = user_data_dir()
    if os.environ.get("CSO_DATA_DIR") or (user / "esconv").is_dir():
        return user
    for base in (Path.cwd(), REPO_ROOT):
        cand = (base / ".." / "shared" / "data").resolve()
        if (cand / "esconv").is_dir():
            return cand
    return user


def esconv_dir(fetch: bool = True) -> Path:
    """The folder holding ESConv's HF split. Missing, it is fetched from the Hub into user_data_dir() when
    `fetch` and the machine is online (HF_HUB_OFFLINE unset); otherwise one line naming where to put it."""
    d = data_dir() / "esconv"
    missing = [f for f in ESCONV_FILES if not (d / f).is_file()]
    if not missing:
        return d
    why = ""
    from cso_dist.models.hub import offline  # huggingface_hub's own reading of HF_HUB_OFFLINE

    if fetch and not offline():
        from cso_dist.data.fetch import fetch_esconv

        print(f"ESConv not found in {d}: fetching it from the Hugging Face Hub into {user_data_dir()}", flush=True)
        try:
            return fetch_esconv(user_data_dir(), timeout=10.0)[0].parent
        except CsoError as e:
            why = f" Fetching it failed: {str(e).split('. Offline?')[0]}."
    raise CsoError(
        f"ESConv not found: {d} lacks {', '.join(missing)}.{why} Run `cso-dist data fetch esconv` "
        f"(online) to fill it, put the ESConv HF split (train.jsonl, valid.jsonl, test.jsonl) "
        f"there, or set CSO_DATA_DIR to a folder whose esconv/ holds them"
    )
