"""Command-line flags generated from the config's dataclasses: `data build --negatives 5` is
`--data.negatives 5` (one override channel), with the key's help, default and choices from its field;
values are typed and validated when the config loads (cso_dist.config.load_config)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Literal

from cso_dist.config import Config, help_of
from cso_dist.config.file import _parse_value

_FLAG = "config:"  # argparse dest prefix of the generated flags: "config:data.negatives"


def add_flags(
    parser: argparse.ArgumentParser,
    section: str,
    names: Iterable[str] | None = None,
    rename: dict[str, str] | None = None,
) -> None:
    """Flags for config keys, generated from the section's dataclass: `--negatives 5` is `--data.negatives 5`
    (one override channel), with the key's help, default and choices; values are typed and validated at load."""
    cls = type(getattr(Config(), section))
    hints, defaults = typing.get_type_hints(cls), cls()
    for name in names or [f.name for f in dataclasses.fields(cls)]:
        key, typ, default = f"{section}.{name}", hints[name], getattr(defaults, name)
        flag = "--" + (rename or {}).get(name, name).replace("_", "-")
        text = help_of(cls, name)
        kw: dict[str, Any] = {"dest": _FLAG + key, "default": argparse.SUPPRESS}
        if typ is bool:
            parser.add_argument(flag, action="store_true", help=f"{text} ({key})", **kw)
            continue
        if typing.get_origin(typ) is Literal:
            kw["choices"] = typing.get_args(typ)
        else:
            kw["metavar"] = name.upper()
            if typ is not str:
                kw["type"] = _parse_value
        shown = f"; default {default}" if default not in ("", []) else ""
        parser.add_argument(flag, help=f"{text} ({key}{shown})", **kw)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags a command line gave, as dotted overrides."""
    return {k[len(_FLAG) :]: v for k, v in vars(args).items() if k.startswith(_FLAG)}
