"""Step 8 of the study: the table and the report. Per method, mean ± std over seeds of the test and generation
scores; each loss against SFT (paired over seeds, or with one seed a paired bootstrap over the test dialogues);
the strategy-or-prior check (cso_dist.eval.compare); what each phase cost -> <out>/<result>.md and .json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cso_dist.config import Config, EvalConfig, choices
from cso_dist.eval.compare import paired, verdict
from cso_dist.eval.report import spread
from cso_dist.losses import BASELINE
from cso_dist.util.machine import machine
from cso_dist.util.io import atomic_write_text, read_json, read_jsonl

KEYS = ("Q", "W", "B", "accuracy")
TRAIN = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


TRAIN += ("logps/rejected",)


GEN = (("Q", "generate: Q", 3), ("B", "generate: B", 3), ("parse_rate", "strategy parse rate", 2))


GEN += (("bleu2", "BLEU-2", 1), ("rougeL", "ROUGE-L", 1), ("distinct2", "Distinct-2", 2))


TIMING = {"phase": str, "seconds": (int, float)}  # a line of <out>/timing.jsonl (read through the one reader)


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
        vs = {k: {"mean": boot[k]["diff"], **verdict(*boot[k]["ci95"], k == "Q")} for k in "QB"}
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
