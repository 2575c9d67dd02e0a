"""The one internal representation: a preference dialogue.

A preference dialogue is the preferred path -- alternating seeker / supporter messages, every
supporter message with a strategy -- plus, at each supporter turn, zero or more non-preferred
`(strategy, text)` options that share that turn's history.

A supporter message with `target=False` is context only: its reply is part of the history but
is not a training target here (it is one in another dialogue that shares this prefix, or the
source gave no preference information for it). Statistics and pair exports skip it.

On disk: JSON Lines, one dialogue per line:
    {"id": "esconv-train-0", "strategy_set": "esconv", "meta": {...},
     "messages": [{"role": "seeker", "text": "..."},
                  {"role": "supporter", "text": "...", "strategy": "Question", "target": true,
                   "rejected": [{"strategy": "Information", "text": "..."}]}, ...]}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from cso_dist.data.strategies import NAMED, StrategySet, load_strategy_set
from cso_dist.util.errors import DataError
from cso_dist.util.io import read_jsonl, read_records, require, write_jsonl

SEEKER, SUPPORTER = "seeker", "supporter"


@dataclass(frozen=True)
class Option:
    strategy: str
    text: str


@dataclass
class Message:
    role: str  # "seeker" | "supporter"
    text: str
    strategy: str | None = None  # supporter messages only
    rejected: list[Option] = field(default_factory=list)
    target: bool = True

    @property
    def option(self) -> Option:
        assert self.strategy is not None
        return Option(self.strategy, self.text)


@dataclass
class PrefDialogue:
    id: str
    messages: list[Message]
    strategy_set: str
    meta: dict = field(default_factory=dict)

    def turn_indices(self) -> list[int]:
        """Indices of the supporter messages that are training targets."""
        return [i for i, m in enumerate(self.messages) if m.role == SUPPORTER and m.target]

    def to_json(self) -> dict:
        msgs = []
        for m in self.messages:
            if m.role == SEEKER:
                msgs.append({"role": SEEKER, "text": m.text})
            else:
                msgs.append(
                    {
                        "role": SUPPORTER,
                        "text": m.text,
                        "strategy": m.strategy,
                        "target": m.target,
                        "rejected": [{"strategy": o.strategy, "text": o.text} for o in m.rejected],
                    }
                )
        return {"id": self.id, "strategy_set": self.strategy_set, "meta": self.meta, "messages": msgs}


def dedup_options(options: Iterable[Option], exclude: Option | None = None) -> list[Option]:
    """Exact duplicates count once; order of first appearance is kept."""
    seen, out = set(), []
    for o in options:
        if o not in seen and o != exclude:
            seen.add(o)
            out.append(o)
    return out


def check_options(
    chosen: Option, rejected: list[Option], path: str, record: str, fld: str, counts: Counter | None = None
) -> list[Option]:
    """The one policy for a turn's non-preferred replies, in every reader and for stored files:
    a reply identical to the preferred one (strategy and text) is an error; exact duplicates count once
    (counted as duplicate_negatives); one with the preferred reply's strategy but other text is a real
    pair and is kept (counted as negatives_with_chosen_strategy)."""
    if chosen in rejected:
        raise DataError(path, record, fld, "a non-preferred reply is identical to the preferred one", "same-reply")
    out = dedup_options(rejected)
    if counts is not None:
        counts["duplicate_negatives"] += len(rejected) - len(out)
        counts["negatives_with_chosen_strategy"] += sum(o.strategy == chosen.strategy for o in out)
    return out


# ---------------------------------------------------------------- field checks shared by readers
req = require  # obj[key] of a type, or an error naming file, record and field (cso_dist.util.io, the one reader)


def req_text(obj: dict, key: str, path: str, record: str, fld: str) -> str:
    val = req(obj, key, str, path, record, fld)
    if not val.strip():
        raise DataError(path, record, fld, "empty text", "empty-text")
    return val.strip()


def canonical_strategy(label, sset: StrategySet, use_aliases: bool, path: str, record: str, fld: str) -> str:
    if not isinstance(label, str):
        raise DataError(path, record, fld, f"expected str, got {type(label).__name__}", "wrong-type")
    name = sset.canonical(label.strip(), use_aliases)
    if name is None:
        hint = "" if use_aliases else "; --aliases maps known variants"
        raise DataError(
            path,
            record,
            fld,
            f"unknown strategy '{label}' (set '{sset.name}': {', '.join(sset.names)}{hint})",
            "unknown-strategy",
        )
    return name


def check_alternation(roles: list[str], path: str, record: str, fld: str = "messages") -> None:
    for i in range(1, len(roles)):
        if roles[i] == roles[i - 1]:
            raise DataError(
                path,
                record,
                f"{fld}[{i}].role",
                f"dialogue not alternating: two {roles[i]} messages in a row",
                "not-alternating",
            )


# ---------------------------------------------------------------- JSON Lines I/O
def load_json_records(path: str | Path, keep_errors: bool = False) -> Iterator[tuple[str, object]]:
    """Records of a JSON array file ("record i") or a JSON Lines file ("line n"), through the one reader
    (cso_dist.util.io.read_records): a line that is not UTF-8 or not JSON is a DataError naming it, raised or with
    `keep_errors` yielded in place of the record."""
    return read_records(path, "a data file", keep_errors)


def write_dialogues(path: str | Path, dialogues: Iterable[PrefDialogue]) -> int:
    return write_jsonl(path, (d.to_json() for d in dialogues))


def dialogue_from_json(obj, path: str, record: str, sset: StrategySet | None = None) -> PrefDialogue:
    """Parse and validate one stored preference dialogue with the builders' rules: strategies of the set
    (`sset`, else the named set the dialogue names; a custom set unknown here is not checked), alternating
    roles, at least one supporter turn, non-preferred replies by check_options (duplicates are errors)."""
    did = req_text(obj, "id", path, record, "id")
    set_name = req(obj, "strategy_set", str, path, record, "strategy_set")
    if sset is None and set_name in NAMED:
        sset = load_strategy_set(set_name)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(path, record, "meta", "expected object", "wrong-type")
    raw = req(obj, "messages", list, path, record, "messages")
    if not raw:
        raise DataError(path, record, "messages", "empty dialogue", "empty-dialogue")
    msgs = []
    for i, m in enumerate(raw):
        fld = f"messages[{i}]"
        role = req(m, "role", str, path, record, f"{fld}.role")
        text = req_text(m, "text", path, record, f"{fld}.text")
        if role == SEEKER:
            msgs.append(Message(SEEKER, text))
        elif role == SUPPORTER:
            strat = req(m, "strategy", str, path, record, f"{fld}.strategy")
            if sset is not None:
                strat = canonical_strategy(strat, sset, False, path, record, f"{fld}.strategy")
            raw_rej = m.get("rejected") or []
            if not isinstance(raw_rej, list):
                raise DataError(path, record, f"{fld}.rejected", "expected list", "wrong-type")
            rej = []
            for j, o in enumerate(raw_rej):
                ofld = f"{fld}.rejected[{j}]"
                s = req(o, "strategy", str, path, record, f"{ofld}.strategy")
                if sset is not None:
                    s = canonical_strategy(s, sset, False, path, record, f"{ofld}.strategy")
                rej.append(Option(s, req_text(o, "text", path, record, f"{ofld}.text")))
            if check_options(Option(strat, text), rej, path, record, f"{fld}.rejected") != rej:
                raise DataError(path, record, f"{fld}.rejected", "duplicate non-preferred replies", "duplicate")
            target = m.get("target", True)
            if not isinstance(target, bool):
                raise DataError(path, record, f"{fld}.target", "expected bool", "wrong-type")
            msgs.append(Message(SUPPORTER, text, strat, rej, target))
        else:
            raise DataError(path, record, f"{fld}.role", f"unknown role '{role}' (seeker or supporter)", "bad-role")
    check_alternation([m.role for m in msgs], path, record)
    if not any(m.role == SUPPORTER for m in msgs):
        raise DataError(path, record, "messages", "no supporter turn", "no-turn")
    return PrefDialogue(did, msgs, set_name, meta)


def read_dialogues(path: str | Path, sset: StrategySet | None = None) -> list[PrefDialogue]:
    """A preference-dialogue file (data build's output), every record validated (dialogue_from_json)."""
    path = str(path)
    out, ids = [], {}
    for n, obj in read_jsonl(path, "a preference-dialogue file"):
        rec = f"line {n}"
        d = dialogue_from_json(obj, path, rec, sset)
        if d.id in ids:
            raise DataError(path, rec, "id", f"dialogue id '{d.id}' also at {ids[d.id]}", "duplicate")
        ids[d.id] = rec
        out.append(d)
    if not out:
        raise DataError(path, None, None, "no dialogues (empty file)", "empty-file")
    return out
