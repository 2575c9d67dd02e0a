"""Prefix-trie packing is exact: every reply's log-prob and the DPO gradients equal the per-pair layout."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import Message, Option, PrefDialogue
from cso_dist.data.render import make_renderer, tokenize_dialogue, turn_examples
from cso_dist.data.strategies import load_strategy_set
from cso_dist.losses import dpo
from cso_dist.models import build_tiny_model, load_tokenizer
from cso_dist.pack import collate_pairs, collate_trie, dialogue_pair_rows, dialogue_units, lay_out, pack_units
from cso_dist.scorer import pair_logps, trie_logps

SSET = load_strategy_set("esconv")


@pytest.fixture(scope="module")
def dialogues(esconv_dir):
    ds, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    return ds[:4]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tmp_path_factory, esconv_dir):
    texts = [u["text"] for line in open(esconv_dir / "valid.jsonl") for u in json.loads(line)["dialog"]]
    out = build_tiny_model(
        request.param,
        tmp_path_factory.mktemp(request.param) / "m",
        tokenizer="bpe",
        bpe_texts=texts,
        hidden_size=32,
        num_layers=2,
        seed=1,
    )
    return request.param, out, load_tokenizer(out)


def _model(path, attn="sdpa", dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return m.eval()


def _both(model, tok, dialogues, max_length=768, budget=1200):
    r = make_renderer(tok, "auto")
    units = [u for d in dialogues for u in dialogue_units(d, r, SSET, budget, max_length)]
    tri = {}
    batches = [collate_trie(b) for b in pack_units(units, budget)]
    tri_out = [(b, trie_logps(model, b, chunk=64)) for b in batches]
    for b, lp in tri_out:
        for rid, v in zip(b.reply_ids, lp):
            if "#" in rid:  # a re-emitted copy of a chosen reply scores exactly like the original
                assert abs(v - tri[rid.split("#")[0]]) <= 1e-5 * abs(v)
            else:
                tri[rid] = v
    rows = [row for d in dialogues for turn in dialogue_pair_rows(d, r, SSET, max_length) for row in turn]
    pair = {}
    for i in range(0, len(rows), 6):
        pb = collate_pairs(rows[i : i + 6], tok.pad_token_id)
        pair.update(zip(pb.reply_ids, pair_logps(model, pb)))
    return tri, pair, units


@pytest.mark.slow
@pytest.mark.parametrize("attn", [pytest.param("sdpa", marks=pytest.mark.numerics), "eager"])
def test_trie_logps_equal_per_pair(tiny, dialogues, attn):
    arch, path, tok = tiny
    with torch.no_grad():
        tri, pair, units = _both(_model(path, attn), tok, dialogues)
    assert len(units) > len(dialogues)  # the 1200-token budget split some dialogues
    assert set(pair) == set(tri) and len(pair) > 50
    worst = max(abs(tri[k] - pair[k]) / abs(pair[k]) for k in pair)
    assert worst < 1e-5, (arch, attn, worst)
    # in float64 the layouts agree ~1000x closer still (eager attention keeps its softmax in fp32):
    # the differences are rounding, not the mask or the positions
    with torch.no_grad():
        tri64, pair64, _ = _both(_model(path, attn, torch.float64), tok, dialogues[:2])
    assert max(abs(tri64[k] - pair64[k]) for k in pair64) < (1e-10 if attn == "sdpa" else 1e-6)


@pytest.mark.numerics
@pytest.mark.slow
def test_dpo_gradients_equal_per_pair(tiny, dialogues):
    arch, path, tok = tiny
    grads = []
    for layout in ("trie", "pair"):
        model = _model(path)
        model.zero_grad()
        r = make_renderer(tok, "auto")
        if layout == "trie":
            lp = {}
            for b in pack_units([u for d in dialogues[:2] for u in dialogue_units(d, r, SSET, 1200, 768)], 1200):
                tb = collate_trie(b)
                lp.update(zip(tb.reply_ids, trie_logps(model, tb, chunk=64)))
        else:
            rows = [row for d in dialogues[:2] for t in dialogue_pair_rows(d, r, SSET, 768) for row in t]
            pb = collate_pairs(rows, tok.pad_token_id)
            lp = dict(zip(pb.reply_ids, pair_logps(model, pb)))
        pairs = sorted(k for k in lp if ":r" in k)
        chosen = torch.stack([lp[k.rsplit(":", 1)[0] + ":c"] for k in pairs])
        rejected = torch.stack([lp[k] for k in pairs])
        g = torch.Generator().manual_seed(0)
        ref_c = chosen.detach() + torch.randn(len(pairs), generator=g)
        ref_r = rejected.detach() + torch.randn(len(pairs), generator=g)
        dpo(chosen, rejected, ref_c, ref_r, beta=0.1).losses.mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    trie, pair = grads
    assert trie.keys() == pair.keys() and len(trie) > 5
    for n in pair:
        scale = pair[n].abs().max().item()
        assert (trie[n] - pair[n]).abs().max().item() <= 1e-5 * max(scale, 1e-12), n


def test_fast_mask_equals_the_interval_definition_on_esconv_batches(esconv_dir, qwen_tok):
    from cso_dist.pack import lay_out, pack_units

    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    laid = lay_out(
        dialogues[:6],
        make_renderer(qwen_tok, "chatml"),
        load_strategy_set("esconv"),
        1500,
        700,
        kl=True,
        progress=False,
    )
    batches = pack_units(laid.all_units(), 1500)
    assert len(batches) >= 3
    for units in batches:
        b = collate_trie(units)
        k = torch.arange(b.n_tokens)
        q = k[:, None]
        ref = ((k >= b.ctx_lo[:, None]) & (k < b.ctx_hi[:, None])) | ((k >= b.own_lo[:, None]) & (k <= q))
        assert torch.equal(b.allowed(), ref)


def test_mask_and_positions_of_a_branch():
    tok = [11, 12, 13, 14, 15]  # prefix 11 12 | chosen 13 14 15 ; branch 21 22 after the 2-token history
    from cso_dist.pack.types import Span, Unit

    u = Unit("d", tok + [21, 22], [0, 1, 2, 3, 4, 2, 3], 5, [Span("d:1:c", 2, 3, 2), Span("d:1:r0", 5, 2, 2)])
    other = Unit("e", [31, 32], [0, 1], 2, [Span("e:1:c", 1, 1, 1)])
    b = collate_trie([u, other])
    allowed = b.attention_mask()[0, 0] == 0
    expect = torch.zeros(9, 9, dtype=torch.bool)
    for q in range(5):
        expect[q, : q + 1] = True  # causal trunk
    expect[5, [0, 1, 5]] = True  # branch: history + itself
    expect[6, [0, 1, 5, 6]] = True
    expect[7, 7] = expect[8, 7] = expect[8, 8] = True  # second dialogue: its own block only
    assert torch.equal(allowed, expect)
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1]
    # reply tokens are predicted from: chosen 13<-12, 14<-13, 15<-14; branch 21<-12 (history end), 22<-21
    assert b.pred_idx.tolist() == [1, 2, 3, 1, 5, 7] and b.target_ids.tolist() == [13, 14, 15, 21, 22, 32]
    assert b.reply_ids == ["d:1:c", "d:1:r0", "e:1:c"] and b.reply_tokens.tolist() == [3, 2, 1]


def test_split_keeps_every_reply_once(tiny, dialogues):
    _, _, tok = tiny
    r = make_renderer(tok, "auto")
    d = dialogues[0]
    full = dialogue_units(d, r, SSET, 100_000, None)
    assert len(full) == 1
    want = sorted(s.reply_id for s in full[0].spans)
    assert len(want) == 4 * len(d.turn_indices())  # chosen + 3 rejected per turn
    for budget in (900, 480):
        units = dialogue_units(d, r, SSET, budget, 450)
        assert all(len(u) <= budget for u in units)
        got = [s.reply_id for u in units for s in u.spans]
        assert sorted(x for x in got if "#" not in x) == want  # every reply exactly once ...
        for u in units:  # ... and every rejected reply shares its unit with its chosen reply (or a copy)
            ids = {s.reply_id.split("#")[0] for s in u.spans}
            assert all(x.rsplit(":", 1)[0] + ":c" in ids for x in ids)
    assert any("#" in x for x in got)  # the 480-token budget split a turn's replies


def test_kl_branches_and_single_turn():
    d = PrefDialogue(
        "x", [Message("seeker", "hi"), Message("supporter", "hello", "Others", [Option("Question", "why?")])], "esconv"
    )
    from cso_dist.models import bpe_tokenizer

    tok = bpe_tokenizer(["hi hello why"] * 20, vocab_size=300)
    laid = lay_out([d, PrefDialogue("y", d.messages, "esconv")], make_renderer(tok, "auto"), SSET, 2048, 1024)
    ids = [s.reply_id for u in laid.all_units() for s in u.spans]
    assert ids == ["x:1:c", "x:1:r0", "x:1:kl", "y:1:c", "y:1:r0", "y:1:kl"]
    alone = lay_out([d], make_renderer(tok, "auto"), SSET, 2048, 1024)
    assert [s.reply_id for u in alone.all_units() for s in u.spans] == ["x:1:c", "x:1:r0"]  # no mismatched pair


@pytest.mark.slow
def test_tokens_per_pair_on_esconv_train(qwen_tok, esconv_dir, capsys):
    """Real Qwen2.5 tokenizer, ESConv train, K=3: tokens the model processes per preference pair."""
    ds, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="train"))
    r = make_renderer(qwen_tok, "auto")
    laid = lay_out(ds, r, SSET, 4096, 2048, kl=False, progress=False)
    trie_tokens = sum(len(u) for u in laid.all_units())
    pairs = sum(len(d.messages[i].rejected) for d in ds for i in d.turn_indices())
    pair_tokens = sum(
        2 * len(ex.history) + len(ex.chosen) + len(rej)
        for d in ds
        for ex in turn_examples(d, r, SSET, 2048, tokenize_dialogue(d, r, SSET))
        for rej in ex.rejected
    )
    per_pair, trie = pair_tokens / pairs, trie_tokens / pairs
    with capsys.disabled():
        print(
            f"\nESConv train, K=3: {pairs} pairs; tokens per pair: per-pair layout {per_pair:.1f}, "
            f"trie layout {trie:.1f} ({per_pair / trie:.1f}x fewer)"
        )
    assert per_pair / trie > 10
