"""One typed config for every command: YAML file + dotted overrides (`--data.negatives 5`). Config is the training
config (cso_dist.config.training) plus the sections of the tools around a run (tools, study); load_config reads a
file and overrides into one, each command family its sections. Unknown keys, wrong types and out-of-range values
fail at load with the key named.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cso_dist.config.file import _apply, _check, _nest, read_yaml
from cso_dist.config.study import StudyConfig
from cso_dist.config.tools import MctsConfig, PlanConfig, SlurmConfig
from cso_dist import losses
from cso_dist.engines import ENGINES
from cso_dist.util.errors import ConfigError
from cso_dist.config.training import TRAINING_SECTIONS, PackConfig, TinyModelConfig, TrainConfig, TrainingConfig


@dataclass
class Config(TrainingConfig):
    """A config file: the training config plus the sections of the tools around it (launch, plan, mcts,
    study). One file serves every command of a recipe; each command reads the sections of its family."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    mcts: MctsConfig = field(default_factory=MctsConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)  # study.model "tiny" only
    RENAMED: ClassVar[dict[str, str]] = {"demo": "study"}  # the demo is the study: its old section, still read


# The sections each command family reads; a command-line override of any other section is refused.
FAMILIES: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "training": TRAINING_SECTIONS,
    "launch": TRAINING_SECTIONS + ("slurm",),
    "plan": TRAINING_SECTIONS + ("slurm", "plan"),
    "mcts": ("mcts", "slurm", "run"),
    "study": TRAINING_SECTIONS + ("slurm", "study", "tiny_model"),
    "all": tuple(f.name for f in dataclasses.fields(Config)),
}


def _check_method(cfg: TrainingConfig) -> None:
    """What train.method declares (cso_dist.losses.Method): the layouts that serve it, and the train.<key>s it
    reads -- a key only another method reads, set away from its default, would be ignored, so it is refused."""
    spec = losses.method(cfg.train.method)
    _check(
        cfg.pack.layout in spec.layouts,
        "pack.layout",
        f"'{cfg.pack.layout}' does not serve {spec.name} (it takes {', '.join(spec.layouts)}); the per-pair layout "
        f"serves {', '.join(m.name for m in losses.REGISTRY.values() if m.pair_layout)}",
    )
    defaults = TrainConfig()
    for key in losses.METHOD_KEYS:
        if key not in spec.keys and getattr(cfg.train, key) != getattr(defaults, key):
            readers = ", ".join(m.name for m in losses.REGISTRY.values() if key in m.keys)
            _check(False, f"train.{key}", f"read by {readers} only, and train.method is {spec.name}: remove it")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, family: str = "all") -> Config:
    """The config file + dotted overrides, validated. `family` names the sections the command reads
    (FAMILIES); an override of another section is refused. A file may hold every section (a recipe
    serves several commands); all of them are validated."""
    cfg = Config()
    for key in overrides or {}:
        section = key.split(".", 1)[0]
        if section in FAMILIES["all"] and section not in FAMILIES[family]:
            raise ConfigError(
                f"config: --{key}: this command does not read the {section} section "
                f"(it reads {', '.join(FAMILIES[family])})"
            )
    notes: list[str] = []
    if path:
        _apply(cfg, read_yaml(Path(path), check=lambda raw: _apply(Config(), raw, "")), "", notes)
    if overrides:
        _apply(cfg, _nest(overrides), "", notes)
    for note in dict.fromkeys(notes):
        print(f"cso-dist: note: {note}", file=sys.stderr)
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).validate()
    _check(
        cfg.pack.max_tokens >= cfg.data.max_length,
        "pack.max_tokens",
        f"must be >= data.max_length ({cfg.data.max_length}): one turn must fit a micro-batch",
    )
    _check_method(cfg)
    flex_rows = cfg.pack.layout == "trie" and cfg.scorer.attention in ("auto", "flex")
    _check(
        cfg.pack.bucket == PackConfig.bucket or flex_rows,
        "pack.bucket",
        f"only flex attention over trie rows reads it, and scorer.attention is {cfg.scorer.attention} "
        f"(pack.layout {cfg.pack.layout}): remove it",
    )
    _check(
        not cfg.train.compile or flex_rows,
        "train.compile",
        "compiled layers need rows of a few lengths: flex attention over trie rows (pack.layout trie, "
        f"scorer.attention flex or auto on CUDA), and they are {cfg.pack.layout} / {cfg.scorer.attention}",
    )
    _check(
        cfg.train.reference == "cache" or cfg.model.finetune in ("lora", "qlora"),
        "train.reference",
        "'adapter' (the base with the adapter disabled) needs model.finetune lora or qlora",
    )
    engine = ENGINES[cfg.dist.engine]
    _check(cfg.model.finetune in engine.finetunes, "model.finetune", engine.why_not)
    _check(not (cfg.train.compile and engine.compiled_layers), "train.compile", engine.compiled_layers)
    _, offload = engine.sharding(cfg)  # the engine's own settings (a missing or wrong DeepSpeed JSON fails here)
    _check(
        not (cfg.train.fused_adamw and offload != "none"),
        "train.fused_adamw",
        "DeepSpeed's optimizer offload runs its own CPU Adam: remove it",
    )
    return cfg
