"""Reading a config: YAML files (a key given twice is refused) and dotted command-line overrides, typed
against the dataclass sections of cso_dist.config (every key named in its error); and what every section's
keys are made of (`setting`, the checks that name the key)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from cso_dist.util.errors import ConfigError
from cso_dist.util.fields import setting  # noqa: F401 - the sections' key, public here


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        if value not in typing.get_args(typ):
            raise ConfigError(f"config: {key}: {value!r} is not one of {', '.join(map(str, typing.get_args(typ)))}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(typ)[:1]
        if isinstance(value, str):  # a command line's "a,b": each item typed as YAML reads it (numbers), or kept
            value = [v.strip() if inner is str else _parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config: {key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key}: expected an integer, got {value!r}")
    if typ is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"config: {key}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"config: {key}: expected a finite number, got {value!r}")
        return out
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config: {key}: expected a string, got {value!r}")
    raise ConfigError(f"config: {key}: unsupported type {typ}")


def _apply(obj: Any, values: dict, prefix: str, notes: list[str] | None = None) -> None:
    """Set `values` (nested) on the config object `obj`, typed and checked; an old key name (a section's RENAMED)
    is read as its new one, with a note appended to `notes`."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    renamed = getattr(type(obj), "RENAMED", {})
    values = _moved(values, getattr(type(obj), "MOVED", {}) if not prefix else {}, notes)
    for k, v in values.items():
        if k in renamed:  # an old name: read as the new one, with a note
            if renamed[k] in values:
                raise ConfigError(f"config: {prefix}{k}: the old name of {prefix}{renamed[k]}; give only the new one")
            if notes is not None:
                notes.append(f"{prefix}{k} is now {prefix}{renamed[k]} (the old name still works)")
            k = renamed[k]
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"config: unknown key '{key}'{hint}")
        sub = getattr(obj, k)
        if dataclasses.is_dataclass(sub):
            if not isinstance(v, dict):
                raise ConfigError(f"config: {key}: expected a section (mapping), got {v!r}")
            _apply(sub, v, f"{key}.", notes)
        else:
            value = _coerce(v, hints[k], key)
            if _is_path(obj, k) and isinstance(value, str):
                value = os.path.expanduser(value)  # `~` only, for every path key alike ($VARS: the shell's)
            setattr(obj, k, value)


def _is_path(obj: Any, name: str) -> bool:
    return next(f.metadata.get("path", False) for f in dataclasses.fields(obj) if f.name == name)


def renamed_keys(root: type) -> dict[str, str]:
    """Old dotted key -> its new name, for the keys of root's sections (a section class's RENAMED, and root's MOVED:
    keys that moved to another section, as _apply reads them): what a file written before a rename holds."""
    hints = typing.get_type_hints(root)
    return {
        **{
            f"{f.name}.{old}": f"{f.name}.{new}"
            for f in dataclasses.fields(root)
            for old, new in getattr(hints[f.name], "RENAMED", {}).items()
        },
        **getattr(root, "MOVED", {}),
    }


def _moved(values: dict, moved: dict[str, str], notes: list[str] | None) -> dict:
    """`values` (nested, a whole config) with each key that moved to another section read at its new place, and a
    note; both given is refused."""
    if not moved or not any(isinstance(values.get(old.split(".")[0]), dict) for old in moved):
        return values
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for old, new in moved.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        if not isinstance(out.get(osec), dict) or okey not in out[osec]:
            continue
        if isinstance(out.get(nsec), dict) and nkey in out[nsec]:
            raise ConfigError(f"config: {old}: the old place of {new}; give only the new one")
        out.setdefault(nsec, {})
        if not isinstance(out[nsec], dict):
            raise ConfigError(f"config: {nsec}: expected a section (mapping), got {out[nsec]!r}")
        out[nsec][nkey] = out[osec].pop(okey)
        if notes is not None:
            notes.append(f"{old} is now {new} (the old key still works)")
    return out


def _nest(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, val in dotted.items():
        parts = key.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config: {key}: '{p}' is not a section")
            cur = nxt
        cur[parts[-1]] = val
    return out


def _parse_value(raw: str) -> Any:
    """A command-line value read as YAML (`5` -> 5, `true` -> True, `a,b` stays a string); typed at load."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--data.negatives", "5", "--run.out_dir=x"]` -> {"data.negatives": 5, "run.out_dir": "x"}."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=")[0]:
            raise ConfigError(f"config: unexpected argument '{a}' (overrides look like --section.key VALUE)")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"config: {a[2:]}: missing value")
            key, raw = a[2:], args[i + 1]
            i += 2
        out[key] = _parse_value(raw)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a list or a value replaces; a section merges)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


MAX_BASE_DEPTH = 8  # base: files including base: files, at most this deep (the recipes use 2)


def read_yaml(p: Path, check: Callable[[dict], None] | None = None, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping of sections, its `base:` files (one or a list, relative to the file) merged
    under it in order; one-line errors naming the file (and the line). `check` sees each file's own keys, so
    an unknown key or a bad value is named with the file that holds it."""
    if len(_chain) >= MAX_BASE_DEPTH:
        names = " -> ".join(c.name for c in (*_chain[:3], Path("..."), *_chain[-2:], p))
        raise ConfigError(f"config: {_chain[0]}: base: files nest more than {MAX_BASE_DEPTH} deep ({names})")
    raw = _read_one(p)
    bases = raw.pop("base", None)
    if check is not None:
        try:
            check(raw)
        except ConfigError as e:
            raise ConfigError(f"config: {p}: {str(e).removeprefix('config: ')}") from None
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config: {p}: base: expected a file name or a list of them, got {bases!r}")
    chain = (*_chain, p.resolve())
    merged: dict = {}
    for b in bases:
        bp = (p.parent / b).resolve()
        if bp in chain:
            raise ConfigError(f"config: {p}: base: {b} includes itself ({' -> '.join(c.name for c in chain)})")
        if not bp.is_file():
            raise ConfigError(f"config: {p}: base: {b}: no such file ({bp})")
        merged = merge(merged, read_yaml(bp, check, chain))
    return merge(merged, raw)


def _read_one(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"config: {p}: no such file")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = f"{e.problem} (line {mark.line + 1})" if getattr(e, "problem", None) and mark else str(e)
        raise ConfigError(f"config: {p}: bad YAML: {' '.join(what.split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {p}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:  # the YAML parser recurses per level: a config has sections of keys, two levels
        raise ConfigError(f"config: {p}: nested far too deep for a config (sections of keys)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {p}: expected a mapping of sections")
    return raw


# ---------------------------------------------------------------- the sections' keys and checks
SEED_RANGE = 2**32  # seeds are unsigned 32-bit (numpy's, and what Python's and torch's take without surprise)


def _check_seed(value: int, key: str) -> None:
    _check(0 <= value < SEED_RANGE, key, f"{value} is not in [0, 2^32)")


def choices(section: type, name: str) -> tuple:
    """The values a Literal key of a config section takes (for the CLI's `choices`)."""
    return typing.get_args(typing.get_type_hints(section)[name])


def help_of(section: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(section) if f.name == name)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key}: {msg}")


def _control(text: str) -> bool:
    """Whether `text` holds a control character (newline, carriage return, NUL, escape, ...)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _check_token(value: str, key: str) -> None:
    """A value Slurm reads as one token (#SBATCH lines): no whitespace, no control characters."""
    _check(not _control(value), key, f"{value!r} holds a control character")
    _check(not any(c.isspace() for c in value), key, f"{value!r} holds whitespace (Slurm reads one token here)")
