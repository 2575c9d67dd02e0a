"""Where ESConv's non-preferred replies come from (data.negatives_from): strategy-balanced retrieval on the real
ESConv train split, and replies written by a model for the same history (cached, resumable, recorded)."""

import json
import re
from collections import Counter

import pytest

from cso_dist.config import DataConfig, load_config
from cso_dist.data.build import build_dialogues
from cso_dist.data.negatives import balanced_strategies, strategy_sides
from cso_dist.util.errors import ConfigError
from conftest import run_cli, tiny_run_data


def _imbalance(sides: dict, k: int) -> float:
    """The largest relative gap over strategies between the rejected count and k times the chosen count."""
    return max(abs(c["rejected"] / (k * c["chosen"]) - 1) for c in sides.values())


def test_balanced_strategies_reject_each_strategy_k_times_as_often_as_it_is_chosen():
    golds = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5 + ["e"] * 20
    plan = balanced_strategies(golds, list("abcde"), 3, seed=0)
    assert all(len(p) == len(set(p)) == 3 and g not in p for g, p in zip(golds, plan))
    used = Counter(s for p in plan for s in p)
    # a is chosen at 50 of 120 turns: rejected at most at the other 70, short of its 150; the rest is spread
    assert used["a"] == 70 and all(used[s] >= 3 * n * 0.9 for s, n in Counter(golds).items() if s != "a")
    assert plan == balanced_strategies(golds, list("abcde"), 3, seed=0)
    assert plan != balanced_strategies(golds, list("abcde"), 3, seed=1)


@pytest.fixture(scope="module")
def built(esconv_dir):
    cfg = dict(source="esconv", input=str(esconv_dir), split="train")
    return {src: build_dialogues(DataConfig(**cfg, negatives_from=src)) for src in ("retrieval", "retrieval-balanced")}


def test_retrieval_balanced_evens_out_the_sides_on_esconv_train(built):
    plain, plain_report = built["retrieval"]
    balanced, report = built["retrieval-balanced"]
    assert (
        report.notes["negatives_from"] == "retrieval-balanced" and plain_report.notes["negatives_from"] == "retrieval"
    )
    before, after = plain_report.notes["strategy_sides"], report.notes["strategy_sides"]
    print("\nstrategy: chosen, rejected by retrieval -> by retrieval-balanced")
    for s in after:
        print(f"  {s}: {after[s]['chosen']}, {before[s]['rejected']} -> {after[s]['rejected']}")
    assert after == strategy_sides(balanced)
    assert _imbalance(before, 3) > 0.3  # Restatement or Paraphrasing: rejected 1.37x as often as 3x chosen
    assert _imbalance(after, 3) < 0.01
    by_id = {d.id: d for d in balanced}
    for d in balanced[:200]:
        assert d.meta["negatives_from"] == "retrieval-balanced"
        for i in d.turn_indices():
            gold = d.messages[i]
            assert len({o.strategy for o in gold.rejected}) == 3 and gold.strategy not in {
                o.strategy for o in gold.rejected
            }
            for o, src in zip(gold.rejected, d.meta["negative_sources"][str(i)]):
                src_id, turn = src.rsplit(":", 1)
                m = by_id[src_id].messages[int(turn)]
                assert src_id != d.id and (m.strategy, m.text) == (o.strategy, o.text)


def test_negatives_from_is_refused_where_it_would_be_ignored():
    with pytest.raises(ConfigError, match="data.negatives_from: ESConv's options only"):
        load_config(None, {"data.source": "escpro", "data.negatives_from": "generated"})
    with pytest.raises(ConfigError, match="data.generator: not used with data.negatives_from retrieval"):
        load_config(None, {"data.generator": "some/model"})
    with pytest.raises(ConfigError, match="data.pool: not used with data.negatives_from retrieval-balanced"):
        load_config(None, {"data.pool": 5, "data.negatives_from": "retrieval-balanced"})
    with pytest.raises(ConfigError, match="data.generate_max_tokens: not used .* data.negatives 0"):
        load_config(None, {"data.negatives": 0, "data.negatives_from": "generated", "data.generate_max_tokens": 9})
    with pytest.raises(ConfigError, match="study.generator: used by a generated source only"):
        load_config(None, {"study.generator": "some/model"})
    with pytest.raises(ConfigError, match="study.sources: unknown: mcts"):
        load_config(None, {"study.sources": ["mcts"]})


@pytest.mark.slow
def test_generated_replies_share_the_history_and_are_cached_and_resumed(tmp_path, esconv_dir, monkeypatch):
    """`data build` with generated-both on a tiny model: every turn's options (and its preferred reply) are the
    model's continuations of that turn's own history after the strategy's prefix, recorded in the file; a rebuild
    writes nothing new, and a cache cut short is completed."""
    monkeypatch.setenv("CSO_GENERATED_CACHE", str(tmp_path / "cache"))
    model = tiny_run_data(tmp_path, esconv_dir, n_train=2, n_valid=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.jsonl").write_text("".join((esconv_dir / "train.jsonl").read_text().splitlines(True)[:2]))
    args = ["data", "build", "--from", "esconv", "--input", raw, "--out", tmp_path / "gen.jsonl"]
    over = ["--negatives-from", "generated-both", "--generator", model, "--generate-max-tokens", "8"]
    env = {"CSO_GENERATED_CACHE": str(tmp_path / "cache")}
    proc = run_cli(*args, *over, env=env, check=True)
    rows = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    turns = sum(1 for r in rows for m in r["messages"] if m.get("role") == "supporter")
    n = _notes(proc.stdout)
    assert n["replies"] == 4 * turns and 0 < n["replies_written"] <= 4 * turns  # identical prompts: written once
    assert n["replies_reused"] == 4 * turns - n["replies_written"]
    assert all(r["meta"]["negatives_from"] == "generated-both" for r in rows)
    assert all(r["meta"]["generator"]["model"] == str(model) for r in rows)
    # the same dialogues as a retrieval build, with written preferred replies in place of the gold ones
    gold, _ = build_dialogues(DataConfig(source="esconv", input=str(raw), split="train"))
    assert [r["id"] for r in rows] == [d.id for d in gold]
    sup = [(m, g) for r, d in zip(rows, gold) for m, g in zip(r["messages"], d.messages) if g.role == "supporter"]
    assert all(m["strategy"] == g.strategy for m, g in sup)
    assert sum(m["text"] != g.text for m, g in sup) >= 0.9 * len(sup) - n["empty_preferred_kept_gold"]
    for m, _ in sup:
        assert len(m["rejected"]) >= 1 and m["strategy"] not in {o["strategy"] for o in m["rejected"]}
    # the same replies again from the cache
    first = (tmp_path / "gen.jsonl").read_text()
    again = run_cli(*args, *over, env=env, check=True)
    assert _notes(again.stdout)["replies_written"] == 0 and (tmp_path / "gen.jsonl").read_text() == first
    # a cache cut short (a stop mid-write): only the missing replies are written, then none
    cache = next((tmp_path / "cache").glob("*.jsonl"))
    lines = cache.read_text().splitlines(True)
    cache.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:10])
    resumed = run_cli(*args, *over, env=env, check=True)
    assert _notes(resumed.stdout)["replies_written"] == n["replies_written"] - len(lines) // 2
    assert (tmp_path / "gen.jsonl").read_text() == first
    assert _notes(run_cli(*args, *over, env=env, check=True).stdout)["replies_written"] == 0


def _notes(stdout: str) -> dict:
    """The integer lines of `data build`'s report (`  key: N`)."""
    return {k: int(v) for k, v in re.findall(r"^  (\w+): (\d+)$", stdout, re.M)}


def test_a_shared_history_runs_once_and_gives_the_same_replies(tmp_path, esconv_dir):
    """generate_texts(share_prefix=True): one turn's history computed once, its replies (openings of different
    lengths, padded in the middle) continue exactly as each prompt generated alone would."""
    import torch

    from cso_dist.data.dialogue import read_dialogues
    from cso_dist.data.render import format_reply, make_renderer, tokenize_dialogue
    from cso_dist.data.strategies import load_strategy_set
    from cso_dist.scorer.generate import _common_prefix, generate_texts
    from cso_dist.models import load_model, load_tokenizer

    model_dir = tiny_run_data(tmp_path, esconv_dir, n_train=1, n_valid=1)
    model = load_model(model_dir).eval()
    tok = load_tokenizer(model_dir)
    sset = load_strategy_set("esconv")
    d = read_dialogues(tmp_path / "train.jsonl")[0]
    toks = tokenize_dialogue(d, make_renderer(tok), sset)
    i = d.turn_indices()[2]
    prompts = [toks.history(i) + tok.encode(format_reply(s, "").rstrip()) for s in sset.names[:4]]
    assert len({len(p) for p in prompts}) > 1  # openings of different lengths: padded in the middle
    assert _common_prefix(prompts) >= len(toks.history(i))  # the history is shared
    torch.manual_seed(0)
    shared = generate_texts(model, tok, prompts, 12, share_prefix=True, do_sample=False)
    alone = [generate_texts(model, tok, [p], 12, do_sample=False)[0] for p in prompts]
    assert shared == alone and any(shared)
