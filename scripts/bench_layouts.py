"""Trie vs per-pair layout: DPO training throughput on the same tiny model, data and steps.

Prints one JSON object: for each layout, pairs/s, tokens processed per pair, wall time and
the final loss (the two must agree: same objective, same pairs), plus the machine.

    python scripts/bench_layouts.py --dialogues 24 --tokenizer qwen

pairs/s and tokens/s are those of the last optimizer step (steady state); tokens count what
the model processes (per-pair rows include their padding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine, same_pairs_overrides, tiny_model  # noqa: E402

from cso_dist.config import DataConfig, load_config  # noqa: E402
from cso_dist.data.build import build_dialogues  # noqa: E402
from cso_dist.data.dialogue import write_dialogues  # noqa: E402
from cso_dist.refcache import run_precompute  # noqa: E402
from cso_dist.train.tracking import read_metrics  # noqa: E402
from cso_dist.train.loop import run_train  # noqa: E402


def main() -> None:
    with contextlib.redirect_stdout(sys.stderr):  # progress and logs to stderr: stdout is one JSON object
        out = bench()
    print(json.dumps(out, indent=2))


def bench() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialogues", type=int, default=24, help="ESConv train dialogues (K=3 negatives per turn)")
    ap.add_argument("--tokenizer", default="qwen", choices=("qwen", "bpe"))
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens per micro-batch, both layouts")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--attention", default="auto", help="scorer.attention of the trie runs (auto, tree, flex, dense)")
    ap.add_argument("--layouts", default="trie,pair", help="comma-separated: trie, pair")
    ap.add_argument("--epochs", type=int, default=2, help="optimizer steps (one per epoch over all pairs)")
    ap.add_argument("--work", default="", help="working folder (default: a temporary one)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-layouts-"))
    dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train"))
    write_dialogues(work / "train.jsonl", dialogues[: args.dialogues])
    model = tiny_model(work, args.tokenizer, hidden_size=args.hidden_size, num_layers=args.layers)
    base = {
        "model.path": str(model),
        "train.train_file": str(work / "train.jsonl"),
        **same_pairs_overrides(args.max_length, args.max_tokens, args.epochs),
    }
    run_precompute(load_config(None, {**base, "run.out_dir": str(work / "pre")}), progress=False)
    results = {}
    for layout in args.layouts.split(","):
        over = {**base, "pack.layout": layout, "scorer.attention": args.attention, "run.out_dir": str(work / layout)}
        cfg = load_config(None, over)
        t0 = time.perf_counter()
        summary = run_train(cfg, progress=False, overwrite=True)
        wall = time.perf_counter() - t0
        m = read_metrics(work / layout)[-1]
        results[layout] = {
            "pairs_per_s": m["pairs_per_s"],
            "tokens_per_s": m["tokens_per_s"],
            "tokens_per_pair": m["tokens_per_s"] / m["pairs_per_s"],
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "run_seconds": wall,
            "steps": summary["steps"],
        }
    out = {
        "bench": "layouts",
        "dialogues": args.dialogues,
        "tokenizer": args.tokenizer,
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "max_tokens": args.max_tokens,
        "max_length": args.max_length,
        "attention": args.attention,
        **results,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": machine(),
    }
    if {"trie", "pair"} <= results.keys():
        tri, pair = results["trie"], results["pair"]
        out["speedup_pairs_per_s"] = tri["pairs_per_s"] / pair["pairs_per_s"]
        out["tokens_per_s_ratio"] = tri["tokens_per_s"] / pair["tokens_per_s"]
        out["token_ratio"] = pair["tokens_per_pair"] / tri["tokens_per_pair"]
        out["loss_abs_diff"] = abs(tri["loss"] - pair["loss"])
    return out


if __name__ == "__main__":
    main()
