"""Readers for ESC-Pro tree JSON, CSO flat DPO/KTO rows and TRL-style JSONL.

All normalise into preference dialogues (cso_dist.data.dialogue) through turn rows and the
prefix-tree regrouping in cso_dist.data.regroup. ESConv has its own builder (esconv.py).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cso_dist.data.dialogue import (
    SEEKER,
    SUPPORTER,
    Option,
    PrefDialogue,
    canonical_strategy,
    check_alternation,
    load_json_records,
    req,
    req_text,
)
from cso_dist.data.hf import hf_records, is_hf_input
from cso_dist.data.regroup import TurnRow, regroup
from cso_dist.data.render import parse_reply
from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import DataError

ROLES = {
    "user": SEEKER,
    "seeker": SEEKER,
    "usr": SEEKER,
    "assistant": SUPPORTER,
    "supporter": SUPPORTER,
    "sys": SUPPORTER,
}


@dataclass
class Skips:
    """Records skipped under --skip-invalid: counts per reason and the first message of each."""

    enabled: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def __call__(self, err: DataError) -> None:
        if not self.enabled:
            raise err
        self.counts[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def records(self, path: str, split: str = "train") -> Iterator[tuple[str, object]]:
        """The records of a JSON / JSON Lines file or an HF dataset (data.hf); a line that does not parse is
        skipped (when enabled) and reading goes on with the next one."""
        rows = hf_records(path, split) if is_hf_input(path) else load_json_records(path, keep_errors=self.enabled)
        for record, obj in rows:
            if isinstance(obj, DataError):
                self(obj)
                continue
            yield record, obj


@dataclass
class ReadContext:
    path: str
    sset: StrategySet
    aliases: bool = False
    skips: Skips = field(default_factory=Skips)
    counts: Counter = field(default_factory=Counter)  # what the policy merged or kept (the build report's notes)
    split: str = "train"  # the split of an HF DatasetDict folder

    def strategy(self, label, record: str, fld: str) -> str:
        return canonical_strategy(label, self.sset, self.aliases, self.path, record, fld)

    def reply(self, content: str, record: str, fld: str) -> Option:
        """An assistant text `(<strategy>) text` as an option."""
        label, text = parse_reply(content)
        if label is None:
            raise DataError(self.path, record, fld, "assistant text lacks the '(<strategy>) ' prefix", "no-strategy")
        if not text:
            raise DataError(self.path, record, fld, "empty text after the strategy prefix", "empty-text")
        return Option(self.strategy(label, record, fld), text)


def _chat(ctx: ReadContext, msgs, record: str, fld: str, allow_system: bool = True) -> tuple[str | None, tuple]:
    """Parse an OpenAI-style message list into (system text, history of (role, text, strategy))."""
    if not isinstance(msgs, list):
        raise DataError(ctx.path, record, fld, f"expected list, got {type(msgs).__name__}", "wrong-type")
    if not msgs:
        raise DataError(ctx.path, record, fld, "empty message list", "empty-text")
    system, hist = None, []
    for i, m in enumerate(msgs):
        f = f"{fld}[{i}]"
        role = req(m, "role", str, ctx.path, record, f"{f}.role")
        content = req_text(m, "content", ctx.path, record, f"{f}.content")
        if role == "system" and i == 0 and allow_system:
            system = content
        elif ROLES.get(role) == SEEKER:
            hist.append((SEEKER, content, None))
        elif ROLES.get(role) == SUPPORTER:
            o = ctx.reply(content, record, f"{f}.content")
            hist.append((SUPPORTER, o.text, o.strategy))
        else:
            raise DataError(ctx.path, record, f"{f}.role", f"unexpected role '{role}'", "bad-role")
    return system, tuple(hist)


def _history_ok(ctx: ReadContext, hist: tuple, record: str, fld: str, offset: int = 0) -> None:
    roles = [h[0] for h in hist]
    check_alternation(roles, ctx.path, record, fld)
    if roles and roles[-1] != SEEKER:
        raise DataError(
            ctx.path,
            record,
            f"{fld}[{len(roles) - 1 + offset}].role",
            "history must end with a user (seeker) message",
            "not-alternating",
        )


def _meta(obj: dict, keys=("scene", "description", "situation", "emotion_type", "problem_type", "iter")) -> dict:
    return {k: obj[k] for k in keys if k in obj}


def _collect(ctx: ReadContext, parse: Callable[[str, object], list[TurnRow]]) -> list[TurnRow]:
    if not os.path.isfile(ctx.path) and not is_hf_input(ctx.path):
        what = "a folder, not a file or a datasets.save_to_disk folder" if os.path.isdir(ctx.path) else "no such file"
        raise DataError(ctx.path, None, None, what, "missing-file")
    rows: list[TurnRow] = []
    for record, obj in ctx.skips.records(ctx.path, ctx.split):
        try:
            rows.extend(parse(record, obj))
        except DataError as e:
            ctx.skips(e)
    return rows


# ---------------------------------------------------------------- ESC-Pro tree JSON
def escpro_messages(ctx: ReadContext, record: str, obj) -> tuple[dict, list[tuple[str, str, str | None, tuple]]]:
    """One ESC-Pro record -> (meta, its path as (role, text, strategy, negatives)); the MCTS seeds read it too."""
    msgs = req(obj, "messages", list, ctx.path, record, "messages")
    meta = _meta(obj)
    out: list[tuple[str, str, str | None, tuple]] = []
    start = 0
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        meta["system"] = req_text(msgs[0], "content", ctx.path, record, "messages[0].content")
        start = 1
    for i in range(start, len(msgs)):
        m, f = msgs[i], f"messages[{i}]"
        role = ROLES.get(req(m, "role", str, ctx.path, record, f"{f}.role"))
        text = req_text(m, "content", ctx.path, record, f"{f}.content")
        if role is None:
            raise DataError(ctx.path, record, f"{f}.role", f"unexpected role '{m['role']}'", "bad-role")
        if out and out[-1][0] == role:
            raise DataError(
                ctx.path,
                record,
                f"{f}.role",
                f"dialogue not alternating: two {role} messages in a row",
                "not-alternating",
            )
        if role == SEEKER:
            out.append((SEEKER, text, None, ()))
            continue
        strat = ctx.strategy(req(m, "strategy", str, ctx.path, record, f"{f}.strategy"), record, f"{f}.strategy")
        neg = m.get("negative") or []
        if not isinstance(neg, list):
            raise DataError(ctx.path, record, f"{f}.negative", "expected list", "wrong-type")
        rej = tuple(
            Option(
                ctx.strategy(
                    req(o, "strategy", str, ctx.path, record, f"{f}.negative[{j}].strategy"),
                    record,
                    f"{f}.negative[{j}].strategy",
                ),
                req_text(o, "content", ctx.path, record, f"{f}.negative[{j}].content"),
            )
            for j, o in enumerate(neg)
        )
        out.append((SUPPORTER, text, strat, rej))
    return meta, out


def read_escpro(ctx: ReadContext) -> list[PrefDialogue]:
    def parse(record: str, obj) -> list[TurnRow]:
        meta, path = escpro_messages(ctx, record, obj)
        hist: list = []
        rows: list[TurnRow] = []
        for role, text, strat, rej in path:
            if role == SUPPORTER:
                rows.append(TurnRow(tuple(hist), Option(strat, text), rej, record, meta))
            hist.append((role, text, strat))
        if not rows:
            raise DataError(ctx.path, record, "messages", "no assistant (supporter) turn", "no-turn")
        rows[-1].tail = tuple(hist[len(rows[-1].history) + 1 :])
        return rows

    return regroup(_collect(ctx, parse), ctx.path, "escpro", ctx.sset.name, ctx.skips, ctx.counts)


# ---------------------------------------------------------------- CSO flat rows (DPO and KTO)
def _reply_field(ctx: ReadContext, obj: dict, key: str, record: str) -> Option:
    val = req(obj, key, (dict, str, list), ctx.path, record, key)
    if isinstance(val, list):  # TRL conversational: a list holding one assistant message
        if len(val) != 1:
            raise DataError(ctx.path, record, key, f"expected one assistant message, got {len(val)}", "wrong-type")
        val, key = val[0], f"{key}[0]"
    if isinstance(val, dict):
        role = req(val, "role", str, ctx.path, record, f"{key}.role")
        if ROLES.get(role) != SUPPORTER:
            raise DataError(ctx.path, record, f"{key}.role", f"expected role assistant, got '{role}'", "bad-role")
        return ctx.reply(req_text(val, "content", ctx.path, record, f"{key}.content"), record, f"{key}.content")
    if not val.strip():
        raise DataError(ctx.path, record, key, "empty text", "empty-text")
    return ctx.reply(val, record, key)


def read_cso_rows(ctx: ReadContext) -> list[PrefDialogue]:
    def parse(record: str, obj) -> list[TurnRow]:
        system, hist = _chat(ctx, req(obj, "messages", list, ctx.path, record, "messages"), record, "messages")
        _history_ok(ctx, hist, record, "messages", int(system is not None))
        chosen = _reply_field(ctx, obj, "chosen", record)
        rkey = "reject" if "reject" in obj or "rejected" not in obj else "rejected"
        rejected = _reply_field(ctx, obj, rkey, record)
        if rejected == chosen:
            raise DataError(ctx.path, record, rkey, "rejected reply is identical to the chosen one", "same-reply")
        meta = _meta(obj) | ({"system": system} if system else {})
        return [TurnRow(hist, chosen, (rejected,), record, meta)]

    return regroup(_collect(ctx, parse), ctx.path, "cso", ctx.sset.name, ctx.skips, ctx.counts)


def read_kto_rows(ctx: ReadContext) -> list[PrefDialogue]:
    def parse(record: str, obj) -> list[TurnRow]:
        msgs = req(obj, "messages", list, ctx.path, record, "messages")
        label = req(obj, "label", bool, ctx.path, record, "label")
        system, hist = _chat(ctx, msgs, record, "messages")
        if not hist or hist[-1][0] != SUPPORTER:
            raise DataError(
                ctx.path,
                record,
                f"messages[{len(msgs) - 1}].role",
                "a KTO row must end with the assistant reply",
                "no-turn",
            )
        reply = Option(hist[-1][2], hist[-1][1])
        hist = hist[:-1]
        _history_ok(ctx, hist, record, "messages", int(system is not None))
        meta = _meta(obj) | ({"system": system} if system else {})
        return [TurnRow(hist, reply, (), record, meta) if label else TurnRow(hist, None, (reply,), record, meta)]

    return regroup(_collect(ctx, parse), ctx.path, "kto", ctx.sset.name, ctx.skips, ctx.counts)


# ---------------------------------------------------------------- TRL-style prompt/chosen/rejected
def read_trl(ctx: ReadContext) -> list[PrefDialogue]:
    def parse(record: str, obj) -> list[TurnRow]:
        if not isinstance(obj, dict):
            raise DataError(ctx.path, record, None, f"expected an object, got {type(obj).__name__}", "wrong-type")
        if "prompt" not in obj and isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
            return [_implicit_prompt(ctx, obj, record)]
        prompt = req(obj, "prompt", (str, list), ctx.path, record, "prompt")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(ctx.path, record, "prompt", "empty text", "empty-text")
            system, hist = None, ((SEEKER, prompt.strip(), None),)
        else:
            system, hist = _chat(ctx, prompt, record, "prompt")
        _history_ok(ctx, hist, record, "prompt", int(system is not None))
        chosen = _reply_field(ctx, obj, "chosen", record)
        rejected = _reply_field(ctx, obj, "rejected", record)
        if rejected == chosen:
            raise DataError(ctx.path, record, "rejected", "rejected reply is identical to the chosen one", "same-reply")
        return [TurnRow(hist, chosen, (rejected,), record, {"system": system} if system else {})]

    return regroup(_collect(ctx, parse), ctx.path, "trl", ctx.sset.name, ctx.skips, ctx.counts)


def _implicit_prompt(ctx: ReadContext, obj: dict, record: str) -> TurnRow:
    """TRL's implicit-prompt form: chosen and rejected are whole conversations; the prompt is their common prefix."""
    sys_c, chosen = _chat(ctx, obj["chosen"], record, "chosen")
    sys_r, rejected = _chat(ctx, obj["rejected"], record, "rejected")
    if len(chosen) < 1 or chosen[:-1] != rejected[:-1] or chosen[-1][0] != SUPPORTER or rejected[-1][0] != SUPPORTER:
        raise DataError(
            ctx.path,
            record,
            "rejected",
            "chosen and rejected must share all messages but a final assistant reply",
            "bad-pair",
        )
    hist = chosen[:-1]
    _history_ok(ctx, hist, record, "chosen", int(sys_c is not None))
    c, r = Option(chosen[-1][2], chosen[-1][1]), Option(rejected[-1][2], rejected[-1][1])
    if c == r:
        raise DataError(ctx.path, record, "rejected", "rejected reply is identical to the chosen one", "same-reply")
    return TurnRow(hist, c, (r,), record, {"system": sys_c} if sys_c else {})


READERS = {"escpro": read_escpro, "cso-rows": read_cso_rows, "kto-rows": read_kto_rows, "trl": read_trl}
SOURCES = (*READERS, "esconv")  # data.source: a reader each, and the ESConv builder (cso_dist.data.esconv)
