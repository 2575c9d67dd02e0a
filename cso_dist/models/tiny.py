"""Tiny randomly initialised Qwen2/Llama models saved like Hub checkpoints (tests, smoke runs).

No Hub access: the tokenizer is the real Qwen2.5 vocabulary (`qwen_tokenizer`) or a BPE trained
on a given corpus (`bpe_tokenizer`). The directory is written atomically: everything is saved
into a temporary sibling directory that is then renamed to `out_dir`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from cso_dist.data.templates import CHAT_TEMPLATES
from cso_dist.util.errors import ConfigError
from cso_dist.models import TINY_ARCHS, TINY_TOKENIZERS
from cso_dist.models.tokenizer import bpe_tokenizer, qwen_tokenizer


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def make_tokenizer(
    kind: str, template: str, bpe_texts: Iterable[str] | None = None, bpe_vocab_size: int = 4096
) -> PreTrainedTokenizerBase:
    """`qwen` → the real Qwen2.5 vocabulary; `bpe` → a BPE trained on `bpe_texts`."""
    if kind == "qwen":
        return qwen_tokenizer(template)
    if kind == "bpe":
        if bpe_texts is None:
            raise ConfigError("tokenizer: 'bpe' needs a training corpus (bpe_texts) and none was given")
        return bpe_tokenizer(bpe_texts, vocab_size=bpe_vocab_size, template=template)
    raise ConfigError(f"tokenizer: '{kind}' is not one of {', '.join(TINY_TOKENIZERS)}")


def tiny_config(
    arch: str,
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
) -> PretrainedConfig:
    """A small config whose vocabulary covers `tokenizer` and whose special ids match it."""
    if arch not in TINY_ARCHS:
        raise ConfigError(f"arch: '{arch}' is not one of {', '.join(TINY_ARCHS)}")
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size: {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"num_kv_heads: {num_kv_heads} does not divide num_heads {num_heads}")
    return AutoConfig.for_model(
        arch,
        vocab_size=_round_up(len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


def init_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """Randomly initialise a causal LM; the same seed gives the same weights.

    The global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.eval()


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out_dir '{out}' exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` (moved aside first, then deleted)."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        old.rmdir()
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    tokenizer: str | PreTrainedTokenizerBase = "qwen",
    template: str | None = None,
    bpe_texts: Iterable[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    overwrite: bool = False,
    bpe_vocab_size: int = 4096,
) -> Path:
    """Build, save and return a tiny random `arch` ("qwen2" or "llama") model directory.

    `tokenizer` is "qwen" (real Qwen2.5 vocabulary), "bpe" (trained on `bpe_texts`) or a
    ready tokenizer object (its own chat template and special tokens are kept). `template`
    defaults to chatml for qwen2 and llama3 for llama. The directory holds config.json,
    generation_config.json, model.safetensors and the tokenizer files; it loads with
    `AutoModelForCausalLM.from_pretrained(dir)` and `load_tokenizer(dir)`.
    """
    if arch not in TINY_ARCHS:
        raise ConfigError(f"arch: '{arch}' is not one of {', '.join(TINY_ARCHS)}")
    template = template or TINY_ARCHS[arch]
    if template not in CHAT_TEMPLATES:
        raise ConfigError(f"template: '{template}' is not one of {', '.join(CHAT_TEMPLATES)}")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    if isinstance(tokenizer, str):
        tok = make_tokenizer(tokenizer, template, bpe_texts, bpe_vocab_size)
    else:
        tok = tokenizer
    config = tiny_config(
        arch, tok, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings
    )
    model = init_model(config, seed)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)  # safetensors is the only format in transformers 5
        tok.save_pretrained(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
