"""Array type aliases, the dimension glossary and the shape checker.

Dimension letters used in every annotation, docstring and einsum:

  B: batch (prompts, preference pairs, or sequences)
  G: samples per prompt (group)
  M: ensemble members
  K: objectives / reward heads (or list size in listwise losses)
  T: completion tokens
  P: prompt tokens
  L: full sequence (prompt + completion)
  S: steps (process-reward models)
  V: vocabulary
  D: model width
  H: attention heads
  N: head dimension

Public functions are decorated with :func:`typechecked`, which checks the
jaxtyping annotations (rank, consistent dimension sizes, dtype kind) when the
function is called. Under ``jax.jit`` this happens once, at trace time, so it
costs nothing per step. The error names the offending argument and the sizes
bound so far. Set ``ALIGNMENT_TYPECHECK=0`` to disable the checks.
"""

import os
from typing import TypeAlias

import jax
import numpy as np
from beartype import BeartypeConf, beartype
from jaxtyping import jaxtyped

In: TypeAlias = jax.Array | np.ndarray
"""Accepted array inputs: JAX arrays (incl. tracers) or NumPy arrays."""

Out: TypeAlias = jax.Array
"""Returned arrays are always JAX arrays."""

_ENABLED = os.environ.get("ALIGNMENT_TYPECHECK", "1") not in ("0", "false")
_beartype = beartype(conf=BeartypeConf(is_pep484_tower=True))


def typechecked(fn):
  """Checks a function's jaxtyping annotations at call time.

  Wrong rank, inconsistent named dimensions (``"B"`` bound to two different
  sizes), or a wrong dtype kind raise ``jaxtyping.TypeCheckError`` naming the
  parameter. Hyperparameters annotated ``float`` accept ints too.
  """
  if not _ENABLED:
    return fn
  return jaxtyped(typechecker=_beartype)(fn)
