"""On-policy RL updates reuse the loss's own log-probs as the old ones.

``trainers.rl.run`` skips the separate pre-update policy forward when
``is_on_policy(config)`` (one PPO epoch over one minibatch) and passes
``old_token_logps=None``; the loss then uses ``stop_gradient`` of its own
log-probs. Loss, gradients and metrics must equal the old path, which
computed the old log-probs with a separate forward of the same parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import models
from alignment.trainers import rl
from tests.trainers import _util

MODEL = models.get_preset("tiny", n_layers=1)
G, N, L, PROMPT = 4, 8, 12, 4


def _config(loss, correction="none", temperature=1.0):
  config = _util.load_config("rl", f"loss={loss},advantage=grpo,runlocal")
  config.rl.num_generations = G
  config.rl.max_new_tokens = L - PROMPT
  config.rl.temperature = temperature
  config.kl.mode = "loss"
  config.kl.beta = 0.05
  config.off_policy.correction = correction
  config.loss_aggregation = "token_mean"
  return config


def _rollout(old):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (N, L)).astype(np.int32)
  # As the sampler lays a rollout out: the G rows of a group share the
  # prompt (the first PROMPT columns), then T = L - PROMPT completion ones.
  tokens[:, :PROMPT] = np.repeat(tokens[::G, :PROMPT], G, axis=0)
  attn = np.ones((N, L), bool)
  attn[1, -3:] = False
  loss_mask = np.zeros((N, L - 1), bool)
  loss_mask[:, PROMPT - 1 :] = attn[:, PROMPT:]
  ref = np.where(loss_mask, -rng.uniform(3, 7, (N, L - 1)), 0.0)
  sampler = np.where(loss_mask, -rng.uniform(3, 7, (N, L - 1)), 0.0)
  rewards = rng.normal(size=(N // G, G)).astype(np.float32)
  adv = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(
    1, keepdims=True
  )
  return rl.Rollout(
    jnp.asarray(tokens),
    jnp.asarray(attn),
    jnp.asarray(loss_mask),
    jnp.asarray(sampler, jnp.float32),
    old,
    jnp.asarray(ref, jnp.float32),
    jnp.asarray(adv.reshape(N), jnp.float32),
    jnp.asarray(rewards.reshape(N)),
  )


class OnPolicyTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.graphdef, params, cls.rest = _util.split_model("causal_lm", MODEL)
    cls.params = {"policy": params}

  def _old_logps(self, ro, temperature, config):
    """The pre-update forward ``rl.run`` makes off-policy (each group
    packed on its prompt, as there and in the loss)."""

    @jax.jit
    def forward(p, tokens, attention_mask, loss_mask):
      model = nnx.merge(self.graphdef, p, self.rest)
      return rl.completion_logps(
        model,
        tokens,
        attention_mask,
        loss_mask,
        chunk_size=64,
        temperature=temperature,
        **rl.shared_prompt_kwargs(config),
      )

    return forward(
      self.params["policy"], ro.tokens, ro.attention_mask, ro.loss_mask
    )

  @parameterized.parameters(("grpo", "none", 1.0), ("ppo", "tis", 0.7))
  def test_loss_and_gradients_equal_separate_forward(
    self, loss, correction, temperature
  ):
    config = _config(loss, correction, temperature)
    self.assertTrue(rl.is_on_policy(config))
    loss_fn = rl.make_policy_loss(self.graphdef, self.rest, None, None, config)
    on = _rollout(None)
    off = on._replace(old_token_logps=self._old_logps(on, temperature, config))

    @jax.jit
    def value_and_grad(ro):
      def total(p):
        wm, metrics = loss_fn(p, None, ro, jax.random.key(0))
        return wm.total, (wm.weight, metrics)

      return jax.value_and_grad(total, has_aux=True)(self.params)

    (t_on, (w_on, m_on)), g_on = value_and_grad(on)
    (t_off, (w_off, m_off)), g_off = value_and_grad(off)
    np.testing.assert_allclose(t_on, t_off, rtol=1e-5, atol=1e-7)
    self.assertEqual(float(w_on), float(w_off))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
      g_on,
      g_off,
    )
    self.assertGreater(float(optax_norm(g_on)), 0.0)
    # The on-policy ratio is 1 by construction; the separate forward gives
    # the same log-probs up to float32 rounding.
    if "ratio_mean" in m_on:
      self.assertEqual(float(m_on["ratio_mean"]), 1.0)
      np.testing.assert_allclose(m_off["ratio_mean"], 1.0, atol=1e-5)
    for key in m_off:
      np.testing.assert_allclose(m_on[key], m_off[key], rtol=1e-5, atol=1e-6)
    # run()'s kl_sequence metric, from the loss when on-policy.
    old = np.asarray(off.old_token_logps)
    kl_seq = np.where(on.loss_mask, old - np.asarray(on.ref_token_logps), 0)
    np.testing.assert_allclose(
      m_on["kl_sequence"], kl_seq.sum(-1).mean(), rtol=1e-5
    )
    self.assertNotIn("kl_sequence", m_off)

  def test_is_on_policy(self):
    config = _config("grpo")
    self.assertTrue(rl.is_on_policy(config))
    for field, value in (
      ("rl.ppo_epochs", 2),
      ("rl.num_minibatches", 2),
      ("kl.mode", "reward"),
    ):
      c = _config("grpo")
      section, name = field.split(".")
      c[section][name] = value
      self.assertFalse(rl.is_on_policy(c), field)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


if __name__ == "__main__":
  absltest.main()
