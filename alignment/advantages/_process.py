"""Process- and step-level credit assignment.

Step-level functions take per-step arrays ``[B, S]`` (or ``[B, G, S]`` with a
group axis) that are right-padded along ``S`` with a bool ``step_mask``
(``turn_mask`` for multi-turn agents). A step's value applies to all tokens
of that step; :func:`broadcast_step_values` spreads ``[B, S]`` values over
``[B, T]`` tokens given each token's step index.

* PRIME (Cui et al. 2025): implicit process rewards from a PRM language
  model and their RLOO-style combination with outcome rewards.
* PURE (Cheng et al. 2025): min-form credit assignment for PRM step rewards.
* Clip and Delta (Gao et al. 2024): bounded transforms of learned step
  rewards.
* SPA-RL (Wang et al. 2025): progress-attribution step rewards.
* IGPO (Wang et al. 2025): information-gain turn rewards for agents.
* Arena ranking: round-robin win-rate advantages from a pairwise judge
  (the full-comparison reference that ArenaRL's tournament approximates).

Outputs used as advantages or rewards carry no gradient unless the
docstring says otherwise (the PRIME implicit reward and the SPA progress
loss are differentiable in the PRM / progress-estimator outputs).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int, Real

from alignment.advantages._group import STD_SCALINGS, grpo_advantages
from alignment.array_types import In, Out, typechecked
from alignment.ops import masked_whiten, safe_divide
from alignment.ops._masked import AxisName

__all__ = [
  "DELTA_LAST_STEP",
  "arena_rank_advantages",
  "broadcast_step_values",
  "clip_step_rewards",
  "delta_step_rewards",
  "igpo_advantages",
  "information_gain_rewards",
  "min_form_credit",
  "prime_advantages",
  "prime_token_rewards",
  "pure_advantages",
  "spa_progress_loss",
  "spa_step_rewards",
  "STEP_REWARD_TRANSFORMS",
]

DELTA_LAST_STEP = ("zero", "keep")
"""Valid ``last_step`` values of :func:`delta_step_rewards`."""
_PURE_BASELINES = ("token", "step")
_IGPO_NORMALIZATIONS = ("joint", "separate")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _masked(x, mask):
  return jax.lax.stop_gradient(jnp.where(mask, _f32(x), 0.0))


def _check_group_size(fn: str, x, name: str) -> None:
  if x.shape[1] < 2:
    raise ValueError(
      f"{fn}: {name} has group size G={x.shape[1]} (shape "
      f"{tuple(x.shape)}); a group estimator needs G >= 2 samples per "
      "prompt."
    )


def _reverse_cumsum(x, mask, gamma=1.0):
  """Σ_{s'>=s, valid} γ^(#valid steps between) x_s' along the last axis."""

  def step(carry, xs):
    x_s, m_s = xs
    total = x_s + gamma * carry
    return jnp.where(m_s, total, carry), jnp.where(m_s, total, 0.0)

  moved = (jnp.moveaxis(x, -1, 0), jnp.moveaxis(mask, -1, 0))
  init = jnp.zeros_like(x[..., 0])  # keeps shard_map's varying axes
  _, out = jax.lax.scan(step, init, moved, reverse=True)
  return jnp.moveaxis(out, 0, -1)


def _last_valid(mask):
  """Bool mask of the last True entry along the last axis (none if empty)."""
  later = jnp.flip(jnp.cumsum(jnp.flip(mask, -1), axis=-1), -1)
  return mask & (later == 1)


def _leave_one_out_mean(x, axis):
  """mean over the other members of ``axis`` (size n >= 2)."""
  n = x.shape[axis]
  return (jnp.sum(x, axis=axis, keepdims=True) - x) / (n - 1)


# ----------------------------------------------------------------------------
# Layout helper.


@typechecked
def broadcast_step_values(
  step_values: Float[In, "B S"],
  token_step_index: Int[In, "B T"],
  completion_mask: Bool[In, "B T"],
) -> Float[Out, "B T"]:
  """Gives every token the value of the step (or turn) it belongs to.

  Args:
    step_values: per-step values, e.g. step-level advantages.
    token_step_index: index in ``[0, S)`` of the step each token belongs to;
      tokens with an index outside ``[0, S)`` (e.g. -1 for observation
      tokens) get 0.
    completion_mask: bool, True on tokens that receive a value.

  Returns:
    float32 ``[B, T]``; 0 on masked tokens. Gradients flow to
    ``step_values`` (this is a gather).
  """
  values = _f32(step_values)
  index = jnp.asarray(token_step_index)
  valid = (
    jnp.asarray(completion_mask, bool)
    & (index >= 0)
    & (index < values.shape[1])
  )
  gathered = jnp.take_along_axis(
    values, jnp.clip(index, 0, values.shape[1] - 1), 1
  )
  return jnp.where(valid, gathered, 0.0)


# ----------------------------------------------------------------------------
# PRIME.


@typechecked
def prime_token_rewards(
  prm_token_logps: Float[In, "B T"],
  ref_token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  beta: float = 0.05,
) -> Float[Out, "B T"]:
  r"""PRIME implicit process reward of every token.

  .. math:: r_φ(y_t) = β \log\frac{π_φ(y_t | y_{<t})}{π_{ref}(y_t | y_{<t})}

  (Cui et al. 2025): an implicit PRM ``π_φ``, a causal LM trained
  only on outcome labels with the cross-entropy loss
  ``BCE(σ(Σ_t r_φ(y_t)), correct)``, gives dense token rewards for free.

  Args:
    prm_token_logps: log-probs of the sampled tokens under the PRM ``π_φ``;
      receives gradient (for the PRM's own update).
    ref_token_logps: log-probs under the frozen reference; no gradient.
    completion_mask: bool, True on completion tokens.
    beta: β > 0 (verl recipe ``beta_train`` 0.05).

  Returns:
    float32 ``[B, T]``, 0 on masked tokens. Stop its gradient before using
    it as a policy reward (:func:`prime_advantages` does).

  References:
    Cui et al., `Process Reinforcement through Implicit Rewards
    <https://arxiv.org/abs/2502.01456>`_, 2025.
  """
  if not beta > 0:
    raise ValueError(f"prime_token_rewards: beta must be > 0, got {beta}.")
  mask = jnp.asarray(completion_mask, bool)
  logps = jnp.where(mask, _f32(prm_token_logps), 0.0)
  ref = jax.lax.stop_gradient(jnp.where(mask, _f32(ref_token_logps), 0.0))
  return jnp.where(mask, beta * (logps - ref), 0.0)


@typechecked
def prime_advantages(
  process_rewards: Float[In, "B G T"],
  outcome_rewards: Float[In, "B G"],
  completion_mask: Bool[In, "B G T"],
  *,
  process_coef: float = 5.0,
  outcome_coef: float = 5.0,
  epsilon: float = 1e-8,
  axis_name: AxisName = None,
) -> Float[Out, "B G T"]:
  r"""PRIME advantages: leave-one-out on process and outcome rewards.

  Cui et al. (2025), in the form of the authors' verl recipe
  (``prime_core_algos.compute_rloo_advantage_return``). For a group of
  ``n = G`` samples, each reward source gets an RLOO baseline built from
  per-sample means ``m_j`` (the mean over valid tokens for process rewards;
  the outcome itself, placed on the last valid token, for outcomes):

  .. math::
    \tilde r_{g,t} = \frac{n}{n-1} r_{g,t} - \frac{1}{n-1}\sum_j m_j,

  which is ``r_g - mean_{j≠g} r_j`` for the outcome. Then

  .. math::
    R_{g,t} = \sum_{s \ge t} (c_{proc} \tilde r^{proc}_{g,s}
              + c_{out} \tilde r^{out}_{g,s}), \qquad
    A = \operatorname{whiten}(R),

  whitened over all valid tokens of the global batch (mean, Bessel
  variance, ``ε`` added to the variance), as ``ops.masked_whiten``.

  Args:
    process_rewards: implicit token rewards :func:`prime_token_rewards`
      ``[B, G, T]``; no gradient.
    outcome_rewards: verifier outcomes ``[B, G]`` (0/1 accuracy in the
      paper); no gradient.
    completion_mask: bool ``[B, G, T]``.
    process_coef: ``c_proc`` (recipe ``dpo_coef``, 5).
    outcome_coef: ``c_out`` (recipe ``gt_coef``, 5).
    epsilon: ε added to the variance in the whitening.
    axis_name: mapped axis for global whitening statistics.

  Returns:
    float32 ``[B, G, T]`` advantages, 0 on masked tokens; no gradient.

  References:
    Cui et al., `Process Reinforcement through Implicit Rewards
    <https://arxiv.org/abs/2502.01456>`_, 2025.
  """
  fn = "prime_advantages"
  if not epsilon >= 0:
    raise ValueError(f"{fn}: epsilon must be >= 0, got {epsilon}.")
  _check_group_size(fn, process_rewards, "process_rewards")
  n = process_rewards.shape[1]
  mask = jnp.asarray(completion_mask, bool)
  proc = _masked(process_rewards, mask)
  outcome = jax.lax.stop_gradient(_f32(outcome_rewards))
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  proc_mean = safe_divide(jnp.sum(proc, axis=-1), count)
  proc_baseline = jnp.sum(proc_mean, axis=1, keepdims=True) / (n - 1)
  proc_rloo = jnp.where(
    mask, proc * n / (n - 1) - proc_baseline[..., None], 0.0
  )
  out_rloo = outcome - _leave_one_out_mean(outcome, axis=1)
  last = _last_valid(mask)
  combined = process_coef * proc_rloo + outcome_coef * jnp.where(
    last, out_rloo[..., None], 0.0
  )
  returns = _reverse_cumsum(combined, mask)
  return masked_whiten(returns, mask, epsilon=epsilon, axis_name=axis_name)


# ----------------------------------------------------------------------------
# PURE and Clip / Delta.


@typechecked
def min_form_credit(
  step_rewards: Float[In, "B S"],
  step_mask: Bool[In, "B S"],
  *,
  temperature: float = 0.1,
) -> Float[Out, "B S"]:
  r"""PURE min-form transform of process rewards.

  .. math::
    w_s = \operatorname{softmax}_s(-r_s / T), \qquad r^*_s = w_s r_s

  over the valid steps of each sequence (Cheng et al. 2025). The
  return-to-go ``Σ_{s'≥s} r^*_{s'}`` is a soft minimum of the future step
  rewards: as ``T → 0`` it is ``min_s r_s`` for every step up to the
  worst one and 0 after it.

  Args:
    step_rewards: PRM step rewards ``[B, S]`` (the paper uses
      ``p(correct) - p(wrong)`` in [-1, 1]); no gradient.
    step_mask: bool ``[B, S]``, True on real steps.
    temperature: T > 0 (paper: 0.1).

  Returns:
    float32 ``[B, S]`` transformed step rewards, 0 on masked steps.

  References:
    Cheng et al., `Stop Summation: Min-Form Credit Assignment Is All Process
    Reward Model Needs for Reasoning <https://arxiv.org/abs/2504.15275>`_,
    2025.
  """
  if not temperature > 0:
    raise ValueError(
      f"min_form_credit: temperature must be > 0, got {temperature}."
    )
  mask = jnp.asarray(step_mask, bool)
  r = _masked(step_rewards, mask)
  logits = jnp.where(mask, -r / temperature, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  unnormalised = jnp.where(mask, jnp.exp(logits - top), 0.0)
  weights = safe_divide(
    unnormalised, jnp.sum(unnormalised, axis=-1, keepdims=True)
  )
  return weights * r


@typechecked
def pure_advantages(
  step_rewards: Float[In, "B G S"],
  step_mask: Bool[In, "B G S"],
  step_lengths: Real[In, "B G S"],
  verifiable_rewards: Float[In, "B G"] | None = None,
  *,
  temperature: float = 0.1,
  min_form: bool = True,
  baseline: str = "token",
  verifiable_coef: float = 1.0,
) -> Float[Out, "B G S"]:
  r"""PURE step-level advantages: min-form credit with an RLOO baseline.

  Follows the authors' code (``CJReinforce/PURE``,
  ``experience_maker.process_experiences``):

  1. ``r*`` = :func:`min_form_credit` of the PRM step rewards (or the raw
     rewards with ``min_form=False``, the sum-form ablation);
  2. a leave-one-out baseline from the other ``G-1`` samples' total
     process reward ``R_j = Σ_s r*_{j,s}``, subtracted from every step:

     * ``"token"``: ``b_g = (Σ_{j≠g} R_j) / (Σ_{j≠g} L_j)`` per token,
       times the step's token count (``L_j`` = completion length);
     * ``"step"``: ``b_g = mean_{j≠g} (R_j / S_j)`` per step;

  3. optional verifiable reward with its own RLOO baseline,
     ``verifiable_coef · (v_g - mean_{j≠g} v_j)``, added to the last step;
  4. advantage of step ``s`` = ``Σ_{s'≥s}`` (γ = 1) of the result. No
     whitening.

  Every token of step ``s`` gets the advantage of step ``s``
  (:func:`broadcast_step_values`). Deviations from the code: the code
  counts a step's tokens without its separator token but the completion
  length with it, and gives the separator token advantage 0; here
  ``step_lengths`` are used for both and sum to the completion length.

  Args:
    step_rewards: PRM step rewards ``[B, G, S]``; no gradient.
    step_mask: bool ``[B, G, S]`` of real steps.
    step_lengths: tokens per step ``[B, G, S]``.
    verifiable_rewards: optional outcome rewards ``[B, G]`` (the code uses
      ``correct - 1`` in {-1, 0}); no gradient.
    temperature: min-form temperature T > 0 (0.1).
    min_form: apply the min-form transform (False: sum-form baseline).
    baseline: ``"token"`` (code default) or ``"step"``.
    verifiable_coef: weight of the verifiable reward.

  Returns:
    float32 ``[B, G, S]`` step advantages, 0 on masked steps.

  References:
    Cheng et al., `Stop Summation: Min-Form Credit Assignment Is All Process
    Reward Model Needs for Reasoning <https://arxiv.org/abs/2504.15275>`_,
    2025.
  """
  fn = "pure_advantages"
  if baseline not in _PURE_BASELINES:
    raise ValueError(
      f"{fn}: unknown baseline={baseline!r}; valid choices "
      f"are {_PURE_BASELINES}."
    )
  _check_group_size(fn, step_rewards, "step_rewards")
  b, g, s = step_rewards.shape
  mask = jnp.asarray(step_mask, bool)
  if min_form:
    credit = min_form_credit(
      jnp.reshape(step_rewards, (b * g, s)),
      mask.reshape(b * g, s),
      temperature=temperature,
    )
    credit = credit.reshape(b, g, s)
  else:
    credit = _masked(step_rewards, mask)
  lengths = _masked(step_lengths, mask)
  total = jnp.sum(credit, axis=-1)
  if baseline == "token":
    length = jnp.sum(lengths, axis=-1)
    others_total = jnp.sum(total, axis=1, keepdims=True) - total
    others_length = jnp.sum(length, axis=1, keepdims=True) - length
    per_token = safe_divide(others_total, others_length)
    credit = credit - per_token[..., None] * lengths
  else:
    per_step = safe_divide(total, jnp.sum(mask, axis=-1, dtype=jnp.float32))
    credit = credit - _leave_one_out_mean(per_step, axis=1)[..., None]
  credit = jnp.where(mask, credit, 0.0)
  if verifiable_rewards is not None:
    v = jax.lax.stop_gradient(_f32(verifiable_rewards))
    v = verifiable_coef * (v - _leave_one_out_mean(v, axis=1))
    credit = credit + jnp.where(_last_valid(mask), v[..., None], 0.0)
  return _reverse_cumsum(credit, mask)


@typechecked
def clip_step_rewards(
  step_rewards: Float[In, "B S"],
  step_mask: Bool[In, "B S"],
  *,
  eta: float,
) -> Float[Out, "B S"]:
  r"""Clip refinement of learned step rewards: ``min(r_s - η, 0)``.

  Gao et al. (2024): every step reward becomes ``≤ 0`` (steps
  scoring above the threshold η get 0), so adding steps can never raise
  a trajectory's return and the learned reward can no longer be farmed
  by repeating good-looking steps. Combine with the success reward on
  the final step.

  Args:
    step_rewards: PRM step rewards ``[B, S]``; no gradient.
    step_mask: bool ``[B, S]`` of real steps.
    eta: threshold η (a point of the PRM's score range; no paper default).

  Returns:
    float32 ``[B, S]``, ``≤ 0``, 0 on masked steps.

  References:
    Gao et al., `On Designing Effective RL Reward at Training Time for LLM
    Reasoning <https://arxiv.org/abs/2410.15115>`_, 2024.
  """
  mask = jnp.asarray(step_mask, bool)
  r = _masked(step_rewards, mask)
  return jnp.where(mask, jnp.minimum(r - eta, 0.0), 0.0)


@typechecked
def delta_step_rewards(
  step_rewards: Float[In, "B S"],
  step_mask: Bool[In, "B S"],
  *,
  last_step: str = "zero",
) -> Float[Out, "B S"]:
  r"""Delta refinement of learned step rewards: ``r_s - r_{s+1}``.

  Gao et al. (2024): the return-to-go telescopes,
  ``Σ_{s'≥s} r̃_{s'} = r_s - r_S`` (``last_step="zero"``, the final step's
  process reward is dropped, as the paper's Delta figure shows) or ``= r_s``
  (``last_step="keep"``, ``r̃_S = r_S``), so the return is bounded by one
  step reward whatever the trajectory length. Steps must be right-padded.

  Args:
    step_rewards: PRM step rewards ``[B, S]``; no gradient.
    step_mask: bool ``[B, S]``, a valid prefix of each row.
    last_step: ``"zero"`` or ``"keep"`` (see above). The paper text we
      could access does not state the last step's value unambiguously.

  Returns:
    float32 ``[B, S]``, 0 on masked steps.

  References:
    Gao et al., `On Designing Effective RL Reward at Training Time for LLM
    Reasoning <https://arxiv.org/abs/2410.15115>`_, 2024.
  """
  if last_step not in DELTA_LAST_STEP:
    raise ValueError(
      f"delta_step_rewards: unknown last_step={last_step!r}; "
      f"valid choices are {DELTA_LAST_STEP}."
    )
  mask = jnp.asarray(step_mask, bool)
  r = _masked(step_rewards, mask)
  following = jnp.concatenate([r[:, 1:], jnp.zeros_like(r[:, :1])], axis=1)
  last = _last_valid(mask)
  final = r if last_step == "keep" else jnp.zeros_like(r)
  return jnp.where(mask, jnp.where(last, final, r - following), 0.0)


# ----------------------------------------------------------------------------
# SPA-RL.


@typechecked
def spa_step_rewards(
  progress: Float[In, "B S"],
  grounded: Bool[In, "B S"],
  step_mask: Bool[In, "B S"],
  *,
  progress_weight: float = 1.0,
  grounding_reward: float = 0.5,
) -> Float[Out, "B S"]:
  r"""SPA-RL step rewards: estimated progress plus a grounding bonus.

  .. math:: r_s = α\, \hat c_s + β\, g_s

  (Wang et al. 2025): ``ĉ_s`` is the progress estimator's
  contribution of step ``s`` (trained with :func:`spa_progress_loss` so
  that contributions sum to the final reward) and ``g_s`` is 1 when the
  agent's action could be executed by the environment. The released
  scripts give executable actions 0.5 (``grounding_reward``).

  Args:
    progress: per-step contributions ``ĉ`` ``[B, S]``; no gradient.
    grounded: bool ``[B, S]``, True where the action was executable.
    step_mask: bool ``[B, S]`` of real steps.
    progress_weight: α.
    grounding_reward: β, the reward of a grounded step.

  Returns:
    float32 ``[B, S]`` step rewards, 0 on masked steps; feed them (on the
    step's last token) to GAE/PPO.

  References:
    Wang et al., `SPA-RL: Reinforcing LLM Agents via Stepwise Progress
    Attribution <https://arxiv.org/abs/2505.20732>`_, 2025.
  """
  mask = jnp.asarray(step_mask, bool)
  c = _masked(progress, mask)
  bonus = jnp.where(jnp.asarray(grounded, bool), grounding_reward, 0.0)
  return jnp.where(mask, progress_weight * c + bonus, 0.0)


@typechecked
def spa_progress_loss(
  progress: Float[In, "B S"],
  final_rewards: Float[In, "B"],
  step_mask: Bool[In, "B S"],
) -> Float[Out, "B"]:
  r"""SPA-RL progress-estimator loss ``(Σ_s ĉ_s - R)²`` per trajectory.

  The estimator's step contributions must add up to the task outcome
  ``R`` (Wang et al. 2025); the loss is 0 iff they do, and is
  invariant to permuting steps.

  Args:
    progress: predicted contributions ``ĉ`` ``[B, S]``; receives gradient.
    final_rewards: outcome ``R`` of each trajectory; no gradient.
    step_mask: bool ``[B, S]`` of real steps (NaN-safe).

  Returns:
    float32 ``[B]`` squared errors, not reduced.

  References:
    Wang et al., `SPA-RL: Reinforcing LLM Agents via Stepwise Progress
    Attribution <https://arxiv.org/abs/2505.20732>`_, 2025.
  """
  mask = jnp.asarray(step_mask, bool)
  total = jnp.sum(jnp.where(mask, _f32(progress), 0.0), axis=-1)
  error = total - jax.lax.stop_gradient(_f32(final_rewards))
  return error * error


# ----------------------------------------------------------------------------
# IGPO.


@typechecked
def information_gain_rewards(
  answer_logps: Float[In, "B S"],
  initial_answer_logps: Float[In, "B"],
  turn_mask: Bool[In, "B S"],
) -> Float[Out, "B S"]:
  r"""IGPO information gain of each agent turn.

  .. math::
    p_s = \exp\Big(\frac{1}{L}\sum_j \log π_θ(a_j | x, τ_{≤s}, a_{<j})\Big),
    \qquad IG_s = p_s - p_{s-1},

  Wang et al. (2025): ``p_s`` is the policy's length-normalised
  probability of the ground-truth answer ``a`` (teacher-forced) after turn
  ``s``, ``p_0`` before the first turn. ``Σ_s IG_s = p_S - p_0``.

  Args:
    answer_logps: mean token log-prob of the ground-truth answer after each
      turn ``[B, S]``; no gradient.
    initial_answer_logps: the same before any turn ``[B]``; no gradient.
    turn_mask: bool ``[B, S]``, a valid prefix of each row.

  Returns:
    float32 ``[B, S]`` information gains, 0 on masked turns.

  References:
    Wang et al., `Information Gain-based Policy Optimization: A Simple and
    Effective Approach for Multi-Turn LLM Agents
    <https://arxiv.org/abs/2510.14967>`_, 2025.
  """
  mask = jnp.asarray(turn_mask, bool)
  p = jnp.exp(jnp.where(mask, _f32(answer_logps), 0.0))
  p0 = jnp.exp(_f32(initial_answer_logps))[:, None]
  previous = jnp.concatenate([p0, p[:, :-1]], axis=1)
  return jax.lax.stop_gradient(jnp.where(mask, p - previous, 0.0))


@typechecked
def igpo_advantages(
  information_gain: Float[In, "B G S"],
  outcome_rewards: Float[In, "B G"],
  turn_mask: Bool[In, "B G S"],
  *,
  gamma: float = 1.0,
  normalization: str = "joint",
  scale_std: bool = True,
  epsilon: float = 1e-6,
) -> Float[Out, "B G S"]:
  r"""IGPO turn-level advantages.

  Wang et al. (2025) and the authors' code
  (``compute_grpo_outcome_advantage`` in ``GuoqingWang1/IGPO``): the reward of
  each turn but the last is its information gain; the last valid turn gets
  the outcome reward (answer F1, or a format penalty). Rewards are
  normalised per prompt,

  * ``"joint"``: over all valid turn rewards of the group's ``G``
    trajectories together;
  * ``"separate"``: information gains and outcomes each among themselves;

  as ``(r - mean) / (std + ε)`` with the authors' ``std = sqrt(var +
  1e-8)`` (population variance; ``scale_std=False`` only centres; all-equal
  sets give 0), and accumulated backwards over turns,
  ``A_s = r̂_s + γ A_{s+1}``. Every token of turn ``s`` gets ``A_s``.
  Deviation: the authors' code (``GuoqingWang1/IGPO``, ``core_algos.py``)
  drops turns whose information gain is exactly 0 from the statistics and
  merges their tokens into the next turn; here every valid turn counts.

  Args:
    information_gain: :func:`information_gain_rewards` ``[B, G, S]``; the
      entry of the last valid turn is ignored; no gradient.
    outcome_rewards: ``[B, G]`` final-answer rewards; no gradient.
    turn_mask: bool ``[B, G, S]``, a valid prefix per trajectory.
    gamma: turn-level discount γ in [0, 1] (default 1).
    normalization: ``"joint"`` or ``"separate"``.
    scale_std: divide by the std (True) or only centre.
    epsilon: ε added to the std.

  Returns:
    float32 ``[B, G, S]`` turn advantages, 0 on masked turns.

  References:
    Wang et al., `Information Gain-based Policy Optimization: A Simple and
    Effective Approach for Multi-Turn LLM Agents
    <https://arxiv.org/abs/2510.14967>`_, 2025.
  """
  fn = "igpo_advantages"
  if normalization not in _IGPO_NORMALIZATIONS:
    raise ValueError(
      f"{fn}: unknown normalization={normalization!r}; valid "
      f"choices are {_IGPO_NORMALIZATIONS}."
    )
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"{fn}: gamma must be in [0, 1], got {gamma}.")
  if not epsilon >= 0:
    raise ValueError(f"{fn}: epsilon must be >= 0, got {epsilon}.")
  _check_group_size(fn, information_gain, "information_gain")
  b, g, s = information_gain.shape
  mask = jnp.asarray(turn_mask, bool)
  last = _last_valid(mask)
  gains = _masked(information_gain, mask & ~last)
  outcome = jax.lax.stop_gradient(_f32(outcome_rewards))
  rewards = jnp.where(last, outcome[..., None], gains)

  def normalise(values, keep):
    # Authors' statistics: population variance + 1e-8 under the root, std 1
    # for sets of <= 1 reward; exact 0 for all-equal sets.
    count = jnp.sum(keep, axis=(1, 2), keepdims=True, dtype=jnp.float32)
    kept = jnp.where(keep, values, 0.0)
    mean = safe_divide(jnp.sum(kept, axis=(1, 2), keepdims=True), count)
    highest = jnp.max(jnp.where(keep, values, -jnp.inf), (1, 2), keepdims=True)
    lowest = jnp.min(jnp.where(keep, values, jnp.inf), (1, 2), keepdims=True)
    centred = jnp.where(keep & (highest > lowest), values - mean, 0.0)
    if not scale_std:
      return centred
    var = safe_divide(
      jnp.sum(centred * centred, axis=(1, 2), keepdims=True), count
    )
    std = jnp.where(count > 1, jnp.sqrt(var + 1e-8), 1.0)
    return centred / (std + epsilon)

  if normalization == "joint":
    normed = normalise(rewards, mask)
  else:
    normed = normalise(rewards, mask & ~last) + normalise(rewards, last)
  return _reverse_cumsum(normed, mask, gamma)


# ----------------------------------------------------------------------------
# Arena ranking.


@typechecked
def arena_rank_advantages(
  preferences: Float[In, "B G G"],
  sample_mask: Bool[In, "B G"] | None = None,
  *,
  scale: str = "group",
  epsilon: float = 1e-6,
) -> Float[Out, "B G"]:
  r"""Relative-ranking advantages from a pairwise judge (round robin).

  ArenaRL (Zhang et al. 2026) replaces pointwise reward-model scores, which
  collapse into a narrow band within a group, by intra-group pairwise
  comparisons. This computes the full round-robin reference its
  tournament approximates: sample ``g``'s win rate against the other valid
  samples of its group,

  .. math::
    w_g = \frac{1}{n-1}\sum_{h \ne g} P(y_g \succ y_h),

  (a Borda score; for a transitive judge, ``w`` is a linear function of the
  rank) normalised within the group like GRPO. The seeded single-elimination
  bracket, its anchor seeding and the paper's exact rank-to-advantage map
  are not implemented: we could not confirm them from the paper text.

  Args:
    preferences: ``P[b, g, h]`` = probability (or 0/1 verdict) that sample
      ``g`` beats sample ``h``; the diagonal is ignored; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.
    scale: group normalisation of the win rates, one of
      ``STD_SCALINGS`` (``"batch"`` uses the batch std).
    epsilon: ε added to the std.

  Returns:
    float32 ``[B, G]``, 0 for masked samples and for groups where all win
    rates are equal.

  References:
    Zhang et al., `ArenaRL: Scaling RL for Open-Ended Agents via
    Tournament-based Relative Ranking <https://arxiv.org/abs/2601.06487>`_,
    2026.
  """
  fn = "arena_rank_advantages"
  if scale not in STD_SCALINGS:
    raise ValueError(
      f"{fn}: unknown scale={scale!r}; valid choices are {STD_SCALINGS}."
    )
  _check_group_size(fn, preferences, "preferences")
  g = preferences.shape[1]
  valid = (
    jnp.ones(preferences.shape[:2], bool)
    if sample_mask is None
    else jnp.asarray(sample_mask, bool)
  )
  pair = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(g, dtype=bool)[None]
  p = _masked(preferences, pair)
  others = jnp.sum(pair, axis=-1, dtype=jnp.float32)
  win_rate = safe_divide(jnp.sum(p, axis=-1), others)
  return grpo_advantages(win_rate, valid, scale=scale, epsilon=epsilon)


REGISTRY = {
  "prime": prime_advantages,
  "pure_min": pure_advantages,
  "igpo": igpo_advantages,
  "arena_rank": arena_rank_advantages,
}

STEP_REWARD_TRANSFORMS = {
  "min_form": min_form_credit,
  "clip": clip_step_rewards,
  "delta": delta_step_rewards,
  "spa": spa_step_rewards,
  "information_gain": information_gain_rewards,
  "prime_implicit": prime_token_rewards,
}
"""Step/token reward constructors by name (inputs to an estimator)."""
