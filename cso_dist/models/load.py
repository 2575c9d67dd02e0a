"""Load a causal LM for training: full fine-tuning, LoRA or QLoRA (4-bit NF4 base + LoRA).

Only local directories are loaded; a Hub id is resolved to its snapshot in the HF cache first
(cso_dist.models.hub), also an adapter's base named by Hub id. A LoRA adapter directory (one holding
adapter_config.json) loads its base model plus the adapter, trainable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from cso_dist.models import LoraSettings
from cso_dist.util.errors import ConfigError
from cso_dist.models import FINETUNES, PRECISIONS, hub

WEIGHT_DTYPE = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float32)))  # model.precision -> weights
AUTOCAST = {"bf16-mixed": torch.bfloat16}  # compute dtype under torch.autocast (fp32 weights and adapters)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype a model of `precision` computes in under torch.autocast (bf16-mixed), else None: the scorer and
    generation run its forwards under it (cso_dist.scorer.device.feed)."""
    return AUTOCAST.get(precision)


ADAPTER_CONFIG = "adapter_config.json"


def lora_settings(model_cfg) -> LoraSettings:
    """The LoRA settings of a config's model section (model.lora_r, _alpha, _dropout, _target_modules):
    the one place they are read, for training, reference scoring, export and evaluation alike."""
    return LoraSettings(
        model_cfg.lora_r, model_cfg.lora_alpha, model_cfg.lora_dropout, list(model_cfg.lora_target_modules)
    )


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: '{value}' is not one of {', '.join(choices)}")


def _check_dir(path: Path, what: str = "model path") -> None:
    if not path.exists():
        raise ConfigError(f"{what} '{path}' does not exist")
    if not path.is_dir():
        raise ConfigError(f"{what} '{path}' is not a directory")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str | Path) -> Path:
    """The base model directory named by an adapter's adapter_config.json.

    A relative base path is tried relative to the working directory, then to the adapter dir.
    """
    cfg_file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file}: not valid JSON ({exc.msg})") from exc
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{cfg_file}: base_model_name_or_path is missing")
    base_path = Path(base)
    if not base_path.is_absolute() and not base_path.exists():
        alt = Path(adapter_dir) / base_path
        if alt.exists():
            base_path = alt
        elif hub.is_hub_id(base):  # what PEFT writes for a base loaded from the Hub
            return hub.resolve(base, key=f"base model of adapter '{adapter_dir}'")
    _check_dir(base_path, f"base model of adapter '{adapter_dir}'")
    return base_path


def _load_base(path: Path, finetune: str, dtype: torch.dtype, device: str, compute: torch.dtype) -> PreTrainedModel:
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if finetune == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:  # no config.json / weights, unknown model type
        raise ConfigError(f"model path '{path}': cannot load a model ({exc})") from exc
    if finetune != "qlora" and device:  # device "" = leave placement to the caller (DeepSpeed)
        model.to(device)
    return model


def _lora_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _enable_checkpointing(model: torch.nn.Module, reentrant: bool = False) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def load_model(
    path: str | Path,
    finetune: str = "full",
    precision: str = "fp32",
    lora: LoraSettings | None = None,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    reentrant_checkpointing: bool = False,
) -> torch.nn.Module:
    """Load a local model directory for training.

    precision: fp32; bf16 (weights in bf16); bf16-mixed (fp32 weights, every forward under bf16 autocast:
    about twice as fast as fp32 on CPUs with AMX, and what GPUs run as "bf16 mixed precision").
    - full: every parameter trainable, weights in `precision`.
    - lora: base in `precision`, frozen; LoRA adapters (PEFT, fp32 weights) trainable.
    - qlora: base quantised to 4-bit NF4 (double quant, compute dtype = `precision`) on
      `device`, prepared with `prepare_model_for_kbit_training`, then LoRA.
    device "" leaves the weights where loading put them (DeepSpeed places them itself).
    reentrant_checkpointing: ZeRO-3 re-gathers parameters during recomputation, which older
    DeepSpeed/torch pairs reject in the non-reentrant checkpoint's saved-tensor metadata check;
    the DeepSpeed engine asks for reentrant checkpointing under ZeRO-3 (both pass with DeepSpeed
    0.19 on CPU here).
    If `path` is a LoRA adapter dir, its base is loaded the same way and the adapter attached
    trainable (its own adapter_config wins over `lora`); with finetune "full" the adapter is
    merged into the base weights.
    """
    finetune, precision = str(finetune), str(precision)
    _check_choice("model.finetune", finetune, FINETUNES)
    _check_choice("model.precision", precision, PRECISIONS)
    p = Path(path)
    _check_dir(p)
    # bf16-mixed: every forward runs under autocast to AUTOCAST[precision], which the scorer holds and passes to
    # cso_dist.scorer.device.feed (the trie scorer's LM head stays outside it, in fp32); trie rows' attention is
    # set by the scorer too (cso_dist.scorer.run.Scorer)
    return _load(p, finetune, precision, lora, device, gradient_checkpointing, reentrant_checkpointing)


def _load(
    p: Path,
    finetune: str,
    precision: str,
    lora,
    device: str,
    gradient_checkpointing: bool,
    reentrant_checkpointing: bool,
) -> torch.nn.Module:
    dtype = WEIGHT_DTYPE[precision]
    adapter = is_adapter_dir(p)
    base_path = adapter_base_path(p) if adapter else p
    model = _load_base(base_path, finetune, dtype, device, AUTOCAST.get(precision, dtype))

    if finetune == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if gradient_checkpointing:
            model.config.use_cache = False
    elif gradient_checkpointing:
        _enable_checkpointing(model, reentrant_checkpointing)

    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(p), is_trainable=finetune != "full")
        if finetune == "full":
            model = model.merge_and_unload()
            model.to(dtype)
            model.requires_grad_(True)
        return model
    if finetune == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(lora or LoraSettings()))


def logical_numel(param: torch.nn.Parameter) -> int:
    """Logical element count; bitsandbytes 4-bit params store two values per byte."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return param.numel()


def count_parameters(model: torch.nn.Module, numel=logical_numel) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once. `numel`: a parameter's element count (an
    engine whose parameters are partitioned gives the whole parameter's)."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already deduplicates shared tensors
        n = numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
