"""Objectives: arrays in, ``(unreduced loss, aux)`` out.

Every public loss is re-exported here (``from alignment import losses;
losses.dpo_loss``) and listed in :data:`REGISTRY` under the name configs use
(``config.loss.name``). Array arguments follow one vocabulary
(``policy_chosen_logps``, ``ref_rejected_token_logps``, ``chosen_mask``,
``advantages`` ...) so a trainer can supply them by name.
"""

from alignment.losses import (
  _off_policy,
  _policy_gradient,
  _preference,
  _reference_free,
  _regularized,
  _reward_model,
  _token_level,
)
from alignment.losses._off_policy import *  # noqa: F403
from alignment.losses._policy_gradient import *  # noqa: F403
from alignment.losses._preference import *  # noqa: F403
from alignment.losses._reference_free import *  # noqa: F403
from alignment.losses._regularized import *  # noqa: F403
from alignment.losses._reward_model import *  # noqa: F403
from alignment.losses._token_level import *  # noqa: F403


def _merge(*registries):
  merged = {}
  for registry in registries:
    for name, fn in registry.items():
      if name in merged:
        raise ValueError(f"loss name {name!r} is registered twice")
      merged[name] = fn
  return merged


PREFERENCE_LOSSES = _merge(
  _preference.REGISTRY,
  _reference_free.REGISTRY,
  _regularized.REGISTRY,
  _token_level.REGISTRY,
)
"""Offline preference objectives (``configs/preference.py``)."""

REWARD_MODEL_LOSSES = dict(_reward_model.REGISTRY)
"""Reward-model training objectives (``configs/reward_model.py``)."""

POLICY_LOSSES = dict(_policy_gradient.REGISTRY)
"""Per-token policy-gradient objectives (``configs/rl.py``)."""

REGISTRY = _merge(
  PREFERENCE_LOSSES, REWARD_MODEL_LOSSES, POLICY_LOSSES, _off_policy.REGISTRY
)
"""Every objective by its config name."""
