"""Masked returns and generalized advantage estimation over token sequences.

All functions here take right-padded token-level arrays ``[B, T]`` with a
bool ``completion_mask`` and run one reverse ``jax.lax.scan`` over ``T``.
Positions where the mask is False are skipped: the recursion carries the
value and the running estimate of the next *valid* position over them (the
verl / TRL-PPO / Tunix convention, which also handles masked observation
tokens inside a multi-turn completion), and they come out as exactly 0.

Conventions (token ``t`` is an action; ``V_t`` is the value of the state
before it, ``r_t`` the reward received after it):

* the value after the last valid token is ``bootstrap_values[b]``: pass
  ``V(s_T)`` for sequences that were *truncated* (hit the length limit) and
  0 for sequences that terminated (the default when ``None``);
* ``gamma`` is the discount γ and ``lam`` the GAE / TD(λ) mixing λ.

With a right-padded row of ``L`` valid tokens these equal, to float
precision, ``rlax`` applied to the row's first ``L`` entries (checked against
rlax 0.1.9 goldens in ``tests/advantages/gae_test.py``):

* ``generalized_advantage_estimation`` ↔
  ``rlax.truncated_generalized_advantage_estimation(r[:L], γ·1, λ,
  concat(V[:L], [bootstrap]))``;
* ``lambda_returns`` ↔ ``rlax.lambda_returns(r[:L], γ·1,
  concat(V[1:L], [bootstrap]), λ)``;
* ``discounted_returns`` ↔ ``rlax.discounted_returns(r[:L], γ·1,
  bootstrap)``.

Every output is a *target*: it carries no gradient into ``rewards``,
``values`` or ``bootstrap_values``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float

from alignment.array_types import In, Out, typechecked

__all__ = [
  "GAEOutput",
  "discounted_returns",
  "generalized_advantage_estimation",
  "lambda_returns",
]


class GAEOutput(NamedTuple):
  """Advantages and value targets from :func:`generalized_advantage_estimation`.

  Both are float32 ``[B, T]``, 0 where ``completion_mask`` is False, and carry
  no gradient.
  """

  advantages: Float[Out, "B T"]
  returns: Float[Out, "B T"]


def _check_unit_interval(fn: str, name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}.")


def _prepare(rewards, values, completion_mask, bootstrap_values):
  """float32, masked with `where` (NaN-safe), gradients stopped."""
  mask = jnp.asarray(completion_mask, bool)
  r = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
  v = None
  if values is not None:
    v = jnp.where(mask, jnp.asarray(values, jnp.float32), 0.0)
  if bootstrap_values is None:  # zeros_like keeps shard_map's varying axes
    boot = jnp.zeros_like(r[:, 0])
  else:
    boot = jnp.asarray(bootstrap_values, jnp.float32)
  r, v, boot = jax.lax.stop_gradient((r, v, boot))
  return r, v, boot, mask


def _reverse_scan(step, init, *xs):
  """Runs ``step`` from t = T-1 down to 0 over ``[B, T]`` arrays."""
  _, out = jax.lax.scan(step, init, tuple(x.T for x in xs), reverse=True)
  return out.T


@typechecked
def generalized_advantage_estimation(
  rewards: Float[In, "B T"],
  values: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  bootstrap_values: Float[In, "B"] | None = None,
  *,
  gamma: float = 1.0,
  lam: float = 0.95,
) -> GAEOutput:
  r"""Generalized advantage estimation on masked, right-padded sequences.

  Schulman et al. (2016), computed backwards over valid tokens:

  .. math::
    δ_t = r_t + γ V_{t'} - V_t, \qquad Â_t = δ_t + γλ Â_{t'},

  where ``t'`` is the next valid token after ``t`` (``V_{t'}`` is
  ``bootstrap_values`` and ``Â_{t'} = 0`` after the last one). The value
  targets are ``returns = Â + V`` (the TD(λ) returns). No whitening is
  applied; PPO implementations whiten afterwards with
  :func:`alignment.ops.masked_whiten`.

  Args:
    rewards: per-token rewards ``r_t`` (e.g. KL penalty on every token plus
      the sequence score on the last valid token); no gradient.
    values: critic values ``V_t`` of the state before token ``t``; no
      gradient (the value loss differentiates its own prediction).
    completion_mask: bool, True on completion tokens that are actions.
    bootstrap_values: ``V`` after the last valid token of each sequence:
      the critic's value for truncated sequences, 0 for terminated ones
      (``None`` means all sequences terminated); no gradient.
    gamma: discount γ in [0, 1]; LLM RL usually uses 1.
    lam: GAE λ in [0, 1]; 0 gives the one-step TD error, 1 the Monte-Carlo
      return minus the value.

  Returns:
    :class:`GAEOutput` ``(advantages, returns)``: float32 ``[B, T]``, not
    reduced, 0 on masked positions, no gradient.

  References:
    Schulman et al., `High-Dimensional Continuous Control Using Generalized
    Advantage Estimation <https://arxiv.org/abs/1506.02438>`_, 2016.
  """
  fn = "generalized_advantage_estimation"
  _check_unit_interval(fn, "gamma", gamma)
  _check_unit_interval(fn, "lam", lam)
  r, v, boot, mask = _prepare(
    rewards, values, completion_mask, bootstrap_values
  )

  def step(carry, x):
    next_value, next_adv = carry
    r_t, v_t, m_t = x
    adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
    adv = jnp.where(m_t, adv, 0.0)
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
    return carry, adv

  advantages = _reverse_scan(step, (boot, jnp.zeros_like(boot)), r, v, mask)
  returns = jnp.where(mask, advantages + v, 0.0)
  return GAEOutput(advantages, returns)


@typechecked
def lambda_returns(
  rewards: Float[In, "B T"],
  values: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  bootstrap_values: Float[In, "B"] | None = None,
  *,
  gamma: float = 1.0,
  lam: float = 1.0,
) -> Float[Out, "B T"]:
  r"""TD(λ) returns on masked, right-padded sequences.

  The recursive form of Sutton & Barto (2018), Eq. 12.18:

  .. math::
    G_t = r_t + γ [(1 - λ) V_{t'} + λ G_{t'}],

  with ``t'`` the next valid token and ``V_{t'} = G_{t'} =``
  ``bootstrap_values`` after the last one. ``G = Â^{GAE} + V`` for the same
  γ and λ; λ = 1 gives the discounted Monte-Carlo return and λ = 0 the
  one-step TD target ``r_t + γ V_{t'}``.

  Args:
    rewards: per-token rewards; no gradient.
    values: critic values ``V_t`` of the state before token ``t``; no
      gradient.
    completion_mask: bool, True on valid tokens.
    bootstrap_values: value after the last valid token (truncation), 0 or
      ``None`` for terminated sequences; no gradient.
    gamma: discount γ in [0, 1].
    lam: mixing λ in [0, 1].

  Returns:
    float32 ``[B, T]`` returns, 0 on masked positions, no gradient.

  References:
    Sutton & Barto, `Reinforcement Learning: An Introduction
    <http://incompleteideas.net/book/the-book-2nd.html>`_, 2nd ed., 2018;
    ``rlax.lambda_returns``.
  """
  fn = "lambda_returns"
  _check_unit_interval(fn, "gamma", gamma)
  _check_unit_interval(fn, "lam", lam)
  r, v, boot, mask = _prepare(
    rewards, values, completion_mask, bootstrap_values
  )

  def step(carry, x):
    next_value, next_return = carry
    r_t, v_t, m_t = x
    g = r_t + gamma * ((1.0 - lam) * next_value + lam * next_return)
    g = jnp.where(m_t, g, 0.0)
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, g, next_return))
    return carry, g

  return _reverse_scan(step, (boot, boot), r, v, mask)


@typechecked
def discounted_returns(
  rewards: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  bootstrap_values: Float[In, "B"] | None = None,
  *,
  gamma: float = 1.0,
) -> Float[Out, "B T"]:
  r"""Discounted reward-to-go on masked, right-padded sequences.

  .. math::
    G_t = r_t + γ G_{t'}, \qquad G_{\text{end}} = \text{bootstrap}.

  With γ = 1 this is the masked reverse cumulative sum used by REINFORCE,
  REINFORCE++ and ReMax when the reward has per-token terms.

  Args:
    rewards: per-token rewards; no gradient.
    completion_mask: bool, True on valid tokens.
    bootstrap_values: value after the last valid token, ``None`` for 0; no
      gradient.
    gamma: discount γ in [0, 1].

  Returns:
    float32 ``[B, T]`` returns, 0 on masked positions, no gradient.

  References:
    Williams, `Simple Statistical Gradient-Following Algorithms for
    Connectionist Reinforcement Learning
    <https://doi.org/10.1007/BF00992696>`_, 1992; ``rlax.discounted_returns``.
  """
  _check_unit_interval("discounted_returns", "gamma", gamma)
  r, _, boot, mask = _prepare(rewards, None, completion_mask, bootstrap_values)

  def step(next_return, x):
    r_t, m_t = x
    g = jnp.where(m_t, r_t + gamma * next_return, 0.0)
    return jnp.where(m_t, g, next_return), g

  return _reverse_scan(step, boot, r, mask)


REGISTRY = {
  "gae": generalized_advantage_estimation,
  "lambda_returns": lambda_returns,
  "discounted_returns": discounted_returns,
}
