"""Logical axis names → mesh axes (first matching rule wins).

Models name every parameter and large activation dimension logically
(``("embed", "mlp")``); a short rule table maps names to mesh axes. A mesh
axis of size 1, or one already used by an earlier dimension of the same
array, is dropped, so one rule table serves every mesh shape. Given the
array's shape, a mesh axis that does not divide its dimension is skipped
too (and stays free for a later dimension).

:func:`axis_rules` sets the table for a block of code; with a mesh set by
``jax.set_mesh`` it makes the models' activation constraints
(``alignment.models.constrain``) bind. :func:`activation_context` sets both.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
  "alignment_logical_axis_rules", default=None
)


def _as_tuple(target) -> tuple[str, ...]:
  if target is None:
    return ()
  if isinstance(target, str):
    return (target,)
  return tuple(target)


def normalize_rules(rules: Rules) -> tuple:
  """Rules as a hashable tuple of ``(name, target)`` (lists → tuples)."""
  return tuple(
    (str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules
  )


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Sets the logical→mesh rule table in a block.

  The same rules are installed as Flax's logical axis rules too.

  Args:
    rules: ``[(logical_name, mesh_axis | (mesh_axes, ...) | None), ...]``;
      the first rule naming a logical axis wins.
  """
  rules = normalize_rules(rules)
  token = _RULES.set(rules)
  try:
    with flax_spmd.logical_axis_rules(rules):
      yield
  finally:
    _RULES.reset(token)


def current_rules() -> tuple:
  """The rules set by :func:`axis_rules` (or Flax's context), else ``()``."""
  rules = _RULES.get()
  if rules is None:
    rules = tuple(flax_spmd.get_logical_axis_rules())
  return rules


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """``jax.set_mesh(mesh)`` plus :func:`axis_rules` for a block.

  Jitted functions traced (and called) inside it constrain their large
  activations by the rule table (``alignment.models.constrain``); outside
  it those constraints are no-ops. Every trainer runs inside one
  (``trainers._setup.in_mesh_context``).

  Args:
    mesh: the device mesh.
    rules: the logical-axis rule table.
  """
  with jax.set_mesh(mesh), axis_rules(rules):
    yield


def logical_to_spec(
  logical_axes: Sequence[str | None] | None,
  rules: Rules,
  mesh: Mesh,
  shape: Sequence[int] | None = None,
) -> P:
  """Maps a tuple of logical axis names to a ``PartitionSpec`` on ``mesh``.

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: ``[(logical_name, mesh_axis | (mesh_axes...) | None), ...]``.
    mesh: the device mesh (or an ``AbstractMesh``); axes of size 1 are
      dropped.
    shape: the array's shape, if known: a mesh axis that does not divide
      its dimension (after the axes already kept for it) is skipped there
      and stays available to later dimensions.

  Returns:
    A ``PartitionSpec`` with one entry per dimension.

  Raises:
    ValueError: if a rule names an axis the mesh does not have.
  """
  if logical_axes is None:
    return P()
  table = {}
  for name, target in rules:
    table.setdefault(name, _as_tuple(target))  # first rule wins
  used: set[str] = set()
  out = []
  for dim, name in enumerate(logical_axes):
    axes = []
    n = 1
    for axis in table.get(name, ()) if name is not None else ():
      if axis not in mesh.shape:
        raise ValueError(
          f"logical axis rule {name!r} -> {axis!r}: mesh has no axis "
          f"{axis!r}; mesh axes are {tuple(mesh.shape)}."
        )
      size = mesh.shape[axis]
      if size == 1 or axis in used:
        continue
      if shape is not None and shape[dim] % (n * size):
        continue
      axes.append(axis)
      used.add(axis)
      n *= size
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_sharding(
  logical_axes, rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None
) -> NamedSharding:
  """``NamedSharding`` for an array with the given logical axes."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


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
