"""Multi-process engines on CPU (gloo): DDP and DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 + offload against the
single-process run, ZeRO-3 kill-and-resume, resume on another world size, export (sharded precompute and evaluation:
tests/test_sharded.py; the torch engine's 2-rank precompute on a real Slurm: tests/test_slurm.py).

Every run here is a real `cso-dist` process tree started by torchrun or the deepspeed launcher."""

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from cso_dist.config import load_config
from cso_dist.engines.dist import World, launcher_env, my_share, world_from_env
from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.models import build_tiny_model, load_model
from cso_dist.train.tracking import read_metrics
from cso_dist.train.loop import run_train
from conftest import argv, cfg_of, launch, run_cli, run_overrides, tiny_run_data, train_killed_after_step_2
from numerics import close_curves


@pytest.fixture(scope="module")
def setup(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("dist")
    tiny_run_data(root, esconv_dir)
    return root


def overrides(root: Path, name: str, **over) -> dict:
    return run_overrides(
        root,
        name,
        **{
            "train.eval_file": root / "valid.jsonl",
            "train.eval_every": 2,
            "train.save_every": 2,
            "train.keep_last": 3,
            **over,
        },
    )


def curve(run_dir) -> list[dict]:
    return read_metrics(run_dir)


def assert_same_curve(a: list[dict], b: list[dict]) -> float:
    """Runs on other world sizes (another reduction order): every logged metric within fp32's curve
    tolerance (tests/numerics.py). Returns the largest relative loss difference."""
    return close_curves(a, b)


def numeric(c: list[dict]) -> list[dict]:
    """A curve without its wall-clock rates, for bitwise comparisons."""
    return [{k: v for k, v in m.items() if "per_s" not in k} for m in c]


@pytest.fixture(scope="module")
def single(setup):
    """The single-process reference run (torch engine), same global batches."""
    over = overrides(setup, "single")
    run_train(cfg_of(over), progress=False)
    return curve(setup / "single")


@pytest.fixture(scope="module")
def zero3(setup, single):
    """2-process ZeRO-3 (fp32), checkpoints every 2 steps."""
    over = overrides(setup, "zero3", **{"dist.engine": "deepspeed", "dist.deepspeed_config": "zero3"})
    t0 = time.time()
    out = launch(["train", *argv(over)])
    print(f"2-process ZeRO-3 run: {time.time() - t0:.1f} s")
    n = sum(p.numel() for p in load_model(setup / "model").parameters())
    assert f"{n:,} of {n:,} parameters trainable; deepspeed engine on 2 ranks" in out.stdout  # not the shards' 0
    return over


def test_ddp_matches_single_process(setup, single):
    launch(["train", *argv(overrides(setup, "ddp"))])
    worst = assert_same_curve(single, curve(setup / "ddp"))
    print(f"DDP: max relative loss difference {worst:.2e}")


def test_zero3_matches_single_process(setup, single, zero3):
    worst = assert_same_curve(single, curve(setup / "zero3"))
    print(f"ZeRO-3: max relative loss difference {worst:.2e}")
    state = json.loads((setup / "zero3" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["engine"] == "deepspeed" and state["zero_stage"] == 3 and state["world_size"] == 2


@pytest.mark.parametrize("ds,launcher", [("zero2", "deepspeed"), ("zero3_offload", "torchrun")])
def test_zero2_and_zero3_offload_match_single_process(setup, single, ds, launcher):
    over = overrides(setup, ds, **{"dist.engine": "deepspeed", "dist.deepspeed_config": ds, "train.save_every": 0})
    t0 = time.time()
    launch(["train", *argv(over)], launcher=launcher)
    worst = assert_same_curve(single, curve(setup / ds))
    print(f"{ds} ({launcher} launcher): max relative loss difference {worst:.2e}, {time.time() - t0:.1f} s")


def test_zero3_kill_and_resume_reproduces_the_curve(setup, zero3):
    over = overrides(setup, "zero3-killed", **{"dist.engine": "deepspeed", "train.max_steps": 4})
    train_killed_after_step_2(over)
    launch(["train", *argv(over), "--resume"])
    got, want = curve(setup / "zero3-killed"), curve(setup / "zero3")
    assert numeric(got) == numeric(want)  # same world size (2), threads (1 per rank) and engine: bit for bit


def test_resume_on_one_process_via_universal_checkpoint(setup, zero3):
    """A checkpoint of 2 ZeRO-3 ranks resumes on 1 rank (DeepSpeed universal checkpoint)."""
    run = setup / "zero3-on-1"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    shutil.copytree(setup / "zero3" / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000002")
    shutil.copy(setup / "zero3" / "metrics.jsonl", run / "metrics.jsonl")
    over = overrides(setup, "zero3-on-1", **{"dist.engine": "deepspeed"})
    proc = run_cli("train", *argv(over), "--resume", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "universal checkpoint" in proc.stdout
    assert_same_curve(curve(setup / "zero3"), curve(run))  # 2 ranks, then 1: another reduction order


def test_resume_refuses_another_zero_stage(setup, zero3):
    run = setup / "zero3-as-2"
    shutil.copytree(setup / "zero3" / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000002")
    proc = run_cli(
        "train", *argv(overrides(setup, "zero3-as-2", **{"dist.engine": "deepspeed", "dist.zero_stage": 2})), "--resume"
    )
    assert proc.returncode == 2 and "ZeRO stage 3" in proc.stderr, proc.stderr[-2000:]


def _eval_with(model_dir: str, setup, name: str, **extra) -> dict:
    """Evaluate a saved model in this process with the torch engine (one step at lr 1e-12, then eval)."""
    over = overrides(
        setup,
        name,
        **{
            "model.path": model_dir,
            "train.max_steps": 1,
            "train.lr": 1e-12,
            "train.save_every": 0,
            "train.eval_every": 1,
            "train.ref_cache": setup / f"{name}-refcache",
            **extra,
        },
    )
    run_train(cfg_of(over), progress=False)
    return [m for m in curve(setup / name) if "eval/loss" in m][0]


def test_export_and_final_give_the_engine_logprobs(setup, zero3):
    """The ZeRO-3 final folder and `cso-dist export` of a ZeRO-3 checkpoint load with plain
    from_pretrained and score the eval replies as the training engine did."""
    from transformers import AutoModelForCausalLM

    logged = [m for m in curve(setup / "zero3") if "eval/loss" in m]
    at2, at_end = logged[0], logged[-1]
    assert at2["step"] == 2
    out = setup / "exported-step2"
    proc = run_cli("export", setup / "zero3" / "checkpoints" / "step-0000002", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))
    for model_dir, want in ((out, at2), (setup / "zero3" / "final", at_end)):
        got = _eval_with(str(model_dir), setup, f"eval-{model_dir.name}")
        for k in ("eval/logps/chosen", "eval/logps/rejected"):
            assert got[k] == pytest.approx(want[k], abs=1e-4), (model_dir, k)


def test_zero3_lora_gradient_checkpointing_and_adapter_export(setup):
    """The ZeRO-3 + LoRA + gradient checkpointing trap: matches the single-process LoRA curve; the
    adapter exports alone and merged."""
    # lora_dropout 0: dropout masks come from each rank's RNG, so curves on 1 and 2 ranks could not agree
    lora = {
        "model.finetune": "lora",
        "model.lora_r": "4",
        "model.lora_dropout": "0",
        "train.gradient_checkpointing": "true",
        "train.reference": "adapter",
        "train.save_every": "2",
        "train.eval_every": "0",
    }
    one = overrides(setup, "lora-1", **lora)
    run_train(cfg_of(one), progress=False)
    launch(["train", *argv(overrides(setup, "lora-z3", **lora, **{"dist.engine": "deepspeed"}))])
    worst = assert_same_curve(curve(setup / "lora-1"), curve(setup / "lora-z3"))
    print(f"ZeRO-3 + LoRA + checkpointing: max relative loss difference {worst:.2e}")
    ckpt = setup / "lora-z3" / "checkpoints" / "step-0000002"
    for final in ("adapter", "merged"):
        proc = run_cli("export", ckpt, "--out", setup / f"lora-{final}", "--final", final)
        assert proc.returncode == 0, proc.stderr[-2000:]
    adapter, merged = setup / "lora-adapter", setup / "lora-merged"
    assert (adapter / "adapter_config.json").is_file() and not (merged / "adapter_config.json").exists()
    a, m = load_model(adapter, "lora"), load_model(merged, "full")
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, m(ids).logits, atol=1e-5)


def test_qlora_trains_with_paged_optimizer_and_its_adapter_reloads(setup):
    from cso_dist.models import load_tokenizer

    wide = build_tiny_model(
        "qwen2", setup / "h64", tokenizer=load_tokenizer(setup / "model"), hidden_size=64, overwrite=True
    )  # 4-bit blocks of 64 need rows of >= 64 values
    over = overrides(
        setup,
        "qlora",
        **{
            "model.path": wide,
            "model.finetune": "qlora",
            "model.lora_r": 4,
            "model.lora_dropout": 0,  # compared with DDP below: no per-rank masks
            "train.reference": "adapter",
            "train.optimizer": "paged_adamw8bit",
            "train.final": "adapter",
            "train.save_every": 0,
            "train.eval_every": 0,
        },
    )
    summary = run_train(cfg_of(over), progress=False)
    m = [x for x in curve(setup / "qlora") if "loss" in x]
    assert len(m) == 4 and abs(m[0]["loss"] - math.log(2)) < 1e-5 and all(math.isfinite(x["loss"]) for x in m)
    assert m[-1]["loss"] != m[0]["loss"]
    reloaded = _eval_with(
        summary["final"],
        setup,
        "qlora-reload",
        **{  # adapter dir -> 4-bit base + adapter
            "model.finetune": "qlora",
            "train.reference": "adapter",
        },
    )
    assert reloaded["eval/logps/chosen"] == pytest.approx(summary["eval/logps/chosen"], abs=1e-3)
    # the same QLoRA run data-parallel on 2 processes (DDP)
    launch(["train", *argv({**over, "run.out_dir": setup / "qlora-ddp"})])
    worst = assert_same_curve(curve(setup / "qlora"), curve(setup / "qlora-ddp"))
    print(f"QLoRA DDP: max relative loss difference {worst:.2e}")


def test_zero3_bf16_lora_casts_adapters_and_trains(setup):
    """fp32 adapters on a bf16 base under DeepSpeed bf16: the module runs in bf16, DeepSpeed keeps fp32
    masters; the run trains and its adapter loads."""
    over = overrides(
        setup,
        "lora-bf16",
        **{
            "model.finetune": "lora",
            "model.lora_r": 4,
            "model.precision": "bf16",
            "train.reference": "adapter",
            "dist.engine": "deepspeed",
            "train.final": "adapter",
            "train.max_steps": 2,
            "train.save_every": 0,
        },
    )
    launch(["train", *argv(over)])
    m = [x for x in curve(setup / "lora-bf16") if "loss" in x]
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and math.isfinite(m[1]["loss"]) and m[1]["grad_norm"] > 0
    model = load_model(setup / "lora-bf16" / "final", "lora", "bf16")
    lora_a = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_a and any(float(p.abs().max()) > 0 for p in lora_a)  # B starts at zero: it moved


def test_qlora_with_deepspeed_is_refused(setup):
    with pytest.raises(ConfigError, match="qlora runs on the torch engine"):
        load_config(None, {"model.finetune": "qlora", "dist.engine": "deepspeed"})


def test_world_from_env_reads_torchrun_and_slurm():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert (w.rank, w.world_size, w.local_rank, w.main) == (3, 4, 1, False)
    env = {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    before = dict(env)
    w = world_from_env(env)
    assert (w.rank, w.world_size) == (1, 2)
    assert env == before  # the world is read, not written into the environment (issue 42)
    env = launcher_env(w)  # what the DeepSpeed engine sets, for DeepSpeed to read
    assert env["MASTER_PORT"] == str(20000 + 1234) and env["MASTER_ADDR"] == "gpu07"
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    with pytest.raises(CsoError, match="MASTER_ADDR"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_my_share_pads_every_rank_to_the_same_count():
    items = list("abcde")
    shares = [my_share(items, World(r, 2)) for r in range(2)]
    assert [x for x, w in shares[0]] == ["a", "c", "e"] and [x for x, w in shares[1]] == ["b", "d", "a"]
    assert [w for _, w in shares[1]] == [1.0, 1.0, 0.0]
    assert sorted(x for s in shares for x, w in s if w) == items


def test_a_command_leaves_no_process_group_and_no_signal_handler_behind(tmp_path):
    """Issue 42: the group a command joins (here the one-rank group an engine makes) is shut down when it ends,
    however it ends; a stop request's signal handlers exist only inside its `with`."""
    import signal

    import torch.distributed as td

    from cso_dist.engines import dist
    from cso_dist.train.preempt import StopRequest

    with pytest.raises(RuntimeError, match="inside"):
        with dist.joined(World(), 1):
            dist.init_single()
            assert td.is_initialized() and td.get_world_size() == 1
            raise RuntimeError("a failure inside the command")
    assert not td.is_initialized()
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(tmp_path)
    assert signal.getsignal(signal.SIGUSR1) is before  # constructing it installs nothing
    with stop:
        assert signal.getsignal(signal.SIGUSR1) == stop._on_signal
    assert signal.getsignal(signal.SIGUSR1) is before
