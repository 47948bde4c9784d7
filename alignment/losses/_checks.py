"""Argument checks and casts shared by the loss modules (private)."""

import jax.numpy as jnp


def f32(x):
  """``x`` as a float32 array (any float dtype in)."""
  return jnp.asarray(x, jnp.float32)


def check_positive(name: str, value: float, fn: str) -> None:
  """Raises ``ValueError`` naming ``fn`` and ``name`` unless ``value > 0``."""
  if not value > 0:
    raise ValueError(f"{fn}: {name} must be > 0, got {value}.")


def check_nonnegative(name: str, value: float, fn: str) -> None:
  """Raises ``ValueError`` naming ``fn`` and ``name`` unless ``value >= 0``."""
  if not value >= 0:
    raise ValueError(f"{fn}: {name} must be >= 0, got {value}.")
