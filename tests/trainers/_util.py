"""Helpers shared by the trainer, config and launch tests.

* :func:`load_config` builds ``configs/<name>.py`` the way ``alignment.main``
  does (by path, ``get_config(arg)``).
* :func:`compilation_cache` turns on JAX's persistent compilation cache for
  the duration of a test module, so that runs compiling the same program
  (the reference model, a resumed run, a second seed) compile it once.
  Cached executables are the compiler's output for the same program, so
  results are unchanged; only wall time is saved.
* :func:`subprocess_env` is the environment for ``python -m alignment.main``
  child processes: one CPU device, the same persistent cache.
* :func:`split_model` builds a model and splits it as the trainers do.
"""

import atexit
import contextlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest
from jax._src import compilation_cache as _jax_cc

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
CONFIG_NAMES = (
  "sft",
  "preference",
  "reward_model",
  "rl",
  "online_preference",
  "pipeline",
)

_CACHE_DIR: str | None = None


def load_module(path: str | os.PathLike, name: str | None = None):
  """Imports a Python file by path (config files, launch/sweep.py)."""
  path = pathlib.Path(path)
  name = name or f"_loaded_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_module(name: str):
  return load_module(CONFIGS / f"{name}.py", f"_config_{name}")


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py:get_config(arg)`` (unlocked)."""
  return config_module(name).get_config(arg)


def split_model(kind: str, config, seed: int = 0, **kwargs):
  """``models.build_model(kind, config, ...)`` split as the trainers split
  it: ``(graphdef, params, rest)`` (``nnx.Param`` leaves, then the rest)."""
  from flax import nnx  # noqa: PLC0415

  from alignment import models  # noqa: PLC0415

  model = models.build_model(kind, config, rngs=nnx.Rngs(seed), **kwargs)
  return nnx.split(model, nnx.Param, ...)


def rl_config(advantage: str, **reward):
  """``configs/rl.py`` with ``advantage=<advantage>,runlocal``, then
  ``config.reward[k] = v`` for each keyword."""
  config = load_config("rl", f"advantage={advantage},runlocal")
  for k, v in reward.items():
    config.reward[k] = v
  return config


def np_sigmoid(x):
  """float64 logistic function (test oracles)."""
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


class WorkdirCase(absltest.TestCase):
  """Tests sharing one temporary directory (``self._tmp.name``) and the
  persistent compilation cache for the whole class."""

  prefix = "alignment-test-"

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory(prefix=cls.prefix)
    cls._cache = compilation_cache()
    cls._cache.__enter__()

  @classmethod
  def tearDownClass(cls):
    cls._cache.__exit__(None, None, None)
    cls._tmp.cleanup()
    super().tearDownClass()


def cache_dir() -> str:
  """A per-process directory for JAX's persistent compilation cache."""
  global _CACHE_DIR
  if _CACHE_DIR is None:
    _CACHE_DIR = tempfile.mkdtemp(prefix="alignment-test-jaxcache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  return _CACHE_DIR


@contextlib.contextmanager
def compilation_cache():
  """Enables the persistent compilation cache; restores the settings after."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _jax_cc.reset_cache()
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    _jax_cc.reset_cache()


def subprocess_env(**extra) -> dict:
  """Environment for a child ``python -m alignment.main`` (1 CPU device)."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_COMPILATION_CACHE_DIR=cache_dir(),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    TF_CPP_MIN_LOG_LEVEL="3",
    HF_HUB_OFFLINE="1",
    PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH", "")] if p]
    ),
  )
  env.update(extra)
  return env


PYTHON = sys.executable
