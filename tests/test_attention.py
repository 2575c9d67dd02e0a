"""Tree attention (scorer.attention tree / flex) is exact: the same log-probs and gradients as the dense mask and
the per-pair layout, on real ESConv dialogues; its plan covers exactly what the dense mask allows."""

import pytest
import test_pack
import torch
from transformers import AutoModelForCausalLM

from cso_dist.data.render import make_renderer, tokenize_dialogue
from cso_dist.data.strategies import load_strategy_set
from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.pack import collate_pairs, collate_trie, dialogue_pair_rows, dialogue_units, kl_completions, pack_units
from cso_dist.pack.tree_plan import tree_plan
from cso_dist.scorer import Scorer, resolve, trie_logps, use_attention

SSET = load_strategy_set("esconv")


# the fixtures of test_pack: 4 ESConv valid dialogues; tiny Qwen2 / Llama models (GQA: 4 heads, 2 key/value
# heads) and their tokenizer, as (arch, path, tokenizer)
dialogues, tiny = test_pack.dialogues, test_pack.tiny


def _model(path, method, dtype=torch.float32) -> Scorer:
    """A tiny model scored with `method` (the Scorer sets it on the model and holds it), LM-head chunk 64."""
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    scorer = Scorer(m, 64, attention=method)
    assert scorer.attention == method
    return scorer


def _batches(tok, dialogues, budget=1200, max_length=768, kl=False):
    r = make_renderer(tok, "auto")
    kls = kl_completions([(d, tokenize_dialogue(d, r, SSET)) for d in dialogues]) if kl else {}
    units = [u for d in dialogues for u in dialogue_units(d, r, SSET, budget, max_length, kls.get(d.id))]
    return [collate_trie(b) for b in pack_units(units, budget)]


@pytest.mark.unit
@pytest.mark.parametrize("budget,max_length", [(800, 512), (1200, 768), (4096, 768)])
def test_plan_covers_exactly_the_dense_mask(tiny, dialogues, budget, max_length):
    _, _, tok = tiny
    batches = _batches(tok, dialogues, budget, max_length, kl=True)  # with KTO branches and split turns (copies)
    assert sum(s.mask is not None for b in batches for s in tree_plan(b).segments) > len(batches)  # several turns
    for b in batches:
        plan, T = tree_plan(b), b.n_tokens
        dense = torch.zeros(T, T, dtype=torch.bool)
        rows = 0
        for s in plan.segments:
            assert s.q0 == rows  # segments tile the row in order
            rows = s.q1
            n = s.q1 - s.q0
            if s.mask is None:
                dense[s.q0 : s.q1, s.q0 : s.q1] = torch.ones(n, n, dtype=torch.bool).tril()
            else:
                dense[s.q0 : s.q1, s.k0 : s.k1] = s.mask[:, : s.k1 - s.k0]
                dense[s.q0 : s.q1, s.q0 : s.q1] = s.mask[:, s.k1 - s.k0 :]
        assert rows == T
        assert torch.equal(dense, b.allowed())
        # the work: attended pairs only, far below T^2 once several units share a row
        work = sum((s.q1 - s.q0) * ((s.k1 - s.k0) + (s.q1 - s.q0)) for s in plan.segments)
        assert work <= T * T


def _logps(scorer, batches):
    out = {}
    for b in batches:
        out.update(zip(b.reply_ids, scorer(b)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param("tree", marks=pytest.mark.numerics), "flex"])
def test_logps_equal_dense_and_per_pair(tiny, dialogues, method):
    arch, path, tok = tiny
    batches = _batches(tok, dialogues)
    with torch.no_grad():
        got = _logps(_model(path, method), batches)
        dense = _logps(_model(path, "dense"), batches)
        pm = _model(path, method)  # a tree-attention model still runs plain rows (pair layout, generation)
        r = make_renderer(tok, "auto")
        rows = [row for d in dialogues[:2] for turn in dialogue_pair_rows(d, r, SSET, 768) for row in turn]
        pair = {}
        for i in range(0, len(rows), 6):
            pb = collate_pairs(rows[i : i + 6], tok.pad_token_id)
            pair.update(zip(pb.reply_ids, pm(pb)))
    assert set(got) == set(dense) and len(got) > 50
    rel = max(abs(got[k] - dense[k]) / abs(dense[k]) for k in dense)
    assert rel < 1e-5, rel
    keys = [k for k in pair if k in got]
    assert len(keys) > 20
    assert max(abs(got[k] - pair[k]) / abs(pair[k]) for k in keys) < 1e-5


@pytest.mark.numerics
@pytest.mark.slow
def test_gradients_equal_dense(tiny, dialogues):
    _, path, tok = tiny
    batches = _batches(tok, dialogues[:2])
    grads = []
    for m in ("dense", "tree"):
        model = _model(path, m)
        w = torch.Generator().manual_seed(0)
        for b in batches:  # a loss that weighs every reply differently
            lp = model(b)
            (lp * torch.randn(len(lp), generator=w)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    dense, got = grads
    assert dense.keys() == got.keys() and len(dense) > 10
    for n in dense:
        scale = dense[n].abs().max().item()
        assert (got[n] - dense[n]).abs().max().item() <= 1e-5 * scale + 1e-9, n


@pytest.mark.unit
def test_methods_resolve_per_model(tiny):
    _, path, _ = tiny
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    assert resolve("auto", m) == "tree" and resolve("auto", m, cuda=True) == "flex"
    m.config.attn_logit_softcapping = 50.0  # gemma2 soft-caps attention logits: SDPA cannot, flex's score_mod can
    assert resolve("auto", m) == "dense" and resolve("auto", m, cuda=True) == "flex"
    with pytest.raises(ConfigError, match="scorer.attention: tree cannot soft-cap"):
        resolve("tree", m)
    with pytest.raises(ConfigError, match="scorer.attention: 'sparse' is not one of"):
        resolve("sparse", m)
    assert m.config._attn_implementation == "sdpa"
    m.config.attn_logit_softcapping = None
    for method, impl in (("tree", "cso_tree"), ("flex", "cso_flex"), ("dense", "sdpa")):  # back and forth
        assert use_attention(m, method) == method and m.config._attn_implementation == impl


@pytest.mark.unit
def test_flex_training_on_cpu_is_refused(tiny, dialogues):
    _, path, tok = tiny
    scorer = _model(path, "flex")
    with pytest.raises(CsoError, match="FlexAttention has no backward on CPU; use scorer.attention tree"):
        scorer(_batches(tok, dialogues[:1])[0])


@pytest.mark.unit
def test_a_kind_the_model_was_not_set_to_is_refused(tiny, dialogues):
    """The kind is held by the scorer, not read back from the model: asked for tree on a model whose attention is
    still its own (which would ignore the tree plan and attend across branches), trie_logps refuses."""
    _, path, tok = tiny
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    batch = _batches(tok, dialogues[:1])[0]
    with pytest.raises(CsoError, match="tree attention asked, but the model runs sdpa: set it with use_attention"):
        trie_logps(m, batch, chunk=64, attention="tree")
    with torch.no_grad():
        dense = trie_logps(m, batch, chunk=64)  # dense (the default) is right for any model
        assert torch.allclose(Scorer(m, 64, attention="tree")(batch), dense, rtol=1e-5)
