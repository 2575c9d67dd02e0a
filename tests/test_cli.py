"""The `cso-dist` commands end to end, as a user runs them (real ESConv, real tokenizers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli, training_pairs

from cso_dist.data.dialogue import read_dialogues


def test_build_stats_pairs_roundtrip(tmp_path, esconv_dir):
    out = tmp_path / "test.jsonl"
    run_cli(
        "data",
        "build",
        "--from",
        "esconv",
        "--input",
        esconv_dir,
        "--split",
        "test",
        "--negatives",
        "2",
        "--seed",
        "3",
        "--out",
        out,
        check=True,
    )
    stats = json.loads(run_cli("data", "stats", out, "--json", check=True).stdout)
    assert {"dialogues", "turns", "pairs", "strategies"} <= stats.keys()
    assert stats["dialogues"] == 195 and stats["pairs"] == 2 * stats["turns"]
    assert sum(stats["strategies"].values()) == stats["turns"]

    proc = run_cli("data", "pairs", out, "--format", "kto", "--out", tmp_path / "kto.jsonl", check=True)
    rows = [json.loads(line) for line in open(tmp_path / "kto.jsonl")]
    assert f"wrote {len(rows)} KTO rows" in proc.stdout
    assert rows[0]["messages"][0]["role"] == "system" and rows[0]["messages"][-1]["role"] == "assistant"
    run_cli(
        "data",
        "build",
        "--from",
        "kto-rows",
        "--input",
        tmp_path / "kto.jsonl",
        "--out",
        tmp_path / "back.jsonl",
        check=True,
    )
    back = json.loads(run_cli("data", "stats", tmp_path / "back.jsonl", "--json", check=True).stdout)
    # identical openings of different dialogues merge into one shared turn; KTO rows pair by history, so every
    # pair comes back, and at a history several dialogues share (80 open with the supporter: the system prompt
    # alone) each preferred reply meets every negative of that history -- but never itself
    assert back["turns"] + back["context_only_turns"] == stats["turns"]
    assert back["turns"] >= stats["turns"] - 20 and back["turns_without_negatives"] == 0
    assert sum(r["label"] for r in rows) == back["turns"]  # one true row per distinct (history, reply)
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)  # each distinct row once
    want, got = training_pairs(read_dialogues(out)), training_pairs(read_dialogues(tmp_path / "back.jsonl"))
    preferred = {(h, c) for h, c, _ in want}
    assert {x for x in want if (x[0], x[2]) not in preferred} <= got and all(c != r for _, c, r in got)

    run_cli("data", "pairs", out, "--format", "dpo", "--out", tmp_path / "dpo.jsonl", check=True)
    dpo = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert {"messages", "chosen", "reject"} <= dpo[0].keys()
    assert len(dpo) <= stats["pairs"] and len({json.dumps(r, sort_keys=True) for r in dpo}) == len(dpo)


@pytest.mark.slow
def test_tiny_model_command_and_token_stats(tmp_path, esconv_dir):
    model = tmp_path / "tiny-llama"
    proc = run_cli("tiny-model", "--arch", "llama", "--tokenizer", "bpe", "--out", model, check=True)
    assert "wrote tiny llama model" in proc.stdout
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    again = run_cli("tiny-model", "--arch", "llama", "--tokenizer", "bpe", "--out", model)
    assert again.returncode != 0 and "Traceback" not in again.stderr  # refuses to overwrite
    out = tmp_path / "valid.jsonl"
    run_cli("data", "build", "--from", "esconv", "--split", "valid", "--out", out, check=True)
    stats = json.loads(
        run_cli("data", "stats", out, "--json", "--tokenizer", model, "--max-length", "1024", check=True).stdout
    )
    tok = stats["tokens"]
    assert tok["max_length"] == 1024 and tok["truncated_turns"] > 0
    assert tok["max_history_tokens"] + tok["mean_chosen_tokens"] <= 1024 + 400
    assert tok["per_pair_tokens"] > 10 * tok["dialogue_tokens_with_branches"]


@pytest.mark.slow
def test_demo_main_job(tmp_path, esconv_dir):
    """The README's main command end to end, the same path on a tiny random model (the real model's runs are
    tests/test_real_model.py; the full demo takes ~16 min): data -> model -> SFT (LoRA) -> precompute -> DPO
    -> base, SFT and DPO evaluated side by side -> report."""
    proc = run_cli(
        "demo",
        "--config",
        REPO / "configs" / "demo.yaml",
        "--study.model",
        "tiny",
        "--tiny_model.tokenizer",
        "bpe",
        "--run.out_dir",
        tmp_path / "demo",
        "--data.negatives",
        "1",
        "--data.max_length",
        "512",
        "--study.train_dialogues",
        "6",
        "--study.eval_dialogues",
        "1",
        "--study.test_dialogues",
        "2",
        "--study.generate_dialogues",
        "1",
        "--eval.max_new_tokens",
        "12",
        check=True,
    )
    stats = json.loads((tmp_path / "demo" / "data" / "stats.json").read_text())
    assert [stats[s]["dialogues"] for s in ("train", "valid", "test")] == [910, 195, 195]
    assert stats["train"]["pairs"] == stats["train"]["turns"] == 10679
    assert stats["train"]["tokens"]["dialogues"] == 6 and stats["train"]["tokens"]["mean_history_tokens"] > 100
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["stages"]) == {"sft", "dpo"} and summary["stages"]["dpo"]["steps"] > 0
    assert set(summary["scores"]) == {"base", "sft", "dpo"}
    for scores in summary["scores"].values():
        assert scores["likelihood"]["n"] > 10 and scores["generate"]["n"] > 3
    assert (tmp_path / "demo" / "dpo" / "final" / "config.json").is_file()
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    assert "| base |" in proc.stdout and "| dpo |" in proc.stdout and "demo finished" in proc.stdout
    assert "beat SFT on both Q" in proc.stdout  # the verdict, whichever way it goes


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    blocks = readme.split("```")
    first = blocks[1].strip().splitlines()[1:]  # after the language tag
    cmds = [line.split("#")[0].strip() for line in first if line.strip()]
    assert cmds == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if Path(f).name in ("train.jsonl", "valid.jsonl", "test.jsonl")], (
        "no dataset text is committed"
    )


def test_user_facing_text_points_only_inside_the_repository():
    """A user's clone has no ../shared: the README, docs, configs, templates and scripts never send them there."""
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "README.md",
            "docs",
            "configs",
            "cso_dist/launch/templates",
            "scripts",
            "cso_dist/engines/ds_configs",
            "Makefile",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    untracked_docs = [str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")]
    offenders = [
        f
        for f in set(tracked + untracked_docs)
        if (REPO / f).is_file()
        and ("../shared" in (REPO / f).read_text() or "shared/recipes" in (REPO / f).read_text())
    ]
    assert not offenders, offenders
    assert (REPO / "docs" / "method.md").is_file()


def test_progress_in_a_log_is_lines_and_a_short_stage_prints_nothing():
    """Not a terminal (a Slurm log): a line every every_s seconds and a last one at the end; a stage shorter
    than every_s prints nothing."""
    import io

    from cso_dist.util.progress import ProgressLines

    out = io.StringIO()
    with ProgressLines(total=4, desc="dpo", unit="step", out=out) as bar:
        for _ in range(4):
            bar.update(1)
    assert out.getvalue() == ""
    out = io.StringIO()
    bar = ProgressLines(range(3), desc="scoring", unit="turn", every_s=0.0, out=out)
    bar.set_postfix(loss="0.69")
    assert list(bar) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("scoring: 1/3 turn (33%) in ") and "loss=0.69" in lines[0]
    assert lines[-1].startswith("scoring: 3/3 turn (100%)") and "left" not in lines[-1]


@pytest.mark.slow
def test_the_cli_drops_third_party_lines_a_user_cannot_act_on():
    """DeepSpeed's note about this machine's accelerator and library FutureWarnings: printed by the libraries,
    dropped by the CLI's filter (and only there)."""
    probe = (
        "import sys, warnings\n"
        "if sys.argv[1] == 'cli':\n"
        "    from cso_dist.cli import quiet_third_party; quiet_third_party()\n"
        "import deepspeed.accelerator as a\n"
        "a.get_accelerator()\n"
        "from transformers import AutoConfig, Qwen2ForCausalLM\n"
        "m = Qwen2ForCausalLM(AutoConfig.for_model('qwen2', hidden_size=16, num_hidden_layers=1, "
        "num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, vocab_size=32))\n"
        "m.gradient_checkpointing_enable()\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": ""}
    env.pop("DS_ACCELERATOR")
    plain = subprocess.run([sys.executable, "-c", probe, "library"], capture_output=True, text=True, env=env)
    quiet = subprocess.run([sys.executable, "-c", probe, "cli"], capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and quiet.returncode == 0, plain.stderr + quiet.stderr
    said = plain.stdout + plain.stderr
    assert "Setting accelerator to CPU" in said and "FutureWarning" in said, said
    assert quiet.stdout + quiet.stderr == "", quiet.stdout + quiet.stderr
