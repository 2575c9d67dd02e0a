"""A settings dataclass's key: its default and the help text that `--help`, the generated flags and the reference
page show. The config's sections use it, and so do the settings a stage below the config declares itself
(cso_dist.mcts.search.SearchSettings)."""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(
    default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING, path: bool = False
) -> Any:
    """A config key: its default and its help text. `path`: the value names a file or folder (or a Hub id / name
    beside them); a leading `~` is expanded at load, for every such key alike. Environment variables are not
    expanded (on a command line the shell does it)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, "path": path})
