"""Regroup per-turn rows that share histories into preference dialogues.

Every source except ESConv arrives as *turn rows*: a history (a tuple of messages), the
preferred reply for it (or None for a row that only brings non-preferred replies, e.g. a KTO
row labelled false) and non-preferred replies. Rows with the same history and preferred reply
merge into one turn (exact duplicate options count once). A turn whose history is another
turn's history + that turn's preferred reply + one seeker message continues it, so the turns
form a prefix tree; each root-to-leaf path becomes one preference dialogue. Two preferred
replies of one history (two preferred paths of an MCTS tree that diverge there) are two turns,
each kept with its own non-preferred replies.

KTO rows (label false: only a non-preferred reply) pair by history: every false row is rejected against
every preferred reply of its history, wherever the rows stand in the file. The CSO authors' converter
(`change_data_kto.py`) writes per record and turn a true row and its false rows, then drops duplicate rows
across the file: where two preferred paths of a tree share a history, the second path's false rows are
dropped as duplicates of the first's, and its true row stands far below them; pairing by history gives
both preferred replies their negatives. A reply labelled true and false for one history (two dialogues that
open alike, one's preferred reply retrieved as the other's negative) is never paired against itself, only
with the history's other preferred replies (counted: kto_replies_true_and_false). A false row whose history
has no preferred row is an error. A turn shared by several paths is a training target in the first path only
and context (target=False) in the others, so no pair is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collections import Counter

from cso_dist.data.dialogue import SEEKER, SUPPORTER, Message, Option, PrefDialogue, check_options
from cso_dist.util.errors import DataError

Msg = tuple  # (role, text, strategy or None)


@dataclass
class TurnRow:
    history: tuple  # tuple[Msg, ...], alternating, ending with a seeker message (or empty)
    preferred: Option | None
    rejected: tuple  # tuple[Option, ...]
    record: str
    meta: dict = field(default_factory=dict)
    tail: tuple = ()  # seeker messages after this turn that end the source dialogue


@dataclass
class _Node:
    history: tuple
    preferred: Option
    record: str
    meta: dict
    rejected: list = field(default_factory=list)
    tail: tuple = ()
    children: list = field(default_factory=list)
    parent: "_Node | None" = None


def regroup(
    rows: list[TurnRow], path: str, source: str, strategy_set: str, skip=None, counts: Counter | None = None
) -> list[PrefDialogue]:
    """`skip(DataError)` is called for rows that cannot be placed (no preferred reply); without it they raise.
    Non-preferred replies follow dialogue.check_options (counted in `counts`)."""
    nodes: dict[tuple, _Node] = {}
    by_history: dict[tuple, list[_Node]] = {}
    false_rows: list[TurnRow] = []  # KTO label false: paired by history once every preferred row is read

    def refuse(err: DataError) -> None:
        if skip is None:
            raise err
        skip(err)

    for r in rows:
        h = r.history
        if r.preferred is None:
            false_rows.append(r)
            continue
        if r.preferred in r.rejected:
            refuse(
                DataError(path, r.record, None, "a non-preferred reply is identical to the preferred one", "same-reply")
            )
            continue
        key = (h, r.preferred)
        n = nodes.get(key)
        if n is None:
            n = nodes[key] = _Node(h, r.preferred, r.record, r.meta)
            by_history.setdefault(h, []).append(n)
        n.rejected.extend(r.rejected)
        if r.tail and not n.tail:
            n.tail = r.tail
    for r in false_rows:  # every preferred reply of the history, wherever its rows stand
        prefs = by_history.get(r.history)
        if not prefs:
            refuse(
                DataError(
                    path, r.record, "label", "no preferred reply (label true) shares this row's history", "no-preferred"
                )
            )
            continue
        for n in prefs:  # never a reply against itself: one labelled true and false for a history (two dialogues
            own = [o for o in r.rejected if o != n.preferred]  # that open alike) pairs with the other preferred ones
            if counts is not None:
                counts["kto_replies_true_and_false"] += len(r.rejected) - len(own)
            n.rejected.extend(own)
    for n in nodes.values():
        n.rejected = check_options(n.preferred, n.rejected, path, n.record, None, counts)
        h = n.history
        if len(h) >= 2 and h[-2][0] == SUPPORTER:
            parent = nodes.get((h[:-2], Option(h[-2][2], h[-2][1])))
            if parent is not None:
                n.parent = parent
                parent.children.append(n)

    dialogues: list[PrefDialogue] = []
    emitted: set[int] = set()

    def walk(path_nodes: list[_Node]) -> None:
        last = path_nodes[-1]
        if last.children:
            for c in last.children:
                walk(path_nodes + [c])
            return
        root = path_nodes[0]
        msgs = [
            Message(role, text, strat, [], False) if role == SUPPORTER else Message(SEEKER, text)
            for role, text, strat in root.history
        ]
        for k, n in enumerate(path_nodes):
            first = id(n) not in emitted
            emitted.add(id(n))
            msgs.append(
                Message(SUPPORTER, n.preferred.text, n.preferred.strategy, list(n.rejected) if first else [], first)
            )
            if k + 1 < len(path_nodes):
                role, text, _ = path_nodes[k + 1].history[-1]
                msgs.append(Message(SEEKER, text))
        msgs.extend(Message(SEEKER, text) for _, text, _ in last.tail)
        meta = dict(root.meta, source_record=root.record)
        dialogues.append(PrefDialogue(f"{source}-{len(dialogues)}", msgs, strategy_set, meta))

    for n in nodes.values():
        if n.parent is None:
            walk([n])
    return dialogues
