"""Reward-model training objectives: pairwise, listwise, ties, uncertainty,
general-preference, multi-objective and step-level (process) losses.

Every loss takes reward-model outputs (scalar scores, log-variances,
preference embeddings or step logits) and returns ``(unreduced loss, aux)``.
Pairwise and listwise losses return one value per pair or list, ``[B]``
(reduce with :func:`alignment.ops.aggregate_sequence_loss`); step-level
losses return ``[B, S]`` with zeros outside ``aux.step_mask`` (reduce with
:func:`alignment.ops.aggregate_token_loss` and ``mode="token_mean"``, the
mean over labelled steps used by the PRM papers).

Arrays that are labels or come from frozen models (margins, magnitudes,
regression targets, ensemble scores, Monte-Carlo step scores, directions)
receive ``stop_gradient`` inside the loss.

Registry names (``config.loss.name``):

=========================== ==============================================
``bradley_terry``           :func:`bradley_terry_loss` (margin, label
                            smoothing, label flipping, reward centring)
``bt_adaptive_margin``      :func:`bt_adaptive_margin_loss`
``plackett_luce``           :func:`plackett_luce_loss`
``bt_ties_rao_kupper``      :func:`rao_kupper_loss`
``bt_ties_davidson``        :func:`davidson_loss`
``scaled_bt``               :func:`scaled_bt_loss`
``bt_regression``           :func:`bt_regression_loss`
``gaussian_bt``             :func:`gaussian_bt_loss` (closed-form probit)
``gaussian_bt_sampled``     :func:`gaussian_bt_sampled_loss` (PEARL RRL)
``brme``                    :func:`brme_loss`
``gpm``                     :func:`gpm_loss`
``multi_objective``         :func:`multi_objective_loss`
``multi_objective_regression`` :func:`multi_objective_regression_loss`
``prm_hard``                :func:`prm_hard_loss`
``prm_soft``                :func:`prm_soft_loss`
``prm_scan``                :func:`prm_scan_loss`
=========================== ==============================================
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special as jsp_special
from jaxtyping import Bool, Float, Int

from alignment.array_types import In, Out, typechecked
from alignment.losses._checks import f32 as _f32
from alignment.ops import safe_divide

__all__ = [
  "PairwiseAux",
  "ListwiseAux",
  "TiesAux",
  "GaussianAux",
  "GPMAux",
  "RegressionAux",
  "AttributeAux",
  "StepAux",
  "bradley_terry_loss",
  "bt_adaptive_margin_loss",
  "preference_strength",
  "plackett_luce_loss",
  "rao_kupper_loss",
  "davidson_loss",
  "scaled_bt_loss",
  "bt_regression_loss",
  "gaussian_bt_loss",
  "gaussian_bt_sampled_loss",
  "brme_loss",
  "brme_nominal_reward",
  "gpm_preference_score",
  "gpm_loss",
  "directional_scalarize",
  "multi_objective_loss",
  "multi_objective_regression_loss",
  "prm_hard_loss",
  "prm_soft_loss",
  "scan_step_targets",
  "prm_scan_loss",
]

_MASKED_LOGIT = -1e30  # finite stand-in for -inf inside log-sum-exps


def _sg32(x):
  return jax.lax.stop_gradient(_f32(x))


def _pair_accuracy(delta):
  return jnp.where(delta > 0, 1.0, jnp.where(delta == 0, 0.5, 0.0))


def _check_range(name, value, low, high, *, low_open=False, high_open=False):
  bad_low = value <= low if low_open else value < low
  bad_high = value >= high if high_open else value > high
  if bad_low or bad_high or math.isnan(value):
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}.")


# ---------------------------------------------------------------------------
# Aux containers.
# ---------------------------------------------------------------------------


class PairwiseAux(NamedTuple):
  """Per-pair diagnostics of a pairwise reward loss (no gradient).

  Attributes:
    reward_margin: score difference in the labelled direction,
      ``r(chosen) - r(rejected)`` (after label flipping, before any target
      margin), ``[B]``.
    preference_probability: the model's probability that the labelled
      chosen response wins, ``[B]``.
    accuracy: 1 where the margin is positive, 0.5 at an exact tie, else 0.
  """

  reward_margin: Float[Out, "B"]
  preference_probability: Float[Out, "B"]
  accuracy: Float[Out, "B"]


class ListwiseAux(NamedTuple):
  """Per-list diagnostics of a listwise loss (no gradient).

  Attributes:
    top1_probability: Plackett–Luce probability of the top-ranked item among
      the valid items, ``[B]``.
    pair_accuracy: fraction of valid ordered pairs ``(i above j)`` with
      ``r_i > r_j`` (ties count 0.5); 0 for lists with fewer than 2 items.
  """

  top1_probability: Float[Out, "B"]
  pair_accuracy: Float[Out, "B"]


class TiesAux(NamedTuple):
  """Per-pair outcome probabilities of a ties model (no gradient).

  Attributes:
    reward_margin: ``r(chosen) - r(rejected)``.
    win_probability: ``P(chosen ≻ rejected)``.
    tie_probability: ``P(chosen ~ rejected)``.
    loss_probability: ``P(rejected ≻ chosen)``; the three sum to 1.
  """

  reward_margin: Float[Out, "B"]
  win_probability: Float[Out, "B"]
  tie_probability: Float[Out, "B"]
  loss_probability: Float[Out, "B"]


class GaussianAux(NamedTuple):
  """Per-pair diagnostics of a Gaussian (uncertainty-aware) reward loss.

  Attributes:
    reward_margin: ``mu(chosen) - mu(rejected)``.
    preference_probability: ``Phi(margin / sqrt(var_c + var_r))``.
    chosen_std: predicted standard deviation of the chosen reward.
    rejected_std: same for the rejected reward.
  """

  reward_margin: Float[Out, "B"]
  preference_probability: Float[Out, "B"]
  chosen_std: Float[Out, "B"]
  rejected_std: Float[Out, "B"]


class GPMAux(NamedTuple):
  """Per-pair diagnostics of the General Preference Model (no gradient).

  Attributes:
    preference_score: skew-symmetric score ``s(chosen ≻ rejected)``.
    preference_probability: ``sigma(s / tau)``.
    accuracy: 1 where ``s > 0``, 0.5 where ``s == 0``, else 0.
  """

  preference_score: Float[Out, "B"]
  preference_probability: Float[Out, "B"]
  accuracy: Float[Out, "B"]


class RegressionAux(NamedTuple):
  """Per-pair diagnostics of BT + regression (no gradient).

  Attributes:
    reward_margin: ``r(chosen) - r(rejected)``.
    bt_loss: the (scaled) Bradley–Terry part of the loss.
    regression_loss: the squared-error part of the loss.
  """

  reward_margin: Float[Out, "B"]
  bt_loss: Float[Out, "B"]
  regression_loss: Float[Out, "B"]


class AttributeAux(NamedTuple):
  """Per-attribute diagnostics of a multi-objective regression head.

  Attributes:
    errors: signed errors ``r - t``, ``[B, K]``, 0 where unrated (no
      gradient).
  """

  errors: Float[Out, "B K"]


class StepAux(NamedTuple):
  """Per-step diagnostics of a process-reward loss (no gradient).

  Attributes:
    step_probabilities: ``sigma(step_logits)``, ``[B, S]``.
    step_targets: the (hard or soft) targets used, 0 outside the mask.
    step_mask: bool ``[B, S]``, the steps that contribute to the loss; reduce
      the loss with this mask.
  """

  step_probabilities: Float[Out, "B S"]
  step_targets: Float[Out, "B S"]
  step_mask: Bool[Out, "B S"]


def _pairwise_aux(delta, log_probability):
  return PairwiseAux(
    jax.lax.stop_gradient(delta),
    jax.lax.stop_gradient(jnp.exp(log_probability)),
    jax.lax.stop_gradient(_pair_accuracy(delta)),
  )


def _smoothed_logistic(h, label_smoothing):
  loss = jax.nn.softplus(-h)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss + label_smoothing * jax.nn.softplus(h)
  return loss


# ---------------------------------------------------------------------------
# Bradley–Terry family.
# ---------------------------------------------------------------------------


@typechecked
def bradley_terry_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  margin: Float[In, "B"] | None = None,
  flip: Bool[In, "B"] | None = None,
  *,
  label_smoothing: float = 0.0,
  center_rewards_coefficient: float = 0.0,
) -> tuple[Float[Out, "B"], PairwiseAux]:
  r"""Bradley–Terry pairwise reward-model loss, one value per pair.

  With ``s = -1`` where ``flip`` is True (else ``+1``), target margin ``m``,
  label smoothing ``ε`` and centring coefficient ``c``:

  .. math::
    Δ = s·(r_c - r_r), \quad h = Δ - m
    \ell = -(1-ε)\log σ(h) - ε\log σ(-h) + c·(r_c + r_r)^2

  ``m = ε = c = 0`` and no flips is Eq. 1 of Ouyang et al. (2022) /
  Stiennon et al. (2020); ``m`` is the Llama-2 margin term (Touvron et al.
  2023, Eq. 2; TRL ``RewardTrainer``'s ``margin`` column). Label flipping
  and label smoothing are the noisy-preference remedies of Wang et al.
  (2024, Secrets of RLHF Part II); the centring penalty is the
  auxiliary loss of Eisenstein et al. (2023), TRL's
  ``center_rewards_coefficient`` (TRL averages it over the batch; here it is
  kept per pair, so the batch mean of this loss equals TRL's loss).

  Args:
    chosen_rewards: scalar reward-model scores of the preferred responses.
    rejected_rewards: scores of the dispreferred responses.
    margin: optional per-pair target margin ``m`` (e.g. a preference-strength
      rating); a label, receives no gradient.
    flip: optional bool; True reverses that pair's preference label (used to
      correct pairs judged mislabelled).
    label_smoothing: ``ε`` in ``[0, 1]``, probability that a label is wrong;
      ``0.5`` makes every pair uninformative.
    center_rewards_coefficient: ``c >= 0``, weight of the reward-centring
      penalty that keeps scores near zero mean.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`PairwiseAux`.

  References:
    Ouyang et al., `Training language models to follow instructions with
    human feedback <https://arxiv.org/abs/2203.02155>`_, 2022.
    Touvron et al., `Llama 2 <https://arxiv.org/abs/2307.09288>`_, 2023.
    Wang et al., `Secrets of RLHF in Large Language Models Part II: Reward
    Modeling <https://arxiv.org/abs/2401.06080>`_, 2024.
    Eisenstein et al., `Helping or Herding? Reward Model Ensembles Mitigate
    but do not Eliminate Reward Hacking <https://arxiv.org/abs/2312.09244>`_,
    2023.
  """
  _check_range("label_smoothing", label_smoothing, 0.0, 1.0)
  if not center_rewards_coefficient >= 0:
    raise ValueError(
      "center_rewards_coefficient must be >= 0, got "
      f"{center_rewards_coefficient}."
    )
  chosen = _f32(chosen_rewards)
  rejected = _f32(rejected_rewards)
  delta = chosen - rejected
  if flip is not None:
    delta = jnp.where(flip, -delta, delta)
  h = delta if margin is None else delta - _sg32(margin)
  loss = _smoothed_logistic(h, label_smoothing)
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * jnp.square(chosen + rejected)
  return loss, _pairwise_aux(delta, jax.nn.log_sigmoid(delta))


@typechecked
def preference_strength(
  ensemble_chosen_rewards: Float[In, "M B"],
  ensemble_rejected_rewards: Float[In, "M B"],
) -> tuple[Float[Out, "B"], Float[Out, "B"]]:
  r"""Preference strength of each pair measured by a reward-model ensemble.

  .. math::
    d_b = \frac{1}{M}\sum_m (r^m_c - r^m_r), \quad
    σ_b = \mathrm{std}_m (r^m_c - r^m_r)

  as in Wang et al. (2024, Secrets of RLHF Part II): pairs with
  ``d < 0`` are likely mislabelled (flip them), pairs with ``d ≈ 0`` are
  ambiguous (smooth them), large ``d`` deserves a larger margin.

  Args:
    ensemble_chosen_rewards: scores of the chosen responses under ``M``
      independently trained reward models.
    ensemble_rejected_rewards: same for the rejected responses.

  Returns:
    ``(mean, std)``: float32 ``[B]`` each, without gradient (population std).

  References:
    Wang et al., `Secrets of RLHF in Large Language Models Part II: Reward
    Modeling <https://arxiv.org/abs/2401.06080>`_, 2024.
  """
  diff = _sg32(ensemble_chosen_rewards) - _sg32(ensemble_rejected_rewards)
  return jnp.mean(diff, axis=0), jnp.std(diff, axis=0)


@typechecked
def bt_adaptive_margin_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  ensemble_chosen_rewards: Float[In, "M B"],
  ensemble_rejected_rewards: Float[In, "M B"],
  *,
  margin_scale: float = 1.0,
  max_margin: float = math.inf,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], PairwiseAux]:
  r"""Bradley–Terry loss with a margin set by ensemble preference strength.

  .. math::
    μ_b = \mathrm{clip}(α·d_b, 0, μ_{max}), \quad
    \ell = -(1-ε)\log σ(Δ - μ_b) - ε\log σ(μ_b - Δ)

  with ``d_b`` from :func:`preference_strength` and ``Δ = r_c - r_r``. This
  is the adaptive-margin loss of Wang et al. (2024, Secrets of RLHF Part II):
  pairs the ensemble agrees strongly on must be separated by a
  larger margin. The linear-and-clip map from ``d`` to ``μ`` is this
  library's parametrisation of "margin derived from preference strength";
  ``margin_scale=1, max_margin=inf`` uses the (non-negative) mean ensemble
  difference itself.

  Args:
    chosen_rewards: scores of the trained reward model, chosen responses.
    rejected_rewards: same, rejected responses.
    ensemble_chosen_rewards: ``[M, B]`` scores from frozen ensemble members;
      no gradient.
    ensemble_rejected_rewards: ``[M, B]``; no gradient.
    margin_scale: ``α >= 0``.
    max_margin: ``μ_max > 0`` (may be ``inf``).
    label_smoothing: ``ε`` in ``[0, 1]``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`PairwiseAux`.

  References:
    Wang et al., `Secrets of RLHF in Large Language Models Part II: Reward
    Modeling <https://arxiv.org/abs/2401.06080>`_, 2024.
  """
  if not margin_scale >= 0:
    raise ValueError(f"margin_scale must be >= 0, got {margin_scale}.")
  if not max_margin > 0:
    raise ValueError(f"max_margin must be > 0, got {max_margin}.")
  strength, _ = preference_strength(
    ensemble_chosen_rewards, ensemble_rejected_rewards
  )
  margin = jnp.clip(margin_scale * strength, 0.0, max_margin)
  return bradley_terry_loss(
    chosen_rewards, rejected_rewards, margin, label_smoothing=label_smoothing
  )


@typechecked
def scaled_bt_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  magnitude: Float[In, "B"],
) -> tuple[Float[Out, "B"], PairwiseAux]:
  r"""Scaled Bradley–Terry loss: BT weighted by the preference magnitude.

  .. math::
    \ell = -m \log σ(r_c - r_r)

  where ``m`` is the annotated preference strength (HelpSteer2-Preference:
  1 = slightly better, 2 = better, 3 = much better). ``m ≡ 1`` is plain BT;
  the gradient scales linearly in ``m``. (The "margin BT" variant the paper
  compares against is :func:`bradley_terry_loss` with ``margin=m``.)

  Args:
    chosen_rewards: scores of the preferred responses.
    rejected_rewards: scores of the dispreferred responses.
    magnitude: per-pair preference magnitude ``m >= 0``; a label, no
      gradient.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`PairwiseAux`.

  References:
    Wang et al., `HelpSteer2-Preference: Complementing Ratings with
    Preferences <https://arxiv.org/abs/2410.01257>`_, 2024.
  """
  delta = _f32(chosen_rewards) - _f32(rejected_rewards)
  log_p = jax.nn.log_sigmoid(delta)
  return -_sg32(magnitude) * log_p, _pairwise_aux(delta, log_p)


@typechecked
def bt_regression_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  chosen_targets: Float[In, "B"],
  rejected_targets: Float[In, "B"],
  magnitude: Float[In, "B"] | None = None,
  *,
  bt_weight: float = 1.0,
  regression_weight: float = 1.0,
) -> tuple[Float[Out, "B"], RegressionAux]:
  r"""Joint (scaled) Bradley–Terry and rating-regression loss.

  .. math::
    \ell = w_{bt}·(-m\log σ(r_c - r_r))
         + w_{reg}·\tfrac12[(r_c - t_c)^2 + (r_r - t_r)^2]

  HelpSteer2-Preference compares BT (preference) and regression (SteerLM,
  Likert helpfulness ratings ``t``) reward models on matched data, and
  combines them. Its best recipe is sequential: train the regression model,
  then initialise Scaled BT from it; with this function that is a first
  stage with ``bt_weight=0`` and a second with ``regression_weight=0``.
  Both weights non-zero give the joint multi-task objective (a design
  choice of this library, not the paper's recipe).

  Args:
    chosen_rewards: scores of the preferred responses.
    rejected_rewards: scores of the dispreferred responses.
    chosen_targets: rating targets ``t_c`` of the preferred responses (e.g.
      helpfulness 0–4); no gradient.
    rejected_targets: rating targets ``t_r``; no gradient.
    magnitude: optional preference magnitude ``m`` (Scaled BT); default 1.
    bt_weight: ``w_bt >= 0``.
    regression_weight: ``w_reg >= 0``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`RegressionAux`.

  References:
    Wang et al., `HelpSteer2-Preference: Complementing Ratings with
    Preferences <https://arxiv.org/abs/2410.01257>`_, 2024.
  """
  if not bt_weight >= 0:
    raise ValueError(f"bt_weight must be >= 0, got {bt_weight}.")
  if not regression_weight >= 0:
    raise ValueError(
      f"regression_weight must be >= 0, got {regression_weight}."
    )
  chosen = _f32(chosen_rewards)
  rejected = _f32(rejected_rewards)
  delta = chosen - rejected
  bt = jax.nn.softplus(-delta)
  if magnitude is not None:
    bt = _sg32(magnitude) * bt
  regression = 0.5 * (
    jnp.square(chosen - _sg32(chosen_targets))
    + jnp.square(rejected - _sg32(rejected_targets))
  )
  loss = bt_weight * bt + regression_weight * regression
  aux = RegressionAux(
    jax.lax.stop_gradient(delta),
    jax.lax.stop_gradient(bt),
    jax.lax.stop_gradient(regression),
  )
  return loss, aux


# ---------------------------------------------------------------------------
# Listwise.
# ---------------------------------------------------------------------------


@typechecked
def plackett_luce_loss(
  rewards: Float[In, "B K"],
  ranking: Int[In, "B K"] | None = None,
  mask: Bool[In, "B K"] | None = None,
  *,
  top_k: int | None = None,
) -> tuple[Float[Out, "B"], ListwiseAux]:
  r"""Plackett–Luce listwise loss: negative log-likelihood of a ranking.

  With the valid items of list ``b`` in preference order
  ``π(1) ≻ π(2) ≻ … ≻ π(n_b)``:

  .. math::
    \ell_b = -\sum_{i=1}^{\min(k, n_b)}
      \Big[r_{π(i)} - \log\sum_{j \ge i} \exp r_{π(j)}\Big]

  (Plackett 1975; the K-wise model of Zhu et al. 2023 and the listwise
  objective in the appendix of the DPO paper). With ``K = 2`` it is the
  Bradley–Terry loss; adding a constant to a list leaves it unchanged.

  Args:
    rewards: ``[B, K]`` scores. Without ``ranking`` the items must already be
      sorted from most to least preferred.
    ranking: optional int ``[B, K]``; ``ranking[b, i]`` is the index (into
      ``rewards[b]``) of the item ranked ``i``-th (0 = best). Each row must
      be a permutation of ``0..K-1``.
    mask: optional bool ``[B, K]`` over items (indexed like ``rewards``);
      False items are padding of ragged lists and are skipped wherever they
      are ranked. Padded values (even NaN) affect neither value nor
      gradient.
    top_k: if set (``>= 1``), only the first ``top_k`` valid ranks contribute
      (top-k Plackett–Luce).

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss (a sum over ranks, not normalised
    by list length), and :class:`ListwiseAux`. Lists with no valid items give
    0.

  References:
    Plackett, `The Analysis of Permutations
    <https://doi.org/10.2307/2346567>`_, 1975.
    Zhu et al., `Principled Reinforcement Learning with Human Feedback from
    Pairwise or K-wise Comparisons <https://arxiv.org/abs/2301.11270>`_,
    2023.
  """
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1 or None, got {top_k}.")
  values = _f32(rewards)
  valid = jnp.ones(values.shape, bool) if mask is None else jnp.asarray(mask)
  if ranking is not None:
    values = jnp.take_along_axis(values, ranking, axis=-1)
    valid = jnp.take_along_axis(valid, ranking, axis=-1)
  values = jnp.where(valid, values, 0.0)
  masked = jnp.where(valid, values, _MASKED_LOGIT)
  # Suffix log-sum-exp over ranks j >= i as one [B, K, K] reduction (lists
  # are short; this compiles to far fewer ops than a scan).
  later = jnp.triu(jnp.ones((values.shape[1],) * 2, bool))
  suffix_lse = jsp_special.logsumexp(
    jnp.where(later[None], masked[:, None, :], _MASKED_LOGIT), axis=-1
  )
  rank_index = jnp.cumsum(valid, axis=1) - 1
  counts = valid if top_k is None else valid & (rank_index < top_k)
  neg_log_p = suffix_lse - values  # -log P(rank-i item first among rest)
  terms = jnp.where(counts, neg_log_p, 0.0)
  loss = jnp.sum(terms, axis=1)

  # Diagnostics.
  first = jnp.argmax(valid, axis=1)
  top_term = jnp.take_along_axis(neg_log_p, first[:, None], axis=1)[:, 0]
  any_valid = jnp.any(valid, axis=1)
  top1 = jnp.where(any_valid, jnp.exp(-top_term), 0.0)
  pairs = valid[:, :, None] & valid[:, None, :] & (later & ~later.T)[None]
  diff = values[:, :, None] - values[:, None, :]
  correct = jnp.sum(jnp.where(pairs, _pair_accuracy(diff), 0.0), axis=(1, 2))
  pair_accuracy = safe_divide(
    correct, jnp.sum(pairs, axis=(1, 2), dtype=jnp.float32)
  )
  aux = ListwiseAux(
    jax.lax.stop_gradient(top1), jax.lax.stop_gradient(pair_accuracy)
  )
  return loss, aux


# ---------------------------------------------------------------------------
# Ties.
# ---------------------------------------------------------------------------


@typechecked
def rao_kupper_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  ties: Bool[In, "B"],
  *,
  theta: float = 2.0,
) -> tuple[Float[Out, "B"], TiesAux]:
  r"""Bradley–Terry-with-ties loss in the Rao–Kupper form.

  With ``π = exp(r)``, ``θ > 1`` and ``ν = \log θ``:

  .. math::
    P(c ≻ r) = \frac{π_c}{π_c + θπ_r} = σ(Δ - ν), \quad
    P(c \sim r) = \frac{(θ^2 - 1)π_cπ_r}{(π_c + θπ_r)(θπ_c + π_r)}
               = 1 - σ(Δ - ν) - σ(-Δ - ν)

  and the loss is ``-log P(c ≻ r)`` for strict pairs and ``-log P(c ~ r)``
  for tied pairs. Larger ``θ`` widens the band of score differences read as
  a tie. This is the BTT model of Liu et al. (2024), after Rao & Kupper
  (1967). Tied pairs are symmetric in chosen/rejected.

  Args:
    chosen_rewards: scores of the first (preferred, unless tied) responses.
    rejected_rewards: scores of the second responses.
    ties: bool ``[B]``; True where annotators judged the pair a tie.
    theta: tie parameter ``θ > 1``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and :class:`TiesAux`.

  References:
    Rao & Kupper, `Ties in Paired-Comparison Experiments: A Generalization
    of the Bradley-Terry Model <https://doi.org/10.1080/01621459.1967.10482901>`_,
    1967.
    Liu et al., `Reward Learning From Preference With Ties
    <https://arxiv.org/abs/2410.05328>`_, 2024.
  """
  if not theta > 1:
    raise ValueError(f"theta must be > 1, got {theta}.")
  nu = math.log(theta)
  log_tie_const = math.log(math.expm1(2.0 * nu))
  delta = _f32(chosen_rewards) - _f32(rejected_rewards)
  log_win = -jax.nn.softplus(nu - delta)
  log_lose = -jax.nn.softplus(nu + delta)
  log_tie = log_tie_const + log_win + log_lose
  loss = -jnp.where(ties, log_tie, log_win)
  aux = TiesAux(
    *(
      jax.lax.stop_gradient(x)
      for x in (delta, jnp.exp(log_win), jnp.exp(log_tie), jnp.exp(log_lose))
    )
  )
  return loss, aux


@typechecked
def davidson_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  ties: Bool[In, "B"],
  *,
  nu: float = 1.0,
) -> tuple[Float[Out, "B"], TiesAux]:
  r"""Bradley–Terry-with-ties loss in Davidson's form.

  With ``π = exp(r)`` and ``ν > 0``:

  .. math::
    P(c ≻ r) = \frac{π_c}{π_c + π_r + ν\sqrt{π_cπ_r}}, \quad
    P(c \sim r) = \frac{ν\sqrt{π_cπ_r}}{π_c + π_r + ν\sqrt{π_cπ_r}}

  (Davidson 1970), computed as
  ``log P(c ≻ r) = Δ/2 - log(e^{Δ/2} + e^{-Δ/2} + ν)``. The loss is
  ``-log P(c ≻ r)`` for strict pairs and ``-log P(c ~ r)`` for ties; with
  ``ν → 0`` strict pairs recover Bradley–Terry.

  Args:
    chosen_rewards: scores of the first (preferred, unless tied) responses.
    rejected_rewards: scores of the second responses.
    ties: bool ``[B]``; True where the pair is a tie.
    nu: tie propensity ``ν > 0``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and :class:`TiesAux`.

  References:
    Davidson, `On Extending the Bradley-Terry Model to Accommodate Ties in
    Paired Comparison Experiments
    <https://doi.org/10.1080/01621459.1970.10481082>`_, 1970.
    Liu et al., `Reward Learning From Preference With Ties
    <https://arxiv.org/abs/2410.05328>`_, 2024.
  """
  if not nu > 0:
    raise ValueError(f"nu must be > 0, got {nu}.")
  delta = _f32(chosen_rewards) - _f32(rejected_rewards)
  half = 0.5 * delta
  log_nu = math.log(nu)
  log_norm = jsp_special.logsumexp(
    jnp.stack([half, -half, jnp.full_like(half, log_nu)]), axis=0
  )
  log_win = half - log_norm
  log_lose = -half - log_norm
  log_tie = log_nu - log_norm
  loss = -jnp.where(ties, log_tie, log_win)
  aux = TiesAux(
    *(
      jax.lax.stop_gradient(x)
      for x in (delta, jnp.exp(log_win), jnp.exp(log_tie), jnp.exp(log_lose))
    )
  )
  return loss, aux


# ---------------------------------------------------------------------------
# Uncertainty-aware (Gaussian) rewards.
# ---------------------------------------------------------------------------


def _gaussian_kl_to_standard(mean, log_var):
  """KL(N(mean, exp(log_var)) || N(0, 1))."""
  return 0.5 * (jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var)


@typechecked
def gaussian_bt_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  chosen_log_vars: Float[In, "B"],
  rejected_log_vars: Float[In, "B"],
  *,
  kl_coefficient: float = 0.0,
  variance_floor: float = 1e-6,
) -> tuple[Float[Out, "B"], GaussianAux]:
  r"""Uncertainty-aware pairwise loss for Gaussian rewards (closed form).

  Each response's reward is ``N(μ, σ^2)`` with ``μ`` = the ``*_rewards``
  (mean head) and ``\log σ^2`` = the ``*_log_vars`` (variance head). For
  independent rewards the preference probability is Thurstone's probit

  .. math::
    P(c ≻ r) = Φ\Big(\frac{μ_c - μ_r}{\sqrt{σ_c^2 + σ_r^2 + δ}}\Big), \quad
    \ell = -\log P(c ≻ r)
      + λ[\mathrm{KL}(N(μ_c,σ_c^2)\|N(0,1)) + \mathrm{KL}(N(μ_r,σ_r^2)\|N(0,1))]

  (``δ`` = ``variance_floor``). It is exact and needs no sampling; large
  predicted variance flattens the probability, so noisy pairs cost less.
  The KL regulariser (weight ``λ``) is the one PEARL's robust reward
  learning adds to its sampled Gaussian rewards; see
  :func:`gaussian_bt_sampled_loss` for that Monte-Carlo objective.

  Args:
    chosen_rewards: predicted reward means of the preferred responses.
    rejected_rewards: predicted reward means of the dispreferred responses.
    chosen_log_vars: predicted log-variances ``log σ_c^2``.
    rejected_log_vars: predicted log-variances ``log σ_r^2``.
    kl_coefficient: ``λ >= 0``.
    variance_floor: ``δ > 0`` added to the summed variance.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`GaussianAux`.

  References:
    Thurstone, `A Law of Comparative Judgment
    <https://doi.org/10.1037/h0070288>`_, 1927.
    Liu et al., `PEARL: Zero-shot Cross-task Preference Alignment and Robust
    Reward Learning for Robotic Manipulation
    <https://arxiv.org/abs/2306.03615>`_, 2023.
  """
  if not kl_coefficient >= 0:
    raise ValueError(f"kl_coefficient must be >= 0, got {kl_coefficient}.")
  if not variance_floor > 0:
    raise ValueError(f"variance_floor must be > 0, got {variance_floor}.")
  mu_c, mu_r = _f32(chosen_rewards), _f32(rejected_rewards)
  lv_c, lv_r = _f32(chosen_log_vars), _f32(rejected_log_vars)
  delta = mu_c - mu_r
  z = delta * jax.lax.rsqrt(jnp.exp(lv_c) + jnp.exp(lv_r) + variance_floor)
  log_p = jsp_special.log_ndtr(z)
  loss = -log_p
  if kl_coefficient:
    loss = loss + kl_coefficient * (
      _gaussian_kl_to_standard(mu_c, lv_c)
      + _gaussian_kl_to_standard(mu_r, lv_r)
    )
  aux = GaussianAux(
    *(
      jax.lax.stop_gradient(x)
      for x in (delta, jnp.exp(log_p), jnp.exp(0.5 * lv_c), jnp.exp(0.5 * lv_r))
    )
  )
  return loss, aux


@typechecked
def gaussian_bt_sampled_loss(
  chosen_rewards: Float[In, "B"],
  rejected_rewards: Float[In, "B"],
  chosen_log_vars: Float[In, "B"],
  rejected_log_vars: Float[In, "B"],
  chosen_noise: Float[In, "N B"],
  rejected_noise: Float[In, "N B"],
  *,
  kl_coefficient: float = 0.0,
) -> tuple[Float[Out, "B"], GaussianAux]:
  r"""Monte-Carlo Bradley–Terry loss on reparameterised Gaussian rewards.

  Robust reward learning (RRL) of PEARL: rewards are Gaussian, samples
  ``\tilde r^n = μ + σ ε^n`` (``ε ~ N(0, 1)`` given as ``*_noise``) go
  through the BT likelihood, and a KL term keeps the distributions close to
  ``N(0, 1)``:

  .. math::
    \ell = \frac1N\sum_n -\log σ(\tilde r^n_c - \tilde r^n_r)
      + λ[\mathrm{KL}(N(μ_c,σ_c^2)\|N(0,1)) + \mathrm{KL}(N(μ_r,σ_r^2)\|N(0,1))]

  The noise is an input so the function stays pure and deterministic (draw
  it with ``jax.random.normal(key, (N, B))``); with zero noise it is BT on
  the means. PEARL sums per-step Gaussian rewards over a segment: pass the
  segment sums of the means and of the variances (as ``log``). The sampling
  form and the KL-to-standard-normal regulariser follow this library's
  reading of the paper (the exact weighting could not be checked against
  the authors' code).

  Args:
    chosen_rewards: reward means of the preferred responses.
    rejected_rewards: reward means of the dispreferred responses.
    chosen_log_vars: log-variances of the preferred responses.
    rejected_log_vars: log-variances of the dispreferred responses.
    chosen_noise: ``[N, B]`` standard-normal draws; no gradient.
    rejected_noise: ``[N, B]`` standard-normal draws; no gradient.
    kl_coefficient: ``λ >= 0``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss (mean over the ``N`` samples), not
    reduced over pairs, and :class:`GaussianAux` (its probability is the
    Monte-Carlo mean of ``σ(\tilde Δ)``).

  References:
    Liu et al., `PEARL: Zero-shot Cross-task Preference Alignment and Robust
    Reward Learning for Robotic Manipulation
    <https://arxiv.org/abs/2306.03615>`_, 2023.
  """
  if not kl_coefficient >= 0:
    raise ValueError(f"kl_coefficient must be >= 0, got {kl_coefficient}.")
  mu_c, mu_r = _f32(chosen_rewards), _f32(rejected_rewards)
  lv_c, lv_r = _f32(chosen_log_vars), _f32(rejected_log_vars)
  std_c, std_r = jnp.exp(0.5 * lv_c), jnp.exp(0.5 * lv_r)
  sample_c = mu_c[None] + std_c[None] * _sg32(chosen_noise)
  sample_r = mu_r[None] + std_r[None] * _sg32(rejected_noise)
  sample_delta = sample_c - sample_r
  loss = jnp.mean(jax.nn.softplus(-sample_delta), axis=0)
  if kl_coefficient:
    loss = loss + kl_coefficient * (
      _gaussian_kl_to_standard(mu_c, lv_c)
      + _gaussian_kl_to_standard(mu_r, lv_r)
    )
  probability = jnp.mean(jax.nn.sigmoid(sample_delta), axis=0)
  aux = GaussianAux(
    *(
      jax.lax.stop_gradient(x) for x in (mu_c - mu_r, probability, std_c, std_r)
    )
  )
  return loss, aux


@typechecked
def brme_loss(
  chosen_rewards: Float[In, "M B"],
  rejected_rewards: Float[In, "M B"],
  chosen_log_vars: Float[In, "M B"],
  rejected_log_vars: Float[In, "M B"],
  *,
  kl_coefficient: float = 0.0,
  variance_floor: float = 1e-6,
) -> tuple[Float[Out, "B"], GaussianAux]:
  r"""Bayesian Reward Model Ensemble (BRME) loss over ``M`` Gaussian heads.

  Each head ``m`` of a shared trunk predicts ``(μ_m, \log σ_m^2)`` and is
  trained with the Gaussian pairwise likelihood of :func:`gaussian_bt_loss`;
  the loss is the mean over heads:

  .. math::
    \ell = \frac1M \sum_m \ell_{gauss}(μ^m_c, μ^m_r, σ^m_c, σ^m_r)

  Reward-Robust RLHF trains BRME heads on reparameterised samples; the
  closed-form probit likelihood used here is its exact-gradient
  counterpart (a design choice of this library). At scoring time use
  :func:`brme_nominal_reward`.

  Args:
    chosen_rewards: ``[M, B]`` head means for the preferred responses.
    rejected_rewards: ``[M, B]`` head means for the dispreferred responses.
    chosen_log_vars: ``[M, B]`` head log-variances, preferred responses.
    rejected_log_vars: ``[M, B]`` head log-variances, dispreferred responses.
    kl_coefficient: ``λ >= 0`` (see :func:`gaussian_bt_loss`).
    variance_floor: ``δ > 0``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss (mean over heads), not reduced
    over pairs, and :class:`GaussianAux` averaged over heads.

  References:
    Yan et al., `Reward-Robust RLHF in LLMs
    <https://arxiv.org/abs/2409.15360>`_, 2024.
  """
  per_head = jax.vmap(
    lambda a, b, c, d: gaussian_bt_loss(
      a, b, c, d, kl_coefficient=kl_coefficient, variance_floor=variance_floor
    )
  )
  loss, aux = per_head(
    _f32(chosen_rewards),
    _f32(rejected_rewards),
    _f32(chosen_log_vars),
    _f32(rejected_log_vars),
  )
  return jnp.mean(loss, axis=0), GaussianAux(
    *(jnp.mean(x, axis=0) for x in aux)
  )


@typechecked
def brme_nominal_reward(
  rewards: Float[In, "M B"],
  log_vars: Float[In, "M B"],
) -> Float[Out, "B"]:
  r"""BRME nominal reward: the mean of the most confident head.

  .. math::
    r_{nom} = μ_{m^*}, \quad m^* = \arg\min_m σ_m

  Args:
    rewards: ``[M, B]`` head means.
    log_vars: ``[M, B]`` head log-variances.

  Returns:
    float32 ``[B]``; differentiable in ``rewards`` (the selection is not).

  References:
    Yan et al., `Reward-Robust RLHF in LLMs
    <https://arxiv.org/abs/2409.15360>`_, 2024.
  """
  best = jnp.argmin(_sg32(log_vars), axis=0)
  return jnp.take_along_axis(_f32(rewards), best[None], axis=0)[0]


# ---------------------------------------------------------------------------
# General Preference Model.
# ---------------------------------------------------------------------------


def _unit(v):
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True))
  return safe_divide(v, norm)


@typechecked
def gpm_preference_score(
  embeddings_a: Float[In, "B D"],
  embeddings_b: Float[In, "B D"],
  eigenvalues: Float[In, "B E"] | None = None,
  *,
  normalize: bool = True,
) -> Float[Out, "B"]:
  r"""Skew-symmetric General Preference Model score ``s(a ≻ b)``.

  .. math::
    s(a ≻ b) = \langle R^{≻} v_a, v_b\rangle
      = \sum_{l=1}^{k} λ_l\,(v_{a,2l-1} v_{b,2l} - v_{a,2l} v_{b,2l-1})

  with ``R^≻ = blockdiag(λ_1 J, …, λ_k J)``, ``J = [[0, -1], [1, 0]]``
  (Zhang et al. 2024). ``s(a ≻ b) = -s(b ≻ a)`` and ``s(a ≻ a) = 0``.

  Args:
    embeddings_a: ``[B, D]`` preference embeddings, ``D = 2k`` even.
    embeddings_b: ``[B, D]``.
    eigenvalues: optional ``[B, k]`` non-negative prompt-dependent block
      scales ``λ_l(x)`` (the paper's eigenvalue / prompt gate); default 1.
    normalize: project embeddings onto the unit sphere first (``‖v‖ = 1``).

  Returns:
    float32 ``[B]`` scores.

  References:
    Zhang et al., `Beyond Bradley-Terry Models: A General Preference Model
    for Language Model Alignment <https://arxiv.org/abs/2410.02197>`_, 2024.
  """
  dim = embeddings_a.shape[-1]
  if dim % 2:
    raise ValueError(
      f"GPM embeddings need an even width D = 2k, got D = {dim}."
    )
  if eigenvalues is not None and eigenvalues.shape[-1] != dim // 2:
    raise ValueError(
      f"eigenvalues must have D / 2 = {dim // 2} columns, got "
      f"{eigenvalues.shape[-1]}."
    )
  a, b = _f32(embeddings_a), _f32(embeddings_b)
  if normalize:
    a, b = _unit(a), _unit(b)
  a = a.reshape(a.shape[:-1] + (dim // 2, 2))
  b = b.reshape(b.shape[:-1] + (dim // 2, 2))
  blocks = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
  if eigenvalues is not None:
    blocks = blocks * _f32(eigenvalues)
  return jnp.sum(blocks, axis=-1)


@typechecked
def gpm_loss(
  chosen_embeddings: Float[In, "B D"],
  rejected_embeddings: Float[In, "B D"],
  eigenvalues: Float[In, "B E"] | None = None,
  margin: Float[In, "B"] | None = None,
  *,
  tau: float = 0.1,
  normalize: bool = True,
) -> tuple[Float[Out, "B"], GPMAux]:
  r"""General Preference Model loss on preference embeddings.

  .. math::
    \ell = -\log σ\big((s(y_c ≻ y_r) - m) / τ\big)

  with ``s`` from :func:`gpm_preference_score`. Unlike a scalar reward, the
  embedding score can represent intransitive (cyclic) preferences; with
  ``k = 1``, ``λ ≡ 1`` the score is the 2-D cross product of the unit
  embeddings.

  Args:
    chosen_embeddings: ``[B, 2k]`` embeddings of the preferred responses.
    rejected_embeddings: ``[B, 2k]`` embeddings of the dispreferred ones.
    eigenvalues: optional ``[B, k]`` non-negative block scales ``λ(x)``.
    margin: optional per-pair target margin ``m``; no gradient.
    tau: temperature ``τ > 0`` (the authors' default for unit embeddings is
      0.1).
    normalize: unit-normalise the embeddings (paper: ``‖v‖ = 1``).

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and :class:`GPMAux`.

  References:
    Zhang et al., `Beyond Bradley-Terry Models: A General Preference Model
    for Language Model Alignment <https://arxiv.org/abs/2410.02197>`_, 2024.
  """
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau}.")
  score = gpm_preference_score(
    chosen_embeddings, rejected_embeddings, eigenvalues, normalize=normalize
  )
  h = score if margin is None else score - _sg32(margin)
  log_p = jax.nn.log_sigmoid(h / tau)
  aux = GPMAux(
    *(
      jax.lax.stop_gradient(x)
      for x in (score, jnp.exp(log_p), _pair_accuracy(score))
    )
  )
  return -log_p, aux


# ---------------------------------------------------------------------------
# Multi-objective rewards.
# ---------------------------------------------------------------------------


def _unit_direction(direction, shape):
  v = _sg32(direction)
  if v.ndim not in (1, 2):
    raise ValueError(
      f"direction must be [K] or [B, K], got shape {tuple(v.shape)}."
    )
  return _unit(jnp.broadcast_to(v, shape))


@typechecked
def directional_scalarize(
  rewards: Float[In, "B K"],
  direction: Float[In, "*b K"],
) -> Float[Out, "B"]:
  r"""Projects multi-objective rewards on a unit preference direction.

  .. math::
    R_v = \frac{v^\top r}{\|v\|}

  DPA (Wang et al. 2024) encodes a user preference as a unit vector ``v``
  in reward space, e.g. ``v = (cos θ, sin θ)`` over (helpfulness,
  verbosity). A zero direction gives 0.

  Args:
    rewards: ``[B, K]`` per-objective scores.
    direction: ``[K]`` (shared) or ``[B, K]`` (per example) direction; it is
      normalised here and receives no gradient.

  Returns:
    float32 ``[B]``.

  References:
    Wang et al., `Arithmetic Control of LLMs for Diverse User Preferences:
    Directional Preference Alignment with Multi-Objective Rewards
    <https://arxiv.org/abs/2402.18571>`_, 2024.
  """
  values = _f32(rewards)
  return jnp.sum(values * _unit_direction(direction, values.shape), axis=-1)


@typechecked
def multi_objective_loss(
  chosen_rewards: Float[In, "B K"],
  rejected_rewards: Float[In, "B K"],
  direction: Float[In, "*b K"],
  *,
  label_smoothing: float = 0.0,
) -> tuple[Float[Out, "B"], PairwiseAux]:
  r"""Bradley–Terry loss on directionally scalarised multi-objective rewards.

  .. math::
    Δ = v^\top(r_c - r_r) / \|v\|, \quad
    \ell = -(1-ε)\log σ(Δ) - ε\log σ(-Δ)

  Trains a ``K``-head reward model from preferences expressed under a
  user direction ``v`` (DPA's preference-conditioned reward, Wang et al.
  2024). ``v = e_i`` trains objective ``i`` alone; ``K = 1`` is BT.

  Args:
    chosen_rewards: ``[B, K]`` per-objective scores, preferred responses.
    rejected_rewards: ``[B, K]`` per-objective scores, dispreferred ones.
    direction: ``[K]`` or ``[B, K]`` preference direction (normalised here,
      no gradient).
    label_smoothing: ``ε`` in ``[0, 1]``.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and
    :class:`PairwiseAux`.

  References:
    Wang et al., `Arithmetic Control of LLMs for Diverse User Preferences:
    Directional Preference Alignment with Multi-Objective Rewards
    <https://arxiv.org/abs/2402.18571>`_, 2024.
  """
  _check_range("label_smoothing", label_smoothing, 0.0, 1.0)
  diff = _f32(chosen_rewards) - _f32(rejected_rewards)
  delta = jnp.sum(diff * _unit_direction(direction, diff.shape), axis=-1)
  loss = _smoothed_logistic(delta, label_smoothing)
  return loss, _pairwise_aux(delta, jax.nn.log_sigmoid(delta))


@typechecked
def multi_objective_regression_loss(
  rewards: Float[In, "B K"],
  targets: Float[In, "B K"],
  target_mask: Bool[In, "B K"] | None = None,
) -> tuple[Float[Out, "B"], AttributeAux]:
  r"""Per-example squared error of a multi-objective (regression) reward head.

  .. math::
    \ell_b = \frac{\sum_k m_{bk}(r_{bk} - t_{bk})^2}{\sum_k m_{bk}}

  The regression objective that trains DPA's (and SteerLM's / ArmoRM's)
  multi-attribute reward model on ratings such as HelpSteer's helpfulness,
  correctness, coherence, complexity and verbosity.

  Args:
    rewards: ``[B, K]`` predicted attribute scores.
    targets: ``[B, K]`` rated attributes; no gradient.
    target_mask: optional bool ``[B, K]``; False marks a missing rating
      (its target may be NaN). Rows with no rating give 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss (mean over rated attributes), not
    reduced, and :class:`AttributeAux`.

  References:
    Wang et al., `Arithmetic Control of LLMs for Diverse User Preferences:
    Directional Preference Alignment with Multi-Objective Rewards
    <https://arxiv.org/abs/2402.18571>`_, 2024.
  """
  values = _f32(rewards)
  if target_mask is None:
    target_mask = jnp.ones(values.shape, bool)
  goal = jnp.where(target_mask, _sg32(targets), 0.0)
  error = jnp.where(target_mask, values - goal, 0.0)
  count = jnp.sum(target_mask, axis=-1, dtype=jnp.float32)
  loss = safe_divide(jnp.sum(jnp.square(error), axis=-1), count)
  return loss, AttributeAux(jax.lax.stop_gradient(error))


# ---------------------------------------------------------------------------
# Process reward models (step level).
# ---------------------------------------------------------------------------


def _step_bce(step_logits, targets, mask):
  logits = jnp.where(mask, _f32(step_logits), 0.0)
  targets = jnp.where(mask, targets, 0.0)
  per_step = targets * jax.nn.softplus(-logits) + (
    1.0 - targets
  ) * jax.nn.softplus(logits)
  loss = jnp.where(mask, per_step, 0.0)
  aux = StepAux(
    jax.lax.stop_gradient(jnp.where(mask, jax.nn.sigmoid(logits), 0.0)),
    jax.lax.stop_gradient(targets),
    jnp.asarray(mask),
  )
  return loss, aux


@typechecked
def prm_hard_loss(
  step_logits: Float[In, "B S"],
  step_labels: Bool[In, "B S"],
  step_mask: Bool[In, "B S"],
) -> tuple[Float[Out, "B S"], StepAux]:
  r"""Process-reward-model loss with hard step labels (per-step BCE).

  .. math::
    \ell_{bj} = -[y_{bj}\log σ(x_{bj}) + (1 - y_{bj})\log σ(-x_{bj})]

  where ``x`` is the PRM logit read at the end of step ``j`` and ``y`` the
  step's correctness label (human, as in PRM800K, or Math-Shepherd's hard
  Monte-Carlo label "some rollout from this step succeeds").

  Args:
    step_logits: ``[B, S]`` correctness logits, one per step.
    step_labels: bool ``[B, S]``; True = the step is correct.
    step_mask: bool ``[B, S]``; False marks padding steps (their logits may
      be NaN).

  Returns:
    ``(loss, aux)``: float32 ``[B, S]`` loss, 0 outside ``step_mask``, not
    reduced (``ops.aggregate_token_loss(loss, aux.step_mask)``), and
    :class:`StepAux`.

  References:
    Lightman et al., `Let's Verify Step by Step
    <https://arxiv.org/abs/2305.20050>`_, 2023.
    Wang et al., `Math-Shepherd: Verify and Reinforce LLMs Step-by-step
    without Human Annotations <https://arxiv.org/abs/2312.08935>`_, 2023.
  """
  return _step_bce(
    step_logits, jnp.asarray(step_labels, jnp.float32), jnp.asarray(step_mask)
  )


@typechecked
def prm_soft_loss(
  step_logits: Float[In, "B S"],
  step_targets: Float[In, "B S"],
  step_mask: Bool[In, "B S"],
) -> tuple[Float[Out, "B S"], StepAux]:
  r"""Process-reward-model loss with soft (Monte-Carlo) step targets.

  .. math::
    \ell_{bj} = -[c_{bj}\log σ(x_{bj}) + (1 - c_{bj})\log σ(-x_{bj})]

  where ``c ∈ [0, 1]`` is the Monte-Carlo success rate of rollouts that
  continue from step ``j`` (Math-Shepherd's soft estimate). Targets in
  ``{0, 1}`` reduce to :func:`prm_hard_loss`.

  Args:
    step_logits: ``[B, S]`` correctness logits.
    step_targets: ``[B, S]`` soft targets in ``[0, 1]``; no gradient.
    step_mask: bool ``[B, S]``; False marks padding steps.

  Returns:
    ``(loss, aux)``: float32 ``[B, S]`` loss, 0 outside ``step_mask``, and
    :class:`StepAux`.

  References:
    Wang et al., `Math-Shepherd: Verify and Reinforce LLMs Step-by-step
    without Human Annotations <https://arxiv.org/abs/2312.08935>`_, 2023.
  """
  return _step_bce(step_logits, _sg32(step_targets), jnp.asarray(step_mask))


@typechecked
def scan_step_targets(
  step_mc_scores: Float[In, "B S"],
  self_confidence: Float[In, "B"],
  outcome_correct: Bool[In, "B"],
  step_mask: Bool[In, "B S"],
  *,
  tolerance: int = 2,
  min_self_confidence: float = 0.75,
) -> tuple[Float[Out, "B S"], Bool[Out, "B S"]]:
  r"""SCAN's noise-tolerant step targets from Monte-Carlo annotations.

  For a question with self-confidence ``SC`` (the completer's accuracy on
  it) and a solution with per-step Monte-Carlo scores ``c_j``:

  * ``SC < min_self_confidence``: the sample is dropped (self-denoising;
    low-confidence annotators produce mostly noise);
  * correct final answer: every step has target 1;
  * incorrect final answer: ``t`` = the first step with ``c_t = 0`` (the
    annotated error); steps before ``t`` get 1, step ``t`` gets 0, steps
    after ``t`` are dropped; the ``tolerance`` steps just before ``t`` get
    the soft target ``min(1, c_j / SC)`` (confidence-wise reweighting of
    the MC score, since annotators tend to place the error too late);
    solutions with no zero-score step are dropped.

  This transcribes the data construction of the authors' release
  (``dataset/SCAN-*/process.py``: threshold 0.75, two tolerance steps).

  Args:
    step_mc_scores: ``[B, S]`` Monte-Carlo success rates ``c_j ∈ [0, 1]``.
    self_confidence: ``[B]`` completer accuracy ``SC`` on the question.
    outcome_correct: bool ``[B]``; True if the final answer is correct.
    step_mask: bool ``[B, S]``; False marks padding steps.
    tolerance: number ``d >= 0`` of soft-labelled steps before the error.
    min_self_confidence: samples with ``SC`` below this are dropped; in
      ``[0, 1]``.

  Returns:
    ``(targets, mask)``: float32 ``[B, S]`` targets (0 where unused) and the
    bool mask of steps that are trained on. No gradient.

  References:
    Ding et al., `SCAN: Self-Denoising Monte Carlo Annotation for Robust
    Process Reward Learning <https://arxiv.org/abs/2509.16548>`_, 2025.
  """
  if tolerance < 0:
    raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
  _check_range("min_self_confidence", min_self_confidence, 0.0, 1.0)
  mask = jnp.asarray(step_mask)
  scores = jnp.where(mask, _sg32(step_mc_scores), 1.0)
  confidence = _sg32(self_confidence)
  steps = jnp.arange(scores.shape[1])[None, :]
  is_error = mask & (scores <= 0.0)
  has_error = jnp.any(is_error, axis=1)
  first_error = jnp.argmax(is_error, axis=1)[:, None]
  safe_conf = jnp.where(confidence > 0, confidence, 1.0)[:, None]
  soft = jnp.minimum(
    1.0, jnp.where(confidence[:, None] > 0, scores / safe_conf, 1.0)
  )
  in_window = (steps < first_error) & (steps >= first_error - tolerance)
  wrong_targets = jnp.where(
    steps < first_error, jnp.where(in_window, soft, 1.0), 0.0
  )
  wrong_mask = mask & (steps <= first_error) & has_error[:, None]
  correct = jnp.asarray(outcome_correct)[:, None]
  keep = (confidence >= min_self_confidence)[:, None]
  used = keep & jnp.where(correct, mask, wrong_mask)
  targets = jnp.where(used, jnp.where(correct, 1.0, wrong_targets), 0.0)
  return targets, used


@typechecked
def prm_scan_loss(
  step_logits: Float[In, "B S"],
  step_mc_scores: Float[In, "B S"],
  self_confidence: Float[In, "B"],
  outcome_correct: Bool[In, "B"],
  step_mask: Bool[In, "B S"],
  *,
  tolerance: int = 2,
  min_self_confidence: float = 0.75,
) -> tuple[Float[Out, "B S"], StepAux]:
  r"""SCAN's robust process-reward loss: BCE on noise-tolerant targets.

  .. math::
    \ell_{bj} = -[\hat y_{bj}\log σ(x_{bj}) + (1-\hat y_{bj})\log σ(-x_{bj})]

  on the steps selected by :func:`scan_step_targets`, whose targets
  ``\hat y`` combine the tolerance window and the self-confidence
  reweighting. Reduce over ``aux.step_mask`` with a token mean, as the
  authors' trainer averages BCE over all labelled steps of the batch.

  Args:
    step_logits: ``[B, S]`` PRM correctness logits.
    step_mc_scores: ``[B, S]`` Monte-Carlo success rates; no gradient.
    self_confidence: ``[B]`` completer accuracy on the question; no
      gradient.
    outcome_correct: bool ``[B]``; True if the final answer is correct.
    step_mask: bool ``[B, S]``; False marks padding steps.
    tolerance: soft-labelled steps before the annotated error, ``>= 0``.
    min_self_confidence: confidence threshold in ``[0, 1]``.

  Returns:
    ``(loss, aux)``: float32 ``[B, S]`` loss, 0 outside ``aux.step_mask``,
    and :class:`StepAux` (``step_mask`` = the steps actually trained on).

  References:
    Ding et al., `SCAN: Self-Denoising Monte Carlo Annotation for Robust
    Process Reward Learning <https://arxiv.org/abs/2509.16548>`_, 2025.
  """
  targets, used = scan_step_targets(
    step_mc_scores,
    self_confidence,
    outcome_correct,
    step_mask,
    tolerance=tolerance,
    min_self_confidence=min_self_confidence,
  )
  return _step_bce(step_logits, targets, used)


REGISTRY = {
  "bradley_terry": bradley_terry_loss,
  "bt_adaptive_margin": bt_adaptive_margin_loss,
  "plackett_luce": plackett_luce_loss,
  "bt_ties_rao_kupper": rao_kupper_loss,
  "bt_ties_davidson": davidson_loss,
  "scaled_bt": scaled_bt_loss,
  "bt_regression": bt_regression_loss,
  "gaussian_bt": gaussian_bt_loss,
  "gaussian_bt_sampled": gaussian_bt_sampled_loss,
  "brme": brme_loss,
  "gpm": gpm_loss,
  "multi_objective": multi_objective_loss,
  "multi_objective_regression": multi_objective_regression_loss,
  "prm_hard": prm_hard_loss,
  "prm_soft": prm_soft_loss,
  "prm_scan": prm_scan_loss,
}
