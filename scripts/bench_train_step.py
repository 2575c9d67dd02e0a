"""The study's training step on CPU, measured and profiled: SmolLM2-135M-Instruct + LoRA (r 16, every projection),
DPO on the prefix trie with a cached reference, on the first ESConv train dialogues. Prints JSON: tokens/s per
precision (fp32, bf16-mixed) and the operators that take the step's time (torch.profiler, self CPU time).

    python scripts/bench_train_step.py [--dialogues 4] [--steps 6] [--precisions fp32,bf16-mixed] [--profile]

Run it alone on the machine: two torch processes on 2 cores slow each other down 3-5x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine

from cso_dist.config import load_config
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import write_dialogues
from cso_dist.models.gguf import fetch_model
from cso_dist.train.loop import run_train


def _config(work: Path, model: Path, data: Path, precision: str, steps: int, name: str, **over):
    return load_config(
        "configs/study.yaml",
        {
            "model.path": str(model),
            "model.precision": precision,
            "train.method": "dpo",
            "train.lr": 1e-3,
            "train.max_steps": steps,
            "train.log_every": 1,
            "train.save_every": 0,
            "train.train_file": str(data),
            "train.ref_cache": str(work / f"ref-{precision}"),
            "run.out_dir": str(work / name),
            **over,
        },
    )


def _rates(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    later = rows[1:] or rows  # the first step pays for warm-up
    return {
        "steps": len(rows),
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in later) / len(later), 1),
        "pairs_per_s": round(sum(r["pairs_per_s"] for r in later) / len(later), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dialogues", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precisions", default="fp32,bf16-mixed")
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps of the first precision")
    args = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # the runs' progress lines: stdout is the JSON alone
        out = _measure(args)
    print(json.dumps(out, indent=1))


def _measure(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    model = fetch_model("smollm2-135m-instruct")
    cfg0 = load_config("configs/study.yaml", {"model.path": str(model)})
    dialogues = build_dialogues(cfg0.data)[0][: args.dialogues]
    data = work / "train.jsonl"
    write_dialogues(data, dialogues)
    out = {"machine": machine(), "dialogues": args.dialogues, "steps": args.steps, "rates": {}}
    for precision in args.precisions.split(","):
        t0 = time.time()
        cfg = _config(work, model, data, precision, args.steps, f"run-{precision}")
        run_train(cfg, resume=False)
        out["rates"][precision] = _rates(Path(cfg.run.out_dir)) | {"wall_s": round(time.time() - t0, 1)}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        precision = args.precisions.split(",")[0]
        cfg = _config(work, model, data, precision, 2, "profiled")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_train(cfg, resume=False)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out["profile"] = [
            {
                "op": e.key,
                "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2),
                "share": round(e.self_cpu_time_total / total, 3),
                "calls": e.count,
            }
            for e in events[:25]
        ]
    return out


if __name__ == "__main__":
    main()
