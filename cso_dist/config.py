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
from cso_dist.mcts.search import SearchConfig

SOURCES = ("escpro", "cso-rows", "kto-rows", "trl", "esconv")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA adapter settings, and their defaults (model.lora_*; models.lora_settings builds one from a config)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DataConfig:
    source: Literal["escpro", "cso-rows", "kto-rows", "trl", "esconv"] = "esconv"
    input: str = ""  # file or folder; "" = ESConv from the data dir (cso_dist.paths.data_dir)
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
    lora_r: int = LoraSettings.r
    lora_alpha: int = LoraSettings.alpha
    lora_dropout: float = LoraSettings.dropout
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

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
class PackConfig:
    layout: Literal["trie", "pair"] = "trie"  # trie: one sequence per dialogue + branches; pair: per-pair rows
    max_tokens: int = 4096  # token budget of one micro-batch (one packed row; per-pair: all rows)
    logit_chunk: int = 2048  # reply tokens per log-softmax chunk (bounds [tokens x vocab] memory)

    def validate(self) -> None:
        _check(self.max_tokens >= 32, "pack.max_tokens", "must be >= 32")
        _check(self.logit_chunk >= 1, "pack.logit_chunk", "must be >= 1")


@dataclass
class TrainConfig:
    method: Literal["sft", "dpo", "ipo", "simpo", "kto", "orpo"] = "dpo"  # = cso_dist.losses.METHODS (tested)
    train_file: str = ""  # preference dialogues (data build output); "" = <run.out_dir>/data/train.jsonl
    eval_file: str = ""  # held-out dialogues for periodic evaluation; "" = none
    max_dialogues: int = 0  # use only the first N dialogues of train_file (0 = all)
    eval_max_dialogues: int = 0  # use only the first N dialogues of eval_file (0 = all)
    beta: float = -1.0  # -1 = the method's default (its loss function's beta; cso_dist.losses.REGISTRY)
    label_smoothing: float = 0.0  # dpo (cDPO)
    gamma_beta_ratio: float = 0.55  # simpo
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    nll_weight: float = 0.0  # extra SFT/NLL term on chosen replies, for every method (orpo: its lambda-free NLL)
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    epochs: int = 1
    max_steps: int = 0  # 0 = run `epochs`
    grad_accum: int = 1  # micro-batches (token budget each) per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    gradient_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end (when eval_file is set)
    save_every: int = 0  # 0 = only the final output
    keep_last: int = 2
    ref_cache: str = ""  # "" = <run.out_dir>/refcache
    final: Literal["merged", "adapter"] = "merged"  # LoRA/QLoRA final output
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"] = "adamw"  # 8-bit/paged: bitsandbytes
    reference: Literal["cache", "adapter"] = "cache"  # cache: precomputed log-probs; adapter: LoRA/QLoRA base
    #                                                   with the adapter disabled, scored live (no precompute)

    def validate(self) -> None:
        _check(self.beta == -1.0 or self.beta > 0, "train.beta", "must be > 0 (or -1 for the method default)")
        _check(0.0 <= self.label_smoothing < 0.5, "train.label_smoothing", "must be in [0, 0.5)")
        _check(self.nll_weight >= 0, "train.nll_weight", "must be >= 0")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.max_dialogues >= 0, "train.max_dialogues", "must be >= 0")
        _check(self.eval_max_dialogues >= 0, "train.eval_max_dialogues", "must be >= 0")


@dataclass
class RefCacheConfig:
    dialogues_per_shard: int = 64  # work unit of precompute: a shard of consecutive dialogues

    def validate(self) -> None:
        _check(self.dialogues_per_shard >= 1, "refcache.dialogues_per_shard", "must be >= 1")


@dataclass
class DistConfig:
    """Engine and process group. World size and ranks come from the launcher (torchrun, deepspeed, srun)."""

    engine: Literal["torch", "deepspeed"] = "torch"  # torch: one process or DDP; deepspeed: ZeRO-2/3
    deepspeed_config: str = "zero3"  # zero2 | zero3 | zero3_offload (ds_configs/) or a JSON path
    zero_stage: int = 0  # 0 = as in the JSON; 2 or 3 overrides it
    timeout_minutes: int = 60  # collective timeout of the process group

    def validate(self) -> None:
        _check(self.zero_stage in (0, 2, 3), "dist.zero_stage", "must be 0 (from the JSON), 2 or 3")
        _check(self.timeout_minutes >= 1, "dist.timeout_minutes", "must be >= 1")
        _check(bool(self.deepspeed_config.strip()), "dist.deepspeed_config", "must not be empty")


@dataclass
class EvalConfig:
    """`cso-dist eval generate`: strategy prediction (and replies) on held-out dialogues."""

    mode: Literal["generate", "likelihood"] = "generate"  # likelihood: best-scoring "(<strategy>)" prefix
    max_dialogues: int = 0  # first N dialogues of the split (0 = all)
    max_new_tokens: int = 64
    batch_size: int = 16  # prompts per generate() call
    do_sample: bool = False  # greedy by default
    temperature: float = 0.7
    top_p: float = 0.9

    def validate(self) -> None:
        _check(self.max_dialogues >= 0, "eval.max_dialogues", "must be >= 0")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")


@dataclass
class SlurmConfig:
    """Resources of `cso-dist launch sbatch|submitit` (flags of those commands override these keys)."""

    partition: str = ""  # "" = the cluster's default
    account: str = ""
    qos: str = ""
    time_min: int = 240  # wall-clock limit per job (a requeued job gets it again)
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU-only (one worker per node)
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0 = the partition's default
    signal_delay_s: int = 120  # the time-limit signal comes this long before the limit: checkpoint + requeue
    max_num_timeout: int = 3  # submitit: requeues after a time-out at most this many times (then fails)
    array_parallelism: int = 64  # sweeps: array tasks running at once
    setup: list[str] = field(default_factory=list)  # shell lines run first in the job (module load, ...)
    extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. "--constraint=h100"

    def validate(self) -> None:
        _check(self.time_min >= 1, "slurm.time_min", "must be >= 1")
        _check(self.nodes >= 1, "slurm.nodes", "must be >= 1")
        _check(self.gpus_per_node >= 0, "slurm.gpus_per_node", "must be >= 0")
        _check(self.cpus_per_task >= 1, "slurm.cpus_per_task", "must be >= 1")
        _check(self.mem_gb >= 0, "slurm.mem_gb", "must be >= 0")
        _check(self.signal_delay_s >= 0, "slurm.signal_delay_s", "must be >= 0")
        _check(self.max_num_timeout >= 0, "slurm.max_num_timeout", "must be >= 0")
        _check(self.array_parallelism >= 1, "slurm.array_parallelism", "must be >= 1")


_SEARCH = SearchConfig()


@dataclass
class MctsConfig:
    """`cso-dist mcts build`: the ESC-Pro search (stage 1 of CSO) with an LLM playing four roles."""

    backend: Literal["hf", "openai"] = "hf"  # hf: a local transformers model; openai: any compatible endpoint
    model: str = ""  # hf: a model folder; openai: the served model's name
    base_url: str = "http://127.0.0.1:8000/v1"  # openai: e.g. a vLLM server on the cluster
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable, never from files
    timeout_s: float = 120.0  # per HTTP call
    retries: int = 3  # HTTP: transport retries (timeouts, 429, 5xx) by the client
    parse_retries: int = 2  # malformed answers (no score, no rating, empty reply) asked again
    workers: int = 8  # seed trees searched at once (threads; the hf backend batches their calls)
    batch_size: int = 16  # hf: prompts per generate()
    max_new_tokens: int = 96  # supporter and seeker messages
    scorer_max_tokens: int = 128  # the strategy scorer's answer (8 lines "<strategy>: <0-10>")
    judge_max_tokens: int = 48  # the judge's answer (4 lines "<aspect>: <0-4>")
    temperature: float = 0.7  # supporter and seeker; the scorer and the judge are greedy
    prompts: str = ""  # folder with scorer/supporter/seeker/judge .txt overriding our defaults
    cache_dir: str = ""  # per-call answer cache; "" = <out>.work/cache
    strategies: str = "auto"  # auto: esconv for ESConv seeds, escpro otherwise; or a set file
    max_seeds: int = 0  # first N seed dialogues (0 = all)
    checkpoint_every: int = 10  # iterations between tree checkpoints
    # the search settings a user may set; their defaults (and the fixed ones) live in mcts.search.SearchConfig
    c_puct: float = _SEARCH.c_puct
    rollout_turns: int = _SEARCH.rollout_turns
    min_iterations: int = _SEARCH.min_iterations
    max_iterations: int = _SEARCH.max_iterations
    min_finished: int = _SEARCH.min_finished
    max_finished: int = _SEARCH.max_finished
    seed: int = 0

    def validate(self) -> None:
        _check(self.timeout_s > 0, "mcts.timeout_s", "must be > 0")
        _check(self.retries >= 0 and self.parse_retries >= 0, "mcts.retries", "must be >= 0")
        _check(self.workers >= 1, "mcts.workers", "must be >= 1")
        _check(self.batch_size >= 1, "mcts.batch_size", "must be >= 1")
        _check(min(self.max_new_tokens, self.scorer_max_tokens, self.judge_max_tokens) >= 1, "mcts.max_new_tokens",
               "must be >= 1 (and mcts.scorer_max_tokens, mcts.judge_max_tokens)")
        _check(self.temperature >= 0, "mcts.temperature", "must be >= 0")
        _check(self.max_seeds >= 0, "mcts.max_seeds", "must be >= 0")
        _check(self.checkpoint_every >= 1, "mcts.checkpoint_every", "must be >= 1")
        _check(self.c_puct > 0, "mcts.c_puct", "must be > 0")
        _check(self.rollout_turns >= 1, "mcts.rollout_turns", "must be >= 1")
        _check(1 <= self.min_iterations <= self.max_iterations, "mcts.min_iterations",
               "must be >= 1 and <= mcts.max_iterations")
        _check(0 <= self.min_finished <= self.max_finished and self.max_finished >= 1, "mcts.min_finished",
               "must be >= 0 and <= mcts.max_finished (>= 1)")


@dataclass
class PlanConfig:
    """`cso-dist plan --config`: the model shape and GPU a recipe targets (nodes and GPUs: `slurm`)."""

    model: str = ""  # preset (7b, 8b, 9b, 13b, 34b, 70b) or an HF config.json path; "" = not planned
    gpu_mem_gb: float = 80.0  # memory of one GPU
    cpu_mem_gb: float = 1024.0  # host memory of one node (CPU offload)

    def validate(self) -> None:
        _check(self.gpu_mem_gb > 0, "plan.gpu_mem_gb", "must be > 0")
        _check(self.cpu_mem_gb > 0, "plan.cpu_mem_gb", "must be > 0")


@dataclass
class TrackConfig:
    wandb: bool = False  # also log to Weights & Biases (rank 0; WANDB_MODE=offline works)
    project: str = "cso_dist"
    group: str = ""
    name: str = ""

    def validate(self) -> None:
        pass


@dataclass
class DemoConfig:
    """The main job (`cso-dist demo`): data -> tiny model -> short SFT -> precompute -> CSO (train.method)."""

    train_dialogues: int = 300  # ESConv train dialogues used for SFT and CSO (0 = all 910)
    eval_dialogues: int = 40  # ESConv valid dialogues for held-out evaluation
    sft_epochs: int = 1
    sft_lr: float = 1e-3

    def validate(self) -> None:
        _check(self.train_dialogues >= 0, "demo.train_dialogues", "must be >= 0")
        _check(self.eval_dialogues >= 0, "demo.eval_dialogues", "must be >= 0")
        _check(self.sft_epochs >= 0, "demo.sft_epochs", "must be >= 0 (0 skips SFT)")
        _check(self.sft_lr > 0, "demo.sft_lr", "must be > 0")


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
    pack: PackConfig = field(default_factory=PackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refcache: RefCacheConfig = field(default_factory=RefCacheConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    mcts: MctsConfig = field(default_factory=MctsConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
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
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
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
    _check(cfg.pack.max_tokens >= cfg.data.max_length, "pack.max_tokens",
           f"must be >= data.max_length ({cfg.data.max_length}): one turn must fit a micro-batch")
    _check(cfg.train.reference == "cache" or cfg.model.method in ("lora", "qlora"), "train.reference",
           "'adapter' (the base with the adapter disabled) needs model.method lora or qlora")
    _check(not (cfg.model.method == "qlora" and cfg.dist.engine == "deepspeed"), "model.method",
           "qlora runs on the torch engine (one GPU, or DDP under torchrun); 4-bit weights under DeepSpeed "
           "(bnb_4bit_quant_storage) are not supported by cso_dist: use model.method=lora with dist.engine=deepspeed")
    return cfg
