"""Reward-model evaluation metrics (host side, float64 NumPy).

Accuracy (pairwise, per subset, RewardBench-2 best-of-4), win rate,
calibration (Brier, ECE, reliability diagrams) and best-of-N curves. See
:mod:`alignment.evaluation.metrics`.
"""

from alignment.evaluation.metrics import *  # noqa: F403
from alignment.evaluation.metrics import __all__  # noqa: F401
