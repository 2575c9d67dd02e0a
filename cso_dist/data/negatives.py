"""Where ESConv's non-preferred replies come from (data.negatives_from). ESConv has one gold reply per supporter
turn; its non-preferred options are made here:

- retrieval: K real supporter messages of *other* strategies from *other* dialogues of the same split, retrieved
  by TF-IDF cosine similarity between the seeker context before each turn (the last `context_seeker_messages`
  seeker messages; the dialogue's situation when there are none). From the `pool` most similar eligible
  candidates, options are picked in a seeded random order, distinct strategies first, then distinct texts.
- retrieval-balanced: the same retrieval, but the K strategies of each turn are chosen first so that, over the
  turns that get options (`data build`: the whole split; the study: its train subset, candidates from the whole
  split), each strategy is rejected about K times as often as it is chosen (`balanced_strategies`); each
  option is then the most similar candidate of its strategy. Plain retrieval over-represents the strategies
  that are common in similar contexts on the rejected side, and a loss then also learns that side-count prior.
- generated, generated-both: a model writes the options for the *same* history (cso_dist.data.generated; the
  strategies again from `balanced_strategies`). Here the dialogues are left without options.

Every choice is deterministic for data.seed. The counts of each strategy on the chosen and the rejected side go
into the build report (`strategy_sides`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cso_dist.data.dialogue import SEEKER, Option, PrefDialogue


@dataclass(frozen=True)
class NegativeSource:
    """A value of data.negatives_from: where the non-preferred replies come from, and what it reads."""

    name: str
    retrieves: bool  # other dialogues' replies, found by their context (TF-IDF over the last seeker messages)
    balanced: bool  # the rejected strategies chosen so that each is rejected about k times as often as chosen
    writes: str  # a model writes replies for the same history: "" (none), "rejected", or "both" (the preferred too)
    uses: tuple[str, ...]  # the data.* keys it reads besides data.negatives and data.seed


SOURCES = {
    s.name: s
    for s in (
        NegativeSource("retrieval", True, False, "", ("context_seeker_messages", "pool")),
        NegativeSource("retrieval-balanced", True, True, "", ("context_seeker_messages",)),
        NegativeSource("generated", False, True, "rejected", ("generator", "generate_max_tokens")),
        NegativeSource("generated-both", False, True, "both", ("generator", "generate_max_tokens")),
    )
}
NEGATIVES_FROM = tuple(SOURCES)  # data.negatives_from, study.sources


@dataclass
class NegativeOptions:
    negatives: int = 3
    seed: int = 0
    context_seeker_messages: int = 2
    pool: int = 20
    negatives_from: str = "retrieval"


def balanced_strategies(
    golds: list[str], names: list[str], k: int, seed: int, allowed: list[set[str]] | None = None
) -> list[list[str]]:
    """For each turn (its gold strategy), k other strategies, so that over all turns each strategy is rejected
    about k times as often as it is chosen: the turns in a seeded order, each taking the k strategies (of
    `allowed[t]`, when given) that are furthest below that share so far; ties in a seeded order. A strategy that
    is never chosen is rejected only where a turn has nothing else left."""
    import numpy as np

    chosen = Counter(golds)
    target = {s: k * chosen[s] for s in names}
    used: Counter = Counter()
    rng = np.random.default_rng([seed, 0xBA1])
    out: list[list[str]] = [[] for _ in golds]
    for t in rng.permutation(len(golds)):
        cands = [s for s in names if s != golds[t] and (allowed is None or s in allowed[t])]
        tie = dict(zip(cands, rng.random(len(cands))))
        cands.sort(key=lambda s: (used[s] / target[s] if target[s] else float("inf"), tie[s]))
        out[t] = cands[:k]
        used.update(out[t])
    return out


def strategy_sides(dialogues: list[PrefDialogue]) -> dict[str, dict[str, int]]:
    """{strategy: {"chosen": n, "rejected": n}} over every target supporter turn."""
    chosen: Counter = Counter()
    rejected: Counter = Counter()
    for d in dialogues:
        for i in d.turn_indices():
            m = d.messages[i]
            chosen[m.strategy] += 1
            rejected.update(o.strategy for o in m.rejected)
    return {s: {"chosen": chosen[s], "rejected": rejected[s]} for s in sorted(set(chosen) | set(rejected))}


def _context(d: PrefDialogue, i: int, k: int) -> str:
    seeker = [m.text for m in d.messages[:i] if m.role == SEEKER][-k:]
    return " ".join(seeker) if seeker else str(d.meta.get("situation", ""))


def add_negatives(
    dialogues: list[PrefDialogue], opts: NegativeOptions, counts: Counter, targets: list[int] | None = None
) -> None:
    """Retrieve the options of every target supporter turn (opts.negatives_from: retrieval or
    retrieval-balanced) of the dialogues numbered `targets` (default: all), from every dialogue; balanced over
    the targets' turns. The source of each option is recorded in its dialogue's meta["negative_sources"]."""
    import numpy as np

    from sklearn.feature_extraction.text import TfidfVectorizer

    from cso_dist.util.progress import progress

    turns = [(di, i) for di, d in enumerate(dialogues) for i in d.turn_indices()]
    if not turns:
        return
    contexts = [_context(dialogues[di], i, opts.context_seeker_messages) for di, i in turns]
    X = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit_transform(contexts)
    cand_dlg = np.array([di for di, _ in turns])
    cand_opt = [dialogues[di].messages[i].option for di, i in turns]
    wanted = set(range(len(dialogues)) if targets is None else targets)
    queries = [q for q, (di, _) in enumerate(turns) if di in wanted]
    balanced = SOURCES[opts.negatives_from].balanced
    if balanced:
        names = sorted({o.strategy for o in cand_opt})
        by_strategy = {s: np.array([c for c, o in enumerate(cand_opt) if o.strategy == s]) for s in names}
        planned = balanced_strategies([cand_opt[q].strategy for q in queries], names, opts.negatives, opts.seed)
        plan = dict(zip(queries, planned))
    n, chunk = len(turns), 512
    top = min(n, max(200, opts.pool * 10))
    with progress(total=len(queries), desc="negatives", unit="turn") as bar:
        for lo in range(0, len(queries), chunk):
            block = queries[lo : lo + chunk]
            sims = (X[block] @ X.T).toarray()
            for r, q in enumerate(block):
                di, i = turns[q]
                if balanced:
                    picks = _most_similar(sims[r], plan[q], by_strategy, cand_dlg, cand_opt, di, cand_opt[q])
                else:
                    picks = _retrieve(sims[r], q, turns, cand_dlg, cand_opt, opts, top)
                msg = dialogues[di].messages[i]
                msg.rejected = [cand_opt[c] for c in picks]
                src = dialogues[di].meta.setdefault("negative_sources", {})
                src[str(i)] = [f"{dialogues[cand_dlg[c]].id}:{turns[c][1]}" for c in picks]
                if len(picks) < opts.negatives:
                    counts["turns_with_fewer_negatives"] += 1
            bar.update(len(block))


def _retrieve(row, q: int, turns, cand_dlg, cand_opt, opts: NegativeOptions, top: int) -> list[int]:
    import numpy as np

    n, (di, i), gold = len(turns), turns[q], cand_opt[q]
    order = np.argpartition(-row, top - 1)[:top] if top < n else np.arange(n)
    order = order[np.lexsort((order, -row[order]))]  # similarity desc, index asc on ties
    pool = _eligible(order, cand_dlg, cand_opt, di, gold, opts.pool)
    if len(pool) < opts.pool and top < n:
        full = np.lexsort((np.arange(n), -row))
        pool = _eligible(full, cand_dlg, cand_opt, di, gold, opts.pool)
    return _pick(pool, cand_opt, opts.negatives, np.random.default_rng([opts.seed, di, i]))


def _most_similar(row, strategies: list[str], by_strategy, cand_dlg, cand_opt, di: int, gold: Option) -> list[int]:
    """For each planned strategy, its most similar message from another dialogue (a text that is neither the
    gold's nor one picked already; the first in the split on ties)."""
    import numpy as np

    picks: list[int] = []
    for s in strategies:
        idx = by_strategy[s]
        vals = np.where(cand_dlg[idx] == di, -np.inf, row[idx])
        taken = {gold.text} | {cand_opt[c].text for c in picks}
        while len(idx) and np.isfinite(vals.max()):
            j = int(np.argmax(vals))
            if cand_opt[idx[j]].text not in taken:
                picks.append(int(idx[j]))
                break
            vals[j] = -np.inf
    return picks


def _eligible(order, cand_dlg, cand_opt, di: int, gold: Option, size: int) -> list[int]:
    pool = []
    for c in order:
        o = cand_opt[c]
        if cand_dlg[c] != di and o.strategy != gold.strategy and o.text != gold.text:
            pool.append(int(c))
            if len(pool) == size:
                break
    return pool


def _pick(pool: list[int], cand_opt, k: int, rng) -> list[int]:

    order = [pool[j] for j in rng.permutation(len(pool))]
    picks, strategies, texts = [], set(), set()
    for distinct_strategy in (True, False):
        for c in order:
            o = cand_opt[c]
            if len(picks) == k:
                return picks
            if c in picks or o.text in texts or (distinct_strategy and o.strategy in strategies):
                continue
            picks.append(c)
            strategies.add(o.strategy)
            texts.add(o.text)
    return picks
