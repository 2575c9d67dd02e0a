"""`data pairs`: flat rows in the CSO authors' format, for interoperability.

DPO rows: {"messages": [system, ...history], "chosen": {"role": "assistant", "content": "(<s>) text"},
"reject": {...}}, one per (turn, non-preferred option), exact duplicates removed.
KTO rows: {"messages": [system, ...history, assistant reply], "label": true|false}: the
preferred reply labelled true and each non-preferred one false, with the same history.
"""
from __future__ import annotations

import json
from typing import Iterator

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import format_reply, system_prompt, to_chat
from cso_dist.data.strategies import StrategySet


def _reply(strategy: str, text: str) -> dict:
    return {"role": "assistant", "content": format_reply(strategy, text)}


def pair_rows(dialogues: list[PrefDialogue], sset: StrategySet, fmt: str) -> Iterator[dict]:
    seen: set[str] = set()
    default_system = system_prompt(sset)
    for d in dialogues:
        extra = {k: d.meta[k] for k in ("scene", "description") if k in d.meta}
        for i in d.turn_indices():
            m = d.messages[i]
            history = to_chat(d.messages[:i], d.meta.get("system") or default_system)
            if fmt == "dpo":
                rows = [dict(extra, messages=history, chosen=_reply(m.strategy, m.text), reject=_reply(o.strategy, o.text))
                        for o in m.rejected]
            else:
                rows = [dict(extra, messages=history + [_reply(m.strategy, m.text)], label=True)]
                rows += [dict(extra, messages=history + [_reply(o.strategy, o.text)], label=False) for o in m.rejected]
            for row in rows:
                key = json.dumps(row, sort_keys=True, ensure_ascii=False)
                if key not in seen:
                    seen.add(key)
                    yield row
