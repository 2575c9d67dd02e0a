"""Evaluation: Q/W/B on hand-computed cases and invariances, text metrics, PRED scoring CLI, generation and
likelihood prediction on tiny models with real ESConv test dialogues (resumable), and the report."""

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from cso_dist.data.strategies import load_strategy_set
from cso_dist.eval.metrics import distinct, paired_bootstrap, strategy_metrics, text_metrics
from cso_dist.models import load_model, load_tokenizer
from cso_dist.train.loop import run_train
from conftest import cfg_of, run_cli, run_overrides, tiny_run_data, write_jsonl

ESCONV = load_strategy_set("esconv")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    p = tmp_path_factory.mktemp("sets") / "ab.json"
    p.write_text(json.dumps(["A", "B", "C"]))
    return load_strategy_set(str(p))


def test_hand_computed_bradley_terry_two_strategies(two):
    # gold A predicted A; gold B predicted A twice; gold A predicted B once:
    # w[A][B] = 2, w[B][A] = 1 -> A = 2 p_B, B = p_A / 2: strengths 2:1 after the first round. C has no
    # comparisons and keeps its value, so after the geometric-mean steps A:B:C = 2:1:1 -> x 3/4
    gold, pred = ["A", "B", "B", "A"], ["A", "A", "A", "B"]
    m = strategy_metrics(gold, pred, two)
    pa, pb, pc = (m["per_strategy"][s]["preference"] for s in "ABC")
    assert pa / pb == pytest.approx(2.0, rel=1e-12)
    assert pa + pb + pc == pytest.approx(3.0)
    assert [pa, pb, pc] == pytest.approx([1.5, 0.75, 0.75], rel=1e-12)
    assert m["B"] == pytest.approx(math.sqrt(0.125), rel=1e-12)  # population std of (1.5, .75, .75)
    # F1: A: tp 1, fp 2, fn 1 -> 0.4; B: tp 0 -> 0; C absent from gold and predictions -> not in Q
    assert m["Q"] == pytest.approx(0.2) and m["W"] == pytest.approx(0.2) and m["accuracy"] == 0.25
    assert m["per_strategy"]["A"]["f1"] == pytest.approx(0.4) and m["per_strategy"]["C"]["gold"] == 0


def test_never_predicted_strategy(two):
    # B is never predicted: w[A][B] = 1 only. A's gold turns are never mispredicted (its update is
    # undetermined, it keeps its value); B's strength goes to 0.
    m = strategy_metrics(["A", "A", "B", "B"], ["A", "A", "A", "B"], two)
    assert m["per_strategy"]["A"]["f1"] == pytest.approx(0.8) and m["per_strategy"]["B"]["f1"] == pytest.approx(2 / 3)
    assert m["Q"] == pytest.approx((0.8 + 2 / 3) / 2) and m["accuracy"] == 0.75
    m = strategy_metrics(["A", "A", "B", "B"], ["A", "A", "A", "A"], two)
    assert m["per_strategy"]["B"]["predicted"] == 0 and m["per_strategy"]["B"]["f1"] == 0.0
    assert m["per_strategy"]["B"]["preference"] == 0.0 and "A" in m["bt_undetermined"]
    assert m["Q"] == pytest.approx((2 / 3 + 0) / 2)  # A: P 1/2, R 1 -> 2/3
    assert all(math.isfinite(v["preference"]) for v in m["per_strategy"].values())


def test_perfect_predictor_has_no_bias():
    gold = [s for s in ESCONV.names for _ in range(3)]
    m = strategy_metrics(gold, list(gold), ESCONV)
    assert (m["Q"], m["W"], m["accuracy"], m["B"], m["unknown"]) == (1.0, 1.0, 1.0, 0.0, 0)


def test_unknown_predictions():
    m = strategy_metrics(["Question", "Question", "Others"], ["banana", None, "others"], ESCONV)
    assert m["unknown"] == 2 and m["per_strategy"]["Others"]["predicted"] == 3  # Kang: unknown -> Others
    escpro = load_strategy_set("escpro")
    first, second = escpro.names[:2]
    m = strategy_metrics([first, second], ["(nonsense)", second], escpro)
    assert m["unknown"] == 1 and m["accuracy"] == 0.5
    assert sum(v["predicted"] for v in m["per_strategy"].values()) == 1  # no class was made up


@pytest.mark.parametrize("name", ["esconv", "escpro"])  # with Others (unknown -> Others), and without (-> wrong)
def test_q_and_w_from_the_counts_equal_scikit_learns_f1(name):
    """Q, W and per-strategy F1 come from the confusion counts (eval.metrics.scores_of, which the bootstrap sums
    per dialogue); scikit-learn's f1_score over the classes present in gold or predictions is the reference."""
    from sklearn.metrics import f1_score

    sset, rng = load_strategy_set(name), random.Random(7)
    for case in range(60):
        classes = rng.sample(sset.names, rng.randint(1, len(sset.names)))  # some strategies absent from a case
        gold = [rng.choice(classes) for _ in range(rng.randint(1, 40))]
        pred = [rng.choice([*classes, *sset.names[:2], "banana", None]) for _ in gold]
        m = strategy_metrics(gold, pred, sset)
        index = {s: k for k, s in enumerate(sset.names)}
        others = index.get("Others", -1)
        y_true = [index[g] for g in gold]
        y_pred = [index.get(p, others) if p else others for p in pred]
        present = sorted(({*y_true} | {*y_pred}) - {-1})
        for avg, key in (("macro", "Q"), ("weighted", "W")):
            want = f1_score(y_true, y_pred, labels=present, average=avg, zero_division=0)
            assert m[key] == pytest.approx(want, abs=1e-12), (case, key)
        per = f1_score(y_true, y_pred, labels=list(range(len(sset.names))), average=None, zero_division=0)
        assert [v["f1"] for v in m["per_strategy"].values()] == pytest.approx(list(per), abs=1e-12), case


def test_predictions_parse_tolerantly():
    preds = ["question", "  QUESTION ", "[Question]", "Questions", "reflection  of FEELINGS"]
    m = strategy_metrics(["Question"] * 4 + ["Reflection of feelings"], preds, ESCONV)
    assert m["unknown"] == 0 and m["accuracy"] == 1.0


def _random_case(seed=3, n=400):
    rng = random.Random(seed)
    gold = [rng.choice(ESCONV.names) for _ in range(n)]
    pred = [g if rng.random() < 0.45 else rng.choice(ESCONV.names) for g in gold]
    return gold, pred


def test_relabelling_strategies_permutes_the_strengths():
    gold, pred = _random_case()
    m = strategy_metrics(gold, pred, ESCONV)
    perm = dict(zip(ESCONV.names, ESCONV.names[3:] + ESCONV.names[:3]))
    r = strategy_metrics([perm[g] for g in gold], [perm[p] for p in pred], ESCONV)
    for s in ESCONV.names:
        assert r["per_strategy"][perm[s]]["preference"] == pytest.approx(m["per_strategy"][s]["preference"], rel=1e-9)
        assert r["per_strategy"][perm[s]]["f1"] == pytest.approx(m["per_strategy"][s]["f1"])
    for k in ("Q", "W", "B", "accuracy"):
        assert r[k] == pytest.approx(m[k], rel=1e-9)


def test_paired_bootstrap_tells_a_real_difference_from_noise():
    """Same predictions: a zero difference with a zero interval. A model right on every turn of a 40-dialogue
    set against one at 45%: Q higher and B lower beyond the noise in every resample. Two models that differ
    on 1 turn in 400: an interval around 0."""
    gold, pred = _random_case()
    rows = lambda p: [  # noqa: E731 - ten turns per dialogue
        {"id": f"d{k // 10}:{k}", "dialogue_id": f"d{k // 10}", "gold_strategy": g, "pred_strategy": x}
        for k, (g, x) in enumerate(zip(gold, p))
    ]
    same = paired_bootstrap(rows(pred), rows(pred), ESCONV, n=50)
    assert same["dialogues"] == 40 and same["turns"] == 400
    assert all(same[k]["diff"] == 0 and same[k]["ci95"] == [0.0, 0.0] and same[k]["p_better"] == 0 for k in "QB")
    best = paired_bootstrap(rows(pred), rows(list(gold)), ESCONV, n=50)
    assert best["Q"]["ci95"][0] > 0 and best["B"]["ci95"][1] < 0 and best["Q"]["p_better"] == 1.0
    one = list(pred)
    k = next(k for k in range(len(gold)) if pred[k] != gold[k])
    one[k] = gold[k]  # one more turn right
    near = paired_bootstrap(rows(pred), rows(one), ESCONV, n=50)
    assert near["Q"]["ci95"][0] <= 0 <= near["Q"]["ci95"][1] and 0 < near["Q"]["diff"] < 0.01


def test_bias_follows_the_published_update_on_a_realistic_case():
    """Independent re-derivation of the 20-round sequential update (every denominator non-zero here)."""
    gold, pred = _random_case(seed=11)
    names = ESCONV.names
    k = {s: i for i, s in enumerate(names)}
    w = np.zeros((8, 8))
    for g, p in zip(gold, pred):
        w[k[p], k[g]] += 1
    p = np.ones(8)
    for _ in range(20):
        for i in range(8):
            p[i] = sum(w[i, j] * p[j] / (p[i] + p[j]) for j in range(8) if j != i) / sum(
                w[j, i] / (p[i] + p[j]) for j in range(8) if j != i
            )
        p = p / np.prod(p) ** (1 / 8)
    p = p * 8 / p.sum()
    m = strategy_metrics(gold, pred, ESCONV)
    assert m["B"] == pytest.approx(float(np.std(p)), abs=1e-12) and not m["bt_undetermined"]


def test_text_metrics():
    refs = ["i am sorry to hear that", "how are you feeling today"]
    same = text_metrics(refs, list(refs))
    assert same["bleu1"] == pytest.approx(100.0) and same["bleu4"] == pytest.approx(100.0)
    assert same["rougeL"] == pytest.approx(100.0) and same["mean_len"] == 5.5
    other = text_metrics(refs, ["that is fine", "tell me more"])
    assert other["bleu1"] < 50 and other["rougeL"] < 50
    assert distinct(["a b a b"], 1) == 0.5 and distinct(["a b a b"], 2) == pytest.approx(2 / 3)


@pytest.mark.slow
def test_cli_score_json_and_bad_rows(tmp_path):
    rows = [
        {
            "gold_strategy": "Question",
            "pred_strategy": "Question",
            "gold_response": "how are you?",
            "pred_response": "how are you?",
        },
        {"gold_strategy": "Others", "pred_strategy": "nonsense", "gold_response": "hi", "pred_response": "hello"},
    ]
    f = write_jsonl(tmp_path / "pred.jsonl", rows)
    out = run_cli("eval", "score", f, "--strategies", "esconv", "--json", check=True)
    s = json.loads(out.stdout)
    assert {"Q", "W", "B", "accuracy", "per_strategy", "unknown"} <= s.keys() and s["unknown"] == 1
    assert s["text"]["bleu1"] > 0
    assert "Q (macro-F1)" in run_cli("eval", "score", f, check=True).stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"gold_strategy": "Question"}])
    proc = run_cli("eval", "score", bad)
    assert proc.returncode == 2 and "bad.jsonl: line 2: pred_strategy: missing" in proc.stderr
    unknown_gold = write_jsonl(tmp_path / "g.jsonl", [{"gold_strategy": "Banana", "pred_strategy": "Question"}])
    proc = run_cli("eval", "score", unknown_gold)
    assert proc.returncode == 2 and "Banana" in proc.stderr


# ---------------------------------------------------------------- generation on tiny models, real ESConv test
@pytest.fixture(scope="module")
def setup(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("eval")
    tiny_run_data(root, esconv_dir)
    return root


CALIBRATE = ("--eval.calibrate", "prior", "--eval.calibrate_dialogues", 2)  # offsets from 2 valid dialogues


def _gen(setup, name, *extra):
    proc = run_cli(
        "eval",
        "generate",
        "--split",
        "test",
        "--model.path",
        setup / "model",
        "--run.out_dir",
        setup / name,
        "--eval.max_dialogues",
        2,
        "--eval.max_new_tokens",
        6,
        "--data.max_length",
        512,
        *extra,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_generate_writes_every_turn_and_resumes(setup):
    _gen(setup, "gen")
    pred = setup / "gen" / "eval" / "pred-test-generate.jsonl"
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(rows) > 10 and len({r["id"] for r in rows}) == len(rows)
    assert {"gold_strategy", "pred_strategy", "pred_raw", "gold_response", "pred_response"} <= rows[0].keys()
    assert "0 turns" in _gen(setup, "gen").stdout  # nothing left to do
    # an interrupted run: the last rows lost, a torn line at the end
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    assert "3 turns" in _gen(setup, "gen").stdout
    again = [json.loads(x) for x in pred.read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in rows)


def _brute_force(model, tok, prompt, prefix, per_token=False):
    ids = torch.tensor([prompt + prefix])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    each = [float(logp[len(prompt) + k - 1, t]) for k, t in enumerate(prefix)]
    return each if per_token else sum(each)


@pytest.mark.slow
def test_likelihood_mode_scores_every_strategy_exactly(setup):
    from cso_dist.data.render import format_reply
    from cso_dist.eval.prompts import eval_dialogues, eval_turns
    from cso_dist.inputs import make_cfg_renderer

    from cso_dist.eval.calibrate import calibrated, first_token, fit_prior_offsets

    _gen(setup, "lik", "--mode", "likelihood", *CALIBRATE)
    _gen(setup, "lik-small", "--mode", "likelihood", "--pack.max_tokens", 520)  # forces one unit per turn
    a = {json.loads(x)["id"]: json.loads(x) for x in (setup / "lik" / "eval" / "pred-test-likelihood.jsonl").open()}
    b = {
        json.loads(x)["id"]: json.loads(x) for x in (setup / "lik-small" / "eval" / "pred-test-likelihood.jsonl").open()
    }
    assert a.keys() == b.keys()
    cfg = cfg_of({"model.path": setup / "model", "data.max_length": 512, "eval.max_dialogues": 2})
    model, tok = load_model(setup / "model"), load_tokenizer(setup / "model")
    renderer = make_cfg_renderer(cfg)
    prefixes = {}
    for s in ESCONV.names:
        full = tok.encode(format_reply(s, "x"), add_special_tokens=False)
        prefixes[s] = full[: len(tok.encode(f"({s})", add_special_tokens=False))]
    room = max(len(p) for p in prefixes.values())  # histories are cut to leave room for the longest prefix
    turns = {t.id: t for t in eval_turns(eval_dialogues(cfg, "test"), renderer, ESCONV, 512, room)}
    assert any(len(t.prompt) + room > 400 for t in turns.values())  # some histories were cut
    checked = 0
    for rid in list(a)[-6:]:
        for s in ("Question", "Others", "Reflection of feelings"):
            prefix = prefixes[s]
            want = _brute_force(model, tok, turns[rid].prompt, prefix, per_token=True)
            assert a[rid]["scores"][s] == pytest.approx(sum(want), abs=1e-4)
            assert b[rid]["scores"][s] == pytest.approx(sum(want), abs=1e-4)
            assert a[rid]["token_logps"][s] == pytest.approx(want, abs=1e-4)  # each token, the first-token rule's
            checked += 1
        assert a[rid]["pred_strategy"] == max(a[rid]["scores"], key=a[rid]["scores"].get)
    assert checked == 18
    # the first-token rule and the calibrated pick, from the scores in the row; the offsets are those that the
    # calibration dialogues' own PRED file (scored first, beside the test's) gives, and are recorded in the origin
    pred = setup / "lik" / "eval" / "pred-test-likelihood.jsonl"
    origin = json.loads(pred.with_name(pred.name + ".origin.json").read_text())["calibration"]
    side = [json.loads(x) for x in (setup / "lik" / "eval" / "pred-calibration-valid.jsonl").open()]
    assert origin["turns"] == len(side) > 10 and "valid" in origin["data"]
    fitted = fit_prior_offsets([r["scores"] for r in side], [r["gold_strategy"] for r in side], ESCONV.names)
    assert origin["offsets"] == pytest.approx(fitted, abs=1e-9)
    for r in a.values():
        assert r["pred_first_token"] == first_token(r["token_logps"], prefixes)
        assert r["pred_calibrated"] == calibrated(r["scores"], origin["offsets"])
    assert "pred_calibrated" not in b[rid] and "calibration" not in json.loads(
        (setup / "lik-small" / "eval" / "pred-test-likelihood.jsonl.origin.json").read_text()
    )
    scored = run_cli("eval", "score", pred, "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    s = json.loads(scored.stdout)
    assert {"first_token", "calibrated"} <= s.keys() and s["calibrated"]["n"] == s["n"] == len(a)


@pytest.mark.slow
def test_generate_with_lora_and_qlora_adapters(setup):
    from peft import LoraConfig, get_peft_model

    from cso_dist.models import build_tiny_model

    wide = build_tiny_model(
        "qwen2", setup / "h64", tokenizer=load_tokenizer(setup / "model"), hidden_size=64, overwrite=True
    )
    adapter = setup / "adapter"
    peft = get_peft_model(load_model(wide), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(adapter)
    load_tokenizer(wide).save_pretrained(adapter)
    for method in ("lora", "qlora"):
        proc = run_cli(
            "eval",
            "generate",
            "--split",
            "test",
            "--model.path",
            adapter,
            "--model.finetune",
            method,
            "--run.out_dir",
            setup / f"gen-{method}",
            "--eval.max_dialogues",
            1,
            "--eval.max_new_tokens",
            4,
            "--data.max_length",
            512,
            env={"OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len((setup / f"gen-{method}" / "eval" / "pred-test-generate.jsonl").read_text().splitlines()) > 3


@pytest.mark.slow
def test_report_puts_runs_side_by_side(setup, tmp_path):
    _gen(setup, "gen")  # resumable: nothing to do when the earlier tests wrote them
    _gen(setup, "lik", "--mode", "likelihood", *CALIBRATE)
    runs = []
    for name in ("rep-a", "rep-b"):
        over = run_overrides(setup, name, **{"train.max_steps": 2, "train.eval_file": setup / "valid.jsonl"})
        run_train(cfg_of(over), progress=False)
        (setup / name / "eval").mkdir(exist_ok=True)
        shutil.copy(setup / "lik" / "eval" / "pred-test-likelihood.jsonl", setup / name / "eval")
        runs.append(setup / name)
    shutil.copy(setup / "gen" / "eval" / "pred-test-generate.jsonl", setup / "rep-b" / "eval")
    out = tmp_path / "report"
    proc = run_cli("eval", "report", *runs, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "report.md").read_text()
    table = [x for x in text.splitlines() if x.startswith("| rep-")]
    assert len(table) == 3 and "| likelihood |" in table[0] and any("| generate |" in x for x in table)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "rep-a-curves.png" in pngs and "rep-b-pred-test-generate-confusion.png" in pngs
    assert "rep-a-pred-test-likelihood-strategies.png" in pngs
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "![training curves](rep-a-curves.png)" in text
