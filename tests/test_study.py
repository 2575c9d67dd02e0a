"""`cso-dist study` end to end on a tiny model (debug cluster: the launcher's code path in one process), its
resume (a rerun submits nothing and gives the same table), its selection on valid, and the seed statistics."""

import json
import math
from pathlib import Path

import pytest

from cso_dist.config import load_config
from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.eval.compare import paired
from cso_dist.study.run import run_study
from conftest import REPO, run_cli

TINY = {
    "study.model": "tiny",
    "study.cluster": "debug",
    "study.train_dialogues": 2,
    "study.valid_dialogues": 2,
    "study.test_turns": 12,
    "study.generate_dialogues": 1,
    "study.seeds": [0, 1],
    "study.losses": ["dpo", "simpo", "kto"],
    "study.sweep": ["dpo train.lr=1e-3,3e-2"],
    "study.cpu_bf16": False,
    "eval.max_new_tokens": 6,
    "tiny_model.hidden_size": 32,
    "tiny_model.tokenizer": "bpe",  # an ESConv BPE: a small LM head (the Qwen vocabulary's would be most of the time)
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, esconv_dir):
    out = tmp_path_factory.mktemp("study")
    cfg = load_config("configs/study.yaml", {**TINY, "run.out_dir": str(out), "data.input": str(esconv_dir)})
    return cfg, out, run_study(cfg)


@pytest.mark.slow
def test_study_runs_every_phase_and_reports_seeds(study):
    cfg, out, result = study
    summary, selection = result["summary"], result["selection"]
    assert list(summary) == ["base", "sft", "dpo", "simpo", "kto"]
    assert [summary[m]["seeds"] for m in summary] == [1, 2, 2, 2, 2]
    # CSO starts from its seed's merged SFT model, which is also its reference (one cache per seed and reply kinds)
    for run, seed, kinds in (
        ("sweep/dpo/lr=1e-3", 0, ["c", "r"]),
        ("seeds/dpo/seed=1", 1, ["c", "r"]),
        ("seeds/kto/seed=1", 1, ["c", "r", "kl"]),
    ):
        c = load_config(out / run / "resolved-config.yaml", {})
        info = json.loads((Path(c.train.ref_cache) / "manifest.json").read_text())["info"]
        assert (
            c.model.path == str(out / "sft" / f"seed={seed}" / "final")
            and (Path(c.model.path) / "model.safetensors").is_file()
        )
        assert (info["model_path"], info["method_reference"], info["reply_kinds"]) == (c.model.path, "full", kinds)
    # the test subset: whole dialogues up to >= study.test_turns turns; the generation subset is apart from it
    test_ids = {json.loads(x)["id"] for x in (out / "data" / "test.jsonl").read_text().splitlines()}
    gen_ids = {json.loads(x)["id"] for x in (out / "data" / "generate.jsonl").read_text().splitlines()}
    assert not test_ids & gen_ids and len(gen_ids) == 1
    assert result["subsets"]["test"] >= 12 and summary["sft"]["test_turns"] == result["subsets"]["test"]
    # selection: the highest valid Q of the grid (ties: lower B), never a test score
    pts = selection["dpo"]["points"]
    assert [p["point"] for p in pts] == ["lr=1e-3", "lr=3e-2"]
    best = max(pts, key=lambda p: (p["Q"], -p["B"]))
    assert selection["dpo"]["chosen"] == best["point"] and selection["dpo"]["overrides"] == {
        "train.lr": best["point"].split("=")[1]
    }
    seed1 = load_config(out / "seeds" / "dpo" / "seed=1" / "resolved-config.yaml", {})
    assert seed1.train.lr == float(best["point"].split("=")[1]) and seed1.run.seed == 1
    assert seed1.model.path == str(out / "sft" / "seed=1" / "final")  # each seed from its own SFT
    # every run in its own folder, with its scores; the mean and std are those of the seeds' files
    q = [
        json.loads((out / d / "eval" / "scores-test-likelihood.json").read_text())["Q"]
        for d in ("sft/seed=0", "sft/seed=1")
    ]
    assert summary["sft"]["test"]["Q"]["values"] == q
    assert math.isclose(summary["sft"]["test"]["Q"]["mean"], sum(q) / 2)
    assert summary["dpo"]["vs_sft"]["Q"]["seeds"] == 2
    # the report: the groups' plots and table, and the study's table
    report = (out / "report" / "report.md").read_text()
    assert "## groups" in report and "| dpo | 2 |" in report
    for png in ("groups-pred-test-likelihood.png", "groups-pred-test-likelihood-strengths.png"):
        assert (out / "report" / png).stat().st_size > 1000
    assert (out / "report" / "groups-pred-test-likelihood-dpo-confusion.png").is_file()
    md = (out / "study.md").read_text()
    assert "| simpo | 2 |" in md and "Selection on the valid subset" in md
    assert {t["phase"] for t in map(json.loads, (out / "timing.jsonl").read_text().splitlines())} >= {"sft", "seeds"}


@pytest.mark.slow
def test_study_rerun_submits_nothing_and_gives_the_same_table(study, capsys):
    cfg, out, first = study
    capsys.readouterr()
    again = run_study(cfg)
    printed = capsys.readouterr().out
    assert printed.count("0 submitted") == 5 and "submitted" not in printed.replace("0 submitted", "")
    assert again["summary"] == first["summary"] and again["selection"] == first["selection"]
    # the subsets are fixed once made: a study folder refuses other subset settings
    other = load_config(
        "configs/study.yaml",
        {**TINY, "run.out_dir": str(out), "data.input": cfg.data.input, "study.train_dialogues": 3},
    )
    with pytest.raises(CsoError, match=r"subsets.json: made with study.train_dialogues 2, this study has 3"):
        run_study(other)


@pytest.mark.slow
def test_eval_report_groups_from_the_command_line(study, tmp_path):
    _, out, _ = study
    runs = [out / "sft" / "seed=0", out / "sft" / "seed=1"]
    proc = run_cli("eval", "report", *runs, "--group", f"sft={runs[0]},{runs[1]}", "--out", tmp_path, check=True)
    assert "report:" in proc.stdout and "| sft | 2 |" in (tmp_path / "report.md").read_text()
    bad = run_cli("eval", "report", runs[0], "--group", "nothing")
    assert bad.returncode != 0 and "expected NAME=RUN1,RUN2" in bad.stderr


def test_paired_seed_differences():
    up = paired([0.30, 0.33, 0.31], [0.20, 0.21, 0.20], higher_is_better=True)
    assert up["verdict"] == "better" and up["better_seeds"] == 3 and up["ci95"][0] > 0
    assert math.isclose(up["mean"], (0.10 + 0.12 + 0.11) / 3)
    mixed = paired([0.30, 0.18, 0.25], [0.20, 0.21, 0.20], higher_is_better=True)
    assert mixed["verdict"] == "within the seed spread" and mixed["better_seeds"] == 2
    b = paired([1.0, 1.1, 1.05], [1.3, 1.35, 1.32], higher_is_better=False)  # B: lower is better
    assert b["verdict"] == "better" and b["ci95"][1] < 0
    assert paired([1.5, 1.6, 1.55], [1.3, 1.35, 1.32], higher_is_better=False)["verdict"] == "worse"
    assert paired([0.3], [0.2], True)["verdict"] == "within the seed spread"  # one seed: no spread to beat


@pytest.mark.parametrize(
    "sweep, message",
    [
        (["xpo train.lr=1e-4"], "'xpo' is not one of study.losses"),
        (["dpo train.lr=fast"], "study.sweep[0]: train.lr: expected a number"),
        (["dpo run.seed=1,2"], "'run.seed' is set by the study itself"),
        (["dpo train.lr"], "expected KEY=V1,V2"),
        (["dpo slurm.nodes=2"], "not a key of a training section"),
        (["dpo train.lr=1e-4", "dpo train.lr=1e-3"], "a second grid for dpo"),
    ],
)
def test_study_sweep_entries_are_checked_at_load(sweep, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("configs/study.yaml", {"study.sweep": sweep})


def test_study_config_is_the_recipe_the_readme_measures():
    cfg = load_config("configs/study.yaml")
    grids = cfg.study.grids()
    assert set(grids) == set(cfg.study.losses) == {"dpo", "ipo", "simpo", "kto", "orpo"}
    assert len(cfg.study.seeds) >= 3 and cfg.study.test_turns >= 1000
    # every loss is tuned: at least two points, over the learning rate or (IPO) its beta
    assert all(math.prod(len(v) for v in g.values()) >= 2 for g in grids.values())
    assert all("train.lr" in g for g in grids.values()) and len(grids["ipo"]["train.beta"]) >= 2
    assert cfg.slurm.array_parallelism == 1 and cfg.slurm.gpus_per_node == 0


@pytest.mark.parametrize("name", ["study-sources", "study-gpu"])
def test_the_source_study_configs_are_the_studies_their_headers_describe(name):
    """The data-source studies (their header command runs the whole study, so it is not run here: the tiny
    study above is its code path, and the GPU kit's study section runs study-gpu.yaml's): at least 3 seeds,
    DPO and ORPO, every arm scored on ESConv test turns."""
    path = REPO / "configs" / f"{name}.yaml"
    assert f"`cso-dist study --config configs/{name}.yaml" in path.read_text()
    cfg = load_config(path)
    assert len(cfg.study.seeds) >= 3 and {"dpo", "orpo"} <= set(cfg.study.losses) and cfg.study.test_turns >= 300
    assert cfg.study.cluster == "inline" and cfg.study.sweep == []
    if name == "study-sources":  # the CPU study: sources compared on >= 24 dialogues, the demo's pick made on valid
        assert len(cfg.study.sources) >= 2 and cfg.study.train_dialogues >= 24 and cfg.study.valid_dialogues > 0
    else:  # the GPU study: every train dialogue
        assert cfg.study.train_dialogues == 0 and cfg.model.path.startswith("HuggingFaceTB/")


@pytest.mark.slow
def test_a_finished_run_counts_only_for_its_own_config(study):
    from cso_dist.train.rundir import finished_run

    _, out, _ = study
    run = out / "sft" / "seed=1"
    cfg = load_config(run / "resolved-config.yaml", {})
    assert finished_run(cfg)["method"] == "sft"
    assert finished_run(load_config(run / "resolved-config.yaml", {"train.log_every": 7})) is not None  # may change
    assert finished_run(load_config(run / "resolved-config.yaml", {"train.lr": 0.123})) is None  # another run


@pytest.mark.slow
def test_finished_scores_count_only_for_the_model_and_data_that_made_them(study):
    """A rerun reuses a run's test scores only when its PRED file's recorded origin is this model on this
    data; the scores of another model are refused, naming the difference, not reused."""
    from cso_dist.eval.score import finished_tasks

    cfg, out, _ = study
    run = out / "sft" / "seed=1"
    tasks = [("test", str(out / "data" / "test.jsonl"), "likelihood")]
    assert (run / "eval" / "scores-test-likelihood.json").is_file()
    mine = load_config(run / "resolved-config.yaml", {"model.path": str(run / "final"), "model.finetune": "full"})
    scores = finished_tasks(mine, tasks)
    assert scores is not None and 0.0 <= scores["test/Q"] <= 1.0
    other_model = str(out / "sft" / "seed=0" / "final")
    other = load_config(run / "resolved-config.yaml", {"model.path": other_model, "model.finetune": "full"})
    with pytest.raises(CsoError, match=r"scores-test-likelihood.json: scored from model .*seed=1.*seed=0"):
        finished_tasks(other, tasks)


@pytest.mark.slow
def test_the_data_source_is_a_study_axis(tmp_path, esconv_dir, monkeypatch):
    """study.sources: each loss runs on each source's train file (the same dialogues, other non-preferred
    replies), with a reference cache per source; SFT trains once per seed on the gold replies; the table has a
    row per loss and source, each paired against SFT."""
    monkeypatch.setenv("CSO_GENERATED_CACHE", str(tmp_path / "generated"))
    over = {
        **TINY,
        "study.cluster": "inline",
        "study.losses": ["dpo"],
        "study.sweep": [],
        "study.valid_dialogues": 0,
        "study.generate_dialogues": 0,
        "study.seeds": [0, 1],
        "study.sources": ["retrieval", "retrieval-balanced", "generated-both"],
        "study.generate_max_tokens": 6,
        "run.out_dir": str(tmp_path / "study"),
        "data.input": str(esconv_dir),
    }
    res = run_study(load_config("configs/study.yaml", over))
    out = tmp_path / "study"
    assert set(res["summary"]) == {"base", "sft", "dpo@retrieval", "dpo@retrieval-balanced", "dpo@generated-both"}
    assert all(res["summary"][a]["vs_sft"]["Q"]["seeds"] == 2 for a in res["summary"] if a.startswith("dpo@"))
    subset = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    for src in ("retrieval-balanced", "generated-both"):
        rows = [json.loads(x) for x in (out / "data" / f"train@{src}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [r["id"] for r in subset]
        assert all(r["meta"]["negatives_from"] == src for r in rows)
        cfg = load_config(out / "sweep" / f"dpo@{src}" / "seed=0" / "resolved-config.yaml", {})
        assert cfg.train.train_file == str(out / "data" / f"train@{src}.jsonl")
        assert cfg.train.ref_cache.endswith(f"sft-seed=0@{src}")
    assert load_config(out / "sft" / "seed=0" / "resolved-config.yaml", {}).train.train_file == str(
        out / "data" / "train.jsonl"
    )
    notes = json.loads((out / "data" / "sources.json").read_text())
    assert notes["generated-both"]["replies_written"] > 0 and "strategy_sides" in notes["retrieval-balanced"]
    assert "dpo@generated-both" in (out / "study.md").read_text()
    plain = load_config(out / "sweep" / "dpo@retrieval" / "seed=0" / "resolved-config.yaml", {})
    assert plain.train.train_file == str(out / "data" / "train.jsonl") and plain.train.ref_cache.endswith("seed=0")
    # a rerun writes nothing: same data, same runs, same table
    timing = (out / "timing.jsonl").read_text()
    again = run_study(load_config("configs/study.yaml", over))
    assert again["summary"] == res["summary"] and (out / "timing.jsonl").read_text() == timing
    # another writer for a generated source is refused, not silently ignored
    with pytest.raises(CsoError, match="made with generate_max_tokens 6, this study has 7"):
        run_study(load_config("configs/study.yaml", {**over, "study.generate_max_tokens": 7}))


@pytest.mark.slow
def test_cso_can_start_from_the_base_model_with_the_base_as_reference(tmp_path, esconv_dir):
    """study.start_from [sft, base]: each arm runs from the seed's SFT model and from the base model, each with its
    start model as the reference (its own cache); the first step of each is ln 2 (policy = reference). With
    eval.calibrate prior the report checks strategy against prior; the test dialogues go into the ledger; a rerun
    reuses every calibrated score."""
    over = {
        **TINY,
        "study.cluster": "inline",
        "study.losses": ["dpo"],
        "study.sweep": [],
        "study.valid_dialogues": 0,
        "study.seeds": [0],
        "study.sources": ["retrieval-balanced"],
        "study.start_from": ["sft", "base"],
        "study.test_ledger": str(tmp_path / "ledger.jsonl"),
        "study.generate_dialogues": 1,
        "eval.mode": "likelihood",
        "eval.calibrate": "prior",
        "eval.calibrate_dialogues": 2,
        "study.resamples": 20,
        "run.out_dir": str(tmp_path / "study"),
        "data.input": str(esconv_dir),
    }
    res = run_study(load_config("configs/study.yaml", over))
    out = tmp_path / "study"
    (entry,) = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]  # scored: recorded
    assert entry == json.loads((out / "test-ledger.json").read_text()) and entry["by"] == str(out)
    assert entry["subsets"]["test"][0] == "esconv-test-0" and len(entry["subsets"]["test"]) >= 1
    arms = {"dpo@retrieval-balanced": "sft", "dpo@retrieval-balanced-from-base": "base"}
    assert set(res["summary"]) == {"base", "sft", *arms}
    for arm, start in arms.items():
        cfg = load_config(out / arm / "resolved-config.yaml", {})
        want = out / "tiny-model" if start == "base" else out / "sft" / "final"
        assert Path(cfg.model.path) == want, (arm, cfg.model.path)
        assert cfg.train.ref_cache == str(out / "refcache" / f"{start}-seed=0@retrieval-balanced")
        first = json.loads((out / arm / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4), (arm, first)
    text = (out / "study.md").read_text()
    assert "dpo@retrieval-balanced-from-base" in text and "## Strategy or prior" in text
    prior = res["prior"]  # eval.calibrate prior: raw, calibrated and first-token picks; against SFT and base
    assert set(prior["models"]) == {"base", "sft", *arms}
    assert "dpo@retrieval-balanced-from-base vs base (calibrated)" in prior["vs"]
    assert set(prior["agreement"]) == {"raw", "calibrated", "first_token", "generated_turns"}
    assert (out / "base" / "eval" / "pred-calibration-valid.jsonl").is_file()  # the base model's own offsets
    # a rerun reuses the calibrated scores (their origin holds the offsets, refitted from the calibration file)
    again = run_study(load_config("configs/study.yaml", over))
    assert again["prior"] == prior and again["summary"] == res["summary"]


def test_a_key_the_study_sets_in_each_run_is_refused(tmp_path):
    """train.method, run.seed, ... are set per run by the study (study.losses, study.seeds): set in its config they
    would be ignored, so the study refuses them before anything is written."""
    over = {**TINY, "run.out_dir": str(tmp_path / "s")}
    for key, value in (("train.method", "ipo"), ("run.seed", 7), ("data.negatives_from", "retrieval-balanced")):
        with pytest.raises(ConfigError, match=rf"{key}: set by the study in each run"):
            run_study(load_config("configs/study.yaml", {**over, key: value}))
    assert not (tmp_path / "s").exists()


def test_the_test_ledger_refuses_dialogues_another_study_scored(tmp_path, esconv_dir):
    """study.test_from / generate_from place the subsets; a ledger entry of another study that holds one of their
    dialogues stops the study before anything runs, naming it, unless study.reuse_test."""
    from cso_dist.eval.ledger import record

    ledger = tmp_path / "ledger.jsonl"
    over = {
        **TINY,
        "study.test_turns": 0,
        "study.test_dialogues": 3,
        "study.test_from": 83,
        "study.generate_dialogues": 1,
        "study.generate_from": 90,
        "study.test_ledger": str(ledger),
        "run.out_dir": str(tmp_path / "a"),
        "data.input": str(esconv_dir),
    }
    res = run_study(load_config("configs/study.yaml", over), until="data")
    ids = lambda f: [json.loads(x)["id"] for x in Path(f).read_text().splitlines()]  # noqa: E731
    assert ids(res["files"]["test"]) == ["esconv-test-83", "esconv-test-84", "esconv-test-85"]
    assert ids(res["files"]["generate"]) == ["esconv-test-90"]
    record(ledger, tmp_path / "a", "runs/demo", "demo", {"test": ["esconv-test-0", "esconv-test-84"]})
    again = {**over, "run.out_dir": str(tmp_path / "b")}
    with pytest.raises(
        CsoError,
        match=r"1 of this study's 4 test dialogues were scored before by runs/demo .*"
        r"esconv-test-84.*study.reuse_test",
    ):
        run_study(load_config("configs/study.yaml", again), until="data")
    run_study(load_config("configs/study.yaml", {**again, "study.reuse_test": True}), until="data")
    inside = {**again, "run.out_dir": str(tmp_path / "c"), "study.generate_from": 84, "study.test_ledger": ""}
    with pytest.raises(CsoError, match="do not fit beside the test subset's 83 to 85"):
        run_study(load_config("configs/study.yaml", inside), until="data")
    with pytest.raises(ConfigError, match="study.reuse_test"):
        load_config("configs/study.yaml", {**inside, "study.reuse_test": True})
