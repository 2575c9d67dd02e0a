"""The one seam of the trainer: how a model is held, stepped and saved.

TorchEngine      one process, or data-parallel (DDP) under torchrun / srun; full, LoRA and QLoRA.
DeepSpeedEngine  ZeRO stage 2 or 3 (+ optimizer/parameter CPU offload), bf16 or fp32, from a JSON
                 file in cso_dist/ds_configs/; ZeRO-3 partitions the model while it loads (HfDeepSpeedConfig).

Both run an optimizer step over a *variable* number of micro-batches (the trie packs dialogues
under a token budget) and both leave gradient averaging over ranks to the framework, so the loop
scales each rank's loss by the world size: every rank's loss is already a share of the global
step's loss (normalised by the global pair count), and the averaged gradient is then exactly the
single-process gradient of the same global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import torch

from cso_dist import dist
from cso_dist.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, seal, write_failed
from cso_dist.config import TrainingConfig
from cso_dist.scorer import Scorer, default_device
from cso_dist.dist import World
from cso_dist.errors import ConfigError, CsoError
from cso_dist.export import model_from_state_dict, save_final
from cso_dist.models import count_parameters, load_model, lora_settings
from cso_dist.inputs import model_dir, weights_dir
from cso_dist.engines.dsconfig import ds_config_path


def no_dropout(model) -> None:
    """The base model's dropout off (policy and reference must score alike, as TRL's disable_dropout);
    the adapters' own dropout (PEFT's `lora_dropout` modules, model.lora_dropout) stays as configured."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and ".lora_dropout." not in f".{name}.":
            m.p = 0.0
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is not None and hasattr(cfg, "attention_dropout"):
        cfg.attention_dropout = 0.0


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
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes.optim as bo

    cls = {"adamw8bit": bo.AdamW8bit, "paged_adamw8bit": bo.PagedAdamW8bit, "paged_adamw": bo.PagedAdamW}[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


class TorchEngine:
    """Plain torch: one process, or DDP (gradients all-reduced on the step's last backward)."""

    kind = "torch"

    def __init__(self, cfg: TrainingConfig, world: World, total_steps: int, device: str | None = None):
        self.cfg, self.world = cfg, world
        device = device or default_device(world.local_rank)
        self.module = load_model(
            model_dir(cfg),
            cfg.model.finetune,
            cfg.model.precision,
            lora=lora_settings(cfg.model),
            device=device,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            attention=cfg.pack.attention,
        )
        no_dropout(self.module)
        self.module.train()
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.scorer = Scorer(self.module, cfg.pack.logit_chunk)
        self.net = self.scorer
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

    def forward(self, data) -> torch.Tensor:
        return self.net(data)

    def score(self, data) -> torch.Tensor:
        """A forward outside the gradient-sync machinery (evaluation, live reference)."""
        return self.scorer(data)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        t = self.cfg.train
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), lr

    def train(self, on: bool = True) -> None:
        self.module.train(on)

    def save(self, ckpt_dir: Path, step: int, extra: dict, keep_last: int) -> None:
        err = None
        if self.world.main:  # every rank holds the same weights and optimizer state
            try:
                save_checkpoint(
                    ckpt_dir,
                    step,
                    self.module,
                    self.optimizer,
                    self.scheduler,
                    {**extra, "engine": self.kind, "world_size": self.world.world_size},
                    keep_last,
                )
            except CsoError as e:
                err = e
        if dist.any_true(err is not None):  # every rank stops, none waits at a barrier for rank 0
            raise err or CsoError(f"checkpoint step {step} not written on rank 0 (see its error)")

    def load(self, path: Path) -> dict:
        state = json.loads((path / "state.json").read_text())
        if state.get("engine", "torch") != self.kind:
            raise CsoError(
                f"{path} was written by the {state.get('engine')} engine; resume it with "
                f"dist.engine={state.get('engine')} (or export it with cso-dist export)"
            )
        # the plan of micro-batches is global, the optimizer state is whole on every rank:
        # any world size resumes the same curve
        return load_checkpoint(path, self.module, self.optimizer, self.scheduler)

    def final(self, out: Path, tokenizer) -> Path:

        if self.world.main:
            save_final(self.module, self.cfg, out, tokenizer)
        dist.barrier()
        return out


# ---------------------------------------------------------------- DeepSpeed
def ds_config(cfg: TrainingConfig, world: World) -> dict:
    """The DeepSpeed JSON with the values our loop owns filled in: one micro-batch per forward, the
    step boundary set by the loop (managed_gradient_accumulation off), clipping, precision."""
    path = ds_config_path(cfg.dist.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    zero = ds.setdefault("zero_optimization", {})
    if cfg.dist.zero_stage:
        zero["stage"] = cfg.dist.zero_stage
    if zero.get("stage", 0) not in (2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 2 or 3 (got {zero.get('stage', 0)})")
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
    ds.pop("fp16", None)
    ds.pop("optimizer", None)  # ours (make_optimizer), so every engine runs the same AdamW
    ds.pop("scheduler", None)
    return ds


def _stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])


def _offloads_optimizer(ds: dict) -> bool:
    return (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none") not in ("none", None)


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, cfg: TrainingConfig, world: World, total_steps: int, resume_from: Path | None = None):
        import deepspeed

        # DeepSpeed logs every config key at INFO, and torch warns on each legacy collective it calls
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.", category=FutureWarning)

        self.cfg, self.world = cfg, world
        self.ds = ds_config(cfg, world)
        if resume_from is not None:
            self._prepare_resume(resume_from)
        self.stage = _stage(self.ds)
        self._hf_ds = None
        if self.stage == 3:  # from_pretrained partitions every weight as it loads: no rank holds the whole model
            from transformers import AutoConfig
            from transformers.integrations import HfDeepSpeedConfig
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            base = weights_dir(model_dir(cfg))
            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(base))]  # import outside zero.Init
            self._hf_ds = HfDeepSpeedConfig(self.ds)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.module = load_model(
            model_dir(cfg),
            cfg.model.finetune,
            cfg.model.precision,
            lora=lora_settings(cfg.model),
            device="",
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            reentrant_checkpointing=self.stage == 3,
            attention=cfg.pack.attention,
        )
        no_dropout(self.module)
        self.module.train()
        self._counts = count_parameters(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg, cpu_offload=_offloads_optimizer(self.ds))
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        self.scorer = Scorer(self.module, cfg.pack.logit_chunk)
        self.net, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.scorer, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds
        )

    def _prepare_resume(self, path: Path) -> None:
        """A checkpoint from another world size loads through DeepSpeed's universal format (converted once,
        by rank 0, next to the checkpoint)."""
        state = json.loads((path / "state.json").read_text())
        if state.get("engine") != self.kind:
            raise CsoError(
                f"{path} was written by the {state.get('engine', 'torch')} engine; resume it with "
                f"dist.engine={state.get('engine', 'torch')} (or export it with cso-dist export)"
            )
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

    def counts(self) -> tuple[int, int]:
        return self._counts

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def forward(self, data) -> torch.Tensor:
        return self.net(data)

    def score(self, data) -> torch.Tensor:
        return self.net(data)

    def backward(self, loss: torch.Tensor) -> None:
        self.net.backward(loss)

    def step(self) -> tuple[float, float]:
        lr = self.scheduler.get_last_lr()[0]
        self.net.step()
        norm = self.net.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), lr

    def train(self, on: bool = True) -> None:
        self.net.train(on)

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
            state = {"step": step, **extra, "engine": self.kind, "world_size": self.world.world_size}
            state.update(zero_stage=self.stage, model_path=self.cfg.model.path, method=self.cfg.model.finetune)
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
        universal = getattr(self, "_universal", None)
        src = universal if universal is not None else path
        load_dir, _ = self.net.load_checkpoint(
            str(src.parent), tag=src.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_dir is None:
            raise CsoError(f"DeepSpeed could not load the checkpoint {src}")
        return json.loads((path / "state.json").read_text())

    def final(self, out: Path, tokenizer) -> Path:
        """Gather the weights (ZeRO-3: a collective, whole tensors land on rank 0 only) and save them as an
        HF folder from rank 0."""

        if self.stage == 3:
            sd = self.net._zero3_consolidated_16bit_state_dict()  # the API HF Trainer uses too
        else:
            sd = self.scorer.state_dict() if self.world.main else None
        _unset_hf_ds()
        self._hf_ds = None
        if self.world.main:
            sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
            save_final(model_from_state_dict(sd, self.cfg), self.cfg, out, tokenizer)
        dist.barrier()
        return out


def _unset_hf_ds() -> None:
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover - older transformers
        pass


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


def build_engine(
    cfg: TrainingConfig, world: World, total_steps: int, resume_from: Path | None = None, device: str | None = None
):
    """The engine of dist.engine. `device` (torch engine only; default: the local rank's GPU, else the CPU)."""
    if cfg.dist.engine == "deepspeed":
        if device is not None:
            raise ConfigError("dist.engine deepspeed places the model itself: no device can be named")
        return DeepSpeedEngine(cfg, world, total_steps, resume_from)
    return TorchEngine(cfg, world, total_steps, device)
