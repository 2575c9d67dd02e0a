"""The device-placement tier: every path that runs a model, run with the model on another device than the one its
data is built on (tests/other_device.py: a second device on a CPU-only machine). A path that hands the model a CPU
tensor fails here as it would fail on a GPU; each path must also give the numbers it gives on the CPU."""

import json

import pytest
import torch
from conftest import cfg_of, run_overrides, tiny_run_data
from other_device import OTHER, DeviceMismatch, on_other, other_device

from cso_dist.data.render import make_renderer
from cso_dist.data.dialogue import read_dialogues
from cso_dist.data.strategies import load_strategy_set
from cso_dist.models import load_model, load_tokenizer
from cso_dist.pack import PairLayout, TrieLayout
from cso_dist.scorer import Scorer

SSET = load_strategy_set("esconv")
DEV = str(OTHER)


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    """transformers kernelizes a model on train() when the `kernels` package is installed, and kernelize()
    refuses the meta device; the GPU image has no `kernels`, so its runs never kernelize either."""
    monkeypatch.setenv("USE_HUB_KERNELS", "0")


@pytest.fixture(scope="module")
def root(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("device")
    tiny_run_data(root, esconv_dir, n_train=2, n_valid=1)
    return root


def _layouts(root):
    tok = load_tokenizer(root / "model")
    dialogues = read_dialogues(root / "train.jsonl")
    r = make_renderer(tok, "auto")
    trie = TrieLayout(dialogues, r, SSET, 1024, 512, progress=False)
    pair = PairLayout(dialogues, r, SSET, 1024, 512)
    return {"trie": trie, "pair": pair}, list(range(len(dialogues)))


def _copy_weights(src, dst) -> None:
    """src's values into dst's parameters (load_state_dict skips parameters on the meta device)."""
    want = dict(src.named_parameters())
    with torch.no_grad():
        for n, p in dst.named_parameters():
            p.copy_(want[n])


def _score(model, batches, backward: bool, attention: str = "auto"):
    """Each batch's log-probs (on the CPU) and the gradient of their sum per parameter name (on the CPU), scored
    with `attention` (the scorer sets it on the model)."""
    model.eval()  # no dropout (LoRA's): both devices draw the same masks only by chance
    model.zero_grad(set_to_none=True)
    scorer, out = Scorer(model, attention=attention), []
    for b in batches:
        with torch.set_grad_enabled(backward):
            lp = scorer(b)
            if backward:
                lp.sum().backward()
        out.append(lp.detach().to("cpu"))
    grads = {n: p.grad.to("cpu") for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(out), grads


@pytest.mark.parametrize(
    "layout,attention,finetune",
    [("trie", "tree", "full"), ("trie", "dense", "full"), ("pair", "auto", "full"), ("trie", "tree", "lora")],
)
def test_scoring_runs_on_the_models_device(root, layout, attention, finetune):
    """Trie (tree and dense attention) and per-pair scoring, forward and backward, full and LoRA: on the other
    device the same log-probs and gradients as on the CPU."""
    layouts, order = _layouts(root)
    batches = layouts[layout].batches(order)
    cpu = load_model(root / "model", finetune, "fp32", device="cpu")
    with other_device():
        model = load_model(root / "model", finetune, "fp32", device=DEV)
        assert on_other(next(model.parameters()))
        _copy_weights(cpu, model)  # the same LoRA initialisation
        got, got_g = _score(model, batches, True, attention)
    want, want_g = _score(cpu, batches, True, attention)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
    assert got_g.keys() == want_g.keys() and got_g
    for n in want_g:
        assert torch.allclose(got_g[n], want_g[n], rtol=1e-4, atol=1e-5), n


def test_the_tier_catches_an_input_left_on_the_cpu(root):
    """What a GPU says when a path forgets to move its inputs (the per-pair scorer did, before cso_dist.device)."""
    layouts, order = _layouts(root)
    b = layouts["pair"].batches(order)[0]
    with other_device():
        model = load_model(root / "model", "full", "fp32", device=DEV)
        with pytest.raises(DeviceMismatch, match="same device"):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)


def _curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in rows if "loss" in m]


@pytest.mark.slow
def test_training_with_the_live_reference_runs_on_the_models_device(root):
    """LoRA DPO with train.reference adapter (the adapter-disabled policy scores the reference, live), eval on
    a held-out split and a checkpoint: the torch engine on the other device follows the CPU's loss curve. Both
    start from one saved adapter (PEFT draws a new adapter's weights differently on the meta device)."""
    from cso_dist.models import LoraSettings
    from cso_dist.train.loop import run_train

    adapter = root / "adapter"
    torch.manual_seed(0)
    lora = load_model(root / "model", "lora", "fp32", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B = 0 would make step 1 blind to A
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lora.save_pretrained(adapter)
    common = {
        "model.path": adapter,
        "model.finetune": "lora",
        "train.reference": "adapter",
        "train.eval_file": root / "valid.jsonl",
        "train.eval_every": 2,
        "train.max_steps": 2,
        "train.grad_accum": 2,
        "train.save_every": 1,
    }
    run_train(cfg_of(run_overrides(root, "train-cpu", **common)), progress=False, device="cpu")
    with other_device():
        summary = run_train(cfg_of(run_overrides(root, "train-other", **common)), progress=False, device=DEV)
    want, got = _curve(root / "train-cpu"), _curve(root / "train-other")
    assert len(got) == len(want) == 2 and summary["steps"] == 2 and summary["eval/loss"] > 0
    assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(got, want)), (got, want)
    assert (root / "train-other" / "final").is_dir()


@pytest.mark.slow
def test_precompute_runs_on_the_models_device(root):
    """The reference cache computed on the other device holds the CPU's log-probs."""
    from cso_dist.refcache import cache_key, load_reference, precompute
    from cso_dist.inputs import make_cfg_renderer, resolve_sset

    caches = {}
    for where in ("cpu", DEV):
        cfg = cfg_of(run_overrides(root, "pre", **{"train.ref_cache": root / f"refcache-{where}"}))
        with other_device() if where == DEV else torch.no_grad():
            precompute(cfg, progress=False, device=where)
        key = cache_key(cfg, "train", make_cfg_renderer(cfg), resolve_sset(cfg))
        caches[where] = load_reference(cfg, key, "train")
    assert caches["cpu"].keys() == caches[DEV].keys() and len(caches["cpu"]) > 20
    for k, (lp, n) in caches["cpu"].items():
        assert caches[DEV][k][1] == n and abs(caches[DEV][k][0] - lp) <= 1e-4 * max(1.0, abs(lp)), k


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_eval_runs_on_the_models_device(root, mode):
    """Likelihood eval (strategy prefixes scored as a trie) and generation: the same predictions as on the CPU."""
    from cso_dist.eval.generate import run_generate

    over = {"eval.max_new_tokens": 8, "eval.do_sample": "false", "eval.batch_size": 4}
    cfg = cfg_of(run_overrides(root, "eval", **over))
    rows = {}
    for where in ("cpu", DEV):
        out = root / f"pred-{mode}-{where}.jsonl"
        with other_device() if where == DEV else torch.no_grad():
            run_generate(cfg, "valid", out, mode, data_file=str(root / "valid.jsonl"), progress=False, device=where)
        rows[where] = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows[DEV]) == len(rows["cpu"]) > 3
    for a, b in zip(rows["cpu"], rows[DEV]):
        assert a["id"] == b["id"] and a["pred_strategy"] == b["pred_strategy"]
        if mode == "generate":
            assert a["pred_raw"] == b["pred_raw"]
        else:
            assert all(abs(a["scores"][s] - b["scores"][s]) < 1e-3 for s in a["scores"])


@pytest.mark.slow
def test_mcts_hf_backend_runs_on_the_models_device(root):
    """The MCTS backend's two model calls -- batched generation and next-token probes on a cached prompt -- on
    the other device (called in this thread: the device check is per thread, the backend's worker is another)."""
    from cso_dist.mcts.backends import HFBackend

    chat = [{"role": "user", "content": "I lost my job and I feel lost."}]
    probes = [(chat, "("), (chat, "(Q"), ([{"role": "user", "content": "hello"}], "(")]
    got = {}
    for where in ("cpu", DEV):
        with other_device() if where == DEV else torch.no_grad():
            backend = HFBackend(str(root / "model"), device=where)
            assert on_other(next(backend.model.parameters())) == (where == DEV)
            got[where] = (backend._generate([chat, chat[:1]], 6, 0.0), backend._probe(probes, 5))
    assert got["cpu"][0] == got[DEV][0]
    assert len(got[DEV][1]) == len(probes) and all(got[DEV][1]), got[DEV][1]  # every probe has its answer
    for a, b in zip(got["cpu"][1], got[DEV][1]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
