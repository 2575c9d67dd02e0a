"""The README's quickstarts run as written, in a fresh folder that holds the repository's configs: the Hub id
from the tests' HF cache (a tiny model under Qwen/Qwen2.5-7B-Instruct), ESConv from the data folder (the first
dialogues of each split), commands that need a GPU or a cluster with --dry-run. Evaluation runs for real on a
stand-in for the trained model (the tiny model where the run's final model would be)."""

from __future__ import annotations

import os
import re
import shlex
import shutil

import pytest
from conftest import REPO

from cso_dist.cli import main

GPU_OR_CLUSTER = {"precompute", "train", "launch"}
README = (REPO / "README.md").read_text()


def quickstart(title: str) -> tuple[int, list[str]]:
    """(line where the section starts, its `cso-dist` commands in order, comments cut)."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    start = README[: m.start()].count("\n") + 1
    blocks = re.findall(r"```bash\n(.*?)```", m.group(1), re.S)
    cmds = [line.split("  #")[0].strip() for b in blocks for line in b.splitlines()]
    return start, [c for c in cmds if c.startswith("cso-dist ")]


def test_the_readme_is_short_and_its_one_gpu_quickstart_comes_early():
    assert len(README.splitlines()) <= 300
    start, cmds = quickstart("Quickstart: your model on one GPU")
    assert start <= 80 and 5 <= len(cmds) <= 10, (start, cmds)


@pytest.fixture
def workdir(tmp_path, esconv_dir, hf_cache, monkeypatch):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    data = tmp_path / "esconv"
    data.mkdir()
    for split in ("train", "valid", "test"):
        lines = (esconv_dir / f"{split}.jsonl").read_text().splitlines(keepends=True)[:6]
        (data / f"{split}.jsonl").write_text("".join(lines))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSO_DATA_DIR", str(tmp_path))  # ESConv as the data folder holds it (the 6 first dialogues)
    return tmp_path, hf_cache[1]


def _run(cmd: str, workdir) -> str:
    root, snaps = workdir
    args = shlex.split(cmd)[1:]
    if args[0] in GPU_OR_CLUSTER and "--dry-run" not in args:
        args.append("--dry-run")
    if args[:2] == ["eval", "generate"]:  # the trained model's place holds a stand-in: the tiny model
        final = root / args[args.index("--model.path") + 1]
        if not final.exists():
            shutil.copytree(snaps["Qwen/Qwen2.5-7B-Instruct"], final)
        args += ["--eval.max_dialogues", "1", "--eval.max_new_tokens", "8"]
    code = main(args)
    assert code == 0, cmd
    return cmd


@pytest.mark.slow
@pytest.mark.parametrize("title", ["Quickstart: your model on one GPU", "Quickstart: a cluster"])
def test_the_quickstart_commands_run_as_written(title, workdir, capsys):
    _, cmds = quickstart(title)
    for cmd in cmds:
        _run(cmd, workdir)
        out = capsys.readouterr().out
        verb = " ".join(shlex.split(cmd)[1:3])
        if verb.startswith(("train", "precompute")):
            assert "Hub id Qwen/Qwen2.5-7B-Instruct: in the HF cache" in out and "config and inputs ok" in out, out
        if verb == "eval score":
            assert re.search(r"\bQ\b", out), out
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing above reached a hub
