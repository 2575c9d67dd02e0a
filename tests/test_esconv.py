"""ESConv -> chain-of-strategy preference dialogues, on the real ESConv files."""

import json

import pytest

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.data.stats import dialogue_stats
from cso_dist.util.errors import DataError


def _raw(esconv_dir, split):
    return [json.loads(line) for line in open(esconv_dir / f"{split}.jsonl")]


@pytest.fixture(scope="module")
def train(esconv_dir):
    return build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="train"))


def test_train_build_counts_and_merges(train, esconv_dir):
    dialogues, report = train
    raw = _raw(esconv_dir, "train")
    assert len(dialogues) == len(raw) == 910
    sys_runs = sum(
        1 for r in raw for a, b in zip(r["dialog"], r["dialog"][1:]) if a["speaker"] == b["speaker"] == "sys"
    )
    usr_runs = sum(
        1 for r in raw for a, b in zip(r["dialog"], r["dialog"][1:]) if a["speaker"] == b["speaker"] == "usr"
    )
    assert report.notes["merged_supporter_utterances"] == sys_runs
    assert report.notes["merged_seeker_utterances"] == usr_runs
    for d, r in zip(dialogues, raw):
        roles = [m.role for m in d.messages]
        assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating
        # nothing lost: merged texts are the utterances joined with a space, first strategy of a run kept
        assert " ".join(m.text for m in d.messages) == " ".join(u["text"].strip() for u in r["dialog"])
        firsts = [
            u["strategy"]
            for k, u in enumerate(r["dialog"])
            if u["speaker"] == "sys" and (k == 0 or r["dialog"][k - 1]["speaker"] != "sys")
        ]
        assert [m.strategy for m in d.messages if m.role == "supporter"] == firsts
    s = dialogue_stats(dialogues)
    assert s["turns"] == sum(len(d.turn_indices()) for d in dialogues) == 10679
    assert s["pairs"] == 3 * s["turns"] and s["context_only_turns"] == 0


def test_negatives_are_other_strategies_from_other_dialogues(train):
    dialogues, _ = train
    by_id = {d.id: d for d in dialogues}
    distinct = 0
    for d in dialogues:
        for i in d.turn_indices():
            gold = d.messages[i]
            assert len(gold.rejected) == 3
            assert all(o.strategy != gold.strategy and o.text != gold.text for o in gold.rejected)
            assert len({o.text for o in gold.rejected}) == 3
            distinct += len({o.strategy for o in gold.rejected}) == 3
            for o, src in zip(gold.rejected, d.meta["negative_sources"][str(i)]):
                src_id, src_turn = src.rsplit(":", 1)
                assert src_id != d.id
                m = by_id[src_id].messages[int(src_turn)]
                assert (m.strategy, m.text) == (o.strategy, o.text)  # a real ESConv supporter message
    assert distinct / sum(len(d.turn_indices()) for d in dialogues) > 0.99


def test_deterministic_for_a_seed_and_k_configurable(esconv_dir):
    cfg = dict(source="esconv", input=str(esconv_dir), split="valid")
    a, _ = build_dialogues(DataConfig(**cfg))
    b, _ = build_dialogues(DataConfig(**cfg))
    c, _ = build_dialogues(DataConfig(**cfg, seed=1))
    assert [d.to_json() for d in a] == [d.to_json() for d in b]
    changed = sum(x.messages[i].rejected != y.messages[i].rejected for x, y in zip(a, c) for i in x.turn_indices())
    assert changed > 0.5 * sum(len(d.turn_indices()) for d in a)
    for k in (0, 1, 5):
        d, _ = build_dialogues(DataConfig(**cfg, negatives=k))
        s = dialogue_stats(d)
        assert s["pairs"] == k * s["turns"] and s["dialogues"] == 195


def test_original_esconv_json_schema_with_aliases(esconv_dir):
    # FailedESConv.json uses the original collection schema (speaker/listener, annotation.strategy, content)
    path = str(esconv_dir / "FailedESConv.json")
    with pytest.raises(DataError, match=r"record 0: dialog\[\d+\]\.annotation\.strategy: unknown strategy"):
        build_dialogues(DataConfig(source="esconv", input=path))
    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=path, aliases=True))
    assert len(dialogues) == 196
    assert dialogue_stats(dialogues)["strategies"].keys() <= {
        "Question",
        "Restatement or Paraphrasing",
        "Reflection of feelings",
        "Self-disclosure",
        "Affirmation and Reassurance",
        "Providing Suggestions",
        "Information",
        "Others",
    }


def test_valid_and_test_splits(esconv_dir):
    for split in ("valid", "test"):
        dialogues, report = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split=split))
        assert len(dialogues) == 195 and report.input.endswith(f"{split}.jsonl")
