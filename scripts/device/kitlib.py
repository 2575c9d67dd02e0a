"""What the GPU kit's sections share (scripts/device/sections.py, exact.py, speed.py): the result file written after
every part, the model shapes built from config, the run configs, the planner's figure for a run."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchlib

SHAPES = {  # Qwen2.5 shapes (tied embeddings, GQA), built from config with random weights
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


class Result:
    """The section's JSON, rewritten (atomically) after every part."""

    def __init__(self, path: Path, name: str, smoke: bool, select: tuple[str, ...] = ()):
        self.path, self.t0, self.select = path, time.perf_counter(), select
        self.data: dict = {"section": name, "smoke": smoke, "parts_done": [], "parts_failed": []}
        if select:
            self.data["selected"] = list(select)

    def write(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def part(self, key: str, fn, *args, **kwargs):
        """data[key] = fn(...), or the exception and the tail of its traceback; the JSON is rewritten. With a
        selection (--parts), a part none of whose words is in its key is skipped (models are always built)."""
        if self.select and not key.endswith("model") and not any(w in key for w in self.select):
            self.data[key] = {"skipped": "not selected (--parts)"}
            return self.data[key]
        log(f"{self.data['section']}: {key}")
        t0 = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            self.data["parts_done"].append(key)
        except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
            value = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
            self.data["parts_failed"].append(key)
            log(f"{self.data['section']}: {key} FAILED: {value['error'][:300]}")
        if isinstance(value, dict):
            value.setdefault("seconds", round(time.perf_counter() - t0, 2))
        self.data[key] = value
        self.write()
        free_memory()
        return value


def free_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- shared helpers
def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def dialogues(n: int):
    from cso_dist.config import DataConfig
    from cso_dist.data.build import build_dialogues

    return build_dialogues(DataConfig(source="esconv", split="train"))[0][:n]


def build_model(work: Path, shape: str) -> tuple[Path, int]:
    """The shape with the real Qwen2.5 vocabulary (tiny: a 4k ESConv BPE one), random weights (built on the GPU
    where there is one), saved once under `work`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from cso_dist.data.esconv import esconv_texts
    from cso_dist.models import qwen_tokenizer
    from cso_dist.models.tokenizer import bpe_tokenizer

    out = work / shape
    if (out / "config.json").is_file():
        return out, json.loads((out / "params.json").read_text())["params"]
    tok = bpe_tokenizer(esconv_texts(), vocab_size=4096, template="chatml") if shape == "tiny" else qwen_tokenizer()
    cfg = Qwen2Config(
        **SHAPES[shape],
        vocab_size=len(tok),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if shape == "tiny" else torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "params.json").write_text(json.dumps({"params": n}))
    del model
    return out, n


def run_config(work: Path, model: Path, smoke: bool, **over):
    from cso_dist.config import load_config, parse_overrides

    base = {
        "model.path": model,
        "model.finetune": "full",
        "model.precision": "fp32" if smoke else "bf16",
        "train.train_file": work / "train.jsonl",
        "run.out_dir": work / "run",
        "pack.max_tokens": 2048 if smoke else 8192,
        "data.max_length": 1024 if smoke else 2048,
        "train.lr": 1e-6,
        "train.warmup_ratio": 0,
        "train.gradient_checkpointing": "false" if smoke else "true",
    }
    base.update(over)
    return load_config(None, parse_overrides([f"--{k}={v}" for k, v in base.items()]))


def layout_batches(cfg, dlg):
    from cso_dist.inputs import make_cfg_renderer, resolve_sset
    from cso_dist.train.loop import make_layout, micro_batches

    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    return micro_batches(make_layout(cfg, dlg, renderer, sset, False), list(range(len(dlg))))


def counts_of(micro) -> dict:
    from cso_dist.losses.batch import COUNTS

    return {k: sum(b.counts[k] for b in micro) for k in COUNTS}


def planned(
    model_path: Path, cfg, micro, finetune: str, zero: int, optimizer: str = "adamw", engine: str = "deepspeed"
) -> dict:
    """`cso-dist plan` for this run: the largest micro-batch's row, its measured tree-attention shape."""
    from cso_dist.pack.buckets import bucket_length
    from cso_dist.pack.tree_plan import tree_plan
    from cso_dist.plan import Setup, plan, shape_from_hf_config

    big = max(micro, key=lambda b: b.n_tokens)
    # what the run attends with on this machine: auto is flex on CUDA, its rows padded to pack.bucket
    attention = cfg.scorer.attention if cfg.scorer.attention != "auto" else "flex" if cuda() else "tree"
    row = bucket_length(big.n_tokens, cfg.pack.bucket) if attention == "flex" else big.n_tokens
    keys, mask = tree_plan(big.data).per_token() if hasattr(big.data, "ctx_lo") else (6.5, 600.0)
    setup = Setup(
        finetune=finetune,
        zero=zero,
        engine=engine,
        gpus_per_node=1,
        gpu_mem_gb=139.0,
        seq_len=row,
        micro_batch=1,
        checkpointing=cfg.train.gradient_checkpointing,
        logit_chunk=cfg.scorer.logit_chunk,
        optimizer=optimizer,
        bytes_per_el=2,
        attention=attention,
        tree_keys=keys,
        tree_mask=mask,
    )
    p = plan(shape_from_hf_config(model_path), setup)
    return {
        "row_tokens": big.n_tokens,
        "planned_row_tokens": row,
        "attention": attention,
        "planned_gib": p["total_gib"],
        "tree_keys": keys,
        "tree_mask": mask,
    }


def trl_rate(work: Path, model_path: Path, dlg, steps: int, smoke: bool) -> dict:
    """TRL's DPOTrainer on the same pairs (precomputed reference), batch up to 8 pairs, one step = all pairs."""
    import torch

    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        return {"skipped": f"trl does not import here ({e})"}
    from benchlib import pair_table

    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.models import load_tokenizer

    cfg = run_config(work, model_path, smoke, **{"run.out_dir": work / "trl"})
    write_dialogues(Path(cfg.train.train_file), dlg)
    table = pair_table(cfg)
    n = len(table)
    b = max(d for d in range(1, min(8, n) + 1) if n % d == 0)
    ds = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in table])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if smoke else torch.bfloat16)
    args = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=b,
        gradient_accumulation_steps=n // b,
        max_steps=steps + 1,
        learning_rate=1e-6,
        max_length=cfg.data.max_length,
        precompute_ref_log_probs=True,
        gradient_checkpointing=not smoke,
        bf16=not smoke,
        use_cpu=not cuda(),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    reset_peak()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=load_tokenizer(model_path))
    tokens = []
    orig = trainer.compute_loss

    def counted(model, inputs, *a, **k):
        tokens.append(inputs["input_ids"].numel())
        return orig(model, inputs, *a, **k)

    trainer.compute_loss = counted
    t0 = time.perf_counter()
    trainer.train()
    sync()
    total = time.perf_counter() - t0
    s = total / (steps + 1)  # includes the first step and the reference precompute: a conservative rate for TRL
    step_tokens = sum(tokens) / (steps + 1)
    return {
        "pairs_per_step": n,
        "batch": b,
        "step_s": s,
        "tokens_per_s": step_tokens / s,
        "pairs_per_s": n / s,
        "measured_peak_gib": peak_gib(),
    }
