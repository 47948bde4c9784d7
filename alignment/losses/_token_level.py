"""Token-level DPO relatives: per-token weights on the implicit reward.

TGDPO scales each token's log-ratio by a reward-guided factor, T-REG adds a
regulariser that aligns the token-level implicit rewards with given token
rewards, and SparsePO weights the per-token rewards (and KL terms) with
sparse masks. All take per-token log-probs ``[B, T]`` with bool completion
masks; padded positions are ignored in value and gradient even when they
hold NaN. Each returns ``(loss[B], aux)`` unreduced.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float

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

__all__ = [
  "TokenPairAux",
  "TRegAux",
  "SparsePoAux",
  "tgdpo_loss",
  "tgdpo_token_rewards",
  "t_reg_loss",
  "sparse_po_loss",
  "reference_token_kl",
]

_SG = jax.lax.stop_gradient


def _masked(x, mask):
  """float32 ``x`` with padded entries replaced by 0 (before any math)."""
  return jnp.where(mask, _f32(x), 0.0)


def _token_log_ratio(policy, ref, mask):
  """``log π - sg(log π_ref)`` per token, 0 where ``mask`` is False."""
  return _masked(policy, mask) - _SG(_masked(ref, mask))


class TokenPairAux(NamedTuple):
  """Sequence-level implicit rewards, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """The (weighted) sum over chosen tokens that enters the loss."""
  rejected_rewards: Float[Out, "B"]
  """The same over rejected tokens."""


@typechecked
def tgdpo_loss(
  policy_chosen_token_logps: Float[In, "B T"],
  policy_rejected_token_logps: Float[In, "B T"],
  ref_chosen_token_logps: Float[In, "B T"],
  ref_rejected_token_logps: Float[In, "B T"],
  chosen_token_rewards: Float[In, "B T"],
  rejected_token_rewards: Float[In, "B T"],
  chosen_mask: Bool[In, "B T"],
  rejected_mask: Bool[In, "B T"],
  *,
  beta: float = 0.1,
  alpha: float = 0.5,
) -> tuple[Float[Out, "B"], TokenPairAux]:
  r"""TGDPO: DPO with token-level reward guidance, one value per pair.

  Zhu et al. (2025) replace DPO's constant β by a per-token factor
  ``β·f(r̂_t)``; the practical guidance (the authors' code) is
  ``f_w = 1 + α r̂`` on chosen and ``f_l = 1 - α r̂`` on rejected tokens:

  .. math::
    \ell = -\log\sigma\Big(\beta\sum_t (1 + \alpha\hat r^w_t)\rho^w_t
           - \beta\sum_t (1 - \alpha\hat r^l_t)\rho^l_t\Big),
    \quad \rho_t = \log\pi(y_t|s_t) - \log\pi_{ref}(y_t|s_t).

  ``r̂`` is any token-level reward, typically the induced DPO reward of a
  previously trained DPO model (:func:`tgdpo_token_rewards`). With ``α = 0``
  or ``r̂ ≡ 0`` this is DPO exactly. Tokens whose factor ``1 ± α r̂`` turns
  negative are pushed the other way; the authors do not clip, neither does
  this function.

  Args:
    policy_chosen_token_logps: per-token log-probs of the chosen completion
      under the policy, ``[B, T]``.
    policy_rejected_token_logps: same for the rejected completion.
    ref_chosen_token_logps: chosen per-token log-probs under the reference;
      no gradient.
    ref_rejected_token_logps: rejected per-token log-probs under the
      reference; no gradient.
    chosen_token_rewards: guidance rewards ``r̂`` on chosen tokens; no
      gradient.
    rejected_token_rewards: guidance rewards on rejected tokens; no
      gradient.
    chosen_mask: bool completion mask of the chosen tokens.
    rejected_mask: bool completion mask of the rejected tokens.
    beta: β > 0.
    alpha: guidance strength α >= 0 (0.5 in the authors' configs).

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and the weighted
    sequence rewards.

  References:
    Zhu et al., `TGDPO: Harnessing Token-Level Reward Guidance for Enhancing
    Direct Preference Optimization <https://arxiv.org/abs/2506.14574>`_,
    ICML 2025.
  """
  _check_positive("beta", beta, "tgdpo_loss")
  _check_nonnegative("alpha", alpha, "tgdpo_loss")
  rho_w = _token_log_ratio(
    policy_chosen_token_logps, ref_chosen_token_logps, chosen_mask
  )
  rho_l = _token_log_ratio(
    policy_rejected_token_logps, ref_rejected_token_logps, rejected_mask
  )
  f_w = 1.0 + alpha * _SG(_masked(chosen_token_rewards, chosen_mask))
  f_l = 1.0 - alpha * _SG(_masked(rejected_token_rewards, rejected_mask))
  chosen = beta * jnp.sum(f_w * rho_w, axis=-1)
  rejected = beta * jnp.sum(f_l * rho_l, axis=-1)
  loss = -jax.nn.log_sigmoid(chosen - rejected)
  return loss, TokenPairAux(_SG(chosen), _SG(rejected))


@typechecked
def tgdpo_token_rewards(
  guide_token_logps: Float[In, "B T"],
  ref_token_logps: Float[In, "B T"],
  mask: Bool[In, "B T"],
  *,
  beta: float = 0.1,
) -> Float[Out, "B T"]:
  r"""TGDPO's practical guidance: the induced DPO reward of a guide model.

  ``r̂_t = β (log π_dpo(y_t|s_t) - log π_ref(y_t|s_t))`` where ``π_dpo`` is a
  previously DPO-trained model (the authors reuse the training β).

  Args:
    guide_token_logps: per-token log-probs under the guide (DPO) model.
    ref_token_logps: per-token log-probs under the reference.
    mask: bool completion mask.
    beta: β > 0.

  Returns:
    float32 ``[B, T]``, 0 where ``mask`` is False, under ``stop_gradient``.

  References:
    Zhu et al., `TGDPO: Harnessing Token-Level Reward Guidance for Enhancing
    Direct Preference Optimization <https://arxiv.org/abs/2506.14574>`_,
    ICML 2025.
  """
  _check_positive("beta", beta, "tgdpo_token_rewards")
  return _SG(
    beta * (_masked(guide_token_logps, mask) - _masked(ref_token_logps, mask))
  )


class TRegAux(NamedTuple):
  """T-REG diagnostics, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """DPO implicit reward ``β Σ_t ρ^w_t``."""
  rejected_rewards: Float[Out, "B"]
  """``β Σ_t ρ^l_t``."""
  dpo_loss: Float[Out, "B"]
  """The sequence-level DPO term."""
  regularizer: Float[Out, "B"]
  """The unweighted token-level reward regulariser."""


@typechecked
def t_reg_loss(
  policy_chosen_token_logps: Float[In, "B T"],
  policy_rejected_token_logps: Float[In, "B T"],
  ref_chosen_token_logps: Float[In, "B T"],
  ref_rejected_token_logps: Float[In, "B T"],
  chosen_token_rewards: Float[In, "B T"],
  rejected_token_rewards: Float[In, "B T"],
  chosen_mask: Bool[In, "B T"],
  rejected_mask: Bool[In, "B T"],
  *,
  beta: float = 0.1,
  alpha: float = 1.0,
) -> tuple[Float[Out, "B"], TRegAux]:
  r"""T-REG: DPO plus token-level reward regularisation, one value per pair.

  Zhou et al. (2024) keep the sequence-level DPO loss and add a regulariser
  that asks the token-level implicit rewards ``β ρ_t`` to agree in sign with
  given token-level rewards ``r_t`` (self-generated by contrastive
  prompting of the policy, computed without gradient):

  .. math::
    \ell = -\log\sigma(\beta h) + \alpha\Big[
        -\log\sigma\Big(\beta\sum_t r^w_t\rho^w_t\Big)
        -\log\sigma\Big(\beta\sum_t r^l_t\rho^l_t\Big)\Big],

  with ``r_t`` signed (positive for tokens that make the response better,
  so mostly negative on a rejected response) and ``h = Σ ρ^w - Σ ρ^l``.
  ``α = 0`` gives DPO exactly; ``r ≡ 0`` adds the constant ``2α log 2`` and
  leaves DPO's gradient unchanged.

  .. warning::
    The form of the regulariser (which sign convention, and how the
    contrastive-prompting rewards are normalised) is reconstructed from the
    paper's description, not checked against the paper's equations or
    code; see the project's method notes.

  Args:
    policy_chosen_token_logps: per-token log-probs of the chosen completion
      under the policy, ``[B, T]``.
    policy_rejected_token_logps: same for the rejected completion.
    ref_chosen_token_logps: chosen per-token log-probs under the reference;
      no gradient.
    ref_rejected_token_logps: rejected ones under the reference; no
      gradient.
    chosen_token_rewards: signed token rewards on chosen tokens; no
      gradient.
    rejected_token_rewards: signed token rewards on rejected tokens; no
      gradient.
    chosen_mask: bool completion mask of the chosen tokens.
    rejected_mask: bool completion mask of the rejected tokens.
    beta: β > 0.
    alpha: regularisation weight α >= 0.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and its parts.

  References:
    Zhou et al., `T-REG: Preference Optimization with Token-Level Reward
    Regularization <https://arxiv.org/abs/2412.02685>`_, ACL 2025.
  """
  _check_positive("beta", beta, "t_reg_loss")
  _check_nonnegative("alpha", alpha, "t_reg_loss")
  rho_w = _token_log_ratio(
    policy_chosen_token_logps, ref_chosen_token_logps, chosen_mask
  )
  rho_l = _token_log_ratio(
    policy_rejected_token_logps, ref_rejected_token_logps, rejected_mask
  )
  chosen = beta * jnp.sum(rho_w, axis=-1)
  rejected = beta * jnp.sum(rho_l, axis=-1)
  dpo = -jax.nn.log_sigmoid(chosen - rejected)
  r_w = _SG(_masked(chosen_token_rewards, chosen_mask))
  r_l = _SG(_masked(rejected_token_rewards, rejected_mask))
  regularizer = -jax.nn.log_sigmoid(
    beta * jnp.sum(r_w * rho_w, axis=-1)
  ) - jax.nn.log_sigmoid(beta * jnp.sum(r_l * rho_l, axis=-1))
  loss = dpo + alpha * regularizer
  aux = TRegAux(_SG(chosen), _SG(rejected), _SG(dpo), _SG(regularizer))
  return loss, aux


class SparsePoAux(NamedTuple):
  """SparsePO diagnostics, each ``[B]`` float32, no gradient."""

  chosen_rewards: Float[Out, "B"]
  """``β Σ_t m_u ρ^w_t``."""
  rejected_rewards: Float[Out, "B"]
  """``β Σ_t m_u ρ^l_t``."""
  kl_margin: Float[Out, "B"]
  """``δ = β(Σ_t m_d KL^l_t - Σ_t m_d KL^w_t)``; 0 without token KLs."""
  mask_l1: Float[Out, "B"]
  """The weighted L1 sparsity penalty added to the loss."""


@typechecked
def sparse_po_loss(
  policy_chosen_token_logps: Float[In, "B T"],
  policy_rejected_token_logps: Float[In, "B T"],
  ref_chosen_token_logps: Float[In, "B T"],
  ref_rejected_token_logps: Float[In, "B T"],
  chosen_reward_weights: Float[In, "B T"],
  rejected_reward_weights: Float[In, "B T"],
  chosen_mask: Bool[In, "B T"],
  rejected_mask: Bool[In, "B T"],
  chosen_token_kl: Float[In, "B T"] | None = None,
  rejected_token_kl: Float[In, "B T"] | None = None,
  chosen_kl_weights: Float[In, "B T"] | None = None,
  rejected_kl_weights: Float[In, "B T"] | None = None,
  *,
  beta: float = 0.1,
  reward_l1: float = 0.0,
  kl_l1: float = 0.0,
) -> tuple[Float[Out, "B"], SparsePoAux]:
  r"""SparsePO: preference optimisation with sparse token masks.

  Christopoulou et al. (2024) weight each token's contribution to the
  implicit reward by a mask ``m_u`` and, optionally, its TDPO-style KL term
  by a mask ``m_d`` (the authors' ``SparseTrainer``):

  .. math::
    u = \sum_t m_u(y^w_t)\rho^w_t - \sum_t m_u(y^l_t)\rho^l_t, \quad
    δ = \sum_t m_d(y^l_t) KL^l_t - \sum_t m_d(y^w_t) KL^w_t,

  .. math::
    \ell = -\log\sigma(\beta(u - δ))
      + λ_u(\lVert m^w_u\rVert_1 + \lVert m^l_u\rVert_1)
      + λ_d(\lVert m^w_d\rVert_1 + \lVert m^l_d\rVert_1),

  where ``KL_t = KL(π_ref(·|s_t) ‖ π(·|s_t))`` over the vocabulary
  (:func:`reference_token_kl`). Masks may be learned (e.g. ReLU heads on
  hidden states, which give exact zeros) or fixed (e.g. from reference
  activations); gradients flow into the weight arrays so learned masks
  train, so stop them yourself for fixed masks. All weights 1 and no KL
  give DPO exactly; ``m_u ≡ m_d ≡ 1`` gives TDPO-1.

  Args:
    policy_chosen_token_logps: per-token log-probs of the chosen completion
      under the policy, ``[B, T]``.
    policy_rejected_token_logps: same for the rejected completion.
    ref_chosen_token_logps: chosen per-token log-probs under the reference;
      no gradient.
    ref_rejected_token_logps: rejected ones under the reference; no
      gradient.
    chosen_reward_weights: reward mask ``m_u`` on chosen tokens (real,
      usually >= 0); receives gradient.
    rejected_reward_weights: ``m_u`` on rejected tokens.
    chosen_mask: bool completion mask of the chosen tokens.
    rejected_mask: bool completion mask of the rejected tokens.
    chosen_token_kl: optional per-token ``KL(π_ref‖π)`` on chosen
      positions; it depends on the policy and receives gradient.
    rejected_token_kl: the same on rejected positions (pass both or
      neither).
    chosen_kl_weights: optional KL mask ``m_d`` on chosen tokens (1 if
      None); only used with token KLs.
    rejected_kl_weights: ``m_d`` on rejected tokens.
    beta: β > 0.
    reward_l1: L1 sparsity weight λ_u >= 0 on the reward masks.
    kl_l1: L1 sparsity weight λ_d >= 0 on the KL masks.

  Returns:
    ``(loss, aux)``: float32 ``[B]`` loss, not reduced, and its parts.

  References:
    Christopoulou et al., `SparsePO: Controlling Preference Alignment of
    LLMs via Sparse Token Masks <https://arxiv.org/abs/2410.05102>`_, 2024.
  """
  fn = "sparse_po_loss"
  _check_positive("beta", beta, fn)
  _check_nonnegative("reward_l1", reward_l1, fn)
  _check_nonnegative("kl_l1", kl_l1, fn)
  if (chosen_token_kl is None) != (rejected_token_kl is None):
    raise ValueError(
      f"{fn}: pass both chosen_token_kl and rejected_token_kl, or neither."
    )
  if (chosen_kl_weights is None) != (rejected_kl_weights is None):
    raise ValueError(
      f"{fn}: pass both chosen_kl_weights and rejected_kl_weights, or neither."
    )
  if chosen_kl_weights is not None and chosen_token_kl is None:
    raise ValueError(
      f"{fn}: chosen_kl_weights/rejected_kl_weights need "
      "chosen_token_kl/rejected_token_kl."
    )
  rho_w = _token_log_ratio(
    policy_chosen_token_logps, ref_chosen_token_logps, chosen_mask
  )
  rho_l = _token_log_ratio(
    policy_rejected_token_logps, ref_rejected_token_logps, rejected_mask
  )
  mu_w = _masked(chosen_reward_weights, chosen_mask)
  mu_l = _masked(rejected_reward_weights, rejected_mask)
  chosen = jnp.sum(mu_w * rho_w, axis=-1)
  rejected = jnp.sum(mu_l * rho_l, axis=-1)
  l1 = reward_l1 * (
    jnp.sum(jnp.abs(mu_w), axis=-1) + jnp.sum(jnp.abs(mu_l), axis=-1)
  )
  delta = jnp.zeros_like(chosen)
  if chosen_token_kl is not None:
    kl_w = _masked(chosen_token_kl, chosen_mask)
    kl_l = _masked(rejected_token_kl, rejected_mask)
    if chosen_kl_weights is None:
      md_w = jnp.asarray(chosen_mask, jnp.float32)
      md_l = jnp.asarray(rejected_mask, jnp.float32)
    else:
      md_w = _masked(chosen_kl_weights, chosen_mask)
      md_l = _masked(rejected_kl_weights, rejected_mask)
      l1 = l1 + kl_l1 * (
        jnp.sum(jnp.abs(md_w), axis=-1) + jnp.sum(jnp.abs(md_l), axis=-1)
      )
    delta = jnp.sum(md_l * kl_l, axis=-1) - jnp.sum(md_w * kl_w, axis=-1)
  loss = -jax.nn.log_sigmoid(beta * (chosen - rejected - delta)) + l1
  aux = SparsePoAux(
    _SG(beta * chosen), _SG(beta * rejected), _SG(beta * delta), _SG(l1)
  )
  return loss, aux


@typechecked
def reference_token_kl(
  policy_logits: Float[In, "B T V"],
  ref_logits: Float[In, "B T V"],
  mask: Bool[In, "B T"] | None = None,
) -> Float[Out, "B T"]:
  r"""Per-position ``KL(π_ref(·|s_t) ‖ π(·|s_t))`` over the vocabulary.

  ``Σ_v π_ref(v)(log π_ref(v) - log π(v))``, computed with float32
  log-softmax; the KL term of TDPO and SparsePO. The gradient flows into
  ``policy_logits`` only.

  Args:
    policy_logits: policy logits aligned with the completion tokens.
    ref_logits: reference logits; no gradient.
    mask: optional bool completion mask; padded positions (even NaN logits)
      give 0 with zero gradient.

  Returns:
    float32 ``[B, T]``, >= 0 up to rounding.
  """
  policy_logits, ref_logits = _f32(policy_logits), _f32(ref_logits)
  if mask is not None:
    policy_logits = jnp.where(mask[..., None], policy_logits, 0.0)
    ref_logits = jnp.where(mask[..., None], ref_logits, 0.0)
  log_p = jax.nn.log_softmax(policy_logits, axis=-1)
  log_q = jax.nn.log_softmax(_SG(ref_logits), axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  return kl if mask is None else jnp.where(mask, kl, 0.0)


REGISTRY = {
  "tgdpo": tgdpo_loss,
  "t_reg": t_reg_loss,
  "sparse_po": sparse_po_loss,
}
