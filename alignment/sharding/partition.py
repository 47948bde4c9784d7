"""Shardings for parameters, optimiser state and batches.

Parameters are born sharded: the trainer evaluates the model constructor with
``nnx.eval_shape``, reads each variable's logical axes, maps them through the
rule table, and ``jit``s the constructor with those ``out_shardings``. No
full copy of a parameter ever sits on one device.
"""

import logging
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignment.sharding import rules as rules_lib


def _fit_spec(shape, spec: P, mesh: Mesh, path: str) -> P:
  """Drops mesh axes from dimensions they don't divide (logged)."""
  entries = list(tuple(spec)) + [None] * (len(shape) - len(tuple(spec)))
  out = []
  for dim, (size, entry) in enumerate(zip(shape, entries, strict=False)):
    axes = rules_lib._as_tuple(entry)  # noqa: SLF001
    kept = []
    n = 1
    for axis in axes:
      if size % (n * mesh.shape[axis]) == 0:
        kept.append(axis)
        n *= mesh.shape[axis]
      else:
        logging.warning(
          "%s: dimension %d (size %d) is not divisible by mesh axis %r "
          "(size %d); replicating it along that axis.",
          path,
          dim,
          size,
          axis,
          mesh.shape[axis],
        )
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules) -> nnx.State:
  """Maps an (abstract) NNX state to a matching tree of NamedShardings.

  Args:
    abstract_state: ``nnx.State`` (or any pytree of ``nnx.Variable`` /
      ShapeDtypeStruct leaves) whose variables carry logical axis names in
      their ``out_sharding`` / ``sharding_names`` metadata.
    mesh: device mesh.
    rules: logical-to-mesh rule table.

  Returns:
    A pytree with the state's structure and a ``NamedSharding`` per leaf.
  """
  logical = nnx.get_partition_spec(abstract_state)

  def one(path, spec, leaf):
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(path)
    mesh_spec = rules_lib.logical_to_spec(
      tuple(spec) if spec else None, rules, mesh
    )
    return NamedSharding(mesh, _fit_spec(shape, mesh_spec, mesh, name))

  return jax.tree.map_with_path(
    one, logical, abstract_state, is_leaf=lambda x: isinstance(x, P)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: leading dim over the ``batch`` rule."""
  spec = rules_lib.logical_to_spec(
    ("batch",) + (None,) * (ndim - 1), rules, mesh
  )
  return NamedSharding(mesh, spec)


def batch_shard_count(mesh: Mesh, rules) -> int:
  """Number of ways the batch dimension is split."""
  spec = rules_lib.logical_to_spec(("batch",), rules, mesh)
  axes = rules_lib._as_tuple(tuple(spec)[0]) if tuple(spec) else ()  # noqa: SLF001
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def shard_batch(batch: Mapping | object, mesh: Mesh, rules):
  """Places a host-local NumPy batch onto the mesh, split along ``batch``.

  Each process passes its own slice (``global_batch / process_count`` rows);
  ``jax.make_array_from_process_local_data`` assembles the global array.

  Raises:
    ValueError: if the local batch does not split evenly over the devices.
  """
  shards = batch_shard_count(mesh, rules)
  local_shards = max(1, shards // jax.process_count())

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, replicated(mesh))
    if x.shape[0] % local_shards:
      raise ValueError(
        f"batch field {jax.tree_util.keystr(path)} has {x.shape[0]} rows on "
        f"this process, not divisible by its {local_shards} batch shards "
        f"(mesh {dict(mesh.shape)})."
      )
    return jax.make_array_from_process_local_data(
      batch_sharding(mesh, rules, x.ndim), x
    )

  return jax.tree.map_with_path(put, batch)
