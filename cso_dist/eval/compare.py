"""Comparing models whose scores carry two noises: the training seed and the test dialogues.

A difference between two models is only as good as the spread it would show on another seed and on other test
dialogues. `two_noise_bootstrap` resamples both: each resample draws the test dialogues with replacement (the same
draw for both models: they answered the same turns) and the seeds with replacement (paired where seed s of one
model started from seed s of the other), scores every drawn run on the drawn dialogues and averages over the drawn
seeds. The sign test over seeds is shown for what it is: with 3 seeds, "3 of 3 better" has p = 0.125.
`prior_check` is the study's check that a gain is strategy, not a prior (configs/study-prior.yaml): raw and
prior-calibrated picks, the first-token rule, and how each likelihood rule ranks the models against generation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cso_dist.eval.report import spread

from cso_dist.eval.metrics import OTHER_PICKS, strategy_metrics
from cso_dist.eval.pred import read_rows
from cso_dist.losses import BASELINE

PICKS = {"raw": "pred_strategy", **{name: key for key, name in OTHER_PICKS.items()}}  # name -> PRED key


def sign_test(better: int, n: int) -> float:
    """One-sided: the chance of at least `better` of `n` seeds better when either model is as likely to be."""
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n


def _by_dialogue(rows: list[dict], pick: str) -> dict[str, list[tuple[str, str | None]]]:
    out: dict[str, list[tuple[str, str | None]]] = {}
    for r in rows:
        out.setdefault(r["dialogue_id"], []).append((r["gold_strategy"], r.get(pick)))
    return out


def _score(run: dict, dialogues: list[str], sset, keys) -> dict:
    pairs = [p for d in dialogues for p in run[d]]
    m = strategy_metrics([g for g, _ in pairs], [p for _, p in pairs], sset)
    return {k: m[k] for k in keys}


def two_noise_bootstrap(
    a: list[list[dict]], b: list[list[dict]], sset, pick: str = "pred_strategy", keys=("Q", "B"), n=500, seed=0
) -> dict:
    """b - a over seeds and test dialogues. `a`, `b`: each model's PRED rows, one list per seed run, on the same
    turns. Per key: the difference of the seed means on every dialogue, its 95% interval over `n` resamples,
    the share of resamples where b is better (higher Q/W/accuracy, lower B), and how many seeds are better with
    the sign test's p (paired seeds; against a one-run model, each of b's seeds against it)."""
    ra, rb = [_by_dialogue(r, pick) for r in a], [_by_dialogue(r, pick) for r in b]
    dialogues = sorted(set.intersection(*(set(r) for r in ra + rb)))
    if not dialogues:
        raise ValueError("two-noise bootstrap: the runs share no test dialogue")
    whole_a = [_score(r, dialogues, sset, keys) for r in ra]
    whole_b = [_score(r, dialogues, sset, keys) for r in rb]
    paired = len(ra) == len(rb)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n):
        ds = [dialogues[i] for i in rng.integers(0, len(dialogues), len(dialogues))]
        sb = rng.integers(0, len(rb), len(rb))
        sa = sb if paired else rng.integers(0, len(ra), len(ra))
        sa_scores = [_score(ra[s], ds, sset, keys) for s in sa]
        sb_scores = [_score(rb[s], ds, sset, keys) for s in sb]
        for k in keys:
            diffs[k].append(np.mean([x[k] for x in sb_scores]) - np.mean([x[k] for x in sa_scores]))
    out = {"dialogues": len(dialogues), "seeds": [len(ra), len(rb)], "resamples": n, "paired_seeds": paired}
    for k in keys:
        d, up = np.array(diffs[k]), k != "B"
        per_seed = [
            y[k] - (whole_a[i] if paired else whole_a[0])[k] for i, y in enumerate(whole_b)
        ]  # b's seed against its own start (paired) or the one-run model
        better = sum((x > 0) if up else (x < 0) for x in per_seed)
        lo, hi = float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))
        out[k] = {
            "diff": float(np.mean([x[k] for x in whole_b]) - np.mean([x[k] for x in whole_a])),
            "ci95": [lo, hi],
            "p_better": float(((d > 0) if up else (d < 0)).mean()),
            "seeds_better": better,
            "sign_test_p": sign_test(better, len(per_seed)),
            "verdict": verdict(lo, hi, up)["verdict"],
        }
    return out


def verdict(lo: float, hi: float, higher_is_better: bool, noise: str = "the noise") -> dict:
    """The 95% interval of a difference and what it says: "better" / "worse" where it excludes 0, else "within" the
    noise it covers."""
    good, bad = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    return {"ci95": [lo, hi], "verdict": "better" if good else ("worse" if bad else f"within {noise}")}


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(values: list[float], sft: list[float], higher_is_better: bool) -> dict:
    """Seed-by-seed differences (method - SFT): mean, std, 95% t-interval, how many seeds are better, and
    the verdict: "better" / "worse" when the interval excludes 0, else "within the seed spread"."""
    d = [a - b for a, b in zip(values, sft)]
    (m, sd), n = spread(d), len(d)
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.inf
    wins = sum((x > 0) if higher_is_better else (x < 0) for x in d)
    out = {"diffs": d, "mean": m, "std": sd, "better_seeds": wins, "seeds": n}
    return out | verdict(m - half, m + half, higher_is_better, "the seed spread")


def rank_agreement(x: list[float], y: list[float]) -> dict:
    """Spearman's rank correlation of two scores over the same models."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return {"rho": float("nan"), "n": len(x)}
    rho = spearmanr(x, y).statistic
    return {"rho": float(rho), "n": len(x)}


def prior_check(runs: dict[str, list[Path]], sset, n: int = 200, seed: int = 0) -> tuple[dict, list[str]]:
    """For the models {name: run folders (one per seed)}: their test scores by each pick (raw, prior-calibrated,
    first-token) with predicted-class counts, each model against SFT and against base over both noises, and how
    each likelihood rule ranks every run against generation-mode Q on the generation subset. The result and its
    markdown lines; empty where the runs have no calibrated scores."""
    test = {m: [read_rows(d / "eval" / "pred-test-likelihood.jsonl") for d in ds] for m, ds in runs.items()}
    if not all(rows and "pred_calibrated" in rows[0] for rs in test.values() for rows in rs):
        return {}, []
    res: dict = {"models": {}, "vs": {}, "agreement": {}}
    lines = ["## Strategy or prior", "", "Test subset, mean over seeds, by each pick of the same likelihood scores:"]
    head = "| model | pick | Q | W | B | accuracy | predicted (" + ", ".join(sset.names) + ") |"
    lines += ["", head, "|---|---|---|---|---|---|---|"]
    for m, rs in test.items():
        res["models"][m] = {}
        for pick, key in PICKS.items():
            sc = [strategy_metrics([r["gold_strategy"] for r in rows], [r[key] for r in rows], sset) for rows in rs]
            mean = {k: float(np.mean([s[k] for s in sc])) for k in ("Q", "W", "B", "accuracy")}
            counts = [int(sum(s["per_strategy"][c]["predicted"] for s in sc)) for c in sset.names]
            res["models"][m][pick] = mean | {"predicted": dict(zip(sset.names, counts))}
            cells = " | ".join(f"{mean[k]:.3f}" for k in ("Q", "W", "B", "accuracy"))
            lines.append(f"| {m} | {pick} | {cells} | {' '.join(map(str, counts))} |")
    gold = [sum(r["gold_strategy"] == c for r in test["base"][0]) for c in sset.names]
    lines += [f"| gold | | | | | | {' '.join(map(str, gold))} |", ""]
    lines += [
        f"Each model against SFT and against base, over seeds and test dialogues ({n} resamples of both): the "
        "difference, its 95% interval, and seeds better with the one-sided sign test's p.",
        "",
        "| model | against | pick | Q diff [95%] | verdict | B diff [95%] | verdict | seeds better on Q (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in [m for m in test if m != "base"]:
        for ref in [r for r in (BASELINE, "base") if r != m]:
            for pick in ("raw", "calibrated"):
                v = two_noise_bootstrap(test[ref], test[m], sset, PICKS[pick], n=n, seed=seed)
                res["vs"][f"{m} vs {ref} ({pick})"] = v
                q, b = v["Q"], v["B"]
                lines.append(
                    f"| {m} | {ref} | {pick} | {q['diff']:+.3f} [{q['ci95'][0]:+.3f}, {q['ci95'][1]:+.3f}] | "
                    f"{q['verdict']} | {b['diff']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}] | {b['verdict']} | "
                    f"{q['seeds_better']}/{v['seeds'][1]} (p {q['sign_test_p']:.3f}) |"
                )
    gen = {
        str(d): (d / "eval" / "pred-generate-generate.jsonl", d / "eval" / "pred-generate-likelihood.jsonl")
        for ds in runs.values()
        for d in ds
    }
    if all(g.is_file() and lk.is_file() for g, lk in gen.values()):

        def q(rows, key):
            return strategy_metrics([r["gold_strategy"] for r in rows], [r.get(key) for r in rows], sset)["Q"]

        by = {run: (read_rows(g), read_rows(lk)) for run, (g, lk) in gen.items()}
        turns = min(len(g) for g, _ in by.values())
        generated = [q(g, "pred_strategy") for g, _ in by.values()]
        said = f"over the {len(by)} runs ({turns} generated turns each)"
        lines += ["", f"Likelihood rules against greedy generation, {said}:", ""]
        lines += ["| rule | Spearman's rho with generation-mode Q |", "|---|---|"]
        for pick, key in PICKS.items():
            a = rank_agreement([q(lk, key) for _, lk in by.values()], generated)
            res["agreement"][pick] = a
            lines.append(f"| {pick} | {a['rho']:+.3f} |")
        res["agreement"]["generated_turns"] = turns
    return res, lines + [""]
