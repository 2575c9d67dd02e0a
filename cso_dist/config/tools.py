"""The config sections of the tools around a training run: Slurm resources (`launch`), the ESC-Pro search
(`mcts`) and the planner (`plan`); cso_dist.config puts them in the one Config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cso_dist.config.file import _check, _check_seed, _check_token, _control, setting
from cso_dist.mcts import ROLE_CHOICES
from cso_dist.mcts.search import SearchSettings
from cso_dist.models import BACKENDS


@dataclass
class SlurmConfig:
    """Resources of `cso-dist launch sbatch|submitit` (flags of those commands override these keys)."""

    partition: str = setting("", 'Slurm partition ("" = the cluster\'s default)')
    account: str = setting("", "#SBATCH --account")
    qos: str = setting("", "#SBATCH --qos")
    time_min: int = setting(240, "wall-clock limit per job in minutes (a requeued job gets it again)")
    nodes: int = setting(1, "nodes per job")
    gpus_per_node: int = setting(8, "GPUs per node (0 = CPU-only, one worker per node)")
    cpus_per_task: int = setting(8, "CPUs per task (one task per GPU, or one per node when CPU-only)")
    mem_gb: int = setting(0, "memory per node in GB (0 = the partition's default)")
    signal_delay_s: int = setting(120, "the time-limit signal comes this long before the limit: checkpoint + requeue")
    max_num_timeout: int = setting(3, "submitit: requeues after a time-out at most this many times (then fails)")
    array_parallelism: int = setting(64, "sweeps: array tasks running at once")
    setup: list[str] = setting(help="shell lines run first in the job (module load, ...)", factory=list)
    extra: list[str] = setting(help='more #SBATCH options, e.g. "--constraint=h100"', factory=list)

    def validate(self) -> None:
        _check(self.time_min >= 1, "slurm.time_min", "must be >= 1")
        _check(self.nodes >= 1, "slurm.nodes", "must be >= 1")
        _check(self.gpus_per_node >= 0, "slurm.gpus_per_node", "must be >= 0")
        _check(self.cpus_per_task >= 1, "slurm.cpus_per_task", "must be >= 1")
        _check(self.mem_gb >= 0, "slurm.mem_gb", "must be >= 0")
        _check(self.signal_delay_s >= 0, "slurm.signal_delay_s", "must be >= 0")
        _check(self.max_num_timeout >= 0, "slurm.max_num_timeout", "must be >= 0")
        _check(self.array_parallelism >= 1, "slurm.array_parallelism", "must be >= 1")
        for key in ("partition", "account", "qos"):  # rendered into #SBATCH lines and submitit's script
            _check_token(getattr(self, key), f"slurm.{key}")
        for i, x in enumerate(self.extra):
            _check_token(x, f"slurm.extra[{i}]")
        for i, line in enumerate(self.setup):  # one shell line each
            _check(not _control(line), f"slurm.setup[{i}]", f"{line!r} holds a control character (one line each)")


@dataclass
class MctsConfig(SearchSettings):
    """`cso-dist mcts build`: the ESC-Pro search (stage 1 of CSO) with an LLM playing four roles.

    The search settings (c_puct, rollout_turns, min/max_iterations, min/max_finished) are inherited
    from mcts.search.SearchSettings, their one home.
    """

    backend: Literal[BACKENDS] = setting("hf", "hf: a local transformers model; openai: any compatible endpoint")
    model: str = setting("", "hf: a model folder; openai: the served model's name", path=True)
    base_url: str = setting("http://127.0.0.1:8000/v1", "openai: e.g. a vLLM server on the cluster")
    api_key_env: str = setting("OPENAI_API_KEY", "the key is read from this environment variable, never from files")
    timeout_s: float = setting(120.0, "per HTTP call")
    retries: int = setting(3, "HTTP: transport retries (timeouts, 429, 5xx) by the client")
    parse_retries: int = setting(2, "malformed answers (no score, no rating, empty reply) asked again")
    workers: int = setting(8, "seed trees searched at once (threads; the hf backend batches their calls)")
    batch_size: int = setting(16, "hf: prompts per generate()")
    max_new_tokens: int = setting(96, "supporter and seeker messages")
    scorer_max_tokens: int = setting(128, 'the strategy scorer\'s answer (8 lines "<strategy>: <0-10>")')
    judge_max_tokens: int = setting(48, 'the judge\'s answer (4 lines "<aspect>: <0-4>")')
    choice: Literal[ROLE_CHOICES] = setting(
        "logprobs",
        "strategy scores and judge ratings: logprobs = the expected answer under the model's next-token "
        "probabilities (hf; openai servers returning logprobs, e.g. vLLM; text where a server has none); "
        "text = generated and parsed",
    )
    temperature: float = setting(0.7, "supporter and seeker; the scorer and the judge are greedy")
    prompts: str = setting("", "folder with scorer/supporter/seeker/judge .txt overriding our defaults", path=True)
    cache_dir: str = setting("", 'per-call answer cache; "" = <out>.work/cache', path=True)
    strategies: str = setting("auto", "auto: esconv for ESConv seeds, escpro otherwise; or a set file", path=True)
    max_seeds: int = setting(0, "first N seed dialogues (0 = all)")
    checkpoint_every: int = setting(10, "iterations between tree checkpoints")
    seed: int = setting(0, "seed of the supporter/seeker sampling")

    def validate(self) -> None:
        _check(self.timeout_s > 0, "mcts.timeout_s", "must be > 0")
        _check(self.retries >= 0 and self.parse_retries >= 0, "mcts.retries", "must be >= 0")
        _check(self.workers >= 1, "mcts.workers", "must be >= 1")
        _check(self.batch_size >= 1, "mcts.batch_size", "must be >= 1")
        _check(
            min(self.max_new_tokens, self.scorer_max_tokens, self.judge_max_tokens) >= 1,
            "mcts.max_new_tokens",
            "must be >= 1 (and mcts.scorer_max_tokens, mcts.judge_max_tokens)",
        )
        _check(self.temperature >= 0, "mcts.temperature", "must be >= 0")
        _check(self.max_seeds >= 0, "mcts.max_seeds", "must be >= 0")
        _check_seed(self.seed, "mcts.seed")
        _check(self.checkpoint_every >= 1, "mcts.checkpoint_every", "must be >= 1")
        _check(self.c_puct > 0, "mcts.c_puct", "must be > 0")
        _check(self.rollout_turns >= 1, "mcts.rollout_turns", "must be >= 1")
        _check(
            1 <= self.min_iterations <= self.max_iterations,
            "mcts.min_iterations",
            "must be >= 1 and <= mcts.max_iterations",
        )
        _check(
            0 <= self.min_finished <= self.max_finished and self.max_finished >= 1,
            "mcts.min_finished",
            "must be >= 0 and <= mcts.max_finished (>= 1)",
        )


@dataclass
class PlanConfig:
    """`cso-dist plan --config`: the model shape and GPU a recipe targets (nodes and GPUs: `slurm`)."""

    model: str = setting(
        "", 'preset (7b, 8b, 9b, 13b, 34b, 70b) or an HF config.json path; "" = not planned', path=True
    )
    gpu_mem_gb: float = setting(80.0, "memory of one GPU")
    cpu_mem_gb: float = setting(1024.0, "host memory of one node (CPU offload)")

    def validate(self) -> None:
        _check(self.gpu_mem_gb > 0, "plan.gpu_mem_gb", "must be > 0")
        _check(self.cpu_mem_gb > 0, "plan.cpu_mem_gb", "must be > 0")
