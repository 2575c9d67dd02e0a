"""Every text file a user hands in goes through one reader (cso_dist.util.io: read_text, read_json, read_jsonl): PRED
files and their origin records, the generated-replies cache, the study's records, strategy sets, chat templates,
preference-dialogue files, a reference cache's manifest. Each case follows tests/test_fuzz.py's rule: exit code 2,
one line on stderr naming the file (and the line and field where there is one), no traceback, and nothing written
or cut (the bytes of every file involved are the same before and after)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_main, tiny_run_data

BAD = b"caf\xe9 \xff"  # not UTF-8


def _run(argv: list, capsys) -> tuple[int | None, str]:
    rc, _, err = run_main(argv, capsys)
    return rc, err


def _bytes(paths) -> dict:
    return {p: p.read_bytes() if p.is_file() else p.is_dir() for p in map(Path, paths)}


def refused(capsys, argv: list, *words: str, files=(), absent=()) -> str:
    """Run `argv` in this process: exit code 2, one line on stderr holding `words`, no traceback; `files` keep
    their bytes and `absent` stay absent. The line."""
    capsys.readouterr()
    before = _bytes(files)
    rc, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, f"{argv}: exit {rc}: {err[-2000:]}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert _bytes(files) == before, f"{argv}: a file was written or cut"
    for p in absent:
        assert not Path(p).exists(), f"{argv}: wrote {p}"
    return lines[0]


def _lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory, esconv_dir):
    """ESConv train/valid preference dialogues and a tiny Qwen2 with an ESConv BPE (tiny_run_data)."""
    root = tmp_path_factory.mktemp("text-inputs")
    tiny_run_data(root, esconv_dir, n_train=4, n_valid=2)
    return root


# ---------------------------------------------------------------- PRED files: eval score
def test_eval_score_refuses_bad_bytes_duplicate_ids_and_folders(tmp_path, capsys):
    rows = [{"id": f"d0:{i}", "gold_strategy": "Question", "pred_strategy": "Question"} for i in (1, 3, 5)]
    f = tmp_path / "pred.jsonl"
    second = json.dumps(rows[1]).encode().replace(b"Question", BAD, 1)
    f.write_bytes(_lines(rows[0], second, rows[2]))
    at = second.index(BAD) + 3  # the first byte that is not UTF-8, in its line
    refused(capsys, ["eval", "score", f], f"{f}: line 2: not UTF-8 text (byte {at} of the line)", files=[f])
    # duplicate ids are named with their lines: scored, each would count twice
    f.write_bytes(_lines(*rows, rows[0], rows[2]))
    line = refused(capsys, ["eval", "score", f], f"{f}: 2 turn ids more than once", files=[f])
    assert "'d0:1' (line 1, line 4), 'd0:5' (line 3, line 5)" in line
    array = tmp_path / "pred.json"
    array.write_text(json.dumps([rows[0], rows[1], rows[0]]))
    refused(capsys, ["eval", "score", array], "'d0:1' (record 0, record 2)", files=[array])
    refused(capsys, ["eval", "score", tmp_path], f"{tmp_path}: is a folder, not a PRED file")
    # a strategy set that is not UTF-8
    sset = tmp_path / "set.json"
    sset.write_bytes(b'["Question", "' + BAD + b'"]')
    f.write_bytes(_lines(*rows))
    refused(capsys, ["eval", "score", f, "--strategies", sset], f"strategies: {sset}: line 1: not UTF-8", files=[f])
    assert _run(["eval", "score", f], capsys)[0] == 0  # the same rows, once each


# ---------------------------------------------------------------- PRED files: a rerun of eval generate
@pytest.mark.slow
def test_eval_generate_rerun_refuses_duplicates_and_a_list_as_origin(data, tmp_path, capsys):
    args = ["eval", "generate", "--split", "test", "--mode", "likelihood", "--model.path", data / "model"]
    args += ["--run.out_dir", tmp_path / "run", "--eval.max_dialogues", 1, "--data.max_length", 512]
    assert _run(args, capsys)[0] == 0
    pred = tmp_path / "run" / "eval" / "pred-test-likelihood.jsonl"
    side = pred.with_name(pred.name + ".origin.json")
    good = pred.read_bytes()
    first, second = good.splitlines(True)[:2]
    # the same rows in the PRED file and a part (a kill between the merge's write and the parts' removal): expected
    part = pred.with_name(f".{pred.name}.rank0")
    part.write_bytes(good)
    assert _run(args, capsys)[0] == 0 and not part.exists() and pred.read_bytes() == good
    pred.write_bytes(good + first)  # an id twice in the file the rerun would complete
    n = len(good.splitlines())
    tid = json.loads(first)["id"]
    refused(capsys, args, f"{pred}: 1 turn id more than once: '{tid}' (line 1, line {n + 1})", files=[pred, side])
    pred.write_bytes(good.replace(second, second.replace(b'"id"', b'"\xff"'), 1))
    refused(capsys, args, str(pred), files=[pred, side])  # (refused by the --out check or by the reader)
    pred.write_bytes(good)
    side.write_text("[1, 2]")
    refused(capsys, args, f"{side}: expected a JSON object, got list", files=[pred, side])
    side.unlink()
    side.mkdir()
    refused(capsys, args, f"{side}: is a folder", files=[pred])


# ---------------------------------------------------------------- preference-dialogue files
def _bad_train_file(data: Path, tmp_path: Path, line: int = 3) -> Path:
    """The tiny run's train file with bytes that are not UTF-8 in a text of its line `line`."""
    lines = (data / "train.jsonl").read_bytes().splitlines(True)
    lines[line - 1] = lines[line - 1].replace(b'"text": "', b'"text": "' + BAD, 1)
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b"".join(lines))
    return bad


def test_a_train_file_with_bytes_that_are_not_utf8_names_file_and_line(data, tmp_path, capsys):
    bad = _bad_train_file(data, tmp_path)
    said = f"{bad}: line 3: not UTF-8 text (byte"
    refused(capsys, ["data", "stats", bad], said, files=[bad])
    refused(capsys, ["data", "pairs", bad, "--format", "dpo", "--out", tmp_path / "p.jsonl"], said, files=[bad])
    dry = ["train", "--dry-run", "--train.train_file", bad, "--model.path", data / "model"]
    dry += ["--run.out_dir", tmp_path / "run", "--data.strategies", "esconv"]
    refused(capsys, dry, said, files=[bad], absent=[tmp_path / "p.jsonl", tmp_path / "run"])


def test_train_dry_run_names_the_bad_line_when_the_strategy_set_is_auto(data, tmp_path, capsys):
    bad = _bad_train_file(data, tmp_path, line=1)
    dry = ["train", "--dry-run", "--train.train_file", bad, "--model.path", data / "model"]
    refused(capsys, dry + ["--run.out_dir", tmp_path / "run"], f"{bad}: line 1: not UTF-8 text", files=[bad])


# ---------------------------------------------------------------- strategy sets and chat templates
def test_strategy_sets_and_chat_templates_are_read_by_the_reader(data, esconv_dir, tmp_path, capsys):
    train = data / "train.jsonl"
    js, yml = tmp_path / "set.json", tmp_path / "set.yaml"
    js.write_bytes(b'["Question", "' + BAD + b'"]')
    yml.write_bytes(b"- Question\n- " + BAD + b"\n")
    refused(capsys, ["data", "stats", train, "--strategies", js], f"strategies: {js}: line 1: not UTF-8 text (byte 17")
    refused(capsys, ["data", "stats", train, "--strategies", yml], f"strategies: {yml}: line 2: not UTF-8 text (byte")
    out = tmp_path / "o.jsonl"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.jsonl").write_text((esconv_dir / "train.jsonl").read_text().split("\n", 1)[0] + "\n")
    build = ["data", "build", "--from", "esconv", "--input", tmp_path / "raw", "--out", out]
    refused(capsys, [*build, "--strategies", js], f"strategies: {js}: line 1: not UTF-8", absent=[out])
    (tmp_path / "set-folder.json").mkdir()
    refused(capsys, ["data", "stats", train, "--strategies", tmp_path / "set-folder.json"], "is a folder")
    js.write_text(json.dumps({"strategies": ["Question", "Others"], "aliases": ["Q"]}))
    refused(capsys, ["data", "stats", train, "--strategies", js], f"strategies: {js}: aliases: expected a mapping")
    # a chat template file (data.chat_template)
    tmpl = tmp_path / "chat.jinja"
    tmpl.write_bytes(b"{{ messages }}\n{# " + BAD + b" #}\n")
    stats = ["data", "stats", train, "--tokenizer", data / "model", "--chat-template"]
    refused(capsys, [*stats, tmpl], f"data.chat_template: {tmpl}: line 2: not UTF-8 text (byte 21 of the file)")
    refused(capsys, [*stats, tmp_path], f"data.chat_template: {tmp_path}: is a folder, not a chat template")


# ---------------------------------------------------------------- the generated-replies cache
@pytest.mark.slow
def test_a_generated_cache_that_is_not_rows_of_text_is_refused_at_the_cache(
    data, esconv_dir, tmp_path, capsys, monkeypatch
):
    from cso_dist.models.identity import model_key

    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    monkeypatch.setenv("CSO_GENERATED_CACHE", str(cache_root))
    cache = cache_root / f"{model_key(data / 'model', cache_root / '.filehashes.json')[:24]}.jsonl"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.jsonl").write_text("".join((esconv_dir / "train.jsonl").read_text().splitlines(True)[:2]))
    out = tmp_path / "gen.jsonl"
    build = ["data", "build", "--from", "esconv", "--input", raw, "--out", out, "--negatives-from", "generated"]
    build += ["--generator", data / "model", "--generate-max-tokens", 4]
    row = {"key": "0" * 32, "text": "(Question) How are you?"}
    for case, content, words in [
        ("garbled row", _lines(row, b"key,text"), ["line 2: bad JSON: Expecting value (column 1)"]),
        ("a row cut short", _lines(row, b'{"key": "1", "te', row), ["line 2: bad JSON: ends mid-value"]),
        ("key-less row", _lines(row, {"text": "hi"}), ["line 2: key: missing field"]),
        ("a text that is a number", _lines(row, {"key": "1", "text": 5}), ["line 2: text: expected str, got int"]),
        ("every text a number", _lines(*({"key": str(i), "text": i} for i in range(3))), ["line 1: text: expected"]),
        ("a row that is a list", _lines(row, [1, 2]), ["line 2: expected a JSON object, got list"]),
        ("bytes that are not UTF-8", _lines(row, b'{"key": "1", "text": "' + BAD + b'"}'), ["line 2: not UTF-8"]),
    ]:
        cache.write_bytes(content + b'{"key": "2", "te')  # and a torn last line: not an error, and not cut here
        said = refused(capsys, build, f"{cache}: ", *words, "remove it to write its replies again", files=[cache])
        assert said, case
    cache.unlink()
    cache.mkdir()
    refused(capsys, build, f"{cache}: is a folder, not a generated-replies cache", absent=[out])
    monkeypatch.setenv("CSO_GENERATED_CACHE", str(raw / "train.jsonl"))
    refused(
        capsys,
        build,
        "cannot hold the generated-replies cache (it is a file)",
        files=[raw / "train.jsonl"],
        absent=[out],
    )


# ---------------------------------------------------------------- the study's records and sizes
@pytest.fixture
def study_args(esconv_dir, tmp_path):
    """`study --until data` on a small ESConv copy (4 train, 3 valid, 6 test dialogues)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 4), ("valid", 3), ("test", 6)):
        (raw / f"{split}.jsonl").write_text("".join((esconv_dir / f"{split}.jsonl").read_text().splitlines(True)[:n]))
    args = ["study", "--config", REPO / "configs" / "study.yaml", "--until", "data", "--run.out_dir", tmp_path / "s"]
    args += ["--data.input", raw, "--study.model", "tiny", "--study.cluster", "debug", "--study.train_dialogues", 2]
    return args + ["--study.valid_dialogues", 2, "--study.test_turns", 12, "--study.generate_dialogues", 1]


@pytest.mark.parametrize(
    "key, size, split, held",
    [("train_dialogues", 100, "train", 4), ("valid_dialogues", 9, "valid", 3), ("eval_dialogues", 9, "valid", 3)]
    + [("test_dialogues", 9, "test", 6)],
)
def test_study_sizes_past_their_split_are_refused(study_args, tmp_path, capsys, key, size, split, held):
    over = ["--study.test_turns", 0] if key == "test_dialogues" else []
    said = f"study.{key}: {size} dialogues asked, the {split} split holds {held}"
    refused(capsys, [*study_args, f"--study.{key}", size, *over], said, absent=[tmp_path / "s"])


def test_a_torn_study_marker_is_a_named_error(study_args, tmp_path, capsys):
    assert _run(study_args, capsys)[0] == 0
    data = tmp_path / "s" / "data"
    marker = data / "subsets.json"
    text = marker.read_bytes()
    marker.write_bytes(text[: len(text) // 2])
    refused(capsys, study_args, f"{marker}: bad JSON: ends mid-value", files=list(data.iterdir()))
    marker.write_text("[1, 2]")
    refused(capsys, study_args, f"{marker}: expected a JSON object, got list", files=list(data.iterdir()))
    marker.write_bytes(text)
    assert _run(study_args, capsys)[0] == 0


# ---------------------------------------------------------------- a reference cache's manifest
def test_a_damaged_manifest_says_what_is_wrong(tmp_path, capsys):
    cache = tmp_path / "refcache"
    cache.mkdir()
    (cache / "manifest.json").write_text("[1, 2]")
    out = tmp_path / "pairs.jsonl"
    said = f"reference cache {cache}: manifest.json is damaged (expected a JSON object, got list); delete {cache}"
    refused(capsys, ["cache", "export", cache, "--out", out], said, files=[cache / "manifest.json"], absent=[out])
    (cache / "manifest.json").write_bytes(b'{"key": "' + BAD + b'"}')
    refused(
        capsys, ["cache", "export", cache, "--out", out], "is damaged (line 1: not UTF-8 text (byte 12", absent=[out]
    )
