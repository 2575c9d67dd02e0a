"""Trie vs per-pair scaling: DPO pairs/s and peak memory as negatives per turn and dialogue length grow.

Prints one JSON object: one row per grid point (layout x negatives K x turns T) with pairs,
pairs/s, tokens/pair, peak RSS and the final loss; per (K, T) the trie/pair speed-up, token and
memory ratios and |loss_trie - loss_pair| (same pairs, same objective: they must agree); the machine.
A compact table goes to stderr.

    python scripts/bench_scaling.py                     # 4k BPE vocab: 10.5 min on 2 cores shared with 2 other jobs
    python scripts/bench_scaling.py --dialogues 8       # smoother numbers, about twice the time
    python scripts/bench_scaling.py --negatives 1,3 --turns 2,4 --dialogues 2     # a quick look (~1.5 min)
    python scripts/bench_scaling.py --tokenizer qwen --dialogues 4    # real Qwen2.5 vocabulary (151k)

Data: ESConv train with K non-preferred options per supporter turn (data.negatives=K). Length:
the same --dialogues dialogues at every T -- the first ones (file order) with at least max(T)
target supporter turns -- each cut right after its T-th target supporter message
(messages[:turn_indices()[T-1] + 1]; 'all' keeps them whole). So pairs = dialogues x T x K
and only the length changes along T. Each point trains --epochs optimizer steps of
one step per epoch over all its pairs (train.grad_accum large), reference log-probs precomputed
first (in this process, not the point's); pairs/s and tokens/pair are those of the last step
(steady state; per-pair tokens include padding). Every point runs in its own subprocess
(this script with --point), so its peak RSS (VmHWM: the process's own high-water mark,
measured after torch and the package are imported and then at the end) is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine, same_pairs_overrides, tiny_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_scaling] {msg}", file=sys.stderr, flush=True)


def proc_mb(field: str) -> float:
    """VmHWM / VmRSS of this process in MB (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- one grid point (child process)
def run_point(spec: dict) -> dict:
    import torch

    from cso_dist.config import load_config
    from cso_dist.train.tracking import read_metrics
    from cso_dist.train.loop import run_train

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_start = proc_mb("VmRSS")
    cfg = load_config(None, spec["overrides"])
    t0 = time.perf_counter()
    summary = run_train(cfg, progress=False, overwrite=True)
    wall = time.perf_counter() - t0
    m = read_metrics(Path(spec["overrides"]["run.out_dir"]))[-1]
    return {
        "pairs_per_s": m["pairs_per_s"],
        "tokens_per_s": m["tokens_per_s"],
        "tokens_per_pair": m["tokens_per_s"] / m["pairs_per_s"],
        "step_seconds": spec["pairs"] / m["pairs_per_s"],
        "loss": m["loss"],
        "grad_norm": m["grad_norm"],
        "steps": summary["steps"],
        "run_seconds": wall,
        "rss_start_mb": rss_start,
        "peak_rss_mb": proc_mb("VmHWM"),
        "peak_rss_delta_mb": proc_mb("VmHWM") - rss_start,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the grid (parent process)
def cut(d, turns):
    """The dialogue up to (and including) its `turns`-th target supporter message."""
    if turns == "all":
        return d
    idx = d.turn_indices()
    return d if len(idx) <= turns else replace(d, messages=d.messages[: idx[turns - 1] + 1])


def parse_turns(s: str) -> list:
    out = []
    for x in s.split(","):
        x = x.strip()
        out.append("all" if x == "all" else int(x))
        if out[-1] != "all" and out[-1] < 1:
            raise SystemExit(f"--turns: {x} must be >= 1 or 'all'")
    return out


def bench(args) -> dict:
    import torch

    from cso_dist.config import DataConfig, load_config
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.refcache import run_precompute

    negs = [int(x) for x in args.negatives.split(",")]
    turns = parse_turns(args.turns)
    layouts = args.layouts.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scaling-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}")
    model = tiny_model(work, args.tokenizer, log, hidden_size=args.hidden_size, num_layers=args.layers)
    need = max([t for t in turns if t != "all"], default=1)
    ids = None
    rows, t_all = [], time.perf_counter()
    for k in negs:
        dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train", negatives=k))
        if ids is None:  # the preferred paths do not depend on K: pick the same dialogues for every K
            ids = [d.id for d in dialogues if len(d.turn_indices()) >= need][: args.dialogues]
            if len(ids) < args.dialogues:
                log(f"only {len(ids)} dialogues have >= {need} target turns")
        by_id = {d.id: d for d in dialogues}
        for t in turns:
            chosen = [cut(by_id[i], t) for i in ids]
            data = work / "data" / f"k{k}-t{t}.jsonl"
            write_dialogues(data, chosen)
            n_pairs = sum(len(d.messages[i].rejected) for d in chosen for i in d.turn_indices())
            n_turns = sum(len(d.turn_indices()) for d in chosen)
            base = {
                "model.path": str(model),
                "train.train_file": str(data),
                "train.ref_cache": str(work / "cache" / f"k{k}-t{t}"),
                **same_pairs_overrides(args.max_length, args.max_tokens, args.epochs),
            }
            with contextlib.redirect_stdout(sys.stderr):
                run_precompute(load_config(None, {**base, "run.out_dir": str(work / "pre")}), progress=False)
            for layout in layouts:
                out_dir = work / "runs" / f"{layout}-k{k}-t{t}"
                spec = {
                    "overrides": {**base, "pack.layout": layout, "run.out_dir": str(out_dir)},
                    "pairs": n_pairs,
                    "threads": args.threads,
                }
                row = {
                    "layout": layout,
                    "negatives": k,
                    "turns": t,
                    "dialogues": len(chosen),
                    "target_turns": n_turns,
                    "pairs": n_pairs,
                }
                logf = work / "logs" / f"{layout}-k{k}-t{t}.log"
                logf.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                try:
                    with open(logf, "w") as err:
                        p = subprocess.run(
                            [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(spec)],
                            stdout=subprocess.PIPE,
                            stderr=err,
                            text=True,
                            timeout=args.point_timeout,
                        )
                    if p.returncode == 0:
                        row.update(json.loads(p.stdout))
                    else:
                        tail = logf.read_text().strip().splitlines()[-3:]
                        row["error"] = f"exit {p.returncode}: {' | '.join(tail)}"
                except subprocess.TimeoutExpired:
                    row["error"] = f"timed out after {args.point_timeout}s"
                row["point_seconds"] = time.perf_counter() - t0
                rows.append(row)
                log(
                    f"{layout:4s} K={k} T={t}: {n_pairs} pairs, "
                    + (
                        f"{row['pairs_per_s']:.1f} pairs/s, {row['tokens_per_pair']:.0f} tok/pair, "
                        f"peak RSS {row['peak_rss_mb']:.0f} MB, loss {row['loss']:.6f}"
                        if "error" not in row
                        else row["error"]
                    )
                    + f" ({row['point_seconds']:.0f}s)"
                )

    compare = []
    for k in negs:
        for t in turns:
            pt = {r["layout"]: r for r in rows if r["negatives"] == k and r["turns"] == t and "error" not in r}
            if "trie" in pt and "pair" in pt:
                a, b = pt["trie"], pt["pair"]
                compare.append(
                    {
                        "negatives": k,
                        "turns": t,
                        "pairs": a["pairs"],
                        "speedup_pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
                        "token_ratio": b["tokens_per_pair"] / a["tokens_per_pair"],
                        "peak_rss_mb": {"trie": a["peak_rss_mb"], "pair": b["peak_rss_mb"]},
                        "peak_rss_delta_ratio": b["peak_rss_delta_mb"] / max(a["peak_rss_delta_mb"], 1e-9),
                        "loss_abs_diff": abs(a["loss"] - b["loss"]),
                    }
                )
    table(rows, compare)
    return {
        "bench": "scaling",
        "tokenizer": args.tokenizer,
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "max_tokens": args.max_tokens,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "dialogues": len(ids),
        "length_control": "same dialogues (>= max T target turns) cut after the T-th target turn",
        "points": rows,
        "compare": compare,
        "max_loss_abs_diff": max((c["loss_abs_diff"] for c in compare), default=None),
        "total_seconds": time.perf_counter() - t_all,
        "machine": machine(point_threads=args.threads or torch.get_num_threads()),
    }


def table(rows: list[dict], compare: list[dict]) -> None:
    by = {(r["layout"], r["negatives"], r["turns"]): r for r in rows}
    head = (
        f"{'K':>2} {'T':>4} {'pairs':>6} | {'trie p/s':>9} {'pair p/s':>9} {'speedup':>7} | "
        f"{'trie tok/p':>10} {'pair tok/p':>10} | {'trie RSS':>8} {'pair RSS':>8} | {'|dloss|':>8}"
    )
    lines = [head, "-" * len(head)]
    cmp = {(c["negatives"], c["turns"]): c for c in compare}
    for (layout, k, t), r in by.items():
        if layout != rows[0]["layout"]:
            continue
        a, b, c = by.get(("trie", k, t), {}), by.get(("pair", k, t), {}), cmp.get((k, t), {})
        f = lambda d, key, fmt: format(d[key], fmt) if key in d else "-"  # noqa: E731
        lines.append(
            f"{k:>2} {str(t):>4} {r['pairs']:>6} | "
            f"{f(a, 'pairs_per_s', '9.1f')} {f(b, 'pairs_per_s', '9.1f')} "
            f"{f(c, 'speedup_pairs_per_s', '6.2f') + 'x' if c else '      -':>7} | "
            f"{f(a, 'tokens_per_pair', '10.0f')} {f(b, 'tokens_per_pair', '10.0f')} | "
            f"{f(a, 'peak_rss_mb', '8.0f')} {f(b, 'peak_rss_mb', '8.0f')} | {f(c, 'loss_abs_diff', '8.1e')}"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--negatives", default="1,3,8", help="K values: non-preferred options per supporter turn")
    ap.add_argument("--turns", default="4,8,16", help="T values: target supporter turns kept per dialogue, or 'all'")
    ap.add_argument("--dialogues", type=int, default=4, help="dialogues at every point (with >= max T target turns)")
    ap.add_argument("--layouts", default="trie,pair")
    ap.add_argument("--tokenizer", default="bpe", choices=("bpe", "qwen"))
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens per micro-batch, both layouts")
    ap.add_argument("--max-length", type=int, default=2048, help="data.max_length")
    ap.add_argument("--epochs", type=int, default=2, help="optimizer steps (one per epoch over all pairs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per point (0 = torch's default)")
    ap.add_argument("--point-timeout", type=int, default=900, help="seconds per grid point")
    ap.add_argument("--work", default="", help="working folder (default: a temporary one)")
    ap.add_argument("--point", default="", help=argparse.SUPPRESS)  # internal: run one grid point (JSON spec)
    args = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # progress and logs to stderr: stdout is one JSON object
        out = run_point(json.loads(args.point)) if args.point else bench(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
