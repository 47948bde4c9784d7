"""Runs a few sharded train steps of the planner's steps; also a worker.

Imported by ``multiprocess_test.py`` for the single-process references, and
run as ``python -m tests.sharding._train_steps --process_id=i ...`` by it,
one subprocess per JAX process, through the real ``jax.distributed`` path:

  jax.distributed.initialize(coordinator_address="127.0.0.1:<port>",
                             num_processes=2, process_id=i)

Each process loads only its own rows of the batch
(``sharding.process_batch_slice``) and feeds them through
``sharding.shard_batch``. With ``--ckpt_dir`` the workers then save the
first trainer's state with ``trainers.common.Checkpointer`` (orbax; each
process writes its own shards) and restore it straight into another layout
(parameters over an fsdp=8 mesh): orbax reads, per process, only the slices
of the target shardings' addressable shards.
"""

import argparse
import os
import sys

TRAINERS = ("dpo", "reward_model", "grpo")
STEPS = 3
# Tiny-but-divisible: every dimension splits over fsdp=4 and tensor=2.
MODEL = dict(vocab_size=256, n_kv_heads=2, n_layers=2)
BATCH, SEQ_LEN, NUM_SAMPLES = 8, 16, 2
MESH = (("data", 1), ("fsdp", 4), ("tensor", 2))


def _copy_tree(tree):
  import jax

  return jax.tree.map(lambda x: x * 1.0, tree)


def run(
  trainers,
  mesh_spec,
  devices=None,
  *,
  steps: int = STEPS,
  n_layers: int | None = None,
  ckpt_dir: str | None = None,
) -> dict:
  """``{trainer: (losses [steps], {param path: final value})}``.

  Models are born sharded (``common.create_sharded_model``) once per model
  kind; each trainer starts from a copy. With ``ckpt_dir``, also
  ``{"checkpoint": {...}}`` from :func:`_checkpoint_round_trip`.
  """
  import jax
  import numpy as np
  import optax
  from jax.experimental import multihost_utils

  from alignment import config_lib, models, sharding
  from alignment.sharding import partition, planner
  from alignment.trainers import common

  rules = config_lib.DEFAULT_RULES
  model = dict(MODEL)
  if n_layers is not None:
    model["n_layers"] = n_layers
  cfg = models.get_preset("tiny", **model)
  mesh = sharding.make_mesh(mesh_spec, devices)
  repl = sharding.replicated(mesh)
  # Adam's normalisation turns float reordering noise on near-zero
  # gradients into O(lr) differences when eps is tiny; eps=1e-6 keeps the
  # comparison about the gradients; lr=1e-3 still moves every parameter
  # by ~3e-3 in 3 steps, far above the 1e-5 tolerance.
  tx = optax.adamw(1e-3, eps=1e-6, weight_decay=0.01)
  born = {}
  out = {}
  for trainer in trainers:
    workload = planner.Workload(
      trainer, batch=BATCH, seq_len=SEQ_LEN, num_samples=NUM_SAMPLES
    )
    if workload.model_kind not in born:
      born[workload.model_kind] = common.create_sharded_model(
        lambda rngs, k=workload.model_kind: models.build_model(
          k, cfg, rngs=rngs
        ),
        0,
        mesh,
        rules,
      )
    sm = born[workload.model_kind]
    copy = jax.jit(_copy_tree, out_shardings=sm.param_shardings)
    params = copy(sm.params)
    frozen = copy(sm.params) if workload.has_reference else None
    frozen_shardings = sm.param_shardings if frozen is not None else None
    opt_shardings = common.opt_state_shardings(
      tx, params, sm.param_shardings, mesh
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = common.train_state(params, opt_state, 0, jax.random.key(0))
    # Commit step and RNG to the mesh: uncommitted scalars would make the
    # second call retrace and recompile the step.
    state["step"] = jax.device_put(state["step"], repl)
    state["rng"] = jax.device_put(state["rng"], repl)
    global_batch = planner.synthetic_batch(workload, cfg.vocab_size, seed=1)
    rows = partition.process_batch_slice(workload.batch_rows, mesh, rules)
    local = {k: v[rows] for k, v in global_batch.items()}
    batch = sharding.shard_batch(local, mesh, rules)
    state_shardings = {
      "params": sm.param_shardings,
      "opt_state": opt_shardings,
      "step": repl,
      "rng": repl,
    }
    loss_fn = planner.make_loss_fn(trainer, sm.graphdef, sm.rest)
    step = jax.jit(
      common.make_train_step(loss_fn, tx),
      in_shardings=(
        state_shardings,
        frozen_shardings,
        {k: v.sharding for k, v in batch.items()},
      ),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,),
    )
    losses = []
    with planner.activation_context(mesh, rules):
      for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        losses.append(metrics["loss"])
    losses = np.asarray([float(x) for x in losses])
    if ckpt_dir is not None and trainer == trainers[0]:
      out["checkpoint"] = _checkpoint_round_trip(
        os.path.join(ckpt_dir, trainer), state, state_shardings, devices
      )
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    values = multihost_utils.process_allgather([v for _, v in flat], tiled=True)
    out[trainer] = (
      losses,
      {
        jax.tree_util.keystr(p): np.asarray(v)
        for (p, _), v in zip(flat, values, strict=True)
      },
    )
  return out


def _checkpoint_round_trip(directory, state, shardings, devices) -> dict:
  """Saves ``state``; restores it with its parameters laid out over fsdp=8.

  Returns ``{"max_abs_diff", "layout_ok", "local_shards"}``: the largest
  difference of any restored leaf from the saved one, whether every
  restored array has exactly its target sharding, and the number of shards
  of each parameter this process holds (its own devices only).
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from alignment import config_lib, sharding
  from alignment.trainers import common

  ckpt = common.Checkpointer(directory, async_save=False)
  ckpt.save(STEPS, state, {"step": STEPS}, force=True, wait=True)
  fsdp8 = sharding.make_mesh((("data", 1), ("fsdp", 8), ("tensor", 1)), devices)
  target = dict(
    shardings,
    params=sharding.state_shardings(
      state["params"], fsdp8, config_lib.DEFAULT_RULES
    ),
  )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    target,
  )
  restored, extra = ckpt.restore(abstract)
  ckpt.close()
  assert extra["step"] == STEPS, extra
  layout_ok = all(
    r.sharding == t.sharding
    for r, t in zip(
      jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True
    )
  )
  params = jax.tree.leaves(restored["params"])
  local_shards = {len(x.addressable_shards) for x in params}
  pairs = [
    (a, b)
    for a, b in zip(
      jax.tree.leaves(restored), jax.tree.leaves(state), strict=True
    )
    if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
  ]
  a = multihost_utils.process_allgather([x for x, _ in pairs], tiled=True)
  b = multihost_utils.process_allgather([y for _, y in pairs], tiled=True)
  diff = max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
    for x, y in zip(a, b, strict=True)
  )
  return {
    "max_abs_diff": diff,
    "layout_ok": layout_ok,
    "local_shards": sorted(local_shards),
  }


def _save(path: str, result: dict) -> None:
  import numpy as np

  tmp = path + ".tmp.npz"
  np.savez(tmp, **result)
  os.replace(tmp, path)


def _flatten(prefix: str, results: dict, out: dict) -> None:
  for key, value in results.pop("checkpoint", {}).items():
    out[f"{prefix}checkpoint/{key}"] = value
  for trainer, (losses, params) in results.items():
    out[f"{prefix}{trainer}/losses"] = losses
    for k, v in params.items():
      out[f"{prefix}{trainer}/params{k}"] = v


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=("worker", "reference"), required=True)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--out", required=True)
  parser.add_argument("--ckpt_dir", default=None)
  args = parser.parse_args(argv)
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  result = {}
  if args.mode == "reference":
    # One process: the same mesh over 8 local devices, and one device.
    _flatten("8dev/", run(TRAINERS, MESH), result)
    single = tuple((name, 1) for name, _ in MESH)
    _flatten("1dev/", run(TRAINERS, single, jax.devices()[:1]), result)
    _save(args.out, result)
    return 0
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{args.port}",
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=300,
  )
  result["process_count"] = jax.process_count()
  result["device_count"] = jax.device_count()
  result["local_device_count"] = jax.local_device_count()
  _flatten("", run(TRAINERS, MESH, ckpt_dir=args.ckpt_dir), result)
  if jax.process_index() == 0:
    _save(args.out, result)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
