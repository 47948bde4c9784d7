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


def _fit_spec(shape, spec: P, mesh: Mesh, path: str, strict: bool = False) -> P:
  """Drops mesh axes from dimensions they don't divide (logged), or raises
  a ``ValueError`` naming the numbers when ``strict``."""
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
      elif strict:
        raise ValueError(
          f"{path}: dimension {dim} has size {size}, which mesh axis "
          f"{axis!r} of size {mesh.shape[axis]}"
          + (f" (after {kept}, total {n})" if kept else "")
          + " does not divide; change config.mesh or the rule table."
        )
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


def _logical_names(leaf) -> tuple | None:
  """A variable's logical axis names, read from its metadata as written.

  (Not ``nnx.get_partition_spec``: inside Flax's logical-axis-rules
  context that returns names already mapped to mesh axes.)
  """
  if not isinstance(leaf, nnx.Variable):
    return None
  names = leaf.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def state_shardings(
  abstract_state, mesh: Mesh, rules, *, strict: bool = False
) -> nnx.State:
  """Maps an (abstract) NNX state to a matching tree of NamedShardings.

  Args:
    abstract_state: ``nnx.State`` (or any pytree of ``nnx.Variable`` /
      ShapeDtypeStruct leaves) whose variables carry logical axis names in
      their ``out_sharding`` metadata.
    mesh: device mesh.
    rules: logical-to-mesh rule table.
    strict: raise (instead of leaving that axis out for that dimension,
      with a logged warning, where it stays free for a later dimension)
      when a mesh axis does not divide the dimension its rule maps it to.

  Returns:
    A pytree with the state's structure and a ``NamedSharding`` per leaf.

  Raises:
    ValueError: with ``strict``, naming the parameter, dimension, size and
      mesh axis that do not fit.
  """

  def one(path, leaf):
    shape = tuple(np.shape(leaf))
    names = _logical_names(leaf)
    if names is None:
      sharding = NamedSharding(mesh, P())
    else:
      name = jax.tree_util.keystr(path)
      wanted = rules_lib.logical_to_spec(names, rules, mesh)
      # Raises (strict) or logs each axis that does not divide its dim.
      _fit_spec(shape, wanted, mesh, name, strict=strict)
      spec = rules_lib.logical_to_spec(names, rules, mesh, shape)
      sharding = NamedSharding(mesh, spec)
    # Same tree structure as the state: variables hold their sharding.
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(sharding)
    return sharding

  return jax.tree.map_with_path(
    one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
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


def batch_axes(mesh: Mesh, rules) -> dict[str, int]:
  """Mesh axes (and sizes) the ``batch`` dimension is split over."""
  spec = rules_lib.logical_to_spec(("batch",), rules, mesh)
  entry = tuple(spec)[0] if tuple(spec) else None
  return {a: int(mesh.shape[a]) for a in rules_lib._as_tuple(entry)}  # noqa: SLF001


def check_batch_size(
  global_rows: int, mesh: Mesh, rules, *, what: str = "global batch"
) -> None:
  """Fails at start if a global batch cannot be split over the mesh.

  Args:
    global_rows: leading dimension of the global batch arrays.
    mesh: the device mesh.
    rules: logical-axis rules (``batch`` names the axes it is split over).
    what: how the error message names the batch.

  Raises:
    ValueError: naming the numbers, if ``global_rows`` is not divisible by
      the number of batch shards or by the number of processes.
  """
  axes = batch_axes(mesh, rules)
  shards = int(np.prod(list(axes.values()))) if axes else 1
  if global_rows % shards:
    raise ValueError(
      f"{what} of {global_rows} rows is not divisible by its {shards} batch "
      f"shards (mesh axes {axes}); use a multiple of {shards}."
    )
  procs = jax.process_count()
  if global_rows % procs:
    raise ValueError(
      f"{what} of {global_rows} rows is not divisible by the {procs} "
      "processes, each of which loads an equal slice; use a multiple of "
      f"{procs}."
    )


def process_batch_slice(global_rows: int, mesh: Mesh, rules) -> slice:
  """The rows of a global batch that this process must load.

  With ``jax.distributed`` every process feeds only the rows its own
  devices hold (:func:`shard_batch` assembles the global array); this
  returns them as ``slice(start, stop)``, checked to be contiguous.

  Raises:
    ValueError: see :func:`check_batch_size`; or if this process's rows
      are not contiguous (a mesh whose batch axes interleave processes).
  """
  check_batch_size(global_rows, mesh, rules)
  sharding = batch_sharding(mesh, rules, 1)
  blocks = set()
  for index in sharding.addressable_devices_indices_map(
    (global_rows,)
  ).values():
    rows = index[0] if index else slice(None)
    blocks.add(rows.indices(global_rows)[:2])
  start = min(b[0] for b in blocks)
  stop = max(b[1] for b in blocks)
  if sum(b[1] - b[0] for b in blocks) != stop - start:
    raise ValueError(
      f"process {jax.process_index()} holds non-contiguous batch rows "
      f"{sorted(blocks)} of {global_rows} (mesh {dict(mesh.shape)}); put the "
      "axes that span processes first in config.mesh."
    )
  return slice(start, stop)
