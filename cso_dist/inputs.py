"""What a run reads, resolved from its config: the model folder (and the tokenizer's and weights' folders of an
adapter; a study's base model), the data files of each split and their dialogues, the strategy set, the renderer.
Used by training, precompute, evaluation, export and the reference cache's key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


from cso_dist.data.dialogue import PrefDialogue, read_dialogues
from cso_dist.data.render import Renderer, make_renderer
from cso_dist.data.strategies import StrategySet, resolve_strategy_set
from cso_dist.util.errors import ConfigError, CsoError, DataError
from cso_dist.util.io import read_jsonl, sha256_file
from cso_dist.models import hub, is_adapter_dir, load_tokenizer
from cso_dist.models.load import adapter_base_path

if TYPE_CHECKING:
    from cso_dist.config import Config, TrainingConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
SPLITS = ("train", "eval")


MODEL_REQUIRED = "model.path: required: a model folder, or a Hub id (org/name)"


def base_model(cfg: Config, out: Path, name: str) -> Path:
    """A study's base model: model.path, else `name` (study.model): the packaged real model (imported once), or
    "tiny" (a random model built once into <out>/tiny-model from the tiny_model section)."""
    from cso_dist.data.esconv import esconv_texts
    from cso_dist.models import build_tiny_model
    from cso_dist.models.gguf import fetch_model

    if cfg.model.path:
        return Path(cfg.model.path)
    if name != "tiny":
        return fetch_model(name)
    tiny, t = out / "tiny-model", cfg.tiny_model
    if not (tiny / "config.json").is_file():
        texts = esconv_texts(str(Path(cfg.data.input) / "train.jsonl")) if cfg.data.input else esconv_texts()
        kw = {"bpe_texts": texts if t.tokenizer == "bpe" else None, "seed": cfg.run.seed}
        build_tiny_model(t.arch, tiny, t.tokenizer, hidden_size=t.hidden_size, num_layers=t.num_layers, **kw)
    return tiny


def model_dir(cfg: TrainingConfig) -> Path:
    """The local folder of model.path: the folder itself, or a Hub id's snapshot in the HF cache (no network;
    ensure_model fetches it first). model.path is required: `cso-dist demo` and `cso-dist study` set it themselves."""
    if not cfg.model.path:
        raise ConfigError(MODEL_REQUIRED)
    return hub.resolve(cfg.model.path, cfg.model.revision)


def ensure_model(cfg: TrainingConfig, local_rank: int = 0) -> Path:
    """Before a job's process group exists: a Hub id not in the HF cache yet is downloaded by each node's local
    rank 0 (the others wait for it); then model_dir(cfg). A local folder is as is."""
    if not cfg.model.path:
        model_dir(cfg)  # the error: model.path is required
    hub.ensure(cfg.model.path, cfg.model.revision, local_rank, cfg.dist.timeout_minutes * 60)
    return model_dir(cfg)


def data_file(cfg: TrainingConfig, split: str) -> Path | None:
    if split == "train":
        return Path(cfg.train.train_file) if cfg.train.train_file else Path(cfg.run.out_dir) / "data" / "train.jsonl"
    return Path(cfg.train.eval_file) if cfg.train.eval_file else None


def split_max_dialogues(cfg: TrainingConfig, split: str) -> int:
    return cfg.train.max_dialogues if split == "train" else cfg.train.eval_max_dialogues


def weights_dir(path: Path) -> Path:
    """The folder whose weights the reference runs: an adapter's base, else the folder itself."""
    return adapter_base_path(path) if is_adapter_dir(path) else path


def tokenizer_dir(path: Path) -> Path:
    """The model folder; an adapter folder without tokenizer files falls back to its base."""
    if is_adapter_dir(path) and not any((path / n).is_file() for n in TOKENIZER_FILES):
        return adapter_base_path(path)
    return path


@dataclass
class SplitInputs:
    split: str
    data_file: Path
    data_sha256: str
    max_dialogues: int
    dialogues: list[PrefDialogue]


def resolve_sset(cfg: TrainingConfig) -> StrategySet:
    """data.strategies, or with "auto" the set named by the first train dialogue (else the first eval one)."""
    return resolve_strategy_set(cfg.data.strategies, _named_set(cfg) if cfg.data.strategies == "auto" else None)


def _named_set(cfg: TrainingConfig) -> str | None:
    for split in SPLITS:
        path = data_file(cfg, split)
        if path is None or not path.is_file():
            continue
        try:
            _, first = next(iter(read_jsonl(path, "a preference-dialogue file")), (0, None))
        except DataError:
            continue  # read_dialogues reports the bad record, naming its line
        if isinstance(first, dict):
            return str(first.get("strategy_set") or "") or None
    return None


def load_split(cfg: TrainingConfig, split: str) -> SplitInputs | None:
    """The dialogues of a split (first max_dialogues for train); None when the split has no file."""
    path = data_file(cfg, split)
    if path is None:
        return None
    if not path.is_file():
        where = "train.train_file" if split == "train" else "train.eval_file"
        raise CsoError(f"{where}: '{path}' does not exist (build it with cso-dist data build)")
    n = split_max_dialogues(cfg, split)
    dialogues = read_dialogues(path, resolve_sset(cfg))  # validated like a build's output (unique ids too)
    dialogues = dialogues[:n] if n else dialogues
    return SplitInputs(split, path, sha256_file(path), n, dialogues)


def make_cfg_renderer(cfg: TrainingConfig) -> Renderer:
    return make_renderer(load_tokenizer(tokenizer_dir(model_dir(cfg))), cfg.data.chat_template)
