"""Meshes, logical-axis rules and partitioning: the only code that knows mesh
axis names."""

from alignment.sharding.mesh import make_mesh, resolve_mesh_shape
from alignment.sharding.partition import (
    batch_shard_count,
    batch_sharding,
    replicated,
    shard_batch,
    state_shardings,
)
from alignment.sharding.rules import (
    check_divisible,
    logical_sharding,
    logical_to_spec,
)
