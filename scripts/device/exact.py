"""The GPU kit's exactness section (scripts/device/sections.py runs it): every attention method of the trie
against the per-pair layout, log-probs and gradients, fp32 and bf16; the step-0 DPO loss."""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitlib import (  # noqa: E402
    Result,
    build_model,
    counts_of,
    cuda,
    dialogues,
    free_memory,
    layout_batches,
    run_config,
    sync,
)


# ---------------------------------------------------------------- 2. exactness
_FP32_PER_PAIR: dict = {}


def _weights(keys) -> dict:
    """A fixed pseudo-random weight per reply id (the same for both layouts)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ks = sorted(set(keys))
    return dict(zip(ks, torch.randn(len(ks), generator=g).tolist()))


def _scores(model, batches, chunk: int, w: dict | None, backward: bool, attention: str = "dense"):
    import torch

    from cso_dist.scorer import score

    model.zero_grad(set_to_none=True)
    out = {}
    for b in batches:
        with torch.set_grad_enabled(backward):
            lp = score(model, b, chunk, attention=attention)
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
    model = load_model(model_path, "full", precision, device=default_device())
    model.eval()  # no dropout anywhere; gradients still flow
    out: dict = {"trie_micro_batches": len(trie.batches(order))}
    if precision not in _PER_PAIR:
        pair_batches = PairLayout(dlg, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length).batches(order)
        w = _weights(k for b in pair_batches for k in b.reply_ids)
        t0 = time.perf_counter()
        _PER_PAIR[precision] = (*_scores(model, pair_batches, cfg.scorer.logit_chunk, w, backward=True), w)
        out["per_pair_seconds"] = time.perf_counter() - t0
    want, want_g, w = _PER_PAIR[precision]
    fp32 = _PER_PAIR.get("fp32", (None,))[0]
    if precision != "fp32" and fp32:
        out["per_pair_vs_fp32_per_pair"] = _rel(want, fp32)  # bf16's own error: the scale to judge the rest by
    for method in methods:
        kind = use_attention(model, method)
        backward = cuda() or method != "flex"  # FlexAttention has no CPU backward
        sync()
        t0 = time.perf_counter()
        got, got_g = _scores(model, trie.batches(order), cfg.scorer.logit_chunk, w, backward, kind)
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

    from cso_dist.engines.dist import World
    from cso_dist.engines import build_engine
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
