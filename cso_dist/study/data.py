"""Step 1 of the study: its subsets of ESConv (train, valid, test, generation, held-out loss), made once and then
fixed; the train subset with each source's non-preferred replies; the base model and the config every run starts
from."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from cso_dist.config import Config
from cso_dist.data.dialogue import read_dialogues
from cso_dist.inputs import base_model
from cso_dist.launch.jobs import run_config
from cso_dist.util.errors import CsoError
from cso_dist.util.machine import cpu_bf16
from cso_dist.util.io import append_jsonl, atomic_write_text, read_json


def with_over(cfg: Config, **over) -> Config:
    """cfg with overrides (model__path=... for model.path), validated like any config."""
    return run_config(cfg, {k.replace("__", "."): str(v) for k, v in over.items()})


def timed(out: Path, phase: str, runs: int, seconds: float) -> None:
    """A line of <out>/timing.jsonl: the wall time of every part of the study, across reruns."""
    append_jsonl(
        out / "timing.jsonl",
        [{"phase": phase, "runs": runs, "seconds": round(seconds, 1), "at": time.strftime("%F %T")}],
    )


# the study.* keys of the subsets; those after the first four were added later and are recorded only when set
SUBSETS = ("train_dialogues", "valid_dialogues", "test_turns", "generate_dialogues", "eval_dialogues")
SUBSETS += ("test_dialogues", "test_from", "generate_from")
SIZES = {"train_dialogues": "train", "valid_dialogues": "valid", "eval_dialogues": "valid", "test_dialogues": "test"}


def _same_as_before(path: Path, then: dict, now: dict) -> None:
    """Refuse settings other than those `path` (a file this study made once) was made with, naming the first."""
    if changed := [k for k in {**now, **then} if then.get(k) != now.get(k)]:
        k = changed[0]
        raise CsoError(f"{path}: made with {k} {then.get(k)!r}, this study has {now.get(k)!r}; use another run.out_dir")


# ---------------------------------------------------------------- 1. data
def write_subsets(cfg: Config, out: Path) -> dict[str, Path]:
    """The subsets' files; made once, then fixed (a rerun reads them; other settings are refused)."""
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.data.stats import dialogue_stats

    st, data = cfg.study, out / "data"
    sizes = {"train": 1, "valid": st.valid_dialogues, "test": 1, "generate": st.generate_dialogues}
    files = {k: data / f"{k}.jsonl" for k, n in {**sizes, "eval": st.eval_dialogues}.items() if n}
    # keys added later are in the marker only when set: older study folders stay readable
    spec = {f"study.{k}": getattr(st, k) for i, k in enumerate(SUBSETS) if i < 4 or getattr(st, k)}
    spec.update({f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items() if k != "split"})
    marker = data / "subsets.json"
    if marker.exists():  # the runs of this folder were trained and scored on these subsets: keep them fixed
        defaults = {f"data.{k}": v for k, v in dataclasses.asdict(type(cfg.data)()).items() if k != "split"}
        old = defaults | read_json(marker, "the study's subsets")  # a key added since: it had its default then
        _same_as_before(marker, old, spec)
        if all(f.is_file() for f in files.values()):
            return files
    splits, stats = {}, {}
    for split in ("train", "valid", "test"):
        splits[split], report = build_dialogues(dataclasses.replace(cfg.data, split=split))
        notes = {k: v for k, v in report.notes.items() if k != "input"}
        stats[split] = dialogue_stats(splits[split]) | {"build_notes": notes}
    for key, split in SIZES.items():  # a size past its split is refused, as test_turns and generate_dialogues are
        if (asked := getattr(st, key)) > (held := len(splits[split])):
            raise CsoError(f"study.{key}: {asked} dialogues asked, the {split} split holds {held}")
    test, a, turns = splits["test"], st.test_from, 0
    n = a + st.test_dialogues
    while not st.test_dialogues and n < len(test) and turns < st.test_turns:
        turns += len(test[n].turn_indices())
        n += 1
    if n > len(test):
        raise CsoError(f"study.test_dialogues: {st.test_dialogues} from dialogue {a} on pass the split's {len(test)}")
    if turns < st.test_turns:
        held = f"{turns} supporter turns from dialogue {a} on"
        raise CsoError(f"study.test_turns: the test split holds {held}, fewer than {st.test_turns}")
    g = st.generate_from or len(test) - st.generate_dialogues  # the generation subset: [g, g + generate_dialogues)
    if g < n and g + st.generate_dialogues > a or g + st.generate_dialogues > len(test):
        raise CsoError(
            f"study.generate_dialogues: test dialogues {g} to {g + st.generate_dialogues - 1} do not fit beside the "
            f"test subset's {a} to {n - 1} ({len(test)} in the split)"
        )
    tr, va = splits["train"], splits["valid"]
    subsets = {"train": tr[: st.train_dialogues or None], "valid": va[: st.valid_dialogues], "test": test[a:n]}
    subsets |= {"eval": va[: st.eval_dialogues], "generate": test[g : g + st.generate_dialogues]}
    for name, path in files.items():
        write_dialogues(path, subsets[name])
    atomic_write_text(data / "stats.json", json.dumps(stats, indent=2))
    atomic_write_text(marker, json.dumps(spec, indent=2))
    return files


def source_file(cfg: Config, source: str) -> str:
    return "train.jsonl" if source == cfg.data.negatives_from else f"train@{source}.jsonl"


def write_sources(cfg: Config, out: Path, base_model: Path) -> dict:
    """The train subset with each study source's non-preferred replies (<out>/data/train@<source>.jsonl; the
    subset itself, built with data.negatives_from, serves that source): the same dialogues, retrieved over the
    whole train split (retrieval-balanced) or written by the generator for the subset's histories (generated,
    generated-both; the base model unless study.generator). Made once; their build notes -> data/sources.json."""
    from cso_dist.data.build import preference_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.data.negatives import SOURCES, strategy_sides

    st, data = cfg.study, out / "data"
    notes_file = data / "sources.json"
    notes = read_json(notes_file, "a study's record of its sources") if notes_file.exists() else {}
    subset = read_dialogues(data / "train.jsonl")
    notes.setdefault(cfg.data.negatives_from, {"strategy_sides": strategy_sides(subset)})
    for source in st.sources:
        path = data / source_file(cfg, source)
        made = {"generator": str(st.generator or base_model), "generate_max_tokens": st.generate_max_tokens}
        made = made if SOURCES[source].writes else {}
        if path.is_file() and source in notes:
            _same_as_before(path, notes[source].get("made_with", {}), made)
            continue
        print(f"   train subset with {source} negatives -> {path}", flush=True)
        t0 = time.time()
        if SOURCES[source].writes:  # the writer: study.generator, or the base model
            over = {"data__negatives_from": source, "data__generate_max_tokens": st.generate_max_tokens}
            c = with_over(cfg, **over, data__generator=st.generator or base_model, model__path=base_model)
        else:  # retrieved: the study's data settings, this source
            c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="train", negatives_from=source))
        dialogues, report = preference_dialogues(c, subset)
        note = report.notes
        write_dialogues(path, dialogues)
        notes[source] = note | {"seconds": round(time.time() - t0, 1), "made_with": made}
        atomic_write_text(notes_file, json.dumps(notes, indent=2))
        timed(out, f"data: {source}", 0, notes[source]["seconds"])
    return notes


def base_config(cfg: Config, out: Path, files: dict[str, Path]) -> tuple[Config, Path]:
    """The config every run starts from, and the base model; the train subset's token statistics."""
    from cso_dist.data.stats import token_stats_for

    st = cfg.study
    model = base_model(cfg, out, st.model)
    over = {"train__train_file": files["train"], "train__eval_file": files.get("eval", "")}
    if st.cpu_bf16 and cpu_bf16() and cfg.model.precision == "fp32":
        over["model__precision"] = "bf16-mixed"
    base = with_over(cfg, **over)
    used, stats_file = read_dialogues(files["train"]), out / "data" / "stats.json"
    tk = token_stats_for(used, str(model), cfg.data) | {"dialogues": len(used)}
    if stats_file.is_file():
        stats = read_json(stats_file, "a study's data statistics", fields={"train": dict})
        stats["train"]["tokens"] = tk
        atomic_write_text(stats_file, json.dumps(stats, indent=2))
    print(
        f"   model: {model} ({base.model.finetune}, {base.model.precision}); train subset: {len(used)} dialogues, mean "
        f"history {tk['mean_history_tokens']} tokens, chosen {tk['mean_chosen_tokens']}; trie "
        f"{tk['dialogue_tokens_with_branches']:,} vs per-pair {tk['per_pair_tokens']:,} tokens",
        flush=True,
    )
    return base, model
