"""The main job, `cso-dist demo` (`make demo`): a small end-to-end CSO run on CPU.

ESConv -> chain-of-strategy preference data (train/valid/test) and its statistics -> a tiny
Qwen2 model -> short SFT on the gold replies -> reference log-prob precompute -> CSO
preference training (train.method, DPO by default) from the SFT model -> a metrics summary.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from cso_dist.config import Config
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import write_dialogues
from cso_dist.io import atomic_write_text
from cso_dist.data.esconv import esconv_texts
from cso_dist.data.stats import dialogue_stats, token_stats_for
from cso_dist.models import build_tiny_model
from cso_dist.refcache import run_precompute
from cso_dist.train import run_train


def _stage(cfg: Config, out: Path, **train) -> Config:
    c = copy.deepcopy(cfg)
    for k, v in train.items():
        setattr(c.train, k, v)
    c.run.out_dir = str(out)
    return c


def run_demo(cfg: Config) -> dict:
    t_start = time.time()
    out = Path(cfg.run.out_dir)
    print(f"== cso-dist demo -> {out}")

    # 1. data
    built = {}
    for split in ("train", "valid", "test"):
        data = copy.deepcopy(cfg.data)
        data.split = split
        dialogues, report = build_dialogues(data)
        path = out / "data" / f"{split}.jsonl"
        write_dialogues(path, dialogues)
        built[split] = (path, dialogues, report)
    print("[1/5] preference data: " + ", ".join(f"{s} {len(d)} dialogues" for s, (_, d, _) in built.items()))

    # 2. tiny model
    model_dir = Path(cfg.model.path) if cfg.model.path else out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        texts = esconv_texts(str(built["train"][2].input)) if cfg.tiny_model.tokenizer == "bpe" else None
        build_tiny_model(
            cfg.tiny_model.arch,
            model_dir,
            tokenizer=cfg.tiny_model.tokenizer,
            bpe_texts=texts,
            hidden_size=cfg.tiny_model.hidden_size,
            num_layers=cfg.tiny_model.num_layers,
            seed=cfg.run.seed,
        )
    print(f"[2/5] tiny {cfg.tiny_model.arch} model ({cfg.tiny_model.tokenizer} tokenizer): {model_dir}")

    stats = {}
    for split, (path, dialogues, report) in built.items():
        stats[split] = dialogue_stats(dialogues) | {
            "tokens": token_stats_for(dialogues, str(model_dir), cfg.data),
            "build_notes": {k: v for k, v in report.notes.items() if k != "input"},
        }
        s, tk = stats[split], stats[split]["tokens"]
        print(
            f"      {split}: {s['dialogues']} dialogues, {s['turns']} turns, {s['pairs']} pairs; mean history "
            f"{tk['mean_history_tokens']} tokens, chosen {tk['mean_chosen_tokens']}, rejected "
            f"{tk['mean_rejected_tokens']}; trie {tk['dialogue_tokens_with_branches']:,} vs per-pair "
            f"{tk['per_pair_tokens']:,} tokens"
        )
    atomic_write_text(out / "data" / "stats.json", json.dumps(stats, indent=2))

    # 3. short SFT on the gold replies
    common = dict(
        train_file=str(built["train"][0]),
        eval_file=str(built["valid"][0]),
        max_dialogues=cfg.demo.train_dialogues,
        eval_max_dialogues=cfg.demo.eval_dialogues,
    )
    rows = []
    policy = model_dir
    if cfg.demo.sft_epochs > 0:
        sft = _stage(
            cfg,
            out / "sft",
            method="sft",
            lr=cfg.demo.sft_lr,
            epochs=cfg.demo.sft_epochs,
            max_steps=0,
            nll_weight=0.0,
            ref_cache="",
            **common,
        )
        sft.model.path = str(model_dir)
        t0 = time.time()
        summary = run_train(sft, overwrite=True)
        rows.append(("sft", summary, time.time() - t0))
        policy = Path(summary["final"])
        print(
            f"[3/5] SFT: {summary['steps']} steps, loss {summary['loss']:.3f}, eval loss "
            f"{summary.get('eval/loss', float('nan')):.3f} -> {policy}"
        )
    else:
        print("[3/5] SFT skipped (demo.sft_epochs 0)")

    # 4. reference log-probs, once, from the SFT model
    cso = _stage(cfg, out / cfg.train.method, ref_cache=str(out / cfg.train.method / "refcache"), **common)
    cso.model.path = str(policy)
    t0 = time.time()
    run_precompute(cso)
    print(f"[4/5] reference cache: {cso.train.ref_cache} ({time.time() - t0:.0f} s)")

    # 5. CSO preference training
    t0 = time.time()
    summary = run_train(cso, overwrite=True)
    rows.append((cfg.train.method, summary, time.time() - t0))
    print(f"[5/5] {cfg.train.method.upper()}: {summary['steps']} steps -> {summary['final']}")

    table = [
        "",
        "| stage | steps | train loss | train rewards/accuracies | eval loss | eval rewards/accuracies "
        "| eval rewards/margins | pairs/s | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
    for name, s, secs in rows:
        table.append(
            f"| {name} | {s['steps']} | {fmt(s, 'loss')} | {fmt(s, 'rewards/accuracies')} | "
            f"{fmt(s, 'eval/loss')} | {fmt(s, 'eval/rewards/accuracies')} | {fmt(s, 'eval/rewards/margins')} "
            f"| {s.get('pairs_per_s', 0):.1f} | {secs:.0f} |"
        )
    print("\n".join(table))
    result = {"stages": {name: s for name, s, _ in rows}, "data": stats, "seconds": time.time() - t_start}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2))
    print(f"\ndemo finished in {result['seconds']:.0f} s; summary: {out / 'summary.json'}")
    return result
