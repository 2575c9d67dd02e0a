"""dist.engine torch: plain PyTorch, one process or data-parallel (DDP under torchrun / srun); every rank holds the
whole model. Full fine-tuning, LoRA and QLoRA. Gradients are all-reduced on a step's last backward."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cso_dist.engines import dist
from cso_dist.engines.checkpoint import load_checkpoint, save_checkpoint
from cso_dist.engines.dist import World
from cso_dist.engines.common import (
    adapter_off,
    make_optimizer,
    make_scheduler,
    make_scorer,
    no_dropout,
    optimizer_step,
    whole_param_bytes,
)
from cso_dist.util.errors import CsoError
from cso_dist.engines.final import save_final
from cso_dist.inputs import model_dir
from cso_dist.models import count_parameters, load_model, lora_settings
from cso_dist.scorer import default_device

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


class TorchEngine:
    kind = "torch"
    collective = False  # a forward involves this rank alone

    def __init__(
        self,
        cfg: TrainingConfig,
        world: World,
        *,
        total_steps: int | None = None,
        resume_from: Path | None = None,
        device: str | None = None,
        finetune: str | None = None,
    ):
        """Training when `total_steps` is given; else a scoring engine (no optimizer, no gradients, eval mode) of
        the model kind `finetune` (default model.finetune). `device`: default the local rank's GPU, else the CPU.
        `resume_from` is read by `load` (every rank holds the whole state)."""
        self.cfg, self.world = cfg, world
        training = total_steps is not None
        self.device = torch.device(device or default_device(world.local_rank))
        self.module = load_model(
            model_dir(cfg),
            finetune or cfg.model.finetune,
            cfg.model.precision,
            lora=lora_settings(cfg.model),
            device=str(self.device),
            gradient_checkpointing=training and cfg.train.gradient_checkpointing,
        )
        no_dropout(self.module)
        self.scorer = self.net = make_scorer(self.module, cfg, self.device)
        if not training:
            self.module.eval()
            self.module.requires_grad_(False)
            return
        self.module.train()
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.scorer, device_ids=None)

    def counts(self) -> tuple[int, int]:
        return count_parameters(self.module)

    def accumulating(self, last: bool):
        """DDP: skip the all-reduce on every backward but the step's last one."""
        if self.world.distributed and not last:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def forward(self, batch, n_chunks: int = 0) -> torch.Tensor:
        return self.net(batch, n_chunks)

    @torch.no_grad()
    def score(self, batch, n_chunks: int = 0) -> torch.Tensor:
        """A forward without gradients, outside the gradient-sync machinery (evaluation, the reference)."""
        return self.scorer(batch, n_chunks)

    def reference(self):
        """The live reference: the adapter disabled."""
        return adapter_off(self.module)

    def generate_kwargs(self) -> dict:
        return {}

    def param_bytes(self) -> dict[str, int]:
        n = whole_param_bytes(self.module)
        return {"now": n, "peak": n, "whole": n}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        return optimizer_step(self.trainable, self.optimizer, self.scheduler, self.cfg.train.max_grad_norm)

    def train(self, on: bool = True) -> None:
        self.module.train(on)

    def save(self, ckpt_dir: Path, step: int, extra: dict, keep_last: int) -> None:
        err = None
        if self.world.main:  # every rank holds the same weights and optimizer state
            try:
                save_checkpoint(ckpt_dir, step, self.module, self.optimizer, self.scheduler, extra, keep_last)
            except CsoError as e:
                err = e
        if dist.any_true(err is not None):  # every rank stops, none waits at a barrier for rank 0
            raise err or CsoError(f"checkpoint step {step} not written on rank 0 (see its error)")

    def load(self, path: Path) -> dict:
        """The plan of micro-batches is global and the optimizer state whole on every rank: any world size resumes
        the same curve."""
        return load_checkpoint(path, self.module, self.optimizer, self.scheduler)

    def final(self, out: Path, tokenizer) -> Path:
        if self.world.main:
            save_final(self.module, self.cfg, out, tokenizer)
        dist.barrier()
        return out

    def close(self) -> None:
        """Drop the DDP wrapper while the process group is still there: its reducer, destroyed after the group
        (when the engine is garbage), could wait forever on gloo (2 of 8 DDP runs hung at exit under load)."""
        self.net = self.scorer
        gc.collect()

    @staticmethod
    def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
        """The trained weights of one of this engine's checkpoints, on the CPU (export)."""
        return torch.load(ckpt / "trainable.pt", map_location="cpu")


ENGINE = TorchEngine
