"""Every stage through the engine, sharded: under DeepSpeed ZeRO-3 on 2 gloo ranks (real torchrun processes) the
reference precompute, likelihood evaluation, generation and training with the live reference each give what the
single-process torch engine gives, while each rank holds about half the parameters plus the layer in flight; and
data-parallel `eval generate` on 2 ranks writes the PRED file of 1 rank, also when killed and resumed.

The DeepSpeed JSON here is the shipped zero3 with nothing kept whole and nothing prefetched
(stage3_param_persistence_threshold 0, prefetch bucket 0): on a tiny model the shipped threshold (100k elements)
would keep every parameter whole on every rank, and there would be nothing to measure."""

import json
import math
import signal
import time
from pathlib import Path

import pytest

from cso_dist.engines.dsconfig import ds_config_path
from cso_dist.models import build_tiny_model, load_model
from cso_dist.refcache import cache_key, load_reference
from conftest import argv, cfg_of, kill_job, launch, run_cli, run_overrides, tiny_run_data
from numerics import close_curves, summed_logp_tol

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory, esconv_dir):
    """5 train and 3 valid ESConv dialogues; a model whose decoder layers outweigh its embeddings (8 layers of
    hidden 128 and MLP 1,024 over the 4,096-token BPE, tied embeddings: a layer is 1.8 MB, the embedding matrix
    2.1 MB, the model 16.3 MB in fp32), so that "half the model plus one layer" is well below the whole."""
    root = tmp_path_factory.mktemp("sharded")
    tiny_run_data(root, esconv_dir, n_train=5, n_valid=3)
    from cso_dist.models import load_tokenizer

    build_tiny_model(
        "qwen2",
        root / "wide",
        tokenizer=load_tokenizer(root / "model"),
        hidden_size=128,
        num_layers=8,
        intermediate_size=1024,
        overwrite=True,
    )
    ds = json.loads(ds_config_path("zero3").read_text())
    ds["zero_optimization"].update(
        stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0
    )
    (root / "zero3-flat.json").write_text(json.dumps(ds))
    return root


def over(root: Path, name: str, zero3: bool, **more) -> dict:
    base = {
        "model.path": root / "wide",
        "train.eval_file": root / "valid.jsonl",
        "train.eval_max_dialogues": 2,  # one shard of 2: the second rank has none, and must still step along
        "refcache.dialogues_per_shard": 2,  # 3 train shards over 2 ranks: 2 and 1
        "train.ref_cache": root / f"{name}-cache",
        "train.max_steps": 2,
        "train.grad_accum": 2,
    }
    if zero3:
        base.update({"dist.engine": "deepspeed", "dist.deepspeed_config": root / "zero3-flat.json"})
    return run_overrides(root, name, **{**base, **more})


def layer_bytes(model_dir: Path) -> int:
    """The largest unit a forward gathers at once: a decoder layer or an embedding matrix (fp32)."""
    m = load_model(model_dir)
    units = [*m.model.layers, m.model.embed_tokens, m.lm_head]
    return max(sum(p.numel() * 4 for p in u.parameters()) for u in units)


def assert_sharded(held: dict, unit: int, world: int = 2) -> float:
    """A rank held about its share of the parameters plus one gathered unit, never the whole model."""
    peak, whole, pad = held["peak"], held["whole"], 4096  # DeepSpeed pads each rank's partitions a little
    assert peak <= whole / world + unit + pad and peak < 0.7 * whole, (held, unit)
    assert held["now"] <= whole / world + pad, held  # between forwards: the partitions alone
    return round(peak / whole, 3)


@pytest.fixture(scope="module")
def one(root) -> dict:
    """The reference cache of one process on the torch engine: what every sharded cache is compared with."""
    o = over(root, "pc-one", zero3=False)
    assert run_cli("precompute", *argv(o), env=ONE_THREAD).returncode == 0
    return o


def test_zero3_precompute_equals_one_process_and_holds_half(root, one):
    two = over(root, "pc-z3", zero3=True)
    t0 = time.time()
    out = launch(["precompute", *argv(two)])
    secs = time.time() - t0
    assert "shards of rank 1 ready" in out.stdout
    cfg1, cfg2 = cfg_of(one), cfg_of(two)
    unit = layer_bytes(root / "wide")
    for split in ("train", "eval"):
        key = cache_key(cfg1, split)
        assert cache_key(cfg2, split) == key  # the engine is not part of the key
        a, b = load_reference(cfg1, key, split), load_reference(cfg2, key, split)
        assert a.keys() == b.keys() and len(a) > 10
        for k, (lp, n) in a.items():
            assert b[k][1] == n and abs(b[k][0] - lp) <= summed_logp_tol(lp, n), (k, lp, b[k][0])
    d = Path(cfg2.train.ref_cache)
    sides = [json.loads(p.read_text()) for p in sorted((d / "shards").glob("*.done.json"))]
    ratios = [assert_sharded(s["param_bytes"], unit) for s in sides]
    print(f"ZeRO-3 precompute on 2 ranks: {secs:.1f} s; peak parameter bytes / whole per shard: {ratios}")
    # a cache computed one way is verified and kept by the other
    again = run_cli("precompute", *argv({**one, "train.ref_cache": str(d)}), env=ONE_THREAD)
    assert again.returncode == 0 and "0 computed" in again.stdout and "verified and kept" in again.stdout


def _pred(root: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (root / name).read_text().splitlines()]


def _eval_args(o: dict, mode: str, out: Path) -> list:
    return ["eval", "generate", *argv(o), "--mode", mode, "--data", o["train.eval_file"], "--out", out]


def test_zero3_likelihood_eval_equals_one_process_and_holds_half(root):
    more = {"eval.max_dialogues": 3}
    one, two = over(root, "lik-one", False, **more), over(root, "lik-z3", True, **more)
    assert run_cli(*_eval_args(one, "likelihood", root / "lik-one.jsonl"), env=ONE_THREAD).returncode == 0
    out = launch(_eval_args(two, "likelihood", root / "lik-z3.jsonl"))
    a, b = _pred(root, "lik-one.jsonl"), _pred(root, "lik-z3.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) > 10  # one file, the split's order
    tol = 1e-4  # above fp32's bound for a prefix of <= 9 tokens (2 * 9 * 2^-24 * |log-prob| ~ 3e-5 at 30 nats)
    for x, y in zip(a, b):
        assert all(abs(x["scores"][s] - y["scores"][s]) < tol for s in x["scores"]), x["id"]
        top = sorted(x["scores"].values())
        assert x["pred_strategy"] == y["pred_strategy"] or top[-1] - top[-2] < 2 * tol, x["id"]  # or a near tie
    unit = layer_bytes(root / "wide")
    lines = [line for line in out.stdout.splitlines() if line.startswith("eval rank ")]
    assert len(lines) == 2, out.stdout[-2000:]
    for line in lines:
        peak, whole = (int(x.replace(",", "")) for x in line.split("(")[-1].split(" bytes")[0].split(" of "))
        assert_sharded({"peak": peak, "whole": whole, "now": 0}, unit)


def test_zero3_generation_equals_one_process(root):
    """generate(synced_gpus=True): a rank with fewer prompts keeps stepping until the other is done."""
    more = {"eval.max_dialogues": 2, "eval.max_new_tokens": 6, "eval.batch_size": 1}
    one, two = over(root, "gen-one", False, **more), over(root, "gen-z3", True, **more)
    assert run_cli(*_eval_args(one, "generate", root / "gen-one.jsonl"), env=ONE_THREAD).returncode == 0
    launch(_eval_args(two, "generate", root / "gen-z3.jsonl"))
    a, b = _pred(root, "gen-one.jsonl"), _pred(root, "gen-z3.jsonl")
    assert len(a) > 5 and [(r["id"], r["pred_raw"]) for r in a] == [(r["id"], r["pred_raw"]) for r in b]


def test_data_parallel_generate_is_one_process_and_resumes_after_a_kill(root):
    """2 ranks of the torch engine, killed mid-way and run again, write the PRED file 1 rank writes, with nothing
    lost or repeated."""
    more = {"eval.max_dialogues": 3, "eval.max_new_tokens": 24, "eval.batch_size": 1}
    one = over(root, "dp-one", False, **more)
    assert run_cli(*_eval_args(one, "generate", root / "dp-one.jsonl"), env=ONE_THREAD).returncode == 0
    want = _pred(root, "dp-one.jsonl")
    killed = root / "dp-killed.jsonl"
    proc = launch(_eval_args(one, "generate", killed), wait=False)
    parts = [killed.with_name(f".{killed.name}.rank{r}") for r in (0, 1)]
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if all(p.is_file() and p.stat().st_size for p in parts):
            assert kill_job(str(killed)) == 3  # the launcher and both workers
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not killed.exists()
    done = sum(len(p.read_text().splitlines()) for p in parts)
    assert 0 < done < len(want)
    resumed = launch(_eval_args(one, "generate", killed))
    assert f"on 2 ranks, {done} already done" in resumed.stdout, resumed.stdout
    assert _pred(root, "dp-killed.jsonl") == want and not any(p.exists() for p in parts)


def test_zero3_training_with_the_live_reference_equals_one_process_and_holds_half(root):
    lora = {
        "model.finetune": "lora",
        "model.lora_r": 4,
        "model.lora_dropout": 0,  # dropout masks come from each rank's RNG
        "train.reference": "adapter",
        "train.eval_every": 1,
    }
    one, two = over(root, "live-one", False, **lora), over(root, "live-z3", True, **lora)
    assert run_cli("train", *argv(one), env=ONE_THREAD).returncode == 0
    launch(["train", *argv(two)])
    from cso_dist.train.tracking import read_metrics

    worst = close_curves(read_metrics(root / "live-one"), read_metrics(root / "live-z3"))
    summary = json.loads((root / "live-z3" / "summary.json").read_text())
    unit = layer_bytes(root / "wide")
    ratios = [assert_sharded(h, unit) for h in summary["param_bytes"]]
    assert len(ratios) == 2 and math.isfinite(summary["loss"])
    print(f"ZeRO-3 LoRA with the live reference: max relative loss difference {worst:.2e}; peak/whole {ratios}")


def test_zero3_training_computes_a_missing_cache_first_then_trains(root, one):
    """`train` under ZeRO-3 with no reference cache: the ranks compute it together through a scoring engine, release
    it, and train on it; the cache equals the one precompute wrote (same key, same values)."""
    two = over(root, "first-z3", True, **{"train.max_steps": 1, "train.grad_accum": 1})
    out = launch(["train", *argv(two)])
    assert "running precompute first (2 ranks)" in out.stdout and "deepspeed engine on 2 ranks" in out.stdout
    cfg, want = cfg_of(two), cfg_of(one)
    for split in ("train", "eval"):
        key = cache_key(cfg, split)
        got, ref = load_reference(cfg, key, split), load_reference(want, key, split)
        assert got.keys() == ref.keys() and all(abs(got[k][0] - ref[k][0]) <= summed_logp_tol(*ref[k]) for k in ref)
    assert json.loads((root / "first-z3" / "summary.json").read_text())["steps"] == 1
