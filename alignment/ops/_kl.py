"""Per-token KL-divergence estimators from sampled log-probabilities.

For a token sampled from the policy π, with ``x = log π_ref(y) - log π(y)``
(the log ratio ref/policy), Schulman's estimators of ``KL(π || π_ref)`` are

* k1 = ``-x``                 (unbiased, high variance, can be negative),
* k2 = ``x² / 2``             (biased, low variance; its gradient equals the
  gradient of the true reverse KL in expectation),
* k3 = ``exp(x) - 1 - x``     (unbiased, always >= 0).

References:
  Schulman, `Approximating KL Divergence
  <http://joschu.net/blog/kl-approx.html>`_, 2020.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Float

from alignment.array_types import In, Out, typechecked

KL_ESTIMATORS = ("k1", "k2", "k3", "k3_straight_through", "abs", "mse")


def _log_ratio(policy_token_logps, ref_token_logps):
  return jnp.asarray(ref_token_logps, jnp.float32) - jnp.asarray(
    policy_token_logps, jnp.float32
  )


@typechecked
def kl_k1(
  policy_token_logps: Float[In, "*B"],
  ref_token_logps: Float[In, "*B"],
) -> Float[Out, "*B"]:
  """k1 estimator ``log π - log π_ref``. No gradient into the reference."""
  x = _log_ratio(policy_token_logps, jax.lax.stop_gradient(ref_token_logps))
  return -x


@typechecked
def kl_k2(
  policy_token_logps: Float[In, "*B"],
  ref_token_logps: Float[In, "*B"],
) -> Float[Out, "*B"]:
  """k2 estimator ``(log π - log π_ref)² / 2``. No gradient into the ref."""
  x = _log_ratio(policy_token_logps, jax.lax.stop_gradient(ref_token_logps))
  return 0.5 * x * x


@typechecked
def kl_k3(
  policy_token_logps: Float[In, "*B"],
  ref_token_logps: Float[In, "*B"],
) -> Float[Out, "*B"]:
  """k3 estimator ``exp(x) - 1 - x``, ``x = log π_ref - log π``; >= 0.

  No gradient flows into ``ref_token_logps``.
  """
  x = _log_ratio(policy_token_logps, jax.lax.stop_gradient(ref_token_logps))
  return jnp.expm1(x) - x


@typechecked
def kl_k3_straight_through(
  policy_token_logps: Float[In, "*B"],
  ref_token_logps: Float[In, "*B"],
) -> Float[Out, "*B"]:
  """k3's value with k2's gradient (verl's ``k3+`` / "low_var_kl+").

  The forward value is the unbiased, non-negative k3; the backward pass uses
  k2, whose gradient is an unbiased estimate of the reverse-KL gradient when
  tokens are sampled from the policy (k3's gradient is not).
  """
  k3 = kl_k3(policy_token_logps, ref_token_logps)
  k2 = kl_k2(policy_token_logps, ref_token_logps)
  return k2 + jax.lax.stop_gradient(k3 - k2)


@typechecked
def kl_estimate(
  policy_token_logps: Float[In, "*B"],
  ref_token_logps: Float[In, "*B"],
  *,
  estimator: str = "k3",
) -> Float[Out, "*B"]:
  """Dispatches to a KL estimator by name (``KL_ESTIMATORS``).

  ``abs`` is ``|log π - log π_ref|`` and ``mse`` is an alias of k2, as in verl.

  Args:
    policy_token_logps: log-probs of the sampled tokens under the policy.
    ref_token_logps: log-probs under the reference; receives no gradient.
    estimator: one of ``KL_ESTIMATORS``.

  Returns:
    float32 per-token estimate of ``KL(π || π_ref)``.
  """
  if estimator == "k1":
    return kl_k1(policy_token_logps, ref_token_logps)
  if estimator in ("k2", "mse"):
    return kl_k2(policy_token_logps, ref_token_logps)
  if estimator == "k3":
    return kl_k3(policy_token_logps, ref_token_logps)
  if estimator == "k3_straight_through":
    return kl_k3_straight_through(policy_token_logps, ref_token_logps)
  if estimator == "abs":
    return jnp.abs(kl_k1(policy_token_logps, ref_token_logps))
  raise ValueError(
    f"kl_estimate: unknown estimator={estimator!r}; valid "
    f"choices are {KL_ESTIMATORS}."
  )
