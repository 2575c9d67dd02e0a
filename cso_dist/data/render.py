"""Rendering and tokenisation of preference dialogues.

Supporter messages render as `(<strategy>) <text>` in history and in targets; a system prompt
lists the active strategy set. The chat template is the tokenizer's own when it has one, else
a shipped one (cso_dist.data.templates).

Tokenisation is per message segment: the rendered conversation is cut into segments (the
prefix before the first message, then per message a *head* -- a user turn whole, or an
assistant turn's generation header -- and for assistant turns a *body*: content plus the end
of turn), each segment is tokenised on its own and the ids are concatenated. Hence the ids of
turn t's history are, by construction, an exact prefix of turn t+1's, and decoding them gives
back exactly the string the chat template renders.

Truncation (max_length): the system prompt and the target are always kept; the oldest history
messages are dropped first (whole messages, so the kept history starts with a seeker message),
and the shortened conversation is rendered again. A turn whose target alone does not fit is an
error (never cut a target).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cso_dist.data.dialogue import SEEKER, SUPPORTER, Message, PrefDialogue
from cso_dist.data.strategies import StrategySet
from cso_dist.data.templates import resolve_template
from cso_dist.util.errors import ConfigError, CsoError

STRATEGY_RE = re.compile(r"^\s*\(\s*([^()]*?)\s*\)\s*(.*)$", re.S)


def system_prompt(sset: StrategySet) -> str:
    lines = [
        "You are a warm, attentive emotional-support companion talking with someone who is going "
        "through a hard time. Before every reply, choose the single most helpful support strategy "
        "from this list:"
    ]
    for name, desc in sset.descriptions.items():
        lines.append(f"- {name}: {desc}" if desc else f"- {name}")
    lines.append(
        "Begin each reply with the chosen strategy in parentheses, then the reply itself, "
        "for example: (" + sset.names[0] + ") ..."
    )
    return "\n".join(lines)


def dialogue_system_prompt(d: PrefDialogue, sset: StrategySet) -> str:
    """The dialogue's own system prompt when its source had one (meta.system), else the strategy set's."""
    return d.meta.get("system") or system_prompt(sset)


def format_reply(strategy: str, text: str) -> str:
    return f"({strategy}) {text}"


def parse_reply(content: str) -> tuple[str | None, str]:
    """Split `(<strategy>) text`; returns (None, content) when there is no strategy prefix."""
    m = STRATEGY_RE.match(content)
    if not m:
        return None, content.strip()
    return m.group(1), m.group(2).strip()


def to_chat(messages: list[Message], system: str | None) -> list[dict]:
    chat = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m.role == SEEKER:
            chat.append({"role": "user", "content": m.text})
        else:
            chat.append({"role": "assistant", "content": format_reply(m.strategy, m.text)})
    return chat


# ---------------------------------------------------------------- template handling
@dataclass
class Renderer:
    """Renders chats with one tokenizer + template; knows whether the template has a system role.

    `tokenizer.apply_chat_template` re-normalises the messages on every call, which is most of the cost of
    per-segment tokenisation (a dialogue renders every prefix of itself). make_renderer therefore also
    compiles the template once, as transformers does, and uses the compiled one directly (`fast`) only
    after checking that it gives apply_chat_template's exact text on probe chats; otherwise, or if the
    transformers internals it uses are absent, every render goes through apply_chat_template."""

    tokenizer: object
    template: str
    system_role: bool = True
    fast: object = field(default=None, repr=False, compare=False)  # a compiled jinja template, or None

    def render(self, chat: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.system_role and chat and chat[0]["role"] == "system":
            chat = fold_system(chat)
        if self.fast is not None:
            return self.fast(chat, add_generation_prompt)
        return self.tokenizer.apply_chat_template(
            chat, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )


PROBES = [
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "(A) a"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "(A) a"}, {"role": "user", "content": "U2"}],
    [{"role": "user", "content": " x\n"}],
]


def _compiled(r: Renderer):
    """A render function that calls the compiled template the way apply_chat_template does, if it agrees
    with apply_chat_template on PROBES (with and without the generation prompt); else None."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(r.template)
        extra = dict(r.tokenizer.special_tokens_map)

        def fast(chat: list[dict], add_generation_prompt: bool) -> str:
            return template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **extra
            )

        for probe in PROBES:
            chat = probe if r.system_role else fold_system(probe) if probe[0]["role"] == "system" else probe
            for gen in (False, True):
                slow = r.tokenizer.apply_chat_template(
                    chat, chat_template=r.template, tokenize=False, add_generation_prompt=gen
                )
                if fast(chat, gen) != slow:
                    return None
        return fast
    except Exception:  # a template that raises on a probe, or other transformers internals: the plain path
        return None


def fold_system(chat: list[dict]) -> list[dict]:
    """For templates without a system role: the system prompt opens the first user turn."""
    system, rest = chat[0]["content"], chat[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": system + "\n\n" + rest[0]["content"]}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def make_renderer(tokenizer, chat_template: str = "auto") -> Renderer:
    if chat_template == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ConfigError(
                "data.chat_template: the tokenizer has no chat_template of its own; "
                "set data.chat_template to chatml, llama3, gemma2 or a Jinja file"
            )
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
    else:
        template = resolve_template(chat_template)
    r = Renderer(tokenizer, template, True)
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    try:
        r.render(probe)
    except Exception:  # jinja TemplateError from raise_exception: no system role
        r.system_role = False
        r.render(probe)
    r.fast = _compiled(r)
    return r


# ---------------------------------------------------------------- segment tokenisation
@dataclass
class DialogueTokens:
    """Token ids of one dialogue, per segment. Message i contributes head[i] + body[i]."""

    id: str
    prefix: list[int]
    head: list[list[int]]
    body: list[list[int]]
    rejected: dict[int, list[list[int]]] = field(default_factory=dict)

    def history(self, i: int) -> list[int]:
        """Ids the model sees before the reply of message i (includes the generation header)."""
        ids = list(self.prefix)
        for j in range(i):
            ids += self.head[j] + self.body[j]
        return ids + self.head[i]

    def full(self) -> list[int]:
        ids = list(self.prefix)
        for h, b in zip(self.head, self.body):
            ids += h + b
        return ids


def _cut(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise CsoError(
            f"chat template is not prefix-stable ({what}): rendering more messages changed "
            "earlier text, so per-segment tokenisation is impossible with this template"
        )
    return longer[len(shorter) :]


def segment_strings(renderer: Renderer, chat: list[dict], options: dict[int, list[str]] | None = None):
    """Cut a rendered chat (system first, optional) into string segments.

    Returns (prefix, heads, bodies, rejected_bodies) over the non-system messages; `options`
    maps a message index (in the non-system list) to alternative assistant contents.
    """
    has_sys = bool(chat) and chat[0]["role"] == "system"
    base = chat[:1] if has_sys else []
    msgs = chat[1:] if has_sys else chat
    if has_sys and not renderer.system_role:
        prev = ""  # the system prompt is folded into the first user turn
    else:
        prev = renderer.render(base)
    prefix = prev
    heads, bodies, rejected = [], [], {}
    for i, m in enumerate(msgs):
        upto = base + msgs[: i + 1]
        full = renderer.render(upto)
        if m["role"] == "assistant":
            gen = renderer.render(base + msgs[:i], add_generation_prompt=True)
            head = _cut(gen, prev, f"message {i} header")
            body = _cut(full, gen, f"message {i}")
            heads.append(head)
            bodies.append(body)
            if options and i in options:
                k = body.find(m["content"])
                alts = []
                for content in options[i]:
                    if k >= 0:
                        alts.append(body[:k] + content + body[k + len(m["content"]) :])
                    else:  # template transforms content: render each option for real
                        alts.append(
                            _cut(
                                renderer.render(base + msgs[:i] + [{"role": "assistant", "content": content}]),
                                gen,
                                f"message {i} option",
                            )
                        )
                rejected[i] = alts
        else:
            heads.append(_cut(full, prev, f"message {i}"))
            bodies.append("")
        prev = full
    return prefix, heads, bodies, rejected


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    nonempty = [t for t in texts if t]
    enc = tokenizer(nonempty, add_special_tokens=False)["input_ids"] if nonempty else []
    it = iter(enc)
    return [list(next(it)) if t else [] for t in texts]


def tokenize_dialogue(
    d: PrefDialogue, renderer: Renderer, sset: StrategySet, messages: list[Message] | None = None
) -> DialogueTokens:
    msgs = d.messages if messages is None else messages
    chat = to_chat(msgs, dialogue_system_prompt(d, sset))
    options = {
        i: [format_reply(o.strategy, o.text) for o in m.rejected]
        for i, m in enumerate(msgs)
        if m.role == SUPPORTER and m.target and m.rejected
    }
    prefix, heads, bodies, rej = segment_strings(renderer, chat, options)
    keys = sorted(rej)
    flat = [prefix] + heads + bodies + [s for k in keys for s in rej[k]]
    ids = _encode(renderer.tokenizer, flat)
    n = len(heads)
    out = DialogueTokens(d.id, ids[0], ids[1 : 1 + n], ids[1 + n : 1 + 2 * n])
    pos = 1 + 2 * n
    for k in keys:
        out.rejected[k] = ids[pos : pos + len(rej[k])]
        pos += len(rej[k])
    return out


# ---------------------------------------------------------------- per-turn examples + truncation
@dataclass
class TurnExample:
    dialogue_id: str
    turn: int  # message index of the supporter turn
    history: list[int]
    chosen: list[int]
    rejected: list[list[int]]
    dropped_messages: int = 0  # history messages removed by truncation


def turn_examples(
    d: PrefDialogue,
    renderer: Renderer,
    sset: StrategySet,
    max_length: int | None = None,
    tokens: DialogueTokens | None = None,
) -> list[TurnExample]:
    """One example per target supporter turn, truncated to max_length (oldest history first)."""
    toks = tokens or tokenize_dialogue(d, renderer, sset)
    out = []
    for i in d.turn_indices():
        hist, chosen, rej = toks.history(i), toks.body[i], toks.rejected.get(i, [])
        longest = max([len(chosen)] + [len(r) for r in rej])
        dropped = 0
        if max_length and len(hist) + longest > max_length:
            hist, chosen, rej, dropped = truncate_turn(d, renderer, sset, i, longest, max_length, toks)
        out.append(TurnExample(d.id, i, hist, chosen, rej, dropped))
    return out


def truncate_turn(
    d: PrefDialogue,
    renderer: Renderer,
    sset: StrategySet,
    i: int,
    longest: int,
    max_length: int,
    toks: DialogueTokens | None = None,
):
    """The turn rendered from the first start k (a seeker message after 0, else i itself) whose history fits
    max_length - longest. Starting later only drops messages, so the rendered length does not grow with k:
    the first fitting start is found from an estimate (the full rendering's segment lengths of messages k..i)
    and confirmed by rendering it and the start before it, instead of rendering every start in turn."""
    msgs = d.messages
    starts = [k for k in range(1, i) if msgs[k].role == SEEKER] + [i]
    cache: dict[int, tuple] = {}

    def exact(k: int) -> tuple:
        if k not in cache:
            sub = [
                Message(m.role, m.text, m.strategy, m.rejected if j == i - k else [], j == i - k)
                for j, m in enumerate(msgs[k : i + 1])
            ]
            t = tokenize_dialogue(d, renderer, sset, sub)
            j = len(sub) - 1
            cache[k] = (t.history(j), t.body[j], t.rejected.get(j, []), k)
        return cache[k]

    def fits(k: int) -> bool:
        return len(exact(k)[0]) + longest <= max_length

    at = 0
    if toks is not None:  # estimate: the first start whose segments (in the full rendering) fit
        seg = [len(h) + len(b) for h, b in zip(toks.head, toks.body)]
        base = len(toks.prefix) + len(toks.head[i])
        at = next((n for n, k in enumerate(starts) if base + sum(seg[k:i]) + longest <= max_length), len(starts) - 1)
    if fits(starts[at]):
        while at > 0 and fits(starts[at - 1]):
            at -= 1
        return exact(starts[at])
    for k in starts[at + 1 :]:
        if fits(k):
            return exact(k)
    hist = exact(starts[-1])[0]
    raise CsoError(
        f"dialogue {d.id}: messages[{i}]: the reply does not fit max_length={max_length} even without "
        f"history ({len(hist)} prompt + {longest} reply tokens); raise data.max_length"
    )
