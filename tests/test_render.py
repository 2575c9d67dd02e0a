"""Rendering `(<strategy>) text`, chat templates, per-segment tokenisation and truncation."""

import pytest

from cso_dist.config import DataConfig
from cso_dist.data.build import build_dialogues
from cso_dist.data.dialogue import Message, Option, PrefDialogue
from cso_dist.data.render import make_renderer, parse_reply, system_prompt, to_chat, tokenize_dialogue, turn_examples
from cso_dist.data.stats import token_stats
from cso_dist.data.strategies import load_strategy_set
from cso_dist.util.errors import ConfigError, CsoError

ESCONV = load_strategy_set("esconv")
D = PrefDialogue(
    "d0",
    [
        Message("seeker", "Hi, I have been feeling low."),
        Message(
            "supporter",
            "What has been going on?",
            "Question",
            [Option("Information", "Many people feel low in winter."), Option("Others", "Hello!")],
        ),
        Message("seeker", "I lost my job last week."),
        Message(
            "supporter",
            "That must be really hard for you.",
            "Reflection of feelings",
            [Option("Self-disclosure", "I lost mine too.")],
        ),
        Message("seeker", "It is."),
        Message("supporter", "Maybe try talking to a friend?", "Providing Suggestions", []),
    ],
    "esconv",
)


def test_system_prompt_and_reply_format():
    sp = system_prompt(ESCONV)
    for name, desc in ESCONV.descriptions.items():
        assert f"- {name}: {desc}" in sp
    assert "in parentheses" in sp
    chat = to_chat(D.messages, sp)
    assert chat[2] == {"role": "assistant", "content": "(Question) What has been going on?"}
    assert parse_reply("( Reflection of feelings )  You sound sad.") == ("Reflection of feelings", "You sound sad.")
    assert parse_reply("no prefix") == (None, "no prefix")


@pytest.mark.parametrize("template", ["auto", "chatml", "llama3", "gemma2"])
def test_segments_reproduce_the_template_and_share_prefixes(qwen_tok, template):
    r = make_renderer(qwen_tok, template)
    toks = tokenize_dialogue(D, r, ESCONV)
    # decoding the concatenated segments gives exactly what the chat template renders
    assert qwen_tok.decode(toks.full()) == r.render(to_chat(D.messages, system_prompt(ESCONV)))
    exs = turn_examples(D, r, ESCONV)
    assert [e.turn for e in exs] == [1, 3, 5]
    for a, b in zip(exs, exs[1:]):
        assert b.history[: len(a.history) + len(a.chosen)] == a.history + a.chosen
    eot = {"auto": "<|im_end|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma2": "<end_of_turn>"}[template]
    assert qwen_tok.decode(exs[0].chosen).startswith("(Question) What has been going on?" + eot)
    assert [qwen_tok.decode(x).split(eot)[0] for x in exs[0].rejected] == [
        "(Information) Many people feel low in winter.",
        "(Others) Hello!",
    ]
    assert exs[2].rejected == []
    assert r.system_role == (template != "gemma2")


def test_gemma2_folds_the_system_prompt(qwen_tok):
    r = make_renderer(qwen_tok, "gemma2")
    text = qwen_tok.decode(tokenize_dialogue(D, r, ESCONV).full())
    assert text.startswith("<bos><start_of_turn>user\n" + system_prompt(ESCONV) + "\n\nHi, I have been feeling low.")
    # a dialogue that opens with the supporter still renders: the system prompt gets a user turn of its own
    d = PrefDialogue("d1", D.messages[1:], "esconv")
    text = qwen_tok.decode(tokenize_dialogue(d, r, ESCONV).full())
    assert text.startswith(
        "<bos><start_of_turn>user\n" + system_prompt(ESCONV) + "<end_of_turn>\n<start_of_turn>model\n(Question)"
    )


def test_template_choice(qwen_tok):
    own = make_renderer(qwen_tok, "auto")
    assert own.template == qwen_tok.chat_template
    saved = qwen_tok.chat_template
    qwen_tok.chat_template = None
    try:
        with pytest.raises(ConfigError, match="no chat_template"):
            make_renderer(qwen_tok, "auto")
    finally:
        qwen_tok.chat_template = saved
    with pytest.raises(ConfigError, match="data.chat_template"):
        make_renderer(qwen_tok, "vicuna")


def test_prefix_unstable_template_is_refused(qwen_tok, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(CsoError, match="not prefix-stable"):
        tokenize_dialogue(D, make_renderer(qwen_tok, str(bad)), ESCONV)


def test_truncation_drops_oldest_history_never_the_target(qwen_tok):
    r = make_renderer(qwen_tok, "chatml")
    full = turn_examples(D, r, ESCONV)
    limit = len(full[2].history) + len(full[2].chosen) - 5
    cut = turn_examples(D, r, ESCONV, max_length=limit)
    assert [e.dropped_messages for e in cut[:2]] == [0, 0]
    last = cut[2]
    assert last.dropped_messages == 2 and last.chosen == full[2].chosen
    assert len(last.history) + len(last.chosen) <= limit
    text = qwen_tok.decode(last.history)
    assert text.startswith("<|im_start|>system\n" + system_prompt(ESCONV))  # system prompt kept
    assert "I lost my job last week." in text and "Hi, I have been feeling low." not in text
    with pytest.raises(CsoError, match=r"dialogue d0: messages\[1\]: the reply does not fit max_length=20"):
        turn_examples(D, r, ESCONV, max_length=20)
    stats = token_stats([D], r, ESCONV, max_length=limit)
    assert stats["truncated_turns"] == 1 and stats["dropped_history_messages"] == 2


@pytest.mark.slow
def test_history_prefix_property_on_all_of_esconv_train(qwen_tok, esconv_dir):
    """Turn t's history ids are an exact prefix of turn t+1's, for every dialogue of ESConv train."""
    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="train", negatives=1))
    r = make_renderer(qwen_tok, "auto")
    turns = 0
    for d in dialogues:
        toks = tokenize_dialogue(d, r, ESCONV)
        prev = None
        for i in d.turn_indices():
            h = toks.history(i)
            if prev is not None:
                assert h[: len(prev)] == prev, d.id
            prev = h + toks.body[i]
            turns += 1
            assert len(toks.rejected[i]) == 1
        assert prev == toks.full()[: len(prev)]
    assert turns == 10679
    # and the segments reproduce the template text exactly (checked on a sample: decoding is slow)
    for d in dialogues[::50]:
        assert qwen_tok.decode(tokenize_dialogue(d, r, ESCONV).full()) == r.render(
            to_chat(d.messages, system_prompt(ESCONV))
        )


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma2", "auto"])
def test_the_compiled_template_renders_what_apply_chat_template_renders(template, esconv_dir, qwen_tok):
    """make_renderer's fast path (the compiled template, called directly) is used only if it matches
    apply_chat_template on probes; on real dialogues, truncated ones included, every id must match too."""
    import dataclasses

    r = make_renderer(qwen_tok, template)
    assert r.fast is not None
    slow = dataclasses.replace(r, fast=None)
    sset = load_strategy_set("esconv")
    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    for d in dialogues[:12]:
        for a, b in zip(turn_examples(d, r, sset, 512), turn_examples(d, slow, sset, 512), strict=True):
            assert (a.history, a.chosen, a.rejected, a.dropped_messages) == (
                b.history,
                b.chosen,
                b.rejected,
                b.dropped_messages,
            )


def test_truncation_finds_the_first_start_that_fits(esconv_dir, qwen_tok):
    """The estimate-and-confirm search returns what trying every start in order returns."""
    from cso_dist.data.render import truncate_turn

    r, sset = make_renderer(qwen_tok, "chatml"), load_strategy_set("esconv")
    dialogues, _ = build_dialogues(DataConfig(source="esconv", input=str(esconv_dir), split="valid"))
    checked = 0
    for d in dialogues[:15]:
        toks = tokenize_dialogue(d, r, sset)
        for i in d.turn_indices():
            longest = max([len(toks.body[i])] + [len(x) for x in toks.rejected.get(i, [])])
            for max_length in (256, 384):
                if len(toks.history(i)) + longest <= max_length:
                    continue
                try:
                    want = truncate_turn(d, r, sset, i, longest, max_length, None)  # every start in turn
                except CsoError:
                    continue
                assert truncate_turn(d, r, sset, i, longest, max_length, toks) == want
                checked += 1
    assert checked > 50
