"""Trainer-side data glue: tokenizer, iterators, device placement."""

from collections.abc import Iterator

import jax

from alignment import data as data_lib
from alignment import sharding as sharding_lib

_MAKERS = {
  "sft": "make_sft_iterator",
  "preference": "make_preference_iterator",
  "unpaired": "make_unpaired_iterator",
  "ranked": "make_ranked_iterator",
  "step": "make_step_iterator",
  "prompt": "make_prompt_iterator",
}


def tokenizer_of(config):
  return data_lib.load_tokenizer(config.get("tokenizer", "byte"))


def per_process_batch(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(
      f"config.batch_size={global_batch} is not divisible by the {n} processes."
    )
  return global_batch // n


def iterator(
  config,
  kind: str,
  tokenizer,
  run=None,
  *,
  data_config=None,
  batch_size: int | None = None,
  seed: int | None = None,
):
  """The configured iterator of ``kind``, restored to the run's data state."""
  if kind not in _MAKERS:
    raise ValueError(f"unknown data kind {kind!r}; valid: {sorted(_MAKERS)}")
  maker = getattr(data_lib, _MAKERS[kind])
  it = maker(
    data_config if data_config is not None else config.data,
    tokenizer,
    batch_size=per_process_batch(batch_size or config.batch_size),
    seed=config.seed if seed is None else seed,
  )
  if run is not None and run.data_state:
    it.set_state(run.data_state)
  return it


def device_batches(batches: Iterator, run) -> Iterator:
  """Host NumPy batches → global arrays sharded over the mesh's batch axes."""
  for batch in batches:
    yield sharding_lib.shard_batch(batch, run.mesh, run.rules)


def device_batch(batch, run):
  """One host batch → global arrays on the run's mesh."""
  return sharding_lib.shard_batch(batch, run.mesh, run.rules)
