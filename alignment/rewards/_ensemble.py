"""Aggregating the scores of a reward-model ensemble into one reward.

Every aggregator maps member scores ``[M, B]`` (M ensemble members, B
responses) to one reward per response ``[B]``. They range from the mean
(trust the ensemble) through uncertainty penalties (UWO, mean - λ·std) and a
temperature-controlled soft minimum to the worst case (WCO, min), plus the
nominal-plus-minimum mix of Reward-Robust RLHF (BRME).

Members can be stacked parameters evaluated under ``vmap``; under ``jit`` the
member axis may be sharded like any other axis (the reductions here are
global ``jnp`` reductions, so GSPMD inserts the collectives).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Float

from alignment.array_types import In, Out, typechecked

__all__ = [
  "ensemble_mean",
  "ensemble_mean_minus_std",
  "ensemble_median",
  "ensemble_min",
  "ensemble_robust",
  "ensemble_softmin",
  "ensemble_uwo",
]


def _f32(x):
  return jnp.asarray(x, jnp.float32)


@typechecked
def ensemble_mean(rewards: Float[In, "M B"]) -> Float[Out, "B"]:
  r"""Mean of the members, ``R = (1/M) Σ_i r_i``.

  Args:
    rewards: member scores ``[M, B]``.

  Returns:
    float32 ``[B]``.

  References:
    Coste et al., `Reward Model Ensembles Help Mitigate Overoptimization
    <https://arxiv.org/abs/2310.02743>`_, 2023.
  """
  return jnp.mean(_f32(rewards), axis=0)


@typechecked
def ensemble_median(rewards: Float[In, "M B"]) -> Float[Out, "B"]:
  r"""Median of the members (mean of the two middle ones for even M).

  Args:
    rewards: member scores ``[M, B]``.

  Returns:
    float32 ``[B]``.

  References:
    Eisenstein et al., `Helping or Herding? Reward Model Ensembles Mitigate
    but do not Eliminate Reward Hacking <https://arxiv.org/abs/2312.09244>`_,
    2023.
  """
  return jnp.median(_f32(rewards), axis=0)


@typechecked
def ensemble_min(rewards: Float[In, "M B"]) -> Float[Out, "B"]:
  r"""Worst-case optimisation (WCO), ``R = min_i r_i``.

  Args:
    rewards: member scores ``[M, B]``.

  Returns:
    float32 ``[B]``; the gradient flows to the minimising member.

  References:
    Coste et al., `Reward Model Ensembles Help Mitigate Overoptimization
    <https://arxiv.org/abs/2310.02743>`_, 2023.
  """
  return jnp.min(_f32(rewards), axis=0)


@typechecked
def ensemble_uwo(
  rewards: Float[In, "M B"],
  *,
  lam: float = 0.1,
) -> Float[Out, "B"]:
  r"""Uncertainty-weighted optimisation (UWO), ``mean_i r_i - λ Var_i r_i``.

  The variance is the intra-ensemble (population, ``1/M``) variance. Coste
  et al. tune λ per setting; 0.1 is this library's default.

  Args:
    rewards: member scores ``[M, B]``.
    lam: λ, the variance penalty; >= 0.

  Returns:
    float32 ``[B]``.

  References:
    Coste et al., `Reward Model Ensembles Help Mitigate Overoptimization
    <https://arxiv.org/abs/2310.02743>`_, 2023, Eq. 4.
  """
  if lam < 0:
    raise ValueError(f"ensemble_uwo: lam must be >= 0, got {lam}.")
  rewards = _f32(rewards)
  return jnp.mean(rewards, axis=0) - lam * jnp.var(rewards, axis=0)


@typechecked
def ensemble_mean_minus_std(
  rewards: Float[In, "M B"],
  *,
  lam: float = 1.0,
) -> Float[Out, "B"]:
  r"""Mean minus λ standard deviations, ``mean_i r_i - λ std_i r_i``.

  Uses the population standard deviation; its gradient is defined as 0 where
  all members agree (std = 0) instead of NaN.

  Args:
    rewards: member scores ``[M, B]``.
    lam: λ; >= 0.

  Returns:
    float32 ``[B]``.

  References:
    Eisenstein et al., `Helping or Herding? Reward Model Ensembles Mitigate
    but do not Eliminate Reward Hacking <https://arxiv.org/abs/2312.09244>`_,
    2023.
  """
  if lam < 0:
    raise ValueError(f"ensemble_mean_minus_std: lam must be >= 0, got {lam}.")
  rewards = _f32(rewards)
  var = jnp.var(rewards, axis=0)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return jnp.mean(rewards, axis=0) - lam * std


@typechecked
def ensemble_softmin(
  rewards: Float[In, "M B"],
  *,
  temperature: float = 1.0,
) -> Float[Out, "B"]:
  r"""Soft minimum, ``R_τ = -τ log (1/M) Σ_i exp(-r_i / τ)``.

  As ``τ → 0`` it tends to ``min_i r_i`` (WCO) and as ``τ → ∞`` to the mean;
  to second order ``R_τ ≈ mean - Var / (2τ)``, i.e. UWO with ``λ = 1/(2τ)``.
  With M = 2 it is SAFE's double soft-min critic. Computed with a stable
  log-sum-exp; it is always between the min and the mean.

  Args:
    rewards: member scores ``[M, B]``.
    temperature: τ; > 0.

  Returns:
    float32 ``[B]``.

  References:
    Maity, `SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive
    Control for RLHF <https://arxiv.org/abs/2602.04651>`_, 2026 (double
    soft-min critic).
    Coste et al., `Reward Model Ensembles Help Mitigate Overoptimization
    <https://arxiv.org/abs/2310.02743>`_, 2023 (WCO/UWO limits).
  """
  if temperature <= 0:
    raise ValueError(
      f"ensemble_softmin: temperature must be > 0, got {temperature}."
    )
  rewards = _f32(rewards)
  # Centre on the minimum so every exponent is <= 0 (no overflow), and use
  # log1p(mean(expm1(.))) so that large temperatures do not cancel.
  low = jax.lax.stop_gradient(jnp.min(rewards, axis=0, keepdims=True))
  scaled = jnp.expm1(-(rewards - low) / temperature)
  return low[0] - temperature * jnp.log1p(jnp.mean(scaled, axis=0))


@typechecked
def ensemble_robust(
  rewards: Float[In, "M B"],
  member_stds: Float[In, "M B"] | None = None,
  *,
  lam: float = 0.5,
) -> Float[Out, "B"]:
  r"""Reward-Robust RLHF's nominal-plus-worst-case mix.

  .. math::
    R = \lambda\, r_{nominal} + (1 - \lambda) \min_i r_i .

  With Bayesian reward-model ensembles (BRME) every head predicts a mean
  ``r_i`` and a standard deviation ``σ_i``; the nominal reward is the mean
  of the most confident head, ``r_{argmin_i σ_i}``. Without ``member_stds``
  the ensemble mean is the nominal reward. ``λ = 1`` is the nominal reward,
  ``λ = 0`` is WCO.

  Args:
    rewards: member (head) means ``[M, B]``.
    member_stds: optional per-member predicted standard deviations ``[M, B]``
      (no gradient); selects the nominal head per response.
    lam: λ in [0, 1].

  Returns:
    float32 ``[B]``.

  References:
    Yan et al., `Reward-Robust RLHF in LLMs
    <https://arxiv.org/abs/2409.15360>`_, 2024.
  """
  if not 0 <= lam <= 1:
    raise ValueError(f"ensemble_robust: lam must be in [0, 1], got {lam}.")
  rewards = _f32(rewards)
  if member_stds is None:
    nominal = jnp.mean(rewards, axis=0)
  else:
    stds = jax.lax.stop_gradient(_f32(member_stds))
    head = jnp.argmin(stds, axis=0)
    nominal = jnp.take_along_axis(rewards, head[None, :], axis=0)[0]
  return lam * nominal + (1.0 - lam) * jnp.min(rewards, axis=0)


REGISTRY = {
  "mean": ensemble_mean,
  "median": ensemble_median,
  "min": ensemble_min,
  "wco": ensemble_min,
  "uwo": ensemble_uwo,
  "mean_minus_std": ensemble_mean_minus_std,
  "softmin": ensemble_softmin,
  "robust": ensemble_robust,
  "brme": ensemble_robust,
}
"""Ensemble aggregators by config name (``config.reward.ensemble``)."""
