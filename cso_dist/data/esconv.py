"""Chain-of-strategy preference dialogues built from ESConv.

Input: the Hugging Face split (`{train,valid,test}.jsonl`, `dialog` items with `speaker`
usr/sys, `text`, `strategy`) or the original `ESConv.json` schema (`dialog` items with
`speaker` seeker/supporter -- or speaker/listener as in FailedESConv.json -- `content` and
`annotation.strategy`).

Consecutive utterances by the same speaker (ESConv does not merge them) become one message:
texts are joined with a space. A merged supporter message takes the strategy of its *first*
utterance (the move that opens the turn); the labels of the later utterances of a run with a
different strategy are not used, and the build reports how many there were.

Negatives: the gold supporter reply is preferred. For each supporter turn, K non-preferred
options are real supporter messages of *other* strategies taken from *other* dialogues of the
same split, retrieved by TF-IDF cosine similarity between the seeker context before each turn
(the last `context_seeker_messages` seeker messages; the dialogue's situation when there are
none). From the `pool` most similar eligible candidates, options are picked in a seeded random
order, distinct strategies first, then distinct texts -- deterministic for a seed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cso_dist.data.dialogue import SEEKER, SUPPORTER, Message, Option, PrefDialogue, req, req_text
from cso_dist.data.readers import ReadContext
from cso_dist.errors import DataError
from cso_dist.paths import esconv_dir

HF_ROLES = {"usr": SEEKER, "sys": SUPPORTER}
RAW_ROLES = {"seeker": SEEKER, "supporter": SUPPORTER, "speaker": SEEKER, "listener": SUPPORTER}


@dataclass
class EsconvOptions:
    negatives: int = 3
    seed: int = 0
    context_seeker_messages: int = 2
    pool: int = 20


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


def build_esconv(ctx: ReadContext, split: str, opts: EsconvOptions) -> tuple[list[PrefDialogue], dict]:
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
    if opts.negatives > 0:
        _add_negatives(dialogues, opts, counts)
    notes = dict(sorted(counts.items()))
    notes["input"] = os.path.abspath(ctx.path)
    return dialogues, notes


def _context(d: PrefDialogue, i: int, k: int) -> str:
    seeker = [m.text for m in d.messages[:i] if m.role == SEEKER][-k:]
    return " ".join(seeker) if seeker else str(d.meta.get("situation", ""))


def _add_negatives(dialogues: list[PrefDialogue], opts: EsconvOptions, counts: Counter) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from cso_dist.progress import progress

    turns = [(di, i) for di, d in enumerate(dialogues) for i in d.turn_indices()]
    if not turns:
        return
    contexts = [_context(dialogues[di], i, opts.context_seeker_messages) for di, i in turns]
    X = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit_transform(contexts)
    cand_dlg = np.array([di for di, _ in turns])
    cand_opt = [dialogues[di].messages[i].option for di, i in turns]
    n, chunk = len(turns), 512
    top = min(n, max(200, opts.pool * 10))
    with progress(total=n, desc="negatives", unit="turn") as bar:
        for lo in range(0, n, chunk):
            sims = (X[lo : lo + chunk] @ X.T).toarray()
            for r, q in enumerate(range(lo, min(lo + chunk, n))):
                di, i = turns[q]
                gold = cand_opt[q]
                row = sims[r]
                order = np.argpartition(-row, top - 1)[:top] if top < n else np.arange(n)
                order = order[np.lexsort((order, -row[order]))]  # similarity desc, index asc on ties
                pool = _eligible(order, cand_dlg, cand_opt, di, gold, opts.pool)
                if len(pool) < opts.pool and top < n:
                    full = np.lexsort((np.arange(n), -row))
                    pool = _eligible(full, cand_dlg, cand_opt, di, gold, opts.pool)
                picks = _pick(pool, cand_opt, opts.negatives, np.random.default_rng([opts.seed, di, i]))
                msg = dialogues[di].messages[i]
                msg.rejected = [cand_opt[c] for c in picks]
                src = dialogues[di].meta.setdefault("negative_sources", {})
                src[str(i)] = [f"{dialogues[cand_dlg[c]].id}:{turns[c][1]}" for c in picks]
                if len(picks) < opts.negatives:
                    counts["turns_with_fewer_negatives"] += 1
            bar.update(min(lo + chunk, n) - lo)


def _eligible(order, cand_dlg, cand_opt, di: int, gold: Option, size: int) -> list[int]:
    pool = []
    for c in order:
        o = cand_opt[c]
        if cand_dlg[c] != di and o.strategy != gold.strategy and o.text != gold.text:
            pool.append(int(c))
            if len(pool) == size:
                break
    return pool


def _pick(pool: list[int], cand_opt, k: int, rng: np.random.Generator) -> list[int]:
    order = [pool[j] for j in rng.permutation(len(pool))]
    picks, strategies, texts = [], set(), set()
    for distinct_strategy in (True, False):
        for c in order:
            o = cand_opt[c]
            if len(picks) == k:
                return picks
            if c in picks or o.text in texts or (distinct_strategy and o.strategy in strategies):
                continue
            picks.append(c)
            strategies.add(o.strategy)
            texts.add(o.text)
    return picks


def esconv_texts(path: str | None = None) -> list[str]:
    """Every utterance of an ESConv-style JSONL file (default: ESConv train), e.g. to train a BPE on."""
    p = Path(path) if path else esconv_dir() / "train.jsonl"
    texts = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                texts.extend(u.get("text") or u.get("content") or "" for u in rec.get("dialog", []))
    return [t for t in texts if t]
