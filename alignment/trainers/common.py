"""What every trainer shares: optimiser, train state, accumulation, loop.

A trainer is glue: it builds a model and a loss closure
``loss_fn(params, frozen, batch, rng) -> (WeightedMean, metrics)`` and hands
them to :func:`make_train_step`, which adds exact gradient accumulation,
clipping and the optax update, and to :func:`train_loop`, which adds
checkpoints (orbax, async, atomic, resumable), SIGTERM handling, the
non-finite guard, metrics (JSONL, TensorBoard, console) and plots.
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignment import sharding as sharding_lib
from alignment.ops import WeightedMean

PyTree = Any


# ----------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "warmup_constant")


def make_schedule(config: ml_collections.ConfigDict, total_steps: int):
  """Learning-rate schedule from ``config.optimizer``.

  Warmup is linear and counts from one: the update of step ``k`` (1-based,
  ``k <= warmup_steps``) uses ``lr * k / warmup_steps``, so the first step
  already moves the parameters (optax's and Hugging Face's schedules give
  the first step a learning rate of 0). After warmup, ``warmup_cosine``
  decays to ``final_lr_fraction * lr`` at the last step and
  ``warmup_linear`` to ``lr / (total_steps - warmup_steps)`` at the last
  step; both start decaying from ``lr`` on the step after warmup.
  """
  lr = float(config.learning_rate)
  warmup = int(min(config.get("warmup_steps", 0), max(total_steps - 1, 0)))
  name = config.get("schedule", "constant")
  if name not in SCHEDULES:
    raise ValueError(
      f"config.optimizer.schedule={name!r}; valid choices are {SCHEDULES}."
    )
  if name == "constant":
    return optax.constant_schedule(lr)
  decay_steps = max(total_steps - warmup, 1)
  final = lr * float(config.get("final_lr_fraction", 0.1))

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = lr * jnp.minimum(count + 1.0, max(warmup, 1)) / max(warmup, 1)
    # Steps after warmup: t = 0 at the first of them.
    t = jnp.clip(count - warmup + 1.0, 0.0, decay_steps)
    if name == "warmup_constant":
      after = jnp.full_like(t, lr)
    elif name == "warmup_cosine":
      after = final + (lr - final) * 0.5 * (
        1.0 + jnp.cos(jnp.pi * (t - 1.0) / max(decay_steps - 1, 1))
      )
    else:  # warmup_linear
      after = lr * (1.0 - (t - 1.0) / decay_steps)
    return jnp.where(count < warmup, ramp, after)

  return schedule


MU_DTYPES = ("float32", "bfloat16")
MU_DTYPE_OPTIMIZERS = ("adamw", "adam", "lion")


def _mu_dtype(config: ml_collections.ConfigDict, name: str):
  """``config.optimizer.mu_dtype`` checked: None (the parameters' dtype) for
  ``float32``, else the storage dtype of the first moment."""
  mu = config.get("mu_dtype", "float32") or "float32"
  if mu not in MU_DTYPES:
    raise ValueError(
      f"config.optimizer.mu_dtype={mu!r}; valid choices are {MU_DTYPES}."
    )
  if mu == "float32":
    return None
  if name not in MU_DTYPE_OPTIMIZERS:
    raise ValueError(
      f"config.optimizer.mu_dtype={mu!r} applies to the optimisers with a "
      f"first moment, {MU_DTYPE_OPTIMIZERS}; config.optimizer.name={name!r}."
    )
  return jnp.dtype(mu)


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """An optax optimiser from ``config.optimizer`` (name, lr, schedule, ...).

  ``config.optimizer.mu_dtype="bfloat16"`` stores Adam's / Lion's first
  moment in bfloat16 (optax's ``mu_dtype``; the update is computed in
  float32 and rounded when stored): a quarter less AdamW state (6 instead
  of 8 bytes a parameter). The second moment stays float32 (its small
  values lose too much in bfloat16's 8-bit mantissa).
  """
  schedule = make_schedule(config, total_steps)
  name = config.get("name", "adamw")
  mu_dtype = _mu_dtype(config, name)
  if name == "adamw":
    tx = optax.adamw(
      schedule,
      b1=config.get("b1", 0.9),
      b2=config.get("b2", 0.999),
      eps=config.get("eps", 1e-8),
      weight_decay=config.get("weight_decay", 0.0),
      mu_dtype=mu_dtype,
    )
  elif name == "adam":
    tx = optax.adam(
      schedule,
      b1=config.get("b1", 0.9),
      b2=config.get("b2", 0.999),
      eps=config.get("eps", 1e-8),
      mu_dtype=mu_dtype,
    )
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=config.get("momentum", None))
  elif name == "adafactor":
    tx = optax.adafactor(schedule)
  elif name == "lion":
    tx = optax.lion(
      schedule,
      weight_decay=config.get("weight_decay", 0.0),
      mu_dtype=mu_dtype,
    )
  else:
    raise ValueError(
      f"config.optimizer.name={name!r}; valid choices are {OPTIMIZERS}."
    )
  clip = config.get("grad_clip_norm", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  return tx


# ----------------------------------------------------------------------------
# Train state and the compiled step
# ----------------------------------------------------------------------------


def train_state(params, opt_state, step, rng) -> dict:
  """The checkpointed pytree: params, optimiser state, step and RNG key."""
  return {
    "params": params,
    "opt_state": opt_state,
    "step": jnp.asarray(step, jnp.int32),
    "rng": jax.random.key_data(rng)
    if jnp.issubdtype(getattr(rng, "dtype", jnp.uint32), jax.dtypes.prng_key)
    else jnp.asarray(rng, jnp.uint32),
  }


LossFn = Callable[..., tuple[WeightedMean, dict]]


def split_microbatches(
  batch: PyTree, num_microbatches: int, group: int = 1
) -> PyTree:
  """``[B, ...]`` → ``[M, B/M, ...]`` with micro-batch ``j`` = rows j, M+j, ...

  Strided, so that every micro-batch keeps rows from every device of a
  batch sharded in contiguous blocks (no load imbalance, no resharding).
  With ``group`` > 1 the stride is over blocks of ``group`` consecutive
  rows (an RL rollout's samples of one prompt), which stay together:
  micro-batch ``j`` = groups j, M+j, ...
  """
  rows = group * num_microbatches

  def split(x):
    if x.ndim == 0:
      return jnp.broadcast_to(x, (num_microbatches,))
    if x.shape[0] % rows:
      what = f" of whole groups of {group} rows" if group > 1 else ""
      raise ValueError(
        f"batch of {x.shape[0]} rows does not split into "
        f"{num_microbatches} micro-batches{what} (config.microbatches)."
      )
    y = x.reshape((x.shape[0] // rows, num_microbatches, group) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    return y.reshape((num_microbatches, -1) + x.shape[1:])

  return jax.tree.map(split, batch)


def accumulate_gradients(
  loss_fn: LossFn,
  params,
  frozen,
  batch,
  rng,
  num_microbatches: int,
  group: int = 1,
):
  """Exact gradient of ``Σ total / Σ weight`` over micro-batches.

  ``loss_fn(params, frozen, micro_batch, rng)`` returns ``(WeightedMean,
  metrics)``. Each micro-batch contributes the gradient of its ``total``;
  the sum is divided once by the summed ``weight``. Because the weight does
  not depend on the parameters, this equals the full-batch gradient of the
  mean for every aggregation mode, whatever ``num_microbatches`` is.
  Metrics are weighted by the same weights.

  Returns:
    ``(loss_value, grads, weight, metrics)``.
  """

  def total_fn(p, micro, key):
    wm, metrics = loss_fn(p, frozen, micro, key)
    return wm.total, (wm.weight, metrics)

  grad_fn = jax.value_and_grad(total_fn, has_aux=True)
  if num_microbatches == 1:
    (total, (weight, metrics)), grads = grad_fn(params, batch, rng)
    metrics = jax.tree.map(lambda m: m * weight, metrics)
  else:
    micro = split_microbatches(batch, num_microbatches, group)
    keys = jax.random.split(rng, num_microbatches)

    def body(carry, xs):
      g_acc, t_acc, w_acc, m_acc = carry
      mb, key = xs
      (t, (w, m)), g = grad_fn(params, mb, key)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      m_acc = jax.tree.map(lambda a, b: a + b * w, m_acc, m)
      return (g_acc, t_acc + t, w_acc + w, m_acc), None

    first = jax.tree.map(lambda x: x[0], micro)
    _, (_, m_shape) = jax.eval_shape(total_fn, params, first, rng)
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, total, weight, metrics), _ = jax.lax.scan(
      body, (zeros_g, jnp.float32(0), jnp.float32(0), zeros_m), (micro, keys)
    )
  safe = jnp.where(weight > 0, weight, 1.0)
  grads = jax.tree.map(lambda g: jnp.where(weight > 0, g / safe, 0.0), grads)
  metrics = jax.tree.map(
    lambda m: jnp.where(weight > 0, m / safe, 0.0), metrics
  )
  loss = jnp.where(weight > 0, total / safe, 0.0)
  return loss, grads, weight, metrics


def make_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  *,
  num_microbatches: int = 1,
  group: int = 1,
):
  """A pure ``step(state, frozen, batch) -> (state, metrics)`` to ``jit``.

  ``state`` is the dict of :func:`train_state`; ``frozen`` holds what the
  loss needs but is not trained (reference params, a reward model).
  ``group``: micro-batches keep blocks of this many consecutive rows
  together (:func:`split_microbatches`; an RL rollout's samples of one
  prompt).
  """

  def step(state, frozen, batch):
    rng = jax.random.wrap_key_data(state["rng"])
    rng, step_rng = jax.random.split(rng)
    loss, grads, weight, metrics = accumulate_gradients(
      loss_fn,
      state["params"],
      frozen,
      batch,
      jax.random.fold_in(step_rng, state["step"]),
      num_microbatches,
      group,
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["loss_weight"] = weight
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    new_state = {
      "params": params,
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "rng": jax.random.key_data(rng),
    }
    return new_state, metrics

  return step


# ----------------------------------------------------------------------------
# Model + optimiser state born sharded
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class ShardedModel:
  """A model split for ``jit``: static graphdef, sharded params, shardings."""

  graphdef: Any
  params: Any
  rest: Any
  param_shardings: Any
  rest_shardings: Any

  def merge(self, params=None):
    return nnx.merge(
      self.graphdef, self.params if params is None else params, self.rest
    )


def create_sharded_model(
  make_model: Callable[[nnx.Rngs], nnx.Module], seed: int, mesh, rules
) -> ShardedModel:
  """Initialises ``make_model(rngs)`` with every parameter born sharded.

  ``nnx.eval_shape`` gives the abstract state; the logical axis names of
  each variable go through ``rules`` to mesh shardings; the constructor is
  then ``jit``-ed with those ``out_shardings``.
  """
  abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(seed)))
  graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  p_shard = sharding_lib.state_shardings(abs_params, mesh, rules)
  r_shard = sharding_lib.state_shardings(abs_rest, mesh, rules)

  def init():
    model = make_model(nnx.Rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.lax.with_sharding_constraint(params, p_shard)
    rest = jax.lax.with_sharding_constraint(rest, r_shard)
    return params, rest

  init = jax.jit(init, out_shardings=(p_shard, r_shard))
  params, rest = init()
  return ShardedModel(graphdef, params, rest, p_shard, r_shard)


def opt_state_shardings(tx, params, param_shardings, mesh):
  """Optimiser-state shardings: like the params they mirror, else replicated.

  optax states hold param-shaped trees (Adam's mu, nu); leaves whose path
  ends like a parameter path and whose shape matches get that parameter's
  sharding; scalars (counts) are replicated.
  """
  abstract = jax.eval_shape(tx.init, params)
  flat_params = {
    jax.tree_util.keystr(path): (leaf.shape, shard)
    for (path, leaf), shard in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(param_shardings),
      strict=True,
    )
  }

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    for p_key, (shape, shard) in flat_params.items():
      if key.endswith(p_key) and tuple(leaf.shape) == tuple(shape):
        return shard
    return NamedSharding(mesh, P())

  return jax.tree.map_with_path(one, abstract)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def _path_str(path) -> str:
  """``(DictKey('a'), SequenceKey(0), GetAttrKey('value'))`` → ``a/0/value``."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model or optimiser."""


class Checkpointer:
  """Orbax checkpoints of the train state plus JSON extras (data iterator).

  Saves are asynchronous and atomic (orbax writes to a temporary directory
  and renames it when complete), so a run killed mid-save keeps its previous
  checkpoint as the latest. The newest ``keep`` are kept.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep: int = 3,
    save_every: int = 0,
    async_save: bool = True,
  ):
    self.directory = pathlib.Path(directory).absolute()
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      # Handlers up front, so that a fresh process (a resumed run) can read
      # the metadata of checkpoints it did not write.
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "extra": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return bool(self.save_every) and step % self.save_every == 0

  def save(
    self,
    step: int,
    state,
    extra: Mapping,
    *,
    force: bool = False,
    wait: bool = False,
  ):
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra))
      ),
      force=force,
    )
    if wait:
      self.manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores ``(state, extra)``; raises a clear error on mismatch."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self._check_compatible(abstract_state, step)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        extra=ocp.args.JsonRestore(),
      ),
    )
    return restored.state, dict(restored.extra or {})

  def _check_compatible(self, abstract_state, step: int):
    meta = self.manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    if tree is None:  # no readable metadata: leave the check to orbax
      return
    # The metadata tree is nested dicts with string keys ("['0']['value']")
    # where the live state has list indices and attributes ("[0].value"):
    # compare paths as plain "a/0/value" strings.
    want = {
      _path_str(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    have = {
      _path_str(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape")
      )[0]
      if hasattr(x, "shape")
    }
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
      lines = [
        f"checkpoint {self.directory}/{step} does not match this run's "
        "model/optimiser (a different config.model or optimiser?)."
      ]
      if wrong:
        lines += [
          f"  {k}: checkpoint shape {have[k]}, run shape {want[k]}"
          for k in wrong[:10]
        ]
      if missing:
        lines.append(f"  missing in checkpoint: {missing[:10]}")
      if extra:
        lines.append(f"  only in checkpoint: {extra[:10]}")
      lines.append(
        "Use a fresh --workdir, or the config the checkpoint was written with."
      )
      raise CheckpointMismatchError("\n".join(lines))

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # noqa: BLE001 - not available without distributed
      return False

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def _to_float(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else [float(x) for x in v.reshape(-1)]


class MetricWriter:
  """JSONL (deterministic) + TensorBoard + console progress bar.

  The JSONL file holds only values computed by the program (no wall-clock
  times), so two runs of the same config and seed write identical files;
  on resume, lines past the restored step are dropped first.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    total_steps: int,
    name: str = "train",
    resume_step: int = 0,
    progress: bool = True,
    tensorboard: bool = True,
  ):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / f"metrics_{name}.jsonl"
    self.is_main = jax.process_index() == 0
    if self.is_main:
      self._truncate(resume_step)
    self._tb = None
    if tensorboard and self.is_main:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.workdir / "tensorboard" / name))
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self._tb = None
    self._bar = None
    if progress and self.is_main:
      from tqdm.auto import tqdm

      self._bar = tqdm(
        total=total_steps,
        initial=resume_step,
        desc=name,
        dynamic_ncols=True,
        leave=True,
      )
    self._t0 = time.perf_counter()
    self._last_step = resume_step

  def _truncate(self, resume_step: int):
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      if line.strip() and json.loads(line).get("step", 0) <= resume_step:
        kept.append(line)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(self.path)

  def write(
    self, step: int, metrics: Mapping[str, Any], *, console_keys=("loss",)
  ):
    if not self.is_main:
      return
    row = {"step": int(step)}
    row.update({k: _to_float(v) for k, v in sorted(metrics.items())})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(step - self._last_step)
      self._bar.set_postfix(
        {
          k: f"{row[k]:.4g}"
          for k in console_keys
          if isinstance(row.get(k), float)
        }
      )
    self._last_step = step

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [
    json.loads(line) for line in path.read_text().splitlines() if line.strip()
  ]


def plot_metrics(
  rows: list[dict],
  path: str | os.PathLike,
  *,
  keys: list[str] | None = None,
  title: str = "",
) -> None:
  """Writes a PNG grid of training curves (one panel per metric)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not rows:
    return
  if keys is None:
    keys = sorted(
      {
        k
        for r in rows
        for k, v in r.items()
        if k != "step" and isinstance(v, float)
      }
    )
  keys = [k for k in keys if any(k in r for r in rows)]
  if not keys:
    return
  cols = min(3, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(
    nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False
  )
  for ax, key in zip(axes.flat, keys, strict=False):
    xs = [r["step"] for r in rows if key in r]
    ys = [r[key] for r in rows if key in r]
    ax.plot(xs, ys, lw=1.2)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; nothing was saved for that step."""


class _Preemption:
  """Turns SIGTERM into a flag the loop polls at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Preempted(SystemExit):
  """Raised after the preemption checkpoint was written (exit code 143)."""

  def __init__(self):
    super().__init__(143)


def train_loop(
  *,
  step_fn: Callable,
  state,
  frozen,
  batches: Iterator,
  total_steps: int,
  workdir: str | os.PathLike,
  checkpointer: Checkpointer | None,
  name: str = "train",
  log_every: int = 1,
  data_state_fn: Callable[[], Any] | None = None,
  hooks: list[Callable[[int, dict], dict | None]] | None = None,
  progress: bool = True,
  console_keys=("loss",),
):
  """Runs ``step_fn`` until ``total_steps``; returns ``(state, history)``.

  * Stops with :class:`NonFiniteLossError` naming the step (and the batch's
    position in the data stream) if the loss or gradient norm is not
    finite; the last good checkpoint stays the latest.
  * Saves every ``checkpointer.save_every`` steps, at the end, and on
    SIGTERM (then raises :class:`Preempted`).
  * ``hooks(step, metrics)`` may return extra metrics (evaluation).
  """
  start = int(jax.device_get(state["step"]))
  writer = MetricWriter(
    workdir,
    total_steps=total_steps,
    name=name,
    resume_step=start,
    progress=progress,
  )
  history = []
  with _Preemption() as preemption:
    for step in range(start + 1, total_steps + 1):
      batch = next(batches)
      state, metrics = step_fn(state, frozen, batch)
      metrics = jax.device_get(metrics)
      if not (
        np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
      ):
        writer.close()
        if checkpointer is not None:
          checkpointer.wait()
        raise NonFiniteLossError(
          f"{name}: non-finite loss={metrics['loss']} or grad_norm="
          f"{metrics['grad_norm']} at step {step} (batch #{step - 1} of the "
          f"data stream, 0-based). Nothing was saved for this step; the "
          f"latest checkpoint is step {checkpointer.latest_step() if checkpointer else None}."
        )
      for hook in hooks or ():
        extra = hook(step, metrics)
        if extra:
          metrics.update(extra)
      if step % log_every == 0 or step == total_steps:
        writer.write(step, metrics, console_keys=console_keys)
        history.append(
          {"step": step, **{k: _to_float(v) for k, v in metrics.items()}}
        )
      stop = preemption.requested or (
        checkpointer is not None and checkpointer.reached_preemption(step)
      )
      if checkpointer is not None and (
        checkpointer.should_save(step) or step == total_steps or stop
      ):
        extra = {
          "data_state": data_state_fn() if data_state_fn else None,
          "step": step,
        }
        checkpointer.save(
          step, state, extra, force=stop or step == total_steps, wait=stop
        )
      if stop:
        writer.close()
        raise Preempted()
  writer.close()
  if checkpointer is not None:
    checkpointer.wait()
  return state, history
