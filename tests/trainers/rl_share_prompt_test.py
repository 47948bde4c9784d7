"""RL rollouts packed one prompt group per row (``config.rl.share_prompt``).

``_packing.pack_groups`` lays the ``G`` sampled rows of a prompt out as one
row ``[prompt | c_1 | ... | c_G]``; the model's hidden states, the policy
loss and its gradients must be those of the unpacked rows. Micro-batches of
an RL step keep every group whole (``common.split_microbatches(group=)``),
which group losses and the packing both need.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import models
from alignment.models.transformer import default_positions
from alignment.trainers import _packing, common, rl
from tests.trainers import _util

G, P, T = 3, 6, 5  # samples per prompt, prompt and completion columns
B = 4  # prompts (groups)
L = P + T
MODEL = models.get_preset("tiny")


def _rollout_rows(seed=0, *, pad_prompt=True):
  """Sampler-layout rows: left-padded prompts shared by each group of G,
  completions of T columns ending early (EOS, then padding) on some rows."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, 256, (B, P)).astype(np.int32)
  pmask = np.ones((B, P), bool)
  if pad_prompt:
    pmask[0, :2] = False  # left padding, different per group
    pmask[2, :1] = False
  prompts = np.where(pmask, prompts, MODEL.pad_id)
  comp = rng.integers(0, 256, (B * G, T)).astype(np.int32)
  cmask = np.ones((B * G, T), bool)
  for row, end in ((1, 2), (4, 4), (7, 1), (11, 3)):
    cmask[row, end:] = False
  comp = np.where(cmask, comp, MODEL.pad_id)
  tokens = np.concatenate([np.repeat(prompts, G, 0), comp], 1)
  attn = np.concatenate([np.repeat(pmask, G, 0), cmask], 1)
  loss_mask = np.concatenate([np.zeros((B * G, P - 1), bool), cmask], 1)
  return tokens, attn, loss_mask


class PackGroupsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("dense", {}),
    (
      "blockwise",
      dict(
        attention_impl="blockwise", attention_q_block=4, attention_kv_block=8
      ),
    ),
  )
  def test_hidden_states_equal_unpacked(self, overrides):
    cfg = models.get_preset("tiny", **overrides)
    model = models.build_model("causal_lm", cfg, rngs=nnx.Rngs(1))
    tokens, attn, _ = _rollout_rows()
    packed = _packing.pack_groups(tokens, attn, group=G, completion_len=T)
    self.assertEqual(packed.tokens.shape, (B, P + G * T))
    self.assertTrue(np.all(packed.valid))
    got = _packing.unpack_groups(
      model.hidden(packed.tokens, **packed.model_kwargs()), packed, G
    )
    want = model.hidden(jnp.asarray(tokens), attention_mask=jnp.asarray(attn))
    self.assertEqual(got.shape, want.shape)
    real = attn[..., None]
    np.testing.assert_allclose(
      np.where(real, got, 0), np.where(real, want, 0), atol=2e-5, rtol=1e-5
    )
    # Every real token keeps the position it has in its unpacked row.
    pos = _packing.unpack_groups(packed.positions[..., None], packed, G)
    unpacked_pos = default_positions(jnp.asarray(attn))
    np.testing.assert_array_equal(
      np.where(attn, pos[..., 0], -1), np.where(attn, unpacked_pos, -1)
    )

  def test_layout(self):
    tokens, attn, _ = _rollout_rows(pad_prompt=False)
    packed = _packing.pack_groups(tokens, attn, group=G, completion_len=T)
    # Group 1: its prompt once, then its three completions in row order.
    np.testing.assert_array_equal(packed.tokens[1, :P], tokens[G, :P])
    for g in range(G):
      np.testing.assert_array_equal(
        packed.tokens[1, P + g * T : P + (g + 1) * T], tokens[G + g, P:]
      )
    np.testing.assert_array_equal(
      packed.segment_ids[0], [1] * P + [2] * T + [3] * T + [4] * T
    )
    np.testing.assert_array_equal(packed.prefix_ids[0], [0] * P + [1] * G * T)

  def test_group_with_different_prompts_is_nan(self):
    model = models.build_model("causal_lm", MODEL, rngs=nnx.Rngs(1))
    tokens, attn, _ = _rollout_rows()
    tokens[G + 1, P - 1] = (tokens[G + 1, P - 1] + 1) % 256  # group 1
    attn_bad = attn.copy()
    attn_bad[2 * G + 2, 0] = True  # group 2: a different prompt mask
    for toks, mask, group in (
      (tokens, attn, 1),
      (_rollout_rows()[0], attn_bad, 2),
    ):
      packed = _packing.pack_groups(toks, mask, group=G, completion_len=T)
      np.testing.assert_array_equal(packed.valid, np.arange(B) != group)
      hidden = _packing.unpack_groups(
        model.hidden(packed.tokens, **packed.model_kwargs()), packed, G
      )
      nan_rows = np.isnan(np.asarray(hidden)).all(axis=(1, 2))
      np.testing.assert_array_equal(nan_rows, np.arange(B * G) // G == group)
      self.assertTrue(np.isfinite(np.asarray(hidden)[~nan_rows]).all())

  def test_shape_errors(self):
    tokens, attn, _ = _rollout_rows()
    with self.assertRaisesRegex(ValueError, "do not split into groups of 5"):
      _packing.pack_groups(tokens, attn, group=5, completion_len=T)
    for bad in (0, L):
      with self.assertRaisesRegex(ValueError, "completion_len"):
        _packing.pack_groups(tokens, attn, group=G, completion_len=bad)


def _config(loss="grpo", *, share=True, microbatches=1):
  config = _util.load_config("rl", f"loss={loss},advantage=grpo,runlocal")
  config.rl.num_generations = G
  config.rl.max_new_tokens = T
  config.rl.share_prompt = share
  config.microbatches = microbatches
  config.kl.mode = "loss"
  config.kl.beta = 0.05
  config.loss_aggregation = "token_mean"
  return config


class PolicyLossTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.graphdef, params, cls.rest = _util.split_model("causal_lm", MODEL)
    cls.params = {"policy": params}
    tokens, attn, mask = _rollout_rows(3)
    rng = np.random.default_rng(4)
    ref = np.where(mask, -rng.uniform(3, 7, mask.shape), 0.0)
    rewards = rng.normal(size=(B, G)).astype(np.float32)
    adv = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(
      1, keepdims=True
    )
    cls.rollout = rl.Rollout(
      jnp.asarray(tokens),
      jnp.asarray(attn),
      jnp.asarray(mask),
      jnp.asarray(ref - 0.1, jnp.float32),
      None,
      jnp.asarray(ref, jnp.float32),
      jnp.asarray(adv.reshape(-1), jnp.float32),
      jnp.asarray(rewards.reshape(-1)),
    )

  def _value_and_grad(self, config):
    loss_fn = rl.make_policy_loss(self.graphdef, self.rest, None, None, config)
    fn = jax.jit(
      lambda p, ro: common.accumulate_gradients(
        loss_fn,
        p,
        None,
        ro,
        jax.random.key(0),
        config.microbatches,
        config.rl.num_generations,
      )
    )
    loss, grads, _, metrics = fn(self.params, self.rollout)
    return loss, grads, metrics

  def test_shared_prompt_kwargs(self):
    self.assertEqual(
      rl.shared_prompt_kwargs(_config()), {"group": G, "completion_len": T}
    )
    self.assertEqual(rl.shared_prompt_kwargs(_config(share=False)), {})
    config = _config()
    config.rl.num_generations = 1
    self.assertEqual(rl.shared_prompt_kwargs(config), {})

  @parameterized.parameters("grpo", "dapo", "copg")
  def test_loss_and_gradients_equal_unpacked(self, loss):
    plain = self._value_and_grad(_config(loss, share=False))
    packed = self._value_and_grad(_config(loss))
    self.assertTrue(np.isfinite(float(plain[0])))
    np.testing.assert_allclose(packed[0], plain[0], rtol=1e-5, atol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      packed[1],
      plain[1],
    )
    for key in plain[2]:
      np.testing.assert_allclose(
        packed[2][key], plain[2][key], rtol=1e-4, atol=1e-6
      )

  @parameterized.parameters(("copg", True), ("copg", False), ("grpo", True))
  def test_microbatches_keep_groups(self, loss, share):
    # copg is a group loss: a micro-batch mixing two groups' rows would
    # compare samples of different prompts (the strided split did).
    whole = self._value_and_grad(_config(loss, share=share))
    split = self._value_and_grad(_config(loss, share=share, microbatches=2))
    np.testing.assert_allclose(split[0], whole[0], rtol=1e-5, atol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      split[1],
      whole[1],
    )

  def test_prompt_groups_must_split_into_parts(self):
    config = _config(microbatches=3)
    config.batch_size = 8
    with self.assertRaisesRegex(
      ValueError, r"config.batch_size=8 .*num_minibatches=1 x .*microbatches=3"
    ):
      rl._check(config)  # noqa: SLF001
    config.batch_size = 6
    rl._check(config)  # noqa: SLF001


class SplitMicrobatchesTest(absltest.TestCase):
  def test_groups_stay_together_strided(self):
    rows = jnp.arange(12)
    micro = common.split_microbatches({"x": rows}, 2, group=3)["x"]
    np.testing.assert_array_equal(
      micro, [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    )
    plain = common.split_microbatches({"x": rows}, 2)["x"]
    np.testing.assert_array_equal(
      plain, [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    )
    with self.assertRaisesRegex(
      ValueError, "4 micro-batches of whole groups of 2 rows"
    ):
      common.split_microbatches({"x": rows}, 4, group=2)


if __name__ == "__main__":
  absltest.main()
