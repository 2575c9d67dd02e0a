"""Step 8 of the study: the table and the report. Per method, mean ± std over seeds of the test and generation
scores and each loss against SFT (cso_dist.eval.compare.summarize); the strategy-or-prior check
(cso_dist.eval.compare.prior_check); what each phase cost -> <out>/<result>.md and .json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cso_dist.config import Config, EvalConfig, choices
from cso_dist.eval.compare import GEN, KEYS, run_scores, summarize, vs_baseline_lines
from cso_dist.util.machine import machine
from cso_dist.util.io import atomic_write_text, read_jsonl

TIMING = {"phase": str, "seconds": (int, float)}  # a line of <out>/timing.jsonl (read through the one reader)


# ---------------------------------------------------------------- 8. the report
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
    lines += [""] + vs_baseline_lines(summary, multi)
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
    per_run = {str(d.relative_to(out)): run_scores(d) for ds in runs.values() for d in ds}
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
