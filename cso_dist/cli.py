"""The `cso-dist` command line. User errors print one line and exit 2; no tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cso_dist.config import Config, add_flags, flag_overrides, load_config, parse_overrides
from cso_dist.errors import CsoError
from cso_dist.preempt import Preempted


def add_config_arg(parser: argparse.ArgumentParser, help: str = "YAML config") -> None:
    """Every command that reads a config takes it both ways: `cmd CONFIG` and `cmd --config CONFIG`."""
    parser.add_argument("config", nargs="?", help=f"{help} (or --config FILE)")
    parser.add_argument("--config", dest="config_flag", metavar="CONFIG", help=help)


def config_path(args: argparse.Namespace) -> str | None:
    pos, flag = getattr(args, "config", None), getattr(args, "config_flag", None)
    if pos and flag and Path(pos) != Path(flag):
        raise CsoError(f"two configs given: {pos} (positional) and --config {flag}; give one")
    return pos or flag


def _config(args: argparse.Namespace, extra: list[str], family: str) -> Config:
    """Config file + dotted overrides + the command's generated flags (config.add_flags; flags win), for the
    sections of the command's family (config.FAMILIES)."""
    return load_config(config_path(args), {**parse_overrides(extra), **flag_overrides(args)}, family)


def _print_kv(title: str, d: dict, indent: str = "  ") -> None:
    print(title)
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            for k2, v2 in v.items():
                print(f"{indent}  {k2}: {v2}")
        else:
            print(f"{indent}{k}: {v}")


# ---------------------------------------------------------------- data


def cmd_data_build(args, extra) -> int:
    from cso_dist.data.build import build_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.data.stats import dialogue_stats

    cfg = _config(args, extra, "data")
    t0 = time.time()
    dialogues, report = build_dialogues(cfg.data)
    n = write_dialogues(args.out, dialogues)
    stats = dialogue_stats(dialogues)
    print(f"wrote {n} preference dialogues to {args.out} ({time.time() - t0:.1f} s) from {report.input} "
          f"(strategy set: {report.strategy_set})")
    print(f"  turns: {stats['turns']}  pairs: {stats['pairs']}  turns without negatives: "
          f"{stats['turns_without_negatives']}  context-only turns: {stats['context_only_turns']}")
    for k, v in report.notes.items():
        if k != "input":
            print(f"  {k}: {v}")
    if report.skipped:
        print(f"skipped {sum(report.skipped.values())} invalid records (--skip-invalid):")
        for reason, count in report.skipped.items():
            print(f"  {reason}: {count}  e.g. {report.skipped_examples[reason]}")
    return 0


def cmd_data_stats(args, extra) -> int:
    from cso_dist.data.dialogue import read_dialogues
    from cso_dist.data.stats import dialogue_stats

    cfg = _config(args, extra, "data")
    dialogues = read_dialogues(args.file)
    stats = dialogue_stats(dialogues)
    if args.tokenizer:
        from cso_dist.data.stats import token_stats_for

        stats["tokens"] = token_stats_for(dialogues, args.tokenizer, cfg.data)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False))
    else:
        _print_kv(f"{args.file}", stats)
    return 0


def cmd_data_pairs(args, extra) -> int:
    from cso_dist.data.dialogue import read_dialogues
    from cso_dist.io import write_jsonl
    from cso_dist.data.export import pair_rows
    from cso_dist.data.strategies import resolve_strategy_set

    dialogues = read_dialogues(args.file)
    sset = resolve_strategy_set(args.strategies or "auto", dialogues[0].strategy_set if dialogues else None)
    n = write_jsonl(args.out, pair_rows(dialogues, sset, args.format))
    print(f"wrote {n} {args.format.upper()} rows to {args.out}")
    return 0


def cmd_data_fetch(args, extra) -> int:
    from cso_dist.data.fetch import fetch_esconv
    from cso_dist.paths import user_data_dir

    dest = Path(args.dest) if args.dest else user_data_dir()
    for p in fetch_esconv(dest):
        print(f"wrote {p}")
    return 0


# ---------------------------------------------------------------- models
def cmd_tiny_model(args, extra) -> int:
    from cso_dist.models import build_tiny_model

    texts = None
    if args.tokenizer == "bpe":
        from cso_dist.data.esconv import esconv_texts

        texts = esconv_texts(args.bpe_data)
    out = build_tiny_model(args.arch, args.out, tokenizer=args.tokenizer, template=args.template, bpe_texts=texts,
                           hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed,
                           overwrite=args.overwrite)
    print(f"wrote tiny {args.arch} model ({args.tokenizer} tokenizer) to {out}")
    return 0


# ---------------------------------------------------------------- precompute / train
def cmd_precompute(args, extra) -> int:
    from cso_dist.dist import world_from_env
    from cso_dist.refcache import run_precompute

    cfg = _config(args, extra, "training")
    if args.dry_run:
        from cso_dist.preflight import print_dry_run

        return print_dry_run(cfg, "precompute")
    world = world_from_env()  # under torchrun / srun: this rank computes its own shards
    root = run_precompute(cfg, world.rank, world.world_size, progress=world.main)
    print(f"reference cache {'ready' if world.world_size == 1 else f'shards of rank {world.rank} ready'}: {root}")
    return 0


def cmd_cache_export(args, extra) -> int:
    from cso_dist.refcache import export_cache

    n = export_cache(args.cache, args.out)
    print(f"wrote {n} pair rows to {args.out}")
    return 0


def cmd_train(args, extra) -> int:
    from cso_dist.train import run_train

    cfg = _config(args, extra, "training")
    if args.dry_run:
        from cso_dist.preflight import print_dry_run

        return print_dry_run(cfg, "train")
    summary = run_train(cfg, resume="auto" if args.auto_resume else args.resume)
    if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    keys = ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies", "pairs_per_s")
    print("final: " + "  ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary))
    print(f"model written to {summary['final']}")
    return 0


def cmd_export(args, extra) -> int:
    from cso_dist.export import export

    export(Path(args.checkpoint), Path(args.out), args.final)
    return 0


# ---------------------------------------------------------------- launch (Slurm / submitit)


def cmd_launch_sbatch(args, extra) -> int:
    from cso_dist.launch import parse_grid, sweep_runs
    from cso_dist.launch.sbatch import submit, write_job

    cfg = _config(args, extra, "launch")
    template = args.template or ("sweep" if args.sweep else "train")
    sweep = None
    if template == "sweep":
        runs = sweep_runs(cfg, parse_grid(args.sweep or []))
        sweep = [[f"--{k}={v}" for k, v in over.items()] for _, over in runs]
    elif args.sweep:
        raise CsoError("launch sbatch: --sweep goes with --template sweep")
    script = write_job(cfg, template, sweep=sweep)
    if args.dry_run:
        print(script.read_text())
        print(f"# written to {script} (not submitted: --dry-run)")
        return 0
    job = submit(script)
    print(f"submitted job {job}: {script}")
    print(f"logs: {Path(cfg.run.out_dir).resolve() / 'slurm'}")
    return 0


def cmd_launch_submitit(args, extra) -> int:
    from cso_dist.launch import collect, parse_grid, submit_run, submit_sweep, table
    from cso_dist.launch.jobs import write_results

    cfg = _config(args, extra, "launch")
    runs = submit_sweep(cfg, parse_grid(args.sweep), args.cluster) if args.sweep else [submit_run(cfg, args.cluster)]
    for r in runs:
        print(f"submitted {r.name}: job {r.job.job_id} -> {r.cfg.run.out_dir}")
    if args.no_wait:
        return 0
    rows = collect(runs)
    print(table(rows))
    if args.sweep:
        print(f"results: {write_results(Path(cfg.run.out_dir), rows)}")
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


# ---------------------------------------------------------------- mcts (ESC-Pro builder)


def cmd_mcts_build(args, extra) -> int:
    from cso_dist.mcts.build import build, format_report, parse_shard

    cfg = _config(args, extra, "mcts")
    r = build(cfg, args.seeds, args.out, parse_shard(args.shard))
    print(format_report(r))
    return 0


def cmd_mcts_merge(args, extra) -> int:
    from cso_dist.mcts.build import merge

    print(f"wrote {merge(args.parts, args.out)} ESC-Pro records to {args.out}")
    return 0


def cmd_mcts_draw(args, extra) -> int:
    from cso_dist.mcts.draw import draw_tree

    print(f"wrote {draw_tree(args.tree, args.out, args.max_depth)}")
    return 0


def cmd_mcts_submit(args, extra) -> int:
    from cso_dist.mcts.build import format_report
    from cso_dist.mcts.launch import collect_build, submit_build

    cfg = _config(args, extra, "mcts")
    jobs, parts = submit_build(cfg, args.seeds, args.out, args.tasks, args.cluster)
    print(f"submitted {len(jobs)} array tasks: " + " ".join(str(j.job_id) for j in jobs))
    if args.no_wait:
        print(f"merge when done: cso-dist mcts merge --out {args.out} " + " ".join(map(str, parts)))
        return 0
    reports, n = collect_build(jobs, parts, args.out)
    for r in reports:
        print(format_report(r))
    print(f"merged {n} ESC-Pro records into {args.out}")
    return 0


# ---------------------------------------------------------------- eval
def cmd_eval_score(args, extra) -> int:
    from cso_dist.data.strategies import load_strategy_set
    from cso_dist.eval.report import format_scores, score_file

    scores = score_file(Path(args.pred), load_strategy_set(args.strategies))
    if args.json:
        keys = ("Q", "W", "B", "accuracy", "per_strategy", "unknown", "n", "bt_undetermined", "text")
        print(json.dumps({k: scores[k] for k in keys if k in scores}, indent=2))
    else:
        print(format_scores(scores))
    return 0


def cmd_eval_generate(args, extra) -> int:
    from cso_dist.eval.generate import run_generate

    cfg = _config(args, extra, "training")
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / "eval" / f"pred-{args.split}-{cfg.eval.mode}.jsonl"
    run_generate(cfg, args.split, out, cfg.eval.mode, args.data or "")
    return 0


def cmd_eval_report(args, extra) -> int:
    from cso_dist.data.strategies import load_strategy_set
    from cso_dist.eval.report import run_report

    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
    print(f"report: {run_report([Path(r) for r in args.runs], out, load_strategy_set(args.strategies))}")
    return 0


# ---------------------------------------------------------------- demo (the main job)
def cmd_demo(args, extra) -> int:
    from cso_dist.demo import run_demo

    run_demo(_config(args, extra, "all"))
    return 0


def cmd_plan(args, extra) -> int:
    import dataclasses

    from cso_dist.plan import Setup, cheapest, format_plan, plan, resolve_shape, setup_from_config

    if config_path(args) or extra:
        shape, setup = setup_from_config(_config(args, extra, "plan"))
    elif args.model:
        shape, setup = resolve_shape(args.model), Setup()
        if args.method in ("lora", "qlora") and args.zero is None:
            setup.zero = 0 if args.method == "qlora" else 3
    else:
        raise CsoError("plan: give --model (7b, 8b, 9b, 13b, 34b, 70b or an HF config.json) or --config RECIPE.yaml")
    if args.model and (config_path(args) or extra):
        shape = resolve_shape(args.model)
    flags = {"method": args.method, "zero": args.zero, "offload": args.offload, "gpus_per_node": args.gpus_per_node,
             "nodes": args.nodes, "gpu_mem_gb": args.gpu_mem, "cpu_mem_gb": args.cpu_mem, "seq_len": args.seq_len,
             "micro_batch": args.micro_batch, "checkpointing": args.checkpointing, "lora_r": args.lora_r}
    setup = dataclasses.replace(setup, **{k: v for k, v in flags.items() if v is not None})
    if setup.method == "qlora" and args.zero is None:
        setup.zero = 0
    p = plan(shape, setup)
    best, here = cheapest(shape, setup), cheapest(shape, setup, same_gpus=True)
    if args.json:
        print(json.dumps({**p, "cheapest": best, "fastest_on_these_gpus": here}))
    else:
        print(format_plan(p, best, here))
    return 0


def cmd_config_show(args, extra) -> int:
    import yaml

    print(yaml.safe_dump(_config(args, extra, "all").to_dict(), sort_keys=False), end="")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cso-dist", description="Chain-of-Strategy Optimization (CSO) toolkit. "
                                "Every command that reads a config takes it as CONFIG or --config CONFIG, plus dotted "
                                "overrides (--data.seed 1).")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, inspect and export preference data").add_subparsers(
        dest="data_command", required=True)
    b = data.add_parser("build", help="any source -> preference dialogues (JSONL)")
    add_flags(b, "data", rename={"source": "from"})
    b.add_argument("--out", required=True)
    add_config_arg(b)
    b.set_defaults(func=cmd_data_build)

    s = data.add_parser("stats", help="statistics of a preference-dialogue file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.add_argument("--tokenizer", help="model/tokenizer folder: add token-length statistics")
    add_flags(s, "data", ["chat_template", "max_length", "strategies"])
    add_config_arg(s, "YAML config (its data section: chat template, max length, strategies)")
    s.set_defaults(func=cmd_data_stats)

    x = data.add_parser("pairs", help="export flat DPO/KTO rows in the CSO authors' format")
    x.add_argument("file")
    x.add_argument("--format", required=True, choices=("dpo", "kto"))
    x.add_argument("--out", required=True)
    x.add_argument("--strategies")
    x.set_defaults(func=cmd_data_pairs)

    f = data.add_parser("fetch", help="download a dataset from the Hugging Face Hub (online only)")
    f.add_argument("dataset", choices=("esconv",))
    f.add_argument("--dest", help="data dir (default $CSO_DATA_DIR, else ~/.cache/cso_dist/data)")
    f.set_defaults(func=cmd_data_fetch)

    t = sub.add_parser("tiny-model", help="write a small random model + real tokenizer for tests and demos")
    t.add_argument("--arch", required=True, choices=("qwen2", "llama"))
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", default="qwen", choices=("qwen", "bpe"),
                   help="qwen: the real Qwen2.5 vocabulary; bpe: a small BPE trained on --bpe-data")
    t.add_argument("--bpe-data", help="ESConv-style JSONL to train the BPE on (default ESConv train)")
    t.add_argument("--template", choices=("chatml", "llama3", "gemma2"),
                   help="chat template (default chatml for qwen2, llama3 for llama)")
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_tiny_model)

    pc = sub.add_parser("precompute", help="reference log-probs of every reply, once (content-addressed cache)")
    add_config_arg(pc)
    pc.add_argument("--dry-run", action="store_true",
                    help="check the config and its inputs and print what would be computed; load no model")
    pc.set_defaults(func=cmd_precompute)

    ce = sub.add_parser("cache", help="inspect reference caches").add_subparsers(dest="cache_command", required=True)
    cx = ce.add_parser("export", help="one row per DPO pair, in the order of `data pairs --format dpo`")
    cx.add_argument("cache")
    cx.add_argument("--out", required=True)
    cx.set_defaults(func=cmd_cache_export)

    tr = sub.add_parser("train", help="train with sft, dpo, ipo, simpo, kto or orpo")
    add_config_arg(tr)
    tr.add_argument("--dry-run", action="store_true",
                    help="check the config and its inputs and print what would run; load no model")
    tr.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    tr.add_argument("--auto-resume", action="store_true",
                    help="continue from the latest checkpoint when there is one, else start (requeued jobs)")
    tr.set_defaults(func=cmd_train)

    la = sub.add_parser("launch", help="run on Slurm: a rendered sbatch script, or submitit runs and sweeps")
    lsub = la.add_subparsers(dest="launch_command", required=True)
    for name, helptext in (("sbatch", "render a slurm/ template to <run>/slurm/*.sbatch and submit it"),
                           ("submitit", "submit a run or a sweep (job array) with submitit and collect the results")):
        lp = lsub.add_parser(name, help=helptext)
        add_config_arg(lp)
        add_flags(lp, "slurm", ["nodes", "gpus_per_node", "partition", "account", "qos", "time_min", "cpus_per_task",
                                "mem_gb"], rename={"time_min": "time"})
        lp.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                        help="grid axis (repeat): every combination is one run, as a job array")
        if name == "sbatch":
            lp.add_argument("--template", choices=["train", "qlora", "precompute", "sweep"],
                            help="default: train (sweep with --sweep)")
            lp.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
            lp.set_defaults(func=cmd_launch_sbatch)
        else:
            lp.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm",
                            help="local/debug: run here through the same code path")
            lp.add_argument("--no-wait", action="store_true", help="submit and return; do not collect")
            lp.set_defaults(func=cmd_launch_submitit)

    ev = sub.add_parser("eval", help="strategy metrics (Q/W/B), generation, reports")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    es = esub.add_parser("score", help="Q, W, B, accuracy, per-strategy F1 and strengths of a PRED.jsonl")
    es.add_argument("pred", help="JSONL rows with gold_strategy, pred_strategy (+ gold_response, pred_response)")
    es.add_argument("--strategies", default="esconv", help="esconv, escpro or a strategy file")
    es.add_argument("--json", action="store_true", help="one JSON object (Q, W, B, accuracy, per_strategy, unknown)")
    es.set_defaults(func=cmd_eval_score)
    eg = esub.add_parser("generate", help="predict the strategy at every supporter turn of a split -> PRED.jsonl")
    add_config_arg(eg, "YAML config (model.path = the model to evaluate)")
    eg.add_argument("--split", default="test", help="ESConv split (default test)")
    eg.add_argument("--data", help="preference dialogues JSONL instead of an ESConv split")
    add_flags(eg, "eval", ["mode"])
    eg.add_argument("--out", help="default <run.out_dir>/eval/pred-<split>-<mode>.jsonl (appended, resumable)")
    eg.set_defaults(func=cmd_eval_generate)
    er = esub.add_parser("report", help="report.md + plots for one or several runs side by side")
    er.add_argument("runs", nargs="+", help="run folders (their eval/pred-*.jsonl and metrics.jsonl)")
    er.add_argument("--out", help="output folder (default <first run>/report)")
    er.add_argument("--strategies", default="esconv")
    er.set_defaults(func=cmd_eval_report)

    ex = sub.add_parser("export", help="a checkpoint (torch or DeepSpeed ZeRO shards) or a run's latest one -> "
                                       "an HF save_pretrained folder")
    ex.add_argument("checkpoint", help="<run>/checkpoints/step-NNNNNNN, or a run folder (its latest checkpoint)")
    ex.add_argument("--out", required=True, help="output folder (written atomically)")
    ex.add_argument("--final", choices=["merged", "adapter"], help="LoRA: merge into the base or save the adapter "
                                                                   "alone (default: the run's train.final)")
    ex.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="the main job: ESConv -> preference data -> statistics (CPU)")
    add_config_arg(d)
    d.set_defaults(func=cmd_demo)

    mc = sub.add_parser("mcts", help="build ESC-Pro-format preference data by MCTS over strategies (CSO stage 1)"
                        ).add_subparsers(dest="mcts_command", required=True)
    mb = mc.add_parser("build", help="search every seed dialogue's strategy tree -> ESC-Pro JSON (resumable)")
    ms = mc.add_parser("submit", help="the same build split across a Slurm job array (submitit), then merged")
    for q in (mb, ms):
        add_config_arg(q)
        q.add_argument("--seeds", required=True, help="ESConv JSONL, ExTES JSON or ESC-Pro records (gold dialogues)")
        q.add_argument("--out", required=True, help="ESC-Pro JSON to write (work files beside it: OUT.work/)")
        add_flags(q, "mcts", ["backend", "model", "base_url", "workers", "max_seeds", "prompts"])
    mb.add_argument("--shard", default="0/1", help="I/N: build every N-th seed from the I-th (array task)")
    mb.set_defaults(func=cmd_mcts_build)
    ms.add_argument("--tasks", type=int, required=True, help="array tasks (seeds are dealt round-robin)")
    ms.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"])
    ms.add_argument("--no-wait", action="store_true")
    ms.set_defaults(func=cmd_mcts_submit)
    mm = mc.add_parser("merge", help="join shard outputs into one ESC-Pro file")
    mm.add_argument("parts", nargs="+")
    mm.add_argument("--out", required=True)
    mm.set_defaults(func=cmd_mcts_merge)
    md = mc.add_parser("draw", help="a tree checkpoint (OUT.work/trees/SEED.json) -> PNG")
    md.add_argument("tree")
    md.add_argument("--out", required=True)
    md.add_argument("--max-depth", type=int, default=0)
    md.set_defaults(func=cmd_mcts_draw)

    pl = sub.add_parser("plan", help="per-GPU memory of a job (parameters, gradients, optimizer, activations) "
                                     "and the cheapest setup that fits")
    add_config_arg(pl, "a recipe (its plan, model, dist, slurm and pack sections)")
    pl.add_argument("--model", help="7b, 8b, 9b, 13b, 34b, 70b, or an HF config.json (or its folder)")
    pl.add_argument("--method", choices=["full", "lora", "qlora"])
    pl.add_argument("--zero", type=int, choices=[0, 2, 3], help="DeepSpeed ZeRO stage (0 = torch engine, DDP)")
    pl.add_argument("--offload", choices=["none", "optimizer", "params"],
                    help="DeepSpeed CPU offload (params = parameters and optimizer, ZeRO-3)")
    pl.add_argument("--gpus-per-node", type=int)
    pl.add_argument("--nodes", type=int)
    pl.add_argument("--gpu-mem", type=float, help="GB of one GPU (default 80)")
    pl.add_argument("--cpu-mem", type=float, help="GB of host memory per node, for CPU offload (default 1024)")
    pl.add_argument("--seq-len", type=int, help="tokens of one packed row (pack.max_tokens; default 4096)")
    pl.add_argument("--micro-batch", type=int, help="packed rows per forward (default 1)")
    pl.add_argument("--lora-r", type=int)
    ck = pl.add_mutually_exclusive_group()
    ck.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None)
    ck.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    pl.add_argument("--json", action="store_true", help="one JSON object")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("config", help="show the resolved config").add_subparsers(dest="config_command", required=True)
    cs = c.add_parser("show")
    add_config_arg(cs)
    cs.set_defaults(func=cmd_config_show)
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull dotted config overrides (`--train.lr 1e-6`, `--run.out_dir=x`) out of argv before argparse,
    so their values are never mistaken for positional arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            take = 1 if "=" in a else 2
            overrides.extend(argv[i:i + take])
            i += take
        else:
            rest.append(a)
            i += 1
    return rest, overrides


def _launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N: take it into LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, overrides = split_overrides(_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    args, extra = parser.parse_known_args(rest)
    extra = extra + overrides
    try:
        return args.func(args, extra)
    except Preempted as e:
        print(f"cso-dist: {e}", file=sys.stderr)
        return Preempted.exit_code
    except CsoError as e:
        print(f"cso-dist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cso-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
