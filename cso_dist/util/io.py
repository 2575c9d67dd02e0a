"""File I/O helpers: writes that a crash cannot leave half-done (a temporary file in the same folder, then a
rename), one writer per output (a lock the OS drops with its process), a file's sha256, and the one reader of the
text files a user hands in (read_text, read_json, read_jsonl: every failure one line naming file, line and field)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from cso_dist.util.errors import CsoError, DataError


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


LOCK_RECORD = 1024  # bytes of a lock file's holder record (JSON padded with spaces): written in place, never cut


@contextlib.contextmanager
def one_writer(lock: Path, what: str):
    """Hold the lock file `lock` for the block (`what` writes there): a second writer is refused with one line
    naming the holder. The lock is the kernel's (flock), so a holder that died -- killed, node lost -- holds
    nothing and a rerun or --resume goes on. Where the file system has no locks (some NFS mounts), a note says
    that nothing guards the folder.

    The lock file is opened without following a symbolic link (a link planted there cannot make us write
    elsewhere), must be a regular file, and is never truncated: the holder's record is written over its first
    LOCK_RECORD bytes. A lock that cannot be taken -- a link, a folder, no permission, a read-only folder -- is
    one line naming its path and why."""
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror or str(e)
        if e.errno == errno.EISDIR or lock.is_dir():
            why = "it is a folder"
        raise CsoError(f"{lock}: cannot take this lock ({why}); remove it or write elsewhere") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CsoError(f"{lock}: cannot take this lock (not a regular file); remove it or write elsewhere")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, LOCK_RECORD, 0).decode(errors="replace").strip()
            try:
                h = json.loads(holder)
                who = f"{h['what']} (pid {h['pid']} on {h['host']}, since {h['since']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise CsoError(f"{lock.parent} is in use by {who}: one writer at a time; wait for it, or stop it") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise CsoError(f"{lock}: cannot take this lock ({e.strerror or e})") from None
            print(f"note: {lock.parent}: this file system takes no locks; a second writer would not be refused")
        else:
            info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}
            record = json.dumps({**info, "argv": sys.argv[:3]})[: LOCK_RECORD - 1]
            os.pwrite(fd, (record.ljust(LOCK_RECORD - 1) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


# ---------------------------------------------------------------- the one reader of the text files a user hands in
# Every text file that comes from outside a command -- PRED files and their origin records, caches, study markers,
# strategy sets, chat templates, data files -- is decoded and parsed here. A failure is one DataError line naming
# the file, the record (line) and the field: no such file, a folder, a file that cannot be read, bytes that are not
# UTF-8 (with their offset), bad JSON (line and column), a record of the wrong type, a missing or mistyped field.


def _describe(expect: type | tuple) -> str:
    names = {dict: "a JSON object", list: "a JSON array", str: "text"}
    return " or ".join(names.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,)))


def _is(value, expect: type | tuple) -> bool:
    """isinstance, except that true/false is not a number (bool is a subclass of int)."""
    allowed = expect if isinstance(expect, tuple) else (expect,)
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def require(obj, key: str, typ: type | tuple, path, record: str | None, fld: str):
    """obj[key], checking that obj is an object holding key with a value of type `typ`; an error names file,
    record and field (`fld`, the path of the field inside the record, such as "messages[3].strategy")."""
    if not isinstance(obj, dict):
        parent = fld.rsplit(".", 1)[0] if "." in fld else None
        raise DataError(str(path), record, parent, f"expected an object, got {type(obj).__name__}", "wrong-type")
    if key not in obj:
        raise DataError(str(path), record, fld, "missing field", "missing-field")
    val = obj[key]
    if not _is(val, typ):
        want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise DataError(str(path), record, fld, f"expected {want}, got {type(val).__name__}", "wrong-type")
    return val


def _file_error(path, what: str, e: OSError) -> DataError:
    if isinstance(e, FileNotFoundError):
        return DataError(str(path), None, None, "no such file", "missing-file")
    if isinstance(e, IsADirectoryError):
        return DataError(str(path), None, None, f"is a folder, not {what}", "not-a-file")
    return DataError(str(path), None, None, f"cannot read {what} ({e.strerror or e})", "unreadable")


def _open(path: Path, what: str):
    """The file opened for reading in binary; a folder, a FIFO or a device (which could block for ever) is refused."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        if not stat.S_ISREG(mode):
            raise DataError(str(path), None, None, f"not a regular file, so not {what}", "not-a-file")
        return open(path, "rb")
    except OSError as e:
        raise _file_error(path, what, e) from None


def read_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of a file; `what` names it in errors ("a PRED file")."""
    with _open(Path(path), what) as f:
        try:
            return f.read()
        except OSError as e:
            raise _file_error(path, what, e) from None


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file; bytes that are not UTF-8 are an error naming their line and byte offset."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, msg = data.count(b"\n", 0, e.start) + 1, f"not UTF-8 text (byte {e.start} of the file)"
        raise DataError(str(path), f"line {line}", None, msg, "bad-encoding") from None


def parse_json(text: str, path, record: str | None = None):
    """JSON text of `path` (its record `record`, if a line of it); bad JSON names its line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if record else f"line {e.lineno}, column {e.colno}"
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        why = "ends mid-value, as if cut short" if cut else e.msg
        raise DataError(str(path), record, None, f"bad JSON: {why} ({where})", "bad-json") from None
    except RecursionError:
        raise DataError(str(path), record, None, "bad JSON: nested too deep", "bad-json") from None


def check_record(obj, path, record: str | None, expect: type | tuple | None = None, fields: dict | None = None):
    """A parsed record of `path`: of type `expect` (any when None), holding `fields` ({key: type}); returns it."""
    if expect is not None and not _is(obj, expect):
        msg = f"expected {_describe(expect)}, got {type(obj).__name__}"
        raise DataError(str(path), record, None, msg, "wrong-type")
    for key, typ in (fields or {}).items():
        require(obj, key, typ, path, record, key)
    return obj


def read_json(path: str | Path, what: str, expect: type | tuple | None = dict, fields: dict | None = None):
    """A JSON file holding one value of type `expect` (an object by default) with `fields` ({key: type})."""
    text = read_text(path, what)
    if not text.strip():
        raise DataError(str(path), None, None, f"empty file, not {what}", "empty-file")
    return check_record(parse_json(text, path), path, None, expect, fields)


def read_jsonl(
    path: str | Path, what: str, fields: dict | None = None, torn_tail: bool = False, keep_errors: bool = False
) -> Iterator[tuple[int, object]]:
    """(line number, record) of every non-blank line of a JSON Lines file; with `fields` ({key: type}) every
    record must be an object holding them. With `torn_tail` (a file appended to, which a kill can cut mid-line) a
    last line without its line break is no record and no error: it is left out (cut_torn_tail cuts it off). A bad
    line is a DataError naming it: raised, or with `keep_errors` yielded in place of its record (a reader that
    skips invalid records goes on with the next line)."""
    path = Path(path)
    with _open(path, what) as f:
        try:
            for n, raw in enumerate(f, 1):
                if torn_tail and not raw.endswith(b"\n"):
                    return
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    obj = parse_json(line, path, f"line {n}")
                    check_record(obj, path, f"line {n}", dict if fields else None, fields)
                except UnicodeDecodeError as e:
                    msg = f"not UTF-8 text (byte {e.start} of the line)"
                    err = DataError(str(path), f"line {n}", None, msg, "bad-encoding")
                except DataError as e:
                    err = e
                else:
                    yield n, obj
                    continue
                if not keep_errors:
                    raise err
                yield n, err
        except OSError as e:
            raise _file_error(path, what, e) from None


def read_records(path: str | Path, what: str, keep_errors: bool = False) -> Iterator[tuple[str, object]]:
    """("record i", value) of a file holding one JSON array, or ("line n", value) of a JSON Lines file (see
    read_jsonl): a file whose first character is `[` is an array."""
    with _open(Path(path), what) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        for i, rec in enumerate(read_json(path, what, expect=list)):
            yield f"record {i}", rec
    else:
        for n, rec in read_jsonl(path, what, keep_errors=keep_errors):
            yield f"line {n}", rec


def cut_torn_tail(path: str | Path) -> int:
    """Cut a last line without its line break (a write that a kill cut short) off a file that is appended to, so
    that the next append starts a line of its own; the bytes cut."""
    with open(path, "r+b") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    return len(data) - keep
