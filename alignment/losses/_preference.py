r"""Pairwise preference losses with a reference model: the DPO family.

Every loss here scores a preference pair ``(x, y_w, y_l)`` through the
policy/reference log-ratios of the chosen (``y_w``) and rejected (``y_l``)
completions,

.. math::
  c = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x),\qquad
  r = \log\pi_\theta(y_l|x) - \log\pi_{ref}(y_l|x),\qquad
  h = c - r,

and returns ``(loss [B], aux)``: one unreduced float32 value per pair, and
the implicit rewards ``β·c``, ``β·r`` (stop-gradient) for logging. Reduce
with :func:`alignment.ops.aggregate_sequence_loss`. Reference log-probs
(and every other input that is a statistic rather than a model output:
running reward means, WPO weights) receive no gradient.

The functions cover every ``loss_type`` of TRL's ``DPOTrainer`` (0.28 and
1.x) except ``sft``, plus f-divergence DPO, WPO weighting, LD-DPO and
R-DPO. Where TRL deviates from a paper, the paper is followed and the
docstring says so; ``tests/losses/preference_test.py`` checks every function
against a NumPy transcription of the paper and against TRL goldens.

Batch coupling: ``aot_loss`` and ``aot_unpaired_loss`` sort across the batch,
so one pair's loss depends on the other pairs; ``bco_pair_loss`` depends on
the batch through the running reward mean it is given. Everything else is
independent per pair.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Real

from alignment.array_types import In, Out, typechecked
from alignment.losses._checks import f32 as _f32
from alignment.ops import safe_divide

__all__ = [
  "DIVERGENCES",
  "PreferenceAux",
  "WpoAux",
  "aot_loss",
  "aot_unpaired_loss",
  "apo_down_loss",
  "apo_zero_loss",
  "bco_pair_loss",
  "bco_reward_mean_update",
  "discopop_loss",
  "dpo_loss",
  "exo_pair_loss",
  "f_dpo_loss",
  "ipo_loss",
  "ipo_norm_loss",
  "ld_dpo_loss",
  "nca_pair_loss",
  "r_dpo_loss",
  "robust_dpo_loss",
  "sigmoid_norm_loss",
  "slic_loss",
  "sppo_hard_loss",
  "wpo_loss",
  "wpo_token_log_normalizers",
  "wpo_weights",
]

DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""The f-divergences of :func:`f_dpo_loss`."""

# exp() arguments are clamped here (as TRL 1.x does) so that forward-KL and
# alpha-divergence scores stay finite in float32 for very negative log-ratios.
_MAX_EXPONENT = 80.0


class PreferenceAux(NamedTuple):
  """Per-pair diagnostics, each float32 ``[B]`` and stop-gradient.

  Attributes:
    chosen_rewards: implicit reward ``β·(log π(y_w) − log π_ref(y_w))``.
    rejected_rewards: implicit reward ``β·(log π(y_l) − log π_ref(y_l))``.
  """

  chosen_rewards: Float[Out, "B"]
  rejected_rewards: Float[Out, "B"]


class WpoAux(NamedTuple):
  """:class:`PreferenceAux` plus the WPO pair weights.

  Attributes:
    chosen_rewards: implicit reward of the chosen completion.
    rejected_rewards: implicit reward of the rejected completion.
    weights: the pair weight ``w(x, y_w)·w(x, y_l)`` that scaled the loss.
  """

  chosen_rewards: Float[Out, "B"]
  rejected_rewards: Float[Out, "B"]
  weights: Float[Out, "B"]


# --------------------------------------------------------------------------
# Shared pieces.


def _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
  """Returns float32 ``(c, r)``; the reference gets no gradient."""
  sg = jax.lax.stop_gradient
  chosen = _f32(policy_chosen) - sg(_f32(ref_chosen))
  rejected = _f32(policy_rejected) - sg(_f32(ref_rejected))
  return chosen, rejected


def _aux(beta, chosen, rejected) -> PreferenceAux:
  sg = jax.lax.stop_gradient
  return PreferenceAux(sg(beta * chosen), sg(beta * rejected))


def _logistic(logits, label_smoothing):
  """``−(1−ε)·log σ(z) − ε·log σ(−z)``: BCE against the label ``1−ε``."""
  loss = -jax.nn.log_sigmoid(logits)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss - label_smoothing * (
      jax.nn.log_sigmoid(-logits)
    )
  return loss


def _lengths(lengths):
  """Token counts as float32, at least 1 (an empty completion counts 1)."""
  return jnp.maximum(_f32(lengths), 1.0)


def _check_beta(fn, beta):
  if not beta > 0:
    raise ValueError(f"{fn}: beta must be > 0, got {beta}.")


def _check_interval(
  fn, name, value, low, high, *, low_open=False, high_open=False
):
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    raise ValueError(
      f"{fn}: {name} must be in {left}{low}, {high}{right}, got {value}."
    )


# --------------------------------------------------------------------------
# Sigmoid (DPO) family.


@typechecked
def dpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Direct Preference Optimization (sigmoid) loss, optionally conservative.

  Eq. 7 of Rafailov et al. (2023) for ``label_smoothing`` ε = 0; ε > 0 is
  conservative DPO (cDPO, Mitchell 2023): the label is flipped with
  probability ε.

  .. math::
    \ell = -(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)

  TRL 0.x ``loss_type="sigmoid"`` has this ε; TRL 1.x dropped it (ε = 0).

  Args:
    policy_chosen_logps: summed log-probs of the chosen completion under the
      policy (``ops.sequence_logps``).
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: chosen log-probs under the frozen reference; receives
      no gradient.
    ref_rejected_logps: rejected log-probs under the reference; no gradient.
    beta: inverse temperature β of the implicit reward; > 0.
    label_smoothing: ε, the label-flip probability, in [0, 0.5].

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`PreferenceAux`.

  References:
    Rafailov et al., `Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model <https://arxiv.org/abs/2305.18290>`_, 2023.

    Mitchell, `A note on DPO with noisy preferences & relationship to IPO
    <https://ericmitchell.ai/cdpo.pdf>`_, 2023.
  """
  _check_beta("dpo_loss", beta)
  _check_interval("dpo_loss", "label_smoothing", label_smoothing, 0.0, 0.5)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return _logistic(beta * (c - r), label_smoothing), _aux(beta, c, r)


def _divergence_score(log_ratio, divergence, alpha):
  """``f'(u)`` at ``u = π/π_ref = exp(log_ratio)`` for the f-DPO reward."""
  if divergence == "reverse_kl":  # f(u) = u log u; f'(u) = log u + 1
    return log_ratio
  if divergence == "js_divergence":  # f'(u) = log(2u / (1 + u))
    return jnp.log(2.0) + jax.nn.log_sigmoid(log_ratio)
  # forward KL is the alpha-divergence at alpha = 1: f'(u) = 1 − 1/u.
  a = 1.0 if divergence == "forward_kl" else alpha
  exponent = jnp.minimum(-a * log_ratio, _MAX_EXPONENT)
  return -jnp.expm1(exponent) / a  # (1 − u^−α) / α


@typechecked
def f_dpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  divergence: str = "reverse_kl",
  alpha: float = 0.5,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""f-DPO: DPO under a general f-divergence constraint (Wang et al., 2023).

  With ``u = π_θ(y|x)/π_ref(y|x)``, the reward is ``β f'(u)`` and

  .. math::
    \ell = -\log\sigma\big(\beta f'(u_w) - \beta f'(u_l)\big),

  where (additive constants in ``f'`` cancel in the difference)

  * ``reverse_kl``: ``f'(u) = log u`` (plain DPO);
  * ``forward_kl``: ``f'(u) = 1 − 1/u``;
  * ``js_divergence``: ``f'(u) = log(2u/(1+u))``;
  * ``alpha_divergence``: ``f'(u) = (1 − u^{−α})/α`` for α in (0, 1].

  α convention: the paper's, ``f(u) = (u^{1−α} − (1−α)u − α)/(α(α−1))``.
  α → 0 recovers reverse KL and α = 1 forward KL. TRL 0.28
  (``f_divergence_params["alpha_divergence_coef"]``) uses the same α; TRL
  1.x's ``f_alpha_divergence_coef`` is ``1 − α`` (its code computes
  ``(u^{coef−1} − 1)/(coef − 1)``), so ``alpha=0.3`` here is TRL 1.x's
  ``f_alpha_divergence_coef=0.7``. The exponent of ``u^{−α}`` is clamped at
  80 (as in TRL 1.x), which only matters for ``log u < −80/α``.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.
    divergence: one of :data:`DIVERGENCES`.
    alpha: α of the alpha-divergence, in (0, 1]; ignored otherwise.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced; ``aux`` holds the
    reverse-KL implicit rewards ``β·log u`` (as TRL logs them).

  References:
    Wang et al., `Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints
    <https://arxiv.org/abs/2309.16240>`_, 2023.
  """
  _check_beta("f_dpo_loss", beta)
  if divergence not in DIVERGENCES:
    raise ValueError(
      f"f_dpo_loss: divergence must be one of {DIVERGENCES}, "
      f"got {divergence!r}."
    )
  _check_interval("f_dpo_loss", "alpha", alpha, 0.0, 1.0, low_open=True)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  margin = _divergence_score(c, divergence, alpha) - _divergence_score(
    r, divergence, alpha
  )
  return _logistic(beta * margin, 0.0), _aux(beta, c, r)


@typechecked
def robust_dpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Robust DPO: the unbiased DPO loss under label noise rate ε.

  .. math::
    \ell = \frac{-(1-\varepsilon)\log\sigma(\beta h)
                 + \varepsilon\log\sigma(-\beta h)}{1 - 2\varepsilon}

  Its expectation over labels flipped with probability ε equals the clean
  DPO loss. ε = 0 is DPO. The loss is unbounded below for ε > 0.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.
    label_smoothing: ε, the assumed flip rate, in [0, 0.5).

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced, and :class:`PreferenceAux`.

  References:
    Chowdhury et al., `Provably Robust DPO: Aligning Language Models with
    Noisy Feedback <https://arxiv.org/abs/2403.00409>`_, 2024.
  """
  _check_beta("robust_dpo_loss", beta)
  _check_interval(
    "robust_dpo_loss",
    "label_smoothing",
    label_smoothing,
    0.0,
    0.5,
    high_open=True,
  )
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  z = beta * (c - r)
  eps = label_smoothing
  loss = (
    -(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)
  ) / (1.0 - 2.0 * eps)
  return loss, _aux(beta, c, r)


@typechecked
def exo_pair_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  label_smoothing: float = 1e-3,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Pairwise EXO: reverse KL from the model's pair posterior to the labels.

  Eq. 16 of Ji et al. (2024) with K = 2: ``q = softmax(β·[c, r])`` against the
  smoothed label distribution ``p = [1−ε, ε]``,

  .. math::
    \ell = \sigma(\beta h)\,[\log\sigma(\beta h) - \log(1-\varepsilon)]
         + \sigma(-\beta h)\,[\log\sigma(-\beta h) - \log\varepsilon].

  ε must be positive (the paper uses 1e-3). TRL 0.28 silently replaces ε = 0
  by 1e-3 (and keeps the change for later loss types); here ε = 0 is an
  error instead.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.
    label_smoothing: ε in (0, 0.5].

  Returns:
    ``(loss, aux)``: float32 ``[B]`` KL values (≥ 0), not reduced.

  References:
    Ji et al., `Towards Efficient Exact Optimization of Language Model
    Alignment <https://arxiv.org/abs/2402.00856>`_, 2024.
  """
  _check_beta("exo_pair_loss", beta)
  _check_interval(
    "exo_pair_loss", "label_smoothing", label_smoothing, 0.0, 0.5, low_open=True
  )
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  z = beta * (c - r)
  log_q_w, log_q_l = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
  eps = label_smoothing
  loss = jnp.exp(log_q_w) * (log_q_w - jnp.log1p(-eps)) + jnp.exp(log_q_l) * (
    log_q_l - jnp.log(eps)
  )
  return loss, _aux(beta, c, r)


@typechecked
def discopop_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  tau: float = 0.05,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""DiscoPOP (log-ratio modulated loss, LRML), Eq. 5 of Chris Lu et al.

  A sigmoid gate on ``z = βh`` blends the logistic (DPO) and exponential
  losses:

  .. math::
    \ell = \big(1 - \sigma(z/\tau)\big)\,(-\log\sigma(z))
         + \sigma(z/\tau)\,e^{-z}.

  The exponential term is computed as ``exp(log σ(z/τ) − z)``, which stays
  finite for very negative ``z``.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.
    tau: gate temperature τ > 0 (paper: 0.05).

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced.

  References:
    Chris Lu et al., `Discovering Preference Optimization Algorithms with
    and for Large Language Models <https://arxiv.org/abs/2406.08414>`_, 2024.
  """
  _check_beta("discopop_loss", beta)
  if not tau > 0:
    raise ValueError(f"discopop_loss: tau must be > 0, got {tau}.")
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  z = beta * (c - r)
  logistic = jax.nn.sigmoid(-z / tau) * jax.nn.softplus(-z)
  exponential = jnp.exp(jax.nn.log_sigmoid(z / tau) - z)
  return logistic + exponential, _aux(beta, c, r)


# --------------------------------------------------------------------------
# Margin / regression losses.


@typechecked
def slic_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Hinge (SLiC-style rank calibration) loss on the DPO margin.

  .. math::
    \ell = \max(0,\ 1 - \beta h)

  This is SLiC's calibration loss ``max(0, δ − log π(y_w) + log π(y_l))``
  with margin ``δ = 1/β``, applied to reference-normalised likelihoods and
  scaled by β (TRL ``loss_type="hinge"``).

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0 (1/β is the margin).

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced.

  References:
    Zhao et al., `SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback <https://arxiv.org/abs/2305.10425>`_, 2023.
  """
  _check_beta("slic_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return jax.nn.relu(1.0 - beta * (c - r)), _aux(beta, c, r)


@typechecked
def ipo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Identity Preference Optimization, Eq. 17 of Azar et al. (2023).

  .. math::
    \ell = \Big(h - \frac{1}{2\tau}\Big)^2,\qquad \tau = \beta

  on the summed (unnormalised) sequence log-probs, as in the paper and TRL
  0.x. TRL 1.x's ``ipo`` divides ``c`` and ``r`` by the completion lengths
  first: that is :func:`ipo_norm_loss`.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: the regularisation strength τ > 0; the loss is minimal at
      ``h = 1/(2τ)``.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced.

  References:
    Azar et al., `A General Theoretical Paradigm to Understand Learning from
    Human Preferences <https://arxiv.org/abs/2310.12036>`_, 2023.
  """
  _check_beta("ipo_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  return jnp.square(c - r - 0.5 / beta), _aux(beta, c, r)


@typechecked
def ipo_norm_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"],
  rejected_lengths: Real[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Length-normalised IPO (TRL 1.x ``loss_type="ipo"``).

  .. math::
    \ell = \Big(\frac{c}{|y_w|} - \frac{r}{|y_l|} - \frac{1}{2\beta}\Big)^2

  TRL 1.x states that this per-token normalisation was confirmed with the
  IPO authors and matches the paper's experiments; the paper's Eq. 17 itself
  is unnormalised (:func:`ipo_loss`).

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    chosen_lengths: completion token counts ``|y_w|`` (int or float); values
      below 1 are treated as 1.
    rejected_lengths: ``|y_l|``, same convention.
    beta: τ > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced; ``aux`` holds the
    unnormalised implicit rewards.

  References:
    Azar et al., `A General Theoretical Paradigm to Understand Learning from
    Human Preferences <https://arxiv.org/abs/2310.12036>`_, 2023.
  """
  _check_beta("ipo_norm_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  margin = c / _lengths(chosen_lengths) - r / _lengths(rejected_lengths)
  return jnp.square(margin - 0.5 / beta), _aux(beta, c, r)


@typechecked
def sigmoid_norm_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"],
  rejected_lengths: Real[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Length-normalised DPO (TRL 1.x ``loss_type="sigmoid_norm"``).

  .. math::
    \ell = -\log\sigma\Big(\beta\Big[\frac{c}{|y_w|} - \frac{r}{|y_l|}\Big]\Big)

  DPO on per-token average log-ratios (the "LN-DPO" ablation of SimPO, with
  a reference model).

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    chosen_lengths: ``|y_w|`` token counts; values below 1 count as 1.
    rejected_lengths: ``|y_l|``.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced; unnormalised rewards.

  References:
    Meng et al., `SimPO: Simple Preference Optimization with a
    Reference-Free Reward <https://arxiv.org/abs/2405.14734>`_, 2024.
  """
  _check_beta("sigmoid_norm_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  margin = c / _lengths(chosen_lengths) - r / _lengths(rejected_lengths)
  return _logistic(beta * margin, 0.0), _aux(beta, c, r)


@typechecked
def r_dpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  chosen_lengths: Real[In, "B"],
  rejected_lengths: Real[In, "B"],
  *,
  beta: float = 0.1,
  alpha: float = 0.05,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""R-DPO: DPO with a length regulariser in the margin (Park et al., 2024).

  Solving the KL-constrained objective with the length penalty
  ``r(x, y) − α|y|`` gives the implicit reward ``β log u + α|y|``, hence

  .. math::
    \ell = -\log\sigma\big(\beta h + \alpha(|y_w| - |y_l|)\big).

  A longer chosen completion already has a larger margin, so the policy is
  not pushed to explain length differences through its log-probs. α = 0 is
  DPO. The paper tunes α per dataset; 0.05 is a small default.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    chosen_lengths: ``|y_w|`` in tokens (no gradient).
    rejected_lengths: ``|y_l|`` in tokens.
    beta: β > 0.
    alpha: length-penalty strength α ≥ 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced; ``aux`` holds ``β·c``,
    ``β·r`` (without the length term).

  References:
    Park et al., `Disentangling Length from Quality in Direct Preference
    Optimization <https://arxiv.org/abs/2403.19159>`_, 2024.
  """
  _check_beta("r_dpo_loss", beta)
  if not alpha >= 0:
    raise ValueError(f"r_dpo_loss: alpha must be >= 0, got {alpha}.")
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  length_gap = _f32(chosen_lengths) - _f32(rejected_lengths)
  return _logistic(beta * (c - r) + alpha * length_gap, 0.0), _aux(beta, c, r)


# --------------------------------------------------------------------------
# Losses on the two log-ratios separately.


@typechecked
def nca_pair_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Pairwise Noise Contrastive Alignment (NCA) loss.

  With the implicit rewards ``r_w = βc``, ``r_l = βr``:

  .. math::
    \ell = -\log\sigma(r_w) - \tfrac12\log\sigma(-r_w) - \tfrac12\log\sigma(-r_l)

  Unlike DPO it pushes the absolute chosen reward up, so the chosen
  likelihood does not fall with the rejected one.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced.

  References:
    Chen et al., `Noise Contrastive Alignment of Language Models with
    Explicit Rewards <https://arxiv.org/abs/2402.05369>`_, 2024.
  """
  _check_beta("nca_pair_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  loss = (
    -jax.nn.log_sigmoid(beta * c)
    - 0.5 * jax.nn.log_sigmoid(-beta * c)
    - 0.5 * jax.nn.log_sigmoid(-beta * r)
  )
  return loss, _aux(beta, c, r)


@typechecked
def bco_pair_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  reward_mean: Float[In, ""] | float,
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Pairwise Binary Classifier Optimization with a reward shift δ.

  Chosen and rejected completions are classified separately, around the
  running mean δ of the implicit rewards:

  .. math::
    \ell = -\log\sigma(\beta c - \delta) - \log\sigma(-(\beta r - \delta))

  δ is state carried across steps. Compute it with
  :func:`bco_reward_mean_update` (TRL's ``RunningMoments`` semantics: the
  mean over steps of each step's mean reward, the current step included)
  and pass it in; TRL 1.x dropped δ (pass 0). TRL 0.28 keeps δ in float32
  even in float64 runs.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    reward_mean: scalar δ; receives no gradient.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced.

  References:
    Jung et al., `Binary Classifier Optimization for Large Language Model
    Alignment <https://arxiv.org/abs/2404.04656>`_, 2024.
  """
  _check_beta("bco_pair_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  delta = jax.lax.stop_gradient(_f32(reward_mean))
  loss = -jax.nn.log_sigmoid(beta * c - delta) - jax.nn.log_sigmoid(
    -(beta * r - delta)
  )
  return loss, _aux(beta, c, r)


@typechecked
def bco_reward_mean_update(
  reward_mean: Float[In, ""] | float,
  count: Real[In, ""] | float,
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
) -> tuple[Float[Out, ""], Float[Out, ""]]:
  """Updates the running reward mean δ of :func:`bco_pair_loss`.

  The step's mean reward ``m = mean([chosen_rewards; rejected_rewards])``
  counts as one observation: ``δ ← δ + (m − δ)/(n + 1)``, ``n ← n + 1``.
  Start from ``δ = 0, n = 0``; call once per optimizer step, before the
  loss, with the implicit rewards of the step (``aux`` of a previous call or
  ``β·(policy − ref)`` log-ratios). Under ``jit`` on a sharded batch the
  mean is global.

  Args:
    reward_mean: current δ (scalar).
    count: number of steps folded in so far.
    chosen_rewards: ``β·c`` for the step's pairs; no gradient.
    rejected_rewards: ``β·r``; no gradient.

  Returns:
    ``(new_reward_mean, new_count)`` as float32 scalars.
  """
  sg = jax.lax.stop_gradient
  step_mean = 0.5 * (
    jnp.mean(sg(_f32(chosen_rewards))) + jnp.mean(sg(_f32(rejected_rewards)))
  )
  new_count = _f32(count) + 1.0
  mean = _f32(reward_mean)
  return mean + (step_mean - mean) / new_count, new_count


@typechecked
def sppo_hard_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""SPPO with hard win probabilities (winner P = 1, loser P = 0).

  SPPO regresses ``log(π/π_ref)`` onto ``η(P(y ≻ π) − 1/2)`` (Eq. 4.7 of
  Wu et al.); with hard labels and ``η = 1/β``:

  .. math::
    \ell = \Big(c - \frac{1}{2\beta}\Big)^2 + \Big(r + \frac{1}{2\beta}\Big)^2

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: log-probs of the previous iterate / reference
      (chosen); no gradient.
    ref_rejected_logps: same for the rejected completion; no gradient.
    beta: β > 0; the targets are ``±1/(2β)``.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced.

  References:
    Wu et al., `Self-Play Preference Optimization for Language Model
    Alignment <https://arxiv.org/abs/2405.00675>`_, 2024.
  """
  _check_beta("sppo_hard_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  target = 0.5 / beta
  return jnp.square(c - target) + jnp.square(r + target), _aux(beta, c, r)


@typechecked
def apo_zero_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Anchored Preference Optimization, APO-zero (Eq. 7 of D'Oosterlinck).

  .. math::
    \ell = \big(1 - \sigma(\beta c)\big) + \sigma(\beta r)

  Raises the chosen and lowers the rejected likelihood, each anchored at
  the reference. Use when the chosen outputs beat the model's own.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` in [0, 2], not reduced.

  References:
    D'Oosterlinck et al., `Anchored Preference Optimization and Contrastive
    Revisions: Addressing Underspecification in Alignment
    <https://arxiv.org/abs/2408.06266>`_, 2024.
  """
  _check_beta("apo_zero_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  loss = jax.nn.sigmoid(-beta * c) + jax.nn.sigmoid(beta * r)
  return loss, _aux(beta, c, r)


@typechecked
def apo_down_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Anchored Preference Optimization, APO-down (Eq. 8 of D'Oosterlinck).

  .. math::
    \ell = \sigma(\beta c) + \big(1 - \sigma(\beta h)\big)

  Lowers the chosen likelihood and the rejected one more. Use when the
  chosen outputs are worse than the model's own.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` in [0, 2], not reduced.

  References:
    D'Oosterlinck et al., `Anchored Preference Optimization and Contrastive
    Revisions: Addressing Underspecification in Alignment
    <https://arxiv.org/abs/2408.06266>`_, 2024.
  """
  _check_beta("apo_down_loss", beta)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  loss = jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(-beta * (c - r))
  return loss, _aux(beta, c, r)


# --------------------------------------------------------------------------
# Alignment via Optimal Transport: batch-coupled through a sort.


@typechecked
def aot_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""AOT for paired data: first-order stochastic dominance via sorting.

  The policy margins ``m = log π(y_w) − log π(y_l)`` and reference margins
  ``m_ref`` are sorted separately over the batch, and the i-th smallest are
  compared (the 1-D optimal-transport coupling):

  .. math::
    \ell_i = -(1-\varepsilon)\log\sigma(\beta\Delta_i)
             - \varepsilon\log\sigma(-\beta\Delta_i),\quad
    \Delta_i = \mathrm{sort}(m)_i - \mathrm{sort}(m_{ref})_i.

  **Batch coupling**: ``loss[i]`` is the i-th quantile term, not a function
  of pair i alone; the batch is the empirical distribution. Under ``jit`` on
  global (sharded) arrays the sort is over the global batch, so the result
  does not depend on the sharding; inside ``shard_map``/``pmap`` it would
  be per shard (gather first). Micro-batching changes the objective.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completion.
    policy_rejected_logps: same for the rejected completion.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.
    label_smoothing: ε in [0, 0.5].

  Returns:
    ``(loss, aux)``: float32 ``[B]`` in sorted (quantile) order, not
    reduced; ``aux`` holds the per-pair rewards in batch order.

  References:
    Melnyk et al., `Distributional Preference Alignment of LLMs via Optimal
    Transport <https://arxiv.org/abs/2406.05882>`_, 2024.
  """
  _check_beta("aot_loss", beta)
  _check_interval("aot_loss", "label_smoothing", label_smoothing, 0.0, 0.5)
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  sg = jax.lax.stop_gradient
  margins = _f32(policy_chosen_logps) - _f32(policy_rejected_logps)
  ref_margins = sg(_f32(ref_chosen_logps) - _f32(ref_rejected_logps))
  delta = jnp.sort(margins) - jnp.sort(ref_margins)
  return _logistic(beta * delta, label_smoothing), _aux(beta, c, r)


@typechecked
def aot_unpaired_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""AOT for unpaired data: chosen log-ratios dominate rejected ones.

  The chosen log-ratios ``c`` and rejected log-ratios ``r`` are sorted
  separately over the batch and compared quantile by quantile:

  .. math::
    \ell_i = -(1-\varepsilon)\log\sigma(\beta\Delta_i)
             - \varepsilon\log\sigma(-\beta\Delta_i),\quad
    \Delta_i = \mathrm{sort}(c)_i - \mathrm{sort}(r)_i.

  **Batch coupling**: as in :func:`aot_loss`, ``loss[i]`` belongs to the
  i-th quantile, not to pair i; under ``jit`` on sharded global arrays the
  sort is global.

  Args:
    policy_chosen_logps: summed policy log-probs of the chosen completions.
    policy_rejected_logps: same for the rejected completions.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    beta: β > 0.
    label_smoothing: ε in [0, 0.5].

  Returns:
    ``(loss, aux)``: float32 ``[B]`` in quantile order, not reduced.

  References:
    Melnyk et al., `Distributional Preference Alignment of LLMs via Optimal
    Transport <https://arxiv.org/abs/2406.05882>`_, 2024.
  """
  _check_beta("aot_unpaired_loss", beta)
  _check_interval(
    "aot_unpaired_loss", "label_smoothing", label_smoothing, 0.0, 0.5
  )
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  delta = jnp.sort(c) - jnp.sort(r)
  return _logistic(beta * delta, label_smoothing), _aux(beta, c, r)


# --------------------------------------------------------------------------
# Token-level variants: WPO weighting and LD-DPO.

_WPO_ALIGNMENTS = ("sampled", "greedy", "none")


@typechecked
def wpo_token_log_normalizers(
  logits: Float[In, "*B T V"],
  *,
  alignment: str = "sampled",
) -> Float[Out, "*B T"]:
  r"""Per-token log normalisers of WPO's weight alignment.

  * ``sampled`` (the paper's default): ``log Σ_v π(v|x, y_{<t})²``, the
    expected probability of a token sampled from the policy itself;
  * ``greedy``: ``log max_v π(v|x, y_{<t})``;
  * ``none``: 0 (raw length-normalised probabilities).

  Computed in float32 from the logits that predict the completion tokens
  (aligned with the targets, as for ``ops.token_logps``).

  Args:
    logits: unnormalised scores; no gradient flows through the result.
    alignment: one of ``"sampled"``, ``"greedy"``, ``"none"``.

  Returns:
    float32 ``[*B, T]``.

  References:
    Zhou et al., `WPO: Enhancing RLHF with Weighted Preference Optimization
    <https://arxiv.org/abs/2406.11827>`_, 2024.
  """
  if alignment not in _WPO_ALIGNMENTS:
    raise ValueError(
      f"wpo_token_log_normalizers: alignment must be one of "
      f"{_WPO_ALIGNMENTS}, got {alignment!r}."
    )
  logps = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(logits)), axis=-1)
  if alignment == "sampled":
    return jax.nn.logsumexp(2.0 * logps, axis=-1)
  if alignment == "greedy":
    return jnp.max(logps, axis=-1)
  return jnp.zeros(logps.shape[:-1], jnp.float32)


def _mean_log_weight(token_logps, token_log_normalizers, mask):
  aligned = jnp.where(
    mask, _f32(token_logps) - _f32(token_log_normalizers), 0.0
  )
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  return safe_divide(jnp.sum(aligned, axis=-1), count)


@typechecked
def wpo_weights(
  policy_chosen_token_logps: Float[In, "B T"],
  policy_rejected_token_logps: Float[In, "B T"],
  chosen_token_log_normalizers: Float[In, "B T"],
  rejected_token_log_normalizers: Float[In, "B T"],
  chosen_mask: Bool[In, "B T"],
  rejected_mask: Bool[In, "B T"],
  *,
  max_weight: float | None = None,
) -> Float[Out, "B"]:
  r"""WPO pair weights ``w(x, y_w)·w(x, y_l)``, stop-gradient.

  .. math::
    w(x, y) = \exp\Big(\frac{1}{|y|}\sum_t
      \log\frac{\pi_\theta(y_t|x, y_{<t})}{Z_t}\Big)

  where ``log Z_t`` comes from :func:`wpo_token_log_normalizers` (the
  paper's sampled alignment: ``Z_t = Σ_v π(v|·)²``). The weight
  approximates how likely the pair is under the current policy, relative
  to its own samples; it multiplies any per-pair preference loss.

  Follows the paper: the weights are not capped. The authors' released code
  (and TRL 0.28) cap the product at 1, which ``max_weight=1.0`` reproduces;
  TRL 0.28 also shifts the normaliser by one position (not reproduced).
  An empty completion has weight 1.

  Args:
    policy_chosen_token_logps: per-token policy log-probs of ``y_w``
      ``[B, T]``; padded positions (even NaN) are ignored.
    policy_rejected_token_logps: same for ``y_l``.
    chosen_token_log_normalizers: ``log Z_t`` for ``y_w``.
    rejected_token_log_normalizers: ``log Z_t`` for ``y_l``.
    chosen_mask: bool ``[B, T]``, True on completion tokens of ``y_w``.
    rejected_mask: same for ``y_l``.
    max_weight: optional upper bound on the product (None: no cap).

  Returns:
    float32 ``[B]`` weights; no gradient flows through them.

  References:
    Zhou et al., `WPO: Enhancing RLHF with Weighted Preference Optimization
    <https://arxiv.org/abs/2406.11827>`_, 2024.
  """
  if max_weight is not None and not max_weight > 0:
    raise ValueError(
      f"wpo_weights: max_weight must be > 0 or None, got {max_weight}."
    )
  log_w = _mean_log_weight(
    policy_chosen_token_logps, chosen_token_log_normalizers, chosen_mask
  ) + _mean_log_weight(
    policy_rejected_token_logps, rejected_token_log_normalizers, rejected_mask
  )
  weights = jnp.exp(jax.lax.stop_gradient(log_w))
  if max_weight is not None:
    weights = jnp.minimum(weights, max_weight)
  return weights


@typechecked
def wpo_loss(
  policy_chosen_logps: Float[In, "B"],
  policy_rejected_logps: Float[In, "B"],
  ref_chosen_logps: Float[In, "B"],
  ref_rejected_logps: Float[In, "B"],
  policy_chosen_token_logps: Float[In, "B T"],
  policy_rejected_token_logps: Float[In, "B T"],
  chosen_token_log_normalizers: Float[In, "B T"],
  rejected_token_log_normalizers: Float[In, "B T"],
  chosen_mask: Bool[In, "B T"],
  rejected_mask: Bool[In, "B T"],
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  max_weight: float | None = None,
) -> tuple[Float[Out, "B"], WpoAux]:
  r"""Weighted Preference Optimization on the DPO loss.

  .. math::
    \ell = w(x, y_w)\,w(x, y_l)\,\ell_{DPO}(h)

  with the weights of :func:`wpo_weights` (stop-gradient) and the
  (conservative) DPO loss of :func:`dpo_loss`. The sequence log-probs drive
  the gradient; the token log-probs only set the weights. To weight another
  loss of this module, multiply its output by :func:`wpo_weights`.

  Args:
    policy_chosen_logps: summed policy log-probs of ``y_w`` ``[B]``.
    policy_rejected_logps: same for ``y_l``.
    ref_chosen_logps: reference log-probs (chosen); no gradient.
    ref_rejected_logps: reference log-probs (rejected); no gradient.
    policy_chosen_token_logps: per-token policy log-probs of ``y_w``
      ``[B, T]`` (weights only; no gradient).
    policy_rejected_token_logps: same for ``y_l``.
    chosen_token_log_normalizers: ``log Z_t`` for ``y_w``
      (:func:`wpo_token_log_normalizers`).
    rejected_token_log_normalizers: ``log Z_t`` for ``y_l``.
    chosen_mask: bool ``[B, T]`` completion mask of ``y_w``.
    rejected_mask: same for ``y_l``.
    beta: β > 0.
    label_smoothing: ε in [0, 0.5] (cDPO).
    max_weight: optional cap on the pair weight (1.0: the authors' code).

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced, and :class:`WpoAux`.

  References:
    Zhou et al., `WPO: Enhancing RLHF with Weighted Preference Optimization
    <https://arxiv.org/abs/2406.11827>`_, 2024.
  """
  _check_beta("wpo_loss", beta)
  _check_interval("wpo_loss", "label_smoothing", label_smoothing, 0.0, 0.5)
  weights = wpo_weights(
    policy_chosen_token_logps,
    policy_rejected_token_logps,
    chosen_token_log_normalizers,
    rejected_token_log_normalizers,
    chosen_mask,
    rejected_mask,
    max_weight=max_weight,
  )
  c, r = _log_ratios(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
  )
  loss = weights * _logistic(beta * (c - r), label_smoothing)
  aux = _aux(beta, c, r)
  return loss, WpoAux(aux.chosen_rewards, aux.rejected_rewards, weights)


def _desensitized_logps(token_logps, mask, shared_lengths, alpha):
  """``Σ_{t ≤ l_p} logp_t + α Σ_{t > l_p} logp_t`` over completion tokens."""
  values = jnp.where(mask, _f32(token_logps), 0.0)
  position = jnp.cumsum(mask, axis=-1)  # 1-based index among masked tokens
  shared = mask & (position <= shared_lengths[:, None])
  shared_sum = jnp.sum(jnp.where(shared, values, 0.0), axis=-1)
  tail_sum = jnp.sum(jnp.where(shared, 0.0, values), axis=-1)
  return shared_sum + alpha * tail_sum


@typechecked
def ld_dpo_loss(
  policy_chosen_token_logps: Float[In, "B T"],
  policy_rejected_token_logps: Float[In, "B T"],
  ref_chosen_token_logps: Float[In, "B T"],
  ref_rejected_token_logps: Float[In, "B T"],
  chosen_mask: Bool[In, "B T"],
  rejected_mask: Bool[In, "B T"],
  *,
  beta: float = 0.1,
  alpha: float = 0.5,
) -> tuple[Float[Out, "B"], PreferenceAux]:
  r"""Length-Desensitised DPO (Liu et al., 2024).

  The first ``l_p = min(|y_w|, |y_l|)`` completion tokens (the length both
  completions share) count fully, the excess of the longer one with weight
  α:

  .. math::
    \log\hat\pi(y|x) = \sum_{t \le l_p}\log\pi(y_t|\cdot)
                     + \alpha\sum_{t > l_p}\log\pi(y_t|\cdot),

  for the policy and the reference alike, and the loss is DPO on
  ``log π̂_θ − log π̂_ref``. α = 1 is DPO; α = 0 truncates both completions
  to the shared length. Positions are counted over completion tokens
  (``cumsum(mask)``), so left or right padding both work. TRL 0.28 counted
  positions from the start of the prompt and desensitised the policy only;
  TRL 1.x and this function follow the paper.

  Args:
    policy_chosen_token_logps: per-token policy log-probs of ``y_w``
      ``[B, T]``; padded positions (even NaN) are ignored.
    policy_rejected_token_logps: same for ``y_l``.
    ref_chosen_token_logps: per-token reference log-probs of ``y_w``; no
      gradient.
    ref_rejected_token_logps: same for ``y_l``; no gradient.
    chosen_mask: bool ``[B, T]`` completion mask of ``y_w``.
    rejected_mask: same for ``y_l``.
    beta: β > 0.
    alpha: weight α in [0, 1] of the tokens beyond the shared length; the
      paper tunes it per model (0.5 is a middle value).

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced; ``aux`` holds the
    rewards ``β(log π̂_θ − log π̂_ref)``.

  References:
    Liu et al., `Length Desensitization in Direct Preference Optimization
    <https://arxiv.org/abs/2409.06411>`_, 2024.
  """
  _check_beta("ld_dpo_loss", beta)
  _check_interval("ld_dpo_loss", "alpha", alpha, 0.0, 1.0)
  shared_lengths = jnp.minimum(
    jnp.sum(chosen_mask, axis=-1), jnp.sum(rejected_mask, axis=-1)
  )

  def desensitize(token_logps, mask):
    return _desensitized_logps(token_logps, mask, shared_lengths, alpha)

  c, r = _log_ratios(
    desensitize(policy_chosen_token_logps, chosen_mask),
    desensitize(policy_rejected_token_logps, rejected_mask),
    desensitize(ref_chosen_token_logps, chosen_mask),
    desensitize(ref_rejected_token_logps, rejected_mask),
  )
  return _logistic(beta * (c - r), 0.0), _aux(beta, c, r)


REGISTRY = {
  "dpo": dpo_loss,
  "sigmoid": dpo_loss,
  "hinge": slic_loss,
  "ipo": ipo_loss,
  "ipo_norm": ipo_norm_loss,
  "exo_pair": exo_pair_loss,
  "nca_pair": nca_pair_loss,
  "robust": robust_dpo_loss,
  "bco_pair": bco_pair_loss,
  "sppo_hard": sppo_hard_loss,
  "aot": aot_loss,
  "aot_unpaired": aot_unpaired_loss,
  "apo_zero": apo_zero_loss,
  "apo_down": apo_down_loss,
  "discopop": discopop_loss,
  "sigmoid_norm": sigmoid_norm_loss,
  "f_dpo": f_dpo_loss,
  "wpo": wpo_loss,
  "ld_dpo": ld_dpo_loss,
  "r_dpo": r_dpo_loss,
}
"""Config names (TRL's ``loss_type`` where it has one) → loss functions."""
