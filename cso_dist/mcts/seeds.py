"""Seed dialogues for the ESC-Pro search: ESConv (HF split JSONL), ExTES JSON, or ESC-Pro-style records.

Each becomes a `Seed`: an id, the seeker's situation (description) and scene, and the gold
turns (consecutive messages of one speaker merged with a space, as our ESConv builder does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cso_dist.data.dialogue import load_json_records
from cso_dist.data.esconv import esconv_utterances
from cso_dist.data.readers import ReadContext, escpro_messages
from cso_dist.data.strategies import StrategySet, load_strategy_set
from cso_dist.util.errors import DataError
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


def _extes(ctx: ReadContext, record: str, obj: dict) -> list[Turn]:
    """ExTES: {"content": [{"User": ...} | {"AI": ..., "AI Strategy": ...}]} (read only here)."""
    turns: list[Turn] = []
    for i, u in enumerate(obj["content"]):
        if "AI" in u:
            text = _text(ctx.path, record, f"content[{i}].AI", u["AI"])
            turns.append(Turn(SUPPORTER, text, ctx.strategy(u.get("AI Strategy"), record, f"content[{i}].AI Strategy")))
        elif "User" in u:
            turns.append(Turn(SEEKER, _text(ctx.path, record, f"content[{i}].User", u["User"])))
        else:
            raise DataError(ctx.path, record, f"content[{i}]", "neither 'User' nor 'AI'", "bad-role")
    return turns


def _parse(ctx: ReadContext, record: str, obj) -> tuple[str, str, list[Turn]]:
    """(description, scene, gold turns) of one seed record; ESConv and ESC-Pro through the data readers."""
    if not isinstance(obj, dict):
        raise DataError(ctx.path, record, None, "expected a JSON object", "wrong-type")
    if isinstance(obj.get("dialog"), list):  # ESConv (HF split or the original JSON)
        turns = [Turn(role, text, strat) for role, text, strat in esconv_utterances(ctx, record, obj)]
        scene = ", ".join(x for x in (obj.get("emotion_type"), obj.get("problem_type")) if x)
        return obj.get("situation", ""), scene, turns
    if isinstance(obj.get("content"), list):
        return obj.get("description", ""), obj.get("scene", ""), _extes(ctx, record, obj)
    if isinstance(obj.get("messages"), list):  # ESC-Pro-style records (their gold/preferred path)
        meta, path = escpro_messages(ctx, record, obj)
        turns = [Turn(role, text, strat) for role, text, strat, _ in path]
        return meta.get("description", ""), meta.get("scene", ""), turns
    raise DataError(
        ctx.path,
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
    ctx, seeds = ReadContext(str(p), sset, aliases), []
    for record, obj in load_json_records(p):
        description, scene, turns = _parse(ctx, record, obj)
        turns = merge_turns(turns)
        if not any(t.role == SUPPORTER for t in turns):
            raise DataError(str(p), record, None, "no supporter turn", "no-turn")
        seeds.append(Seed(f"{p.stem}-{len(seeds)}", description, scene, turns))
        if limit and len(seeds) >= limit:
            break
    if not seeds:
        raise DataError(str(p), None, None, "no seed dialogues", "empty")
    return seeds, sset
