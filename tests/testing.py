"""Helpers shared by the tests: sharding, gradients, NaN padding."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(n: int = 8) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over the first ``n`` devices."""
  return jax.make_mesh(
    (n,),
    ("data",),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:n],
  )


def shard_leading(args, n: int = 8):
  """Places every array of a pytree sharded along its leading axis."""
  mesh = data_mesh(n)

  def put(x):
    x = jnp.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, P()))
    return jax.device_put(x, NamedSharding(mesh, P("data")))

  return jax.tree.map(put, args)


def assert_sharded_equals_unsharded(fn, args, *, n=8, rtol=1e-6, atol=1e-6):
  """``jit(fn)(*args)`` gives the same pytree sharded over ``n`` devices."""
  jitted = jax.jit(fn)
  want = jitted(*args)
  got = jitted(*shard_leading(args, n))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=rtol, atol=atol
    ),
    want,
    got,
  )


def grads(fn, args, argnums):
  """Gradient of ``sum(fn(*args))`` (first output if a tuple) w.r.t. args."""

  def scalar(*a):
    out = fn(*a)
    if isinstance(out, tuple):
      out = out[0]
    return jnp.sum(out)

  return jax.jit(jax.grad(scalar, argnums=argnums))(*args)


def with_nan_padding(x, mask):
  """Returns ``x`` with NaN written wherever ``mask`` is False."""
  return np.where(np.asarray(mask), np.asarray(x), np.nan).astype(
    np.asarray(x).dtype
  )
