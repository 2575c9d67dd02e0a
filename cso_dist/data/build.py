"""`data build`: any source -> preference dialogues, with a report of what was merged or skipped."""
from __future__ import annotations

from dataclasses import dataclass, field

from cso_dist.config import DataConfig
from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.esconv import EsconvOptions, build_esconv
from cso_dist.data.readers import READERS, ReadContext, Skips
from cso_dist.data.strategies import StrategySet, load_strategy_set
from cso_dist.paths import esconv_dir


@dataclass
class BuildReport:
    input: str
    skipped: dict = field(default_factory=dict)  # reason -> count
    skipped_examples: dict = field(default_factory=dict)  # reason -> first error line
    notes: dict = field(default_factory=dict)  # source-specific counts (e.g. merged ESConv utterances)


def strategy_set_for(cfg: DataConfig) -> StrategySet:
    spec = cfg.strategies
    if spec == "auto":
        spec = "escpro" if cfg.source == "escpro" else "esconv"
    return load_strategy_set(spec)


def build_dialogues(cfg: DataConfig) -> tuple[list[PrefDialogue], BuildReport]:
    sset = strategy_set_for(cfg)
    path = cfg.input or (str(esconv_dir()) if cfg.source == "esconv" else "")
    if not path:
        from cso_dist.errors import ConfigError

        raise ConfigError(f"data.input: required for --from {cfg.source}")
    ctx = ReadContext(path, sset, cfg.aliases, Skips(cfg.skip_invalid))
    notes: dict = {}
    if cfg.source == "esconv":
        opts = EsconvOptions(cfg.negatives, cfg.seed, cfg.context_seeker_messages, cfg.pool)
        dialogues, notes = build_esconv(ctx, cfg.split, opts)
    else:
        dialogues = READERS[cfg.source](ctx)
    return dialogues, BuildReport(ctx.path, dict(ctx.skips.counts), dict(ctx.skips.examples), notes)
