"""The four search roles played by one chat LLM: prompts from files, tolerant parsing, retries.

Choice answers (a strategy's 0-10 score, a 0-4 rating per judge aspect) are read, where the
backend can, from the model's next-token probabilities: the answer is begun for it ("Question: ")
and the value is the expected one under the probabilities of the allowed answers ("0".."10"),
renormalised over them (`choice_probs`). A small model then never leaves a score missing, and a
score carries the model's uncertainty rather than its first sampled digit. Elsewhere, and when a
backend gives no log-probs (a server without them), the answer is generated and parsed as text.

A malformed text answer (no score found, no rating, an empty reply) is asked again up to `retries`
times with a fresh sample; after that it counts as missing (stats) and the search goes on:
a missing strategy score is 0, a missing rating leaves the aspect out, an empty reply stays
empty and is filtered (and counted) when records are written.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import ConfigError
from cso_dist.mcts.backends import TOP_K
from cso_dist.mcts.roles import JUDGE_ASPECTS, SEEKER, Turn

PROMPTS = ("scorer", "supporter", "seeker", "judge")
DEFAULT_PROMPTS = Path(__file__).parent / "prompts"
END_MARKER = "[END]"
NUMBER = r"(-?\d+(?:\.\d+)?)"


def load_prompts(folder: str = "") -> dict[str, str]:
    """Role prompt templates: `folder`/<role>.txt where present, else our defaults."""
    out = {}
    for role in PROMPTS:
        p = Path(folder) / f"{role}.txt" if folder else None
        out[role] = (p if p is not None and p.is_file() else DEFAULT_PROMPTS / f"{role}.txt").read_text()
    if folder and not Path(folder).is_dir():
        raise ConfigError(f"mcts.prompts: '{folder}' is not a folder")
    return out


def render_history(history: list[Turn]) -> str:
    if not history:
        return "(nothing yet: the conversation is just starting)"
    return "\n".join(f"{'Seeker' if t.role == SEEKER else 'Supporter'}: {t.text}" for t in history)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def parse_scores(text: str, names: list[str], lo: float = 0.0, hi: float = 10.0) -> dict[str, float | None]:
    """`<name>: <number>` per name, tolerant of case, punctuation, bullets, bold, JSON and "8/10"; clamped."""
    out: dict[str, float | None] = {}
    for name in sorted(names, key=len, reverse=True):  # longer names first: "Affirmation and Reassurance"
        words = r"[\W_]+".join(map(re.escape, _norm(name).split()))
        m = re.search(r"(?<![a-z0-9])" + words + r"(?![a-z0-9])[^0-9a-z\n]{0,12}" + NUMBER, text, re.I)
        out[name] = None if m is None else min(hi, max(lo, float(m.group(1))))
        if m is not None:  # blank the match: a shorter name must not match inside it again
            text = text[: m.start()] + " " * (m.end() - m.start()) + text[m.end() :]
    return {n: out[n] for n in names}


def clean_reply(text: str, strategy_names: list[str]) -> str:
    """Strip a speaker label or a leading "(strategy)" the model added anyway, and wrapping quotes."""
    t = text.strip()
    t = re.sub(r"^(supporter|assistant|seeker|user)\s*:\s*", "", t, flags=re.I)
    m = re.match(r"^\(\s*([^()]{1,60})\s*\)\s*", t)
    if m and _norm(m.group(1)) in {_norm(n) for n in strategy_names}:
        t = t[m.end() :]
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1]
    return t.strip()


def choice_probs(
    backend, messages: list[dict], prefixes: list[str], options: list[str], top_k: int = TOP_K
) -> list[dict] | None:
    """For each prefix, the probability of each allowed answer in `options` as the text that follows it
    (whitespace before it ignored), renormalised over the options; with "mass", the share of the
    next-token probability that went to an allowed answer. None if the backend gives no log-probs.

    Answers spanning several tokens ("10" as "1" + "0", " " + "7") are followed token by token: a
    token that ends where a longer answer could go on (a "1" that may become "10") is asked again
    with it appended; there, a token starting with anything but a digit, letter or "." ends the
    answer. Branches below 1e-4 of the mass, or deeper than 3 tokens, are not followed."""
    opts = set(options)

    def classify(s: str) -> tuple[str | None, bool]:
        """(the longest answer `s` holds whole, i.e. followed by nothing or a separator; whether `s` could
        still grow into a longer answer)"""
        done = None
        for o in opts:
            if not s.startswith(o) or (len(s) > len(o) and (s[len(o)].isalnum() or s[len(o)] == ".")):
                continue
            if done is None or len(o) > len(done):
                done = o
        return done, any(o.startswith(s) and o != s for o in opts)

    out = [{o: 0.0 for o in options} for _ in prefixes]
    frontier = [(k, prefixes[k], "", 1.0) for k in range(len(prefixes))]  # (row, text asked, answer so far, p)
    for depth in range(3):
        if not frontier:
            break
        got = backend.next_token_probs([(messages, text) for _, text, _, _ in frontier], top_k)
        if got is None:
            return None
        nxt = []
        for (k, text, sofar, p), dist in zip(frontier, got):
            for token, q in dist.items():
                s = (sofar + token).lstrip()
                done, more = classify(s)
                follow = depth < 2 and p * q >= 1e-4
                blank = s == "" and "\n" not in token  # an answer on a later line is not `<name>: <answer>`
                if (blank or (more and (done is None or s == done))) and follow:
                    nxt.append((k, text + token, s, p * q))  # " " may become " 7"; "1" may become "10"
                elif done is not None:
                    out[k][done] += p * q
        frontier = nxt
    res = []
    for d in out:
        mass = sum(d.values())
        res.append({**({o: v / mass for o, v in d.items()} if mass > 0 else d), "mass": mass})
    return res


def expected(dist: dict, options: list[str]) -> float | None:
    """The mean answer under a `choice_probs` distribution (None if no mass went to any option)."""
    return sum(float(o) * dist[o] for o in options) if dist["mass"] > 0 else None


@dataclass
class RoleSettings:
    max_new_tokens: int = 128  # supporter and seeker replies
    temperature: float = 0.7  # supporter and seeker; the scorer and the judge are greedy
    retries: int = 2  # malformed answers asked again (fresh sample)
    scorer_max_tokens: int = 128
    judge_max_tokens: int = 48
    choice: str = "logprobs"  # scores and ratings: logprobs (text where the backend has none) | text


@dataclass
class LLMRoles:
    """Roles for one seed dialogue (its description and scene go into every prompt)."""

    backend: object  # CachedBackend
    sset: StrategySet
    prompts: dict[str, str]
    description: str = ""
    scene: str = ""
    settings: RoleSettings = field(default_factory=RoleSettings)
    stats: Counter = field(default_factory=Counter)

    @property
    def strategies(self) -> list[str]:
        return list(self.sset.names)

    def _prompt(self, role: str, **fields) -> list[dict]:
        text = self.prompts[role].format(
            description=self.description or "(not given)",
            scene=self.scene or "(not given)",
            end_marker=END_MARKER,
            **fields,
        )
        return [{"role": "user", "content": text}]

    def _ask(self, role: str, attempt: int, max_tokens: int, temperature: float, **fields) -> str:
        self.stats[f"calls_{role}"] += 1
        if attempt:
            self.stats[f"retries_{role}"] += 1
            self.stats[f"reasked_{role}"] += attempt == 1  # asks whose first answer was malformed
            temperature = max(temperature, 0.7)  # a greedy retry would repeat itself
        return self.backend.chat(self._prompt(role, **fields), max_tokens, temperature, sample=attempt)

    def _choices(self, role: str, names: list[str], options: list[str], **fields) -> dict[str, float | None] | None:
        """`<name>: <option>` read from log-probs for every name (None: the backend has none)."""
        if self.settings.choice != "logprobs":
            return None
        # "<name>: " with its space: tokenizers that split digits from the space before them (Llama 3, Qwen,
        # SmolLM) put most of the next token's mass on the digits there, not on prose
        dists = choice_probs(self.backend, self._prompt(role, **fields), [f"{n}: " for n in names], options)
        if dists is None:
            self.stats[f"text_fallback_{role}"] += 1
            return None
        self.stats[f"calls_{role}"] += 1
        self.stats[f"logprob_answers_{role}"] += len(names)
        self.stats[f"logprob_mass_{role}"] += sum(d["mass"] for d in dists)  # / answers: mean mass on options
        return {n: expected(d, options) for n, d in zip(names, dists)}

    def score_strategies(self, history: list[Turn]) -> dict[str, float | None]:
        lines = "\n".join(f"- {n}: {d}" if d else f"- {n}" for n, d in self.sset.descriptions.items())
        self.stats["asked_scores"] += len(self.strategies)
        got = self._choices(
            "scorer", self.strategies, [str(i) for i in range(11)], history=render_history(history), strategies=lines
        )
        if got is not None:
            self.stats["missing_scores"] += sum(v is None for v in got.values())
            return got
        scores: dict[str, float | None] = {n: None for n in self.strategies}
        for attempt in range(self.settings.retries + 1):
            text = self._ask(
                "scorer",
                attempt,
                self.settings.scorer_max_tokens,
                0.0,
                history=render_history(history),
                strategies=lines,
            )
            got = parse_scores(text, self.strategies)
            scores = {n: got[n] if got[n] is not None else scores[n] for n in self.strategies}
            if all(v is not None for v in scores.values()):
                break
        self.stats["missing_scores"] += sum(v is None for v in scores.values())
        return scores

    def supporter(self, history: list[Turn], strategy: str) -> str:
        s = self.settings
        for attempt in range(s.retries + 1):
            text = clean_reply(
                self._ask(
                    "supporter",
                    attempt,
                    s.max_new_tokens,
                    s.temperature,
                    history=render_history(history),
                    strategy=strategy,
                    strategy_description=self.sset.descriptions.get(strategy, ""),
                ),
                self.strategies,
            )
            if text:
                return text
        self.stats["empty_supporter"] += 1
        return ""

    def seeker(self, history: list[Turn]) -> tuple[str, bool]:
        s = self.settings
        for attempt in range(s.retries + 1):
            raw = self._ask("seeker", attempt, s.max_new_tokens, s.temperature, history=render_history(history))
            finished = END_MARKER.lower() in raw.lower()
            text = clean_reply(re.sub(re.escape(END_MARKER), "", raw, flags=re.I), self.strategies)
            if text or finished:
                return text, finished
        self.stats["empty_seeker"] += 1
        return "", True  # a seeker with nothing left to say ends the conversation

    def judge(self, history: list[Turn], reply: Turn) -> dict[str, float | None]:
        fields = {"history": render_history(history), "strategy": reply.strategy or "", "reply": reply.text}
        self.stats["asked_ratings"] += len(JUDGE_ASPECTS)
        got = self._choices("judge", list(JUDGE_ASPECTS), [str(i) for i in range(5)], **fields)
        if got is not None:
            self.stats["missing_ratings"] += sum(v is None for v in got.values())
            return got
        ratings: dict[str, float | None] = {a: None for a in JUDGE_ASPECTS}
        for attempt in range(self.settings.retries + 1):
            text = self._ask("judge", attempt, self.settings.judge_max_tokens, 0.0, **fields)
            got = parse_scores(text, list(JUDGE_ASPECTS), 0.0, 4.0)
            ratings = {a: got[a] if got[a] is not None else ratings[a] for a in JUDGE_ASPECTS}
            if all(v is not None for v in ratings.values()):
                break
        self.stats["missing_ratings"] += sum(v is None for v in ratings.values())
        return ratings
