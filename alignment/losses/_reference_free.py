"""Reference-free and unpaired preference objectives.

Paired and reference-free: SimPO, CPO, ORPO (no reference model at all).
Unpaired (one completion per row, labelled desirable or not): KTO and BCO,
which compare against a reference model through a batch-level reference
point passed in as an array (``z0`` for KTO, the running reward mean ``δ``
for BCO), plus the pure helpers that estimate those reference points.

Every loss returns ``(loss[B], aux)`` with the loss unreduced; reduce it with
``ops.aggregate_sequence_loss``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Real

from alignment.array_types import In, Out, typechecked
from alignment.losses._checks import (
  check_nonnegative as _check_nonnegative,
)
from alignment.losses._checks import (
  check_positive as _check_positive,
)
from alignment.losses._checks import (
  f32 as _f32,
)
from alignment.ops import safe_divide

__all__ = [
  "SimpoAux",
  "CpoAux",
  "OrpoAux",
  "UnpairedAux",
  "simpo_loss",
  "cpo_loss",
  "orpo_loss",
  "kto_loss",
  "kto_reference_point",
  "bco_loss",
  "bco_reward_shift_update",
  "bco_udm_weights",
]

AxisName = str | tuple[str, ...] | None
Scalar = Float[In, ""] | float | np.floating
"""A float scalar: 0-d array, Python float or NumPy scalar."""

_SG = jax.lax.stop_gradient


def _check_smoothing(value: float, fn: str) -> None:
  if not 0.0 <= value <= 0.5:
    raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5], got {value}.")


def _smoothed_logistic(h, label_smoothing):
  """``-(1-ε) log σ(h) - ε log σ(-h)`` (conservative / cDPO form)."""
  loss = -jax.nn.log_sigmoid(h)
  if label_smoothing:
    loss = (
      1.0 - label_smoothing
    ) * loss - label_smoothing * jax.nn.log_sigmoid(-h)
  return loss


def _mean_logps(logps, lengths):
  """Per-token average log-prob; 0 for an empty completion."""
  return safe_divide(_f32(logps), _SG(_f32(lengths)))


class SimpoAux(NamedTuple):
  """SimPO diagnostics, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """``β/|y_w| · log π(y_w|x)``."""
  rejected_rewards: Float[Out, "B"]
  """``β/|y_l| · log π(y_l|x)``."""


@typechecked
def simpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"],
  rejected_lengths: Real[In, "B"],
  *,
  beta: float = 2.0,
  gamma: float = 0.5,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], SimpoAux]:
  r"""Simple Preference Optimization (SimPO), one value per pair.

  Meng et al. (2024): a reference-free Bradley–Terry loss on the
  length-normalised log-likelihood with a target reward margin γ,

  .. math::
    h = \frac{\beta}{|y_w|}\log\pi(y_w|x) - \frac{\beta}{|y_l|}\log\pi(y_l|x)
        - \gamma, \qquad \ell = -(1-ε)\log\sigma(h) - ε\log\sigma(-h).

  ε = ``label_smoothing`` = 0 is the paper's loss; ε > 0 is the label-flip
  variant of the authors' code. TRL's ``CPOTrainer(loss_type="simpo")``
  computes the same value from pre-averaged log-probs (it writes the margin
  as ``gamma / beta`` inside ``β·(…)``).

  Args:
    policy_chosen_logps: summed log-probs ``log π(y_w|x)`` of the chosen
      completion (``ops.sequence_logps``).
    policy_rejected_logps: same for the rejected completion.
    chosen_lengths: completion token counts ``|y_w|`` (int or float);
      receive no gradient. An empty completion contributes a normalised
      log-prob of 0.
    rejected_lengths: ``|y_l|``.
    beta: reward scale β (the paper uses 2.0–2.5); must be > 0.
    gamma: target reward margin γ (the authors' default γ/β = 0.25 gives
      0.5); must be >= 0.
    label_smoothing: ε in [0, 0.5].

  Returns:
    ``(loss, aux)``: float32 loss ``[B]``, not reduced, and the
    length-normalised rewards.

  References:
    Meng, Xia and Chen, `SimPO: Simple Preference Optimization with a
    Reference-Free Reward <https://arxiv.org/abs/2405.14734>`_, 2024.
  """
  _check_positive("beta", beta, "simpo_loss")
  _check_nonnegative("gamma", gamma, "simpo_loss")
  _check_smoothing(label_smoothing, "simpo_loss")
  chosen = beta * _mean_logps(policy_chosen_logps, chosen_lengths)
  rejected = beta * _mean_logps(policy_rejected_logps, rejected_lengths)
  loss = _smoothed_logistic(chosen - rejected - gamma, label_smoothing)
  return loss, SimpoAux(_SG(chosen), _SG(rejected))


class CpoAux(NamedTuple):
  """CPO diagnostics, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """``β · log π(y_w|x)``."""
  rejected_rewards: Float[Out, "B"]
  """``β · log π(y_l|x)``."""
  preference_loss: Float[Out, "B"]
  """The sigmoid preference term alone."""
  nll_loss: Float[Out, "B"]
  """Per-token mean negative log-likelihood of the chosen completion."""


@typechecked
def cpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"],
  *,
  beta: float = 0.1,
  alpha: float = 1.0,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], CpoAux]:
  r"""Contrastive Preference Optimization (CPO), one value per pair.

  Eq. 3 of Xu et al. (2024) (the DPO loss with a uniform reference, i.e.
  no reference model) plus the behaviour-cloning NLL term on the preferred
  completion (their ``L_NLL``), weighted by α as in TRL's ``cpo_alpha``:

  .. math::
    \ell = -(1-ε)\log\sigma(\beta[\log\pi(y_w) - \log\pi(y_l)])
           - ε\log\sigma(-\beta[\cdot])
           - \alpha\,\frac{1}{|y_w|}\log\pi(y_w|x).

  The NLL is the per-token mean of each chosen completion, so averaging the
  returned ``[B]`` over pairs gives the mean of per-sequence token means;
  TRL instead averages over all chosen tokens of the batch (equal when the
  chosen lengths are equal).

  Args:
    policy_chosen_logps: summed log-probs of the chosen completion.
    policy_rejected_logps: summed log-probs of the rejected completion.
    chosen_lengths: chosen completion token counts (no gradient), used to
      normalise the NLL term.
    beta: inverse temperature β; must be > 0.
    alpha: weight α of the NLL term (1 in the paper); must be >= 0.
    label_smoothing: ε in [0, 0.5] (TRL's conservative variant).

  Returns:
    ``(loss, aux)``: float32 loss ``[B]``, not reduced, and its parts.

  References:
    Xu et al., `Contrastive Preference Optimization: Pushing the Boundaries
    of LLM Performance in Machine Translation
    <https://arxiv.org/abs/2401.08417>`_, 2024.
  """
  _check_positive("beta", beta, "cpo_loss")
  _check_nonnegative("alpha", alpha, "cpo_loss")
  _check_smoothing(label_smoothing, "cpo_loss")
  chosen = _f32(policy_chosen_logps)
  rejected = _f32(policy_rejected_logps)
  preference = _smoothed_logistic(beta * (chosen - rejected), label_smoothing)
  nll = -_mean_logps(chosen, chosen_lengths)
  loss = preference + alpha * nll
  aux = CpoAux(
    _SG(beta * chosen), _SG(beta * rejected), _SG(preference), _SG(nll)
  )
  return loss, aux


class OrpoAux(NamedTuple):
  """ORPO diagnostics, each ``[B]`` float32, no gradient."""

  log_odds_ratio: Float[Out, "B"]
  """``log odds(y_w|x) - log odds(y_l|x)``."""
  odds_ratio_loss: Float[Out, "B"]
  """``-log σ(log odds ratio)``, the paper's ``L_OR``."""
  nll_loss: Float[Out, "B"]
  """``L_SFT``: per-token mean NLL of the chosen completion."""


def _log1mexp(x):
  """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of -log 2.

  Each branch gets an input clamped to its own side, so the branch that
  ``where`` discards stays finite and cannot put NaN into the gradient.
  """
  t = -0.6931471805599453
  low = x < t
  far = jnp.log1p(-jnp.exp(jnp.where(low, x, t)))
  near = jnp.log(-jnp.expm1(jnp.where(low, t, x)))
  return jnp.where(low, far, near)


@typechecked
def orpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"],
  rejected_lengths: Real[In, "B"],
  *,
  lam: float = 0.1,
) -> tuple[Float[Out, "B"], OrpoAux]:
  r"""Odds-Ratio Preference Optimization (ORPO), one value per pair.

  Eqs. 4–7 of Hong et al. (2024), with ``P(y|x) = exp(mean_t log π)`` (the
  per-token average log-likelihood) and ``odds(y|x) = P / (1 - P)``:

  .. math::
    \ell = \underbrace{-\tfrac{1}{|y_w|}\log\pi(y_w|x)}_{L_{SFT}}
      + \lambda\,\underbrace{-\log\sigma\Big(\log
        \frac{odds(y_w|x)}{odds(y_l|x)}\Big)}_{L_{OR}}.

  ``log(1 - P)`` is computed with a two-branch ``log1mexp``. A mean log-prob
  of exactly 0 (an empty or certain completion) is clamped to -1e-30 so the
  loss stays finite. Note TRL's ``ORPOTrainer.odds_ratio_loss`` returns
  ``λ·log σ(·)``, the *negative* of λ·L_OR, and subtracts its mean from the
  NLL; the objective is the same.

  Args:
    policy_chosen_logps: summed log-probs of the chosen completion.
    policy_rejected_logps: summed log-probs of the rejected completion.
    chosen_lengths: chosen token counts (no gradient).
    rejected_lengths: rejected token counts (no gradient).
    lam: weight λ of the odds-ratio term (0.1 in the paper and TRL's
      ``beta``); must be >= 0.

  Returns:
    ``(loss, aux)``: float32 loss ``[B]``, not reduced, and its parts.

  References:
    Hong, Lee and Thorne, `ORPO: Monolithic Preference Optimization without
    Reference Model <https://arxiv.org/abs/2403.07691>`_, 2024.
  """
  _check_nonnegative("lam", lam, "orpo_loss")
  chosen = jnp.minimum(_mean_logps(policy_chosen_logps, chosen_lengths), -1e-30)
  rejected = jnp.minimum(
    _mean_logps(policy_rejected_logps, rejected_lengths), -1e-30
  )
  log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
  odds_ratio = -jax.nn.log_sigmoid(log_odds)
  nll = -chosen
  loss = nll + lam * odds_ratio
  return loss, OrpoAux(_SG(log_odds), _SG(odds_ratio), _SG(nll))


class UnpairedAux(NamedTuple):
  """Diagnostics of an unpaired loss (KTO, BCO)."""

  rewards: Float[Out, "B"]
  """Implicit rewards ``β·(log π - log π_ref)``, ``[B]``, no gradient."""
  reference_point: Float[Out, ""]
  """The reference point used: KTO's ``z0`` or BCO's shift ``δ``."""


@typechecked
def kto_loss(
  policy_logps: Float[In, "B"],
  ref_logps: Float[In, "B"],
  labels: Bool[In, "B"],
  kl_reference: Scalar,
  *,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
) -> tuple[Float[Out, "B"], UnpairedAux]:
  r"""Kahneman–Tversky Optimization (KTO), one value per completion.

  Eq. 7 of Ethayarajh et al. (2024), with implicit reward
  ``r = log π(y|x) - log π_ref(y|x)`` and reference point ``z0``:

  .. math::
    \ell(x, y) = \lambda_y - v(x, y), \quad
    v = \begin{cases}
      \lambda_D\,\sigma(\beta(r - z_0)) & y \text{ desirable}\\
      \lambda_U\,\sigma(\beta(z_0 - r)) & y \text{ undesirable.}
    \end{cases}

  ``z0`` is a batch-level estimate of ``KL(π‖π_ref)``; compute it with
  :func:`kto_reference_point` from log-probs of *mismatched* prompt /
  completion pairs and pass it in. It receives no gradient (as in the
  paper, where it only sets the saturation point).

  Args:
    policy_logps: summed log-probs of each completion under the policy.
    ref_logps: the same under the frozen reference; receives no gradient.
    labels: bool, True where the completion is desirable.
    kl_reference: the reference point ``z0`` (scalar, >= 0); no gradient.
    beta: β > 0, the value-function sharpness.
    desirable_weight: λ_D >= 0.
    undesirable_weight: λ_U >= 0. The paper recommends
      ``λ_D·n_D / (λ_U·n_U)`` in ``[1, 4/3]``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, in ``[0, λ_y]``,
    and the implicit rewards ``β·r``.

  References:
    Ethayarajh et al., `KTO: Model Alignment as Prospect Theoretic
    Optimization <https://arxiv.org/abs/2402.01306>`_, 2024.
  """
  _check_positive("beta", beta, "kto_loss")
  _check_nonnegative("desirable_weight", desirable_weight, "kto_loss")
  _check_nonnegative("undesirable_weight", undesirable_weight, "kto_loss")
  log_ratio = _f32(policy_logps) - _SG(_f32(ref_logps))
  z0 = _SG(_f32(kl_reference))
  desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (log_ratio - z0)))
  undesirable = undesirable_weight * (
    1.0 - jax.nn.sigmoid(beta * (z0 - log_ratio))
  )
  loss = jnp.where(labels, desirable, undesirable)
  return loss, UnpairedAux(_SG(beta * log_ratio), z0)


@typechecked
def kto_reference_point(
  policy_mismatched_logps: Float[In, "B"],
  ref_mismatched_logps: Float[In, "B"],
  mask: Bool[In, "B"] | None = None,
  *,
  axis_name: AxisName = None,
) -> Float[Out, ""]:
  r"""KTO's reference point ``z0``: a clamped batch estimate of the KL.

  Ethayarajh et al. (2024), estimated from mismatched pairs: for prompts ``x_i`` paired with completions ``y_j`` of other
  rows (TRL shifts the completions by one row),

  .. math::
    z_0 = \max\Big(0, \frac{1}{m}\sum_i
          \log\pi(y_{j(i)}|x_i) - \log\pi_{ref}(y_{j(i)}|x_i)\Big).

  Args:
    policy_mismatched_logps: summed log-probs of the mismatched completions
      under the policy.
    ref_mismatched_logps: the same under the reference.
    mask: optional bool ``[B]``; False rows (padding) are ignored, even if
      NaN.
    axis_name: mapped axis name(s) inside ``shard_map``/``pmap``: sums and
      counts are ``psum``-ed so every device gets the global ``z0``. Under
      plain ``jit`` on global arrays leave it ``None``.

  Returns:
    float32 scalar ``z0 >= 0``, under ``stop_gradient`` (0 if no row is
    selected).

  References:
    Ethayarajh et al., `KTO: Model Alignment as Prospect Theoretic
    Optimization <https://arxiv.org/abs/2402.01306>`_, 2024.
  """
  diff = _f32(policy_mismatched_logps) - _f32(ref_mismatched_logps)
  if mask is None:
    mask = jnp.ones(diff.shape, bool)
  total = jnp.sum(jnp.where(mask, diff, 0.0))
  count = jnp.sum(mask, dtype=jnp.float32)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    count = jax.lax.psum(count, axis_name)
  return _SG(jnp.maximum(safe_divide(total, count), 0.0))


@typechecked
def bco_loss(
  policy_logps: Float[In, "B"],
  ref_logps: Float[In, "B"],
  labels: Bool[In, "B"],
  reward_shift: Scalar,
  undesirable_weights: Float[In, "B"] | None = None,
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], UnpairedAux]:
  r"""Binary Classifier Optimization (BCO), one value per completion.

  Jung et al. (2024): binary cross-entropy of a classifier whose
  logit is the implicit reward ``r = β(log π - log π_ref)`` shifted by the
  reward shift ``δ`` (the running mean of past rewards),

  .. math::
    \ell = \begin{cases}
      -\log\sigma(r - δ) & y \text{ desirable}\\
      -w(x)\log\sigma(-(r - δ)) & y \text{ undesirable,}
    \end{cases}

  where ``w`` are the optional underlying-distribution-matching (UDM)
  density-ratio weights (see :func:`bco_udm_weights`; 1 when
  ``undesirable_weights`` is None).

  Args:
    policy_logps: summed log-probs of each completion under the policy.
    ref_logps: the same under the frozen reference; receives no gradient.
    labels: bool, True where the completion is desirable.
    reward_shift: δ (scalar), e.g. from :func:`bco_reward_shift_update`
      updated with this batch's rewards first (TRL's order); no gradient.
    undesirable_weights: optional ``[B]`` UDM weights applied to the
      undesirable rows (ignored on desirable rows); no gradient.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and the rewards.

  References:
    Jung et al., `Binary Classifier Optimization for Large Language Model
    Alignment <https://arxiv.org/abs/2404.04656>`_, 2024.
  """
  _check_positive("beta", beta, "bco_loss")
  rewards = beta * (_f32(policy_logps) - _SG(_f32(ref_logps)))
  delta = _SG(_f32(reward_shift))
  desirable = -jax.nn.log_sigmoid(rewards - delta)
  undesirable = -jax.nn.log_sigmoid(-(rewards - delta))
  if undesirable_weights is not None:
    weights = _SG(jnp.where(labels, 1.0, _f32(undesirable_weights)))
    undesirable = undesirable * weights
  loss = jnp.where(labels, desirable, undesirable)
  return loss, UnpairedAux(_SG(rewards), delta)


@typechecked
def bco_reward_shift_update(
  shift: Scalar,
  count: Scalar,
  rewards: Float[In, "B"],
  mask: Bool[In, "B"] | None = None,
  *,
  axis_name: AxisName = None,
) -> tuple[Float[Out, ""], Float[Out, ""]]:
  r"""Updates BCO's reward shift δ, the running mean of all rewards seen.

  ``δ' = δ + (mean(batch) - δ)·n_batch / (n + n_batch)``, i.e. the exact
  mean over every reward seen so far (TRL's ``RunningMoments`` mean).
  Start from ``shift = count = 0``.

  Args:
    shift: current δ.
    count: number of rewards already averaged into δ.
    rewards: this batch's implicit rewards ``β(log π - log π_ref)``, e.g.
      ``aux.rewards`` of :func:`bco_loss`, desirable and undesirable rows
      alike.
    mask: optional bool ``[B]``; False rows are ignored, even if NaN.
    axis_name: mapped axis name(s); batch sums and counts are ``psum``-ed.

  Returns:
    ``(new_shift, new_count)``, float32 scalars under ``stop_gradient``.
  """
  rewards = _f32(rewards)
  if mask is None:
    mask = jnp.ones(rewards.shape, bool)
  total = jnp.sum(jnp.where(mask, rewards, 0.0))
  n = jnp.sum(mask, dtype=jnp.float32)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    n = jax.lax.psum(n, axis_name)
  shift, count = _f32(shift), _f32(count)
  new_count = count + n
  batch_mean = safe_divide(total, n)
  new_shift = shift + safe_divide((batch_mean - shift) * n, new_count)
  return _SG(new_shift), _SG(new_count)


@typechecked
def bco_udm_weights(
  desirable_probs: Float[In, "B"],
  *,
  min_density_ratio: float = 0.5,
  max_density_ratio: float = 10.0,
) -> Float[Out, "B"]:
  r"""Underlying-distribution-matching weights for BCO's undesirable rows.

  Jung et al. (2024): a prompt classifier estimates
  ``p = P(desirable | x)``; the density ratio ``p / (1 - p)`` (with 1e-8
  added to the denominator, as TRL does) reweights undesirable rows and is
  clipped to ``[min_density_ratio, max_density_ratio]``.

  Args:
    desirable_probs: classifier probabilities in [0, 1].
    min_density_ratio: lower clip, >= 0 (TRL default 0.5).
    max_density_ratio: upper clip, >= ``min_density_ratio`` (TRL default 10).

  Returns:
    float32 ``[B]`` weights under ``stop_gradient``.

  References:
    Jung et al., `Binary Classifier Optimization for Large Language Model
    Alignment <https://arxiv.org/abs/2404.04656>`_, 2024.
  """
  _check_nonnegative("min_density_ratio", min_density_ratio, "bco_udm_weights")
  if not max_density_ratio >= min_density_ratio:
    raise ValueError(
      "bco_udm_weights: max_density_ratio must be >= min_density_ratio, "
      f"got {max_density_ratio} < {min_density_ratio}."
    )
  p = _f32(desirable_probs)
  ratio = p / (1.0 - p + 1e-8)
  return _SG(jnp.clip(ratio, min_density_ratio, max_density_ratio))


REGISTRY = {
  "simpo": simpo_loss,
  "cpo": cpo_loss,
  "orpo": orpo_loss,
  "kto": kto_loss,
  "bco": bco_loss,
}
