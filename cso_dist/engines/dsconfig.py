"""DeepSpeed's JSON configs: the shipped ones (engines/ds_configs/, package data) or a user's file, and the
values our loop owns filled in. Light (json only): the config and the planner read it without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

from cso_dist.util.errors import ConfigError

SHIPPED = ("zero2", "zero3", "zero3_offload")  # engines/ds_configs/<name>.json
ZERO_STAGES = (2, 3)  # the stages the deepspeed engine runs (dist.zero_stage 0 = as the JSON says)


def ds_config_path(name: str) -> Path:
    if name in SHIPPED:
        return Path(__file__).resolve().parent / "ds_configs" / f"{name}.json"
    p = Path(name)
    if not p.is_file():
        raise ConfigError(f"dist.deepspeed_config: '{name}' is neither a file nor one of {', '.join(SHIPPED)}")
    return p


def read_ds_config(name: str, zero_stage: int = 0) -> dict:
    """The JSON of dist.deepspeed_config, its ZeRO stage overridden by dist.zero_stage (when not 0) and checked."""
    path = ds_config_path(name)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: not a JSON object")
    for key, why in (("optimizer", "train.optimizer, train.lr"), ("scheduler", "train.schedule, train.warmup_ratio")):
        if key in ds:  # every engine runs cso_dist's own: a block here would be ignored, so it is refused
            raise ConfigError(f"{path}: its {key} block would not be used (cso_dist sets {why}); remove it")
    if (ds.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: fp16 is not supported; remove the fp16 block and set model.precision bf16 or fp32")
    zero = ds.setdefault("zero_optimization", {})
    if zero_stage:
        zero["stage"] = zero_stage
    if zero.get("stage", 0) not in ZERO_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage must be 2 or 3 (got {zero.get('stage', 0)})")
    return ds


def offload_of(ds: dict) -> str:
    """none | optimizer | params (params: parameters and optimizer states in host memory)."""
    z = ds["zero_optimization"]
    dev = lambda k: (z.get(k) or {}).get("device", "none") or "none"  # noqa: E731
    return "params" if dev("offload_param") != "none" else "optimizer" if dev("offload_optimizer") != "none" else "none"


def ds_sharding(cfg) -> tuple[int, str]:
    """(ZeRO stage, offload) of a config's dist section under the deepspeed engine."""
    ds = read_ds_config(cfg.dist.deepspeed_config, cfg.dist.zero_stage)
    return int(ds["zero_optimization"]["stage"]), offload_of(ds)
