"""What the benchmark scripts share: the machine a figure came from, a process's memory, cached tiny models and
their LM head's share, the ESConv pairs (ours and as TRL rows), the same-pairs training overrides. Scripts import
it as `benchlib` (they run from scripts/)."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cso_dist.engines.checkpoint import numeric_conditions  # noqa: E402
from cso_dist.data.esconv import esconv_texts  # noqa: E402
from cso_dist.models import build_tiny_model  # noqa: E402
from cso_dist.util.machine import machine as cpu_model  # noqa: E402


def machine(**extra) -> dict:
    """Where a figure came from: CPU, cores, threads, kernel family and library versions, load."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
        **{k: v for k, v in numeric_conditions(1, "torch").items() if k not in ("engine", "world_size")},
        **extra,
    }


# dense bf16 peak FLOP/s of the cards MFU is reported against (the longest matching name wins: GH200 over H200)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_bf16(device_name: str) -> float | None:
    """The card's dense bf16 peak from its CUDA device name, or None for a card not in PEAK_BF16."""
    return next((PEAK_BF16[k] for k in sorted(PEAK_BF16, key=len, reverse=True) if k in device_name), None)


def tiny_model(work: Path, tokenizer: str = "qwen", log=print, **shape) -> Path:
    """A tiny random Qwen2 under `work`, built once per shape (hidden_size, num_layers, ...)."""
    name = "-".join([f"tiny-{tokenizer}", *(f"{k}{v}" for k, v in sorted(shape.items()))])
    model = work / name
    if not (model / "config.json").is_file():
        log(f"building {model.name}")
        texts = esconv_texts() if tokenizer == "bpe" else None
        build_tiny_model("qwen2", model, tokenizer=tokenizer, bpe_texts=texts, **shape)
    return model


def mem_status() -> dict:
    """VmRSS and VmHWM (peak RSS) of this process, in MB. VmHWM belongs to this process image
    (unlike ru_maxrss, which can carry the forking parent's peak across exec)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "hwm_mb": out.get("VmHWM", 0.0)}


def model_facts(model: Path) -> dict:
    """Parameter count and the LM head's share of it (Qwen2.5-7B: 7.2%; Llama-3-8B: 6.5%)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    h, L, i, v = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    body = L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    head = v * h
    params = body + head  # tied embeddings: the head is the embedding
    return {"params": params, "lm_head_params": head, "lm_head_share": head / params, "vocab": v}


def pair_table(cfg) -> list[dict]:
    """Every (turn, rejected reply) pair of the train file, in data order: our token ids (exactly what
    both cso layouts score) and the conversational TRL row with the same (truncated) history."""
    from cso_dist.data.render import dialogue_system_prompt, format_reply, to_chat, turn_examples
    from cso_dist.pack.types import ReplyId
    from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset

    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    rows = []
    for d in load_split(cfg, "train").dialogues:
        for ex in turn_examples(d, renderer, sset, cfg.data.max_length):
            m = d.messages[ex.turn]
            # truncation keeps messages[dropped_messages:turn] after the system prompt
            prompt = to_chat(d.messages[ex.dropped_messages : ex.turn], dialogue_system_prompt(d, sset))
            chosen = [{"role": "assistant", "content": format_reply(m.strategy, m.text)}]
            for k, (o, ids) in enumerate(zip(m.rejected, ex.rejected)):
                rows.append(
                    {
                        "id": ReplyId(d.id, ex.turn, f"r{k}"),
                        "chosen_id": ReplyId(d.id, ex.turn, "c"),
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": [{"role": "assistant", "content": format_reply(o.strategy, o.text)}],
                        "ids": (ex.history, ex.chosen, ids),
                    }
                )
    return rows


def esconv_pairs(path: Path, dialogues: int, turns: int = 0) -> Path:
    """The first `dialogues` ESConv train dialogues (K=3 negatives per turn) into `path`, each cut after its
    `turns`-th target supporter turn (0: whole); the same content gives the same reference cache key."""
    from cso_dist.config import DataConfig
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues

    found, _ = build_dialogues(DataConfig(source="esconv", split="train"))
    found = found[:dialogues]
    if turns:  # a shorter dialogue: it ends with its N-th target turn
        found = [replace(d, messages=d.messages[: d.turn_indices()[:turns][-1] + 1]) for d in found if d.turn_indices()]
    write_dialogues(path, found)
    return path


def run_cso_precompute(cfg, base: dict) -> dict:
    """Our reference precompute of `cfg` into an empty cache, timed; its tokens and peak memory (`base`: the
    process's memory before)."""
    from cso_dist.refcache.cache import precompute

    t0 = time.perf_counter()
    reports = precompute(cfg, progress=False)  # the body of run_precompute, which returns only the path
    wall = time.perf_counter() - t0
    rep = reports[0]
    if rep.skipped or not rep.complete:
        raise SystemExit(f"benchlib: the reference cache {rep.cache_dir} was not computed afresh")
    # the tokens it scored (every reply once, trie layout; it also scores KTO's mismatched completions)
    return {
        "precompute_s": wall,
        "precompute_scoring_s": rep.seconds,
        "ref_tokens": rep.tokens,
        "peak_rss_mb": mem_status()["hwm_mb"],
        "base_rss_mb": base["rss_mb"],
    }


def run_cso(cfg, base: dict) -> dict:
    """cso-dist train on `cfg` (one optimizer step per epoch over all pairs), timed per step; what each step
    processed (pairs, tokens, LM-head positions per pair), its losses and peak memory."""
    import torch

    from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset
    from cso_dist.train.tracking import read_metrics
    from cso_dist.train.loop import make_layout, plan_steps, run_train

    layout = cfg.pack.layout
    t0 = time.perf_counter()
    summary = run_train(cfg, progress=False, overwrite=True)
    wall = time.perf_counter() - t0
    peak = mem_status()["hwm_mb"]
    ms = [m for m in read_metrics(Path(cfg.run.out_dir)) if "loss" in m]
    # the plan run_train followed (deterministic): micro-batches per step -> pairs per forward
    lay = make_layout(cfg, load_split(cfg, "train").dialogues, make_cfg_renderer(cfg), resolve_sset(cfg), False)
    plan = plan_steps(lay, len(lay.items), cfg)
    micro = [len(s) for s in plan]
    pairs = sum(b.counts["pairs"] for b in plan[-1])
    # positions the LM head (vocab projection + log-softmax) runs on: the trie only those predicting reply
    # tokens; the per-pair layout takes the model's full logits, every position of every padded row
    head = sum(int(b.data.reply_tokens.sum()) if layout == "trie" else b.n_tokens for b in plan[-1])
    step_s = [pairs / m["pairs_per_s"] for m in ms]  # the logged rate is pairs / step wall time
    last = ms[-1]
    return {
        "layout": layout,
        "steps": summary["steps"],
        "pairs_per_step": pairs,
        "micro_batches_per_step": micro[-1],
        "pairs_per_forward": pairs / micro[-1],
        "pairs_per_s": last["pairs_per_s"],
        "pairs_per_s_train": pairs * len(ms) / sum(step_s),
        "tokens_per_s": last["tokens_per_s"],
        "tokens_per_pair": last["tokens_per_s"] / last["pairs_per_s"],
        "lm_head_positions_per_pair": head / pairs,
        "attention": cfg.scorer.attention,
        "step_s": step_s,
        "train_s": wall,
        "loss_first": ms[0]["loss"],
        "loss": last["loss"],
        "losses": [m["loss"] for m in ms],
        "grad_norm": last["grad_norm"],
        "peak_rss_mb": peak,
        "base_rss_mb": base["rss_mb"],
        "threads": torch.get_num_threads(),
    }


def same_pairs_overrides(max_length: int, max_tokens: int, epochs: int) -> dict:
    """DPO with one optimizer step per epoch over all pairs: two layouts update on exactly the same
    pairs, so their losses must agree at every step (the first is ln 2 for both)."""
    return {
        "train.method": "dpo",
        "data.max_length": max_length,
        "pack.max_tokens": max_tokens,
        "train.epochs": epochs,
        "train.lr": 1e-3,
        "train.log_every": 1,
        "train.warmup_ratio": 0.0,
        "train.schedule": "constant",
        "train.grad_accum": 100000,
    }
