"""The paper's comparison at CPU scale: SFT on ESConv gold replies, then, from that SFT checkpoint,
CSO with DPO and with each other loss (IPO, SimPO, KTO, ORPO), all scored on ESConv test with
the same settings. Prints one JSON object (the table rows) and writes <work>/study.md, the
evaluation report with plots (<work>/report) and every run folder.

    python scripts/study_cpu.py --work runs/study          # ~30-60 min on 2 CPU cores

Strategy metrics (Q, W, B) use likelihood prediction on the whole test split (the most likely
"(<strategy>)" prefix after each history: deterministic, the natural metric for tiny models);
text metrics and the generated-strategy Q/W/B use greedy generation on the first
--gen-dialogues test dialogues.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cso_dist.config import DataConfig, load_config, parse_overrides  # noqa: E402
from cso_dist.data.build import build_dialogues  # noqa: E402
from cso_dist.data.dialogue import write_dialogues  # noqa: E402
from cso_dist.data.esconv import esconv_texts  # noqa: E402
from cso_dist.data.strategies import load_strategy_set  # noqa: E402
from cso_dist.eval.generate import run_generate  # noqa: E402
from cso_dist.eval.report import run_report, score_file  # noqa: E402
from cso_dist.models import build_tiny_model  # noqa: E402
from cso_dist.refcache import run_precompute  # noqa: E402
from cso_dist.train import run_train  # noqa: E402

LOSSES = ("dpo", "ipo", "simpo", "kto", "orpo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/study")
    ap.add_argument("--train-dialogues", type=int, default=300)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sft-epochs", type=int, default=3)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--cso-epochs", type=int, default=1)
    ap.add_argument("--cso-lr", type=float, default=2e-4)
    ap.add_argument("--methods", default=",".join(LOSSES))
    ap.add_argument("--gen-dialogues", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=768)
    args = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        rows = study(args)
    print(json.dumps(rows, indent=2))


def _cfg(work: Path, name: str, **over) -> object:
    base = {
        "data.max_length": 768,
        "pack.max_tokens": 2048,
        "train.warmup_ratio": 0.05,
        "train.schedule": "cosine",
        "train.grad_accum": 2,
        "train.log_every": 5,
        "run.seed": 0,
        "eval.batch_size": 32,
        "eval.max_new_tokens": 48,
        "run.out_dir": work / name,
    }
    base.update(over)
    return load_config(None, parse_overrides([f"--{k}={v}" for k, v in base.items()]))


def study(args) -> list[dict]:
    t_all = time.time()
    work = Path(args.work).resolve()
    data = work / "data"
    files = {}
    for split in ("train", "valid", "test"):
        dialogues, _ = build_dialogues(DataConfig(source="esconv", split=split, max_length=args.max_length))
        files[split] = data / f"{split}.jsonl"
        write_dialogues(files[split], dialogues)
    model = work / "tiny-model"
    if not (model / "config.json").is_file():
        build_tiny_model(
            "qwen2",
            model,
            tokenizer="bpe",
            bpe_texts=esconv_texts(),
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            seed=0,
        )
    common = {
        "train.train_file": files["train"],
        "train.eval_file": files["valid"],
        "train.max_dialogues": args.train_dialogues,
        "train.eval_max_dialogues": 40,
        "data.max_length": args.max_length,
    }
    timing = {}

    t0 = time.time()
    sft = _cfg(
        work,
        "sft",
        **common,
        **{"model.path": model, "train.method": "sft", "train.lr": args.sft_lr, "train.epochs": args.sft_epochs},
    )
    sft_final = Path(run_train(sft, progress=False, overwrite=True)["final"])
    timing["sft"] = time.time() - t0
    runs = {"sft": (sft, sft_final)}
    for method in args.methods.split(","):
        t0 = time.time()
        cfg = _cfg(
            work,
            method,
            **common,
            **{
                "model.path": sft_final,
                "train.method": method,
                "train.lr": args.cso_lr,
                "train.epochs": args.cso_epochs,
                "train.ref_cache": work / "refcache",
            },
        )
        if method in ("dpo", "ipo", "kto"):
            run_precompute(cfg, progress=False)
        runs[method] = (cfg, Path(run_train(cfg, progress=False, overwrite=True)["final"]))
        timing[method] = time.time() - t0

    sset = load_strategy_set("esconv")
    rows = []
    for name, (cfg, final) in runs.items():
        t0 = time.time()
        ev = _cfg(work, name, **{"model.path": final, "data.max_length": args.max_length})
        lik = run_generate(
            ev,
            "test",
            work / name / "eval" / "pred-test-likelihood.jsonl",
            "likelihood",
            str(files["test"]),
            progress=False,
        )
        ev.eval.max_dialogues = args.gen_dialogues
        gen = run_generate(
            ev,
            "test",
            work / name / "eval" / "pred-test-generate.jsonl",
            "generate",
            str(files["test"]),
            progress=False,
        )
        s_lik, s_gen = score_file(lik, sset), score_file(gen, sset)
        timing[f"eval-{name}"] = time.time() - t0
        rows.append(
            {
                "model": name,
                "Q": s_lik["Q"],
                "W": s_lik["W"],
                "B": s_lik["B"],
                "acc": s_lik["accuracy"],
                "gen_Q": s_gen["Q"],
                "gen_B": s_gen["B"],
                "gen_unknown": s_gen["unknown"],
                "gen_turns": s_gen["n"],
                **{
                    k: s_gen.get("text", {}).get(k)
                    for k in ("bleu1", "bleu2", "rougeL", "distinct1", "distinct2", "mean_len")
                },
            }
        )
    report = run_report([work / n for n in runs], work / "report", sset)
    head = [
        "model",
        "Q",
        "W",
        "B",
        "acc",
        "gen_Q",
        "gen_B",
        "gen_unknown",
        "bleu1",
        "bleu2",
        "rougeL",
        "distinct1",
        "distinct2",
        "mean_len",
    ]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    lines += [f"| {' | '.join(fmt(r.get(k)) for k in head)} |" for r in rows]
    test_turns = rows[0] and score_file(work / "sft" / "eval" / "pred-test-likelihood.jsonl", sset)["n"]
    note = (
        f"ESConv test: {test_turns} supporter turns (likelihood: Q, W, B, acc); generation on the first "
        f"{args.gen_dialogues} test dialogues ({rows[0]['gen_turns']} turns). Tiny Qwen2 (hidden "
        f"{args.hidden_size}, {args.layers} layers, ESConv BPE), SFT {args.sft_epochs} epochs on "
        f"{args.train_dialogues} train dialogues, then each loss 1 epoch from the SFT checkpoint "
        f"(lr {args.cso_lr}). Wall time {time.time() - t_all:.0f} s on {platform.processor() or 'cpu'} "
        f"({torch.get_num_threads()} threads)."
    )
    (work / "study.md").write_text(
        "\n".join(lines)
        + "\n\n"
        + note
        + "\n\nseconds: "
        + json.dumps({k: round(v) for k, v in timing.items()})
        + f"\n\nreport: {report}\n"
    )
    print("\n".join(lines) + "\n\n" + note)
    return rows


if __name__ == "__main__":
    main()
