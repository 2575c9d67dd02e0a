"""GPU step benchmark: tokens/s, MFU on unique tokens and peak memory of one QLoRA step and one
ZeRO-3 step, for a randomly initialised Llama-architecture model (1B or 8B shapes), trie layout,
real ESConv dialogues. Prints one JSON object; without a CUDA device it prints {"skipped": ...}.

    python scripts/bench_gpu.py --shape 1b --mode qlora
    python scripts/bench_gpu.py --shape 8b --mode zero3 --ds zero3_offload

Unique tokens are the tokens of the packed tries (each shared history once). MFU counts
6 N FLOPs per unique token for full fine-tuning and 4 N for QLoRA (no weight gradients of the
frozen base), attention FLOPs excluded, against the card's dense bf16 peak. The vocabulary is the
Qwen2.5 one (151,665 ids) for every shape, so the 8B "Llama" has a slightly larger embedding.
`--shape tiny --allow-cpu` runs the same code on CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import peak_bf16  # noqa: E402

from cso_dist import dist  # noqa: E402
from cso_dist.config import DataConfig, load_config, parse_overrides  # noqa: E402
from cso_dist.data.build import build_dialogues  # noqa: E402
from cso_dist.data.dialogue import write_dialogues  # noqa: E402
from cso_dist.dist import World  # noqa: E402
from cso_dist.engine import build_engine  # noqa: E402
from cso_dist.models import qwen_tokenizer  # noqa: E402
from cso_dist.objective import micro_loss  # noqa: E402
from cso_dist.inputs import make_cfg_renderer, resolve_sset  # noqa: E402
from cso_dist.train import make_layout, micro_batches  # noqa: E402

SHAPES = {  # Llama-3 shapes (hidden, layers, heads, kv heads, MLP)
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
    "8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336
    ),
}


def main() -> None:
    with contextlib.redirect_stdout(sys.stderr):
        out = bench()
    print(json.dumps(out, indent=2))


def bench() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--mode", choices=("qlora", "zero3"), default="qlora")
    ap.add_argument("--ds", default="zero3", help="DeepSpeed config for --mode zero3 (zero3, zero3_offload, a path)")
    ap.add_argument("--dialogues", type=int, default=16, help="ESConv train dialogues (K=3 negatives per turn)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="tokens per micro-batch")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--allow-cpu", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        return {"skipped": "no CUDA device on this machine (run on a GPU, or --shape tiny --allow-cpu)"}

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    tok = qwen_tokenizer("chatml")
    from transformers import AutoModelForCausalLM, LlamaConfig

    mcfg = LlamaConfig(
        **SHAPES[args.shape],
        vocab_size=len(tok),
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    t0 = time.time()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    build_s = time.time() - t0

    dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train"))
    write_dialogues(work / "train.jsonl", dialogues[: args.dialogues])
    over = {
        "model.path": work / "model",
        "model.method": "qlora" if args.mode == "qlora" else "full",
        "model.precision": "bf16",
        "train.train_file": work / "train.jsonl",
        "run.out_dir": work / "run",
        "pack.max_tokens": args.max_tokens,
        "data.max_length": min(args.max_tokens, 2048),
        "train.gradient_checkpointing": "true",
        "train.lr": 1e-5,
        "train.warmup_ratio": 0,
        "dist.engine": "torch" if args.mode == "qlora" else "deepspeed",
        "dist.deepspeed_config": args.ds,
    }
    cfg = load_config(None, parse_overrides([f"--{k}={v}" for k, v in over.items()]))
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    batches = micro_batches(
        make_layout(cfg, dialogues[: args.dialogues], renderer, sset, False), list(range(args.dialogues))
    )
    need = args.micro * (args.steps + 1)
    batches = (batches * (need // max(len(batches), 1) + 1))[:need]
    steps = [batches[i : i + args.micro] for i in range(0, need, args.micro)]
    ref = {rid.key: (0.0, 1) for b in batches for rid in b.reply_ids}

    world = World()
    if args.mode == "zero3":
        dist.init_single()
    engine = build_engine(cfg, world, len(steps))
    cuda = torch.cuda.is_available()
    times, tokens = [], []
    for i, micro in enumerate(steps):
        if cuda:
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        counts = {k: sum(b.counts[k] for b in micro) for k in ("chosen", "pairs", "kto")}
        for b in micro:
            logps = engine.forward(b.data)
            loss, _ = micro_loss(cfg.train, b.reply_ids, logps, b.data.reply_tokens, ref, counts)
            engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
            tokens.append(sum(b.n_tokens for b in micro))
    tok_s = sum(tokens) / sum(times)
    flops_per_token = (4 if args.mode == "qlora" else 6) * n_params
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_bf16(name) if cuda else None
    return {
        "device": name,
        "shape": args.shape,
        "mode": args.mode,
        "ds_config": args.ds if args.mode == "zero3" else None,
        "params": n_params,
        "micro_batch_tokens": args.max_tokens,
        "micro_per_step": args.micro,
        "unique_tokens_per_step": sum(tokens) / len(tokens),
        "step_s": sum(times) / len(times),
        "tokens_per_s": tok_s,
        "mfu": tok_s * flops_per_token / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "model_build_s": build_s,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    main()
