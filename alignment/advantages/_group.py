"""Critic-free advantage estimators over groups of samples per prompt.

Group estimators take sequence rewards with an explicit group axis,
``rewards[b, g]`` for the ``g``-th of ``G`` completions sampled for prompt
``b``, and return one advantage per completion, ``[B, G]`` (broadcast it over
the completion's tokens in the loss). Flat ``[B*G]`` rewards in the
TRL/verl order (each prompt's ``G`` samples contiguous) are reshaped with
:func:`reshape_to_groups`.

Shared conventions:

* ``sample_mask`` (optional bool ``[B, G]``) marks samples that exist.
  False entries (padding samples of a fixed-shape batch, or completions no
  reward function could score) are ignored by every statistic, may hold
  NaN, and get advantage 0. A group then has ``n = Σ_g mask`` samples.
* Standard deviations are Bessel-corrected (``ddof=1``), as in TRL
  (``nanstd``), verl and OpenRLHF (``torch.std``) and Tunix.
* A group whose valid rewards are all equal gets advantage exactly 0
  (never NaN, never ``ulp / epsilon``), whatever ``epsilon`` is.
* ``epsilon`` is added to the standard deviation. Defaults follow verl and
  Tunix (1e-6); TRL uses 1e-4 and OpenRLHF 1e-9. Pass ``epsilon=1e-4`` to
  reproduce TRL.
* Estimators with batch statistics (``scale="batch"`` in GRPO, REINFORCE++,
  REINFORCE++-baseline, GPG's α, GDPO's final normalisation) take
  ``axis_name``: inside ``shard_map``/``pmap`` over the data axis, the sums
  are ``psum``-ed so every device gets the global statistic. Under plain
  ``jit`` on global arrays leave it ``None``.
* Outputs are targets for a policy-gradient loss: they carry no gradient.
* Group estimators need ``G >= 2`` and raise ``ValueError`` otherwise. A
  group left with one valid sample by ``sample_mask`` gets advantage 0 (it
  has no baseline); verl instead uses mean 0 and std 1 for single-sample
  groups, i.e. passes the raw reward through.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Real, Shaped

from alignment.advantages._gae import discounted_returns
from alignment.array_types import In, Out, typechecked
from alignment.ops import masked_whiten, safe_divide
from alignment.ops._masked import AxisName

__all__ = [
  "STD_SCALINGS",
  "best_of_group_advantages",
  "dr_grpo_advantages",
  "flatten_groups",
  "gdpo_advantages",
  "gpg_advantages",
  "grpo_advantages",
  "opo_advantages",
  "pass_at_k_advantages",
  "reinforce_plus_plus_advantages",
  "reinforce_plus_plus_baseline_advantages",
  "remax_advantages",
  "reshape_to_groups",
  "rloo_advantages",
]

STD_SCALINGS = ("group", "batch", "none")
"""Valid ``scale`` values of :func:`grpo_advantages`."""


# ----------------------------------------------------------------------------
# Helpers.


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _check_group_size(fn: str, rewards) -> None:
  if rewards.shape[1] < 2:
    raise ValueError(
      f"{fn}: rewards has group size G={rewards.shape[1]} (shape "
      f"{tuple(rewards.shape)}); a group estimator needs G >= 2 samples "
      "per prompt. Pass rewards as [B, G] (reshape_to_groups(flat, "
      "group_size=G) for flat rewards)."
    )


def _check_epsilon(fn: str, epsilon: float) -> None:
  if not epsilon >= 0.0:
    raise ValueError(f"{fn}: epsilon must be >= 0, got {epsilon}.")


def _inputs(rewards, sample_mask):
  """(float32 rewards zeroed where invalid, bool mask); gradient stopped."""
  if sample_mask is None:
    mask = jnp.ones(jnp.shape(rewards), bool)
  else:
    mask = jnp.asarray(sample_mask, bool)
    if mask.ndim < jnp.ndim(rewards):  # [B, G] mask for [B, G, K] rewards
      mask = jnp.broadcast_to(
        mask.reshape(mask.shape + (1,) * (jnp.ndim(rewards) - mask.ndim)),
        jnp.shape(rewards),
      )
  r = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
  return jax.lax.stop_gradient(r), mask


def _group_stats(r, mask):
  """Group statistics over axis 1 (kept), NaN-free for any group size.

  Returns ``(count, mean, centred, std, degenerate)``: ``centred`` is
  ``r - mean`` on valid samples and exactly 0 elsewhere and in degenerate
  groups (all valid rewards equal, including groups of 0 or 1 samples);
  ``std`` is Bessel-corrected (0 for fewer than 2 samples).
  """
  count = jnp.sum(mask, axis=1, keepdims=True, dtype=jnp.float32)
  mean = safe_divide(jnp.sum(r, axis=1, keepdims=True), count)
  highest = jnp.max(jnp.where(mask, r, -jnp.inf), axis=1, keepdims=True)
  lowest = jnp.min(jnp.where(mask, r, jnp.inf), axis=1, keepdims=True)
  degenerate = ~(highest > lowest)
  centred = jnp.where(mask & ~degenerate, r - mean, 0.0)
  var = safe_divide(
    jnp.sum(centred * centred, axis=1, keepdims=True),
    jnp.maximum(count - 1.0, 0.0),
  )
  return count, mean, centred, jnp.sqrt(var), degenerate


def _batch_std(x, weights, axis_name):
  """Weighted Bessel std over all entries (and devices); 0 if < 2."""
  total = _psum(jnp.sum(weights), axis_name)
  mean = safe_divide(_psum(jnp.sum(weights * x), axis_name), total)
  dev = jnp.where(weights > 0, x - mean, 0.0)
  var = safe_divide(
    _psum(jnp.sum(weights * dev * dev), axis_name),
    jnp.maximum(total - 1.0, 0.0),
  )
  return mean, jnp.sqrt(var)


def _standardise(x, mask, epsilon, axis_name):
  """``(x - mean) / (std + epsilon)`` over the batch; 0 if all equal."""
  w = mask.astype(jnp.float32)
  mean, std = _batch_std(x, w, axis_name)
  highest = _pmax(jnp.max(jnp.where(mask, x, -jnp.inf)), axis_name)
  lowest = -_pmax(jnp.max(jnp.where(mask, -x, -jnp.inf)), axis_name)
  out = (x - mean) / (std + epsilon)
  return jnp.where(mask & (highest > lowest), out, 0.0)


def _pmax(x, axis_name):
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


# ----------------------------------------------------------------------------
# Layout.


@typechecked
def reshape_to_groups(
  x: Shaped[In, "N *rest"],
  *,
  group_size: int,
) -> Shaped[Out, "B G *rest"]:
  """Reshapes flat per-sample arrays ``[B*G, ...]`` to ``[B, G, ...]``.

  Samples of one prompt must be contiguous (sample ``i`` belongs to prompt
  ``i // group_size``), the order TRL (``repeat_interleave``) and verl
  (``rollout.n``) produce.

  Args:
    x: flat array whose leading axis has ``B * group_size`` entries.
    group_size: ``G``, samples per prompt; must divide ``x.shape[0]``.

  Returns:
    ``x`` reshaped to ``[B, G, ...]`` (same dtype).

  Raises:
    ValueError: if ``group_size < 1`` or does not divide the leading axis.
  """
  if isinstance(group_size, bool) or group_size < 1:
    raise ValueError(
      f"reshape_to_groups: group_size must be an int >= 1, got {group_size!r}."
    )
  n = x.shape[0]
  if n % group_size:
    raise ValueError(
      f"reshape_to_groups: cannot split {n} samples into groups of "
      f"group_size={group_size}; the leading axis must be a multiple of "
      f"group_size ({n} = {n // group_size} * {group_size} + "
      f"{n % group_size})."
    )
  x = jnp.asarray(x)
  return x.reshape((n // group_size, group_size) + x.shape[1:])


@typechecked
def flatten_groups(x: Shaped[In, "B G *rest"]) -> Shaped[Out, "N *rest"]:
  """Inverse of :func:`reshape_to_groups`: ``[B, G, ...] -> [B*G, ...]``."""
  x = jnp.asarray(x)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


# ----------------------------------------------------------------------------
# GRPO family.


@typechecked
def grpo_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
  *,
  scale: str = "group",
  epsilon: float = 1e-6,
  axis_name: AxisName = None,
) -> Float[Out, "B G"]:
  r"""Group-normalised advantages (GRPO outcome supervision).

  Eq. in Sec. 4.1.2 of Shao et al. (2024):

  .. math::
    A_{b,g} = \frac{r_{b,g} - \operatorname{mean}_g r_{b,\cdot}}{σ + ε},

  where σ depends on ``scale``:

  * ``"group"`` (paper, TRL default, verl): Bessel std of the group;
  * ``"batch"`` (TRL ``scale_rewards="batch"``; group mean with batch std
    is the combination recommended by Liu et al. 2025b): Bessel std of all
    valid *raw* rewards of the batch (over devices with ``axis_name``); the
    mean subtracted is still the group mean;
  * ``"none"`` (Dr. GRPO, TRL ``scale_rewards="none"``, verl
    ``norm_adv_by_std_in_grpo=False``): no division.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    sample_mask: optional bool ``[B, G]``, False for absent/unscorable
      samples (ignored, may be NaN, advantage 0).
    scale: one of ``STD_SCALINGS``.
    epsilon: ε added to σ (verl/Tunix 1e-6; TRL 1e-4; OpenRLHF 1e-9).
    axis_name: mapped axis for the batch std of ``scale="batch"``.

  Returns:
    float32 ``[B, G]`` advantages, 0 for masked samples and for groups
    whose rewards are all equal; no gradient.

  References:
    Shao et al., `DeepSeekMath: Pushing the Limits of Mathematical Reasoning
    in Open Language Models <https://arxiv.org/abs/2402.03300>`_, 2024.
    Liu et al., `Understanding R1-Zero-Like Training: A Critical Perspective
    <https://arxiv.org/abs/2503.20783>`_, 2025.
    Liu et al. (2025b), `Part I: Tricks or Traps? A Deep Dive into RL for LLM
    Reasoning <https://arxiv.org/abs/2508.08221>`_, 2025.
  """
  fn = "grpo_advantages"
  if scale not in STD_SCALINGS:
    raise ValueError(
      f"{fn}: unknown scale={scale!r}; valid choices are {STD_SCALINGS}."
    )
  _check_epsilon(fn, epsilon)
  _check_group_size(fn, rewards)
  r, mask = _inputs(rewards, sample_mask)
  _, _, centred, std, _ = _group_stats(r, mask)
  if scale == "group":
    return centred / (std + epsilon)
  if scale == "batch":
    _, batch_std = _batch_std(r, mask.astype(jnp.float32), axis_name)
    return centred / (batch_std + epsilon)
  return centred


@typechecked
def dr_grpo_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
) -> Float[Out, "B G"]:
  r"""Dr. GRPO advantages: the group mean baseline without std scaling.

  .. math:: A_{b,g} = r_{b,g} - \operatorname{mean}_g r_{b,\cdot}

  (Liu et al. 2025), which removes GRPO's question-level difficulty
  bias. Equal to ``grpo_advantages(..., scale="none")`` and to
  ``(G-1)/G ×`` the RLOO advantage.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.

  Returns:
    float32 ``[B, G]``, 0 for masked samples and all-equal groups.

  References:
    Liu et al., `Understanding R1-Zero-Like Training: A Critical Perspective
    <https://arxiv.org/abs/2503.20783>`_, 2025.
  """
  _check_group_size("dr_grpo_advantages", rewards)
  r, mask = _inputs(rewards, sample_mask)
  return _group_stats(r, mask)[2]


@typechecked
def rloo_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
) -> Float[Out, "B G"]:
  r"""REINFORCE leave-one-out advantages.

  .. math::
    A_{b,g} = r_{b,g} - \frac{1}{n-1}\sum_{h \ne g} r_{b,h}
            = \frac{n}{n-1}\,(r_{b,g} - \operatorname{mean}_h r_{b,h}),

  the unbiased baseline of Kool et al. (2019) used by Ahmadian et al.
  (2024) and verl ``rloo``; ``n`` is the group's valid-sample count.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.

  Returns:
    float32 ``[B, G]``, 0 for masked samples, for groups with fewer than 2
    valid samples and for all-equal groups. Advantages sum to 0 per group.

  References:
    Ahmadian et al., `Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs
    <https://arxiv.org/abs/2402.14740>`_, 2024.
  """
  _check_group_size("rloo_advantages", rewards)
  r, mask = _inputs(rewards, sample_mask)
  count, _, centred, _, _ = _group_stats(r, mask)
  return centred * safe_divide(count, jnp.maximum(count - 1.0, 0.0))


# ----------------------------------------------------------------------------
# Batch-whitened estimators.


@typechecked
def reinforce_plus_plus_advantages(
  rewards: Float[In, "B T"],
  completion_mask: Bool[In, "B T"],
  *,
  gamma: float = 1.0,
  epsilon: float = 1e-8,
  axis_name: AxisName = None,
) -> Float[Out, "B T"]:
  r"""REINFORCE++ advantages: global whitening of token returns.

  Hu et al. (2025): the return-to-go of the token rewards (the outcome
  reward on the last token plus per-token KL penalties),

  .. math::
    G_t = \sum_{s \ge t} γ^{s-t} r_s, \qquad
    A_t = \frac{G_t - μ}{\sqrt{σ^2 + ε}},

  whitened with the mean and Bessel variance over *all valid tokens of the
  global batch* (not per prompt), as verl ``reinforce_plus_plus`` and
  OpenRLHF do. No group axis: it uses one sample per prompt.

  Args:
    rewards: per-token rewards ``[B, T]``; no gradient.
    completion_mask: bool ``[B, T]``, True on completion tokens.
    gamma: discount γ in [0, 1].
    epsilon: ε added to the variance (verl ``masked_whiten``: 1e-8).
    axis_name: mapped axis; mean and variance are global over devices.

  Returns:
    float32 ``[B, T]`` advantages, 0 on masked tokens; no gradient.

  References:
    Hu et al., `REINFORCE++: Stabilizing Critic-Free Policy Optimization
    with Global Advantage Normalization <https://arxiv.org/abs/2501.03262>`_,
    2025.
  """
  _check_epsilon("reinforce_plus_plus_advantages", epsilon)
  returns = discounted_returns(rewards, completion_mask, gamma=gamma)
  return masked_whiten(
    returns,
    jnp.asarray(completion_mask, bool),
    epsilon=epsilon,
    axis_name=axis_name,
  )


@typechecked
def reinforce_plus_plus_baseline_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
  lengths: Real[In, "B G"] | None = None,
  *,
  epsilon: float = 1e-8,
  axis_name: AxisName = None,
) -> Float[Out, "B G"]:
  r"""REINFORCE++-baseline: group mean baseline, then global whitening.

  .. math::
    c_{b,g} = r_{b,g} - \operatorname{mean}_g r_{b,\cdot}, \qquad
    A_{b,g} = \frac{c_{b,g} - μ}{\sqrt{σ^2 + ε}},

  with μ, σ² the mean and Bessel variance of ``c`` over the global batch.
  verl broadcasts ``c`` to every completion token before whitening, so its
  statistics weight each sample by its token count; pass ``lengths`` (the
  completion token counts) to get exactly verl's values (every token of a
  sample has the same advantage, so ``[B, G]`` loses nothing). Without
  ``lengths`` every sample has weight 1.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.
    lengths: optional completion token counts ``[B, G]`` used as weights.
    epsilon: ε added to the variance (verl: 1e-8).
    axis_name: mapped axis; μ and σ² are global over devices.

  Returns:
    float32 ``[B, G]``, 0 for masked samples (and zero-length ones when
    ``lengths`` is given); no gradient. A group whose rewards are all equal
    has ``c = 0`` and gets ``-μ/σ``, which is 0 only when μ = 0 (always with
    unit weights, since ``c`` sums to 0 per group).

  References:
    Hu et al., `REINFORCE++: Stabilizing Critic-Free Policy Optimization
    with Global Advantage Normalization <https://arxiv.org/abs/2501.03262>`_,
    2025.
  """
  fn = "reinforce_plus_plus_baseline_advantages"
  _check_epsilon(fn, epsilon)
  _check_group_size(fn, rewards)
  r, mask = _inputs(rewards, sample_mask)
  centred = _group_stats(r, mask)[2]
  weights = mask.astype(jnp.float32)
  if lengths is not None:
    weights = jnp.where(mask, jnp.asarray(lengths, jnp.float32), 0.0)
    weights = jax.lax.stop_gradient(weights)
  mean, std = _batch_std(centred, weights, axis_name)
  out = (centred - mean) * jax.lax.rsqrt(std * std + epsilon)
  return jnp.where(weights > 0, out, 0.0)


@typechecked
def remax_advantages(
  rewards: Float[In, "B G"],
  baseline_rewards: Float[In, "B"],
  sample_mask: Bool[In, "B G"] | None = None,
) -> Float[Out, "B G"]:
  r"""ReMax advantages: the greedy completion's reward as baseline.

  .. math:: A_{b,g} = r(x_b, y_{b,g}) - r(x_b, \bar y_b),

  Li et al. (2024), where :math:`\bar y_b` is the greedy
  (argmax-decoded) completion of prompt ``b``, scored by the same reward.
  ``G = 1`` is the paper's setting; ``G > 1`` shares the baseline. For
  token-level rewards (KL in the reward, as in verl ``remax``) subtract the
  baseline from :func:`~alignment.advantages.discounted_returns` instead.

  Args:
    rewards: sequence rewards of the sampled completions ``[B, G]``; no
      gradient.
    baseline_rewards: reward of each prompt's greedy completion ``[B]``; no
      gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.

  Returns:
    float32 ``[B, G]``, 0 for masked samples; no gradient.

  References:
    Li et al., `ReMax: A Simple, Effective, and Efficient Reinforcement
    Learning Method for Aligning Large Language Models
    <https://arxiv.org/abs/2310.10505>`_, 2024.
  """
  r, mask = _inputs(rewards, sample_mask)
  baseline = jax.lax.stop_gradient(jnp.asarray(baseline_rewards, jnp.float32))
  return jnp.where(mask, r - baseline[:, None], 0.0)


@typechecked
def opo_advantages(
  rewards: Float[In, "B G"],
  lengths: Real[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
) -> Float[Out, "B G"]:
  r"""OPO advantages: length-weighted group baseline.

  .. math::
    b_b = \frac{\sum_g \ell_{b,g}\, r_{b,g}}{\sum_g \ell_{b,g}}, \qquad
    A_{b,g} = r_{b,g} - b_b,

  the optimal baseline of On-Policy RL with Optimal reward baseline (Hao et
  al. 2025) under its assumption that the gradient norm of a sequence grows
  with its length ``ℓ`` (verl ``opo``).

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    lengths: completion token counts ``ℓ`` ``[B, G]``.
    sample_mask: optional bool ``[B, G]`` of valid samples.

  Returns:
    float32 ``[B, G]``, 0 for masked samples and all-equal groups.

  References:
    Hao et al., `On-Policy RL with Optimal Reward Baseline
    <https://arxiv.org/abs/2505.23585>`_, 2025.
  """
  _check_group_size("opo_advantages", rewards)
  r, mask = _inputs(rewards, sample_mask)
  weights = jax.lax.stop_gradient(
    jnp.where(mask, jnp.asarray(lengths, jnp.float32), 0.0)
  )
  degenerate = _group_stats(r, mask)[4]
  baseline = safe_divide(
    jnp.sum(weights * r, axis=1, keepdims=True),
    jnp.sum(weights, axis=1, keepdims=True),
  )
  return jnp.where(mask & ~degenerate, r - baseline, 0.0)


@typechecked
def gpg_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
  *,
  alpha: float | None = None,
  normalize_std: bool = False,
  epsilon: float = 1e-6,
  axis_name: AxisName = None,
) -> Float[Out, "B G"]:
  r"""Group Policy Gradient (GPG) advantages with the AGE correction.

  .. math::
    A_{b,g} = α\,\frac{r_{b,g} - \operatorname{mean}_g r_{b,\cdot}}
              {F_{norm}}, \qquad α = \frac{B'}{B' - M},

  Chu et al. (2025): ``F_norm`` is 1 (paper default) or the group std
  (``normalize_std=True``). ``B'`` counts the valid samples of the global
  batch and ``M`` those in groups with zero advantage (all rewards equal),
  so α rescales the batch-mean gradient to the samples that carry signal
  ("accurate gradient estimation"); ``alpha`` fixes α instead (α = 1 is the
  paper's ablation). verl's ``gpg`` estimator instead uses ``B / #(r ≠ 0)``
  (non-zero *rewards*), which differs from the paper unless rewards are 0
  exactly on the zero-advantage samples.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.
    alpha: fixed α > 0, or ``None`` for ``B'/(B'-M)``.
    normalize_std: divide by the group std + ε (``F_norm = std``).
    epsilon: ε for ``normalize_std``.
    axis_name: mapped axis; ``B'`` and ``M`` are counted over devices.

  Returns:
    float32 ``[B, G]``, 0 for masked samples and all-equal groups.

  References:
    Chu et al., `GPG: A Simple and Strong Reinforcement Learning Baseline
    for Model Reasoning <https://arxiv.org/abs/2504.02546>`_, 2025.
  """
  fn = "gpg_advantages"
  if alpha is not None and not alpha > 0:
    raise ValueError(f"{fn}: alpha must be > 0 or None, got {alpha}.")
  _check_epsilon(fn, epsilon)
  _check_group_size(fn, rewards)
  r, mask = _inputs(rewards, sample_mask)
  _, _, centred, std, degenerate = _group_stats(r, mask)
  if alpha is None:
    valid = _psum(jnp.sum(mask, dtype=jnp.float32), axis_name)
    zero = _psum(jnp.sum(mask & degenerate, dtype=jnp.float32), axis_name)
    scale = safe_divide(valid, valid - zero)
  else:
    scale = jnp.float32(alpha)
  if normalize_std:
    return scale * centred / (std + epsilon)
  return scale * centred


# ----------------------------------------------------------------------------
# Pass@k.


def _ratio_of_binomials(top, bottom, k):
  """C(top, k) / C(bottom, k) for bottom >= k, as a product (exact zeros)."""
  i = jnp.arange(k, dtype=jnp.float32).reshape((1,) * top.ndim + (k,))
  num = jnp.maximum(top[..., None] - i, 0.0)
  den = jnp.maximum(bottom[..., None] - i, 1.0)
  return jnp.prod(num / den, axis=-1)


@typechecked
def pass_at_k_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
  *,
  k: int,
  success_threshold: float = 0.5,
  epsilon: float = 1e-6,
) -> Float[Out, "B G"]:
  r"""Analytical Pass@k-training advantages for binary rewards.

  Chen et al. (2025), analytical derivation: with ``n`` samples per group
  of which ``n_pos`` pass and ``n_neg = n - n_pos`` fail, the expected
  pass@k reward of a random ``k``-subset and its std are

  .. math::
    \bar R = 1 - \binom{n_{neg}}{k} / \binom{n}{k}, \qquad
    σ = \sqrt{\bar R (1 - \bar R)},

  and the group-normalised advantage of each sample (averaged over all
  ``k``-subsets containing it) is

  .. math::
    A_{pos} = \frac{1 - \bar R}{σ + ε}, \qquad
    A_{neg} = \frac{1 - \bar R -
              \binom{n_{neg}-1}{k-1} / \binom{n-1}{k-1}}{σ + ε}.

  ``k = 1`` gives GRPO with the population std. The authors' code
  (``RUCAIBox/Passk_Training``) uses ε = 1e-6.

  Args:
    rewards: rewards ``[B, G]``; a sample passes when its reward is
      ``> success_threshold``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.
    k: the ``k`` of pass@k, ``1 <= k <= G``.
    success_threshold: reward above which a sample counts as a pass.
    epsilon: ε added to σ.

  Returns:
    float32 ``[B, G]``, 0 for masked samples, for groups with fewer than
    ``k`` valid samples, and for groups that all pass or all fail.

  References:
    Chen et al., `Pass@k Training for Adaptively Balancing Exploration and
    Exploitation of Large Reasoning Models
    <https://arxiv.org/abs/2508.10751>`_, 2025.
  """
  fn = "pass_at_k_advantages"
  _check_group_size(fn, rewards)
  group = rewards.shape[1]
  if isinstance(k, bool) or not 1 <= k <= group:
    raise ValueError(f"{fn}: k must be an int in [1, G={group}], got {k!r}.")
  _check_epsilon(fn, epsilon)
  r, mask = _inputs(rewards, sample_mask)
  passed = mask & (r > success_threshold)
  n = jnp.sum(mask, axis=1, dtype=jnp.float32)
  n_neg = n - jnp.sum(passed, axis=1, dtype=jnp.float32)
  mean = 1.0 - _ratio_of_binomials(n_neg, n, k)
  std = jnp.sqrt(jnp.maximum(mean * (1.0 - mean), 0.0))
  neg_term = _ratio_of_binomials(n_neg - 1.0, n - 1.0, k - 1)
  pos = (1.0 - mean) / (std + epsilon)
  neg = (1.0 - mean - neg_term) / (std + epsilon)
  out = jnp.where(passed, pos[:, None], neg[:, None])
  # Exact zeros when all pass or all fail (XLA may divide via reciprocals).
  informative = (n >= k) & (n_neg > 0) & (n_neg < n)
  return jnp.where(mask & informative[:, None], out, 0.0)


@typechecked
def best_of_group_advantages(
  rewards: Float[In, "B G"],
  sample_mask: Bool[In, "B G"] | None = None,
  *,
  scale_std: bool = True,
  epsilon: float = 1e-6,
) -> Float[Out, "B G"]:
  r"""Max-reward (pass@G) advantages: only the best sample learns.

  The leave-one-out gradient of the max-of-group objective (Tang et al.
  2025, as implemented by verl ``grpo_passk``): the best sample of each
  group gets ``r_max - r_second`` (divided by the group's Bessel std + ε when
  ``scale_std``), every other sample 0. Ties give 0.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.
    scale_std: divide by the group std + ε (verl
      ``norm_adv_by_std_in_grpo``, default True).
    epsilon: ε added to the std.

  Returns:
    float32 ``[B, G]``: one non-negative entry per group (the first best
    sample), 0 elsewhere and for groups with fewer than 2 valid samples.

  References:
    Tang et al., `Optimizing Language Models for Inference Time Objectives
    using Reinforcement Learning <https://arxiv.org/abs/2503.19595>`_, 2025.
  """
  fn = "best_of_group_advantages"
  _check_group_size(fn, rewards)
  _check_epsilon(fn, epsilon)
  r, mask = _inputs(rewards, sample_mask)
  count, _, _, std, _ = _group_stats(r, mask)
  scores = jnp.where(mask, r, -jnp.inf)
  best = jnp.argmax(scores, axis=1)
  is_best = jnp.arange(r.shape[1])[None, :] == best[:, None]
  top = jnp.max(scores, axis=1)
  second = jnp.max(jnp.where(is_best, -jnp.inf, scores), axis=1)
  gap = jnp.where(count[:, 0] >= 2, top - second, 0.0)
  if scale_std:
    gap = gap / (std[:, 0] + epsilon)
  return jnp.where(is_best & mask, gap[:, None], 0.0)


# ----------------------------------------------------------------------------
# Multiple rewards.


@typechecked
def gdpo_advantages(
  rewards: Float[In, "B G K"],
  sample_mask: Bool[In, "B G"] | None = None,
  *,
  reward_weights: tuple[float, ...] | None = None,
  epsilon: float = 1e-6,
  axis_name: AxisName = None,
) -> Float[Out, "B G"]:
  r"""GDPO: normalise each reward within its group, sum, normalise the batch.

  For ``K`` reward functions (TRL
  ``multi_objective_aggregation="normalize_then_sum"``):

  .. math::
    \hat r^k_{b,g} = \frac{r^k_{b,g} - \operatorname{mean}_g r^k_{b,\cdot}}
                          {σ^k_b + ε}, \quad
    s_{b,g} = \sum_k w_k \hat r^k_{b,g}, \quad
    A_{b,g} = \frac{s_{b,g} - \operatorname{mean}(s)}{\operatorname{std}(s)
              + ε},

  group stds and the final batch std Bessel-corrected. Normalising each
  reward separately keeps distinct reward combinations distinct, where
  GRPO on the weighted sum collapses them. Use ``epsilon=1e-4`` for TRL.

  Args:
    rewards: per-function rewards ``[B, G, K]``; no gradient.
    sample_mask: optional bool ``[B, G]`` of valid samples.
    reward_weights: ``K`` weights ``w_k`` (default all 1).
    epsilon: ε added to the group and batch stds.
    axis_name: mapped axis for the batch normalisation.

  Returns:
    float32 ``[B, G]``, 0 for masked samples; 0 everywhere if all ``s`` are
    equal.

  References:
    Liu et al., `GDPO: Group reward-Decoupled Normalization Policy
    Optimization for Multi-reward RL Optimization
    <https://arxiv.org/abs/2601.05242>`_, 2026.
  """
  fn = "gdpo_advantages"
  n_rewards = rewards.shape[2]
  if reward_weights is not None and len(reward_weights) != n_rewards:
    raise ValueError(
      f"{fn}: reward_weights has {len(reward_weights)} entries but "
      f"rewards has K={n_rewards} reward functions."
    )
  _check_epsilon(fn, epsilon)
  _check_group_size(fn, rewards)
  r, mask = _inputs(rewards, sample_mask)
  _, _, centred, std, _ = _group_stats(r, mask)
  weights = jnp.ones((n_rewards,), jnp.float32)
  if reward_weights is not None:
    weights = jnp.asarray(reward_weights, jnp.float32)
  summed = jnp.sum(centred / (std + epsilon) * weights[None, None], axis=-1)
  return _standardise(summed, mask[..., 0], epsilon, axis_name)


REGISTRY = {
  "grpo": grpo_advantages,
  "dr_grpo": dr_grpo_advantages,
  "rloo": rloo_advantages,
  "reinforce_pp": reinforce_plus_plus_advantages,
  "reinforce_pp_baseline": reinforce_plus_plus_baseline_advantages,
  "remax": remax_advantages,
  "opo": opo_advantages,
  "gpg": gpg_advantages,
  "pass_at_k": pass_at_k_advantages,
  "grpo_passk": best_of_group_advantages,
  "gdpo": gdpo_advantages,
}
