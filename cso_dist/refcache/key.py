"""What a reference log-prob cache depends on: its paths, the content-addressed key, the reference model.

The key is a dict of named components, each the first 16 hex digits of a sha256:
  model            config.json + every *.safetensors / *.bin of the weights the reference runs
                   (for an adapter dir: its base model's files -- the adapter is disabled); file
                   names relative to the folder, so a copied model reuses the cache
  tokenizer        the tokenizer files' content
  chat_template    the resolved template text
  data             sha256 of the dialogue file + max_dialogues (train only; eval uses 0)
  strategies       names + descriptions of the strategy set
  system_prompt    the system prompt text
  truncation       data.max_length
  dtype            model.precision
  method_reference full | adapter-disabled | qlora-base
  reply_kinds      "c,r" (chosen and rejected), or "c,r,kl" for KTO: its KL-estimate branches are scored
                   only for a KTO cache (~15% of the precompute tokens on ESConv)
  layout_version   LAYOUT_VERSION (bump when the packing / reply-id semantics change)
pack.max_tokens is not part of it: results do not depend on the micro-batch layout.
Weight-file hashes are memoised by (path, size, mtime_ns) in a JSON file beside the cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cso_dist.util.io import sha256_file
from cso_dist.data.render import Renderer, system_prompt
from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import CsoError
from cso_dist.losses import method
from cso_dist.inputs import (
    SPLITS,
    TOKENIZER_FILES,
    SplitInputs,
    data_file,
    make_cfg_renderer,
    model_dir,
    resolve_sset,
    split_max_dialogues,
    tokenizer_dir,
    weights_dir,
)
from cso_dist.models import is_adapter_dir
from cso_dist.models.identity import FileHashes, files_digest, model_files, short
from cso_dist.pack import ReplyId, Unit

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig

LAYOUT_VERSION = 1  # trie layout (KTO ":kl" branches only in KTO caches: reply_kinds), truncation of data.render
FORMAT_VERSION = 1  # on-disk format of manifest + shards
KEY_COMPONENTS = (
    "model",
    "tokenizer",
    "chat_template",
    "data",
    "strategies",
    "system_prompt",
    "truncation",
    "dtype",
    "method_reference",  # reference_kind(cfg), under the name existing caches hold
    "reply_kinds",
    "layout_version",
)


# ---------------------------------------------------------------- paths
def cache_root(cfg: TrainingConfig) -> Path:
    return Path(cfg.train.ref_cache) if cfg.train.ref_cache else Path(cfg.run.out_dir) / "refcache"


def split_dir(root: Path, split: str) -> Path:
    """The train cache is the root itself; the eval cache is a cache of the same format in <root>/eval."""
    if split not in SPLITS:
        raise CsoError(f"reference cache: unknown split '{split}' (one of {', '.join(SPLITS)})")
    return root if split == "train" else root / "eval"


def reference_kind(cfg: TrainingConfig) -> str:
    if cfg.model.finetune == "qlora":
        return "qlora-base"
    return "adapter-disabled" if is_adapter_dir(model_dir(cfg)) else "full"


def memo_path(root: Path) -> Path:
    return root.parent / f".{root.name}.filehashes.json"


# ---------------------------------------------------------------- the key
def cache_key(
    cfg: TrainingConfig,
    split: str = "train",
    renderer: Renderer | None = None,
    sset: StrategySet | None = None,
    memo: Path | None = None,
) -> dict[str, str]:
    """The key of the reference cache of `split` for `cfg` (component name -> short sha256 hex)."""
    path = data_file(cfg, split)
    if path is None or not path.is_file():
        raise CsoError(f"reference cache: no {split} data file ({path if path else 'train.eval_file is not set'})")
    mdir = model_dir(cfg)
    if not mdir.is_dir():
        raise CsoError(f"model.path: '{mdir}' does not exist or is not a directory")
    renderer = renderer or make_cfg_renderer(cfg)
    sset = sset or resolve_sset(cfg)
    hashes = FileHashes(memo if memo is not None else memo_path(cache_root(cfg)))
    wdir, tdir = weights_dir(mdir), tokenizer_dir(mdir)
    tok_files = [tdir / n for n in TOKENIZER_FILES if (tdir / n).is_file()]
    key = {
        "model": files_digest(wdir, model_files(wdir), hashes),
        "tokenizer": files_digest(tdir, tok_files, hashes),
        "chat_template": short(renderer.template),
        "data": short(f"{sha256_file(path)}:{split_max_dialogues(cfg, split)}"),
        "strategies": short(json.dumps(sset.descriptions, sort_keys=False)),
        "system_prompt": short(system_prompt(sset)),
        "truncation": short(str(cfg.data.max_length)),
        "dtype": short(cfg.model.precision),
        "method_reference": short(reference_kind(cfg)),
        "reply_kinds": short(",".join(reply_kinds(cfg))),
        "layout_version": short(str(LAYOUT_VERSION)),
    }
    hashes.save()
    return key


def reply_kinds(cfg: TrainingConfig) -> tuple[str, ...]:
    """The kinds of reply a cache for cfg's method holds: chosen and rejected, plus the mismatched completions ("kl")
    of a method that scores them (cso_dist.losses.Method.reply_kinds)."""
    return ("c", "r", "kl") if "kl" in method(cfg.train.method).reply_kinds else ("c", "r")


def key_info(cfg: TrainingConfig, inputs: SplitInputs, sset: StrategySet) -> dict:
    """Human-readable record of what the key was computed from (manifest "info"; export uses it)."""
    mdir = model_dir(cfg)
    return {
        "model_path": str(mdir.resolve()),
        "weights_path": str(weights_dir(mdir).resolve()),
        "method_reference": reference_kind(cfg),
        "reply_kinds": list(reply_kinds(cfg)),
        "precision": cfg.model.precision,
        "chat_template": cfg.data.chat_template,
        "max_length": cfg.data.max_length,
        "data_file": str(inputs.data_file.resolve()),
        "data_sha256": inputs.data_sha256,
        "max_dialogues": inputs.max_dialogues,
        "layout_version": LAYOUT_VERSION,
        "strategy_set": {"name": sset.name, "descriptions": sset.descriptions, "aliases": sset.aliases},
    }


def key_digest(key: dict[str, str]) -> str:
    return short(json.dumps(key, sort_keys=True))


def differing(man: dict, key: dict[str, str]) -> list[str]:
    """Names of the key components that differ (and "format" when the on-disk format changed)."""
    order = {c: n for n, c in enumerate(KEY_COMPONENTS)}
    have = man.get("key") or {}
    diff = ["format"] if man.get("format") != FORMAT_VERSION else []
    return diff + sorted(
        (c for c in set(have) | set(key) if have.get(c) != key.get(c)), key=lambda c: (order.get(c, len(order)), c)
    )


def canonical_reply_order(units: list[Unit]) -> list[str]:
    """Reply ids per dialogue in order, within a dialogue by turn then c, r0, r1, ..., kl."""
    per: dict[str, list[ReplyId]] = {}
    for u in units:
        per.setdefault(u.dialogue_id, []).extend(s.reply_id for s in u.spans if not s.reply_id.copy)
    return [r for ids in per.values() for r in sorted(dict.fromkeys(ids), key=ReplyId.order)]


# ---------------------------------------------------------------- the reference model
def reference_finetune(cfg: TrainingConfig) -> str:
    """The model kind the reference is loaded as (the engine scores it under its adapter disabled, if any):
    full: the model at model.path (also for lora on a plain base: the base itself);
    adapter-disabled: an adapter dir's base, loaded with its adapter ("lora");
    qlora-base: the 4-bit base the QLoRA policy trains on ("qlora")."""
    return {"full": "full", "adapter-disabled": "lora", "qlora-base": "qlora"}[reference_kind(cfg)]
