"""scripts/gpu_check.py, the prepared GPU run, works end to end: its --smoke mode on CPU (tiny shapes, fp32)
writes the JSON the GPU run writes, and its exactness figures hold."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path, esconv_dir):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "CSO_DATA_DIR": str(esconv_dir.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] == "cpu"
    ex = r["exactness"]
    for method in ("tree", "flex", "dense"):  # fp32: every method equals the per-pair layout
        assert ex[method]["replies"] > 20 and ex[method]["max_rel_diff_vs_per_pair"] < 1e-5, (method, ex[method])
    assert ex["tree"]["grad_max_rel_diff_vs_dense"] < 1e-4
    t = r["throughput"]["tiny"]
    for v in ("trie_tree", "trie_dense", "per_pair"):
        assert t[v]["pairs_per_step"] == t["trie_tree"]["pairs_per_step"] > 0 and t[v]["tokens_per_s"] > 0
    assert t["per_pair"]["tokens_per_step"] > 3 * t["trie_tree"]["tokens_per_step"]  # the trie shares histories
    assert "skipped" in t["trie_flex"] and ("skipped" in t["trl_dpo"] or t["trl_dpo"]["pairs_per_s"] > 0)
    for method in ("qlora", "full"):
        m = r["memory"][method]
        assert m["measured_peak_gib"] is None and m["planned_gib"] > 0 and m["row_tokens"] > 500
