"""Reward-model training for every objective of ``losses.REWARD_MODEL_LOSSES``.

Each objective is paired with the head that produces its inputs:

* scalar pairwise objectives (Bradley–Terry and its margin / ties / scaled /
  regression forms) → ``RewardModel`` (or an ensemble, trained member by
  member: ``config.ensemble.kind`` = ``heads`` | ``stacked``);
* Gaussian / uncertainty-aware objectives → ``GaussianRewardModel``;
  ``brme`` → ``config.ensemble.num_members`` stacked Gaussian members
  (``[M, B]`` means and log-variances);
* ``multi_objective`` (BT on ``direction``-scalarised rewards) and
  ``multi_objective_regression`` (SteerLM / DPA / ArmoRM attribute
  regression) → ``MultiObjectiveRewardModel`` with ``K =
  len(config.reward_model.direction)`` heads, no gating;
* ``gpm`` → ``PreferenceEmbeddingModel``;
* ``plackett_luce`` → ``RewardModel`` on ranked lists;
* ``prm_*`` → ``ValueModel`` read at the step-end tokens (process RMs).

Arrays are passed to the objective by parameter name. Besides the head's
outputs, preference batches supply, when the data has the columns:

* ``margin`` (the data's preference-strength column);
* ``magnitude`` (scaled BT): ``|margin|``, else ``|chosen_score -
  rejected_score|``;
* ``ties`` (Rao–Kupper, Davidson): the pairs whose strength (margin, else
  score gap) is exactly 0;
* ``chosen_targets`` / ``rejected_targets`` (BT + regression): the
  per-response ``chosen_score`` / ``rejected_score`` columns (the synthetic
  task fills them with its gold reward);
* ``rewards`` / ``targets`` / ``target_mask`` ``[2B, K]``
  (``multi_objective_regression``): both responses of every pair are
  regression rows (chosen rows first), ``targets`` the per-response
  ``chosen_ratings`` / ``rejected_ratings`` columns, ``target_mask`` False
  where a rating is NaN (unrated). Their K must equal the head's (checked
  at start, naming the data's first rated row); the synthetic task emits
  them with ``data.task.attributes``.

Step batches supply ``step_mc_scores`` (the step labels, Monte-Carlo
success rates), ``outcome_correct`` (the last step's label > 0.5: no
rollout continues past the final step, so its MC score is the solution's
outcome) and ``self_confidence`` (``config.reward_model.self_confidence``
for every question; 1 keeps every sample) for SCAN's ``prm_scan``.

Pairs are scored as one packed row ``[prompt | chosen | rejected]`` each
(``config.share_prompt``, default True; `_packing`): the head reads both
responses' last tokens from one forward that runs the prompt once, with
the same scores as two rows.

:func:`check_inputs` fails at start, naming the objective, the missing
arrays and what this trainer supplies for the configured head and data.

At the end the model is evaluated on the held-out split
(``config.eval_data``): pairwise accuracy (overall and, when the pairs name
a ``subset``, per subset: ``eval_accuracy_by_subset``), calibration (ECE,
Brier, reliability diagram PNG) and, with ``config.eval_best_of = N``,
RewardBench-2-style best-of-N accuracy on ranked lists of N scored
responses (``eval_best_of_N_accuracy``: the gold-best response must score
above the N - 1 others; chance 1/N). The lists come from
``config.eval_ranked_data``, else from ``config.eval_data`` when it is
ranked data or the synthetic task (which then draws N responses per prompt
with their gold rewards).

A multi-objective head is scored for all of these by the fixed-weight
scalarisation ``Σ_k v_k r_k`` with ``v = config.reward_model.direction``
(ArmoRM-style fixed weights, DPA's direction; not normalised). With
``multi_objective_regression`` and rated eval pairs the report adds, per
attribute (names: ``config.reward_model.attributes``, else the synthetic
task's ``attributes``), the RMSE and Pearson correlation of the predicted
ratings over every rated held-out response (chosen and rejected):
``eval_rmse_by_attribute``, ``eval_pearson_by_attribute``,
``eval_rated_by_attribute`` and the pooled ``eval_rating_rmse``.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from alignment import evaluation, losses, models, ops
from alignment.trainers import _data, _lm, _packing, _setup

_GAUSSIAN = ("gaussian_bt", "gaussian_bt_sampled")
_GAUSSIAN_ENSEMBLE = ("brme",)
_RANKED = ("plackett_luce",)
_STEP = ("prm_hard", "prm_soft", "prm_scan")
_ENSEMBLES = ("ensemble_heads", "ensemble_stacked")
_MULTI_OBJECTIVE = ("multi_objective", "multi_objective_regression")
# Optional columns of preference data that feed extra objective inputs.
DATA_COLUMNS = ("margin", "scores", "ratings")


def model_kind(config) -> tuple[str, dict]:
  """``(models.build_model kind, kwargs)`` for the configured objective."""
  name = config.loss.name
  ensemble = config.get("ensemble", ml_collections.ConfigDict())
  ekind = ensemble.get("kind", "none")
  if ekind not in ("none", "heads", "stacked"):
    raise ValueError(
      f"config.ensemble.kind={ekind!r}; valid choices are "
      "'none', 'heads', 'stacked'."
    )
  members = int(ensemble.get("num_members", 4))
  if name in _GAUSSIAN_ENSEMBLE:
    # BRME's M Gaussian heads: M stacked GaussianRewardModel members (the
    # multi-head ensemble has scalar heads only).
    if ekind == "heads":
      raise ValueError(
        f"config.loss.name={name!r} needs Gaussian ensemble members; "
        "config.ensemble.kind='heads' has scalar heads only. Use "
        "ensemble=stacked or none (M = config.ensemble.num_members)."
      )
    return "ensemble_stacked", {
      "num_members": members,
      "member_kind": "gaussian_reward",
    }
  if name in _GAUSSIAN:
    kind, kwargs = "gaussian_reward", {}
  elif name in _MULTI_OBJECTIVE:
    kind = "multi_objective_reward"
    kwargs = {"num_objectives": num_objectives(config)}
  elif name == "gpm":
    kind = "preference_embedding"
    kwargs = {"embed_dim": config.reward_model.get("embed_dim", 8)}
  elif name in _STEP:
    kind, kwargs = "value", {}
  elif ekind == "heads":
    return "ensemble_heads", {"num_heads": members}
  elif ekind == "stacked":
    return "ensemble_stacked", {
      "num_members": members,
      "member_kind": "reward",
    }
  else:
    return "reward", {}
  if ekind != "none":
    raise ValueError(
      f"config.ensemble.kind={ekind!r} ensembles scalar reward heads; "
      f"config.loss.name={name!r} trains a {kind!r} head. Use "
      "ensemble=none (or loss=brme for a Gaussian ensemble)."
    )
  return kind, kwargs


def num_objectives(config) -> int:
  """K of a multi-objective head: ``len(config.reward_model.direction)``."""
  direction = list(config.reward_model.direction)
  if not direction:
    raise ValueError(
      "config.reward_model.direction is empty; it needs one weight per "
      "objective (K >= 1)."
    )
  return len(direction)


def check_num_ratings(config, batches, what: str = "config.data") -> None:
  """Fails when the data's attribute ratings do not match the head's K.

  Only for ``multi_objective_regression`` on data with ratings (a missing
  column is :func:`check_inputs`' error).

  Raises:
    ValueError: naming both K, the config key and the data's first rated
      row (``file:line``).
  """
  if config.loss.name != "multi_objective_regression":
    return
  n = int(getattr(batches, "num_ratings", 0) or 0)
  k = num_objectives(config)
  if n and n != k:
    raise ValueError(
      f"{what} carries {n} ratings per response (fields 'chosen_ratings'/"
      f"'rejected_ratings', first rated row "
      f"{getattr(batches, 'ratings_source', '') or '?'}), but "
      f"config.reward_model.direction has K={k} entries (one per attribute "
      "head of config.loss.name='multi_objective_regression'); make them "
      "agree."
    )


def data_kind(config) -> str:
  name = config.loss.name
  if name in _RANKED:
    return "ranked"
  if name in _STEP:
    return "step"
  return "preference"


def _is_gaussian(kind: str, kwargs: dict) -> bool:
  return kind == "gaussian_reward" or kwargs.get("member_kind") == (
    "gaussian_reward"
  )


def supplied_arrays(config, columns=DATA_COLUMNS) -> tuple[str, ...]:
  """Arrays this trainer can pass to the configured objective.

  Args:
    config: the run config (``loss.name``, ``ensemble``, ``reward_model``).
    columns: the optional data columns the batches carry, a subset of
      :data:`DATA_COLUMNS` (``"margin"``: a preference-strength column;
      ``"scores"``: per-response ``chosen_score`` / ``rejected_score``;
      ``"ratings"``: per-response ``chosen_ratings`` / ``rejected_ratings``,
      K attribute ratings each).

  Returns:
    The array names, for the head of :func:`model_kind` on the data of
    :func:`data_kind`.
  """
  unknown = sorted(set(columns) - set(DATA_COLUMNS))
  if unknown:
    raise ValueError(f"unknown data columns {unknown}; valid: {DATA_COLUMNS}.")
  dkind = data_kind(config)
  if dkind == "ranked":
    return ("rewards", "ranking", "mask")
  if dkind == "step":
    return (
      "step_logits",
      "step_labels",
      "step_targets",
      "step_mask",
      "step_mc_scores",
      "outcome_correct",
      "self_confidence",
    )
  kind, kwargs = model_kind(config)
  if kind == "preference_embedding":
    out = ["chosen_embeddings", "rejected_embeddings"]
  else:
    out = ["chosen_rewards", "rejected_rewards"]
  if _is_gaussian(kind, kwargs):
    out += ["chosen_log_vars", "rejected_log_vars"]
    if kind == "gaussian_reward":
      out += ["chosen_noise", "rejected_noise"]
  elif kind in _ENSEMBLES:
    out += ["ensemble_chosen_rewards", "ensemble_rejected_rewards"]
  if kind == "multi_objective_reward":
    out.append("direction")
    if "ratings" in columns:
      out += ["rewards", "targets", "target_mask"]
  if "margin" in columns:
    out.append("margin")
  if "margin" in columns or "scores" in columns:
    out += ["magnitude", "ties"]
  if "scores" in columns:
    out += ["chosen_targets", "rejected_targets"]
  return tuple(out)


# Why an array is missing, and how to get it.
_HINTS = {
  "margin": "a 'margin' column (preference strength) in the data",
  "magnitude": "a 'margin' column or per-response 'chosen_score'/"
  "'rejected_score' columns in the data (e.g. data.source='synthetic', "
  "whose gold reward fills the scores, or a jsonl field_map)",
  "ties": "a 'margin' column or per-response 'chosen_score'/"
  "'rejected_score' columns in the data (ties: strength exactly 0)",
  "chosen_targets": "per-response 'chosen_score'/'rejected_score' columns in"
  " the data (e.g. data.source='synthetic', or a jsonl field_map)",
  "ensemble_chosen_rewards": "an ensemble: config.ensemble.kind='heads' or "
  "'stacked' (config arg ensemble=heads,members=M)",
  "rewards": "per-response attribute ratings: 'chosen_ratings'/"
  "'rejected_ratings' columns (K floats each) in the data (e.g. "
  "data.source='synthetic' with data.task.attributes, or a jsonl "
  "field_map) and a multi-objective head (loss=multi_objective_regression)",
}
_HINTS["rejected_targets"] = _HINTS["chosen_targets"]
_HINTS["ensemble_rejected_rewards"] = _HINTS["ensemble_chosen_rewards"]
_HINTS["targets"] = _HINTS["rewards"]


def check_inputs(config, columns=DATA_COLUMNS) -> None:
  """Fails at start if the objective needs arrays this trainer cannot supply.

  With the default ``columns`` (every optional data column present) it
  rejects objectives no data can feed with the configured head; with the
  columns of the actual data (``run`` does this once the data is open) it
  also rejects those whose column is missing.

  Raises:
    ValueError: naming ``config.loss.name``, the missing arrays, the head
      and data kind, what is supplied and how to get what is missing.
  """
  name = config.loss.name
  fn = losses.REWARD_MODEL_LOSSES[name]
  _, required, _ = _lm.split_kwargs(fn)
  supplied = supplied_arrays(config, columns)
  missing = [a for a in required if a not in supplied]
  if not missing:
    return
  kind, kwargs = model_kind(config)
  head = kind
  if kwargs.get("member_kind"):
    head = f"{kind} of {kwargs['member_kind']}"
  data = f"{data_kind(config)!r} data"
  if data_kind(config) == "preference":
    data += f" with columns {sorted(columns)}"
  hints = sorted({_HINTS[a] for a in missing if a in _HINTS})
  raise ValueError(
    f"config.loss.name={name!r} needs arrays {missing}, which the "
    f"reward-model trainer does not supply for a {head!r} head on {data}; "
    f"it supplies {list(supplied)}."
    + (f" Needs: {'; '.join(hints)}." if hints else "")
  )


def loss_spec(config):
  name = config.loss.name
  if name not in losses.REWARD_MODEL_LOSSES:
    raise ValueError(
      f"config.loss.name={name!r} is not a reward-model loss; valid choices"
      f" are {sorted(losses.REWARD_MODEL_LOSSES)}."
    )
  fn = losses.REWARD_MODEL_LOSSES[name]
  hyper = {k: v for k, v in config.loss.items() if k != "name"}
  _lm.check_hyperparameters(fn, hyper, "config.loss", name)
  check_inputs(config)
  return fn, hyper


def _pair_forward(model, batch, packing=None):
  """Scores chosen and rejected rows in one call: every leaf of the
  ``[2B, ...]`` output (``[M, 2B, ...]`` for ensembles: the member axis
  leads) split back into ``(chosen, rejected)``.

  With ``packing`` (a `_packing.PackedPairs` of the batch) the model reads
  one packed row ``[prompt | chosen | rejected]`` per pair and the head
  each response's last real token (``score_at``): the same scores, each
  prompt run once; a pair that could not be packed scores NaN.
  """
  b = batch.chosen_tokens.shape[0]
  axis = 1 if head_kind(model) in _ENSEMBLES else 0
  if packing is not None:
    out = model.score_at(
      packing.tokens, packing.last_index, **packing.model_kwargs()
    )
    valid = jnp.concatenate([packing.valid, packing.valid])

    def poison(x):
      shape = [1] * x.ndim
      shape[axis] = 2 * b
      return jnp.where(valid.reshape(shape), x, jnp.nan)

    out = jax.tree.map(poison, out)
  else:
    tokens = jnp.concatenate(
      _lm.pad_to_same_length(batch.chosen_tokens, batch.rejected_tokens),
      axis=0,
    )
    attn = jnp.concatenate(
      _lm.pad_to_same_length(
        batch.chosen_attention_mask, batch.rejected_attention_mask
      ),
      axis=0,
    )
    out = model(tokens, attention_mask=attn)
  first = jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, b, axis=axis), out)
  second = jax.tree.map(
    lambda x: jax.lax.slice_in_dim(x, b, 2 * b, axis=axis), out
  )
  return first, second


_HEAD_KINDS = (  # most specific class first
  (models.StackedEnsemble, "ensemble_stacked"),
  (models.MultiHeadEnsembleRewardModel, "ensemble_heads"),
  (models.GaussianRewardModel, "gaussian_reward"),
  (models.MultiObjectiveRewardModel, "multi_objective_reward"),
  (models.PreferenceEmbeddingModel, "preference_embedding"),
  (models.ValueModel, "value"),
  (models.RewardModel, "reward"),
)


def head_kind(model) -> str:
  """The ``models.build_model`` kind of a reward-model module.

  Outputs are interpreted by this kind, never by their rank: an
  ensemble's ``[M, B]`` scores and a GPM's ``[B, D]`` embeddings are both
  2-D.
  """
  for cls, kind in _HEAD_KINDS:
    if isinstance(model, cls):
      return kind
  raise ValueError(
    f"{type(model).__name__} is not a reward-model head; valid kinds: "
    f"{[k for _, k in _HEAD_KINDS]}."
  )


def make_score_fn(graphdef, rest, *, direction=None):
  """``score(params, tokens, attention_mask) -> [B]`` (see
  :func:`scalar_score`); with ``direction`` ``[K]``, a multi-objective
  head scores ``rewards @ direction`` (fixed-weight scalarisation)."""

  def score(params, tokens, attention_mask):
    model = nnx.merge(graphdef, params, rest)
    out = model(tokens, attention_mask=attention_mask)
    if direction is not None and isinstance(out, models.MultiObjective):
      return out.rewards @ jnp.asarray(direction, jnp.float32)
    return scalar_score(out, head_kind(model))

  return score


def make_attribute_fn(graphdef, rest):
  """``attributes(params, tokens, attention_mask) -> [B, K]``: the
  per-objective rewards of a multi-objective head."""

  def attributes(params, tokens, attention_mask):
    model = nnx.merge(graphdef, params, rest)
    return model(tokens, attention_mask=attention_mask).rewards

  return attributes


def scalar_score(out, kind: str):
  """One score per sequence ``[B]`` from a reward head's output.

  Args:
    out: the output of a model of ``kind``.
    kind: its :func:`head_kind` (the decision is made by kind, not rank).

  Returns:
    ``[B]``: the reward; the mean of a Gaussian head; the scalarised score
    of a multi-objective head; the member mean of a scalar ensemble; BRME's
    nominal reward (the most confident member's mean) of a Gaussian
    ensemble.

  Raises:
    ValueError: for heads without a per-sequence score (GPM embeddings,
      value models).
  """
  if kind in ("preference_embedding", "value"):
    raise ValueError(
      f"a {kind!r} head has no scalar score per sequence (GPM compares "
      "pairs of embeddings; a value model scores tokens)."
    )
  if isinstance(out, models.GaussianReward):
    if kind in _ENSEMBLES:  # [M, B] members
      return losses.brme_nominal_reward(out.mean, out.log_variance)
    return out.mean
  if isinstance(out, models.MultiObjective):
    return out.score
  if kind in _ENSEMBLES:  # [M, B]
    return jnp.mean(out, axis=0)
  return out


def column_arrays(batch) -> dict:
  """Objective inputs from a ``PreferenceBatch``'s optional data columns.

  ``margin`` (the column); ``chosen_targets`` / ``rejected_targets`` (the
  ``chosen_score`` / ``rejected_score`` columns); ``magnitude`` =
  ``|margin|``, else ``|chosen_score - rejected_score|``; ``ties`` where
  that strength (signed) is exactly 0; ``targets`` ``[2B, K]`` (the
  ``chosen_ratings`` rows, then the ``rejected_ratings`` rows; 0 where
  unrated) and ``target_mask`` (False where a rating is NaN). Absent
  columns give no entry.
  """
  out = {}
  c_ratings = getattr(batch, "chosen_ratings", None)
  r_ratings = getattr(batch, "rejected_ratings", None)
  if c_ratings is not None and r_ratings is not None:
    ratings = jnp.concatenate(
      [jnp.asarray(c_ratings, jnp.float32), jnp.asarray(r_ratings, jnp.float32)]
    )
    rated = jnp.isfinite(ratings)
    out["targets"] = jnp.where(rated, ratings, 0.0)
    out["target_mask"] = rated
  margin = batch.margin
  chosen = getattr(batch, "chosen_score", None)
  rejected = getattr(batch, "rejected_score", None)
  if margin is not None:
    out["margin"] = margin
  gap = None
  if chosen is not None and rejected is not None:
    out["chosen_targets"] = chosen
    out["rejected_targets"] = rejected
    gap = chosen - rejected
  strength = margin if margin is not None else gap
  if strength is not None:
    out["magnitude"] = jnp.abs(strength)
    out["ties"] = strength == 0
  return out


def step_arrays(batch, *, self_confidence: float = 1.0) -> dict:
  """Objective inputs from a ``StepBatch`` (all but ``step_logits``).

  ``step_labels`` (bool, > 0.5) for ``prm_hard``; ``step_targets`` (the
  labels in [0, 1]) for ``prm_soft``; for SCAN's ``prm_scan``:
  ``step_mc_scores`` (the labels: Monte-Carlo success rates),
  ``outcome_correct`` (the last real step's label > 0.5: no rollout
  continues past the final step, so its MC score is the solution's own
  outcome) and ``self_confidence`` (the given value for every row).
  """
  labels = jnp.asarray(batch.step_labels, jnp.float32)
  mask = jnp.asarray(batch.step_mask)
  last = jnp.argmax(jnp.cumsum(mask, axis=1), axis=1)
  outcome = jnp.take_along_axis(labels, last[:, None], axis=1)[:, 0] > 0.5
  return {
    "step_labels": labels > 0.5,
    "step_targets": labels,
    "step_mask": mask,
    "step_mc_scores": labels,
    "outcome_correct": outcome,
    "self_confidence": jnp.full(labels.shape[:1], self_confidence),
  }


def make_loss_fn(graphdef, rest, config):
  fn, hyper = loss_spec(config)
  name = config.loss.name
  dkind = data_kind(config)
  mkind, mkwargs = model_kind(config)
  gaussian = _is_gaussian(mkind, mkwargs)
  rm_cfg = config.get("reward_model", {})
  noise_samples = int(rm_cfg.get("noise_samples", 1))
  self_confidence = float(rm_cfg.get("self_confidence", 1.0))
  regression = name == "multi_objective_regression"
  bound = _packing.share_prompt_bound(config) if dkind == "preference" else None

  def pairwise(params, frozen, batch, rng):
    del frozen
    model = nnx.merge(graphdef, params, rest)
    packing = (
      None
      if bound is None
      else _packing.pack_batch(batch, completion_len=bound)
    )
    c, r = _pair_forward(model, batch, packing)
    avail = column_arrays(batch)
    if gaussian:
      avail.update(
        chosen_rewards=c.mean,
        rejected_rewards=r.mean,
        chosen_log_vars=c.log_variance,
        rejected_log_vars=r.log_variance,
      )
      if mkind == "gaussian_reward":
        k1, k2 = jax.random.split(rng)
        # [N, B] standard-normal draws (gaussian_bt_sampled).
        noise_shape = (noise_samples,) + c.mean.shape
        avail["chosen_noise"] = jax.random.normal(k1, noise_shape)
        avail["rejected_noise"] = jax.random.normal(k2, noise_shape)
      chosen_score = scalar_score(c, mkind)
      rejected_score = scalar_score(r, mkind)
    elif mkind == "multi_objective_reward":
      direction = jnp.asarray(config.reward_model.direction, jnp.float32)
      avail.update(
        chosen_rewards=c.rewards,
        rejected_rewards=r.rewards,
        direction=direction,
      )
      chosen_score = c.rewards @ direction
      rejected_score = r.rewards @ direction
      if regression:  # 2B regression rows: chosen, then rejected
        check_inputs(config, batch_columns(batch))
        avail["rewards"] = jnp.concatenate([c.rewards, r.rewards])
        loss, _ = _lm.call_by_name(fn, avail, hyper, name)
        mask = jnp.concatenate([batch.example_mask, batch.example_mask])
        rated = avail["target_mask"]
        mask = jnp.logical_and(mask, jnp.any(rated, axis=-1))
        wm = ops.aggregate_sequence_loss(loss, mask)
        metrics = _pair_metrics(wm, chosen_score, rejected_score, batch)
        sq = jnp.square(avail["rewards"] - avail["targets"])
        used = jnp.logical_and(rated, mask[:, None])
        metrics["rating_rmse"] = jnp.sqrt(ops.masked_mean(sq, used))
        return wm, metrics
    elif mkind == "preference_embedding":
      avail.update(chosen_embeddings=c, rejected_embeddings=r)
      chosen_score = _gpm_score(c, r)
      rejected_score = -chosen_score
    elif mkind in _ENSEMBLES:  # [M, B]: each member gets the objective
      avail_m = dict(
        avail,
        ensemble_chosen_rewards=jax.lax.stop_gradient(c),
        ensemble_rejected_rewards=jax.lax.stop_gradient(r),
      )

      def member(cm, rm):
        a = dict(avail_m, chosen_rewards=cm, rejected_rewards=rm)
        return _lm.call_by_name(fn, a, hyper, name)[0]

      loss = jnp.mean(jax.vmap(member)(c, r), axis=0)
      wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
      chosen_score, rejected_score = jnp.mean(c, 0), jnp.mean(r, 0)
      return wm, _pair_metrics(wm, chosen_score, rejected_score, batch)
    else:
      avail.update(chosen_rewards=c, rejected_rewards=r)
      chosen_score, rejected_score = c, r
    loss, _ = _lm.call_by_name(fn, avail, hyper, name)
    wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    return wm, _pair_metrics(wm, chosen_score, rejected_score, batch)

  def ranked(params, frozen, batch, rng):
    del frozen, rng
    model = nnx.merge(graphdef, params, rest)
    b, k, length = batch.tokens.shape
    scores = model(
      batch.tokens.reshape(b * k, length),
      attention_mask=batch.attention_mask.reshape(b * k, length),
    )
    scores = scores.reshape(b, k)
    ranking = jnp.argsort(
      -jnp.where(batch.list_mask, batch.scores, -jnp.inf), axis=-1
    )
    loss, _ = _lm.call_by_name(
      fn,
      {"rewards": scores, "ranking": ranking, "mask": batch.list_mask},
      hyper,
      name,
    )
    wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    return wm, {"rm_loss": wm.value()}

  def step(params, frozen, batch, rng):
    del frozen, rng
    model = nnx.merge(graphdef, params, rest)
    values = model(batch.tokens, attention_mask=batch.attention_mask)
    logits = jnp.take_along_axis(values, batch.step_positions, axis=1)
    avail = step_arrays(batch, self_confidence=self_confidence)
    avail["step_logits"] = logits
    labels, mask = avail["step_targets"], avail["step_mask"]
    loss, aux = _lm.call_by_name(fn, avail, hyper, name)
    # The steps the loss trained on (SCAN drops some).
    used = jnp.logical_and(
      getattr(aux, "step_mask", mask), batch.example_mask[:, None]
    )
    if loss.ndim == 2:  # per step
      wm = ops.aggregate_token_loss(loss, used, mode="token_mean")
    else:
      wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    correct = (logits > 0) == (labels > 0.5)
    acc = ops.masked_mean(
      correct.astype(jnp.float32),
      jnp.logical_and(mask, batch.example_mask[:, None]),
    )
    return wm, {"rm_loss": wm.value(), "step_accuracy": acc}

  return {"preference": pairwise, "ranked": ranked, "step": step}[dkind]


def _gpm_score(vc, vr):
  """GPM preference score <R v_c, v_r> (blocks [[0,-1],[1,0]])."""
  even, odd = vc[..., 0::2], vc[..., 1::2]
  rotated = jnp.stack([-odd, even], axis=-1).reshape(vc.shape)
  return jnp.sum(rotated * vr, axis=-1)


def _pair_metrics(wm, chosen_score, rejected_score, batch):
  m = batch.example_mask
  return {
    "rm_loss": wm.value(),
    "accuracy": _lm.masked_batch_mean(
      (chosen_score > rejected_score).astype(jnp.float32), m
    ),
    "margin": _lm.masked_batch_mean(chosen_score - rejected_score, m),
    "mean_reward": _lm.masked_batch_mean(
      0.5 * (chosen_score + rejected_score), m
    ),
  }


def batch_columns(batch) -> tuple[str, ...]:
  """The :data:`DATA_COLUMNS` a ``PreferenceBatch`` carries (not None)."""
  have = {
    "margin": batch.margin is not None,
    "scores": batch.chosen_score is not None
    and batch.rejected_score is not None,
    "ratings": batch.chosen_ratings is not None
    and batch.rejected_ratings is not None,
  }
  return tuple(c for c in DATA_COLUMNS if have[c])


def data_columns(batches) -> tuple[str, ...]:
  """The :data:`DATA_COLUMNS` a data iterator's batches carry."""
  have = {
    "margin": getattr(batches, "has_margin", False),
    "scores": getattr(batches, "has_scores", False),
    "ratings": bool(getattr(batches, "num_ratings", 0)),
  }
  return tuple(c for c in DATA_COLUMNS if have[c])


def evaluate_pairs(
  score_fn, params, batches, mesh_run, *, max_batches=None, with_subsets=False
):
  """Scores held-out pairs.

  Returns:
    NumPy ``(chosen, rejected)`` score arrays ``[N]`` over the real rows;
    with ``with_subsets`` also their int ``subset_id`` ``[N]`` (-1 where
    the batches carry none).
  """
  jitted = jax.jit(score_fn)
  chosen, rejected, subsets = [], [], []
  for i, host in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    batch = _data.device_batch(host, mesh_run)
    keep = np.asarray(host.example_mask, bool)
    c = np.asarray(
      jitted(params, batch.chosen_tokens, batch.chosen_attention_mask)
    )
    r = np.asarray(
      jitted(params, batch.rejected_tokens, batch.rejected_attention_mask)
    )
    chosen.append(c[keep])
    rejected.append(r[keep])
    sid = getattr(host, "subset_id", None)
    if sid is None:
      sid = np.full(keep.shape, -1, np.int32)
    subsets.append(np.asarray(sid, np.int32)[keep])
  if not chosen:
    out = (np.zeros(0), np.zeros(0), np.zeros(0, np.int32))
  else:
    out = tuple(np.concatenate(x) for x in (chosen, rejected, subsets))
  return out if with_subsets else out[:2]


def evaluate_attribute_pairs(
  attribute_fn, params, batches, mesh_run, *, max_batches=None
):
  """Predicted attributes of held-out pairs and their ratings.

  Returns:
    A dict of NumPy arrays over the real rows: ``chosen`` / ``rejected``
    ``[N, K]`` predictions, ``chosen_ratings`` / ``rejected_ratings``
    ``[N, K]`` (NaN: unrated; None when the batches carry no ratings) and
    int ``subset_id`` ``[N]`` (-1 where the batches carry none).
  """
  jitted = jax.jit(attribute_fn)
  got = {k: [] for k in ("chosen", "rejected", "c_ratings", "r_ratings")}
  subsets, rated = [], True
  for i, host in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    batch = _data.device_batch(host, mesh_run)
    keep = np.asarray(host.example_mask, bool)
    for side in ("chosen", "rejected"):
      tokens = getattr(batch, f"{side}_tokens")
      attn = getattr(batch, f"{side}_attention_mask")
      got[side].append(np.asarray(jitted(params, tokens, attn))[keep])
    ratings = (host.chosen_ratings, host.rejected_ratings)
    rated = rated and ratings[0] is not None and ratings[1] is not None
    if rated:
      got["c_ratings"].append(np.asarray(ratings[0], np.float64)[keep])
      got["r_ratings"].append(np.asarray(ratings[1], np.float64)[keep])
    sid = getattr(host, "subset_id", None)
    if sid is None:
      sid = np.full(keep.shape, -1, np.int32)
    subsets.append(np.asarray(sid, np.int32)[keep])
  if not subsets:
    empty = np.zeros((0, 0))
    return {
      "chosen": empty,
      "rejected": empty,
      "chosen_ratings": None,
      "rejected_ratings": None,
      "subset_id": np.zeros(0, np.int32),
    }
  cat = {k: np.concatenate(v) if v else None for k, v in got.items()}
  return {
    "chosen": cat["chosen"],
    "rejected": cat["rejected"],
    "chosen_ratings": cat["c_ratings"] if rated else None,
    "rejected_ratings": cat["r_ratings"] if rated else None,
    "subset_id": np.concatenate(subsets),
  }


def attribute_report(predictions, ratings, names) -> dict:
  """Per-attribute RMSE and Pearson correlation of predicted ratings.

  Args:
    predictions: ``[M, K]`` predicted attribute ratings (every rated
      response: chosen and rejected rows).
    ratings: ``[M, K]`` the data's ratings, NaN where unrated (ignored).
    names: the K attribute names.

  Returns:
    ``eval_rmse_by_attribute`` / ``eval_pearson_by_attribute`` /
    ``eval_rated_by_attribute`` (``{name: value}``; NaN RMSE without a
    rated response, NaN correlation with fewer than 2 or a constant
    side) and ``eval_rating_rmse`` (over every rated entry, the square
    root of the regression objective's mean).
  """
  pred = np.asarray(predictions, np.float64)
  gold = np.asarray(ratings, np.float64)
  if pred.shape != gold.shape or pred.ndim != 2:
    raise ValueError(
      f"predictions {pred.shape} and ratings {gold.shape} must both be [M, K]."
    )
  if len(names) != pred.shape[1]:
    raise ValueError(f"{len(names)} names for K={pred.shape[1]} attributes.")
  rated = np.isfinite(gold)
  rmse, pearson, count = {}, {}, {}
  for k, name in enumerate(names):
    p, g = pred[rated[:, k], k], gold[rated[:, k], k]
    count[name] = int(len(g))
    rmse[name] = float(np.sqrt(np.mean((p - g) ** 2))) if len(g) else np.nan
    if len(g) >= 2 and p.std() > 0 and g.std() > 0:
      pc, gc = p - p.mean(), g - g.mean()
      pearson[name] = float(
        np.sum(pc * gc) / np.sqrt(np.sum(pc**2) * np.sum(gc**2))
      )
    else:
      pearson[name] = float("nan")
  errors = (pred - np.where(rated, gold, 0.0))[rated]
  return {
    "eval_rmse_by_attribute": rmse,
    "eval_pearson_by_attribute": pearson,
    "eval_rated_by_attribute": count,
    "eval_rating_rmse": float(np.sqrt(np.mean(errors**2)))
    if errors.size
    else float("nan"),
  }


def attribute_names(config) -> list[str]:
  """Names of a multi-objective head's K attributes.

  ``config.reward_model.attributes`` when set, else the synthetic task's
  ``attributes`` (eval data, then training data) when there are K of
  them, else ``attribute_0`` ... ``attribute_{K-1}``.

  Raises:
    ValueError: when ``config.reward_model.attributes`` does not name K.
  """
  k = num_objectives(config)
  given = list(config.reward_model.get("attributes", None) or [])
  if given:
    if len(given) != k:
      raise ValueError(
        f"config.reward_model.attributes names {len(given)} attributes, "
        f"but config.reward_model.direction has K={k} entries."
      )
    return [str(a) for a in given]
  for key in ("eval_data", "data"):
    cfg = config.get(key, None)
    if cfg is None or cfg.get("source", "") != "synthetic":
      continue
    task = cfg.get("task", None) or {}
    names = list(task.get("attributes", None) or [])
    if len(names) == k:
      return [str(a) for a in names]
  return [f"attribute_{i}" for i in range(k)]


def evaluate_lists(score_fn, params, batches, mesh_run, *, max_batches=None):
  """Scores held-out ranked lists (``RankedBatch``es).

  Returns:
    NumPy ``(scores, gold, mask)``, each ``[N, K]`` over the real rows:
    the model's score of every response, the data's scores (higher is
    better) and the ``list_mask`` (False on padding responses).
  """
  jitted = jax.jit(score_fn)
  scores, gold, masks = [], [], []
  for i, host in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    b, k, length = host.tokens.shape
    flat = _data.device_batch(
      (
        np.asarray(host.tokens).reshape(b * k, length),
        np.asarray(host.attention_mask).reshape(b * k, length),
      ),
      mesh_run,
    )
    keep = np.asarray(host.example_mask, bool)
    s = np.asarray(jitted(params, *flat)).reshape(b, k)
    scores.append(s[keep])
    gold.append(np.asarray(host.scores, np.float64)[keep])
    masks.append(np.asarray(host.list_mask, bool)[keep])
  if not scores:
    return np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((0, 0), bool)
  return tuple(np.concatenate(x) for x in (scores, gold, masks))


def subset_report(chosen, rejected, subset_ids, names) -> dict:
  """Per-subset pairwise accuracy (RewardBench's table).

  Args:
    chosen, rejected: ``[N]`` model scores of the pairs.
    subset_ids: ``[N]`` int indices into ``names`` (-1: no subset).
    names: the subset names (the data iterator's ``subset_names``).

  Returns:
    ``eval_accuracy_by_subset`` and ``eval_pairs_by_subset`` (``{name:
    value}``; pairs without a subset under ``"(none)"``) and
    ``eval_accuracy_macro`` (the unweighted mean over subsets); ``{}``
    when there are no pairs.
  """
  ids = np.asarray(subset_ids)
  if ids.size == 0:
    return {}
  res = evaluation.pairwise_accuracy_by_subset(chosen, rejected, ids)
  label = [names[i] if 0 <= i < len(names) else "(none)" for i in res.labels]
  return {
    "eval_accuracy_by_subset": {
      n: float(a) for n, a in zip(label, res.accuracy, strict=True)
    },
    "eval_pairs_by_subset": {
      n: int(c) for n, c in zip(label, res.counts, strict=True)
    },
    "eval_accuracy_macro": float(res.macro),
  }


def best_of_n_report(scores, gold, mask, n: int) -> dict:
  """RewardBench-2-style best-of-``n`` accuracy on ranked lists.

  A list counts when it has exactly ``n`` responses and one response with
  the strictly highest gold score (the "chosen"); it is correct when the
  model scores that response above the ``n - 1`` others (ties scored by
  ``evaluation.best_of_n_accuracy``'s ``"random"`` rule). Chance is
  ``1 / n``.

  Args:
    scores: ``[N, K]`` model scores.
    gold: ``[N, K]`` data scores (higher is better).
    mask: ``[N, K]`` bool, False on padding responses.
    n: the list size (``config.eval_best_of``), ``>= 2``.

  Returns:
    ``eval_best_of_{n}_accuracy`` (NaN when no list counts),
    ``eval_best_of_{n}_lists`` (lists counted) and
    ``eval_best_of_{n}_skipped`` (other sizes or a tied gold best).
  """
  if n < 2:
    raise ValueError(f"config.eval_best_of must be >= 2, got {n}.")
  scores = np.asarray(scores, np.float64)
  mask = np.asarray(mask, bool)
  g = np.where(mask, np.asarray(gold, np.float64), -np.inf)
  total = int(scores.shape[0])
  if total == 0:
    keep = np.zeros(0, bool)
  else:
    top = g.max(axis=1)
    unique = np.sum(g == top[:, None], axis=1) == 1
    keep = (mask.sum(axis=1) == n) & unique & np.isfinite(top)
  prefix = f"eval_best_of_{n}"
  if not keep.any():
    return {
      f"{prefix}_accuracy": float("nan"),
      f"{prefix}_lists": 0,
      f"{prefix}_skipped": total,
    }
  s, g, m = scores[keep], g[keep], mask[keep]
  best = np.argmax(g, axis=1)
  chosen = s[np.arange(len(best)), best]
  others = m & (np.arange(s.shape[1])[None, :] != best[:, None])
  acc = evaluation.best_of_n_accuracy(
    chosen, np.where(others, s, np.nan), others
  )
  return {
    f"{prefix}_accuracy": float(acc),
    f"{prefix}_lists": int(keep.sum()),
    f"{prefix}_skipped": total - int(keep.sum()),
  }


def calibration_report(
  chosen, rejected, workdir, name="reward_model", *, extra=None
):
  """Accuracy, ECE, Brier and a reliability-diagram PNG; returns the dict.

  ``extra`` (e.g. :func:`subset_report`, :func:`best_of_n_report`) is
  merged into the report before ``eval_{name}.json`` is written.
  """
  report = {}
  if len(chosen) or not extra:  # no pairs (ranked data): only ``extra``
    probs, labels = evaluation.preference_calibration_data(chosen, rejected)
    report = {
      "eval_accuracy": evaluation.pairwise_accuracy(chosen, rejected),
      "eval_ece": evaluation.expected_calibration_error(probs, labels),
      "eval_brier": evaluation.brier_score(probs, labels),
      "eval_pairs": int(len(chosen)),
    }
  report.update(extra or {})
  if jax.process_index() == 0 and (len(chosen) or extra):
    if len(chosen):
      diagram = evaluation.reliability_diagram_data(probs, labels)
      evaluation.plot_reliability_diagram(
        diagram, str(workdir / f"reliability_{name}.png")
      )
    (workdir / f"eval_{name}.json").write_text(json.dumps(report, indent=2))
  return report


def ranked_eval_config(config):
  """The data config of the best-of-N lists, or None when there is none.

  ``config.eval_ranked_data`` when set; else ``config.eval_data`` when the
  run trains on ranked data or the eval data is the synthetic task (whose
  lists then hold ``config.eval_best_of`` responses).
  """
  n = int(config.get("eval_best_of", 0) or 0)
  if n <= 0:
    return None
  cfg = config.get("eval_ranked_data", None)
  if cfg is None:
    cfg = config.get("eval_data", None)
    if cfg is None:
      return None
    synthetic = cfg.get("source", "") == "synthetic"
    if not synthetic and data_kind(config) != "ranked":
      return None
    if synthetic:
      cfg = ml_collections.ConfigDict(cfg.to_dict())
      cfg.max_responses = n
  return cfg


def with_backbone(params, backbone_params):
  """RM params whose ``transformer`` subtree comes from a (SFT) causal LM.

  Reward models are usually initialised from the SFT policy (Stiennon et
  al. 2020; Ouyang et al. 2022): the backbone is copied, the head stays
  freshly initialised.
  """
  if "transformer" not in backbone_params or "transformer" not in params:
    raise ValueError(
      "backbone initialisation needs a 'transformer' subtree "
      "in both the reward model and the source params."
    )
  src = jax.tree.map(lambda x: x.shape, backbone_params["transformer"])
  dst = jax.tree.map(lambda x: x.shape, params["transformer"])
  if src != dst:
    raise ValueError(
      "backbone params do not match the reward model's "
      "transformer (different config.model?)."
    )
  out = jax.tree.map(lambda x: x, params)
  out["transformer"] = backbone_params["transformer"]
  return out


def final_evaluation(config, params, run_, tokenizer, kind) -> dict:
  """The held-out evaluation of :func:`run` (module docstring); writes
  ``eval_reward_model.json`` and returns its dict (``{}``: nothing to
  evaluate)."""
  if kind in ("preference_embedding", "value"):
    return {}
  eval_cfg = config.get("eval_data", None)
  eval_bs = config.get("eval_batch_size", config.batch_size)
  max_batches = config.get("eval_batches", None)
  direction = None
  if kind == "multi_objective_reward":
    direction = np.asarray(config.reward_model.direction, np.float64)
  score_fn = make_score_fn(
    run_.model.graphdef, run_.model.rest, direction=direction
  )
  extra = {}
  chosen = rejected = np.zeros(0)
  if eval_cfg is not None and data_kind(config) == "preference":
    eval_it = _data.iterator(
      config, "preference", tokenizer, data_config=eval_cfg, batch_size=eval_bs
    )
    if direction is None:
      chosen, rejected, subsets = evaluate_pairs(
        score_fn,
        params,
        eval_it,
        run_,
        max_batches=max_batches,
        with_subsets=True,
      )
    else:  # one pass: the K attributes, scalarised on the host
      check_num_ratings(config, eval_it, "config.eval_data")
      pairs = evaluate_attribute_pairs(
        make_attribute_fn(run_.model.graphdef, run_.model.rest),
        params,
        eval_it,
        run_,
        max_batches=max_batches,
      )
      k = len(direction)  # (0, 0) arrays when there are no batches
      chosen = pairs["chosen"].reshape(-1, k).astype(np.float64) @ direction
      rejected = pairs["rejected"].reshape(-1, k).astype(np.float64) @ direction
      subsets = pairs["subset_id"]
      if (
        config.loss.name == "multi_objective_regression"
        and pairs["chosen_ratings"] is not None
      ):
        extra.update(
          attribute_report(
            np.concatenate([pairs["chosen"], pairs["rejected"]]),
            np.concatenate(
              [pairs["chosen_ratings"], pairs["rejected_ratings"]]
            ),
            attribute_names(config),
          )
        )
    if eval_it.has_subsets:
      extra.update(
        subset_report(chosen, rejected, subsets, eval_it.subset_names)
      )
  ranked_cfg = ranked_eval_config(config)
  if ranked_cfg is not None:
    lists = _data.iterator(
      config, "ranked", tokenizer, data_config=ranked_cfg, batch_size=eval_bs
    )
    scores, gold, mask = evaluate_lists(
      score_fn, params, lists, run_, max_batches=max_batches
    )
    extra.update(best_of_n_report(scores, gold, mask, int(config.eval_best_of)))
  if not len(chosen) and not extra:
    return {}
  return calibration_report(chosen, rejected, run_.workdir, extra=extra)


@_setup.in_mesh_context
def run(
  config: ml_collections.ConfigDict, workdir: str, *, backbone_params=None
):
  """Trains and evaluates a reward model; returns ``(state, run, report)``.

  ``backbone_params``: optional causal-LM params (e.g. the SFT policy) whose
  transformer initialises the reward model's backbone.
  """
  loss_spec(config)
  tokenizer = _data.tokenizer_of(config)
  kind, kwargs = model_kind(config)
  # The data first: the objective's inputs may need its optional columns,
  # and a missing one must fail before the model is built.
  batches = _data.iterator(config, data_kind(config), tokenizer)
  check_inputs(config, data_columns(batches))
  if data_kind(config) == "preference":
    bound = _packing.share_prompt_bound(config)
    if bound is not None:  # a clear error before a pair is packed wrongly
      batches = _packing.CheckedBatches(
        batches, completion_len=bound, where="config.share_prompt"
      )
  check_num_ratings(config, batches)
  if kind == "multi_objective_reward":
    attribute_names(config)  # a bad attributes list fails at start
  init = None
  if backbone_params is not None:
    init = lambda sharded: with_backbone(sharded.params, backbone_params)  # noqa: E731
  run_ = _setup.setup_run(
    config,
    workdir,
    kind=kind,
    total_steps=config.total_steps,
    model_kwargs=kwargs,
    init_params=init,
  )
  if run_.data_state:
    batches.set_state(run_.data_state)
  loss_fn = make_loss_fn(run_.model.graphdef, run_.model.rest, config)
  state, history = _setup.train_offline(
    config,
    run_,
    loss_fn,
    batches,
    frozen=None,
    name="reward_model",
    console_keys=("loss", "accuracy"),
  )
  report = final_evaluation(config, state["params"], run_, tokenizer, kind)
  kind_for_export = "reward" if kind == "reward" else kind
  _setup.finish(run_, state, history, kind=kind_for_export, name="reward_model")
  return state, run_, report
