"""Run setup shared by the trainers: mesh, model, optimiser, restore."""

import dataclasses
import functools
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from alignment import models
from alignment import sharding as sharding_lib
from alignment.trainers import _data, common


def rules_of(config) -> tuple:
  return tuple(
    (k, tuple(v) if isinstance(v, list) else v)
    for k, v in config.get("logical_axis_rules", ())
  )


def mesh_of(config):
  spec = [tuple(x) for x in config.get("mesh", (("data", -1),))]
  return sharding_lib.make_mesh(spec)


def mesh_context(config):
  """The activation context of a config's run: ``jax.set_mesh`` on its mesh
  plus its logical-axis rules (`alignment.sharding.activation_context`).

  Inside it, the models' activation constraints (hidden states, attention,
  MLP, logits, the sampler's KV cache) bind to the mesh; outside it they
  are no-ops.
  """
  return sharding_lib.activation_context(mesh_of(config), rules_of(config))


def in_mesh_context(run_fn=None, *, config_of=None):
  """Decorator: a trainer's ``run(config, workdir, ...)`` runs inside
  :func:`mesh_context` of its config.

  Every jitted function of the run (train step, reference and old
  log-probs, sampling, scoring, evaluation) is then traced and called with
  the mesh and rules in context, so the models' activation sharding
  constraints apply. Nested runs (the pipeline's stages) enter their own.

  Args:
    run_fn: the ``run`` function (when used as ``@in_mesh_context``).
    config_of: maps the run's config to the config block whose ``mesh``
      and ``logical_axis_rules`` apply (default: the config itself).
  """

  def wrap(fn):
    @functools.wraps(fn)
    def wrapped(config, *args, **kwargs):
      block = config if config_of is None else config_of(config)
      with mesh_context(block):
        return fn(config, *args, **kwargs)

    return wrapped

  return wrap if run_fn is None else wrap(run_fn)


def model_config(block: ml_collections.ConfigDict):
  """Resolves ``config.model`` (preset + overrides) to a ``ModelConfig``."""
  overrides = dict(block.get("overrides", {}) or {})
  for key in ("dtype", "param_dtype", "remat", "attention_impl"):
    if key in block:
      overrides.setdefault(key, block[key])
  return models.get_preset(block.preset, **overrides)


@dataclasses.dataclass
class Run:
  """Everything a trainer's loop needs, made once per run."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Any
  rules: tuple
  model: common.ShardedModel
  tx: Any
  state: dict
  state_shardings: Any
  checkpointer: common.Checkpointer | None
  data_state: Any
  model_config: Any


def build_model(
  kind: str, model_block, mesh, rules, seed: int, **model_kwargs
) -> tuple[common.ShardedModel, Any]:
  """A born-sharded model of ``kind``, from a preset or an HF checkpoint.

  With ``model_block.strict_sharding`` a mesh axis that does not divide the
  parameter dimension its rule maps it to is an error naming the parameter
  and the numbers (raised before any parameter is allocated, for presets);
  by default that axis is left out for that dimension, with a logged
  warning (e.g. 2 KV heads on tensor=4 stay whole).
  """
  init_from = model_block.get("init_from", "") or ""
  strict = bool(model_block.get("strict_sharding", False))
  if init_from:
    cfg, module = models.load_hf_checkpoint(
      init_from,
      kind=kind,
      mesh=mesh,
      rules=rules,
      dtype=model_block.get("dtype", "float32"),
      param_dtype=model_block.get("param_dtype", "float32"),
      config_overrides={
        key: model_block[key]
        for key in ("remat", "attention_impl")
        if key in model_block
      },
    )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    p_shard = sharding_lib.state_shardings(params, mesh, rules, strict=strict)
    r_shard = sharding_lib.state_shardings(rest, mesh, rules)
    params = jax.device_put(params, p_shard)
    rest = jax.device_put(rest, r_shard)
    return common.ShardedModel(graphdef, params, rest, p_shard, r_shard), cfg
  cfg = model_config(model_block)
  if strict:  # abstract: fails before anything is allocated
    abstract = nnx.eval_shape(
      lambda: models.build_model(kind, cfg, rngs=nnx.Rngs(seed), **model_kwargs)
    )
    sharding_lib.state_shardings(nnx.state(abstract), mesh, rules, strict=True)
  sharded = common.create_sharded_model(
    lambda rngs: models.build_model(kind, cfg, rngs=rngs, **model_kwargs),
    seed,
    mesh,
    rules,
  )
  return sharded, cfg


def module_from_state(sharded: common.ShardedModel, params) -> nnx.Module:
  return nnx.merge(sharded.graphdef, params, sharded.rest)


def setup_run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  kind: str,
  total_steps: int,
  init_params: Callable[[common.ShardedModel], Any] | None = None,
  model_kwargs: dict | None = None,
  restore: bool = True,
) -> Run:
  """Mesh, model (born sharded), optimiser and restored state for a run.

  If ``workdir/checkpoints`` holds a checkpoint, the run resumes from its
  latest step (parameters, optimiser state, step, RNG and data-iterator
  state), restored straight into the run's shardings (orbax reads, on each
  process, only the slices its devices hold); a checkpoint of a different
  model raises :class:`common.CheckpointMismatchError`.

  Raises at start, naming the numbers: a mesh that does not match the
  device count (`sharding.make_mesh`), a ``config.batch_size`` not
  divisible by the batch shards or by the process count
  (`sharding.check_batch_size`), and with ``config.model.strict_sharding``
  a mesh axis that does not divide a parameter dimension.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_of(config)
  rules = rules_of(config)
  if "batch_size" in config:  # every trainer shards batches of this size
    sharding_lib.check_batch_size(
      int(config.batch_size), mesh, rules, what="config.batch_size"
    )
  sharded, cfg = build_model(
    kind, config.model, mesh, rules, config.seed, **(model_kwargs or {})
  )
  if init_params is not None:
    # A private copy: the train state is donated to the step, and the caller
    # may keep using the params it passed (e.g. as the frozen reference).
    sharded.params = frozen_copy(init_params(sharded), sharded.param_shardings)
  tx = common.make_optimizer(config.optimizer, total_steps)
  opt_shardings = common.opt_state_shardings(
    tx, sharded.params, sharded.param_shardings, mesh
  )
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(sharded.params)
  rng = jax.random.key(config.seed)
  state = common.train_state(sharded.params, opt_state, 0, rng)
  repl = sharding_lib.replicated(mesh)
  shardings = {
    "params": sharded.param_shardings,
    "opt_state": opt_shardings,
    "step": repl,
    "rng": repl,
  }
  # Commit every leaf to its sharding now: an uncommitted step/rng would
  # make the first call of the jitted step compile twice.
  state = jax.device_put(state, shardings)
  ckpt_cfg = config.get("checkpoint", ml_collections.ConfigDict())
  checkpointer = None
  data_state = None
  if ckpt_cfg.get("enabled", True):
    checkpointer = common.Checkpointer(
      workdir / "checkpoints",
      keep=ckpt_cfg.get("keep", 3),
      save_every=ckpt_cfg.get("every", 0),
      async_save=ckpt_cfg.get("async_save", True),
    )
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state,
      shardings,
    )
    restored = checkpointer.restore(abstract) if restore else None
    if restored is not None:
      state, extra = restored
      data_state = extra.get("data_state")
      logging.info(
        "resumed from %s at step %d", checkpointer.directory, int(state["step"])
      )
  return Run(
    config,
    workdir,
    mesh,
    rules,
    sharded,
    tx,
    state,
    shardings,
    checkpointer,
    data_state,
    cfg,
  )


def frozen_copy(params, shardings):
  """A separate (donation-safe) copy of params for a frozen reference."""
  return jax.jit(
    lambda p: jax.tree.map(lambda x: x + 0, p), out_shardings=shardings
  )(params)


def jit_step(step_fn, run: Run, frozen_shardings, batch_example):
  """``jit`` with explicit shardings; the train state is donated."""
  batch_shardings = jax.tree.map(
    lambda x: sharding_lib.batch_sharding(run.mesh, run.rules, np.ndim(x)),
    batch_example,
  )
  return jax.jit(
    step_fn,
    in_shardings=(run.state_shardings, frozen_shardings, batch_shardings),
    out_shardings=(run.state_shardings, None),
    donate_argnums=(0,),
  )


def export_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "export"


def is_main_process() -> bool:
  return jax.process_index() == 0


def env_flag(name: str) -> bool:
  return os.environ.get(name, "") not in ("", "0", "false")


def finish(run: Run, state, history, *, kind: str, name: str) -> None:
  """End of a run: curves PNG, optional HF export, close the checkpointer."""
  if run.checkpointer is not None:
    run.checkpointer.close()
  if not is_main_process():
    return
  rows = common.read_metrics(run.workdir / f"metrics_{name}.jsonl")
  common.plot_metrics(
    rows,
    run.workdir / f"curves_{name}.png",
    title=f"{name}: {run.config.get('trainer', '')}",
  )
  if run.config.get("export_hf", False):
    module = module_from_state(run.model, state["params"])
    models.export_hf_checkpoint(
      module, run.model_config, export_dir(run.workdir), kind=kind
    )


def load_reward_model(path: str, mesh, rules, where: str):
  """A reward model exported in Hugging Face format (``export_hf=True``).

  Returns ``(params, (graphdef, rest))``.
  """
  if not path:
    raise ValueError(
      f"{where} is empty: give the directory of a reward "
      "model exported with export_hf=True (<workdir>/export)."
    )
  directory = pathlib.Path(path)
  if (directory / "export" / "config.json").exists():
    directory = directory / "export"
  if not (directory / "config.json").exists():
    raise ValueError(
      f"{where}={path!r}: no config.json there (nor in "
      "export/); export the reward model with export_hf=True."
    )
  _, module = models.load_hf_checkpoint(
    str(directory), kind="reward", mesh=mesh, rules=rules
  )
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params = jax.device_put(
    params, sharding_lib.state_shardings(params, mesh, rules)
  )
  return params, (graphdef, rest)


def train_offline(
  config, run_, loss_fn, batches, *, frozen, name: str, console_keys
):
  """Compiles ``loss_fn``'s train step and runs it over ``batches``.

  The offline trainers' shared loop (SFT, preference, reward model): exact
  gradient accumulation over ``config.microbatches``, the state donated and
  kept in its shardings, checkpoints and metrics through
  `common.train_loop`. Returns ``(state, history)``.
  """
  step = common.make_train_step(
    loss_fn, run_.tx, num_microbatches=config.get("microbatches", 1)
  )
  jitted = jax.jit(
    step, out_shardings=(run_.state_shardings, None), donate_argnums=(0,)
  )
  return common.train_loop(
    step_fn=jitted,
    state=run_.state,
    frozen=frozen,
    batches=_data.device_batches(batches, run_),
    total_steps=config.total_steps,
    workdir=run_.workdir,
    checkpointer=run_.checkpointer,
    name=name,
    log_every=config.get("log_every", 1),
    data_state_fn=batches.get_state,
    progress=config.get("progress", True),
    console_keys=console_keys,
  )
