r"""Policy-gradient objectives, one value per completion token.

Every objective here maps per-token log-probabilities of sampled completions
to an **unreduced** loss (``[B, T]``, zero where ``completion_mask`` is False)
plus a ``NamedTuple`` of per-token diagnostics. Reduction is a separate, named
choice, made with :func:`alignment.ops.aggregate_token_loss`:

==================  ==========================================================
mode                what it reproduces
==================  ==========================================================
``token_mean``      DAPO, TRL ``dapo``/``cispo`` (global active-token count)
``sequence_mean``   GRPO as published, TRL ``grpo``/``sapo``; GSPO; GMPO
``sequence_sum``    verl ``seq-mean-token-sum``
``constant_norm``   Dr. GRPO, TRL ``dr_grpo`` (``max_tokens`` = max length)
==================  ==========================================================

``aggregate_token_loss`` returns ``WeightedMean(total, weight)``; the weight
never depends on the parameters, so summing totals and weights over
micro-batches or devices before one division gives exactly the full-batch
loss and gradient. TRL's ``bnpo`` normalises every micro-batch by its own
token count and is *not* invariant; :func:`bnpo_aggregate` reproduces it for
comparison only.

Conventions shared by every function:

* ``token_logps`` is differentiated; ``old_token_logps``, ``ref_token_logps``,
  ``advantages``, rewards, entropies and values targets receive no gradient
  (``stop_gradient`` is applied inside).
* Masks are bool and applied with ``where`` before any ``exp``/``log``, so
  padded entries (even NaN) change neither value nor gradient.
* Any float dtype in, float32 out.
* ``advantages`` may be per sequence ``[B]`` (broadcast over tokens) or per
  token ``[B, T]`` unless a docstring says otherwise.
* A KL penalty is not part of these losses: add
  ``beta * ops.kl_estimate(token_logps, ref_token_logps)`` (TRL multiplies it
  by ``aux.ratio`` when ``use_bias_correction_kl=True``).

Sequence-level objectives over groups (:func:`copg_loss`, :func:`prdp_loss`)
return one value per prompt ``[B]`` and reduce with
``ops.aggregate_sequence_loss``. Selection objectives (:func:`raft_loss`,
:func:`superhf_loss`) take ``[B, G, T]`` groups and return ``[B, G, T]``.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int

from alignment.array_types import In, Out, typechecked
from alignment.losses._checks import f32 as _f32
from alignment.ops import _kl, _masked

__all__ = [
  "PolicyAux",
  "EmpgAux",
  "StableReinforceAux",
  "ValueAux",
  "CopgAux",
  "PrdpAux",
  "SelectionAux",
  "reinforce_loss",
  "ppo_loss",
  "grpo_loss",
  "dapo_loss",
  "gspo_loss",
  "gspo_token_loss",
  "cispo_loss",
  "gmpo_loss",
  "sapo_loss",
  "stable_reinforce_loss",
  "empg_advantages",
  "empg_loss",
  "copg_loss",
  "prdp_loss",
  "best_of_k_mask",
  "raft_loss",
  "superhf_loss",
  "rto_token_rewards",
  "clipped_value_loss",
  "entropy_bonus_loss",
  "bnpo_aggregate",
]

AxisName = _masked.AxisName
_sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------
# Diagnostics.


class PolicyAux(NamedTuple):
  """Per-token diagnostics of a policy loss; zero/False on padding.

  Attributes:
    ratio: the importance weight the objective uses, ``π/π_old`` per token,
      or the per-sequence ratio broadcast over tokens (GSPO, GMPO);
      stop-gradiented. 1 for REINFORCE.
    clipped: True where clipping was active on the token: for the clipped
      surrogates, where the clip removed the token's gradient (TRL's
      ``clip_ratio/region``); for CISPO, where the IS weight was truncated.
  """

  ratio: Float[Out, "B T"]
  clipped: Bool[Out, "B T"]


class EmpgAux(NamedTuple):
  """:class:`PolicyAux` plus the entropy-modulated advantages used."""

  ratio: Float[Out, "B T"]
  clipped: Bool[Out, "B T"]
  advantages: Float[Out, "B T"]


class StableReinforceAux(NamedTuple):
  """:class:`PolicyAux` plus the advantage filter's keep mask."""

  ratio: Float[Out, "B T"]
  clipped: Bool[Out, "B T"]
  kept: Bool[Out, "B T"]


class ValueAux(NamedTuple):
  """Per-token diagnostics of the clipped value loss."""

  clipped: Bool[Out, "B T"]
  value_error: Float[Out, "B T"]


class CopgAux(NamedTuple):
  """KL-regularised rewards ``R − β·log(π/π_ref)`` per sample (no gradient)."""

  regularized_rewards: Float[Out, "B G"]


class PrdpAux(NamedTuple):
  """Predicted rewards ``β·Σ_t clip(log π/π_old)`` per sample (no gradient)."""

  predicted_rewards: Float[Out, "B G"]


class SelectionAux(NamedTuple):
  """Which completions were kept, and the token mask to aggregate with.

  Attributes:
    selected: True for the completions kept by best-of-K selection.
    loss_mask: ``completion_mask`` restricted to the selected completions;
      aggregate with it, e.g. ``aggregate_token_loss(loss.reshape(-1, T),
      aux.loss_mask.reshape(-1, T))``.
  """

  selected: Bool[Out, "B G"]
  loss_mask: Bool[Out, "B G T"]


# ---------------------------------------------------------------------------
# Shared pieces.


def _check_positive(name, value):
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}.")


def _check_non_negative(name, value):
  if not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}.")


def _check_epsilons(fn, epsilon_low, epsilon_high):
  if not 0 <= epsilon_low < 1:
    raise ValueError(f"{fn}: epsilon_low must be in [0, 1), got {epsilon_low}.")
  if not epsilon_high >= 0:
    raise ValueError(f"{fn}: epsilon_high must be >= 0, got {epsilon_high}.")


def _prepare(token_logps, old_token_logps, advantages, completion_mask):
  """Masked f32 log-probs, stop-gradiented old log-probs and advantages."""
  mask = jnp.asarray(completion_mask, bool)
  logps = jnp.where(mask, _f32(token_logps), 0.0)
  old = None
  if old_token_logps is not None:
    old = _sg(jnp.where(mask, _f32(old_token_logps), 0.0))
  adv = _f32(advantages)
  if adv.ndim == 1:
    adv = jnp.broadcast_to(adv[:, None], mask.shape)
  adv = _sg(jnp.where(mask, adv, 0.0))
  return logps, old, adv, mask


def _clipped_objective(
  ratio, adv, epsilon_low, epsilon_high, *, delta=None, dual_clip=None
):
  """``-min(ρA, clip(ρ)A)`` with optional TRL ``delta`` / dual clip."""
  low, high = 1.0 - epsilon_low, 1.0 + epsilon_high
  unclipped_ratio = ratio if delta is None else jnp.minimum(ratio, delta)
  objective = jnp.minimum(
    unclipped_ratio * adv, jnp.clip(ratio, low, high) * adv
  )
  clipped = ((ratio > high) & (adv > 0)) | ((ratio < low) & (adv < 0))
  if delta is not None:
    clipped = clipped | ((ratio > delta) & (adv < 0))
  if dual_clip is not None:
    objective = jnp.where(
      adv < 0, jnp.maximum(objective, dual_clip * adv), objective
    )
    clipped = clipped | ((ratio > dual_clip) & (adv < 0))
  return -objective, clipped


def _sequence_mean(x, mask):
  """Mean over the valid tokens of each row (0 for an empty row)."""
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=-1)
  count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  return _masked.safe_divide(total, count)


def _finish(per_token, ratio, clipped, mask):
  per_token = jnp.where(mask, per_token, 0.0)
  return per_token, PolicyAux(_sg(jnp.where(mask, ratio, 0.0)), clipped & mask)


# ---------------------------------------------------------------------------
# Token-level policy losses.


@typechecked
def reinforce_loss(
  token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""REINFORCE (score-function) loss, per token.

  .. math::
    \ell_t = -\hat A_t \log\pi_\theta(y_t \mid x, y_{<t})

  Its gradient is the likelihood-ratio policy gradient (Williams 1992,
  with a baseline folded into ``advantages``); on-policy it equals the
  gradient of every clipped surrogate below.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.ratio`` is 1 and ``aux.clipped`` False on completion tokens.

  References:
    Williams, `Simple statistical gradient-following algorithms for
    connectionist reinforcement learning
    <https://doi.org/10.1007/BF00992696>`_, 1992.
  """
  logps, _, adv, mask = _prepare(token_logps, None, advantages, completion_mask)
  return _finish(-adv * logps, jnp.ones_like(logps), jnp.zeros_like(mask), mask)


@typechecked
def ppo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon: float = 0.2,
  dual_clip: float | None = None,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""PPO clipped surrogate, per token, with optional dual clip.

  Eq. 7 of Schulman et al. (2017), with :math:`\rho_t = \exp(\log\pi_\theta
  - \log\pi_{old})`:

  .. math::
    \ell_t = -\min(\rho_t \hat A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon,
    1+\epsilon)\hat A_t)

  With ``dual_clip`` = c > 1 (Ye et al. 2020), tokens with
  :math:`\hat A_t < 0` use :math:`\max(\min(\cdot), c\hat A_t)`, which bounds
  the loss of a negative-advantage token whose ratio has exploded by
  :math:`c|\hat A_t|` (and zeroes its gradient beyond :math:`\rho > c`).

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon: clip range ε; in [0, 1).
    dual_clip: the constant c > 1 of dual-clip PPO (Ye et al. use 3), or
      None for plain PPO.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding, and
    per-token ratios and clip flags.

  References:
    Schulman et al., `Proximal Policy Optimization Algorithms
    <https://arxiv.org/abs/1707.06347>`_, 2017.
    Ye et al., `Mastering Complex Control in MOBA Games with Deep
    Reinforcement Learning <https://arxiv.org/abs/1912.09729>`_, 2020.
  """
  _check_epsilons("ppo_loss", epsilon, epsilon)
  if dual_clip is not None and not dual_clip > 1:
    raise ValueError(f"ppo_loss: dual_clip must be > 1, got {dual_clip}.")
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  ratio = jnp.exp(logps - old)
  loss, clipped = _clipped_objective(
    ratio, adv, epsilon, epsilon, dual_clip=dual_clip
  )
  return _finish(loss, ratio, clipped, mask)


@typechecked
def grpo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon_low: float = 0.2,
  epsilon_high: float = 0.2,
  delta: float | None = None,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""GRPO clipped surrogate with DAPO clip-higher, per token.

  The policy term of Eq. 3 of Shao et al. (2024) with DAPO's decoupled clip
  range (Yu et al. 2025):

  .. math::
    \ell_{i,t} = -\min(\rho_{i,t}\hat A_{i,t},\ \mathrm{clip}(\rho_{i,t},
    1-\epsilon_{low}, 1+\epsilon_{high})\hat A_{i,t})

  ``delta`` is TRL's two-sided clip (INTELLECT-2): the unclipped ratio is
  capped, :math:`\min(\rho, \delta)`, which for negative advantages equals
  dual-clip PPO with c = δ. The KL term of Eq. 3 is added by the caller
  (module docstring). Reduce with ``sequence_mean`` for GRPO as published,
  ``token_mean`` for DAPO, ``constant_norm`` for Dr. GRPO.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` (group-normalised) or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon_low: lower clip range ε_low; in [0, 1).
    epsilon_high: upper clip range ε_high >= 0 (DAPO recommends 0.28).
    delta: TRL's upper clamp on the unclipped ratio, > 1 + ε_high; None
      disables it.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding, and
    per-token ratios and clip flags.

  References:
    Shao et al., `DeepSeekMath: Pushing the Limits of Mathematical Reasoning
    in Open Language Models <https://arxiv.org/abs/2402.03300>`_, 2024.
    Yu et al., `DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale <https://arxiv.org/abs/2503.14476>`_, 2025.
    Prime Intellect, `INTELLECT-2 <https://arxiv.org/abs/2505.07291>`_, 2025.
  """
  _check_epsilons("grpo_loss", epsilon_low, epsilon_high)
  if delta is not None and not delta > 1.0 + epsilon_high:
    raise ValueError(
      f"grpo_loss: delta must be > 1 + epsilon_high = "
      f"{1.0 + epsilon_high}, got {delta}."
    )
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  ratio = jnp.exp(logps - old)
  loss, clipped = _clipped_objective(
    ratio, adv, epsilon_low, epsilon_high, delta=delta
  )
  return _finish(loss, ratio, clipped, mask)


@typechecked
def dapo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon_low: float = 0.2,
  epsilon_high: float = 0.28,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""DAPO's token-level clipped objective: :func:`grpo_loss` at ε_high=0.28.

  The clipped objective of Yu et al. (2025). DAPO normalises by the number
  of tokens in the batch: reduce with
  ``aggregate_token_loss(..., mode="token_mean")``.
  Dynamic sampling and overlong shaping are data/reward-side and live
  elsewhere.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon_low: ε_low; in [0, 1).
    epsilon_high: ε_high ("clip-higher"), the paper's 0.28 by default.

  Returns:
    ``(loss, aux)`` as :func:`grpo_loss`.

  References:
    Yu et al., `DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale <https://arxiv.org/abs/2503.14476>`_, 2025.
  """
  return grpo_loss(
    token_logps,
    old_token_logps,
    advantages,
    completion_mask,
    epsilon_low=epsilon_low,
    epsilon_high=epsilon_high,
  )


def _gspo_ratios(logps, old, mask):
  """Length-normalised sequence ratio ``s_i`` of GSPO, ``[B]``."""
  log_ratio = jnp.where(mask, logps - old, 0.0)
  return jnp.exp(_sequence_mean(log_ratio, mask))


@typechecked
def gspo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon_low: float = 3e-4,
  epsilon_high: float = 4e-4,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""GSPO: clipped surrogate on the sequence-level importance ratio.

  Zheng et al. (2025), the GSPO objective and its sequence ratio:

  .. math::
    s_i = \Big(\frac{\pi_\theta(y_i|x)}{\pi_{old}(y_i|x)}\Big)^{1/|y_i|}
        = \exp\Big(\frac{1}{|y_i|}\sum_t \log\frac{\pi_\theta(y_{i,t})}
          {\pi_{old}(y_{i,t})}\Big), \qquad
    \ell_i = -\min(s_i \hat A_i,\ \mathrm{clip}(s_i, 1-\epsilon_{low},
    1+\epsilon_{high})\hat A_i)

  The sequence loss is written on every completion token, so
  ``aggregate_token_loss(..., mode="sequence_mean")`` gives the paper's
  ``1/G Σ_i ℓ_i`` (TRL ``importance_sampling_level="sequence"``). With
  ``[B, T]`` advantages the clip is applied per token with the shared
  :math:`s_i` (TRL's behaviour).

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon_low: left clip range (paper: 3e-4); in [0, 1).
    epsilon_high: right clip range (paper: 4e-4).

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.ratio`` is :math:`s_i` broadcast over the tokens.

  References:
    Zheng et al., `Group Sequence Policy Optimization
    <https://arxiv.org/abs/2507.18071>`_, 2025.
  """
  _check_epsilons("gspo_loss", epsilon_low, epsilon_high)
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  ratio = jnp.broadcast_to(_gspo_ratios(logps, old, mask)[:, None], mask.shape)
  loss, clipped = _clipped_objective(ratio, adv, epsilon_low, epsilon_high)
  return _finish(loss, ratio, clipped, mask)


@typechecked
def gspo_token_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon_low: float = 3e-4,
  epsilon_high: float = 4e-4,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""GSPO-token: the sequence ratio with a per-token gradient path.

  Zheng et al. (2025), the GSPO-token variant:

  .. math::
    s_{i,t} = \mathrm{sg}[s_i]\cdot\frac{\pi_\theta(y_{i,t})}
      {\mathrm{sg}[\pi_\theta(y_{i,t})]}, \qquad
    \ell_{i,t} = -\min(s_{i,t}\hat A_{i,t},\ \mathrm{clip}(s_{i,t},
    1-\epsilon_{low}, 1+\epsilon_{high})\hat A_{i,t})

  :math:`s_{i,t}` equals :math:`s_i` in value. With per-sequence advantages
  the loss and its gradient equal :func:`gspo_loss` under every aggregation
  mode; per-token advantages ``[B, T]`` are what this variant is for.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon_low: left clip range (paper: 3e-4); in [0, 1).
    epsilon_high: right clip range (paper: 4e-4).

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding.

  References:
    Zheng et al., `Group Sequence Policy Optimization
    <https://arxiv.org/abs/2507.18071>`_, 2025.
  """
  _check_epsilons("gspo_token_loss", epsilon_low, epsilon_high)
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  seq_ratio = _sg(_gspo_ratios(logps, old, mask))
  ratio = seq_ratio[:, None] * jnp.exp(logps - _sg(logps))
  loss, clipped = _clipped_objective(ratio, adv, epsilon_low, epsilon_high)
  return _finish(loss, ratio, clipped, mask)


@typechecked
def cispo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon_low: float | None = None,
  epsilon_high: float = 4.0,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""CISPO: REINFORCE with a clipped, stop-gradient importance weight.

  MiniMax (2025), the CISPO objective:

  .. math::
    \hat r_{i,t} = \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low},
      1+\epsilon_{high}), \qquad
    \ell_{i,t} = -\mathrm{sg}(\hat r_{i,t})\,\hat A_{i,t}\,
      \log\pi_\theta(y_{i,t})

  Unlike PPO, no token loses its gradient: the weight is truncated, not the
  objective. The paper sets no lower bound (``epsilon_low=None``) and
  normalises by the total token count (``token_mean``). TRL's
  ``loss_type="cispo"`` caps the ratio at its ``epsilon_high`` (ScaleRL's
  ε_max = 5), i.e. ``epsilon_high`` here = TRL's value − 1.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon_low: lower truncation 1 − ε_low of the IS weight, in [0, 1];
      None for no lower bound (the paper's choice).
    epsilon_high: upper truncation 1 + ε_high of the IS weight, >= 0
      (default 4: weights capped at 5, ScaleRL's recommendation).

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.clipped`` marks truncated weights.

  References:
    MiniMax, `MiniMax-M1: Scaling Test-Time Compute Efficiently with
    Lightning Attention <https://arxiv.org/abs/2506.13585>`_, 2025.
  """
  if epsilon_low is not None and not 0 <= epsilon_low <= 1:
    raise ValueError(
      f"cispo_loss: epsilon_low must be in [0, 1] or None, got {epsilon_low}."
    )
  _check_non_negative("cispo_loss: epsilon_high", epsilon_high)
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  ratio = _sg(jnp.exp(logps - old))
  low = -jnp.inf if epsilon_low is None else 1.0 - epsilon_low
  high = 1.0 + epsilon_high
  weight = jnp.clip(ratio, low, high)
  clipped = (ratio > high) | (ratio < low)
  return _finish(-weight * adv * logps, ratio, clipped, mask)


@typechecked
def gmpo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon_low: float = 0.4,
  epsilon_high: float = 0.4,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""GMPO: maximise the geometric mean of the clipped token objectives.

  Zhao et al. (2025), the GMPO objective:

  .. math::
    J_i = \Big(\prod_t \big|\min(\rho_{i,t}\hat A_i,\ \mathrm{clip}(\rho_{i,t},
      e^{-\epsilon_{low}}, e^{\epsilon_{high}})\hat A_i)\big|\Big)^{1/|o_i|}
      \mathrm{sgn}(\hat A_i)
    = \hat A_i \exp\Big(\frac{1}{|o_i|}\sum_t c_{i,t}\Big)

  where :math:`c_{i,t}` is the log-ratio clipped in log space, one-sided by
  the advantage's sign (``min`` for A > 0, ``max`` otherwise), and
  :math:`\ell_i = -J_i`. The clip range is in log space (paper: ±0.4). The
  sequence loss is written on every completion token: reduce with
  ``sequence_mean`` for the paper's ``1/G Σ_i`` (TRL's experimental
  ``GMPOTrainer``).

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: per-sequence advantages ``[B]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon_low: log-space lower clip range, >= 0.
    epsilon_high: log-space upper clip range, >= 0.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.ratio`` is the geometric-mean ratio broadcast over the tokens.

  References:
    Zhao et al., `Geometric-Mean Policy Optimization
    <https://arxiv.org/abs/2507.20673>`_, 2025.
  """
  _check_non_negative("gmpo_loss: epsilon_low", epsilon_low)
  _check_non_negative("gmpo_loss: epsilon_high", epsilon_high)
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  log_ratio = logps - old
  bounded = jnp.clip(log_ratio, -epsilon_low, epsilon_high)
  positive = adv > 0
  clipped_log_ratio = jnp.where(
    positive, jnp.minimum(log_ratio, bounded), jnp.maximum(log_ratio, bounded)
  )
  seq_ratio = jnp.exp(_sequence_mean(clipped_log_ratio, mask))
  per_token = -seq_ratio[:, None] * adv
  clipped = ((log_ratio > epsilon_high) & positive) | (
    (log_ratio < -epsilon_low) & (adv < 0)
  )
  ratio = jnp.broadcast_to(seq_ratio[:, None], mask.shape)
  return _finish(per_token, ratio, clipped, mask)


@typechecked
def sapo_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  temperature_pos: float = 1.0,
  temperature_neg: float = 1.05,
) -> tuple[Float[Out, "B T"], PolicyAux]:
  r"""SAPO: a smooth, temperature-controlled gate instead of a hard clip.

  Soft Adaptive Policy Optimization (Gao et al. 2025), as in TRL:

  .. math::
    \ell_{i,t} = -\frac{4}{\tau}\,\sigma\big(\tau(\rho_{i,t} - 1)\big)
      \hat A_{i,t}, \qquad \tau = \tau_{pos} \text{ if } \hat A > 0
      \text{ else } \tau_{neg}

  The gate's derivative is :math:`\sigma'(\tau(\rho-1))\cdot 4\rho`, which is
  exactly ρ at ρ = 1 (so on-policy it is the plain policy gradient) and
  decays smoothly off-policy; τ_neg > τ_pos damps negative updates faster.
  TRL reduces it with ``sequence_mean``.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    temperature_pos: τ for positive advantages, > 0.
    temperature_neg: τ for non-positive advantages, > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.clipped`` is always False (there is no hard clip).

  References:
    Gao et al., `Soft Adaptive Policy Optimization
    <https://arxiv.org/abs/2511.20347>`_, 2025.
  """
  _check_positive("sapo_loss: temperature_pos", temperature_pos)
  _check_positive("sapo_loss: temperature_neg", temperature_neg)
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  ratio = jnp.exp(logps - old)
  tau = jnp.where(adv > 0, temperature_pos, temperature_neg)
  gate = jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
  return _finish(-gate * adv, ratio, jnp.zeros_like(mask), mask)


@typechecked
def stable_reinforce_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"] | Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  epsilon: float = 0.2,
  log_ratio_clip: float = math.log(1e3),
  sigma_threshold: float | None = 3.0,
  axis_name: AxisName = None,
) -> tuple[Float[Out, "B T"], StableReinforceAux]:
  r"""StableReinforce: pre-clipped log-ratio PPO with a 3σ advantage filter.

  R1-Reward (Zhang et al. 2025):

  * **Pre-clip**: :math:`\rho = \exp(\mathrm{clip}(\log\pi_\theta -
    \log\pi_{old}, -C, C))` so the exponential can never overflow, then the
    PPO clipped surrogate with ε;
  * **advantage filter**: with μ, σ the mean and (Bessel) standard deviation
    of the advantages over the batch, tokens whose advantage lies outside
    :math:`\mu \pm k\sigma` get zero loss. Statistics are over sequences for
    ``[B]`` advantages and over tokens for ``[B, T]``; they are batch
    statistics, so inside ``shard_map`` pass ``axis_name`` to make them
    global. The filter makes the loss depend on the batch composition, so
    micro-batches are not equivalent to the full batch unless the
    statistics are computed on the full batch.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: ``[B]`` or ``[B, T]``; no gradient.
    completion_mask: bool, True on completion tokens.
    epsilon: PPO clip range; in [0, 1).
    log_ratio_clip: C > 0, bound on the log-ratio before ``exp`` (default
      ``log 1000``, ratios within [1e-3, 1e3]).
    sigma_threshold: k > 0 of the filter; None disables it.
    axis_name: mapped axis name(s) for global filter statistics.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding and on
    filtered tokens; ``aux.kept`` is the filter mask.

  References:
    Zhang et al., `R1-Reward: Training Multimodal Reward Model Through Stable
    Reinforcement Learning <https://arxiv.org/abs/2505.02835>`_, 2025.
  """
  _check_epsilons("stable_reinforce_loss", epsilon, epsilon)
  _check_positive("stable_reinforce_loss: log_ratio_clip", log_ratio_clip)
  if sigma_threshold is not None:
    _check_positive("stable_reinforce_loss: sigma_threshold", sigma_threshold)
  logps, old, adv, mask = _prepare(
    token_logps, old_token_logps, advantages, completion_mask
  )
  ratio = jnp.exp(jnp.clip(logps - old, -log_ratio_clip, log_ratio_clip))
  loss, clipped = _clipped_objective(ratio, adv, epsilon, epsilon)
  kept = mask
  if sigma_threshold is not None:
    if jnp.ndim(advantages) == 1:
      rows = jnp.any(mask, axis=-1)
      values = jnp.where(rows, _sg(_f32(advantages)), 0.0)
      mean = _masked.masked_mean(values, rows, axis_name=axis_name)
      std = jnp.sqrt(
        _masked.masked_var(values, rows, ddof=1, axis_name=axis_name)
      )
    else:
      mean = _masked.masked_mean(adv, mask, axis_name=axis_name)
      std = jnp.sqrt(_masked.masked_var(adv, mask, ddof=1, axis_name=axis_name))
    kept = mask & (jnp.abs(adv - mean) <= sigma_threshold * std)
  loss = jnp.where(kept, loss, 0.0)
  per_token, aux = _finish(loss, ratio, clipped, mask)
  return per_token, StableReinforceAux(aux.ratio, aux.clipped, kept)


# ---------------------------------------------------------------------------
# Entropy-modulated policy gradients.


def _pmin(x, axis_name):
  return x if axis_name is None else jax.lax.pmin(x, axis_name)


def _pmax(x, axis_name):
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


@typechecked
def empg_advantages(
  advantages: Float[In, "B"],
  token_entropies: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  step_ids: Int[In, "B T"] | None = None,
  *,
  max_steps: int = 1,
  k: float = 1.0,
  k_future: float = 1.0,
  zeta: float = 0.1,
  axis_name: AxisName = None,
) -> Float[Out, "B T"]:
  r"""EMPG's entropy-modulated advantages, broadcast to the step's tokens.

  Wang et al. (2025), Eqs. 10-12 (and the authors' reference pseudocode). A
  *step* is a segment of a trajectory (an agent turn); its uncertainty
  :math:`H_s` is the mean entropy of its tokens. Over all steps in the batch:

  .. math::
    \tilde H_s = \frac{H_s - \min H}{\max H - \min H + 10^{-8}},\quad
    g_s = \frac{e^{-k\tilde H_s}}{\mathrm{mean}_{s'}\, e^{-k\tilde H_{s'}}
      + 10^{-8}},\quad
    f_s = e^{-k_f \tilde H_s}

  .. math::
    A^{mod}_{i,s} = g_s\,\hat A_i + \zeta\, f_{s+1}

  where :math:`f_{s+1}` is the next step of the same trajectory (0 after the
  last step). Confident steps are amplified, uncertain ones attenuated, and
  steps leading to a confident next step get a "future clarity" bonus. The
  min, max and mean are batch statistics: inside ``shard_map`` pass
  ``axis_name`` so every device uses the global ones.

  Args:
    advantages: trajectory-level advantages ``[B]`` (GRPO/DAPO); no
      gradient.
    token_entropies: per-token entropies of the behaviour policy; no
      gradient.
    completion_mask: bool, True on tokens that belong to some step (agent
      tokens; environment/tool tokens False).
    step_ids: int step index in ``[0, max_steps)`` of every token; None
      treats each completion as a single step (then ζ has no effect).
    max_steps: static number of step slots per trajectory, >= 1.
    k: sharpness of the self-calibrating scale g, >= 0.
    k_future: sharpness of the future-clarity bonus f, >= 0.
    zeta: weight ζ >= 0 of the future-clarity bonus.
    axis_name: mapped axis name(s) for global batch statistics.

  Returns:
    float32 ``[B, T]`` modulated advantages, zero on padding; no gradient.

  References:
    Wang et al., `Harnessing Uncertainty: Entropy-Modulated Policy Gradients
    for Long-Horizon LLM Agents <https://arxiv.org/abs/2509.09265>`_, 2025.
  """
  if max_steps < 1:
    raise ValueError(
      f"empg_advantages: max_steps must be >= 1, got {max_steps}."
    )
  _check_non_negative("empg_advantages: k", k)
  _check_non_negative("empg_advantages: k_future", k_future)
  _check_non_negative("empg_advantages: zeta", zeta)
  mask = jnp.asarray(completion_mask, bool)
  entropy = _sg(jnp.where(mask, _f32(token_entropies), 0.0))
  adv = _sg(_f32(advantages))
  if step_ids is None:
    step_ids = jnp.zeros(mask.shape, jnp.int32)
  slots = jnp.arange(max_steps)[None, None, :]
  onehot = (jnp.asarray(step_ids)[..., None] == slots) & mask[..., None]
  count = jnp.sum(onehot, axis=1, dtype=jnp.float32)  # [B, S]
  step_entropy = _masked.safe_divide(
    jnp.einsum("bts,bt->bs", onehot.astype(jnp.float32), entropy), count
  )
  valid = count > 0
  h_min = _pmin(jnp.min(jnp.where(valid, step_entropy, jnp.inf)), axis_name)
  h_max = _pmax(jnp.max(jnp.where(valid, step_entropy, -jnp.inf)), axis_name)
  h_min = jnp.where(jnp.isfinite(h_min), h_min, 0.0)
  h_max = jnp.where(jnp.isfinite(h_max), h_max, 0.0)
  normalized = jnp.where(
    valid, (step_entropy - h_min) / (h_max - h_min + 1e-8), 0.0
  )
  scale = jnp.exp(-k * normalized)
  scale_total = _psum(jnp.sum(jnp.where(valid, scale, 0.0)), axis_name)
  steps = _psum(jnp.sum(valid, dtype=jnp.float32), axis_name)
  scale = scale / (_masked.safe_divide(scale_total, steps) + 1e-8)
  clarity = jnp.where(valid, jnp.exp(-k_future * normalized), 0.0)
  next_clarity = jnp.concatenate(
    [clarity[:, 1:], jnp.zeros_like(clarity[:, :1])], axis=1
  )
  step_adv = jnp.where(valid, scale * adv[:, None] + zeta * next_clarity, 0.0)
  token_adv = jnp.einsum("bts,bs->bt", onehot.astype(jnp.float32), step_adv)
  return _sg(jnp.where(mask, token_adv, 0.0))


@typechecked
def empg_loss(
  token_logps: Float[In, "B T"],
  old_token_logps: Float[In, "B T"],
  advantages: Float[In, "B"],
  token_entropies: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  step_ids: Int[In, "B T"] | None = None,
  *,
  max_steps: int = 1,
  k: float = 1.0,
  k_future: float = 1.0,
  zeta: float = 0.1,
  epsilon_low: float = 0.2,
  epsilon_high: float = 0.2,
  axis_name: AxisName = None,
) -> tuple[Float[Out, "B T"], EmpgAux]:
  r"""EMPG: the GRPO/DAPO clipped surrogate on entropy-modulated advantages.

  :func:`grpo_loss` with :math:`\hat A` replaced by
  :func:`empg_advantages`; see that function for the modulation and for
  ``axis_name``. The paper applies it on top of GRPO and DAPO.

  Args:
    token_logps: log-probs of the sampled tokens under the policy.
    old_token_logps: log-probs under the behaviour policy; no gradient.
    advantages: trajectory-level advantages ``[B]``; no gradient.
    token_entropies: per-token entropies of the behaviour policy; no
      gradient.
    completion_mask: bool, True on agent tokens.
    step_ids: int step index per token, or None (one step per completion).
    max_steps: static number of step slots, >= 1.
    k: sharpness of the self-calibrating scale, >= 0.
    k_future: sharpness of the future-clarity bonus, >= 0.
    zeta: future-clarity weight, >= 0.
    epsilon_low: lower clip range; in [0, 1).
    epsilon_high: upper clip range, >= 0.
    axis_name: mapped axis name(s) for global batch statistics.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.advantages`` holds the modulated advantages.

  References:
    Wang et al., `Harnessing Uncertainty: Entropy-Modulated Policy Gradients
    for Long-Horizon LLM Agents <https://arxiv.org/abs/2509.09265>`_, 2025.
  """
  modulated = empg_advantages(
    advantages,
    token_entropies,
    completion_mask,
    step_ids,
    max_steps=max_steps,
    k=k,
    k_future=k_future,
    zeta=zeta,
    axis_name=axis_name,
  )
  loss, aux = grpo_loss(
    token_logps,
    old_token_logps,
    modulated,
    completion_mask,
    epsilon_low=epsilon_low,
    epsilon_high=epsilon_high,
  )
  return loss, EmpgAux(aux.ratio, aux.clipped, modulated)


# ---------------------------------------------------------------------------
# Sequence-level objectives over groups of samples.


def _pairwise_mean_square(x):
  """``mean_{i<j} (x_i - x_j)²`` over the last axis ``[B, G] -> [B]``."""
  group = x.shape[-1]
  diff = x[:, :, None] - x[:, None, :]
  upper = jnp.triu(jnp.ones((group, group), bool), k=1)[None]
  pairs = group * (group - 1) / 2
  return jnp.sum(jnp.where(upper, diff * diff, 0.0), axis=(1, 2)) / pairs


@typechecked
def copg_loss(
  policy_logps: Float[In, "B G"],
  ref_logps: Float[In, "B G"],
  rewards: Float[In, "B G"],
  *,
  beta: float = 0.1,
) -> tuple[Float[Out, "B"], CopgAux]:
  r"""Contrastive Policy Gradient over all pairs of a group of completions.

  Flet-Berliac et al. (2024): for two completions y, y' of one prompt and the
  KL-regularised reward :math:`R_\beta(y) = R(y) - \beta\log\frac{\pi(y)}
  {\pi_{ref}(y)}`, CoPG ascends :math:`(R_\beta(y) - R_\beta(y'))
  (\nabla\log\pi(y) - \nabla\log\pi(y'))`, which needs no importance
  sampling. That direction is the negative gradient of the regression loss

  .. math::
    \ell(y, y') = \frac{1}{2\beta}\big(R(y) - R(y') - \beta[\log\tfrac{\pi(y)}
      {\pi_{ref}(y)} - \log\tfrac{\pi(y')}{\pi_{ref}(y')}]\big)^2

  computed here and averaged over the :math:`G(G-1)/2` pairs of each group.
  Properties (tested): with G = 2 the gradient is RLOO's (K = 2) on
  :math:`R_\beta`, for any G it is ``2/G`` times the RLOO advantage; with
  :math:`R(y) - R(y') = 1/2` the pair loss is β/2 times IPO's; it is zero at
  the optimum :math:`\pi \propto \pi_{ref} e^{R/\beta}`.

  Args:
    policy_logps: summed completion log-probs under the policy ``[B, G]``
      (``ops.sequence_logps``).
    ref_logps: the same under the reference; no gradient.
    rewards: sequence rewards ``[B, G]``; no gradient.
    beta: KL-regularisation strength β > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` (one value per prompt, mean over its
    pairs), not reduced over B; ``aux.regularized_rewards`` is
    :math:`R_\beta` per sample.

  References:
    Flet-Berliac et al., `Contrastive Policy Gradient: Aligning LLMs on
    sequence-level scores in a supervised-friendly fashion
    <https://arxiv.org/abs/2406.19185>`_, 2024.
  """
  _check_positive("copg_loss: beta", beta)
  if policy_logps.shape[-1] < 2:
    raise ValueError(
      "copg_loss: needs at least 2 samples per group (G >= 2),"
      f" got G={policy_logps.shape[-1]}."
    )
  log_ratio = _f32(policy_logps) - _sg(_f32(ref_logps))
  regularized = _sg(_f32(rewards)) - beta * log_ratio
  loss = _pairwise_mean_square(regularized) / (2.0 * beta)
  return loss, CopgAux(_sg(regularized))


@typechecked
def prdp_loss(
  token_logps: Float[In, "B G T"],
  old_token_logps: Float[In, "B G T"],
  rewards: Float[In, "B G"],
  completion_mask: Bool[In, "B G T"],
  *,
  beta: float = 1.0,
  epsilon: float = 0.2,
) -> tuple[Float[Out, "B"], PrdpAux]:
  r"""Proximal Reward Difference Prediction over pairs of completions.

  Deng et al. (2024): the policy *predicts* the reward difference of two
  samples of one prompt from their trajectories, with per-step proximal
  clipping of the log-ratio to the behaviour policy:

  .. math::
    \hat r_i = \beta\sum_t \mathrm{clip}\big(\log\tfrac{\pi_\theta(y_{i,t})}
      {\pi_{old}(y_{i,t})}, -\epsilon, \epsilon\big), \qquad
    \ell = \mathrm{mean}_{i<j}\big(r_i - r_j - (\hat r_i - \hat r_j)\big)^2

  Averaged over all pairs of the group (the paper uses pairs, G = 2). Its
  minimiser satisfies :math:`\pi \propto \pi_{old}\,e^{r/\beta}` within the
  trust region; a token whose log-ratio is outside ±ε contributes no
  gradient.

  Args:
    token_logps: per-token log-probs ``[B, G, T]`` under the policy.
    old_token_logps: per-token log-probs under the sampling policy; no
      gradient.
    rewards: sequence rewards ``[B, G]``; no gradient.
    completion_mask: bool ``[B, G, T]``, True on completion tokens.
    beta: scale β > 0 of the predicted reward.
    epsilon: per-token log-ratio clip ε > 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]``, not reduced over B;
    ``aux.predicted_rewards`` is :math:`\hat r` ``[B, G]``.

  References:
    Deng et al., `PRDP: Proximal Reward Difference Prediction for
    Large-Scale Reward Finetuning of Diffusion Models
    <https://arxiv.org/abs/2402.08714>`_, 2024.
  """
  _check_positive("prdp_loss: beta", beta)
  _check_positive("prdp_loss: epsilon", epsilon)
  if rewards.shape[-1] < 2:
    raise ValueError(
      "prdp_loss: needs at least 2 samples per group (G >= 2),"
      f" got G={rewards.shape[-1]}."
    )
  mask = jnp.asarray(completion_mask, bool)
  logps = jnp.where(mask, _f32(token_logps), 0.0)
  old = _sg(jnp.where(mask, _f32(old_token_logps), 0.0))
  log_ratio = jnp.where(mask, jnp.clip(logps - old, -epsilon, epsilon), 0.0)
  predicted = beta * jnp.sum(log_ratio, axis=-1)
  residual = _sg(_f32(rewards)) - predicted
  return _pairwise_mean_square(residual), PrdpAux(_sg(predicted))


@typechecked
def best_of_k_mask(
  rewards: Float[In, "B G"],
  *,
  num_keep: int = 1,
) -> Bool[Out, "B G"]:
  """Marks the ``num_keep`` highest-reward completions of every group.

  Ties are broken towards the lower index (``jax.lax.top_k``). NaN rewards
  count as lowest.

  Args:
    rewards: sequence rewards ``[B, G]``.
    num_keep: how many to keep per group, in [1, G].

  Returns:
    bool ``[B, G]`` with exactly ``num_keep`` True per row.
  """
  group = rewards.shape[-1]
  if not 1 <= num_keep <= group:
    raise ValueError(
      f"best_of_k_mask: num_keep must be in [1, G={group}], got {num_keep}."
    )
  values = _f32(rewards)
  values = jnp.where(jnp.isnan(values), -jnp.inf, values)
  _, index = jax.lax.top_k(values, num_keep)
  return jnp.any(index[..., None] == jnp.arange(group)[None, None], axis=-2)


@typechecked
def raft_loss(
  token_logps: Float[In, "B G T"],
  rewards: Float[In, "B G"],
  completion_mask: Bool[In, "B G T"],
  *,
  num_keep: int = 1,
) -> tuple[Float[Out, "B G T"], SelectionAux]:
  r"""RAFT: supervised fine-tuning on the best-of-K completions.

  Dong et al. (2023): sample K completions per prompt, keep the
  ``num_keep`` with the highest reward, and minimise their negative
  log-likelihood,

  .. math::
    \ell_{i,t} = -\mathbb 1[i \in \mathrm{top}_k(r)]\,\log\pi_\theta(y_{i,t})

  i.e. REINFORCE with the 0/1 advantage of being selected. Aggregate with
  ``aux.loss_mask`` (the token mean over the kept completions is SFT).

  Args:
    token_logps: per-token log-probs ``[B, G, T]`` under the policy.
    rewards: sequence rewards ``[B, G]``; no gradient.
    completion_mask: bool ``[B, G, T]``, True on completion tokens.
    num_keep: completions kept per prompt, in [1, G].

  Returns:
    ``(loss, aux)``: float32 ``[B, G, T]``, not reduced, zero on padding and
    on completions not kept; ``aux`` has the selection and loss mask.

  References:
    Dong et al., `RAFT: Reward rAnked FineTuning for Generative Foundation
    Model Alignment <https://arxiv.org/abs/2304.06767>`_, 2023.
  """
  selected = best_of_k_mask(_sg(_f32(rewards)), num_keep=num_keep)
  loss_mask = jnp.asarray(completion_mask, bool) & selected[..., None]
  loss = -jnp.where(loss_mask, _f32(token_logps), 0.0)
  return loss, SelectionAux(selected, loss_mask)


@typechecked
def superhf_loss(
  token_logps: Float[In, "B G T"],
  ref_token_logps: Float[In, "B G T"],
  rewards: Float[In, "B G"],
  completion_mask: Bool[In, "B G T"],
  *,
  beta: float = 0.1,
  num_keep: int = 1,
  kl_estimator: str = "k3",
) -> tuple[Float[Out, "B G T"], SelectionAux]:
  r"""SuperHF: best-of-n supervised loss with a KL prior to the reference.

  Mukobi et al. (2023): filter n online samples through the reward model,
  keep the best, and minimise

  .. math::
    \ell_{i,t} = \mathbb 1[i \in \mathrm{top}_k(r)]\big(-\log\pi_\theta
      (y_{i,t}) + \beta\,\widehat{\mathrm{KL}}_t(\pi_\theta\,\|\,\pi_{ref})
      \big)

  with a per-token sampled KL estimate (``ops.kl_estimate``). β = 0 is
  :func:`raft_loss`.

  Args:
    token_logps: per-token log-probs ``[B, G, T]`` under the policy.
    ref_token_logps: the same under the reference (prior); no gradient.
    rewards: sequence rewards ``[B, G]``; no gradient.
    completion_mask: bool ``[B, G, T]``, True on completion tokens.
    beta: KL coefficient β >= 0.
    num_keep: completions kept per prompt, in [1, G].
    kl_estimator: one of ``ops.KL_ESTIMATORS``.

  Returns:
    ``(loss, aux)``: float32 ``[B, G, T]``, not reduced, zero on padding and
    on completions not kept.

  References:
    Mukobi et al., `SuperHF: Supervised Iterative Learning from Human
    Feedback <https://arxiv.org/abs/2310.16763>`_, 2023.
  """
  _check_non_negative("superhf_loss: beta", beta)
  if kl_estimator not in _kl.KL_ESTIMATORS:
    raise ValueError(
      f"superhf_loss: unknown kl_estimator={kl_estimator!r}; "
      f"valid choices are {_kl.KL_ESTIMATORS}."
    )
  selected = best_of_k_mask(_sg(_f32(rewards)), num_keep=num_keep)
  loss_mask = jnp.asarray(completion_mask, bool) & selected[..., None]
  logps = jnp.where(loss_mask, _f32(token_logps), 0.0)
  ref = jnp.where(loss_mask, _f32(ref_token_logps), 0.0)
  kl = _kl.kl_estimate(logps, ref, estimator=kl_estimator)
  loss = jnp.where(loss_mask, -logps + beta * kl, 0.0)
  return loss, SelectionAux(selected, loss_mask)


# ---------------------------------------------------------------------------
# Rewards, value and entropy terms.


@typechecked
def rto_token_rewards(
  dpo_token_logps: Float[In, "B T"],
  ref_token_logps: Float[In, "B T"],
  token_logps: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  rewards: Float[In, "B"] | None = None,
  *,
  beta_dpo: float = 0.05,
  beta_kl: float = 0.05,
  beta_reward: float = 1.0,
) -> Float[Out, "B T"]:
  r"""RTO's dense token rewards for PPO, from a DPO-trained policy.

  Zhong et al. (2024), practical RTO: the DPO policy's log-ratio to the
  reference is a token-wise reward, combined with the usual KL penalty and
  an optional sparse sequence reward on the last completion token:

  .. math::
    r_t = \beta_1\log\frac{\pi_{dpo}(y_t)}{\pi_{ref}(y_t)}
      - \beta_2\log\frac{\pi_\theta(y_t)}{\pi_{ref}(y_t)}
      + \beta_3\,\mathbb 1[t = \mathrm{last}]\, r(x, y)

  Feed the result to a GAE estimator and :func:`ppo_loss`. Σ_t of the first
  term is β₁/β_DPO times the DPO implicit sequence reward.

  Args:
    dpo_token_logps: per-token log-probs under the DPO-trained policy.
    ref_token_logps: per-token log-probs under the reference.
    token_logps: per-token log-probs under the policy that sampled the
      completion (π_θ at rollout time).
    completion_mask: bool, True on completion tokens.
    rewards: optional sequence rewards ``[B]`` (reward model), placed on the
      last True position of each row.
    beta_dpo: β₁ >= 0, weight of the DPO token reward.
    beta_kl: β₂ >= 0, weight of the KL penalty.
    beta_reward: β₃ >= 0, weight of the sparse reward.

  Returns:
    float32 ``[B, T]`` token rewards, zero on padding; no gradient flows
    into any input.

  References:
    Zhong et al., `DPO Meets PPO: Reinforced Token Optimization for RLHF
    <https://arxiv.org/abs/2404.18922>`_, 2024.
  """
  _check_non_negative("rto_token_rewards: beta_dpo", beta_dpo)
  _check_non_negative("rto_token_rewards: beta_kl", beta_kl)
  _check_non_negative("rto_token_rewards: beta_reward", beta_reward)
  mask = jnp.asarray(completion_mask, bool)

  def masked(x):
    return _sg(jnp.where(mask, _f32(x), 0.0))

  dpo, ref, policy = (
    masked(dpo_token_logps),
    masked(ref_token_logps),
    masked(token_logps),
  )
  out = beta_dpo * (dpo - ref) - beta_kl * (policy - ref)
  if rewards is not None:
    remaining = jnp.cumsum(mask[:, ::-1], axis=-1)[:, ::-1]
    is_last = mask & (remaining == 1)
    out = out + jnp.where(
      is_last, beta_reward * _sg(_f32(rewards))[:, None], 0.0
    )
  return jnp.where(mask, out, 0.0)


@typechecked
def clipped_value_loss(
  values: Float[In, "B T"],
  old_values: Float[In, "B T"],
  returns: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  clip_range: float | None = 0.2,
) -> tuple[Float[Out, "B T"], ValueAux]:
  r"""PPO's clipped value loss, per token.

  .. math::
    \ell_t = \tfrac12\max\big((V_t - R_t)^2,\ (V^{old}_t +
      \mathrm{clip}(V_t - V^{old}_t, -\epsilon_v, \epsilon_v) - R_t)^2\big)

  (the OpenAI baselines / TRL PPO ``cliprange_value`` form). With
  ``clip_range=None`` it is the plain squared error ½(V − R)².

  Args:
    values: value predictions of the current critic.
    old_values: predictions of the critic that produced the rollout; no
      gradient.
    returns: regression targets (e.g. GAE returns); no gradient.
    completion_mask: bool, True on completion tokens.
    clip_range: ε_v > 0, or None to disable clipping.

  Returns:
    ``(loss, aux)``: float32 ``[B, T]``, not reduced, zero on padding;
    ``aux.clipped`` marks tokens where the clipped branch was taken,
    ``aux.value_error`` is V − R.

  References:
    Schulman et al., `Proximal Policy Optimization Algorithms
    <https://arxiv.org/abs/1707.06347>`_, 2017 (value clipping as in the
    baselines implementation).
  """
  if clip_range is not None:
    _check_positive("clipped_value_loss: clip_range", clip_range)
  mask = jnp.asarray(completion_mask, bool)
  v = jnp.where(mask, _f32(values), 0.0)
  v_old = _sg(jnp.where(mask, _f32(old_values), 0.0))
  target = _sg(jnp.where(mask, _f32(returns), 0.0))
  unclipped = jnp.square(v - target)
  if clip_range is None:
    loss, clipped = 0.5 * unclipped, jnp.zeros_like(mask)
  else:
    v_clipped = v_old + jnp.clip(v - v_old, -clip_range, clip_range)
    clipped_sq = jnp.square(v_clipped - target)
    loss = 0.5 * jnp.maximum(unclipped, clipped_sq)
    clipped = clipped_sq > unclipped
  return jnp.where(mask, loss, 0.0), ValueAux(
    clipped & mask, _sg(jnp.where(mask, v - target, 0.0))
  )


@typechecked
def entropy_bonus_loss(
  token_entropies: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  coefficient: float = 0.01,
) -> Float[Out, "B T"]:
  r"""Entropy bonus as a loss term, per token: :math:`-c\,H_t`.

  Adding it to a policy loss and minimising raises the policy's entropy
  (Williams & Peng 1991; the β H term of Mnih et al. 2016). Compute
  ``token_entropies`` from the policy's logits with
  ``ops.entropy_from_logits`` so the gradient flows through them. TRL's
  ``entropy_coef`` uses the token mean of this term.

  Args:
    token_entropies: per-token entropies of the current policy (the
      gradient flows into them).
    completion_mask: bool, True on completion tokens.
    coefficient: c >= 0.

  Returns:
    float32 ``[B, T]``, not reduced, zero on padding.

  References:
    Mnih et al., `Asynchronous Methods for Deep Reinforcement Learning
    <https://arxiv.org/abs/1602.01783>`_, 2016.
  """
  _check_non_negative("entropy_bonus_loss: coefficient", coefficient)
  mask = jnp.asarray(completion_mask, bool)
  return jnp.where(mask, -coefficient * _f32(token_entropies), 0.0)


@typechecked
def bnpo_aggregate(
  per_token: Float[In, "B T"],
  mask: Bool[In, "B T"],
  *,
  num_micro_batches: int = 1,
) -> Float[Out, ""]:
  r"""TRL's ``bnpo`` reduction, for comparison: NOT accumulation-invariant.

  TRL's ``loss_type="bnpo"`` divides each micro-batch's token sum by *that
  micro-batch's* token count and then by the number of accumulation steps:

  .. math::
    L = \frac1M\sum_{m=1}^M \frac{\sum_{(b,t)\in m} \ell_{bt}}
      {\sum_{(b,t)\in m} 1}

  This differs from the full-batch token mean (``token_mean``) whenever the
  micro-batches hold different numbers of tokens, so the gradient depends
  on how a batch is split over micro-batches or devices. Use
  ``aggregate_token_loss(mode="token_mean")`` instead; this function exists
  to reproduce and test that difference. Micro-batches are consecutive
  equal slices of B.

  Args:
    per_token: per-token loss ``[B, T]``; padded entries are ignored.
    mask: bool ``[B, T]``.
    num_micro_batches: M, must divide B.

  Returns:
    float32 scalar loss.
  """
  batch = per_token.shape[0]
  if num_micro_batches < 1 or batch % num_micro_batches:
    raise ValueError(
      f"bnpo_aggregate: num_micro_batches must be >= 1 and "
      f"divide B={batch}, got {num_micro_batches}."
    )
  values = jnp.where(mask, _f32(per_token), 0.0)
  values = values.reshape(num_micro_batches, -1)
  counts = jnp.asarray(mask).reshape(num_micro_batches, -1)
  counts = jnp.maximum(jnp.sum(counts, axis=-1, dtype=jnp.float32), 1.0)
  return jnp.mean(jnp.sum(values, axis=-1) / counts)


REGISTRY = {
  "reinforce": reinforce_loss,
  "ppo": ppo_loss,
  "grpo": grpo_loss,
  "dapo": dapo_loss,
  "gspo": gspo_loss,
  "gspo_token": gspo_token_loss,
  "cispo": cispo_loss,
  "gmpo": gmpo_loss,
  "sapo": sapo_loss,
  "stable_reinforce": stable_reinforce_loss,
  "empg": empg_loss,
  "copg": copg_loss,
  "prdp": prdp_loss,
  "raft": raft_loss,
  "superhf": superhf_loss,
}
"""Policy objectives by config name (``config.loss.name``)."""
