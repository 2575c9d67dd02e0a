"""What a model is asked at every supporter turn of an evaluation split: the turns and their prompts (history cut
oldest-first to leave room for the reply), shared by generation and likelihood scoring."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import PrefDialogue, read_dialogues
from cso_dist.data.render import tokenize_dialogue, truncate_turn
from cso_dist.data.strategies import StrategySet

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


@dataclass
class Turn:
    id: str
    dialogue_id: str
    turn: int
    gold_strategy: str
    gold_response: str
    prompt: list[int]


def eval_dialogues(cfg: TrainingConfig, split: str, data_file: str = "") -> list[PrefDialogue]:
    """Preference dialogues of a data file, or of an ESConv split built with the config's data settings."""
    dialogues = read_dialogues(Path(data_file)) if data_file else build_dialogues(replace(cfg.data, split=split))[0]
    return dialogues[: cfg.eval.max_dialogues] if cfg.eval.max_dialogues else dialogues


def eval_turns(
    dialogues: list[PrefDialogue], renderer, sset: StrategySet, max_length: int, max_new_tokens: int
) -> list[Turn]:
    """Every target supporter turn with its prompt, history cut oldest-first (whole messages) to leave room
    for `max_new_tokens` reply tokens."""
    out = []
    for d in dialogues:
        toks = tokenize_dialogue(d, renderer, sset)
        for i in d.turn_indices():
            prompt = toks.history(i)
            if len(prompt) + max_new_tokens > max_length:
                prompt = truncate_turn(d, renderer, sset, i, max_new_tokens, max_length)[0]
            m = d.messages[i]
            out.append(Turn(f"{d.id}:{i}", d.id, i, m.strategy, m.text, prompt))
    return out
