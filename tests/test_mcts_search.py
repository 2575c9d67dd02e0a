"""MCTS over strategies (cso_dist.mcts.search) driven by a scripted, deterministic Roles table.

Strategy names are ESC-Pro's, so `data build --from escpro` auto-detects the set.
With scores {A: 10, B: 5, C: 0} and temperature 5 the priors are softmax(2, 1, 0):
    P_A = e^2 / (e^2 + e + 1) = 0.665241, P_B = e / (...) = 0.244728, P_C = 1 / (...) = 0.090031.
"""

import json
import math

import pytest

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.mcts.roles import JUDGE_ASPECTS, SEEKER, SUPPORTER, Turn
from cso_dist.mcts.search import Node, SearchConfig, Tree, extract, iterate, new_tree, run, tree_from_json, tree_to_json

A, B, C, D = "Emotional Validation", "Affirmation", "Collaborative Planning", "Empathetic Statements"
P_A, P_B, P_C = (math.exp(x) / (math.exp(2) + math.exp(1) + 1) for x in (2, 1, 0))
SCORES = {0: {A: 10, B: 5, C: 0}}  # depth -> scores; 0 = any other depth
JUDGE = {(A, 1): 3.0, A: 2.0, B: 4.0, C: 1.0}  # (strategy, depth) or strategy -> rating on all aspects


def depth(history):
    return sum(t.role == SUPPORTER for t in history)


class Script:
    """Scores by depth of the next supporter turn, judge ratings by (strategy, depth) or strategy,
    and the seeker ends after a reply whose (strategy, depth) or (None, depth) is in `ends`."""

    def __init__(self, scores=SCORES, judge=JUDGE, ends=(), strategies=(A, B, C)):
        self.strategies = list(strategies)
        self.scores, self.ratings, self.ends = scores, judge, set(ends)
        self.calls = []  # (strategy, depth) of each supporter reply

    def score_strategies(self, history):
        return dict(self.scores.get(depth(history) + 1, self.scores[0]))

    def supporter(self, history, strategy):
        assert not history or history[-1].role == SEEKER
        self.calls.append((strategy, depth(history) + 1))
        return f"{strategy} reply at depth {depth(history) + 1}"

    def seeker(self, history):
        last, d = history[-1], depth(history)
        assert last.role == SUPPORTER
        return f"seeker after {last.strategy} at depth {d}", bool({(last.strategy, d), (None, d)} & self.ends)

    def judge(self, history, reply):
        d = depth(history) + 1
        r = self.ratings.get((reply.strategy, d), self.ratings.get(reply.strategy))
        return dict(r) if isinstance(r, dict) else {a: r for a in JUDGE_ASPECTS}


def bare_tree():
    return new_tree("s0", "lost my job", "anxiety", [Turn(SEEKER, "I lost my job.")])


def kids(node):
    return [(c.strategy, c.n, pytest.approx(c.q)) for c in node.children]


# ---------------------------------------------------------------- selection and backpropagation
def test_pucb_selection_order_and_backpropagation():
    cfg, roles, t = SearchConfig(rollout_turns=2), Script(), bare_tree()
    # 1: root is a leaf -> expand (priors P_A, P_B, P_C), simulate from A: A@1 (judge 3) + rollout A@2 (judge 2)
    #    reward = (3 + 2) / 2 - 3 = -0.5 on A and root
    assert iterate(t, roles, cfg) == pytest.approx(-0.5)
    assert [c.prior for c in t.root.children] == pytest.approx([P_A, P_B, P_C])
    assert kids(t.root) == [(A, 1, -0.5), (B, 0, 0), (C, 0, 0)]
    assert t.stats["llm_calls"] == {"score_strategies": 2, "supporter": 2, "seeker": 1, "judge": 2}
    a = t.root.children[0]
    assert (a.reply, a.seeker_next, a.generated, a.children) == (
        f"{A} reply at depth 1",
        f"seeker after {A} at depth 1",
        True,
        [],
    )
    # 2: N=1: A -0.5 + P_A*1/2 = -0.167, B 0 + P_B*1/1 = 0.245, C 0.090 -> B; generate B@1, expand B,
    #    simulate B/A: A@2 (2) + A@3 (2) -> reward -1
    iterate(t, roles, cfg)
    assert kids(t.root) == [(A, 1, -0.5), (B, 1, -1.0), (C, 0, 0)]
    assert kids(t.root.children[1]) == [(A, 1, -1.0), (B, 0, 0), (C, 0, 0)]
    # 3: N=2: A -0.5 + P_A*1.414/2 = -0.030, B -1 + P_B*1.414/2 = -0.827, C P_C*1.414 = 0.127 -> C
    iterate(t, roles, cfg)
    assert kids(t.root) == [(A, 1, -0.5), (B, 1, -1.0), (C, 1, -1.0)]
    # 4: N=3: A -0.5 + P_A*1.732/2 = 0.076, B -1 + P_B*0.866 = -0.788, C -1 + P_C*1.732 = -0.844 -> A;
    #    A is generated but not expanded: expand it, simulate A/A -> -1; A: n 2, q (-0.5 - 1) / 2
    iterate(t, roles, cfg)
    assert kids(t.root) == [(A, 2, -0.75), (B, 1, -1.0), (C, 1, -1.0)]
    assert kids(a) == [(A, 1, -1.0), (B, 0, 0), (C, 0, 0)]
    # 5: N=4: A -0.75 + P_A*2/3 = -0.307, B -1 + P_B*2/2 = -0.755, C -0.910 -> A; under A (N=2):
    #    A/A -1 + P_A*1.414/2 = -0.530, A/B P_B*1.414 = 0.346, A/C 0.127 -> A/B (judge of A/B/A: 2, 2 -> -1)
    iterate(t, roles, cfg)
    assert kids(a) == [(A, 1, -1.0), (B, 1, -1.0), (C, 0, 0)]
    assert a.children[1].reply == f"{B} reply at depth 2" and kids(a.children[1])[0] == (A, 1, -1.0)
    assert (t.root.n, t.root.q, t.iterations) == (5, pytest.approx((-0.5 - 1 - 1 - 1 - 1) / 5), 5)
    assert t.stats["finished_found"] == 0


def test_ties_go_to_the_first_strategy():
    t, roles = bare_tree(), Script(scores={0: {A: 3, B: 7, C: 7}})
    iterate(t, roles, SearchConfig(rollout_turns=2))
    # B and C tie on the prior (expansion) and on the score (roll-out): B, first in roles.strategies
    assert [c.n for c in t.root.children] == [0, 1, 0] and roles.calls == [(B, 1), (B, 2)]
    t, roles = bare_tree(), Script(scores={0: {}})  # every score missing: all tie
    iterate(t, roles, SearchConfig(rollout_turns=1))
    assert [c.n for c in t.root.children] == [1, 0, 0] and roles.calls == [(A, 1)]


def test_finished_leaf_is_rejudged_not_expanded():
    cfg, roles, t = SearchConfig(rollout_turns=2), Script(ends={(B, 1)}), bare_tree()
    iterate(t, roles, cfg)  # A: -0.5 as above
    # 2: B (0.245) is generated, the seeker ends: judged on its own reply, 4 - 3 = 1
    assert iterate(t, roles, cfg) == pytest.approx(1.0)
    b = t.root.children[1]
    assert (b.finished, b.children, b.n, b.q, t.stats["finished_found"]) == (True, [], 1, 1.0, 1)
    calls = dict(t.stats["llm_calls"])
    # 3: N=2: A -0.030, B 1 + P_B*1.414/2 = 1.173, C 0.127 -> B again: one judge call, nothing generated
    assert iterate(t, roles, cfg) == pytest.approx(1.0)
    assert (b.n, b.children, t.stats["finished_found"]) == (2, [], 1)
    assert t.stats["llm_calls"] == {**calls, "judge": calls["judge"] + 1}
    assert (t.root.n, t.root.q) == (3, pytest.approx((-0.5 + 1 + 1) / 3))


class SilentB(Script):
    def seeker(self, history):
        text, ended = super().seeker(history)
        return ("  " if history[-1].strategy == B else text), ended


def test_an_empty_seeker_answer_ends_the_conversation():
    t = bare_tree()
    cfg = SearchConfig(rollout_turns=2)
    iterate(t, SilentB(), cfg)
    iterate(t, SilentB(), cfg)  # B, as in the selection test
    b = t.root.children[1]
    assert (b.finished, b.seeker_next, b.children, t.stats["finished_found"]) == (True, "", [], 1)


# ---------------------------------------------------------------- gold seeding
GOLD = [
    Turn(SEEKER, "Hi."),
    Turn(SEEKER, "I feel sad."),
    Turn(SUPPORTER, "I'm sorry.", A),
    Turn(SUPPORTER, "Tell me more.", B),
    Turn(SEEKER, "My dog died."),
    Turn(SUPPORTER, "That is hard.", C),
    Turn(SEEKER, "Thanks."),
]


def test_gold_seeding_and_merge_rule():
    t = new_tree("g", "dog", "grief", GOLD)
    assert t.history == [Turn(SEEKER, "Hi. I feel sad.")]  # merged, with a space
    assert (t.root.q, t.root.n, t.root.gold, t.root.expanded) == (1.0, 100, False, False)
    (g1,) = t.root.children
    (g2,) = g1.children
    assert (g1.strategy, g1.reply, g1.seeker_next, g1.finished) == (
        A,
        "I'm sorry. Tell me more.",
        "My dog died.",
        False,
    )
    assert (g2.strategy, g2.reply, g2.seeker_next, g2.finished, g2.children) == (
        C,
        "That is hard.",
        "Thanks.",
        True,
        [],
    )
    for g in (g1, g2):
        assert (g.q, g.n, g.generated, g.gold, g.expanded) == (1.0, 100, True, True, False)
    t = new_tree("g", "", "", GOLD, SearchConfig(gold_q=0.8, gold_n=7))
    assert (t.root.children[0].q, t.root.children[0].n, t.root.n) == (0.8, 7, 7)
    # starting with the supporter: empty opening; a merged supporter turn keeps the first strategy given
    t = new_tree("g", "", "", [Turn(SUPPORTER, "Hello.", None), Turn(SUPPORTER, "I'm here.", B), Turn(SEEKER, "Hi.")])
    assert t.history == []
    (g,) = t.root.children
    assert (g.strategy, g.reply, g.seeker_next, g.finished) == (B, "Hello. I'm here.", "Hi.", True)
    t = bare_tree()  # no supporter turn at all
    assert (t.history, t.root.children, t.root.n, t.root.q) == ([Turn(SEEKER, "I lost my job.")], [], 0, 0.0)


def test_gold_path_is_expanded_and_its_running_mean_moves_slowly():
    cfg, roles, t = SearchConfig(rollout_turns=2), Script(), new_tree("g", "dog", "grief", GOLD)
    # 1: root holds only the gold child -> leaf: expand (B, C added beside gold A); highest prior = gold A,
    #    already generated: judged (3) + rollout A@2 (2) -> -0.5; gold q = (100 * 1 - 0.5) / 101
    assert iterate(t, roles, cfg) == pytest.approx(-0.5)
    g1 = t.root.children[0]
    assert [(c.strategy, c.gold, c.generated) for c in t.root.children] == [
        (A, True, True),
        (B, False, False),
        (C, False, False),
    ]
    assert (g1.n, g1.q, t.root.n, t.root.q) == (101, pytest.approx(99.5 / 101), 101, pytest.approx(99.5 / 101))
    assert (g1.children[0].n, g1.children[0].q) == (100, 1.0)
    assert t.stats["llm_calls"] == {"score_strategies": 2, "supporter": 1, "seeker": 0, "judge": 2}
    # 2: N=101: gold 0.985 + P_A*sqrt(101)/102 = 1.051, B P_B*sqrt(101) = 2.459 -> B is explored
    iterate(t, roles, cfg)
    assert [c.n for c in t.root.children] == [101, 1, 0]
    # the gold node, once reached, keeps its gold child and gets the other strategies in order
    t.root.children[1].q = t.root.children[2].q = -100.0
    iterate(t, roles, cfg)
    assert [(c.strategy, c.gold) for c in g1.children] == [(A, False), (B, False), (C, True)]
    assert g1.expanded and g1.children[2].n == 100


# ---------------------------------------------------------------- stop rules
def test_stop_min_iterations_and_min_finished():
    t = run(bare_tree(), Script(ends={(B, 1)}), SearchConfig(rollout_turns=2, min_iterations=3, max_iterations=50))
    assert (t.iterations, t.stats["finished_found"]) == (3, 1)
    # min_iterations reached at 1 but nothing finished yet: goes on until B ends (iteration 2)
    t = run(bare_tree(), Script(ends={(B, 1)}), SearchConfig(rollout_turns=2, min_iterations=1, max_iterations=50))
    assert (t.iterations, t.stats["finished_found"]) == (2, 1)


def test_stop_max_iterations():
    t = run(bare_tree(), Script(), SearchConfig(rollout_turns=2, min_iterations=2, max_iterations=5))
    assert (t.iterations, t.stats["finished_found"]) == (5, 0)


def test_stop_max_finished_and_callback():
    seen = []
    cfg = SearchConfig(rollout_turns=2, min_iterations=10, max_iterations=20, max_finished=2)
    # every seeker ends at depth 1. 1: simulate A: finished, judged 2 -> -1. 2: A -1 + P_A/2 = -0.667,
    # B P_B = 0.245 -> B, finished: 2 found -> stop
    roles = Script(ends={(None, 1)}, judge={A: 2.0, B: 4.0, C: 1.0})
    t = run(bare_tree(), roles, cfg, on_iteration=lambda tr: seen.append(tr.iterations))
    assert (t.iterations, t.stats["finished_found"], seen) == (2, 2, [1, 2])
    assert run(t, Script(), cfg).iterations == 2  # a finished tree does nothing more


def test_gold_does_not_count_as_finished():
    t = run(new_tree("g", "", "", GOLD), Script(), SearchConfig(rollout_turns=2, min_iterations=0, max_iterations=3))
    assert (t.iterations, t.stats["finished_found"]) == (3, 0)


# ---------------------------------------------------------------- missing scores and judge answers
def test_missing_scores_and_judge_aspects():
    judge = {(B, 1): {"Empathy": 2, "Information": None, "Humanoid": 2, "Strategy": 4}, (B, 2): {}, A: 2.0, C: 1.0}
    roles = Script(scores={0: {A: None, B: 5}}, judge=judge)  # A None, C absent: both count 0
    t = bare_tree()
    r = iterate(t, roles, SearchConfig(rollout_turns=2))
    # priors softmax(0, 1, 0); simulate B: B@1 (0.1*2 + 0.1*2 + 0.7*4) / 0.9 = 3.556; rollout B@2 unjudged
    e = math.e
    assert [c.prior for c in t.root.children] == pytest.approx([1 / (e + 2), e / (e + 2), 1 / (e + 2)])
    assert r == pytest.approx(3.2 / 0.9 - 3)
    assert (t.stats["missing_scores"], t.stats["missing_judge_aspects"], t.stats["unjudged_turns"]) == (4, 1, 1)
    # nothing judged at all -> reward 0
    t = bare_tree()
    assert iterate(t, Script(judge={A: {}, B: {}, C: {}}), SearchConfig(rollout_turns=3)) == 0.0
    assert (t.root.q, t.root.n, t.stats["unjudged_turns"], t.stats["missing_judge_aspects"]) == (0.0, 1, 3, 0)
    # one aspect present: the re-normalised mean is that aspect's rating
    t = bare_tree()
    assert iterate(t, Script(judge={A: {"Strategy": 3.5}}), SearchConfig(rollout_turns=1)) == pytest.approx(0.5)
    assert t.stats["missing_judge_aspects"] == 3


# ---------------------------------------------------------------- checkpoint and resume
def test_checkpoint_resume_gives_the_identical_tree():
    cfg = SearchConfig(rollout_turns=3, min_iterations=12, max_iterations=30, min_finished=2)
    ends = {(B, 2), (C, 1), (None, 4)}
    snaps = []
    full = run(
        new_tree("g", "dog", "grief", GOLD),
        Script(ends=ends),
        cfg,
        on_iteration=lambda t: snaps.append(tree_to_json(t)),
    )
    assert full.iterations == len(snaps) >= 12 and full.stats["finished_found"] >= 2
    final = tree_to_json(full)
    assert final == snaps[-1] and tree_to_json(tree_from_json(final)) == final
    resumed = tree_from_json(snaps[4])
    assert isinstance(resumed.history[0], Turn) and resumed.iterations == 5
    assert tree_to_json(run(resumed, Script(ends=ends), cfg)) == final
    assert extract(tree_from_json(final), cfg) == extract(full, cfg)


# ---------------------------------------------------------------- extraction
def hand_tree():
    def gen(s, name, q, n, finished=False, next_=None, children=()):
        return Node(
            s,
            f"{name} reply",
            f"{name} seeker" if next_ is None else next_,
            finished,
            0.25,
            q,
            n,
            list(children),
            True,
            False,
            bool(children),
        )

    a2 = gen(A, "a2", 0.6, 2, True, next_="")  # preferred (end of the second path), no trailing seeker
    b2 = Node(B, q=0.0, n=0)  # not generated: never a negative
    c2 = gen(C, "c2", -1.0, 1)  # negative of a2
    d2 = gen(D, "d2", 0.51, 1)  # q > 0.5: not a negative
    c1 = gen(C, "c1", 0.2, 5, children=[a2, b2, c2, d2])  # on a preferred path: not a negative of a1
    a1 = gen(A, "a1", 0.5, 2, True)  # preferred at exactly q 0.5, n 2
    b1 = gen(B, "b1", 0.5, 1, True)  # n 1: not preferred; q exactly 0.5: a negative
    d1 = gen(D, "d1", 0.49, 5, True)  # q < 0.5: not preferred; a negative
    root = Node("", q=0.3, n=14, children=[a1, b1, c1, d1], generated=True, expanded=True)
    tree = Tree("s7", "lost my job", "anxiety", [Turn(SEEKER, "I lost my job.")], root, iterations=42)
    return tree, a1


def test_extract_preferred_and_non_preferred():
    tree, a1 = hand_tree()
    U = lambda t: {"role": "user", "content": t}  # noqa: E731
    neg = lambda *ns: [{"content": f"{n} reply", "strategy": s} for s, n in ns]  # noqa: E731
    first = [U("I lost my job.")]
    recs = extract(tree, SearchConfig())
    assert recs == [
        {
            "seed": "s7",
            "description": "lost my job",
            "scene": "anxiety",
            "iter": 42,
            "messages": first
            + [
                {"role": "assistant", "content": "a1 reply", "strategy": A, "negative": neg((B, "b1"), (D, "d1"))},
                U("a1 seeker"),
            ],
        },
        {
            "seed": "s7",
            "description": "lost my job",
            "scene": "anxiety",
            "iter": 42,
            "messages": first
            + [
                {"role": "assistant", "content": "c1 reply", "strategy": C, "negative": neg((B, "b1"), (D, "d1"))},
                U("c1 seeker"),
                {"role": "assistant", "content": "a2 reply", "strategy": A, "negative": neg((C, "c2"))},
            ],
        },
    ]
    # just below a threshold, a1 is no longer preferred and becomes a negative of c1
    for q, n in ((0.4999, 2), (0.5, 1)):
        a1.q, a1.n = q, n
        recs = extract(tree, SearchConfig())
        assert len(recs) == 1 and [m["strategy"] for m in recs[0]["messages"][1]["negative"]] == [A, B, D]
    a1.q, a1.n = 0.5, 2
    assert extract(tree, SearchConfig(preferred_n=3)) == []  # a1 and a2 have n 2
    recs = extract(tree, SearchConfig(negative_q=0.49))  # b1 (0.5) drops, d1 (0.49) stays
    assert [m["strategy"] for m in recs[0]["messages"][1]["negative"]] == [D]


def test_records_are_readable_by_the_escpro_reader(tmp_path):
    tree, _ = hand_tree()
    p = tmp_path / "ESC-Pro.json"
    p.write_text(json.dumps(extract(tree, SearchConfig())))
    dialogues, report = build_dialogues(DataConfig(source="escpro", input=str(p)))
    assert (report.strategy_set, report.skipped, len(dialogues)) == ("escpro", {}, 2)
    d1, d2 = dialogues
    assert [(m.role, m.text) for m in d2.messages] == [
        ("seeker", "I lost my job."),
        ("supporter", "c1 reply"),
        ("seeker", "c1 seeker"),
        ("supporter", "a2 reply"),
    ]
    assert [(o.strategy, o.text) for o in d1.messages[1].rejected] == [(B, "b1 reply"), (D, "d1 reply")]
    assert [(o.strategy, o.text) for o in d2.messages[3].rejected] == [(C, "c2 reply")]
    assert d1.meta["iter"] == 42 and d1.meta["scene"] == "anxiety"


def test_search_end_to_end_records_read_back(tmp_path):
    cfg = SearchConfig(rollout_turns=3, min_iterations=15, max_iterations=40, min_finished=3)
    tree = run(new_tree("g", "dog", "grief", GOLD), Script(ends={(B, 2), (C, 1), (None, 3)}), cfg)
    recs = extract(tree, cfg)
    assert recs and recs[0]["messages"][1]["content"] == "I'm sorry. Tell me more."  # the gold path first
    assert all(r["iter"] == tree.iterations and r["seed"] == "g" for r in recs)
    p = tmp_path / "trees.json"
    p.write_text(json.dumps(recs))
    dialogues, report = build_dialogues(DataConfig(source="escpro", input=str(p)))
    assert report.skipped == {} and len(dialogues) == len(recs)
    assert sum(len(m.rejected) for d in dialogues for m in d.messages) > 0
