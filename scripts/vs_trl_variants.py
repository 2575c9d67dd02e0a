"""The variants scripts/bench_vs_trl.py runs, each in its own process: our reference precompute, cso-dist
training (trie or per-pair layout) and TRL's DPOTrainer (reference model or precomputed reference), on the
same tiny model and ESConv pairs. See bench_vs_trl.py for what is measured and how."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path


def mem_status() -> dict:
    """VmRSS and VmHWM (peak RSS) of this process, in MB. VmHWM belongs to this process image
    (unlike ru_maxrss, which can carry the forking parent's peak across exec)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "hwm_mb": out.get("VmHWM", 0.0)}


# ---------------------------------------------------------------- shared set-up
def shape_of(args) -> dict:
    """The tiny model's shape: --shape fair (the LM head's share of the parameters like a 7B model's) or
    tiny-qwen (the first table's: hidden 64, 2 layers, the 151k Qwen2.5 vocabulary)."""
    return {
        "tokenizer": args.tokenizer,
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "intermediate_size": args.intermediate,
    }


def model_dir(work: Path, args) -> Path:
    s = shape_of(args)
    return work / "-".join(["tiny", s.pop("tokenizer"), *(f"{k}{v}" for k, v in sorted(s.items()))])


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


def pair_table(cfg) -> list[dict]:
    """Every (turn, rejected reply) pair of the train file, in data order: our token ids (exactly what
    both cso layouts score) and the conversational TRL row with the same (truncated) history."""
    from cso_dist.data.render import dialogue_system_prompt, format_reply, to_chat, turn_examples
    from cso_dist.pack.types import ReplyId
    from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset

    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    rows = []
    for d in load_split(cfg, "train").dialogues:
        for ex in turn_examples(d, renderer, sset, cfg.data.max_length):
            m = d.messages[ex.turn]
            # truncation keeps messages[dropped_messages:turn] after the system prompt
            prompt = to_chat(d.messages[ex.dropped_messages : ex.turn], dialogue_system_prompt(d, sset))
            chosen = [{"role": "assistant", "content": format_reply(m.strategy, m.text)}]
            for k, (o, ids) in enumerate(zip(m.rejected, ex.rejected)):
                rows.append(
                    {
                        "id": ReplyId(d.id, ex.turn, f"r{k}"),
                        "chosen_id": ReplyId(d.id, ex.turn, "c"),
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": [{"role": "assistant", "content": format_reply(o.strategy, o.text)}],
                        "ids": (ex.history, ex.chosen, ids),
                    }
                )
    return rows


def prepare(args, work: Path) -> None:
    from cso_dist.config import DataConfig
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.data.esconv import esconv_texts
    from cso_dist.models import build_tiny_model

    dialogues, _ = build_dialogues(DataConfig(source="esconv", split="train"))
    dialogues = dialogues[: args.dialogues]
    if args.turns:  # a shorter dialogue: it ends with its N-th target turn
        dialogues = [
            replace(d, messages=d.messages[: d.turn_indices()[: args.turns][-1] + 1])
            for d in dialogues
            if d.turn_indices()
        ]
    write_dialogues(work / "train.jsonl", dialogues)  # same content -> same reference cache key
    if not (model_dir(work, args) / "config.json").is_file():
        shape = shape_of(args)
        texts = esconv_texts() if shape["tokenizer"] == "bpe" else None
        build_tiny_model("qwen2", model_dir(work, args), bpe_texts=texts, **shape)


def model_facts(work: Path, args) -> dict:
    """Parameter count and the LM head's share of it (Qwen2.5-7B: 7.2%; Llama-3-8B: 6.5%)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir(work, args))
    h, L, i, v = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    body = L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    head = v * h
    params = body + head  # tied embeddings: the head is the embedding
    return {"params": params, "lm_head_params": head, "lm_head_share": head / params, "vocab": v, **shape_of(args)}


# ---------------------------------------------------------------- variants (each in its own process)
def run_cso_precompute(args, work: Path, base: dict) -> dict:
    from cso_dist.refcache.cache import precompute

    cfg = cso_config(args, work)
    t0 = time.perf_counter()
    reports = precompute(cfg, progress=False)  # the body of run_precompute, which returns only the path
    wall = time.perf_counter() - t0
    rep = reports[0]
    if rep.skipped or not rep.complete:
        raise SystemExit(f"bench_vs_trl: the reference cache {rep.cache_dir} was not computed afresh")
    # the tokens it scored (every reply once, trie layout; it also scores KTO's mismatched completions)
    return {
        "precompute_s": wall,
        "precompute_scoring_s": rep.seconds,
        "ref_tokens": rep.tokens,
        "peak_rss_mb": mem_status()["hwm_mb"],
        "base_rss_mb": base["rss_mb"],
    }


def run_cso(args, work: Path, layout: str, base: dict) -> dict:
    import torch

    from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset
    from cso_dist.train.tracking import read_metrics
    from cso_dist.train.loop import make_layout, plan_steps, run_train

    cfg = cso_config(args, work, layout, f"cso-{layout}")
    t0 = time.perf_counter()
    summary = run_train(cfg, progress=False, overwrite=True)
    wall = time.perf_counter() - t0
    peak = mem_status()["hwm_mb"]
    ms = [m for m in read_metrics(Path(cfg.run.out_dir)) if "loss" in m]
    # the plan run_train followed (deterministic): micro-batches per step -> pairs per forward
    lay = make_layout(cfg, load_split(cfg, "train").dialogues, make_cfg_renderer(cfg), resolve_sset(cfg), False)
    plan = plan_steps(lay, len(lay.items), cfg)
    micro = [len(s) for s in plan]
    pairs = sum(b.counts["pairs"] for b in plan[-1])
    # positions the LM head (vocab projection + log-softmax) runs on: the trie only those predicting reply
    # tokens; the per-pair layout takes the model's full logits, every position of every padded row
    head = sum(int(b.data.reply_tokens.sum()) if layout == "trie" else b.n_tokens for b in plan[-1])
    step_s = [pairs / m["pairs_per_s"] for m in ms]  # the logged rate is pairs / step wall time
    last = ms[-1]
    return {
        "layout": layout,
        "steps": summary["steps"],
        "pairs_per_step": pairs,
        "micro_batches_per_step": micro[-1],
        "pairs_per_forward": pairs / micro[-1],
        "pairs_per_s": last["pairs_per_s"],
        "pairs_per_s_train": pairs * len(ms) / sum(step_s),
        "tokens_per_s": last["tokens_per_s"],
        "tokens_per_pair": last["tokens_per_s"] / last["pairs_per_s"],
        "lm_head_positions_per_pair": head / pairs,
        "attention": cfg.scorer.attention,
        "step_s": step_s,
        "train_s": wall,
        "loss_first": ms[0]["loss"],
        "loss": last["loss"],
        "losses": [m["loss"] for m in ms],
        "grad_norm": last["grad_norm"],
        "peak_rss_mb": peak,
        "base_rss_mb": base["rss_mb"],
        "threads": torch.get_num_threads(),
    }


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
    acct = {
        "policy_tokens": 0,
        "policy_real_tokens": 0,
        "policy_forwards": 0,
        "ref_tokens": 0,
        "precompute_tokens": 0,
        "precompute_s": 0.0,
        "tokenise_s": 0.0,
        "step_s": [],
        "head_positions": 0,
    }
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
