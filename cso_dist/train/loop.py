"""`cso-dist train`: CSO training, read top to bottom.

preference dialogues -> layout (prefix trie, or the per-pair baseline) -> micro-batches of at
most pack.max_tokens tokens, train.grad_accum of them per optimizer step -> per-reply
log-probs (cso_dist.scorer) -> loss (cso_dist.losses.batch) -> optimizer step through the engine (cso_dist.engines:
plain torch / DDP, or DeepSpeed ZeRO-2/3). The reference log-probs come from the precompute
cache (built first when missing, by the same engine), or from the policy with its adapter disabled.

Several ranks: every rank plans the same global steps; a step's micro-batches are dealt out
round-robin (cso_dist.engines.dist.my_share), each loss is normalised by the *global* step's counts and
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
from cso_dist.util.progress import progress as progress_bar

from cso_dist.engines import dist
from cso_dist.engines.checkpoint import condition_changes, numeric_conditions
from cso_dist.train.rundir import RUN_LOCK, check_request, open_run
from cso_dist.config import TrainingConfig
from cso_dist.data.dialogue import PrefDialogue
from cso_dist.util.io import atomic_write_text, one_writer
from cso_dist.util.errors import CsoError
from cso_dist.losses import method
from cso_dist.engines.dist import World, my_share, world_from_env
from cso_dist.engines import build_engine
from cso_dist.losses.batch import COUNTS, finish_metrics, micro_loss, structure
from cso_dist.train.preempt import STOPPED_FILE, StopRequest
from cso_dist.pack import PairLayout, ReplyId, TrieLayout, head_chunks
from cso_dist.refcache import ensure_reference
from cso_dist.inputs import SplitInputs, ensure_model, load_split, make_cfg_renderer, resolve_sset
from cso_dist.scorer import by_reply
from cso_dist.scorer.attention import compile_count
from cso_dist.train.tracking import Tracker


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
    """A method that scores chosen replies only (SFT): no branches to lay out."""
    return [replace(d, messages=[replace(m, rejected=[]) for m in d.messages]) for d in dialogues]


def make_layout(
    cfg: TrainingConfig, dialogues: list[PrefDialogue], renderer, sset, progress: bool
) -> TrieLayout | PairLayout:
    """The split laid out as pack.layout says, with the replies the method scores (Method.reply_kinds: no rejected
    replies for SFT; KTO's mismatched completions)."""
    kinds = method(cfg.train.method).reply_kinds
    if "r" not in kinds:
        dialogues = _strip_rejected(dialogues)
    if cfg.pack.layout == "trie":
        return TrieLayout(
            dialogues, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length, kl="kl" in kinds, progress=progress
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


# ---------------------------------------------------------------- what a run trains on
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Plan:
    """A run's data, laid out before anything is written; every rank builds the same one on its own."""

    train_in: SplitInputs
    eval_in: SplitInputs | None
    renderer: object
    sset: object
    steps: list[list[Batch]]
    eval_batches: list[Batch]


def prepare(cfg: TrainingConfig, world: World, resume, overwrite: bool, progress: bool) -> Plan:
    """Check the request, fetch the model if it is a Hub id (before the process group exists), lay out the data."""
    check_request(cfg, resume, overwrite, world.main)
    ensure_model(cfg, world.local_rank)
    seed_everything(cfg.run.seed)
    train_in, eval_in = load_split(cfg, "train"), load_split(cfg, "eval")
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    steps = plan_steps(make_layout(cfg, train_in.dialogues, renderer, sset, progress), len(train_in.dialogues), cfg)
    if not steps:
        raise CsoError(f"{train_in.data_file}: nothing to train on (no supporter turns with the needed replies)")
    t = cfg.train
    if "r" in method(t.method).reply_kinds and not any(m.rejected for d in train_in.dialogues for m in d.messages):
        raise CsoError(
            f"{train_in.data_file}: no supporter turn has a non-preferred reply, so {t.method} has no pair to learn "
            "from; use train.method sft, or data with negatives (data build --negatives K)"
        )
    eval_batches = []
    if eval_in:
        layout = make_layout(cfg, eval_in.dialogues, renderer, sset, False)
        eval_batches = micro_batches(layout, list(range(len(eval_in.dialogues))))
    return Plan(train_in, eval_in, renderer, sset, steps, eval_batches)


# ---------------------------------------------------------------- reference log-probs
def _live_reference(engine, batch: Batch, head_calls: int) -> dict:
    """Reference log-probs of a LoRA/QLoRA policy: the same model with its adapter disabled."""
    with engine.reference():
        return by_reply(batch.data, engine.score(batch.data, head_calls))


def references(cfg: TrainingConfig, plan: Plan, world: World, progress: bool):
    """(train, eval) lookups, (engine, batch, LM-head calls) -> the batch's reference log-probs (None for a
    reference-free method): the precomputed cache (built first when missing; train.reference cache), or the
    adapter-disabled policy, scored live (train.reference adapter)."""
    if not method(cfg.train.method).needs_reference:
        return (lambda engine, b, n: None), (lambda engine, b, n: None)
    if cfg.train.reference == "adapter":
        return _live_reference, _live_reference
    cached = [
        ensure_reference(cfg, split, plan.renderer, plan.sset, world, progress) if inp else None
        for split, inp in (("train", plan.train_in), ("eval", plan.eval_in))
    ]
    return (lambda engine, b, n: cached[0]), (lambda engine, b, n: cached[1])


def head_calls(engine, batches: list[Batch], chunk: int) -> int:
    """LM-head calls per forward that every rank makes over `batches` (the same list on every rank): under a
    collective engine the most any batch needs, so ranks scoring different batches stay in step; else 0."""
    return max((head_chunks(b.data, chunk) for b in batches), default=0) if engine.collective else 0


# ---------------------------------------------------------------- the run
def run_train(
    cfg: TrainingConfig,
    resume: bool | str = False,
    progress: bool = True,
    overwrite: bool = False,
    device: str | None = None,
) -> dict:
    """Train; `resume`: True = from the latest good checkpoint (which must exist), "auto" = from it when there
    is one; `overwrite`: start over in a folder that holds a run (cso_dist.train.rundir); `device`: the torch engine's
    (default: the local rank's GPU, else the CPU). Raises
    cso_dist.train.preempt.Preempted after checkpointing when asked to stop (signal or file). One writer per run
    folder: a second `train` into it is refused while this one runs (cso_dist.util.io.one_writer)."""
    world = world_from_env()
    progress = progress and world.main
    plan = prepare(cfg, world, resume, overwrite, progress)
    run_dir = Path(cfg.run.out_dir)
    with one_writer(run_dir / RUN_LOCK, "cso-dist train") if world.main else contextlib.nullcontext():
        resume_from = open_run(cfg, resume, overwrite, world.main)
        with dist.joined(world, cfg.dist.timeout_minutes):  # left however the run ends
            refs = references(cfg, plan, world, progress)
            engine = build_engine(cfg, world, len(plan.steps), resume_from, device)
            with contextlib.closing(engine):  # DeepSpeed's global HF config is released however the run ends
                start = _resume(engine, resume_from, world, len(plan.steps))
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
                with tracker:
                    with StopRequest(run_dir) as stop:  # signals and the stop file are steps' business only
                        if world.main:
                            (run_dir / STOPPED_FILE).unlink(missing_ok=True)
                            _announce(cfg, plan, engine, world)
                        last = train_loop(cfg, world, engine, plan, refs, tracker, stop, start, progress)
                    return finish(cfg, world, engine, plan, refs[1], tracker, last)


def _resume(engine, resume_from: Path | None, world: World, total: int) -> int:
    """The step a run starts at: 0, or its checkpoint's (a note when the numeric conditions changed)."""
    if resume_from is None:
        return 0
    state = engine.load(resume_from)
    if world.main:
        print(f"resumed from {resume_from} (step {state['step']} of {total})")
        changed = condition_changes(state.get("numerics"), numeric_conditions(world.world_size, engine.kind))
        if changed:
            print(
                f"note: resumed under other numeric conditions ({changed}): the curve matches an "
                "uninterrupted run within fp32 rounding, not bit for bit"
            )
    return state["step"]


def _attention(cfg: TrainingConfig, engine) -> str:
    """The trie rows' attention as resolved on this device (auto: flex on CUDA)."""
    if cfg.pack.layout != "trie":
        return "per-pair rows"
    kind = engine.scorer.attention
    if kind == "flex" and cfg.pack.bucket:
        return f"flex attention, rows padded to multiples of {cfg.pack.bucket} tokens"
    return f"{kind} attention"


def _announce(cfg: TrainingConfig, plan: Plan, engine, world: World) -> None:
    n_train, n_total = engine.counts()
    print(
        f"training {cfg.train.method} on {len(plan.train_in.dialogues)} dialogues: {len(plan.steps)} steps, "
        f"{sum(len(s) for s in plan.steps)} micro-batches ({cfg.pack.layout} layout, {_attention(cfg, engine)}), "
        f"{n_train:,} of {n_total:,} parameters trainable; {engine.kind} engine on "
        f"{world.world_size} rank{'s' if world.distributed else ''}",
        flush=True,
    )


def _compilations(cfg: TrainingConfig, engine, world: World) -> dict:
    """How many graphs torch.compile built in this process (flex attention, train.compile's layers), said and
    recorded in summary.json; {} when nothing is compiled."""
    if engine.scorer.attention != "flex" and not cfg.train.compile:
        return {}
    n = compile_count()
    if world.main:
        print(f"compiled {n} graphs ({_attention(cfg, engine)}; train.compile {cfg.train.compile})", flush=True)
    return {"compiles": n}


def train_step(cfg: TrainingConfig, world: World, engine, micro: list[Batch], ref, step: int) -> tuple[dict, dict]:
    """One optimizer step over this rank's share of `micro`: (metric sums, the step's global counts). A non-finite
    loss saves its micro-batch and stops every rank."""
    run_dir = Path(cfg.run.out_dir)
    counts = {k: sum(b.counts[k] for b in micro) for k in COUNTS}
    sums: dict = {"loss": 0.0, "micro_batches": 0, "tokens": 0}
    bad = ""
    mine = my_share(micro, world)
    n = head_calls(engine, micro, cfg.scorer.logit_chunk)
    for j, (b, w) in enumerate(mine):
        with engine.accumulating(last=j == len(mine) - 1):
            loss, m = micro_loss(
                cfg.train, b.reply_ids, engine.forward(b.data, n), b.data.reply_tokens, ref(engine, b, n), counts
            )
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
    return sums, counts


def train_loop(
    cfg: TrainingConfig, world: World, engine, plan: Plan, refs, tracker, stop, start: int, progress
) -> dict:
    """Steps `start`.. of the plan: log every train.log_every steps (with an evaluation every train.eval_every),
    checkpoint every train.save_every, and on a stop request checkpoint and raise Preempted."""
    t, steps = cfg.train, plan.steps
    ckpt_dir = Path(cfg.run.out_dir) / "checkpoints"
    extra = {
        "total_steps": len(steps),
        "numerics": numeric_conditions(world.world_size, engine.kind),
        "engine": engine.kind,
        "world_size": world.world_size,
        "model_path": cfg.model.path,
        "finetune": cfg.model.finetune,
    }
    last: dict = {}
    bar = progress_bar(
        range(start, len(steps)), desc=t.method, unit="step", enabled=progress, initial=start, total=len(steps)
    )
    for step in bar:
        t0 = time.perf_counter()
        sums, counts = train_step(cfg, world, engine, steps[step], refs[0], step)
        grad_norm, lr = engine.step()
        dt, done = time.perf_counter() - t0, step + 1
        if done % t.log_every == 0 or done == len(steps):
            last = {
                "step": done,
                **finish_metrics(sums, counts, t.method),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": sums["tokens"] / dt,
                "pairs_per_s": counts["pairs"] / dt,
                "turns_per_s": counts["chosen"] / dt,
                "epoch": done / max(len(steps) / t.epochs, 1),
            }
            if plan.eval_batches and t.eval_every and done % t.eval_every == 0:
                last.update(evaluate(engine, plan.eval_batches, cfg, refs[1], world))
            tracker.log(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        saved = t.save_every and done % t.save_every == 0 and done < len(steps)
        if saved:
            engine.save(ckpt_dir, done, extra, t.keep_last)
        if done < len(steps) and dist.any_true(stop.requested()):
            if not saved:
                engine.save(ckpt_dir, done, extra, t.keep_last)
            bar.close()
            raise stop.stopped(done, ckpt_dir / f"step-{done:07d}", world.main)
    bar.close()
    return last


def finish(cfg: TrainingConfig, world: World, engine, plan: Plan, eval_ref, tracker, last: dict) -> dict:
    """The final evaluation, the final model (cso_dist.engines.final) and summary.json."""
    run_dir, n = Path(cfg.run.out_dir), len(plan.steps)
    final_eval = evaluate(engine, plan.eval_batches, cfg, eval_ref, world) if plan.eval_batches else {}
    if final_eval:
        tracker.log({"step": n, **final_eval})
    out = engine.final(run_dir / "final", plan.renderer.tokenizer)
    summary = {
        "method": cfg.train.method,
        "steps": n,
        "final": str(out),
        "engine": engine.kind,
        "world_size": world.world_size,
        "param_bytes": dist.all_objects(engine.param_bytes()),  # per rank: now, peak (ZeRO-3: sampled per layer), whole
        **_compilations(cfg, engine, world),
        **last,
        **final_eval,
    }
    if world.main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    return summary


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, batches: list[Batch], cfg: TrainingConfig, ref, world: World = World()) -> dict:
    """Metrics over held-out micro-batches, each rank scoring its share (summed over ranks); the engine is back in
    training mode afterwards."""
    counts = {k: sum(b.counts[k] for b in batches) for k in COUNTS}
    sums: dict = {"loss": 0.0}
    engine.train(False)
    n = head_calls(engine, batches, cfg.scorer.logit_chunk)
    for b, w in my_share(batches, world):
        logps = engine.score(b.data, n)
        loss, m = micro_loss(cfg.train, b.reply_ids, logps, b.data.reply_tokens, ref(engine, b, n), counts)
        if not w:
            continue
        sums["loss"] += float(loss)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["micro_batches"] = sums.get("micro_batches", 0) + 1
    engine.train(True)
    sums = dist.sum_dicts(sums)
    return {f"eval/{k}": v for k, v in finish_metrics(sums, counts, cfg.train.method).items()}
