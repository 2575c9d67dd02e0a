"""`cso-dist eval generate`: predict the strategy (and the reply) at every supporter turn of a split, into a
PRED file; generation here, likelihood scoring in cso_dist.eval.likelihood, the prompts in cso_dist.eval.prompts.

Two modes, both writing PRED.jsonl rows {id, dialogue_id, turn, gold_strategy, gold_response,
pred_strategy, pred_raw, pred_response | scores, mode}:
- generate: render the history, generate `(<strategy>) <response>` (batched, left-padded, greedy
  unless eval.do_sample), parse the strategy tolerant of case and spacing.
- likelihood: score every strategy's `(<strategy>)` prefix after the history and pick the most
  likely (summed log-prob). One forward per dialogue with the prefix trie: the dialogue's gold
  path is the trunk, each turn's strategy prefixes hang off it as branches.
The file is appended to batch by batch; a rerun skips the turns already in it. What made the rows -- the
model (its folder and content key), the data (file and sha256), the mode and the settings that change an
answer -- is recorded beside it (`<PRED>.origin.json`), and a rerun that would mix two origins in one file is
refused, naming both. One writer per PRED file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from cso_dist.progress import progress as progress_bar

from cso_dist.config import TrainingConfig
from cso_dist.data.render import parse_reply
from cso_dist.data.strategies import StrategySet
from cso_dist.errors import CsoError
from cso_dist.eval.likelihood import likelihood_rows
from cso_dist.eval.metrics import canonical_or_none
from cso_dist.eval.prompts import Turn, eval_dialogues, eval_turns
from cso_dist.scorer.device import cache_kw, cache_of, default_device, feed
from cso_dist.inputs import ensure_model, make_cfg_renderer, model_dir, resolve_sset
from cso_dist.io import append_jsonl, atomic_write_text, one_writer, sha256_file
from cso_dist.models import load_model, lora_settings
from cso_dist.models.identity import model_key
from cso_dist.paths import esconv_dir


def _done_ids(path: Path) -> set[str]:
    """Ids already in a PRED file; a torn last line (interrupted write) is cut off first."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for n, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CsoError(f"{path}: line {n}: not a PRED row (delete the file to start over)") from None
    return ids


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _common_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own."""
    n = min(len(x) for x in prompts) - 1
    for k in range(n):
        if any(x[k] != prompts[0][k] for x in prompts):
            return k
    return max(n, 0)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    share_prefix: bool = False,
    **sampling,
) -> list[str]:
    """Continue every token prompt in one padded generate() (each prompt ends where generation starts); the
    decoded new text of each, special tokens dropped. `stop_ids`: more tokens that end a continuation (besides
    the end of turn). `share_prefix`: the prompts' common prefix (one history, several reply openings) is run
    once, its keys and values shared by every row; the rest of each prompt follows it, padded in the middle
    (masked: each row goes on at its own positions). `sampling`: generate() options."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shared = _common_prefix(prompts) if share_prefix and len(prompts) > 1 else 0
    width = max(len(x) for x in prompts) - shared
    ids = torch.full((len(prompts), shared + width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for k, x in enumerate(prompts):
        ids[k, :shared] = torch.tensor(x[:shared], dtype=torch.long)
        ids[k, shared + width - (len(x) - shared) :] = torch.tensor(x[shared:], dtype=torch.long)
        mask[k, shared + width - (len(x) - shared) :] = 1
    cache = {}
    if shared:
        prefix = cache_of(feed(model, model, input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1))
        prefix.batch_repeat_interleave(len(prompts))
        cache = {cache_kw(model): prefix}
    out = feed(
        model,
        model.generate,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=sorted({*_stop_ids(tokenizer), *stop_ids}),
        **cache,
        **sampling,
    )
    end = shared + width
    return [tokenizer.decode(out[k, end:], skip_special_tokens=True).strip() for k in range(len(prompts))]


def generate_batch(model, tokenizer, turns: list[Turn], cfg: TrainingConfig, sset: StrategySet) -> list[dict]:
    e = cfg.eval
    kw = {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p} if e.do_sample else {"do_sample": False}
    texts = generate_texts(model, tokenizer, [t.prompt for t in turns], e.max_new_tokens, **kw)
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


def pred_origin(cfg: TrainingConfig, split: str, mode: str, data_file: str, memo: Path) -> dict:
    """What the rows of a PRED file come from: model, data, mode and the settings that change an answer."""
    mdir = model_dir(cfg)
    data = Path(data_file) if data_file else esconv_dir() / f"{split}.jsonl"
    origin = {
        "model": str(mdir.resolve()),
        "model_key": model_key(mdir, memo),
        "precision": cfg.model.precision,
        "data": str(data.resolve()) if data_file else f"esconv {split} ({data.resolve()}, data.* as configured)",
        "data_sha256": sha256_file(data),
        "mode": mode,
        "max_dialogues": cfg.eval.max_dialogues,
        "max_length": cfg.data.max_length,
    }
    if not data_file:  # the split is built by the config's data settings
        origin["data_settings"] = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("input", "split")}
    if mode == "generate":
        e = cfg.eval
        origin["generation"] = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample, "seed": cfg.run.seed}
        if e.do_sample:
            origin["generation"].update(temperature=e.temperature, top_p=e.top_p)
    return origin


def _check_origin(out: Path, n_rows: int, origin: dict) -> None:
    """Refuse to add rows of another origin to a PRED file that holds rows; record the origin otherwise."""
    side = out.with_name(out.name + ".origin.json")
    if n_rows:
        try:
            old = json.loads(side.read_text())
        except (OSError, ValueError):
            raise CsoError(
                f"{out}: its {n_rows} rows have no record of the model and data they came from ({side}); "
                "remove the file to start over, or give another --out"
            ) from None
        diff = [k for k in sorted(set(old) | set(origin)) if old.get(k) != origin.get(k)]
        if diff:
            k = diff[0]
            raise CsoError(
                f"{out}: its {n_rows} rows came from {k} {old.get(k)!r}, this run has {origin.get(k)!r}"
                f"{f' (and {len(diff) - 1} more differences)' if len(diff) > 1 else ''}: give another --out, "
                "or remove the file to start over"
            )
    atomic_write_text(side, json.dumps(origin, indent=1))


def run_generate(
    cfg: TrainingConfig,
    split: str,
    out: Path,
    mode: str,
    data_file: str = "",
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Write (or complete) the PRED file of `split` with the model at model.path (on `device`, default: this
    process's GPU, else the CPU). A Hub id not in the HF cache yet is downloaded first."""
    ensure_model(cfg)
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    dialogues = eval_dialogues(cfg, split, data_file)
    origin = pred_origin(cfg, split, mode, data_file, out.parent / ".filehashes.json")
    with one_writer(out.parent / f".{out.name}.lock", "cso-dist eval generate"):
        done = _done_ids(out)
        _check_origin(out, len(done), origin)
        _generate_into(cfg, out, mode, dialogues, renderer, sset, done, progress, device)
    return out


def _generate_into(cfg, out: Path, mode: str, dialogues, renderer, sset, done: set, progress: bool, device) -> None:
    torch.manual_seed(cfg.run.seed)
    device = device or default_device()
    lora = lora_settings(cfg.model)
    model = load_model(
        model_dir(cfg), cfg.model.finetune, cfg.model.precision, lora=lora, device=device, attention=cfg.pack.attention
    )
    model.eval()
    t0 = time.time()
    if mode == "likelihood":
        todo = [d for d in dialogues if any(f"{d.id}:{i}" not in done for i in d.turn_indices())]
        total = sum(len(d.turn_indices()) for d in todo)
        bar = progress_bar(total=total, desc="scoring strategies", unit="turn", enabled=progress)
        step, n = 16, 0  # dialogues per write
        for k in range(0, len(todo), step):
            rows = [
                r
                for r in likelihood_rows(model, renderer, sset, todo[k : k + step], cfg, cfg.pack.logit_chunk)
                if r["id"] not in done
            ]
            append_jsonl(out, rows)
            bar.update(len(rows))
            n += len(rows)
        bar.close()
    else:
        turns = [
            t
            for t in eval_turns(dialogues, renderer, sset, cfg.data.max_length, cfg.eval.max_new_tokens)
            if t.id not in done
        ]
        turns.sort(key=lambda t: len(t.prompt))  # similar lengths per batch: little padding
        bar = progress_bar(total=len(turns), desc="generating", unit="turn", enabled=progress)
        for k in range(0, len(turns), cfg.eval.batch_size):
            rows = generate_batch(model, renderer.tokenizer, turns[k : k + cfg.eval.batch_size], cfg, sset)
            append_jsonl(out, rows)
            bar.update(len(rows))
        bar.close()
        n = len(turns)
    secs = time.time() - t0
    print(f"{mode}: {n} turns in {secs:.1f}s ({n / max(secs, 1e-9):.1f} turns/s), {len(done)} already done -> {out}")
