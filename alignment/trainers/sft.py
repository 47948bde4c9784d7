"""Supervised fine-tuning: token-mean NLL on completion tokens."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from alignment import ops
from alignment.trainers import _data, _lm, _setup


def make_loss_fn(graphdef, rest, *, chunk_size: int):
  """``loss_fn(params, frozen, batch, rng)``: NLL of completion tokens."""

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    model = nnx.merge(graphdef, params, rest)
    token_logps, mask = _lm.completion_token_logps(
      model,
      batch.tokens,
      batch.attention_mask,
      batch.completion_mask,
      chunk_size=chunk_size,
      segment_ids=getattr(batch, "segment_ids", None),
    )
    mask = jnp.logical_and(mask, batch.example_mask[:, None])
    wm = ops.aggregate_token_loss(-token_logps, mask, mode="token_mean")
    return wm, {"nll": wm.value(), "token_accuracy_proxy": jnp.exp(-wm.value())}

  return loss_fn


@_setup.in_mesh_context
def run(config: ml_collections.ConfigDict, workdir: str):
  """Trains ``config.total_steps`` SFT steps; returns the final params."""
  tokenizer = _data.tokenizer_of(config)
  run_ = _setup.setup_run(
    config, workdir, kind="causal_lm", total_steps=config.total_steps
  )
  batches = _data.iterator(config, "sft", tokenizer, run_)
  loss_fn = make_loss_fn(
    run_.model.graphdef,
    run_.model.rest,
    chunk_size=config.get("logps_chunk_size", 2048),
  )
  state, history = _setup.train_offline(
    config,
    run_,
    loss_fn,
    batches,
    frozen=None,
    name="sft",
    console_keys=("loss",),
  )
  _setup.finish(run_, state, history, kind="causal_lm", name="sft")
  return state, run_
