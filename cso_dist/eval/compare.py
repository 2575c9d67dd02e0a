"""Comparing models whose scores carry two noises: the training seed and the test dialogues.

A difference between two models is only as good as the spread it would show on another seed and on other test
dialogues. `two_noise_bootstrap` resamples both: each resample draws the test dialogues with replacement (the same
draw for both models: they answered the same turns) and the seeds with replacement (paired where seed s of one
model started from seed s of the other), scores every drawn run on the drawn dialogues and averages over the drawn
seeds. The sign test over seeds is shown for what it is: with 3 seeds, "3 of 3 better" has p = 0.125.
`summarize` gives the study's table (each method over its seeds, each loss against SFT) and `prior_check` the
study's check that a gain is strategy, not a prior (configs/study-prior.yaml): raw and
prior-calibrated picks, the first-token rule, and how each likelihood rule ranks the models against generation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cso_dist.eval.report import spread
from cso_dist.eval.metrics import OTHER_PICKS, confusion, label_ids, scores_of, strategy_metrics
from cso_dist.eval.pred import read_rows
from cso_dist.losses import BASELINE
from cso_dist.util.io import read_json

KEYS = ("Q", "W", "B", "accuracy")  # a run's test scores
TRAIN = (  # where its training ended: rewards, margins, the policy's log-probs (drift from the reference)
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
GEN = (  # its generation scores: (key, column, digits)
    ("Q", "generate: Q", 3),
    ("B", "generate: B", 3),
    ("parse_rate", "strategy parse rate", 2),
    ("bleu2", "BLEU-2", 1),
    ("rougeL", "ROUGE-L", 1),
    ("distinct2", "Distinct-2", 2),
)
KEYS_VS = ("Q", "B", "accuracy")  # what prior_check compares over both noises
PICKS = {"raw": "pred_strategy", **{name: key for key, name in OTHER_PICKS.items()}}  # name -> PRED key


def sign_test(better: int, n: int) -> float:
    """One-sided: the chance of at least `better` of `n` seeds better when either model is as likely to be."""
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n


def _by_dialogue(rows: list[dict], pick: str, sset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run's PRED rows as the confusion counts of each test dialogue (cso_dist.eval.metrics.confusion)."""
    turns: dict[str, list[dict]] = {}
    for r in rows:
        turns.setdefault(r["dialogue_id"], []).append(r)
    n = len(sset.names)
    out = {}
    for d, rs in turns.items():
        y_true, y_pred, _ = label_ids([r["gold_strategy"] for r in rs], [r.get(pick) for r in rs], sset)
        out[d] = confusion(y_true, y_pred, n)
    return out


def _score(run: dict, dialogues: list[str], keys) -> dict:
    """The scores of a run on `dialogues` (drawn with repeats): its counts summed over them."""
    s = scores_of(sum(run[d][0] for d in dialogues), sum(run[d][1] for d in dialogues))
    return {k: s[k] for k in keys}


def two_noise_bootstrap(
    a: list[list[dict]], b: list[list[dict]], sset, pick: str = "pred_strategy", keys=("Q", "B"), n=500, seed=0
) -> dict:
    """b - a over seeds and test dialogues. `a`, `b`: each model's PRED rows, one list per seed run, on the same
    turns. Per key: the difference of the seed means on every dialogue, its 95% interval over `n` resamples,
    the share of resamples where b is better (higher Q/W/accuracy, lower B), and how many seeds are better with
    the sign test's p (paired seeds; against a one-run model, each of b's seeds against it)."""
    ra, rb = [_by_dialogue(r, pick, sset) for r in a], [_by_dialogue(r, pick, sset) for r in b]
    dialogues = sorted(set.intersection(*(set(r) for r in ra + rb)))
    if not dialogues:
        raise ValueError("two-noise bootstrap: the runs share no test dialogue")
    whole_a = [_score(r, dialogues, keys) for r in ra]
    whole_b = [_score(r, dialogues, keys) for r in rb]
    paired = len(ra) == len(rb)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n):
        ds = [dialogues[i] for i in rng.integers(0, len(dialogues), len(dialogues))]
        sb = rng.integers(0, len(rb), len(rb))
        sa = sb if paired else rng.integers(0, len(ra), len(ra))
        sa_scores = [_score(ra[s], ds, keys) for s in sa]
        sb_scores = [_score(rb[s], ds, keys) for s in sb]
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
    gen = {
        str(d): (d / "eval" / "pred-generate-generate.jsonl", d / "eval" / "pred-generate-likelihood.jsonl")
        for ds in runs.values()
        for d in ds
    }
    has_gen = all(g.is_file() and lk.is_file() for g, lk in gen.values())
    by = {run: (read_rows(g), read_rows(lk)) for run, (g, lk) in gen.items()} if has_gen else {}
    generated = {m: [by[str(d)][0] for d in ds] for m, ds in runs.items()} if has_gen else {}
    lines += [
        f"Each model against SFT and against base, over seeds and test dialogues ({n} resamples of both): the "
        "difference, its 95% interval, and seeds better on Q with the one-sided sign test's p"
        + (" (pick `generated`: greedy generation's strategies on the generation subset)." if has_gen else "."),
        "",
        "| model | against | pick | Q diff [95%] | verdict | B diff [95%] | verdict | accuracy diff [95%] | verdict "
        "| seeds better on Q (p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in [m for m in test if m != "base"]:
        for ref in [r for r in (BASELINE, "base") if r != m]:
            for pick in ("raw", "calibrated") + (("generated",) if has_gen else ()):
                a, b = (generated[ref], generated[m]) if pick == "generated" else (test[ref], test[m])
                v = two_noise_bootstrap(a, b, sset, PICKS.get(pick, "pred_strategy"), KEYS_VS, n=n, seed=seed)
                res["vs"][f"{m} vs {ref} ({pick})"] = v
                cells = " | ".join(
                    f"{v[k]['diff']:+.3f} [{v[k]['ci95'][0]:+.3f}, {v[k]['ci95'][1]:+.3f}] | {v[k]['verdict']}"
                    for k in KEYS_VS
                )
                seeds = f"{v['Q']['seeds_better']}/{v['seeds'][1]} (p {v['Q']['sign_test_p']:.3f})"
                lines.append(f"| {m} | {ref} | {pick} | {cells} | {seeds} |")
    if has_gen:

        def q(rows, key):
            return strategy_metrics([r["gold_strategy"] for r in rows], [r.get(key) for r in rows], sset)["Q"]

        turns = min(len(g) for g, _ in by.values())
        gen_q = [q(g, "pred_strategy") for g, _ in by.values()]
        said = f"over the {len(by)} runs ({turns} generated turns each)"
        lines += ["", f"Likelihood rules against greedy generation, {said}:", ""]
        lines += ["| rule | Spearman's rho with generation-mode Q |", "|---|---|"]
        for pick, key in PICKS.items():
            a = rank_agreement([q(lk, key) for _, lk in by.values()], gen_q)
            res["agreement"][pick] = a
            lines.append(f"| {pick} | {a['rho']:+.3f} |")
        res["agreement"]["generated_turns"] = turns
    return res, lines + [""]


# ---------------------------------------------------------------- the methods over seeds, each against SFT
def run_scores(run: Path) -> dict:
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
        sc = [run_scores(d) for d in dirs]
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


def vs_baseline_lines(summary: dict, multi: bool) -> list[str]:
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
