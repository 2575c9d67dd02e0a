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
import time
from pathlib import Path
from dataclasses import dataclass, field

from cso_dist.losses import BASELINE
from cso_dist.study import PHASES
from cso_dist.config import Config, TrainingConfig
from cso_dist.config.study import check_study_owned
from cso_dist.data.dialogue import read_dialogues
from cso_dist.util.errors import CsoError
from cso_dist.eval.ledger import check_unused, record
from cso_dist.util.io import atomic_write_text
from cso_dist.study.data import base_config, source_file, with_over, write_sources, write_subsets, timed
from cso_dist.eval.compare import KEYS, TRAIN
from cso_dist.study.report import write_report
from cso_dist.launch.jobs import EvalJob, TrainJob, run_batch, run_config, sweep_runs

LIST_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "valid/Q", "valid/B", "test/Q", "test/B", "generate/Q")
LIST_KEYS += ("generate/parse_rate",)


# ---------------------------------------------------------------- configs of the runs


def _seed_runs(cfg: Config, out_dir: Path, seeds: list[int], name: str, flat: bool) -> list[tuple[str, Config, tuple]]:
    """One run per seed under out_dir (cso_dist.launch.sweep_runs), or out_dir itself (flat: one seed)."""
    phase = with_over(cfg, run__out_dir=out_dir)
    runs = [(f"{name}/{n}", run_config(phase, over), ()) for n, over in sweep_runs(phase, {"run.seed": seeds})]
    return [(name, with_over(c, run__out_dir=out_dir), ()) for _, c, _ in runs] if flat else runs


def _eval_item(cfg: Config, name: str, run_dir: Path, tasks: list, model: Path | None = None) -> tuple:
    """An evaluation of `model` (the run's final one) into run_dir/eval (cso_dist.launch.EvalJob)."""
    c = with_over(cfg, model__path=model or run_dir / "final", model__finetune="full", run__out_dir=run_dir)
    return (name, c, (tasks,))


def _cso(cfg: Config, out: Path, seed: int, starts: dict[str, Path], arm: tuple, over: dict) -> Config:
    """A CSO run of an arm (name, loss, source, start) from its start model (`starts`: the seed's SFT model, the
    base model), which is its reference too, on the source's train file, with one reference cache per start model,
    seed, source and reply kinds (a method that scores mismatched completions adds them): DPO and IPO runs of a
    seed, start and source share theirs."""
    from cso_dist.refcache.key import reply_kinds

    _, loss, source, start = arm
    train = out / "data" / source_file(cfg, source)
    over_ = {"model__path": starts[start], "train__method": loss, "run__seed": seed, "train__train_file": train}
    c = run_config(with_over(cfg, **over_), over)
    kinds = "".join(f"-{k}" for k in reply_kinds(c) if k not in ("c", "r"))
    src = "" if source == "retrieval" else f"@{source}"
    return with_over(c, train__ref_cache=out / "refcache" / f"{start}-seed={seed}{kinds}{src}")


# ---------------------------------------------------------------- running a phase
def _run_phase(cfg: Config, title: str, items: list, job, folder: Path, may_fail: bool = False) -> list[dict]:
    """The phase's items as one batch of jobs (cso_dist.launch.jobs.run_batch; study.cluster inline: HERE), its
    wall time -> timing.jsonl. A run's config is its training sections alone: the study's own settings do not
    change what a finished run means."""
    if not items:
        return []
    t0, fields = time.time(), [f.name for f in dataclasses.fields(TrainingConfig)]
    items = [(name, TrainingConfig(**{f: getattr(c, f) for f in fields}), x) for name, c, x in items]
    rows = run_batch(cfg, title, items, job, cfg.study.cluster, folder, may_fail, LIST_KEYS)
    if new := sum(r["job"] != "earlier" for r in rows):  # the wall time of every part of the study, across reruns
        timed(Path(cfg.run.out_dir), title, new, time.time() - t0)
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


@dataclass
class _Study:
    """What the phases share: the config, the output folder, the subsets' files, the config every run starts from,
    the base model, the arms, where each SFT seed ended."""

    cfg: Config
    out: Path
    files: dict
    base_cfg: Config
    base_model: Path
    flat: bool
    sft_dirs: dict = field(default_factory=dict)

    def starts(self, seed: int) -> dict[str, Path]:  # where an arm of `seed` starts: its SFT model, or the base
        return {BASELINE: self.sft_dirs[seed] / "final", "base": self.base_model}

    def lik(self, name: str) -> tuple:
        return (name, str(self.files[name]), "likelihood")


def _data(cfg: Config, out: Path, until: str, command: str) -> tuple[_Study | None, dict]:
    """1. The subsets (the ledger checked before anything runs), the base model, each source's train file."""
    st = cfg.study
    what = f"seeds {st.seeds}; losses {', '.join(st.losses)}; negatives from {', '.join(st.sources)}"
    print(f"== cso-dist {command} -> {out} ({st.cluster}; {what})", flush=True)
    files = write_subsets(cfg, out)
    counts = {k: sum(len(d.turn_indices()) for d in read_dialogues(v)) for k, v in files.items()}
    used = {k: [d.id for d in read_dialogues(files[k])] for k in ("test", "generate") if k in files}
    if st.test_ledger:  # test dialogues another study scored are refused
        check_unused(Path(st.test_ledger), cfg.run.out_dir, used, st.reuse_test)  # by: the folder as configured
    print("   subsets: " + ", ".join(f"{k} {v} turns" for k, v in counts.items()), flush=True)
    more = st.sources != [cfg.data.negatives_from]  # train files of other sources (they need the base model)
    info = {"files": {k: str(v) for k, v in files.items()}, "counts": counts, "used": used}
    if until == "data" and not more:
        return None, info
    base_cfg, model = base_config(cfg, out, files)
    info["sources"] = write_sources(base_cfg, out, model) if more else {}
    flat = len(st.seeds) == 1 and not st.grids()  # the demo: <out>/sft, <out>/<loss>
    return (None if until == "data" else _Study(cfg, out, files, base_cfg, model, flat)), info


def _sft(s: _Study) -> list[dict]:
    """2. SFT per seed. CSO starts from the SFT model (merged; or the base model, study.start_from) with a fresh
    adapter; that model is its reference."""
    st = s.cfg.study
    over = {"model__path": s.base_model, "train__method": BASELINE, "train__lr": st.sft_lr, "train__final": "merged"}
    sft_cfg = with_over(s.base_cfg, **over, train__epochs=st.sft_epochs, train__nll_weight=0.0)
    items = _seed_runs(sft_cfg, s.out / BASELINE, st.seeds, BASELINE, s.flat)
    s.sft_dirs = {seed: Path(c.run.out_dir) for seed, (_, c, _) in zip(st.seeds, items)}
    return _run_phase(s.cfg, BASELINE, items, TrainJob(), s.out / "submitit" / BASELINE)


def _sweep(s: _Study) -> tuple[list[dict], list[dict]]:
    """3. Each arm's grid on the first seed (a point that fails is a result: reported, not selected)."""
    st, items, meta = s.cfg.study, [], []
    s0, grids, arms = st.seeds[0], st.grids(), {arm[0]: arm for arm in st.arms()}
    for arm, loss, _, _ in arms.values():
        grid = grids.get(loss) or {"run.seed": [s0]}
        where = {"run.out_dir": str(s.out / ("" if s.flat else "sweep") / arm)}
        phase = _cso(s.base_cfg, s.out, s0, s.starts(s0), arms[arm], where)
        for name, over in sweep_runs(phase, grid):
            c = run_config(phase, {**over, **where} if s.flat else over)
            items.append((arm if s.flat else f"sweep/{arm}/{name}", c, ()))
            meta.append({"loss_name": arm, "point": name, "overrides": {k: over[k] for k in grid if k != "run.seed"}})
    rows = _run_phase(s.cfg, f"sweep (seed {s0})", items, TrainJob(), s.out / "submitit" / "sweep", may_fail=True)
    for m, r in zip(meta, rows):
        m.update(dir=r["dir"], train={k: r["result"][k] for k in TRAIN if k in r["result"]})
        if r["state"] != "COMPLETED":
            m["error"] = r.get("error", "failed")
    return rows, meta


def _valid(s: _Study, sweep_rows: list[dict], meta: list[dict]) -> dict | None:
    """4. The valid scores of the sweep points, and of the first seed's SFT for reference; SFT's are returned."""
    s0 = s.cfg.study.seeds[0]
    done = [(r, m) for r, m in zip(sweep_rows, meta) if "error" not in m] if "valid" in s.files else []
    items = [_eval_item(s.base_cfg, r["run"], Path(r["dir"]), [s.lik("valid")]) for r, _ in done]
    items += [_eval_item(s.base_cfg, f"sft/seed={s0}", s.sft_dirs[s0], [s.lik("valid")])] if done else []
    rows = _run_phase(s.cfg, "valid scores", items, EvalJob(), s.out / "submitit" / "valid")
    for (_, m), v in zip(done, rows):
        m.update({f"valid/{k}": v["result"][f"valid/{k}"] for k in KEYS})
    return {k: rows[-1]["result"][f"valid/{k}"] for k in KEYS} if rows else None


def _selected(s: _Study, meta: list[dict], sft_valid: dict | None) -> dict:
    """5. Per arm the point with the highest valid Q (ties: lower valid B) -> <out>/selection.json."""
    arms = {arm: loss for arm, loss, _, _ in s.cfg.study.arms()}
    selection = _select(meta, s.cfg.study.grids(), arms)
    atomic_write_text(s.out / "selection.json", json.dumps({"sft_valid": sft_valid, **selection}, indent=2))
    for loss, sel in selection.items():
        if sel["valid"]:
            print(f"   selected {loss}: {sel['chosen']} (valid Q {sel['valid']['Q']:.3f}, B {sel['valid']['B']:.3f})")
    return selection


def _seeds(s: _Study, selection: dict) -> None:
    """6. The selected points on the other seeds, each from its own seed's start model."""
    items, arms = [], {arm[0]: arm for arm in s.cfg.study.arms()}
    for arm, sel in selection.items():
        for seed in s.cfg.study.seeds[1:]:
            c = _cso(s.base_cfg, s.out, seed, s.starts(seed), arms[arm], sel["overrides"])
            items += _seed_runs(c, s.out / "seeds" / arm, [seed], f"seeds/{arm}", False)
    _run_phase(s.cfg, "seeds", items, TrainJob(), s.out / "submitit" / "seeds")


def _test(s: _Study, selection: dict, used: dict, command: str) -> dict[str, list[Path]]:
    """7. Base, SFT per seed and every selected run on the test subset (likelihood), the generation subset (greedy
    generation, and likelihood: the rules checked against generation). The test dialogues are spent from here."""
    st, out = s.cfg.study, s.out
    runs = {"base": [out / "base"], BASELINE: list(s.sft_dirs.values())}
    for loss, sel in selection.items():
        runs[loss] = [Path(sel["dir"])] + [out / "seeds" / loss / f"seed={seed}" for seed in st.seeds[1:]]
    record(Path(st.test_ledger) if st.test_ledger else None, out, s.cfg.run.out_dir, command, used)
    gen = [("generate", str(s.files["generate"]), "generate"), s.lik("generate")] if "generate" in s.files else []
    tasks = [s.lik("test"), *gen]
    items = [_eval_item(s.base_cfg, "base", out / "base", tasks, s.base_model)]
    trained = [d for ds in list(runs.values())[1:] for d in ds]
    items += [_eval_item(s.base_cfg, str(d.relative_to(out)), d, tasks) for d in trained]
    _run_phase(s.cfg, "test scores", items, EvalJob(), out / "submitit" / "test")
    return runs


def run_study(cfg: Config, until: str = "report", command: str = "study", result: str = "study") -> dict:
    """The study; `command` names it in its output, `result` its files (<out>/<result>.md, .json). `until`: the
    last phase to run (a rerun goes on: finished runs are skipped)."""
    if until not in PHASES:
        raise CsoError(f"study: --until must be one of {', '.join(PHASES)}")
    t_start, _ = time.time(), check_study_owned(cfg)
    s, info = _data(cfg, Path(cfg.run.out_dir).resolve(), until, command)
    if s is None:
        return {k: info[k] for k in ("files", "sources") if k in info}
    sft_rows = _sft(s)
    if until == BASELINE:
        return {BASELINE: sft_rows}
    sweep_rows, meta = _sweep(s)
    if until == "sweep":
        return {BASELINE: sft_rows, "sweep": sweep_rows}
    sft_valid = _valid(s, sweep_rows, meta)
    if until == "valid":
        return {"sweep": meta}
    selection = _selected(s, meta, sft_valid)
    if until != "select":
        _seeds(s, selection)
    if until in ("select", "seeds"):
        return {"selection": selection}
    runs = _test(s, selection, info["used"], command)
    if until == "test":
        return {"selection": selection}
    return write_report(s.base_cfg, s.out, runs, selection, sft_valid, info["counts"], (command, result, t_start))
