"""Hub ids (`Qwen/Qwen2.5-7B-Instruct`) as model names: resolved through huggingface_hub to a snapshot folder
in the user's HF cache (HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE honoured; `model.revision` pins one; a
revision of None or "" is the Hub's default branch).

A name that is a folder on this machine is that folder. Anything else that reads `org/name` is a Hub id.
Reading never touches the network: `resolve` looks in the cache only. Downloading happens before a job, in one
place: `cso-dist model download ID`, or `ensure` on each node's first process before the process group exists
(never inside a collective). Everything after sees a plain local folder, so the reference cache key hashes the
snapshot's own files, and two revisions never share a cache.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path

from cso_dist.util.errors import ConfigError
from cso_dist.util.io import one_writer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _exists(name: str) -> bool:
    """A path on this machine (a name too long to be one is not)."""
    try:
        return Path(name).expanduser().exists()
    except OSError:  # e.g. ENAMETOOLONG
        return False


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not _exists(name)


def check(name: str, key: str) -> None:
    """A name that is not a path here but reads as a Hub id (org/name, no leading /, ./, ../ or ~) must be one that
    huggingface_hub accepts; else one line naming the key (what the name should be, cut to 80 characters)."""
    if not name or "/" not in name or name.startswith(("/", "./", "../", "~")) or _exists(name):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        shown = name if len(name) <= 80 else name[:77] + "..."
        why = str(e).split(": '")[0].strip().rstrip(".")
        raise ConfigError(f"{key}: '{shown}' is neither a folder here nor a valid Hub id ({why})") from None


def cache_folder() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _revision(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def cached(name: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of a Hub id in the HF cache (no network), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def resolve(name: str, revision: str | None = None, key: str = "model.path") -> Path:
    """The local folder a model name stands for: the folder itself, or a Hub id's snapshot in the HF cache.
    A Hub id that is not cached is a one-line error saying how to get it."""
    check(name, key)
    if not is_hub_id(name):
        return Path(name).expanduser()
    snap = cached(name, revision)
    if snap is None:
        raise ConfigError(
            f"{key}: '{name}'{_revision(revision)} is neither a folder here nor in the HF cache ({cache_folder()}): "
            f"download it once with `cso-dist model download {name}"
            + (f" --revision {revision}" if revision else "")
            + "` (or set HF_HOME / HF_HUB_CACHE to the cache that holds it)"
        )
    return snap


def download(name: str, revision: str | None = None, key: str = "model.path", complete: bool = False) -> Path:
    """Fetch a Hub id into the HF cache (progress bars from huggingface_hub), unless it is there already; its
    snapshot folder. Only config, weights and tokenizer files are fetched. `complete` (`cso-dist model
    download`): online, ask the Hub even when a snapshot is cached, so a download cut short is finished (files
    already there are not fetched again)."""
    check(name, key)
    if not is_hub_id(name):
        raise ConfigError(f"{key}: '{name}' is not a Hub id (org/name) to download")
    snap = cached(name, revision)
    if snap is not None and not (complete and not offline()):
        return snap
    if offline():
        raise ConfigError(
            f"{key}: '{name}'{_revision(revision)} is not in the HF cache ({cache_folder()}) and HF_HUB_OFFLINE is "
            "set: download it on a machine with network (`cso-dist model download ID`) into the same cache"
        )
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    quiet = are_progress_bars_disabled()  # the CLI turns the Hub's bars off; a download shows its own
    enable_progress_bars()
    wait = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    print(f"{key}: downloading {name}{_revision(revision)} into the HF cache ({cache_folder()})", flush=True)
    try:
        _answers(HfApi(), name, revision, wait)
        return Path(snapshot_download(name, revision=revision or None, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, httpx2.HTTPError) as exc:
        if any(isinstance(e, httpx2.TimeoutException) for e in _chain(exc)):
            why = (
                f"{constants.ENDPOINT} did not answer within {wait:g} s "
                "(HF_HUB_DOWNLOAD_TIMEOUT; raise it for a slow Hub)"
            )
        else:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: cannot download '{name}'{_revision(revision)} from the Hub: {why}") from exc
    finally:
        if quiet:
            disable_progress_bars()


def _answers(api, name: str, revision: str | None, wait: float) -> None:
    """huggingface_hub bounds its file reads by HF_HUB_DOWNLOAD_TIMEOUT, not its API calls: ask the API once with
    that limit first, so a Hub that accepts and never answers ends in an error, not a hang. Any other answer --
    an error, an unreachable Hub -- is snapshot_download's to handle (it falls back to a cached snapshot)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.repo_info(name, revision=revision or None, timeout=wait)
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as exc:
        if isinstance(exc, httpx2.TimeoutException):
            raise


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and those it was raised from or during (huggingface_hub wraps the HTTP client's)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _lock(name: str) -> Path:
    """The lock local rank 0 holds in the HF cache while it downloads `name`."""
    return Path(cache_folder()) / ".locks" / f"cso-dist-{name.replace('/', '--')}.lock"


def _downloading(lock: Path) -> bool:
    """Whether a process holds `lock` now (read-only: a shared cache may not be writable by the waiters)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def ensure(name: str, revision: str | None, local_rank: int, timeout_s: float, key: str = "model.path") -> Path:
    """Before the process group exists: each node's local rank 0 downloads a Hub id that is not cached yet,
    holding a lock in the HF cache while it does; the other local ranks wait until the snapshot is there and
    no download holds the lock (up to timeout_s), so none reads a half-downloaded snapshot. A local folder is
    returned as is."""
    check(name, key)
    if not is_hub_id(name):
        return Path(name).expanduser()
    if local_rank == 0:
        snap = cached(name, revision)
        if snap is not None:
            return snap
        with one_writer(_lock(name), f"download of {name}"):
            return download(name, revision, key)
    deadline = time.monotonic() + timeout_s
    while (snap := cached(name, revision)) is None or _downloading(_lock(name)):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{key}: '{name}' was not downloaded into the HF cache within {timeout_s:.0f} s "
                "(local rank 0 downloads it)"
            )
        time.sleep(2.0)
    return snap


def describe(name: str, revision: str | None = None) -> str:
    """For --dry-run: where a Hub id stands (cached snapshot, or what will happen)."""
    snap = cached(name, revision)
    if snap is not None:
        return f"Hub id {name}{_revision(revision)}: in the HF cache, snapshot {snap}"
    if offline():
        return ""  # the problem line says it (resolve)
    return (
        f"Hub id {name}{_revision(revision)}: not in the HF cache ({cache_folder()}) yet; the job downloads it "
        "before it starts (or run `cso-dist model download ID` first)"
    )
