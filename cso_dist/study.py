"""`cso-dist study`: the CSO paper's comparison (SFT vs CSO with each loss) on a real model, as job arrays of
the project's own launcher (cso_dist.launch.submit_jobs, the machinery of `cso-dist launch submitit --sweep`).

    cso-dist study --config configs/study.yaml      # a rerun skips every finished run and evaluation

1. data    ESConv -> <out>/data: the train subset (study.train_dialogues), the valid subset (selection), the
           test subset (the first test dialogues holding study.test_turns supporter turns) and the
           generation subset (the last study.generate_dialogues test dialogues, apart from the test subset)
2. sft     one SFT run per seed on the train subset's gold replies (LoRA)       -> <out>/sft/seed=S
3. sweep   each loss's grid (study.sweep) on the first seed, from that seed's SFT -> <out>/sweep/<loss>/<point>
4. valid   every sweep point, and the first seed's SFT, scored on the valid subset (likelihood mode)
5. select  per loss the point with the highest valid Q (ties: lower valid B)  -> <out>/selection.json
6. seeds   the selected point on the other seeds, each from its own seed's SFT -> <out>/seeds/<loss>/seed=S
7. test    base, every SFT seed and every selected run: likelihood mode on the test subset, greedy
           generation on the generation subset
8. report  mean ± std over seeds, paired per-seed differences against SFT, plots -> <out>/study.md,
           <out>/study.json, <out>/report/report.md
Test scores are read only in step 7-8: nothing is selected on them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

from cso_dist.config import Config
from cso_dist.errors import CsoError
from cso_dist.io import atomic_write_text
from cso_dist.launch.jobs import EvalJob, TrainJob, run_config, sweep_runs
from cso_dist.study_report import TRAIN, write_study_report

PHASES = ("data", "sft", "sweep", "valid", "select", "seeds", "test", "report")
KEYS = ("Q", "W", "B", "accuracy")
LIST_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "valid/Q",
    "valid/B",
    "test/Q",
    "test/B",
    "generate/Q",
    "generate/parse_rate",
)


# ---------------------------------------------------------------- 1. data
def _write_subsets(cfg: Config, out: Path) -> dict[str, Path]:
    """The four subsets' files; made once, then fixed (a rerun reads them; other settings are refused)."""
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues

    st, data = cfg.study, out / "data"
    files = {name: data / f"{name}.jsonl" for name in ("train", "valid", "test", "generate")}
    spec = {
        **{
            f"study.{k}": getattr(st, k)
            for k in ("train_dialogues", "valid_dialogues", "test_turns", "generate_dialogues")
        },
        **{f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items() if k != "split"},
    }
    marker = data / "subsets.json"
    if marker.is_file():  # the runs of this folder were trained and scored on these subsets: keep them fixed
        old = json.loads(marker.read_text())
        changed = [k for k in spec if old.get(k) != spec[k]]
        if changed:
            raise CsoError(
                f"{marker}: this study's subsets were made with other settings ({', '.join(changed)}: "
                f"{old.get(changed[0])!r} then, {spec[changed[0]]!r} now); use another run.out_dir"
            )
        if all(f.is_file() for f in files.values()):
            return files
    splits = {}
    for split in ("train", "valid", "test"):
        c = copy.deepcopy(cfg.data)
        c.split = split
        splits[split] = build_dialogues(c)[0]
    test, n, turns = splits["test"], 0, 0
    while n < len(test) and turns < st.test_turns:
        turns += len(test[n].turn_indices())
        n += 1
    if turns < st.test_turns:
        raise CsoError(f"study.test_turns: the test split holds {turns} supporter turns, fewer than {st.test_turns}")
    if n + st.generate_dialogues > len(test):
        raise CsoError(
            f"study.generate_dialogues: {st.generate_dialogues} more test dialogues do not fit after the "
            f"{n} of the test subset ({len(test)} in the split)"
        )
    subsets = {
        "train": splits["train"][: st.train_dialogues],
        "valid": splits["valid"][: st.valid_dialogues],
        "test": test[:n],
        "generate": test[len(test) - st.generate_dialogues :] if st.generate_dialogues else [],
    }
    for name, dialogues in subsets.items():
        write_dialogues(files[name], dialogues)
    atomic_write_text(marker, json.dumps(spec, indent=2))
    return files


# ---------------------------------------------------------------- configs of the runs
def _with(cfg: Config, **over) -> Config:
    """cfg with overrides (model__path=... for model.path), validated like any config."""
    return run_config(cfg, {k.replace("__", "."): str(v) for k, v in over.items()})


def _phase_runs(cfg: Config, out_dir: Path, grid: dict, prefix: str) -> list[tuple[str, Config, tuple]]:
    """The grid's runs (cso_dist.launch.sweep_runs) under out_dir: (name, config, no extra arguments)."""
    phase = _with(cfg, run__out_dir=out_dir)
    return [(f"{prefix}/{name}", run_config(phase, over), ()) for name, over in sweep_runs(phase, grid)]


def _eval_item(cfg: Config, name: str, run_dir: Path, model: Path, tasks: list) -> tuple[str, Config, tuple]:
    """An evaluation of `model` into run_dir/eval (cso_dist.launch.EvalJob)."""
    return (name, _with(cfg, model__path=model, model__method="full", run__out_dir=run_dir), (tasks,))


def _ref_cache(out: Path, seed: int, loss: str) -> Path:
    """One reference cache per SFT model (seed) and reply kinds (KTO adds its KL branches): DPO and IPO runs of a
    seed share theirs."""
    return out / "refcache" / f"sft-seed={seed}{'-kl' if loss == 'kto' else ''}"


def _base(cfg: Config, out: Path, files: dict[str, Path]) -> tuple[Config, Path]:
    """The config every run starts from, and the base model."""
    from cso_dist.demo import base_model, has_amx

    st = cfg.study
    model = base_model(cfg, out, st.model)
    over = {
        "train__train_file": files["train"],
        "train__max_dialogues": 0,
        "train__eval_file": "",
        "train__final": "adapter" if cfg.model.method in ("lora", "qlora") else cfg.train.final,
    }
    if st.bf16_on_amx and has_amx() and cfg.model.precision == "fp32":
        over["model__precision"] = "bf16-mixed"
    return _with(cfg, **over), model


# ---------------------------------------------------------------- running a phase
def _run_phase(cfg: Config, title: str, items: list, job, folder: Path, may_fail: bool = False) -> list[dict]:
    """Submit the phase's items (finished ones are skipped), wait, print the table; a failed run stops the
    study unless `may_fail` (a sweep point that diverges is a result: it is reported and not selected)."""
    from cso_dist.launch.jobs import collect, submit_jobs, table

    if not items:
        return []
    t0 = time.time()
    print(f"== {title}: {len(items)} runs", flush=True)
    runs = submit_jobs(cfg, items, job, cfg.study.cluster, folder=folder, verbose=True)
    new = sum(r.job is not None for r in runs)
    print(f"   {len(runs) - new} finished before, {new} submitted", flush=True)
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
        log = Path(cfg.run.out_dir) / "timing.jsonl"
        with open(log, "a", encoding="utf-8") as f:
            f.write(
                json.dumps({"phase": title, "runs": new, "seconds": round(dt, 1), "at": time.strftime("%F %T")}) + "\n"
            )
    for r, row in zip(runs, rows):
        row["dir"] = str(r.cfg.run.out_dir)
        row["result"] = r.done or {}
    return rows


def _select(rows: list[dict], grids: dict, losses: list[str]) -> dict:
    """Per loss: its sweep points with their valid scores (or the error of a failed one), and the chosen one:
    the highest valid Q, ties to the lower B."""
    out = {}
    for loss in losses:
        points = [r for r in rows if r["loss_name"] == loss]
        scored = [r for r in points if "valid/Q" in r]
        if not scored:
            raise CsoError(f"study: every sweep point of {loss} failed (first: {points[0].get('error', '')})")
        best = max(scored, key=lambda r: (r["valid/Q"], -r["valid/B"]))
        out[loss] = {
            "chosen": best["point"],
            "overrides": best["overrides"],
            "valid": {k: best[f"valid/{k}"] for k in KEYS},
            "points": [
                {
                    "point": r["point"],
                    **({k: r[f"valid/{k}"] for k in KEYS} if "valid/Q" in r else {"error": r["error"]}),
                    "train": r.get("train", {}),
                }
                for r in points
            ],
            "grid": grids.get(loss, {}),
        }
    return out


def run_study(cfg: Config, until: str = "report") -> dict:
    if until not in PHASES:
        raise CsoError(f"study: --until must be one of {', '.join(PHASES)}")
    t_start = time.time()
    st, out = cfg.study, Path(cfg.run.out_dir).resolve()
    s0, later = st.seeds[0], st.seeds[1:]
    grids = st.grids()
    print(f"== cso-dist study -> {out} ({st.cluster}; seeds {st.seeds}; losses {', '.join(st.losses)})", flush=True)
    files = _write_subsets(cfg, out)
    counts = {k: sum(len(d.turn_indices()) for d in _read(v)) for k, v in files.items()}
    print("   subsets: " + ", ".join(f"{k} {v} turns" for k, v in counts.items()), flush=True)
    if until == "data":
        return {"files": {k: str(v) for k, v in files.items()}}
    base_cfg, base_model = _base(cfg, out, files)
    sub = out / "submitit"
    lik = lambda name: (name, str(files[name]), "likelihood")  # noqa: E731
    test_tasks = [lik("test")] + ([("generate", str(files["generate"]), "generate")] if st.generate_dialogues else [])

    # 2. SFT per seed
    sft_cfg = _with(
        base_cfg,
        model__path=base_model,
        train__method="sft",
        train__lr=st.sft_lr,
        train__epochs=st.sft_epochs,
        train__nll_weight=0.0,
        train__ref_cache="",
        train__final="merged",  # CSO starts from the SFT model with a fresh adapter; the SFT model is its reference
    )
    sft_rows = _run_phase(
        base_cfg, "sft", _phase_runs(sft_cfg, out / "sft", {"run.seed": st.seeds}, "sft"), TrainJob(), sub / "sft"
    )
    sft_final = {s: out / "sft" / f"seed={s}" / "final" for s in st.seeds}
    if until == "sft":
        return {"sft": sft_rows}

    # 3. the sweep on the first seed
    sweep_items, meta = [], []
    for loss in st.losses:
        grid = grids.get(loss) or {"run.seed": [s0]}
        phase = _with(
            base_cfg,
            model__path=sft_final[s0],
            train__method=loss,
            train__ref_cache=_ref_cache(out, s0, loss),
            run__seed=s0,
            run__out_dir=out / "sweep" / loss,
        )
        for name, over in sweep_runs(phase, grid):
            sweep_items.append((f"sweep/{loss}/{name}", run_config(phase, over), ()))
            meta.append({"loss_name": loss, "point": name, "overrides": {k: over[k] for k in grid if k != "run.seed"}})
    sweep_rows = _run_phase(base_cfg, "sweep (seed %d)" % s0, sweep_items, TrainJob(), sub / "sweep", may_fail=True)
    for m, r in zip(meta, sweep_rows):
        m["train"] = {k: r["result"][k] for k in TRAIN if k in r["result"]}
        if r["state"] != "COMPLETED":
            m["error"] = r.get("error", "failed")
    done = [r for r in sweep_rows if r["state"] == "COMPLETED"]
    if until == "sweep":
        return {"sft": sft_rows, "sweep": sweep_rows}

    # 4. valid scores of the sweep points (and of the first seed's SFT, for reference)
    valid_items = [
        _eval_item(base_cfg, r["run"], Path(r["dir"]), Path(r["dir"]) / "final", [lik("valid")]) for r in done
    ]
    valid_items.append(
        _eval_item(base_cfg, f"sft/seed={s0}", out / "sft" / f"seed={s0}", sft_final[s0], [lik("valid")])
    )
    valid_rows = _run_phase(base_cfg, "valid scores", valid_items, EvalJob(), sub / "valid")
    scored = {r["run"]: r["result"] for r in valid_rows}
    for m in meta:
        if "error" not in m:
            m.update({f"valid/{k}": scored[f"sweep/{m['loss_name']}/{m['point']}"][f"valid/{k}"] for k in KEYS})
    sft_valid = {k: valid_rows[-1]["result"][f"valid/{k}"] for k in KEYS}
    if until == "valid":
        return {"sweep": meta}

    # 5. selection on valid Q
    selection = _select(meta, grids, st.losses)
    atomic_write_text(out / "selection.json", json.dumps({"sft_valid": sft_valid, **selection}, indent=2))
    for loss, sel in selection.items():
        print(f"   selected {loss}: {sel['chosen']} (valid Q {sel['valid']['Q']:.3f}, B {sel['valid']['B']:.3f})")
    if until == "select":
        return {"selection": selection}

    # 6. the selected points on the other seeds
    seed_items = []
    for loss, sel in selection.items():
        for s in later:
            c = _with(
                base_cfg,
                model__path=sft_final[s],
                train__method=loss,
                train__ref_cache=_ref_cache(out, s, loss),
                **{k.replace(".", "__"): v for k, v in sel["overrides"].items()},
            )
            seed_items += _phase_runs(c, out / "seeds" / loss, {"run.seed": [s]}, f"seeds/{loss}")
    _run_phase(base_cfg, "seeds", seed_items, TrainJob(), sub / "seeds")
    if until == "seeds":
        return {"selection": selection}

    # 7. test: base, SFT per seed, every selected run
    runs = {"base": [out / "base"], "sft": [out / "sft" / f"seed={s}" for s in st.seeds]}
    for loss, sel in selection.items():
        runs[loss] = [out / "sweep" / loss / sel["chosen"]] + [out / "seeds" / loss / f"seed={s}" for s in later]
    test_items = [_eval_item(base_cfg, "base", out / "base", base_model, test_tasks)]
    test_items += [
        _eval_item(base_cfg, str(d.relative_to(out)), d, d / "final", test_tasks)
        for m, ds in runs.items()
        if m != "base"
        for d in ds
    ]
    _run_phase(base_cfg, "test scores", test_items, EvalJob(), sub / "test")
    if until == "test":
        return {"selection": selection}

    # 8. the table and the report
    return write_study_report(cfg, out, runs, selection, sft_valid, counts, time.time() - t_start)


def _read(path: Path) -> list:
    from cso_dist.data.dialogue import read_dialogues

    return read_dialogues(path)
