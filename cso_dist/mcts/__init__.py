"""Stage 1 of CSO: building ESC-Pro-format strategy preference data by MCTS (see build.py)."""

ROLE_CHOICES = ("logprobs", "text")  # mcts.choice: how the scorer and the judge answer (llm_roles)
