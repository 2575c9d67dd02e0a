"""Statistics of preference dialogues: counts, strategies and (with a tokenizer) token lengths."""

from __future__ import annotations

from collections import Counter

from cso_dist.util.progress import progress

from cso_dist.data.dialogue import SUPPORTER, PrefDialogue
from cso_dist.data.render import Renderer, make_renderer, tokenize_dialogue, turn_examples
from cso_dist.data.strategies import StrategySet, resolve_strategy_set


def dialogue_stats(dialogues: list[PrefDialogue]) -> dict:
    turns = pairs = context = no_neg = messages = 0
    strategies: Counter = Counter()
    rejected: Counter = Counter()
    for d in dialogues:
        messages += len(d.messages)
        for m in d.messages:
            if m.role != SUPPORTER:
                continue
            if not m.target:
                context += 1
                continue
            turns += 1
            pairs += len(m.rejected)
            no_neg += not m.rejected
            strategies[m.strategy] += 1
            rejected.update(o.strategy for o in m.rejected)
    return {
        "dialogues": len(dialogues),
        "messages": messages,
        "turns": turns,
        "pairs": pairs,
        "turns_without_negatives": no_neg,
        "context_only_turns": context,
        "negatives_per_turn": round(pairs / turns, 3) if turns else 0.0,
        "strategies": dict(strategies.most_common()),
        "rejected_strategies": dict(rejected.most_common()),
    }


def token_stats(
    dialogues: list[PrefDialogue], renderer: Renderer, sset: StrategySet, max_length: int | None = None
) -> dict:
    """Mean history / reply lengths in tokens per turn, and what truncation did at max_length."""
    hist = chosen = rej = n_rej = truncated = dropped = 0
    turns = longest_history = 0
    trie_tokens = pair_tokens = 0
    for d in progress(dialogues, desc="tokenising", unit="dlg"):
        toks = tokenize_dialogue(d, renderer, sset)
        full = len(toks.full())
        trie_tokens += full + sum(len(r) for rs in toks.rejected.values() for r in rs)
        for ex in turn_examples(d, renderer, sset, max_length, toks):
            turns += 1
            hist += len(ex.history)
            chosen += len(ex.chosen)
            rej += sum(len(r) for r in ex.rejected)
            n_rej += len(ex.rejected)
            pair_tokens += sum(2 * len(ex.history) + len(ex.chosen) + len(r) for r in ex.rejected)
            longest_history = max(longest_history, len(ex.history))
            truncated += ex.dropped_messages > 0
            dropped += ex.dropped_messages
    return {
        "mean_history_tokens": round(hist / turns, 1) if turns else 0.0,
        "mean_chosen_tokens": round(chosen / turns, 1) if turns else 0.0,
        "mean_rejected_tokens": round(rej / n_rej, 1) if n_rej else 0.0,
        "max_history_tokens": longest_history,
        "max_length": max_length,
        "truncated_turns": truncated,
        "dropped_history_messages": dropped,
        "dialogue_tokens_with_branches": trie_tokens,
        "per_pair_tokens": pair_tokens,
    }


def token_stats_for(dialogues: list[PrefDialogue], tokenizer_dir: str, data_cfg) -> dict:
    """token_stats with the tokenizer of a model folder and the data config's template and strategies."""
    from cso_dist.models import load_tokenizer  # torch and transformers: only with --tokenizer

    sset = resolve_strategy_set(data_cfg.strategies, dialogues[0].strategy_set if dialogues else None)
    renderer = make_renderer(load_tokenizer(tokenizer_dir), data_cfg.chat_template)
    return token_stats(dialogues, renderer, sset, data_cfg.max_length)
