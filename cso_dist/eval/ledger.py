"""The test ledger: which test dialogues each study or demo has been scored on (study.test_ledger).

A test set looked at once is spent for the decisions that follow: a learning rate, a data source or a loss kept
because it did well on test dialogues makes those dialogues part of the selection. The ledger is a JSON Lines file,
one entry per study folder: {"by", "what", "subsets": {"test": [dialogue ids], "generate": [...]}, "at"}. A study
whose test or generation subset holds a dialogue another entry used is refused before anything runs, unless
study.reuse_test says it is meant; a study adds its entry when it scores test. The study folder keeps its own
entry too (<out>/test-ledger.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cso_dist.util.errors import CsoError
from cso_dist.util.io import append_jsonl, atomic_write_text, read_jsonl

FIELDS = {"by": str, "subsets": dict}


def read_ledger(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path, "a test ledger", fields=FIELDS)] if path.is_file() else []


def check_unused(path: Path, by: str, subsets: dict[str, list[str]], reuse: bool) -> None:
    """Refuse subsets that hold a dialogue an entry of another study (`by`: a study folder) used, naming the first
    ones and the entry; `reuse` lets them through."""
    mine = {i for ids in subsets.values() for i in ids}
    for entry in read_ledger(path):
        if entry["by"] == by:
            continue
        seen = sorted(mine & {i for ids in entry["subsets"].values() for i in ids})
        if seen and not reuse:
            named = ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")
            raise CsoError(
                f"{path}: {len(seen)} of this study's {len(mine)} test dialogues were scored before by "
                f"{entry['by']} ({entry.get('what', 'a study')}): {named}; move the subset past them "
                "(study.test_from, study.generate_from), or set study.reuse_test true to score them again"
            )


def record(path: Path | None, out: Path, by: str, what: str, subsets: dict[str, list[str]]) -> dict:
    """This study's entry: written into its folder (<out>/test-ledger.json) and, once, appended to the ledger at
    `path` (when one is given)."""
    entry = {"by": by, "what": what, "subsets": subsets, "at": time.strftime("%F")}
    atomic_write_text(out / "test-ledger.json", json.dumps(entry, indent=1))
    if path is not None and not any(e["by"] == by and e["subsets"] == subsets for e in read_ledger(path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, [entry])
    return entry
