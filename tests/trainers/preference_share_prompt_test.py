"""``config.share_prompt`` (preference trainer): one packed row per pair.

Each pair is read as ``[prompt | chosen | rejected]`` (`trainers._packing`).
The packed step must be the unpacked one: the same loss, metrics and
parameter gradients (1e-5, float32) for DPO (sequence log-probs of policy
and reference) and SparsePO (per-token log-probs, the reference's captured
activations, and the per-token KL from both models' hidden states). Pairs
whose prompts differ fail on the host with a clear error and give NaN in
the jitted step. The 8-device equality of the packed DPO and reward-model
steps is ``tests/trainers/sharding_test.py`` (they run the default,
packed); the reward-model side is ``reward_model_share_prompt_test.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from alignment.trainers import _packing, preference
from tests.trainers import _share_prompt as sp
from tests.trainers import _util

_PACK = jax.jit(_packing.pack_batch, static_argnames="completion_len")
_UNPACK = jax.jit(_packing.unpack)


class PreferenceSharePromptTest(parameterized.TestCase):
  def test_layout(self):
    batch = sp.pairs()
    packed = _PACK(batch, completion_len=sp.C)
    self.assertEqual(packed.tokens.shape, (4, 14 + sp.C))
    np.testing.assert_array_equal(packed.valid, [True] * 4)
    # Pair 1: prompt 3, chosen 2, rejected 9 tokens.
    seg = np.asarray(packed.segment_ids[1])
    np.testing.assert_array_equal(seg[:14], [1] * 3 + [2] * 2 + [3] * 9)
    np.testing.assert_array_equal(seg[14:], 0)
    pre = np.asarray(packed.prefix_ids[1])
    np.testing.assert_array_equal(pre[:14], [0] * 3 + [1] * 11)
    pos = np.asarray(packed.positions[1])
    np.testing.assert_array_equal(
      pos[:14], [0, 1, 2, 3, 4] + list(range(3, 12))
    )
    np.testing.assert_array_equal(
      packed.tokens[1, 5:14], batch.rejected_tokens[1, 3:12]
    )
    np.testing.assert_array_equal(packed.last_index[1], [4, 13])
    # Pair 3 (left-padded prompt): positions start at its first real token.
    np.testing.assert_array_equal(
      packed.positions[3, :10], [0, 0, 0, 1, 2, 3, 4, 5, 6, 3]
    )
    np.testing.assert_array_equal(packed.attention_mask[3, :2], False)
    # unpack() is the inverse on every real token.
    x = jnp.arange(4 * 23, dtype=jnp.float32).reshape(4, 23, 1)
    rows = np.asarray(_UNPACK(x, packed))[..., 0]
    want = np.asarray(x)[..., 0]
    for i in range(4):
      real_c = np.asarray(batch.chosen_attention_mask[i])
      np.testing.assert_array_equal(rows[i][real_c], want[i, :14][real_c])
      real_r = np.asarray(batch.rejected_attention_mask[i])
      got_tokens = np.asarray(packed.tokens[i])[
        np.asarray(packed.rejected_index[i])
      ]
      np.testing.assert_array_equal(
        got_tokens[real_r], np.asarray(batch.rejected_tokens[i])[real_r]
      )

  @parameterized.parameters("dpo", "sparse_po")
  def test_preference_loss_and_grads_equal_unpacked(self, name):
    graphdef, params, rest = sp.split("causal_lm", 0)
    frozen = sp.split("causal_lm", 1)[1]  # a reference unlike the policy

    def make(share):
      config = _util.load_config("preference", f"loss={name},runlocal")
      config.share_prompt = share
      return preference.make_loss_fn(graphdef, rest, config)[0]

    sp.assert_same(
      self, sp.value_and_grad(make, graphdef, rest, params, frozen, sp.pairs())
    )

  def test_prompts_that_differ_fail_clearly(self):
    batch = sp.pairs()
    tokens = np.array(batch.rejected_tokens)
    tokens[2, 0] += 1  # pair 2's one-token prompt
    bad = batch._replace(rejected_tokens=tokens)
    with self.assertRaisesRegex(
      ValueError, r"config\.share_prompt=True .* pair 2 .*different prompts"
    ):
      _packing.check_shared_prompt(
        bad, completion_len=sp.C, where="config.share_prompt"
      )
    # Too long for the packed rows: names the data key.
    with self.assertRaisesRegex(ValueError, r"pair 0 .*max_completion_len"):
      _packing.check_shared_prompt(
        batch, completion_len=2, where="config.share_prompt"
      )
    checked = _packing.CheckedBatches(
      iter([batch, bad]), completion_len=sp.C, where="config.share_prompt"
    )
    self.assertIs(next(checked), batch)
    with self.assertRaisesRegex(ValueError, "different prompts"):
      next(checked)
    # Inside the jitted step the pair cannot go unnoticed: NaN.
    packed = _PACK(bad, completion_len=sp.C)
    np.testing.assert_array_equal(packed.valid, [True, True, False, True])
    rows = _UNPACK(jnp.ones((4, 23, 1)), packed)
    self.assertTrue(np.all(np.isnan(rows[2])) and np.all(np.isnan(rows[6])))
    self.assertFalse(np.any(np.isnan(rows[np.array([0, 1, 3, 4, 5, 7])])))

  def test_switch_and_bound(self):
    config = _util.load_config("preference", "runlocal")
    self.assertTrue(config.share_prompt)
    self.assertEqual(_packing.share_prompt_bound(config), sp.C)
    self.assertEqual(_packing.share_prompt_bound(config, 4), 4)
    del config.data
    with self.assertRaisesRegex(ValueError, "max_completion_len"):
      _packing.share_prompt_bound(config)
    config.share_prompt = False
    self.assertIsNone(_packing.share_prompt_bound(config))


if __name__ == "__main__":
  absltest.main()
