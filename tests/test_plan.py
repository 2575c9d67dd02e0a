"""The memory planner: parameter counts, DeepSpeed's model-state estimators, measured activations, recipes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from cso_dist.config import load_config
from cso_dist.plan import PRESETS, Setup, activations, model_states, plan, resolve_shape, setup_from_config
from conftest import RECIPES, REPO, run_cli, tiny_run_data

GIB = 2**30


def _hf_config(shape):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
    )
    if shape.name.startswith("Qwen"):
        return Qwen2Config(**common)
    if shape.name.startswith("Gemma"):
        return Gemma2Config(head_dim=shape.head_dim, **common)
    return LlamaConfig(head_dim=shape.head_dim, **common)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_equal_the_hf_models(name):
    from transformers import AutoModelForCausalLM

    shape = PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(shape))
    assert shape.params() == sum(p.numel() for p in model.parameters())
    published = {"7b": 7_615_616_512, "8b": 8_030_261_248, "9b": 9_241_705_984, "70b": 70_553_706_496}
    if name in published:
        assert shape.params() == published[name]


def _deepspeed_table(fn, capsys, **kw) -> dict[str, float]:
    """The per-GPU GiB column of DeepSpeed's printed estimate, by its options string."""
    fn(**kw)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            rows[re.sub(r"\s+", "", m.group(3)).replace("OffloadDeviceEnum.", "")] = float(m.group(2))
    return rows


@pytest.mark.parametrize("name", ["7b", "8b", "70b"])
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_model_states_agree_with_deepspeed_estimators(name, nodes, gpus, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    shape = PRESETS[name]
    z3 = _deepspeed_table(
        estimate_zero3_model_states_mem_needs_all_cold,
        capsys,
        total_params=shape.params(),
        largest_layer_params=shape.largest_layer(),
        num_gpus_per_node=gpus,
        num_nodes=nodes,
    )
    z2 = _deepspeed_table(
        estimate_zero2_model_states_mem_needs_all_cold,
        capsys,
        total_params=shape.params(),
        num_gpus_per_node=gpus,
        num_nodes=nodes,
    )
    cases = [
        (3, "none", z3["offload_param=none,offload_optimizer=none,zero_init=1"]),
        (3, "optimizer", z3["offload_param=none,offload_optimizer=cpu,zero_init=1"]),
        (3, "params", z3["offload_param=cpu,offload_optimizer=cpu,zero_init=1"]),
        (2, "none", z2["offload_optimizer=none"]),
        (2, "optimizer", z2["offload_optimizer=cpu"]),
    ]
    for zero, offload, ds_gib in cases:
        ours = sum(model_states(shape, Setup(zero=zero, offload=offload, nodes=nodes, gpus_per_node=gpus)).values())
        assert ours / GIB == pytest.approx(ds_gib, rel=0.10, abs=0.01), (zero, offload)


@pytest.mark.slow
def test_activation_estimate_matches_measured_peak_on_cpu(tmp_path, esconv_dir):
    """The planner's activation peak against the measured peak memory (VmHWM) of a tiny model's
    forward + backward over a real trie row of ESConv dialogues (tree attention), with and without
    checkpointing, and its trie-layout overhead line against the measured difference to a causal row."""
    model = tiny_run_data(tmp_path, esconv_dir, n_train=16)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "measure_memory.py"),
            "--data",
            str(tmp_path / "train.jsonl"),
            "--tokenizer",
            str(model),
            "--hidden",
            "256",
            "--layers",
            "4",
            "--intermediate",
            "1024",
            "--seq-len",
            "4096",
            "--logit-chunk",
            "256",
            "--work",
            str(tmp_path / "measure"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["n_tokens"] > 3000 and out["attention"] == "tree" and out["tree_keys_per_token"] > 2
    for mode in ("no_checkpointing", "checkpointing"):
        assert 0.75 <= out[mode]["ratio"] <= 1.25, (mode, out[mode])
        # the "trie-layout overhead" line: the measured cost of the tree's shape over a plain causal row
        assert 0.75 <= out[mode]["overhead"]["ratio"] <= 1.25, (mode, out[mode]["overhead"])
    # checkpointing really saves memory, and the planner sees it too
    assert out["checkpointing"]["measured_peak_mb"] < 0.6 * out["no_checkpointing"]["measured_peak_mb"]


def test_hf_config_path_gives_the_model_param_count(tmp_path, esconv_dir):
    from transformers import AutoModelForCausalLM

    model = tiny_run_data(tmp_path, esconv_dir, n_train=1, n_valid=1)
    real = AutoModelForCausalLM.from_pretrained(model)
    assert resolve_shape(str(model)).params() == sum(p.numel() for p in real.parameters())


def test_plan_cli_text_json_and_errors(tmp_path):
    proc = run_cli(
        "plan",
        "--model",
        "8b",
        "--gpus-per-node",
        "8",
        "--nodes",
        "1",
        "--gpu-mem",
        "80",
        "--method",
        "full",
        "--zero",
        "3",
        "--seq-len",
        "4096",
        "--micro-batch",
        "1",
        check=True,
    )
    for words in (
        "params",
        "gradients",
        "optimizer",
        "activation peak",
        "trie-layout overhead",
        "fits in",
        "cheapest setup that fits",
        "fastest setup on these GPUs",
    ):
        assert words in proc.stdout
    p = json.loads(
        run_cli(
            "plan",
            "--model",
            "70b",
            "--gpus-per-node",
            "8",
            "--nodes",
            "1",
            "--gpu-mem",
            "80",
            "--method",
            "full",
            "--seq-len",
            "4096",
            "--micro-batch",
            "1",
            "--json",
            check=True,
        ).stdout
    )
    assert p["fits"] is False  # 70B full fine-tuning does not fit one node of 80 GB cards
    assert p["cheapest"]["nodes"] * p["cheapest"]["gpus_per_node"] >= 8
    q = json.loads(
        run_cli(
            "plan",
            "--model",
            "8b",
            "--gpus-per-node",
            "1",
            "--nodes",
            "1",
            "--gpu-mem",
            "24",
            "--method",
            "qlora",
            "--seq-len",
            "4096",
            "--micro-batch",
            "1",
            "--json",
            check=True,
        ).stdout
    )
    assert q["checkpointing"]["fits"] and not q["no_checkpointing"]["fits"]
    assert q["checkpointing"]["total_gib"] < p["checkpointing"]["total_gib"]
    bad = run_cli("plan", "--model", str(tmp_path / "nope"), "--method", "full")
    assert bad.returncode == 2 and "not a preset" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("plan", "--model", "8b", "--method", "qlora", "--zero", "3")
    assert bad.returncode == 2 and "qlora" in bad.stderr


def test_more_gpus_and_checkpointing_lower_memory():
    shape = PRESETS["70b"]
    one = plan(shape, Setup(nodes=1, gpus_per_node=8))
    four = plan(shape, Setup(nodes=4, gpus_per_node=8))
    assert four["per_gpu_gib"]["optimizer"] == pytest.approx(one["per_gpu_gib"]["optimizer"] / 4)
    assert one["checkpointing"]["total_gib"] < one["no_checkpointing"]["total_gib"]
    longer = plan(shape, Setup(nodes=4, gpus_per_node=8, seq_len=8192))
    assert (
        longer["checkpointing"]["activations_gib"]["trie_mask"] > four["checkpointing"]["activations_gib"]["trie_mask"]
    )


def test_there_are_recipes_for_the_papers_models():
    names = {p.stem for p in RECIPES}
    for model in ("llama3.1-8b", "qwen2.5-7b", "gemma2-9b"):
        for kind in ("qlora-24gb", "qlora-80gb", "zero3-8gpu", "lora"):
            assert f"{model}-{kind}" in names
    assert {"llama3.1-70b-zero3", "llama3.1-70b-zero3-offload"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_the_hardware_it_states(recipe):
    text = recipe.read_text()
    assert re.search(r"^# Hardware: .+", text, re.M), f"{recipe.name} must state its target hardware"
    cfg = load_config(recipe)
    shape, setup = setup_from_config(cfg)
    p = plan(shape, setup)
    assert p["fits"], f"{recipe.name}: {p['total_gib']:.1f} GiB > {p['budget_gib']:.1f} GiB"
    hw = re.search(r"^# Hardware: (\d+) node\(s\) x (\d+) GPU\(s\) of (\d+) GB", text, re.M)
    assert hw, f"{recipe.name}: '# Hardware: N node(s) x G GPU(s) of M GB ...' line"
    assert (setup.nodes, setup.gpus_per_node, setup.gpu_mem_gb) == (int(hw[1]), int(hw[2]), float(hw[3]))


def test_trie_overhead_follows_the_attention_method(tmp_path):
    """dense: the [L x L] bool mask plus an additive copy per layer; tree: the branch masks and the gathered
    history keys, linear in L; flex: neither. `cso-dist plan --attention` and pack.attention choose it."""
    shape = PRESETS["8b"]
    L, b = 8192, 2
    over = {}
    for attention in ("dense", "tree", "flex"):
        s = Setup(zero=3, seq_len=L, attention=attention, checkpointing=False)
        over[attention] = activations(shape, s, False)["trie_mask"]
    assert over["dense"] == L * L + shape.layers * L * L * b
    kv = shape.kv_heads * shape.head_dim
    assert over["tree"] == pytest.approx(L * 600 * (1 + shape.layers * b) + shape.layers * L * 2 * 5.5 * kv * b)
    assert over["flex"] == 0
    p = json.loads(run_cli("plan", "--model", "8b", "--seq-len", "8192", "--attention", "dense", "--json").stdout)
    q = json.loads(run_cli("plan", "--model", "8b", "--seq-len", "8192", "--tree-keys", "2", "--json").stdout)
    assert p["checkpointing"]["activations_gib"]["trie_mask"] > q["checkpointing"]["activations_gib"]["trie_mask"]
    bad = run_cli("plan", "--model", "8b", "--tree-keys", "0.5")
    assert bad.returncode != 0 and "--tree-keys must be >= 1" in bad.stderr
