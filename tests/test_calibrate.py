"""Prior calibration (eval.calibrate prior) and the first-token rule on constructed cases with known answers."""

import math

import numpy as np
import pytest

from cso_dist.eval.calibrate import calibrated, first_token, fit_prior_offsets, fit_summary

NAMES = ["A", "B", "C", "D"]


def _rows(scores, gold):
    return [{"scores": s, "gold_strategy": g, "pred_strategy": max(s, key=s.get)} for s, g in zip(scores, gold)]


def test_identical_rows_get_the_log_gold_frequencies_minus_their_bias():
    """Every turn scores the same: the optimum puts softmax(c + b) at the gold frequencies, so
    b = log(freq) - c, up to the constant that makes the offsets sum to 0."""
    c = {"A": 2.0, "B": -1.0, "C": 0.5, "D": -3.0}
    gold = ["A"] * 10 + ["B"] * 20 + ["C"] * 30 + ["D"] * 40
    b = fit_prior_offsets([c] * len(gold), gold, NAMES)
    want = np.array([math.log(gold.count(n) / len(gold)) - c[n] for n in NAMES])
    want -= want.mean()
    assert np.allclose([b[n] for n in NAMES], want, atol=1e-7), (b, want)
    assert abs(sum(b.values())) < 1e-9


def test_a_biased_but_informative_scorer_is_repaired_exactly():
    """Scores = 3 nats for the gold strategy + a per-strategy bias that makes the raw argmax always A: the
    calibrated argmax is the gold strategy on every turn, and the expected counts equal the gold counts."""
    rng = np.random.default_rng(0)
    bias = {"A": 6.0, "B": 0.0, "C": -1.0, "D": 1.0}
    gold = [NAMES[k] for k in rng.integers(0, 4, 400)]
    scores = [{n: bias[n] + (3.0 if n == g else 0.0) + rng.normal(0, 0.1) for n in NAMES} for g in gold]
    rows = _rows(scores, gold)
    assert all(r["pred_strategy"] == "A" for r in rows)
    b = fit_prior_offsets(scores, gold, NAMES)
    assert [calibrated(s, b) for s in scores] == gold
    z = np.array([[s[n] + b[n] for n in NAMES] for s in scores])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(p.sum(0), [gold.count(n) for n in NAMES], atol=1e-5)
    fit = fit_summary(rows, b, NAMES)
    assert fit["raw"]["A"] == 400 and fit["calibrated"] == fit["gold"] and fit["log_likelihood_gain"] > 0


def test_a_strategy_never_gold_gets_half_a_count_and_stays_finite():
    gold = ["A", "B", "C"] * 5
    b = fit_prior_offsets([dict.fromkeys(NAMES, 0.0)] * len(gold), gold, NAMES)
    assert all(math.isfinite(v) for v in b.values())
    assert b["D"] == pytest.approx(b["A"] + math.log(0.5 / 5), abs=1e-7)  # its half count against A's 5


def test_no_calibration_turns_is_an_error():
    with pytest.raises(ValueError, match="at least one labelled turn"):
        fit_prior_offsets([], [], NAMES)


def test_the_first_token_rule_follows_greedy_decoding_not_the_summed_score():
    """Prefixes "( A1 x )", "( A1 y )", "( C )": all share "(", then A/B share token 11. Greedy takes 11 (-0.1
    against -2.0), then the likelier of 12/13; the summed score prefers C (its later tokens are sure)."""
    prefixes = {"A": [10, 11, 12, 99], "B": [10, 11, 13, 99], "C": [10, 14, 99]}
    logps = {"A": [-0.5, -0.1, -3.0, -0.01], "B": [-0.5, -0.1, -1.0, -2.0], "C": [-0.5, -2.0, -0.01]}
    sums = {n: sum(v) for n, v in logps.items()}
    assert max(sums, key=sums.get) == "C"
    assert first_token(logps, prefixes) == "B"
    logps["C"][1] = -0.05  # now "(" C is the likeliest next token after "("
    assert first_token(logps, prefixes) == "C"


@pytest.mark.parametrize(
    "over,key",
    [
        ({"eval.calibrate": "prior"}, "eval.calibrate"),  # eval.mode generate: no scores to calibrate
        ({"eval.mode": "likelihood", "eval.calibrate_dialogues": 5}, "eval.calibrate_dialogues"),
        ({"eval.mode": "likelihood", "eval.calibrate": "prior", "eval.calibrate_dialogues": -1}, "eval.calibrate_"),
        ({"eval.mode": "likelihood", "eval.calibrate": "platt"}, "eval.calibrate"),
    ],
)
def test_calibration_settings_are_refused_where_nothing_reads_them(over, key):
    from cso_dist.config import load_config
    from cso_dist.util.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, over)
