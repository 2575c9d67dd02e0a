"""ESC-Pro tree JSON, CSO DPO/KTO rows and TRL rows all normalise into preference dialogues."""

import json

import pytest

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import read_dialogues, write_dialogues
from cso_dist.data.export import pair_rows
from cso_dist.data.stats import dialogue_stats
from cso_dist.data.strategies import load_strategy_set
from cso_dist.util.errors import DataError
from conftest import write_jsonl

U = lambda t: {"role": "user", "content": t}  # noqa: E731


def A(t, s, neg=()):
    m = {"role": "assistant", "content": t, "strategy": s}
    if neg is not None:
        m["negative"] = [{"content": c, "strategy": ns} for ns, c in neg]
    return m


# Two preferred paths of one MCTS tree share their first two turns.
ESCPRO = [
    {
        "description": "lost my job",
        "scene": "anxiety",
        "iter": 120,
        "messages": [
            U("I lost my job today."),
            A(
                "That sounds really painful.",
                "Emotional Validation",
                [
                    ("Share Information", "Many people lose jobs."),
                    ("Share Information", "Many people lose jobs."),
                    ("Affirmation", "You are strong."),
                ],
            ),
            U("I don't know what to do."),
            A("Let's think about next steps together.", "Collaborative Planning", [("Affirmation", "You'll be fine.")]),
            U("Okay, where do I start?"),
            A("Maybe update your resume first?", "Collaborative Planning", []),
            U("Thanks, that helps."),
        ],
    },
    {
        "description": "lost my job",
        "scene": "anxiety",
        "iter": 120,
        "messages": [
            U("I lost my job today."),
            A(
                "That sounds really painful.",
                "Emotional Validation",
                [("Share Information", "Many people lose jobs."), ("Affirmation", "You are strong.")],
            ),
            U("I don't know what to do."),
            A("Let's think about next steps together.", "Collaborative Planning", [("Affirmation", "You'll be fine.")]),
            U("I feel like a failure."),
            A(
                "Losing a job does not make you a failure.",
                "Reframe Negative Thoughts",
                [("Share Information", "Unemployment is at 4%.")],
            ),
        ],
    },
]


def _build(source, path, **kw):
    return build_dialogues(DataConfig(source=source, input=str(path), **kw))


def test_escpro_tree_json(tmp_path):
    p = tmp_path / "ESC-Pro.json"
    p.write_text(json.dumps(ESCPRO))
    dialogues, report = _build("escpro", p)
    assert report.skipped == {}
    assert len(dialogues) == 2
    d1, d2 = dialogues
    assert [m.role for m in d1.messages] == ["seeker", "supporter"] * 3 + ["seeker"]  # trailing seeker kept
    t1 = d1.messages[1]
    # exact duplicate negatives count once
    assert [(o.strategy, o.text) for o in t1.rejected] == [
        ("Share Information", "Many people lose jobs."),
        ("Affirmation", "You are strong."),
    ]
    assert d1.messages[5].rejected == [] and d1.messages[5].target  # a turn may have no negatives
    # the shared prefix is a target once; in the second path it is context only
    assert [m.target for m in d2.messages if m.role == "supporter"] == [False, False, True]
    s = dialogue_stats(dialogues)
    assert (s["dialogues"], s["turns"], s["pairs"], s["turns_without_negatives"]) == (2, 4, 4, 1)
    assert s["strategies"] == {"Emotional Validation": 1, "Collaborative Planning": 2, "Reframe Negative Thoughts": 1}
    assert d1.meta["scene"] == "anxiety" and d1.strategy_set == "escpro"


def test_dpo_and_kto_rows_regroup_into_the_same_dialogues(tmp_path):
    p = tmp_path / "ESC-Pro.json"
    p.write_text(json.dumps(ESCPRO))
    dialogues, _ = _build("escpro", p)
    sset = load_strategy_set("escpro")
    dpo = list(pair_rows(dialogues, sset, "dpo"))
    kto = list(pair_rows(dialogues, sset, "kto"))
    assert len(dpo) == 4 and len(kto) == 4 + 4
    assert dpo[0]["messages"][0]["role"] == "system" and dpo[0]["reject"]["content"].startswith("(Share Information) ")
    assert dpo[0]["scene"] == "anxiety"
    # KTO rows carry every preferred reply: the same dialogues come back (rows hold no trailing seeker message)
    back, report = _build("kto-rows", write_jsonl(tmp_path / "kto.jsonl", kto))  # strategy set auto-detected
    assert report.strategy_set == "escpro" and back[0].strategy_set == "escpro"
    assert dialogue_stats(back) == dialogue_stats(dialogues) | {"messages": 12}
    for a, b in zip(back, dialogues):
        assert _msgs(a) == _msgs(b)[: len(a.messages)]
    # DPO rows exist only for turns with negatives: without the first path's last turn, that path is a
    # prefix of the second one and both fold into one dialogue
    back, _ = _build("cso-rows", write_jsonl(tmp_path / "dpo.jsonl", dpo), strategies="escpro")
    s = dialogue_stats(back)
    assert (s["dialogues"], s["turns"], s["pairs"], s["turns_without_negatives"]) == (1, 3, 4, 0)
    expect = _msgs(dialogues[1])
    expect[1], expect[3] = _msgs(dialogues[0])[1], _msgs(dialogues[0])[3]  # targets live in the first path
    assert _msgs(back[0]) == expect


def _msgs(d):
    return [(m.role, m.text, m.strategy, m.rejected, m.target) for m in d.messages]


def test_trl_rows_strings_lists_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "I feel alone.", "chosen": "(Question) What happened?", "rejected": "(Others) Okay."},
        {
            "prompt": [U("I feel alone.")],
            "chosen": [{"role": "assistant", "content": "(Question) What happened?"}],
            "rejected": [{"role": "assistant", "content": "(Information) Loneliness is common."}],
        },
        {
            "chosen": [
                U("I feel alone."),
                {"role": "assistant", "content": "(Question) What happened?"},
                U("My friend moved."),
                {"role": "assistant", "content": "(Reflection of feelings) You miss her."},
            ],
            "rejected": [
                U("I feel alone."),
                {"role": "assistant", "content": "(Question) What happened?"},
                U("My friend moved."),
                {"role": "assistant", "content": "(Others) Hmm."},
            ],
        },
    ]
    dialogues, _ = _build("trl", write_jsonl(tmp_path / "trl.jsonl", rows))
    assert len(dialogues) == 1
    d = dialogues[0]
    assert [m.text for m in d.messages] == ["I feel alone.", "What happened?", "My friend moved.", "You miss her."]
    assert [o.text for o in d.messages[1].rejected] == ["Okay.", "Loneliness is common."]
    assert dialogue_stats(dialogues)["pairs"] == 3


def test_dialogue_file_roundtrip(tmp_path):
    p = tmp_path / "ESC-Pro.json"
    p.write_text(json.dumps(ESCPRO))
    dialogues, _ = _build("escpro", p)
    write_dialogues(tmp_path / "out.jsonl", dialogues)
    back = read_dialogues(tmp_path / "out.jsonl", load_strategy_set("escpro"))
    assert [x.to_json() for x in back] == [x.to_json() for x in dialogues]


def test_kto_false_without_true_is_an_error_or_skipped(tmp_path):
    sys_msg = {"role": "system", "content": "s"}
    rows = [{"messages": [sys_msg, U("hi"), {"role": "assistant", "content": "(Affirmation) ok"}], "label": False}]
    p = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match="line 1: label: no preferred reply"):
        _build("kto-rows", p, strategies="escpro")
    # skipped, nothing is left: an empty output is an error too, saying what was skipped
    with pytest.raises(DataError, match=r"no preference dialogues in this input \(1 invalid records skipped\)"):
        _build("kto-rows", p, strategies="escpro", skip_invalid=True)


def test_custom_strategy_set_file(tmp_path):
    sfile = tmp_path / "strategy.json"
    sfile.write_text(json.dumps(["[Ask]", "[Comfort]"]))
    rows = [{"prompt": "x", "chosen": "(Ask) why?", "rejected": "(Comfort) there there"}]
    dialogues, _ = _build("trl", write_jsonl(tmp_path / "t.jsonl", rows), strategies=str(sfile))
    assert dialogues[0].messages[1].strategy == "Ask"
    assert load_strategy_set(str(sfile)).names == ["Ask", "Comfort"]


# ---------------------------------------------------------------- diverging preferred paths
def _random_tree_records(rng, tree: int) -> tuple[list[dict], set]:
    """ESC-Pro records of one random MCTS-like tree, one per preferred path, and its (history, chosen,
    rejected) pair set. At a branch point two preferred replies share the history and the negatives."""
    names = load_strategy_set("escpro").names
    records, pairs = [], set()

    def grow(msgs: list[dict], hist: tuple, depth: int, tag: str) -> None:
        n_pref = 2 if depth < 3 and rng.random() < 0.5 else 1
        negs = [(names[rng.randrange(8)], f"neg {tag}.{k}") for k in range(rng.randrange(0, 4))]
        for p in range(n_pref):
            strat, text = names[rng.randrange(8)], f"reply {tag}.{p}"
            for ns, nt in negs:
                pairs.add((hist, (strat, text), (ns, nt)))
            here = msgs + [A(text, strat, negs)]
            seeker = f"seeker {tag}.{p}"
            if depth >= 4 or rng.random() < 0.25:
                records.append({"description": f"tree {tree}", "messages": here + [U(seeker)]})
                continue
            grow(
                here + [U(seeker)],
                hist + (("supporter", text, strat), ("seeker", seeker, None)),
                depth + 1,
                f"{tag}.{p}",
            )

    opening = f"opening {tree}"
    grow([U(opening)], (("seeker", opening, None),), 0, str(tree))
    return records, pairs


def _pair_set(dialogues) -> set:
    out = set()
    for d in dialogues:
        for i in d.turn_indices():
            hist = tuple((m.role, m.text, m.strategy) for m in d.messages[:i])
            m = d.messages[i]
            out |= {(hist, (m.strategy, m.text), (o.strategy, o.text)) for o in m.rejected}
    return out


def test_every_reader_keeps_every_pair_of_diverging_preferred_paths(tmp_path):
    import random

    rng = random.Random(0)
    records, expected = [], set()
    for t in range(60):
        recs, pairs = _random_tree_records(rng, t)
        records += recs
        expected |= pairs
    branch_points = {p[0] for p in expected}
    assert len(records) > 120 and len(expected) > 600
    # many histories have two preferred replies
    shared = {h for h in branch_points if len({c for hh, c, _ in expected if hh == h}) > 1}
    assert len(shared) > 40
    src = tmp_path / "escpro.json"
    src.write_text(json.dumps(records))
    sset = load_strategy_set("escpro")
    dialogues, _ = build_dialogues(DataConfig(source="escpro", input=str(src)))
    assert _pair_set(dialogues) == expected
    for fmt, source in (("dpo", "cso-rows"), ("kto", "kto-rows"), ("dpo", "trl")):
        rows = list(pair_rows(dialogues, sset, fmt))
        if source == "trl":
            rows = [{"prompt": r["messages"], "chosen": [r["chosen"]], "rejected": [r["reject"]]} for r in rows]
        f = tmp_path / f"{fmt}-{source}.jsonl"
        write_jsonl(f, rows)
        back, _ = build_dialogues(DataConfig(source=source, input=str(f)))
        assert _pair_set(back) == expected, (fmt, source)


def test_a_kto_reply_labelled_true_and_false_for_one_history_is_never_its_own_negative(tmp_path):
    """Two dialogues that open alike: one's preferred reply is the other's negative. It pairs with the other
    preferred reply of that history, never with itself, and the build report counts it."""
    hist = [{"role": "user", "content": "hi"}]
    rows = [
        {"messages": hist + [{"role": "assistant", "content": "(Affirmation) a"}], "label": True},
        {"messages": hist + [{"role": "assistant", "content": "(Emotional Validation) b"}], "label": True},
        {"messages": hist + [{"role": "assistant", "content": "(Affirmation) a"}], "label": False},
    ]
    f = tmp_path / "kto.jsonl"
    write_jsonl(f, rows)
    dialogues, report = build_dialogues(DataConfig(source="kto-rows", input=str(f), strategies="escpro"))
    assert {(c[1], r[1]) for _, c, r in _pair_set(dialogues)} == {("b", "a")}
    assert report.notes["kto_replies_true_and_false"] == 1


def test_kto_false_rows_pair_with_every_preferred_reply_of_their_history_wherever_they_stand(tmp_path):
    """Two true rows then the false ones (the authors' layout at a branch point), a true row far below the false
    rows of its history (what their dedup leaves), false rows before any true row: every preferred reply of a
    history is paired with every false row of that history; a false row with no preferred reply is an error."""

    def row(reply, label, opening="hi"):
        return {
            "messages": [{"role": "user", "content": opening}, {"role": "assistant", "content": reply}],
            "label": label,
        }

    rows = [
        row("(Share Information) m1", False, "bye"),
        row("(Affirmation) c1", True),
        row("(Affirmation) c2", True),
        row("(Share Information) n1", False),
        row("(Share Information) n2", False),
        row("(Reframe Negative Thoughts) d", True, "bye"),
        row("(Affirmation) c3", True),
    ]
    f = tmp_path / "kto.jsonl"
    write_jsonl(f, rows)
    dialogues, _ = build_dialogues(DataConfig(source="kto-rows", input=str(f), strategies="escpro"))
    got = {(c[1], r[1]) for _, c, r in _pair_set(dialogues)}
    assert got == {(c, n) for c in ("c1", "c2", "c3") for n in ("n1", "n2")} | {("d", "m1")}
    write_jsonl(f, [row("(Share Information) n1", False, "nobody said this")] + rows)
    with pytest.raises(DataError, match="line 1.*no preferred reply"):
        build_dialogues(DataConfig(source="kto-rows", input=str(f), strategies="escpro"))


@pytest.mark.parametrize("form", ["save_to_disk", "DatasetDict", "parquet", "arrow"])
def test_row_readers_take_hf_datasets(tmp_path, form):
    """What TRL users have: a datasets folder or a parquet / arrow file gives the dialogues its JSONL gives."""
    import datasets

    rows = [
        {
            "prompt": [U("I feel alone.")],
            "chosen": [{"role": "assistant", "content": f"(Question) Why {i}?"}],
            "rejected": [{"role": "assistant", "content": "(Others) Okay."}],
        }
        for i in range(4)
    ]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    want, _ = build_dialogues(DataConfig(source="trl", input=str(jsonl)))
    ds = datasets.Dataset.from_list(rows)
    if form == "save_to_disk":
        ds.save_to_disk(str(tmp_path / "ds"))
        path = tmp_path / "ds"
    elif form == "DatasetDict":
        datasets.DatasetDict({"train": ds.select([0]), "test": ds}).save_to_disk(str(tmp_path / "dd"))
        path = tmp_path / "dd"
    elif form == "parquet":
        ds.to_parquet(str(tmp_path / "rows.parquet"))
        path = tmp_path / "rows.parquet"
    else:
        ds.save_to_disk(str(tmp_path / "ds"))
        path = next((tmp_path / "ds").glob("*.arrow"))
    got, report = build_dialogues(DataConfig(source="trl", input=str(path), split="test"))
    assert [d.messages for d in got] == [d.messages for d in want]
    assert report.strategy_set == "esconv"
