"""Regroup per-turn rows that share histories into preference dialogues.

Every source except ESConv arrives as *turn rows*: a history (a tuple of messages), the
preferred reply for it (or None for a row that only brings non-preferred replies, e.g. a KTO
row labelled false) and non-preferred replies. Rows with the same history and preferred reply
merge into one turn (exact duplicate options count once). A turn whose history is another
turn's history + that turn's preferred reply + one seeker message continues it, so the turns
form a prefix tree; each root-to-leaf path becomes one preference dialogue. A row with only
non-preferred replies joins the preferred reply last seen for the same history (KTO rows come
in blocks: the true row, then its false rows), else the first one seen after it. A turn shared by
several paths is a training target in the first path only and context (target=False) in the
others, so no pair is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cso_dist.data.dialogue import SEEKER, SUPPORTER, Message, Option, PrefDialogue, dedup_options
from cso_dist.errors import DataError

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


def regroup(rows: list[TurnRow], path: str, source: str, strategy_set: str, skip=None) -> list[PrefDialogue]:
    """`skip(DataError)` is called for rows that cannot be placed (no preferred reply); without it they raise."""
    nodes: dict[tuple, _Node] = {}
    by_history: dict[tuple, list[_Node]] = {}
    latest: dict[tuple, _Node] = {}
    orphans: list[TurnRow] = []
    for r in rows:
        if r.preferred is None:  # joins the latest preferred reply seen for its history (KTO blocks)
            if r.history in latest:
                latest[r.history].rejected.extend(r.rejected)
            else:
                orphans.append(r)
            continue
        key = (r.history, r.preferred)
        n = nodes.get(key)
        if n is None:
            n = nodes[key] = _Node(r.history, r.preferred, r.record, r.meta)
            by_history.setdefault(r.history, []).append(n)
        latest[r.history] = n
        n.rejected.extend(r.rejected)
        if r.tail and not n.tail:
            n.tail = r.tail
    for r in orphans:  # non-preferred rows before any preferred one join the first turn with their history
        owners = by_history.get(r.history)
        if not owners:
            err = DataError(
                path, r.record, "label", "no preferred reply (label true) shares this row's history", "no-preferred"
            )
            if skip is None:
                raise err
            skip(err)
            continue
        owners[0].rejected.extend(r.rejected)
    for n in nodes.values():
        n.rejected = dedup_options(n.rejected, exclude=n.preferred)
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
