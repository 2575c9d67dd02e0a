"""Compiled FlexAttention with bounded compilation (pack.bucket): rows padded to a few lengths compile a few times,
padding changes no score and no gradient, and meeting the recompile limit is an error naming pack.bucket.

FlexAttention has no backward on CPU, so compiled flex is checked here by scoring (what precompute, the live
reference and evaluation run); the GPU kit trains with it."""

import json
import subprocess
import sys

import pytest
import torch
from test_attention import _batches, _model

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.util.errors import ConfigError, CsoError
from cso_dist.models import build_tiny_model, load_tokenizer
from cso_dist.pack.buckets import bucket_count, bucket_length
from cso_dist.pack.tree_plan import padded_row
from cso_dist.scorer import trie_logps
from cso_dist.scorer.attention import FlexRows, compile_count
from conftest import REPO

BUCKET, MAX_TOKENS = 128, 640


@pytest.fixture(scope="module")
def setup(tmp_path_factory, esconv_dir):
    dialogues = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))[0][:4]
    texts = [u["text"] for line in open(esconv_dir / "valid.jsonl") for u in json.loads(line)["dialog"]]
    path = build_tiny_model(
        "qwen2", tmp_path_factory.mktemp("flex") / "m", tokenizer="bpe", bpe_texts=texts, hidden_size=32, num_layers=2
    )
    tok = load_tokenizer(path)
    # small budgets: many micro-batches of many lengths, with KTO branches (masked segments) and split turns
    batches = _batches(tok, dialogues, budget=MAX_TOKENS, max_length=448, kl=True)
    return path, batches


def _scores(scorer, batches, flex: FlexRows) -> dict:
    """The scorer's model and attention kind, on rows that `flex` pads and compiles."""
    out = {}
    with torch.no_grad():
        for b in batches:
            lp = trie_logps(scorer.model, b, chunk=64, flex=flex, attention=scorer.attention)
            out.update(zip(b.reply_ids, lp.tolist()))
    return out


@pytest.mark.slow
def test_an_epoch_compiles_at_most_twice_per_bucket_and_scores_exactly(setup):
    path, batches = setup
    lengths = {b.n_tokens for b in batches}
    assert len(batches) >= 30 and len(lengths) >= 15  # unpadded, every new length would compile again
    rows = FlexRows.of(MAX_TOKENS, BUCKET)
    buckets = {bucket_length(n, BUCKET) for n in lengths}
    assert len(buckets) <= bucket_count(MAX_TOKENS, BUCKET) == 5
    flex = _model(path, "flex")
    before = compile_count()
    got = _scores(flex, batches, rows)
    compiled = compile_count() - before
    # FlexAttention's kernel and its block mask, once per bucket at most (fewer where this process had them already)
    assert compiled <= 2 * len(buckets), compiled
    print(f"{len(batches)} micro-batches, {len(lengths)} row lengths, {len(buckets)} buckets: {compiled} graphs")
    first = rows.prepare(batches[0], "cpu")  # built once per micro-batch: the live reference reuses the policy's
    assert rows.prepare(batches[0], "cpu")[1] is first[1] and first[0].n_tokens % BUCKET == 0
    again = compile_count()
    assert _scores(flex, batches, rows) == got and compile_count() == again  # a second epoch compiles nothing
    tree = _scores(_model(path, "tree"), batches, rows)  # tree equals the per-pair layout (test_attention)
    eager = _scores(flex, batches[:6], FlexRows(bucket=0, compiled=False))  # flex's unfused reference, unpadded
    assert set(got) == set(tree) and len(got) > 100
    assert max(abs(got[k] - tree[k]) / abs(tree[k]) for k in tree) < 1e-5
    assert max(abs(got[k] - eager[k]) / abs(eager[k]) for k in eager) < 1e-5


@pytest.mark.unit
def test_padding_changes_no_score_and_no_gradient(setup):
    """Eager attention runs the padded row's rule as an additive mask (a padding query that sees nothing attends
    uniformly, finite): the same log-probs and parameter gradients as the unpadded row."""
    path, batches = setup
    b = max(batches, key=lambda x: len(x.reply_ids))
    padded = padded_row(b, b.n_tokens + 100)
    assert padded.n_tokens == b.n_tokens + 100 and not padded.allowed()[b.n_tokens :].any()
    assert not padded.allowed()[:, b.n_tokens :].any()  # nothing sees a padding token
    from transformers import AutoModelForCausalLM

    out = []
    for row in (b, padded):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        lp = trie_logps(model, row, chunk=64)
        (lp * torch.linspace(-1, 1, len(lp))).sum().backward()
        out.append((lp.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (lp0, g0), (lp1, g1) = out
    assert torch.allclose(lp0, lp1, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-5 * g0[n].abs().max() + 1e-9, n
    with pytest.raises(CsoError, match="cannot be padded"):
        padded_row(b, b.n_tokens - 1)


_LIMIT = """
import sys, torch
sys.path.insert(0, "tests")
from test_attention import _model
from cso_dist.pack.trie import collate_trie
from cso_dist.pack.types import ReplyId, Span, Unit
from cso_dist.scorer import trie_logps
from cso_dist.scorer.attention import FlexRows
from cso_dist.util.errors import ConfigError, CsoError

def row(n):
    reply = Span(ReplyId("d", 1, "c"), 1, n - 1, 1)
    return collate_trie([Unit("d", list(range(5, 5 + n)), list(range(n)), n, [reply])])

model = _model(sys.argv[1], "flex").model
rows = FlexRows(bucket=128, limit=1)
with torch.no_grad():
    trie_logps(model, row(100), flex=rows, attention="flex")  # bucket 128: compiles
    trie_logps(model, row(120), flex=rows, attention="flex")  # the same bucket: no compile
    try:
        trie_logps(model, row(200), flex=rows, attention="flex")  # bucket 256: a second compile, past the limit
    except CsoError as e:
        print("refused:", e)
"""


@pytest.mark.slow
def test_meeting_the_recompile_limit_is_an_error_naming_pack_bucket(setup):
    """In a fresh process (dynamo's limit counts a function's compilations in the whole process): a limit of 1 and
    rows of two buckets."""
    path, _ = setup
    proc = subprocess.run(
        [sys.executable, "-c", _LIMIT, str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [x for x in proc.stdout.splitlines() if x.startswith("refused:")]
    assert len(said) == 1 and "pack.bucket" in said[0] and "recompile limit (1)" in said[0], proc.stdout


@pytest.mark.slow
def test_compiled_layers_score_as_uncompiled_with_a_graph_per_bucket(setup):
    """train.compile (regional compilation of the decoder layers, with flex inside them) scores like the plain model;
    the layers share their graphs (dynamo's counters: a few, not one per layer or per row)."""
    from cso_dist.engines.common import compile_layers

    path, batches = setup
    rows = FlexRows.of(MAX_TOKENS, BUCKET)
    model = _model(path, "flex")
    want = _scores(model, batches[:6], rows)
    before = compile_count()
    compile_layers(model.model, model.attention)
    got = _scores(model, batches[:6], rows)
    buckets = {bucket_length(b.n_tokens, BUCKET) for b in batches[:6]}
    assert 0 < compile_count() - before <= 2 * len(buckets)
    assert max(abs(got[k] - want[k]) / abs(want[k]) for k in want) < 1e-5
    with pytest.raises(ConfigError, match="train.compile: scorer.attention resolved to tree"):
        tree = _model(path, "tree")
        compile_layers(tree.model, tree.attention)
