"""KL control and off-policy corrections between sampler and trainer.

Three families of pure functions:

* **KL regularisation** towards the reference policy, either folded into the
  per-token rewards (Ziegler et al. 2019, Stiennon et al. 2020) or added to
  the loss per token (GRPO), with the estimators of :mod:`alignment.ops`
  (k1, k2, k3, ...), plus the adaptive KL coefficient of Ziegler et al. as a
  pure state-update function.
* **Sampler/trainer mismatch corrections.** Rollouts come from an inference
  engine whose log-probs (``sampler_token_logps``) differ from the trainer's
  recomputed ones (``old_token_logps``). Truncated (TIS), masked (MIS) and
  IcePop importance weights correct for it, at token, sequence or geometric
  level, and DeepSeek-V3.2's off-policy sequence masking drops
  negative-advantage sequences that drifted too far.
* **SAFE's** entropy-gated KL penalty and its PID-controlled KL threshold.

Every importance weight and mask is returned with no gradient: the trainer
multiplies its per-token loss by the weights (or applies the mask) before
aggregating with :func:`alignment.ops.aggregate_token_loss`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Real

from alignment.array_types import In, Out, typechecked
from alignment.losses._checks import f32 as _f32
from alignment.ops import KL_ESTIMATORS, kl_estimate, safe_divide

__all__ = [
  "IS_LEVELS",
  "AdaptiveKLState",
  "ImportanceWeightAux",
  "KLPenaltyAux",
  "KLRewardAux",
  "OffPolicyMaskAux",
  "SafeControllerState",
  "SafePenaltyAux",
  "adaptive_kl_init",
  "adaptive_kl_update",
  "icepop_weights",
  "kl_penalized_rewards",
  "kl_penalty_loss",
  "masked_importance_weights",
  "off_policy_sequence_mask",
  "safe_controller_init",
  "safe_controller_update",
  "safe_kl_penalty",
  "truncated_importance_weights",
]

IS_LEVELS = ("token", "sequence", "geometric")
"""Levels at which importance ratios are formed (see
:func:`truncated_importance_weights`)."""


def _check_estimator(fn_name, estimator):
  if estimator not in KL_ESTIMATORS:
    raise ValueError(
      f"{fn_name}: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}."
    )


def _masked_kl(token_logps, ref_token_logps, mask, estimator):
  logps = jnp.where(mask, _f32(token_logps), 0.0)
  ref = jnp.where(mask, _f32(ref_token_logps), 0.0)
  kl = kl_estimate(logps, ref, estimator=estimator)
  return jnp.where(mask, kl, 0.0)


# --------------------------------------------------------------------------
# KL in the loss and KL in the reward.
# --------------------------------------------------------------------------


class KLPenaltyAux(NamedTuple):
  """Per-token diagnostics of :func:`kl_penalty_loss`."""

  kl: Float[Out, "B T"]
  """The KL estimate per token (no gradient), 0 on padding."""


@typechecked
def kl_penalty_loss(
  token_logps: Float[In, "B T"],
  ref_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  beta: float = 0.04,
  estimator: str = "k3",
) -> tuple[Float[Out, "B T"], KLPenaltyAux]:
  r"""Per-token KL penalty ``β·KL_t`` to add to a policy-gradient loss.

  The "KL in the loss" form of GRPO (Shao et al. 2024, Eq. 3-4), where the
  default k3 estimator is Eq. 4:

  .. math::
    \ell_t = \beta\,\hat D_t, \qquad
    \hat D^{k3}_t = \frac{\pi_{ref}(o_t)}{\pi_\theta(o_t)}
      - \log\frac{\pi_{ref}(o_t)}{\pi_\theta(o_t)} - 1 .

  The result is unreduced: add it to the per-token policy loss and reduce
  both together with :func:`alignment.ops.aggregate_token_loss`.

  Args:
    token_logps: log-probs of the sampled tokens under the current policy;
      gradients flow through it.
    ref_token_logps: log-probs under the frozen reference; receives no
      gradient.
    completion_mask: bool, True on completion tokens; padded positions (even
      NaN) affect neither value nor gradient.
    beta: KL coefficient β (DeepSeekMath's GRPO uses 0.04); must be >= 0.
    estimator: one of :data:`alignment.KL_ESTIMATORS`.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]`` per-token penalty, 0 on padding, not
    reduced, and :class:`KLPenaltyAux`.

  References:
    Shao et al., `DeepSeekMath: Pushing the Limits of Mathematical Reasoning
    in Open Language Models <https://arxiv.org/abs/2402.03300>`_, 2024.
    Schulman, `Approximating KL Divergence
    <http://joschu.net/blog/kl-approx.html>`_, 2020.
  """
  if beta < 0:
    raise ValueError(f"kl_penalty_loss: beta must be >= 0, got {beta}.")
  _check_estimator("kl_penalty_loss", estimator)
  kl = _masked_kl(token_logps, ref_token_logps, completion_mask, estimator)
  loss = jnp.where(completion_mask, beta * kl, 0.0)
  return loss, KLPenaltyAux(jax.lax.stop_gradient(kl))


class KLRewardAux(NamedTuple):
  """Per-token diagnostics of :func:`kl_penalized_rewards`."""

  kl: Float[Out, "B T"]
  """KL estimate per token, 0 on padding."""
  score: Float[Out, "B T"]
  """The task/reward-model reward alone, as placed on the tokens."""


def _last_token_one_hot(mask):
  length = mask.shape[-1]
  positions = jnp.arange(length)[None, :]
  last = jnp.max(jnp.where(mask, positions, -1), axis=-1, keepdims=True)
  return positions == last  # all False for an empty row (last == -1)


@typechecked
def kl_penalized_rewards(
  rewards: Float[In, "B"] | Float[In, "B T"],
  token_logps: Float[In, "B T"],
  ref_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  beta: float = 0.05,
  estimator: str = "k1",
) -> tuple[Float[Out, "B T"], KLRewardAux]:
  r"""Per-token rewards with the KL penalty folded in ("KL in the reward").

  Ziegler et al. (2019, Eq. 2) and Stiennon et al. (2020, Eq. 1) optimise
  ``R(x, y) = r(x, y) - β log(π(y|x)/π_ref(y|x))``; spread over tokens, as
  PPO implementations do,

  .. math::
    r_t = -\beta\,\hat D_t + \mathbb{1}[t = t_{last}]\; r(x, y)

  for a sequence reward ``r`` of shape ``[B]`` (placed on the last
  completion token), or ``r_t = -β·D̂_t + r_t`` for token-level rewards
  ``[B, T]``. With the default k1 estimator ``Σ_t D̂_t`` is exactly the
  sequence log-ratio of the papers.

  Rewards are targets, so the output carries no gradient at all.

  Args:
    rewards: sequence rewards ``[B]`` or token-level rewards ``[B, T]``
      (padded entries ignored).
    token_logps: log-probs of the sampled tokens under the policy that
      generated them (no gradient).
    ref_token_logps: log-probs under the reference (no gradient).
    completion_mask: bool ``[B, T]``; rows may be right- or left-padded.
    beta: KL coefficient β (Stiennon et al. use 0.05; see
      :func:`adaptive_kl_update` for Ziegler's adaptive β); must be >= 0.
    estimator: one of :data:`alignment.KL_ESTIMATORS`.

  Returns:
    ``(token_rewards, aux)``: float32 ``[B, T]``, 0 on padding, and
    :class:`KLRewardAux`.

  References:
    Ziegler et al., `Fine-Tuning Language Models from Human Preferences
    <https://arxiv.org/abs/1909.08593>`_, 2019.
    Stiennon et al., `Learning to summarize from human feedback
    <https://arxiv.org/abs/2009.01325>`_, 2020.
  """
  if beta < 0:
    raise ValueError(f"kl_penalized_rewards: beta must be >= 0, got {beta}.")
  _check_estimator("kl_penalized_rewards", estimator)
  mask = jnp.asarray(completion_mask)
  kl = _masked_kl(token_logps, ref_token_logps, mask, estimator)
  rewards = _f32(rewards)
  if rewards.ndim == 1:
    last = _last_token_one_hot(mask)
    score = jnp.where(last, rewards[:, None], 0.0)
  else:
    score = jnp.where(mask, rewards, 0.0)
  token_rewards = jnp.where(mask, score - beta * kl, 0.0)
  out = jax.lax.stop_gradient((token_rewards, kl, score))
  return out[0], KLRewardAux(out[1], out[2])


# --------------------------------------------------------------------------
# Adaptive KL coefficient (Ziegler et al. 2019, Sec. 2.2).
# --------------------------------------------------------------------------


class AdaptiveKLState(NamedTuple):
  """State of the adaptive KL controller: the current coefficient β."""

  beta: Float[Out, ""]


@typechecked
def adaptive_kl_init(*, beta: float = 0.2) -> AdaptiveKLState:
  """Initial state of the adaptive KL controller.

  Args:
    beta: initial coefficient β_0 (TRL's default 0.2); must be > 0.

  Returns:
    :class:`AdaptiveKLState` holding a float32 scalar.
  """
  if beta <= 0:
    raise ValueError(f"adaptive_kl_init: beta must be > 0, got {beta}.")
  return AdaptiveKLState(jnp.asarray(beta, jnp.float32))


@typechecked
def adaptive_kl_update(
  state: AdaptiveKLState,
  observed_kl: float | Real[In, ""],
  n_steps: int | Real[In, ""],
  *,
  target: float = 6.0,
  horizon: float = 10000.0,
  clip: float = 0.2,
) -> AdaptiveKLState:
  r"""One step of the proportional KL controller of Ziegler et al. (2019).

  .. math::
    e_t = \mathrm{clip}\Big(\frac{KL_t - KL_{target}}{KL_{target}},
          -c, c\Big), \qquad
    \beta_{t+1} = \beta_t\,\big(1 + e_t\, n / H\big)

  with ``n`` the number of samples (or steps) the KL was measured over and
  ``H`` the horizon (the paper writes ``K_β = n/H = 0.1``). A pure function,
  so it can live in the jitted train step and be checkpointed with the
  train state.

  Args:
    state: current :class:`AdaptiveKLState`.
    observed_kl: measured KL(π || π_ref) of the last batch, in nats per
      sequence (no gradient).
    n_steps: number of samples or steps since the last update.
    target: KL_target (6 nats in the paper's stylistic tasks); > 0.
    horizon: H; > 0.
    clip: c, the bound on the proportional error; > 0.

  Returns:
    The new :class:`AdaptiveKLState` (float32 scalar β).

  References:
    Ziegler et al., `Fine-Tuning Language Models from Human Preferences
    <https://arxiv.org/abs/1909.08593>`_, 2019, Sec. 2.2.
  """
  for name, value in (("target", target), ("horizon", horizon), ("clip", clip)):
    if value <= 0:
      raise ValueError(f"adaptive_kl_update: {name} must be > 0, got {value}.")
  kl = jax.lax.stop_gradient(_f32(observed_kl))
  error = jnp.clip(kl / target - 1.0, -clip, clip)
  multiplier = 1.0 + error * _f32(n_steps) / horizon
  return AdaptiveKLState(_f32(state.beta) * multiplier)


# --------------------------------------------------------------------------
# Sampler/trainer importance-sampling corrections.
# --------------------------------------------------------------------------


class ImportanceWeightAux(NamedTuple):
  """Diagnostics of the importance-weight functions (all ``[B, T]``)."""

  log_ratio: Float[Out, "B T"]
  """``log ρ`` at the chosen level (token, or per-sequence broadcast over its
  tokens), ``ρ = π_old / π_sampler``; 0 on padding."""
  corrected: Bool[Out, "B T"]
  """True where the weight differs from the raw ratio (truncated or
  masked); False on padding."""


def _level_log_ratio(
  fn_name, old_token_logps, sampler_token_logps, mask, level
):
  if level not in IS_LEVELS:
    raise ValueError(
      f"{fn_name}: level must be one of {IS_LEVELS}, got {level!r}."
    )
  old = jnp.where(mask, _f32(old_token_logps), 0.0)
  sampler = jnp.where(mask, _f32(sampler_token_logps), 0.0)
  log_ratio = jax.lax.stop_gradient(old - sampler)
  if level == "token":
    return log_ratio
  total = jnp.sum(log_ratio, axis=-1, keepdims=True)
  if level == "geometric":
    count = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
    total = safe_divide(total, count)
  return jnp.where(mask, total, 0.0)


@typechecked
def truncated_importance_weights(
  old_token_logps: Float[In, "B T"],
  sampler_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  level: str = "token",
  cap: float = 2.0,
) -> tuple[Float[Out, "B T"], ImportanceWeightAux]:
  r"""Truncated importance sampling (TIS) weights ``min(ρ, C)``.

  Corrects for the sampler/trainer mismatch by weighting each token's
  policy-gradient term with

  .. math::
    w = \min(\rho, C), \quad
    \rho_t = \frac{\pi_{old}(y_t)}{\pi_{sampler}(y_t)} \ (\text{token}), \
    \rho = \prod_t \rho_t \ (\text{sequence}), \
    \rho = \big(\prod_t \rho_t\big)^{1/|y|} \ (\text{geometric}).

  Sequence and geometric weights are broadcast over the sequence's tokens.
  Ratios are formed in log space, so a long sequence cannot overflow.

  Args:
    old_token_logps: log-probs of the sampled tokens recomputed by the
      trainer before the update (π_old); no gradient.
    sampler_token_logps: log-probs reported by the inference engine that
      sampled the tokens; no gradient.
    completion_mask: bool ``[B, T]``; padding (even NaN) is ignored.
    level: one of :data:`IS_LEVELS`.
    cap: truncation constant C (Yao et al. use 2); must be > 0.

  Returns:
    ``(weights, aux)``: float32 ``[B, T]`` weights, 0 on padding, no
    gradient; multiply the per-token policy loss by them.

  References:
    Yao et al., `Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training <https://fengyao.notion.site/off-policy-rl>`_, 2025.
  """
  if cap <= 0:
    raise ValueError(
      f"truncated_importance_weights: cap must be > 0, got {cap}."
    )
  mask = jnp.asarray(completion_mask)
  log_ratio = _level_log_ratio(
    "truncated_importance_weights",
    old_token_logps,
    sampler_token_logps,
    mask,
    level,
  )
  log_cap = jnp.log(jnp.float32(cap))
  weights = jnp.where(mask, jnp.exp(jnp.minimum(log_ratio, log_cap)), 0.0)
  corrected = mask & (log_ratio > log_cap)
  return weights, ImportanceWeightAux(log_ratio, corrected)


@typechecked
def masked_importance_weights(
  old_token_logps: Float[In, "B T"],
  sampler_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  level: str = "sequence",
  low: float = 0.0,
  high: float = 2.0,
) -> tuple[Float[Out, "B T"], ImportanceWeightAux]:
  r"""Masked importance sampling (MIS): ``ρ`` inside ``[low, high]``, else 0.

  .. math::
    w = \rho\;\mathbb{1}[\rho_{low} \le \rho \le \rho_{high}]

  with ``ρ`` formed at token, sequence or geometric level as in
  :func:`truncated_importance_weights`. Liu et al. argue for the sequence
  level (Seq-MIS, ``low = 0``, ``high = C = 2``); token level with
  ``[0.5, 5]`` is IcePop (:func:`icepop_weights`). Rejected tokens get
  weight 0; whether they still count in the loss denominator is decided by
  the trainer's aggregation mask (``aux.corrected`` marks them).

  Args:
    old_token_logps: trainer log-probs π_old; no gradient.
    sampler_token_logps: inference-engine log-probs; no gradient.
    completion_mask: bool ``[B, T]``; padding (even NaN) is ignored.
    level: one of :data:`IS_LEVELS`.
    low: lower bound of the accepted band, >= 0 (0: no lower bound).
    high: upper bound, > ``low``.

  Returns:
    ``(weights, aux)``: float32 ``[B, T]`` weights, 0 on padding and outside
    the band, no gradient.

  References:
    Liu, Li et al., `When Speed Kills Stability: Demystifying RL Collapse
    from the Training-Inference Mismatch
    <https://richardli.xyz/rl-collapse>`_, 2025.
  """
  if low < 0:
    raise ValueError(f"masked_importance_weights: low must be >= 0, got {low}.")
  if high <= low:
    raise ValueError(
      f"masked_importance_weights: high must be > low, got high={high}, "
      f"low={low}."
    )
  mask = jnp.asarray(completion_mask)
  log_ratio = _level_log_ratio(
    "masked_importance_weights",
    old_token_logps,
    sampler_token_logps,
    mask,
    level,
  )
  log_high = jnp.log(jnp.float32(high))
  inside = log_ratio <= log_high
  if low > 0:
    inside = inside & (log_ratio >= jnp.log(jnp.float32(low)))
  keep = mask & inside
  weights = jnp.where(keep, jnp.exp(jnp.where(keep, log_ratio, 0.0)), 0.0)
  return weights, ImportanceWeightAux(log_ratio, mask & ~inside)


@typechecked
def icepop_weights(
  old_token_logps: Float[In, "B T"],
  sampler_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  low: float = 0.5,
  high: float = 5.0,
) -> tuple[Float[Out, "B T"], ImportanceWeightAux]:
  r"""IcePop token weights: ``M(k) = k`` if ``k ∈ [α, β]`` else 0.

  Ring-1T's IcePop (the "Every Step Evolves" report, Sec. on IcePop)
  multiplies each token's clipped surrogate by

  .. math::
    \mathcal M\Big(\frac{\pi_{train}(y_t;\theta_{old})}
                       {\pi_{infer}(y_t;\theta_{old})}; \alpha, \beta\Big),
    \quad \mathcal M(k) = k\,\mathbb{1}[\alpha \le k \le \beta],

  i.e. token-level :func:`masked_importance_weights` with the paper's
  ``α = 0.5``, ``β = 5``.

  Args:
    old_token_logps: trainer log-probs π_train(θ_old); no gradient.
    sampler_token_logps: inference-engine log-probs π_infer(θ_old).
    completion_mask: bool ``[B, T]``.
    low: α, >= 0.
    high: β, > α.

  Returns:
    ``(weights, aux)`` as :func:`masked_importance_weights`.

  References:
    Ling Team, `Every Step Evolves: Scaling Reinforcement Learning for
    Trillion-Scale Thinking Model <https://arxiv.org/abs/2510.18855>`_,
    2025; blog `IcePop <https://ringtech.notion.site/icepop>`_.
  """
  return masked_importance_weights(
    old_token_logps,
    sampler_token_logps,
    completion_mask,
    level="token",
    low=low,
    high=high,
  )


class OffPolicyMaskAux(NamedTuple):
  """Diagnostics of :func:`off_policy_sequence_mask`."""

  sequence_kl: Float[Out, "B"]
  """Per-sequence mean of ``log π_sampler - log π_θ`` (0 if empty)."""


@typechecked
def off_policy_sequence_mask(
  token_logps: Float[In, "B T"],
  sampler_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"],
  completion_mask: Bool[In, "B T"],
  *,
  threshold: float = 0.5,
) -> tuple[Bool[Out, "B"], OffPolicyMaskAux]:
  r"""DeepSeek-V3.2 off-policy sequence masking (keep mask per sequence).

  .. math::
    M_i = 0 \ \text{if}\ \hat A_i < 0 \ \text{and}\
      \frac{1}{|o_i|}\sum_t \log\frac{\pi_{old}(o_{i,t})}{\pi_\theta(o_{i,t})}
      > \delta, \quad 1 \ \text{otherwise},

  where π_old is the sampling (inference) policy. Sequences that did well
  are always kept; sequences with negative advantage are dropped once the
  sampler has drifted more than δ nats per token from the current policy.
  The report gives no δ; 0.5 follows TRL's suggestion.

  Args:
    token_logps: log-probs under the current policy π_θ (used without
      gradient).
    sampler_token_logps: log-probs from the inference engine.
    advantages: per-sequence advantages (no gradient).
    completion_mask: bool ``[B, T]``; padding (even NaN) is ignored.
    threshold: δ, in nats per token; must be >= 0.

  Returns:
    ``(keep, aux)``: bool ``[B]`` (True keeps the sequence) and
    :class:`OffPolicyMaskAux`.

  References:
    DeepSeek-AI, `DeepSeek-V3.2: Pushing the Frontier of Open Large
    Language Models <https://arxiv.org/abs/2512.02556>`_, 2025.
  """
  if threshold < 0:
    raise ValueError(
      f"off_policy_sequence_mask: threshold must be >= 0, got {threshold}."
    )
  mask = jnp.asarray(completion_mask)
  policy = jnp.where(mask, _f32(token_logps), 0.0)
  sampler = jnp.where(mask, _f32(sampler_token_logps), 0.0)
  diff = jax.lax.stop_gradient(sampler - policy)
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  sequence_kl = safe_divide(jnp.sum(diff, axis=-1), count)
  advantages = jax.lax.stop_gradient(_f32(advantages))
  keep = (advantages >= 0) | (sequence_kl <= threshold)
  return keep, OffPolicyMaskAux(sequence_kl)


# --------------------------------------------------------------------------
# SAFE: entropy-gated KL penalty and PID-controlled threshold.
# --------------------------------------------------------------------------


class SafePenaltyAux(NamedTuple):
  """Diagnostics of :func:`safe_kl_penalty` (same shape as the KL)."""

  gate: Float[Out, "*B"]
  """Entropy gate ``g = max(g_min, H_floor / (H + 0.1))``."""
  active: Bool[Out, "*B"]
  """True where the KL exceeds the threshold."""


@typechecked
def safe_kl_penalty(
  kl: Float[In, "*B"],
  entropy: Float[In, "*B"],
  threshold: float | Float[In, ""],
  *,
  coefficient: float = 0.1,
  entropy_floor: float = 2.0,
  min_gate: float = 0.5,
  entropy_offset: float = 0.1,
) -> tuple[Float[Out, "*B"], SafePenaltyAux]:
  r"""SAFE's entropy-gated, thresholded KL penalty.

  .. math::
    L_{EPC} = g\; c\,\big[\max(0, KL - \tau)\big]^2, \qquad
    g = \max\Big(g_{min}, \frac{H_{floor}}{H + 0.1}\Big),

  so the penalty is zero below the threshold τ and is amplified when the
  policy entropy H is low (mode collapse) rather than high (exploration).
  The gate and the threshold carry no gradient; the penalty is
  differentiable in ``kl``. The reference code evaluates it on the EMA
  ``kl_short`` of :func:`safe_controller_update` (as a Python float, so its
  penalty has no gradient there); pass the batch KL to regularise.

  Args:
    kl: KL estimate(s), e.g. the batch-mean KL to the reference.
    entropy: policy entropy in nats, same shape as ``kl`` (no gradient).
    threshold: τ, e.g. from :func:`safe_controller_update` (no gradient).
    coefficient: c (0.1 in the reference code); >= 0.
    entropy_floor: H_floor (2.0); > 0.
    min_gate: g_min (0.5); >= 0.
    entropy_offset: the 0.1 added to H; > 0.

  Returns:
    ``(penalty, aux)``: float32 penalty with the shape of ``kl``, not
    reduced, and :class:`SafePenaltyAux`.

  References:
    Maity, `SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive
    Control for RLHF <https://arxiv.org/abs/2602.04651>`_, 2026; code
    github.com/ryyzn9/SAFE (``EntropyAwarePredictiveController``).
  """
  if coefficient < 0:
    raise ValueError(
      f"safe_kl_penalty: coefficient must be >= 0, got {coefficient}."
    )
  if entropy_floor <= 0:
    raise ValueError(
      f"safe_kl_penalty: entropy_floor must be > 0, got {entropy_floor}."
    )
  if min_gate < 0:
    raise ValueError(f"safe_kl_penalty: min_gate must be >= 0, got {min_gate}.")
  if entropy_offset <= 0:
    raise ValueError(
      f"safe_kl_penalty: entropy_offset must be > 0, got {entropy_offset}."
    )
  kl = _f32(kl)
  entropy = jax.lax.stop_gradient(_f32(entropy))
  tau = jax.lax.stop_gradient(_f32(threshold))
  gate = jnp.maximum(min_gate, entropy_floor / (entropy + entropy_offset))
  excess = jnp.maximum(kl - tau, 0.0)
  penalty = coefficient * gate * excess * excess
  return penalty, SafePenaltyAux(gate, kl > tau)


class SafeControllerState(NamedTuple):
  """State of SAFE's KL tracker and reward-velocity PID controller."""

  kl_short: Float[Out, ""]
  """Fast EMA of the KL (decay 0.9)."""
  kl_long: Float[Out, ""]
  """Slow EMA of the KL (decay 0.99)."""
  reward_ema: Float[Out, ""]
  """EMA of the mean reward (decay 0.95)."""
  integral: Float[Out, ""]
  """Clipped integral of the velocity error (anti-windup)."""
  prev_error: Float[Out, ""]
  """Velocity error of the previous step (for the derivative term)."""
  initialized: Bool[Out, ""]
  """False until the first reward has been seen."""


@typechecked
def safe_controller_init() -> SafeControllerState:
  """Initial :class:`SafeControllerState` (all zeros, not initialised)."""
  zero = jnp.zeros((), jnp.float32)
  return SafeControllerState(zero, zero, zero, zero, zero, jnp.zeros((), bool))


@typechecked
def safe_controller_update(
  state: SafeControllerState,
  observed_kl: float | Real[In, ""],
  reward: float | Real[In, ""],
  *,
  base_threshold: float = 0.3,
  kp: float = 0.3,
  ki: float = 0.01,
  kd: float = 0.05,
  target_velocity: float = 1e-3,
  reward_decay: float = 0.95,
  short_decay: float = 0.9,
  long_decay: float = 0.99,
  integral_limit: float = 1.0,
  phase_multiplier: float = 1.0,
  min_threshold: float = 0.1,
  max_threshold: float = 0.6,
) -> tuple[SafeControllerState, Float[Out, ""]]:
  r"""One step of SAFE's PID-controlled adaptive KL threshold.

  With the reward EMA ``r̄`` and its velocity ``v_t = r̄_t - r̄_{t-1}``,

  .. math::
    e_t = v_t - v^*, \quad I_t = \mathrm{clip}(I_{t-1} + e_t, \pm I_{max}),
    \quad u_t = k_p e_t + k_i I_t + k_d (e_t - e_{t-1}),

  .. math::
    \tau_t = \mathrm{clip}\big((\tau_{base} + u_t)\,\phi_t,
             \tau_{min}, \tau_{max}\big)

  (paper: ``τ_t = (τ_base + PID(r_t))·φ_t``). On the first call the EMA is
  initialised to the reward and ``u = 0``. The KL EMAs ``kl_short`` (0.9)
  and ``kl_long`` (0.99) are updated as well; the penalty is then
  ``safe_kl_penalty(kl, entropy, τ_t)``. The phase multiplier φ (1.5 warm-up,
  1.2 climbing, 0.8 plateau, 1.0 converged in the reference code) comes from
  a host-side phase detector and is passed in.

  Args:
    state: current :class:`SafeControllerState`.
    observed_kl: KL of the current batch (no gradient).
    reward: mean raw reward of the current batch (no gradient).
    base_threshold: τ_base.
    kp: proportional gain.
    ki: integral gain.
    kd: derivative gain.
    target_velocity: v*, the desired reward-EMA increase per step.
    reward_decay: decay of the reward EMA, in [0, 1).
    short_decay: decay of ``kl_short``, in [0, 1).
    long_decay: decay of ``kl_long``, in [0, 1).
    integral_limit: anti-windup bound I_max, > 0.
    phase_multiplier: φ_t, > 0.
    min_threshold: τ_min.
    max_threshold: τ_max, >= τ_min.

  Returns:
    ``(new_state, threshold)``; ``threshold`` is a float32 scalar.

  References:
    Maity, `SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive
    Control for RLHF <https://arxiv.org/abs/2602.04651>`_, 2026; code
    github.com/ryyzn9/SAFE (``PIDController``).
  """
  for name, value in (
    ("reward_decay", reward_decay),
    ("short_decay", short_decay),
    ("long_decay", long_decay),
  ):
    if not 0 <= value < 1:
      raise ValueError(
        f"safe_controller_update: {name} must be in [0, 1), got {value}."
      )
  if integral_limit <= 0:
    raise ValueError(
      "safe_controller_update: integral_limit must be > 0, "
      f"got {integral_limit}."
    )
  if phase_multiplier <= 0:
    raise ValueError(
      "safe_controller_update: phase_multiplier must be > 0, "
      f"got {phase_multiplier}."
    )
  if max_threshold < min_threshold:
    raise ValueError(
      "safe_controller_update: max_threshold must be >= min_threshold, got "
      f"{max_threshold} < {min_threshold}."
    )
  kl = jax.lax.stop_gradient(_f32(observed_kl))
  reward = jax.lax.stop_gradient(_f32(reward))
  kl_short = short_decay * state.kl_short + (1 - short_decay) * kl
  kl_long = long_decay * state.kl_long + (1 - long_decay) * kl

  ema = reward_decay * state.reward_ema + (1 - reward_decay) * reward
  error = (ema - state.reward_ema) - target_velocity
  integral = jnp.clip(state.integral + error, -integral_limit, integral_limit)
  pid = kp * error + ki * integral + kd * (error - state.prev_error)

  init = state.initialized
  new_state = SafeControllerState(
    kl_short=kl_short,
    kl_long=kl_long,
    reward_ema=jnp.where(init, ema, reward),
    integral=jnp.where(init, integral, state.integral),
    prev_error=jnp.where(init, error, state.prev_error),
    initialized=jnp.ones((), bool),
  )
  pid = jnp.where(init, pid, 0.0)
  threshold = jnp.clip(
    (base_threshold + pid) * phase_multiplier, min_threshold, max_threshold
  )
  return new_state, threshold


REGISTRY = {
  "kl_penalty": kl_penalty_loss,
  "tis": truncated_importance_weights,
  "mis": masked_importance_weights,
  "icepop": icepop_weights,
}
"""Per-token KL term and importance-weight functions by config name."""
