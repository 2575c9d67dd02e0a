"""Strategy metrics of the CSO paper (after Kang et al. 2024) and text metrics.

Q  macro-F1 of predicted vs gold strategy (classes present in gold or predictions), from the confusion counts
   (scores_of; equal to scikit-learn's f1_score, tests/test_eval.py)
W  weighted-F1
B  preference bias: Bradley-Terry strengths of the strategies from the confusions "predicted i
   where the gold was j" (i != j), 20 rounds of the sequential in-place update
     p_i <- sum_{j!=i} w_ij p_j/(p_i+p_j) / sum_{j!=i} w_ji/(p_i+p_j)
   each round followed by division by the geometric mean of the non-zero strengths; the final
   strengths are rescaled to sum to the number of strategies; B = their population std.
   Where the update would divide by zero (a strategy none of whose gold turns was mispredicted,
   e.g. every strategy of a perfect predictor) that strength keeps its value, and pairs of two
   zero strengths are skipped: Kang's script returns NaN in these cases; we stay finite (B = 0
   for a perfect predictor) and list those strategies in `bt_undetermined`. With real test sets
   every strategy has mispredicted gold turns and both procedures agree (tested to 1e-12).
Predictions that name no strategy of the set count as "Others" when the set has it (Kang's rule,
ESConv); otherwise they are wrong for their gold class, add no class to Q/W and stay out of B.
Their number is reported as `unknown` either way.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from cso_dist.data.strategies import StrategySet

OTHERS = "Others"
BT_ROUNDS = 20


def canonical_or_none(label: str | None, sset: StrategySet) -> str | None:
    """Tolerant of case, spacing, brackets and known aliases."""
    if not label:
        return None
    return sset.canonical(label.strip().strip("[]()").strip(), use_aliases=True)


def bt_strengths(w: np.ndarray, rounds: int = BT_ROUNDS) -> tuple[np.ndarray, list[int]]:
    """Strengths p (summing to n) from w[i][j] = #turns predicted i with gold j; and the indices whose
    update was undetermined (zero denominator) in the last round."""
    n = w.shape[0]
    p = np.ones(n, dtype=np.float64)
    stuck: list[int] = []
    for _ in range(rounds):
        stuck = []
        for i in range(n):  # sequential: p_i uses the p_j already updated this round
            pairs = [j for j in range(n) if j != i and p[i] + p[j] > 0]  # two zero strengths: no information
            num = sum(w[i, j] * p[j] / (p[i] + p[j]) for j in pairs)
            den = sum(w[j, i] / (p[i] + p[j]) for j in pairs)
            if den > 0:
                p[i] = num / den
            else:
                stuck.append(i)
        nz = p[p > 0]
        if len(nz):
            p = p / math.exp(float(np.log(nz).mean()))
    total = p.sum()
    return (p * n / total if total > 0 else np.ones(n)), stuck


def label_ids(gold: list[str], pred: list[str | None], sset: StrategySet) -> tuple[list[int], list[int], int]:
    """Gold strategies and predictions as indices of the set; a prediction naming no strategy of the set counts as
    Others where the set has it, else as -1 (wrong for its gold class); and how many predictions named none."""
    index = {s: k for k, s in enumerate(sset.names)}
    bad_gold = sorted({g for g in gold if g not in index})
    if bad_gold:
        raise ValueError(f"gold strategies not in the '{sset.name}' set: {', '.join(bad_gold[:5])}")
    y_pred, unknown = [], 0
    for p in pred:
        c = canonical_or_none(p, sset)
        unknown += c is None
        c = OTHERS if c is None and OTHERS in index else c
        y_pred.append(index[c] if c is not None else -1)
    return [index[g] for g in gold], y_pred, unknown


def confusion(y_true: list[int], y_pred: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """conf[i][j]: turns predicted i with gold j; missed[j]: turns of gold j predicted as no strategy (-1)."""
    conf, missed = np.zeros((n, n), dtype=np.int64), np.zeros(n, dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if p >= 0:
            conf[p, t] += 1
        else:
            missed[t] += 1
    return conf, missed


def scores_of(conf: np.ndarray, missed: np.ndarray) -> dict:
    """Q, W, B and accuracy from the counts (confusion), with the per-strategy F1 and strengths. F1 of a class is
    2 TP / (predicted + gold) (0 where both are 0, as scikit-learn's zero_division=0); Q and W average it over the
    classes present in gold or predictions, W weighted by gold counts."""
    tp, predicted, gold = np.diag(conf), conf.sum(axis=1), conf.sum(axis=0) + missed
    size = predicted + gold
    f1 = np.divide(2.0 * tp, size, out=np.zeros(len(tp)), where=size > 0)
    present, total = size > 0, int(gold.sum())
    strengths, stuck = bt_strengths(conf)
    return {
        "Q": float(f1[present].mean()) if total else 0.0,
        "W": float((f1 * gold)[present].sum() / gold[present].sum()) if total else 0.0,
        "B": float(np.std(strengths)),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "f1": f1,
        "strengths": strengths,
        "stuck": stuck,
    }


def strategy_metrics(gold: list[str], pred: list[str | None], sset: StrategySet) -> dict:
    """Q, W, B, accuracy, per-strategy F1 and preference strength, unknown count. `gold` must be names of
    the set; `pred` may be anything (None or unknown names count as unknown)."""
    names = sset.names
    y_true, y_pred, unknown = label_ids(gold, pred, sset)
    conf, missed = confusion(y_true, y_pred, len(names))
    s = scores_of(conf, missed)
    gold_counts, pred_counts = Counter(y_true), Counter(y_pred)
    return {
        **{k: s[k] for k in ("Q", "W", "B", "accuracy")},
        "n": len(y_true),
        "unknown": unknown,
        "per_strategy": {
            name: {
                "f1": float(s["f1"][k]),
                "preference": float(s["strengths"][k]),
                "gold": gold_counts.get(k, 0),
                "predicted": pred_counts.get(k, 0),
            }
            for k, name in enumerate(names)
        },
        "bt_undetermined": [names[k] for k in s["stuck"]],
        "confusion": conf.tolist(),  # rows predicted, columns gold, in the set's order
        "strategies": names,
    }


def _words(text: str) -> list[str]:
    return text.lower().split()


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(ws[i : i + n]) for t in texts for ws in [_words(t)] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_metrics(refs: list[str], hyps: list[str]) -> dict:
    """BLEU-1/2/4 (sacrebleu corpus BLEU, 0-100), ROUGE-L F (rouge-score, 0-100), Distinct-1/2 of the
    hypotheses, mean length in words of hypotheses and references."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if not hyps:
        return {}
    out = {}
    for k in (1, 2, 4):
        out[f"bleu{k}"] = float(BLEU(max_ngram_order=k, effective_order=True).corpus_score(hyps, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out["rougeL"] = 100.0 * float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]))
    out["distinct1"], out["distinct2"] = distinct(hyps, 1), distinct(hyps, 2)
    out["mean_len"] = float(np.mean([len(_words(h)) for h in hyps]))
    out["ref_mean_len"] = float(np.mean([len(_words(r)) for r in refs]))
    return out


# likelihood mode's other picks of the same scores (cso_dist.eval.calibrate): PRED key -> name of their metrics
OTHER_PICKS = {"pred_first_token": "first_token", "pred_calibrated": "calibrated"}


def score_rows(rows: list[dict], sset: StrategySet) -> dict:
    """Strategy metrics of PRED rows (gold_strategy, pred_strategy) plus text metrics where both responses
    are present; for likelihood rows with the first-token rule's or the calibrated pick, their strategy metrics
    too (under "first_token", "calibrated")."""
    gold = [r["gold_strategy"] for r in rows]
    out = strategy_metrics(gold, [r.get("pred_strategy") for r in rows], sset)
    for key, name in OTHER_PICKS.items():
        if rows and all(key in r for r in rows):
            out[name] = strategy_metrics(gold, [r[key] for r in rows], sset)
    pairs = [
        (r["gold_response"], r["pred_response"])
        for r in rows
        if isinstance(r.get("gold_response"), str) and isinstance(r.get("pred_response"), str)
    ]
    if pairs:  # the rows with both responses; how many is reported (text["rows"])
        out["text"] = {**text_metrics([g for g, _ in pairs], [p for _, p in pairs]), "rows": len(pairs)}
    return out


def paired_bootstrap(
    rows_a: list[dict], rows_b: list[dict], sset: StrategySet, keys=("Q", "B"), n: int = 300, seed: int = 0
) -> dict:
    """How far apart two models' scores on the same PRED turns are beyond the test set's own noise: the
    dialogues are resampled with replacement (a dialogue's turns are not independent) and both models
    scored on each resample. Per key: b - a on all rows, the 2.5/97.5 percentiles of the resampled
    differences, and the share of resamples in which b is better (higher Q/W/accuracy, lower B)."""
    by_id = {r["id"]: r for r in rows_b}
    common = [r for r in rows_a if r["id"] in by_id]
    if not common:
        raise ValueError("paired bootstrap: the two PRED files share no turn ids")
    groups: dict[str, list[int]] = {}
    for k, r in enumerate(common):
        groups.setdefault(r["dialogue_id"], []).append(k)
    names = list(groups)
    gold = [r["gold_strategy"] for r in common]
    pa = [r.get("pred_strategy") for r in common]
    pb = [by_id[r["id"]].get("pred_strategy") for r in common]

    def scores(idx):
        a = strategy_metrics([gold[i] for i in idx], [pa[i] for i in idx], sset)
        b = strategy_metrics([gold[i] for i in idx], [pb[i] for i in idx], sset)
        return {key: b[key] - a[key] for key in keys}

    rng = np.random.default_rng(seed)
    diffs = {key: [] for key in keys}
    for _ in range(n):
        idx = [i for g in rng.choice(len(names), len(names)) for i in groups[names[g]]]
        for key, v in scores(idx).items():
            diffs[key].append(v)
    whole = scores(list(range(len(common))))
    out = {"dialogues": len(names), "turns": len(common), "resamples": n}
    for key in keys:
        d = np.array(diffs[key])
        better = d < 0 if key == "B" else d > 0
        out[key] = {
            "diff": whole[key],
            "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "p_better": float(better.mean()),
        }
    return out
