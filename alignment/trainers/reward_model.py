"""Reward-model training for every objective of ``losses.REWARD_MODEL_LOSSES``.

Each objective is paired with the head that produces its inputs:

* scalar pairwise objectives (Bradley–Terry and its margin / ties / scaled
  forms) → ``RewardModel`` (or an ensemble, trained member by member:
  ``config.ensemble.kind`` = ``heads`` | ``stacked``);
* Gaussian / uncertainty-aware objectives → ``GaussianRewardModel``;
* ``multi_objective`` → ``MultiObjectiveRewardModel``;
* ``gpm`` → ``PreferenceEmbeddingModel``;
* ``plackett_luce`` → ``RewardModel`` on ranked lists;
* ``prm_*`` → ``ValueModel`` read at the step-end tokens (process RMs).

At the end (and every ``config.eval_every`` steps) the model is evaluated
on the held-out split: pairwise accuracy (overall and per subset),
calibration (ECE, Brier, reliability diagram PNG).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from alignment import evaluation, losses, models, ops
from alignment.trainers import _data, _lm, _setup, common

_GAUSSIAN = ("gaussian_bt", "gaussian_bt_sampled", "brme")
_RANKED = ("plackett_luce",)
_STEP = ("prm_hard", "prm_soft", "prm_scan")


def model_kind(config) -> tuple[str, dict]:
  """``(models.build_model kind, kwargs)`` for the configured objective."""
  name = config.loss.name
  ensemble = config.get("ensemble", ml_collections.ConfigDict())
  if name in _GAUSSIAN:
    return "gaussian_reward", {}
  if name == "multi_objective":
    return "multi_objective_reward", {
        "num_objectives": len(config.reward_model.direction)}
  if name == "gpm":
    return "preference_embedding", {
        "embed_dim": config.reward_model.get("embed_dim", 8)}
  if name in _STEP:
    return "value", {}
  kind = ensemble.get("kind", "none")
  if kind == "heads":
    return "ensemble_heads", {"num_heads": ensemble.num_members}
  if kind == "stacked":
    return "ensemble_stacked", {"num_members": ensemble.num_members,
                                "member_kind": "reward"}
  if kind != "none":
    raise ValueError(f"config.ensemble.kind={kind!r}; valid choices are "
                     "'none', 'heads', 'stacked'.")
  return "reward", {}


def data_kind(config) -> str:
  name = config.loss.name
  if name in _RANKED:
    return "ranked"
  if name in _STEP:
    return "step"
  return "preference"


def loss_spec(config):
  name = config.loss.name
  if name not in losses.REWARD_MODEL_LOSSES:
    raise ValueError(
        f"config.loss.name={name!r} is not a reward-model loss; valid choices"
        f" are {sorted(losses.REWARD_MODEL_LOSSES)}.")
  fn = losses.REWARD_MODEL_LOSSES[name]
  hyper = {k: v for k, v in config.loss.items() if k != "name"}
  _lm.check_hyperparameters(fn, hyper, "config.loss", name)
  return fn, hyper


def _pair_forward(model, batch, *, member_axis: bool):
  """Scores chosen and rejected rows in one call: leaves of ``[2B, ...]``
  outputs (``[M, 2B]`` for ensembles, ``member_axis=True``) split back
  into ``(chosen, rejected)``."""
  b = batch.chosen_tokens.shape[0]
  tokens = jnp.concatenate(_lm.pad_to_same_length(
      batch.chosen_tokens, batch.rejected_tokens), axis=0)
  attn = jnp.concatenate(_lm.pad_to_same_length(
      batch.chosen_attention_mask, batch.rejected_attention_mask), axis=0)
  out = model(tokens, attention_mask=attn)
  if member_axis:  # ensembles: [M, 2B]
    return out[:, :b], out[:, b:]
  return (jax.tree.map(lambda x: x[:b], out),
          jax.tree.map(lambda x: x[b:], out))


def make_score_fn(graphdef, rest):
  """``score(params, tokens, attention_mask) -> [B]`` (ensemble: mean)."""

  def score(params, tokens, attention_mask):
    model = nnx.merge(graphdef, params, rest)
    return scalar_score(model(tokens, attention_mask=attention_mask))

  return score


def scalar_score(out):
  """One score per sequence from any reward head's output."""
  if isinstance(out, models.GaussianReward):
    return out.mean
  if isinstance(out, models.MultiObjective):
    return out.score
  if out.ndim == 2:  # ensemble [M, B]
    return jnp.mean(out, axis=0)
  return out


def make_loss_fn(graphdef, rest, config):
  fn, hyper = loss_spec(config)
  name = config.loss.name
  dkind = data_kind(config)
  mkind, _ = model_kind(config)
  noise_samples = int(config.get("reward_model", {}).get("noise_samples", 1))

  def pairwise(params, frozen, batch, rng):
    del frozen
    model = nnx.merge(graphdef, params, rest)
    # By kind, not by ndim: GPM embeddings are [2B, D], ensembles [M, 2B].
    c, r = _pair_forward(model, batch, member_axis=mkind.startswith(
        "ensemble_"))
    avail = {}
    if batch.margin is not None:
      avail["margin"] = batch.margin
      avail["magnitude"] = batch.margin
    if mkind == "gaussian_reward":
      avail.update(chosen_rewards=c.mean, rejected_rewards=r.mean,
                   chosen_log_vars=c.log_variance,
                   rejected_log_vars=r.log_variance)
      k1, k2 = jax.random.split(rng)
      # [N, B] standard-normal draws (gaussian_bt_sampled).
      noise_shape = (noise_samples,) + c.mean.shape
      avail["chosen_noise"] = jax.random.normal(k1, noise_shape)
      avail["rejected_noise"] = jax.random.normal(k2, noise_shape)
      chosen_score, rejected_score = c.mean, r.mean
    elif mkind == "multi_objective_reward":
      direction = jnp.asarray(config.reward_model.direction, jnp.float32)
      avail.update(chosen_rewards=c.rewards, rejected_rewards=r.rewards,
                   direction=direction)
      chosen_score, rejected_score = c.rewards @ direction, r.rewards @ \
          direction
    elif mkind == "preference_embedding":
      avail.update(chosen_embeddings=c, rejected_embeddings=r)
      chosen_score = _gpm_score(c, r)
      rejected_score = -chosen_score
    elif c.ndim == 2:  # ensemble [M, B]: each member gets the objective
      avail_m = dict(avail, ensemble_chosen_rewards=jax.lax.stop_gradient(c),
                     ensemble_rejected_rewards=jax.lax.stop_gradient(r))

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
    scores = model(batch.tokens.reshape(b * k, length),
                   attention_mask=batch.attention_mask.reshape(b * k, length))
    scores = scores.reshape(b, k)
    ranking = jnp.argsort(-jnp.where(batch.list_mask, batch.scores, -jnp.inf),
                          axis=-1)
    loss, _ = _lm.call_by_name(fn, {"rewards": scores, "ranking": ranking,
                                    "mask": batch.list_mask}, hyper, name)
    wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    return wm, {"rm_loss": wm.value()}

  def step(params, frozen, batch, rng):
    del frozen, rng
    model = nnx.merge(graphdef, params, rest)
    values = model(batch.tokens, attention_mask=batch.attention_mask)
    logits = jnp.take_along_axis(values, batch.step_positions, axis=1)
    labels = jnp.asarray(batch.step_labels, jnp.float32)
    # prm_hard takes bool labels, prm_soft float targets in [0, 1].
    avail = {"step_logits": logits, "step_labels": labels > 0.5,
             "step_targets": labels, "step_mask": batch.step_mask}
    loss, _ = _lm.call_by_name(fn, avail, hyper, name)
    if loss.ndim == 2:  # per step
      wm = ops.aggregate_token_loss(loss, jnp.logical_and(
          batch.step_mask, batch.example_mask[:, None]), mode="token_mean")
    else:
      wm = ops.aggregate_sequence_loss(loss, batch.example_mask)
    correct = (logits > 0) == (labels > 0.5)
    acc = ops.masked_mean(correct.astype(jnp.float32), jnp.logical_and(
        batch.step_mask, batch.example_mask[:, None]))
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
          (chosen_score > rejected_score).astype(jnp.float32), m),
      "margin": _lm.masked_batch_mean(chosen_score - rejected_score, m),
      "mean_reward": _lm.masked_batch_mean(
          0.5 * (chosen_score + rejected_score), m),
  }


def evaluate_pairs(score_fn, params, batches, mesh_run, *, max_batches=None):
  """Scores held-out pairs; returns NumPy chosen/rejected score arrays."""
  jitted = jax.jit(score_fn)
  chosen, rejected = [], []
  for i, host in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    batch = _data.device_batch(host, mesh_run)
    keep = np.asarray(host.example_mask, bool)
    c = np.asarray(jitted(params, batch.chosen_tokens,
                          batch.chosen_attention_mask))
    r = np.asarray(jitted(params, batch.rejected_tokens,
                          batch.rejected_attention_mask))
    chosen.append(c[keep])
    rejected.append(r[keep])
  if not chosen:
    return np.zeros(0), np.zeros(0)
  return np.concatenate(chosen), np.concatenate(rejected)


def calibration_report(chosen, rejected, workdir, name="reward_model"):
  """Accuracy, ECE, Brier and a reliability-diagram PNG; returns the dict."""
  probs, labels = evaluation.preference_calibration_data(chosen, rejected)
  report = {
      "eval_accuracy": evaluation.pairwise_accuracy(chosen, rejected),
      "eval_ece": evaluation.expected_calibration_error(probs, labels),
      "eval_brier": evaluation.brier_score(probs, labels),
      "eval_pairs": int(len(chosen)),
  }
  if jax.process_index() == 0 and len(chosen):
    diagram = evaluation.reliability_diagram_data(probs, labels)
    evaluation.plot_reliability_diagram(
        diagram, str(workdir / f"reliability_{name}.png"))
    (workdir / f"eval_{name}.json").write_text(json.dumps(report, indent=2))
  return report


def with_backbone(params, backbone_params):
  """RM params whose ``transformer`` subtree comes from a (SFT) causal LM.

  Reward models are usually initialised from the SFT policy (Stiennon et
  al. 2020; Ouyang et al. 2022): the backbone is copied, the head stays
  freshly initialised.
  """
  if "transformer" not in backbone_params or "transformer" not in params:
    raise ValueError("backbone initialisation needs a 'transformer' subtree "
                     "in both the reward model and the source params.")
  src = jax.tree.map(lambda x: x.shape, backbone_params["transformer"])
  dst = jax.tree.map(lambda x: x.shape, params["transformer"])
  if src != dst:
    raise ValueError("backbone params do not match the reward model's "
                     "transformer (different config.model?).")
  out = jax.tree.map(lambda x: x, params)
  out["transformer"] = backbone_params["transformer"]
  return out


def run(config: ml_collections.ConfigDict, workdir: str, *,
        backbone_params=None):
  """Trains and evaluates a reward model; returns ``(state, run, report)``.

  ``backbone_params``: optional causal-LM params (e.g. the SFT policy) whose
  transformer initialises the reward model's backbone.
  """
  loss_spec(config)
  tokenizer = _data.tokenizer_of(config)
  kind, kwargs = model_kind(config)
  init = None
  if backbone_params is not None:
    init = lambda sharded: with_backbone(sharded.params, backbone_params)  # noqa: E731
  run_ = _setup.setup_run(config, workdir, kind=kind,
                          total_steps=config.total_steps, model_kwargs=kwargs,
                          init_params=init)
  batches = _data.iterator(config, data_kind(config), tokenizer, run_)
  loss_fn = make_loss_fn(run_.model.graphdef, run_.model.rest, config)
  step = common.make_train_step(loss_fn, run_.tx,
                                num_microbatches=config.get("microbatches", 1))
  jitted = jax.jit(step, out_shardings=(run_.state_shardings, None),
                   donate_argnums=(0,))
  state, history = common.train_loop(
      step_fn=jitted, state=run_.state, frozen=None,
      batches=_data.device_batches(batches, run_),
      total_steps=config.total_steps, workdir=run_.workdir,
      checkpointer=run_.checkpointer, name="reward_model",
      log_every=config.get("log_every", 1), data_state_fn=batches.get_state,
      progress=config.get("progress", True),
      console_keys=("loss", "accuracy"))
  report = {}
  eval_cfg = config.get("eval_data", None)
  if eval_cfg is not None and data_kind(config) == "preference" and \
      kind not in ("multi_objective_reward", "preference_embedding"):
    eval_it = _data.iterator(config, "preference", tokenizer,
                             data_config=eval_cfg,
                             batch_size=config.get("eval_batch_size",
                                                   config.batch_size))
    score_fn = make_score_fn(run_.model.graphdef, run_.model.rest)
    chosen, rejected = evaluate_pairs(score_fn, state["params"], eval_it,
                                      run_, max_batches=config.get(
                                          "eval_batches", None))
    report = calibration_report(chosen, rejected, run_.workdir)
  kind_for_export = "reward" if kind == "reward" else kind
  _setup.finish(run_, state, history, kind=kind_for_export,
                name="reward_model")
  return state, run_, report
