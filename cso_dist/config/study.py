"""The study's section (`study:`, read by `cso-dist study` and `cso-dist demo`): its subsets, seeds, losses, sources
and start points, each loss's sweep grid, and the keys the study sets in every run itself. Its choices are the
study's (cso_dist.study), the negatives sources' (cso_dist.data.negatives) and the losses' (cso_dist.losses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from cso_dist import losses
from cso_dist.config.training import TRAINING_SECTIONS, TrainingConfig
from cso_dist.config.file import _apply, _check, _check_seed, _nest, _parse_value, setting
from cso_dist.data.negatives import NEGATIVES_FROM
from cso_dist.data.negatives import SOURCES as NEGATIVE_SOURCES
from cso_dist.models import hub
from cso_dist.study import CLUSTERS as STUDY_CLUSTERS
from cso_dist.study import MODELS as STUDY_MODELS
from cso_dist.study import START_FROM
from cso_dist.util.errors import ConfigError

STUDY_OWNED = (
    "train.method",
    "run.seed",
    "train.train_file",
    "train.eval_file",
    "train.max_dialogues",
    "train.eval_max_dialogues",
    "train.ref_cache",
    "data.negatives_from",  # study.sources
    "data.generator",
    "data.generate_max_tokens",
)


def check_study_owned(cfg) -> None:
    """Refuse, in a study's config, a key the study sets in each run itself (STUDY_OWNED): it would be ignored."""
    default = TrainingConfig()
    for key in STUDY_OWNED:
        sec, k = key.split(".")
        same = getattr(getattr(cfg, sec), k) == getattr(getattr(default, sec), k)
        _check(same, key, "set by the study in each run (its losses: study.losses, seeds: study.seeds)")


@dataclass
class StudyConfig:
    """`cso-dist study` and `cso-dist demo` (cso_dist.study): SFT vs CSO with each loss on a real model, every loss
    tuned on ESConv valid Q (first seed), then each selected config and SFT on every seed, scored on ESConv test.
    The demo (configs/demo.yaml) is the study with one loss, one seed and no sweep; a former `demo:` section is
    read as this one."""

    model: Literal[STUDY_MODELS] = setting(
        "smollm2-135m-instruct", "the model when model.path is empty: the packaged real model, or a tiny random one"
    )
    train_dialogues: int = setting(
        16, "first N ESConv train dialogues (0 = all): SFT on their gold replies, CSO on their pairs"
    )
    valid_dialogues: int = setting(
        16, "first N ESConv valid dialogues: the selection set (likelihood-mode Q; 0 = none: no sweep to select)"
    )
    eval_dialogues: int = setting(0, "first N ESConv valid dialogues for a held-out loss during training (0 = none)")
    test_turns: int = setting(
        1000, "test subset: the first ESConv test dialogues holding at least this many supporter turns (or 0)"
    )
    test_dialogues: int = setting(0, "test subset: the first N ESConv test dialogues instead (0: by test_turns)")
    test_from: int = setting(0, "the test subset starts at this ESConv test dialogue (0-based; those before it unused)")
    generate_dialogues: int = setting(2, "the last N ESConv test dialogues (apart from the above): greedy generation")
    generate_from: int = setting(0, "the generation subset starts at this test dialogue (0: the split's last N)")
    test_ledger: str = setting(
        "", "a JSON Lines ledger of the test dialogues earlier studies scored: reusing one is refused", path=True
    )
    reuse_test: bool = setting(False, "score test dialogues the ledger lists as used before")
    resamples: int = setting(200, "bootstrap resamples per comparison (test dialogues; with the seeds where compared)")
    seeds: list[int] = setting(
        help="seeds of SFT and of each selected config (the first one runs the sweep)", factory=lambda: [0, 1, 2]
    )
    losses: list[str] = setting(
        help="CSO losses compared with SFT", factory=lambda: ["dpo", "ipo", "simpo", "kto", "orpo"]
    )
    sweep: list[str] = setting(
        help='per loss, its grid on the first seed: "<loss> KEY=V1,V2 [KEY=V1,V2 ...]" (a loss without one runs '
        "the config's values)",
        factory=list,
    )
    sources: list[str] = setting(
        help="where each CSO loss's non-preferred replies come from (data.negatives_from values): a study axis; "
        "with several, each loss runs on each (named <loss>@<source>); SFT always trains on the gold replies",
        factory=lambda: ["retrieval"],
    )
    start_from: list[Literal[START_FROM]] = setting(
        help="where each CSO arm starts, its reference too: the seed's SFT model, or the base model (an axis: with "
        "base, an arm is named <loss>[@<source>]-from-base)",
        factory=lambda: [losses.BASELINE],
    )
    generator: str = setting(
        "", 'generated sources: the model that writes the replies ("" = the base model)', path=True
    )
    generate_max_tokens: int = setting(64, "generated sources: most tokens of a written reply")
    sft_lr: float = setting(5e-4, "SFT learning rate")
    sft_epochs: int = setting(1, "SFT epochs")
    cluster: Literal[STUDY_CLUSTERS] = setting(
        "local",
        "where the runs go: local processes (slurm.array_parallelism at a time), a Slurm cluster, debug, or inline "
        "(this process, one run after another, with progress lines: the demo)",
    )
    cpu_bf16: bool = setting(
        True, "train and evaluate in bf16-mixed on a CPU with bf16 units (AMX or AVX512-BF16); was bf16_on_amx"
    )
    RENAMED: ClassVar[dict[str, str]] = {"bf16_on_amx": "cpu_bf16"}

    def arms(self) -> list[tuple[str, str, str, str]]:
        """(name, loss, source, start) of every CSO arm: the loss's name alone when there is one source and it
        starts from SFT."""
        one, arms = self.sources == ["retrieval"], []
        for start in self.start_from:
            for src in self.sources:
                for loss in self.losses:
                    name = (loss if one else f"{loss}@{src}") + ("-from-base" if start == "base" else "")
                    arms.append((name, loss, src, start))
        return arms

    def grids(self) -> dict[str, dict[str, list[str]]]:
        """{loss: {dotted key: values}} from `sweep` (validated at load)."""
        out: dict[str, dict[str, list[str]]] = {}
        for i, entry in enumerate(self.sweep):
            key = f"study.sweep[{i}]"
            loss, *axes = entry.split()
            _check(loss in self.losses, key, f"'{loss}' is not one of study.losses ({', '.join(self.losses)})")
            _check(loss not in out, key, f"a second grid for {loss}")
            _check(bool(axes), key, 'expected "<loss> KEY=V1,V2 [KEY=V1,V2 ...]"')
            grid: dict[str, list[str]] = {}
            for ax in axes:
                k, _, v = ax.partition("=")
                values = v.split(",")
                _check(bool(k) and bool(v), key, f"'{ax}': expected KEY=V1,V2")
                _check(all(values), key, f"'{ax}': an empty value (an unset shell variable?); give every value")
                _check(k.split(".")[0] in TRAINING_SECTIONS, key, f"'{k}' is not a key of a training section")
                _check(k not in (*STUDY_OWNED, "run.out_dir", "model.path"), key, f"'{k}' is set by the study itself")
                for x in values:
                    probe = TrainingConfig()
                    try:
                        _apply(probe, _nest({k: _parse_value(x)}), "")
                    except ConfigError as e:
                        raise ConfigError(f"config: {key}: {str(e).removeprefix('config: ')}") from None
                grid[k] = values
            out[loss] = grid
        return out

    def validate(self) -> None:
        methods = losses.NAMES
        _check(self.train_dialogues >= 0, "study.train_dialogues", "must be >= 0 (0 = all)")
        _check(self.valid_dialogues >= 0, "study.valid_dialogues", "must be >= 0 (0 = none)")
        _check(self.valid_dialogues >= 1 or not self.sweep, "study.sweep", "needs study.valid_dialogues >= 1")
        _check(self.eval_dialogues >= 0, "study.eval_dialogues", "must be >= 0 (0 = none)")
        _check(
            min(self.test_turns, self.test_dialogues) >= 0 and (self.test_turns > 0) != (self.test_dialogues > 0),
            "study.test_turns",
            "give one of study.test_turns and study.test_dialogues (the other 0)",
        )
        _check(self.generate_dialogues >= 0, "study.generate_dialogues", "must be >= 0 (0: no generation)")
        _check(min(self.test_from, self.generate_from) >= 0, "study.test_from", "test_from, generate_from: >= 0")
        _check(bool(self.test_ledger) or not self.reuse_test, "study.reuse_test", "read with study.test_ledger")
        _check(self.resamples >= 20, "study.resamples", "must be >= 20 (a 95% interval from fewer means little)")
        _check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "study.seeds", "must be distinct, >= 1"
        )
        for i, seed in enumerate(self.seeds):
            _check_seed(seed, f"study.seeds[{i}]")
        bad = [x for x in self.losses if x not in methods or x == losses.BASELINE]
        _check(
            not bad and bool(self.losses), "study.losses", f"unknown or not a CSO loss: {', '.join(bad) or '(none)'}"
        )
        _check(len(set(self.losses)) == len(self.losses), "study.losses", "a loss given twice")
        bad = [x for x in self.sources if x not in NEGATIVES_FROM]
        _check(
            not bad and bool(self.sources),
            "study.sources",
            f"unknown: {', '.join(bad) or '(none)'} (one of {', '.join(NEGATIVES_FROM)})",
        )
        _check(len(set(self.sources)) == len(self.sources), "study.sources", "a source given twice")
        _check(len(set(self.start_from)) == len(self.start_from) >= 1, "study.start_from", "sft, base or both, once")
        _check(self.generate_max_tokens >= 1, "study.generate_max_tokens", "must be >= 1")
        hub.check(self.generator, "config: study.generator")
        for key in ("generator", "generate_max_tokens"):
            _check(
                any(NEGATIVE_SOURCES[x].writes for x in self.sources)
                or getattr(self, key) == getattr(StudyConfig, key),
                f"study.{key}",
                "used by a generated source only (study.sources has none)",
            )
        _check(self.sft_lr > 0, "study.sft_lr", "must be > 0")
        _check(self.sft_epochs >= 1, "study.sft_epochs", "must be >= 1")
        self.grids()
