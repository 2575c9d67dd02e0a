"""Prior calibration of likelihood-mode strategy scores (eval.calibrate prior), and the first-token rule.

A model that ranks strategies by the log-probability of their "(<strategy>)" prefix also carries a prior over the
strategies (and over the prefixes' lengths). Calibration fits one offset per strategy on labelled dialogues
(a validation set): the offsets b that maximise the log-likelihood of the gold strategies under
softmax(scores + b). At that optimum the expected count of every strategy, sum over turns of softmax(scores + b),
equals its gold count, so the calibrated predictions argmax(scores + b) follow the gold frequencies. The fit is
generalised iterative scaling on the strategies' indicator features (b_k += log(gold_k / expected_k)), which
increases the likelihood at every step and converges to the unique optimum (offsets sum to 0). A strategy with no
gold turn in the calibration set gets half a count, so that every offset stays finite.

The first-token rule is greedy decoding restricted to the strategy names: from "(" on, at each token where the
names part, take the likeliest next token; the name that is left is the prediction. That is what greedy
generation decides on the first name token, without generation's other choices (a token that starts no name).
"""

from __future__ import annotations

import math

import numpy as np

GOLD_FLOOR = 0.5  # counts of a strategy the calibration set never has as gold


def fit_prior_offsets(
    scores: list[dict[str, float]], gold: list[str], names: list[str], tol: float = 1e-9, max_iter: int = 10_000
) -> dict[str, float]:
    """One offset per strategy (summing to 0) from per-turn scores {strategy: log-prob} and the gold strategies."""
    if not scores:
        raise ValueError("prior calibration needs at least one labelled turn")
    s = np.array([[row[n] for n in names] for row in scores], dtype=np.float64)
    counts = np.array([sum(g == n for g in gold) for n in names], dtype=np.float64)
    target = np.maximum(counts, GOLD_FLOOR)
    target *= len(gold) / target.sum()
    b = np.zeros(len(names))
    for _ in range(max_iter):
        z = s + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        step = np.log(target) - np.log(np.maximum(p.sum(axis=0), 1e-300))
        b += step
        b -= b.mean()
        if np.abs(step).max() < tol:
            break
    return {n: float(v) for n, v in zip(names, b)}


def calibrated(scores: dict[str, float], offsets: dict[str, float]) -> str:
    """The strategy with the highest calibrated score (ties: the first in the set's order)."""
    return max(offsets, key=lambda n: scores[n] + offsets[n])


def first_token(token_logps: dict[str, list[float]], prefixes: dict[str, list[int]]) -> str:
    """The name greedy decoding restricted to the strategy names picks: `prefixes` are the names' token ids,
    `token_logps` each name's per-token log-probs. Names that share a token so far share its log-prob."""
    left = list(prefixes)
    depth = 0
    while len(left) > 1:
        nxt: dict[int, list[str]] = {}
        for n in left:
            if depth < len(prefixes[n]):
                nxt.setdefault(prefixes[n][depth], []).append(n)
        if not nxt:
            break
        if len(nxt) > 1:  # the names part here: the likeliest next token
            left = max(nxt.values(), key=lambda group: token_logps[group[0]][depth])
        depth += 1
    return left[0]


def fit_summary(rows: list[dict], offsets: dict[str, float], names: list[str]) -> dict:
    """Gold, raw and calibrated prediction counts on the calibration rows: how far calibration moved the
    frequencies toward gold."""

    def counts(key) -> dict[str, int]:
        return {n: sum(key(r) == n for r in rows) for n in names}

    return {
        "turns": len(rows),
        "gold": counts(lambda r: r["gold_strategy"]),
        "raw": counts(lambda r: r["pred_strategy"]),
        "calibrated": counts(lambda r: calibrated(r["scores"], offsets)),
        "log_likelihood_gain": _loglik(rows, offsets, names) - _loglik(rows, dict.fromkeys(names, 0.0), names),
    }


def _loglik(rows: list[dict], offsets: dict[str, float], names: list[str]) -> float:
    total = 0.0
    for r in rows:
        z = [r["scores"][n] + offsets[n] for n in names]
        m = max(z)
        total += r["scores"][r["gold_strategy"]] + offsets[r["gold_strategy"]] - m
        total -= math.log(sum(math.exp(v - m) for v in z))
    return total
