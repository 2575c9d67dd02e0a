"""Preference options written by a model for the *same* history (data.negatives_from generated, generated-both).

At every target supporter turn, the model continues the dialogue's history (rendered as in training, cut
oldest-first to fit data.max_length) after the prefix `(<strategy>)`:
- generated: the K non-preferred options, one per strategy other than the gold one (the strategies chosen so that
  each is rejected about K times as often as it is chosen: cso_dist.data.negatives.balanced_strategies); the
  preferred reply stays the gold one.
- generated-both: the preferred reply is written too, after the gold strategy's prefix, so that both sides of each
  pair come from the same writer and differ in strategy, not in who wrote them.

Generation is greedy (SAMPLING), batched (prompts of similar length together), each reply cut at its first line
break, and cached on disk by content: each reply's key is a hash of the writer model's content key, the prompt's
token ids, data.generate_max_tokens and the sampling settings, in a JSON
Lines file per writer (<cache>/<model key>.jsonl, appended and flushed batch by batch), so a stopped build resumes
where it stopped and a rebuild writes nothing new. One writer per cache file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from cso_dist.config import TrainingConfig
from cso_dist.data.dialogue import Option, PrefDialogue
from cso_dist.data.negatives import balanced_strategies, strategy_sides
from cso_dist.data.render import format_reply, truncate_turn, tokenize_dialogue
from cso_dist.data.strategies import resolve_strategy_set
from cso_dist.errors import ConfigError
from cso_dist.io import one_writer
from cso_dist.paths import user_cache_dir

BATCH = 16  # prompts per generate() call


def cache_dir() -> Path:
    """$CSO_GENERATED_CACHE, else <cache>/cso_dist/generated."""
    return user_cache_dir("generated", "CSO_GENERATED_CACHE")


def writer_path(cfg: TrainingConfig) -> str:
    """data.generator, else the base model (model.path)."""
    path = cfg.data.generator or cfg.model.path
    if not path:
        raise ConfigError(
            f"data.generator: required for data.negatives_from {cfg.data.negatives_from} (or model.path: the "
            "base model writes them by default)"
        )
    return path


# greedy, at least a few tokens (a writer that has not seen the `(<strategy>) ` format may end the turn at
# once), no 4-gram twice (small models loop); part of every cache key, so a change here writes anew
SAMPLING = {"do_sample": False, "min_new_tokens": 4, "no_repeat_ngram_size": 4}


def _key(model_key: str, prompt: list[int], max_tokens: int) -> str:
    spec = [model_key, prompt, max_tokens, sorted(SAMPLING.items()), "stop at a line break"]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:32]


def newline_ids(tokenizer) -> tuple[int, ...]:
    """The tokens whose text holds a line break: a reply ends there (one_reply), so generation stops there too
    (after min_new_tokens: a reply no longer ends before it begins)."""
    return tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


def one_reply(text: str) -> str:
    """The written reply up to its first line break: a writer often goes on with another `(<strategy>)` line
    or the seeker's turn, which is not this reply."""
    return text.strip().split("\n", 1)[0].strip()


def _read_cache(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    out[row["key"]] = row["text"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a stop: its reply is written again
    return out


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def add_generated(dialogues: list[PrefDialogue], cfg: TrainingConfig, progress: bool = True) -> dict:
    """Write the options of every target turn of `dialogues` (in place) with the writer model; returns the
    build notes: the writer, replies written and reused, seconds per reply, the strategy counts per side."""
    import torch

    from cso_dist.eval.generate import generate_texts
    from cso_dist.data.render import make_renderer
    from cso_dist.inputs import tokenizer_dir
    from cso_dist.models import hub, load_model, load_tokenizer
    from cso_dist.models.identity import model_key
    from cso_dist.progress import progress as progress_bar
    from cso_dist.scorer.device import default_device

    d_cfg, both = cfg.data, cfg.data.negatives_from == "generated-both"
    name = writer_path(cfg)
    hub.ensure(name, cfg.model.revision if not d_cfg.generator else None, 0, cfg.dist.timeout_minutes * 60)
    folder = hub.resolve(name, cfg.model.revision if not d_cfg.generator else None, key="data.generator")
    cache_root = cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    mkey = model_key(folder, cache_root / ".filehashes.json")
    renderer = make_renderer(load_tokenizer(tokenizer_dir(folder)), d_cfg.chat_template)
    tok = renderer.tokenizer
    sset = resolve_strategy_set(d_cfg.strategies, dialogues[0].strategy_set if dialogues else None)
    turns = [(d, i) for d in dialogues for i in d.turn_indices()]
    golds = [d.messages[i].strategy for d, i in turns]
    plan = balanced_strategies(golds, list(sset.names), d_cfg.negatives, d_cfg.seed)
    # every reply to write: (turn number, strategy, prompt ids)
    jobs: list[tuple[int, str, list[int]]] = []
    limit = d_cfg.max_length
    for t, (d, i) in enumerate(turns):
        toks = tokenize_dialogue(d, renderer, sset)
        history = toks.history(i)
        if len(history) + d_cfg.generate_max_tokens + 16 > limit:
            history = truncate_turn(d, renderer, sset, i, d_cfg.generate_max_tokens + 16, limit)[0]
        for s in ([golds[t]] if both else []) + plan[t]:
            prefix = tok.encode(format_reply(s, "").rstrip(), add_special_tokens=False)
            jobs.append((t, s, history + prefix))
    cache = cache_root / f"{mkey[:24]}.jsonl"
    texts: dict[tuple[int, str], str] = {}
    written, t0 = 0, time.time()
    with one_writer(cache_root / f".{cache.name}.lock", "cso-dist generated options"):
        known = _read_cache(cache)
        keys = [_key(mkey, p, d_cfg.generate_max_tokens) for _, _, p in jobs]
        first = {k: j for j, k in reversed(list(enumerate(keys)))}  # identical prompts (first turns) once
        todo = sorted((j for k, j in first.items() if k not in known), key=lambda j: len(jobs[j][2]))
        if todo:
            model = load_model(folder, "full", cfg.model.precision, device=default_device())
            model.eval()
            stops = newline_ids(tok)
            torch.manual_seed(d_cfg.seed)
            bar = progress_bar(total=len(todo), desc="writing options", unit="reply", enabled=progress)
            for lo in range(0, len(todo), BATCH):
                batch = todo[lo : lo + BATCH]
                prompts = [jobs[j][2] for j in batch]
                out = generate_texts(model, tok, prompts, d_cfg.generate_max_tokens, stops, **SAMPLING)
                rows = [{"key": keys[j], "text": one_reply(text)} for j, text in zip(batch, out)]
                _append(cache, rows)
                known.update((r["key"], r["text"]) for r in rows)
                written += len(rows)
                bar.update(len(rows))
            bar.close()
            del model
    secs = time.time() - t0
    for j, (t, s, _) in enumerate(jobs):
        texts[(t, s)] = known[keys[j]]
    empty = kept_gold = 0
    for t, (d, i) in enumerate(turns):
        m = d.messages[i]
        if both:
            kept_gold += not texts[(t, m.strategy)]
            m.text = texts[(t, m.strategy)] or m.text  # an empty written reply: the gold one stays
        m.rejected = [Option(s, texts[(t, s)]) for s in plan[t] if texts[(t, s)]]  # an empty reply is no option
        empty += len(plan[t]) - len(m.rejected)
        d.meta["negatives_from"] = d_cfg.negatives_from
        d.meta["generator"] = {"model": name, "model_key": mkey, "max_tokens": d_cfg.generate_max_tokens}
        d.meta.pop("negative_sources", None)
    return {
        "negatives_from": d_cfg.negatives_from,
        "generator": name,
        "replies": len(jobs),
        "replies_written": written,
        "replies_reused": len(jobs) - written,  # from the cache, or the same prompt as another reply
        "empty_replies_dropped": empty,
        **({"empty_preferred_kept_gold": kept_gold} if both else {}),
        "seconds": round(secs, 1),
        "seconds_per_written_reply": round(secs / written, 3) if written else None,
        "strategy_sides": strategy_sides(dialogues),
    }
