"""Per-reply summed log-probs of a micro-batch: the prefix trie (trie_logps: logits only where replies are
predicted) and the per-pair baseline (pair_logps: full logits), and `score`, which picks the one for a batch."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from cso_dist.pack.pairs import PairBatch
from cso_dist.pack.trie import TrieBatch
from cso_dist.scorer.attention import FlexRows, decoder_mask_kwargs
from cso_dist.scorer.device import feed, model_device, to_model


def _chunk_logps(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # log-softmax in >= fp32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _decoder_and_head(model):
    """The transformer body and the LM head of an HF causal LM (PEFT- and DeepSpeed-wrapped too)."""
    inner = getattr(model, "module", model)  # DeepSpeed engine / DDP
    cfg = inner.config
    return (
        inner.get_decoder(),
        inner.get_output_embeddings(),
        getattr(cfg, "final_logit_softcapping", None),
        getattr(cfg, "_attn_implementation", None) or "sdpa",
    )


def trie_logps(
    model,
    batch: TrieBatch,
    chunk: int = 2048,
    mask_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    n_chunks: int = 0,
    flex: FlexRows | None = None,
    attention: str = "dense",
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed log-prob of every reply in the batch, in `batch.reply_ids` order.

    The body runs once over the packed row, its attention shaped by the tree: `attention` is the kind the model
    was set to (cso_dist.scorer.attention.use_attention; a Scorer sets it and holds it), dense by default (right
    for any model); the body runs under autocast to `amp` (bf16-mixed), the LM head outside it. The LM head and the
    log-softmax run only on the hidden states that predict reply tokens, `chunk` tokens at a
    time (recomputed in backward), so no [tokens x vocab] tensor over the history exists.
    `device`: where the model computes (default: its weights'). `n_chunks`: call the LM head at least this many
    times (empty calls after the real ones): under ZeRO-3 each call gathers the head's weight from every rank, so
    ranks scoring different batches must make the same number of calls (cso_dist.pack.head_chunks).
    `flex`: how flex attention runs rows (padding to pack.bucket, the recompile limit); FlexRows() by default.
    """
    decoder, head, softcap, attn = _decoder_and_head(model)
    device = device or model_device(model)
    if mask_dtype is not None:
        dtype = mask_dtype
    elif attn == "eager":  # eager adds the mask to the scores: additive, in the compute dtype
        dtype = next(p for p in decoder.parameters() if p.is_floating_point() and p.dtype != torch.uint8).dtype
        dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32
    else:  # sdpa / flash / flex take a boolean mask (True = attend), as transformers builds them
        dtype = torch.bool
    flex = flex or FlexRows()
    # under flex the row padded to its bucket (its reply indices are the unpadded row's), compiling bounded
    batch, mask = decoder_mask_kwargs(attention, model, batch, device, dtype, flex)
    with flex.compiling() if "cso_flex" in mask else contextlib.nullcontext():
        ids, pos = batch.input_ids, batch.position_ids
        out = feed(model, decoder, device, amp, input_ids=ids, position_ids=pos, use_cache=False, **mask)
    pred_idx, targets, token_reply = to_model(model, batch.pred_idx, batch.target_ids, batch.token_reply, device=device)
    h = out.last_hidden_state[0].index_select(0, pred_idx)
    parts = []
    starts = list(range(0, h.shape[0], chunk))
    starts += [h.shape[0]] * (n_chunks - len(starts))  # empty calls: as many LM-head calls as the other ranks
    for lo in starts:
        hs, ts = h[lo : lo + chunk], targets[lo : lo + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            parts.append(checkpoint(_chunk_logps, hs, ts, head, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(hs, ts, head, softcap))
    tok = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(len(batch.reply_ids), dtype=tok.dtype, device=device)
    return sums.index_add(0, token_reply, tok)


def pair_logps(
    model, batch: PairBatch, device: torch.device | None = None, amp: torch.dtype | None = None
) -> torch.Tensor:
    """Summed log-prob of each row's reply, from full logits (the classic computation), under autocast to `amp`."""
    ids, mask = batch.input_ids, batch.attention_mask
    out = feed(model, model, device, amp, input_ids=ids, attention_mask=mask, use_cache=False)
    logits = out.logits[:, :-1]
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    ids, reply_mask = to_model(model, batch.input_ids, batch.reply_mask, device=device)
    tok = torch.gather(logps, 2, ids[:, 1:, None]).squeeze(2)
    return (tok * reply_mask[:, 1:]).sum(1)


def score(
    model,
    batch: TrieBatch | PairBatch,
    chunk: int = 2048,
    device: torch.device | None = None,
    n_chunks: int = 0,
    flex: FlexRows | None = None,
    attention: str = "dense",
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed log-prob of every reply of a micro-batch of either layout, in `batch.reply_ids` order (`chunk`:
    the trie scorer's LM-head chunk; `device`, `n_chunks`, `flex`, `attention` and `amp` as for trie_logps)."""
    if isinstance(batch, TrieBatch):
        return trie_logps(model, batch, chunk, None, device, n_chunks, flex, attention, amp)
    return pair_logps(model, batch, device, amp)
