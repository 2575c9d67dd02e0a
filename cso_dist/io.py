"""File I/O helpers: writes that a crash cannot leave half-done (a temporary file in the same folder, then a
rename), and a file's sha256."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from cso_dist.errors import CsoError


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write a file atomically: a temporary file in the same folder, then rename. Missing folders are made.
    `mode` (e.g. 0o600 for files holding the environment's values) replaces the umask's ordinary permissions.
    A write that cannot be done (the path is a folder, a parent is a file, no permission, a full disk) is a
    one-line CsoError, and no temporary file is left behind."""
    path = Path(path)
    if path.is_dir():
        raise CsoError(f"{path}: is a folder; give the path of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CsoError(f"{path}: cannot make its folder: {e.strerror or e}") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600; give the file ordinary permissions
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise CsoError(f"{path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
