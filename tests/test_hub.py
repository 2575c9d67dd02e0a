"""Hub ids as model names, through a hand-built HF cache (huggingface_hub's own layout: models--org--name with
refs/ and snapshots/), offline: resolution, revisions, adapters whose base is a Hub id, and every command that
names a model (train, precompute, eval, plan, mcts, --dry-run, model download)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import HF_CACHE, argv, hub_snapshot, run_cli, run_overrides, tiny_run_data

from cso_dist.cli import main
from cso_dist.util.errors import ConfigError
from cso_dist.models import hub
from cso_dist.models.load import adapter_base_path

QWEN = "Qwen/Qwen2.5-7B-Instruct"


def test_the_tests_see_their_own_offline_cache():
    assert hub.cache_folder() == str(HF_CACHE) and hub.offline()


def test_a_hub_id_is_its_snapshot_and_a_revision_pins_another(hf_cache, tmp_path):
    _, snaps = hf_cache
    assert hub.resolve(QWEN) == snaps[QWEN] and (snaps[QWEN] / "config.json").is_file()
    assert hub.is_hub_id(QWEN) and not hub.is_hub_id(str(tmp_path)) and not hub.is_hub_id("runs/a/final")
    assert not hub.is_hub_id("../x")
    other = tmp_path / "v2"
    shutil.copytree(snaps[QWEN], other)
    (other / "marker").write_text("v2")
    v2 = hub_snapshot(QWEN, other, revision="v2")
    assert hub.resolve(QWEN, "v2") == v2 != snaps[QWEN]
    assert hub.resolve(QWEN, v2.name) == v2  # a commit hash
    with pytest.raises(ConfigError, match=r"model.path: 'Qwen/Qwen2.5-7B-Instruct' at revision v9 is neither"):
        hub.resolve(QWEN, "v9")
    with pytest.raises(ConfigError, match=r"cso-dist model download nobody/nothing"):
        hub.resolve("nobody/nothing")
    # a folder of that name here wins over the Hub id
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    assert hub.resolve(str(local)) == local


def test_an_adapter_whose_base_is_a_hub_id_finds_it_in_the_cache(hf_cache, tmp_path):
    _, snaps = hf_cache
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": QWEN}))
    assert adapter_base_path(tmp_path) == snaps[QWEN]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "gone/model"}))
    with pytest.raises(ConfigError, match=r"base model of adapter .* 'gone/model' is neither a folder"):
        adapter_base_path(tmp_path)


def test_model_download_without_network_is_one_line(hf_cache):
    got = run_cli("model", "download", QWEN)  # cached: no network needed
    assert got.returncode == 0 and str(hf_cache[1][QWEN]) in got.stdout, got.stderr
    got = run_cli("model", "download", "nobody/nothing")
    assert got.returncode == 2 and "HF_HUB_OFFLINE is set" in got.stderr and len(got.stderr.splitlines()) == 1
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "3"}
    got = run_cli("model", "download", QWEN, env=env)  # online, it asks the Hub; unreachable: the cached snapshot
    assert got.returncode == 0 and str(hf_cache[1][QWEN]) in got.stdout, got.stderr
    got = run_cli("model", "download", "nobody/nothing", env=env)
    assert got.returncode == 2 and "cannot download 'nobody/nothing' from the Hub" in got.stderr, got.stderr
    assert len(got.stderr.strip().splitlines()) == 1 and "Traceback" not in got.stderr


def test_the_other_local_ranks_wait_while_local_rank_0_downloads(hf_cache):
    """A snapshot folder exists from the first downloaded file on: the other local ranks take it only once no
    download holds the lock in the HF cache (here held by this test, as local rank 0 would)."""
    from cso_dist.util.io import one_writer

    snap = hf_cache[1][QWEN]
    assert hub.ensure(QWEN, None, local_rank=0, timeout_s=1) == snap  # cached: no lock, no download
    with one_writer(hub._lock(QWEN), f"download of {QWEN}"):
        with pytest.raises(ConfigError, match=r"was not downloaded into the HF cache within 3 s"):
            hub.ensure(QWEN, None, local_rank=1, timeout_s=3)
    assert hub.ensure(QWEN, None, local_rank=1, timeout_s=3) == snap


def test_plan_and_mcts_take_a_hub_id(hf_cache, capsys):
    from cso_dist.mcts.backends import HFBackend

    assert main(["plan", "--model", QWEN, "--gpu-mem", "24"]) == 0
    assert capsys.readouterr().out.startswith("qwen2: 0.0")  # the tiny model's shape, read from the snapshot
    backend = HFBackend(QWEN)
    assert backend.folder == hf_cache[1][QWEN] and backend.name == f"hf:{hf_cache[1][QWEN].resolve()}"


@pytest.mark.slow
def test_train_precompute_eval_and_dry_run_take_a_hub_id(hf_cache, esconv_dir, tmp_path, capsys):
    """A DPO run with model.path = a Hub id: dry-run says it is cached, precompute keys the cache by the
    snapshot's files (another revision is refused by that cache), train and eval run on the snapshot."""
    tiny = tiny_run_data(tmp_path, esconv_dir, n_train=3, n_valid=1)
    snap = hub_snapshot("acme/tiny-chat", tiny)
    over = run_overrides(tmp_path, "run", **{"model.path": "acme/tiny-chat", "train.max_steps": 2})

    assert main(["train", "--dry-run", *argv(over)]) == 0
    said = capsys.readouterr().out
    assert f"model: Hub id acme/tiny-chat: in the HF cache, snapshot {snap}" in said, said

    assert main(["precompute", *argv(over)]) == 0
    manifest = json.loads((tmp_path / "refcache" / "manifest.json").read_text())
    assert str(snap.resolve()) in json.dumps(manifest)
    assert main(["train", *argv(over)]) == 0
    assert (tmp_path / "run" / "final").is_dir()
    capsys.readouterr()

    eval_over = {**over, "eval.max_dialogues": 1, "run.out_dir": str(tmp_path / "ev")}
    assert (
        main(["eval", "generate", "--mode", "likelihood", "--data", str(tmp_path / "valid.jsonl"), *argv(eval_over)])
        == 0
    )
    origin = json.loads(next((tmp_path / "ev" / "eval").glob("*.origin.json")).read_text())
    assert origin["model"] == str(snap.resolve())

    # another revision of the same id is other weights: the cache of the first refuses it, naming the model
    other = tmp_path / "v2"
    shutil.copytree(tiny, other)
    (other / "config.json").write_text(
        (other / "config.json").read_text().replace('"rms_norm_eps"', '"x_note": 1, "rms_norm_eps"')
    )
    hub_snapshot("acme/tiny-chat", other, revision="v2")
    code = main(["precompute", *argv({**over, "model.revision": "v2"})])
    err = capsys.readouterr().err
    assert code == 2 and "was built for a different" in err and "model" in err, err

    # offline and not cached: dry-run names the command that fetches it
    code = main(["train", "--dry-run", *argv({**over, "model.path": "acme/absent"})])
    err = capsys.readouterr().err
    assert code == 2 and "cso-dist model download acme/absent" in err, err


def test_esconv_is_fetched_when_missing_and_online(esconv_dir, tmp_path):
    """`data build` (what `make demo` runs first) with no ESConv on the machine: online, it fetches the split from
    the Hub (here a local server speaking the Hub's file protocol) and builds; offline, one line says what to do."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {
        f"{split}.json": "".join((esconv_dir / f"{split}.jsonl").read_text().splitlines(keepends=True)[:4]).encode()
        for split in ("train", "valid", "test")
    }
    asked = []

    class Hub(BaseHTTPRequestHandler):
        def _answer(self, body: bool):
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            asked.append((self.command, self.path))
            if not self.path.startswith("/datasets/thu-coai/esconv/resolve/main/") or name not in files:
                self.send_response(404)
                self.end_headers()
                return
            data = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", "a" * 40)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data_dir = tmp_path / "data"
    env = {
        "CSO_DATA_DIR": str(data_dir),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
    }
    try:
        off = run_cli("data", "build", "--split", "train", "--out", tmp_path / "off.jsonl", env=env)
        assert off.returncode == 2 and "ESConv not found" in off.stderr and "cso-dist data fetch esconv" in off.stderr
        assert len(off.stderr.strip().splitlines()) == 1 and not asked and not (tmp_path / "off.jsonl").exists()
        on = run_cli(
            "data", "build", "--split", "train", "--out", tmp_path / "on.jsonl", env={**env, "HF_HUB_OFFLINE": "0"}
        )
    finally:
        server.shutdown()
    assert on.returncode == 0, on.stderr
    assert "fetching it from the Hugging Face Hub" in on.stdout
    for split in ("train", "valid", "test"):
        assert (data_dir / "esconv" / f"{split}.jsonl").read_bytes() == files[f"{split}.json"]
    assert len((tmp_path / "on.jsonl").read_text().splitlines()) == 4
