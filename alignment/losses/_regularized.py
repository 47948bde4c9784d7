"""DPO-form objectives with an extra regulariser or a changed target.

RPO adds an SFT (NLL) term on the chosen completion; CREAM replaces the hard
preference label with a consistency-based soft label; DNO's per-iteration
objective is DPO against the previous iterate on margin-filtered on-policy
pairs; CoPG's pairwise form regresses the log-ratio margin onto a reward
difference. All act on summed sequence log-probs ``[B]`` and return
``(loss[B], aux)`` unreduced.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Real

from alignment.array_types import In, Out, typechecked
from alignment.losses import _policy_gradient
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
  "PairAux",
  "RpoAux",
  "DnoAux",
  "rpo_loss",
  "cream_loss",
  "cream_consistency",
  "dno_loss",
  "copg_preference_loss",
]

_SG = jax.lax.stop_gradient


def _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
  """Chosen and rejected ``log π - sg(log π_ref)`` in float32."""
  chosen = _f32(policy_chosen) - _SG(_f32(ref_chosen))
  rejected = _f32(policy_rejected) - _SG(_f32(ref_rejected))
  return chosen, rejected


class PairAux(NamedTuple):
  """Implicit rewards of a pair, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """``β·(log π(y_w) - log π_ref(y_w))``."""
  rejected_rewards: Float[Out, "B"]
  """``β·(log π(y_l) - log π_ref(y_l))``."""


class RpoAux(NamedTuple):
  """RPO diagnostics, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  rejected_rewards: Float[Out, "B"]
  dpo_loss: Float[Out, "B"]
  """The DPO term alone."""
  sft_loss: Float[Out, "B"]
  """The unweighted NLL of the chosen completion (summed or token mean)."""


@typechecked
def rpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"] | None = None,
  *,
  beta: float = 0.1,
  eta: float = 0.005,
  sft_normalization: str = "sum",
) -> tuple[Float[Out, "B"], RpoAux]:
  r"""Regularized Preference Optimization (RPO): DPO + an SFT term.

  The practical objective of Liu et al. (2024) (the RPO algorithm):
  DPO plus an imitation (NLL) term on a baseline response, here the chosen
  completion,

  .. math::
    \ell = -\log\sigma(\beta h) + c\cdot\mathrm{NLL}(y_w), \quad
    h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l)
        - \log\pi_{ref}(y_l)].

  Two normalisations, matching the authors' two implementations:

  * ``"sum"`` (the paper's main experiments): ``NLL = -log π(y_w|x)``
    summed over tokens and ``c = η·β``;
  * ``"mean"`` (their OpenRLHF variant, App. F): ``NLL`` is the per-token
    mean ``-log π(y_w|x)/|y_w|`` and ``c = η`` (TRL's ``rpo_alpha``).

  With ``eta = 0`` this is DPO exactly; the SFT gradient does not depend on
  the reference model.

  Args:
    policy_chosen_logps: summed log-probs of the chosen completion.
    policy_rejected_logps: summed log-probs of the rejected completion.
    ref_chosen_logps: chosen log-probs under the frozen reference; no
      gradient.
    ref_rejected_logps: rejected log-probs under the reference; no gradient.
    chosen_lengths: chosen token counts; required for ``"mean"``.
    beta: DPO inverse temperature β > 0.
    eta: regularisation weight η >= 0 (the paper sweeps 0.005–0.2).
    sft_normalization: ``"sum"`` or ``"mean"``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and its parts.

  References:
    Liu et al., `Provably Mitigating Overoptimization in RLHF: Your SFT Loss
    is Implicitly an Adversarial Regularizer
    <https://arxiv.org/abs/2405.16436>`_, 2024.
  """
  _check_positive("beta", beta, "rpo_loss")
  _check_nonnegative("eta", eta, "rpo_loss")
  if sft_normalization not in ("sum", "mean"):
    raise ValueError(
      "rpo_loss: sft_normalization must be 'sum' or 'mean', "
      f"got {sft_normalization!r}."
    )
  if sft_normalization == "mean" and chosen_lengths is None:
    raise ValueError(
      "rpo_loss: chosen_lengths is required when sft_normalization='mean'."
    )
  chosen, rejected = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  dpo = -jax.nn.log_sigmoid(beta * (chosen - rejected))
  nll = -_f32(policy_chosen_logps)
  if sft_normalization == "mean":
    nll = safe_divide(nll, _SG(_f32(chosen_lengths)))
    coefficient = eta
  else:
    coefficient = eta * beta
  loss = dpo + coefficient * nll
  aux = RpoAux(_SG(beta * chosen), _SG(beta * rejected), _SG(dpo), _SG(nll))
  return loss, aux


@typechecked
def cream_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  consistency: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PairAux]:
  r"""CREAM: DPO with a consistency-regularised soft preference label.

  Wang et al. (2025): the consistency rate ``C`` in [0, 1] between
  the current and the previous iteration's rankings of the sampled
  responses (:func:`cream_consistency`) is the probability that the label
  ``y_w ≻ y_l`` is right,

  .. math::
    \ell = -C\log\sigma(\beta h) - (1 - C)\log\sigma(-\beta h),

  the authors' ``consistency_dyn`` (per prompt) or ``consistency_avg``
  (``C`` averaged over the iteration's dataset, broadcast to every pair).
  ``C = 1`` is DPO; ``C = 0`` swaps the labels.

  Args:
    policy_chosen_logps: summed log-probs of the chosen completion (the
      response ranked best by the current model).
    policy_rejected_logps: same for the rejected (ranked worst) completion.
    ref_chosen_logps: chosen log-probs under the reference; no gradient.
    ref_rejected_logps: rejected log-probs under the reference; no gradient.
    consistency: C in [0, 1] per pair; no gradient.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and the implicit
    rewards.

  References:
    Wang et al., `CREAM: Consistency Regularized Self-Rewarding Language
    Models <https://arxiv.org/abs/2410.12735>`_, ICLR 2025.
  """
  _check_positive("beta", beta, "cream_loss")
  chosen, rejected = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  h = beta * (chosen - rejected)
  c = _SG(_f32(consistency))
  loss = -c * jax.nn.log_sigmoid(h) - (1.0 - c) * jax.nn.log_sigmoid(-h)
  return loss, PairAux(_SG(beta * chosen), _SG(beta * rejected))


@typechecked
def cream_consistency(
  current_rewards: Float[In, "B G"],
  previous_rewards: Float[In, "B G"],
) -> Float[Out, "B"]:
  r"""CREAM's per-prompt consistency rate ``C = (τ + 1) / 2``.

  ``τ`` is Kendall's tau between the rankings that the current and the
  previous iteration's models give to the same ``G`` responses (Wang et al.,
  2025). Ranks are ordinal, as in the authors' code
  (``scipy.stats.rankdata(method="ordinal")``): ties are broken by
  position, the earlier response ranking lower. Then

  .. math::
    τ = \binom{G}{2}^{-1}\sum_{i<j}
        \mathrm{sign}(\rho_i - \rho_j)\,\mathrm{sign}(\rho'_i - \rho'_j).

  Args:
    current_rewards: rewards (e.g. DPO implicit rewards) from the current
      model, ``[B, G]``, ``G >= 2``.
    previous_rewards: rewards of the same responses from the previous
      iteration's model.

  Returns:
    float32 ``[B]`` in [0, 1], under ``stop_gradient``.

  References:
    Wang et al., `CREAM: Consistency Regularized Self-Rewarding Language
    Models <https://arxiv.org/abs/2410.12735>`_, ICLR 2025.
  """
  g = current_rewards.shape[-1]
  if g < 2:
    raise ValueError(
      f"cream_consistency: needs G >= 2 responses per prompt, got {g}."
    )
  upper = jnp.triu(jnp.ones((g, g), bool), k=1)  # pairs i < j

  def ordinal_order(r):
    r = _f32(r)
    diff = r[:, :, None] - r[:, None, :]  # [B, G, G]: r_i - r_j
    # For i < j a tie means rank_i < rank_j (ordinal ranks), i.e. sign -1.
    return jnp.where(diff == 0, -1.0, jnp.sign(diff))

  agree = ordinal_order(current_rewards) * ordinal_order(previous_rewards)
  tau = jnp.sum(jnp.where(upper, agree, 0.0), axis=(1, 2)) / (g * (g - 1) / 2)
  return _SG((tau + 1.0) / 2.0)


class DnoAux(NamedTuple):
  """DNO diagnostics, each ``[B]``, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """``η·(log π(y_w) - log π_t(y_w))``."""
  rejected_rewards: Float[Out, "B"]
  """``η·(log π(y_l) - log π_t(y_l))``."""
  kept: Bool[Out, "B"]
  """Pairs that pass the margin filter (all True without rewards)."""


@typechecked
def dno_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  chosen_rewards: Float[In, "B"] | None = None,
  rejected_rewards: Float[In, "B"] | None = None,
  *,
  eta: float = 0.1,
  margin: float = 0.0,
) -> tuple[Float[Out, "B"], DnoAux]:
  r"""Direct Nash Optimization (DNO-Prct), one iteration's loss per pair.

  The update step of DNO-Prct (Alg. 2) of Rosset et al. (2024): a DPO-form
  contrastive loss whose reference is the *previous iterate* ``π_t`` (not a
  fixed SFT model), on on-policy pairs,

  .. math::
    \ell = -\log\sigma\Big(\eta\log\frac{\pi(y_w|x)}{\pi_t(y_w|x)}
           - \eta\log\frac{\pi(y_l|x)}{\pi_t(y_l|x)}\Big),

  where ``y_w``/``y_l`` are the responses with the highest / lowest expected
  win-rate (or reward). Alg. 2 keeps only pairs whose preference margin is
  large; pass the scores as ``chosen_rewards``/``rejected_rewards`` and the
  loss is 0 (no gradient) on pairs with ``chosen - rejected <= margin``.
  Reduce with ``ops.aggregate_sequence_loss(loss, aux.kept)`` to average
  over kept pairs. With ``π_t = π_ref`` and no filter this is DPO with
  ``β = η``.

  Args:
    policy_chosen_logps: summed log-probs of ``y_w`` under the policy.
    policy_rejected_logps: same for ``y_l``.
    ref_chosen_logps: ``log π_t(y_w|x)`` under the previous iterate; no
      gradient.
    ref_rejected_logps: ``log π_t(y_l|x)``; no gradient.
    chosen_rewards: optional preference scores of ``y_w`` (e.g. expected
      win-rates); with ``rejected_rewards`` enables the margin filter.
    rejected_rewards: optional scores of ``y_l``.
    eta: η > 0, the inverse learning rate of the soft policy iteration.
    margin: δ >= 0, the minimum score margin for a pair to be kept.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss (0 on dropped pairs), not
    reduced, and the implicit rewards and kept-pair mask.

  References:
    Rosset et al., `Direct Nash Optimization: Teaching Language Models to
    Self-Improve with General Preferences
    <https://arxiv.org/abs/2404.03715>`_, 2024.
  """
  _check_positive("eta", eta, "dno_loss")
  _check_nonnegative("margin", margin, "dno_loss")
  if (chosen_rewards is None) != (rejected_rewards is None):
    raise ValueError(
      "dno_loss: pass both chosen_rewards and rejected_rewards, or neither."
    )
  chosen, rejected = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  if chosen_rewards is None:
    kept = jnp.ones(chosen.shape, bool)
  else:
    kept = (_f32(chosen_rewards) - _f32(rejected_rewards)) > margin
  h = jnp.where(kept, eta * (chosen - rejected), 0.0)
  loss = jnp.where(kept, -jax.nn.log_sigmoid(h), 0.0)
  return loss, DnoAux(_SG(eta * chosen), _SG(eta * rejected), kept)


@typechecked
def copg_preference_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  chosen_rewards: Float[In, "B"] | None = None,
  rejected_rewards: Float[In, "B"] | None = None,
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PairAux]:
  r"""Contrastive Policy Gradient (CoPG) on pairs, as a regression loss.

  For a pair ``(y, y')`` with sequence rewards ``R``, the CoPG update of
  Flet-Berliac et al. (2024) ascends
  ``E[(R^β(y) - R^β(y'))·∇ log π(y)/π(y')]`` with
  ``R^β = R - β log π/π_ref``. That gradient is exactly minus the gradient
  of

  .. math::
    \ell = \frac{1}{2\beta}\big((R(y_w) - R(y_l)) - \beta h\big)^2,
    \quad h = \log\frac{\pi(y_w)}{\pi_{ref}(y_w)}
              - \log\frac{\pi(y_l)}{\pi_{ref}(y_l)},

  which is what this returns (0 for every pair at the optimum
  ``π ∝ π_ref·exp(R/β)``). Without rewards, ``R(y_w) - R(y_l) = 1/2`` (the
  preference case, where CoPG generalises IPO) and
  ``ℓ = (β/2)(h - 1/(2β))²``, IPO scaled by β/2. This is
  ``losses.copg_loss`` (the group form) with ``G = 2``, which it calls,
  taking the preference-pair arguments.

  Args:
    policy_chosen_logps: summed log-probs of the first completion.
    policy_rejected_logps: summed log-probs of the second completion.
    ref_chosen_logps: first completion under the reference; no gradient.
    ref_rejected_logps: second completion under the reference; no gradient.
    chosen_rewards: optional reward ``R(y_w)``; no gradient.
    rejected_rewards: optional reward ``R(y_l)``; no gradient.
    beta: KL-regularisation strength β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and the implicit
    rewards ``β·log π/π_ref``.

  References:
    Flet-Berliac et al., `Contrastive Policy Gradient: Aligning LLMs on
    sequence-level scores in a supervised-friendly fashion
    <https://arxiv.org/abs/2406.19185>`_, 2024.
  """
  _check_positive("beta", beta, "copg_preference_loss")
  if (chosen_rewards is None) != (rejected_rewards is None):
    raise ValueError(
      "copg_preference_loss: pass both chosen_rewards and "
      "rejected_rewards, or neither."
    )
  chosen, rejected = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  if chosen_rewards is None:
    rewards = jnp.stack(
      [jnp.full(chosen.shape, 0.5), jnp.zeros(chosen.shape)], axis=1
    )
  else:
    rewards = jnp.stack([_f32(chosen_rewards), _f32(rejected_rewards)], axis=1)
  # One source of truth: the group form with G = 2 is exactly this pair loss.
  loss, _ = _policy_gradient.copg_loss(
    jnp.stack([_f32(policy_chosen_logps), _f32(policy_rejected_logps)], 1),
    jnp.stack([_f32(ref_chosen_logps), _f32(ref_rejected_logps)], 1),
    rewards,
    beta=beta,
  )
  return loss, PairAux(_SG(beta * chosen), _SG(beta * rejected))


REGISTRY = {
  "rpo": rpo_loss,
  "cream": cream_loss,
  "dno": dno_loss,
  "copg_preference": copg_preference_loss,
}
