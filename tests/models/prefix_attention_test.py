"""`Transformer` with ``prefix_ids``: completions packed after a shared prompt.

One row ``[prompt | completion 1 | ... | completion G | pad]`` with segment
ids ``1, 2, ..., G + 1`` and prefix ids ``0, 1, ..., 1`` must give every
real token the hidden state it has in its own unpacked row ``[prompt |
completion g]`` (left-padded prompts, RoPE with a sliding window and
learned positions alike), no completion may see a sibling, and the default
positions continue from the prompt.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment.models import transformer
from tests.models import tiny

PAD, PROMPT, COMPLETIONS = 2, 5, (4, 6, 3)  # left pads, prompt, completions


def _rows(rng, vocab):
  """Unpacked ``[pad | prompt | completion g | pad]`` rows and the packed
  row (tokens, mask, positions, segments, prefixes) plus, per completion,
  the packed index of each unpacked position."""
  width = PAD + PROMPT + max(COMPLETIONS)
  prompt = rng.integers(3, vocab, PROMPT)
  comps = [rng.integers(3, vocab, n) for n in COMPLETIONS]
  tokens = np.zeros((len(comps), width), np.int32)
  attn = np.zeros((len(comps), width), bool)
  for g, c in enumerate(comps):
    seq = np.concatenate([prompt, c])
    tokens[g, PAD : PAD + len(seq)] = seq
    attn[g, PAD : PAD + len(seq)] = True
  packed = [0] * PAD + list(prompt)
  p_attn = [False] * PAD + [True] * PROMPT
  p_pos = [0] * PAD + list(range(PROMPT))
  seg = [1] * (PAD + PROMPT)
  pre = [0] * (PAD + PROMPT)
  index = []
  for g, c in enumerate(comps):
    start = len(packed)
    idx = list(range(PAD + PROMPT))
    idx += [start + k for k in range(len(c))]
    idx += [start] * (width - len(idx))  # padding: any index
    index.append(idx)
    packed += list(c)
    p_attn += [True] * len(c)
    p_pos += list(range(PROMPT, PROMPT + len(c)))
    seg += [g + 2] * len(c)
    pre += [1] * len(c)
  packed += [0, 0]  # trailing padding (segment 0, no prefix)
  p_attn += [False, False]
  p_pos += [0, 0]
  seg += [0, 0]
  pre += [0, 0]

  def row(x, dtype):
    return np.asarray([x], dtype)

  return (
    tokens,
    attn,
    row(packed, np.int32),
    row(p_attn, bool),
    row(p_pos, np.int32),
    row(seg, np.int32),
    row(pre, np.int32),
    np.asarray(index, np.int32),
  )


def _forwards(config, tokens, attn, packed, kwargs, perturbed):
  """Unpacked hidden states; packed ones with explicit positions (original
  and with ``packed`` replaced by ``perturbed``) and default positions."""

  def run(tokens, attn, packed, kwargs, perturbed):
    model = transformer.Transformer(config, rngs=nnx.Rngs(0))
    default = {k: v for k, v in kwargs.items() if k != "positions"}
    return (
      model(tokens, attention_mask=attn),
      model(packed, **kwargs),
      model(perturbed, **kwargs),
      model(packed, **default),
    )

  args = (tokens, attn, packed, kwargs, perturbed)
  with jax.default_matmul_precision("highest"):
    return tiny.compile_fast(run, *args)(*args)


class PrefixAttentionTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("rope_sliding_window", tiny.ROPE), ("learned", tiny.LEARNED)
  )
  def test_packed_equals_unpacked_and_siblings_are_invisible(self, config):
    self.assertIsNotNone(tiny.ROPE.sliding_window)
    rng = np.random.default_rng(0)
    tokens, attn, packed, p_attn, pos, seg, pre, index = _rows(
      rng, config.vocab_size
    )
    # Change the first completion: the prompt and the other completions
    # must not move (no token sees a sibling).
    first = seg[0] == 2
    perturbed = np.where(first, (packed + 7) % config.vocab_size, packed)
    kwargs = {
      "attention_mask": p_attn,
      "positions": pos,
      "segment_ids": seg,
      "prefix_ids": pre,
    }
    unpacked, got, got_perturbed, got_default = (
      np.asarray(x)
      for x in _forwards(config, tokens, attn, packed, kwargs, perturbed)
    )
    for g in range(len(COMPLETIONS)):
      real = attn[g]
      for h in (got, got_default):  # explicit and default positions
        np.testing.assert_allclose(
          h[0, index[g]][real], unpacked[g][real], rtol=1e-5, atol=1e-5
        )
    others = p_attn[0] & ~first
    np.testing.assert_array_equal(got_perturbed[0, others], got[0, others])
    self.assertGreater(
      np.abs(got_perturbed[0, first] - got[0, first]).max(), 1e-3
    )

  def test_prefix_mask_and_positions(self):
    seg = jnp.asarray([[1, 1, 2, 2, 3, 0]])
    pre = jnp.asarray([[0, 0, 1, 1, 1, 0]])
    allowed = np.asarray(transformer.shared_prefix_allowed(seg, pre))[0]
    causal = np.tril(np.ones((6, 6), bool))
    want = np.array(
      [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
      ],
      bool,
    )
    np.testing.assert_array_equal(allowed, want)
    self.assertFalse(np.any((allowed & causal)[4, 2:4]))  # sibling hidden
    # A prefix id that does not occur admits nothing more.
    np.testing.assert_array_equal(
      np.asarray(transformer.shared_prefix_allowed(seg, pre * 9))[0],
      np.asarray(transformer.shared_prefix_allowed(seg))[0],
    )
    attn = jnp.asarray([[False, True, True, True, True, False]])
    lengths = transformer.prefix_lengths(attn, seg, pre)
    np.testing.assert_array_equal(lengths, [[0, 0, 1, 1, 1, 0]])

  def test_prefix_ids_need_segments_and_no_cache(self):
    model = nnx.eval_shape(
      lambda: transformer.Transformer(tiny.ROPE, rngs=nnx.Rngs(0))
    )
    tokens = jnp.ones((1, 4), jnp.int32)
    ids = jnp.ones((1, 4), jnp.int32)
    with self.assertRaisesRegex(ValueError, "prefix_ids need segment_ids"):
      model(tokens, prefix_ids=ids)
    cache = model.init_cache(1, 8)
    with self.assertRaisesRegex(ValueError, "KV cache"):
      model(tokens, cache=cache, prefix_ids=ids)


if __name__ == "__main__":
  absltest.main()
