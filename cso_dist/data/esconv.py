"""Chain-of-strategy preference dialogues built from ESConv.

Input: the Hugging Face split (`{train,valid,test}.jsonl`, `dialog` items with `speaker`
usr/sys, `text`, `strategy`) or the original `ESConv.json` schema (`dialog` items with
`speaker` seeker/supporter -- or speaker/listener as in FailedESConv.json -- `content` and
`annotation.strategy`).

Consecutive utterances by the same speaker (ESConv does not merge them) become one message:
texts are joined with a space. A merged supporter message takes the strategy of its *first*
utterance (the move that opens the turn); the labels of the later utterances of a run with a
different strategy are not used, and the build reports how many there were.

Negatives: the gold supporter reply is preferred; the non-preferred options come from
cso_dist.data.negatives (data.negatives_from).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path


from cso_dist.data.dialogue import SEEKER, SUPPORTER, Message, PrefDialogue, req, req_text
from cso_dist.data.negatives import SOURCES, NegativeOptions, add_negatives, strategy_sides
from cso_dist.data.readers import ReadContext
from cso_dist.util.io import read_jsonl
from cso_dist.util.errors import DataError
from cso_dist.util.paths import esconv_dir

HF_ROLES = {"usr": SEEKER, "sys": SUPPORTER}
RAW_ROLES = {"seeker": SEEKER, "supporter": SUPPORTER, "speaker": SEEKER, "listener": SUPPORTER}


def esconv_file(path: str, split: str) -> str:
    """A file is used as is; a folder resolves to `{split}.jsonl` inside it (or inside its esconv/)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / f"{split}.jsonl", p / "esconv" / f"{split}.jsonl", p / f"{split}.json"):
            if cand.is_file():
                return str(cand)
        raise DataError(
            str(p),
            None,
            None,
            f"no {split}.jsonl here (expected the ESConv HF split files "
            "train.jsonl, valid.jsonl, test.jsonl; `cso-dist data fetch esconv` downloads them)",
            "missing-file",
        )
    if not p.is_file():
        raise DataError(
            str(p),
            None,
            None,
            "no such file or folder (ESConv: `cso-dist data fetch esconv` downloads it into the data folder, "
            "$CSO_DATA_DIR or ~/.cache/cso_dist/data; or point data.input at your copy)",
            "missing-file",
        )
    return str(p)


def esconv_utterances(ctx: ReadContext, record: str, obj) -> list[tuple[str, str, str | None]]:
    """One ESConv record (HF split or the original JSON) -> its utterances (role, text, strategy)."""
    dialog = req(obj, "dialog", list, ctx.path, record, "dialog")
    if not dialog:
        raise DataError(ctx.path, record, "dialog", "empty dialogue", "empty-dialogue")
    out = []
    for i, u in enumerate(dialog):
        f = f"dialog[{i}]"
        spk = req(u, "speaker", str, ctx.path, record, f"{f}.speaker")
        if spk in HF_ROLES:
            role, text = HF_ROLES[spk], req_text(u, "text", ctx.path, record, f"{f}.text")
            label_fld, label = f"{f}.strategy", (u.get("strategy") if role == SUPPORTER else None)
        elif spk in RAW_ROLES:
            role, text = RAW_ROLES[spk], req_text(u, "content", ctx.path, record, f"{f}.content")
            ann = u.get("annotation") or {}
            if not isinstance(ann, dict):
                raise DataError(ctx.path, record, f"{f}.annotation", "expected object", "wrong-type")
            label_fld, label = f"{f}.annotation.strategy", (ann.get("strategy") if role == SUPPORTER else None)
        else:
            raise DataError(ctx.path, record, f"{f}.speaker", f"unknown speaker '{spk}'", "bad-role")
        strat = None
        if role == SUPPORTER:
            if label is None:
                raise DataError(ctx.path, record, label_fld, "missing field", "missing-field")
            strat = ctx.strategy(label, record, label_fld)
        out.append((role, text, strat))
    return out


def _merge_runs(utts, counts: Counter) -> list[Message]:
    msgs: list[Message] = []
    for role, text, strat in utts:
        if msgs and msgs[-1].role == role:
            msgs[-1].text = msgs[-1].text + " " + text
            counts[f"merged_{role}_utterances"] += 1
            if role == SUPPORTER and strat != msgs[-1].strategy:
                counts["unused_strategy_labels"] += 1
        else:
            msgs.append(Message(role, text, strat))
    return msgs


def build_esconv(ctx: ReadContext, split: str, opts: NegativeOptions) -> tuple[list[PrefDialogue], dict]:
    ctx.path = esconv_file(ctx.path, split)
    counts: Counter = Counter()
    dialogues: list[PrefDialogue] = []
    seen: dict[tuple, str] = {}  # utterances -> the record that had them first
    for record, obj in ctx.skips.records(ctx.path):
        try:
            utts = esconv_utterances(ctx, record, obj)
            if not any(role == SUPPORTER for role, _, _ in utts):
                raise DataError(ctx.path, record, "dialog", "no supporter (sys) message", "no-turn")
            key = tuple(utts)
            if key in seen:  # a copy would also serve as its own retrieval negatives
                raise DataError(ctx.path, record, "dialog", f"the same dialogue as {seen[key]}", "duplicate")
            seen[key] = record
        except DataError as e:
            ctx.skips(e)
            continue
        meta = {k: obj[k] for k in ("situation", "emotion_type", "problem_type", "experience_type") if k in obj}
        meta["source_record"] = record
        msgs = _merge_runs(utts, counts)
        dialogues.append(PrefDialogue(f"esconv-{split}-{len(dialogues)}", msgs, ctx.sset.name, meta))
    if opts.negatives > 0 and SOURCES[opts.negatives_from].retrieves:  # generated ones: cso_dist.data.generated
        add_negatives(dialogues, opts, counts)
    for d in dialogues:
        d.meta["negatives_from"] = opts.negatives_from if opts.negatives else "none"
    notes = dict(sorted(counts.items()))
    notes["negatives_from"] = opts.negatives_from if opts.negatives else "none"
    notes["strategy_sides"] = strategy_sides(dialogues)
    notes["input"] = os.path.abspath(ctx.path)
    return dialogues, notes


def esconv_texts(path: str | None = None) -> list[str]:
    """Every utterance of an ESConv-style JSONL file (default: ESConv train), e.g. to train a BPE on."""
    p = Path(path) if path else esconv_dir() / "train.jsonl"
    texts = []
    for _, rec in read_jsonl(p, "an ESConv file", fields={"dialog": list}):
        texts.extend(u.get("text") or u.get("content") or "" for u in rec["dialog"] if isinstance(u, dict))
    return [t for t in texts if isinstance(t, str) and t]
