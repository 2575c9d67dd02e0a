"""`data pairs`: flat rows in the CSO authors' format, for interoperability.

DPO rows: {"messages": [system, ...history], "chosen": {"role": "assistant", "content": "(<s>) text"},
"reject": {...}}, one per (turn, non-preferred option), exact duplicates removed.
KTO rows: {"messages": [system, ...history, assistant reply], "label": true|false}: per turn the
preferred reply labelled true, then each non-preferred one false, with the same history; each distinct
row once, as the CSO authors' converter writes them (data.regroup pairs false rows by history).
"""

from __future__ import annotations

import json
from typing import Iterator

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import dialogue_system_prompt, format_reply, to_chat
from cso_dist.data.strategies import StrategySet


PAIRED = {"dpo": True, "kto": False}  # `data pairs --format`: the CSO authors' DPO pairs, or their KTO rows (one reply)
FORMATS = tuple(PAIRED)


def _reply(strategy: str, text: str) -> dict:
    return {"role": "assistant", "content": format_reply(strategy, text)}


def iter_pairs(dialogues: list[PrefDialogue], sset: StrategySet, fmt: str) -> Iterator[tuple[str, dict]]:
    """(id, row) in export order; ids are reply ids: "<dialogue>:<turn>:r<k>" for a DPO pair,
    ":c" / ":r<k>" for a KTO row. Exact duplicate rows are yielded once (first occurrence)."""
    seen: set[str] = set()
    for d in dialogues:
        extra = {k: d.meta[k] for k in ("scene", "description") if k in d.meta}
        for i in d.turn_indices():
            m = d.messages[i]
            history = to_chat(d.messages[:i], dialogue_system_prompt(d, sset))
            if PAIRED[fmt]:
                rows = [
                    (
                        f"{d.id}:{i}:r{k}",
                        dict(
                            extra,
                            messages=history,
                            chosen=_reply(m.strategy, m.text),
                            reject=_reply(o.strategy, o.text),
                        ),
                    )
                    for k, o in enumerate(m.rejected)
                ]
            else:
                rows = [(f"{d.id}:{i}:c", dict(extra, messages=history + [_reply(m.strategy, m.text)], label=True))]
                rows += [
                    (f"{d.id}:{i}:r{k}", dict(extra, messages=history + [_reply(o.strategy, o.text)], label=False))
                    for k, o in enumerate(m.rejected)
                ]
            for pid, row in rows:
                key = json.dumps(row, sort_keys=True, ensure_ascii=False)
                if key not in seen:
                    seen.add(key)
                    yield pid, row


def pair_rows(dialogues: list[PrefDialogue], sset: StrategySet, fmt: str) -> Iterator[dict]:
    return (row for _, row in iter_pairs(dialogues, sset, fmt))
