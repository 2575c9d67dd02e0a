"""Tolerances for comparing fp32 results computed under different reduction orders (another packing,
thread count, kernel family or world size), derived from fp32's unit roundoff, not guessed.

u = 2^-24 is fp32's unit roundoff. A sum of n terms of one sign, each carrying a relative error of at
most u, is off by at most gamma_2n * |S| ~= 2n * u * |S| (the standard recursive-summation bound, with
the per-term error of the token log-prob itself folded in); a mean of n fp32 values by n * u * |mean|.
"""

from __future__ import annotations

import math

U32 = 2.0**-24


def summed_logp_tol(logp: float, n_tokens: int) -> float:
    """How far two fp32 evaluations of one reply's summed log-prob (n_tokens terms) may differ."""
    return 2 * max(n_tokens, 1) * U32 * abs(logp)


def dpo_step0_bound(beta: float, pairs: list[tuple[float, int, float, int]], terms: int = 4) -> float:
    """|loss - ln 2| bound for the mean DPO loss over `pairs` of (ref_chosen, n_chosen, ref_rejected,
    n_rejected) when the policy equals the reference but was evaluated under another reduction order.
    First order: d(-log sigma(beta*D))/dD = -beta/2 at D = 0; D sums 4 summed log-probs (policy and
    reference of both replies, magnitudes ~ the reference's); `terms=2` when the reference is shared bitwise
    and only the policy side can differ."""
    if not pairs:
        return 0.0
    per_pair = [
        beta / 2 * (terms / 2) * (summed_logp_tol(rc, nc) + summed_logp_tol(rr, nr)) for rc, nc, rr, nr in pairs
    ]
    return sum(per_pair) / len(pairs) + len(pairs) * U32 * math.log(2)


# Training curves that ran under different reduction orders (thread count, kernel family, world size)
# after several optimiser steps: no tractable worst-case bound exists (each step feeds the last one's
# rounding into the weights), so they must agree in the top half of fp32's significand, sqrt(u) = 2^-12
# relative (measured here: at most 1.6e-6 relative over 10 steps, 27 u; a wrong batch, resume step or
# optimiser state moves the loss by percents).
# Below magnitude 1 the bound is absolute: metrics near 0 (rewards at step 1) are differences of larger
# terms and keep only their absolute precision.
CURVE_RTOL = U32**0.5


def curve_tol(value: float) -> float:
    return CURVE_RTOL * max(abs(value), 1.0)


def close_curves(a: list[dict], b: list[dict], keys=None) -> float:
    """Assert two logged curves have the same steps and every numeric metric (or `keys`) within curve_tol,
    skipping wall-clock rates and the lr; returns the largest relative difference of the loss."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    worst = 0.0
    for x, y in zip(a, b):
        for k, v in x.items():
            if (keys is not None and k not in keys) or k in ("step", "epoch", "lr") or "per_s" in k:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert abs(y[k] - v) <= curve_tol(v), (x["step"], k, v, y[k])
        if "loss" in x and x["loss"]:
            worst = max(worst, abs(x["loss"] - y["loss"]) / abs(x["loss"]))
    return worst
