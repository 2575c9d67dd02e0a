"""The package's layering, read from its source: pack is pure data (no import cycle, no model code), and no module
outside cso_dist.losses asks which loss runs (methods declare what they need in losses.REGISTRY)."""

import ast
import subprocess
import sys
from pathlib import Path

from cso_dist import losses

PKG = Path(__file__).resolve().parents[1] / "cso_dist"


def _imports(path: Path) -> set[str]:
    """cso_dist modules a file imports at run time (imports under `if TYPE_CHECKING:` are types only)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cso_dist"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cso_dist"))
    return out


def test_pack_has_no_import_cycle():
    graph = {f"cso_dist.pack.{p.stem}": _imports(p) for p in (PKG / "pack").glob("*.py") if p.stem != "__init__"}
    inside = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle in pack: {' -> '.join(path + (m,))}"
        if m in done:
            return
        for d in inside[m]:
            visit(d, path + (m,))
        done.add(m)

    for m in graph:
        visit(m, ())
    assert len(graph) >= 5


def test_pack_imports_no_model_code():
    """Importing pack loads neither the scorer, nor cso_dist.models, nor transformers."""
    code = (
        "import sys, cso_dist.pack; "
        "print(sorted(m for m in sys.modules if m.startswith(('cso_dist.scorer', 'cso_dist.models', 'transformers', "
        "'cso_dist.engine', 'cso_dist.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def _engine_leaks(path: Path) -> list[str]:
    """What only an engine may do: compare a value against an engine's name (`cfg.dist.engine == "deepspeed"`,
    `state["engine"] in ("torch",)`), or read DeepSpeed's attributes of a parameter (`p.ds_id`, `ds_numel`, ...)."""
    from cso_dist.engines import NAMES

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(isinstance(c, ast.Constant) and c.value in NAMES for s in sides for c in ast.walk(s))
            subject = " ".join(ast.unparse(s) for s in sides if not isinstance(s, (ast.Constant, ast.Tuple, ast.List)))
            if named and ("engine" in subject.lower() or "kind" in subject.lower()):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        attr = node.attr if isinstance(node, ast.Attribute) else None
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("hasattr", "getattr") and len(node.args) > 1:
            arg = node.args[1]
            attr = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
        if attr and attr.startswith("ds_"):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_the_engines_branches_on_an_engine_or_probes_deepspeed():
    """The engine seam (issue 37): before it, config, train, export, plan and engine.py branched on the engine's
    name, and scorer/device.py (ds_id), models/load.py (ds_numel) and engine.py probed DeepSpeed's attributes."""
    found = [
        hit for p in sorted(PKG.rglob("*.py")) if "engines" not in p.relative_to(PKG).parts for hit in _engine_leaks(p)
    ]
    assert not found, "\n".join(found)


def test_the_check_finds_an_engine_branch_and_a_deepspeed_probe(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        'if cfg.dist.engine == "deepspeed":\n    pass\nz = hasattr(p, "ds_id")\nn = p.ds_numel\nok = lib == "torch"\n'
    )
    assert len(_engine_leaks(src)) == 3, _engine_leaks(src)


def test_every_engine_offers_the_whole_protocol():
    """Each engine of ENGINES defines every member of the Engine protocol (by name: the classes import their
    frameworks only when constructed)."""
    import importlib

    from cso_dist.engines import ENGINES, Engine

    members = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    assert {"score", "reference", "collective", "checkpoint_weights", "final"} <= members
    for spec in ENGINES.values():
        cls = importlib.import_module(f"cso_dist.engines.{spec.module}").ENGINE
        assert cls.kind == spec.name
        per_instance = ("module", "scorer", "device", "collective")
        missing = [m for m in members if not hasattr(cls, m) and m not in per_instance]
        assert not missing, (spec.name, missing)  # module, scorer, device, collective: set per instance


def _literal_sets(path: Path) -> list[tuple[frozenset, str]]:
    """Every written-out set of two or more strings in a module: tuple / list / set literals, a dict literal's
    keys, Literal["a", "b"]; with file:line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict) and None not in node.keys:
            items = node.keys
        if items and len(items) >= 2 and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items):
            out.append((frozenset(e.value for e in items), f"{path.relative_to(PKG.parent)}:{node.lineno}"))
    return out


def _choice_keys() -> dict[str, frozenset]:
    """Every choice key a user meets: the config's Literal keys, and every CLI option with choices."""
    import dataclasses
    import typing

    from cso_dist import cli, config

    keys = {}
    sections = typing.get_type_hints(config.Config)
    for section in dataclasses.fields(config.Config):
        for name, typ in typing.get_type_hints(sections[section.name]).items():
            if typing.get_origin(typ) is typing.Literal:
                keys[f"{section.name}.{name}"] = frozenset(typing.get_args(typ))

    def walk(parser, prefix):
        for action in parser._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):  # subcommands
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif action.choices and all(isinstance(c, str) for c in action.choices) and len(action.choices) >= 2:
                keys[f"{prefix} {'/'.join(action.option_strings) or action.dest}"] = frozenset(action.choices)

    walk(cli.build_parser(), "cso-dist")
    return keys


def test_every_choice_list_is_defined_once():
    """Each set of choices is written out in one place (the module that owns it); the config's Literal types and
    the CLI's choices derive from it."""
    defs = [d for p in sorted(PKG.rglob("*.py")) for d in _literal_sets(p)]
    keys = _choice_keys()
    assert {"train.method", "model.precision", "scorer.attention", "data.source"} <= set(keys), sorted(keys)
    bad = []
    for key, values in sorted(keys.items()):
        where = [loc for s, loc in defs if s == values]
        if len(where) > 1:  # once, or none where the list derives from a registry (losses.REGISTRY, data READERS)
            bad.append(f"{key} {sorted(values)}: written out {len(where)} times ({', '.join(where) or 'nowhere'})")
    assert not bad, "\n".join(bad)


# The stages below the config: each owns its vocabulary, which the config reads; none imports the config at run
# time (a type only, under TYPE_CHECKING). Above it (the run, the study, launch, the CLI) the config may be imported,
# but nothing the config itself imports at run time may import it back.
BELOW_CONFIG = ("data", "pack", "scorer", "losses", "models", "plan", "engines", "refcache", "eval", "mcts", "util")


def _module_graph(pkg: Path) -> dict[str, set[str]]:
    """cso_dist module -> the cso_dist modules importing it runs (its imports and their parent packages)."""
    graph = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = p.relative_to(pkg).with_suffix("").parts
        name = ".".join(("cso_dist", *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])))
        deps = set()
        for m in _imports(p):
            bits = m.split(".")
            deps.update(".".join(bits[:i]) for i in range(2, len(bits) + 1))
        graph[name] = deps
    return graph


def _one_way_breaks(pkg: Path) -> list[str]:
    """Imports that run against the config's direction: a stage below it importing cso_dist.config, and a module
    the config imports at run time (directly or through others) importing it back."""
    graph = _module_graph(pkg)
    is_config = lambda m: m == "cso_dist.config" or m.startswith("cso_dist.config.")  # noqa: E731
    found = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        if (m.split(".") + [""])[1] in BELOW_CONFIG
        for d in sorted(deps)
        if is_config(d)
    ]
    seen, todo = set(), [d for m in graph if is_config(m) for d in graph[m] if not is_config(d)]
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        if (m.split(".") + [""])[1] not in BELOW_CONFIG:  # (a stage below is reported above)
            found += [f"{m} imports {d}, and the config imports {m}" for d in sorted(graph[m]) if is_config(d)]
        todo += [d for d in graph[m] if not is_config(d)]
    return sorted(set(found))


def test_config_and_the_stages_import_one_way():
    """Issue 42: config imported losses, models and data for their choices while they imported config for its
    dataclasses. Now config reads the stages' vocabularies and nothing it reads imports it at run time."""
    assert not _one_way_breaks(PKG), "\n".join(_one_way_breaks(PKG))
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} >= set(BELOW_CONFIG)


def test_the_one_way_check_finds_a_stage_importing_the_config(tmp_path):
    for d in ("losses", "config", "study"):
        (tmp_path / d).mkdir()
    (tmp_path / "losses" / "batch.py").write_text("from cso_dist.config import TrainConfig\n")
    (tmp_path / "losses" / "ok.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cso_dist.config import TrainConfig\n"
    )
    (tmp_path / "config" / "schema.py").write_text("from cso_dist.study import PHASES\nimport cso_dist.losses.ok\n")
    (tmp_path / "study" / "__init__.py").write_text("from cso_dist.study.run import PHASES\n")
    (tmp_path / "study" / "run.py").write_text("from cso_dist.config.schema import Config\n")
    assert _one_way_breaks(tmp_path) == [
        "cso_dist.losses.batch imports cso_dist.config",
        "cso_dist.study.run imports cso_dist.config, and the config imports cso_dist.study.run",
        "cso_dist.study.run imports cso_dist.config.schema, and the config imports cso_dist.study.run",
    ]


def test_at_most_six_loose_modules():
    """Issue 42: the top of the package holds the entry points and little else; every stage is a package."""
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 6, loose


def _config_owned_choices(pkg: Path) -> list[str]:
    """Choice lists a user meets (config keys, CLI options) that are written out inside the config's own modules:
    the config should read each from the module that acts on it."""
    defs = [d for p in sorted(pkg.rglob("*.py")) for d in _literal_sets(p)]
    return [
        f"{key} {sorted(values)}: written out at {loc}"
        for key, values in sorted(_choice_keys().items())
        for s, loc in defs
        if s == values and loc.startswith(("cso_dist/config", "cso_dist/cli"))
    ]


def test_no_choice_list_is_owned_by_the_config():
    """Issue 42: engine, optimizer, schedule, train.final, train.reference, eval.mode, study.cluster, study.model
    were written out in config.py; each is now defined by the module that acts on it."""
    bad = _config_owned_choices(PKG)
    assert not bad, "\n".join(bad)


def _loss_name_compares(path: Path) -> list[str]:
    """Every comparison with a registered loss name written as a string, whatever is compared (`x == "sft"`,
    `n not in ("base", "sft")`, `fmt == "dpo"`): outside losses/, a loss is named through the registry
    (losses.BASELINE, losses.method(name)...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(c, ast.Constant) and c.value in losses.METHODS for s in sides for c in ast.walk(s)):
                found.append(f"{path.relative_to(path.parents[1])}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_string_compare_against_a_loss_name_outside_losses():
    """Issue 42: config and eval/report compared against "sft" and the scan above did not see it (its subject
    held neither "method" nor "loss"); the study's SFT baseline is losses.BASELINE."""
    found = [
        hit
        for p in sorted(PKG.rglob("*.py"))
        if "losses" not in p.relative_to(PKG).parts
        for hit in _loss_name_compares(p)
    ]
    assert not found, "\n".join(found)


def test_the_loss_name_check_finds_any_compare(tmp_path):
    """The scan is not vacuous: it flags a branch on a loss name whatever the compared value is called."""
    src = tmp_path / "x.py"
    src.write_text('a = x == "sft"\nb = n not in ("base", "sft")\nc = fmt == "dpo"\nd = y == "base"\ne = z == B\n')
    assert len(_loss_name_compares(src)) == 3, _loss_name_compares(src)
    src.write_text('if cfg.train.method == "sft":\n    pass\nk = "-kl" if loss == "kto" else ""\n')
    assert len(_loss_name_compares(src)) == 2, _loss_name_compares(src)
