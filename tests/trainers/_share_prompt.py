"""Shared by the ``config.share_prompt`` tests (preference, reward model):
a batch of pairs in the data layer's layouts and the packed-vs-unpacked
loss, metrics and gradients of one jitted function."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment import models
from alignment.data import batches as data_batches
from tests.models import tiny

MODEL = models.get_preset("tiny", n_layers=1)
C = 9  # runlocal data.max_completion_len


def pairs():
  """Right-padded pairs as the data layer makes them (prompt, completion
  with EOS, padding) of different prompt and completion lengths, and one
  online-style pair with a left-padded prompt."""
  rng = np.random.default_rng(0)
  b, length = 4, 14
  layout = [  # (left pads, prompt, chosen, rejected)
    (0, 5, 9, 3),
    (0, 3, 2, 9),
    (0, 1, 6, 6),
    (2, 3, 4, 1),
  ]
  arrays = {}
  for side in ("chosen", "rejected"):
    arrays[side] = [
      np.zeros((b, length), np.int32),
      np.zeros((b, length), bool),
      np.zeros((b, length), bool),
    ]
  for i, (pad, p, nc, nr) in enumerate(layout):
    prompt = rng.integers(3, 200, p)
    for side, n in (("chosen", nc), ("rejected", nr)):
      tokens, attn, comp = arrays[side]
      seq = np.concatenate([prompt, rng.integers(3, 200, n)])
      tokens[i, pad : pad + len(seq)] = seq
      attn[i, pad : pad + len(seq)] = True
      comp[i, pad + p : pad + len(seq)] = True
  return data_batches.PreferenceBatch(
    *arrays["chosen"],
    *arrays["rejected"],
    np.array([True, True, True, False]),
  )


def split(kind, seed, **kwargs):
  module = models.build_model(kind, MODEL, rngs=nnx.Rngs(seed), **kwargs)
  return nnx.split(module, nnx.Param, ...)


def value_and_grad(make, graphdef, rest, params, frozen, batch):
  """Loss, metrics and parameter gradients, packed and unpacked, from one
  jitted function."""
  fns = {share: make(share) for share in (True, False)}

  def run(params, frozen, batch):
    out = {}
    for share, loss_fn in fns.items():

      def scalar(p, loss_fn=loss_fn):
        wm, metrics = loss_fn(p, frozen, batch, jax.random.key(0))
        return wm.value(), metrics

      (loss, metrics), grads = jax.value_and_grad(scalar, has_aux=True)(params)
      out[share] = (loss, metrics, grads)
    return out

  args = (params, frozen, batch)
  with jax.default_matmul_precision("highest"):
    return tiny.compile_fast(run, *args)(*args)


def assert_same(test, out):
  (loss, metrics, grads), (loss0, metrics0, grads0) = out[True], out[False]
  test.assertTrue(np.isfinite(loss))
  np.testing.assert_allclose(loss, loss0, rtol=1e-5, atol=1e-6)
  test.assertEqual(set(metrics), set(metrics0))
  for k in metrics:
    np.testing.assert_allclose(
      metrics[k], metrics0[k], rtol=1e-5, atol=1e-5, err_msg=k
    )
  norm = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0))
  test.assertGreater(norm, 0.0)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    grads,
    grads0,
  )
