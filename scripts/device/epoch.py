"""The GPU kit's whole-epoch part and its MFU levers (the throughput section, scripts/device/speed.py, runs them
first), and the 7B-shape part (the shape7b section).

epoch   the Qwen2.5-1.5B shape, bf16, cached reference, `scorer.attention auto` (flex on CUDA, rows padded to
        pack.bucket), EPOCH_STEPS optimizer steps over real ESConv train dialogues in the order a run takes them
        (cso_dist.train.plan_steps: its seeded permutation, its packing), timed from the first step, so compiles
        are inside the rate: pairs/s and MFU over the whole run, the same after the compiling steps, the number of
        compiled graphs (dynamo's counters); then the per-pair layout and TRL over the dialogues of the first
        step, for the ratio.
levers  each an A/B against the epoch's own settings on its first LEVER_STEPS steps: gradient checkpointing off
        (where `cso-dist plan` says it fits the card), train.compile (regional compilation of the decoder layers),
        train.fused_adamw, 16k-token rows; each part's MFU, peak memory and the plan's figure. Last, the
        reference precompute's forward over the epoch's rows under compiled flex (the part that runs flex on
        CPU in --smoke, where FlexAttention has no backward).
7b      Qwen2.5-7B-shaped (random weights, the real vocabulary) QLoRA and LoRA with the settings of
        configs/qwen2.5-7b-qlora-24gb.yaml and qwen2.5-7b-lora.yaml, a few steps: rate, peak, plan.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitlib import (  # noqa: E402
    Result,
    build_model,
    counts_of,
    cuda,
    device_name,
    peak_gib,
    planned,
    reset_peak,
    run_config,
    sync,
    trl_rate,
)

EPOCH_STEPS, LEVER_STEPS, RATIO_STEPS = 40, 8, 1
SMOKE_STEPS = 4  # --smoke: the tiny shape on the CPU


def train_dialogues(n: int):
    """The first `n` ESConv train dialogues with their non-preferred replies, as `data build` makes them."""
    from cso_dist.config import DataConfig
    from cso_dist.data.build import build_dialogues

    return build_dialogues(DataConfig(source="esconv", split="train"))[0][:n]


def run_steps(cfg, dlg) -> list:
    """The optimizer steps (lists of micro-batches) a run over `dlg` takes: its seeded order and its packing."""
    from cso_dist.inputs import make_cfg_renderer, resolve_sset
    from cso_dist.train.loop import make_layout, plan_steps

    layout = make_layout(cfg, dlg, make_cfg_renderer(cfg), resolve_sset(cfg), False)
    return plan_steps(layout, len(dlg), cfg)


def timed_run(cfg, steps, n_params: int, peak_flops: float | None) -> dict:
    """Train `steps` through the engine with a cached reference, timing every step from the first (compiles
    included): whole-run and post-compile rates, MFU on unique tokens, graphs compiled, peak memory."""
    from cso_dist.engines.dist import World
    from cso_dist.engines import build_engine
    from cso_dist.losses.batch import micro_loss
    from cso_dist.scorer.attention import compile_count

    ref = {rid.key: (0.0, 1) for step in steps for b in step for rid in b.reply_ids}  # values do not matter
    reset_peak()
    compiled0 = compile_count()
    t_build = time.perf_counter()
    engine = build_engine(cfg, World(), len(steps))
    build_s = time.perf_counter() - t_build
    times, graphs, losses, tokens, pairs = [], [], [], [], []
    for micro in steps:
        counts = counts_of(micro)
        sync()
        t0 = time.perf_counter()
        total = 0.0
        for b in micro:
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
            engine.backward(loss)
            total += float(loss.detach())
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        graphs.append(compile_count() - compiled0)
        losses.append(total)
        tokens.append(sum(b.n_tokens for b in micro))
        pairs.append(counts["pairs"])
    method = engine.scorer.attention if cfg.pack.layout == "trie" else "per-pair"
    del engine
    flops_per_token = (6 if cfg.model.finetune == "full" else 4) * n_params
    # the steps after the last one that compiled: the steady rate
    warm = next((i for i in range(len(graphs)) if graphs[i] == graphs[-1]), 0) + 1
    steady = (sum(tokens[warm:]), sum(pairs[warm:]), sum(times[warm:])) if warm < len(times) else None

    def mfu(tok: float, s: float):
        return tok * flops_per_token / s / peak_flops if peak_flops and s else None

    run_s = sum(times)
    out = {
        "attention": method,
        "bucket": cfg.pack.bucket if method == "flex" else None,
        "max_tokens": cfg.pack.max_tokens,
        "steps": len(steps),
        "micro_batches": sum(len(s) for s in steps),
        "row_lengths": len({b.n_tokens for s in steps for b in s}),
        "unique_tokens": sum(tokens),
        "pairs": sum(pairs),
        "engine_build_s": build_s,
        "run_s": run_s,
        "step_s": times,
        "pairs_per_s": sum(pairs) / run_s,
        "unique_tokens_per_s": sum(tokens) / run_s,
        "mfu_unique_tokens": mfu(sum(tokens), run_s),
        "compiled_graphs": graphs[-1],
        "compiling_steps": warm,
        "flops_per_token": flops_per_token,
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "measured_peak_gib": peak_gib(),
    }
    if steady:
        out.update(steady_pairs_per_s=steady[1] / steady[2], steady_mfu_unique_tokens=mfu(steady[0], steady[2]))
    return out


def scoring_run(cfg, steps, n_params: int, peak_flops: float | None) -> dict:
    """The reference precompute's work over the same rows: a scoring engine (no gradients, flex compiled on CPU
    too), timed from the first row, compiles included, and the graphs compiled."""
    import torch

    from cso_dist.engines.dist import World
    from cso_dist.engines import build_scorer
    from cso_dist.scorer.attention import compile_count

    reset_peak()
    compiled0 = compile_count()
    engine = build_scorer(cfg, World())
    rows = [b for s in steps for b in s]
    times = []
    with torch.no_grad():
        for b in rows:
            sync()
            t0 = time.perf_counter()
            engine.score(b.data)
            sync()
            times.append(time.perf_counter() - t0)
    method = engine.scorer.attention
    del engine
    tokens, run_s = sum(b.n_tokens for b in rows), sum(times)
    return {
        "attention": method,
        "bucket": cfg.pack.bucket if method == "flex" else None,
        "rows": len(rows),
        "row_lengths": len({b.n_tokens for b in rows}),
        "unique_tokens": tokens,
        "run_s": run_s,
        "unique_tokens_per_s": tokens / run_s,
        "mfu_unique_tokens": tokens * 2 * n_params / run_s / peak_flops if peak_flops else None,
        "compiled_graphs": compile_count() - compiled0,
        "first_row_s": times[0],
        "measured_peak_gib": peak_gib(),
    }


def _with_plan(row: dict, cfg, model_path: Path, steps) -> dict:
    micro = [b for s in steps for b in s]
    row["plan"] = planned(model_path, cfg, micro, cfg.model.finetune, zero=0, optimizer=cfg.train.optimizer)
    if row.get("measured_peak_gib"):
        row["plan"]["planned_over_measured"] = row["plan"]["planned_gib"] / row["measured_peak_gib"]
    return row


def epoch_parts(r: Result, smoke: bool, work: Path) -> None:
    """The epoch part, its per-pair and TRL ratios, then the levers (priority order)."""
    from benchlib import peak_bf16

    from cso_dist.data.dialogue import write_dialogues

    shape = "tiny" if smoke else "qwen2.5-1.5b"
    if f"{shape}/model" not in r.data:
        r.part(f"{shape}/model", lambda: dict(zip(("path", "params"), build_model(work, shape))))
    built = r.data[f"{shape}/model"]
    if "path" not in built:
        r.data[f"{shape}/epoch"] = {"skipped": f"no {shape} model (see {shape}/model)"}
        return
    path, n_params = Path(built["path"]), built["params"]
    peak = peak_bf16(device_name())
    n_steps, lever_steps = (SMOKE_STEPS, 2) if smoke else (EPOCH_STEPS, LEVER_STEPS)
    dlg = train_dialogues(60 if smoke else 400)
    write_dialogues(work / "train.jsonl", dlg)
    # one micro-batch per step (pack.max_tokens each), as many steps as the part needs
    base = {"scorer.attention": "auto", "train.max_steps": n_steps, "run.out_dir": work / "epoch"}
    cfg = run_config(work, path, smoke, **base)
    steps = run_steps(cfg, dlg)
    if len(steps) < n_steps:
        raise RuntimeError(f"{len(dlg)} dialogues give {len(steps)} steps, fewer than {n_steps}")
    row = r.part(f"{shape}/epoch", lambda: _with_plan(timed_run(cfg, steps, n_params, peak), cfg, path, steps))
    # the per-pair layout and TRL over the dialogues of the first steps: the same pairs
    ids = {rid.dialogue for s in steps[:RATIO_STEPS] for b in s for rid in b.reply_ids}
    first_dlg = [d for d in dlg if d.id in ids]
    pair_cfg = run_config(
        work, path, smoke, **{"pack.layout": "pair", "train.max_steps": 1, "run.out_dir": work / "epoch-pair"}
    )
    pair = r.part(
        f"{shape}/epoch_per_pair_first_steps",
        lambda: timed_run(pair_cfg, [[b for s in run_steps(pair_cfg, first_dlg) for b in s]], n_params, peak),
    )
    if "pairs_per_s" in row and "pairs_per_s" in pair:
        row["trie_over_per_pair_pairs_per_s"] = row["pairs_per_s"] / pair["pairs_per_s"]
        r.write()
    if smoke:
        r.data[f"{shape}/epoch_trl_first_steps"] = {"skipped": "--smoke: TRL's run is left to the GPU"}
    else:
        trl = r.part(f"{shape}/epoch_trl_first_steps", trl_rate, work, path, first_dlg, 1, smoke)
        if "pairs_per_s" in row and "pairs_per_s" in trl:
            row["trie_over_trl_pairs_per_s"] = row["pairs_per_s"] / trl["pairs_per_s"]
            r.write()
    lever_rows = steps[:lever_steps]
    levers = [
        ("lever_baseline", {}),
        ("lever_no_checkpointing", {"train.gradient_checkpointing": False}),
        ("lever_compile", {"train.compile": True}),
        ("lever_fused_adamw", {"train.fused_adamw": True}),
        ("lever_rows_16k", {"pack.max_tokens": 16384}),
    ]
    for name, over in levers:
        key = f"{shape}/{name}"
        lcfg = run_config(work, path, smoke, **{**base, "train.max_steps": lever_steps, **over})
        if name == "lever_compile" and not cuda():
            r.data[key] = {"skipped": "compiled layers need flex attention, which has no backward on CPU"}
            continue
        if name == "lever_no_checkpointing" and not smoke:
            fit = planned(path, lcfg, [b for s in lever_rows for b in s], "full", zero=0)
            if fit["planned_gib"] > _card_gib():
                r.data[key] = {"skipped": f"the plan says {fit['planned_gib']:.1f} GiB, over this card", "plan": fit}
                continue
        rows = run_steps(lcfg, dlg)[:lever_steps] if name == "lever_rows_16k" else lever_rows
        r.part(key, lambda c=lcfg, s=rows: _with_plan(timed_run(c, s, n_params, peak), c, path, s))
    # last: the reference precompute's forward over the epoch's rows, under compiled flex (CPU: scoring only)
    flex = run_config(work, path, smoke, **{**base, "scorer.attention": "flex"})
    r.part(f"{shape}/epoch_reference_scoring", scoring_run, flex, steps, n_params, peak)


def _card_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.9 if cuda() else float("inf")


# ---------------------------------------------------------------- the 7B shape on one GPU
def shape7b(r: Result, smoke: bool, work: Path) -> None:
    """Qwen2.5-7B-shaped QLoRA then LoRA with their recipes' settings, a few steps each: rate, peak, plan."""
    from benchlib import peak_bf16

    from cso_dist.data.dialogue import write_dialogues

    shape = "tiny" if smoke else "qwen2.5-7b"
    built = r.part("model", lambda: dict(zip(("path", "params"), build_model(work, shape))) | {"shape": shape})
    if "path" not in built:
        return
    path, n_params = Path(built["path"]), built["params"]
    dlg = train_dialogues(40 if smoke else 120)
    write_dialogues(work / "train.jsonl", dlg)
    n = 2 if smoke else 4
    for name, recipe in (("qlora", "qwen2.5-7b-qlora-24gb.yaml"), ("lora", "qwen2.5-7b-lora.yaml")):
        over = {"train.max_steps": n, "run.out_dir": work / f"7b-{name}", **recipe_settings(recipe, smoke)}
        cfg = run_config(work, path, smoke, **over)
        steps = run_steps(cfg, dlg)[:n]
        r.part(name, lambda c=cfg, s=steps: _with_plan(timed_run(c, s, n_params, peak_bf16(device_name())), c, path, s))


RECIPE_KEYS = (
    "model.finetune",
    "model.lora_r",
    "model.lora_alpha",
    "model.lora_target_modules",
    "pack.max_tokens",
    "data.max_length",
    "train.optimizer",
    "train.gradient_checkpointing",
)


def recipe_settings(recipe: str, smoke: bool) -> dict:
    """A recipe's model, row and memory settings (configs/<recipe>), as the 7B part trains them (--smoke: the
    tiny rows of run_config, so the CPU path stays short)."""
    from cso_dist.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / recipe)
    out = {}
    for key in RECIPE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        out[key] = ",".join(value) if isinstance(value, list | tuple) else value
    if smoke:
        out.pop("pack.max_tokens"), out.pop("data.max_length")
    return out
