"""Trainers: one compiled train step and run loop per family.

``REGISTRY`` maps ``config.trainer`` to a module with ``run(config,
workdir)``. Importing this package imports Flax and orbax.
"""

from alignment.trainers import (
  online_preference,
  pipeline,
  preference,
  reward_model,
  rl,
  sft,
)

REGISTRY = {
  "sft": sft,
  "reward_model": reward_model,
  "preference": preference,
  "rl": rl,
  "online_preference": online_preference,
  "pipeline": pipeline,
}


def get_trainer(name: str):
  """The trainer module for ``config.trainer`` (error lists valid names)."""
  if name not in REGISTRY:
    raise ValueError(
      f"config.trainer={name!r}; valid trainers are {sorted(REGISTRY)}."
    )
  return REGISTRY[name]
