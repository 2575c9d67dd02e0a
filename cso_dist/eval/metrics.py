"""Strategy metrics of the CSO paper (after Kang et al. 2024) and text metrics.

Q  macro-F1 of predicted vs gold strategy (scikit-learn; classes present in gold or predictions)
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
from sklearn.metrics import f1_score

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


def strategy_metrics(gold: list[str], pred: list[str | None], sset: StrategySet) -> dict:
    """Q, W, B, accuracy, per-strategy F1 and preference strength, unknown count. `gold` must be names of
    the set; `pred` may be anything (None or unknown names count as unknown)."""
    names = sset.names
    index = {s: k for k, s in enumerate(names)}
    bad_gold = sorted({g for g in gold if g not in index})
    if bad_gold:
        raise ValueError(f"gold strategies not in the '{sset.name}' set: {', '.join(bad_gold[:5])}")
    has_others = OTHERS in index
    unknown = 0
    y_true, y_pred = [], []
    for g, p in zip(gold, pred):
        c = canonical_or_none(p, sset)
        if c is None:
            unknown += 1
            c = OTHERS if has_others else None
        y_true.append(index[g])
        y_pred.append(index[c] if c is not None else -1)
    n = len(names)
    present = sorted(({*y_true} | {*y_pred}) - {-1})
    q = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if y_true else 0.0
    w_f1 = float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)) if y_true else 0.0
    per_f1 = f1_score(y_true, y_pred, labels=list(range(n)), average=None, zero_division=0) if y_true else [0.0] * n
    conf = np.zeros((n, n), dtype=np.int64)  # conf[i][j]: predicted i, gold j
    for t, p in zip(y_true, y_pred):
        if p >= 0:
            conf[p, t] += 1
    strengths, stuck = bt_strengths(conf)
    gold_counts, pred_counts = Counter(y_true), Counter(y_pred)
    return {
        "Q": q,
        "W": w_f1,
        "B": float(np.std(strengths)),
        "accuracy": float(np.mean([t == p for t, p in zip(y_true, y_pred)])) if y_true else 0.0,
        "n": len(y_true),
        "unknown": unknown,
        "per_strategy": {
            s: {
                "f1": float(per_f1[k]),
                "preference": float(strengths[k]),
                "gold": gold_counts.get(k, 0),
                "predicted": pred_counts.get(k, 0),
            }
            for k, s in enumerate(names)
        },
        "bt_undetermined": [names[k] for k in stuck],
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
