"""The study's table (cso_dist.study, step 8): per method mean ± std over seeds on the test subset, each loss
against SFT seed by seed (paired differences, a 95% t-interval over seeds), the selection on valid, and the
evaluation report with its plots (cso_dist.eval.report.run_report, groups = methods)."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from cso_dist.config import Config
from cso_dist.eval.report import run_report, spread
from cso_dist.io import atomic_write_text

TEST = ("Q", "W", "B", "accuracy")
GEN = ("Q", "B", "parse_rate", "bleu2", "rougeL", "distinct1", "distinct2")
TRAIN = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# two-sided 95% Student t quantiles by degrees of freedom (scipy-free; beyond 30 the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _scores(run: Path, task: str) -> dict | None:
    p = run / "eval" / f"scores-{task}.json"
    if not p.is_file():
        return None
    s = json.loads(p.read_text())
    s["parse_rate"] = 1.0 - s["unknown"] / max(s["n"], 1)
    s.update(s.get("text", {}))
    return s


def paired(values: list[float], sft: list[float], higher_is_better: bool) -> dict:
    """Seed-by-seed differences (method - SFT): mean, std, 95% t-interval, how many seeds are better, and
    the verdict: "better" / "worse" when the interval excludes 0, else "within the seed spread"."""
    d = [a - b for a, b in zip(values, sft)]
    m, sd = spread(d)
    n = len(d)
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.inf
    lo, hi = m - half, m + half
    good = lo > 0 if higher_is_better else hi < 0
    bad = hi < 0 if higher_is_better else lo > 0
    wins = sum((x > 0) if higher_is_better else (x < 0) for x in d)
    return {
        "diffs": d,
        "mean": m,
        "std": sd,
        "ci95": [lo, hi],
        "better_seeds": wins,
        "seeds": n,
        "verdict": "better" if good else ("worse" if bad else "within the seed spread"),
    }


def summarize(runs: dict[str, list[Path]]) -> dict:
    out = {}
    for method, dirs in runs.items():
        test = [_scores(d, "test-likelihood") for d in dirs]
        gen = [s for s in (_scores(d, "generate-generate") for d in dirs) if s is not None]
        row = {"runs": [str(d) for d in dirs], "seeds": len(dirs)}
        row["test"] = {
            k: dict(zip(("mean", "std"), spread([s[k] for s in test])), values=[s[k] for s in test]) for k in TEST
        }
        row["test_turns"] = test[0]["n"]
        trained = [json.loads((d / "summary.json").read_text()) for d in dirs if (d / "summary.json").is_file()]
        if trained:  # where the training ended: rewards, margins, the policy's log-probs (drift from the reference)
            row["train"] = {k: spread([t[k] for t in trained])[0] for k in TRAIN if all(k in t for t in trained)}
        if gen:
            row["generate"] = {
                k: dict(zip(("mean", "std"), spread([s.get(k, 0.0) for s in gen])), values=[s.get(k, 0.0) for s in gen])
                for k in GEN
            }
            row["generate_turns"] = gen[0]["n"]
        out[method] = row
    for method, row in out.items():
        if method in ("base", "sft"):
            continue
        sft = out["sft"]["test"]
        row["vs_sft"] = {
            "Q": paired(row["test"]["Q"]["values"], sft["Q"]["values"], True),
            "B": paired(row["test"]["B"]["values"], sft["B"]["values"], False),
        }
    return out


def _pm(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def markdown(summary: dict, selection: dict, sft_valid: dict, notes: list[str]) -> str:
    lines = [
        "| method | seeds | Q (macro-F1) | W (weighted-F1) | B (bias, lower is better) | accuracy | generate: Q "
        "| generate: B | strategy parse rate | BLEU-2 | ROUGE-L | Distinct-2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in summary.items():
        t, g = r["test"], r.get("generate")
        gen = (
            [
                _pm(g["Q"]),
                _pm(g["B"]),
                _pm(g["parse_rate"], 2),
                _pm(g["bleu2"], 1),
                _pm(g["rougeL"], 1),
                _pm(g["distinct2"], 2),
            ]
            if g
            else ["–"] * 6
        )
        lines.append(f"| {method} | {r['seeds']} | " + " | ".join([_pm(t[k]) for k in TEST] + gen) + " |")
    lines += [
        "",
        "Each loss against SFT, seed by seed (seed s of a loss starts from SFT seed s): the mean paired "
        "difference with its 95% t-interval over seeds, and how many seeds are better.",
        "",
        "| loss | Q - SFT | seeds better | verdict | B - SFT | seeds better | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in summary.items():
        if "vs_sft" not in r:
            continue
        cells = []
        for k in ("Q", "B"):
            p = r["vs_sft"][k]
            cells += [
                f"{p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]",
                f"{p['better_seeds']}/{p['seeds']}",
                p["verdict"],
            ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Selection on the valid subset (first seed; SFT there: Q {sft_valid['Q']:.3f}, B {sft_valid['B']:.3f}):",
        "",
        "| loss | grid | selected | valid Q | valid B | every point (valid Q / B) |",
        "|---|---|---|---|---|---|",
    ]
    for loss, sel in selection.items():
        grid = "; ".join(f"{k.split('.')[-1]} {', '.join(v)}" for k, v in sel["grid"].items()) or "(config's values)"
        pts = ", ".join(
            f"{p['point']}: {p['Q']:.3f} / {p['B']:.3f}" if "Q" in p else f"{p['point']}: failed" for p in sel["points"]
        )
        lines.append(
            f"| {loss} | {grid} | {sel['chosen']} | {sel['valid']['Q']:.3f} | {sel['valid']['B']:.3f} | {pts} |"
        )
    return "\n".join(lines + [""] + notes) + "\n"


def write_study_report(
    cfg: Config, out: Path, runs: dict, selection: dict, sft_valid: dict, counts: dict, seconds: float
) -> dict:
    from cso_dist.inputs import resolve_sset

    summary = summarize(runs)
    report = run_report([], out / "report", resolve_sset(cfg), groups=runs)
    timing = (
        [json.loads(x) for x in (out / "timing.jsonl").read_text().splitlines()]
        if (out / "timing.jsonl").is_file()
        else []
    )
    phases: dict[str, float] = {}
    for t in timing:
        key = t["phase"].split(" (")[0]
        phases[key] = phases.get(key, 0.0) + t["seconds"]
    st = cfg.study
    notes = [
        f"ESConv test subset: {counts['test']} supporter turns (likelihood mode: Q, W, B, accuracy); greedy "
        f"generation on {counts['generate']} other test turns. Train subset: {st.train_dialogues} dialogues "
        f"({counts['train']} supporter turns); selection on {counts['valid']} valid turns.",
        f"Compute: {sum(phases.values()):.0f} s of jobs in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
        + f"), on {machine()}; this part of the study {seconds:.0f} s.",
    ]
    result = {"summary": summary, "selection": selection, "sft_valid": sft_valid, "subsets": counts, "phases": phases}
    atomic_write_text(out / "study.json", json.dumps(result, indent=2))
    text = markdown(summary, selection, sft_valid, notes)
    atomic_write_text(out / "study.md", text)
    print(text + f"\nreport: {report}\nstudy: {out / 'study.md'}", flush=True)
    return result


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu
