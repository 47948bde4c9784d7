"""Device meshes from the config: ``config.mesh = [("data", -1), ...]``."""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MeshSpec = Sequence[tuple[str, int]]


def resolve_mesh_shape(spec: MeshSpec, num_devices: int) -> dict[str, int]:
  """Resolves at most one ``-1`` axis so the sizes multiply to the devices.

  Args:
    spec: ``[(axis_name, size), ...]``; one size may be -1 ("the rest").
    num_devices: how many devices the mesh must cover.

  Returns:
    ``{axis_name: size}`` in the spec's order.

  Raises:
    ValueError: naming the spec and the device count when they don't fit.
  """
  spec = [(str(name), int(size)) for name, size in spec]
  names = [n for n, _ in spec]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh has a repeated axis name: {names}.")
  free = [n for n, s in spec if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh may have at most one -1 axis, got {spec}.")
  bad = [(n, s) for n, s in spec if s == 0 or s < -1]
  if bad:
    raise ValueError(f"config.mesh axis sizes must be >= 1 or -1, got {bad}.")
  fixed = int(np.prod([s for _, s in spec if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh={spec}: the fixed axes multiply to {fixed}, which "
        f"does not divide the {num_devices} available devices."
      )
    sizes = {n: (num_devices // fixed if s == -1 else s) for n, s in spec}
  else:
    if fixed != num_devices:
      raise ValueError(
        f"config.mesh={spec} has {fixed} devices but {num_devices} are "
        "available; make one axis -1 or change the sizes."
      )
    sizes = dict(spec)
  return sizes


def make_mesh(
  spec: MeshSpec, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Builds a mesh (GSPMD auto axes) from ``config.mesh``.

  Device order follows ``jax.make_mesh`` (topology-aware on TPU, process-major
  on multi-host CPU/GPU), so the ``data`` axis spans hosts and the model axes
  stay within a host where possible.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(spec, len(devices))
  names = tuple(sizes)
  shape = tuple(sizes.values())
  axis_types = (AxisType.Auto,) * len(names)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), names, axis_types=axis_types)
