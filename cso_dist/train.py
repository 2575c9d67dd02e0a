"""`cso-dist train`: CSO training, read top to bottom.

preference dialogues -> layout (prefix trie, or the per-pair baseline) -> micro-batches of at
most pack.max_tokens tokens, train.grad_accum of them per optimizer step -> per-reply
log-probs -> loss (cso_dist.objective) -> optimizer step through the engine (cso_dist.engine:
plain torch / DDP, or DeepSpeed ZeRO-2/3). The reference log-probs come from the precompute
cache (built first when missing); no reference model is loaded during training.

Several ranks: every rank plans the same global steps; a step's micro-batches are dealt out
round-robin (cso_dist.dist.my_share), each loss is normalised by the *global* step's counts and
scaled by the world size, so the averaged gradient equals the single-process one.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from cso_dist.progress import progress as progress_bar

from cso_dist import dist
from cso_dist.checkpoint import condition_changes, numeric_conditions
from cso_dist.rundir import RUN_LOCK, check_request, open_run
from cso_dist.config import TrainingConfig
from cso_dist.data.dialogue import PrefDialogue
from cso_dist.io import atomic_write_text, one_writer
from cso_dist.errors import ConfigError, CsoError
from cso_dist.losses import REGISTRY, needs_reference
from cso_dist.dist import World, my_share, world_from_env
from cso_dist.engine import build_engine
from cso_dist.objective import finish_metrics, micro_loss, structure
from cso_dist.preempt import STOPPED_FILE, StopRequest
from cso_dist.pack import PairLayout, ReplyId, TrieLayout
from cso_dist.refcache import cache_key, cache_status, load_reference
from cso_dist.refcache.cache import precompute
from cso_dist.inputs import ensure_model, load_split, make_cfg_renderer, resolve_sset
from cso_dist.refcache.key import cache_root, reply_kinds, split_dir
from cso_dist.tracking import Tracker


# ---------------------------------------------------------------- data -> micro-batches
@dataclass
class Batch:
    data: object  # TrieBatch or PairBatch
    reply_ids: list[ReplyId]
    counts: dict
    n_tokens: int


def _batch(data) -> Batch:
    return Batch(data, data.reply_ids, structure(data.reply_ids).counts, data.n_tokens)


def _strip_rejected(dialogues: list[PrefDialogue]) -> list[PrefDialogue]:
    """SFT trains on the preferred replies only: no branches to lay out."""
    return [replace(d, messages=[replace(m, rejected=[]) for m in d.messages]) for d in dialogues]


def make_layout(
    cfg: TrainingConfig, dialogues: list[PrefDialogue], renderer, sset, progress: bool
) -> TrieLayout | PairLayout:
    """The split laid out as pack.layout says (SFT: without the rejected replies; KTO: with its mismatched
    completions)."""
    if cfg.train.method == "sft":
        dialogues = _strip_rejected(dialogues)
    if cfg.pack.layout == "trie":
        return TrieLayout(
            dialogues,
            renderer,
            sset,
            cfg.pack.max_tokens,
            cfg.data.max_length,
            kl="kl" in reply_kinds(cfg),
            progress=progress,
        )
    return PairLayout(dialogues, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length)


def micro_batches(layout: TrieLayout | PairLayout, order: list[int]) -> list[Batch]:
    return [_batch(data) for data in layout.batches(order)]


def plan_steps(layout: TrieLayout | PairLayout, n: int, cfg: TrainingConfig) -> list[list[Batch]]:
    """Optimizer steps (lists of micro-batches), epoch by epoch; each epoch's dialogue order is
    a permutation seeded by (run.seed, epoch), so a resumed run sees the same batches."""
    t = cfg.train
    steps: list[list[Batch]] = []
    epoch = 0
    while epoch < t.epochs or (t.max_steps and len(steps) < t.max_steps):
        g = torch.Generator().manual_seed(cfg.run.seed * 1000 + epoch)
        micro = micro_batches(layout, torch.randperm(n, generator=g).tolist())
        steps += [micro[i : i + t.grad_accum] for i in range(0, len(micro), t.grad_accum)]
        epoch += 1
        if not micro:
            break
    return steps[: t.max_steps] if t.max_steps else steps


# ---------------------------------------------------------------- model pieces
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cached_reference(cfg: TrainingConfig, split: str, renderer, sset, world: World, progress: bool):
    """The split's cached reference log-probs; a missing cache is computed first, each rank on its
    own shards, the others waited for through the files (no collective, so no timeout)."""
    key = cache_key(cfg, split, renderer, sset)
    d = split_dir(cache_root(cfg), split)
    status = cache_status(d, key)
    if status != "complete":
        if world.main:
            print(
                f"reference cache for {split} is {status}: running precompute first "
                f"({world.world_size} rank{'s' if world.distributed else ''})",
                flush=True,
            )
        precompute(cfg, world.rank, world.world_size, progress=progress)
        t0 = time.time()
        while cache_status(d, key) != "complete":
            if time.time() - t0 > cfg.dist.timeout_minutes * 60:
                raise CsoError(
                    f"reference cache {d}: other ranks' shards still missing after "
                    f"{cfg.dist.timeout_minutes} min (dist.timeout_minutes)"
                )
            time.sleep(2)
    return load_reference(cfg, key, split)


def _live_reference(engine, batch: Batch) -> dict:
    """Reference log-probs of a LoRA/QLoRA policy: the same model with its adapter disabled."""
    with torch.no_grad(), engine.module.disable_adapter():
        lp = engine.score(batch.data)
    out: dict = {}
    for rid, x, n in zip(batch.reply_ids, lp.tolist(), batch.data.reply_tokens.tolist()):
        out.setdefault(rid.key, (float(x), int(n)))  # a copy of a chosen reply scores as its original
    return out


def _refs(ref: dict | None, engine, cfg: TrainingConfig):
    if not needs_reference(cfg.train.method):
        return lambda b: None
    if cfg.train.reference == "adapter":
        return lambda b: _live_reference(engine, b)
    return lambda b: ref


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, batches: list[Batch], cfg: TrainingConfig, refs, world: World = World()) -> dict:
    """Metrics over held-out micro-batches, each rank scoring its share (summed over ranks)."""
    counts = {"chosen": 0, "pairs": 0, "kto": 0}
    for b in batches:
        for k, v in b.counts.items():
            counts[k] += v
    sums: dict = {"loss": 0.0}
    for b, w in my_share(batches, world):
        logps = engine.score(b.data)
        loss, m = micro_loss(cfg.train, b.reply_ids, logps, b.data.reply_tokens, refs(b), counts)
        if not w:
            continue
        sums["loss"] += float(loss)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["micro_batches"] = sums.get("micro_batches", 0) + 1
    sums = dist.sum_dicts(sums)
    return {f"eval/{k}": v for k, v in finish_metrics(sums, counts, cfg.train.method).items()}


# ---------------------------------------------------------------- the run
def run_train(
    cfg: TrainingConfig,
    resume: bool | str = False,
    progress: bool = True,
    overwrite: bool = False,
    device: str | None = None,
) -> dict:
    """Train; `resume`: True = from the latest good checkpoint (which must exist), "auto" = from it when there
    is one; `overwrite`: start over in a folder that holds a run (cso_dist.rundir); `device`: the torch engine's
    (default: the local rank's GPU, else the CPU). Raises
    cso_dist.preempt.Preempted after checkpointing when asked to stop (signal or file). One writer per run
    folder: a second `train` into it is refused while this one runs (cso_dist.io.one_writer)."""
    world = world_from_env()
    t = cfg.train
    progress = progress and world.main
    if cfg.pack.layout == "pair" and not REGISTRY[t.method].pair_layout:
        serves = ", ".join(m.name for m in REGISTRY.values() if m.pair_layout)
        raise ConfigError(f"pack.layout: the per-pair layout serves {serves}; use trie for {t.method}")
    check_request(cfg, resume, overwrite, world.main)
    ensure_model(cfg, world.local_rank)  # a Hub id: downloaded before the process group exists
    seed_everything(cfg.run.seed)

    # data: every rank lays out the same plan on its own, before anything is written
    train_in, eval_in = load_split(cfg, "train"), load_split(cfg, "eval")
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    layout = make_layout(cfg, train_in.dialogues, renderer, sset, progress)
    steps = plan_steps(layout, len(train_in.dialogues), cfg)
    if not steps:
        raise CsoError(f"{train_in.data_file}: nothing to train on (no supporter turns with the needed replies)")
    if t.method != "sft" and not any(m.rejected for d in train_in.dialogues for m in d.messages):
        raise CsoError(
            f"{train_in.data_file}: no supporter turn has a non-preferred reply, so {t.method} has no pair to learn "
            "from; use train.method sft, or data with negatives (data build --negatives K)"
        )
    eval_batches = (
        micro_batches(make_layout(cfg, eval_in.dialogues, renderer, sset, False), list(range(len(eval_in.dialogues))))
        if eval_in
        else []
    )
    with one_writer(Path(cfg.run.out_dir) / RUN_LOCK, "cso-dist train") if world.main else contextlib.nullcontext():
        resume_from = open_run(cfg, resume, overwrite, world.main)
        data = (train_in, eval_in, renderer, sset, steps, eval_batches)
        return _run_train(cfg, world, resume_from, data, progress, device)


def _run_train(cfg: TrainingConfig, world: World, resume_from, data: tuple, progress: bool, device) -> dict:
    """The run proper, its folder opened and held (run_train)."""
    t = cfg.train
    train_in, eval_in, renderer, sset, steps, eval_batches = data
    run_dir = Path(cfg.run.out_dir)

    # reference log-probs: from the cache (no reference model while training), or the adapter-disabled policy
    ref = eval_ref = None
    if needs_reference(t.method) and t.reference == "cache":
        ref = _cached_reference(cfg, "train", renderer, sset, world, progress)
        eval_ref = _cached_reference(cfg, "eval", renderer, sset, world, progress) if eval_in else None

    ckpt_dir = run_dir / "checkpoints"

    # process group, model, optimizer
    dist.init(world, cfg.dist.timeout_minutes)
    if cfg.dist.engine == "deepspeed" and not world.distributed:
        dist.init_single()
    engine = build_engine(cfg, world, len(steps), resume_from, device)
    n_train, n_total = engine.counts()
    start = 0
    conditions = numeric_conditions(world.world_size, engine.kind)
    if resume_from is not None:
        state = engine.load(resume_from)
        start = state["step"]
        if world.main:
            print(f"resumed from {resume_from} (step {start} of {len(steps)})")
            changed = condition_changes(state.get("numerics"), conditions)
            if changed:
                print(
                    f"note: resumed under other numeric conditions ({changed}): the curve matches an "
                    "uninterrupted run within fp32 rounding, not bit for bit"
                )
    tracker = Tracker(
        run_dir,
        cfg.to_dict(),
        cfg.track.wandb,
        cfg.track.project,
        cfg.track.group,
        cfg.track.name,
        rank=world.rank,
        resume_step=start if resume_from is not None else None,
    )
    stop = StopRequest(run_dir)
    if world.main:
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    if world.main:
        print(
            f"training {t.method} on {len(train_in.dialogues)} dialogues: {len(steps)} steps, "
            f"{sum(len(s) for s in steps)} micro-batches ({cfg.pack.layout} layout), "
            f"{n_train:,} of {n_total:,} parameters trainable; {engine.kind} engine on "
            f"{world.world_size} rank{'s' if world.distributed else ''}",
            flush=True,
        )
    train_refs = _refs(ref, engine, cfg)
    eval_refs = _refs(eval_ref, engine, cfg)

    last: dict = {}
    bar = progress_bar(
        range(start, len(steps)), desc=t.method, unit="step", enabled=progress, initial=start, total=len(steps)
    )
    for step in bar:
        t0 = time.perf_counter()
        micro = steps[step]
        counts = {k: sum(b.counts[k] for b in micro) for k in ("chosen", "pairs", "kto")}
        sums: dict = {"loss": 0.0, "micro_batches": 0, "tokens": 0}
        bad = ""
        mine = my_share(micro, world)
        for j, (b, w) in enumerate(mine):
            with engine.accumulating(last=j == len(mine) - 1):
                logps = engine.forward(b.data)
                loss, m = micro_loss(t, b.reply_ids, logps, b.data.reply_tokens, train_refs(b), counts)
                if w and not torch.isfinite(loss) and not bad:
                    where = f"-rank{world.rank}" if world.distributed else ""
                    path = run_dir / f"nonfinite-step{step + 1}-micro{j}{where}.pt"
                    torch.save({"step": step + 1, "reply_ids": b.reply_ids, "batch": b.data}, path)
                    bad = f"loss is {float(loss)} at step {step + 1} (micro-batch {j}); the batch is saved to {path}"
                engine.backward(loss * (w * world.world_size))
            if w:
                sums["loss"] += float(loss.detach())
                sums["micro_batches"] += 1
                sums["tokens"] += b.n_tokens
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
        if world.distributed:
            sums = dist.sum_dicts({**sums, "bad": int(bool(bad))})
            if sums.pop("bad") and not bad:
                bad = f"a non-finite loss at step {step + 1} on another rank (its batch is saved in {run_dir})"
        if bad:
            raise CsoError(f"{bad}; lower train.lr, use fp32, or inspect those replies")
        grad_norm, lr = engine.step()
        dt = time.perf_counter() - t0
        done_step = step + 1
        if done_step % t.log_every == 0 or done_step == len(steps):
            last = {
                "step": done_step,
                **finish_metrics(sums, counts, t.method),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": sums["tokens"] / dt,
                "pairs_per_s": counts["pairs"] / dt,
                "turns_per_s": counts["chosen"] / dt,
                "epoch": done_step / max(len(steps) / t.epochs, 1),
            }
            if eval_batches and t.eval_every and done_step % t.eval_every == 0:
                engine.train(False)
                last.update(evaluate(engine, eval_batches, cfg, eval_refs, world))
                engine.train(True)
            tracker.log(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        saved = t.save_every and done_step % t.save_every == 0 and done_step < len(steps)
        if saved:
            engine.save(ckpt_dir, done_step, {"total_steps": len(steps), "numerics": conditions}, t.keep_last)
        if done_step < len(steps) and dist.any_true(stop.requested()):
            if not saved:
                engine.save(ckpt_dir, done_step, {"total_steps": len(steps), "numerics": conditions}, t.keep_last)
            bar.close()
            tracker.close()
            raise stop.stopped(done_step, ckpt_dir / f"step-{done_step:07d}", world.main)
    bar.close()
    stop.restore()

    final_eval = {}
    if eval_batches:
        engine.train(False)
        final_eval = evaluate(engine, eval_batches, cfg, eval_refs, world)
        tracker.log({"step": len(steps), **final_eval})
    out = engine.final(run_dir / "final", renderer.tokenizer)
    tracker.close()
    summary = {
        "method": t.method,
        "steps": len(steps),
        "final": str(out),
        "engine": engine.kind,
        "world_size": world.world_size,
        **{k: v for k, v in last.items()},
        **final_eval,
    }
    if world.main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    return summary
