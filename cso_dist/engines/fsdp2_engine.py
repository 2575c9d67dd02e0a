"""dist.engine fsdp2: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard), per-parameter sharding (DTensor) over
the ranks. Each decoder layer is its own group, gathered for its forward and backward and released after; the
scorer (embeddings, final norm, LM head: tied weights stay together) is the root group. Full fine-tuning and LoRA;
bf16 weights gathered in bf16 with gradients reduced in fp32; CPU offload (dist.offload); checkpoints through
torch.distributed.checkpoint (DCP: every rank writes its shards, any world size reads them back).

QLoRA is refused (cso_dist.engines.ENGINES): FSDP2 shards bitsandbytes' 4-bit parameters as plain tensors, which
loses their quantisation state and with it the memory saving. Generation (eval generate) is refused too: HF's
generate() runs the model outside the scorer, whose root group holds the embeddings; likelihood evaluation, the
reference precompute and the live reference run through the scorer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cso_dist.engines import dist
from cso_dist.engines.checkpoint import _rng_state, _set_rng_state, list_checkpoints, seal, write_failed
from cso_dist.engines.dist import World
from cso_dist.engines.common import adapter_off, make_optimizer, make_scheduler, make_scorer, no_dropout, optimizer_step
from cso_dist.util.errors import CsoError
from cso_dist.engines.final import model_from_state_dict, save_final
from cso_dist.inputs import model_dir
from cso_dist.models import count_parameters, load_model, lora_settings
from cso_dist.scorer import default_device, unwrap

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def _local_bytes(p: torch.Tensor) -> int:
    """Bytes this rank holds of a parameter: its shard when sharded (DTensor), the tensor when gathered."""
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.numel() * local.element_size()


def _whole_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


class FSDP2Engine:
    kind = "fsdp2"
    collective = True  # every forward gathers each layer from all ranks

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
        model kind `finetune` (default model.finetune). `device`: default the local rank's GPU, else the CPU."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.cfg, self.world = cfg, world
        training = total_steps is not None
        self.device = torch.device(device or default_device(world.local_rank))
        if not world.distributed:
            dist.init_single()  # a device mesh needs a process group, also for one process
        self.module = load_model(
            model_dir(cfg),
            finetune or cfg.model.finetune,
            cfg.model.precision,
            lora=lora_settings(cfg.model),
            device="cpu",  # fully_shard moves each rank's shards to the mesh's device
            gradient_checkpointing=training and cfg.train.gradient_checkpointing,
        )
        no_dropout(self.module)
        self._counts = count_parameters(self.module)
        self._whole = sum(_whole_bytes(p) for p in self.module.parameters())
        self.scorer = self.net = make_scorer(self.module, cfg, self.device)
        mesh = init_device_mesh(self.device.type, (world.world_size,))
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if cfg.model.precision.startswith("bf16") else None,
            reduce_dtype=torch.float32,
            cast_forward_inputs=False,  # a row's tensors and masks reach every layer as they were built
        )
        kw = {"mesh": mesh, "mp_policy": mp}
        if cfg.dist.offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")  # pinning needs a GPU
        self.layers = list(_decoder_layers(self.module))
        for layer in self.layers:
            fully_shard(layer, **kw)
        fully_shard(self.scorer, **kw)  # the root: embeddings, final norm, LM head (tied or not), LoRA outside layers
        self._peak = 0
        self._track_peak()
        if not training:
            self.module.eval()
            self.module.requires_grad_(False)
            return
        self.module.train()
        self.trainable = [p for p in self.scorer.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)

    # ------------------------------------------------------------ what a rank holds
    def _resident(self) -> int:
        return sum(_local_bytes(p) for p in self.scorer.parameters())

    def _track_peak(self) -> None:
        """Sample the resident bytes as each layer starts its forward (gathered by then: FSDP2's hook runs first)."""

        def sample(*_):
            self._peak = max(self._peak, self._resident())

        for layer in self.layers:
            layer.register_forward_pre_hook(sample)

    def param_bytes(self) -> dict[str, int]:
        """This rank's parameter bytes: now (its shards), the most at any layer's start, and the whole model's."""
        now = self._resident()
        return {"now": now, "peak": max(self._peak, now), "whole": self._whole}

    def counts(self) -> tuple[int, int]:
        return self._counts

    # ------------------------------------------------------------ running
    def accumulating(self, last: bool):
        """Gradients are reduce-scattered after every backward (each rank keeps only its shard of them)."""
        return contextlib.nullcontext()

    def forward(self, batch, n_chunks: int = 0) -> torch.Tensor:
        return self.scorer(batch, n_chunks)

    @torch.no_grad()
    def score(self, batch, n_chunks: int = 0) -> torch.Tensor:
        return self.scorer(batch, n_chunks)

    def reference(self):
        """The live reference: the adapter disabled."""
        return adapter_off(self.module)

    def generate_kwargs(self) -> dict:
        raise CsoError(
            "eval generate with dist.engine fsdp2: generate() would run outside the sharded scorer; use dist.engine "
            "deepspeed (ZeRO-3) or torch, or eval.backend openai (a vLLM/SGLang server)"
        )

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        return optimizer_step(self.trainable, self.optimizer, self.scheduler, self.cfg.train.max_grad_norm)

    def train(self, on: bool = True) -> None:
        self.module.train(on)

    # ------------------------------------------------------------ checkpoints and the final model
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.scorer, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optim": optim}

    def save(self, ckpt_dir: Path, step: int, extra: dict, keep_last: int) -> None:
        """Every rank writes its shards (DCP) into a temporary folder; rank 0 adds the schedule, the RNG state and
        state.json, then renames it to step-NNNNNNN."""
        import torch.distributed.checkpoint as dcp

        name = f"step-{step:07d}"
        tmp = ckpt_dir / f".{name}.tmp"
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        err = None
        try:
            dcp.save(self._state(), checkpoint_id=str(tmp))
        except (OSError, RuntimeError) as e:
            err = write_failed(ckpt_dir, step, e)
        failed = dist.any_true(err is not None)
        if self.world.main and not failed:
            try:
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(_rng_state(), tmp / "rng.pt")
                seal(tmp, {"step": step, **extra})
                if (ckpt_dir / name).exists():
                    shutil.rmtree(ckpt_dir / name)
                os.replace(tmp, ckpt_dir / name)
                for old in list_checkpoints(ckpt_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            except (OSError, RuntimeError) as e:
                err = write_failed(ckpt_dir, step, e)
        if dist.any_true(err is not None):
            if self.world.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise err or CsoError(f"checkpoint step {step} not written on another rank (see its error)")

    def load(self, path: Path) -> dict:
        """DCP reads the shards this rank needs, whatever the world size that wrote them."""
        import json

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.scorer,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True),
        )
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / "state.json").read_text())

    def final(self, out: Path, tokenizer) -> Path:
        """The trained weights gathered whole on rank 0 (a collective), saved there as an HF folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        sd = get_model_state_dict(self.scorer, options=opts)
        if self.world.main:
            save_final(model_from_state_dict(_model_keys(sd), self.cfg), self.cfg, out, tokenizer)
        dist.barrier()
        return out

    def close(self) -> None:
        pass

    @staticmethod
    def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
        """The trained weights of one of this engine's checkpoints, consolidated on the CPU without a process group
        (DCP's own converter)."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            whole = Path(tmp) / "whole.pt"
            dcp_to_torch_save(str(ckpt), str(whole))
            sd = torch.load(whole, map_location="cpu", weights_only=False)
        return _model_keys(sd["model"])


def _model_keys(sd: dict) -> dict[str, torch.Tensor]:
    """The scorer's keys ("model.<name>") as the model's own names."""
    return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}


def _decoder_layers(module: torch.nn.Module):
    layers = getattr(unwrap(module).get_decoder(), "layers", None)
    if layers is None:
        raise CsoError(f"dist.engine fsdp2: {type(unwrap(module)).__name__} has no decoder layers to shard")
    return layers


ENGINE = FSDP2Engine
