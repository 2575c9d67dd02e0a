"""File I/O helpers: writes that a crash cannot leave half-done (a temporary file in the same folder, then a
rename), one writer per output (a lock the OS drops with its process), and a file's sha256."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
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


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows to a JSON Lines file, flushed to disk before returning (a resumable writer's progress)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def one_writer(lock: Path, what: str):
    """Hold the lock file `lock` for the block (`what` writes there): a second writer is refused with one line
    naming the holder. The lock is the kernel's (flock), so a holder that died -- killed, node lost -- holds
    nothing and a rerun or --resume goes on. Where the file system has no locks (some NFS mounts), a note says
    that nothing guards the folder."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            try:
                h = json.loads(holder)
                who = f"{h['what']} (pid {h['pid']} on {h['host']}, since {h['since']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise CsoError(f"{lock.parent} is in use by {who}: one writer at a time; wait for it, or stop it") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"note: {lock.parent}: this file system takes no locks; a second writer would not be refused")
        else:
            info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**info, "argv": sys.argv[:3]}).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock
