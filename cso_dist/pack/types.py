"""The ids and pieces of a layout, shared by everything downstream of pack: a reply's id (ReplyId), a scored
reply's place in a unit (Span), and a unit (Unit: one dialogue, or a piece of one, as one token sequence)."""

from __future__ import annotations

from dataclasses import dataclass, field


class ReplyId(str):
    """A reply's id, "<dialogue>:<turn>:<kind>" plus "#<copy>" for a re-emitted copy of a chosen reply, with
    its parts as attributes: built from them by the layouts, so nothing downstream parses strings. It is a
    str, so it compares, hashes and serialises as the id text (cache shards store that text)."""

    dialogue: str
    turn: int
    kind: str  # "c" chosen, "r<k>" k-th non-preferred, "kl" KTO mismatched completion
    copy: int  # 0, or k for the k-th copy of a chosen reply

    def __new__(cls, dialogue: str, turn: int, kind: str, copy: int = 0) -> "ReplyId":
        self = super().__new__(cls, f"{dialogue}:{turn}:{kind}" + (f"#{copy}" if copy else ""))
        self.dialogue, self.turn, self.kind, self.copy = dialogue, turn, kind, copy
        return self

    def __reduce__(self):
        return ReplyId, (self.dialogue, self.turn, self.kind, self.copy)

    @classmethod
    def parse(cls, text: str) -> "ReplyId":
        """The one parser, for ids read back as text (cache shards, exported pair ids)."""
        if isinstance(text, ReplyId):
            return text
        base, _, copy = text.partition("#")
        dialogue, turn, kind = base.rsplit(":", 2)
        return cls(dialogue, int(turn), kind, int(copy) if copy else 0)

    @property
    def key(self) -> str:
        """The id without a copy marker: what the reference cache stores (a copy scores as its original)."""
        return f"{self.dialogue}:{self.turn}:{self.kind}"

    @property
    def turn_key(self) -> tuple[str, int]:
        return self.dialogue, self.turn

    def with_copy(self, copy: int) -> "ReplyId":
        return ReplyId(self.dialogue, self.turn, self.kind, copy)

    def chosen(self) -> "ReplyId":
        """The chosen reply of this reply's turn."""
        return ReplyId(self.dialogue, self.turn, "c")

    def order(self) -> tuple:
        """Canonical order inside a dialogue: by turn, then c, r0, r1, ..., kl."""
        k = self.kind
        rank = (
            (0, 0)
            if k == "c"
            else (1, int(k[1:]))
            if k[:1] == "r" and k[1:].isdigit()
            else (2, 0)
            if k == "kl"
            else (3, k)
        )
        return self.turn, rank


@dataclass(frozen=True)
class Span:
    """A scored reply inside a unit: tokens [start, start+length) conditioned on `ctx` trunk tokens."""

    reply_id: ReplyId
    start: int
    length: int
    ctx: int


@dataclass
class Unit:
    dialogue_id: str
    tokens: list[int]
    positions: list[int]
    trunk_len: int
    spans: list[Span] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)
