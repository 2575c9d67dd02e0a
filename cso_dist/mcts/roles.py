"""The four roles an ESC-Pro search needs, and their implementation on any chat LLM backend.

A dialogue history is a list of `Turn(role, text, strategy)` with role "seeker" or
"supporter" (strategy only on supporter turns). The search (cso_dist.mcts.search) only calls
a `Roles` object, so tests drive it with a scripted table and builds with `LLMRoles`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

SEEKER, SUPPORTER = "seeker", "supporter"
JUDGE_ASPECTS = ("Empathy", "Information", "Humanoid", "Strategy")


class Turn(NamedTuple):
    role: str  # "seeker" | "supporter"
    text: str
    strategy: str | None = None


class Roles(Protocol):
    strategies: list[str]

    def score_strategies(self, history: list[Turn]) -> dict[str, float | None]:
        """0-10 suitability of each strategy for the next supporter turn (None = the LLM gave none)."""

    def supporter(self, history: list[Turn], strategy: str) -> str:
        """The supporter's next reply using `strategy`."""

    def seeker(self, history: list[Turn]) -> tuple[str, bool]:
        """The simulated seeker's next message, and whether it ends the conversation."""

    def judge(self, history: list[Turn], reply: Turn) -> dict[str, float | None]:
        """0-4 ratings of `reply` (a supporter turn after `history`) on JUDGE_ASPECTS (None = missing)."""
