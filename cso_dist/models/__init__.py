"""Models and tokenizers: tiny offline models, the real Qwen2.5 vocabulary, LoRA/QLoRA loading."""

from cso_dist.models.load import LoraSettings, count_parameters, is_adapter_dir, load_model, lora_settings
from cso_dist.models.tiny import build_tiny_model, init_model, make_tokenizer, tiny_config
from cso_dist.models.tokenizer import QWEN_SPECIAL_IDS, bpe_tokenizer, load_tokenizer, qwen_tokenizer

__all__ = [
    "LoraSettings",
    "QWEN_SPECIAL_IDS",
    "bpe_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "init_model",
    "is_adapter_dir",
    "load_model",
    "load_tokenizer",
    "lora_settings",
    "make_tokenizer",
    "qwen_tokenizer",
    "tiny_config",
]
