"""`precompute --dry-run` / `train --dry-run`: check a config and the inputs it reads without loading a
model, and say what the command would do. A login node can run it before a job is submitted."""

from __future__ import annotations

from pathlib import Path

from cso_dist.config import TrainingConfig
from cso_dist.util.errors import CsoError
from cso_dist.losses import needs_reference
from cso_dist.inputs import MODEL_REQUIRED, data_file, load_split, model_dir, tokenizer_dir, weights_dir
from cso_dist.models import hub, is_adapter_dir
from cso_dist.models.identity import model_files
from cso_dist.models.load import adapter_base_path
from cso_dist.refcache.key import cache_root, split_dir
from cso_dist.train.rundir import holds_run

# a tokenizer's vocabulary comes from one of these (tokenizer_config.json alone loads an empty tokenizer)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "qwen.tiktoken")


def _model_problem(cfg: TrainingConfig) -> str:
    if not cfg.model.path:
        return MODEL_REQUIRED
    if hub.is_hub_id(cfg.model.path) and hub.cached(cfg.model.path, cfg.model.revision) is None:
        if not hub.offline():
            return ""  # the job downloads it first (model_line says so)
    try:
        path = model_dir(cfg)
    except CsoError as e:
        return str(e)
    if not path.is_dir():
        return f"model.path: '{path}' is not a folder on this machine, nor a Hub id (org/name) in the HF cache"
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        return f"model.path: '{path}' has no config.json (not a Hugging Face model folder)"
    if is_adapter_dir(path):
        if not any(path.glob("adapter_model*.safetensors")) and not any(path.glob("adapter_model*.bin")):
            return f"model.path: adapter '{path}' has no adapter_model.safetensors / .bin"
        try:
            base = adapter_base_path(path)
        except CsoError as e:
            return f"model.path: {e}"
        if not (base / "config.json").is_file():
            return f"model.path: the base model '{base}' of adapter '{path}' has no config.json"
    weights = weights_dir(path)
    try:
        model_files(weights)
    except CsoError:
        return f"model.path: '{weights}' has no weights (*.safetensors or *.bin)"
    tok = tokenizer_dir(path)
    if not any((tok / n).is_file() for n in TOKENIZER_VOCAB_FILES):
        return f"model.path: '{tok}' has no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)})"
    return ""


def _model_line(cfg: TrainingConfig) -> str:
    if cfg.model.path and hub.is_hub_id(cfg.model.path):
        return hub.describe(cfg.model.path, cfg.model.revision)
    return str(model_dir(cfg))


def _data_problem(cfg: TrainingConfig, split: str) -> str:
    path = data_file(cfg, split)
    if path is None or path.is_file():
        return ""
    key = "train.train_file" if split == "train" else "train.eval_file"
    return (
        f"{key}: '{path}' does not exist (build it: cso-dist data build --config CONFIG --split "
        f"{'train' if split == 'train' else 'valid'} --out {path})"
    )


def stage_table(cfg: TrainingConfig) -> tuple[list[str], list[str]]:
    """The planner's table of every stage (when the config names its hardware: plan.model) and one phrase per
    stage that does not fit; nothing without plan.model."""
    section = getattr(cfg, "plan", None)
    if section is None or not section.model:
        return [], []
    from cso_dist.plan import GIB, budget, format_stages, host_budget, setup_from_config, stage_problems, stages

    shape, setup = setup_from_config(cfg)
    st = stages(shape, setup, cfg.model.path or "MODEL")
    head = (
        f"plan: {shape.name} ({shape.params() / 1e9:.2f} B parameters), {setup.finetune} on {setup.nodes} node(s) x "
        f"{setup.gpus_per_node} GPU(s) of {setup.gpu_mem_gb:g} GB"
    )
    table = format_stages(st, budget(setup) / GIB, host_budget(setup) / GIB)
    return [head, *table], stage_problems(st, setup)


def dry_run(cfg: TrainingConfig, command: str) -> list[str]:
    """Lines describing what `command` (precompute or train) would do; raises CsoError naming every
    missing input, and every stage of the run that does not fit its hardware (plan.model), at once."""
    table, too_big = stage_table(cfg)
    problems = [p for p in (_model_problem(cfg), _data_problem(cfg, "train"), _data_problem(cfg, "eval")) if p]
    problems = too_big + problems
    if problems:
        raise CsoError(f"{command} --dry-run: " + "; ".join(problems))
    t = cfg.train
    root = cache_root(cfg)
    cached = needs_reference(t.method) and t.reference == "cache"
    train_in, eval_in = load_split(cfg, "train"), load_split(cfg, "eval")  # every record validated
    lines = [
        f"model: {_model_line(cfg)} ({cfg.model.finetune}, {cfg.model.precision})",
        f"train data: {train_in.data_file} ({len(train_in.dialogues)} dialogues"
        + (f", the first {t.max_dialogues}" if t.max_dialogues else "")
        + ", every record valid)",
        f"eval data: {f'{eval_in.data_file} ({len(eval_in.dialogues)} dialogues)' if eval_in else 'none'}",
    ]
    if command == "precompute":
        if not cached:
            lines.append(
                f"nothing to precompute: train.method {t.method} with train.reference {t.reference} "
                "needs no reference cache"
            )
        else:
            status = "present" if (split_dir(root, "train") / "manifest.json").is_file() else "not built yet"
            lines.append(f"reference cache: {root} ({status}; verified against its key when the command runs)")
    else:
        ref = (
            f"cached reference log-probs in {root}"
            if cached
            else "live reference (adapter disabled)"
            if needs_reference(t.method)
            else "no reference"
        )
        lines.append(
            f"train: {t.method}, {ref}; {cfg.pack.layout} layout, {cfg.pack.max_tokens} tokens per "
            f"micro-batch; {cfg.dist.engine} engine; writes {Path(cfg.run.out_dir)}"
        )
        found = holds_run(Path(cfg.run.out_dir))
        if found:
            lines.append(f"run folder holds a run ({found}): train needs --resume or --overwrite")
    return lines + table


def print_dry_run(cfg: TrainingConfig, command: str) -> int:
    for line in dry_run(cfg, command):
        print(line)
    print(f"{command} --dry-run: config and inputs ok (nothing computed)")
    return 0
