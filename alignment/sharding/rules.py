"""Logical axis names → mesh axes (first matching rule wins).

Models name every parameter and large activation dimension logically
(``("embed", "mlp")``); a short rule table maps names to mesh axes. A mesh
axis of size 1, or one already used by an earlier dimension of the same
array, is dropped, so one rule table serves every mesh shape.
"""

from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def _as_tuple(target) -> tuple[str, ...]:
  if target is None:
    return ()
  if isinstance(target, str):
    return (target,)
  return tuple(target)


def logical_to_spec(
  logical_axes: Sequence[str | None] | None, rules: Rules, mesh: Mesh
) -> P:
  """Maps a tuple of logical axis names to a ``PartitionSpec`` on ``mesh``.

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: ``[(logical_name, mesh_axis | (mesh_axes...) | None), ...]``.
    mesh: the device mesh; axes of size 1 are dropped.

  Returns:
    A ``PartitionSpec`` with one entry per dimension.
  """
  if logical_axes is None:
    return P()
  table = {}
  for name, target in rules:
    table.setdefault(name, _as_tuple(target))  # first rule wins
  used: set[str] = set()
  out = []
  for name in logical_axes:
    axes = []
    for axis in table.get(name, ()) if name is not None else ():
      if axis not in mesh.shape:
        raise ValueError(
          f"logical axis rule {name!r} -> {axis!r}: mesh has no axis "
          f"{axis!r}; mesh axes are {tuple(mesh.shape)}."
        )
      if mesh.shape[axis] == 1 or axis in used:
        continue
      axes.append(axis)
      used.add(axis)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_sharding(logical_axes, rules: Rules, mesh: Mesh) -> NamedSharding:
  """``NamedSharding`` for an array with the given logical axes."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh))


def check_divisible(
  shape: Sequence[int], spec: P, mesh: Mesh, what: str
) -> None:
  """Raises if a sharded dimension is not divisible by its mesh axes."""
  for dim, (size, entry) in enumerate(zip(shape, tuple(spec), strict=False)):
    axes = _as_tuple(entry)
    n = 1
    for axis in axes:
      n *= mesh.shape[axis]
    if n > 1 and size % n:
      raise ValueError(
        f"{what}: dimension {dim} has size {size}, which mesh axes {axes} "
        f"(total {n} devices) do not divide."
      )
