"""Malformed input exits non-zero with one line naming file, record and field; --skip-invalid reports."""

import json

import pytest

from conftest import run_cli, write_jsonl

GOOD = {"prompt": "I feel alone.", "chosen": "(Question) What happened?", "rejected": "(Others) Okay."}
ESCPRO_GOOD = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "strategy": "Affirmation", "negative": []},
    ]
}


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "source,row,needles",
    [
        ("trl", {**GOOD, "chosen": 5}, ["line 2", "chosen", "expected dict/str/list, got int"]),
        ("trl", {"prompt": "x", "chosen": "(Question) a"}, ["line 2", "rejected", "missing field"]),
        ("trl", {**GOOD, "chosen": "(Question)   "}, ["line 2", "chosen", "empty text"]),
        ("trl", {**GOOD, "chosen": "(Questions) What?"}, ["line 2", "chosen", "unknown strategy 'Questions'"]),
        ("trl", {**GOOD, "rejected": "no strategy here"}, ["line 2", "rejected", "'(<strategy>) ' prefix"]),
        (
            "cso-rows",
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                "chosen": {"role": "assistant", "content": "(Question) x"},
                "reject": {"role": "assistant", "content": "(Others) y"},
            },
            ["line 2", "messages[1].role", "not alternating"],
        ),
        (
            "escpro",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "strategy": "Affirmation"},
                ]
            },
            ["line 2", "messages[1].content", "empty text"],
        ),
        (
            "escpro",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": "x",
                        "strategy": "Affirmation",
                        "negative": [{"content": "y", "strategy": "Nope"}],
                    },
                ]
            },
            ["line 2", "messages[1].negative[0].strategy", "unknown strategy 'Nope'"],
        ),
    ],
)
def test_bad_records(tmp_path, source, row, needles):
    good = ESCPRO_GOOD if source == "escpro" else GOOD
    if source == "cso-rows":
        good = {
            "messages": [{"role": "user", "content": "a"}],
            "chosen": {"role": "assistant", "content": "(Question) x"},
            "reject": {"role": "assistant", "content": "(Others) y"},
        }
    path = write_jsonl(tmp_path / "in.jsonl", [good, row])
    proc = run_cli("data", "build", "--from", source, "--input", path, "--out", tmp_path / "o.jsonl")
    line = _one_line_error(proc, *needles)
    assert str(path) in line
    assert not (tmp_path / "o.jsonl").exists()
    # --skip-invalid: the good record is kept, the bad one is counted with its reason
    proc = run_cli("data", "build", "--from", source, "--input", path, "--out", tmp_path / "o.jsonl", "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 preference dialogues" in proc.stdout
    assert "skipped 1 invalid records" in proc.stdout


def test_bad_json_line_and_skip(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n")
    _one_line_error(
        run_cli("data", "build", "--from", "trl", "--input", path, "--out", tmp_path / "o.jsonl"),
        str(path),
        "line 2",
        "bad JSON",
    )
    proc = run_cli("data", "build", "--from", "trl", "--input", path, "--out", tmp_path / "o.jsonl", "--skip-invalid")
    assert proc.returncode == 0 and "bad-json: 1" in proc.stdout


def test_bad_json_array_file(tmp_path):
    path = tmp_path / "ESC-Pro.json"
    path.write_text('[{"messages": []},')
    _one_line_error(
        run_cli("data", "build", "--from", "escpro", "--input", path, "--out", tmp_path / "o.jsonl"),
        str(path),
        "bad JSON",
    )


def test_alias_map_is_opt_in(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{**GOOD, "chosen": "(questions) What?", "rejected": "(Other) ok"}])
    _one_line_error(
        run_cli("data", "build", "--from", "trl", "--input", path, "--out", tmp_path / "o.jsonl"),
        "unknown strategy 'questions'",
        "--aliases",
    )
    proc = run_cli("data", "build", "--from", "trl", "--input", path, "--out", tmp_path / "o.jsonl", "--aliases")
    assert proc.returncode == 0, proc.stderr
    d = json.loads((tmp_path / "o.jsonl").read_text())
    assert d["messages"][1]["strategy"] == "Question" and d["messages"][1]["rejected"][0]["strategy"] == "Others"


def test_missing_input_and_bad_config(tmp_path):
    _one_line_error(
        run_cli("data", "build", "--from", "trl", "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "o.jsonl"),
        "nope.jsonl",
        "no such file",
    )
    _one_line_error(
        run_cli(
            "data", "build", "--from", "trl", "--input", tmp_path / "x", "--out", tmp_path / "o", "--data.negativs", "3"
        ),
        "unknown key 'data.negativs'",
    )
    _one_line_error(run_cli("data", "stats", tmp_path / "nope.jsonl"), "no such file")


def test_missing_esconv_names_where_to_put_it(tmp_path):
    proc = run_cli(
        "data", "build", "--from", "esconv", "--out", tmp_path / "o.jsonl", env={"CSO_DATA_DIR": str(tmp_path / "data")}
    )
    line = _one_line_error(proc, "ESConv not found", str(tmp_path / "data" / "esconv"), "cso-dist data fetch esconv")
    assert "CSO_DATA_DIR" in line


def test_fetch_fails_cleanly_offline(tmp_path):
    # a closed loopback port stands in for an unreachable hub
    proc = run_cli(
        "data",
        "fetch",
        "esconv",
        "--dest",
        tmp_path,
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "3"},
    )
    _one_line_error(proc, "cannot reach the Hugging Face Hub", "Offline?", str(tmp_path / "esconv"))
