"""Tests of the reward / value / uncertainty / ensemble heads.

All heads run in one compiled function on a batch holding the same sequence
left-padded and right-padded (sequence-level outputs must agree) plus an
unpadded row; each output is checked against a NumPy computation from the
backbone's hidden states.
"""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment.models import heads, partitioning
from tests.models import tiny

CONFIG = tiny.ROPE.replace(n_layers=1)
M = 3  # heads / members
SEQ = np.array([5, 9, 13, 17, 21, 25], np.int32)
TOKENS = np.zeros((3, 8), np.int32)
MASK = np.zeros((3, 8), bool)
TOKENS[0, 2:], MASK[0, 2:] = SEQ, True  # left padded
TOKENS[1, :6], MASK[1, :6] = SEQ, True  # right padded
TOKENS[2], MASK[2] = np.arange(30, 38), True
LAST = np.array([7, 5, 7])

KINDS = {
  "reward": {},
  "value": {},
  "gaussian_reward": {},
  "multi_objective_reward": dict(
    num_objectives=M, gating=True, gating_hidden=16
  ),
  "preference_embedding": dict(embed_dim=4),
  "ensemble_heads": dict(num_heads=M),
  "ensemble_stacked": dict(num_members=2, member_kind="reward"),
}


def _run_all():
  models = {
    k: tiny.build(CONFIG, k, seed=i, **kw)
    for i, (k, kw) in enumerate(KINDS.items())
  }
  plain = tiny.build(CONFIG, "multi_objective_reward", num_objectives=M)
  split = {k: nnx.split(m) for k, m in models.items()}
  plain_def, plain_state = nnx.split(plain)
  member_def = nnx.split(tiny.abstract(CONFIG, "reward"))[0]

  def run(states, plain_state):
    m = {k: nnx.merge(split[k][0], s) for k, s in states.items()}
    kw = dict(attention_mask=MASK)
    out = {k: m[k](TOKENS, **kw) for k in KINDS}
    out["hidden"] = {
      k: m[k].hidden(TOKENS, **kw) for k in KINDS if k != "ensemble_stacked"
    }
    out["gated_at_0"] = m["multi_objective_reward"](
      TOKENS, gate_index=jnp.zeros((3,), jnp.int32), **kw
    )
    out["plain"] = nnx.merge(plain_def, plain_state)(TOKENS, **kw)
    stacked = states["ensemble_stacked"]
    out["members"] = [
      nnx.merge(
        member_def, jax.tree.map(lambda x, i=i: x[i], stacked["members"])
      )(TOKENS, **kw)
      for i in range(2)
    ]
    return out

  states = {k: s for k, (_, s) in split.items()}
  out = tiny.compile_fast(run, states, plain_state)(states, plain_state)
  return models, jax.tree.map(np.asarray, out)


class HeadsTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.models, cls.out = _run_all()

  def _last(self, kind):
    hidden = self.out["hidden"][kind]
    return hidden[np.arange(3), LAST]

  def test_reward_is_score_at_last_real_token(self):
    got = self.out["reward"]
    self.assertEqual((got.shape, got.dtype), ((3,), np.float32))
    score = np.asarray(self.models["reward"].score[...])
    np.testing.assert_allclose(
      got, self._last("reward") @ score[:, 0], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5)  # padding side
    self.assertNotAlmostEqual(float(got[0]), float(got[2]), places=3)

  def test_value_per_token(self):
    got = self.out["value"]
    self.assertEqual((got.shape, got.dtype), ((3, 8), np.float32))
    model = self.models["value"]
    want = (self.out["hidden"]["value"] @ np.asarray(model.value_kernel[...]))[
      ..., 0
    ] + np.asarray(model.value_bias[...])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0, 2:], got[1, :6], rtol=1e-5, atol=1e-5)

  def test_gaussian_reward(self):
    got = self.out["gaussian_reward"]
    self.assertIsInstance(got, heads.GaussianReward)
    model = self.models["gaussian_reward"]
    want = self._last("gaussian_reward") @ np.asarray(
      model.head_kernel[...]
    ) + np.asarray(model.head_bias[...])
    np.testing.assert_allclose(got.mean, want[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      got.log_variance, want[:, 1], rtol=1e-5, atol=1e-5
    )

  def test_multi_objective_gating(self):
    got = self.out["multi_objective_reward"]
    self.assertEqual(got.rewards.shape, (3, M))
    np.testing.assert_allclose(got.weights.sum(-1), 1.0, rtol=1e-6)
    self.assertTrue((got.weights > 0).all())
    np.testing.assert_allclose(
      got.score, (got.weights * got.rewards).sum(-1), rtol=1e-6
    )
    np.testing.assert_allclose(got.weights[0], got.weights[1], rtol=1e-5)
    model = self.models["multi_objective_reward"]
    h = self._last("multi_objective_reward")
    for i, (w, b) in enumerate(
      zip(model.gate_kernels, model.gate_biases, strict=True)
    ):
      h = h @ np.asarray(w[...]) + np.asarray(b[...])
      if i == 0:
        h = np.maximum(h, 0)
    e = np.exp(h - h.max(-1, keepdims=True))
    np.testing.assert_allclose(
      got.weights, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    moved = self.out["gated_at_0"]
    np.testing.assert_allclose(moved.rewards, got.rewards)
    self.assertGreater(np.abs(moved.weights - got.weights).max(), 1e-4)
    plain = self.out["plain"]
    np.testing.assert_allclose(plain.weights, np.full((3, M), 1 / M))

  def test_preference_embedding_is_unit_norm(self):
    got = self.out["preference_embedding"]
    self.assertEqual(got.shape, (3, 4))
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got[0], got[1], rtol=1e-4, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "embed_dim"):
      tiny.abstract(CONFIG, "preference_embedding", embed_dim=3)

  def test_multi_head_ensemble(self):
    got = self.out["ensemble_heads"]
    self.assertEqual((got.shape, got.dtype), ((M, 3), np.float32))
    model = self.models["ensemble_heads"]
    want = self._last("ensemble_heads") @ np.asarray(
      model.heads_kernel[...]
    ).T + np.asarray(model.heads_bias[...])
    np.testing.assert_allclose(got, want.T, rtol=1e-5, atol=1e-5)

  def test_stacked_ensemble_equals_members_run_separately(self):
    got = self.out["ensemble_stacked"]
    self.assertEqual((got.shape, got.dtype), ((2, 3), np.float32))
    for i in range(2):
      np.testing.assert_allclose(
        got[i], self.out["members"][i], rtol=1e-5, atol=1e-5
      )
    self.assertGreater(np.abs(got[0] - got[1]).max(), 1e-4)
    np.testing.assert_allclose(got[:, 0], got[:, 1], rtol=1e-5)


class StackedInitTest(absltest.TestCase):
  def test_members_have_independent_params_and_members_axis(self):
    config = CONFIG.replace(
      d_model=16, n_heads=2, n_kv_heads=1, d_ff=16, vocab_size=16
    )
    state = tiny.compile_fast(
      lambda: nnx.state(
        heads.build_model(
          "ensemble_stacked", config, rngs=nnx.Rngs(0), num_members=M
        )
      )
    )()
    embedding = state["members"]["transformer"]["embedding"]
    self.assertEqual(embedding.shape, (M, 16, 16))
    self.assertEqual(
      embedding.get_metadata()["out_sharding"], ("members", "vocab", "embed")
    )
    values = np.asarray(embedding.get_value())
    self.assertGreater(np.abs(values[0] - values[1]).min(), 0)
    mesh = jax.make_mesh(
      (M,),
      ("ensemble",),
      devices=jax.devices()[:M],
      axis_types=(jax.sharding.AxisType.Auto,),
    )
    shardings = partitioning.param_shardings(
      state, mesh, (("members", "ensemble"),)
    )
    spec = shardings["members"]["transformer"]["layers"][0]["mlp"][
      "up_kernel"
    ].spec
    self.assertEqual(spec, jax.P("ensemble"))


class BuildModelTest(parameterized.TestCase):
  def test_every_kind_builds(self):
    for kind in heads.KINDS:
      model = tiny.abstract(CONFIG, kind)
      self.assertIsInstance(
        model.transformer
        if kind != "ensemble_stacked"
        else model.members.transformer,
        nnx.Module,
      )

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"'critic'.*'reward'"):
      heads.build_model("critic", CONFIG)
    with self.assertRaisesRegex(ValueError, "member_kind"):
      tiny.abstract(CONFIG, "ensemble_stacked", member_kind="ensemble_heads")
    for kind, kw in (
      ("ensemble_heads", dict(num_heads=0)),
      ("ensemble_stacked", dict(num_members=0)),
      ("multi_objective_reward", dict(temperature=0.0)),
      ("multi_objective_reward", dict(num_objectives=0)),
    ):
      with self.assertRaises(ValueError):
        tiny.abstract(CONFIG, kind, **kw)

  def test_last_token_index(self):
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(heads.last_token_index(mask), [2, 3, 3])
    with self.assertRaises(jaxtyping.TypeCheckError):
      heads.last_token_index(mask[0])

  def test_reward_input_shape_errors(self):
    model = tiny.abstract(CONFIG, "reward")
    with self.assertRaises(jaxtyping.TypeCheckError):
      model(TOKENS, attention_mask=MASK[:2])


if __name__ == "__main__":
  absltest.main()
