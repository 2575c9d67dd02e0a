"""What each `cso-dist` command does (cso_dist.cli parses the command line and calls these).

Imports of the pipeline stay inside the commands: `cso-dist data build` must not pay for torch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cso_dist.config import Config, load_config, parse_overrides
from cso_dist.config.flags import flag_overrides
from cso_dist.util.errors import ConfigError, CsoError


def config_path(args: argparse.Namespace) -> str | None:
    pos, flag = getattr(args, "config", None), getattr(args, "config_flag", None)
    if pos and flag and Path(pos) != Path(flag):
        raise CsoError(f"two configs given: {pos} (positional) and --config {flag}; give one")
    return pos or flag


def no_extra(extra: list[str], command: str) -> None:
    """A command that reads no config refuses what it does not understand (never ignores it)."""
    if extra:
        raise ConfigError(f"{command}: unrecognized arguments: {' '.join(extra)}")


def _config(args: argparse.Namespace, extra: list[str], family: str) -> Config:
    """Config file + dotted overrides + the command's generated flags (flags.add_flags; flags win), for the
    sections of the command's family (config.FAMILIES)."""
    return load_config(config_path(args), {**parse_overrides(extra), **flag_overrides(args)}, family)


def not_an_input(out: str, *inputs: str) -> None:
    """--out must not replace an input of the same command: the same file, by any path to it (a link, another
    spelling: the same inode)."""
    for i in inputs:
        if i and Path(i).exists() and Path(out).exists() and os.path.samefile(out, i):
            raise CsoError(f"--out {out} is this command's input {i}; write to another file")


def _first_row(path: Path) -> dict | None:
    """The first record of a JSON Lines file when it is an object, else None (what kind of file it is; a file that
    is not JSON Lines at all is no command's output here)."""
    from cso_dist.util.io import read_jsonl

    try:
        _, row = next(iter(read_jsonl(path, "an output file")), (0, None))
    except CsoError:
        return None
    return row if isinstance(row, dict) else None


def jsonl_of(*keys: str):
    """An existing output is this command's own when its first row holds `keys` (an empty file is anyone's)."""

    def own(path: Path) -> bool:
        if path.is_file() and path.stat().st_size == 0:
            return True
        row = _first_row(path) if path.is_file() else None
        return row is not None and all(k in row for k in keys)

    return own


def json_list(path: Path) -> bool:
    """An ESC-Pro file (a JSON list of records) as the MCTS commands write it."""
    try:
        return path.is_file() and path.read_text(encoding="utf-8", errors="replace").lstrip()[:1] in ("[", "")
    except OSError:
        return False


def folder_of(*names: str):
    """An existing output folder is this command's own when it is empty or holds one of `names`."""
    return lambda path: path.is_dir() and (not any(path.iterdir()) or any((path / n).exists() for n in names))


def own_output(out: str | Path, own, what: str) -> Path:
    """A user-named output that exists is replaced only when it is this command's own kind of file (`own`), so no
    command cuts or deletes a file it did not write; checked before anything is opened for writing."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not own(out):
            kind = "a link" if out.is_symlink() else "a folder" if out.is_dir() else "a file"
            raise CsoError(f"--out {out}: exists and is {kind} that is not {what}; give another path or remove it")
    return out


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
    from cso_dist.data.build import preference_dialogues
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.data.stats import dialogue_stats

    cfg = _config(args, extra, "data")
    t0 = time.time()
    own_output(args.out, jsonl_of("id", "messages"), "a preference-dialogue file")
    not_an_input(args.out, cfg.data.input)
    dialogues, report = preference_dialogues(cfg)
    not_an_input(args.out, report.input)
    n = write_dialogues(args.out, dialogues)
    stats = dialogue_stats(dialogues)
    print(
        f"wrote {n} preference dialogues to {args.out} ({time.time() - t0:.1f} s) from {report.input} "
        f"(strategy set: {report.strategy_set})"
    )
    print(
        f"  turns: {stats['turns']}  pairs: {stats['pairs']}  turns without negatives: "
        f"{stats['turns_without_negatives']}  context-only turns: {stats['context_only_turns']}"
    )
    for k, v in report.notes.items():
        if k == "strategy_sides":
            print(
                "  strategy: chosen / rejected: "
                + ", ".join(f"{s} {c['chosen']}/{c['rejected']}" for s, c in v.items())
            )
        elif k != "input":
            print(f"  {k}: {v}")
    if report.skipped:
        print(f"skipped {sum(report.skipped.values())} invalid records (--skip-invalid):")
        for reason, count in report.skipped.items():
            print(f"  {reason}: {count}  e.g. {report.skipped_examples[reason]}")
    return 0


def cmd_data_stats(args, extra) -> int:
    from cso_dist.data.dialogue import read_dialogues
    from cso_dist.data.stats import dialogue_stats
    from cso_dist.data.strategies import resolve_strategy_set

    cfg = _config(args, extra, "data")
    spec = cfg.data.strategies
    dialogues = read_dialogues(args.file, None if spec == "auto" else resolve_strategy_set(spec, None))
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
    from cso_dist.util.io import write_jsonl
    from cso_dist.data.export import PAIRED, pair_rows
    from cso_dist.data.strategies import resolve_strategy_set

    not_an_input(args.out, args.file)
    own_output(args.out, jsonl_of("messages"), "a file of pair rows")
    sset = resolve_strategy_set(args.strategies or "auto", None)
    dialogues = read_dialogues(args.file, None if args.strategies in (None, "auto") else sset)
    if args.strategies in (None, "auto"):
        sset = resolve_strategy_set("auto", dialogues[0].strategy_set)
    rows = list(pair_rows(dialogues, sset, args.format))
    if not rows:
        kind = "a non-preferred reply" if PAIRED[args.format] else "a supporter turn"
        raise CsoError(f"data pairs: {args.file}: no turn has {kind}: no {args.format.upper()} row to write")
    n = write_jsonl(args.out, rows)
    print(f"wrote {n} {args.format.upper()} rows to {args.out}")
    return 0


def cmd_data_fetch(args, extra) -> int:
    from cso_dist.data.fetch import fetch_esconv
    from cso_dist.util.paths import user_data_dir

    no_extra(extra, "data fetch")
    dest = Path(args.dest) if args.dest else user_data_dir()
    for p in fetch_esconv(dest):
        print(f"wrote {p}")
    return 0


# ---------------------------------------------------------------- models
def cmd_tiny_model(args, extra) -> int:
    from cso_dist.models import build_tiny_model

    no_extra(extra, "tiny-model")
    texts = None
    if args.tokenizer == "bpe":
        from cso_dist.data.esconv import esconv_texts

        texts = esconv_texts(args.bpe_data)
    out = build_tiny_model(
        args.arch,
        args.out,
        tokenizer=args.tokenizer,
        template=args.template,
        bpe_texts=texts,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"wrote tiny {args.arch} model ({args.tokenizer} tokenizer) to {out}")
    return 0


def cmd_model_download(args, extra) -> int:
    from cso_dist.models import hub

    no_extra(extra, "model download")
    snap = hub.download(args.id, args.revision, key="model download", complete=True)
    print(f"{args.id}: {snap}")
    return 0


def cmd_model_import(args, extra) -> int:
    from cso_dist.models.gguf import import_gguf

    no_extra(extra, "model import")
    print(f"model folder: {import_gguf(args.gguf, args.out, overwrite=args.overwrite)}")
    return 0


def cmd_model_fetch(args, extra) -> int:
    from cso_dist.models.gguf import fetch_model

    no_extra(extra, "model fetch")
    print(f"model folder: {fetch_model(args.name, args.dest)}")
    return 0


# ---------------------------------------------------------------- precompute / train
def cmd_precompute(args, extra) -> int:
    from cso_dist.engines.dist import world_from_env
    from cso_dist.refcache import run_precompute

    cfg = _config(args, extra, "training")
    if args.dry_run:
        from cso_dist.train.preflight import print_dry_run

        return print_dry_run(cfg, "precompute")
    world = world_from_env()  # under torchrun / srun: this rank computes its own shards
    root = run_precompute(cfg)
    print(f"reference cache {'ready' if world.world_size == 1 else f'shards of rank {world.rank} ready'}: {root}")
    return 0


def cmd_cache_export(args, extra) -> int:
    from cso_dist.refcache import export_cache

    not_an_input(args.out, args.cache)
    own_output(args.out, jsonl_of("pair_id", "chosen_logp"), "an exported reference cache")
    n = export_cache(args.cache, args.out)
    print(f"wrote {n} pair rows to {args.out}")
    return 0


def cmd_train(args, extra) -> int:
    from cso_dist.train.loop import run_train

    cfg = _config(args, extra, "training")
    if args.dry_run:
        from cso_dist.train.preflight import print_dry_run

        return print_dry_run(cfg, "train")
    summary = run_train(cfg, resume="auto" if args.auto_resume else args.resume, overwrite=args.overwrite)
    if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    keys = ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies", "pairs_per_s")
    print("final: " + "  ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary))
    print(f"model written to {summary['final']}")
    return 0


def cmd_export(args, extra) -> int:
    from cso_dist.train.export import export_checkpoint

    own_output(args.out, folder_of("config.json", "adapter_config.json"), "a model folder")
    export_checkpoint(Path(args.checkpoint), Path(args.out), args.final)
    return 0


# ---------------------------------------------------------------- launch (Slurm / submitit)


def cmd_launch_sbatch(args, extra) -> int:
    from cso_dist.launch import sweep_points
    from cso_dist.launch.sbatch import submit, write_job

    cfg = _config(args, extra, "launch")
    template = args.template or ("sweep" if args.sweep else "train")
    sweep = None
    if template == "sweep":  # every point loaded as its array task will load it, before anything is written
        sweep = [[f"--{k}={v}" for k, v in over.items()] for _, over, _ in sweep_points(cfg, args.sweep or [])]
    elif args.sweep:
        raise CsoError("launch sbatch: --sweep goes with --template sweep")
    # the job's own paths: a relative --data / --out is taken from here, not from the job's working folder
    given = {k: getattr(args, k) for k in ("split", "data", "out") if getattr(args, k)}
    eval_args = [f"--{k}={Path(v).resolve() if k != 'split' else v}" for k, v in given.items()]
    if eval_args and template != "eval":
        raise CsoError(f"launch sbatch: {eval_args[0].split('=')[0]} goes with --template eval")
    script = write_job(cfg, template, eval_args, sweep=sweep)
    if args.dry_run:
        print(script.read_text())
        print(f"# written to {script} (not submitted: --dry-run)")
        return 0
    job = submit(script)
    print(f"submitted job {job}: {script}")
    print(f"logs: {Path(cfg.run.out_dir).resolve() / 'slurm'}")
    return 0


def cmd_launch_submitit(args, extra) -> int:
    from cso_dist.launch import collect, submit_run, submit_sweep, table
    from cso_dist.launch.jobs import write_results

    cfg = _config(args, extra, "launch")
    if args.dry_run:
        return _submitit_dry_run(cfg, args)
    if args.sweep:
        runs = submit_sweep(cfg, args.sweep, args.cluster, verbose=True)
        done = [r.name for r in runs if r.job is None]
        if done:
            print(f"finished before (not submitted): {', '.join(done)}")
    else:
        runs = [submit_run(cfg, args.cluster)]
        print(f"submitted {runs[0].name}: job {runs[0].job.job_id} -> {runs[0].cfg.run.out_dir}")
    if args.no_wait:
        return 0
    rows = collect(runs)
    print(table(rows))
    if args.sweep:
        print(f"results: {write_results(Path(cfg.run.out_dir), rows)}")
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


def _submitit_dry_run(cfg, args) -> int:
    """What `launch submitit` would submit (each run, its folder and resources); nothing is submitted or written."""
    from cso_dist.launch.jobs import TrainJob, sweep_points

    items = [(n, c) for n, _, c in sweep_points(cfg, args.sweep)] if args.sweep else [(Path(cfg.run.out_dir).name, cfg)]
    s, todo = cfg.slurm, 0
    for name, c in items:
        done = TrainJob().finished(c) is not None
        todo += not done
        print(f"{'finished before' if done else 'would submit'}: {name} -> {c.run.out_dir}")
    print(
        f"each job: {s.nodes} node(s) x {max(s.gpus_per_node, 1)} task(s), {s.gpus_per_node} GPU(s) per node, "
        f"{s.time_min} min, partition {s.partition or '(default)'}, cluster {args.cluster}"
    )
    print(f"launch submitit --dry-run: {todo} of {len(items)} run(s) would be submitted (nothing submitted)")
    return 0


# ---------------------------------------------------------------- mcts (ESC-Pro builder)


def cmd_mcts_build(args, extra) -> int:
    from cso_dist.mcts.build import build, format_report, parse_shard

    cfg = _config(args, extra, "mcts")
    not_an_input(args.out, args.seeds)
    own_output(args.out, json_list, "an ESC-Pro file")
    r = build(cfg, args.seeds, args.out, parse_shard(args.shard))
    print(format_report(r))
    return 0


def cmd_mcts_merge(args, extra) -> int:
    from cso_dist.mcts.build import merge

    not_an_input(args.out, *args.parts)
    own_output(args.out, json_list, "an ESC-Pro file")
    print(f"wrote {merge(args.parts, args.out)} ESC-Pro records to {args.out}")
    return 0


def cmd_mcts_draw(args, extra) -> int:
    from cso_dist.mcts.draw import draw_tree

    own_output(args.out, lambda p: p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "a PNG picture")
    print(f"wrote {draw_tree(args.tree, args.out, args.max_depth)}")
    return 0


def cmd_mcts_submit(args, extra) -> int:
    from cso_dist.mcts.build import format_report
    from cso_dist.launch.mcts_build import collect_build, submit_build

    cfg = _config(args, extra, "mcts")
    not_an_input(args.out, args.seeds)
    own_output(args.out, json_list, "an ESC-Pro file")
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
    from cso_dist.eval.score import format_scores, score_file

    scores = score_file(Path(args.pred), load_strategy_set(args.strategies))
    if args.json:
        keys = ("Q", "W", "B", "accuracy", "per_strategy", "unknown", "n", "bt_undetermined", "text")
        keys += ("first_token", "calibrated")  # likelihood mode's other picks, where the rows have them
        print(json.dumps({k: scores[k] for k in keys if k in scores}, indent=2))
    else:
        print(format_scores(scores))
    return 0


def cmd_eval_generate(args, extra) -> int:
    from cso_dist.eval.generate import run_generate

    cfg = _config(args, extra, "training")
    name = Path(args.data).stem if args.data else args.split  # a data file's rows are named after the file
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / "eval" / f"pred-{name}-{cfg.eval.mode}.jsonl"
    not_an_input(str(out), args.data or "")
    own_output(out, jsonl_of("id", "pred_strategy"), "a PRED file")
    run_generate(cfg, args.split, out, cfg.eval.mode, args.data or "")
    return 0


def cmd_eval_report(args, extra) -> int:
    from cso_dist.data.strategies import load_strategy_set
    from cso_dist.eval.report import run_report

    out = own_output(Path(args.out) if args.out else Path(args.runs[0]) / "report", folder_of("report.md"), "a report")
    groups = {}
    for g in args.group or []:
        name, sep, runs = g.partition("=")
        if not sep or not name or not runs:
            raise CsoError(f"--group {g!r}: expected NAME=RUN1,RUN2")
        groups[name] = [Path(r) for r in runs.split(",") if r]
    report = run_report([Path(r) for r in args.runs], out, load_strategy_set(args.strategies), groups or None)
    print(f"report: {report}")
    return 0


# ---------------------------------------------------------------- study (SFT vs every loss, over seeds)
def cmd_study(args, extra) -> int:
    from cso_dist.study.run import run_study

    run_study(_config(args, extra, "study"), until=args.until)
    return 0


# ---------------------------------------------------------------- demo (the main job)
def cmd_demo(args, extra) -> int:
    from cso_dist.study.demo import run_demo

    run_demo(_config(args, extra, "study"))
    return 0


def cmd_plan(args, extra) -> int:
    import dataclasses
    import sys

    from cso_dist.plan import GIB, PRESETS, Setup, all_fit, cheapest, format_plan, format_stages, host_budget, plan
    from cso_dist.plan import resolve_shape, setup_from_config, stages

    if args.method:
        print("cso-dist: note: plan --method is now --finetune", file=sys.stderr)
    finetune = args.finetune or args.method
    serve_name = args.model if args.model and args.model.lower() not in PRESETS else "MODEL"  # for vllm serve
    if config_path(args) or extra:
        cfg = _config(args, extra, "plan")
        shape, setup = setup_from_config(cfg)
        serve_name = cfg.model.path or serve_name
    elif args.model:
        shape, setup = resolve_shape(args.model), Setup()
        if finetune == "lora" and args.zero is None:  # (qlora: ZeRO 0, below)
            setup.zero = 3
    else:
        raise CsoError("plan: give --model (7b, 8b, 9b, 13b, 34b, 70b or an HF config.json) or --config RECIPE.yaml")
    if args.model and (config_path(args) or extra):
        shape = resolve_shape(args.model)
    flags = {
        "finetune": finetune,
        "zero": args.zero,
        "offload": args.offload,
        "gpus_per_node": args.gpus_per_node,
        "nodes": args.nodes,
        "gpu_mem_gb": args.gpu_mem,
        "cpu_mem_gb": args.cpu_mem,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "checkpointing": args.checkpointing,
        "lora_r": args.lora_r,
        "attention": args.attention,
        "tree_keys": args.tree_keys,
        "tree_mask": args.tree_mask,
        "max_length": args.max_length,
        "eval_batch": args.eval_batch,
    }
    setup = dataclasses.replace(setup, **{k: v for k, v in flags.items() if v is not None})
    if setup.finetune == "qlora" and args.zero is None:
        setup.zero = 0
    p = plan(shape, setup)
    best, here = cheapest(shape, setup), cheapest(shape, setup, same_gpus=True)
    st = stages(shape, setup, serve_name, train=p)
    if args.json:
        print(json.dumps({**p, "cheapest": best, "fastest_on_these_gpus": here, "stages": st, "all_fit": all_fit(st)}))
    else:
        print(format_plan(p, best, here))
        print("\n" + "\n".join(format_stages(st, p["budget_gib"], host_budget(setup) / GIB)))
    return 0


def cmd_config_reference(args, extra) -> int:
    from cso_dist.config.reference import reference_markdown
    from cso_dist.util.io import atomic_write_text

    no_extra(extra, "config reference")
    text = reference_markdown()
    if args.out:
        own_output(
            args.out, lambda p: p.is_file() and p.read_bytes().startswith(text.encode()[:40]), "a config reference"
        )
        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_config_show(args, extra) -> int:
    import yaml

    print(yaml.safe_dump(_config(args, extra, "all").to_dict(), sort_keys=False), end="")
    return 0
