"""Masked reductions that stay exact under micro-batching and sharding.

Every batch-level statistic here is built from sums, so splitting a batch into
micro-batches, or sharding it over devices, and adding the pieces gives the
same value as the whole batch. Inside a user's ``shard_map`` or ``pmap``, pass
``axis_name`` and the sums are ``psum``-ed over that axis, so each device gets
the global statistic. Under plain ``jit`` on global (possibly sharded) arrays,
leave ``axis_name=None``: GSPMD already sums globally.
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float

from alignment.array_types import In, Out, typechecked

AxisName = str | tuple[str, ...] | None


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def safe_divide(numerator, denominator):
  """``numerator / denominator``, and 0 (with zero gradient) where it is 0."""
  nonzero = denominator != 0
  safe = jnp.where(nonzero, denominator, 1.0)
  return jnp.where(nonzero, numerator / safe, 0.0)


class WeightedMean(NamedTuple):
  """A mean kept as ``(total, weight)`` so that partial results add exactly.

  ``value()`` is ``total / weight`` (0 when the weight is 0, never NaN).
  Accumulating over micro-batches or devices adds totals and weights first
  and divides once (:meth:`merge`), which is what makes a token mean over 4
  micro-batches equal the token mean over the whole batch. To differentiate a
  loss that is accumulated over micro-batches, differentiate each ``total``,
  sum the gradients, and divide by the summed ``weight`` (the weight never
  depends on the parameters).
  """

  total: Float[Out, ""]
  weight: Float[Out, ""]

  def value(self) -> Float[Out, ""]:
    return safe_divide(self.total, self.weight)

  def merge(self, other: "WeightedMean") -> "WeightedMean":
    return WeightedMean(self.total + other.total, self.weight + other.weight)

  def psum(self, axis_name: AxisName) -> "WeightedMean":
    """Sums total and weight over a named mapped axis."""
    return WeightedMean(
      _psum(self.total, axis_name), _psum(self.weight, axis_name)
    )


def _f32(x):
  return jnp.asarray(x, jnp.float32)


@typechecked
def masked_sum(
  x: Float[In, "*dims"],
  mask: Bool[In, "*dims"],
  *,
  axis: int | tuple[int, ...] | None = None,
  axis_name: AxisName = None,
) -> Float[Out, "..."]:
  """Sum of ``x`` where ``mask`` is True; masked entries (even NaN) are inert.

  Args:
    x: values, any float dtype.
    mask: bool, same shape as ``x``; True keeps the entry.
    axis: axes to reduce (``None``: all).
    axis_name: mapped axis name(s) to ``psum`` over (``shard_map``/``pmap``).

  Returns:
    float32 sum over ``axis`` (and over ``axis_name`` if given).
  """
  return _psum(jnp.sum(jnp.where(mask, _f32(x), 0.0), axis=axis), axis_name)


@typechecked
def masked_mean(
  x: Float[In, "*dims"],
  mask: Bool[In, "*dims"],
  *,
  axis: int | tuple[int, ...] | None = None,
  axis_name: AxisName = None,
) -> Float[Out, "..."]:
  """Mean of ``x`` over entries where ``mask`` is True; 0 if none are.

  Args:
    x: values, any float dtype.
    mask: bool, same shape as ``x``.
    axis: axes to reduce (``None``: all).
    axis_name: mapped axis name(s); the sums and counts are ``psum``-ed, so
      the result equals the mean over the global batch.

  Returns:
    float32 mean; 0 (with zero gradient) where the mask selects nothing.
  """
  total = masked_sum(x, mask, axis=axis, axis_name=axis_name)
  count = _psum(jnp.sum(mask, axis=axis, dtype=jnp.float32), axis_name)
  return safe_divide(total, count)


@typechecked
def masked_var(
  x: Float[In, "*dims"],
  mask: Bool[In, "*dims"],
  *,
  axis: int | tuple[int, ...] | None = None,
  ddof: int = 0,
  axis_name: AxisName = None,
) -> Float[Out, "..."]:
  """Variance over masked entries, two-pass (mean first) for stability.

  Args:
    x: values.
    mask: bool, same shape.
    axis: axes to reduce (``None``: all).
    ddof: delta degrees of freedom (1 for Bessel's correction).
    axis_name: mapped axis name(s) for global statistics.

  Returns:
    float32 variance; 0 where fewer than ``ddof + 1`` entries are selected.
  """
  mean = masked_mean(x, mask, axis=axis, axis_name=axis_name)
  if axis is not None:
    mean = jnp.expand_dims(mean, axis)
  centred = jnp.where(mask, _f32(x) - mean, 0.0)
  sq = _psum(jnp.sum(centred * centred, axis=axis), axis_name)
  count = _psum(jnp.sum(mask, axis=axis, dtype=jnp.float32), axis_name)
  return safe_divide(sq, jnp.maximum(count - ddof, 0.0))


@typechecked
def masked_whiten(
  x: Float[In, "*dims"],
  mask: Bool[In, "*dims"],
  *,
  shift_mean: bool = True,
  epsilon: float = 1e-8,
  axis_name: AxisName = None,
) -> Float[Out, "*dims"]:
  """Whitens ``x`` with the mean and (unbiased) std of its masked entries.

  ``(x - mean) / sqrt(var + epsilon)``; with ``shift_mean=False`` the mean is
  added back (the PPO convention for advantages is ``shift_mean=True``).
  Masked entries come out as 0.

  Args:
    x: values, e.g. advantages ``[B, T]``.
    mask: bool, same shape.
    shift_mean: subtract the mean (True) or keep it (False).
    epsilon: added to the variance.
    axis_name: mapped axis name(s) for global statistics.

  Returns:
    float32 array of ``x``'s shape.
  """
  x = jnp.where(mask, _f32(x), 0.0)  # NaN padding must not reach the grads
  mean = masked_mean(x, mask, axis_name=axis_name)
  var = masked_var(x, mask, ddof=1, axis_name=axis_name)
  out = (x - mean) * jax.lax.rsqrt(var + epsilon)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)


AggregationMode = Literal[
  "token_mean", "sequence_mean", "sequence_sum", "constant_norm"
]
AGGREGATION_MODES = (
  "token_mean",
  "sequence_mean",
  "sequence_sum",
  "constant_norm",
)


@typechecked
def aggregate_token_loss(
  per_token: Float[In, "B T"],
  mask: Bool[In, "B T"],
  *,
  mode: str = "token_mean",
  max_tokens: int | None = None,
  axis_name: AxisName = None,
) -> WeightedMean:
  r"""Reduces a per-token loss ``[B, T]`` to a :class:`WeightedMean`.

  Modes (``m`` is the mask, ``ℓ`` the per-token loss, ``|o_b| = Σ_t m_bt``):

  * ``token_mean`` (DAPO, TRL ``dapo``/``bnpo`` on a global count):
    ``Σ_bt ℓ m / Σ_bt m``.
  * ``sequence_mean`` (GRPO as published, TRL ``grpo``): mean over sequences
    of the per-sequence token mean, ``Σ_b (Σ_t ℓ m / |o_b|) / B'`` where
    ``B'`` counts sequences with at least one token (an empty sequence adds
    nothing to total or weight; TRL counts it in B, see its docs).
  * ``sequence_sum`` (verl ``seq-mean-token-sum``): ``Σ_bt ℓ m / B``.
  * ``constant_norm`` (Dr. GRPO): ``Σ_bt ℓ m / (B · max_tokens)``;
    ``max_tokens`` defaults to ``T``.

  The weight never depends on the loss values, so summing ``(total, weight)``
  over micro-batches and devices before dividing gives exactly the
  full-batch value and gradient, for every mode.

  Args:
    per_token: per-token loss; masked entries are ignored (even if NaN).
    mask: bool ``[B, T]``, True on tokens that count.
    mode: one of ``AGGREGATION_MODES``.
    max_tokens: the constant length normaliser of ``constant_norm``.
    axis_name: mapped axis name(s); total and weight are ``psum``-ed.

  Returns:
    ``WeightedMean(total, weight)``; ``.value()`` is the scalar loss.
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(
      f"aggregate_token_loss: unknown mode={mode!r}; valid modes are "
      f"{AGGREGATION_MODES}."
    )
  if max_tokens is not None and mode != "constant_norm":
    raise ValueError(
      "aggregate_token_loss: max_tokens is only used by "
      f"mode='constant_norm', got mode={mode!r}."
    )
  if max_tokens is not None and max_tokens <= 0:
    raise ValueError(
      f"aggregate_token_loss: max_tokens must be > 0, got {max_tokens}."
    )
  values = jnp.where(mask, _f32(per_token), 0.0)
  batch, length = values.shape
  if mode == "token_mean":
    total = jnp.sum(values)
    weight = jnp.sum(mask, dtype=jnp.float32)
  elif mode == "sequence_mean":
    lengths = jnp.sum(mask, axis=-1, dtype=jnp.float32)
    total = jnp.sum(safe_divide(jnp.sum(values, axis=-1), lengths))
    weight = jnp.sum(lengths > 0, dtype=jnp.float32)
  elif mode == "sequence_sum":
    total = jnp.sum(values)
    weight = jnp.asarray(batch, jnp.float32)
  else:  # constant_norm
    total = jnp.sum(values)
    norm = length if max_tokens is None else max_tokens
    weight = jnp.asarray(batch * norm, jnp.float32)
  return WeightedMean(total, weight).psum(axis_name)


@typechecked
def aggregate_sequence_loss(
  per_sequence: Float[In, "B"],
  mask: Bool[In, "B"] | None = None,
  *,
  axis_name: AxisName = None,
) -> WeightedMean:
  """Mean over sequences or pairs as a :class:`WeightedMean`.

  Args:
    per_sequence: one loss value per sequence or preference pair.
    mask: optional bool ``[B]``; False rows (padding rows of a fixed-shape
      batch) are ignored, even if NaN.
    axis_name: mapped axis name(s); total and weight are ``psum``-ed.

  Returns:
    ``WeightedMean(Σ ℓ·m, Σ m)``.
  """
  if mask is None:
    mask = jnp.ones(jnp.shape(per_sequence), bool)
  total = jnp.sum(jnp.where(mask, _f32(per_sequence), 0.0))
  weight = jnp.sum(mask, dtype=jnp.float32)
  return WeightedMean(total, weight).psum(axis_name)
