"""Single-process CSO training: step-0 loss, learning, methods, resume, non-finite loss, outputs, W&B."""

import json
import math
import os
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path

import pytest
import torch

from cso_dist.engines.checkpoint import list_checkpoints
from cso_dist.config import load_config
from cso_dist.data.dialogue import read_dialogues
from cso_dist.data.export import iter_pairs
from cso_dist.data.strategies import load_strategy_set
from cso_dist.util.errors import CsoError
from cso_dist.scorer import Scorer
from cso_dist.losses import resolved_beta
from cso_dist.models import load_model
from cso_dist.losses.batch import micro_loss, structure
from cso_dist.refcache import cache_key, load_reference, run_precompute
from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset
from cso_dist.train.tracking import read_metrics
from cso_dist.train.loop import make_layout, plan_steps, run_train
from conftest import REPO, run_cli, tiny_run_data
from numerics import U32, curve_tol, dpo_step0_bound, summed_logp_tol


@pytest.fixture(scope="module")
def setup(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("train")
    model = tiny_run_data(root, esconv_dir, n_train=8, n_valid=3)
    return root, model


def over_for(setup, name, **over) -> dict:
    root, model = setup
    base = {
        "model.path": str(model),
        "train.train_file": str(root / "train.jsonl"),
        "run.out_dir": str(root / name),
        "train.ref_cache": str(root / "refcache"),
        "data.max_length": 1024,
        "pack.max_tokens": 2048,
        "train.lr": 3e-3,
        "train.warmup_ratio": 0.0,
        "train.schedule": "constant",
    }
    return {**base, **over}


def cfg_for(setup, name, **over):
    return load_config(None, over_for(setup, name, **over))


def _ref_pairs(b, ref) -> list[tuple[float, int, float, int]]:
    """(ref_chosen, n_chosen, ref_rejected, n_rejected) of every pair of micro-batch b."""
    s, ntok = structure(b.reply_ids), b.data.reply_tokens.tolist()
    base = [r.key for r in b.reply_ids]
    return [(ref[base[c]][0], ntok[c], ref[base[r]][0], ntok[r]) for c, r in zip(s.pair_c, s.pair_r)]


@pytest.mark.slow
@pytest.mark.numerics
def test_step0_dpo_loss_is_ln2_on_every_batch(setup):
    """Policy == reference at step 0. Scored by the same code on the same micro-batch, the log-ratios are 0
    bit for bit, so each pair's loss is fp32 ln 2 and the micro-batch mean is within the summation bound
    n*u*ln 2. The cached reference was computed on other packed rows (other shapes, so another reduction
    order): there the bound follows from the magnitudes of the summed log-probs (tests/numerics.py)."""
    cfg = cfg_for(setup, "step0")
    run_precompute(cfg, progress=False)
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    cached = load_reference(cfg, cache_key(cfg, "train", renderer, sset))
    train = load_split(cfg, "train")
    batches = [b for step in plan_steps(make_layout(cfg, train.dialogues, renderer, sset, False), 8, cfg) for b in step]
    scorer = Scorer(load_model(cfg.model.path), 64, attention=cfg.scorer.attention)  # as the engines score
    assert len(batches) > 3
    worst = 0.0
    with torch.no_grad():
        for b in batches:
            logps, ntok = scorer(b.data), b.data.reply_tokens
            live: dict = {}
            for rid, v, n in zip(b.reply_ids, logps.tolist(), ntok.tolist()):
                live.setdefault(rid.key, (v, n))  # as score_units keeps the first copy
            n_pairs = b.counts["pairs"]
            loss, _ = micro_loss(cfg.train, b.reply_ids, logps, ntok, live, b.counts)
            assert abs(float(loss) - math.log(2)) <= n_pairs * U32 * math.log(2)  # same code, same shapes
            loss, _ = micro_loss(cfg.train, b.reply_ids, logps, ntok, cached, b.counts)
            bound = dpo_step0_bound(resolved_beta("dpo", cfg.train.beta), _ref_pairs(b, cached))
            assert abs(float(loss) - math.log(2)) <= bound, (float(loss), bound)
            assert all(abs(live[k][0] - cached[k][0]) <= summed_logp_tol(cached[k][0], cached[k][1]) for k in live)
            worst = max(worst, abs(float(loss) - math.log(2)) / bound)
    print(f"step-0 |loss - ln 2| against the cache: at most {worst:.3g} of the derived bound")


@pytest.mark.numerics
@pytest.mark.slow
def test_short_dpo_run_learns_the_training_pairs(setup):
    cfg = cfg_for(setup, "dpo", **{"train.epochs": 6, "train.eval_file": str(setup[0] / "train.jsonl")})
    summary = run_train(cfg, progress=False)
    metrics = read_metrics(cfg.run.out_dir)
    # policy == reference at step 1, scored on other packed rows than the cache: the derived fp32 bound
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    ref = load_reference(cfg, cache_key(cfg, "train", renderer, sset))
    train = load_split(cfg, "train")
    step1 = plan_steps(make_layout(cfg, train.dialogues, renderer, sset, False), len(train.dialogues), cfg)[0]
    assert abs(metrics[0]["loss"] - math.log(2)) <= dpo_step0_bound(
        resolved_beta("dpo", cfg.train.beta), [p for b in step1 for p in _ref_pairs(b, ref)]
    )
    assert summary["eval/rewards/accuracies"] > 0.9, summary  # scored on the training pairs after training
    for k in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "tokens_per_s",
        "pairs_per_s",
        "lr",
        "grad_norm",
    ):
        assert k in metrics[-2], k
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["final"])  # an HF save_pretrained folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "ipo", "simpo", "kto", "orpo"])
def test_every_method_trains(setup, method):
    over = {"train.method": method, "train.max_steps": 3, "train.nll_weight": 0.1}
    if method == "kto":  # a KTO cache also holds the KL branches: not the DPO runs' cache
        over["train.ref_cache"] = str(setup[0] / "refcache-kto")
    cfg = cfg_for(setup, f"m-{method}", **over)
    run_train(cfg, progress=False)
    m = read_metrics(cfg.run.out_dir)
    assert len(m) == 3 and all(math.isfinite(x["loss"]) for x in m)
    assert m[-1]["loss"] < m[0]["loss"] or method in ("kto", "simpo", "orpo")  # 3 steps: sanity, not convergence


@pytest.mark.slow
def test_per_pair_layout_gives_the_same_first_step(setup):
    out = {}
    for layout in ("trie", "pair"):
        # one optimizer step over the same pairs (grad_accum covers every micro-batch of either layout)
        cfg = cfg_for(
            setup,
            f"layout-{layout}",
            **{
                "pack.layout": layout,
                "train.max_steps": 1,
                "train.grad_accum": 64,
                "train.max_dialogues": 2,
                "pack.max_tokens": 100000,
                "train.ref_cache": str(setup[0] / "refcache-2"),
            },
        )
        run_train(cfg, progress=False)
        out[layout] = read_metrics(cfg.run.out_dir)[0]
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert out["trie"][k] == pytest.approx(out["pair"][k], rel=1e-5, abs=1e-6), k


# Same numeric conditions for runs that must agree bit for bit: each run is its own `cso-dist train`
# process with ONE_THREAD, the torch engine and one rank (the thread count changes fp32 reduction order).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RESUME_RUN = {"train.max_steps": 10, "train.save_every": 2, "train.keep_last": 2}


def _curve(run_dir) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def killed(setup, tmp_path_factory):
    """The reference curve (10 steps straight through) and the same run SIGKILLed after its first checkpoint,
    both under ONE_THREAD; the killed run's folder is copied once so each test resumes its own copy."""
    full = over_for(setup, "uninterrupted", **RESUME_RUN)
    run_cli("train", *[f"--{k}={v}" for k, v in full.items()], env=ONE_THREAD, check=True)
    over = over_for(setup, "interrupted", **RESUME_RUN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cso_dist.cli", "train", *[f"--{k}={v}" for k, v in over.items()]],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ONE_THREAD},
    )
    ckpts = Path(over["run.out_dir"]) / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list_checkpoints(ckpts):  # complete ones only: never a checkpoint's temporary folder mid-write
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not os.path.isdir(os.path.join(over["run.out_dir"], "final"))
    copy = str(tmp_path_factory.mktemp("resume") / "interrupted-copy")
    shutil.copytree(over["run.out_dir"], copy)
    at = max(json.loads((c / "state.json").read_text())["step"] for c in list_checkpoints(ckpts))
    return _curve(full["run.out_dir"]), over, {**over, "run.out_dir": copy}, at


def _resume(over: dict, threads: int) -> tuple[list[tuple], str]:
    proc = run_cli(
        "train", *[f"--{k}={v}" for k, v in over.items()], "--resume", env={"OMP_NUM_THREADS": str(threads)}, check=True
    )
    return _curve(over["run.out_dir"]), proc.stdout


@pytest.mark.slow
@pytest.mark.numerics
def test_kill_and_resume_reproduces_the_uninterrupted_curve(killed):
    """Same machine, thread count (1), world size (1) and engine: the resumed curve is the uninterrupted one,
    bit for bit."""
    want, over, _, _ = killed
    got, out = _resume(over, threads=1)
    assert got == want
    assert "resumed from" in out and "other numeric conditions" not in out
    assert len(os.listdir(os.path.join(over["run.out_dir"], "checkpoints"))) <= 2  # keep-last-k


@pytest.mark.slow
@pytest.mark.numerics
def test_resume_on_another_thread_count_matches_within_fp32_tolerance(killed):
    """Killed at 1 thread, resumed at 2: the steps logged before the kill are the reference's bits; the steps
    after it ran with another reduction order and agree within the fp32 bound of tests/numerics.py."""
    want, _, copy, at = killed
    got, out = _resume(copy, threads=2)
    assert "resumed under other numeric conditions (threads 1 -> 2)" in out  # the run says so
    assert [s for s, *_ in got] == [s for s, *_ in want]
    assert [g for g in got if g[0] <= at] == [w for w in want if w[0] <= at]
    for (step, loss, gnorm), (_, loss0, gnorm0) in zip(got, want):
        if step > at:
            assert abs(loss - loss0) <= curve_tol(loss0), (step, loss, loss0)
            assert abs(gnorm - gnorm0) <= curve_tol(gnorm0), (step, gnorm, gnorm0)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_saves_the_batch(setup, tmp_path):
    root, model_dir = setup
    model = load_model(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    import shutil

    for f in model_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, tmp_path / "nan-model" / f.name)
    proc = run_cli(
        "train",
        "--model.path",
        tmp_path / "nan-model",
        "--train.method=sft",
        "--train.train_file",
        root / "train.jsonl",
        "--run.out_dir",
        tmp_path / "run",
        "--data.max_length",
        "1024",
        "--pack.max_tokens",
        "2048",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "loss is nan at step 1" in line and "nonfinite-step1-micro0.pt" in line
    saved = torch.load(tmp_path / "run" / "nonfinite-step1-micro0.pt", weights_only=False)
    assert saved["reply_ids"]


@pytest.mark.slow
def test_lora_final_outputs_and_wandb_offline(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for final in ("adapter", "merged"):
        cfg = cfg_for(
            setup,
            f"lora-{final}",
            **{
                "model.finetune": "lora",
                "model.lora_r": 4,
                "train.max_steps": 2,
                "train.final": final,
                "track.wandb": final == "adapter",
            },
        )
        summary = run_train(cfg, progress=False)
        files = os.listdir(summary["final"])
        assert ("adapter_config.json" in files) == (final == "adapter")
        assert "tokenizer.json" in files
        load_model(summary["final"], "lora" if final == "adapter" else "full")
    assert any(p.startswith("offline-run") for p in os.listdir(os.path.join(setup[0], "lora-adapter", "wandb")))


@pytest.mark.slow
def test_lora_dropout_reaches_training_and_is_off_at_eval(setup):
    """model.lora_dropout is the dropout of the adapters the engine trains (the saved adapter says so); it
    changes the curve once the adapters are non-zero, and evaluation runs without it."""
    curves = {}
    for p in (0.0, 0.5):
        cfg = cfg_for(
            setup,
            f"lora-dropout-{p}",
            **{
                "model.finetune": "lora",
                "model.lora_r": 4,
                "model.lora_dropout": p,
                "train.final": "adapter",
                "train.max_steps": 3,
                "train.eval_file": str(setup[0] / "valid.jsonl"),
                "train.eval_every": 1,
                "train.ref_cache": str(setup[0] / "refcache-valid-eval"),
            },
        )  # its eval file differs from the others
        summary = run_train(cfg, progress=False)
        curves[p] = read_metrics(cfg.run.out_dir)
        saved = json.loads(open(os.path.join(summary["final"], "adapter_config.json")).read())
        assert saved["lora_dropout"] == p
    off, on = curves[0.0], curves[0.5]
    assert off[0]["loss"] == on[0]["loss"]  # lora_B starts at 0: dropout cannot matter at step 1
    assert off[2]["loss"] != on[2]["loss"]  # ... and does once the adapters moved
    at3 = [m for m in on if m["step"] == 3 and "eval/loss" in m]
    assert len(at3) == 2 and at3[0]["eval/loss"] == at3[1]["eval/loss"]  # two evaluations, same weights, no masks


@pytest.mark.slow
def test_training_refuses_a_stale_cache(setup):
    cfg = cfg_for(setup, "stale", **{"train.max_steps": 1})
    run_precompute(cfg, progress=False)
    other = cfg_for(setup, "stale", **{"train.max_steps": 1, "data.max_length": 900, "pack.max_tokens": 2048})
    with pytest.raises(CsoError, match="truncation"):
        run_train(other, progress=False)


@pytest.mark.slow
def test_bf16_gradient_checkpointing_and_wandb_failure(setup, monkeypatch, capfd):
    cfg = cfg_for(
        setup,
        "bf16",
        **{
            "model.precision": "bf16",
            "train.gradient_checkpointing": True,
            "train.max_steps": 2,
            "train.ref_cache": str(setup[0] / "refcache-bf16"),
        },
    )  # dtype is in the key
    run_train(cfg, progress=False)
    m = read_metrics(cfg.run.out_dir)
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)
    assert abs(m[0]["loss"] - math.log(2)) < 5e-3  # bf16 rounding differs a little between batchings


@pytest.mark.slow
def test_cli_precompute_and_cache_export(setup, tmp_path):
    root, model = setup
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {{path: {model}}}\ntrain: {{train_file: {root / 'train.jsonl'}, max_dialogues: 3}}\n"
        f"data: {{max_length: 1024}}\npack: {{max_tokens: 2048}}\nrun: {{out_dir: {tmp_path / 'run'}}}\n"
    )
    proc = run_cli("precompute", cfg, check=True)
    assert "reference cache ready" in proc.stdout
    run_cli("data", "pairs", root / "train.jsonl", "--format", "dpo", "--out", tmp_path / "pairs.jsonl", check=True)
    run_cli("cache", "export", tmp_path / "run" / "refcache", "--out", tmp_path / "ref.jsonl", check=True)
    rows = [json.loads(line) for line in open(tmp_path / "ref.jsonl")]
    assert rows and set(rows[0]) == {"pair_id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"}
    first3 = read_dialogues(root / "train.jsonl")[:3]  # the cache covers train.max_dialogues = 3
    want = [pid for pid, _ in iter_pairs(first3, load_strategy_set("esconv"), "dpo")]
    assert [r["pair_id"] for r in rows] == want
