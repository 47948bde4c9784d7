"""Reward shaping and transformation: pure functions of reward arrays.

Groups of functions:

* **Reward-model score transforms** from the PAR study: Preference As
  Reward ``σ(r - r_ref)``, other centred sigmoid-like maps, log-sigmoid
  centring, min-max and mean-std normalisation, clipping.
* **Length shaping**: DAPO's soft overlong punishment, Kimi-1.5 length
  rewards and the GRPO-λ correctness-gated switch, HAPO's history-aware
  length reward (with its history update).
* **Combining reward levels**: Gated Reward Accumulation (G-RA), hybrid
  process/outcome normalisation (ReNorm), potential-based shaping, dynamic
  multi-objective weights.
* **Grounding rewards**: GUI-G²'s Gaussian point and coverage rewards.
* **Sample and group filters** returning keep masks: DAPO dynamic sampling,
  low-variance group filtering, PF-PPO policy filtration (+ its R² metric).

Batch statistics (min-max, whitening, clipping, R²) take ``axis_name`` for
use inside ``shard_map``/``pmap``; under plain ``jit`` on global arrays leave
it ``None``.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int, Real

from alignment import ops
from alignment.array_types import In, Out, typechecked

__all__ = [
  "CENTERED_TRANSFORMS",
  "PF_PPO_STRATEGIES",
  "GatedRewardAux",
  "GrpoLambdaAux",
  "PotentialShapingAux",
  "centered_sigmoid_rewards",
  "clip_rewards",
  "dynamic_sampling_mask",
  "gated_reward_accumulation",
  "gaussian_coverage_rewards",
  "gaussian_point_rewards",
  "gradient_alignment_scores",
  "grpo_lambda_rewards",
  "hapo_length_rewards",
  "hapo_update_history",
  "hybrid_normalized_rewards",
  "kimi_length_rewards",
  "log_sigmoid_centered_rewards",
  "low_variance_group_mask",
  "minmax_rewards",
  "overlong_penalty",
  "par_rewards",
  "policy_filtration_mask",
  "potential_based_shaping",
  "reward_r_squared",
  "scalarize_rewards",
  "std_clip_rewards",
  "update_reward_weights",
  "whiten_rewards",
]

AxisName = str | tuple[str, ...] | None

CENTERED_TRANSFORMS = ("sigmoid", "tanh")
"""Bounded maps accepted by :func:`centered_sigmoid_rewards`."""

PF_PPO_STRATEGIES = ("best_of_n", "best_worst", "best_random")
"""Sample-selection strategies of :func:`policy_filtration_mask`."""

_NORMAL_85TH_PERCENTILE = 1.0364333894937898


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _ones_like_mask(x, mask):
  if mask is None:
    return jnp.ones(jnp.shape(x), bool)
  return jnp.asarray(mask)


def _safe_sqrt(x):
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


# --------------------------------------------------------------------------
# Reward-model score transforms (PAR and its baselines).
# --------------------------------------------------------------------------


@typechecked
def centered_sigmoid_rewards(
  rewards: Float[In, "B"],
  ref_rewards: Float[In, "B M"],
  ref_mask: Bool[In, "B M"] | None = None,
  *,
  transform: str = "sigmoid",
  scale: float = 1.0,
) -> Float[Out, "B"]:
  r"""A bounded map of the reward centred on reference rewards.

  .. math::
    r_{RL}(x, y) = \frac{1}{M} \sum_{m=1}^{M} f\big(k\,(r(x, y) - r(x,
    y^m_{ref}))\big), \qquad f \in \{\sigma, \tanh\},

  with ``y^m_ref`` sampled from the reference (SFT) policy for the same
  prompt. ``f = σ, k = 1`` is Preference As Reward (:func:`par_rewards`);
  the PAR paper's ablations also use ``tanh`` and ``σ(k·)`` with k = 2, 3.

  Args:
    rewards: reward-model scores of the policy's responses ``[B]``.
    ref_rewards: scores of M reference responses per prompt ``[B, M]``; no
      gradient.
    ref_mask: optional bool ``[B, M]`` marking valid references (padding,
      even NaN, is ignored); a row without references gets ``f(0)``.
    transform: ``"sigmoid"`` or ``"tanh"``.
    scale: k, a positive slope.

  Returns:
    float32 ``[B]``, in (0, 1) for sigmoid and (-1, 1) for tanh.

  References:
    Fu et al., `Reward Shaping to Mitigate Reward Hacking in RLHF
    <https://arxiv.org/abs/2502.18770>`_, 2025.
  """
  if transform not in CENTERED_TRANSFORMS:
    raise ValueError(
      f"centered_sigmoid_rewards: transform must be one of "
      f"{CENTERED_TRANSFORMS}, got {transform!r}."
    )
  if scale <= 0:
    raise ValueError(
      f"centered_sigmoid_rewards: scale must be > 0, got {scale}."
    )
  fn = jax.nn.sigmoid if transform == "sigmoid" else jnp.tanh
  mask = _ones_like_mask(ref_rewards, ref_mask)
  refs = jax.lax.stop_gradient(jnp.where(mask, _f32(ref_rewards), 0.0))
  diff = jnp.where(mask, _f32(rewards)[:, None] - refs, 0.0)
  values = jnp.where(mask, fn(scale * diff), 0.0)
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  mean = ops.safe_divide(jnp.sum(values, axis=-1), count)
  return jnp.where(count > 0, mean, fn(jnp.float32(0.0)))


@typechecked
def par_rewards(
  rewards: Float[In, "B"],
  ref_rewards: Float[In, "B M"],
  ref_mask: Bool[In, "B M"] | None = None,
) -> Float[Out, "B"]:
  r"""Preference As Reward: ``r_RL = (1/M) Σ_m σ(r(x, y) - r(x, y_ref^m))``.

  The reward-model probability that the response beats a reference
  response (PAR, Eq. 3): bounded in (0, 1), 0.5 at the reference, steepest
  there and saturating away from it, and invariant to any per-prompt shift
  of the reward model. One reference (M = 1) suffices in the paper.

  Args:
    rewards: reward-model scores ``[B]``.
    ref_rewards: scores of reference (SFT) responses ``[B, M]``; no
      gradient.
    ref_mask: optional bool ``[B, M]`` of valid references (padding, even
      NaN, ignored); a row with none gets 0.5.

  Returns:
    float32 ``[B]`` in (0, 1).

  References:
    Fu et al., `Reward Shaping to Mitigate Reward Hacking in RLHF
    <https://arxiv.org/abs/2502.18770>`_, 2025.
  """
  return centered_sigmoid_rewards(rewards, ref_rewards, ref_mask)


@typechecked
def log_sigmoid_centered_rewards(
  rewards: Float[In, "B"],
  ref_rewards: Float[In, "B M"],
  ref_mask: Bool[In, "B M"] | None = None,
  *,
  quantile_z: float = _NORMAL_85TH_PERCENTILE,
) -> Float[Out, "B"]:
  r"""Log-sigmoid centring (LSC), ``log σ(r - r_{ref,85})``.

  The centre is the 85th percentile of the reference rewards under a
  normal fit, ``μ_ref + z·σ_ref`` with ``z = Φ^{-1}(0.85) ≈ 1.0364`` and the
  population standard deviation, as in the PAR study's LSC baseline (after
  Wang et al. 2024, "Transforming and Combining Rewards").

  Args:
    rewards: reward-model scores ``[B]``.
    ref_rewards: reference scores ``[B, M]``; no gradient.
    ref_mask: optional bool ``[B, M]``; a row with no references is centred
      at 0.
    quantile_z: z, the standard-normal quantile of the centre.

  Returns:
    float32 ``[B]``, <= 0.

  References:
    Fu et al., `Reward Shaping to Mitigate Reward Hacking in RLHF
    <https://arxiv.org/abs/2502.18770>`_, 2025.
    Wang et al., `Transforming and Combining Rewards for Aligning Large
    Language Models <https://arxiv.org/abs/2402.00742>`_, 2024.
  """
  mask = _ones_like_mask(ref_rewards, ref_mask)
  refs = jax.lax.stop_gradient(_f32(ref_rewards))
  mean = ops.masked_mean(refs, mask, axis=-1)
  std = _safe_sqrt(ops.masked_var(refs, mask, axis=-1))
  centre = mean + quantile_z * std
  return jax.nn.log_sigmoid(_f32(rewards) - centre)


@typechecked
def minmax_rewards(
  rewards: Float[In, "*dims"],
  mask: Bool[In, "*dims"] | None = None,
  *,
  axis_name: AxisName = None,
) -> Float[Out, "*dims"]:
  r"""Min-max normalisation over the (masked) batch, ``(r - min)/(max - min)``.

  Args:
    rewards: rewards of any shape.
    mask: optional bool, same shape; masked entries (even NaN) are ignored
      and come out as 0.
    axis_name: mapped axis name(s); min and max are taken over the global
      batch with ``pmin``/``pmax``.

  Returns:
    float32 rewards in [0, 1]; 0 everywhere if all valid rewards are equal.

  References:
    Fu et al., `Reward Shaping to Mitigate Reward Hacking in RLHF
    <https://arxiv.org/abs/2502.18770>`_, 2025 (Minmax baseline).
  """
  mask = _ones_like_mask(rewards, mask)
  x = _f32(rewards)
  low = jnp.min(jnp.where(mask, x, jnp.inf))
  high = jnp.max(jnp.where(mask, x, -jnp.inf))
  if axis_name is not None:
    low = jax.lax.pmin(low, axis_name)
    high = jax.lax.pmax(high, axis_name)
  span = high - low
  valid = mask & (span > 0)
  safe_span = jnp.where(span > 0, span, 1.0)
  return jnp.where(valid, (jnp.where(mask, x, 0.0) - low) / safe_span, 0.0)


@typechecked
def whiten_rewards(
  rewards: Float[In, "*dims"],
  mask: Bool[In, "*dims"] | None = None,
  *,
  shift_mean: bool = True,
  epsilon: float = 1e-8,
  axis_name: AxisName = None,
) -> Float[Out, "*dims"]:
  r"""Mean-std normalisation ("Meanstd"), ``(r - μ) / sqrt(σ² + ε)``.

  A thin wrapper over :func:`alignment.ops.masked_whiten` (unbiased
  variance over the masked batch).

  Args:
    rewards: rewards of any shape.
    mask: optional bool; masked entries are ignored and output 0.
    shift_mean: subtract the mean (True) or keep it (False).
    epsilon: ε added to the variance; >= 0.
    axis_name: mapped axis name(s) for global statistics.

  Returns:
    float32 array of the rewards' shape.

  References:
    Fu et al., `Reward Shaping to Mitigate Reward Hacking in RLHF
    <https://arxiv.org/abs/2502.18770>`_, 2025 (Meanstd baseline).
  """
  if epsilon < 0:
    raise ValueError(f"whiten_rewards: epsilon must be >= 0, got {epsilon}.")
  mask = _ones_like_mask(rewards, mask)
  return ops.masked_whiten(
    rewards, mask, shift_mean=shift_mean, epsilon=epsilon, axis_name=axis_name
  )


@typechecked
def clip_rewards(
  rewards: Float[In, "*dims"],
  *,
  low: float = -10.0,
  high: float = 10.0,
) -> Float[Out, "*dims"]:
  """Clips rewards to ``[low, high]`` (fixed bounds).

  Args:
    rewards: rewards of any shape.
    low: lower bound (OpenRLHF's default reward clip range is [-10, 10]).
    high: upper bound, >= ``low``.

  Returns:
    float32 array of the rewards' shape.
  """
  if high < low:
    raise ValueError(
      f"clip_rewards: high must be >= low, got high={high}, low={low}."
    )
  return jnp.clip(_f32(rewards), low, high)


@typechecked
def std_clip_rewards(
  rewards: Float[In, "*dims"],
  mask: Bool[In, "*dims"] | None = None,
  *,
  num_std: float = 1.0,
  axis_name: AxisName = None,
) -> Float[Out, "*dims"]:
  r"""Clips rewards to ``[μ - kσ, μ + kσ]`` of the (masked) batch.

  The PAR study's "Clip" baseline (there with running statistics and
  k = 1); σ is the population standard deviation.

  Args:
    rewards: rewards of any shape.
    mask: optional bool; masked entries (even NaN) are ignored and output 0.
    num_std: k; >= 0.
    axis_name: mapped axis name(s) for global statistics.

  Returns:
    float32 array of the rewards' shape.

  References:
    Fu et al., `Reward Shaping to Mitigate Reward Hacking in RLHF
    <https://arxiv.org/abs/2502.18770>`_, 2025 (Clip baseline).
  """
  if num_std < 0:
    raise ValueError(f"std_clip_rewards: num_std must be >= 0, got {num_std}.")
  mask = _ones_like_mask(rewards, mask)
  x = jnp.where(mask, _f32(rewards), 0.0)
  mean = ops.masked_mean(x, mask, axis_name=axis_name)
  std = _safe_sqrt(ops.masked_var(x, mask, axis_name=axis_name))
  clipped = jnp.clip(x, mean - num_std * std, mean + num_std * std)
  return jnp.where(mask, clipped, 0.0)


# --------------------------------------------------------------------------
# Length shaping.
# --------------------------------------------------------------------------


@typechecked
def overlong_penalty(
  lengths: Real[In, "*dims"],
  *,
  max_length: int = 20480,
  cache_length: int = 4096,
) -> Float[Out, "*dims"]:
  r"""DAPO's soft overlong punishment (Eq. 13), added to the task reward.

  .. math::
    R_{length}(y) = \begin{cases}
      0, & |y| \le L_{max} - L_{cache} \\
      \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}},
        & L_{max} - L_{cache} < |y| \le L_{max} \\
      -1, & L_{max} < |y|
    \end{cases}

  Args:
    lengths: completion lengths in tokens (int or float).
    max_length: L_max (DAPO: 20480, i.e. 16384 expected + 4096 cache); > 0.
    cache_length: L_cache, the soft punishment interval; in (0, L_max].

  Returns:
    float32 penalties in [-1, 0], same shape as ``lengths``.

  References:
    Yu et al., `DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale <https://arxiv.org/abs/2503.14476>`_, 2025.
  """
  if max_length <= 0:
    raise ValueError(
      f"overlong_penalty: max_length must be > 0, got {max_length}."
    )
  if not 0 < cache_length <= max_length:
    raise ValueError(
      "overlong_penalty: cache_length must be in (0, max_length], got "
      f"{cache_length}."
    )
  length = _f32(lengths)
  start = float(max_length - cache_length)
  ramp = (start - length) / float(cache_length)
  return jnp.where(
    length <= start, 0.0, jnp.where(length <= max_length, ramp, -1.0)
  )


@typechecked
def kimi_length_rewards(
  correct: Bool[In, "B G"],
  lengths: Real[In, "B G"],
) -> Float[Out, "B G"]:
  r"""Kimi-1.5 group length reward.

  .. math::
    \lambda_i = 0.5 - \frac{L_i - L_{min}}{L_{max} - L_{min}}, \qquad
    r^{len}_i = \begin{cases} \lambda_i & \text{correct} \\
                \min(0, \lambda_i) & \text{incorrect} \end{cases}

  with ``L_min``, ``L_max`` over the G responses of the prompt; the
  shortest correct response gets 0.5. A group whose responses all have the
  same length gets 0 (no length signal).

  Args:
    correct: bool ``[B, G]``, response correctness.
    lengths: response lengths ``[B, G]``.

  Returns:
    float32 ``[B, G]`` in [-0.5, 0.5].

  References:
    Kimi Team, `Kimi k1.5: Scaling Reinforcement Learning with LLMs
    <https://arxiv.org/abs/2501.12599>`_, 2025, Sec. 2.3.3.
  """
  length = _f32(lengths)
  low = jnp.min(length, axis=-1, keepdims=True)
  span = jnp.max(length, axis=-1, keepdims=True) - low
  lam = jnp.where(
    span > 0, 0.5 - (length - low) / jnp.where(span > 0, span, 1.0), 0.0
  )
  return jnp.where(correct, lam, jnp.minimum(0.0, lam))


class GrpoLambdaAux(NamedTuple):
  """Diagnostics of :func:`grpo_lambda_rewards`."""

  penalized: Bool[Out, "B"]
  """True for the groups that received the length-penalised reward."""
  correct_ratio: Float[Out, "B"]
  """Fraction of correct responses per group."""


@typechecked
def grpo_lambda_rewards(
  correct: Bool[In, "B G"],
  lengths: Real[In, "B G"],
  *,
  top_fraction: float = 0.2,
  length_weight: float = 1.0,
) -> tuple[Float[Out, "B G"], GrpoLambdaAux]:
  r"""GRPO-λ: length penalty only for the groups that are mostly correct.

  Groups (prompts) are ranked by their correctness ratio; the top
  ``round(λ·B)`` of the batch get ``1[correct] + w·r^{len}`` with the
  Kimi-1.5 length reward (:func:`kimi_length_rewards`), the others the
  length-agnostic 0/1 reward. Ties are broken by batch position. ``λ = 0``
  is plain 0/1 GRPO, ``λ = 1`` always penalises length.

  The exact length term and the default λ are not stated in the abstract;
  the Kimi-1.5 form and λ = 0.2 are this library's reading and should be
  treated as configurable.

  Args:
    correct: bool ``[B, G]``.
    lengths: response lengths ``[B, G]``.
    top_fraction: λ in [0, 1].
    length_weight: w, the weight of the length reward; >= 0.

  Returns:
    ``(rewards, aux)``: float32 ``[B, G]`` and :class:`GrpoLambdaAux`.

  References:
    Dai et al., `Stable Reinforcement Learning for Efficient Reasoning
    <https://arxiv.org/abs/2505.18086>`_, 2025.
  """
  if not 0 <= top_fraction <= 1:
    raise ValueError(
      f"grpo_lambda_rewards: top_fraction must be in [0, 1], got "
      f"{top_fraction}."
    )
  if length_weight < 0:
    raise ValueError(
      f"grpo_lambda_rewards: length_weight must be >= 0, got {length_weight}."
    )
  accuracy = jnp.asarray(correct).astype(jnp.float32)
  ratio = jnp.mean(accuracy, axis=-1)
  batch = ratio.shape[0]
  num_penalized = int(round(top_fraction * batch))
  order = jnp.argsort(-ratio, stable=True)
  rank = (
    jnp.zeros((batch,), jnp.int32)
    .at[order]
    .set(jnp.arange(batch, dtype=jnp.int32))
  )
  penalized = rank < num_penalized
  length_reward = kimi_length_rewards(correct, lengths)
  rewards = accuracy + jnp.where(
    penalized[:, None], length_weight * length_reward, 0.0
  )
  return rewards, GrpoLambdaAux(penalized, ratio)


@typechecked
def hapo_length_rewards(
  lengths: Real[In, "B"],
  correct: Bool[In, "B"],
  history: Float[In, "B"],
  *,
  weight: float = 1.0,
  correct_floor: float = -0.7,
) -> Float[Out, "B"]:
  r"""HAPO's history-aware length reward.

  With ``h`` the shortest correct length seen so far for the prompt,

  .. math::
    c = \begin{cases} \cos\big(\tfrac{L}{h}\tfrac{\pi}{2}\big) & L < 2h \\
        -1 & L \ge 2h \end{cases}, \quad
    r^{len} = w \cdot \begin{cases} \max(c_{floor}, c) & \text{correct} \\
        \min(0, c) & \text{incorrect} \end{cases}

  and 0 when the prompt has no history yet (``h`` is ``inf``, NaN or
  <= 0). Beating the history is rewarded, an incorrect answer is never
  rewarded for being short. Add it to the correctness reward.

  Args:
    lengths: response lengths ``[B]``.
    correct: bool ``[B]``.
    history: the prompt's history ``h`` gathered per response ``[B]`` (from
      :func:`hapo_update_history`'s state); no gradient.
    weight: w (``w_lr``), >= 0.
    correct_floor: the cap on the penalty of correct answers (-0.7).

  Returns:
    float32 ``[B]``.

  References:
    Huang et al., `HAPO: Training Language Models to Reason Concisely via
    History-Aware Policy Optimization <https://arxiv.org/abs/2505.11225>`_,
    2025 (``compute_len_reward`` in the authors' code).
  """
  if weight < 0:
    raise ValueError(f"hapo_length_rewards: weight must be >= 0, got {weight}.")
  length = _f32(lengths)
  h = jax.lax.stop_gradient(_f32(history))
  has_history = jnp.isfinite(h) & (h > 0)
  h = jnp.where(has_history, h, 1.0)
  c = jnp.where(length < 2.0 * h, jnp.cos(length / h * (math.pi / 2)), -1.0)
  reward = jnp.where(
    correct, jnp.maximum(correct_floor, c), jnp.minimum(0.0, c)
  )
  return weight * jnp.where(has_history, reward, 0.0)


@typechecked
def hapo_update_history(
  history: Float[In, "num_prompts"],
  prompt_ids: Int[In, "B"],
  lengths: Real[In, "B"],
  correct: Bool[In, "B"],
) -> Float[Out, "num_prompts"]:
  r"""HAPO's history update ``h_i ← min(h_i, min{L : correct})`` per prompt.

  The history is a persistent ``[num_prompts]`` array in the train state
  (initialise with ``jnp.full((n,), jnp.inf)``: no history); it is
  non-increasing. Under ``jit`` on global arrays the scatter-min is global,
  which is the paper's min-gather across data-parallel workers.

  Args:
    history: current history ``[num_prompts]``.
    prompt_ids: dataset index of each response's prompt ``[B]``.
    lengths: response lengths ``[B]``.
    correct: bool ``[B]``; only correct responses update the history.

  Returns:
    float32 ``[num_prompts]``.

  References:
    Huang et al., `HAPO: Training Language Models to Reason Concisely via
    History-Aware Policy Optimization <https://arxiv.org/abs/2505.11225>`_,
    2025.
  """
  candidates = jnp.where(correct, _f32(lengths), jnp.inf)
  return _f32(history).at[jnp.asarray(prompt_ids)].min(candidates)


# --------------------------------------------------------------------------
# Combining reward levels.
# --------------------------------------------------------------------------


class GatedRewardAux(NamedTuple):
  """Diagnostics of :func:`gated_reward_accumulation`."""

  gated_step_rewards: Float[Out, "B S"]
  """Step rewards after gating (0 where the gate is closed or padded)."""
  gate: Bool[Out, "B"]
  """True where the outcome reward met the threshold."""


@typechecked
def gated_reward_accumulation(
  outcome_rewards: Float[In, "B"],
  step_rewards: Float[In, "B S"],
  step_mask: Bool[In, "B S"],
  *,
  threshold: float = 0.0,
) -> tuple[Float[Out, "B"], GatedRewardAux]:
  r"""Gated Reward Accumulation (G-RA).

  Immediate (step) rewards count only when the long-term (outcome) reward
  meets the threshold Δ:

  .. math::
    \tilde r_t = r_t\,\mathbb{1}[R^{high} \ge \Delta], \qquad
    R = R^{high} + \sum_t \tilde r_t .

  ``Δ = -∞`` is the plain sum, ``Δ = +∞`` outcome only. Δ depends on the
  task's outcome levels (the paper's SWE levels: no submit, empty patch,
  failing patch, passing patch).

  Args:
    outcome_rewards: high-level reward per trajectory ``[B]``.
    step_rewards: immediate rewards per step or turn ``[B, S]``.
    step_mask: bool ``[B, S]``; padding (even NaN) is ignored.
    threshold: Δ.

  Returns:
    ``(total, aux)``: float32 ``[B]`` return and :class:`GatedRewardAux`
    with the gated per-step rewards (for token/step-level credit).

  References:
    Sun et al., `Stabilizing Long-term Multi-turn Reinforcement Learning with
    Gated Rewards <https://arxiv.org/abs/2508.10548>`_, 2025.
  """
  outcome = _f32(outcome_rewards)
  gate = outcome >= threshold
  steps = jnp.where(step_mask, _f32(step_rewards), 0.0)
  gated = jnp.where(gate[:, None], steps, 0.0)
  return outcome + jnp.sum(gated, axis=-1), GatedRewardAux(gated, gate)


@typechecked
def hybrid_normalized_rewards(
  process_rewards: Float[In, "B S"],
  outcome_rewards: Float[In, "B"],
  step_mask: Bool[In, "B S"],
) -> Float[Out, "B S"]:
  r"""Hybrid process/outcome reward normalisation (ReNorm-style).

  .. math::
    \tilde r_s = r^{proc}_s + r^{out} - 1, \qquad r^{proc}, r^{out} \in
    [0, 1],

  so step rewards are >= 0 only on successful trajectories and <= 0 on
  failed ones: the process reward orders steps within the outcome's sign.

  .. warning:: This form is a reconstruction (methods catalogue C4-06);
     the paper's exact ReNorm formula could not be confirmed from its
     abstract and should be checked before relying on it.

  Args:
    process_rewards: per-step process rewards in [0, 1], ``[B, S]``.
    outcome_rewards: outcome reward in [0, 1], ``[B]``.
    step_mask: bool ``[B, S]``; padding (even NaN) outputs 0.

  Returns:
    float32 ``[B, S]`` in [-1, 1].

  References:
    Xu et al., `Hybrid Reward Normalization for Process-supervised
    Non-verifiable Agentic Tasks <https://arxiv.org/abs/2509.25598>`_, 2025.
  """
  process = jnp.where(step_mask, _f32(process_rewards), 0.0)
  shaped = process + _f32(outcome_rewards)[:, None] - 1.0
  return jnp.where(step_mask, shaped, 0.0)


class PotentialShapingAux(NamedTuple):
  """Diagnostics of :func:`potential_based_shaping`."""

  shaping: Float[Out, "B T"]
  """The shaping term ``F_t = γ Φ(s_{t+1}) - Φ(s_t)``, 0 on padding."""


@typechecked
def potential_based_shaping(
  rewards: Float[In, "B T"],
  potentials: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  final_potentials: Float[In, "B"] | None = None,
  *,
  gamma: float = 1.0,
) -> tuple[Float[Out, "B T"], PotentialShapingAux]:
  r"""Potential-based reward shaping, ``r'_t = r_t + γ Φ(s_{t+1}) - Φ(s_t)``.

  ``potentials[b, t]`` is Φ of the state before step t; the state after the
  last valid step has potential ``final_potentials`` (0 by default: a
  terminal state must have Φ = 0 for the optimal policy to be unchanged).
  Steps must be contiguous in each row (right- or left-padded). The shaped
  return telescopes:
  ``Σ_t γ^t r'_t = Σ_t γ^t r_t + γ^n Φ_final - Φ(s_0)``.

  Args:
    rewards: per-step rewards ``[B, T]``.
    potentials: Φ(s_t) per step ``[B, T]`` (e.g. a progress or process
      model's score).
    completion_mask: bool ``[B, T]``; padding (even NaN) is ignored.
    final_potentials: optional Φ of the state after the last step ``[B]``.
    gamma: discount γ in [0, 1].

  Returns:
    ``(shaped_rewards, aux)``: float32 ``[B, T]``, 0 on padding.

  References:
    Ng, Harada and Russell, `Policy invariance under reward transformations:
    Theory and application to reward shaping
    <https://people.eecs.berkeley.edu/~pabbeel/cs287-fa09/readings/NgHaradaRussell-shaping-ICML1999.pdf>`_,
    ICML 1999.
  """
  if not 0 <= gamma <= 1:
    raise ValueError(
      f"potential_based_shaping: gamma must be in [0, 1], got {gamma}."
    )
  mask = jnp.asarray(completion_mask)
  phi = jnp.where(mask, _f32(potentials), 0.0)
  batch = phi.shape[0]
  if final_potentials is None:
    final = jnp.zeros((batch, 1), jnp.float32)
  else:
    final = _f32(final_potentials)[:, None]
  pad = jnp.zeros((batch, 1), jnp.float32)
  next_valid = jnp.concatenate(
    [mask[:, 1:], jnp.zeros((batch, 1), bool)], axis=-1
  )
  phi_next = jnp.where(
    next_valid, jnp.concatenate([phi[:, 1:], pad], -1), final
  )
  shaping = jnp.where(mask, gamma * phi_next - phi, 0.0)
  shaped = jnp.where(mask, _f32(rewards) + shaping, 0.0)
  return shaped, PotentialShapingAux(shaping)


@typechecked
def scalarize_rewards(
  rewards: Float[In, "B K"],
  weights: Float[In, "K"],
) -> Float[Out, "B"]:
  r"""Linear scalarisation of K objectives, ``R = Σ_k w_k r_k``.

  Args:
    rewards: per-objective rewards ``[B, K]``.
    weights: objective weights ``[K]`` (no gradient).

  Returns:
    float32 ``[B]``.

  References:
    Lu et al., `Learning to Optimize Multi-Objective Alignment Through
    Dynamic Reward Weighting <https://arxiv.org/abs/2509.11452>`_, 2025.
  """
  weights = jax.lax.stop_gradient(_f32(weights))
  return jnp.einsum("bk,k->b", _f32(rewards), weights)


@typechecked
def gradient_alignment_scores(
  objective_grads: Float[In, "K num_params"],
) -> Float[Out, "K"]:
  r"""How much a step along each objective's gradient helps all objectives.

  .. math::
    s_k = \sum_j \cos(g_k, g_j),

  the first-order gain of all objectives from a (normalised) step along
  ``g_k``; a signal for :func:`update_reward_weights`. Zero gradients score
  0 against everything.

  Args:
    objective_grads: flattened per-objective policy gradients ``[K, P]``
      (e.g. of each objective's surrogate loss, ``ravel_pytree``-ed); no
      gradient.

  Returns:
    float32 ``[K]`` in ``[-K, K]``.

  References:
    Lu et al., `Learning to Optimize Multi-Objective Alignment Through
    Dynamic Reward Weighting <https://arxiv.org/abs/2509.11452>`_, 2025
    (gradient-based weight optimisation; the paper's exact influence
    statistic could not be confirmed).
  """
  grads = jax.lax.stop_gradient(_f32(objective_grads))
  norms = jnp.sqrt(jnp.sum(grads * grads, axis=-1))
  unit = grads / jnp.where(norms > 0, norms, 1.0)[:, None]
  return jnp.sum(unit @ unit.T, axis=-1)


@typechecked
def update_reward_weights(
  weights: Float[In, "K"],
  scores: Float[In, "K"],
  *,
  learning_rate: float = 0.1,
  min_weight: float = 0.0,
) -> Float[Out, "K"]:
  r"""Mirror-descent (exponentiated-gradient) step of objective weights.

  .. math::
    w' = (1 - K w_{min})\,\frac{w \odot e^{\eta s}}{\sum_k w_k e^{\eta s_k}}
         + w_{min}

  keeps ``w`` on the simplex with every weight >= ``w_min``, moving mass
  towards objectives with a high score ``s`` (a hypervolume gain, or
  :func:`gradient_alignment_scores`). ``η = 0`` (or equal scores) leaves the
  weights unchanged, which is fixed linear scalarisation. The weights are
  the state: keep them in the train state and scalarise with
  :func:`scalarize_rewards`.

  Args:
    weights: current weights ``[K]`` on the simplex (positive, sum 1).
    scores: per-objective scores ``[K]`` (no gradient).
    learning_rate: η >= 0.
    min_weight: w_min in [0, 1/K).

  Returns:
    float32 ``[K]`` weights summing to 1.

  References:
    Lu et al., `Learning to Optimize Multi-Objective Alignment Through
    Dynamic Reward Weighting <https://arxiv.org/abs/2509.11452>`_, 2025.
  """
  if learning_rate < 0:
    raise ValueError(
      f"update_reward_weights: learning_rate must be >= 0, got {learning_rate}."
    )
  num = jnp.shape(weights)[0]
  if not 0 <= min_weight * num < 1:
    raise ValueError(
      f"update_reward_weights: min_weight must be in [0, 1/K) = [0, "
      f"{1 / num}), got {min_weight}."
    )
  weights = jax.lax.stop_gradient(_f32(weights))
  scores = jax.lax.stop_gradient(_f32(scores))
  logits = jnp.log(jnp.maximum(weights, 1e-30)) + learning_rate * scores
  new = jax.nn.softmax(logits)
  return (1.0 - num * min_weight) * new + min_weight


# --------------------------------------------------------------------------
# GUI-G² Gaussian grounding rewards.
# --------------------------------------------------------------------------


def _centre_size(boxes):
  boxes = _f32(boxes)
  x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
  return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


@typechecked
def gaussian_point_rewards(
  pred_boxes: Float[In, "B 4"],
  gt_boxes: Float[In, "B 4"],
  *,
  alpha: float = 0.5,
  epsilon: float = 1e-8,
) -> Float[Out, "B"]:
  r"""GUI-G² Gaussian point reward of the predicted centre.

  .. math::
    R_{point} = \exp\Big(-\tfrac12\Big[\frac{(\hat\mu_x - \mu_x)^2}
      {\sigma_x^2} + \frac{(\hat\mu_y - \mu_y)^2}{\sigma_y^2}\Big]\Big),
    \quad \sigma_x = \alpha w, \ \sigma_y = \alpha h,

  with ``μ``, ``w``, ``h`` the ground-truth box centre and size (adaptive
  variance) and ``μ̂`` the centre of the prediction (a point is the box
  ``[x, y, x, y]``). 1 at the centre, smooth everywhere.

  Args:
    pred_boxes: predicted boxes ``[B, 4]`` as ``(x1, y1, x2, y2)``.
    gt_boxes: ground-truth boxes ``[B, 4]``.
    alpha: α, the variance scale (0.5 in the authors' code); > 0.
    epsilon: added to the variances (degenerate boxes); >= 0.

  Returns:
    float32 ``[B]`` in (0, 1].

  References:
    Tang et al., `GUI-G²: Gaussian Reward Modeling for GUI Grounding
    <https://arxiv.org/abs/2507.15846>`_, 2025.
  """
  if alpha <= 0:
    raise ValueError(f"gaussian_point_rewards: alpha must be > 0, got {alpha}.")
  if epsilon < 0:
    raise ValueError(
      f"gaussian_point_rewards: epsilon must be >= 0, got {epsilon}."
    )
  px, py, _, _ = _centre_size(pred_boxes)
  gx, gy, gw, gh = _centre_size(gt_boxes)
  var_x = (alpha * gw) ** 2 + epsilon
  var_y = (alpha * gh) ** 2 + epsilon
  return jnp.exp(-0.5 * ((px - gx) ** 2 / var_x + (py - gy) ** 2 / var_y))


@typechecked
def gaussian_coverage_rewards(
  pred_boxes: Float[In, "B 4"],
  gt_boxes: Float[In, "B 4"],
  *,
  alpha: float = 0.5,
  epsilon: float = 1e-8,
) -> Float[Out, "B"]:
  r"""GUI-G² Gaussian coverage reward, ``exp(-D_B(N_pred, N_gt))``.

  Both boxes become axis-aligned Gaussians ``N(μ, diag((αw)², (αh)²))``;
  the reward is the Bhattacharyya coefficient between them,

  .. math::
    D_B = \tfrac18 \Delta\mu^\top \bar\Sigma^{-1} \Delta\mu
      + \tfrac12 \ln\frac{\det\bar\Sigma}{\sqrt{\det\Sigma_p
      \det\Sigma_g}}, \quad \bar\Sigma = \tfrac12(\Sigma_p + \Sigma_g),

  1 iff the boxes coincide, decaying with centre offset and size mismatch.

  Args:
    pred_boxes: predicted boxes ``[B, 4]`` as ``(x1, y1, x2, y2)``.
    gt_boxes: ground-truth boxes ``[B, 4]``.
    alpha: α, the variance scale (0.5); > 0.
    epsilon: added to every variance (degenerate boxes); >= 0.

  Returns:
    float32 ``[B]`` in (0, 1].

  References:
    Tang et al., `GUI-G²: Gaussian Reward Modeling for GUI Grounding
    <https://arxiv.org/abs/2507.15846>`_, 2025 (``gaussian_plane_reward``
    in the authors' code).
  """
  if alpha <= 0:
    raise ValueError(
      f"gaussian_coverage_rewards: alpha must be > 0, got {alpha}."
    )
  if epsilon < 0:
    raise ValueError(
      f"gaussian_coverage_rewards: epsilon must be >= 0, got {epsilon}."
    )
  px, py, pw, ph = _centre_size(pred_boxes)
  gx, gy, gw, gh = _centre_size(gt_boxes)
  distance = 0.0
  for dp, dg, sp, sg in ((px, gx, pw, gw), (py, gy, ph, gh)):
    var_p = (alpha * sp) ** 2 + epsilon
    var_g = (alpha * sg) ** 2 + epsilon
    var_avg = 0.5 * (var_p + var_g)
    distance = distance + (dp - dg) ** 2 / (8.0 * var_avg)
    distance = (
      distance
      + 0.5 * jnp.log(var_avg)
      - 0.25 * (jnp.log(var_p) + jnp.log(var_g))
    )
  return jnp.exp(-distance)


# --------------------------------------------------------------------------
# Sample and group filters.
# --------------------------------------------------------------------------


@typechecked
def dynamic_sampling_mask(
  rewards: Float[In, "B G"],
  mask: Bool[In, "B G"] | None = None,
) -> Bool[Out, "B"]:
  r"""DAPO dynamic sampling: keep groups whose rewards are not all equal.

  DAPO over-samples and filters out prompts with accuracy 0 or 1 (all
  rewards equal, hence zero group advantage); equivalently
  ``max_g r_g > min_g r_g``. Groups with fewer than two valid samples are
  dropped.

  Args:
    rewards: rewards per group ``[B, G]``.
    mask: optional bool ``[B, G]`` of valid samples (padding, even NaN, is
      ignored).

  Returns:
    bool ``[B]``, True keeps the group.

  References:
    Yu et al., `DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale <https://arxiv.org/abs/2503.14476>`_, 2025, Eq. 11.
  """
  mask = _ones_like_mask(rewards, mask)
  x = _f32(rewards)
  high = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1)
  low = jnp.min(jnp.where(mask, x, jnp.inf), axis=-1)
  return high > low


@typechecked
def low_variance_group_mask(
  rewards: Float[In, "B G"],
  mask: Bool[In, "B G"] | None = None,
  *,
  min_std: float = 0.05,
  ddof: int = 0,
) -> Bool[Out, "B"]:
  r"""Low-variance group filtering: keep groups with ``std_g r_g >= τ``.

  Generalises DAPO's zero-variance filter: a group-standardised advantage
  divides by the group std, so near-constant groups mostly amplify judge
  noise. UniWorld-V2 gives no τ; 0.05 is this library's default.

  Args:
    rewards: rewards per group ``[B, G]``.
    mask: optional bool ``[B, G]`` of valid samples.
    min_std: τ >= 0.
    ddof: delta degrees of freedom of the std (0 population, 1 Bessel).

  Returns:
    bool ``[B]``; groups with at most ``ddof`` valid samples are dropped.

  References:
    Li et al., `Uniworld-V2: Reinforce Image Editing with Diffusion
    Negative-aware Finetuning and MLLM Implicit Feedback
    <https://arxiv.org/abs/2510.16888>`_, 2025.
  """
  if min_std < 0:
    raise ValueError(
      f"low_variance_group_mask: min_std must be >= 0, got {min_std}."
    )
  if ddof < 0:
    raise ValueError(f"low_variance_group_mask: ddof must be >= 0, got {ddof}.")
  mask = _ones_like_mask(rewards, mask)
  var = ops.masked_var(rewards, mask, axis=-1, ddof=ddof)
  count = jnp.sum(mask, axis=-1)
  return (count > ddof) & (_safe_sqrt(var) >= min_std)


@typechecked
def policy_filtration_mask(
  rewards: Float[In, "B G"],
  mask: Bool[In, "B G"] | None = None,
  key: jax.Array | None = None,
  *,
  strategy: str = "best_random",
) -> Bool[Out, "B G"]:
  r"""PF-PPO policy filtration: which of a prompt's samples to train on.

  Responses are ranked by reward-model reward within each group and only
  those whose rewards are reliable are kept:

  * ``best_of_n`` (BoN): the highest-reward sample;
  * ``best_worst`` (BW): the highest and the lowest;
  * ``best_random`` (BR): the highest and one other sample drawn uniformly
    (needs ``key``).

  Choose the strategy with :func:`reward_r_squared` of rewards vs. true
  scores on the kept samples.

  Args:
    rewards: reward-model rewards ``[B, G]``.
    mask: optional bool ``[B, G]`` of valid samples.
    key: PRNG key, required by ``best_random``.
    strategy: one of :data:`PF_PPO_STRATEGIES`.

  Returns:
    bool ``[B, G]`` keep mask (a subset of ``mask``).

  References:
    Zhang et al., `Policy Filtration for RLHF to Mitigate Noise in Reward
    Models <https://arxiv.org/abs/2409.06957>`_, 2024.
  """
  if strategy not in PF_PPO_STRATEGIES:
    raise ValueError(
      f"policy_filtration_mask: strategy must be one of "
      f"{PF_PPO_STRATEGIES}, got {strategy!r}."
    )
  if strategy == "best_random" and key is None:
    raise ValueError(
      "policy_filtration_mask: strategy='best_random' needs a PRNG key."
    )
  mask = _ones_like_mask(rewards, mask)
  x = _f32(rewards)
  size = x.shape[-1]
  best = jax.nn.one_hot(
    jnp.argmax(jnp.where(mask, x, -jnp.inf), axis=-1), size, dtype=bool
  )
  if strategy == "best_of_n":
    keep = best
  elif strategy == "best_worst":
    worst = jnp.argmin(jnp.where(mask, x, jnp.inf), axis=-1)
    keep = best | jax.nn.one_hot(worst, size, dtype=bool)
  else:
    noise = jax.random.uniform(key, x.shape)
    noise = jnp.where(mask & ~best, noise, -1.0)
    other = jax.nn.one_hot(jnp.argmax(noise, axis=-1), size, dtype=bool)
    keep = best | (other & (noise >= 0))
  return keep & mask


@typechecked
def reward_r_squared(
  rewards: Float[In, "*dims"],
  scores: Float[In, "*dims"],
  mask: Bool[In, "*dims"] | None = None,
  *,
  axis_name: AxisName = None,
) -> Float[Out, ""]:
  r"""Coefficient of determination R² between rewards and true scores.

  For a least-squares line of scores on rewards,
  ``R² = 1 - SS_res / SS_tot = cov(r, s)² / (var(r) var(s))``, the squared
  Pearson correlation; PF-PPO uses it on the kept samples to choose the
  filtration strategy. 0 when either side is constant.

  Args:
    rewards: reward-model rewards.
    scores: true scores (e.g. unit-test pass rates), same shape.
    mask: optional bool (e.g. :func:`policy_filtration_mask`'s output).
    axis_name: mapped axis name(s) for global statistics.

  Returns:
    float32 scalar in [0, 1].

  References:
    Zhang et al., `Policy Filtration for RLHF to Mitigate Noise in Reward
    Models <https://arxiv.org/abs/2409.06957>`_, 2024.
  """
  mask = _ones_like_mask(rewards, mask)
  r = jnp.where(mask, _f32(rewards), 0.0)
  s = jnp.where(mask, _f32(scores), 0.0)
  r_mean = ops.masked_mean(r, mask, axis_name=axis_name)
  s_mean = ops.masked_mean(s, mask, axis_name=axis_name)
  cov = ops.masked_mean((r - r_mean) * (s - s_mean), mask, axis_name=axis_name)
  var_r = ops.masked_var(r, mask, axis_name=axis_name)
  var_s = ops.masked_var(s, mask, axis_name=axis_name)
  return ops.safe_divide(cov * cov, var_r * var_s)


REGISTRY = {
  "par": par_rewards,
  "centered_sigmoid": centered_sigmoid_rewards,
  "lsc": log_sigmoid_centered_rewards,
  "minmax": minmax_rewards,
  "meanstd": whiten_rewards,
  "clip": clip_rewards,
  "std_clip": std_clip_rewards,
  "overlong": overlong_penalty,
  "kimi_length": kimi_length_rewards,
  "grpo_lambda": grpo_lambda_rewards,
  "hapo": hapo_length_rewards,
  "gated": gated_reward_accumulation,
  "renorm": hybrid_normalized_rewards,
  "potential": potential_based_shaping,
  "scalarize": scalarize_rewards,
  "gaussian_point": gaussian_point_rewards,
  "gaussian_coverage": gaussian_coverage_rewards,
  "dynamic_sampling": dynamic_sampling_mask,
  "low_variance": low_variance_group_mask,
  "pf_ppo": policy_filtration_mask,
}
"""Reward transformations and filters by config name."""
