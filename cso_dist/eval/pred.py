"""The PRED file of `eval generate`: its rows, the record of what made them, and how several ranks fill one file.

Each rank appends its rows to a part file of its own beside the PRED file (`.<name>.rank<r>`, flushed batch by
batch); when every rank is done, rank 0 merges the PRED file's rows and every part into the PRED file, one row per
turn in the order of the split (dialogue by dialogue, turn by turn), written atomically, and removes the parts. So
one rank or eight give the same file, and a job killed at any point resumes: the turns already in the PRED file or
in any part are not asked again. What made the rows -- the model (its folder and content key, or the server),
the data (file and sha256), the mode and the settings that change an answer -- is recorded beside the PRED file
(`<PRED>.origin.json`); a rerun that would mix two origins in one file is refused, naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

from cso_dist.util.errors import CsoError, DataError
from cso_dist.util.io import atomic_write_text, cut_torn_tail, read_json, read_jsonl, write_jsonl


def origin_file(out: Path) -> Path:
    return out.with_name(out.name + ".origin.json")


def part_file(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}")


def parts(out: Path) -> list[Path]:
    """Every rank's part file beside `out`, from this job or an earlier one of any world size."""
    return sorted(out.parent.glob(f".{out.name}.rank*")) if out.parent.is_dir() else []


def read_rows(path: Path) -> list[dict]:
    """The rows of a PRED or part file (none when it does not exist), through the one reader (cso_dist.util.io): a
    torn last line (a write cut short) is not a row: it is left out here and cut off before the file is appended
    to (`open_part`) or rewritten (`merge`). Anything else that is not a PRED row, and an id twice in the file, is a
    one-line error naming the file and line."""
    if not path.exists():
        return []
    rows = []
    try:
        for n, row in read_jsonl(path, "a PRED file", fields={"id": str}, torn_tail=True):
            rows.append((f"line {n}", row))
    except DataError as e:
        raise CsoError(f"{e} ({'not a PRED row; ' if e.record else ''}remove the file to start over)") from None
    refuse_duplicates(path, [(rec, r["id"]) for rec, r in rows], "remove the file to start over")
    return [r for _, r in rows]


def refuse_duplicates(path: Path, ids: list[tuple[str, object]], remedy: str) -> None:
    """Refuse a file that holds a turn id twice, naming the ids and their records (`ids`: (record, id) in file
    order): it would be counted twice when scored. Records without a text id (Kang et al.'s layout) pass."""
    seen: dict[str, list[str]] = {}
    for rec, i in ids:
        if isinstance(i, str):
            seen.setdefault(i, []).append(rec)
    twice = {i: recs for i, recs in seen.items() if len(recs) > 1}
    if twice:
        named = [f"'{i}' ({', '.join(recs)})" for i, recs in list(twice.items())[:3]]
        more = f" and {len(twice) - 3} more" if len(twice) > 3 else ""
        raise CsoError(
            f"{path}: {len(twice)} turn id{'s' if len(twice) > 1 else ''} more than once: {', '.join(named)}{more}; "
            f"a PRED file holds each turn once: {remedy}"
        )


def done_ids(out: Path) -> set[str]:
    """The turns already answered: in the PRED file or in any rank's part."""
    return {r["id"] for p in (out, *parts(out)) for r in read_rows(p)}


def open_part(out: Path, rank: int) -> Path:
    """This rank's part file, ready to append to: a torn last line left by a killed run is cut off."""
    path = part_file(out, rank)
    if path.is_file():
        cut_torn_tail(path)
    return path


def check_origin(out: Path, origin: dict) -> None:
    """Refuse to add rows of another origin to a PRED file (or its parts) that holds rows; record the origin."""
    n_rows = len(done_ids(out))
    side = origin_file(out)
    if n_rows:
        if not side.exists():
            raise CsoError(
                f"{out}: its {n_rows} rows have no record of the model and data they came from ({side}); "
                "remove the file to start over, or give another --out"
            )
        try:
            old = read_json(side, "the record of what made a PRED file's rows")
        except DataError as e:
            raise CsoError(f"{e}; remove it and {out} to start over, or give another --out") from None
        diff = [k for k in sorted(set(old) | set(origin)) if old.get(k) != origin.get(k)]
        if diff:
            k = diff[0]
            raise CsoError(
                f"{out}: its {n_rows} rows came from {k} {old.get(k)!r}, this run has {origin.get(k)!r}"
                f"{f' (and {len(diff) - 1} more differences)' if len(diff) > 1 else ''}: give another --out, "
                "or remove the file to start over"
            )
    atomic_write_text(side, json.dumps(origin, indent=1))


def merge(out: Path, order: list[str]) -> int:
    """The PRED file's rows and every part's as one PRED file: one row per turn (the first found, the PRED file's
    before the parts'), in `order` (turn ids; rows of other turns after them, as found). Written atomically; the
    parts are removed after. Returns the row count."""
    rows: dict[str, dict] = {}
    found = [out, *parts(out)]
    for p in found:
        for r in read_rows(p):
            rows.setdefault(r["id"], r)
    rank = {tid: k for k, tid in enumerate(order)}
    ordered = sorted(rows.values(), key=lambda r: rank.get(r["id"], len(rank)))
    n = write_jsonl(out, ordered)
    for p in found[1:]:
        p.unlink(missing_ok=True)
    return n
