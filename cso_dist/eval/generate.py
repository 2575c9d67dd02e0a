"""`cso-dist eval generate`: predict the strategy (and the reply) at every supporter turn of a split, into a
PRED file; generation here, likelihood scoring in cso_dist.eval.likelihood, the prompts in cso_dist.eval.prompts.

Two modes, both writing PRED.jsonl rows {id, dialogue_id, turn, gold_strategy, gold_response,
pred_strategy, pred_raw, pred_response | pred_first_token, pred_calibrated, scores, token_logps, mode}:
- generate: render the history, generate `(<strategy>) <response>` (batched, left-padded, greedy
  unless eval.do_sample), parse the strategy tolerant of case and spacing.
- likelihood: score every strategy's `(<strategy>)` prefix after the history and pick the most
  likely (summed log-prob). One forward per dialogue with the prefix trie: the dialogue's gold
  path is the trunk, each turn's strategy prefixes hang off it as branches. The same scores give
  the first-token rule's pick and, with eval.calibrate prior, the calibrated pick (offsets fitted
  on calibration dialogues first, recorded in the origin).
Under torchrun / srun the ranks share the work (turns; whole dialogues in likelihood mode) and the model is placed
by dist.engine, as for training: a whole copy per rank (torch), or partitioned over the ranks (deepspeed ZeRO-3,
for a model no GPU holds; its ranks then run every forward together). eval.backend openai sends the prompts to a
server instead (cso_dist.eval.served). The PRED file -- one file in a fixed order, resumable, its origin recorded
beside it, one writer per file -- is cso_dist.eval.pred's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cso_dist.engines import dist
from cso_dist.data.render import parse_reply
from cso_dist.data.strategies import StrategySet
from cso_dist.engines.dist import world_from_env
from cso_dist.engines.build import build_scorer, fill, held, lockstep
from cso_dist.eval.likelihood import likelihood_groups, likelihood_rows, strategy_prefixes
from cso_dist.eval.metrics import canonical_or_none
from cso_dist.eval.calibrate import fit_prior_offsets, fit_summary
from cso_dist.eval.pred import check_origin, done_ids, merge, open_part, origin_file, read_rows
from cso_dist.eval.prompts import Turn, eval_dialogues, eval_turns
from cso_dist.scorer.generate import generate_texts
from cso_dist.eval.served import open_served, served_origin, served_texts
from cso_dist.inputs import ensure_model, make_cfg_renderer, model_dir, resolve_sset
from cso_dist.util.io import append_jsonl, one_writer, read_json, sha256_file
from cso_dist.models.identity import model_key
from cso_dist.pack import collate_trie, head_chunks
from cso_dist.util.paths import esconv_dir
from cso_dist.util.progress import progress as progress_bar

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def sampling_options(cfg: TrainingConfig) -> dict:
    """generate() options of eval.do_sample: nucleus sampling, or greedy."""
    e = cfg.eval
    return {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p} if e.do_sample else {"do_sample": False}


def pred_rows(turns: list[Turn], texts: list[str], sset: StrategySet) -> list[dict]:
    """A PRED row per generated turn: the strategy parsed from the text, and the reply after it."""
    rows = []
    for t, text in zip(turns, texts):
        label, reply = parse_reply(text)
        rows.append(
            {
                "id": t.id,
                "dialogue_id": t.dialogue_id,
                "turn": t.turn,
                "gold_strategy": t.gold_strategy,
                "gold_response": t.gold_response,
                "pred_strategy": canonical_or_none(label, sset) or label,
                "pred_raw": text,
                "pred_response": reply,
                "mode": "generate",
            }
        )
    return rows


def pred_origin(
    cfg: TrainingConfig, split: str, mode: str, data_file: str, memo: Path, served: dict | None = None
) -> dict:
    """What the rows of a PRED file come from: the model (or, `served`, the server's record of it:
    cso_dist.eval.served.served_origin), data, mode and the settings that change an answer."""
    data = Path(data_file) if data_file else esconv_dir() / f"{split}.jsonl"
    if served is None:
        mdir = model_dir(cfg)
        origin = {"model": str(mdir.resolve()), "model_key": model_key(mdir, memo), "precision": cfg.model.precision}
    else:
        origin = {k: v for k, v in served.items() if k != "generation"}
    origin.update(
        {
            "data": str(data.resolve()) if data_file else f"esconv {split} ({data.resolve()}, data.* as configured)",
            "data_sha256": sha256_file(data),
            "mode": mode,
            "max_dialogues": cfg.eval.max_dialogues,
            "max_length": cfg.data.max_length,
        }
    )
    if not data_file:  # the split is built by the config's data settings
        origin["data_settings"] = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("input", "split")}
    if served is not None:
        origin["generation"] = served["generation"]
    elif mode == "generate":
        e = cfg.eval
        origin["generation"] = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample, "seed": cfg.run.seed}
        if e.do_sample:
            origin["generation"].update(temperature=e.temperature, top_p=e.top_p)
    return origin


def run_generate(
    cfg: TrainingConfig,
    split: str,
    out: Path,
    mode: str,
    data_file: str = "",
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Write (or complete) the PRED file of `split` with the model at model.path (`device`: the torch engine's,
    default this process's GPU, else the CPU). Under torchrun / srun every rank answers its share of the turns
    (it joins the job's process group first) and rank 0 merges them. A Hub id not in the HF cache yet is
    downloaded first."""
    world = world_from_env()
    progress = progress and world.main
    ensure_model(cfg, world.local_rank)
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    dialogues = eval_dialogues(cfg, split, data_file)
    client = open_served(cfg) if cfg.eval.backend == "openai" else None  # the server answers, and serves the model
    served = served_origin(cfg, client) if client is not None else None
    origin = pred_origin(cfg, split, mode, data_file, out.parent / ".filehashes.json", served)
    with dist.joined(world, cfg.dist.timeout_minutes), contextlib.ExitStack() as stack:
        offsets = None
        if mode == "likelihood" and cfg.eval.calibrate == "prior":
            origin["calibration"] = calibration(cfg, out, progress, device)
            offsets = origin["calibration"]["offsets"]

        def claim() -> None:  # one writer per PRED file: the job's rank 0 holds it for every rank
            stack.enter_context(one_writer(out.parent / f".{out.name}.lock", "cso-dist eval generate"))
            check_origin(out, origin)

        dist.on_main(world, claim)
        done = done_ids(out)  # the same on every rank: nothing is written before this
        torch.manual_seed(cfg.run.seed)
        t0 = time.time()
        if mode == "likelihood":
            n = _likelihood_into(cfg, out, dialogues, renderer, sset, done, world, progress, device, offsets)
        else:
            n = _generate_into(cfg, out, dialogues, renderer, sset, done, world, progress, device, client)
        n = dist.sum_dicts({"n": n})["n"]
        dist.barrier()
        if world.main:
            total = merge(out, [f"{d.id}:{i}" for d in dialogues for i in d.turn_indices()])
            secs = time.time() - t0
            print(
                f"{mode}: {n} turns in {secs:.1f}s ({n / max(secs, 1e-9):.1f} turns/s) on {world.world_size} "
                f"rank{'s' if world.distributed else ''}, {len(done)} already done -> {out} ({total} rows)"
            )
    return out


def _generate_into(
    cfg, out: Path, dialogues, renderer, sset, done: set, world, progress: bool, device, client=None
) -> int:
    """Generate this rank's share of the turns not done yet into its part file, with the model placed by the engine
    or, `client`, by a server; the number of turns."""
    todo = [
        t
        for t in eval_turns(dialogues, renderer, sset, cfg.data.max_length, cfg.eval.max_new_tokens)
        if t.id not in done
    ]
    if not todo:  # the same list on every rank: all return
        return 0
    mine = sorted(todo[world.rank :: world.world_size], key=lambda t: len(t.prompt))  # little padding per batch
    size = cfg.eval.batch_size
    batches = [mine[k : k + size] for k in range(0, len(mine), size)]
    tok, part = renderer.tokenizer, open_part(out, world.rank)
    with contextlib.ExitStack() as stack:
        if client is not None:
            forwards = len(batches)

            def answer(prompts: list[list[int]]) -> list[str]:
                return served_texts(cfg, tok, prompts, client)
        else:
            engine = stack.enter_context(contextlib.closing(build_scorer(cfg, world, device=device)))
            forwards, _ = lockstep(engine, len(batches), 0)
            kw = {**sampling_options(cfg), **engine.generate_kwargs()}

            def answer(prompts: list[list[int]], n: int = cfg.eval.max_new_tokens) -> list[str]:
                amp = engine.scorer.amp  # what the scorer runs under (precision bf16-mixed)
                return generate_texts(engine.module, tok, prompts, n, device=engine.device, amp=amp, **kw)

        with progress_bar(total=len(mine), desc="generating", unit="turn", enabled=progress) as bar:
            for turns in batches:
                append_jsonl(part, pred_rows(turns, answer([t.prompt for t in turns]), sset))
                bar.update(len(turns))
        if client is None:
            for _ in range(forwards - len(batches)):  # ZeRO-3: generate() with the others until they are done
                answer([[0]], 1)
            _say_held(engine, world)
    return len(mine)


def calibration_file(cfg: TrainingConfig, out: Path) -> Path:
    """The PRED file of the calibration dialogues beside `out` (pred-calibration-<data>.jsonl)."""
    data = cfg.eval.calibrate_data
    return out.with_name(f"pred-calibration-{Path(data).stem if data else 'valid'}.jsonl")


def calibration(cfg: TrainingConfig, out: Path, progress: bool, device) -> dict:
    """eval.calibrate prior: one offset per strategy, fitted (cso_dist.eval.calibrate) on the likelihood scores of
    the calibration dialogues, which are scored first into their own PRED file beside `out`
    (calibration_file: resumable like any, shared by the PRED files beside it); what they came from
    and the offsets, for `out`'s origin. Every rank fits the same offsets."""
    e = cfg.eval
    sub = replace(cfg, eval=replace(e, calibrate="none", calibrate_data="", max_dialogues=e.calibrate_dialogues))
    side = calibration_file(cfg, out)
    run_generate(sub, "valid", side, "likelihood", e.calibrate_data, progress, device)
    dist.barrier()  # rank 0 has merged the ranks' parts
    record = calibration_record(cfg, side)
    if progress:
        names = resolve_sset(cfg).names
        fit = fit_summary(read_rows(side), record["offsets"], names)
        said = lambda c: " ".join(str(c[n]) for n in names)  # noqa: E731
        print(
            f"calibration: offsets from {fit['turns']} turns ({side}); predicted counts raw {said(fit['raw'])}, "
            f"calibrated {said(fit['calibrated'])}, gold {said(fit['gold'])} ({', '.join(names)})"
        )
    return record


def calibration_record(cfg: TrainingConfig, side: Path) -> dict | None:
    """What a calibrated PRED file's offsets came from, read from the calibration PRED file `side` (no model is
    loaded: the offsets are refitted from its rows); None while `side` is not there."""
    if not side.is_file():
        return None
    rows = read_rows(side)
    offsets = fit_prior_offsets(
        [r["scores"] for r in rows], [r["gold_strategy"] for r in rows], resolve_sset(cfg).names
    )
    theirs = read_json(origin_file(side), "the record of what made a PRED file's rows")
    return {"pred": str(side), "data": theirs["data"], "data_sha256": theirs["data_sha256"]} | {
        "dialogues": cfg.eval.calibrate_dialogues,
        "turns": len(rows),
        "offsets": offsets,
    }


def _likelihood_into(
    cfg, out: Path, dialogues, renderer, sset, done: set, world, progress: bool, device, offsets=None
) -> int:
    """Score this rank's share of the dialogues with turns not done yet into its part file; the number of turns."""
    todo = [d for d in dialogues if any(f"{d.id}:{i}" not in done for i in d.turn_indices())]
    if not todo:
        return 0
    mine = todo[world.rank :: world.world_size]
    prefixes = strategy_prefixes(renderer, sset)
    step = 16  # dialogues per write
    work = [(ds, likelihood_groups(ds, renderer, sset, prefixes, cfg)) for ds in _slices(mine, step)]
    n_groups = sum(len(groups) for _, groups in work)
    chunks = max((head_chunks(g, cfg.scorer.logit_chunk) for _, groups in work for g in groups), default=0)
    part, n = open_part(out, world.rank), 0
    engine = build_scorer(cfg, world, device=device)
    with contextlib.closing(engine):
        forwards, head_calls = lockstep(engine, n_groups, chunks)
        total = sum(len(d.turn_indices()) for d in mine)
        with progress_bar(total=total, desc="scoring strategies", unit="turn", enabled=progress) as bar:
            for ds, groups in work:
                scores: dict[str, float] = {}
                for g in groups:
                    batch = collate_trie(g)
                    scores.update(zip(batch.reply_ids, engine.score(batch, head_calls).float().tolist()))
                rows = [r for r in likelihood_rows(ds, sset, scores, prefixes, offsets) if r["id"] not in done]
                append_jsonl(part, rows)
                bar.update(sum(len(d.turn_indices()) for d in ds))
                n += len(rows)
        fill(engine, forwards - n_groups, head_calls)
        _say_held(engine, world)
    return n


def _say_held(engine, world) -> None:
    if engine.collective:  # the model is sharded: what each rank held is worth a line
        print(f"eval rank {world.rank}/{world.world_size}: {held(engine.param_bytes())}", flush=True)


def _slices(items: list, size: int) -> list[list]:
    return [items[k : k + size] for k in range(0, len(items), size)]
