"""docs/config.md: the config reference, generated from the config dataclasses' types, defaults and help texts
(`cso-dist config reference`); tests/test_config.py keeps the committed file equal to it."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from cso_dist.config import Config


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(typ))
    if typing.get_origin(typ) in (list, tuple):
        return f"list of {_type_name(typing.get_args(typ)[0])}"
    return getattr(typ, "__name__", str(typ)).replace("NoneType", "none")


def reference_markdown() -> str:
    """docs/config.md: every section and key of Config with its type, default and help text, generated from the
    dataclasses (`cso-dist config reference`; a test keeps the file equal to this)."""
    lines = [
        "# Config reference",
        "",
        "Every key of a config file, generated from the config dataclasses by `cso-dist config reference --out "
        "docs/config.md` (a test keeps this file current). A key is written in YAML as `section: {key: value}`, "
        "on the command line as `--section.key value`. A file may name `base:` files it extends; "
        "`cso-dist config show --config FILE` prints the resolved whole (at most 8 `base:` levels). A key of type "
        "*path* names a file or folder (some take a Hub id or a name too): a leading `~` is expanded when the config "
        "loads, the same for every such key; environment variables are not (on a command line the shell expands "
        "them). Seeds are integers in [0, 2^32).",
        "",
    ]
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
        doc = " ".join((cls.__doc__ or "").split())
        lines += [f"## `{section.name}`", ""] + ([doc, ""] if doc and not doc.startswith(cls.__name__ + "(") else [])
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = json.dumps(default) if not isinstance(default, str) else f'"{default}"'
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            typ = "path" if f.metadata.get("path") else _type_name(hints[f.name])
            lines.append(f"| `{section.name}.{f.name}` | {typ} | `{shown}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)
