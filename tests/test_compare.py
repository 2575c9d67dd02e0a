"""Model comparisons over both noises (seeds and test dialogues), the sign test, and the study's prior check, on
constructed PRED rows with known answers."""

import json

import numpy as np
import pytest

from cso_dist.data.strategies import load_strategy_set
from cso_dist.eval.compare import prior_check, rank_agreement, sign_test, two_noise_bootstrap

ESCONV = load_strategy_set("esconv")
NAMES = ESCONV.names


def _rows(correct: float, seed: int, dialogues: int = 12, turns: int = 8, key: str = "pred_strategy") -> list[dict]:
    """PRED rows where a share `correct` of the turns is predicted right (the rest as the next strategy)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(dialogues):
        for t in range(turns):
            gold = NAMES[(d + t) % len(NAMES)]
            pred = gold if rng.random() < correct else NAMES[(NAMES.index(gold) + 1) % len(NAMES)]
            rows.append({"id": f"d{d}:{t}", "dialogue_id": f"d{d}", "gold_strategy": gold, key: pred})
    return rows


def test_the_sign_test_is_what_three_seeds_can_say():
    assert sign_test(3, 3) == 0.125 and sign_test(2, 3) == 0.5 and sign_test(0, 3) == 1.0
    assert sign_test(10, 10) == pytest.approx(1 / 1024)


@pytest.mark.slow
def test_a_clearly_better_model_is_better_over_both_noises_and_a_copy_is_within():
    weak = [_rows(0.3, s) for s in range(3)]
    strong = [_rows(0.9, 10 + s) for s in range(3)]
    v = two_noise_bootstrap(weak, strong, ESCONV, n=40)
    assert v["paired_seeds"] and v["dialogues"] == 12 and v["seeds"] == [3, 3]
    assert v["Q"]["diff"] > 0.4 and v["Q"]["ci95"][0] > 0 and v["Q"]["verdict"] == "better"
    assert v["Q"]["seeds_better"] == 3 and v["Q"]["sign_test_p"] == 0.125 and v["Q"]["p_better"] == 1.0
    same = two_noise_bootstrap(weak, weak, ESCONV, n=50)
    assert same["Q"]["diff"] == 0 and same["Q"]["ci95"] == [0.0, 0.0] and same["Q"]["verdict"] == "within the noise"
    one = two_noise_bootstrap(weak[:1], strong, ESCONV, n=50)  # against a one-run model (base): seeds unpaired
    assert not one["paired_seeds"] and one["seeds"] == [1, 3] and one["Q"]["seeds_better"] == 3


@pytest.mark.slow
def test_the_seed_noise_widens_the_interval():
    """Three seeds that disagree (0.3, 0.6, 0.9 correct) against one steady model: the interval over seeds and
    dialogues is wider than over dialogues alone."""
    steady = [_rows(0.6, 20 + s) for s in range(3)]
    spread = [_rows(c, 30 + s) for s, c in enumerate((0.3, 0.6, 0.9))]
    both = two_noise_bootstrap(steady, spread, ESCONV, n=60)
    fixed = two_noise_bootstrap(steady[1:2], spread[1:2], ESCONV, n=60)  # one seed each: dialogues only
    width = lambda v: v["Q"]["ci95"][1] - v["Q"]["ci95"][0]  # noqa: E731
    assert width(both) > width(fixed)


def test_rank_agreement():
    assert rank_agreement([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == pytest.approx(1.0)
    assert rank_agreement([1, 2, 3, 4], [4, 3, 2, 1])["rho"] == pytest.approx(-1.0)


def test_prior_check_reports_every_pick_both_references_and_the_agreement(tmp_path):
    runs = {"base": [tmp_path / "base"], "sft": [], "dpo": []}
    for s in range(2):
        runs["sft"].append(tmp_path / f"sft{s}")
        runs["dpo"].append(tmp_path / f"dpo{s}")
    quality = {"base": 0.3, "sft": 0.4, "dpo": 0.7}
    for m, dirs in runs.items():
        for k, d in enumerate(dirs):
            (d / "eval").mkdir(parents=True)
            raw = _rows(quality[m], k)
            for r, cal, first in zip(raw, _rows(quality[m] + 0.1, 50 + k), _rows(quality[m], 70 + k)):
                r["pred_calibrated"], r["pred_first_token"] = cal["pred_strategy"], first["pred_strategy"]
            (d / "eval" / "pred-test-likelihood.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
            gen = _rows(quality[m], 90 + k, dialogues=3)
            (d / "eval" / "pred-generate-generate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
            lik = [r | {"pred_calibrated": r["pred_strategy"], "pred_first_token": r["pred_strategy"]} for r in gen]
            (d / "eval" / "pred-generate-likelihood.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lik))
    res, lines = prior_check(runs, ESCONV, n=20)  # study.resamples
    assert set(res["models"]) == {"base", "sft", "dpo"} and set(res["models"]["dpo"]) == {
        "raw",
        "calibrated",
        "first_token",
    }
    assert set(res["vs"]) == {
        f"{m} vs {r} ({p})"
        for m, r in (("sft", "base"), ("dpo", "sft"), ("dpo", "base"))
        for p in ("raw", "calibrated", "generated")
    }
    assert res["vs"]["dpo vs base (raw)"]["Q"]["verdict"] == "better"
    assert res["vs"]["dpo vs base (generated)"]["dialogues"] == 3  # the generation subset's own dialogues
    assert set(res["vs"]["dpo vs sft (calibrated)"]) >= {"Q", "B", "accuracy"}
    assert res["agreement"]["raw"]["rho"] == pytest.approx(1.0) and res["agreement"]["raw"]["n"] == 5
    text = "\n".join(lines)
    assert "## Strategy or prior" in text and "| dpo | base | calibrated |" in text and "Spearman" in text
    (tmp_path / "base" / "eval" / "pred-test-likelihood.jsonl").write_text(
        json.dumps({"id": "x:1", "dialogue_id": "x", "gold_strategy": "Question", "pred_strategy": "Question"}) + "\n"
    )
    assert prior_check(runs, ESCONV) == ({}, [])  # rows without calibrated picks: no section
