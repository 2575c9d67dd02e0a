"""The engine seam: how a model is held -- placed, stepped, scored without gradients, checkpointed and
consolidated. Nothing outside this package branches on an engine's name or touches its framework.

  torch      one process, or DDP under torchrun / srun (cso_dist.engines.torch_engine): every rank holds the
             whole model; full, LoRA and QLoRA.
  fsdp2      PyTorch's FSDP2 (fully_shard): each decoder layer sharded over the ranks and gathered per forward,
             like ZeRO-3, with DCP checkpoints (cso_dist.engines.fsdp2_engine); full and LoRA.
  deepspeed  DeepSpeed ZeRO-2 / ZeRO-3 (+ CPU offload) from a JSON in engines/ds_configs/
             (cso_dist.engines.deepspeed_engine); under ZeRO-3 the model is loaded partitioned and every
             forward -- training, the reference precompute, the live reference, evaluation -- gathers its
             layers one at a time, so a rank holds about parameters / world + one layer.

ENGINES (name -> EngineSpec) is light: the config validates `dist.engine` against it and the planner reads an
engine's sharding from it without importing torch. `build_engine` (training) and `build_scorer` (scoring
without gradients: precompute, likelihood evaluation, generation) construct one (cso_dist.engines.build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

from cso_dist.engines.dsconfig import ds_sharding
from cso_dist.util.lazy import lazy_exports
from cso_dist.models import FINETUNES

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from cso_dist.scorer.run import Scorer

SCHEDULES = ("cosine", "linear", "constant")  # train.schedule after warm-up (common.make_scheduler)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw")  # train.optimizer (common.make_optimizer)
FINALS = ("merged", "adapter")  # train.final: what a LoRA/QLoRA run writes (engines.final)
REFERENCES = ("cache", "adapter")  # train.reference: precomputed, or scored live with the adapter off (reference)


@dataclass(frozen=True)
class EngineSpec:
    """What an engine declares before anything is loaded."""

    name: str
    module: str  # cso_dist.engines.<module> defines the engine class `Engine`
    finetunes: tuple[str, ...]  # the model.finetune kinds it trains
    why_not: str  # why a finetune kind it does not train is refused, and what to use instead
    sharding: Callable[[Any], tuple[int, str]]  # cfg -> (ZeRO stage or 0, offload: none | optimizer | params)
    keys: tuple[str, ...] = ()  # the dist.<key>s only this engine reads (another engine refuses them when set)
    compiled_layers: str = ""  # why it cannot run train.compile's compiled decoder layers ("" = it can)
    # the planner: how it names the sharding ({stage}, {offload}), and whether the sharded weights' gather buffers
    # are the root group (embeddings, LM head) held through a forward plus two layers (FSDP2) or DeepSpeed's buckets
    label: str = "DeepSpeed ZeRO-{stage}, offload {offload}"
    root_gathered: bool = False


def _fsdp2_sharding(cfg) -> tuple[int, str]:
    """FSDP2 shards parameters, gradients and optimizer states as ZeRO-3 does; dist.offload moves them to the CPU.
    bitsandbytes' optimizers cannot step its sharded (DTensor) parameters."""
    from cso_dist.util.errors import ConfigError

    if cfg.train.optimizer != "adamw":
        raise ConfigError(
            f"config: train.optimizer: '{cfg.train.optimizer}' (bitsandbytes) cannot step FSDP2's sharded parameters; "
            "use adamw with dist.engine fsdp2"
        )
    return 3, "params" if cfg.dist.offload else "none"


ENGINES: dict[str, EngineSpec] = {
    "torch": EngineSpec("torch", "torch_engine", FINETUNES, "", lambda cfg: (0, "none")),
    "deepspeed": EngineSpec(
        "deepspeed",
        "deepspeed_engine",
        tuple(f for f in FINETUNES if f != "qlora"),
        "qlora runs on the torch engine (one GPU, or DDP under torchrun); 4-bit weights under DeepSpeed "
        "(bnb_4bit_quant_storage) are not supported by cso_dist: use model.finetune lora with dist.engine deepspeed",
        ds_sharding,
        ("deepspeed_config", "zero_stage"),
        "ZeRO gathers and releases each layer's parameters in hooks around it, which compiled layers would trace; "
        "use dist.engine torch",
    ),
    "fsdp2": EngineSpec(
        "fsdp2",
        "fsdp2_engine",
        tuple(f for f in FINETUNES if f != "qlora"),
        "qlora under FSDP2 would shard bitsandbytes' 4-bit weights as plain tensors, losing their quantisation state "
        "and the memory saving; use model.finetune lora with dist.engine fsdp2, or qlora on the torch engine",
        _fsdp2_sharding,
        ("offload",),
        "FSDP2 with compiled layers is not tested in cso_dist yet; use dist.engine torch",
        "FSDP2 (fully_shard), offload {offload}",
        True,
    ),
}
NAMES = tuple(ENGINES)  # dist.engine's choices


class Engine(Protocol):
    """What every engine offers the training loop, precompute and evaluation."""

    kind: str  # its name in ENGINES (recorded in checkpoints)
    module: torch.nn.Module  # the (PEFT-wrapped) Hugging Face model
    scorer: Scorer  # runs the model on a micro-batch; holds its attention kind and autocast dtype
    device: torch.device  # where this rank computes
    collective: bool  # every forward is a collective: ranks must run the same forwards (ZeRO-3)

    def counts(self) -> tuple[int, int]: ...  # (trainable, total) parameters of the whole model
    def train(self, on: bool = True) -> None: ...
    def accumulating(self, last: bool) -> ContextManager: ...
    def forward(self, batch, n_chunks: int = 0) -> torch.Tensor: ...  # per-reply log-probs, with gradients
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> tuple[float, float]: ...  # (gradient norm, learning rate)
    def score(self, batch, n_chunks: int = 0) -> torch.Tensor: ...  # per-reply log-probs, no gradients
    def reference(self) -> ContextManager: ...  # the adapter disabled: the live reference
    def generate_kwargs(self) -> dict: ...  # what generate() needs under this engine
    def param_bytes(self) -> dict[str, int]: ...  # this rank's resident parameter bytes (now, and peak)
    def save(self, ckpt_dir: Path, step: int, extra: dict, keep_last: int) -> None: ...
    def load(self, path: Path) -> dict: ...
    def final(self, out: Path, tokenizer) -> Path: ...
    def close(self) -> None: ...  # release what the engine set up globally (DeepSpeed's HF config)
    @staticmethod
    def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]: ...  # a checkpoint's weights, consolidated


def shards_weights(cfg) -> bool:
    """Whether cfg's engine partitions the weights over the ranks (ZeRO-3): then every forward is a collective and
    the ranks load, score and decide together."""
    return ENGINES[cfg.dist.engine].sharding(cfg)[0] == 3


__all__ = [
    "ENGINES",
    "FINALS",
    "OPTIMIZERS",
    "REFERENCES",
    "SCHEDULES",
    "NAMES",
    "Engine",
    "EngineSpec",
    "build_engine",
    "build_scorer",
    "checkpoint_weights",
    "shards_weights",
]
__getattr__ = lazy_exports(__name__, dict.fromkeys(("build_engine", "build_scorer", "checkpoint_weights"), "build"))
