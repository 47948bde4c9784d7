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

Mesh axes are the config's (``data``, ``fsdp``, ``tensor``; optionally
``sequence``, opted into by a rule ``("length", "sequence")`` ahead of the
defaults, which splits every activation's token dimension; attention then
gathers keys and values along it). Ensembles' ``members`` follow their own
rule (replicated by default; e.g. ``("members", "fsdp")`` gives each fsdp
group whole members). The trainers run inside
:func:`activation_context` of their mesh and rules.
"""

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from alignment.sharding import rules as rules_lib
from alignment.sharding.rules import (
  activation_context,
  axis_rules,
  current_rules,
)

__all__ = [
  "activation_context",
  "axis_rules",
  "constrain",
  "current_rules",
  "logical_to_mesh",
  "param_logical_axes",
  "param_shardings",
]

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
LogicalAxes = tuple[str | None, ...]


def logical_to_mesh(
  logical_axes: Sequence[str | None],
  rules: Rules | None = None,
  mesh=None,
  shape: Sequence[int] | None = None,
) -> PartitionSpec:
  """Maps logical axis names to a ``PartitionSpec`` on ``mesh``.

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: rule table; defaults to :func:`current_rules`.
    mesh: a ``Mesh`` or ``AbstractMesh``; defaults to the context mesh.
    shape: the array's shape, if known (mesh axes that do not divide a
      dimension are skipped for it).

  Returns:
    The ``PartitionSpec`` (mesh axes of size 1, or already used by an
    earlier dimension, are dropped; unknown names are replicated).
  """
  rules = current_rules() if rules is None else rules
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  return rules_lib.logical_to_spec(tuple(logical_axes), rules, mesh, shape)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """Sharding constraint on an activation by logical axis names.

  A no-op unless both a mesh (``jax.set_mesh``) and rules
  (:func:`axis_rules`) are set in the current context
  (:func:`activation_context` sets both). A mesh axis that does not divide
  the dimension its rule maps it to is left out for that dimension.

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
  spec = logical_to_mesh(logical_axes, rules, mesh, x.shape)
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

  A mesh axis that does not divide the dimension its rule maps it to is
  left out for that dimension (see `alignment.sharding.logical_to_spec`).

  Args:
    tree: an ``nnx.Module`` or ``nnx.State`` (abstract or concrete).
    mesh: the device mesh.
    rules: rule table; defaults to :func:`current_rules`.

  Returns:
    A pytree like ``nnx.state(tree)`` with ``jax.sharding.NamedSharding``
    leaves.
  """
  rules = current_rules() if rules is None else rules
  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

  def one(v):
    axes = tuple(v.get_metadata().get("out_sharding") or ())
    spec = logical_to_mesh(axes, rules, mesh, tuple(v.shape) if axes else None)
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
