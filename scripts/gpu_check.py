"""The GPU check: tree attention's exactness and speed, against the per-pair layout and TRL, and measured
peak memory against `cso-dist plan`. One prepared run (<= 8 min on one H100 / H200) writing one JSON.

    python scripts/gpu_check.py --out gpu_check.json     # on a GPU machine
    python scripts/gpu_check.py --smoke --out x.json     # CPU, tiny shapes, about a minute (the test suite)

It needs the package installed in a CUDA torch environment (`pip install -e '.[bench]'`; trl only for the TRL
row, which is skipped without it) and ESConv in the data folder (CSO_DATA_DIR, or `cso-dist data fetch esconv`).

Sections of the JSON:
  exactness   per attention method (tree, flex, dense): every reply's summed log-prob of the trie layout
              against the per-pair layout (max and median relative difference), and the gradient of a
              weighted sum of them against dense (max difference / max |gradient|); bf16 on the GPU, fp32 in
              --smoke (where flex runs forward only: FlexAttention has no CPU backward)
  throughput  per shape (Qwen2.5-0.5B and 1.5B built from their configs, random weights; --smoke: tiny) and
              variant -- trie with each method, the per-pair layout, TRL's DPOTrainer (precomputed reference;
              skipped where trl is not installed) -- on the same ESConv pairs: tokens/s (tokens processed,
              padding included), pairs/s, and MFU on unique tokens (the trie's token count, 6 N FLOPs per
              token, attention excluded) against the card's dense bf16 peak. Full fine-tuning DPO steps with a
              cached reference, bf16 weights, after one warm-up step.
  memory      measured peak GPU memory (max_memory_allocated) of one QLoRA and one full fine-tuning step on the
              0.5B shape against the planner's total for the same shape, row and attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import peak_bf16  # noqa: E402

from cso_dist.config import DataConfig, load_config, parse_overrides  # noqa: E402
from cso_dist.data.build import build_dialogues  # noqa: E402
from cso_dist.data.dialogue import write_dialogues  # noqa: E402
from cso_dist.dist import World  # noqa: E402
from cso_dist.engine import build_engine  # noqa: E402
from cso_dist.inputs import make_cfg_renderer, resolve_sset  # noqa: E402
from cso_dist.data.esconv import esconv_texts  # noqa: E402
from cso_dist.models import qwen_tokenizer  # noqa: E402
from cso_dist.models.tokenizer import bpe_tokenizer  # noqa: E402
from cso_dist.objective import micro_loss  # noqa: E402
from cso_dist.pack.attention import tree_plan, use_attention  # noqa: E402
from cso_dist.pack.layout import PairLayout, TrieLayout  # noqa: E402
from cso_dist.plan import Setup, plan, shape_from_hf_config  # noqa: E402
from cso_dist.train import make_layout, micro_batches  # noqa: E402

SHAPES = {  # Qwen2.5 shapes (tied embeddings, GQA), built from config with random weights
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
}
METHODS = ("tree", "flex", "dense")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(work: Path, shape: str, dtype: torch.dtype) -> tuple[Path, int]:
    """The shape with the real Qwen2.5 vocabulary; `tiny` (--smoke) with a 4k ESConv BPE one, so that the
    per-pair layout's full logits stay cheap on CPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = work / shape
    tok = bpe_tokenizer(esconv_texts(), vocab_size=4096, template="chatml") if shape == "tiny" else qwen_tokenizer()
    cfg = Qwen2Config(
        **SHAPES[shape],
        vocab_size=len(tok),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, n


def run_config(work: Path, model: Path, smoke: bool, **over):
    base = {
        "model.path": model,
        "model.method": "full",
        "model.precision": "fp32" if smoke else "bf16",
        "train.train_file": work / "train.jsonl",
        "run.out_dir": work / "run",
        "pack.max_tokens": 2048 if smoke else 8192,
        "data.max_length": 1024 if smoke else 2048,
        "train.lr": 1e-6,
        "train.warmup_ratio": 0,
        "train.gradient_checkpointing": "false" if smoke else "true",
    }
    base.update(over)
    return load_config(None, parse_overrides([f"--{k}={v}" for k, v in base.items()]))


# ---------------------------------------------------------------- exactness
def exactness(work: Path, model_path: Path, dialogues, smoke: bool) -> dict:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = run_config(work, model_path, smoke)
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    trie = TrieLayout(dialogues, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length, progress=False)
    pair = PairLayout(dialogues, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length)
    order = list(range(len(dialogues)))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").to(device)
    with torch.no_grad():
        per_pair = {}
        for b in pair.batches(order):
            per_pair.update(zip(b.reply_ids, b.logps(model).float().tolist()))
    out, grads = {}, {}
    for method in METHODS:
        use_attention(model, method)
        backward = device == "cuda" or method != "flex"
        model.zero_grad(set_to_none=True)
        got, w = {}, torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for b in trie.batches(order):
            with torch.set_grad_enabled(backward):
                lp = b.logps(model, cfg.pack.logit_chunk)
                if backward:
                    (lp.float() * torch.randn(len(lp), generator=w).to(lp.device)).sum().backward()
            got.update(zip(b.reply_ids, lp.detach().float().tolist()))
        sync()
        rel = [abs(got[k] - v) / max(abs(v), 1e-6) for k, v in per_pair.items() if k in got]
        out[method] = {
            "replies": len(rel),
            "max_rel_diff_vs_per_pair": max(rel),
            "median_rel_diff_vs_per_pair": statistics.median(rel),
            "seconds": time.perf_counter() - t0,
        }
        if backward:
            grads[method] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    use_attention(model, "dense")
    for method, g in grads.items():
        if method != "dense":
            worst = max(
                (g[n] - grads["dense"][n]).abs().max().item() / (grads["dense"][n].abs().max().item() or 1) for n in g
            )
            out[method]["grad_max_rel_diff_vs_dense"] = worst
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


# ---------------------------------------------------------------- throughput
def step_rate(cfg, dialogues, steps: int) -> dict:
    """tokens/s and pairs/s of full fine-tuning DPO steps over `dialogues` (one step = all of them)."""
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    layout = make_layout(cfg, dialogues, renderer, sset, False)
    micro = micro_batches(layout, list(range(len(dialogues))))
    ref = {rid.key: (0.0, 1) for b in micro for rid in b.reply_ids}  # a cached reference: its values do not matter
    engine = build_engine(cfg, World(), steps + 1)
    counts = {k: sum(b.counts[k] for b in micro) for k in ("chosen", "pairs", "kto")}
    times = []
    for i in range(steps + 1):  # step 0 warms up (flex: compiles)
        sync()
        t0 = time.perf_counter()
        for b in micro:
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
            engine.backward(loss)
        engine.step()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    del engine
    return {
        "tokens_per_step": sum(b.n_tokens for b in micro),
        "pairs_per_step": counts["pairs"],
        "micro_batches": len(micro),
        "step_s": s,
        "tokens_per_s": sum(b.n_tokens for b in micro) / s,
        "pairs_per_s": counts["pairs"] / s,
    }


def trl_rate(cfg, dialogues, steps: int, model_path: Path, smoke: bool) -> dict:
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        return {"skipped": f"trl is not installed ({e.name})"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_trl_variants import pair_table

    from cso_dist.models import load_tokenizer

    write_dialogues(Path(cfg.train.train_file), dialogues)
    table = pair_table(cfg)
    n = len(table)
    b = max(d for d in range(1, min(8, n) + 1) if n % d == 0)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in table])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if smoke else torch.bfloat16)
    args = DPOConfig(
        output_dir=str(Path(cfg.run.out_dir) / "trl"),
        per_device_train_batch_size=b,
        gradient_accumulation_steps=n // b,
        max_steps=steps + 1,
        learning_rate=1e-6,
        max_length=cfg.data.max_length,
        precompute_ref_log_probs=True,
        gradient_checkpointing=not smoke,
        bf16=not smoke,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=load_tokenizer(model_path))
    tokens = []
    orig = trainer.compute_loss

    def counted(model, inputs, *a, **k):
        tokens.append(inputs["input_ids"].numel())
        return orig(model, inputs, *a, **k)

    trainer.compute_loss = counted
    t0 = time.perf_counter()
    trainer.train()
    sync()
    total = time.perf_counter() - t0
    step_tokens = sum(tokens) / (steps + 1)
    s = total / (steps + 1)  # includes the warm-up step: a conservative rate for TRL
    return {"pairs_per_step": n, "step_s": s, "tokens_per_s": step_tokens / s, "pairs_per_s": n / s, "batch": b}


def throughput(work: Path, shape: str, dialogues, smoke: bool, steps: int) -> dict:
    model_path, n_params = build_model(work, shape, torch.float32 if smoke else torch.bfloat16)
    out: dict = {"params": n_params}
    variants = [(f"trie_{m}", {"pack.layout": "trie", "pack.attention": m}) for m in METHODS]
    variants.append(("per_pair", {"pack.layout": "pair"}))
    for name, over in variants:
        if smoke and name == "trie_flex":
            out[name] = {"skipped": "FlexAttention has no CPU backward"}
            continue
        log(f"  {shape} {name}")
        out[name] = step_rate(run_config(work, model_path, smoke, **over), dialogues, steps)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out["trl_dpo"] = trl_rate(run_config(work, model_path, smoke), dialogues, steps, model_path, smoke)
    unique = out["trie_tree"]["tokens_per_step"]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_bf16(name)
    for r in out.values():
        if isinstance(r, dict) and "step_s" in r:
            r["unique_tokens_per_s"] = unique * r["pairs_per_s"] / out["trie_tree"]["pairs_per_step"]
            r["mfu_unique_tokens"] = r["unique_tokens_per_s"] * 6 * n_params / peak if peak else None
    return out


# ---------------------------------------------------------------- memory
def memory(work: Path, dialogues, smoke: bool) -> dict:
    shape = "tiny" if smoke else "qwen2.5-0.5b"
    model_path = work / shape
    out = {}
    for method in ("qlora", "full"):
        cfg = run_config(work, model_path, smoke, **{"model.method": method, "model.precision": "bf16"})
        renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
        micro = micro_batches(make_layout(cfg, dialogues, renderer, sset, False), list(range(len(dialogues))))
        b = max(micro, key=lambda x: x.n_tokens)
        ref = {rid.key: (0.0, 1) for rid in b.reply_ids}
        engine = build_engine(cfg, World(), 2)
        cuda = torch.cuda.is_available()
        for i in range(2):  # the second step: optimizer state exists
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, b.counts)
            engine.backward(loss)
            engine.step()
        measured = torch.cuda.max_memory_allocated() if cuda else None
        del engine
        keys, mask = tree_plan(b.data).per_token()
        setup = Setup(
            method=method,
            zero=0,
            gpus_per_node=1,
            seq_len=b.n_tokens,
            micro_batch=1,
            checkpointing=cfg.train.gradient_checkpointing,
            logit_chunk=cfg.pack.logit_chunk,
            bytes_per_el=2,
            attention="tree",
            tree_keys=keys,
            tree_mask=mask,
        )
        p = plan(shape_from_hf_config(model_path), setup)
        out[method] = {
            "row_tokens": b.n_tokens,
            "checkpointing": cfg.train.gradient_checkpointing,
            "measured_peak_gib": measured / 2**30 if measured is not None else None,
            "planned_gib": p["total_gib"],
            "planned_trie_overhead_gib": p["checkpointing" if setup.checkpointing else "no_checkpointing"][
                "activations_gib"
            ]["trie_mask"],
            "ratio": p["total_gib"] * 2**30 / measured if measured else None,
        }
        if cuda:
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32: the code path in seconds")
    ap.add_argument("--dialogues", type=int, default=0, help="ESConv train dialogues (default 16; --smoke 1)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per variant (default 3; --smoke 1)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --smoke for the CPU code path)")
    n_dlg, steps = args.dialogues or (1 if args.smoke else 16), args.steps or (1 if args.smoke else 3)
    t_all = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train"))
        dialogues = dialogues[:n_dlg]
        write_dialogues(work / "train.jsonl", dialogues)
        shapes = ["tiny"] if args.smoke else ["qwen2.5-0.5b", "qwen2.5-1.5b"]
        result: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        result["smoke"] = args.smoke
        result["dialogues"] = n_dlg
        result["throughput"] = {}
        for shape in shapes:
            t0 = time.perf_counter()
            result["throughput"][shape] = throughput(work, shape, dialogues, args.smoke, steps)
            result["throughput"][shape]["seconds"] = time.perf_counter() - t0
            if shape == shapes[0]:
                log("exactness")
                result["exactness"] = exactness(work, work / shape, dialogues[:2], args.smoke)
        log("memory")
        result["memory"] = memory(work, dialogues[:4], args.smoke)
        result["torch"] = torch.__version__
        result["seconds"] = time.perf_counter() - t_all
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "seconds")}))


if __name__ == "__main__":
    main()
