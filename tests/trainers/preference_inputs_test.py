"""The offline preference trainer's derived inputs (WPO, SparsePO, CREAM,
TGDPO, T-REG): each array against float64 NumPy, then 2-step runlocals.

(a) On a tiny model and batch, the arrays the trainer hands to the loss are
captured (by wrapping ``_lm.call_by_name``) and compared with float64
computations from the models' full logits (WPO's ``log Σ π²``, the per-token
``KL(π_ref‖π)``, the guidance model's ``β(log π_g - log π_ref)``, CREAM's
ranking agreement) or from the reference model's captured activations
(SparsePO's masks).

(b) ``configs/preference.py:loss=<name>,runlocal`` trains 2 steps through
``trainers.get_trainer("preference").run`` for each of the five losses (the
TGDPO / T-REG guidance model is a tiny model exported here with another
seed).
"""

import functools
import pathlib
import re
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import losses, models, trainers
from alignment.data import batches as data_batches
from alignment.trainers import _lm, common, preference
from tests.trainers import _util

B, L, PROMPT = 4, 12, 4
MODEL = models.get_preset("tiny", n_layers=1)
GUIDE = models.get_preset("tiny", n_layers=2, d_model=32, d_ff=64)
RUNLOCAL_MODEL = models.get_preset("tiny", n_layers=1)


def _split(config, seed):
  module = models.build_model("causal_lm", config, rngs=nnx.Rngs(seed))
  return nnx.split(module, nnx.Param, ...)


def _rows(rng, n, length):
  tokens = rng.integers(0, 256, (n, length)).astype(np.int32)
  attn = np.ones((n, length), bool)
  attn[0, -3:] = False  # a right-padded row
  comp = attn.copy()
  comp[:, :PROMPT] = False
  comp[1, PROMPT + 1 :] = False  # a one-token completion
  return tokens, attn, comp


def _batch():
  rng = np.random.default_rng(0)
  c = _rows(rng, B, L)
  r = _rows(rng, B, L - 2)  # shorter: the trainer pads
  r[0][:, :PROMPT] = c[0][:, :PROMPT]  # a pair shares its prompt
  return data_batches.PreferenceBatch(
    *c, *r, np.array([True] * (B - 1) + [False])
  )


def _concat(batch):
  """``[chosen; rejected]`` as the trainer builds it (right-padded)."""

  def pad(x):
    return np.pad(x, ((0, 0), (0, L - x.shape[1])))

  tokens = np.concatenate([batch.chosen_tokens, pad(batch.rejected_tokens)])
  attn = np.concatenate(
    [batch.chosen_attention_mask, pad(batch.rejected_attention_mask)]
  )
  comp = np.concatenate(
    [batch.chosen_completion_mask, pad(batch.rejected_completion_mask)]
  )
  return tokens, attn, comp, comp[:, 1:] & attn[:, 1:]


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, rest, tokens, attn):
  return nnx.merge(graphdef, params, rest)(tokens, attention_mask=attn)


def _logps64(split, tokens, attn):
  """float64 ``log π(·|s_t)`` ``[N, L-1, V]`` from the model's full logits."""
  logits = _logits(split[0], split[1], split[2], tokens, attn)
  return _log_softmax(np.asarray(logits, np.float64)[:, :-1])


def _picked(logp, tokens):
  return np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def _halves(x):
  return x[:B], x[B:]


def _np_minmax_weights(acts, mask):
  """SparsePO's activation masks in float64 (per map min-max, then mean)."""
  maps = []
  for a in acts:
    x = np.asarray(a, np.float64).mean(-1)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
      sel = mask[i]
      if not sel.any():
        continue
      lo, hi = x[i, sel].min(), x[i, sel].max()
      out[i, sel] = (x[i, sel] - lo) / (hi - lo) if hi > lo else 1.0
    maps.append(out)
  return np.mean(maps, 0)


class SuppliedArraysTest(absltest.TestCase):
  """Each derived array equals its float64 definition."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.policy = _split(MODEL, 0)
    cls.reference = _split(MODEL, 1)  # differs from the policy
    cls.guide = _split(GUIDE, 2)  # another architecture, same vocabulary
    cls.batch = _batch()
    cls.tokens, cls.attn, cls.comp, cls.mask = _concat(cls.batch)
    cls.pol_logp = _logps64(cls.policy, cls.tokens, cls.attn)
    cls.ref_logp = _logps64(cls.reference, cls.tokens, cls.attn)

  def _supplied(self, config, *, guidance=False):
    """The arrays (by name) and metrics the trainer passes for ``config``."""
    real, box = _lm.call_by_name, {}

    def spy(fn, available, hyper, name):
      box.update(available)
      return real(fn, available, hyper, name)

    graphdef, params, rest = self.policy
    frozen = self.reference[1]
    kwargs = {}
    if guidance:
      frozen = {"reference": frozen, "guidance": self.guide[1]}
      kwargs["guidance"] = (self.guide[0], self.guide[2])
    with mock.patch.object(preference._lm, "call_by_name", spy):
      loss_fn, _, _ = preference.make_loss_fn(graphdef, rest, config, **kwargs)

      def run(p, f, b):
        box.clear()
        wm, metrics = loss_fn(p, f, b, None)
        return dict(box), metrics, wm.value()

      arrays, metrics, loss = jax.jit(run)(params, frozen, self.batch)
    self.assertTrue(np.isfinite(loss))
    return {k: np.asarray(v) for k, v in arrays.items()}, metrics

  def _assert_pairs(self, arrays, name_c, name_r, want, **tol):
    want = np.where(self.mask, want, 0.0)
    got = np.concatenate([arrays[name_c], arrays[name_r]])
    np.testing.assert_allclose(got, want, **tol)

  def test_wpo_log_normalizers(self):
    config = _util.load_config("preference", "loss=wpo,runlocal")
    arrays, metrics = self._supplied(config)
    want = np.log(np.sum(np.exp(2 * self.pol_logp), -1))  # log Σ π²
    self._assert_pairs(
      arrays,
      "chosen_token_log_normalizers",
      "rejected_token_log_normalizers",
      want,
      rtol=1e-5,
      atol=1e-5,
    )
    # The log-probs the loss sees are the policy's, as the oracle's.
    self._assert_pairs(
      arrays,
      "policy_chosen_token_logps",
      "policy_rejected_token_logps",
      _picked(self.pol_logp, self.tokens),
      rtol=1e-5,
      atol=1e-5,
    )
    self.assertIn("pair_weight", metrics)

  def test_sparse_po_activation_masks_and_token_kl(self):
    config = _util.load_config("preference", "loss=sparse_po,runlocal")
    config.reward_weights.activations = "layers"
    arrays, metrics = self._supplied(config)
    # Reference activations: the residual stream after each decoder layer.
    graphdef, params, rest = self.reference

    def layer_outputs(p):
      capture = nnx.capture(
        lambda m, t: m.hidden(t, attention_mask=self.attn),
        nnx.Intermediate,
        method_outputs=nnx.Intermediate,
      )
      _, inter = capture(nnx.merge(graphdef, p, rest), self.tokens)
      layers = inter["transformer"]["layers"]
      return [
        layers[i]["__call__"].get_value()[0][0] for i in range(len(layers))
      ]

    acts = [np.asarray(a)[:, :-1] for a in jax.jit(layer_outputs)(params)]
    self.assertLen(acts, MODEL.n_layers)
    weights = _np_minmax_weights(acts, self.mask)
    for names in (
      ("chosen_reward_weights", "rejected_reward_weights"),
      ("chosen_kl_weights", "rejected_kl_weights"),  # MaPO's common mask
    ):
      self._assert_pairs(arrays, *names, weights, rtol=1e-4, atol=1e-5)
    self.assertTrue(np.all(weights[self.mask] >= 0))
    self.assertTrue(np.any(weights[self.mask] == 0))  # sparse
    q = np.exp(self.ref_logp)
    kl = np.sum(q * (self.ref_logp - self.pol_logp), -1)
    self._assert_pairs(
      arrays, "chosen_token_kl", "rejected_token_kl", kl, rtol=1e-4, atol=1e-6
    )
    self.assertGreater(float(metrics["reward_weight_zero_fraction"]), 0.0)

  def test_cream_consistency(self):
    policy = _picked(self.pol_logp, self.tokens) * self.mask
    ref = _picked(self.ref_logp, self.tokens) * self.mask
    lengths = self.mask.sum(-1)
    cur = policy.sum(-1) / np.maximum(lengths, 1)
    prev = ref.sum(-1) / np.maximum(lengths, 1)
    agree = np.sign(cur[:B] - cur[B:]) == np.sign(prev[:B] - prev[B:])
    want = agree.astype(np.float64)
    # The batch must show both outcomes, or the check below could not fail.
    self.assertTrue(agree.any() and not agree.all(), msg=agree)
    config = _util.load_config("preference", "loss=cream,runlocal")
    arrays, metrics = self._supplied(config)
    np.testing.assert_array_equal(arrays["consistency"], want)
    config.consistency.granularity = "batch"  # mean over real pairs
    arrays, _ = self._supplied(config)
    np.testing.assert_allclose(
      arrays["consistency"], np.full(B, want[:-1].mean()), rtol=1e-6
    )

  def test_guidance_token_rewards(self):
    beta = 0.3
    want = beta * (
      _picked(_logps64(self.guide, self.tokens, self.attn), self.tokens)
      - _picked(self.ref_logp, self.tokens)
    )
    for name in ("tgdpo",):  # t_reg gets the same arrays
      config = _util.load_config("preference", f"loss={name},runlocal")
      config.token_rewards.checkpoint = "unused-here"
      config.token_rewards.beta = beta
      with mock.patch.object(
        preference, "guidance_dir", lambda c: pathlib.Path(".")
      ):
        arrays, metrics = self._supplied(config, guidance=True)
      self._assert_pairs(
        arrays,
        "chosen_token_rewards",
        "rejected_token_rewards",
        want,
        rtol=1e-4,
        atol=1e-5,
      )
      self.assertIn("guidance_reward_margin", metrics)


class HelpersTest(absltest.TestCase):
  def test_activation_token_weights(self):
    rng = np.random.default_rng(3)
    acts = [rng.normal(size=(3, 5, 4)) for _ in range(2)]
    mask = np.array(
      [[1, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool
    )  # normal, one token (weight 1), empty (all 0)
    nan_acts = [np.where(mask[..., None], a, np.nan) for a in acts]
    got = jax.jit(preference.activation_token_weights)(
      [jnp.asarray(a, jnp.float32) for a in nan_acts], mask
    )
    want = _np_minmax_weights(acts, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(got[1, 1]), 1.0)
    np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)

  def test_pair_consistency_limits(self):
    consistency = jax.jit(
      preference.pair_consistency, static_argnames="normalize_by_length"
    )
    pc = jnp.array([-3.0, -1.0, -2.0])
    pr = jnp.array([-2.0, -4.0, -2.0])
    lengths = jnp.array([1.0, 1.0, 1.0])
    same = consistency(pc, pr, pc, pr, lengths, lengths)
    np.testing.assert_array_equal(same, 1.0)  # policy = reference: DPO
    swapped = consistency(pc, pr, pr, pc, lengths, lengths)
    np.testing.assert_array_equal(swapped, [0.0, 0.0, 1.0])  # tie: agree
    # Length normalisation can change a ranking: with |y_w| = 4, |y_l| = 1
    # the policy prefers y_l by sum (-3 < -1) but y_w by mean (-0.75 > -1);
    # the reference prefers y_l either way (-8 < -1, -2 < -1).
    args = (
      jnp.array([-3.0]),
      jnp.array([-1.0]),
      jnp.array([-8.0]),
      jnp.array([-1.0]),
      jnp.array([4.0]),
      jnp.array([1.0]),
    )
    raw = consistency(*args, normalize_by_length=False)
    norm = consistency(*args)
    self.assertEqual(float(raw[0]), 1.0)
    self.assertEqual(float(norm[0]), 0.0)

  def test_chunked_token_kl_values_and_gradients(self):
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    hr = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    wr = jnp.asarray(rng.normal(size=(6, 30)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)

    def chunked(h, w, hr, wr):
      return jnp.sum(c * _lm.chunked_token_kl(h, w, hr, wr, chunk_size=3))

    def naive(h, w, hr, wr):
      return jnp.sum(c * losses.reference_token_kl(h @ w, hr @ wr))

    got = jax.jit(jax.value_and_grad(chunked, (0, 1, 2, 3)))(h, w, hr, wr)
    want = jax.jit(jax.value_and_grad(naive, (0, 1, 2, 3)))(h, w, hr, wr)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, x in zip(got[1][:2], want[1][:2], strict=True):
      np.testing.assert_allclose(g, x, rtol=1e-4, atol=1e-5)
    for g in got[1][2:]:  # no gradient into the reference
      np.testing.assert_array_equal(g, 0.0)


class StartupErrorsTest(absltest.TestCase):
  def _spec(self, name, **edits):
    config = _util.load_config("preference", f"loss={name},runlocal")
    for key, value in edits.items():
      block, field = key.split("__")
      config[block][field] = value
    return preference.loss_spec(config)

  def test_token_reward_sources(self):
    with self.assertRaisesRegex(
      ValueError, r"config\.token_rewards\.checkpoint is empty"
    ):
      self._spec("tgdpo")
    with self.assertRaisesRegex(
      ValueError, r"config\.token_rewards\.checkpoint='/nonexistent'"
    ):
      self._spec("t_reg", token_rewards__checkpoint="/nonexistent")
    with self.assertRaisesRegex(ValueError, "'columns' is not supported"):
      self._spec("tgdpo", token_rewards__source="columns")
    config = _util.load_config("preference", "loss=tgdpo,runlocal")
    del config["token_rewards"]
    with self.assertRaisesRegex(
      ValueError,
      re.escape(
        "'tgdpo' needs ['chosen_token_rewards', 'rejected_token_rewards']"
      )
      + ".*config.token_rewards",
    ):
      preference.loss_spec(config)

  def test_bad_settings_and_precomputed_reference(self):
    with self.assertRaisesRegex(
      ValueError, r"config\.log_normalizers\.alignment='top'"
    ):
      self._spec("wpo", log_normalizers__alignment="top")
    with self.assertRaisesRegex(
      ValueError, r"config\.reward_weights\.activations='mlp'"
    ):
      self._spec("sparse_po", reward_weights__activations="mlp")
    with self.assertRaisesRegex(
      ValueError, r"config\.consistency\.granularity='prompt'"
    ):
      self._spec("cream", consistency__granularity="prompt")
    config = _util.load_config("preference", "loss=sparse_po,runlocal")
    config.reference = "precomputed"
    with self.assertRaisesRegex(
      ValueError, r"'sparse_po' needs \[.*'chosen_reward_weights'.*precomputed"
    ):
      preference.loss_spec(config)
    # A loss whose arrays need only summed reference log-probs still works.
    config = _util.load_config("preference", "loss=cream,runlocal")
    config.reference = "precomputed"
    preference.loss_spec(config)


# ---------------------------------------------------------------------------
# (b) 2-step runlocal of every variant, through the trainer
# ---------------------------------------------------------------------------


_VARIANTS = {  # loss -> a metric its derived input shows up in
  "wpo": "pair_weight",
  "sparse_po": "reward_weight_mean",
  "cream": "consistency",
  "tgdpo": "guidance_reward_margin",
  "t_reg": "guidance_reward_margin",
}


@pytest.mark.slow
class RunlocalTest(parameterized.TestCase):
  """~10 s of compilation per variant on a 2-core CPU (marked slow)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory(prefix="alignment-pref-inputs-")
    cls.cache = _util.compilation_cache()
    cls.cache.__enter__()
    # A guidance "workdir of ours": a tiny model exported to <dir>/export.
    guide = models.build_model("causal_lm", RUNLOCAL_MODEL, rngs=nnx.Rngs(9))
    models.export_hf_checkpoint(
      guide, RUNLOCAL_MODEL, f"{cls.tmp.name}/guide/export"
    )

  @classmethod
  def tearDownClass(cls):
    cls.cache.__exit__(None, None, None)
    cls.tmp.cleanup()
    super().tearDownClass()

  @parameterized.named_parameters(*[(n, n) for n in _VARIANTS])
  def test_variant_trains_two_steps(self, name):
    config = _util.load_config("preference", f"loss={name},runlocal")
    config.progress = False
    config.checkpoint.enabled = False
    config.model.overrides.n_layers = RUNLOCAL_MODEL.n_layers  # compile less
    if "token_rewards" in config:
      config.token_rewards.checkpoint = f"{self.tmp.name}/guide"
    with mock.patch.object(common, "plot_metrics"):
      state, run = trainers.get_trainer("preference").run(
        config, f"{self.tmp.name}/{name}"
      )
    rows = common.read_metrics(run.workdir / "metrics_preference.jsonl")
    self.assertEqual([r["step"] for r in rows], [1, 2])
    for row in rows:
      self.assertTrue(np.isfinite(row["loss"]), msg=row)
      self.assertTrue(np.isfinite(row[_VARIANTS[name]]), msg=row)
      self.assertGreater(row["grad_norm"], 0.0)
    self.assertEqual(int(state["step"]), 2)


if __name__ == "__main__":
  absltest.main()
