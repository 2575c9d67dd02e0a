"""Monte Carlo Tree Search over supporter strategies: builds one ESC-Pro tree from one seed dialogue.

A tree node is one strategy choice at one supporter turn: the supporter's reply with that
strategy and the simulated seeker's next message. The root is virtual ("before the first
supporter turn"); its children answer the seed's opening history. All LLM work goes through a
`Roles` object (cso_dist.mcts.roles). The search itself has no randomness, so with deterministic
roles it is fully reproducible, and a tree saved with `tree_to_json` after any iteration and
resumed with `tree_from_json` + `run` ends exactly as an uninterrupted run.

Rules (the recipe leaves these open; see docs/method.md, "ESC-Pro by Monte Carlo Tree Search"):
- Seed: consecutive messages by the same speaker are merged, texts joined with one space (a
  merged supporter turn keeps the first strategy given). The opening history is everything
  before the first supporter turn (empty if the seed starts with a supporter turn). Each gold
  supporter turn becomes a node (strategy "" if the seed gives none) whose seeker_next is the
  gold seeker message after it ("" if none); the last one is finished.
- Gold seeding: gold nodes and the root get q = gold_q, n = gold_n, as if visited gold_n times
  with reward gold_q; when visited later they are updated like any node (n += 1, running mean),
  so their Q drifts only slowly. Without any gold supporter turn the root starts at q = n = 0.
- Leaf: a node that is finished or not yet expanded. A gold node holding only its gold child is
  not expanded: expansion adds the missing strategies beside the gold child and gives every
  child its prior. Children are kept in `roles.strategies` order (unknown strategies last).
- Selection: PUCB = Q + c * P * sqrt(N_parent) / (N + 1); ties go to the first child.
  A node reached for the first time is generated (supporter reply, then simulated seeker).
  An empty (blank) seeker answer also ends the conversation; its seeker_next is then "".
- Finished leaf: not expanded; reward = its own reply judged again - reward_offset.
- Otherwise: expand, then simulate from the highest-prior child (first on ties): generate it
  (a real node) unless it already is (a gold child), then roll out greedily (best score, first
  on ties) until rollout_turns supporter turns in total are simulated or the seeker ends; the
  seeker is not asked after the last rollout turn. Reward = mean weighted judge score over the
  simulated turns (the child's turn included) - reward_offset. Backpropagation runs from that
  child up to the root: n += 1, q += (reward - q) / n.
- Missing strategy score: 0 (counted in stats["missing_scores"]). Missing judge aspect: the
  weighted mean over the aspects present, weights re-normalised (each missing aspect counted in
  stats["missing_judge_aspects"]). A judge answer with no aspect (or only zero-weight ones): the
  turn is left out of the mean (counted once in stats["unjudged_turns"], not as missing aspects);
  if no turn could be judged the reward is 0.
- Stop: (iterations >= min_iterations and finished >= min_finished) or iterations >=
  max_iterations or finished >= max_finished, where finished = stats["finished_found"]: nodes
  the search generated whose seeker ended the conversation (gold nodes are not counted).
- Extraction: a preferred path runs from the root to a finished node with q >= preferred_q and
  n >= preferred_n (the gold path qualifies while its Q stays high). At each supporter turn the
  negatives are the siblings with q <= negative_q, a generated non-empty reply, and on no
  preferred path. Records follow the ESC-Pro record schema in docs/method.md; a path's last
  seeker_next is added as a final user message only if non-empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from cso_dist.util.fields import setting
from cso_dist.mcts.roles import JUDGE_ASPECTS, SEEKER, SUPPORTER, Roles, Turn


@dataclass
class SearchSettings:
    """The search settings a user may set (the `mcts` config section inherits them: one home)."""

    c_puct: float = setting(1.0, "exploration weight c of PUCB = Q + c * P * sqrt(N_parent) / (N + 1)")
    rollout_turns: int = setting(4, "simulated supporter turns per iteration, the expanded child's included")
    min_iterations: int = setting(100, "iterations at least (unless max_finished is reached)")
    max_iterations: int = setting(200, "iterations at most")
    min_finished: int = setting(1, "finished conversations found before stopping at min_iterations")
    max_finished: int = setting(25, "stop once this many finished conversations are found")


@dataclass
class SearchConfig(SearchSettings):
    """SearchSettings plus the constants of the method (fixed; see the rules above)."""

    prior_temperature: float = 5.0  # prior = softmax(score / prior_temperature)
    judge_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)  # over roles.JUDGE_ASPECTS
    reward_offset: float = 3.0
    gold_q: float = 1.0
    gold_n: int = 100
    preferred_q: float = 0.5
    preferred_n: int = 2
    negative_q: float = 0.5


@dataclass
class Node:
    strategy: str
    reply: str = ""  # supporter text, "" until generated
    seeker_next: str = ""  # simulated seeker's next message, "" until generated
    finished: bool = False  # the seeker ended the conversation after this reply
    prior: float = 0.0
    q: float = 0.0
    n: int = 0
    children: list[Node] = field(default_factory=list)
    generated: bool = False
    gold: bool = False
    expanded: bool = False  # children for all strategies exist (a gold node may hold only its gold child)

    def to_dict(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in (
                "strategy",
                "reply",
                "seeker_next",
                "finished",
                "prior",
                "q",
                "n",
                "generated",
                "gold",
                "expanded",
            )
        }
        d["children"] = [c.to_dict() for c in self.children]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        return cls(**{**d, "children": [cls.from_dict(c) for c in d.get("children", [])]})


def new_stats() -> dict:
    return {
        "llm_calls": {"score_strategies": 0, "supporter": 0, "seeker": 0, "judge": 0},
        "missing_scores": 0,
        "missing_judge_aspects": 0,
        "unjudged_turns": 0,
        "finished_found": 0,
    }


@dataclass
class Tree:
    seed_id: str
    description: str
    scene: str
    history: list[Turn]  # the seed's opening, before the first supporter turn
    root: Node
    iterations: int = 0
    stats: dict = field(default_factory=new_stats)

    def to_dict(self) -> dict:
        return {
            "seed_id": self.seed_id,
            "description": self.description,
            "scene": self.scene,
            "history": [t._asdict() for t in self.history],
            "root": self.root.to_dict(),
            "iterations": self.iterations,
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tree:
        return cls(
            d["seed_id"],
            d["description"],
            d["scene"],
            [Turn(**t) for t in d["history"]],
            Node.from_dict(d["root"]),
            d["iterations"],
            {**new_stats(), **d["stats"]},
        )


def tree_to_json(tree: Tree) -> str:
    return json.dumps(tree.to_dict(), ensure_ascii=False)


def tree_from_json(text: str) -> Tree:
    return Tree.from_dict(json.loads(text))


# ---------------------------------------------------------------- seeding
def merge_turns(turns: list[Turn]) -> list[Turn]:
    """Merge consecutive messages by the same speaker (texts joined with a space, first strategy kept)."""
    out: list[Turn] = []
    for t in turns:
        if t.role not in (SEEKER, SUPPORTER):
            raise ValueError(f"unexpected role {t.role!r} in a seed dialogue")
        if out and out[-1].role == t.role:
            prev = out[-1]
            out[-1] = Turn(t.role, " ".join(x for x in (prev.text, t.text) if x), prev.strategy or t.strategy)
        else:
            out.append(Turn(t.role, t.text, t.strategy))
    return out


def new_tree(seed_id: str, description: str, scene: str, gold: list[Turn], cfg: SearchConfig | None = None) -> Tree:
    """A tree whose only path is the gold dialogue (q = gold_q, n = gold_n on it and on the root)."""
    cfg = cfg or SearchConfig()
    turns = merge_turns(gold)
    first = next((i for i, t in enumerate(turns) if t.role == SUPPORTER), len(turns))
    root = Node("", generated=True)
    parent, node = root, None
    for i in range(first, len(turns)):
        t = turns[i]
        if t.role != SUPPORTER:
            continue
        nxt = turns[i + 1].text if i + 1 < len(turns) else ""
        node = Node(t.strategy or "", t.text, nxt, q=cfg.gold_q, n=cfg.gold_n, generated=True, gold=True)
        parent.children.append(node)
        parent = node
    if node is not None:
        node.finished = True
        root.q, root.n = cfg.gold_q, cfg.gold_n
    return Tree(seed_id, description, scene, turns[:first], root)


# ---------------------------------------------------------------- LLM calls (counted)
def _history(tree: Tree, path: list[Node]) -> list[Turn]:
    """The dialogue up to and including the last node of `path` (path[0] is the root)."""
    h = list(tree.history)
    for node in path[1:]:
        h.append(Turn(SUPPORTER, node.reply, node.strategy))
        if node.seeker_next:
            h.append(Turn(SEEKER, node.seeker_next))
    return h


def priors(tree: Tree, roles: Roles, history: list[Turn], cfg: SearchConfig) -> dict[str, float]:
    """softmax(score / temperature) over roles.strategies; a missing score counts as 0."""
    tree.stats["llm_calls"]["score_strategies"] += 1
    scores = roles.score_strategies(history) or {}
    logits = []
    for s in roles.strategies:
        v = scores.get(s)
        if v is None:
            tree.stats["missing_scores"] += 1
            v = 0.0
        logits.append(float(v) / cfg.prior_temperature)
    top = max(logits, default=0.0)
    exps = [math.exp(x - top) for x in logits]
    return {s: e / sum(exps) for s, e in zip(roles.strategies, exps)}


def judge(tree: Tree, roles: Roles, history: list[Turn], reply: Turn, cfg: SearchConfig) -> float | None:
    """Weighted judge score of `reply`, re-normalised over the aspects present; None if none is."""
    tree.stats["llm_calls"]["judge"] += 1
    ratings = roles.judge(history, reply) or {}
    present = [(w, float(ratings[a])) for a, w in zip(JUDGE_ASPECTS, cfg.judge_weights) if ratings.get(a) is not None]
    weight = sum(w for w, _ in present)
    if not present or weight <= 0:
        tree.stats["unjudged_turns"] += 1
        return None
    tree.stats["missing_judge_aspects"] += len(JUDGE_ASPECTS) - len(present)
    return sum(w * v for w, v in present) / weight


def generate(tree: Tree, roles: Roles, node: Node, history: list[Turn]) -> None:
    """The supporter reply for node.strategy after `history`, then the simulated seeker's answer."""
    tree.stats["llm_calls"]["supporter"] += 1
    node.reply = roles.supporter(history, node.strategy)
    tree.stats["llm_calls"]["seeker"] += 1
    text, ended = roles.seeker(history + [Turn(SUPPORTER, node.reply, node.strategy)])
    node.seeker_next = text if text.strip() else ""
    node.finished, node.generated = bool(ended) or not node.seeker_next, True
    if node.finished:
        tree.stats["finished_found"] += 1


def _reward(scores: list[float | None], cfg: SearchConfig) -> float:
    judged = [s for s in scores if s is not None]
    return sum(judged) / len(judged) - cfg.reward_offset if judged else 0.0


# ---------------------------------------------------------------- one iteration
def pucb(child: Node, parent_n: int, cfg: SearchConfig) -> float:
    return child.q + cfg.c_puct * child.prior * math.sqrt(parent_n) / (child.n + 1)


def select(tree: Tree, cfg: SearchConfig) -> list[Node]:
    """Walk from the root by PUCB to a leaf (finished or not expanded); returns the path."""
    path = [tree.root]
    while path[-1].expanded and not path[-1].finished and path[-1].children:
        parent = path[-1]
        path.append(max(parent.children, key=lambda c: pucb(c, parent.n, cfg)))  # max keeps the first on ties
    return path


def expand(tree: Tree, roles: Roles, node: Node, history: list[Turn], cfg: SearchConfig) -> None:
    """One child per strategy (a gold child stays), priors from the strategy scores after `history`."""
    p = priors(tree, roles, history, cfg)
    have = {c.strategy for c in node.children}
    node.children += [Node(s) for s in roles.strategies if s not in have]
    order = {s: i for i, s in enumerate(roles.strategies)}
    node.children.sort(key=lambda c: order.get(c.strategy, len(order)))
    for c in node.children:
        c.prior = p.get(c.strategy, 0.0)
    node.expanded = True


def simulate(tree: Tree, roles: Roles, child: Node, history: list[Turn], cfg: SearchConfig) -> float:
    """Generate `child` after `history` if needed, roll out greedily, return the reward."""
    if not child.generated:
        generate(tree, roles, child, history)
    turn = Turn(SUPPORTER, child.reply, child.strategy)
    scores = [judge(tree, roles, history, turn, cfg)]
    h = history + [turn] + ([Turn(SEEKER, child.seeker_next)] if child.seeker_next else [])
    done, turns = child.finished, 1
    while not done and turns < cfg.rollout_turns:
        p = priors(tree, roles, h, cfg)
        best = max(roles.strategies, key=lambda s: p[s])  # first on ties
        tree.stats["llm_calls"]["supporter"] += 1
        turn = Turn(SUPPORTER, roles.supporter(h, best), best)
        scores.append(judge(tree, roles, h, turn, cfg))
        h.append(turn)
        turns += 1
        if turns < cfg.rollout_turns:
            tree.stats["llm_calls"]["seeker"] += 1
            text, ended = roles.seeker(h)
            h.append(Turn(SEEKER, text))
            done = bool(ended) or not text.strip()
    return _reward(scores, cfg)


def backpropagate(path: list[Node], reward: float) -> None:
    for node in path:
        node.n += 1
        node.q += (reward - node.q) / node.n


def iterate(tree: Tree, roles: Roles, cfg: SearchConfig) -> float:
    """One MCTS iteration (selection, expansion, simulation, backpropagation); returns the reward."""
    path = select(tree, cfg)
    leaf = path[-1]
    if not leaf.generated:
        generate(tree, roles, leaf, _history(tree, path[:-1]))
    if leaf.finished:
        turn = Turn(SUPPORTER, leaf.reply, leaf.strategy)
        reward = _reward([judge(tree, roles, _history(tree, path[:-1]), turn, cfg)], cfg)
    else:
        history = _history(tree, path)
        expand(tree, roles, leaf, history, cfg)
        reward = 0.0
        if leaf.children:
            child = max(leaf.children, key=lambda c: c.prior)  # first on ties
            path.append(child)
            reward = simulate(tree, roles, child, history, cfg)
    backpropagate(path, reward)
    tree.iterations += 1
    return reward


def should_stop(tree: Tree, cfg: SearchConfig) -> bool:
    it, fin = tree.iterations, tree.stats["finished_found"]
    return (it >= cfg.min_iterations and fin >= cfg.min_finished) or it >= cfg.max_iterations or fin >= cfg.max_finished


def run(tree: Tree, roles: Roles, cfg: SearchConfig, on_iteration: Callable[[Tree], None] | None = None) -> Tree:
    """Iterate until the stop rule holds (checked first, so a finished checkpoint does nothing)."""
    while not should_stop(tree, cfg):
        iterate(tree, roles, cfg)
        if on_iteration is not None:
            on_iteration(tree)
    return tree


# ---------------------------------------------------------------- ESC-Pro records
def preferred_paths(tree: Tree, cfg: SearchConfig) -> list[list[Node]]:
    """Root-to-node paths ending at a finished node with q >= preferred_q and n >= preferred_n (depth-first)."""
    out: list[list[Node]] = []

    def walk(path: list[Node]) -> None:
        node = path[-1]
        if (
            len(path) > 1
            and node.finished
            and node.generated
            and node.q >= cfg.preferred_q
            and node.n >= cfg.preferred_n
        ):
            out.append(path)
        for c in node.children:
            walk(path + [c])

    walk([tree.root])
    return out


def extract(tree: Tree, cfg: SearchConfig) -> list[dict]:
    """One ESC-Pro record per preferred path, with the non-preferred siblings at each supporter turn."""
    paths = preferred_paths(tree, cfg)
    on_path = {id(n) for p in paths for n in p}
    opening = [
        {"role": "user", "content": t.text}
        if t.role == SEEKER
        else {"role": "assistant", "content": t.text, "strategy": t.strategy or "", "negative": []}
        for t in tree.history
    ]
    records = []
    for path in paths:
        msgs = list(opening)
        for parent, node in zip(path, path[1:]):
            neg = [
                {"content": s.reply, "strategy": s.strategy}
                for s in parent.children
                if s is not node and s.generated and s.reply.strip() and s.q <= cfg.negative_q and id(s) not in on_path
            ]
            msgs.append({"role": "assistant", "content": node.reply, "strategy": node.strategy, "negative": neg})
            if node.seeker_next:
                msgs.append({"role": "user", "content": node.seeker_next})
        records.append(
            {
                "seed": tree.seed_id,
                "description": tree.description,
                "scene": tree.scene,
                "iter": tree.iterations,
                "messages": msgs,
            }
        )
    return records
