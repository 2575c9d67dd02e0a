"""dist.engine fsdp2 (PyTorch's fully_shard) in real processes: torchrun with gloo on the CPU. Its curves and final
weights equal the single-process torch engine's (same global batches) within fp32's reduction-order tolerance, a
kill resumes to the same curve, DCP checkpoints resume on another world size and export to an HF folder, each rank
holds about 1/world of the parameters, and its reference cache equals a single process's."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cso_dist.config import load_config
from cso_dist.util.errors import ConfigError
from cso_dist.refcache import cache_key, load_reference
from cso_dist.train.tracking import read_metrics
from cso_dist.train.loop import run_train
from conftest import argv, cfg_of, launch, run_cli, run_overrides, tiny_run_data, train_killed_after_step_2
from numerics import close_curves

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("fsdp2")
    tiny_run_data(root, esconv_dir)
    return root


def overrides(root, name: str, **over) -> dict:
    # lora_dropout 0: dropout masks come from each rank's RNG, so curves on 1 and 2 ranks could not agree
    return run_overrides(root, name, **{"train.save_every": 2, "train.keep_last": 3, "model.lora_dropout": 0, **over})


@pytest.fixture(scope="module")
def single(setup):
    """The single-process torch engine: the reference curve and final weights (full, then LoRA)."""
    runs = {}
    for finetune in ("full", "lora", "lora-adapter"):
        over = overrides(setup, f"single-{finetune}", **_kind(finetune))
        run_train(cfg_of(over), progress=False)
        runs[finetune] = read_metrics(setup / f"single-{finetune}")
    return runs


def _kind(finetune: str) -> dict:
    """full, lora, or lora-adapter: LoRA scored against the live reference (the base with the adapter off)."""
    if finetune == "lora-adapter":
        return {"model.finetune": "lora", "train.reference": "adapter"}
    return {"model.finetune": finetune}


def _weights(run) -> dict:
    return load_file(str(next((run / "final").glob("*.safetensors"))))


def _assert_same_weights(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = a[k].float().abs().max().item() + 1e-12
        worst = max(worst, (a[k].float() - b[k].float()).abs().max().item() / scale)
    assert worst < 1e-4, worst  # fp32, another reduction order, 4 steps of Adam at lr 3e-3
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("finetune,ranks", [("full", 2), ("lora", 2), ("full", 4), ("lora-adapter", 4)])
def test_fsdp2_equals_one_process(setup, single, finetune, ranks):
    name = f"fsdp2-{finetune}-{ranks}"
    over = overrides(setup, name, **{"dist.engine": "fsdp2", **_kind(finetune)})
    out = launch(["train", *argv(over)], nproc=ranks)
    assert f"fsdp2 engine on {ranks} ranks" in out.stdout
    close_curves(single[finetune], read_metrics(setup / name))
    _assert_same_weights(_weights(setup / f"single-{finetune}"), _weights(setup / name))
    summary = json.loads((setup / name / "summary.json").read_text())
    held = summary["param_bytes"]  # per rank: its shards now, the most at any layer's start, the whole model
    assert len(held) == ranks
    for h in held:
        assert h["now"] < h["whole"] / ranks * 1.25, h  # about 1/world (shards are padded to equal sizes)
        assert h["now"] < h["peak"] < h["whole"], h  # one layer gathered at a time
    if finetune == "full":  # the planner's FSDP2 weights: shards + the root group + two layers (GPU prefetch)
        from cso_dist.plan import Setup, shape_from_hf_config
        from cso_dist.plan.training import base_weights

        s = Setup(finetune="full", zero=3, engine="fsdp2", gpus_per_node=ranks, bytes_per_el=4)
        planned = base_weights(shape_from_hf_config(setup / "model"), s)
        assert 1.0 <= planned / held[0]["peak"] < 1.15, (planned, held[0])
        print(
            f"{ranks} ranks: peak {held[0]['peak']:,} bytes, planned {planned:,.0f} ({planned / held[0]['peak']:.3f}x)"
        )


@pytest.mark.slow
def test_fsdp2_kill_resume_and_another_world_size(setup, single):
    """Killed after its step-2 checkpoint and resumed on 2 ranks: the uninterrupted curve bit for bit. The same
    checkpoint resumed on 1 rank (DCP reshards): the curve within fp32's tolerance. `cso-dist export` of a DCP
    checkpoint gives the model the run saves at that step."""
    whole = setup / "fsdp2-full-2"  # test_fsdp2_equals_one_process's run: the same settings, uninterrupted
    if not (whole / "summary.json").is_file():
        launch(["train", *argv(overrides(setup, whole.name, **{"dist.engine": "fsdp2", "model.finetune": "full"}))])
    over = overrides(setup, "fsdp2-killed", **{"dist.engine": "fsdp2", "model.finetune": "full"})
    train_killed_after_step_2(over)
    launch(["train", *argv(over), "--resume"])
    strip = lambda c: [{k: v for k, v in m.items() if "per_s" not in k} for m in c]  # noqa: E731
    assert strip(read_metrics(setup / "fsdp2-killed")) == strip(read_metrics(whole))

    one = setup / "fsdp2-on-1"
    shutil.rmtree(one, ignore_errors=True)
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-0000002", one / "checkpoints" / "step-0000002")
    shutil.copy(whole / "metrics.jsonl", one / "metrics.jsonl")
    proc = run_cli(
        "train",
        *argv(overrides(setup, "fsdp2-on-1", **{"dist.engine": "fsdp2", "model.finetune": "full"})),
        "--resume",
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    close_curves(read_metrics(whole), read_metrics(one))

    exported = {}  # step 2 of this run and of the single-process run, each consolidated by its engine
    for run in (whole.name, "single-full"):
        out = setup / f"{run}-exported"
        proc = run_cli("export", setup / run / "checkpoints" / "step-0000002", "--out", out, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        exported[run] = load_file(str(next(out.glob("*.safetensors"))))
    _assert_same_weights(exported["single-full"], exported[whole.name])


@pytest.mark.slow
def test_fsdp2_precompute_equals_one_process(setup):
    one = overrides(setup, "pc-one", **{"train.ref_cache": setup / "cache-one"})
    assert run_cli("precompute", *argv(one), env=ONE_THREAD).returncode == 0
    two = overrides(setup, "pc-fsdp2", **{"dist.engine": "fsdp2", "train.ref_cache": setup / "cache-fsdp2"})
    out = launch(["precompute", *argv(two)])
    assert "parameters held" in out.stdout
    a, b = (load_reference(cfg_of(o), cache_key(cfg_of(o))) for o in (one, two))
    assert a.keys() == b.keys() and len(a) > 100
    assert max(abs(a[k][0] - b[k][0]) / abs(a[k][0]) for k in a) < 1e-5


@pytest.mark.slow
def test_fsdp2_likelihood_eval_equals_one_process_and_generation_is_refused(setup):
    def args(o, mode, out):
        return ["eval", "generate", *argv(o), "--mode", mode, "--data", setup / "valid.jsonl", "--out", out]

    one = overrides(setup, "lik-one", **{"eval.max_dialogues": 2})
    two = overrides(setup, "lik-fsdp2", **{"eval.max_dialogues": 2, "dist.engine": "fsdp2"})
    assert run_cli(*args(one, "likelihood", setup / "lik-one.jsonl"), env=ONE_THREAD).returncode == 0
    launch(args(two, "likelihood", setup / "lik-fsdp2.jsonl"))
    a, b = ([json.loads(x) for x in (setup / n).read_text().splitlines()] for n in ("lik-one.jsonl", "lik-fsdp2.jsonl"))
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) > 5  # one file, the split's order
    tol = 1e-4  # above fp32's bound for a prefix of <= 9 tokens (2 * 9 * 2^-24 * |log-prob| ~ 3e-5 at 30 nats)
    for x, y in zip(a, b):
        assert all(abs(x["scores"][k] - y["scores"][k]) < tol for k in x["scores"]), x["id"]
    refused = run_cli(*args(two, "generate", setup / "gen-fsdp2.jsonl"), env=ONE_THREAD)
    assert refused.returncode == 2 and "eval generate with dist.engine fsdp2" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (setup / "gen-fsdp2.jsonl").exists()


@pytest.mark.unit
def test_what_fsdp2_cannot_do_is_refused_at_load():
    with pytest.raises(ConfigError, match="qlora under FSDP2 would shard bitsandbytes' 4-bit weights"):
        load_config(None, {"dist.engine": "fsdp2", "model.finetune": "qlora"})
    with pytest.raises(ConfigError, match="train.optimizer: 'adamw8bit' .* cannot step FSDP2's sharded parameters"):
        load_config(None, {"dist.engine": "fsdp2", "train.optimizer": "adamw8bit"})
    with pytest.raises(ConfigError, match="dist.offload: read by dist.engine fsdp2 only"):
        load_config(None, {"dist.offload": True})
    assert load_config(None, {"dist.engine": "fsdp2", "dist.offload": True}).dist.offload


@pytest.mark.slow
def test_fsdp2_offload_checkpointing_and_dense_attention_equal_one_process(setup, single):
    """dist.offload (parameters, gradients and optimizer states on the CPU), per-layer activation checkpointing and
    the dense [T x T] mask: the same curve as the single-process run (tree attention, nothing recomputed)."""
    more = {"dist.offload": True, "train.gradient_checkpointing": True, "scorer.attention": "dense"}
    over = overrides(setup, "fsdp2-offload", **{"dist.engine": "fsdp2", **more})
    launch(["train", *argv(over)])
    close_curves(single["full"], read_metrics(setup / "fsdp2-offload"))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "tree", "flex"])
def test_fsdp2_passes_the_rows_attention_inputs_to_every_layer_unchanged(setup, attention):
    """Under FSDP2's bf16 mixed precision (weights gathered in bf16) each decoder layer receives the mask, plan or
    BlockMask the scorer built, as built: no input casting widens or narrows it (world size 1, in this process;
    flex forward-only on the CPU, as the reference precompute and likelihood evaluation run it)."""
    from cso_dist.engines.dist import World
    from cso_dist.engines import build_scorer
    from cso_dist.train.loop import make_layout, micro_batches
    from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset
    from cso_dist.engines.fsdp2_engine import _decoder_layers

    over = overrides(setup, f"mask-{attention}", **{"dist.engine": "fsdp2", "scorer.attention": attention})
    cfg = cfg_of({**over, "model.precision": "bf16-mixed"})
    split = load_split(cfg, "train")
    batch = micro_batches(make_layout(cfg, split.dialogues, make_cfg_renderer(cfg), resolve_sset(cfg), False), [0])[0]
    engine = build_scorer(cfg, World())
    seen = []
    for layer in _decoder_layers(engine.module):
        layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    engine.score(batch.data)
    assert len(seen) == len(list(_decoder_layers(engine.module)))
    if attention == "flex":  # the BlockMask of the row padded to its bucket, as FlexRows builds it
        from torch.nn.attention.flex_attention import BlockMask

        from cso_dist.scorer.attention import FlexRows

        _, built = FlexRows.of(cfg.pack.max_tokens, cfg.pack.bucket).prepare(batch.data, torch.device("cpu"))
        for mask in seen:
            assert isinstance(mask, BlockMask) and mask.shape == built.shape
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                got, ref = getattr(mask, name), getattr(built, name)
                assert (got is None) == (ref is None) and (got is None or torch.equal(got, ref)), name
        return
    want = batch.data.attention_mask(torch.bool) if attention == "dense" else None
    for mask in seen:
        if want is not None:
            assert mask.dtype == torch.bool and torch.equal(mask.cpu(), want)
        else:  # tree: the 1-element placeholder; the plan travels as its own argument
            assert mask.dtype == torch.bool and mask.numel() == 1
