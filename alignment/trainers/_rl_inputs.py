"""Extra advantage-estimator inputs the online RL trainer derives.

Most estimators of ``advantages.REGISTRY`` need only the ``[B, G]`` sequence
rewards. This module derives what the others take, only when the configured
estimator names it (no extra cost otherwise):

* ``baseline_rewards`` ``[B]`` (``remax``, Li et al. 2024): one greedy
  completion per prompt, decoded by the rollout's sampler with
  ``greedy=True`` and scored by the same reward scorer. The configured
  shaping is applied to samples and greedy completions together (one batch
  of ``N + B`` rewards), so both are on the same scale; a KL-in-reward
  penalty is not applied to the baseline (any function of the prompt alone
  is an unbiased baseline).
* ``preferences`` ``[B, G, G]`` (``arena_rank``): pairwise verdicts among
  the ``G`` samples of a prompt, from the final sequence rewards
  ``r`` (after shaping and KL-in-reward, as every estimator sees them).
  ``config.reward.preferences`` selects ``"sigmoid"``: ``P(g ≻ h) =
  σ((r_g − r_h) / τ)``, Bradley–Terry with ``τ =
  config.reward.preference_temperature`` (exact for an unshaped learned
  reward model, whose scores are BT logits); ``"hard"``: 1 / 0.5 / 0 for
  ``r_g >`` / ``=`` / ``< r_h`` (a judge's verdicts, for gold or verifier
  rewards); ``"auto"``: ``"sigmoid"`` for ``model``/``ensemble`` sources,
  ``"hard"`` otherwise.
* ``rewards`` ``[B, G, K]`` (``gdpo``): ``K = len(config.reward.components)``
  rewards per sample, from :data:`COMPONENTS`. The scalar reward logged as
  ``shaped_reward`` (and kept in the rollout) is their sum weighted by
  ``config.advantage.reward_weights`` (all 1 when unset).
"""

import inspect

import jax
import jax.numpy as jnp
from jaxtyping import Float

from alignment import rewards as rewards_lib
from alignment.array_types import In, Out, typechecked

__all__ = [
  "COMPONENTS",
  "PREFERENCE_MODES",
  "DERIVED_INPUTS",
  "check",
  "needs_baseline",
  "needs_components",
  "needs_preferences",
  "pairwise_preferences",
  "greedy_baseline",
  "shape_with_baseline",
  "reward_components",
  "group_inputs",
  "preference_mode",
]

COMPONENTS = ("reward", "gold", "verifier", "length")
"""``config.reward.components`` names: ``reward`` the configured scalar
reward (``config.reward.source``, after ``config.reward.shaping``);
``gold`` the synthetic task's gold reward; ``verifier`` the rule verifier
(``config.reward.verifier``) against each record's answer; ``length``
``−completion_length / config.rl.max_new_tokens`` (a brevity term in
``[−1, 0]``)."""

PREFERENCE_MODES = ("auto", "sigmoid", "hard")
DERIVED_INPUTS = ("baseline_rewards", "preferences")
"""Estimator arrays derived here (besides ``[B, G, K]`` rewards)."""


def _params(fn):
  return inspect.signature(inspect.unwrap(fn)).parameters


def needs_baseline(fn) -> bool:
  """True if the estimator takes ``baseline_rewards`` (ReMax)."""
  return "baseline_rewards" in _params(fn)


def needs_preferences(fn) -> bool:
  """True if the estimator takes pairwise ``preferences``."""
  return "preferences" in _params(fn)


def needs_components(fn) -> bool:
  """True if the estimator takes ``K`` rewards per sample ``[B, G, K]``."""
  p = _params(fn).get("rewards")
  return p is not None and "'B G K'" in str(p.annotation)


def check(config, name: str, fn) -> None:
  """Fails at start on a config these derived inputs cannot serve."""
  reward = config.reward
  if needs_preferences(fn):
    mode = reward.get("preferences", "auto")
    if mode not in PREFERENCE_MODES:
      raise ValueError(
        f"config.reward.preferences={mode!r}; valid choices are "
        f"{PREFERENCE_MODES}."
      )
    tau = reward.get("preference_temperature", 1.0)
    if not tau > 0:
      raise ValueError(
        f"config.reward.preference_temperature={tau!r}; it must be > 0."
      )
  if needs_components(fn):
    comps = list(reward.get("components", ()))
    if not comps:
      raise ValueError(
        f"config.advantage.name={name!r} needs K rewards per sample: set "
        f"config.reward.components to names from {COMPONENTS}."
      )
    bad = [c for c in comps if c not in COMPONENTS]
    if bad:
      raise ValueError(
        f"config.reward.components has {bad}; valid names are {COMPONENTS}."
      )
    if "gold" in comps and config.data.source != "synthetic":
      raise ValueError(
        "config.reward.components has 'gold', which needs a synthetic task "
        "(config.data.source='synthetic')."
      )
    weights = config.advantage.get("reward_weights")
    if weights is not None and len(weights) != len(comps):
      raise ValueError(
        f"config.advantage.reward_weights has {len(weights)} entries but "
        f"config.reward.components has {len(comps)}."
      )
    if config.kl.mode == "reward":
      raise ValueError(
        f"config.advantage.name={name!r} normalises each reward component "
        "separately, so a KL penalty in the reward has no single place; use "
        "config.kl.mode='loss' (or 'none')."
      )


@typechecked
def pairwise_preferences(
  rewards: Float[In, "B G"], *, mode: str = "sigmoid", temperature: float = 1.0
) -> Float[Out, "B G G"]:
  r"""``P[b, g, h]``: probability that sample ``g`` beats sample ``h``.

  ``"sigmoid"``: :math:`σ((r_{b,g} − r_{b,h}) / τ)` (Bradley–Terry);
  ``"hard"``: 1 if :math:`r_{b,g} > r_{b,h}`, 0.5 if equal, 0 otherwise.
  Both give ``P[b, g, h] + P[b, h, g] = 1`` and 0.5 on the diagonal.

  Args:
    rewards: sequence rewards ``[B, G]``; no gradient.
    mode: ``"sigmoid"`` or ``"hard"``.
    temperature: τ > 0 of ``"sigmoid"``.

  Returns:
    float32 ``[B, G, G]``; no gradient.
  """
  if mode not in ("sigmoid", "hard"):
    raise ValueError(
      f"pairwise_preferences: mode={mode!r}; valid choices are "
      "('sigmoid', 'hard')."
    )
  if not temperature > 0:
    raise ValueError(
      f"pairwise_preferences: temperature={temperature!r} must be > 0."
    )
  r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  diff = r[:, :, None] - r[:, None, :]
  if mode == "sigmoid":
    return jax.nn.sigmoid(diff / temperature)
  return 0.5 * (jnp.sign(diff) + 1.0)


def preference_mode(config) -> str:
  mode = config.reward.get("preferences", "auto")
  if mode == "auto":
    return (
      "sigmoid" if config.reward.source in ("model", "ensemble") else ("hard")
    )
  return mode


def greedy_baseline(
  config, sampler, params, prompt_tokens, prompt_mask, key, scorer, records
):
  """Greedy completion of each prompt, scored: ``(rewards [B], lengths [B])``.

  Unshaped; :func:`shape_with_baseline` shapes it with the samples.
  """
  out = sampler.generate(
    params,
    prompt_tokens,
    prompt_mask,
    key,
    num_samples=1,
    temperature=config.rl.temperature,
    greedy=True,
  )
  tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
  attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
  prompts = [r["prompt"] for r in records]
  completions = scorer.texts(out.completion_tokens, out.completion_mask)
  scores = scorer(tokens, attn, prompts, completions, list(records))
  return (
    jnp.asarray(scores, jnp.float32),
    jnp.sum(out.completion_mask, axis=1),
  )


def shape_with_baseline(
  shape, names, rewards, lengths, baseline=None, baseline_lengths=None
):
  """Applies ``shape(name, rewards, lengths)`` for each name in order.

  With a ``baseline`` ``[B]``, samples ``[N]`` and baselines are shaped as
  one batch of ``N + B`` (batch statistics include both) and split back.

  Returns:
    ``(shaped rewards [N], shaped baseline [B] or None)``.
  """
  n = rewards.shape[0]
  if baseline is not None:
    rewards = jnp.concatenate([rewards, baseline])
    lengths = jnp.concatenate([lengths, baseline_lengths])
  for name in names:
    rewards = shape(name, rewards, lengths)
  if baseline is None:
    return rewards, None
  return rewards[:n], rewards[n:]


def reward_components(
  config, scorer, seq_rewards, lengths, prompts, completions, records
):
  """``[N, K]`` rewards of ``config.reward.components`` and their scalar.

  Args:
    config: the RL config.
    scorer: the trainer's ``RewardScorer``.
    seq_rewards: ``[N]`` configured (shaped) reward.
    lengths: ``[N]`` completion lengths.
    prompts, completions, records: per-sample texts and records.

  Returns:
    ``(components [N, K], scalar [N])``, the scalar their sum weighted by
    ``config.advantage.reward_weights`` (1 each when unset).
  """
  cols = []
  for name in config.reward.components:
    if name == "reward":
      col = seq_rewards
    elif name == "gold":
      col = scorer.gold(prompts, completions)
      if col is None:
        raise ValueError(
          "config.reward.components has 'gold' but there is no synthetic "
          "task to score it."
        )
    elif name == "verifier":
      col = rewards_lib.verify_batch(
        completions,
        records,
        kind=config.reward.get("verifier", "math_answer"),
      )
    else:  # length
      col = -jnp.asarray(lengths, jnp.float32) / config.rl.max_new_tokens
    cols.append(jnp.asarray(col, jnp.float32))
  comps = jnp.stack(cols, axis=1)
  weights = config.advantage.get("reward_weights")
  w = jnp.ones(comps.shape[1]) if weights is None else jnp.asarray(weights)
  return comps, comps @ w.astype(jnp.float32)


def group_inputs(config, fn, grouped, group, extra=None):
  """Derived estimator arrays for grouped rewards ``[B, G]``.

  Args:
    config: the RL config.
    fn: the estimator.
    grouped: final sequence rewards ``[B, G]``.
    group: ``G``.
    extra: arrays of the rollout: ``baseline_rewards`` ``[B]`` and
      ``reward_components`` ``[N, K]`` when the estimator needs them.

  Returns:
    a dict of the estimator's arrays to add to (or replace in) its inputs.
  """
  extra = extra or {}
  out = {}
  if needs_preferences(fn):
    out["preferences"] = pairwise_preferences(
      grouped,
      mode=preference_mode(config),
      temperature=float(config.reward.get("preference_temperature", 1.0)),
    )
  if needs_baseline(fn):
    out["baseline_rewards"] = _rollout_array(config, extra, "baseline_rewards")
  if needs_components(fn):
    comps = _rollout_array(config, extra, "reward_components")
    out["rewards"] = comps.reshape(-1, group, comps.shape[1])
  return out


def _rollout_array(config, extra, key):
  if key not in extra:
    raise ValueError(
      f"config.advantage.name={config.advantage.name!r} needs {key!r} "
      "from the rollout; pass it in compute_advantages(extra=...)."
    )
  return jnp.asarray(extra[key], jnp.float32)
