"""Generated bad inputs across the readers, stored dialogue files, the config, eval and launch.

Every case must end with exit code != 0, exactly one line on stderr, no traceback, and nothing
written (no --out file, no temporary file, no job file). Runs in-process through cso_dist.cli.main:
an exception escaping main is a traceback. The figures (cases per family) are printed for the
closing note: `pytest -s tests/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from cso_dist.cli import main
from conftest import run_main

BAD_UTF8 = b'{"prompt": "caf\xe9 \xff", "chosen": "(Question) x", "rejected": "(Others) y"}\n'

TRL = {"prompt": "I feel alone.", "chosen": "(Question) What happened?", "rejected": "(Others) Okay."}
CSO = {
    "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "I feel alone."}],
    "chosen": {"role": "assistant", "content": "(Question) What happened?"},
    "reject": {"role": "assistant", "content": "(Others) Okay."},
}
KTO = {
    "messages": [{"role": "user", "content": "I feel alone."}, {"role": "assistant", "content": "(Question) Why?"}],
    "label": True,
}
ESCPRO = {
    "messages": [
        {"role": "user", "content": "I lost my job."},
        {
            "role": "assistant",
            "content": "That sounds hard.",
            "strategy": "Emotional Validation",
            "negative": [{"content": "Cheer up.", "strategy": "Affirmation"}],
        },
        {"role": "user", "content": "Thanks."},
    ]
}
ESCONV = {
    "emotion_type": "sadness",
    "situation": "lonely",
    "dialog": [
        {"speaker": "usr", "text": "I feel alone."},
        {"speaker": "sys", "text": "What happened?", "strategy": "Question"},
        {"speaker": "usr", "text": "My friend left."},
        {"speaker": "sys", "text": "That must hurt.", "strategy": "Reflection of feelings"},
    ],
}
GOOD = {"trl": TRL, "cso-rows": CSO, "kto-rows": KTO, "escpro": ESCPRO, "esconv": ESCONV}
WRONG = [None, 5, 2.5, True, [], {}, "", "   ", ["x"], {"a": 1}]


def _leaves(obj, path=()):
    """Every (path, value) inside a JSON value (dict keys and list indices)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))


def _set(obj, path, value, delete=False):
    obj = copy.deepcopy(obj)
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    if delete:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


def _mutations(good: dict) -> list[tuple[str, dict]]:
    """Records that must be refused: each required field deleted or given a wrong type or empty text."""
    out = []
    for path, value in _leaves(good):
        if not path or path[-1] in ("emotion_type", "situation", "negative"):
            continue  # optional fields
        if path[-1] == "content" and len(path) >= 2 and path[0] == "messages" and good is CSO and path[1] == 0:
            continue
        name = ".".join(map(str, path))
        if isinstance(path[-1], str):
            out.append((f"{name} deleted", _set(good, path, None, delete=True)))
        for w in WRONG:
            if type(w) is type(value) and (not isinstance(w, str) or w.strip()):
                continue
            if isinstance(value, (dict, list)) and not w and type(w) is type(value):
                continue
            out.append((f"{name}={w!r}", _set(good, path, w)))
    return out


def _source_cases(source: str) -> list[tuple[str, bytes]]:
    good = GOOD[source]
    cases = []
    for name, rec in _mutations(good):
        cases.append((name, (json.dumps(good) + "\n" + json.dumps(rec) + "\n").encode()))
    first = json.dumps(good).encode()
    cases += [
        ("empty file", b""),
        ("whitespace only", b"  \n\n \t\n"),
        ("truncated JSON", first[: len(first) // 2] + b"\n"),
        ("invalid UTF-8", first + b"\n" + BAD_UTF8),
        ("record is a list", first + b"\n[1, 2]\n"),
        ("record is a string", first + b'\n"text"\n'),
        ("record is a number", first + b"\n42\n"),
        ("JSON array of non-objects", b"[1, 2, 3]"),
        ("JSON array, bad JSON", b'[{"a": 1},'),
    ]
    return cases


def _policy_cases() -> list[tuple[str, str, dict]]:
    """Valid JSON that breaks the one policy of every reader."""
    cases = [
        ("trl", "rejected equal to chosen", {**TRL, "rejected": TRL["chosen"]}),
        ("trl", "unknown strategy", {**TRL, "chosen": "(Questions) x"}),
        ("cso-rows", "reject equal to chosen", {**CSO, "reject": CSO["chosen"]}),
        ("cso-rows", "history ends with the assistant", {**CSO, "messages": CSO["messages"] + [CSO["chosen"]]}),
        ("kto-rows", "false label only", {**KTO, "label": False}),
        ("kto-rows", "no assistant reply", {**KTO, "messages": KTO["messages"][:1]}),
        ("escpro", "no assistant turn", {"messages": [{"role": "user", "content": "hi"}]}),
        (
            "escpro",
            "negative equal to chosen",
            _set(
                ESCPRO,
                ("messages", 1, "negative", 0),
                {"content": "That sounds hard.", "strategy": "Emotional Validation"},
            ),
        ),
        ("escpro", "two user messages in a row", _set(ESCPRO, ("messages", 1, "role"), "user")),
        ("escpro", "unknown role", _set(ESCPRO, ("messages", 0, "role"), "narrator")),
        ("esconv", "seeker only", {**ESCONV, "dialog": ESCONV["dialog"][:1]}),
        ("esconv", "unknown speaker", _set(ESCONV, ("dialog", 0, "speaker"), "bot")),
        ("esconv", "unknown strategy", _set(ESCONV, ("dialog", 1, "strategy"), "Hug")),
    ]
    # a label variant without --aliases is refused by every reader alike
    cases += [
        ("trl", "label variant", {**TRL, "chosen": "(question) What happened?"}),
        ("cso-rows", "label variant", _set(CSO, ("chosen", "content"), "(question) x")),
        ("kto-rows", "label variant", _set(KTO, ("messages", 1, "content"), "(question) Why?")),
        ("escpro", "label variant", _set(ESCPRO, ("messages", 1, "strategy"), "emotional validation")),
        ("esconv", "label variant", _set(ESCONV, ("dialog", 1, "strategy"), "question")),
    ]
    return cases


_run = run_main  # tests/conftest.py: main() in this process, a traceback as (None, "", "Traceback ...")


def _check(case: str, rc, err: str, written: list[Path], failures: list[str]) -> None:
    lines = err.strip().splitlines()
    if rc is None or "Traceback" in err or "internal error" in err:  # a bug, caught by the CLI's last resort
        failures.append(f"{case}: traceback: {err[-300:]}")
    elif rc == 0:
        failures.append(f"{case}: accepted (exit 0)")
    elif len(lines) != 1:
        failures.append(f"{case}: {len(lines)} lines on stderr: {err[-300:]}")
    for p in written:
        failures.append(f"{case}: wrote {p}")


def _written(folder: Path, before: set) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p not in before]


def test_fuzz_bad_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    inputs, outs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outs.mkdir()
    from cso_dist.models import build_tiny_model

    model = str(build_tiny_model("qwen2", tmp_path / "model", tokenizer="qwen", hidden_size=32))  # model.path
    capsys.readouterr()  # its progress lines are not a case's output
    failures: list[str] = []
    families: Counter = Counter()

    def attempt(family: str, case: str, argv: list[str], watch: Path = outs) -> None:
        before = {p for p in watch.rglob("*") if p.is_file()}
        rc, _, err = _run(argv, capsys)
        _check(f"{family}: {case}", rc, err, _written(watch, before), failures)
        families[family] += 1

    # 1. the readers: field mutations, broken files, policy breaks
    n = 0
    for source in GOOD:
        for case, data in _source_cases(source):
            f = inputs / f"{n}.jsonl"
            n += 1
            f.write_bytes(data)
            src = ["--from", source, "--input", str(f)] + (["--negatives", "0"] if source == "esconv" else [])
            attempt(f"reader {source}", case, ["data", "build", *src, "--out", str(outs / "o.jsonl")])
    for source, case, rec in _policy_cases() + [("esconv", "the same dialogue twice", [ESCONV, ESCONV])]:
        f = inputs / f"{n}.jsonl"
        n += 1
        f.write_text("".join(json.dumps(r) + "\n" for r in (rec if isinstance(rec, list) else [rec])))
        src = ["--from", source, "--input", str(f)] + (["--negatives", "0"] if source == "esconv" else [])
        attempt(f"reader {source}", case, ["data", "build", *src, "--out", str(outs / "o.jsonl")])

    # 2. stored preference-dialogue files (data stats / data pairs / train --dry-run read them)
    good_dialogue = {
        "id": "d0",
        "strategy_set": "esconv",
        "meta": {},
        "messages": [
            {"role": "seeker", "text": "I feel alone."},
            {
                "role": "supporter",
                "text": "What happened?",
                "strategy": "Question",
                "target": True,
                "rejected": [{"strategy": "Others", "text": "Okay."}],
            },
        ],
    }
    stored = [(name, rec) for name, rec in _mutations(good_dialogue) if not name.startswith("meta")]
    stored += [
        ("strategy outside the set", _set(good_dialogue, ("messages", 1, "strategy"), "Hug")),
        ("rejected strategy outside the set", _set(good_dialogue, ("messages", 1, "rejected", 0, "strategy"), "Hug")),
        (
            "rejected equal to chosen",
            _set(good_dialogue, ("messages", 1, "rejected"), [{"strategy": "Question", "text": "What happened?"}]),
        ),
        (
            "duplicate rejected",
            _set(good_dialogue, ("messages", 1, "rejected"), [{"strategy": "Others", "text": "Okay."}] * 2),
        ),
        ("no supporter turn", _set(good_dialogue, ("messages",), [{"role": "seeker", "text": "hi"}])),
        ("two seekers in a row", _set(good_dialogue, ("messages", 1, "role"), "seeker")),
    ]
    for case, rec in stored:
        f = inputs / f"{n}.jsonl"
        n += 1
        f.write_text(json.dumps(good_dialogue) + "\n" + json.dumps(rec) + "\n")
        attempt("stored dialogues (data stats)", case, ["data", "stats", str(f)])
        dry = [
            "train",
            "--dry-run",
            "--train.train_file",
            str(f),
            "--run.out_dir",
            str(outs / "run"),
            "--model.path",
            model,
        ]
        attempt("stored dialogues (train --dry-run)", case, dry)
        attempt(
            "stored dialogues (data pairs)",
            case,
            ["data", "pairs", str(f), "--format", "dpo", "--out", str(outs / "p.jsonl")],
        )
    # the unmutated inputs pass: each refusal above is the mutation's
    f = inputs / "good-dialogue.jsonl"
    f.write_text(json.dumps(good_dialogue) + "\n")
    for argv in (
        ["data", "stats", str(f)],
        ["train", "--dry-run", "--train.train_file", str(f), "--run.out_dir", str(outs / "run"), "--model.path", model],
        ["data", "pairs", str(f), "--format", "kto", "--out", str(tmp_path / "ok-pairs.jsonl")],
    ):
        assert _run(argv, capsys)[0] == 0, argv
    for source, good in GOOD.items():
        f = inputs / f"good-{source}.jsonl"
        f.write_text(json.dumps(good) + "\n")
        src = ["--from", source, "--input", str(f)] + (["--negatives", "0"] if source == "esconv" else [])
        assert _run(["data", "build", *src, "--out", str(tmp_path / "ok.jsonl")], capsys)[0] == 0, source
    dup = inputs / "dup-ids.jsonl"
    dup.write_text((json.dumps(good_dialogue) + "\n") * 2)
    attempt("stored dialogues (data stats)", "duplicate ids", ["data", "stats", str(dup)])
    (inputs / "empty.jsonl").write_text("")
    attempt("stored dialogues (data stats)", "empty file", ["data", "stats", str(inputs / "empty.jsonl")])

    # 3. the config: every numeric key of the training sections out of range, wrong types, YAML faults
    bad_values = {
        "train.lr": [0, -1, ".inf", ".nan", "x", [1]],
        "train.save_every": [-1, 1.5, "x"],
        "train.eval_every": [-3],
        "train.epochs": [0, -1],
        "train.max_steps": [-1],
        "train.grad_accum": [0],
        "train.beta": [0, -2],
        "train.label_smoothing": [0.5, -0.1],
        "train.warmup_ratio": [1.0, -0.1],
        "train.keep_last": [0],
        "train.weight_decay": [-0.1],
        "train.desirable_weight": [0],
        "train.method": ["ppo", 3],
        "train.schedule": ["exp"],
        "data.negatives": [-1, "three"],
        "data.max_length": [8],
        "data.pool": [0],
        "data.source": ["csv"],
        "model.lora_r": [0],
        "model.lora_dropout": [1.0, -0.5],
        "model.finetune": ["adapter"],
        "pack.max_tokens": [16],
        "scorer.logit_chunk": [0],
        "dist.zero_stage": [1],
        "dist.timeout_minutes": [0],
        "slurm.nodes": [0],
        "slurm.time_min": [0],
        "slurm.gpus_per_node": [-1],
        "eval.top_p": [0, 1.5],
        "eval.temperature": [0],
        "mcts.c_puct": [0],
        "mcts.min_iterations": [0],
        "train.nope": [1],
        "nosection.key": [1],
    }
    for key, values in bad_values.items():
        section, name = key.split(".")
        for v in values:
            cfgfile = inputs / f"{n}.yaml"
            n += 1
            cfgfile.write_text(
                json.dumps({section: {name: v}})
                if not (isinstance(v, str) and v.startswith("."))
                else f"{section}:\n  {name}: {v}\n"
            )
            attempt("config", f"{key}={v!r}", ["config", "show", str(cfgfile)])
    for case, text in [
        ("duplicated key", "train:\n  lr: 1e-3\n  lr: 2e-3\n"),
        ("duplicated section", "train:\n  lr: 1e-3\ntrain:\n  epochs: 2\n"),
        ("bad YAML", "train: [\n"),
        ("not a mapping", "- a\n- b\n"),
        ("section not a mapping", "train: 3\n"),
        ("invalid UTF-8", b"train:\n  lr: \xff\n"),
    ]:
        cfgfile = inputs / f"{n}.yaml"
        n += 1
        cfgfile.write_bytes(text if isinstance(text, bytes) else text.encode())
        attempt("config", case, ["config", "show", str(cfgfile)])
    attempt("config", "missing file", ["config", "show", str(inputs / "nope.yaml")])
    attempt(
        "config", "override of an unread section", ["data", "build", "--train.lr", "1", "--out", str(outs / "o.jsonl")]
    )

    # 4. eval score: our layout and Kang et al.'s
    ok = {"gold_strategy": "Question", "pred_strategy": "Question"}
    # a null or empty prediction is a prediction without a strategy (counted as unknown), not an error
    pred_cases = [(n, r) for n, r in _mutations(ok) if r.get("pred_strategy", 0) not in (None, "", "   ")]
    pred_cases += [
        ("unknown gold", {**ok, "gold_strategy": "Hug"}),
        ("Kang: unknown gold", {"strg_gold": "[Hug]", "strg_pred": "Question"}),
        ("Kang: pred a list", {"strg_gold": "Question", "strg_pred": ["Question"]}),
        ("response a number", {**ok, "gold_response": "a", "pred_response": 3}),
    ]
    for case, rec in pred_cases:
        f = inputs / f"{n}.jsonl"
        n += 1
        f.write_text(json.dumps(ok) + "\n" + json.dumps(rec) + "\n")
        attempt("eval score", case, ["eval", "score", str(f)])
    for case, data in [
        ("invalid UTF-8", json.dumps(ok).encode() + b"\n\xff\xfe\n"),
        ("empty", b""),
        ("not JSON", b"gold,pred\n"),
        ("array of strings", b'["a"]'),
    ]:
        f = inputs / f"{n}.jsonl"
        n += 1
        f.write_bytes(data)
        attempt("eval score", case, ["eval", "score", str(f)])
    attempt("eval score", "missing file", ["eval", "score", str(inputs / "none.jsonl")])
    f = inputs / "good-pred.jsonl"
    f.write_text(json.dumps(ok) + "\n")
    assert _run(["eval", "score", str(f)], capsys)[0] == 0

    # 5. launch: refused scripts write nothing
    monkeypatch.setenv("WANDB_API_KEY", "secret-value-123456")
    run_dir = tmp_path / "run"
    for case, extra in [
        ("secret in slurm.setup", ["--slurm.setup", "export WANDB_API_KEY=secret-value-123456"]),
        ("secret in a sweep value", ["--sweep", "track.name=secret-value-123456,b"]),
        ("sweep without the sweep template", ["--template", "train", "--sweep", "train.lr=1,2"]),
        ("nodes 0", ["--nodes", "0"]),
        ("time not a number", ["--time", "soon"]),
        ("unknown template", ["--template", "nope"]),
    ]:
        attempt(
            "launch sbatch",
            case,
            ["launch", "sbatch", "--run.out_dir", str(run_dir), "--dry-run", *extra],
            watch=tmp_path / "run" if (tmp_path / "run").exists() else outs,
        )
    assert not (run_dir / "slurm").exists() or not any((run_dir / "slurm").iterdir())

    # 6. --out faults
    good_file = inputs / "good.jsonl"
    good_file.write_text(json.dumps(TRL) + "\n")
    for case, out in [
        ("--out is a folder", outs),
        ("--out under a file", good_file / "x.jsonl"),
        ("--out equal to --input", good_file),
    ]:
        attempt("--out", case, ["data", "build", "--from", "trl", "--input", str(good_file), "--out", str(out)])
    assert good_file.read_text() == json.dumps(TRL) + "\n"

    total = sum(families.values())
    print(f"\nfuzz: {total} bad inputs, {len(failures)} failures")
    for family, count in sorted(families.items()):
        print(f"  {family}: {count}")
    assert total >= 200
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} failures)"


def test_skip_invalid_keeps_every_good_record_and_counts_exactly(tmp_path, capsys):
    good = [dict(TRL, chosen=f"(Question) What happened {i}?") for i in range(6)]
    lines = [json.dumps(r) for r in good[:2]] + ["not json"] + [json.dumps(r) for r in good[2:4]]
    lines += ['{"prompt": 3}', BAD_UTF8.decode("latin-1")] + [json.dumps(r) for r in good[4:]]
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(
        "\n".join(lines[:5]).encode()
        + b"\n"
        + lines[5].encode()
        + b"\n"
        + BAD_UTF8
        + "\n".join(lines[7:]).encode()
        + b"\n"
    )
    out = tmp_path / "new" / "folder" / "o.jsonl"  # a missing folder of --out is made
    assert main(["data", "build", "--from", "trl", "--input", str(f), "--out", str(out), "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 preference dialogues" in printed, printed
    assert "skipped 3 invalid records" in printed, printed
    assert len(out.read_text().splitlines()) == 6


@pytest.mark.parametrize("fmt", ["array", "jsonl"])
def test_eval_score_reads_kang_et_al_files_and_folds_gold_labels(tmp_path, capsys, fmt):
    rows = [
        {
            "strg_gold": "Reflection of Feelings",
            "strg_pred": "[Reflection of feelings]",
            "res_gold": "a b",
            "res_pred": "a b",
        },
        {"strg_gold": "question", "strg_pred": "Question", "res_gold": "c d", "res_pred": "c"},
        {"strg_gold": "[Question]", "strg_pred": "Others", "res_gold": "e", "res_pred": None},
    ]
    f = tmp_path / "kang.json"
    f.write_text(json.dumps(rows) if fmt == "array" else "".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "score", str(f), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3)
    assert s["per_strategy"]["Question"]["gold"] == 2 and s["per_strategy"]["Reflection of feelings"]["gold"] == 1
    assert s["text"]["rows"] == 2  # the row without a predicted response is counted out, and said so
    assert main(["eval", "score", str(f)]) == 0
    assert "text (2 of 3 rows have both responses)" in capsys.readouterr().out
