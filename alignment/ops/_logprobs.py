"""Per-token log-probabilities and entropies from logits, in float32."""

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int

from alignment.array_types import In, Out, typechecked


@typechecked
def token_logps(
  logits: Float[In, "*B T V"],
  targets: Int[In, "*B T"],
) -> Float[Out, "*B T"]:
  """``log softmax(logits)[targets]`` per position, computed in float32.

  The logits are upcast to float32 before the log-sum-exp (bf16 log-softmax
  loses about two decimal digits at large vocabularies). Targets must be
  already aligned with the logits (shift them yourself for next-token
  prediction: ``token_logps(logits[:, :-1], tokens[:, 1:])``).

  Args:
    logits: unnormalised scores, any float dtype.
    targets: integer token ids in ``[0, V)``.

  Returns:
    float32 log-probabilities with the targets' shape.
  """
  logits = jnp.asarray(logits, jnp.float32)
  picked = jnp.take_along_axis(
    logits, targets[..., None].astype(jnp.int32), axis=-1
  )[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


@typechecked
def sequence_logps(
  token_logps: Float[In, "*B T"],
  mask: Bool[In, "*B T"],
  *,
  average: bool = False,
) -> Float[Out, "*B"]:
  """Sums (or averages) per-token log-probs over the masked completion.

  Args:
    token_logps: per-token log-probabilities.
    mask: bool, True on completion tokens; padded entries (even NaN) are
      ignored in value and gradient.
    average: divide by the number of completion tokens (SimPO, IPO-norm).

  Returns:
    float32 ``[*B]``; 0 for an empty completion.
  """
  values = jnp.where(mask, jnp.asarray(token_logps, jnp.float32), 0.0)
  total = jnp.sum(values, axis=-1)
  if not average:
    return total
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


@typechecked
def entropy_from_logits(logits: Float[In, "*B V"]) -> Float[Out, "*B"]:
  """Entropy ``-Σ_v p_v log p_v`` of ``softmax(logits)``, in float32.

  Uses ``H = logsumexp(z) - Σ_v softmax(z)_v z_v``, which is finite even when
  some logits are ``-inf`` (masked vocabulary entries).

  Args:
    logits: unnormalised scores over the last axis.

  Returns:
    float32 entropy per position, in nats.
  """
  logits = jnp.asarray(logits, jnp.float32)
  # Shift by the max first: with unshifted logits of size ~1e3 the rounding
  # of sum(probs) - 1 times the logits swamps an O(1) entropy.
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  logits = logits - jnp.where(jnp.isfinite(peak), peak, 0.0)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  probs = jnp.exp(logits - lse)
  finite = jnp.where(jnp.isfinite(logits), logits, 0.0)
  return lse[..., 0] - jnp.sum(probs * finite, axis=-1)
