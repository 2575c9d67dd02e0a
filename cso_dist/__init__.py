"""cso_dist: Chain-of-Strategy Optimization (CSO) preference training for LLMs."""

__version__ = "0.1.0"
