"""Strategy sets are data: two named sets ship, a custom one can be loaded from a file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cso_dist.util.errors import ConfigError, DataError
from cso_dist.util.io import read_json, read_text

# One-line descriptions in our own words; they go into the system prompt.
ESCONV = {
    "Question": "ask about the seeker's situation or feelings to understand them better",
    "Restatement or Paraphrasing": "restate what the seeker said, more concisely, to show you follow",
    "Reflection of feelings": "name and reflect the emotions the seeker is expressing",
    "Self-disclosure": "share a brief, relevant experience of your own to build connection",
    "Affirmation and Reassurance": "affirm the seeker's strengths and efforts and offer reassurance",
    "Providing Suggestions": "offer concrete ideas the seeker could try",
    "Information": "give useful facts, data or resources",
    "Others": "other supportive talk, such as greetings and pleasantries",
}

ESCPRO = {
    "Emotional Validation": "acknowledge the seeker's emotions as understandable and legitimate",
    "Affirmation": "recognise the seeker's strengths, efforts and positive qualities",
    "Collaborative Planning": "work out next steps together with the seeker",
    "Empathetic Statements": "express that you understand and care about what the seeker feels",
    "Avoid Judgment and Criticism": "respond without blaming or criticising the seeker",
    "Provide Different Perspectives": "offer another way of looking at the situation",
    "Reframe Negative Thoughts": "help turn unhelpful thoughts into more balanced ones",
    "Share Information": "share relevant facts, knowledge or resources",
}

# Known spelling variants, used only when aliases are switched on (opt-in).
ESCONV_ALIASES = {
    "Questions": "Question",
    "Other": "Others",
    "Restatement": "Restatement or Paraphrasing",
    "Paraphrasing": "Restatement or Paraphrasing",
    "Reflection of Feelings": "Reflection of feelings",
    "Self disclosure": "Self-disclosure",
    "Approval and Reassurance": "Affirmation and Reassurance",
    "Affirmation": "Affirmation and Reassurance",
    "Direct Guidance": "Providing Suggestions",
    "Suggestions": "Providing Suggestions",
    "Providing Suggestion": "Providing Suggestions",
}

ESCPRO_ALIASES = {
    "Empathetic Statement": "Empathetic Statements",
    "Avoid Judgement and Criticism": "Avoid Judgment and Criticism",
    "Provide Different Perspective": "Provide Different Perspectives",
    "Reframe Negative Thought": "Reframe Negative Thoughts",
}

NAMED = {"esconv": (ESCONV, ESCONV_ALIASES), "escpro": (ESCPRO, ESCPRO_ALIASES)}


@dataclass(frozen=True)
class StrategySet:
    name: str
    descriptions: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.descriptions)

    def canonical(self, label: str, use_aliases: bool = False) -> str | None:
        """Return the canonical strategy name for `label`, or None if unknown.

        Exact names always match. With `use_aliases`, known variants and a case/space
        insensitive match are accepted too.
        """
        if label in self.descriptions:
            return label
        if not use_aliases:
            return None
        if label in self.aliases:
            return self.aliases[label]
        folded = " ".join(label.split()).lower()
        for name in self.descriptions:
            if name.lower() == folded:
                return name
        for alias, name in self.aliases.items():
            if alias.lower() == folded:
                return name
        return None


def load_strategy_set(spec: str) -> StrategySet:
    """`spec` is a named set (esconv, escpro) or a path to a JSON/YAML file.

    A file holds either a list of names (brackets like "[Question]" are stripped, so ESConv's
    own strategy.json works), a mapping name -> description, or
    {"strategies": <list or mapping>, "aliases": {variant: name}}.
    """
    if spec in NAMED:
        desc, aliases = NAMED[spec]
        return StrategySet(spec, dict(desc), dict(aliases))
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"strategies: '{spec}' is neither a named set ({', '.join(NAMED)}) nor a file")
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(read_text(path, "a strategy-set file"))
        else:
            raw = read_json(path, "a strategy-set file", expect=None)
    except DataError as e:
        raise ConfigError(f"strategies: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"strategies: {path}: cannot parse: {e}".splitlines()[0]) from None
    aliases = {}
    if isinstance(raw, dict) and "strategies" in raw:
        aliases = raw.get("aliases") or {}
        raw = raw["strategies"]
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise ConfigError(f"strategies: {path}: aliases: expected a mapping variant -> strategy name")
    if isinstance(raw, list):
        desc = {}
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"strategies: {path}: entry {i} must be a non-empty string")
            name = item.strip()
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1].strip()
            desc[name] = ""
    elif isinstance(raw, dict):
        desc = {str(k): str(v or "") for k, v in raw.items()}
    else:
        raise ConfigError(f"strategies: {path}: expected a list of names or a mapping name -> description")
    if not desc:
        raise ConfigError(f"strategies: {path}: no strategies")
    for variant, name in aliases.items():
        if name not in desc:
            raise ConfigError(f"strategies: {path}: alias '{variant}' maps to unknown strategy '{name}'")
    return StrategySet(path.stem, desc, {str(k): str(v) for k, v in aliases.items()})


def resolve_strategy_set(spec: str, named: str | None) -> StrategySet:
    """`spec` (a set name or file), or with "auto" the set that stored preference dialogues name (their
    `strategy_set`, given as `named`; esconv when there is none)."""
    return load_strategy_set(spec if spec != "auto" else (named or "esconv"))
