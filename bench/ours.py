"""Benchmark worker, our side: the compiled train steps of alignment.trainers.

Run by ``bench/run_all.py`` as ``python bench/ours.py '<spec json>'``; see
``bench/_protocol.py`` for the protocol. Builds the same objects the
trainers build (``models.build_model`` born sharded on the default mesh by
``common.create_sharded_model``, ``trainers.common.make_train_step`` with
the trainer's ``make_loss_fn``, optimiser from ``common.make_optimizer``,
batches split along the ``data`` axis), but feeds random-token batches
directly instead of going through the data iterators. The mesh spans every
visible device (``spec["mesh"]`` overrides it), so the ``d<n>`` runtime
setting of ``run_all.py`` runs the pair steps data-parallel over n host
devices.

Tasks (``spec["task"]``):

* ``dpo``: ``trainers.preference.make_loss_fn`` (sigmoid DPO, frozen
  reference model), one step = policy + reference forward, backward, AdamW.
* ``rm``: ``trainers.reward_model.make_loss_fn`` (Bradley–Terry).

DPO and RM steps run with the trainers' default ``share_prompt=True`` (one
packed row ``[prompt | chosen | rejected]`` per pair); ``spec["share_prompt"]
= False`` gives the two-row step. ``tokens_per_step`` counts ``2·B·L``
either way (the pairs' tokens, as the peers count them).
* ``grpo``: one iteration of ``trainers.rl.run``'s loop: KV-cache sampling
  of G completions per prompt (``sampling.Sampler``), reward, reference
  log-probs (and old-policy log-probs unless ``rl.is_on_policy``: one PPO
  epoch of one minibatch reuses the loss's own), group advantages, one
  update with ``trainers.rl.make_policy_loss`` (GRPO loss, k3 KL in the
  loss). Its stages (``sample``, ``score``, ``update``) are timed
  separately by ``bench/train_step.py``.

``build(spec)`` returns the compiled step without the worker protocol
(``bench/train_step.py`` uses it); ``spec_for(task, preset, **shape)``
makes a spec like ``run_all.py``'s.
"""

import importlib.util
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _protocol  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(
    f"configs_{name}", ROOT / "configs" / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _common_config(config, spec):
  config.optimizer.learning_rate = spec["learning_rate"]
  config.optimizer.schedule = "constant"
  config.optimizer.weight_decay = spec.get("weight_decay", 0.0)
  config.optimizer.grad_clip_norm = spec.get("max_grad_norm", 0.0)
  config.model.preset = spec["preset"]
  config.model.dtype = spec.get("dtype", "float32")
  config.model.param_dtype = "float32"
  config.logps_chunk_size = spec.get("logps_chunk_size", 2048)
  return config


def _pair_config(config, spec, prompt_len):
  """A DPO / RM config for pairs of the spec's shapes: the data limits
  the trainer would have (completions + EOS), ``share_prompt`` from the
  spec if given (default: the config's, i.e. the trainers' default)."""
  config = _common_config(config, spec)
  config.data.max_prompt_len = prompt_len
  config.data.max_completion_len = spec["completion_len"] + 1
  if "share_prompt" in spec:
    config.share_prompt = bool(spec["share_prompt"])
  return config


class Built:
  """A compiled step of one task: ``step()`` runs one (blocking) step.

  Attributes:
    step: runs one train step (GRPO: one iteration) and blocks until its
      results exist.
    stages: for GRPO, ``[(name, fn), ...]`` whose calls in order make one
      iteration, each blocking (``sample``, ``score``, ``update``); for the
      other tasks ``[("update", step)]``.
    tokens_per_step: tokens processed by one step.
    info: facts about the model and the run for the report.
    train: ``(jitted train step, () -> its current arguments)``, for
      profiling and HLO inspection.
  """

  def __init__(self, stages, tokens_per_step, info, train=None):
    self.stages = stages
    self.tokens_per_step = tokens_per_step
    self.info = info
    self.train = train

  def step(self):
    for _, fn in self.stages:
      fn()


def spec_for(task, preset, **shape):
  """A worker spec like ``bench/run_all.py``'s for ``task`` on ``preset``."""
  import dataclasses  # noqa: PLC0415

  from alignment import models  # noqa: PLC0415

  cfg = dataclasses.asdict(models.get_preset(preset))
  model = {
    k: v
    for k, v in cfg.items()
    if v is None or isinstance(v, (int, float, str, bool))
  }
  spec = dict(
    task=task,
    preset=preset,
    model=model,
    learning_rate=1e-6,
    max_grad_norm=1.0,
    weight_decay=0.0,
    seed=0,
    warmup=2,
  )
  spec["beta"] = 0.04 if task == "grpo" else 0.1
  spec.update(shape)
  return spec


def build(spec) -> Built:
  """Builds and jit-compiles (lazily) the step of ``spec["task"]``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from alignment import config_lib, models
  from alignment import sharding as sharding_lib
  from alignment.data.batches import PreferenceBatch
  from alignment.trainers import _setup, common

  task = spec["task"]
  cfg = models.get_preset(
    spec["preset"],
    dtype=spec.get("dtype", "float32"),
    **spec.get("model_overrides", {}),
  )
  kind = "reward" if task == "rm" else "causal_lm"
  # As the trainers build it (`trainers._setup`): the default mesh (a data
  # axis over every visible device) and logical-axis rules, parameters born
  # sharded by one jitted initialisation. With N host devices
  # (``--xla_force_host_platform_device_count``) the pair steps run
  # data-parallel over N cores, as on N accelerators.
  mesh = sharding_lib.make_mesh(
    [tuple(axis) for axis in spec.get("mesh", config_lib.DEFAULT_MESH)]
  )
  rules = config_lib.DEFAULT_RULES
  sharded = common.create_sharded_model(
    lambda rngs: models.build_model(kind, cfg, rngs=rngs),
    spec.get("seed", 0),
    mesh,
    rules,
  )
  graphdef, params, rest = sharded.graphdef, sharded.params, sharded.rest
  p_shard = sharded.param_shardings
  del sharded
  n_params = sum(x.size for x in jax.tree.leaves(params))
  info = {
    "side": "ours",
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "params": int(n_params),
    "dtype": cfg.dtype,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "devices": jax.device_count(),
  }

  def state_of(config, params, p_shard):
    tx = common.make_optimizer(config.optimizer, 10**6)
    opt_sh = common.opt_state_shardings(tx, params, p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state = common.train_state(params, opt_state, 0, jax.random.key(0))
    repl = sharding_lib.replicated(mesh)
    shardings = {"params": p_shard, "opt_state": opt_sh, "step": repl}
    shardings["rng"] = repl
    return tx, jax.device_put(state, shardings), shardings

  if task in ("dpo", "rm"):
    prompt, chosen, rejected = _protocol.preference_ids(spec)
    b, p = prompt.shape
    eos = np.full((b, 1), cfg.eos_id)
    chosen_tokens = np.concatenate([prompt, chosen, eos], 1).astype(np.int32)
    rejected_tokens = np.concatenate([prompt, rejected, eos], 1).astype(
      np.int32
    )
    length = chosen_tokens.shape[1]
    attn = np.ones((b, length), bool)
    comp = np.zeros((b, length), bool)
    comp[:, p:] = True
    batch = PreferenceBatch(
      chosen_tokens=jnp.asarray(chosen_tokens),
      chosen_attention_mask=jnp.asarray(attn),
      chosen_completion_mask=jnp.asarray(comp),
      rejected_tokens=jnp.asarray(rejected_tokens),
      rejected_attention_mask=jnp.asarray(attn),
      rejected_completion_mask=jnp.asarray(comp),
      example_mask=jnp.ones((b,), bool),
    )
    tokens_per_step = 2 * b * length
    info["batch_shape"] = [2 * b, length]
    info["ids_checksum"] = int(chosen_tokens.sum() + rejected_tokens.sum())
    if task == "dpo":
      from alignment.trainers import preference

      config = _pair_config(_config("preference", "runlocal"), spec, p)
      config.loss.beta = spec.get("beta", 0.1)
      loss_fn, _, needs_ref = preference.make_loss_fn(graphdef, rest, config)
      assert needs_ref
      frozen = _setup.frozen_copy(params, p_shard)
    else:
      from alignment.trainers import reward_model

      config = _pair_config(_config("reward_model", "runlocal"), spec, p)
      loss_fn = reward_model.make_loss_fn(graphdef, rest, config)
      frozen = None
    info["share_prompt"] = bool(config.share_prompt)
    tx, state, state_sh = state_of(config, params, p_shard)
    batch = jax.device_put(
      batch,
      jax.tree.map(
        lambda x: sharding_lib.batch_sharding(mesh, rules, x.ndim), batch
      ),
    )
    step = jax.jit(
      common.make_train_step(loss_fn, tx),
      out_shardings=(state_sh, None),
      donate_argnums=(0,),
    )
    holder = {"state": state}

    def one_step():
      with sharding_lib.activation_context(mesh, rules):
        holder["state"], metrics = step(holder["state"], frozen, batch)
      jax.block_until_ready((holder["state"], metrics))

    stages = [("update", one_step)]
    jitted = (step, lambda: (holder["state"], frozen, batch))

  elif task == "grpo":
    from alignment import sampling
    from alignment.trainers import rl

    config = _common_config(_config("rl", "runlocal"), spec)
    group = spec["num_generations"]
    config.rl.num_generations = group
    config.rl.max_new_tokens = spec["completion_len"]
    config.rl.temperature = 1.0
    config.kl.beta = spec.get("beta", 0.04)
    config.kl.mode = "loss" if config.kl.beta else "none"
    config.loss_aggregation = spec.get("loss_aggregation", "sequence_mean")
    if "share_prompt" in spec:
      config.rl.share_prompt = bool(spec["share_prompt"])
    _, _, ahyper = rl._check(config)  # noqa: SLF001 - the trainer's own check
    loss_fn = rl.make_policy_loss(graphdef, rest, None, None, config)
    tx, state, _ = state_of(config, {"policy": params}, {"policy": p_shard})
    train = jax.jit(common.make_train_step(loss_fn, tx), donate_argnums=(0,))
    ref = _setup.frozen_copy(params, p_shard)
    # EOS outside the vocabulary: every row samples exactly T tokens, as
    # on the peers' side (min_new_tokens / no EOS), so the work is equal.
    sampler = sampling.Sampler(
      graphdef,
      rest,
      max_new_tokens=spec["completion_len"],
      eos_id=cfg.vocab_size,
      pad_id=cfg.pad_id,
    )
    prompts = jnp.asarray(
      _protocol.random_ids(spec, (spec["batch"], spec["prompt_len"]), 4),
      jnp.int32,
    )
    prompt_mask = jnp.ones(prompts.shape, bool)
    chunk = config.logps_chunk_size
    shared = rl.shared_prompt_kwargs(config)
    info["share_prompt"] = bool(shared)

    @jax.jit
    def forward_logps(p, tokens, attention_mask, loss_mask):
      m = nnx.merge(graphdef, p, rest)
      return rl.completion_logps(
        m,
        tokens,
        attention_mask,
        loss_mask,
        chunk_size=chunk,
        temperature=1.0,
        **shared,
      )

    @jax.jit
    def prepare(out):
      p_len = out.prompt_tokens.shape[1]
      tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
      attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
      loss_mask = rl._align_completion(out.completion_mask, p_len, False)  # noqa: SLF001
      sampler_lp = rl._align_completion(out.token_logps, p_len)  # noqa: SLF001
      # A cheap stand-in reward (fraction of even ids), as TRL's side uses a
      # cheap Python reward function.
      even = (out.completion_tokens % 2 == 0) & out.completion_mask
      rewards = jnp.sum(even, 1) / jnp.maximum(
        jnp.sum(out.completion_mask, 1), 1
      )
      lengths = jnp.sum(out.completion_mask, 1)
      return (
        tokens,
        attn,
        loss_mask,
        sampler_lp,
        rewards.astype(jnp.float32),
        lengths,
      )

    holder = {"state": state, "it": 0}
    on_policy = spec.get("on_policy", rl.is_on_policy(config))
    n = spec["batch"] * group
    tokens_per_step = n * (spec["prompt_len"] + spec["completion_len"])

    def sample():
      st = holder["state"]
      holder["it"] += 1
      key = jax.random.fold_in(jax.random.key(17), holder["it"])
      out = sampler.generate(
        st["params"]["policy"],
        prompts,
        prompt_mask,
        key,
        num_samples=group,
        temperature=1.0,
      )
      holder["sampled"] = jax.block_until_ready(prepare(out))

    def score():
      tokens, attn, loss_mask, sampler_lp, rewards, lengths = holder["sampled"]
      policy = holder["state"]["params"]["policy"]
      # As rl.run: one PPO epoch of one minibatch is on-policy, the loss
      # then takes the old log-probs from its own forward pass.
      old_lp = (
        None if on_policy else forward_logps(policy, tokens, attn, loss_mask)
      )
      ref_lp = forward_logps(ref, tokens, attn, loss_mask)
      adv, _ = rl.compute_advantages(
        config, ahyper, rewards, lengths, loss_mask, None, group
      )
      holder["rollout"] = jax.block_until_ready(
        rl.Rollout(
          tokens, attn, loss_mask, sampler_lp, old_lp, ref_lp, adv, rewards
        )
      )

    def update():
      holder["state"], metrics = train(holder["state"], None, holder["rollout"])
      jax.block_until_ready((holder["state"], metrics))

    stages = [("sample", sample), ("score", score), ("update", update)]
    jitted = (train, lambda: (holder["state"], None, holder["rollout"]))

  else:
    raise ValueError(f"unknown task {task!r}")
  return Built(stages, tokens_per_step, info, jitted)


def main():
  t0 = time.perf_counter()
  spec = _protocol.read_spec()
  built = build(spec)
  built.info["setup_s"] = time.perf_counter() - t0
  server = _protocol.StepServer(
    warmup=spec.get("warmup", 2),
    tokens_per_step=built.tokens_per_step,
    info=built.info,
  )
  _protocol.run_loop(server, built.step)


if __name__ == "__main__":
  _protocol.guarded(main)
