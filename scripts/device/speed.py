"""The GPU kit's throughput and engines sections (scripts/device/sections.py runs them): DPO steps per layout,
attention method and engine, their rates, MFU and peak memory against `cso-dist plan`."""

from __future__ import annotations

import math
import statistics
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
    dialogues,
    layout_batches,
    peak_gib,
    planned,
    reset_peak,
    run_config,
    sync,
    trl_rate,
)


# ---------------------------------------------------------------- 3. throughput
def _step_rate(work: Path, model_path: Path, n_params: int, dlg, steps: int, smoke: bool, **over) -> dict:
    """Full fine-tuning (or LoRA) DPO steps over `dlg` (one step = all of them), cached reference; step 0 warms
    up (and compiles flex) and is reported apart."""
    from cso_dist.engines.dist import World
    from cso_dist.engines import build_engine
    from cso_dist.losses.batch import micro_loss

    cfg = run_config(work, model_path, smoke, **over)
    micro = layout_batches(cfg, dlg)
    ref = {rid.key: (0.0, 1) for b in micro for rid in b.reply_ids}  # a cached reference: its values do not matter
    reset_peak()
    engine = build_engine(cfg, World(), steps + 1)
    counts, times, losses = counts_of(micro), [], []
    for _ in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        total = 0.0
        for b in micro:
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
            engine.backward(loss)
            total += float(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(total)
    peak = peak_gib()
    del engine
    finetune = cfg.model.finetune
    tokens = sum(b.n_tokens for b in micro)
    s = statistics.median(times[1:])
    out = {
        "finetune": finetune,
        "layout": cfg.pack.layout,
        "attention": cfg.scorer.attention,
        "micro_batches": len(micro),
        "tokens_per_step": tokens,
        "pairs_per_step": counts["pairs"],
        "first_step_s": times[0],
        "step_s": s,
        "step_s_all": times[1:],
        "tokens_per_s": tokens / s,
        "pairs_per_s": counts["pairs"] / s,
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "flops_per_token": (6 if finetune == "full" else 4) * n_params,
        "measured_peak_gib": peak,
    }
    if cfg.pack.layout == "trie":
        out["plan"] = planned(model_path, cfg, micro, finetune, zero=0, optimizer=cfg.train.optimizer)
        if peak:
            out["plan"]["planned_over_measured"] = out["plan"]["planned_gib"] / peak
    return out


def _unique_rate(r: Result, shape: str, row: dict, peak: float | None) -> None:
    """Unique tokens/s (the trie's token count, whatever the layout) and MFU on them, added to `row`."""
    trie = r.data.get(f"{shape}/trie_tree", {})
    if "step_s" in row and "tokens_per_step" in trie:
        row["unique_tokens_per_s"] = trie["tokens_per_step"] * row["pairs_per_s"] / trie["pairs_per_step"]
        row["mfu_unique_tokens"] = row["unique_tokens_per_s"] * row["flops_per_token"] / peak if peak else None
        r.write()


def _profile(work: Path, model_path: Path, dlg, smoke: bool, **over) -> dict:
    """One DPO step (after one warm-up step) under torch.profiler: wall time, the time the GPU was busy, and the
    ops that took the most device time and the most CPU time (self times), with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    from cso_dist.engines.dist import World
    from cso_dist.engines import build_engine
    from cso_dist.losses.batch import micro_loss

    cfg = run_config(work, model_path, smoke, **over)
    micro = layout_batches(cfg, dlg)
    ref = {rid.key: (0.0, 1) for b in micro for rid in b.reply_ids}
    engine = build_engine(cfg, World(), 2)
    counts = counts_of(micro)

    def step(engine):
        for b in micro:
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
            engine.backward(loss)
        engine.step()
        sync()

    step(engine)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step(engine)
        wall = time.perf_counter() - t0
    del engine
    ka = prof.key_averages()

    def dev(e) -> float:
        return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)

    def row(e) -> dict:
        return {
            "op": e.key,
            "calls": e.count,
            "self_device_ms": dev(e) / 1e3,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
        }

    return {
        "wall_s": wall,
        "device_busy_s": sum(dev(e) for e in ka) / 1e6,
        "cpu_self_s": sum(e.self_cpu_time_total for e in ka) / 1e6,
        "sdpa_calls": sum(e.count for e in ka if e.key == "aten::scaled_dot_product_attention"),
        "top_device": [row(e) for e in sorted(ka, key=dev, reverse=True)[:15]],
        "top_cpu": [row(e) for e in sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]],
    }


def throughput(r: Result, smoke: bool, work: Path) -> None:
    """First the whole epoch and its levers (scripts/device/epoch.py), then the per-layout steps of the first
    GPU run, the flex steps, a profile of tree attention and TRL: a box that runs out loses the last ones."""
    from benchlib import peak_bf16
    from epoch import epoch_parts

    from cso_dist.data.dialogue import write_dialogues

    epoch_parts(r, smoke, work)

    dlg = dialogues(1 if smoke else 8)
    write_dialogues(work / "train.jsonl", dlg)
    steps = 1 if smoke else 2
    variants = [
        ("trie_tree", {"pack.layout": "trie", "scorer.attention": "tree"}),
        ("per_pair", {"pack.layout": "pair"}),
        ("trie_tree_lora", {"pack.layout": "trie", "scorer.attention": "tree", "model.finetune": "lora"}),
        ("trie_flex", {"pack.layout": "trie", "scorer.attention": "flex"}),
    ]
    peak = peak_bf16(device_name())
    r.data["dialogues"], r.data["steps"], r.data["peak_bf16_tflops"] = len(dlg), steps, peak / 1e12 if peak else None
    shapes = ["tiny"] if smoke else ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    # priority: trie vs per-pair (and LoRA) on every shape, flex, a profile of tree attention, TRL
    for shape, (name, over) in [(shape, v) for shape in shapes for v in variants[:3]]:
        key = f"{shape}/{name}"
        if f"{shape}/model" not in r.data:
            r.part(f"{shape}/model", lambda s=shape: dict(zip(("path", "params"), build_model(work, s))))
        built = r.data[f"{shape}/model"]
        if "path" not in built:
            r.data[key] = {"skipped": f"no {shape} model (see {shape}/model)"}
            continue
        row = r.part(key, _step_rate, work, Path(built["path"]), built["params"], dlg, steps, smoke, **over)
        _unique_rate(r, shape, row, peak)
    for shape in shapes:  # flex: its warm-up step compiles (once per row length)
        key = f"{shape}/{variants[3][0]}"
        if not cuda():
            r.data[key] = {"skipped": "FlexAttention has no CPU backward"}
        elif "path" in r.data.get(f"{shape}/model", {}):
            built = r.data[f"{shape}/model"]
            row = r.part(
                key, _step_rate, work, Path(built["path"]), built["params"], dlg, steps, smoke, **variants[3][1]
            )
            _unique_rate(r, shape, row, peak)
    shape = shapes[0]
    if "path" in r.data.get(f"{shape}/model", {}):  # where a tree-attention step's time goes
        tree = variants[0][1]
        r.part(f"{shape}/profile_trie_tree", _profile, work, Path(r.data[f"{shape}/model"]["path"]), dlg, smoke, **tree)
    if smoke:  # TRL's trainer takes a minute on 2 CPU cores; its code runs as it does on the GPU
        r.data["tiny/trl_dpo"] = {"skipped": "--smoke: TRL's run is left to the GPU"}
    elif "path" in r.data.get("qwen2.5-0.5b/model", {}):
        built = r.data["qwen2.5-0.5b/model"]
        r.part("qwen2.5-0.5b/trl_dpo", trl_rate, work, Path(built["path"]), dlg, steps, smoke)


# ---------------------------------------------------------------- 4. engines
def _engine_steps(work: Path, model_path: Path, n_params: int, dlg, steps: int, smoke: bool, **over) -> dict:
    row = _step_rate(work, model_path, n_params, dlg, steps, smoke, **over)
    if not row["finite"]:
        raise RuntimeError(f"non-finite loss: {row['losses']}")
    return row


def engines(r: Result, smoke: bool, work: Path) -> None:
    from cso_dist.engines import dist
    from cso_dist.data.dialogue import write_dialogues

    dlg = dialogues(1 if smoke else 8)
    write_dialogues(work / "train.jsonl", dlg)
    steps = 1 if smoke else 2
    shape = "tiny" if smoke else "qwen2.5-1.5b"
    built = r.part("model", lambda: dict(zip(("path", "params"), build_model(work, shape))) | {"shape": shape})
    path, n = Path(built["path"]), built["params"]
    qlora = {"model.finetune": "qlora", "train.optimizer": "paged_adamw8bit", "run.out_dir": work / "qlora"}
    r.part("qlora", _engine_steps, work, path, n, dlg, steps, smoke, **qlora)
    dist.init_single()
    fsdp2 = {"dist.engine": "fsdp2", "run.out_dir": work / "fsdp2"}  # before ZeRO-3: measured on a GPU already
    row = r.part("fsdp2", _engine_steps, work, path, n, dlg, steps, smoke, **fsdp2)
    if "step_s" in row:  # the planner's FSDP2 figure for the same row (world size 1: the shards are the model)
        cfg = run_config(work, path, smoke, **fsdp2)
        row["plan"] = planned(path, cfg, layout_batches(cfg, dlg), "full", zero=3, engine="fsdp2")
        if row["measured_peak_gib"]:
            row["plan"]["planned_over_measured"] = row["plan"]["planned_gib"] / row["measured_peak_gib"]
        r.write()
    zero3 = {"dist.engine": "deepspeed", "dist.deepspeed_config": "zero3", "run.out_dir": work / "zero3"}
    row = r.part("zero3", _engine_steps, work, path, n, dlg, steps, smoke, **zero3)
    if "step_s" in row:  # the planner's ZeRO-3 figure for the same row
        cfg = run_config(work, path, smoke, **zero3)
        row["plan"] = planned(path, cfg, layout_batches(cfg, dlg), "full", zero=3)
        if row["measured_peak_gib"]:
            row["plan"]["planned_over_measured"] = row["plan"]["planned_gib"] / row["measured_peak_gib"]
        r.write()
