"""`cso-dist study` and `cso-dist demo`: the CSO paper's comparison (SFT vs CSO with each loss) on a real model, as
job arrays of the project's own launcher (cso_dist.launch.submit_jobs, as `cso-dist launch submitit --sweep`), or in
this process (study.cluster inline). The demo is the study with one loss, one seed and no sweep (configs/demo.yaml):
its runs are then <out>/sft and <out>/<loss>, its results <out>/summary.{md,json}.

    cso-dist study --config configs/study.yaml      # a rerun skips every finished run and evaluation

1. data    ESConv -> <out>/data: the train subset (study.train_dialogues), the valid subset (selection), the test
           subset (the first study.test_dialogues test dialogues, or the first holding study.test_turns supporter
           turns), the generation subset (the last study.generate_dialogues), the held-out-loss subset
2. sft     one SFT run per seed on the train subset's gold replies (LoRA)       -> <out>/sft/seed=S
3. sweep   each loss's grid (study.sweep) on the first seed, from that seed's SFT -> <out>/sweep/<loss>/<point>
4. valid   every sweep point, and the first seed's SFT, scored on the valid subset (likelihood mode)
5. select  per loss the point with the highest valid Q (ties: lower valid B)  -> <out>/selection.json
6. seeds   the selected point on the other seeds, each from its own seed's SFT -> <out>/seeds/<loss>/seed=S
7. test    base, every SFT seed and every selected run: likelihood mode on the test subset, greedy
           generation on the generation subset
8. report  mean ± std over seeds, each loss against SFT (paired per seed; with one seed, a paired bootstrap over the
           test dialogues), plots -> <out>/study.md, <out>/study.json, <out>/report/report.md
Test scores are read only in step 7-8: nothing is selected on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from types import SimpleNamespace

from cso_dist.losses import BASELINE
from cso_dist.study import PHASES
from cso_dist.config import STUDY_OWNED, Config, EvalConfig, TrainingConfig, choices
from cso_dist.data.dialogue import read_dialogues
from cso_dist.util.errors import CsoError
from cso_dist.eval.ledger import check_unused, record
from cso_dist.eval.report import spread
from cso_dist.util.io import append_jsonl, atomic_write_text, read_json, read_jsonl
from cso_dist.launch.jobs import EvalJob, Run, TrainJob, collect, run_config, submit_jobs, sweep_runs, table

KEYS = ("Q", "W", "B", "accuracy")
LIST_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "valid/Q", "valid/B", "test/Q", "test/B", "generate/Q")
LIST_KEYS += ("generate/parse_rate",)
TRAIN = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")
TRAIN += ("logps/rejected",)
GEN = (("Q", "generate: Q", 3), ("B", "generate: B", 3), ("parse_rate", "strategy parse rate", 2))
GEN += (("bleu2", "BLEU-2", 1), ("rougeL", "ROUGE-L", 1), ("distinct2", "Distinct-2", 2))
SUBSETS = ("train_dialogues", "valid_dialogues", "test_turns", "generate_dialogues", "eval_dialogues", "test_dialogues")
SUBSETS += ("test_from", "generate_from")
SIZES = {"train_dialogues": "train", "valid_dialogues": "valid", "eval_dialogues": "valid", "test_dialogues": "test"}
TIMING = {"phase": str, "seconds": (int, float)}  # a line of <out>/timing.jsonl (read through the one reader)
# two-sided 95% Student t quantiles by degrees of freedom (scipy-free; beyond 10 the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _cpuinfo() -> list[str]:
    return Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []


def cpu_bf16() -> str | None:
    """The CPU's bf16 units, if any: "amx" or "avx512_bf16" (AMD EPYC Zen 4 and later, Intel Cooper Lake)."""
    flags = {f for line in _cpuinfo() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return "amx" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None)


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in _cpuinfo() if x.startswith("model name")), None)
    return cpu or platform.processor() or "cpu"


def base_model(cfg: Config, out: Path, name: str) -> Path:
    """model.path, else `name`: the packaged real model (imported once), or "tiny" (a random model built once
    into <out>/tiny-model from the tiny_model section)."""
    from cso_dist.data.esconv import esconv_texts
    from cso_dist.models import build_tiny_model
    from cso_dist.models.gguf import fetch_model

    if cfg.model.path:
        return Path(cfg.model.path)
    if name != "tiny":
        return fetch_model(name)
    model_dir, t = out / "tiny-model", cfg.tiny_model
    if not (model_dir / "config.json").is_file():
        texts = esconv_texts(str(Path(cfg.data.input) / "train.jsonl")) if cfg.data.input else esconv_texts()
        kw = {"bpe_texts": texts if t.tokenizer == "bpe" else None, "seed": cfg.run.seed}
        build_tiny_model(t.arch, model_dir, t.tokenizer, hidden_size=t.hidden_size, num_layers=t.num_layers, **kw)
    return model_dir


def check_owned(cfg: Config) -> None:
    """Refuse a key the study sets in each run itself (STUDY_OWNED): set in the config, it would be ignored."""
    default = Config()
    for key in STUDY_OWNED:
        sec, k = key.split(".")
        if getattr(getattr(cfg, sec), k) != getattr(getattr(default, sec), k):
            raise CsoError(f"{key}: set by the study in each run (its losses: study.losses, seeds: study.seeds)")


# ---------------------------------------------------------------- 1. data
def _write_subsets(cfg: Config, out: Path) -> dict[str, Path]:
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
        changed = [k for k in {**spec, **old} if old.get(k) != spec.get(k)]
        if changed:
            raise CsoError(
                f"{marker}: this study's subsets were made with other settings ({', '.join(changed)}: "
                f"{old.get(changed[0])!r} then, {spec.get(changed[0])!r} now); use another run.out_dir"
            )
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


# ---------------------------------------------------------------- configs of the runs
def _with(cfg: Config, **over) -> Config:
    """cfg with overrides (model__path=... for model.path), validated like any config."""
    return run_config(cfg, {k.replace("__", "."): str(v) for k, v in over.items()})


def _seed_runs(cfg: Config, out_dir: Path, seeds: list[int], name: str, flat: bool) -> list[tuple[str, Config, tuple]]:
    """One run per seed under out_dir (cso_dist.launch.sweep_runs), or out_dir itself (flat: one seed)."""
    phase = _with(cfg, run__out_dir=out_dir)
    runs = [(f"{name}/{n}", run_config(phase, over), ()) for n, over in sweep_runs(phase, {"run.seed": seeds})]
    return [(name, _with(c, run__out_dir=out_dir), ()) for _, c, _ in runs] if flat else runs


def _eval_item(cfg: Config, name: str, run_dir: Path, tasks: list, model: Path | None = None) -> tuple:
    """An evaluation of `model` (the run's final one) into run_dir/eval (cso_dist.launch.EvalJob)."""
    c = _with(cfg, model__path=model or run_dir / "final", model__finetune="full", run__out_dir=run_dir)
    return (name, c, (tasks,))


def _cso(cfg: Config, out: Path, seed: int, starts: dict[str, Path], arm: tuple, over: dict) -> Config:
    """A CSO run of an arm (name, loss, source, start) from its start model (`starts`: the seed's SFT model, the
    base model), which is its reference too, on the source's train file, with one reference cache per start model,
    seed, source and reply kinds (a method that scores mismatched completions adds them): DPO and IPO runs of a
    seed, start and source share theirs."""
    from cso_dist.refcache.key import reply_kinds

    _, loss, source, start = arm
    train = out / "data" / _source_file(cfg, source)
    over_ = {"model__path": starts[start], "train__method": loss, "run__seed": seed, "train__train_file": train}
    c = run_config(_with(cfg, **over_), over)
    kinds = "".join(f"-{k}" for k in reply_kinds(c) if k not in ("c", "r"))
    src = "" if source == "retrieval" else f"@{source}"
    return _with(c, train__ref_cache=out / "refcache" / f"{start}-seed={seed}{kinds}{src}")


def _timed(out: Path, phase: str, runs: int, seconds: float) -> None:
    """A line of <out>/timing.jsonl: the wall time of every part of the study, across reruns."""
    append_jsonl(
        out / "timing.jsonl",
        [{"phase": phase, "runs": runs, "seconds": round(seconds, 1), "at": time.strftime("%F %T")}],
    )


def _source_file(cfg: Config, source: str) -> str:
    return "train.jsonl" if source == cfg.data.negatives_from else f"train@{source}.jsonl"


def _write_sources(cfg: Config, out: Path, base_model: Path) -> dict:
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
        path = data / _source_file(cfg, source)
        made = {"generator": str(st.generator or base_model), "generate_max_tokens": st.generate_max_tokens}
        made = made if SOURCES[source].writes else {}
        if path.is_file() and source in notes:
            was = notes[source].get("made_with", {})
            if was != made:
                k = next(k for k in {**made, **was} if was.get(k) != made.get(k))
                raise CsoError(
                    f"{path}: made with {k} {was.get(k)!r}, this study has {made.get(k)!r}; use another run.out_dir"
                )
            continue
        print(f"   train subset with {source} negatives -> {path}", flush=True)
        t0 = time.time()
        if SOURCES[source].writes:  # the writer: study.generator, or the base model
            over = {"data__negatives_from": source, "data__generate_max_tokens": st.generate_max_tokens}
            c = _with(cfg, **over, data__generator=st.generator or base_model, model__path=base_model)
        else:  # retrieved: the study's data settings, this source
            c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="train", negatives_from=source))
        dialogues, report = preference_dialogues(c, subset)
        note = report.notes
        write_dialogues(path, dialogues)
        notes[source] = note | {"seconds": round(time.time() - t0, 1), "made_with": made}
        atomic_write_text(notes_file, json.dumps(notes, indent=2))
        _timed(out, f"data: {source}", 0, notes[source]["seconds"])
    return notes


def _base(cfg: Config, out: Path, files: dict[str, Path]) -> tuple[Config, Path]:
    """The config every run starts from, and the base model; the train subset's token statistics."""
    from cso_dist.data.stats import token_stats_for

    st = cfg.study
    model = base_model(cfg, out, st.model)
    over = {"train__train_file": files["train"], "train__eval_file": files.get("eval", "")}
    if st.cpu_bf16 and cpu_bf16() and cfg.model.precision == "fp32":
        over["model__precision"] = "bf16-mixed"
    base = _with(cfg, **over)
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


# ---------------------------------------------------------------- running a phase
class _Here:
    """A job run in this process (study.cluster inline), read by collect() like a submitit job."""

    job_id, paths = "inline", SimpleNamespace(stderr="the output above")

    def __init__(self, job, cfg: TrainingConfig, extra: tuple, catch: bool):
        from cso_dist.eval.score import evaluate_tasks
        from cso_dist.train.loop import run_train

        try:
            self.out = [run_train(cfg, resume="auto") if isinstance(job, TrainJob) else evaluate_tasks(cfg, *extra)]
        except Exception as e:  # noqa: BLE001 - a sweep point that fails is a result (may_fail)
            if not catch:
                raise
            self.out = e

    def results(self) -> list[dict]:
        if isinstance(self.out, Exception):
            raise self.out
        return self.out


def _run_phase(cfg: Config, title: str, items: list, job, folder: Path, may_fail: bool = False) -> list[dict]:
    """Run the phase's items (finished ones are skipped), wait, print the table; a failed run stops the
    study unless `may_fail` (a sweep point that diverges is a result: it is reported and not selected). A run's
    config is its training sections alone: the study's own settings do not change what a finished run means."""
    if not items:
        return []
    t0, cluster = time.time(), cfg.study.cluster
    fields = [f.name for f in dataclasses.fields(TrainingConfig)]
    items = [(name, TrainingConfig(**{f: getattr(c, f) for f in fields}), x) for name, c, x in items]
    print(f"== {title}: {len(items)} runs", flush=True)
    if cluster == "inline":
        runs = [Run(name, c, None, job.finished(c, *x)) for name, c, x in items]
        for r, (_, c, x) in zip(runs, items):
            if r.done is None:
                print(f"running {r.name} -> {c.run.out_dir}", flush=True)
                r.job = _Here(job, c, x, may_fail)
    else:
        runs = submit_jobs(cfg, items, job, cluster, folder=folder, verbose=True)
    new = sum(r.job is not None for r in runs)
    print(f"   {len(runs) - new} finished before, {new} {'run' if cluster == 'inline' else 'submitted'}", flush=True)
    rows = collect(runs, LIST_KEYS)
    print(table(rows, LIST_KEYS), flush=True)
    failed = [r for r in rows if r["state"] != "COMPLETED"]
    if failed and (not may_fail or len(failed) == len(rows)):
        raise CsoError(
            f"study: {len(failed)} of {len(rows)} {title} runs failed, first {failed[0]['run']}: "
            f"{failed[0].get('error', '')} (log {failed[0].get('log', '')}); fix it and rerun (finished runs are kept)"
        )
    if new:  # the wall time of every part of the study, across reruns
        dt = time.time() - t0
        print(f"   ({dt:.0f} s)", flush=True)
        _timed(Path(cfg.run.out_dir), title, new, dt)
    for r, row in zip(runs, rows):
        row["dir"] = str(r.cfg.run.out_dir)
        row["result"] = r.done or {}
    return rows


def _select(rows: list[dict], grids: dict, arms: dict[str, str]) -> dict:
    """Per arm ({name: loss}): its sweep points with their valid scores (or the error of a failed one), and the
    chosen one: the highest valid Q, ties to the lower B (without a valid subset, its one point)."""
    out = {}
    for arm, loss in arms.items():
        points = [r for r in rows if r["loss_name"] == arm]
        scored = [r for r in points if "error" not in r]
        if not scored:
            raise CsoError(f"study: every sweep point of {arm} failed (first: {points[0].get('error', '')})")
        best = max(scored, key=lambda r: (r.get("valid/Q", 0), -r.get("valid/B", 0)))
        valid = lambda r: {k: r[f"valid/{k}"] for k in KEYS} if "valid/Q" in r else {}  # noqa: E731
        pts = [{"point": r["point"], **valid(r), **{k: r[k] for k in ("error", "train") if k in r}} for r in points]
        sel = {"chosen": best["point"], "dir": best["dir"], "overrides": best["overrides"], "valid": valid(best)}
        out[arm] = sel | {"points": pts, "grid": grids.get(loss, {})}
    return out


def run_study(cfg: Config, until: str = "report", command: str = "study", result: str = "study") -> dict:
    """The study; `command` names it in its output, `result` its files (<out>/<result>.md, .json)."""
    if until not in PHASES:
        raise CsoError(f"study: --until must be one of {', '.join(PHASES)}")
    t_start, _ = time.time(), check_owned(cfg)
    st, out = cfg.study, Path(cfg.run.out_dir).resolve()
    s0, later, grids = st.seeds[0], st.seeds[1:], st.grids()
    flat = not later and not grids  # the demo: <out>/sft, <out>/<loss>
    what = f"seeds {st.seeds}; losses {', '.join(st.losses)}; negatives from {', '.join(st.sources)}"
    print(f"== cso-dist {command} -> {out} ({st.cluster}; {what})", flush=True)
    files = _write_subsets(cfg, out)
    counts = {k: sum(len(d.turn_indices()) for d in read_dialogues(v)) for k, v in files.items()}
    used = {k: [d.id for d in read_dialogues(files[k])] for k in ("test", "generate") if k in files}
    ledger = Path(st.test_ledger) if st.test_ledger else None
    if ledger is not None:  # before anything runs: test dialogues another study scored are refused
        check_unused(ledger, str(out), used, st.reuse_test)
    print("   subsets: " + ", ".join(f"{k} {v} turns" for k, v in counts.items()), flush=True)
    more = st.sources != [cfg.data.negatives_from]  # train files of other sources (they need the base model)
    if until == "data" and not more:
        return {"files": {k: str(v) for k, v in files.items()}}
    base_cfg, base_model = _base(cfg, out, files)
    arms = {arm[0]: arm for arm in st.arms()}
    sources = _write_sources(base_cfg, out, base_model) if more else {}
    if until == "data":
        return {"files": {k: str(v) for k, v in files.items()}, "sources": sources}
    sub = out / "submitit"
    lik = lambda name: (name, str(files[name]), "likelihood")  # noqa: E731
    # the generation subset is scored in likelihood mode too: the likelihood rules checked against generation
    gen = [("generate", str(files["generate"]), "generate"), lik("generate")] if "generate" in files else []
    test_tasks = [lik("test"), *gen]

    # 2. SFT per seed
    # CSO starts from the SFT model (merged; or the base model, study.start_from) with a fresh adapter; that model
    # is its reference
    sft_over = {"model__path": base_model, "train__method": BASELINE, "train__lr": st.sft_lr, "train__final": "merged"}
    sft_cfg = _with(base_cfg, **sft_over, train__epochs=st.sft_epochs, train__nll_weight=0.0)
    sft_items = _seed_runs(sft_cfg, out / BASELINE, st.seeds, BASELINE, flat)
    sft_rows = _run_phase(cfg, BASELINE, sft_items, TrainJob(), sub / BASELINE)
    sft_dirs = {s: Path(c.run.out_dir) for s, (_, c, _) in zip(st.seeds, sft_items)}
    if until == BASELINE:
        return {BASELINE: sft_rows}

    # 3. the sweep on the first seed
    sweep_items, meta = [], []
    starts = lambda s: {BASELINE: sft_dirs[s] / "final", "base": base_model}  # noqa: E731  (seed -> start models)
    for arm, loss, _, _ in arms.values():
        grid = grids.get(loss) or {"run.seed": [s0]}
        where = {"run.out_dir": str(out / ("" if flat else "sweep") / arm)}
        phase = _cso(base_cfg, out, s0, starts(s0), arms[arm], where)
        for name, over in sweep_runs(phase, grid):
            c = run_config(phase, {**over, **where} if flat else over)
            sweep_items.append((arm if flat else f"sweep/{arm}/{name}", c, ()))
            meta.append({"loss_name": arm, "point": name, "overrides": {k: over[k] for k in grid if k != "run.seed"}})
    sweep_rows = _run_phase(cfg, f"sweep (seed {s0})", sweep_items, TrainJob(), sub / "sweep", may_fail=True)
    for m, r in zip(meta, sweep_rows):
        m.update(dir=r["dir"], train={k: r["result"][k] for k in TRAIN if k in r["result"]})
        if r["state"] != "COMPLETED":
            m["error"] = r.get("error", "failed")
    if until == "sweep":
        return {BASELINE: sft_rows, "sweep": sweep_rows}

    # 4. valid scores of the sweep points (and of the first seed's SFT, for reference)
    done = [(r, m) for r, m in zip(sweep_rows, meta) if "error" not in m] if "valid" in files else []
    valid_items = [_eval_item(base_cfg, r["run"], Path(r["dir"]), [lik("valid")]) for r, _ in done]
    valid_items += [_eval_item(base_cfg, f"sft/seed={s0}", sft_dirs[s0], [lik("valid")])] if done else []
    valid_rows = _run_phase(cfg, "valid scores", valid_items, EvalJob(), sub / "valid")
    for (_, m), v in zip(done, valid_rows):
        m.update({f"valid/{k}": v["result"][f"valid/{k}"] for k in KEYS})
    sft_valid = {k: valid_rows[-1]["result"][f"valid/{k}"] for k in KEYS} if valid_rows else None
    if until == "valid":
        return {"sweep": meta}

    # 5. selection on valid Q
    selection = _select(meta, grids, {arm: loss for arm, loss, _, _ in arms.values()})
    atomic_write_text(out / "selection.json", json.dumps({"sft_valid": sft_valid, **selection}, indent=2))
    for loss, sel in selection.items():
        if sel["valid"]:
            print(f"   selected {loss}: {sel['chosen']} (valid Q {sel['valid']['Q']:.3f}, B {sel['valid']['B']:.3f})")
    if until == "select":
        return {"selection": selection}

    # 6. the selected points on the other seeds
    seed_items = []
    for arm, sel in selection.items():
        for s in later:
            c = _cso(base_cfg, out, s, starts(s), arms[arm], sel["overrides"])
            seed_items += _seed_runs(c, out / "seeds" / arm, [s], f"seeds/{arm}", False)
    _run_phase(cfg, "seeds", seed_items, TrainJob(), sub / "seeds")
    if until == "seeds":
        return {"selection": selection}

    # 7. test: base, SFT per seed, every selected run
    runs = {"base": [out / "base"], BASELINE: list(sft_dirs.values())}
    for loss, sel in selection.items():
        runs[loss] = [Path(sel["dir"])] + [out / "seeds" / loss / f"seed={s}" for s in later]
    record(ledger, out, str(out), command, used)  # these test dialogues are spent, whatever the scores say
    test_items = [_eval_item(base_cfg, "base", out / "base", test_tasks, base_model)]
    trained = [d for ds in list(runs.values())[1:] for d in ds]
    test_items += [_eval_item(base_cfg, str(d.relative_to(out)), d, test_tasks) for d in trained]
    _run_phase(cfg, "test scores", test_items, EvalJob(), sub / "test")
    if until == "test":
        return {"selection": selection}

    # 8. the table and the report
    return write_report(base_cfg, out, runs, selection, sft_valid, counts, (command, result, t_start))


# ---------------------------------------------------------------- 8. the report
def _run_scores(run: Path) -> dict:
    """A run's test scores (likelihood), generation scores and training summary, each None where absent."""
    out = {}
    for key, p in (("likelihood", "eval/scores-test-likelihood"), ("generate", "eval/scores-generate-generate")):
        s = read_json(run / f"{p}.json", "a scores file") if (run / f"{p}.json").is_file() else None
        out[key] = s and {**s, "parse_rate": 1.0 - s["unknown"] / max(s["n"], 1), **s.get("text", {})}
    out["train"] = read_json(run / "summary.json", "a run's summary") if (run / "summary.json").is_file() else None
    return out


def _stats(values: list[float]) -> dict:
    return dict(zip(("mean", "std"), spread(values)), values=values)


def paired(values: list[float], sft: list[float], higher_is_better: bool) -> dict:
    """Seed-by-seed differences (method - SFT): mean, std, 95% t-interval, how many seeds are better, and
    the verdict: "better" / "worse" when the interval excludes 0, else "within the seed spread"."""
    d = [a - b for a, b in zip(values, sft)]
    (m, sd), n = spread(d), len(d)
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.inf
    wins = sum((x > 0) if higher_is_better else (x < 0) for x in d)
    out = {"diffs": d, "mean": m, "std": sd, "better_seeds": wins, "seeds": n}
    return out | _verdict(m - half, m + half, higher_is_better, "the seed spread")


def _verdict(lo: float, hi: float, higher_is_better: bool, noise: str) -> dict:
    good, bad = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    return {"ci95": [lo, hi], "verdict": "better" if good else ("worse" if bad else f"within {noise}")}


def summarize(runs: dict[str, list[Path]], sset, seed: int, resamples: int = 200) -> dict:
    """Per method: mean ± std over its runs (seeds) of the test and generation scores and of where the training
    ended; each loss against SFT: paired over seeds, or with one seed a paired bootstrap over the test dialogues."""
    from cso_dist.eval.metrics import paired_bootstrap
    from cso_dist.eval.score import read_pred

    out = {}
    for method, dirs in runs.items():
        sc = [_run_scores(d) for d in dirs]
        test, gen, trained = ([s[k] for s in sc if s[k]] for k in ("likelihood", "generate", "train"))
        row = {"runs": [str(d) for d in dirs], "seeds": len(dirs), "test_turns": test[0]["n"]}
        row["test"] = {k: _stats([s[k] for s in test]) for k in KEYS}
        if trained:  # where the training ended: rewards, margins, the policy's log-probs (drift from the reference)
            row["train"] = {k: spread([t[k] for t in trained])[0] for k in TRAIN if all(k in t for t in trained)}
        if gen:
            row["generate"] = {k: _stats([s.get(k, 0.0) for s in gen]) for k in [g[0] for g in GEN] + ["distinct1"]}
            row["generate_turns"] = gen[0]["n"]
        out[method] = row
    sft = out[BASELINE]
    for method, row in [(m, r) for m, r in out.items() if m not in ("base", BASELINE)]:
        if row["seeds"] > 1:
            row["vs_sft"] = {k: paired(row["test"][k]["values"], sft["test"][k]["values"], k == "Q") for k in "QB"}
            continue
        preds = [read_pred(Path(r["runs"][0]) / "eval" / "pred-test-likelihood.jsonl", sset) for r in (sft, row)]
        boot = paired_bootstrap(*preds, sset, n=resamples, seed=seed)
        vs = {k: {"mean": boot[k]["diff"], **_verdict(*boot[k]["ci95"], k == "Q", "the noise")} for k in "QB"}
        row["vs_sft"] = vs | {"resamples": boot["resamples"], "dialogues": boot["dialogues"]}
    return out


def _vs_sft(summary: dict, multi: bool) -> list[str]:
    """Each loss against SFT: over seeds, a table; with one seed, the verdict on this run and its noise."""
    lines = []
    for m, r in [(m, r) for m, r in summary.items() if "vs_sft" in r]:
        v, a, b = r["vs_sft"], r["test"], summary[BASELINE]["test"]
        ci = [(k, (v[k]["mean"], *v[k]["ci95"])) for k in "QB"]
        if multi:
            cells = [
                f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {v[k]['better_seeds']}/{v[k]['seeds']}" for k, (d, lo, hi) in ci
            ]
            lines.append(f"| {m} | {cells[0]} | {v['Q']['verdict']} | {cells[1]} | {v['B']['verdict']} |")
            continue
        beats = a["Q"]["mean"] > b["Q"]["mean"] and a["B"]["mean"] < b["B"]["mean"]
        noise = [f"{k} {d:+.3f} (95% interval {lo:+.3f} to {hi:+.3f}: " for k, (d, lo, hi) in ci]
        noise = [n + ("within" if v[k]["verdict"].startswith("within") else "beyond") for n, k in zip(noise, "QB")]
        lines += [
            f"{m.upper()} {'beats' if beats else 'does not beat'} SFT on both Q ({a['Q']['mean']:.3f} vs "
            f"{b['Q']['mean']:.3f}) and B ({a['B']['mean']:.3f} vs {b['B']['mean']:.3f}) on this run",
            f"{m.upper()} - SFT over {v['resamples']} resamples of the {v['dialogues']} test dialogues: "
            + ", ".join(f"{n} the noise)" for n in noise),
        ]
    head = [
        "Each loss against SFT, seed by seed (seed s of a loss starts from SFT seed s): the mean paired "
        "difference with its 95% t-interval over seeds, and how many seeds are better.",
        "",
        "| loss | Q - SFT | seeds better | verdict | B - SFT | seeds better | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    return head + lines if multi else lines


def markdown(summary: dict, selection: dict, sft_valid: dict | None, notes: list[str]) -> str:
    """The methods' table (mean ± std over seeds; with one seed per method, the plain scores), each loss against
    SFT, and the selection on valid."""
    multi = any(r["seeds"] > 1 for r in summary.values())
    gen = GEN if multi else GEN[:-1]
    head = (["method", "seeds"] if multi else ["model"]) + ["Q (macro-F1)", "W (weighted-F1)"]
    head += ["B (bias, lower is better)", "accuracy"] + [g[1] for g in gen]
    cell = lambda x, n: f"{x['mean']:.{n}f}" + (f" ± {x['std']:.{n}f}" if multi else "")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in summary.items():
        g = r.get("generate")
        cells = [cell(r["test"][k], 3) for k in KEYS] + [cell(g[k], n) if g else "–" for k, _, n in gen]
        lines.append(f"| {method} | " + (f"{r['seeds']} | " if multi else "") + " | ".join(cells) + " |")
    lines += [""] + _vs_sft(summary, multi)
    if sft_valid:
        lines += [
            "",
            f"Selection on the valid subset (first seed; SFT there: Q {sft_valid['Q']:.3f}, B {sft_valid['B']:.3f}):",
            "",
            "| loss | grid | selected | valid Q | valid B | every point (valid Q / B) |",
            "|---|---|---|---|---|---|",
        ]
    for loss, sel in selection.items() if sft_valid else ():
        grid = "; ".join(f"{k.split('.')[-1]} {', '.join(v)}" for k, v in sel["grid"].items()) or "(config's values)"
        pts = [f"{p['point']}: " + (f"{p['Q']:.3f} / {p['B']:.3f}" if "Q" in p else "failed") for p in sel["points"]]
        valid = f"{sel['valid']['Q']:.3f} | {sel['valid']['B']:.3f}"
        lines.append(f"| {loss} | {grid} | {sel['chosen']} | {valid} | {', '.join(pts)} |")
    return "\n".join(lines + [""] + notes) + "\n"


def write_report(cfg: Config, out: Path, runs: dict, selection: dict, sft_valid, counts: dict, names: tuple) -> dict:
    """<out>/<result>.md and .json, the evaluation report with the methods as groups, and the table printed."""
    from cso_dist.eval.compare import prior_check
    from cso_dist.eval.report import run_report
    from cso_dist.inputs import resolve_sset

    (command, result, t_start), st, phases = names, cfg.study, {}
    summary = summarize(runs, resolve_sset(cfg), st.seeds[0], st.resamples)
    report = run_report([], out / "report", resolve_sset(cfg), groups=runs)
    timing = out / "timing.jsonl"
    for _, t in read_jsonl(timing, "the study's timing log", TIMING, torn_tail=True) if timing.exists() else []:
        phases[t["phase"].split(" (")[0]] = phases.get(t["phase"].split(" (")[0], 0.0) + t["seconds"]
    seconds = time.time() - t_start
    notes = [
        f"ESConv test subset: {counts['test']} supporter turns (likelihood mode: Q, W, B, accuracy); greedy "
        f"generation on {counts.get('generate', 0)} other test turns. Train subset: {st.train_dialogues or 'all'} "
        f"dialogues ({counts['train']} supporter turns)"
        + (f"; selection on {counts['valid']} valid turns." if "valid" in counts else "."),
        f"Compute: {sum(phases.values()):.0f} s of jobs in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
        + f"), on {machine()}; this part of the study {seconds:.0f} s.",
    ]
    per_run = {str(d.relative_to(out)): _run_scores(d) for ds in runs.values() for d in ds}
    res = {"summary": summary, "selection": selection, "sft_valid": sft_valid, "subsets": counts, "phases": phases}
    res["scores"] = {k: {m: s[m] for m in choices(EvalConfig, "mode")} for k, s in per_run.items()}
    res |= {"stages": {k: s["train"] for k, s in per_run.items() if s["train"]}, "precision": cfg.model.precision}
    prior, prior_lines = prior_check(runs, resolve_sset(cfg), st.resamples, st.seeds[0])  # eval.calibrate prior
    res["prior"] = prior
    atomic_write_text(out / f"{result}.json", json.dumps(res, indent=2))
    text = markdown(summary, selection, sft_valid, prior_lines + notes)
    atomic_write_text(out / f"{result}.md", text)
    print(f"{text}\nreport: {report}\n{command} finished in {seconds:.0f} s; summary: {out / result}.json", flush=True)
    return res
