"""Stage 1 of CSO: building ESC-Pro-format strategy preference data by MCTS (see build.py)."""
