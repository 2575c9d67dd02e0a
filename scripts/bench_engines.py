"""The two sharded engines side by side: DeepSpeed ZeRO-3 and FSDP2 on the same tiny model, data and steps, on 2
CPU ranks (torchrun, gloo). Each run is its own process group; the engines alternate (A B A B A B) so that a slow
spell of the machine hits both. Prints one JSON object: per run, rank 0's median tokens/s and each rank's peak RSS;
per engine, their medians; and FSDP2 over ZeRO-3 as ratios (step time, peak RSS per rank), with the machine.

    python scripts/bench_engines.py --repeats 3 --steps 6

The rate is the tokens/s each step logs (the training loop's own clock; both engines run the same tokens, so the
step-time ratio is the inverse of the rates'); the first step is left out (it warms up). Peak RSS is the rank's
VmHWM when its run ends (this script's --worker mode, which writes it to the run folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine, tiny_model  # noqa: E402

ENGINES = {"zero3": {"dist.engine": "deepspeed", "dist.deepspeed_config": "zero3"}, "fsdp2": {"dist.engine": "fsdp2"}}


def worker(args) -> None:
    """One rank of one run (under torchrun): train, then print this rank's peak RSS and step times."""
    from cso_dist.config import load_config, parse_overrides
    from cso_dist.engines.dist import world_from_env
    from cso_dist.train.tracking import read_metrics
    from cso_dist.train.loop import run_train

    over = json.loads(args.overrides)
    cfg = load_config(None, parse_overrides([f"--{k}={v}" for k, v in over.items()]))
    with contextlib.redirect_stdout(sys.stderr):
        run_train(cfg, progress=False)
    hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
    world = world_from_env()
    rows = [m for m in read_metrics(Path(cfg.run.out_dir)) if "tokens_per_s" in m]
    rates = [m["tokens_per_s"] for m in rows]
    row = {"rank": world.rank, "peak_rss_bytes": hwm, "tokens_per_s": rates}
    (Path(cfg.run.out_dir) / f"bench-rank{world.rank}.json").write_text(json.dumps(row))


def run(work: Path, model: Path, name: str, steps: int, tag: str) -> dict:
    out = work / f"{name}-{tag}"
    over = {
        "model.path": model,
        "train.train_file": work / "train.jsonl",
        "train.ref_cache": work / "refcache",
        "run.out_dir": out,
        "data.max_length": 512,
        "pack.max_tokens": 1024,
        "train.max_steps": steps,
        "train.grad_accum": 2,
        "train.warmup_ratio": 0,
        **ENGINES[name],
    }
    over = {k: str(v) for k, v in over.items()}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += [str(Path(__file__).resolve()), "--worker", "--overrides", json.dumps(over)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("bench-rank*.json"))]
    rate = statistics.median(x for r in ranks if r["rank"] == 0 for x in r["tokens_per_s"][1:])
    return {"engine": name, "tokens_per_s": rate, "peak_rss_bytes": sorted(r["peak_rss_bytes"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is left out)")
    ap.add_argument("--dialogues", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from cso_dist.config import DataConfig
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.refcache import run_precompute
    from cso_dist.config import load_config, parse_overrides

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-engines-"))
    with contextlib.redirect_stdout(sys.stderr):
        dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train"))
        write_dialogues(work / "train.jsonl", dialogues[: args.dialogues])
        model = tiny_model(work, "bpe", hidden_size=args.hidden_size, num_layers=args.layers)
        pre = {"model.path": model, "train.train_file": work / "train.jsonl", "train.ref_cache": work / "refcache"}
        pre |= {"data.max_length": 512, "pack.max_tokens": 1024, "run.out_dir": work / "pre"}
        run_precompute(load_config(None, parse_overrides([f"--{k}={v}" for k, v in pre.items()])), progress=False)
    runs = [run(work, model, name, args.steps, str(i)) for i in range(args.repeats) for name in ENGINES]
    per = {}
    for name in ENGINES:
        mine = [r for r in runs if r["engine"] == name]
        per[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "peak_rss_bytes_per_rank": statistics.median(max(r["peak_rss_bytes"]) for r in mine),
        }
    ratios = {
        "step_time": per["zero3"]["tokens_per_s"] / per["fsdp2"]["tokens_per_s"],  # same tokens per step
        "peak_rss_per_rank": per["fsdp2"]["peak_rss_bytes_per_rank"] / per["zero3"]["peak_rss_bytes_per_rank"],
    }
    out = {"machine": machine(), "settings": vars(args), "runs": runs, "engines": per, "fsdp2_over_zero3": ratios}
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
