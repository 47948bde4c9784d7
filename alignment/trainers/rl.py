"""Online RL: sample → score → shape → advantages → clipped policy updates.

One iteration (``config.total_steps`` of them):

1. take ``B`` prompts, sample ``G`` completions each with the KV-cache
   sampler (``config.rl``: temperature, top-k, top-p, max_new_tokens);
2. score them (``config.reward.source``: ``gold`` synthetic reward,
   ``verifier`` rules, a learned reward ``model``, or an ``ensemble`` with an
   aggregator from ``rewards.ENSEMBLE_AGGREGATORS``);
3. shape rewards (``config.reward.shaping``, names of ``rewards.SHAPING``
   applied in order) and optionally put the KL penalty into the reward;
4. advantages (``config.advantage.name`` in ``advantages.REGISTRY``: group
   estimators on ``[B, G]``; ``gae`` trains a value model as PPO's critic);
5. ``config.rl.ppo_epochs`` passes over ``config.rl.num_minibatches``
   minibatches with the configured policy loss (``losses.POLICY_LOSSES``),
   aggregation mode, KL-in-loss, entropy bonus and sampler/trainer
   importance-sampling correction (``config.off_policy.correction``).
"""

import inspect
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from alignment import advantages as adv_lib
from alignment import losses, models, ops, rewards, sampling
from alignment import sharding as sharding_lib
from alignment.trainers import (
  _data,
  _lm,
  _packing,
  _rl_inputs,
  _rl_process,
  _setup,
  common,
  policy_eval,
)

GROUP_LOSSES = ("raft", "superhf", "copg", "prdp")
# Estimators that return one advantage per token ([N, L-1]).
TOKEN_ESTIMATORS = (
  "gae",
  "lambda_returns",
  "discounted_returns",
  "reinforce_pp",
)
# Arrays compute_advantages can hand an estimator (one reward per sample),
# and those `_rl_inputs` / `_rl_process` derive when an estimator names them.
ADVANTAGE_INPUTS = (
  "rewards",
  "lengths",
  "values",
  "completion_mask",
  *_rl_inputs.DERIVED_INPUTS,
  *_rl_process.DERIVED_INPUTS,
)
IS_CORRECTIONS = ("none", "tis", "mis", "icepop")
REWARD_SOURCES = ("gold", "verifier", "model", "ensemble")
KL_MODES = ("none", "reward", "loss")


class Rollout(NamedTuple):
  """One iteration's experience, all ``[N, ...]`` with ``N = B·G``."""

  tokens: jax.Array  # [N, P+T]
  attention_mask: jax.Array  # [N, P+T]
  loss_mask: jax.Array  # [N, P+T-1] completion positions (targets)
  sampler_token_logps: jax.Array  # [N, P+T-1]
  # [N, P+T-1]; None: on-policy update (see `is_on_policy`), the loss then
  # uses stop_gradient of its own log-probs.
  old_token_logps: jax.Array | None
  ref_token_logps: jax.Array  # [N, P+T-1]
  advantages: jax.Array  # [N] or [N, P+T-1]
  rewards: jax.Array  # [N] final (shaped) sequence rewards
  returns: jax.Array | None = None  # [N, P+T-1] (critic targets)
  old_values: jax.Array | None = None  # [N, P+T-1]


def _check(config):
  if config.loss.name not in losses.POLICY_LOSSES:
    raise ValueError(
      f"config.loss.name={config.loss.name!r}; valid policy "
      f"losses are {sorted(losses.POLICY_LOSSES)}."
    )
  fn = losses.POLICY_LOSSES[config.loss.name]
  hyper = {k: v for k, v in config.loss.items() if k != "name"}
  _lm.check_hyperparameters(fn, hyper, "config.loss", config.loss.name)
  if config.advantage.name not in adv_lib.REGISTRY:
    raise ValueError(
      f"config.advantage.name={config.advantage.name!r}; "
      f"valid estimators are {sorted(adv_lib.REGISTRY)}."
    )
  ahyper = {k: v for k, v in config.advantage.items() if k != "name"}
  adv_name = config.advantage.name
  adv_fn = adv_lib.REGISTRY[adv_name]
  _lm.check_hyperparameters(adv_fn, ahyper, "config.advantage", adv_name)
  _check_estimator(adv_name, adv_fn, ahyper)
  _rl_inputs.check(config, adv_name, adv_fn)
  _rl_process.check(config, adv_name)
  if adv_name in TOKEN_ESTIMATORS + _rl_process.PROCESS_ESTIMATORS:
    p = inspect.signature(inspect.unwrap(fn)).parameters.get("advantages")
    if p is not None and "'B T'" not in str(p.annotation):
      raise ValueError(
        f"config.loss.name={config.loss.name!r} takes one advantage per "
        f"sequence, but config.advantage.name={adv_name!r} gives one per "
        f"token; use a group estimator (e.g. 'grpo', 'rloo') or a loss "
        f"that accepts token-level advantages."
      )
  prompts = int(config.get("batch_size", 0) or 0)
  parts = int(config.rl.num_minibatches) * int(config.get("microbatches", 1))
  if prompts and prompts % parts:
    raise ValueError(
      f"config.batch_size={prompts} prompts per iteration do not split "
      f"into config.rl.num_minibatches={config.rl.num_minibatches} x "
      f"config.microbatches={config.get('microbatches', 1)} parts of whole "
      "prompt groups (group losses and config.rl.share_prompt need every "
      "sample of a prompt in the same part); use a batch_size divisible "
      f"by {parts}."
    )
  if config.reward.source not in REWARD_SOURCES:
    raise ValueError(
      f"config.reward.source={config.reward.source!r}; valid "
      f"choices are {REWARD_SOURCES}."
    )
  if config.kl.mode not in KL_MODES:
    raise ValueError(
      f"config.kl.mode={config.kl.mode!r}; valid choices are {KL_MODES}."
    )
  corr = config.off_policy.correction
  if corr not in IS_CORRECTIONS:
    raise ValueError(
      f"config.off_policy.correction={corr!r}; valid choices "
      f"are {IS_CORRECTIONS}."
    )
  for name in config.reward.get("shaping", ()):
    if name not in rewards.SHAPING:
      raise ValueError(
        f"config.reward.shaping has {name!r}; valid names are "
        f"{sorted(rewards.SHAPING)}."
      )
  if config.loss_aggregation not in ops.AGGREGATION_MODES:
    raise ValueError(
      f"config.loss_aggregation={config.loss_aggregation!r}; "
      f"valid modes are {ops.AGGREGATION_MODES}."
    )
  return fn, hyper, ahyper


def _check_estimator(name, fn, ahyper):
  """Fails at start if the RL trainer cannot feed estimator ``name``."""
  _, required, _ = _lm.split_kwargs(fn)
  missing = [a for a in required if a not in ADVANTAGE_INPUTS]
  if missing:
    raise ValueError(
      f"config.advantage.name={name!r} needs {missing}, which the RL "
      f"trainer does not compute; it supplies {list(ADVANTAGE_INPUTS)}."
    )
  params = inspect.signature(inspect.unwrap(fn)).parameters
  # Unset: absent, or config_lib's None placeholder (config_lib.advantage).
  no_default = [
    n
    for n, p in params.items()
    if p.kind == p.KEYWORD_ONLY
    and p.default is p.empty
    and ahyper.get(n) is None
  ]
  if no_default:
    raise ValueError(
      f"config.advantage.name={name!r} needs hyperparameters {no_default}"
      " (they have no default); set them: "
      + " ".join(f"--config.advantage.{n}=..." for n in no_default)
    )


def is_on_policy(config) -> bool:
  """True when each rollout is used for exactly one update of the policy.

  With one PPO epoch over one minibatch the parameters that sampled the
  rollout are the ones being updated, so the "old" log-probs equal the
  current ones: the loss takes ``stop_gradient`` of its own log-probs
  (ratio 1 by construction) instead of a separate forward pass before the
  update (as TRL and Tunix do). Not with ``config.kl.mode == "reward"``,
  whose penalty needs the old log-probs before the advantages.
  """
  return (
    config.rl.ppo_epochs * config.rl.num_minibatches == 1
    and config.kl.mode != "reward"
  )


def completion_logps(
  model,
  tokens,
  attention_mask,
  loss_mask,
  *,
  chunk_size,
  temperature,
  return_entropy=False,
  group=1,
  completion_len=None,
):
  """Per-token log-probs (and entropies) of the completion targets.

  Args:
    model: a causal LM (``hidden`` and ``unembedding``).
    tokens: ``[N, P+T]`` prompt + completion ids.
    attention_mask: ``[N, P+T]``.
    loss_mask: ``[N, P+T-1]`` completion target positions.
    chunk_size: row chunk of the fused kernel.
    temperature: the sampling temperature (divides the logits).
    return_entropy: also return the entropies.
    group: with ``group`` G > 1 and ``completion_len`` T, the rows are a
      rollout's (``N = B·G`` prompt-major, the prompt in the first ``P``
      columns, identical within a group, then ``T`` completion columns)
      and the model reads each group as one packed row ``[prompt | c_1 |
      ... | c_G]`` (`_packing.pack_groups`): the same log-probs, the
      prompt run once per group instead of G times. A group whose prompts
      differ gets NaN log-probs, never silently different ones.
    completion_len: T, the completion columns (``rl.max_new_tokens``).

  Returns:
    float32 ``[N, P+T-1]`` log-probs (and entropies), 0 outside
    ``loss_mask``: the fused kernel computes only the completion rows
    (``where=loss_mask``), so the prompt positions cost no LM-head work.
  """
  if group > 1 and completion_len:
    packed = _packing.pack_groups(
      tokens, attention_mask, group=group, completion_len=completion_len
    )
    hidden = _packing.unpack_groups(
      model.hidden(packed.tokens, **packed.model_kwargs()), packed, group
    )
  else:
    hidden = model.hidden(tokens, attention_mask=attention_mask)
  return ops.fused_token_logps(
    hidden[:, :-1],
    model.unembedding(),
    tokens[:, 1:],
    chunk_size=chunk_size,
    temperature=temperature,
    return_entropy=return_entropy,
    where=loss_mask,
  )


def shared_prompt_kwargs(config) -> dict:
  """`completion_logps` arguments that pack each group of a rollout on its
  shared prompt: ``{"group": G, "completion_len": T}`` when
  ``config.rl.share_prompt`` (default True) and ``G > 1``, else ``{}``.
  Exact (same log-probs and gradients up to float rounding); it saves the
  ``G - 1`` repeated prompt forwards of every group, in the update and in
  the reference (and old-policy) forwards."""
  group = int(config.rl.num_generations)
  if not bool(config.rl.get("share_prompt", True)) or group < 2:
    return {}
  return {"group": group, "completion_len": int(config.rl.max_new_tokens)}


def _align_completion(x, prompt_len, fill=0.0):
  """``[N, T]`` completion values → ``[N, P+T-1]`` next-token positions."""
  n = x.shape[0]
  left = jnp.full((n, prompt_len - 1), fill, x.dtype)
  return jnp.concatenate([left, x], axis=1)


def make_policy_loss(policy_gd, policy_rest, value_gd, value_rest, config):
  """``loss_fn(params, frozen, minibatch, rng)`` for one PPO/GRPO update."""
  fn, hyper, _ = _check(config)
  name = config.loss.name
  group = config.rl.num_generations
  temperature = config.rl.temperature
  chunk = config.get("logps_chunk_size", 2048)
  kl_cfg = config.kl
  mode = config.loss_aggregation
  max_tokens = (
    (config.get("loss_max_tokens", 0) or None)
    if mode == "constant_norm"
    else None
  )
  correction = config.off_policy.correction
  shared = shared_prompt_kwargs(config)
  entropy_coef = float(config.get("entropy_coefficient", 0.0))
  vf_coef = float(config.get("value_coefficient", 0.5))

  def loss_fn(params, frozen, mb, rng):
    del frozen, rng
    policy = nnx.merge(policy_gd, params["policy"], policy_rest)
    mask = mb.loss_mask
    lp, ent = completion_logps(
      policy,
      mb.tokens,
      mb.attention_mask,
      mask,
      chunk_size=chunk,
      temperature=temperature,
      return_entropy=True,
      **shared,
    )
    old = mb.old_token_logps
    if old is None:  # on-policy: the sampling policy is this one
      old = jax.lax.stop_gradient(lp)
    avail = {
      "token_logps": lp,
      "old_token_logps": old,
      "ref_token_logps": mb.ref_token_logps,
      "sampler_token_logps": mb.sampler_token_logps,
      "advantages": mb.advantages,
      "completion_mask": mask,
      "token_entropies": ent,
      "rewards": mb.rewards,
    }
    if name in GROUP_LOSSES:
      n, length = lp.shape

      def grp(x):
        return x.reshape((n // group, group) + x.shape[1:])

      avail = {k: grp(v) for k, v in avail.items()}
      avail["policy_logps"] = jnp.sum(avail["token_logps"], -1)
      avail["ref_logps"] = jnp.sum(
        jnp.where(avail["completion_mask"], avail["ref_token_logps"], 0), -1
      )
    per, aux = _lm.call_by_name(fn, avail, hyper, name)
    metrics = {}
    if per.ndim == 1:  # one value per prompt group
      wm = ops.aggregate_sequence_loss(per)
    else:
      per = per.reshape(lp.shape)
      weight = jnp.ones_like(lp)
      if correction != "none":
        args = (old, mb.sampler_token_logps, mask)
        weight, _ = {
          "tis": losses.truncated_importance_weights,
          "mis": losses.masked_importance_weights,
          "icepop": losses.icepop_weights,
        }[correction](*args, **dict(config.off_policy.get("kwargs", {})))
        per = per * jax.lax.stop_gradient(weight)
      wm = ops.aggregate_token_loss(per, mask, mode=mode, max_tokens=max_tokens)
      if kl_cfg.mode == "loss":
        kl, _ = losses.kl_penalty_loss(
          lp,
          mb.ref_token_logps,
          mask,
          beta=kl_cfg.beta,
          estimator=kl_cfg.estimator,
        )
        kwm = ops.aggregate_token_loss(
          kl, mask, mode=mode, max_tokens=max_tokens
        )
        wm = ops.WeightedMean(wm.total + kwm.total, wm.weight)
      if entropy_coef:
        ewm = ops.aggregate_token_loss(
          -entropy_coef * ent, mask, mode=mode, max_tokens=max_tokens
        )
        wm = ops.WeightedMean(wm.total + ewm.total, wm.weight)
      ratio = getattr(aux, "ratio", None)
      if ratio is not None and ratio.shape == lp.shape:
        metrics["ratio_mean"] = ops.masked_mean(ratio, mask)
      clipped = getattr(aux, "clipped", None)
      if clipped is not None and clipped.shape == lp.shape:
        metrics["clip_fraction"] = ops.masked_mean(
          clipped.astype(jnp.float32), mask
        )
    metrics["entropy"] = ops.masked_mean(ent, mask)
    metrics["kl_k3"] = ops.masked_mean(ops.kl_k3(lp, mb.ref_token_logps), mask)
    metrics["policy_loss"] = wm.value()
    if mb.old_token_logps is None:  # run() has no pre-update forward then
      metrics["kl_sequence"] = jnp.mean(
        jnp.sum(
          jnp.where(mask, jax.lax.stop_gradient(lp) - mb.ref_token_logps, 0.0),
          -1,
        )
      )
    if value_gd is not None:
      critic = nnx.merge(value_gd, params["value"], value_rest)
      values = critic(mb.tokens, attention_mask=mb.attention_mask)[:, :-1]
      vl, _ = losses.clipped_value_loss(
        values,
        mb.old_values,
        mb.returns,
        mask,
        clip_range=config.get("value_clip", 0.2),
      )
      vwm = ops.aggregate_token_loss(vl, mask, mode="token_mean")
      metrics["value_loss"] = vwm.value()
      wm = ops.WeightedMean(
        wm.total + vf_coef * vwm.value() * wm.weight, wm.weight
      )
    return wm, metrics

  return loss_fn


class RewardScorer:
  """Host/device reward computation for sampled completions."""

  def __init__(
    self, config, tokenizer, *, reward_params=None, reward_model=None, task=None
  ):
    self.config = config
    self.tokenizer = tokenizer
    self.source = config.reward.source
    self.task = task
    self.reward_params = reward_params
    self.reward_model = reward_model  # (graphdef, rest) for model/ensemble
    if self.source in ("model", "ensemble") and reward_params is None:
      raise ValueError(
        f"config.reward.source={self.source!r} needs a reward "
        "model (config.reward.checkpoint, or passed in)."
      )
    if self.source == "gold" and task is None:
      raise ValueError(
        "config.reward.source='gold' needs a synthetic task "
        "(config.data.source='synthetic')."
      )
    self._score = None
    if reward_model is not None:
      graphdef, rest = reward_model
      agg_name = config.reward.get("ensemble_aggregator", "mean")
      # Outputs are read by the model's kind, never by their rank (a GPM's
      # [N, D] embeddings are 2-D like an ensemble's [M, N] scores).
      module = nnx.merge(graphdef, reward_params, rest)
      if isinstance(module, models.PreferenceEmbeddingModel):
        raise ValueError(
          "the reward model is a GPM (preference embeddings"
          "): it has no scalar reward per sample to score "
          "rollouts with."
        )
      ensemble = isinstance(
        module, (models.MultiHeadEnsembleRewardModel, models.StackedEnsemble)
      )

      def score(params, tokens, attention_mask):
        model = nnx.merge(graphdef, params, rest)
        out = model(tokens, attention_mask=attention_mask)
        if isinstance(out, models.GaussianReward):
          out = out.mean  # [M, N] for stacked Gaussian members
        elif isinstance(out, models.MultiObjective):
          return out.score
        if ensemble:  # [M, N]
          agg = rewards.ENSEMBLE_AGGREGATORS[agg_name]
          kw = dict(config.reward.get("ensemble_kwargs", {}))
          return agg(out, **kw)
        return out

      self._score = jax.jit(score)

  def texts(self, completion_tokens, completion_mask):
    toks = np.asarray(completion_tokens)
    mask = np.asarray(completion_mask)
    return [
      self.tokenizer.decode(t[m].tolist())
      for t, m in zip(toks, mask, strict=True)
    ]

  def gold(self, prompts, completions):
    if self.task is None:
      return None
    return self.task.gold_rewards(prompts, completions)

  def __call__(self, tokens, attention_mask, prompts, completions, records):
    if self.source == "gold":
      return jnp.asarray(self.gold(prompts, completions), jnp.float32)
    if self.source == "verifier":
      return jnp.asarray(
        rewards.verify_batch(
          completions,
          records,
          kind=self.config.reward.get("verifier", "math_answer"),
        ),
        jnp.float32,
      )
    return self._score(self.reward_params, tokens, attention_mask)


def compute_advantages(
  config,
  ahyper,
  seq_rewards,
  lengths,
  loss_mask,
  values=None,
  group=1,
  extra=None,
):
  """Advantages per sequence ``[N]`` or per position ``[N, L-1]``.

  ``extra``: rollout arrays an estimator may need (``baseline_rewards``
  ``[B]``, ``reward_components`` ``[N, K]``; see ``_rl_inputs``; the
  process estimators' steps, step rewards, information gains or implicit
  rewards, see ``_rl_process``).
  """
  name = config.advantage.name
  fn = adv_lib.REGISTRY[name]
  n = seq_rewards.shape[0]
  if name in _rl_process.PROCESS_ESTIMATORS:  # [N, L-1] per token
    return _rl_process.token_advantages(
      config, fn, ahyper, seq_rewards, loss_mask, group, extra or {}
    ), None
  if name in TOKEN_ESTIMATORS:
    # Sequence reward on the last completion token.
    last = jnp.argmax(jnp.cumsum(loss_mask, axis=1), axis=1)
    token_rewards = (
      jnp.zeros(loss_mask.shape, jnp.float32)
      .at[jnp.arange(n), last]
      .set(seq_rewards)
    )
    if name == "gae":
      out = fn(token_rewards, values, loss_mask, **ahyper)
      return out.advantages, out.returns
    avail = {
      "rewards": token_rewards,
      "completion_mask": loss_mask,
      "values": values if values is not None else jnp.zeros_like(token_rewards),
    }
    return _lm.call_by_name(fn, avail, ahyper, name), None
  grouped = seq_rewards.reshape(n // group, group)
  avail = {
    "rewards": grouped,
    "lengths": lengths.reshape(n // group, group).astype(jnp.float32),
  }
  avail.update(_rl_inputs.group_inputs(config, fn, grouped, group, extra))
  out = _lm.call_by_name(fn, avail, ahyper, name)
  return out.reshape(n), None


@_setup.in_mesh_context
def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  init_params=None,
  reference_params=None,
  reward_params=None,
  reward_model=None,
  process_reward_model=None,
):
  """Online RL; returns ``(state, run, final_eval)``.

  ``process_reward_model``: ``(params, graphdef, rest)`` of a PRM for
  ``advantage=pure_min`` (else it is loaded from
  ``config.reward.process_model``).
  """
  fn, hyper, ahyper = _check(config)
  del fn, hyper
  adv_fn = adv_lib.REGISTRY[config.advantage.name]
  tokenizer = _data.tokenizer_of(config)
  task = policy_eval.task_of(config)
  use_critic = config.advantage.name == "gae"
  run_ = _setup.setup_run(
    config,
    workdir,
    kind="causal_lm",
    total_steps=config.total_steps
    * config.rl.ppo_epochs
    * config.rl.num_minibatches,
    init_params=(lambda _: init_params) if init_params is not None else None,
    restore=False,
  )
  mesh, rules = run_.mesh, run_.rules
  policy = run_.model
  value = None
  if use_critic:
    value, _ = _setup.build_model(
      "value", config.model, mesh, rules, config.seed + 1
    )
  # Params of the joint train state: {"policy"} (+ {"value"}).
  params = {"policy": run_.state["params"]}
  shard = {"policy": policy.param_shardings}
  if value is not None:
    params["value"] = value.params
    shard["value"] = value.param_shardings
  tx = run_.tx
  opt_sh = common.opt_state_shardings(tx, params, shard, mesh)
  repl = sharding_lib.replicated(mesh)
  state_sh = {"params": shard, "opt_state": opt_sh, "step": repl, "rng": repl}
  state = common.train_state(
    params,
    jax.jit(tx.init, out_shardings=opt_sh)(params),
    0,
    jax.random.key(config.seed),
  )
  state = jax.device_put(state, state_sh)  # committed: one compile of step
  frozen_ref = (
    reference_params
    if reference_params is not None
    else (
      init_params
      if init_params is not None
      else _setup.build_model(
        "causal_lm", config.model, mesh, rules, config.seed
      )[0].params
    )
  )
  process = None
  if config.advantage.name in _rl_process.PROCESS_ESTIMATORS:
    process = _rl_process.ProcessInputs(
      config,
      tokenizer=tokenizer,
      task=task,
      policy=policy,
      reference_params=frozen_ref,
      mesh=mesh,
      rules=rules,
      process_reward_model=process_reward_model,
    )

  def checkpointed(state):  # + the implicit PRM's train state (prime)
    if process is None or process.state is None:
      return state
    return dict(state, implicit_prm=process.state)

  ckpt_sh = (
    state_sh
    if process is None or process.state is None
    else dict(state_sh, implicit_prm=process.state_shardings)
  )
  prompts_it = _data.iterator(config, "prompt", tokenizer)
  start_iter = 0
  restored_kl_beta = None  # adaptive-KL coefficient of a resumed run
  if run_.checkpointer is not None:
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      checkpointed(state),
      ckpt_sh,
    )
    restored = run_.checkpointer.restore(abstract)
    if restored is not None:
      state, extra = restored
      if "implicit_prm" in state:
        state = dict(state)
        process.state = state.pop("implicit_prm")
      prompts_it.set_state(extra["data_state"])
      start_iter = int(extra.get("iteration", 0))
      restored_kl_beta = extra.get("kl_beta")
  sampler = sampling.Sampler(
    policy.graphdef,
    policy.rest,
    max_new_tokens=config.rl.max_new_tokens,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
  )
  if reward_params is None and config.reward.source in ("model", "ensemble"):
    reward_params, reward_model = _setup.load_reward_model(
      config.reward.checkpoint, mesh, rules, "config.reward.checkpoint"
    )
  scorer = RewardScorer(
    config,
    tokenizer,
    reward_params=reward_params,
    reward_model=reward_model,
    task=task,
  )
  loss_fn = make_policy_loss(
    policy.graphdef,
    policy.rest,
    value.graphdef if value else None,
    value.rest if value else None,
    config,
  )
  step = common.make_train_step(
    loss_fn,
    tx,
    num_microbatches=config.get("microbatches", 1),
    group=config.rl.num_generations,
  )
  jitted = jax.jit(step, out_shardings=(state_sh, None), donate_argnums=(0,))
  chunk = config.get("logps_chunk_size", 2048)
  shared = shared_prompt_kwargs(config)

  @jax.jit
  def forward_logps(p, tokens, attention_mask, loss_mask):
    model = nnx.merge(policy.graphdef, p, policy.rest)
    return completion_logps(
      model,
      tokens,
      attention_mask,
      loss_mask,
      chunk_size=chunk,
      temperature=config.rl.temperature,
      **shared,
    )

  @jax.jit
  def forward_logps_t1(p, tokens, attention_mask, loss_mask):
    model = nnx.merge(policy.graphdef, p, policy.rest)
    return completion_logps(
      model,
      tokens,
      attention_mask,
      loss_mask,
      chunk_size=chunk,
      temperature=1.0,
      **shared,
    )

  values_fn = None
  if value is not None:

    @jax.jit
    def values_fn(p, tokens, attention_mask):
      critic = nnx.merge(value.graphdef, p, value.rest)
      return critic(tokens, attention_mask=attention_mask)[:, :-1]

  writer = common.MetricWriter(
    run_.workdir,
    total_steps=config.total_steps,
    name="rl",
    resume_step=start_iter,
    progress=config.get("progress", True),
  )
  kl_state = losses.adaptive_kl_init(beta=config.kl.beta)
  if restored_kl_beta is not None:  # resume: the controller's state, exact
    kl_state = losses.adaptive_kl_init(beta=restored_kl_beta)
  group = config.rl.num_generations
  on_policy = is_on_policy(config)
  # Resumed: the iterations before the checkpoint, as logged (the writer
  # has dropped any logged after it).
  history = common.read_metrics(writer.path) if start_iter else []
  with common._Preemption() as preemption:  # noqa: SLF001
    for iteration in range(start_iter + 1, config.total_steps + 1):
      pb = next(prompts_it)
      records = [
        prompts_it.records[int(i)] for i in np.asarray(pb.prompt_index)
      ]
      dev = _data.device_batch(pb, run_)
      key = jax.random.fold_in(jax.random.key(config.seed + 17), iteration)
      out = sampler.generate(
        state["params"]["policy"],
        dev.prompt_tokens,
        dev.prompt_mask,
        key,
        num_samples=group,
        temperature=config.rl.temperature,
        top_k=config.rl.get("top_k", 0),
        top_p=config.rl.get("top_p", 1.0),
      )
      p_len = out.prompt_tokens.shape[1]
      tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
      attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
      loss_mask = _align_completion(out.completion_mask, p_len, False)
      sampler_lp = _align_completion(out.token_logps, p_len)
      prompts_text = [r["prompt"] for r in records for _ in range(group)]
      completions = scorer.texts(out.completion_tokens, out.completion_mask)
      seq_rewards = scorer(
        tokens,
        attn,
        prompts_text,
        completions,
        [r for r in records for _ in range(group)],
      )
      gold = scorer.gold(prompts_text, completions)
      lengths = jnp.sum(out.completion_mask, axis=1)
      raw_rewards = seq_rewards
      extra = {}
      base = base_len = None
      if _rl_inputs.needs_baseline(adv_fn):  # ReMax: greedy completion
        base, base_len = _rl_inputs.greedy_baseline(
          config,
          sampler,
          state["params"]["policy"],
          dev.prompt_tokens,
          dev.prompt_mask,
          jax.random.fold_in(key, 2),
          scorer,
          records,
        )
      seq_rewards, base = _rl_inputs.shape_with_baseline(
        lambda nm, r, ln: _shape(nm, config, r, ln),
        config.reward.get("shaping", ()),
        seq_rewards,
        lengths,
        base,
        base_len,
      )
      if base is not None:
        extra["baseline_rewards"] = base
      if _rl_inputs.needs_components(adv_fn):  # GDPO: K rewards per sample
        extra["reward_components"], seq_rewards = _rl_inputs.reward_components(
          config,
          scorer,
          seq_rewards,
          lengths,
          prompts_text,
          completions,
          [r for r in records for _ in range(group)],
        )
      # On-policy: the loss takes the old log-probs from its own forward.
      old_lp = (
        None
        if on_policy
        else forward_logps(state["params"]["policy"], tokens, attn, loss_mask)
      )
      ref_lp = forward_logps(frozen_ref, tokens, attn, loss_mask)
      kl_seq = (
        None
        if on_policy
        else jnp.sum(jnp.where(loss_mask, old_lp - ref_lp, 0.0), axis=1)
      )
      if config.kl.mode == "reward":
        beta = (
          float(kl_state.beta)
          if config.kl.get("adaptive", False)
          else config.kl.beta
        )
        seq_rewards = seq_rewards - beta * kl_seq
      old_values = (
        values_fn(state["params"]["value"], tokens, attn) if values_fn else None
      )
      process_metrics = {}
      if process is not None:  # pure_min / igpo / prime inputs
        derived, process_metrics = process.derive(
          state["params"]["policy"],
          out,
          tokens,
          attn,
          loss_mask,
          seq_rewards,
          [r for r in records for _ in range(group)],
          ref_lp,
          lambda t=tokens, a=attn, m=loss_mask: forward_logps_t1(
            frozen_ref, t, a, m
          ),
        )
        extra.update(derived)
      advantages, returns = compute_advantages(
        config,
        ahyper,
        seq_rewards,
        lengths,
        loss_mask,
        old_values,
        group,
        extra,
      )
      ro = Rollout(
        tokens,
        attn,
        loss_mask,
        sampler_lp,
        old_lp,
        ref_lp,
        advantages,
        seq_rewards,
        returns,
        old_values,
      )
      metrics_acc = []
      perm_key = jax.random.fold_in(key, 1)
      n = tokens.shape[0]
      mb_size = n // config.rl.num_minibatches
      for epoch in range(config.rl.ppo_epochs):
        # Whole groups stay together in a minibatch (group losses need
        # them); groups are shuffled between epochs.
        order = np.asarray(
          jax.random.permutation(
            jax.random.fold_in(perm_key, epoch), n // group
          )
        )
        rows = (order[:, None] * group + np.arange(group)).reshape(-1)
        for m in range(config.rl.num_minibatches):
          idx = rows[m * mb_size : (m + 1) * mb_size]
          mb = jax.tree.map(lambda x, idx=idx: x[idx], ro)
          mb = sharding_lib.shard_batch(jax.device_get(mb), mesh, rules)
          state, metrics = jitted(state, None, mb)
          metrics_acc.append(jax.device_get(metrics))
      metrics = {
        k: float(np.mean([m[k] for m in metrics_acc])) for k in metrics_acc[0]
      }
      if not np.isfinite(metrics["loss"]):
        raise common.NonFiniteLossError(
          f"rl: non-finite loss at iteration {iteration}; the latest "
          f"checkpoint is {run_.checkpointer.latest_step() if run_.checkpointer else None}."
        )
      if kl_seq is not None:  # else the loss reported it
        metrics["kl_sequence"] = float(jnp.mean(kl_seq))
      metrics.update(
        {
          "reward": float(jnp.mean(raw_rewards)),
          "shaped_reward": float(jnp.mean(seq_rewards)),
          "completion_length": float(jnp.mean(lengths)),
        }
      )
      if gold is not None:
        metrics["gold_reward"] = float(np.mean(gold))
      metrics.update(process_metrics)
      if "baseline_rewards" in extra:  # ReMax: the greedy completions'
        metrics["baseline_reward"] = float(jnp.mean(extra["baseline_rewards"]))
      if config.kl.get("adaptive", False):
        kl_state = losses.adaptive_kl_update(
          kl_state,
          metrics["kl_sequence"],
          n,
          target=config.kl.get("target", 6.0),
          horizon=config.kl.get("horizon", 10000.0),
        )
        metrics["kl_beta"] = float(kl_state.beta)
      writer.write(
        iteration,
        metrics,
        console_keys=("reward", "gold_reward", "kl_sequence"),
      )
      history.append({"step": iteration, **metrics})
      stop = preemption.requested
      ck = run_.checkpointer
      if ck is not None and (
        ck.should_save(iteration) or stop or iteration == config.total_steps
      ):
        ck.save(
          iteration,
          checkpointed(state),
          {
            "data_state": prompts_it.get_state(),
            "iteration": iteration,
            "kl_beta": float(kl_state.beta),
          },
          force=True,
          wait=stop,
        )
      if stop:
        writer.close()
        raise common.Preempted()
  writer.close()
  run_.state = state
  run_.state_shardings = state_sh
  if run_.checkpointer is not None:
    run_.checkpointer.wait()
  policy_state = dict(state, params=state["params"]["policy"])
  _setup.finish(run_, policy_state, history, kind="causal_lm", name="rl")
  if _setup.is_main_process():
    (run_.workdir / "rl_history.json").write_text(json.dumps(history))
  return policy_state, run_, history


def _shape(name, config, seq_rewards, lengths):
  fn = rewards.SHAPING[name]
  kw = dict(config.reward.get("shaping_kwargs", {}).get(name, {}))
  avail = {"rewards": seq_rewards, "lengths": lengths.astype(jnp.float32)}
  out = _lm.call_by_name(fn, avail, kw, name)
  if isinstance(out, tuple):
    out = out[0]
  if name == "overlong":  # a penalty to add, not a transformed reward
    return seq_rewards + out
  return out
