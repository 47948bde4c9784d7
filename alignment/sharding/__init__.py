"""Meshes, logical-axis rules and partitioning: the only code that knows mesh
axis names."""

from alignment.sharding.mesh import make_mesh, resolve_mesh_shape
from alignment.sharding.partition import (
  batch_axes,
  batch_shard_count,
  batch_sharding,
  check_batch_size,
  process_batch_slice,
  replicated,
  shard_batch,
  state_shardings,
)
from alignment.sharding.rules import (
  activation_context,
  axis_rules,
  check_divisible,
  current_rules,
  logical_sharding,
  logical_to_spec,
)
