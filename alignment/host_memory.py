"""Host allocator setting: keep freed pages mapped between train steps.

XLA:CPU allocates the temporaries of every executable run (activations,
gradients, optimiser intermediates: hundreds of MB for a 40M-parameter
step) and frees them when the run ends. glibc's ``malloc`` serves blocks
above 32 MiB, and every block of a thread off the main arena, with a fresh
``mmap`` and returns them with ``munmap`` on ``free``, so each step faults
all of its temporaries in again page by page: 79k minor faults (310 MiB)
and a quarter of a CPU second per small reward-model step on the 2-core
machine the benchmarks ran on, about a fifth of the step's wall time.
Torch steps pay the same (58k faults per step of TRL's reward model).

``keep`` sets glibc's ``mallopt`` so that freed memory stays with the
process: one arena (``M_ARENA_MAX=1``), no ``mmap``-served blocks
(``M_MMAP_MAX=0``), no trimming of the heap top below 2 GiB
(``M_TRIM_THRESHOLD``) and 256 MiB of padding on each heap growth
(``M_TOP_PAD``). After the first step the temporaries reuse pages already
mapped: no faults. The cost is resident memory: the process keeps its
high-water mark, which grows by one more set of temporaries when a step's
are allocated before the last step's are freed.

Opt-in: the default is ``system``. The keeping setting pays off when a
step's temporaries are large (the small reward-model step: 0.79 → 0.62 s
in the benchmark probe) and costs where they are small and many threads
allocate little blocks through the one arena (``make run``'s tiny-model
pipeline took 109 / 136 s with it against 102 / 126 s without, in two
alternating pairs).

It must run before other threads allocate (the arena limit binds only then):
``alignment.main`` calls :func:`configure` first thing, with the mode of
the ``ALIGNMENT_MALLOC`` environment variable:

* ``system`` (default): the C library's defaults;
* ``auto``: ``keep`` when JAX will run on the CPU
  (``JAX_PLATFORMS=cpu``, or no TPU / GPU plugin installed), else
  ``system`` (accelerator hosts keep the stock allocator: their steps'
  temporaries live on the device, and many host threads sharing one arena
  would contend);
* ``keep``: as above (needs glibc; an error elsewhere).

:func:`keep_env` gives the same setting as environment variables for a
process started by someone else (the benchmark harness applies it to every
framework alike). Other allocators (``LD_PRELOAD`` jemalloc with
``dirty_decay_ms:-1``) achieve the same; ``auto`` leaves a preloaded
allocator alone.
"""

import ctypes
import importlib.util
import os
import platform

from absl import logging

ENV_VAR = "ALIGNMENT_MALLOC"
MODES = ("auto", "keep", "system")

# (mallopt parameter, its number in glibc's malloc.h, glibc's environment
# variable for it, value).
KEEP_SETTINGS = (
  ("M_TOP_PAD", -2, "MALLOC_TOP_PAD_", 1 << 28),
  ("M_TRIM_THRESHOLD", -1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),
  ("M_MMAP_MAX", -4, "MALLOC_MMAP_MAX_", 0),
  ("M_ARENA_MAX", -8, "MALLOC_ARENA_MAX", 1),
)

_ACCELERATOR_MODULES = ("libtpu", "jax_plugins")
"""Installed by TPU (``libtpu``) and PJRT GPU plugins (``jax_plugins``:
``jax-cuda12-plugin``, ``jax-rocm*-plugin``)."""


def keep_env() -> dict[str, str]:
  """glibc environment variables equivalent to ``keep``, for a child
  process (read by glibc at start-up, so they bind before any thread)."""
  return {var: str(value) for _, _, var, value in KEEP_SETTINGS}


def _requested(mode: str | None) -> str:
  """``mode``, else ``$ALIGNMENT_MALLOC``, else ``system``; normalised."""
  if mode is None:
    mode = os.environ.get(ENV_VAR, "")
  return mode.strip().lower() or "system"


def resolve(mode: str | None = None) -> str:
  """``keep`` or ``system`` for ``mode`` (default: ``$ALIGNMENT_MALLOC``,
  else ``system``).

  Raises:
    ValueError: for a mode that is not one of :data:`MODES`, naming the
      environment variable and the valid choices.
  """
  mode = _requested(mode)
  if mode not in MODES:
    raise ValueError(
      f"{ENV_VAR}={mode!r}; valid choices are {', '.join(MODES)}."
    )
  if mode != "auto":
    return mode
  if os.environ.get("LD_PRELOAD"):
    return "system"  # a preloaded allocator (jemalloc, tcmalloc) is chosen
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    names = {p.strip().lower() for p in platforms.split(",") if p.strip()}
    return "keep" if names == {"cpu"} else "system"
  for module in _ACCELERATOR_MODULES:
    if importlib.util.find_spec(module) is not None:
      return "system"
  return "keep"


def _mallopt():
  if platform.libc_ver()[0] != "glibc":
    return None
  fn = getattr(ctypes.CDLL(None), "mallopt", None)
  if fn is not None:
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
  return fn


def configure(mode: str | None = None) -> str:
  """Applies ``mode`` (see the module docstring) and returns the effective
  one: ``keep`` or ``system``.

  Call before JAX (or anything else) starts threads: the arena limit only
  binds threads that have not allocated yet.

  Raises:
    ValueError: a bad mode (names ``ALIGNMENT_MALLOC`` and the choices).
    RuntimeError: ``keep`` asked for explicitly where glibc's ``mallopt``
      is unavailable or refuses a setting.
  """
  explicit = _requested(mode)
  effective = resolve(explicit)
  if effective == "system":
    logging.info("host malloc: system defaults (%s=%s)", ENV_VAR, explicit)
    return "system"
  mallopt = _mallopt()
  if mallopt is None:
    if explicit == "keep":
      raise RuntimeError(
        f"{ENV_VAR}=keep needs glibc's mallopt; this C library "
        f"({platform.libc_ver()[0] or platform.system()}) has none. Use "
        f"{ENV_VAR}=system (or auto)."
      )
    logging.info("host malloc: system defaults (no glibc mallopt)")
    return "system"
  for name, param, _, value in KEEP_SETTINGS:
    if mallopt(param, value) != 1:
      raise RuntimeError(
        f"{ENV_VAR}={explicit}: glibc mallopt({name}, {value}) failed; "
        f"use {ENV_VAR}=system."
      )
  logging.info(
    "host malloc: keep (%s)",
    ", ".join(f"{n}={v}" for n, _, _, v in KEEP_SETTINGS),
  )
  return "keep"
