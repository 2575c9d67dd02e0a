"""From trained weights to an HF `save_pretrained` folder (safetensors): the final output of a run
and `cso-dist export` of any checkpoint (torch engine, or DeepSpeed ZeRO-2/3 shards consolidated
with DeepSpeed's zero_to_fp32). LoRA/QLoRA: the adapter alone, or merged into the base."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cso_dist.checkpoint import list_checkpoints
from cso_dist.config import TrainingConfig, load_config
from cso_dist.errors import CsoError
from cso_dist.inputs import model_dir, tokenizer_dir
from cso_dist.models import load_model, load_tokenizer, lora_settings
from cso_dist.models.load import WEIGHT_DTYPE


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
    method = "lora" if cfg.model.finetune in ("lora", "qlora") else "full"
    lora = lora_settings(cfg.model)
    model = load_model(model_dir(cfg), method, cfg.model.precision, lora=lora, device="cpu")
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
    if method == "full":
        model.to(dtype)
    return model


def _tied(model, name: str) -> bool:
    """lm_head.weight of a model with tied embeddings is saved once, as the embedding."""
    return name.endswith("lm_head.weight") and bool(
        getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    )


def _run_config(ckpt: Path) -> TrainingConfig:
    """The config.yaml of the run a checkpoint belongs to (<run>/checkpoints/step-N)."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            return load_config(f, {})
    raise CsoError(f"{ckpt}: no config.yaml of its run found (expected <run>/config.yaml beside checkpoints/)")


def checkpoint_state_dict(ckpt: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of a checkpoint folder (step-NNNNNNN) and the engine that wrote it."""
    state_file = ckpt / "state.json"
    if not state_file.is_file():
        raise CsoError(f"{ckpt}: not a complete checkpoint (no state.json)")
    engine = json.loads(state_file.read_text()).get("engine", "torch")
    if engine == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}, engine
    return torch.load(ckpt / "trainable.pt", map_location="cpu"), engine


def export(ckpt: Path, out: Path, final: str | None = None) -> Path:
    """`cso-dist export`: a checkpoint folder, or a run folder (its latest checkpoint), to an HF folder."""

    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file():
        done = list_checkpoints(ckpt / "checkpoints") or list_checkpoints(ckpt)
        if not done:
            raise CsoError(f"{ckpt}: neither a checkpoint (step-NNNNNNN with state.json) nor a run folder with one")
        ckpt = done[-1]
    cfg = _run_config(ckpt)
    sd, engine = checkpoint_state_dict(ckpt)
    model = model_from_state_dict(sd, cfg)
    tok = load_tokenizer(tokenizer_dir(model_dir(cfg)))
    save_final(model, cfg, out, tok, final)
    print(f"exported {ckpt} ({engine} engine, {cfg.model.finetune}) -> {out}")
    return Path(out)
