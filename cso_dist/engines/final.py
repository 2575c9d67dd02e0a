"""From trained weights to an HF `save_pretrained` folder (safetensors): what an engine's final model and
`cso-dist export` of a checkpoint (cso_dist.train.export.export_checkpoint: the engine that wrote it consolidates
its weights) write. LoRA/QLoRA: the adapter alone, or merged into the base."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cso_dist.util.errors import CsoError
from cso_dist.inputs import model_dir
from cso_dist.models import load_model, lora_settings
from cso_dist.models.load import WEIGHT_DTYPE

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def save_final(model, cfg: TrainingConfig, out: Path, tokenizer, final: str | None = None) -> Path:
    """Write `out` atomically (temporary folder + rename): the full model, the LoRA adapter, or the
    adapter merged into the base (`final`: merged | adapter; default train.final)."""
    final = final or cfg.train.final
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.eval()
        is_peft = hasattr(model, "peft_config")
        if is_peft and final == "merged":
            if cfg.model.finetune == "qlora":  # merge into a full-precision copy of the base, not the 4-bit one
                adapter = tmp / "adapter"
                model.save_pretrained(adapter)
                merged = load_model(adapter, "full", cfg.model.precision)
                shutil.rmtree(adapter)
            else:
                merged = model.merge_and_unload()
            merged.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_from_state_dict(sd: dict[str, torch.Tensor], cfg: TrainingConfig) -> torch.nn.Module:
    """A CPU model of the run's kind (full, or base + LoRA) holding the weights of `sd`.

    `sd` may hold every weight or only the trained ones (LoRA); every trained weight of the model
    must be in it, and every key of it must belong to the model."""
    finetune = "lora" if cfg.model.finetune in ("lora", "qlora") else "full"
    lora = lora_settings(cfg.model)
    model = load_model(model_dir(cfg), finetune, cfg.model.precision, lora=lora, device="cpu")
    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trained if n not in sd and not _tied(model, n)]
    if unknown or missing:
        raise CsoError(
            f"the weights do not fit {cfg.model.path} ({cfg.model.finetune}): unexpected {unknown[:3]}, "
            f"missing {missing[:3]}"
        )
    dtype = WEIGHT_DTYPE[cfg.model.precision]
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype if own[k].is_floating_point() else v.dtype))
    if finetune == "full":
        model.to(dtype)
    return model


def _tied(model, name: str) -> bool:
    """lm_head.weight of a model with tied embeddings is saved once, as the embedding."""
    return name.endswith("lm_head.weight") and bool(
        getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    )
