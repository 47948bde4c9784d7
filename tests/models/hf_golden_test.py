"""Our import of tiny Hugging Face models reproduces ``transformers``.

Goldens: ``tests/testdata/hf/`` (written by ``tests/oracles/hf_models.py``
with transformers 5.23 / torch 2.13): tiny random models of every supported
architecture (float16 weights), their float32 logits on fixed inputs (incl.
a left-padded batch with ``position_ids = cumsum(mask) - 1``) and 16 greedy
tokens from a left-padded prompt.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment.models import hf
from tests.models.tiny import DATA, FAST_COMPILE, HF_INPUTS, HF_MANIFEST

INPUTS = HF_INPUTS
CAUSAL = sorted(
  n
  for n, m in HF_MANIFEST["models"].items()
  if not m["class"].endswith("ForSequenceClassification")
)
NEW_TOKENS = 16


def _outputs(model):
  """Logits of both batches and greedy tokens, from one compiled function.

  The batches run as one ``[4, 10]`` call; generation feeds the prompt and
  then its own tokens one at a time through the KV cache (left padding
  enters the cache as masked slots), so the model is inlined twice.
  """
  graphdef, state = nnx.split(model)

  def run(state, inputs):
    m = nnx.merge(graphdef, state)
    tokens = jnp.concatenate([inputs["tokens"], inputs["padded_tokens"]])
    mask = jnp.concatenate(
      [jnp.ones_like(inputs["padded_mask"]), inputs["padded_mask"]]
    )
    logits = m(tokens, attention_mask=mask)
    prompt, prompt_mask = inputs["prompt"], inputs["prompt_mask"]
    b, length = prompt.shape
    steps = length + NEW_TOKENS - 1

    def body(t, carry):
      prev, cache, out = carry
      token = jnp.where(t < length, prompt[:, jnp.minimum(t, length - 1)], prev)
      real = jnp.where(
        t < length, prompt_mask[:, jnp.minimum(t, length - 1)], True
      )
      step, cache = m(
        token[:, None], attention_mask=real[:, None], cache=cache, decode=True
      )
      nxt = jnp.argmax(step[:, -1], -1).astype(jnp.int32)
      out = out.at[:, jnp.maximum(t - length + 1, 0)].set(
        jnp.where(t >= length - 1, nxt, 0)
      )
      return nxt, cache, out

    carry = (
      jnp.zeros((b,), jnp.int32),
      m.init_cache(b, steps),
      jnp.zeros((b, NEW_TOKENS), jnp.int32),
    )
    _, _, generated = jax.lax.fori_loop(0, steps, body, carry)
    return logits[:b], logits[b:], generated

  compiled = (
    jax.jit(run).lower(state, INPUTS).compile(compiler_options=FAST_COMPILE)
  )
  return jax.tree.map(np.asarray, compiled(state, INPUTS))


def _forward(model):
  """Outputs on the unpadded and the left-padded batch (one compile)."""
  graphdef, state = nnx.split(model)

  def run(state, inputs):
    m = nnx.merge(graphdef, state)
    return m(inputs["tokens"]), m(
      inputs["padded_tokens"], attention_mask=inputs["padded_mask"]
    )

  compiled = (
    jax.jit(run).lower(state, INPUTS).compile(compiler_options=FAST_COMPILE)
  )
  return jax.tree.map(np.asarray, compiled(state, INPUTS))


def _params(model):
  return {
    p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))
  }


class GoldenTest(parameterized.TestCase):
  @parameterized.parameters(*CAUSAL)
  def test_logits_and_greedy_tokens_match_transformers(self, name):
    config, model = hf.load_hf_checkpoint(DATA / name)
    self.assertEqual(
      config.architecture,
      name.split("_")[0]
      if name.startswith(("llama", "qwen", "mistral"))
      else name,
    )
    want = dict(np.load(DATA / name / "outputs.npz"))
    logits, padded, generated = _outputs(model)
    self.assertEqual(logits.dtype, np.float32)
    np.testing.assert_allclose(logits, want["logits"], atol=1e-4, rtol=0)
    mask = INPUTS["padded_mask"]
    np.testing.assert_allclose(
      padded[mask], want["padded_logits"][mask], atol=1e-4, rtol=0
    )
    np.testing.assert_array_equal(generated, want["generated"])

  def test_reward_model_matches_sequence_classifier(self):
    _, model = hf.load_hf_checkpoint(DATA / "llama_seqcls", kind="reward")
    want = dict(np.load(DATA / "llama_seqcls" / "outputs.npz"))
    got, got_padded = _forward(model)
    np.testing.assert_allclose(got, want["scores"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
      got_padded, want["padded_scores"], atol=1e-4, rtol=0
    )

  def test_bfloat16_params(self):
    config, model = hf.load_hf_checkpoint(
      DATA / "llama", param_dtype="bfloat16", dtype="bfloat16"
    )
    self.assertEqual(config.param_dtype, "bfloat16")
    dtypes = {v.dtype for v in _params(model).values()}
    self.assertEqual(dtypes, {np.dtype(jnp.bfloat16)})
    got, _ = _forward(model)
    self.assertEqual(got.dtype, jnp.float32)
    want = np.load(DATA / "llama" / "outputs.npz")["logits"]
    np.testing.assert_allclose(got, want, atol=0.15, rtol=0)


if __name__ == "__main__":
  absltest.main()
