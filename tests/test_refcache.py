"""Reference log-prob cache: exact values, resume, content-addressed key, export, ranks, LoRA (real components)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from cso_dist.config import DataConfig, load_config
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import write_dialogues
from cso_dist.data.export import iter_pairs
from cso_dist.data.render import make_renderer
from cso_dist.data.strategies import load_strategy_set
from cso_dist.util.errors import CsoError
from cso_dist.models import build_tiny_model, load_model, load_tokenizer
from cso_dist.pack import collate_pairs, collate_trie, dialogue_pair_rows, lay_out, pack_units
from cso_dist.scorer import by_reply, pair_logps, trie_logps
from cso_dist.refcache import (
    KEY_COMPONENTS,
    cache_key,
    cache_root,
    cache_status,
    export_cache,
    load_reference,
    reference_kind,
    precompute,
    read_manifest,
    run_precompute,
    split_dir,
)
from cso_dist.refcache.cache import shard_file, sidecar_file

SSET = load_strategy_set("esconv")
MAX_LENGTH = 512  # the system prompt alone is ~300 BPE tokens: most turns get truncated histories


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls on a shared 2-core box: 2 OpenMP threads are ~50x slower than 1 under load
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(esconv_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("refcache")
    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    texts = [u["text"] for line in open(esconv_dir / "valid.jsonl") for u in json.loads(line)["dialog"]][:400]
    model = build_tiny_model("qwen2", base / "model", tokenizer="bpe", bpe_texts=texts, hidden_size=32, seed=0)
    write_dialogues(base / "train.jsonl", dialogues[:12])
    write_dialogues(base / "eval.jsonl", dialogues[12:15])
    return {"base": base, "model": model, "dialogues": dialogues}


def make_cfg(setup, out_dir, **over):
    values = {
        "model.path": str(setup["model"]),
        "train.train_file": str(setup["base"] / "train.jsonl"),
        "run.out_dir": str(out_dir),
        "refcache.dialogues_per_shard": 5,
        "data.max_length": MAX_LENGTH,
        "pack.max_tokens": 1024,
    }
    return load_config(None, {**values, **over})


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    cfg = make_cfg(setup, tmp_path_factory.mktemp("run"), **{"train.eval_file": str(setup["base"] / "eval.jsonl")})
    reports = precompute(cfg, progress=False)
    return cfg, reports, load_reference(cfg, cache_key(cfg))


def _per_pair(model_dir, dialogues):
    """reply id -> (logp, ntok) from the plain per-pair layout with full logits."""
    tok = load_tokenizer(model_dir)
    r = make_renderer(tok, "auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for d in dialogues:
            for rows in dialogue_pair_rows(d, r, SSET, MAX_LENGTH):
                b = collate_pairs(rows, tok.pad_token_id)
                out.update(zip(b.reply_ids, zip(pair_logps(model, b).tolist(), b.reply_tokens.tolist())))
    return out


def _worst(a, b, ids):
    return max(abs(a[k][0] - b[k][0]) / abs(b[k][0]) for k in ids)


@pytest.mark.numerics
@pytest.mark.slow
def test_precompute_values_equal_per_pair(setup, built):
    cfg, reports, values = built
    root = cache_root(cfg)
    assert run_precompute(cfg, progress=False) == root  # nothing left to do
    man = read_manifest(root)
    assert man["complete"] and man["n_shards"] == 3 and set(man["key"]) == set(KEY_COMPONENTS)
    assert [man["shards"][str(i)]["dialogues"] for i in range(3)] == [5, 5, 2]
    assert all(shard_file(root, i).is_file() and sidecar_file(root, i).is_file() for i in range(3))
    assert [(r.split, r.computed) for r in reports] == [("train", [0, 1, 2]), ("eval", [0])]
    assert reports[0].tokens > 10_000 and reports[0].tokens_per_s > 0

    ref = _per_pair(setup["model"], setup["dialogues"][:12])
    assert len(ref) > 400 and set(ref) <= set(values)
    assert not {k for k in values if k.endswith(":kl")}  # a DPO cache: KTO's KL branches are not scored
    assert _worst(values, ref, ref) < 1e-5
    assert all(values[k][1] == ref[k][1] for k in ref)

    ev = load_reference(cfg, cache_key(cfg, "eval"), split="eval")
    ref_ev = _per_pair(setup["model"], setup["dialogues"][12:15])
    assert set(ref_ev) <= set(ev) and not set(ev) & set(values)
    assert _worst(ev, ref_ev, ref_ev) < 1e-5


def test_resume_recomputes_only_bad_shards(setup, built, tmp_path, capsys):
    cfg0, _, values = built
    cfg = make_cfg(setup, tmp_path)
    root = cache_root(cfg)
    shutil.copytree(cache_root(cfg0), root, ignore=shutil.ignore_patterns("eval"))
    key = cache_key(cfg)
    assert load_reference(cfg, key) == values  # a copied cache is reused: the key holds contents, not paths
    shard_file(root, 0).unlink()
    data = shard_file(root, 2).read_bytes()
    shard_file(root, 2).write_bytes(data[: len(data) // 2])
    kept = shard_file(root, 1).stat().st_mtime_ns
    assert cache_status(root, key) == "partial"
    with pytest.raises(CsoError, match=r"2 of 3 shards .*shard 0: missing.*shard 2: corrupt"):
        load_reference(cfg, key)

    (rep,) = precompute(cfg, progress=False)
    assert rep.computed == [0, 2] and rep.skipped == [1] and list(rep.invalid) == [2]
    assert "shard 2: corrupt" in capsys.readouterr().out
    assert shard_file(root, 1).stat().st_mtime_ns == kept
    assert cache_status(root, key) == "complete"
    assert load_reference(cfg, key) == values


def test_key_names_what_changed(setup, built, tmp_path):
    cfg, _, _ = built
    key = cache_key(cfg)
    assert cache_key(make_cfg(setup, cfg.run.out_dir, **{"pack.max_tokens": 4096})) == key  # layout-independent
    other_data = tmp_path / "train.jsonl"
    write_dialogues(other_data, setup["dialogues"][:11])
    other_model = shutil.copytree(setup["model"], tmp_path / "model-seed1")  # same tokenizer files, new weights
    seed1 = build_tiny_model(
        "qwen2", tmp_path / "seed1", tokenizer=load_tokenizer(setup["model"]), hidden_size=32, seed=1
    )
    shutil.copy(seed1 / "model.safetensors", other_model / "model.safetensors")
    changes = {
        "data": {"train.train_file": str(other_data)},
        "truncation": {"data.max_length": 768},
        "model": {"model.path": str(other_model)},
        "dtype": {"model.precision": "bf16"},
        "reply_kinds": {"train.method": "kto"},
    }
    for name, over in changes.items():
        new = cache_key(make_cfg(setup, cfg.run.out_dir, **over))
        assert [c for c in KEY_COMPONENTS if new[c] != key[c]] == [name]
        with pytest.raises(CsoError, match=f"built for a different {name} .*rerun cso-dist precompute"):
            load_reference(cfg, new)
        assert cache_status(cache_root(cfg), new) == "stale"
        with pytest.raises(CsoError, match=f"built for a different {name}: delete .* train.ref_cache"):
            run_precompute(make_cfg(setup, cfg.run.out_dir, **over), progress=False)
    kto = make_cfg(setup, tmp_path / "kto", **{"train.method": "kto"})
    run_precompute(kto, progress=False)
    kto_values = load_reference(kto, cache_key(kto))
    dpo_values = load_reference(cfg, key)
    assert {k for k in kto_values if k.endswith(":kl")} and set(dpo_values) < set(kto_values)  # + the KL branches
    assert cache_key(make_cfg(setup, cfg.run.out_dir, **{"train.max_dialogues": 5}))["data"] != key["data"]
    junk = tmp_path / "junk"
    (junk / "refcache").mkdir(parents=True)
    (junk / "refcache" / "notes.txt").write_text("x")
    with pytest.raises(CsoError, match="no manifest.json"):
        run_precompute(make_cfg(setup, junk), progress=False)
    assert cache_status(junk / "refcache", key) == "missing"


def test_export_rows(setup, built, tmp_path):
    cfg, _, values = built
    out = tmp_path / "ref.jsonl"
    n = export_cache(cache_root(cfg), out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [pid for pid, _ in iter_pairs(setup["dialogues"][:12], SSET, "dpo")]
    assert n == len(rows) == len(pairs) and [r["pair_id"] for r in rows] == pairs
    assert all(list(r) == ["pair_id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"] for r in rows)
    for r in rows:
        turn = r["pair_id"].rsplit(":", 1)[0]
        assert (r["chosen_logp"], r["chosen_tokens"]) == values[turn + ":c"]
        assert (r["rejected_logp"], r["rejected_tokens"]) == values[r["pair_id"]]
    by_turn = {}
    for r in rows:
        by_turn.setdefault(r["pair_id"].rsplit(":", 1)[0], set()).add(r["chosen_logp"])
    assert len(by_turn) < len(rows) and all(len(v) == 1 for v in by_turn.values())
    n_eval = export_cache(split_dir(cache_root(cfg), "eval"), tmp_path / "eval.jsonl")
    assert n_eval == len(list(iter_pairs(setup["dialogues"][12:15], SSET, "dpo")))


def test_export_refuses_changed_data(setup, tmp_path):
    data = tmp_path / "small.jsonl"
    write_dialogues(data, setup["dialogues"][:2])
    cfg = make_cfg(setup, tmp_path, **{"train.train_file": str(data)})
    run_precompute(cfg, progress=False)
    write_dialogues(data, setup["dialogues"][:3])
    with pytest.raises(CsoError, match="changed since the cache was built"):
        export_cache(cache_root(cfg), tmp_path / "x.jsonl")


@pytest.mark.numerics
def test_two_ranks_equal_one(setup, built, tmp_path):
    cfg1, _, values = built
    cfg = make_cfg(setup, tmp_path)
    (r0,) = precompute(cfg, rank=0, world_size=2, progress=False)
    assert r0.mine == r0.computed == [0, 2] and not r0.complete
    assert cache_status(cache_root(cfg), cache_key(cfg)) == "partial"
    (r1,) = precompute(cfg, rank=1, world_size=2, progress=False)
    assert r1.mine == r1.computed == [1] and r1.complete
    assert load_reference(cfg, cache_key(cfg)) == values
    for i in range(3):
        assert shard_file(cache_root(cfg), i).read_bytes() == shard_file(cache_root(cfg1), i).read_bytes()


def test_lora_reference_is_the_base(setup, built, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, _, values = built
    few = {"train.max_dialogues": 3, "model.finetune": "lora"}
    cfg = make_cfg(setup, tmp_path / "lora", **few)
    assert reference_kind(cfg) == "full"
    got = load_reference(run_precompute(cfg, progress=False), cache_key(cfg))
    ids = [k for k in got if not k.endswith(":kl")]  # the last mismatched completion wraps differently
    assert len(ids) > 50 and _worst(got, values, ids) < 1e-5

    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft.save_pretrained(tmp_path / "adapter")  # no tokenizer files: the base's are used
    cfg_a = make_cfg(setup, tmp_path / "a", **few, **{"model.path": str(tmp_path / "adapter")})
    assert reference_kind(cfg_a) == "adapter-disabled"
    key_a = cache_key(cfg_a)
    assert [c for c in KEY_COMPONENTS if key_a[c] != cache_key(cfg)[c]] == ["method_reference"]
    got_a = load_reference(run_precompute(cfg_a, progress=False), key_a)
    assert set(got_a) == set(got) and _worst(got_a, values, ids) < 1e-5

    enabled = load_model(tmp_path / "adapter", "lora").eval()
    tok = load_tokenizer(setup["model"])
    laid = lay_out(setup["dialogues"][:3], make_renderer(tok, "auto"), SSET, 1024, MAX_LENGTH, progress=False)
    on: dict = {}
    with torch.no_grad():
        for group in pack_units(laid.all_units(), 1024):
            b = collate_trie(group)
            by_reply(b, trie_logps(enabled, b), on)
    assert _worst(on, got_a, ids) > 1e-3


def test_qlora_reference_is_the_quantised_base(setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels need in-features that are multiples of its 64-value blocks
    wide = build_tiny_model("qwen2", tmp_path / "h64", tokenizer=load_tokenizer(setup["model"]), hidden_size=64)
    few = {"train.max_dialogues": 2, "model.path": str(wide)}
    cfg_full = make_cfg(setup, tmp_path / "full", **few)
    cfg = make_cfg(setup, tmp_path / "q", **few, **{"model.finetune": "qlora"})
    assert reference_kind(cfg) == "qlora-base"
    assert [c for c in KEY_COMPONENTS if cache_key(cfg)[c] != cache_key(cfg_full)[c]] == ["method_reference"]
    full = load_reference(run_precompute(cfg_full, progress=False), cache_key(cfg_full))
    got = load_reference(run_precompute(cfg, progress=False), cache_key(cfg))
    assert set(got) == set(full)
    assert 1e-5 < _worst(got, full, full) < 0.05  # 4-bit weights: close to the full-precision base, not equal


@pytest.mark.numerics
def test_a_tight_budget_splits_turns_and_the_cache_still_holds_every_reply(setup, built, tmp_path):
    """pack.max_tokens too small for a turn's history + chosen + all its rejected replies: the layout re-emits
    the chosen reply as copies ("#k"); the cache stores each reply once and agrees with a roomy layout
    within the fp32 summation bound (other packed rows, other reduction order)."""
    from cso_dist.inputs import load_split, make_cfg_renderer, resolve_sset
    from numerics import summed_logp_tol

    cfg_roomy, _, want = built
    tight = make_cfg(setup, tmp_path / "tight", **{"pack.max_tokens": 600})
    laid = lay_out(
        load_split(tight, "train").dialogues,
        make_cfg_renderer(tight),
        resolve_sset(tight),
        600,
        MAX_LENGTH,
        kl=False,
        progress=False,
    )
    assert any(s.reply_id.copy for u in laid.all_units() for s in u.spans)  # the case under test occurs
    run_precompute(tight, progress=False)
    got = load_reference(tight, cache_key(tight))
    assert got.keys() == want.keys()
    assert all(
        abs(got[k][0] - want[k][0]) <= summed_logp_tol(want[k][0], want[k][1]) and got[k][1] == want[k][1] for k in want
    )


@pytest.mark.slow
def test_flex_precompute_pads_to_its_bucket_and_says_what_it_compiled(setup, built, tmp_path, capsys):
    """scorer.attention flex on the CPU (compiled, scoring only): the cache holds the tree cache's values, and the
    report line gives the padding and the graphs compiled (at most a kernel and a block mask per bucket)."""
    _, _, values = built
    write_dialogues(tmp_path / "train.jsonl", setup["dialogues"][:4])  # the first shard's dialogues, fewer of them
    over = {"scorer.attention": "flex", "pack.bucket": 512, "train.train_file": str(tmp_path / "train.jsonl")}
    cfg = make_cfg(setup, tmp_path / "flex", **over)
    reports = precompute(cfg, progress=False)
    said = capsys.readouterr().out
    assert "flex attention (rows padded to multiples of 512)" in said
    assert reports[0].compiles is not None and reports[0].compiles <= 2 * 2  # rows of <= 1024 tokens: 2 buckets
    got = load_reference(cfg, cache_key(cfg))
    assert len(got) > 100 and set(got) <= set(values) and _worst(got, values, got) < 1e-5
