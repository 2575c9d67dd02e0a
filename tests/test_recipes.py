"""Every command written in a recipe header (configs/*.yaml) runs as written, so the docs cannot drift
from the CLI: `data build` for real (on a small ESConv subset), `plan` as is, and the commands that
need a GPU or a cluster with --dry-run (outputs under a temporary folder). The recipes' Hub ids are read
from the tests' own HF cache (conftest.hf_cache: a tiny model under each id), as a user's would be.
Recipes compose (`base:`), and each resolves to the config it had before it did."""

import json
import re
import shlex
from pathlib import Path

import pytest

from cso_dist.cli import main
from cso_dist.config import Config, load_config
from conftest import RECIPES, REPO

NEEDS_DRY_RUN = {"precompute", "train", "launch"}


def header_commands(path: Path) -> list[str]:
    """`cso-dist ...` commands in the leading comment block: after a label (`# Run:  cso-dist ...`), on
    an indented continuation line, or in backticks; a trailing `(comment)` is not part of the command."""
    cmds = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        cmds += re.findall(r"`(cso-dist [^`]+)`", line)
        m = re.match(r"#\s*(?:[A-Z][a-z]+:)?\s+(cso-dist .*)$", line)
        if m and "`" not in m.group(1):
            cmds.append(re.sub(r"\s+\(.*\)\s*$", "", m.group(1)).strip())
    return cmds


def _verb(cmd: str) -> str:
    """A header command's verb; `launch sbatch CONFIG --template T` runs T's command (precompute, eval, train)."""
    words = shlex.split(cmd)[1:]
    if words[:2] == ["launch", "sbatch"] and "--template" in words:
        return f"launch sbatch --template {words[words.index('--template') + 1]}"
    return " ".join(words[:2])


def test_every_recipe_header_names_its_commands():
    assert len(RECIPES) == 17
    for path in RECIPES:
        cmds = header_commands(path)
        verbs = [_verb(c) for c in cmds]
        assert any(v.startswith("data build") for v in verbs), (path.name, cmds)
        assert any(v.startswith("plan") for v in verbs), (path.name, cmds)
        assert f"cso-dist plan --config configs/{path.name}" in cmds, (path.name, cmds)
        precompute = [v for v in verbs if v.startswith("precompute") or v == "launch sbatch --template precompute"]
        assert precompute, (path.name, cmds)
        assert any(v.startswith("launch sbatch") for v in verbs), (path.name, cmds)
        if path.stem.startswith("llama3.1-70b-zero3"):  # the reference does not fit one GPU: sharded over the job's
            assert precompute == ["launch sbatch --template precompute"], (path.name, cmds)
        if path.stem.startswith("llama3.1-70b"):  # evaluated as a job of its own (one task per GPU)
            assert "launch sbatch --template eval" in verbs, (path.name, cmds)


def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
    return out


def test_recipes_compose_and_resolve_to_the_configs_they_had():
    """tests/recipes-resolved.json: each recipe's keys that differ from the defaults, as the recipes were
    written out in full (50 lines each) before they composed base files, and changed deliberately since (the
    Gemma recipes' eval.batch_size 8, for every stage to fit; the 70B QLoRA recipe)."""
    want = json.loads((REPO / "tests" / "recipes-resolved.json").read_text())
    assert sorted(want) == [p.name for p in RECIPES]
    default = _flat(Config().to_dict())
    for path in RECIPES:
        got = {k: v for k, v in _flat(load_config(path).to_dict()).items() if default.get(k, object()) != v}
        assert got == want[path.name], path.name
        assert len(path.read_text().splitlines()) <= 25, path.name


@pytest.fixture(scope="module")
def small(tmp_path_factory, esconv_dir):
    """The first 20 dialogues of each ESConv split."""
    root = tmp_path_factory.mktemp("recipes")
    data = root / "esconv"
    data.mkdir()
    for split in ("train", "valid", "test"):
        lines = (esconv_dir / f"{split}.jsonl").read_text().splitlines(keepends=True)[:20]
        (data / f"{split}.jsonl").write_text("".join(lines))
    return root, data


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_commands_run(recipe, small, hf_cache, tmp_path, monkeypatch, capsys):
    root, data = small
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "runs" / recipe.stem
    for cmd in header_commands(recipe):
        argv = [
            a.replace("runs/", f"{tmp_path}/runs/", 1) if a.startswith("runs/") else a for a in shlex.split(cmd)[1:]
        ]
        if argv[0] == "data":  # the data family reads only the data section (a --run.* override is refused)
            argv += ["--data.input", str(data)]
        else:
            argv += ["--run.out_dir", str(out_dir)]
        if argv[0] in NEEDS_DRY_RUN:
            argv += ["--dry-run"] if "--dry-run" not in argv else []
        code = main(argv)
        printed = capsys.readouterr()
        assert code == 0, (cmd, printed.out[-2000:], printed.err[-2000:])
        if argv[0] in ("precompute", "train"):
            assert "--dry-run: config and inputs ok" in printed.out, printed.out
            assert ": in the HF cache, snapshot " in printed.out, printed.out
            assert "\n  eval generate " in printed.out and "\nevery stage fits\n" in printed.out, printed.out
