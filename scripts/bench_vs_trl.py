"""cso-dist train vs TRL's DPOTrainer: DPO throughput, memory and loss on the same model, data and steps.

Same tiny Qwen2 model (fp32, no dropout), the same ESConv pairs (first
--dialogues train dialogues, K=3 negatives per turn), the same effective batch (one optimizer step
per epoch over ALL pairs), the same number of optimizer steps, AdamW (betas 0.9/0.999, eps 1e-8,
no weight decay), constant lr, no warmup, gradient clipping at 1.0, beta 0.1, sigmoid DPO loss:

    trl_ref         TRL DPOTrainer with its reference model (a second copy, scored live every step)
    trl_precompute  TRL DPOTrainer with precompute_ref_log_probs=True (reference pass in its __init__)
    cso_trie        cso-dist train, prefix-trie layout, reference log-probs from the cache
    cso_pair        cso-dist train, per-pair layout, reference log-probs from the cache
    (cso_precompute: `run_precompute`, the cache both cso variants read; timed and measured apart)

Each variant runs in its own process (this script re-invoked with --variant), so memory is per variant.
Prints one JSON object on stdout (logs go to stderr):

    python scripts/bench_vs_trl.py                    # the headline: --shape fair, 3 repeats
    python scripts/bench_vs_trl.py --shape tiny-qwen --repeats 1   # the first table's shape (151k vocab, hidden 64)
    python scripts/bench_vs_trl.py --turns 2 --repeats 1 --variants cso_trie,trl_precompute   # a quick check

Shapes (--shape; --hidden-size, --layers, ... override a field):
    fair       hidden 512, 8 layers, 8 heads / 2 KV heads, intermediate 1408, the 4k ESConv BPE vocabulary:
               the LM head is 8% of the parameters, as in a 7B model (Qwen2.5-7B 7.2%, Llama-3-8B 6.5%), so
               completion-only logits save what they would save there
    tiny-qwen  hidden 64, 2 layers, the real 151k Qwen2.5 vocabulary: the LM head is ~99% of the model, which
               inflates what completion-only logits save (the first table in benchmarks/results.md)
Every variant runs --repeats times, each run in its own process, the variants interleaved (a, b, c, a, b,
c, ...); the JSON gives per variant the median of each figure and, for the rates, every run's value and the
spread (max - min) / median. Run it on an idle machine.

TRL runs with its best CPU options in 1.16: precompute_ref_log_probs (trl_precompute: no reference forward in
the steps), no gradient checkpointing, a micro-batch filled to our token budget. padding_free is unavailable
since its DPO refactor (it warns and pads) and needs FlashAttention; Liger / `use_kernels` need Triton (GPU).

TRL dominates the run time: on CPU (no Triton) its fused LM head projects EVERY position (prompt and
padding too) onto the vocabulary and folds each tile with several elementwise passes (log-probs plus the
entropy / mean-logit / top-1 metrics it logs); with the 151k vocabulary that is most of its step.

TRL is fed the conversational rows a TRL user would write (system prompt + history messages, then
the chosen / rejected assistant message) and tokenises them itself; before training the script checks
that TRL's prompt / chosen / rejected token ids equal ours for every pair (so both sides score exactly
the same sequences) and stops if any differs. Histories are cut by our truncation policy first
(data.max_length: oldest messages dropped, replies never cut), so TRL's own `max_length` (set to the
same value) never truncates; the script checks that too. TRL micro-batches hold --trl-batch pairs
(default: as many pairs as fit --max-tokens, our micro-batch budget, at the mean row length), lowered to
a divisor of the pair count so that TRL's gradient-accumulation average is exactly the mean over all
pairs; gradient_accumulation_steps = pairs / batch. Ours pack --max-tokens tokens per
micro-batch with train.grad_accum large enough for one step per epoch. TRL's own defaults that differ
from ours are set to ours: bf16 off (fp32), gradient checkpointing off, optim adamw_torch.

Reported per variant (definitions):
  pairs_per_s                  pairs / wall time of the LAST optimizer step (steady state; as
                               bench_layouts.py); a step is all its micro-batches' forward+backward, the
                               clip and the optimizer step (TRL: from its epoch start, so the collation
                               of that step's batches is included; ours collate up front)
  pairs_per_s_train            pairs * steps / sum of all step times
  pairs_per_s_with_precompute  pairs * steps / (sum of step times + reference precompute time)
                               (cso: run_precompute wall; trl_precompute: TRL's precompute pass;
                               trl_ref: no precompute, its reference cost is inside every step)
  tokens_per_s                 tokens the trained model processes / wall time of the last step
  tokens_per_pair              tokens the trained model processes per pair and step, padding included
                               (TRL: input_ids.numel() of every policy forward; ours: the packed tokens)
  lm_head_positions_per_pair   positions per pair and step that go through the vocabulary projection
                               (trie: those predicting reply tokens; per-pair layout: all; TRL: all on
                               CPU, completion positions only where Triton runs)
  ref_tokens_per_pair          tokens the reference model processes per pair: per step for trl_ref,
                               once (precompute) for trl_precompute and the cso variants
  pairs_per_forward            pairs in one micro-batch (TRL: its batch size; ours: pairs / micro-batches)
  base_rss_mb                  RSS of the variant's process after its imports, before model or data
  peak_rss_mb                  VmHWM (peak RSS) of the variant's process over its whole run
  peak_mem_per_pair_mb         (peak_rss_mb - base_rss_mb) / pairs_per_forward: the memory the run
                               adds on top of the bare interpreter + libraries (models, optimizer state,
                               gradients, activations, data), per pair processed together -- the
                               memory target's figure
  peak_rss_per_pair_mb         peak_rss_mb / pairs_per_forward (the whole process, libraries included)
  loss_first / loss            loss logged at the first / last optimizer step (first must be ln 2)
Top level: speedups of each cso variant over each TRL variant, memory ratios, loss differences, the
targets (>= 10x TRL's pairs/s, >= 3x lower peak memory per pair processed), machine and command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import esconv_pairs, machine, mem_status, model_facts, pair_table, run_cso, run_cso_precompute  # noqa: E402
from benchlib import tiny_model  # noqa: E402

TRL_VARIANTS = ("trl_ref", "trl_precompute")
CSO_VARIANTS = ("cso_trie", "cso_pair")
ALL_VARIANTS = ("cso_precompute",) + CSO_VARIANTS + TRL_VARIANTS


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


SHAPES = {
    "fair": dict(tokenizer="bpe", hidden_size=512, layers=8, heads=8, kv_heads=2, intermediate=1408),
    "tiny-qwen": dict(tokenizer="qwen", hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=128),
}


# ---------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialogues", type=int, default=1, help="first N ESConv train dialogues (K=3 negatives per turn)")
    ap.add_argument(
        "--turns",
        type=int,
        default=6,
        help="cut each dialogue after its N-th target supporter turn (0 = whole dialogues); "
        "shorter histories favour the per-pair layouts (TRL), so the cut is conservative",
    )
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps, one per epoch over all pairs")
    ap.add_argument("--shape", default="fair", choices=tuple(SHAPES), help="the tiny model's shape (see above)")
    for flag in ("hidden-size", "layers", "heads", "kv-heads", "intermediate"):
        ap.add_argument(f"--{flag}", type=int, default=0, help="override the shape's value")
    ap.add_argument("--tokenizer", default="", choices=("", "qwen", "bpe"), help="override the shape's tokenizer")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every variant, each in its own process")
    ap.add_argument("--attention", default="auto", help="scorer.attention of the cso variants")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per turn example (our truncation)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="cso: tokens per micro-batch (trie layout)")
    ap.add_argument(
        "--pair-max-tokens", type=int, default=0, help="cso_pair: tokens per micro-batch (0 = --max-tokens)"
    )
    ap.add_argument(
        "--trl-batch",
        type=int,
        default=0,
        help="TRL pairs per micro-batch, lowered to the largest divisor of the pair count (0 = auto: "
        "the most pairs whose 2 rows each fit --max-tokens together, like our micro-batches)",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument(
        "--variants",
        default=",".join(ALL_VARIANTS[1:]),
        help=f"comma list of {', '.join(ALL_VARIANTS[1:])} (cso_precompute runs whenever a cso variant does)",
    )
    ap.add_argument("--work", default="", help="working folder (default: a temporary one)")
    ap.add_argument("--variant", default="", choices=("",) + ALL_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--trl-batch-used", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, v in SHAPES[args.shape].items():  # the shape's values where no flag overrides them
        if not getattr(args, k):
            setattr(args, k, v)
    return args


def child(args) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        import torch  # noqa: F401 -- the libraries every variant loads, before the base RSS is taken
        import transformers  # noqa: F401

        import cso_dist.train  # noqa: F401

        if args.variant in TRL_VARIANTS:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        base = mem_status()
        work = Path(args.work)
        t0 = time.perf_counter()
        if args.variant == "cso_precompute":
            out = run_cso_precompute(cso_config(args, work), base)
        elif args.variant in CSO_VARIANTS:
            layout = args.variant.split("_")[1]
            out = run_cso(cso_config(args, work, layout, f"cso-{layout}"), base)
        else:
            out = run_trl(args, work, args.variant == "trl_precompute", base)
        out["process_s"] = time.perf_counter() - t0
    print(json.dumps(out))


# ---------------------------------------------------------------- the variants (each in its own process)
def shape_of(args) -> dict:
    """The tiny model's shape (--shape and the flags that override it)."""
    keys = ("tokenizer", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    return dict(
        zip(keys, (args.tokenizer, args.hidden_size, args.layers, args.heads, args.kv_heads, args.intermediate))
    )


def model_dir(work: Path, args) -> Path:
    """The tiny model of this shape under `work` (benchlib.tiny_model: built once)."""
    shape = shape_of(args)
    return tiny_model(work, shape.pop("tokenizer"), log, **shape)


def cso_config(args, work: Path, layout: str = "trie", out: str = "pre"):
    from cso_dist.config import load_config

    max_tokens = (args.pair_max_tokens or args.max_tokens) if layout == "pair" else args.max_tokens
    return load_config(
        None,
        {
            "model.path": str(model_dir(work, args)),
            "model.precision": "fp32",
            "train.train_file": str(work / "train.jsonl"),
            "train.method": "dpo",
            "train.beta": args.beta,
            "train.ref_cache": str(work / "refcache"),
            "data.max_length": args.max_length,
            "pack.max_tokens": max_tokens,
            "pack.layout": layout,
            "scorer.attention": args.attention,
            "train.epochs": args.steps,
            "train.lr": args.lr,
            "train.log_every": 1,
            "train.warmup_ratio": 0.0,
            "train.schedule": "constant",
            "train.weight_decay": 0.0,
            "train.max_grad_norm": 1.0,
            "train.gradient_checkpointing": False,
            # one optimizer step per epoch over all pairs, as TRL below: the same pairs in every update
            "train.grad_accum": 10**6,
            "run.out_dir": str(work / out),
        },
    )


def run_trl(args, work: Path, precompute: bool, base: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from cso_dist.models import load_tokenizer

    cfg = cso_config(args, work)
    table = pair_table(cfg)
    n_pairs, b = len(table), args.trl_batch_used
    assert b >= 1 and n_pairs % b == 0, (n_pairs, b)
    mdir = model_dir(work, args)
    tok = load_tokenizer(mdir)  # AutoTokenizer would re-read the folder with another pre-tokenizer
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    load_s = time.perf_counter() - t_load
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in table])
    counts = ("policy_tokens", "policy_real_tokens", "policy_forwards", "ref_tokens", "precompute_tokens")
    acct = dict.fromkeys((*counts, "head_positions"), 0) | {"precompute_s": 0.0, "tokenise_s": 0.0, "step_s": []}
    try:  # TRL's fused LM head scores only completion positions where Triton runs (CUDA/XPU), else all
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        _use_triton = None

    class Trainer(DPOTrainer):
        """DPOTrainer, instrumented only: counts tokens and times its stages."""

        def _prepare_dataset(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return super()._prepare_dataset(*a, **k)
            finally:
                acct["tokenise_s"] += time.perf_counter() - t0

        def _precompute_ref_logps(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                acct["precompute_s"] += time.perf_counter() - t0

        def compute_ref_log_probs(self, model, inputs):
            acct["precompute_tokens"] += inputs["input_ids"].numel()
            return super().compute_ref_log_probs(model, inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            acct["policy_tokens"] += inputs["input_ids"].numel()
            acct["policy_real_tokens"] += int(inputs["attention_mask"].sum())
            acct["policy_forwards"] += 1
            ids, cm = inputs["input_ids"], inputs["completion_mask"]
            compact = _use_triton(ids.device) if _use_triton else False
            acct["head_positions"] += int(cm[:, 1:].sum()) if compact else ids.shape[0] * (ids.shape[1] - 1)
            if not self.precompute_ref_logps:
                acct["ref_tokens"] += inputs["input_ids"].numel()  # the reference scores the same padded batch
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            acct["step_s"].append(time.perf_counter() - self.t0)
            self.t0 = time.perf_counter()

    targs = DPOConfig(
        output_dir=str(work / f"trl-{'pre' if precompute else 'ref'}"),
        per_device_train_batch_size=b,
        gradient_accumulation_steps=n_pairs // b,
        num_train_epochs=args.steps,
        max_steps=-1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=b,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        disable_dropout=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        seed=0,
    )
    t0 = time.perf_counter()
    trainer = Trainer(
        model=model, ref_model=None, args=targs, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()]
    )
    init_s = time.perf_counter() - t0
    pre_train = mem_status()

    # TRL's own tokenisation must give exactly our ids, pair by pair (its dataset keeps the row order)
    got = trainer.train_dataset
    bad = []
    for i, r in enumerate(table):
        g = got[i]
        ours = r["ids"]
        if (g["prompt_ids"], g["chosen_ids"], g["rejected_ids"]) != (list(ours[0]), list(ours[1]), list(ours[2])):
            bad.append(r["id"])
        elif len(ours[0]) + max(len(ours[1]), len(ours[2])) > args.max_length:
            bad.append(r["id"] + " (longer than max_length: TRL would truncate it)")
    if len(got) != n_pairs or bad:
        raise SystemExit(
            f"bench_vs_trl: TRL's tokenisation differs from ours on {len(bad)} of {n_pairs} pairs "
            f"(TRL kept {len(got)}), first: {bad[:3]}"
        )
    ref_check = None
    if precompute:  # TRL's precomputed reference log-probs against our cache (same reference, other layout)
        from cso_dist.refcache import load_reference
        from cso_dist.refcache.key import cache_key

        try:
            ours = load_reference(cfg, cache_key(cfg, "train"), "train")
            diffs = []
            for i, r in enumerate(table):
                for col, rid in (("ref_chosen_logps", r["chosen_id"]), ("ref_rejected_logps", r["id"])):
                    x, y = float(got[i][col]), ours[rid][0]
                    diffs.append(abs(x - y) / max(abs(y), 1.0))
            ref_check = {"replies": len(diffs), "max_rel_diff": max(diffs)}
        except Exception as e:  # noqa: BLE001 -- the check is extra; report why it could not run
            ref_check = {"error": f"{type(e).__name__}: {e}"}

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    peak = mem_status()["hwm_mb"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = len(acct["step_s"])
    assert steps == args.steps == len(losses), (steps, args.steps, losses)
    step_s = acct["step_s"]
    return {
        "trl": trl.__version__,
        "steps": steps,
        "pairs_per_step": n_pairs,
        "batch_pairs": b,
        "grad_accum": n_pairs // b,
        "pairs_per_forward": b,
        "rows_per_forward": 2 * b,
        "pairs_per_s": n_pairs / step_s[-1],
        "pairs_per_s_train": n_pairs * steps / sum(step_s),
        "pairs_per_s_with_precompute": n_pairs * steps / (sum(step_s) + acct["precompute_s"]),
        "tokens_per_pair": acct["policy_tokens"] / (n_pairs * steps),
        "tokens_per_s": acct["policy_tokens"] / steps / step_s[-1],
        "real_tokens_per_pair": acct["policy_real_tokens"] / (n_pairs * steps),
        "lm_head_positions_per_pair": acct["head_positions"] / (n_pairs * steps),
        "ref_tokens_per_pair": (acct["precompute_tokens"] if precompute else acct["ref_tokens"] / steps) / n_pairs,
        "ref_tokens_when": "once, before training" if precompute else "every step",
        "step_s": step_s,
        "train_s": train_s,
        "init_s": init_s,
        "model_load_s": load_s,
        "tokenise_s": acct["tokenise_s"],
        "precompute_s": acct["precompute_s"],
        "init_other_s": init_s - acct["tokenise_s"] - acct["precompute_s"],
        "loss_first": losses[0],
        "loss": losses[-1],
        "losses": losses,
        "grad_norm": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h][-1],
        "ids_identical_pairs": n_pairs,
        "ref_logps_vs_cso_cache": ref_check,
        "peak_rss_mb": peak,
        "base_rss_mb": base["rss_mb"],
        "pre_train_rss_mb": pre_train["rss_mb"],
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- orchestration
FORWARD = ("dialogues", "turns", "steps", "shape", "tokenizer", "hidden_size", "layers", "heads", "kv_heads")
FORWARD += ("intermediate", "attention", "max_length", "max_tokens", "pair_max_tokens", "lr", "beta")


def run_child(args, variant: str, work: Path, extra: list[str]) -> dict:
    """One variant in its own process: this script with --variant and the same settings; its JSON line."""
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FORWARD]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--work", str(work), *flags, *extra]
    log(f"--- {variant}")
    env = dict(
        os.environ,
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(work / f"hf-datasets-{variant}"),
        HF_HUB_OFFLINE="1",
    )
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"bench_vs_trl: variant {variant} failed (exit {p.returncode})")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    log(
        f"    {variant}: "
        + ", ".join(
            f"{k}={out[k]:.4g}" for k in ("pairs_per_s", "loss", "peak_rss_mb") if isinstance(out.get(k), (int, float))
        )
    )
    return out


def largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(min(cap, n), 1) + 1) if n % d == 0)


def derive(res: dict) -> None:
    """Figures of one repeat that combine variants: the cso variants' precompute, memory per pair."""
    pre = res.get("cso_precompute")
    for v in CSO_VARIANTS:
        if v in res:
            r = res[v]
            r["precompute_s"] = pre["precompute_s"]
            r["pairs_per_s_with_precompute"] = (
                r["pairs_per_step"] * r["steps"] / (sum(r["step_s"]) + pre["precompute_s"])
            )
            r["ref_tokens_per_pair"] = pre["ref_tokens"] / r["pairs_per_step"]
            r["ref_tokens_when"] = "once, before training (cso_precompute)"
    for r in res.values():
        if "pairs_per_forward" in r:
            r["peak_mem_per_pair_mb"] = (r["peak_rss_mb"] - r["base_rss_mb"]) / r["pairs_per_forward"]
            r["peak_rss_per_pair_mb"] = r["peak_rss_mb"] / r["pairs_per_forward"]


RATES = ("pairs_per_s", "pairs_per_s_train", "pairs_per_s_with_precompute", "tokens_per_s", "precompute_s")


def summarise(rs: list[dict]) -> dict:
    """One variant over its repeats: the median of every number, the last run's other fields, and for the
    rates every run's value and the spread (max - min) / median."""
    out = dict(rs[-1])
    for k, v in rs[-1].items():
        vals = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if len(vals) == len(rs) and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(vals)
    out["repeats"] = len(rs)
    out["runs"] = {k: [r[k] for r in rs] for k in RATES if k in rs[-1]}
    out["spread"] = {
        k: (max(x) - min(x)) / statistics.median(x) for k, x in out["runs"].items() if statistics.median(x)
    }
    return out


def bench(args) -> dict:
    import torch
    import transformers

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS[1:]]
    if unknown:
        raise SystemExit(f"bench_vs_trl: unknown variants {unknown}")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    for old in ("refcache", "cso-trie", "cso-pair", "trl-ref", "trl-pre"):  # a reused --work starts afresh
        shutil.rmtree(work / old, ignore_errors=True)
    esconv_pairs(work / "train.jsonl", args.dialogues, args.turns)
    model_dir(work, args)  # built once, before the variants' processes
    table = pair_table(cso_config(args, work))
    n_pairs = len(table)
    row_len = sum(len(r["ids"][0]) * 2 + len(r["ids"][1]) + len(r["ids"][2]) for r in table) / max(n_pairs, 1) / 2
    want = args.trl_batch or max(1, int(args.max_tokens // (2 * row_len)))
    b = largest_divisor(n_pairs, want)
    log(
        f"{n_pairs} pairs, mean TRL row {row_len:.0f} tokens: TRL micro-batch {b} pairs "
        f"({'asked' if args.trl_batch else 'token budget'} {want}; a divisor of {n_pairs}), "
        f"gradient_accumulation_steps {n_pairs // max(b, 1)}"
    )
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):  # variants interleaved, every run in its own process
        log(f"=== repeat {rep + 1} of {args.repeats}")
        got: dict = {}
        if any(v in CSO_VARIANTS for v in variants):
            shutil.rmtree(work / "refcache", ignore_errors=True)  # computed afresh every repeat
            got["cso_precompute"] = run_child(args, "cso_precompute", work, [])
        for v in variants:
            got[v] = run_child(args, v, work, ["--trl-batch-used", str(b)] if v in TRL_VARIANTS else [])
        derive(got)
        for v, r in got.items():
            runs.setdefault(v, []).append(r)
    res = {v: summarise(rs) for v, rs in runs.items()}

    out: dict = {
        "bench": "vs_trl",
        "dialogues": args.dialogues,
        "turns": args.turns or "all",
        "pairs": n_pairs,
        "steps": args.steps,
        "negatives_per_turn": 3,
        "shape": args.shape,
        "model": model_facts(model_dir(work, args)) | shape_of(args),
        "repeats": args.repeats,
        "attention": args.attention,
        "max_length": args.max_length,
        "max_tokens": args.max_tokens,
        "pair_max_tokens": args.pair_max_tokens or args.max_tokens,
        "trl_batch_pairs": b,
        "lr": args.lr,
        "beta": args.beta,
        **res,
    }
    ln2 = math.log(2)
    trained = [v for v in CSO_VARIANTS + TRL_VARIANTS if v in res]
    out["first_loss_minus_ln2"] = {v: res[v]["loss_first"] - ln2 for v in trained}
    if trained:
        ref = "trl_ref" if "trl_ref" in res else trained[0]
        out["final_loss_abs_diff_vs_" + ref] = {v: abs(res[v]["loss"] - res[ref]["loss"]) for v in trained if v != ref}
    speed, mem = {}, {}
    for c in CSO_VARIANTS:
        for t in TRL_VARIANTS:
            if c in res and t in res:
                speed[f"{c}/{t}"] = res[c]["pairs_per_s"] / res[t]["pairs_per_s"]
                speed[f"{c}/{t}_with_precompute"] = (
                    res[c]["pairs_per_s_with_precompute"] / res[t]["pairs_per_s_with_precompute"]
                )
                mem[f"{t}/{c}"] = res[t]["peak_mem_per_pair_mb"] / res[c]["peak_mem_per_pair_mb"]
                mem[f"{t}/{c}_whole_process"] = res[t]["peak_rss_per_pair_mb"] / res[c]["peak_rss_per_pair_mb"]
    out["speedup_pairs_per_s"] = speed
    out["memory_per_pair_ratio"] = mem
    if "cso_trie" in res and all(t in res for t in TRL_VARIANTS):
        out["targets"] = {
            "pairs_per_s_10x": all(speed[f"cso_trie/{t}"] >= 10 for t in TRL_VARIANTS),
            "memory_per_pair_3x": all(mem[f"{t}/cso_trie"] >= 3 for t in TRL_VARIANTS),
            "losses_agree_1e-4": all(abs(res[v]["loss"] - res["trl_ref"]["loss"]) <= 1e-4 for v in trained),
        }
    threads = next((r["threads"] for r in res.values() if "threads" in r), torch.get_num_threads())
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    out["machine"] = {
        **machine(threads=threads),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
    }
    out["command"] = " ".join([Path(sys.executable).name, "scripts/bench_vs_trl.py", *sys.argv[1:]])
    return out


def main() -> None:
    args = parse_args()
    if args.variant:
        child(args)
        return
    with contextlib.redirect_stdout(sys.stderr):  # progress and logs to stderr: stdout is one JSON object
        out = bench(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
