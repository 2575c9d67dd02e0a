"""dist.engine deepspeed: ZeRO stage 2 or 3 (+ optimizer / parameter CPU offload), bf16 or fp32, from a JSON in
engines/ds_configs/ or the user's own.

ZeRO-3 partitions the model while it loads (HfDeepSpeedConfig): no rank ever holds it whole. That holds for
training and for scoring without gradients alike -- the reference precompute, the live reference, likelihood
evaluation and generation (`generate(synced_gpus=True)`): every forward gathers one layer at a time from all ranks,
so a rank holds about parameters / world + the layers in flight. Every forward is therefore a collective
(`collective`): the callers make every rank run the same forwards with the same number of LM-head calls.
Under ZeRO-2 a scoring engine needs no DeepSpeed at all: the weights are whole on every rank anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cso_dist.engines import dist
from cso_dist.engines.checkpoint import list_checkpoints, seal, write_failed
from cso_dist.engines.dist import World
from cso_dist.engines.common import (
    adapter_off,
    make_optimizer,
    make_scheduler,
    make_scorer,
    no_dropout,
    whole_param_bytes,
)
from cso_dist.engines.dsconfig import offload_of, read_ds_config
from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.engines.final import model_from_state_dict, save_final
from cso_dist.inputs import model_dir, weights_dir
from cso_dist.models import count_parameters, load_model, lora_settings
from cso_dist.models.load import logical_numel
from cso_dist.scorer import unwrap

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def ds_config(cfg: TrainingConfig, world: World) -> dict:
    """The DeepSpeed JSON with the values our loop owns filled in: one micro-batch per forward, the step boundary
    set by the loop (managed_gradient_accumulation off), clipping, precision (a JSON with its own optimizer,
    scheduler or fp16 is refused at load: cso_dist.engines.dsconfig)."""
    ds = read_ds_config(cfg.dist.deepspeed_config, cfg.dist.zero_stage)
    ds.update(
        {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": world.world_size,
            "managed_gradient_accumulation": False,
            "gradient_clipping": cfg.train.max_grad_norm,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
    )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.model.precision == "bf16"}
    ds.pop("fp16", None)  # off or "auto": precision is model.precision's
    return ds


def _stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])


class DeepSpeedEngine:
    kind = "deepspeed"

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
        """Training when `total_steps` is given; else a scoring engine (no optimizer, no gradients, eval mode) of the
        model kind `finetune` (default model.finetune). The rank's accelerator is DeepSpeed's choice: no `device`."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if device is not None:
            raise ConfigError("dist.engine deepspeed places the model itself: no device can be named")
        # DeepSpeed logs every config key at INFO, and torch warns on each legacy collective it calls
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.", category=FutureWarning)

        self.cfg, self.world = cfg, world
        training = total_steps is not None
        self.ds = ds_config(cfg, world)
        self._universal = None
        if resume_from is not None:
            self._prepare_resume(resume_from)
        self.stage = _stage(self.ds)
        self.collective = self.stage == 3
        self.device = torch.device(get_accelerator().current_device_name())
        self._hf_ds = None
        for k, v in dist.launcher_env(world).items():  # DeepSpeed reads its rank from the environment
            os.environ.setdefault(k, v)
        if not world.distributed:
            dist.init_single()  # DeepSpeed needs a process group even for one process
        if self.collective:  # from_pretrained partitions every weight as it loads: no rank holds the whole model
            from transformers import AutoConfig
            from transformers.integrations import HfDeepSpeedConfig
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            base = weights_dir(model_dir(cfg))
            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(base))]  # import outside zero.Init
            self._hf_ds = HfDeepSpeedConfig(self.ds)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.module = load_model(
            model_dir(cfg),
            finetune or cfg.model.finetune,
            cfg.model.precision,
            lora=lora_settings(cfg.model),
            device="" if self.collective else str(self.device),
            gradient_checkpointing=training and cfg.train.gradient_checkpointing,
            reentrant_checkpointing=self.collective,
        )
        no_dropout(self.module)
        self._counts = count_parameters(self.module, _whole_numel)
        self.scorer = self.net = make_scorer(self.module, cfg, self.device)
        self._peak = 0
        if not training:
            self.module.eval()
            self.module.requires_grad_(False)
            if self.collective:  # partitioned inference: parameters only, no optimizer (ZeRO-Offload's partitioner)
                self.net, *_ = deepspeed.initialize(model=self.scorer, config=self.ds)
        else:
            self.module.train()
            params = [p for p in self.module.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, cfg, cpu_offload=offload_of(self.ds) != "none")
            scheduler = make_scheduler(optimizer, cfg, total_steps)
            self.net, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.scorer, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds
            )
        if self.collective:  # after DeepSpeed's own hooks: a layer is gathered when ours sample it
            self._track_peak()

    # ------------------------------------------------------------ resuming
    def _prepare_resume(self, path: Path) -> None:
        """A checkpoint from another world size loads through DeepSpeed's universal format (converted once,
        by rank 0, next to the checkpoint)."""
        state = json.loads((path / "state.json").read_text())
        if state.get("zero_stage") != _stage(self.ds):
            raise CsoError(
                f"{path} was written with ZeRO stage {state.get('zero_stage')}; this run uses stage "
                f"{_stage(self.ds)}: resume with the same dist.deepspeed_config"
            )
        if state.get("world_size") == self.world.world_size:
            return
        universal = path.parent / f"{path.name}-universal"
        if self.world.main and not (universal / "done").is_file():
            print(
                f"{path}: written by {state.get('world_size')} ranks, resuming on {self.world.world_size}: "
                f"converting to a DeepSpeed universal checkpoint in {universal}",
                flush=True,
            )
            to_universal(path, universal)
        dist.barrier()
        self.ds["checkpoint"] = {**self.ds.get("checkpoint", {}), "load_universal": True}
        self._universal = universal

    # ------------------------------------------------------------ what a rank holds
    def _resident(self) -> int:
        """Parameter bytes allocated on this rank now: its partitions, plus every parameter gathered whole."""
        return self._partitions + sum(p.data.numel() * p.element_size() for p in self._params)

    def _track_peak(self) -> None:
        """Sample the resident bytes as each decoder layer and the embeddings start their forward (gathered by then;
        a few dozen sums per forward)."""
        self._params = list(self.module.parameters())
        self._partitions = sum(
            p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self._params if hasattr(p, "ds_tensor")
        )

        def sample(*_):
            self._peak = max(self._peak, self._resident())

        hf = unwrap(self.module)
        blocks = max((m for m in hf.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])
        for m in [*blocks, hf.get_input_embeddings(), hf.get_output_embeddings()]:
            if m is not None:
                m.register_forward_pre_hook(sample)

    def param_bytes(self) -> dict[str, int]:
        """This rank's parameter bytes: now, the most at any layer's start since loading, and the whole model's."""
        if not self.collective:
            n = whole_param_bytes(self.module)
            return {"now": n, "peak": n, "whole": n}
        now = self._resident()
        whole = sum(_whole_numel(p) * p.element_size() for p in self._params)
        return {"now": now, "peak": max(self._peak, now), "whole": whole}

    def counts(self) -> tuple[int, int]:
        return self._counts

    # ------------------------------------------------------------ running
    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def forward(self, batch, n_chunks: int = 0) -> torch.Tensor:
        return self.net(batch, n_chunks)

    @torch.no_grad()
    def score(self, batch, n_chunks: int = 0) -> torch.Tensor:
        return self.net(batch, n_chunks)

    def reference(self):
        """The live reference: the adapter disabled."""
        return adapter_off(self.module)

    def generate_kwargs(self) -> dict:
        """ZeRO-3: every rank runs generate() until all are done (each step gathers the layers collectively)."""
        return {"synced_gpus": True} if self.collective else {}

    def backward(self, loss: torch.Tensor) -> None:
        self.net.backward(loss)

    def step(self) -> tuple[float, float]:
        lr = self.scheduler.get_last_lr()[0]
        self.net.step()
        norm = self.net.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), lr

    def train(self, on: bool = True) -> None:
        self.net.train(on)

    # ------------------------------------------------------------ checkpoints and the final model
    def save(self, ckpt_dir: Path, step: int, extra: dict, keep_last: int) -> None:
        """Every rank writes its shard into a temporary tag; rank 0 then adds state.json and renames
        it to step-NNNNNNN (a crash leaves no half-written checkpoint behind a complete name)."""
        name = f"step-{step:07d}"
        tmp = f".{name}.tmp"
        if self.world.main:
            shutil.rmtree(ckpt_dir / tmp, ignore_errors=True)
        dist.barrier()
        err = None
        try:
            self.net.save_checkpoint(str(ckpt_dir), tag=tmp, client_state={"step": step}, save_latest=False)
        except (OSError, RuntimeError) as e:
            err = write_failed(ckpt_dir, step, e)
        failed = dist.any_true(err is not None)  # every rank calls each any_true: none waits alone
        if self.world.main and not failed:
            state = {"step": step, **extra, "zero_stage": self.stage}
            try:
                seal(ckpt_dir / tmp, state)
                if (ckpt_dir / name).exists():
                    shutil.rmtree(ckpt_dir / name)
                os.replace(ckpt_dir / tmp, ckpt_dir / name)
                for old in list_checkpoints(ckpt_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
                    shutil.rmtree(old.parent / f"{old.name}-universal", ignore_errors=True)
            except OSError as e:
                err = write_failed(ckpt_dir, step, e)
        if dist.any_true(err is not None):
            if self.world.main:
                shutil.rmtree(ckpt_dir / tmp, ignore_errors=True)
            raise err or CsoError(f"checkpoint step {step} not written on another rank (see its error)")

    def load(self, path: Path) -> dict:
        src = self._universal if self._universal is not None else path
        load_dir, _ = self.net.load_checkpoint(
            str(src.parent), tag=src.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_dir is None:
            raise CsoError(f"DeepSpeed could not load the checkpoint {src}")
        return json.loads((path / "state.json").read_text())

    def final(self, out: Path, tokenizer) -> Path:
        """Gather the weights (ZeRO-3: a collective, whole tensors land on rank 0 only) and save them as an
        HF folder from rank 0."""
        if self.collective:
            sd = self.net._zero3_consolidated_16bit_state_dict()  # the API HF Trainer uses too
        else:
            sd = self.scorer.state_dict() if self.world.main else None
        self._unset_hf_ds()  # the CPU copy below loads as a plain model
        if self.world.main:
            sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
            save_final(model_from_state_dict(sd, self.cfg), self.cfg, out, tokenizer)
        dist.barrier()
        return out

    def _unset_hf_ds(self) -> None:
        if self._hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds = None

    def close(self) -> None:
        """Release the partitioned model (DeepSpeed's hooks and buffers) and its global HF config, so another engine
        can load after this one in the same process (the reference precompute before training)."""
        destroy = getattr(self.net, "destroy", None)
        if destroy is not None:
            destroy()
        self._unset_hf_ds()

    @staticmethod
    def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
        """The weights of one of this engine's checkpoints, consolidated on the CPU (DeepSpeed's zero_to_fp32)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}


def _whole_numel(p) -> int:
    """A parameter's element count; under ZeRO-3 the whole parameter's, not this rank's partition."""
    return int(getattr(p, "ds_numel", 0)) or logical_numel(p)


def to_universal(path: Path, out: Path) -> None:
    """ds_to_universal on one checkpoint tag (DeepSpeed's own converter)."""
    from deepspeed.checkpoint.ds_to_universal import main as convert

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        no_strict=False,
        inject_missing_state=False,
    )
    try:
        convert(args)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises bare assertions and KeyErrors here
        shutil.rmtree(out, ignore_errors=True)
        raise CsoError(
            f"{path}: DeepSpeed cannot convert this checkpoint to another world size "
            f"({type(e).__name__}: {e}); resume with the world size that wrote it"
        ) from None
    (out / "done").write_text("1")


ENGINE = DeepSpeedEngine
