"""Likelihood-mode evaluation (eval.mode likelihood): score every strategy's "(<strategy>)" prefix after the history
and pick the most likely; the first-token rule and prior calibration (cso_dist.eval.calibrate) read the same
scores. One forward per dialogue with the prefix trie: the gold path is the trunk, each turn's strategy prefixes
hang off it as branches."""

from __future__ import annotations

from cso_dist.data.dialogue import PrefDialogue
from cso_dist.data.render import format_reply, tokenize_dialogue
from cso_dist.data.strategies import StrategySet
from cso_dist.eval.calibrate import calibrated, first_token
from cso_dist.eval.prompts import Turn, eval_turns
from cso_dist.pack.trie import pack_units
from cso_dist.pack.types import ReplyId, Span, Unit
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def likelihood_units(
    d: PrefDialogue, renderer, sset: StrategySet, prefixes: dict[str, list[int]], max_length: int, max_tokens: int
) -> list[Unit]:
    """The dialogue as few units as fit max_tokens: runs of consecutive turns share a trunk (the gold path up
    to the run's last turn) with every turn's strategy prefixes as branches; one unit per turn when a
    history had to be truncated (as for generation: oldest messages first, room left for the longest
    prefix)."""
    longest = max(len(p) for p in prefixes.values())
    turns = eval_turns([d], renderer, sset, max_length, longest)
    full = tokenize_dialogue(d, renderer, sset).full()
    per_turn = sum(len(p) for p in prefixes.values())
    if all(t.prompt == full[: len(t.prompt)] for t in turns):
        runs: list[list[Turn]] = []
        for t in turns:  # prompts grow with the turn: a run's trunk ends at its last turn's prompt
            if runs and len(t.prompt) + per_turn * (len(runs[-1]) + 1) <= max_tokens:
                runs[-1].append(t)
            else:
                runs.append([t])
        groups = [(full[: len(run[-1].prompt)], run) for run in runs]
    else:
        groups = [(t.prompt, [t]) for t in turns]
    units = []
    for trunk, group in groups:
        u = Unit(d.id, list(trunk), list(range(len(trunk))), len(trunk))
        for t in group:
            ctx = len(t.prompt)
            for s, toks_s in prefixes.items():
                start = len(u.tokens)
                u.spans.append(Span(ReplyId(d.id, t.turn, s), start, len(toks_s), ctx))  # kind: strategy
                for j in range(1, len(toks_s)):  # its first j tokens too: per-token log-probs (the first-token rule)
                    u.spans.append(Span(ReplyId(d.id, t.turn, f"{s}@{j}"), start, j, ctx))
                u.tokens.extend(toks_s)
                u.positions.extend(range(ctx, ctx + len(toks_s)))
        units.append(u)
    return units


def strategy_prefixes(renderer, sset: StrategySet) -> dict[str, list[int]]:
    """Each strategy's "(<strategy>)" prefix, exactly as a gold reply starts: the tokens of "(S) x" minus those of the
    text after it."""
    tok = renderer.tokenizer
    prefixes = {}
    for s in sset.names:
        full = tok.encode(format_reply(s, "x"), add_special_tokens=False)
        prefixes[s] = full[: len(tok.encode(f"({s})", add_special_tokens=False))]
    return prefixes


def likelihood_groups(
    dialogues: list[PrefDialogue], renderer, sset: StrategySet, prefixes: dict[str, list[int]], cfg: TrainingConfig
) -> list[list[Unit]]:
    """The dialogues' units packed into micro-batches of pack.max_tokens (a longer unit alone)."""
    units = [
        u
        for d in dialogues
        for u in likelihood_units(d, renderer, sset, prefixes, cfg.data.max_length, cfg.pack.max_tokens)
    ]
    return pack_units(units, max([cfg.pack.max_tokens] + [len(u) for u in units]))


def likelihood_rows(
    dialogues: list[PrefDialogue],
    sset: StrategySet,
    scores: dict[str, float],
    prefixes: dict[str, list[int]],
    offsets: dict[str, float] | None = None,
) -> list[dict]:
    """A PRED row per turn of `dialogues`: the strategy whose prefix scores highest (`pred_strategy`), every
    strategy's score and per-token log-probs, the first-token rule's pick (`pred_first_token`) and, with
    calibration `offsets`, the calibrated pick (`pred_calibrated`). `scores`: reply id "<dialogue>:<turn>:<strategy>"
    -> summed log-prob of the prefix, "...:<strategy>@<j>" -> of its first j tokens."""
    rows = []
    for d in dialogues:
        for i in d.turn_indices():
            sc = {s: scores[f"{d.id}:{i}:{s}"] for s in sset.names}
            cum = {s: [scores[f"{d.id}:{i}:{s}@{j}"] for j in range(1, len(prefixes[s]))] + [sc[s]] for s in sc}
            per_token = {s: [c[0]] + [b - a for a, b in zip(c, c[1:])] for s, c in cum.items()}
            m = d.messages[i]
            row = {
                "id": f"{d.id}:{i}",
                "dialogue_id": d.id,
                "turn": i,
                "gold_strategy": m.strategy,
                "gold_response": m.text,
                "pred_strategy": max(sc, key=sc.get),
                "pred_first_token": first_token(per_token, prefixes),
                "scores": sc,
                "token_logps": per_token,
                "mode": "likelihood",
            }
            if offsets is not None:
                row["pred_calibrated"] = calibrated(sc, offsets)
            rows.append(row)
    return rows
