"""Measured peak memory of one training micro-batch (forward + backward) on CPU, against `cso-dist plan`.

Builds a tiny Qwen2 (fp32, ESConv BPE vocabulary), lays real ESConv dialogues out as trie
rows of about --seq-len tokens, runs one warm-up step (so gradients exist), then measures the
process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) during one more
forward + backward of the longest row, without and then with gradient checkpointing. Prints one
JSON object with the measured bytes and the planner's activation estimate for the same shape
and row length, under --attention (tree or dense). `overhead`: the measured peak minus that of the
same tokens as one plain causal row (what the trie's shape costs), against the planner's
"trie-layout overhead" line, whose tree figures are set from this row (keys and mask elements per token).

Run it with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS and the peak
counts live tensors only (tests/test_plan.py does):

    MALLOC_MMAP_THRESHOLD_=65536 python scripts/measure_memory.py --hidden 256 --layers 4 --seq-len 2048
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cso_dist.config import DataConfig  # noqa: E402
from cso_dist.data.build import build_dialogues  # noqa: E402
from cso_dist.data.dialogue import read_dialogues  # noqa: E402
from cso_dist.data.esconv import esconv_texts  # noqa: E402
from cso_dist.data.render import make_renderer  # noqa: E402
from cso_dist.data.strategies import load_strategy_set  # noqa: E402
from cso_dist.models.load import _enable_checkpointing  # noqa: E402
from cso_dist.models.tiny import init_model, tiny_config  # noqa: E402
from cso_dist.models.tokenizer import bpe_tokenizer, load_tokenizer  # noqa: E402
from cso_dist.scorer import trie_logps  # noqa: E402
from cso_dist.pack.tree_plan import tree_plan  # noqa: E402
from cso_dist.scorer import use_attention  # noqa: E402
from cso_dist.pack.layout import lay_out  # noqa: E402
from cso_dist.pack.trie import collate_trie, pack_units  # noqa: E402
from cso_dist.plan import Setup, activations, shape_from_hf_config  # noqa: E402


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.data:  # prepared data and a model folder's tokenizer (the tests share theirs)
        tok, dialogues = load_tokenizer(args.tokenizer), read_dialogues(args.data)
    else:
        tok = bpe_tokenizer(esconv_texts(), vocab_size=4096, template="chatml")
        dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train", negatives=args.negatives))
    laid = lay_out(
        dialogues[: args.dialogues],
        make_renderer(tok, "chatml"),
        load_strategy_set("esconv"),
        args.seq_len,
        args.seq_len // 2,
        kl=False,
        progress=False,
    )
    batch = collate_trie(max(pack_units(laid.all_units(), args.seq_len), key=lambda b: sum(len(u) for u in b)))
    config = tiny_config(
        "qwen2",
        tok,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(4096, args.seq_len),
    )
    model = init_model(config).train()
    kind = use_attention(model, args.attention)
    T = batch.n_tokens
    causal = replace(  # the same tokens and replies as one plain causal row (one unit, no branches)
        batch, ctx_lo=torch.zeros(T, dtype=torch.long), ctx_hi=torch.arange(1, T + 1), own_lo=torch.full((T,), T)
    )

    def step(b) -> None:
        # plain causal attention: one SDPA over the row, no mask, one key row per token
        used = use_attention(model, "tree") if b is causal else kind
        trie_logps(model, b, args.logit_chunk, attention=used).sum().backward()
        use_attention(model, kind)

    step(batch)  # gradients now exist: a measured step adds only activations and transients
    peaks, plain = {}, {}
    for ck in (False, True):
        if ck:
            _enable_checkpointing(model, reentrant=False)
        for b, into in ((batch, peaks), (causal, plain)):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = _status("VmRSS")
            step(b)
            into[ck] = _status("VmHWM") - before
    keys, mask = tree_plan(batch).per_token()

    cfg_file = Path(args.work) / "config.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    config.to_json_file(cfg_file)
    shape = shape_from_hf_config(cfg_file)
    setup = Setup(
        finetune="full",
        zero=0,
        gpus_per_node=1,
        seq_len=batch.n_tokens,
        micro_batch=1,
        logit_chunk=args.logit_chunk,
        bytes_per_el=4,
        attention=args.attention,
        tree_keys=keys,
        tree_mask=mask,
    )
    out = {
        "attention": args.attention,
        "tree_keys_per_token": keys,
        "tree_mask_per_token": mask,
        "hidden": args.hidden,
        "layers": args.layers,
        "intermediate": args.intermediate,
        "n_tokens": batch.n_tokens,
        "reply_tokens": int(len(batch.pred_idx)),
        "logit_chunk": args.logit_chunk,
    }
    plain_setup = replace(setup, attention="tree", tree_keys=1.0, tree_mask=0.0)  # what `causal` runs
    for ck, peak in peaks.items():
        est = activations(shape, setup, ck)
        overhead = peak - plain[ck]
        planned = est["peak"] - activations(shape, plain_setup, ck)["peak"]
        out["checkpointing" if ck else "no_checkpointing"] = {
            "measured_peak_mb": peak / 2**20,
            "estimated_mb": est["peak"] / 2**20,
            "estimate_parts_mb": {k: v / 2**20 for k, v in est.items()},
            "ratio": est["peak"] / peak,
            "overhead": {
                "measured_mb": overhead / 2**20,
                "planned_peak_difference_mb": planned / 2**20,
                "trie_overhead_line_mb": est["trie_mask"] / 2**20,
                "ratio": planned / overhead if overhead > 0 else float("nan"),
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=2048, help="token budget of the packed row")
    ap.add_argument("--logit-chunk", type=int, default=512)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--dialogues", type=int, default=16)
    ap.add_argument("--data", default="", help="preference dialogues JSONL (default: build ESConv train)")
    ap.add_argument("--tokenizer", default="", help="with --data: a model folder whose tokenizer to use")
    ap.add_argument("--attention", default="tree", choices=("tree", "dense"), help="scorer.attention of the row")
    ap.add_argument("--work", default="/tmp/cso-measure-memory")
    args = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        out = measure(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
