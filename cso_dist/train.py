"""`cso-dist train`: single-process CSO training, read top to bottom.

preference dialogues -> layout (prefix trie, or the per-pair baseline) -> micro-batches of at
most pack.max_tokens tokens, train.grad_accum of them per optimizer step -> per-reply
log-probs -> loss (cso_dist.objective) -> AdamW step. The reference log-probs come from the
precompute cache (built first when missing); no reference model is loaded during training.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cso_dist.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from cso_dist.config import Config
from cso_dist.data.dialogue import PrefDialogue, atomic_write_text
from cso_dist.errors import ConfigError, CsoError
from cso_dist.losses import needs_reference
from cso_dist.models import LoraSettings, count_parameters, load_model
from cso_dist.objective import finish_metrics, micro_loss, norm_key, structure
from cso_dist.pack import collate_pairs, collate_trie, dialogue_pair_rows, lay_out, pack_units, pair_logps, trie_logps
from cso_dist.refcache import cache_key, cache_status, load_reference, run_precompute
from cso_dist.refcache.key import cache_root, load_split, make_cfg_renderer, resolve_sset, split_dir
from cso_dist.tracking import Tracker

PAIR_METHODS = ("dpo", "ipo", "simpo", "orpo")


# ---------------------------------------------------------------- data -> micro-batches
@dataclass
class Batch:
    data: object  # TrieBatch or PairBatch
    reply_ids: list[str]
    counts: dict
    n_tokens: int


def _batch(data) -> Batch:
    return Batch(data, data.reply_ids, structure(data.reply_ids).counts, data.n_tokens)


def _strip_rejected(dialogues: list[PrefDialogue]) -> list[PrefDialogue]:
    """SFT trains on the preferred replies only: no branches to lay out."""
    return [replace(d, messages=[replace(m, rejected=[]) for m in d.messages]) for d in dialogues]


class Layout:
    """The chosen layout of one split, able to cut an epoch into micro-batches."""

    def __init__(self, cfg: Config, dialogues: list[PrefDialogue], renderer, sset, progress: bool):
        self.cfg, self.kind = cfg, cfg.pack.layout
        if cfg.train.method == "sft":
            dialogues = _strip_rejected(dialogues)
        if self.kind == "trie":
            self.items = lay_out(dialogues, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length,
                                 kl=cfg.train.method == "kto", progress=progress).units
        else:
            self.items = [dialogue_pair_rows(d, renderer, sset, cfg.data.max_length) for d in dialogues]
            self.pad = renderer.tokenizer.pad_token_id or 0

    def batches(self, order: list[int]) -> list[Batch]:
        budget = self.cfg.pack.max_tokens
        if self.kind == "trie":
            units = [u for i in order for u in self.items[i]]
            return [_batch(collate_trie(b)) for b in pack_units(units, budget)]
        out, cur = [], []
        for turn in (t for i in order for t in self.items[i]):  # a turn's rows stay in one micro-batch
            if cur and (len(cur) + len(turn)) * max(len(r) for r in cur + turn) > budget:
                out.append(_batch(collate_pairs(cur, self.pad)))
                cur = []
            cur.extend(turn)
        if cur:
            out.append(_batch(collate_pairs(cur, self.pad)))
        return out


def plan_steps(layout: Layout, n: int, cfg: Config) -> list[list[Batch]]:
    """Optimizer steps (lists of micro-batches), epoch by epoch; each epoch's dialogue order is
    a permutation seeded by (run.seed, epoch), so a resumed run sees the same batches."""
    t = cfg.train
    steps: list[list[Batch]] = []
    epoch = 0
    while epoch < t.epochs or (t.max_steps and len(steps) < t.max_steps):
        g = torch.Generator().manual_seed(cfg.run.seed * 1000 + epoch)
        micro = layout.batches(torch.randperm(n, generator=g).tolist())
        steps += [micro[i:i + t.grad_accum] for i in range(0, len(micro), t.grad_accum)]
        epoch += 1
        if not micro:
            break
    return steps[:t.max_steps] if t.max_steps else steps


# ---------------------------------------------------------------- model pieces
def forward(model, batch: Batch, chunk: int):
    if hasattr(batch.data, "pred_idx"):
        return trie_logps(model, batch.data, chunk), batch.data.reply_tokens
    return pair_logps(model, batch.data), batch.data.reply_tokens


def _no_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is not None and hasattr(cfg, "attention_dropout"):
        cfg.attention_dropout = 0.0


def make_scheduler(optimizer, cfg: Config, total: int):
    warmup = int(cfg.train.warmup_ratio * total)
    kind = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _reference(cfg: Config, split: str, renderer, sset, progress: bool):
    key = cache_key(cfg, split, renderer, sset)
    status = cache_status(split_dir(cache_root(cfg), split), key)
    if status != "complete":
        print(f"reference cache for {split} is {status}: running precompute first")
        run_precompute(cfg, progress=progress)
    return load_reference(cfg, key, split)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, batches: list[Batch], cfg: Config, ref) -> dict:
    sums: dict = {"loss": 0.0}
    counts = {"chosen": 0, "pairs": 0, "kto": 0}
    for b in batches:
        for k, v in b.counts.items():
            counts[k] += v
    for b in batches:
        logps, ntok = forward(model, b, cfg.pack.logit_chunk)
        loss, m = micro_loss(cfg.train, b.reply_ids, logps, ntok, ref, counts)
        sums["loss"] += float(loss)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["micro_batches"] = sums.get("micro_batches", 0) + 1
    return {f"eval/{k}": v for k, v in finish_metrics(sums, counts, cfg.train.method).items()}


# ---------------------------------------------------------------- the run
def run_train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    t = cfg.train
    if cfg.pack.layout == "pair" and t.method not in PAIR_METHODS:
        raise ConfigError(f"pack.layout: the per-pair layout serves {', '.join(PAIR_METHODS)}; use trie for {t.method}")
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.run.seed)

    # data
    train_in, eval_in = load_split(cfg, "train"), load_split(cfg, "eval")
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    layout = Layout(cfg, train_in.dialogues, renderer, sset, progress)
    steps = plan_steps(layout, len(train_in.dialogues), cfg)
    if not steps:
        raise CsoError(f"{train_in.data_file}: nothing to train on (no supporter turns with the needed replies)")
    eval_batches = Layout(cfg, eval_in.dialogues, renderer, sset, False).batches(
        list(range(len(eval_in.dialogues)))) if eval_in else []

    # reference log-probs: from the cache only (no reference model in this process)
    ref = eval_ref = None
    if needs_reference(t.method):
        ref = _reference(cfg, "train", renderer, sset, progress)
        eval_ref = _reference(cfg, "eval", renderer, sset, progress) if eval_in else None

    # model + optimizer
    lora = LoraSettings(cfg.model.lora_r, cfg.model.lora_alpha, 0.0, list(cfg.model.lora_target_modules))
    model = load_model(cfg.model.path, cfg.model.method, cfg.model.precision, lora=lora,
                       gradient_checkpointing=t.gradient_checkpointing)
    _no_dropout(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = count_parameters(model)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, len(steps))

    start = 0
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        done = list_checkpoints(ckpt_dir)
        if not done:
            raise CsoError(f"--resume: no checkpoint in {ckpt_dir}")
        start = load_checkpoint(done[-1], model, optimizer, scheduler)["step"]
        print(f"resumed from {done[-1]} (step {start} of {len(steps)})")
    tracker = Tracker(run_dir, cfg.to_dict(), cfg.track.wandb, cfg.track.project, cfg.track.group, cfg.track.name,
                      resume_step=start if resume else None)
    print(f"training {t.method} on {len(train_in.dialogues)} dialogues: {len(steps)} steps, "
          f"{sum(len(s) for s in steps)} micro-batches ({cfg.pack.layout} layout), "
          f"{n_train:,} of {n_total:,} parameters trainable")

    last: dict = {}
    bar = tqdm(range(start, len(steps)), desc=t.method, unit="step", disable=None if progress else True,
               initial=start, total=len(steps))
    for step in bar:
        t0 = time.perf_counter()
        micro = steps[step]
        counts = {k: sum(b.counts[k] for b in micro) for k in ("chosen", "pairs", "kto")}
        sums: dict = {"loss": 0.0, "micro_batches": 0}
        for j, b in enumerate(micro):
            logps, ntok = forward(model, b, cfg.pack.logit_chunk)
            loss, m = micro_loss(t, b.reply_ids, logps, ntok, ref, counts)
            if not torch.isfinite(loss):
                path = run_dir / f"nonfinite-step{step + 1}-micro{j}.pt"
                torch.save({"step": step + 1, "reply_ids": b.reply_ids, "batch": b.data}, path)
                raise CsoError(f"loss is {float(loss)} at step {step + 1} (micro-batch {j}); the batch is saved to "
                               f"{path}; lower train.lr, use fp32, or inspect those replies")
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["micro_batches"] += 1
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        done_step = step + 1
        if done_step % t.log_every == 0 or done_step == len(steps):
            last = {"step": done_step, **finish_metrics(sums, counts, t.method), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": sum(b.n_tokens for b in micro) / dt, "pairs_per_s": counts["pairs"] / dt,
                    "turns_per_s": counts["chosen"] / dt, "epoch": done_step / max(len(steps) / t.epochs, 1)}
            if eval_batches and t.eval_every and done_step % t.eval_every == 0:
                model.eval()
                last.update(evaluate(model, eval_batches, cfg, eval_ref))
                model.train()
            tracker.log(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if t.save_every and done_step % t.save_every == 0 and done_step < len(steps):
            save_checkpoint(ckpt_dir, done_step, model, optimizer, scheduler, {"total_steps": len(steps)}, t.keep_last)
    bar.close()

    final_eval = {}
    if eval_batches:
        model.eval()
        final_eval = evaluate(model, eval_batches, cfg, eval_ref)
        tracker.log({"step": len(steps), **final_eval})
    out = save_final(model, cfg, run_dir / "final", renderer.tokenizer)
    tracker.close()
    summary = {"method": t.method, "steps": len(steps), "final": str(out), **{k: v for k, v in last.items()},
               **final_eval}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def save_final(model, cfg: Config, out: Path, tokenizer) -> Path:
    """An HF save_pretrained folder: the full model, the LoRA adapter, or the adapter merged into the base."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.eval()
        is_peft = hasattr(model, "peft_config")
        if is_peft and cfg.train.final == "merged":
            if cfg.model.method == "qlora":  # merge into a full-precision copy of the base, not the 4-bit one
                adapter = tmp / "adapter"
                model.save_pretrained(adapter)
                merged = load_model(adapter, "full", cfg.model.precision)
                shutil.rmtree(adapter)
            else:
                merged = model.merge_and_unload()
            merged.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
