"""Greedy (or sampled) continuations of token prompts in one padded generate(): what evaluation, the
model-written preference options (cso_dist.data.generated) and the GPU kit generate with."""

from __future__ import annotations

import torch

from cso_dist.data.templates import end_of_turn_ids
from cso_dist.scorer.device import cache_kw, cache_of, feed


def _common_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own."""
    n = min(len(x) for x in prompts) - 1
    for k in range(n):
        if any(x[k] != prompts[0][k] for x in prompts):
            return k
    return max(n, 0)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    share_prefix: bool = False,
    device: torch.device | None = None,
    amp: torch.dtype | None = None,
    **sampling,
) -> list[str]:
    """Continue every token prompt in one padded generate() (each prompt ends where generation starts); the
    decoded new text of each, special tokens dropped. `stop_ids`: more tokens that end a continuation (besides
    the end of turn). `share_prefix`: the prompts' common prefix (one history, several reply openings) is run
    once, its keys and values shared by every row; the rest of each prompt follows it, padded in the middle
    (masked: each row goes on at its own positions). `amp`: the autocast dtype (precision bf16-mixed: the
    scorer's). `sampling`: generate() options."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shared = _common_prefix(prompts) if share_prefix and len(prompts) > 1 else 0
    width = max(len(x) for x in prompts) - shared
    ids = torch.full((len(prompts), shared + width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for k, x in enumerate(prompts):
        ids[k, :shared] = torch.tensor(x[:shared], dtype=torch.long)
        ids[k, shared + width - (len(x) - shared) :] = torch.tensor(x[shared:], dtype=torch.long)
        mask[k, shared + width - (len(x) - shared) :] = 1
    cache = {}
    if shared:
        prefix = cache_of(feed(model, model, device, amp, input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1))
        prefix.batch_repeat_interleave(len(prompts))
        cache = {cache_kw(model): prefix}
    out = feed(
        model,
        model.generate,
        device,
        amp,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=sorted({*end_of_turn_ids(tokenizer), *stop_ids}),
        **cache,
        **sampling,
    )
    end = shared + width
    return [tokenizer.decode(out[k, end:], skip_special_tokens=True).strip() for k in range(len(prompts))]
