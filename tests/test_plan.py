"""The memory planner: parameter counts, DeepSpeed's model-state estimators, measured activations, recipes."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from cso_dist.config import load_config
from cso_dist.plan import PRESETS, Setup, activations, model_states, plan, resolve_shape, setup_from_config, stages
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
        "--finetune",
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
            "--finetune",
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
            "--finetune",
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
    bad = run_cli("plan", "--model", str(tmp_path / "nope"), "--finetune", "full")
    assert bad.returncode == 2 and "not a preset" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("plan", "--model", "8b", "--finetune", "qlora", "--zero", "3")
    assert bad.returncode == 2 and "qlora" in bad.stderr


def test_more_gpus_and_checkpointing_lower_memory():
    shape = PRESETS["70b"]
    one = plan(shape, Setup(nodes=1, gpus_per_node=8))
    four = plan(shape, Setup(nodes=4, gpus_per_node=8))
    assert four["per_gpu_gib"]["optimizer"] == pytest.approx(one["per_gpu_gib"]["optimizer"] / 4)
    assert one["checkpointing"]["total_gib"] < one["no_checkpointing"]["total_gib"]
    longer = plan(shape, Setup(nodes=4, gpus_per_node=8, seq_len=8192))
    assert longer["checkpointing"]["total_gib"] > four["checkpointing"]["total_gib"]
    assert four["checkpointing"]["activations_gib"]["trie_mask"] == 0  # flex (the default): no masks
    tree = [plan(shape, Setup(nodes=4, gpus_per_node=8, seq_len=n, attention="tree")) for n in (4096, 8192)]
    assert (
        tree[1]["checkpointing"]["activations_gib"]["trie_mask"]
        > tree[0]["checkpointing"]["activations_gib"]["trie_mask"]
    )


def test_there_are_recipes_for_the_papers_models():
    names = {p.stem for p in RECIPES}
    for model in ("llama3.1-8b", "qwen2.5-7b", "gemma2-9b"):
        for kind in ("qlora-24gb", "qlora-80gb", "zero3-8gpu", "lora"):
            assert f"{model}-{kind}" in names
    assert {"llama3.1-70b-zero3", "llama3.1-70b-zero3-offload", "llama3.1-70b-qlora-80gb"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_the_hardware_it_states(recipe):
    """Every stage of the recipe (precompute, train, eval likelihood, eval generate, export) fits the GPUs and the
    host memory its header names."""
    text = recipe.read_text()
    assert re.search(r"^# Hardware: .+", text, re.M), f"{recipe.name} must state its target hardware"
    cfg = load_config(recipe)
    shape, setup = setup_from_config(cfg)
    p = plan(shape, setup)
    assert p["fits"], f"{recipe.name}: {p['total_gib']:.1f} GiB > {p['budget_gib']:.1f} GiB"
    st = stages(shape, setup)
    for key, v in st.items():
        assert v["fits"] and v["fix"] is None, (recipe.name, key, v)
        assert v["per_gpu_gib"] <= p["budget_gib"] and v["host_gib"] <= setup.cpu_mem_gb * 0.9, (recipe.name, key)
    assert st["train"]["per_gpu_gib"] == p["total_gib"]
    hw = re.search(r"^# Hardware: (\d+) node\(s\) x (\d+) GPU\(s\) of (\d+) GB", text, re.M)
    assert hw, f"{recipe.name}: '# Hardware: N node(s) x G GPU(s) of M GB ...' line"
    assert (setup.nodes, setup.gpus_per_node, setup.gpu_mem_gb) == (int(hw[1]), int(hw[2]), float(hw[3]))
    host = re.search(r"^# Hardware: .*?(\d+) (GB|TB) host memory", text, re.M)
    if host:  # a stated host is the one the planner checks (plan.cpu_mem_gb)
        assert setup.cpu_mem_gb == int(host[1]) * (1024 if host[2] == "TB" else 1), recipe.name
    else:
        assert setup.cpu_mem_gb == 1024.0, recipe.name


def test_trie_overhead_follows_the_attention_method(tmp_path):
    """dense: the [L x L] bool mask plus an additive copy per layer; tree: the branch masks and the gathered
    history keys, linear in L; flex: neither. `cso-dist plan --attention` and scorer.attention choose it."""
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


# ---------------------------------------------------------------- every stage


def _plan_json(*args) -> dict:
    return json.loads(run_cli("plan", *args, "--json", check=True).stdout)


def _hand_weights(shape, s, adapters: bool) -> float:
    """A model's per-GPU weights without gradients, by hand: NF4 projections (QLoRA), 1/GPUs + the ZeRO-3 gather
    buffers (4 bytes per parameter of the largest layer; FSDP2: the embeddings and LM head and two layers, gathered
    from the other GPUs), or the whole model; LoRA adapters in fp32."""
    P, lin = shape.params(), shape.linear_params()
    if s.finetune == "qlora":
        w = lin * 4.127 / 8 + (P - lin) * 2
    elif s.zero == 3 and s.engine == "fsdp2":
        emb = shape.vocab * shape.hidden * (1 if shape.tied else 2)
        w = P * 2 / s.gpus + (emb + 2 * (P - emb) / shape.layers) * 2 * (1 - 1 / s.gpus)
    elif s.zero == 3:
        w = (0 if s.offload == "params" else P * 2 / s.gpus) + 4 * shape.largest_layer()
    else:
        w = P * 2
    lora = shape.lora_params(s.lora_r, s.lora_targets) if s.finetune != "full" else 0
    return w + (4 * lora if adapters else 0)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_stage_table_of_every_recipe(recipe, capsys):
    """`plan --config` prints a row per stage with the figures of its --json, and each figure is its parts: the
    weights as the engine holds them, the key/value cache of one generate() batch, the export's host bytes."""
    from cso_dist.cli import main

    assert main(["plan", "--config", str(recipe), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    st = p["stages"]
    assert list(st) == ["precompute", "train", "eval_likelihood", "eval_generate", "export"]
    assert p["all_fit"] is True and p["fits"] is True
    shape, s = setup_from_config(load_config(recipe))
    P, lora = shape.params(), shape.lora_params(s.lora_r, s.lora_targets) if s.finetune != "full" else 0
    for key, adapters in (("precompute", False), ("eval_likelihood", True)):
        assert st[key]["parts_gib"]["weights"] == pytest.approx(_hand_weights(shape, s, adapters) / GIB)
        assert st[key]["per_gpu_gib"] == pytest.approx(sum(st[key]["parts_gib"].values()))
        lm_head = min(s.logit_chunk, s.seq_len) * shape.vocab * (2 + 12)
        assert st[key]["parts_gib"]["LM head"] == pytest.approx(lm_head / GIB)
    kv = s.eval_batch * (s.max_length + s.max_new_tokens) * shape.layers * 2 * shape.kv_heads * shape.head_dim * 2
    g = st["eval_generate"]
    assert g["parts_gib"]["KV cache"] == pytest.approx(kv / GIB)
    assert g["parts_gib"]["weights"] == st["eval_likelihood"]["parts_gib"]["weights"]
    assert g["per_gpu_gib"] == pytest.approx(sum(g["parts_gib"].values()))
    host = (
        (6 * P if s.zero else 4 * P) if s.finetune == "full" else P * 2 + 4 * lora if s.final == "merged" else 4 * lora
    )
    assert st["export"]["host_gib"] == pytest.approx(host / GIB) and st["export"]["per_gpu_gib"] == 0
    assert st["train"]["per_gpu_gib"] == p["total_gib"]

    assert main(["plan", "--config", str(recipe)]) == 0
    text = capsys.readouterr().out
    section = text.split("\nevery stage (of 72.0 GiB" if p["budget_gib"] == 72 else "\nevery stage (of ")[
        1
    ].splitlines()
    labels = {"precompute": "precompute", "train": "train", "eval_likelihood": "eval likelihood"}
    rows = {key: next(x for x in section if x.startswith(f"  {label} ")) for key, label in labels.items()}
    rows["eval_generate"] = next(x for x in section if x.startswith("  eval generate "))
    rows["export"] = next(x for x in section if x.startswith("  export "))
    for key in ("precompute", "train", "eval_likelihood", "eval_generate"):
        assert f" {st[key]['per_gpu_gib']:.1f} " in rows[key] and " yes " in rows[key], rows[key]
    assert f" {st['export']['host_gib']:.1f} " in rows["export"] and " yes " in rows["export"]
    assert "every stage fits" in text and "fix:" not in text


def test_eval_generate_kv_cache_by_hand():
    """Llama-3.1-8B, 16 prompts of 2,048 tokens + 64 new: 16 x 2,112 tokens x 32 layers x (k, v) x 8 kv heads x
    128 x 2 bytes = 4,429,185,024 bytes = 4.125 GiB; the last token's logits in fp32: 16 x 128,256 x 4 bytes."""
    g = _plan_json("--model", "8b")["stages"]["eval_generate"]
    assert g["parts_gib"]["KV cache"] == 4_429_185_024 / GIB == 4.125
    assert g["parts_gib"]["logits"] == 16 * 128_256 * 4 / GIB
    assert g["tokens"] == 16 * 2112
    small = _plan_json("--model", "8b", "--eval-batch", "4", "--max-length", "1024")["stages"]["eval_generate"]
    assert small["parts_gib"]["KV cache"] == 4 * (1024 + 64) * 32 * 2 * 8 * 128 * 2 / GIB
    assert small["per_gpu_gib"] < g["per_gpu_gib"]


def test_precompute_of_70b_on_the_torch_engine_does_not_fit_and_zero3_does():
    """70B on 8 x 80 GB with the torch engine: the whole reference (131 GiB) on every GPU; the fix names ZeRO-3 over
    the job's 8 GPUs and its figure: 1/8 of the weights + the gather buffers + one layer's forward + the LM head."""
    p = _plan_json("--model", "70b", "--finetune", "full", "--zero", "0", "--gpus-per-node", "8")
    pre = p["stages"]["precompute"]
    shape = PRESETS["70b"]
    assert pre["fits"] is False and pre["parts_gib"]["weights"] == pytest.approx(shape.params() * 2 / GIB)
    sharded = stages(shape, Setup(finetune="full", zero=3, gpus_per_node=8))["precompute"]
    assert sharded["fits"] and sharded["parts_gib"]["weights"] == pytest.approx(
        (shape.params() * 2 / 8 + 4 * shape.largest_layer()) / GIB
    )
    assert pre["fix"] == (
        f"run it with dist.engine deepspeed (ZeRO-3) over the job's 8 GPUs ({sharded['per_gpu_gib']:.1f} GiB per GPU)"
    )
    assert p["all_fit"] is False and p["stages"]["eval_likelihood"]["fits"] is False


@pytest.mark.parametrize("command", ["precompute", "train"])
def test_dry_run_refuses_a_stage_that_cannot_fit(command, capsys):
    """The 70B recipe on the torch engine: the reference does not fit a GPU; --dry-run exits 2 with one line that
    names the stage, its figure and the fix (and the other stages that do not fit)."""
    from cso_dist.cli import main

    code = main(
        [command, "--config", str(REPO / "configs" / "llama3.1-70b-zero3.yaml"), "--dist.engine", "torch", "--dry-run"]
    )
    out = capsys.readouterr()
    assert code == 2 and "config and inputs ok" not in out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(
        f"cso-dist: error: {command} --dry-run: stage precompute does not fit (134.1 GiB per GPU of 72.0 usable)"
    )
    assert "run it with dist.engine deepspeed (ZeRO-3) over the job's 32 GPUs (10.7 GiB per GPU)" in lines[0]
    assert "stage train does not fit" in lines[0] and "stage eval generate does not fit" in lines[0]


def test_dry_run_prints_the_stage_table_only_with_plan_model():
    from cso_dist.train.preflight import stage_table

    table, problems = stage_table(load_config(REPO / "configs" / "llama3.1-70b-zero3.yaml"))
    assert problems == [] and table[-1] == "every stage fits"
    assert any(line.split()[:2] == ["precompute", "10.7"] for line in table), table
    assert stage_table(load_config(REPO / "configs" / "llama3.1-70b-zero3.yaml", {"plan.model": ""})) == ([], [])


def test_export_host_memory():
    """ZeRO full fine-tuning: fp32 consolidation + the bf16 model, 6 bytes/param on one host; the torch engine: the
    model and its state dict; LoRA/QLoRA merged: the base in bf16 + the fp32 adapter, or the adapter alone."""
    shape = PRESETS["70b"]
    P, lora = shape.params(), shape.lora_params(16)
    full = _plan_json("--config", "configs/llama3.1-70b-zero3.yaml")["stages"]["export"]
    assert full["host_gib"] == pytest.approx(6 * P / GIB) and round(full["host_gib"], 1) == 394.2
    torch_full = _plan_json("--model", "8b", "--finetune", "full", "--zero", "0")["stages"]["export"]
    assert torch_full["host_gib"] == pytest.approx(2 * PRESETS["8b"].params() * 2 / GIB)
    merged = _plan_json(
        "--model", "70b", "--finetune", "qlora", "--gpus-per-node", "1", "--lora-r", "16", "--cpu-mem", "128"
    )
    e = merged["stages"]["export"]
    assert e["host_gib"] == pytest.approx((P * 2 + 4 * lora) / GIB) and e["fits"] is False
    assert e["fix"] == f"train.final adapter (merge on a host with >= {math.ceil(e['host_gib'] / 0.9)} GB)"
    assert merged["fits"] is True and merged["all_fit"] is False  # the training step fits; its export does not
    adapter = _plan_json("--config", "configs/llama3.1-70b-qlora-80gb.yaml")["stages"]["export"]
    assert adapter["host_gib"] == pytest.approx(4 * shape.lora_params(64) / GIB) and adapter["fits"]
    text = run_cli("plan", "--model", "70b", "--finetune", "qlora", "--gpus-per-node", "1", "--cpu-mem", "128").stdout
    assert "    fix: train.final adapter (merge on a host with >= 147 GB)" in text


def test_served_generation_is_not_counted_and_names_the_vllm_line():
    """eval.backend openai: generation runs on the user's server; the line serves the model at the smallest
    tensor-parallel size where (weights + the batch's KV cache) / TP fits the card."""
    served = ["--config", "configs/llama3.1-70b-zero3.yaml", "--eval.backend", "openai"]
    served += ["--eval.endpoint", "http://gpu01:8000/v1", "--eval.served_model", "llama"]
    p = _plan_json(*served)
    g = p["stages"]["eval_generate"]
    shape = PRESETS["70b"]
    need = shape.params() * 2 + 16 * (4096 + 64) * 80 * 2 * 8 * 128 * 2
    assert need / 2 > 72 * GIB >= need / 4  # TP 2 does not fit an 80 GB card, TP 4 does
    assert g["served"] is True and g["fits"] is True and g["per_gpu_gib"] == 0 and g["fix"] is None
    assert g["serve"] == "vllm serve meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 4 --max-model-len 4160"
    assert g["server_per_gpu_gib"] == pytest.approx(need / 4 / GIB)
    text = run_cli("plan", *served).stdout
    assert "served, not on these GPUs: vllm serve meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 4" in text
    # a QLoRA run whose model does not fit the card even one prompt at a time: the fix is the served backend
    q = _plan_json("--model", "70b", "--finetune", "qlora", "--gpus-per-node", "1", "--gpu-mem", "40")
    assert q["stages"]["eval_generate"]["fix"] == (
        "use eval.backend openai (vllm serve MODEL --tensor-parallel-size 4 --max-model-len 2112)"
    )


def test_eval_generate_fix_is_the_largest_batch_that_fits():
    """Gemma-2-9B on one 80 GB GPU with 16 prompts of 4,096 tokens: eager attention's prefill scores overflow the
    card; the fix is the largest eval.batch_size that fits, with its figure."""
    p = _plan_json("--config", "configs/gemma2-9b-lora.yaml", "--eval.batch_size", "16")
    g = p["stages"]["eval_generate"]
    assert g["fits"] is False and g["per_gpu_gib"] > 72
    shape, s = setup_from_config(load_config(REPO / "configs" / "gemma2-9b-lora.yaml"))
    assert s.eval_batch == 8
    assert g["fix"] == f"eval.batch_size 8 ({stages(shape, s)['eval_generate']['per_gpu_gib']:.1f} GiB per GPU)"


def test_plan_method_is_the_old_name_of_finetune():
    old = run_cli("plan", "--model", "8b", "--method", "qlora", "--gpus-per-node", "1", "--json")
    new = run_cli("plan", "--model", "8b", "--finetune", "qlora", "--gpus-per-node", "1", "--json")
    assert old.returncode == 0 and old.stderr.strip().splitlines() == [
        "cso-dist: note: plan --method is now --finetune"
    ]
    assert json.loads(old.stdout) == json.loads(new.stdout) and new.stderr == ""
    assert json.loads(new.stdout)["setup"]["finetune"] == "qlora" and "method" not in json.loads(new.stdout)["setup"]


def test_precompute_is_not_run_without_a_reference_cache():
    """SFT reads no reference, and train.reference adapter scores it live: no precompute stage."""
    for override in (["--train.method", "sft"], ["--train.reference", "adapter"]):
        st = _plan_json("--config", "configs/llama3.1-8b-lora.yaml", *override)["stages"]
        assert st["precompute"]["skipped"] and st["precompute"]["per_gpu_gib"] == 0 and st["precompute"]["fits"]
        assert st["eval_likelihood"]["per_gpu_gib"] > 15
