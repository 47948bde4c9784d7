"""Turning rollouts into rewards: shaping, ensembles, verifiers, RM scoring."""

from alignment.rewards import _ensemble, _shaping, _verifiers
from alignment.rewards._ensemble import *  # noqa: F403
from alignment.rewards._shaping import *  # noqa: F403
from alignment.rewards._verifiers import *  # noqa: F403

SHAPING = dict(_shaping.REGISTRY)
"""Reward transformations by config name (``config.reward.shaping``)."""

ENSEMBLE_AGGREGATORS = dict(_ensemble.REGISTRY)
"""Ensemble aggregators by config name (``config.reward.ensemble``)."""
