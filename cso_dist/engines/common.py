"""What every engine shares: the base model's dropout off, the scorer (with compiled layers under train.compile),
cso_dist's optimizer and schedule (every engine runs the same AdamW), and a rank's parameter bytes when its parameters
are whole."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from cso_dist.util.errors import ConfigError
from cso_dist.models import autocast_dtype
from cso_dist.scorer import Scorer, unwrap
from cso_dist.scorer.attention import FlexRows

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def no_dropout(model) -> None:
    """The base model's dropout off (policy and reference must score alike, as TRL's disable_dropout);
    the adapters' own dropout (PEFT's `lora_dropout` modules, model.lora_dropout) stays as configured."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and ".lora_dropout." not in f".{name}.":
            m.p = 0.0
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is not None and hasattr(cfg, "attention_dropout"):
        cfg.attention_dropout = 0.0


def make_scorer(module: torch.nn.Module, cfg: TrainingConfig, device) -> Scorer:
    """The engine's scorer: scorer.logit_chunk, scorer.attention (set on the model, held by the scorer), the
    autocast of model.precision, flex rows padded to pack.bucket (FlexRows), and under train.compile every decoder
    layer compiled (regional compilation: the layers share one graph per row length)."""
    flex = FlexRows.of(cfg.pack.max_tokens, cfg.pack.bucket)
    amp = autocast_dtype(cfg.model.precision)
    scorer = Scorer(module, cfg.scorer.logit_chunk, device, flex, cfg.scorer.attention, amp)
    if cfg.train.compile:
        compile_layers(module, scorer.attention)
    return scorer


def compile_layers(module: torch.nn.Module, kind: str) -> None:
    """torch.compile each decoder layer in place (static shapes: rows run at pack.bucket's lengths, which only flex
    attention pads to; any other kind would compile once per row length)."""
    if kind != "flex":
        raise ConfigError(
            f"train.compile: scorer.attention resolved to {kind} here (auto is flex on CUDA only), whose rows have any "
            "length; compiled layers need flex attention"
        )
    layers = getattr(unwrap(module).get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"train.compile: {type(unwrap(module)).__name__} has no decoder layers to compile")
    for layer in layers:
        layer.compile(dynamic=False)


def optimizer_step(trainable: list, optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip the gradients' global norm (0 = no clipping), step the optimizer and the schedule, clear the gradients:
    (the norm before clipping, the learning rate the step used). Sharded (DTensor) gradients give their global norm."""
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), lr


def make_scheduler(optimizer, cfg: TrainingConfig, total: int):
    warmup = int(cfg.train.warmup_ratio * total)
    kind = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: list, cfg: TrainingConfig, cpu_offload: bool = False):
    """AdamW (torch), bitsandbytes 8-bit / paged AdamW, or DeepSpeedCPUAdam under optimizer offload."""
    t = cfg.train
    if cpu_offload:
        if t.optimizer != "adamw":
            raise ConfigError(
                f"train.optimizer: '{t.optimizer}' cannot run with DeepSpeed optimizer offload "
                "(offload uses DeepSpeed's CPU Adam); use adamw"
            )
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=t.fused_adamw or None)
    import bitsandbytes.optim as bo

    cls = {"adamw8bit": bo.AdamW8bit, "paged_adamw8bit": bo.PagedAdamW8bit, "paged_adamw": bo.PagedAdamW}[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def whole_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters as this rank holds them whole (tied weights once; 4-bit weights packed)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_off(model: torch.nn.Module):
    """The context a model's reference is scored in: its LoRA adapter disabled (a model without one is its own)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
