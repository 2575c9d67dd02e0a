"""Preference options written by a model for the *same* history (data.negatives_from generated, generated-both).

At every target supporter turn, the model continues the dialogue's history (rendered as in training, cut
oldest-first to fit data.max_length) after the prefix `(<strategy>)`:
- generated: the K non-preferred options, one per strategy other than the gold one (the strategies chosen so that
  each is rejected about K times as often as it is chosen: cso_dist.data.negatives.balanced_strategies); the
  preferred reply stays the gold one.
- generated-both: the preferred reply is written too, after the gold strategy's prefix, so that both sides of each
  pair come from the same writer and differ in strategy, not in who wrote them.

Generation is greedy (SAMPLING), one generate() per turn (the history's keys and values computed once and shared
by the turn's replies: cso_dist.scorer.generate.generate_texts), each reply cut at its first line break. Every
reply is cached on disk by content: its key is a hash of the writer model's content key, the prompt's token ids,
data.generate_max_tokens and the sampling settings, in a JSON Lines file per writer (<cache>/<model key>.jsonl,
appended and flushed turn by turn), so a stopped build resumes where it stopped and a rebuild writes nothing new.
One writer per cache file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cso_dist.data.dialogue import Option, PrefDialogue
from cso_dist.data.negatives import SOURCES, balanced_strategies, strategy_sides
from cso_dist.data.render import format_reply, truncate_turn, tokenize_dialogue
from cso_dist.data.strategies import resolve_strategy_set
from cso_dist.util.errors import ConfigError, CsoError, DataError
from cso_dist.util.io import append_jsonl, cut_torn_tail, one_writer, read_jsonl
from cso_dist.util.paths import user_cache_dir

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def cache_dir() -> Path:
    """$CSO_GENERATED_CACHE, else <cache>/cso_dist/generated."""
    return user_cache_dir("generated", "CSO_GENERATED_CACHE")


def writer_path(cfg: TrainingConfig) -> str:
    """data.generator, else the base model (model.path)."""
    path = cfg.data.generator or cfg.model.path
    if not path:
        raise ConfigError(
            f"data.generator: required for data.negatives_from {cfg.data.negatives_from}: the model that writes "
            "the replies (by default the config file's model.path, which is empty here)"
        )
    return path


# greedy, at least a few tokens (a writer that has not seen the `(<strategy>) ` format may end the turn at
# once), no 4-gram twice (small models loop); part of every cache key, so a change here writes anew
SAMPLING = {"do_sample": False, "min_new_tokens": 4, "no_repeat_ngram_size": 4}


def _key(spec: tuple, prompt: list[int]) -> str:
    """A reply's cache key: the writer's content key, its precision, the token limit, the sampling settings and
    the prompt's token ids."""
    blob = [*spec, sorted(SAMPLING.items()), "stop at a line break", prompt]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:32]


def newline_ids(tokenizer) -> tuple[int, ...]:
    """The tokens whose text holds a line break: a reply ends there (one_reply), so generation stops there too
    (after min_new_tokens: a reply no longer ends before it begins)."""
    return tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


def one_reply(text: str) -> str:
    """The written reply up to its first line break: a writer often goes on with another `(<strategy>)` line
    or the seeker's turn, which is not this reply."""
    return text.strip().split("\n", 1)[0].strip()


CACHE_ROW = {"key": str, "text": str}  # a cached reply: its cache key and its text


def _read_cache(path: Path) -> dict[str, str]:
    """The cached replies, through the one reader (cso_dist.util.io): every row {"key": text, "text": text}, else a
    one-line error naming the file, line and field (before anything is cut or written). A last line cut short by
    a stop is then cut off the file (its reply is written again)."""
    if not path.exists():
        return {}
    try:
        rows = [row for _, row in read_jsonl(path, "a generated-replies cache", CACHE_ROW, torn_tail=True)]
    except DataError as e:
        raise CsoError(f"{e} (remove it to write its replies again)") from None
    cut_torn_tail(path)
    return {row["key"]: row["text"] for row in rows}


def _writer(cfg: TrainingConfig) -> tuple[str, Path, Path, str]:
    """The writer model (data.generator, else model.path): its name, its folder (in the HF cache when a Hub id),
    the cache folder and its content key."""
    from cso_dist.models import hub
    from cso_dist.models.identity import model_key

    name, revision = writer_path(cfg), cfg.model.revision if not cfg.data.generator else None
    hub.ensure(name, revision, 0, cfg.dist.timeout_minutes * 60)
    folder = hub.resolve(name, revision, key="data.generator")
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if root.exists() else e.strerror or e
        msg = f"cannot hold the generated-replies cache ({why}); set CSO_GENERATED_CACHE to a folder"
        raise CsoError(f"{root}: {msg}") from None
    return name, folder, root, model_key(folder, root / ".filehashes.json")


def _turn_prompts(d: PrefDialogue, i: int, renderer, sset, strategies: list[str], d_cfg) -> list[list[int]]:
    """The prompts of turn i: its history (rendered as in training, cut oldest-first to leave room for a reply)
    and each strategy's `(<strategy>)` prefix."""
    history = tokenize_dialogue(d, renderer, sset).history(i)
    if len(history) + d_cfg.generate_max_tokens + 16 > d_cfg.max_length:
        history = truncate_turn(d, renderer, sset, i, d_cfg.generate_max_tokens + 16, d_cfg.max_length)[0]
    tok = renderer.tokenizer
    return [history + tok.encode(format_reply(s, "").rstrip(), add_special_tokens=False) for s in strategies]


def add_generated(dialogues: list[PrefDialogue], cfg: TrainingConfig, progress: bool = True) -> dict:
    """Write the options of every target turn of `dialogues` (in place) with the writer model; returns the
    build notes: the writer, replies written and reused, seconds per reply, the strategy counts per side."""
    import torch

    from cso_dist.data.render import make_renderer
    from cso_dist.scorer.generate import generate_texts
    from cso_dist.inputs import tokenizer_dir
    from cso_dist.models import autocast_dtype, load_model, load_tokenizer
    from cso_dist.scorer.device import default_device
    from cso_dist.util.progress import progress as progress_bar

    d_cfg, both = cfg.data, SOURCES[cfg.data.negatives_from].writes == "both"
    name, folder, cache_root, mkey = _writer(cfg)
    renderer = make_renderer(load_tokenizer(tokenizer_dir(folder)), d_cfg.chat_template)
    sset = resolve_strategy_set(d_cfg.strategies, dialogues[0].strategy_set if dialogues else None)
    turns = [(d, i) for d in dialogues for i in d.turn_indices()]
    golds = [d.messages[i].strategy for d, i in turns]
    plan = balanced_strategies(golds, list(sset.names), d_cfg.negatives, d_cfg.seed)
    cache, spec = cache_root / f"{mkey[:24]}.jsonl", (mkey, cfg.model.precision, d_cfg.generate_max_tokens)
    n_replies = sum(len(p) + both for p in plan)
    written = empty = kept_gold = 0
    model = None  # loaded at the first reply that is not in the cache
    t0 = time.time()
    with one_writer(cache_root / f".{cache.name}.lock", "cso-dist generated options"):
        known = _read_cache(cache)
        bar = progress_bar(total=n_replies, desc="writing options", unit="reply", enabled=progress)
        # turn by turn, in order: a turn's history holds the replies chosen before it (written ones too, with
        # generated-both), as training will see it
        for t, (d, i) in enumerate(turns):
            strategies = ([golds[t]] if both else []) + plan[t]
            prompts = _turn_prompts(d, i, renderer, sset, strategies, d_cfg)
            keys = [_key(spec, p) for p in prompts]
            todo = [k for k in range(len(prompts)) if keys[k] not in known and keys[k] not in keys[:k]]
            if todo:
                if model is None:
                    model = load_model(folder, "full", cfg.model.precision, device=default_device()).eval()
                    torch.manual_seed(d_cfg.seed)
                stops, max_new = newline_ids(renderer.tokenizer), d_cfg.generate_max_tokens
                amp = autocast_dtype(cfg.model.precision)  # bf16-mixed: its forwards under autocast
                out = generate_texts(
                    model, renderer.tokenizer, [prompts[k] for k in todo], max_new, stops, True, amp=amp, **SAMPLING
                )
                rows = [{"key": keys[k], "text": one_reply(text)} for k, text in zip(todo, out)]
                append_jsonl(cache, rows)
                known.update((r["key"], r["text"]) for r in rows)
                written += len(rows)
            bar.update(len(prompts))
            texts = dict(zip(strategies, (known[k] for k in keys)))
            m = d.messages[i]
            if both:
                kept_gold += not texts[m.strategy]
                m.text = texts[m.strategy] or m.text  # an empty written reply: the gold one stays
            m.rejected = [Option(s, texts[s]) for s in plan[t] if texts[s]]  # an empty reply is no option
            empty += len(plan[t]) - len(m.rejected)
        bar.close()
    secs = time.time() - t0
    for d in dialogues:
        d.meta["negatives_from"] = d_cfg.negatives_from
        d.meta["generator"] = {"model": name, "model_key": mkey, "max_tokens": d_cfg.generate_max_tokens}
        d.meta.pop("negative_sources", None)
    return {
        "negatives_from": d_cfg.negatives_from,
        "generator": name,
        "replies": n_replies,
        "replies_written": written,
        "replies_reused": n_replies - written,  # from the cache, or the same prompt as another reply
        "empty_replies_dropped": empty,
        **({"empty_preferred_kept_gold": kept_gold} if both else {}),
        "seconds": round(secs, 1),
        "seconds_per_written_reply": round(secs / written, 3) if written else None,
        "strategy_sides": strategy_sides(dialogues),
    }
