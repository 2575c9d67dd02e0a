"""What one training run reads (data build, precompute, train, eval, export): TrainingConfig and its sections, one
dataclass each. Every key is a dataclass field with its default and help; its choices come from the module that
acts on it. The whole config (cso_dist.config.schema.Config) adds the sections of the tools around a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from cso_dist.config.file import (  # noqa: F401 - parse_overrides, choices, help_of: public here
    _apply,
    _check,
    _check_seed,
    _control,
    _nest,
    _parse_value,
    choices,
    help_of,
    parse_overrides,
    read_yaml,
    setting,
)
from cso_dist.data.negatives import NEGATIVES_FROM
from cso_dist.data.negatives import SOURCES as NEGATIVE_SOURCES
from cso_dist.data.readers import SOURCES
from cso_dist.engines import ENGINES, FINALS, OPTIMIZERS, REFERENCES, SCHEDULES
from cso_dist.engines import NAMES as ENGINE_NAMES
from cso_dist.engines.dsconfig import SHIPPED as SHIPPED_DS
from cso_dist.engines.dsconfig import ZERO_STAGES
from cso_dist.losses import NAMES as LOSS_METHODS
from cso_dist.models import (
    LORA_TARGETS,
    BACKENDS,
    LoraSettings,
    FINETUNES,
    PRECISIONS,
    TINY_ARCHS,
    TINY_TOKENIZERS,
    hub,
)
from cso_dist.eval import CALIBRATIONS, MODES
from cso_dist.pack import LAYOUTS
from cso_dist.scorer import ATTENTION

# The choices of a key are defined once, by the module that owns them (tests/test_layering.py checks it).


@dataclass
class DataConfig:
    source: Literal[SOURCES] = setting("esconv", "the input's format")
    input: str = setting("", 'file or folder; "" = ESConv from the data dir (cso_dist.util.paths.data_dir)', path=True)
    split: str = setting("train", "ESConv split: train, valid or test")
    negatives: int = setting(3, "ESConv: non-preferred options per supporter turn")
    negatives_from: Literal[NEGATIVES_FROM] = setting(
        "retrieval",
        "ESConv: retrieval (other dialogues' replies), retrieval-balanced (each strategy rejected as often as chosen), "
        "generated (a model writes them for the same history), generated-both (the preferred reply too)",
    )
    generator: str = setting(
        "",
        'generated*: the model that writes the replies (folder or Hub id; "" = the base model, model.path)',
        path=True,
    )
    generate_max_tokens: int = setting(64, "generated*: most tokens of a written reply")
    seed: int = setting(0, "ESConv: seed of the negative selection")
    strategies: str = setting(
        "auto", "auto (ESConv: esconv; else the named set the file uses), esconv, escpro, or a file", path=True
    )
    aliases: bool = setting(False, 'map known label variants ("Questions" -> "Question")')
    skip_invalid: bool = setting(False, "skip invalid records and report them (else the first one is an error)")
    context_seeker_messages: int = setting(2, "ESConv negatives: seeker messages used as retrieval context")
    pool: int = setting(20, "ESConv negatives: most similar candidates to choose from")
    chat_template: str = setting("auto", "auto (tokenizer's own), chatml, llama3, gemma2, or a Jinja file", path=True)
    max_length: int = setting(2048, "tokens per turn example: history is cut oldest-first, never the target")

    def validate(self) -> None:
        _check_seed(self.seed, "data.seed")
        hub.check(self.generator, "config: data.generator")
        _check(self.negatives >= 0, "data.negatives", "must be >= 0")
        _check(self.generate_max_tokens >= 1, "data.generate_max_tokens", "must be >= 1")
        _check(
            self.source == "esconv" or self.negatives_from == "retrieval",
            "data.negatives_from",
            f"ESConv's options only; --from {self.source} brings its own non-preferred replies",
        )
        src = NEGATIVE_SOURCES[self.negatives_from]
        for key in ("generator", "generate_max_tokens", "pool", "context_seeker_messages"):
            used = key in src.uses and bool(self.negatives or not src.writes)
            _check(
                used or getattr(self, key) == getattr(DataConfig, key),
                f"data.{key}",
                f"not used with data.negatives_from {self.negatives_from} and data.negatives {self.negatives}",
            )
        _check(self.context_seeker_messages >= 1, "data.context_seeker_messages", "must be >= 1")
        _check(self.pool >= 1, "data.pool", "must be >= 1")
        _check(self.max_length >= 16, "data.max_length", "must be >= 16")
        _check(bool(self.split.strip()), "data.split", "must not be empty")


@dataclass
class ModelConfig:
    path: str = setting(
        "",
        "HF model folder, or a Hub id (org/name) read from the HF cache (required; demo and study set their own)",
        path=True,
    )
    revision: str = setting("", 'for a Hub id: the branch, tag or commit to use ("" = main)')
    finetune: Literal[FINETUNES] = setting(
        "full", "what training updates: full fine-tuning, LoRA, or QLoRA (4-bit nf4 base + LoRA); was model.method"
    )
    RENAMED: ClassVar[dict[str, str]] = {"method": "finetune"}  # old key -> new key, still read (a note says so)

    precision: Literal[PRECISIONS] = setting(
        "fp32", "fp32; bf16 (bf16 weights); bf16-mixed (fp32 weights, bf16 autocast: ~2x on CPUs with AMX)"
    )
    lora_r: int = setting(LoraSettings.r, "LoRA rank")
    lora_alpha: int = setting(LoraSettings.alpha, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = setting(
        LoraSettings.dropout, "dropout on the LoRA input during training (off at eval and export)"
    )
    lora_target_modules: list[str] = setting(
        help="module names that get adapters (comma-separated on the command line)", factory=lambda: list(LORA_TARGETS)
    )

    def validate(self) -> None:
        hub.check(self.path, "config: model.path")
        _check(self.lora_r >= 1, "model.lora_r", "must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", "must be in [0, 1)")
        _check(bool(self.lora_target_modules), "model.lora_target_modules", "must not be empty")


@dataclass
class TinyModelConfig:
    arch: Literal[tuple(TINY_ARCHS)] = setting("qwen2", "architecture of the demo's random model")
    tokenizer: Literal[TINY_TOKENIZERS] = setting(
        "qwen", "qwen: the real Qwen2.5 vocabulary; bpe: a small BPE trained on ESConv"
    )
    hidden_size: int = setting(64, "hidden size of the demo's random model")
    num_layers: int = setting(2, "decoder layers of the demo's random model")

    def validate(self) -> None:
        _check(self.hidden_size >= 8, "tiny_model.hidden_size", "must be >= 8")
        _check(self.num_layers >= 1, "tiny_model.num_layers", "must be >= 1")


@dataclass
class PackConfig:
    layout: Literal[LAYOUTS] = setting("trie", "trie: one sequence per dialogue + branches; pair: per-pair rows")
    max_tokens: int = setting(4096, "token budget of one micro-batch (one packed row; per-pair: all rows)")
    bucket: int = setting(
        1024,
        "flex: rows run padded to a multiple of this many tokens, so a run compiles at most twice per multiple up to "
        "max_tokens (with and without gradients); 0 = each row at its own length (a compile per new length)",
    )

    def validate(self) -> None:
        _check(self.max_tokens >= 32, "pack.max_tokens", "must be >= 32")
        _check(self.bucket >= 0, "pack.bucket", "must be >= 0 (0 = each row at its own length)")


@dataclass
class ScorerConfig:
    """How the model scores a laid-out micro-batch (cso_dist.scorer): the attention over trie rows, the LM head's
    chunk. Were pack.attention and pack.logit_chunk (still read there, with a note)."""

    attention: Literal[ATTENTION] = setting(
        "auto",
        "attention over trie rows (cso_dist.scorer.attention): tree = SDPA per trunk / per turn's branches, work "
        "proportional to what the tree attends; flex = FlexAttention BlockMask, compiled (no backward on CPU); "
        "dense = one [T x T] mask; auto = flex on CUDA, on CPU tree (dense for models that soft-cap attention logits)",
    )
    logit_chunk: int = setting(2048, "reply tokens per log-softmax chunk (bounds [tokens x vocab] memory)")

    def validate(self) -> None:
        _check(self.logit_chunk >= 1, "scorer.logit_chunk", "must be >= 1")


@dataclass
class TrainConfig:
    method: Literal[LOSS_METHODS] = setting("dpo", "the training method (cso_dist.losses.REGISTRY)")
    train_file: str = setting(
        "", 'preference dialogues (data build output); "" = <run.out_dir>/data/train.jsonl', path=True
    )
    eval_file: str = setting("", 'held-out dialogues for periodic evaluation; "" = none', path=True)
    max_dialogues: int = setting(0, "use only the first N dialogues of train_file (0 = all)")
    eval_max_dialogues: int = setting(0, "use only the first N dialogues of eval_file (0 = all)")
    beta: float = setting(-1.0, "-1 = the method's default (its loss function's beta; cso_dist.losses.REGISTRY)")
    label_smoothing: float = setting(0.0, "dpo only (cDPO)")
    gamma_beta_ratio: float = setting(0.55, "simpo only")
    desirable_weight: float = setting(1.0, "kto only")
    undesirable_weight: float = setting(1.0, "kto only")
    nll_weight: float = setting(
        0.0, "extra SFT/NLL term on chosen replies, for every method (orpo: its lambda-free NLL)"
    )
    lr: float = setting(1e-6, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float = setting(0.1, "share of the steps with linear warm-up")
    schedule: Literal[SCHEDULES] = setting("cosine", "learning-rate schedule after warm-up")
    epochs: int = setting(1, "passes over the training dialogues")
    max_steps: int = setting(0, "0 = run `epochs`")
    grad_accum: int = setting(1, "micro-batches (token budget each) per optimizer step")
    max_grad_norm: float = setting(1.0, "0 = no clipping")
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass (less memory, ~30% slower)"
    )
    compile: bool = setting(
        False,
        "torch.compile each decoder layer (regional compilation: one graph shared by all layers); needs rows of a "
        "few lengths: flex attention over trie rows (pack.bucket)",
    )
    fused_adamw: bool = setting(False, "adamw: torch's fused AdamW kernel (one kernel per step for all parameters)")
    log_every: int = setting(1, "optimizer steps between metric lines")
    eval_every: int = setting(0, "0 = only at the end (when eval_file is set)")
    save_every: int = setting(0, "0 = only the final output")
    keep_last: int = setting(2, "checkpoints kept (older ones are deleted)")
    ref_cache: str = setting("", '"" = <run.out_dir>/refcache', path=True)
    final: Literal[FINALS] = setting("merged", "LoRA/QLoRA final output")
    optimizer: Literal[OPTIMIZERS] = setting("adamw", "8-bit/paged: bitsandbytes")
    reference: Literal[REFERENCES] = setting(
        "cache",
        "cache: precomputed log-probs; adapter: LoRA/QLoRA base with the adapter disabled, scored live (no precompute)",
    )

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
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0 (0 = only the final output)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.gamma_beta_ratio >= 0, "train.gamma_beta_ratio", "must be >= 0")
        _check(self.desirable_weight > 0, "train.desirable_weight", "must be > 0")
        _check(self.undesirable_weight > 0, "train.undesirable_weight", "must be > 0")
        _check(self.max_dialogues >= 0, "train.max_dialogues", "must be >= 0")
        _check(self.eval_max_dialogues >= 0, "train.eval_max_dialogues", "must be >= 0")
        _check(
            not self.fused_adamw or self.optimizer == "adamw",
            "train.fused_adamw",
            f"fuses torch's AdamW, and train.optimizer is {self.optimizer}: remove it or use adamw",
        )


@dataclass
class RefCacheConfig:
    dialogues_per_shard: int = setting(64, "work unit of precompute: a shard of consecutive dialogues")

    def validate(self) -> None:
        _check(self.dialogues_per_shard >= 1, "refcache.dialogues_per_shard", "must be >= 1")


@dataclass
class DistConfig:
    """Engine and process group. World size and ranks come from the launcher (torchrun, deepspeed, srun)."""

    engine: Literal[ENGINE_NAMES] = setting(
        "torch",
        "torch: one process or DDP, the whole model on every rank; deepspeed: ZeRO-2/3 (ZeRO-3 shards the model for "
        "training, precompute and evaluation alike); fsdp2: PyTorch's fully_shard, each layer sharded (full, lora)",
    )
    deepspeed_config: str = setting(
        "zero3",
        f"{' | '.join(SHIPPED_DS)} (cso_dist/engines/ds_configs/) or a JSON path (dist.engine deepspeed)",
        path=True,
    )
    zero_stage: int = setting(0, "0 = as in the JSON; 2 or 3 overrides it")
    offload: bool = setting(False, "dist.engine fsdp2: parameters, gradients and optimizer states on the CPU")
    timeout_minutes: int = setting(60, "collective timeout of the process group")

    def validate(self) -> None:
        _check(self.zero_stage in (0, *ZERO_STAGES), "dist.zero_stage", "must be 0 (from the JSON), 2 or 3")
        for key in {k for e in ENGINES.values() for k in e.keys}:  # an engine's own keys: never silently unused
            readers = [e.name for e in ENGINES.values() if key in e.keys]
            _check(
                self.engine in readers or getattr(self, key) == getattr(DistConfig, key),
                f"dist.{key}",
                f"read by dist.engine {' or '.join(readers)} only (dist.engine is {self.engine})",
            )
        _check(self.timeout_minutes >= 1, "dist.timeout_minutes", "must be >= 1")
        _check(bool(self.deepspeed_config.strip()), "dist.deepspeed_config", "must not be empty")


@dataclass
class EvalConfig:
    """`cso-dist eval generate`: strategy prediction (and replies) on held-out dialogues."""

    mode: Literal[MODES] = setting("generate", 'likelihood: best-scoring "(<strategy>)" prefix')
    max_dialogues: int = setting(0, "first N dialogues of the split (0 = all)")
    calibrate: Literal[CALIBRATIONS] = setting(
        "none", "likelihood: prior = also a pick with one offset per strategy fitted on labelled calibration dialogues"
    )
    calibrate_data: str = setting("", "prior: the calibration dialogues' file (default: the ESConv valid split)")
    calibrate_dialogues: int = setting(20, "prior: the first N calibration dialogues (0 = all)")
    max_new_tokens: int = setting(64, "generate: tokens per reply at most")
    batch_size: int = setting(16, "prompts per generate() call")
    do_sample: bool = setting(False, "greedy by default")
    temperature: float = setting(0.7, "sampling temperature (do_sample)")
    top_p: float = setting(0.9, "nucleus sampling mass (do_sample)")
    backend: Literal[BACKENDS] = setting(
        "hf",
        "generate: hf = the model at model.path in this job (data-parallel over its ranks); openai = an "
        "OpenAI-compatible server (vLLM, SGLang) that serves it, e.g. tensor-parallel at 70B",
    )
    endpoint: str = setting("", "openai: the server's base URL, e.g. http://gpu01:8000/v1")
    served_model: str = setting("", "openai: the model name the server serves (its /v1/models)")
    api_key_env: str = setting("OPENAI_API_KEY", "openai: the key is read from this environment variable only")
    timeout_s: float = setting(120.0, "openai: seconds per HTTP call")
    retries: int = setting(3, "openai: transport retries (timeouts, 429, 5xx)")

    def validate(self) -> None:
        served = self.backend == "openai"
        _check(not served or self.mode == "generate", "eval.backend", "openai serves eval.mode generate only")
        for key in ("endpoint", "served_model"):
            given = bool(getattr(self, key).strip())
            _check(given or not served, f"eval.{key}", "needed with eval.backend openai")
            _check(served or not given, f"eval.{key}", "read by eval.backend openai only (eval.backend is hf)")
        for key in ("api_key_env", "timeout_s", "retries"):
            _check(
                served or getattr(self, key) == getattr(EvalConfig, key), f"eval.{key}", "read by eval.backend openai"
            )
        _check(self.timeout_s > 0, "eval.timeout_s", "must be > 0")
        _check(self.retries >= 0, "eval.retries", "must be >= 0")
        _check(self.max_dialogues >= 0, "eval.max_dialogues", "must be >= 0")
        prior = self.calibrate == "prior"
        _check(not prior or self.mode == "likelihood", "eval.calibrate", "prior calibrates eval.mode likelihood")
        for key in ("calibrate_data", "calibrate_dialogues"):
            _check(prior or getattr(self, key) == getattr(EvalConfig, key), f"eval.{key}", "read by calibrate prior")
        _check(self.calibrate_dialogues >= 0, "eval.calibrate_dialogues", "must be >= 0")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")


@dataclass
class TrackConfig:
    wandb: bool = setting(False, "also log to Weights & Biases (rank 0; WANDB_MODE=offline works)")
    project: str = setting("cso_dist", "W&B project")
    group: str = setting("", "W&B group (sweeps: the sweep's name)")
    name: str = setting("", "W&B run name")

    def validate(self) -> None:
        pass


# keys the study sets in every run it makes: refused in a study's config and in its sweep


@dataclass
class RunConfig:
    out_dir: str = setting("runs/cso", "the run folder: data, reference cache, checkpoints, metrics, eval", path=True)
    seed: int = setting(0, "seed of model init, data order and dropout")

    def validate(self) -> None:
        _check_seed(self.seed, "run.seed")
        _check(bool(self.out_dir.strip()), "run.out_dir", "must not be empty")
        _check(not _control(self.out_dir), "run.out_dir", f"{self.out_dir!r} holds a control character")


@dataclass
class TrainingConfig:
    """What a training run reads (data build, precompute, train, eval, export): one run's meaning."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refcache: RefCacheConfig = field(default_factory=RefCacheConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # keys that moved to another section: old dotted key -> new one, still read (a note says so)
    MOVED: ClassVar[dict[str, str]] = {"pack.attention": "scorer.attention", "pack.logit_chunk": "scorer.logit_chunk"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRAINING_SECTIONS = tuple(f.name for f in dataclasses.fields(TrainingConfig))
