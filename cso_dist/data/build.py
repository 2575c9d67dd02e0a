"""`data build` and the study's sources: any input -> preference dialogues, their non-preferred replies from
data.negatives_from (cso_dist.data.negatives.SOURCES), with a report of what was merged, skipped or written."""

from __future__ import annotations

import copy
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.esconv import build_esconv
from cso_dist.data.negatives import SOURCES, NegativeOptions, add_negatives, strategy_sides
from cso_dist.data.hf import hf_records, is_hf_input
from cso_dist.data.readers import READERS, ReadContext, Skips
from cso_dist.data.strategies import NAMED, StrategySet, load_strategy_set
from cso_dist.util.errors import ConfigError, DataError
from cso_dist.util.paths import esconv_dir

if TYPE_CHECKING:
    from cso_dist.config import DataConfig, TrainingConfig


@dataclass
class BuildReport:
    input: str
    strategy_set: str
    skipped: dict = field(default_factory=dict)  # reason -> count
    skipped_examples: dict = field(default_factory=dict)  # reason -> first error line
    notes: dict = field(default_factory=dict)  # source-specific counts (e.g. merged ESConv utterances)


def strategy_set_for(cfg: DataConfig, path: str) -> StrategySet:
    """`auto`: ESConv's set for ESConv; otherwise the named set whose labels the file uses most."""
    spec = cfg.strategies
    if spec == "auto":
        spec = "esconv" if cfg.source == "esconv" else detect_strategy_set(path, cfg.split)
    return load_strategy_set(spec)


def detect_strategy_set(path: str, split: str = "train") -> str:
    try:
        if is_hf_input(path):
            text = json.dumps([row for _, row in itertools.islice(hf_records(path, split), 2000)], ensure_ascii=False)
        else:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (OSError, DataError):
        return "esconv"  # the reader reports the missing or unreadable input
    hits = {name: sum(text.count(f"({s})") + text.count(f'"{s}"') for s in desc) for name, (desc, _) in NAMED.items()}
    return max(hits, key=lambda k: (hits[k], k == "esconv"))


def build_dialogues(cfg: DataConfig) -> tuple[list[PrefDialogue], BuildReport]:
    path = cfg.input or (str(esconv_dir()) if cfg.source == "esconv" else "")
    if not path:
        raise ConfigError(f"data.input: required for --from {cfg.source}")
    sset = strategy_set_for(cfg, path)
    ctx = ReadContext(path, sset, cfg.aliases, Skips(cfg.skip_invalid), split=cfg.split)
    notes: dict = {}
    if cfg.source == "esconv":
        opts = NegativeOptions(cfg.negatives, cfg.seed, cfg.context_seeker_messages, cfg.pool, cfg.negatives_from)
        dialogues, notes = build_esconv(ctx, cfg.split, opts)
    else:
        dialogues = READERS[cfg.source](ctx)
        notes = {k: v for k, v in sorted(ctx.counts.items()) if v}
    if not dialogues:
        skipped = f" ({ctx.skips.total} invalid records skipped)" if ctx.skips.total else ""
        raise DataError(ctx.path, None, None, f"no preference dialogues in this input{skipped}", "empty-file")
    return dialogues, BuildReport(ctx.path, sset.name, dict(ctx.skips.counts), dict(ctx.skips.examples), notes)


def preference_dialogues(
    cfg: TrainingConfig, subset: list[PrefDialogue] | None = None, progress: bool = True
) -> tuple[list[PrefDialogue], BuildReport]:
    """The one way preference dialogues are made (`data build`, and each of a study's sources): the input of
    cfg.data, or the dialogues of `subset` (drawn from it), with non-preferred replies of data.negatives_from --
    retrieved from other dialogues of the whole split (for a subset: balanced over the subset's own turns), or
    written by data.generator for the same histories. The report's notes say what each source did."""
    d = cfg.data
    source = SOURCES[d.negatives_from]
    if subset is None:
        dialogues, report = build_dialogues(d)
    elif source.retrieves:  # the candidates: every dialogue of the split; the targets: the subset's
        full, report = build_dialogues(replace(d, negatives=0))
        ids = {x.meta.get("source_record") for x in subset}
        targets = [k for k, x in enumerate(full) if x.meta.get("source_record") in ids]
        opts = NegativeOptions(d.negatives, d.seed, d.context_seeker_messages, d.pool, d.negatives_from)
        add_negatives(full, opts, Counter(), targets)
        dialogues = [full[k] for k in targets]
        for x in dialogues:
            x.meta["negatives_from"] = d.negatives_from
        report.notes = {"strategy_sides": strategy_sides(dialogues)}
    else:
        dialogues, report = copy.deepcopy(subset), BuildReport(d.input, "", notes={})
    if source.writes and d.negatives:
        from cso_dist.data.generated import add_generated

        report.notes.update(add_generated(dialogues, cfg, progress))
    return dialogues, report
