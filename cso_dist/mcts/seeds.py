"""Seed dialogues for the ESC-Pro search: ESConv (HF split JSONL), ExTES JSON, or ESC-Pro-style records.

Each becomes a `Seed`: an id, the seeker's situation (description) and scene, and the gold
turns (consecutive messages of one speaker merged with a space, as our ESConv builder does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cso_dist.data.dialogue import canonical_strategy, load_json_records
from cso_dist.data.strategies import StrategySet, load_strategy_set
from cso_dist.errors import DataError
from cso_dist.mcts.roles import SEEKER, SUPPORTER, Turn
from cso_dist.mcts.search import merge_turns


@dataclass
class Seed:
    id: str
    description: str
    scene: str
    turns: list[Turn]


def _text(path: str, record: str, fld: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, record, fld, "expected non-empty text", "empty-text")
    return value.strip()


def _parse(path: str, record: str, obj, sset: StrategySet, aliases: bool) -> tuple[str, str, list[Turn]]:
    if not isinstance(obj, dict):
        raise DataError(path, record, None, "expected a JSON object", "wrong-type")
    strat = lambda label, fld: canonical_strategy(label, sset, aliases, path, record, fld)  # noqa: E731
    turns: list[Turn] = []
    if isinstance(obj.get("dialog"), list):  # ESConv (HF split)
        for i, u in enumerate(obj["dialog"]):
            sys_turn = u.get("speaker") == "sys"
            turns.append(
                Turn(
                    SUPPORTER if sys_turn else SEEKER,
                    _text(path, record, f"dialog[{i}].text", u.get("text")),
                    strat(u.get("strategy"), f"dialog[{i}].strategy") if sys_turn else None,
                )
            )
        return (
            obj.get("situation", ""),
            ", ".join(x for x in (obj.get("emotion_type"), obj.get("problem_type")) if x),
            turns,
        )
    if isinstance(obj.get("content"), list):  # ExTES: {"User": ...} / {"AI": ..., "AI Strategy": ...}
        for i, u in enumerate(obj["content"]):
            if "AI" in u:
                turns.append(
                    Turn(
                        SUPPORTER,
                        _text(path, record, f"content[{i}].AI", u["AI"]),
                        strat(u.get("AI Strategy"), f"content[{i}].AI Strategy"),
                    )
                )
            elif "User" in u:
                turns.append(Turn(SEEKER, _text(path, record, f"content[{i}].User", u["User"])))
            else:
                raise DataError(path, record, f"content[{i}]", "neither 'User' nor 'AI'", "bad-role")
        return obj.get("description", ""), obj.get("scene", ""), turns
    if isinstance(obj.get("messages"), list):  # ESC-Pro-style records (their gold/preferred path)
        for i, m in enumerate(obj["messages"]):
            role = m.get("role")
            if role == "system":
                continue
            if role not in ("user", "assistant"):
                raise DataError(path, record, f"messages[{i}].role", f"unexpected role {role!r}", "bad-role")
            text = _text(path, record, f"messages[{i}].content", m.get("content"))
            turns.append(
                Turn(SUPPORTER, text, strat(m.get("strategy"), f"messages[{i}].strategy"))
                if role == "assistant"
                else Turn(SEEKER, text)
            )
        return obj.get("description", ""), obj.get("scene", ""), turns
    raise DataError(
        path,
        record,
        None,
        "not an ESConv ('dialog'), ExTES ('content') or ESC-Pro ('messages') record",
        "unknown-format",
    )


def detect_strategies(path: str | Path) -> str:
    """esconv for ESConv seeds (a 'dialog' list), escpro otherwise."""
    first = next(iter(load_json_records(path)), (None, None))[1]
    return "esconv" if isinstance(first, dict) and "dialog" in first else "escpro"


def read_seeds(
    path: str | Path, strategies: str = "auto", aliases: bool = True, limit: int = 0
) -> tuple[list[Seed], StrategySet]:
    p = Path(path)
    if not p.is_file():
        raise DataError(str(p), None, None, "no such seed file", "missing-file")
    sset = load_strategy_set(detect_strategies(p) if strategies == "auto" else strategies)
    seeds = []
    for record, obj in load_json_records(p):
        description, scene, turns = _parse(str(p), record, obj, sset, aliases)
        turns = merge_turns(turns)
        if not any(t.role == SUPPORTER for t in turns):
            raise DataError(str(p), record, None, "no supporter turn", "no-turn")
        seeds.append(Seed(f"{p.stem}-{len(seeds)}", description, scene, turns))
        if limit and len(seeds) >= limit:
            break
    return seeds, sset
