"""One typed config for every command: YAML file + dotted overrides (`--data.negatives 5`).

Every key is a dataclass field; unknown keys, wrong types and out-of-range values fail at
load with the key named. Later stages (precompute, train, eval, launch) add sections here.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cso_dist.errors import ConfigError

SOURCES = ("escpro", "cso-rows", "kto-rows", "trl", "esconv")


@dataclass
class DataConfig:
    source: Literal["escpro", "cso-rows", "kto-rows", "trl", "esconv"] = "esconv"
    input: str = ""  # file or folder; "" = ESConv from the data dir ($CSO_DATA_DIR or ../shared/data)
    split: str = "train"
    negatives: int = 3  # ESConv: non-preferred options per supporter turn
    seed: int = 0
    strategies: str = "auto"  # auto (ESConv: esconv; else the named set the file uses), esconv, escpro, or a file
    aliases: bool = False  # map known label variants ("Questions" -> "Question")
    skip_invalid: bool = False
    context_seeker_messages: int = 2  # ESConv negatives: seeker messages used as retrieval context
    pool: int = 20  # ESConv negatives: most similar candidates to choose from
    chat_template: str = "auto"  # auto (tokenizer's own), chatml, llama3, gemma2, or a Jinja file
    max_length: int = 2048  # tokens per turn example: history is cut oldest-first, never the target

    def validate(self) -> None:
        _check(self.negatives >= 0, "data.negatives", "must be >= 0")
        _check(self.context_seeker_messages >= 1, "data.context_seeker_messages", "must be >= 1")
        _check(self.pool >= 1, "data.pool", "must be >= 1")
        _check(self.max_length >= 16, "data.max_length", "must be >= 16")
        _check(bool(self.split.strip()), "data.split", "must not be empty")


@dataclass
class ModelConfig:
    path: str = ""  # HF model folder; "" = the demo's tiny model
    method: Literal["full", "lora", "qlora"] = "full"
    precision: Literal["fp32", "bf16"] = "fp32"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        _check(self.lora_r >= 1, "model.lora_r", "must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", "must be in [0, 1)")
        _check(bool(self.lora_target_modules), "model.lora_target_modules", "must not be empty")


@dataclass
class TinyModelConfig:
    arch: Literal["qwen2", "llama"] = "qwen2"
    tokenizer: Literal["qwen", "bpe"] = "qwen"
    hidden_size: int = 64
    num_layers: int = 2

    def validate(self) -> None:
        _check(self.hidden_size >= 8, "tiny_model.hidden_size", "must be >= 8")
        _check(self.num_layers >= 1, "tiny_model.num_layers", "must be >= 1")


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    seed: int = 0

    def validate(self) -> None:
        _check(bool(self.out_dir.strip()), "run.out_dir", "must not be empty")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key}: {msg}")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        if value not in typing.get_args(typ):
            raise ConfigError(f"config: {key}: {value!r} is not one of {', '.join(map(str, typing.get_args(typ)))}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(typ)[:1]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config: {key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config: {key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config: {key}: expected a string, got {value!r}")
    raise ConfigError(f"config: {key}: unsupported type {typ}")


def _apply(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"config: unknown key '{key}'{hint}")
        sub = getattr(obj, k)
        if dataclasses.is_dataclass(sub):
            if not isinstance(v, dict):
                raise ConfigError(f"config: {key}: expected a section (mapping), got {v!r}")
            _apply(sub, v, f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _nest(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, val in dotted.items():
        parts = key.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config: {key}: '{p}' is not a section")
            cur = nxt
        cur[parts[-1]] = val
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--data.negatives", "5", "--run.out_dir=x"]` -> {"data.negatives": 5, "run.out_dir": "x"}."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=")[0]:
            raise ConfigError(f"config: unexpected argument '{a}' (overrides look like --section.key VALUE)")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"config: {a[2:]}: missing value")
            key, raw = a[2:], args[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: {p}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p}: bad YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {p}: expected a mapping of sections")
        _apply(cfg, raw, "")
    if overrides:
        _apply(cfg, _nest(overrides), "")
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).validate()
    return cfg
