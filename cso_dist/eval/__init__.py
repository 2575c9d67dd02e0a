"""Evaluation: strategy prediction and replies on held-out dialogues (generate), scored (score, metrics), reported
(report) and compared (compare). The choices of the eval settings are defined here, once."""

MODES = ("generate", "likelihood")  # eval.mode: greedy generation, or the best-scoring "(<strategy>)" prefix
CALIBRATIONS = ("none", "prior")  # eval.calibrate: likelihood picks as scored, or with per-strategy offsets (calibrate)
