"""Logical axis names for parameters and activations.

Models never name mesh axes. Every parameter carries logical axis names in
its ``out_sharding`` metadata (created with ``eager_sharding=False``, so a
model can be built with no mesh), and large activations are constrained by
logical name through :func:`constrain`, which maps names to mesh axes with
the rules of the current context (:func:`axis_rules`) and the mesh of the
current context (``jax.set_mesh``). Without both it does nothing, so the
same model code runs on one CPU and on a pod.

Names used by `alignment.models` (the rule table must cover the ones it
wants to shard; unknown names stay replicated):

* parameters: ``vocab``, ``embed``, ``heads``, ``kv_heads``, ``kv`` (head
  dim), ``mlp``, ``members`` (stacked ensembles), ``None`` (position tables,
  small head outputs);
* activations: ``batch``, ``length``, ``embed``, ``heads``, ``kv_heads``,
  ``kv``, ``mlp``, ``vocab``;
* KV cache: ``layers``, ``batch``, ``length``, ``kv_heads``, ``kv``.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

from alignment.sharding import rules as rules_lib

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
LogicalAxes = tuple[str | None, ...]

_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
  "alignment_logical_axis_rules", default=None
)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Sets the logical→mesh rule table for :func:`constrain` in a block.

  The same rules are also installed as Flax's logical axis rules, so
  ``nnx.get_partition_spec`` resolves parameter names with them.

  Args:
    rules: ``[(logical_name, mesh_axis | (mesh_axes, ...) | None), ...]``;
      the first rule naming a logical axis wins.
  """
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)
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


def logical_to_mesh(
  logical_axes: Sequence[str | None],
  rules: Rules | None = None,
  mesh=None,
) -> PartitionSpec:
  """Maps logical axis names to a ``PartitionSpec`` on ``mesh``.

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: rule table; defaults to :func:`current_rules`.
    mesh: a ``Mesh`` or ``AbstractMesh``; defaults to the context mesh.

  Returns:
    The ``PartitionSpec`` (mesh axes of size 1, or already used by an
    earlier dimension, are dropped; unknown names are replicated).
  """
  rules = current_rules() if rules is None else rules
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  return rules_lib.logical_to_spec(tuple(logical_axes), rules, mesh)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """Sharding constraint on an activation by logical axis names.

  A no-op unless both a mesh (``jax.set_mesh``) and rules
  (:func:`axis_rules`) are set in the current context.

  Args:
    x: the activation.
    logical_axes: one logical name (or None) per dimension of ``x``.

  Returns:
    ``x``, constrained to the mapped ``PartitionSpec``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = current_rules()
  if mesh.empty or not rules:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(
      f"logical_axes {logical_axes} has {len(logical_axes)} names for an "
      f"array of rank {x.ndim}."
    )
  spec = logical_to_mesh(logical_axes, rules, mesh)
  if mesh.are_all_axes_explicit:
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def param_logical_axes(tree) -> object:
  """Pytree of logical-axis tuples (one per parameter) for an NNX state.

  Args:
    tree: an ``nnx.Module`` or ``nnx.State`` (abstract or concrete).

  Returns:
    A pytree like ``nnx.state(tree)`` whose leaves are tuples of logical
    names (``()`` for unannotated variables).
  """
  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

  def names(v):
    axes = v.get_metadata().get("out_sharding") or ()
    return tuple(axes)

  return jax.tree.map(
    names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def param_shardings(tree, mesh, rules: Rules | None = None):
  """``NamedSharding`` per parameter of an NNX module/state on ``mesh``.

  Args:
    tree: an ``nnx.Module`` or ``nnx.State`` (abstract or concrete).
    mesh: the device mesh.
    rules: rule table; defaults to :func:`current_rules`.

  Returns:
    A pytree like ``nnx.state(tree)`` with ``jax.sharding.NamedSharding``
    leaves.
  """
  rules = current_rules() if rules is None else rules
  axes = param_logical_axes(tree)
  return jax.tree.map(
    lambda a: jax.sharding.NamedSharding(mesh, logical_to_mesh(a, rules, mesh)),
    axes,
    is_leaf=lambda x: isinstance(x, tuple),
  )
