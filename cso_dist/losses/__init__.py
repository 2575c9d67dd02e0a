"""The training methods, each declared once with what it needs (REGISTRY), and their losses.

A method entry states:
- `objective`: how one micro-batch's replies become its loss (cso_dist.losses.batch): "nll" (SFT on the chosen
  replies), "pairwise" (each rejected reply against its turn's chosen reply) or "kto" (every reply on its own,
  plus mismatched completions for the reference point);
- `reply_kinds`: the replies it scores -- "c" chosen, "r" non-preferred, "kl" KTO's mismatched completions
  (the layout and the reference cache hold exactly these);
- `needs_reference`: reference log-probs (the precomputed cache, or the adapter-disabled base);
- `layouts`: the pack.layout values that serve it;
- `keys`: the train.<key> settings its loss reads besides train.beta (bound by name, checked at load:
  a non-default value of a key the chosen method does not read is refused);
- `fn`: its per-example loss function in cso_dist.losses.functions (None for SFT: functions.sft_nll).

This module imports nothing heavy, so the config validates against it at load; the loss functions (torch) are
imported when first used (`cso_dist.losses.dpo` etc. resolve to cso_dist.losses.functions).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from cso_dist.pack import LAYOUTS


@dataclass(frozen=True)
class Method:
    name: str
    objective: str
    reply_kinds: tuple[str, ...]
    needs_reference: bool
    layouts: tuple[str, ...]
    keys: tuple[str, ...] = ()
    fn: str | None = None

    @property
    def loss(self) -> Callable | None:
        """The per-example loss function (None for sft)."""
        return getattr(importlib.import_module("cso_dist.losses.functions"), self.fn) if self.fn else None

    @property
    def pair_layout(self) -> bool:
        """pack.layout pair (the per-pair baseline) can serve it: the pairwise losses."""
        return "pair" in self.layouts

    @cached_property
    def params(self) -> tuple[str, ...]:
        """The loss function's parameter names."""
        return tuple(inspect.signature(self.loss).parameters) if self.loss is not None else ()

    @cached_property
    def defaults(self) -> dict[str, float]:
        """The loss function's float keyword defaults (beta, label_smoothing, ...)."""
        if self.loss is None:
            return {}
        return {
            k: p.default
            for k, p in inspect.signature(self.loss).parameters.items()
            if p.default is not inspect.Parameter.empty and isinstance(p.default, float)
        }

    @property
    def beta(self) -> float | None:
        """The default beta (ORPO: its lambda); None for sft."""
        return self.defaults.get("beta")


_PAIRWISE = ("c", "r")
_BOTH = LAYOUTS
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dpo", "pairwise", _PAIRWISE, True, _BOTH, ("label_smoothing",), fn="dpo"),
        Method("ipo", "pairwise", _PAIRWISE, True, _BOTH, fn="ipo"),
        Method("simpo", "pairwise", _PAIRWISE, False, _BOTH, ("gamma_beta_ratio",), fn="simpo"),
        Method("orpo", "pairwise", _PAIRWISE, False, _BOTH, fn="orpo"),
        Method("kto", "kto", ("c", "r", "kl"), True, ("trie",), ("desirable_weight", "undesirable_weight"), fn="kto"),
        Method("sft", "nll", ("c",), False, ("trie",)),
    )
}
METHODS = frozenset(REGISTRY)
NAMES = tuple(REGISTRY)  # in registry order: the config's choices of train.method
BASELINE = "sft"  # the method every study and the demo compare against
METHOD_KEYS = tuple(sorted({k for m in REGISTRY.values() for k in m.keys}))  # train.<key>s some method reads


def method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def needs_reference(name: str) -> bool:
    """True for methods whose loss needs reference-model log-probs (dpo, ipo, kto)."""
    return method(name).needs_reference


def resolved_beta(name: str, beta: float) -> float:
    """train.beta, or the method's default where it is -1."""
    return beta if beta > 0 else (method(name).beta or 0.0)


def __getattr__(name: str) -> Any:
    """The loss functions and their helpers (dpo, kto_kl, LossOutput, ...), imported on first use."""
    functions = importlib.import_module("cso_dist.losses.functions")
    try:
        return getattr(functions, name)
    except AttributeError:
        raise AttributeError(f"module 'cso_dist.losses' has no attribute {name!r}") from None
