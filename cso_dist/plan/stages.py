"""Every stage of a run on the job's GPUs: the reference precompute, the training step, likelihood evaluation,
generation and the export of the final model. Each stage's per-GPU (and, where it matters, host) bytes, whether
they fit, and, where they do not, the smallest change that makes them fit.

  precompute       the reference run forward only, through the training engine in scoring mode (no gradients,
                   no optimizer, no key/value cache): its weights as the engine holds them (the torch engine and
                   ZeRO-2: all of them; ZeRO-3: 1 / GPUs of them + one layer gathered and the prefetch buffers;
                   QLoRA: the 4-bit base), one layer's forward over a row of pack.max_tokens tokens and the LM
                   head over scorer.logit_chunk reply tokens. Skipped when the run reads no reference cache.
  train            the training plan (cso_dist.plan.training).
  eval likelihood  the same forward, the model loaded as the run's finetune kind (LoRA adapters in fp32).
  eval generate    eval.backend hf: the same weights + the key/value cache of one generate() batch
                   (eval.batch_size x (data.max_length + eval.max_new_tokens) tokens) + the prefill, one layer's
                   forward over the batch's prompts + the last token's logits in fp32. eval.backend openai: served
                   elsewhere; the vLLM line with the tensor-parallel size at which weights / TP + cache fit a card.
  export           host memory of the rank that writes the final HF folder: full fine-tuning under ZeRO, the
                   checkpoint consolidated in fp32 (4 bytes/param) + the bf16 model (2); on the torch engine the
                   model and its state dict; LoRA/QLoRA, the adapter (train.final adapter) or the base in its
                   precision + the adapter (merged).
"""

from __future__ import annotations

import dataclasses
import math

from cso_dist.util.errors import ConfigError
from cso_dist.plan.shapes import Shape
from cso_dist.plan.training import (
    GIB,
    HEADROOM,
    Setup,
    adapter_params,
    attention_bytes_per_token,
    base_weights,
    budget,
    cheapest,
    dequantised,
    eager_scores,
    engine_words,
    host_budget,
    lm_head,
    plan,
    trie_masks,
    _tree,
)

LABELS = {
    "precompute": "precompute",
    "train": "train",
    "eval_likelihood": "eval likelihood",
    "eval_generate": "eval generate",
    "export": "export",
}
TP_SIZES = (1, 2, 4, 8)  # vLLM tensor-parallel sizes within one node


# ---------------------------------------------------------------- the terms
def scoring_weights(shape: Shape, s: Setup, adapters: bool) -> float:
    """Per-GPU weight bytes of a forward without gradients: the base as the engine holds it, plus the LoRA
    adapters in fp32 (`adapters`: the run's trained model; without: the reference)."""
    return base_weights(shape, s) + (4 * adapter_params(shape, s) if adapters else 0)


def forward_bytes_per_token(shape: Shape, s: Setup, tree: bool) -> float:
    """One layer's live tensors per token in a forward that keeps nothing for backward: the hidden state in, its
    norm and the layer's output; the attention's q, k, v and output; the MLP's gate, up and their product."""
    b = s.bytes_per_el
    return 3 * shape.hidden * b + attention_bytes_per_token(shape, s, tree) + 3 * shape.intermediate * b


def scoring_forward(shape: Shape, s: Setup) -> dict[str, float]:
    """Activations of one no-gradient forward over a micro-batch of trie rows: one layer live at a time (with the
    trie masks, the rotary tables, an eager model's scores, QLoRA's dequantised weight), then the LM head."""
    b, L, B = s.bytes_per_el, s.seq_len, s.micro_batch
    T = B * L
    layer = T * forward_bytes_per_token(shape, s, _tree(shape, s)) + sum(trie_masks(shape, s))
    layer += eager_scores(shape, B, L, b) + T * 2 * shape.head_dim * b + dequantised(shape, s)
    return {"forward (one layer)": layer, "LM head": lm_head(shape, s, T)}


def kv_cache(shape: Shape, s: Setup) -> float:
    """Key/value cache of one generate() batch: batch x (prompt + new tokens) x layers x (k, v) x kv heads x dim."""
    tokens = s.eval_batch * (s.max_length + s.max_new_tokens)
    return tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim * s.bytes_per_el


def prefill(shape: Shape, s: Setup) -> float:
    """The first forward of generate(): one layer over the batch's prompts (plain causal attention, a [B x L x L]
    padding-and-causal mask), plus the rotary tables."""
    b, B, L = s.bytes_per_el, s.eval_batch, s.max_length
    T = B * L
    return (
        T * forward_bytes_per_token(shape, s, False)
        + B * L * L * b
        + eager_scores(shape, B, L, b)
        + T * 2 * shape.head_dim * b
        + dequantised(shape, s)
    )


def generate_parts(shape: Shape, s: Setup) -> dict[str, float]:
    return {
        "weights": scoring_weights(shape, s, adapters=True),
        "KV cache": kv_cache(shape, s),
        "prefill (one layer)": prefill(shape, s),
        "logits": s.eval_batch * shape.vocab * 4.0,
    }


def export_host(shape: Shape, s: Setup) -> tuple[float, str]:
    """Host bytes of writing the final HF folder, and what they are."""
    P, b, T = shape.params(), s.bytes_per_el, adapter_params(shape, s)
    if s.finetune == "full":
        if s.zero:
            return 6.0 * P, "the ZeRO checkpoint consolidated in fp32 + the bf16 model (6 bytes/param)"
        return 2.0 * P * b, "the model and its state dict"
    if s.final == "merged":
        return P * b + 4.0 * T, "the base in its precision + the adapter, merged (train.final merged)"
    return 4.0 * T, "the adapter alone (train.final adapter)"


def serve(shape: Shape, s: Setup, name: str) -> dict:
    """The vLLM line for eval.backend openai: the smallest tensor-parallel size at which the weights / TP and the
    batch's KV cache / TP fit a card of the plan (pipeline stages beyond 8 GPUs)."""
    need = shape.params() * s.bytes_per_el + kv_cache(shape, s)
    tps = [t for t in TP_SIZES if shape.heads % t == 0]
    tp = next((t for t in tps if need / t <= budget(s)), tps[-1])
    pp = max(1, math.ceil(need / tp / budget(s)))
    line = f"vllm serve {name} --tensor-parallel-size {tp}" + (f" --pipeline-parallel-size {pp}" if pp > 1 else "")
    return {"line": f"{line} --max-model-len {s.max_length + s.max_new_tokens}", "per_gpu": need / (tp * pp)}


# ---------------------------------------------------------------- the stages
def _stage(parts: dict[str, float], s: Setup, host: float = 0.0, **extra) -> dict:
    total = sum(parts.values())
    return {
        "per_gpu_gib": total / GIB,
        "host_gib": host / GIB,
        "fits": total <= budget(s) and host <= host_budget(s),
        "fix": None,
        "parts_gib": {k: v / GIB for k, v in parts.items()},
        **extra,
    }


def _scoring(shape: Shape, s: Setup, adapters: bool) -> float:
    return scoring_weights(shape, s, adapters) + sum(scoring_forward(shape, s).values())


def _precompute(shape: Shape, s: Setup) -> float:
    return _scoring(shape, s, adapters=False)


def _likelihood(shape: Shape, s: Setup) -> float:
    return _scoring(shape, s, adapters=True)


def _generate(shape: Shape, s: Setup) -> float:
    return sum(generate_parts(shape, s).values())


def _weights_note(s: Setup) -> str:
    if s.finetune == "qlora":
        return "4-bit base"
    if s.zero == 3:
        return f"ZeRO-3 over {s.gpus} GPUs" + (", parameters in host memory" if s.offload == "params" else "")
    return "whole model on each GPU"


def _offloaded_host(shape: Shape, s: Setup) -> float:
    """ZeRO-3 with parameter offload, scoring: each node holds its ranks' partitions of the weights."""
    return shape.params() * s.bytes_per_el / s.nodes if s.zero == 3 and s.offload == "params" else 0.0


def stages(shape: Shape, s: Setup, serve_name: str = "MODEL", train: dict | None = None) -> dict:
    """Every stage of the run: per GPU and host GiB, whether it fits, the fix where it does not, what it counts."""
    s.check()
    out: dict[str, dict] = {}
    if s.reference_cache:
        parts = {"weights": scoring_weights(shape, s, adapters=False), **scoring_forward(shape, s)}
        out["precompute"] = _stage(parts, s, _offloaded_host(shape, s), weights=_weights_note(s))
        out["precompute"]["fix"] = _scoring_fix(shape, s, _precompute, out["precompute"]["fits"])
    else:
        out["precompute"] = _stage({}, s, skipped="the run reads no reference cache")
    p = train or plan(shape, s)
    out["train"] = {
        "per_gpu_gib": p["total_gib"],
        "host_gib": p["cpu_offload_gib_per_node"],
        "fits": p["fits"],
        "fix": None if p["fits"] else _train_fix(shape, s),
        "checkpointing": s.checkpointing,
    }
    parts = {"weights": scoring_weights(shape, s, adapters=True), **scoring_forward(shape, s)}
    out["eval_likelihood"] = _stage(parts, s, _offloaded_host(shape, s), weights=_weights_note(s))
    out["eval_likelihood"]["fix"] = _scoring_fix(shape, s, _likelihood, out["eval_likelihood"]["fits"])
    if s.eval_served:
        v = serve(shape, s, serve_name)
        out["eval_generate"] = _stage({}, s, served=True, serve=v["line"], server_per_gpu_gib=v["per_gpu"] / GIB)
    else:
        g = _stage(generate_parts(shape, s), s, _offloaded_host(shape, s), weights=_weights_note(s))
        g["tokens"] = s.eval_batch * (s.max_length + s.max_new_tokens)
        g["fix"] = None if g["fits"] else _generate_fix(shape, s, serve_name)
        out["eval_generate"] = g
    host, what = export_host(shape, s)
    e = _stage({}, s, host, counts=what)
    if not e["fits"]:
        need = math.ceil(host / GIB / (1 - HEADROOM))
        e["fix"] = (
            f"train.final adapter (merge on a host with >= {need} GB)"
            if s.finetune != "full"
            else f"export on a host with >= {need} GB of memory (plan.cpu_mem_gb)"
        )
    out["export"] = e
    return out


def all_fit(st: dict) -> bool:
    return all(v["fits"] for v in st.values())


# ---------------------------------------------------------------- the fixes
def _first_fit(shape: Shape, measure, changes) -> str | None:
    """The first (label, setup) of `changes` whose stage fits its card: 'label (X GiB per GPU)'."""
    for label, c in changes:
        try:
            c.check()
        except ConfigError:
            continue
        total = measure(shape, c)
        if total <= budget(c):
            return f"{label} ({total / GIB:.1f} GiB per GPU)"
    return None


def _zero3(s: Setup) -> str:
    """The change that shards the model over the job's GPUs (ZeRO-3), in config keys."""
    if s.zero == 0:
        return f"run it with dist.engine deepspeed (ZeRO-3) over the job's {s.gpus} GPUs"
    return f"dist.zero_stage 3 (the model sharded over the job's {s.gpus} GPUs)"


def _halvings(start: int, floor: int) -> list[int]:
    out, k = [], start // 2
    while k >= floor:
        out.append(k)
        k //= 2
    return out


def _scoring_fix(shape: Shape, s: Setup, measure, fits: bool) -> str | None:
    if fits:
        return None
    r = dataclasses.replace
    changes = []
    if s.zero != 3 and s.finetune != "qlora":
        changes.append((_zero3(s), r(s, zero=3)))
    changes += [(f"pack.max_tokens {k}", r(s, seq_len=k)) for k in _halvings(s.seq_len, s.max_length)]
    changes += [(f"scorer.logit_chunk {k}", r(s, logit_chunk=k)) for k in _halvings(s.logit_chunk, 128)]
    if s.zero == 3 and s.offload != "params":
        changes.append((_offload_words("params"), r(s, offload="params")))
    if s.zero == 3:
        changes += [(f"slurm.nodes {s.nodes * k}", r(s, nodes=s.nodes * k)) for k in (2, 4, 8)]
    return _first_fit(shape, measure, changes) or "none found: a smaller model.finetune, or more GPUs"


def _generate_fix(shape: Shape, s: Setup, serve_name: str) -> str:
    r = dataclasses.replace
    changes = [(f"eval.batch_size {k}", r(s, eval_batch=k)) for k in _halvings(s.eval_batch, 1)]
    if s.zero != 3 and s.finetune != "qlora":
        z = r(s, zero=3)
        changes += [(_zero3(s), z)] + [
            (f"{_zero3(s)}, eval.batch_size {k}", r(z, eval_batch=k)) for k in _halvings(s.eval_batch, 1)
        ]
    return _first_fit(shape, _generate, changes) or f"use eval.backend openai ({serve(shape, s, serve_name)['line']})"


def _train_fix(shape: Shape, s: Setup) -> str:
    for same in (True, False):
        best = cheapest(shape, s, same_gpus=same)
        if best:
            return f"{_changes(s, best)} ({best['total_gib']:.1f} GiB per GPU)"
    for k in _halvings(s.seq_len, s.max_length):
        p = plan(shape, dataclasses.replace(s, seq_len=k))
        if p["fits"]:
            return f"pack.max_tokens {k} ({p['total_gib']:.1f} GiB per GPU)"
    return "none found up to 64 nodes: lower pack.max_tokens, or another model.finetune"


def _changes(s: Setup, best: dict) -> str:
    """What differs between the setup and a fitting one, in config keys."""
    out = [f"slurm.{k} {best[k]}" for k in ("nodes", "gpus_per_node") if best[k] != getattr(s, k)]
    if best["zero"] != s.zero:
        out.append(
            f"dist.engine deepspeed (ZeRO-{best['zero']})"
            if s.zero == 0
            else "dist.engine torch"
            if best["zero"] == 0
            else f"dist.zero_stage {best['zero']}"
        )
    if best["offload"] != s.offload:
        out.append(_offload_words(best["offload"]))
    if best["checkpointing"] != s.checkpointing:
        out.append(f"train.gradient_checkpointing {str(best['checkpointing']).lower()}")
    return ", ".join(out) or engine_words(best["zero"], best["offload"])


def _offload_words(offload: str) -> str:
    if offload == "params":
        return "parameters and optimizer in host memory (dist.deepspeed_config zero3_offload)"
    if offload == "optimizer":
        return "the optimizer in host memory (a dist.deepspeed_config with offload_optimizer)"
    return "no CPU offload (dist.deepspeed_config zero3)"


# ---------------------------------------------------------------- the table
def _gib(x: float) -> str:
    return f"{x:.1f}" if x else "-"


def _counts(key: str, st: dict) -> str:
    if "skipped" in st:
        return f"not run: {st['skipped']}"
    if st.get("served"):
        return f"served, not on these GPUs: {st['serve']} ({st['server_per_gpu_gib']:.1f} GiB per server GPU)"
    if key == "train":
        return f"the training table above ({'checkpointing' if st['checkpointing'] else 'no checkpointing'})"
    if key == "export":
        return f"host: {st['counts']}"
    parts = " + ".join(f"{k} {v:.1f}" for k, v in st["parts_gib"].items())
    extra = f"; {st['tokens']} tokens cached" if "tokens" in st else ""
    return f"{parts} ({st['weights']}{extra})"


def format_stages(st: dict, usable_gib: float, host_usable_gib: float) -> list[str]:
    """The stage table: per GPU and host GiB, fits, what each figure counts, and a fix line under a stage that does
    not fit."""
    lines = [
        f"every stage (of {usable_gib:.1f} GiB usable per GPU, {host_usable_gib:.0f} GiB of host memory per node)",
        f"{'  stage':<17}{'GiB per GPU':>12}{'host GiB':>10}{'fits':>6}   counts (GiB)",
    ]
    yn = {True: "yes", False: "NO"}
    for key, label in LABELS.items():
        v = st[key]
        lines.append(f"  {label:<15}{_gib(v['per_gpu_gib']):>12}{_gib(v['host_gib']):>10}{yn[v['fits']]:>6}   ")
        lines[-1] += _counts(key, v)
        if v["fix"]:
            lines.append(f"    fix: {v['fix']}")
    lines.append("every stage fits" if all_fit(st) else "a stage does NOT fit: see its fix")
    return lines


def stage_problems(st: dict, s: Setup) -> list[str]:
    """One phrase per stage that does not fit: the stage, its figure and its fix."""
    out = []
    for key, label in LABELS.items():
        v = st[key]
        if not v["fits"]:
            gpu = f"{v['per_gpu_gib']:.1f} GiB per GPU of {budget(s) / GIB:.1f} usable"
            host = f"{v['host_gib']:.0f} GiB of host memory of {host_budget(s) / GIB:.0f} usable"
            where = host if v["host_gib"] > host_budget(s) / GIB else gpu
            out.append(f"stage {label} does not fit ({where}): {v['fix']}")
    return out
