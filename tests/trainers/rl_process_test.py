"""Process-credit inputs of the online RL trainer (``_rl_process``).

Hand-built rollouts checked against float64 NumPy: step segmentation (with
EOS, trailing content, one step per token and the last-step merge), PURE's
PRM step scores ``2σ(x) − 1`` read at the step ends and its token
advantages through ``rl.compute_advantages``, IGPO's teacher-forced answer
log-probs after each turn (each prefix run on its own, unpadded) and
information gains, PRIME's implicit-PRM cross-entropy, batch norm and one
online update; start-time errors for bad configs.
"""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import models
from alignment.data import tokenizer as tokenizer_lib
from alignment.trainers import _rl_process, _setup, rl
from tests import testing
from tests.trainers import _util

EOS, PAD, SEP = 258, 256, ord("\n")
TOK = tokenizer_lib.ByteTokenizer()
G = 2


_config = _util.rl_config
_np_sigmoid = _util.np_sigmoid


def _np_segment(tokens, mask, sep, s_max):
  """Per-row Python segmentation: (index [T], ends [S], lengths [S], n)."""
  index = np.full(len(tokens), -1)
  steps = []  # lists of positions
  current = []
  for t, (tok, m) in enumerate(zip(tokens, mask, strict=True)):
    if not m:
      continue
    if tok == EOS:
      if current or not steps:
        current.append(t)
      else:
        steps[-1].append(t)
      continue
    current.append(t)
    if sep is None or tok == sep:
      steps.append(current)
      current = []
  if current:
    steps.append(current)
  n = len(steps)
  if n > s_max:  # merge the surplus into the last step
    steps = steps[: s_max - 1] + [sum(steps[s_max - 1 :], [])]
  ends, lengths = np.zeros(s_max, int), np.zeros(s_max, int)
  for s, pos in enumerate(steps):
    index[pos] = s
    content = [p for p in pos if tokens[p] != EOS]
    ends[s] = max(content) if content else max(pos)
    lengths[s] = len(pos)
  return index, ends, lengths, n


def _rollout():
  """[N=4, T=9] completions with separators, EOS and padding."""
  rows = [
    [97, SEP, 98, 99, SEP, 100, EOS, PAD, PAD],  # 3 steps, tail then EOS
    [97, 98, SEP, EOS, PAD, PAD, PAD, PAD, PAD],  # EOS after a separator
    [EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],  # EOS only
    [SEP, 97, SEP, 98, SEP, 99, SEP, 100, 101],  # 5 steps, no EOS
  ]
  tokens = np.array(rows, np.int32)
  mask = np.zeros_like(tokens, bool)
  for i, r in enumerate(rows):
    end = r.index(EOS) + 1 if EOS in r else len(r)
    mask[i, :end] = True
  return tokens, mask


class SegmentationTest(parameterized.TestCase):
  @parameterized.parameters((SEP, 4), (SEP, 8), (None, 5), (None, 9))
  def test_matches_python(self, sep, s_max):
    tokens, mask = _rollout()
    got = jax.jit(
      lambda t, m: _rl_process.segment_steps(
        t, m, max_steps=s_max, separator_id=sep, eos_id=EOS
      )
    )(tokens, mask)
    for i in range(len(tokens)):
      index, ends, lengths, n = _np_segment(tokens[i], mask[i], sep, s_max)
      np.testing.assert_array_equal(got.token_step_index[i], index)
      np.testing.assert_array_equal(got.step_ends[i], ends)
      np.testing.assert_array_equal(got.step_lengths[i], lengths)
      np.testing.assert_array_equal(
        got.step_mask[i], np.arange(s_max) < min(n, s_max)
      )
      self.assertEqual(bool(got.overflow[i]), n > s_max)
      self.assertEqual(int(got.step_lengths[i].sum()), int(mask[i].sum()))
    if sep == SEP and s_max == 4:  # row 3 has 5 steps: the last two merge
      self.assertTrue(bool(got.overflow[3]))
      np.testing.assert_array_equal(got.step_ends[3], [0, 2, 4, 8])
    if sep == SEP:  # EOS joins the step it follows
      np.testing.assert_array_equal(got.token_step_index[1, :4], [0, 0, 0, 0])

  def test_separator_of_the_config(self):
    self.assertIsNone(_rl_process.separator_id(_config("igpo"), TOK))
    config = _config("igpo", step_separator="\n")
    self.assertEqual(_rl_process.separator_id(config, TOK), SEP)
    config.data.source = "jsonl"
    config.reward.step_separator = "auto"
    self.assertEqual(_rl_process.separator_id(config, TOK), SEP)
    self.assertEqual(_rl_process.max_steps(config), config.rl.max_new_tokens)
    config.reward.step_separator = "ab"
    with self.assertRaisesRegex(ValueError, "step_separator='ab' is 2 tok"):
      _rl_process.separator_id(config, TOK)

  def test_bad_rank_raises(self):
    tokens, mask = _rollout()
    with self.assertRaises(jaxtyping.TypeCheckError):
      _rl_process.segment_steps(
        tokens[0], mask[0], max_steps=2, separator_id=SEP, eos_id=EOS
      )


class PureTest(absltest.TestCase):
  def test_step_rewards_and_token_advantages(self):
    tokens, mask = _rollout()
    n, t = tokens.shape
    s_max = 4
    config = _config("pure_min", process_model="given")
    config.reward.step_separator = "\n"
    config.reward.max_steps = s_max
    config.reward.verifiable_rewards = True
    config.rl.num_generations = G
    _, _, ahyper = rl._check(config)
    # A random PRM, explicitly (tests only): a ValueModel of config.model.
    cfg = _setup.model_config(config.model)
    prm = models.build_model("value", cfg, rngs=nnx.Rngs(3))
    gd, params, rest = nnx.split(prm, nnx.Param, ...)
    mesh, rules = _setup.mesh_of(config), _setup.rules_of(config)
    proc = _rl_process.ProcessInputs(
      config,
      tokenizer=TOK,
      task=None,
      policy=None,  # pure_min runs no policy forward
      reference_params=None,
      mesh=mesh,
      rules=rules,
      process_reward_model=(params, gd, rest),
    )
    p = 3
    prompt = np.array([[PAD, 120, 62]] * n, np.int32)
    p_mask = prompt != PAD
    full = np.concatenate([prompt, tokens], 1)
    attn = np.concatenate([p_mask, mask], 1)
    loss_mask = np.concatenate([np.zeros((n, p - 1), bool), mask], 1)
    sample = _Sample(prompt, p_mask, tokens, mask)
    seq_r = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    extra, metrics = proc.derive(
      params, sample, full, attn, loss_mask, seq_r, [{}] * n, None, None
    )
    values = np.asarray(prm(jnp.asarray(full), attention_mask=attn), np.float64)
    want_r = np.zeros((n, s_max))
    want_mask = np.zeros((n, s_max), bool)
    index = np.zeros((n, t), int)
    lengths = np.zeros((n, s_max))
    for i in range(n):
      index[i], ends, lengths[i], k = _np_segment(tokens[i], mask[i], SEP, 4)
      k = min(k, s_max)
      want_mask[i, :k] = True
      want_r[i, :k] = 2 * _np_sigmoid(values[i, p + ends[:k]]) - 1
    np.testing.assert_allclose(extra["step_rewards"], want_r, atol=1e-5)
    self.assertAlmostEqual(
      metrics["step_reward"], want_r[want_mask].mean(), places=5
    )
    adv, _ = rl.compute_advantages(
      config, ahyper, seq_r, mask.sum(1), loss_mask, None, G, extra
    )
    # NumPy PURE: min-form credit, token RLOO baseline, verifiable reward
    # (own RLOO) on the last step, return-to-go, broadcast to tokens.
    temp = ahyper["temperature"]
    credit = np.zeros((n, s_max))
    for i in range(n):
      r = want_r[i][want_mask[i]]
      w = np.exp(-r / temp - np.max(-r / temp))
      credit[i, : len(r)] = w / w.sum() * r
    total, length = credit.sum(1), lengths.sum(1)
    step_adv = np.zeros((n, s_max))
    for b in range(n // G):
      rows = np.arange(b * G, (b + 1) * G)
      for i in rows:
        others = rows[rows != i]
        base = total[others].sum() / length[others].sum()
        c = np.where(want_mask[i], credit[i] - base * lengths[i], 0.0)
        v = seq_r[i] - seq_r[others].mean()
        c[want_mask[i].sum() - 1] += ahyper["verifiable_coef"] * v
        step_adv[i] = np.where(want_mask[i], np.cumsum(c[::-1])[::-1], 0)
    want_tok = np.where(
      mask, np.take_along_axis(step_adv, np.maximum(index, 0), 1), 0
    )
    np.testing.assert_allclose(np.asarray(adv)[:, : p - 1], 0.0)
    np.testing.assert_allclose(np.asarray(adv)[:, p - 1 :], want_tok, atol=1e-5)


class _Sample:
  def __init__(self, prompt_tokens, prompt_mask, completion_tokens, mask):
    self.prompt_tokens = jnp.asarray(prompt_tokens)
    self.prompt_mask = jnp.asarray(prompt_mask)
    self.completion_tokens = jnp.asarray(completion_tokens)
    self.completion_mask = jnp.asarray(mask)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class IgpoTest(absltest.TestCase):
  def test_answer_logps_and_information_gain(self):
    cfg = models.get_preset("tiny", n_layers=1)
    lm = models.build_model("causal_lm", cfg, rngs=nnx.Rngs(1))
    prompt = np.array([[PAD, 120, 62], [119, 121, 62]], np.int32)
    p_mask = prompt != PAD
    comp = np.array([[97, SEP, 98, EOS, PAD], [99, 100, SEP, 101, SEP]])
    c_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    steps = _rl_process.segment_steps(
      comp, c_mask, max_steps=3, separator_id=SEP, eos_id=EOS
    )
    cut = _rl_process.answer_cutoffs(steps.step_ends, steps.step_mask)
    np.testing.assert_array_equal(cut, [[0, 2, 3, 0], [0, 3, 5, 0]])
    a_tok, a_mask = _rl_process.encode_answers(["ab", "hello"], TOK)
    self.assertEqual(a_tok.shape, (2, 8))
    got = jax.jit(
      lambda *a: _rl_process.answer_logps(lm, *a, pad_id=PAD, chunk_size=64)
    )(prompt, p_mask, comp, cut, a_tok, a_mask)
    # Each prefix on its own: unpadded sequence, right-padded to 16 (a
    # causal model's real positions ignore what follows).
    seqs, lens = [], []
    for i in range(2):
      answer = list(a_tok[i][a_mask[i]])
      for k in range(4):
        seq = list(prompt[i][p_mask[i]]) + list(comp[i, : cut[i, k]]) + answer
        lens.append((len(seq), len(answer)))
        seqs.append(seq + [PAD] * (16 - len(seq)))
    logits = (
      jax.jit(lambda x, m: lm.hidden(x, attention_mask=m))(
        np.array(seqs), np.array(seqs) != PAD
      )
      @ lm.unembedding()
    )
    logits = np.asarray(logits, np.float64)
    want = np.zeros(8)
    for j, (length, a_len) in enumerate(lens):
      lp = _np_log_softmax(logits[j, : length - 1])
      lp = lp[np.arange(length - 1), seqs[j][1:length]]
      want[j] = lp[-a_len:].mean()
    want = want.reshape(2, 4)
    np.testing.assert_allclose(got, want, atol=2e-5)
    gain = np.asarray(
      jax.jit(
        lambda a, m: _rl_process.adv_lib.information_gain_rewards(
          a[:, 1:], a[:, 0], m
        )
      )(got, steps.step_mask)
    )
    p = np.exp(want)
    np.testing.assert_allclose(
      gain[0], [p[0, 1] - p[0, 0], p[0, 2] - p[0, 1], 0], atol=1e-7
    )
    np.testing.assert_allclose(gain[1, :2], np.diff(p[1, :3]), atol=1e-7)

  def test_answers_from_records_and_the_synthetic_task(self):
    config = _config("igpo")
    task = rl.policy_eval.task_of(config)
    texts = _rl_process.answer_texts(
      config, [{"prompt": "abc>", "answer": "42"}, {"prompt": "xyz>"}], task
    )
    self.assertEqual(texts, ["42", task.preferred_letters("xyz>")])
    with self.assertRaisesRegex(ValueError, "answer_key='answer'"):
      _rl_process.answer_texts(config, [{"prompt": "q"}], None)


class PrimeTest(absltest.TestCase):
  def test_implicit_prm_loss_matches_numpy(self):
    rng = np.random.default_rng(0)
    lp = rng.normal(size=(4, 6)).astype(np.float32)
    ref = rng.normal(size=(4, 6)).astype(np.float32)
    mask = np.arange(6)[None] < np.array([[6], [3], [1], [0]])
    y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    beta = 0.3
    loss, aux = jax.jit(
      lambda *a: _rl_process.implicit_prm_loss(*a, beta=beta)
    )(
      testing.with_nan_padding(lp, mask),
      testing.with_nan_padding(ref, mask),
      mask,
      y,
    )
    s = beta * np.where(mask, lp.astype(np.float64) - ref, 0).sum(1)
    want = -(y * np.log(_np_sigmoid(s)) + (1 - y) * np.log(_np_sigmoid(-s)))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux.score, s, rtol=1e-5)
    self.assertAlmostEqual(float(loss[3]), np.log(2), places=6)  # π_φ = π_ref
    g_lp, g_ref = testing.grads(
      lambda a, b: _rl_process.implicit_prm_loss(a, b, mask, y, beta=beta),
      (lp, ref),
      (0, 1),
    )
    np.testing.assert_array_equal(g_ref, 0.0)
    np.testing.assert_allclose(
      g_lp, np.where(mask, beta * (_np_sigmoid(s) - y)[:, None], 0), rtol=1e-5
    )
    bf16 = _rl_process.implicit_prm_loss(
      lp.astype(jnp.bfloat16), ref, mask, y, beta=beta
    )[0]
    self.assertEqual(bf16.dtype, jnp.float32)
    with self.assertRaisesRegex(ValueError, "beta"):
      _rl_process.implicit_prm_loss(lp, ref, mask, y, beta=0.0)

  def test_batch_norm_matches_numpy(self):
    rng = np.random.default_rng(1)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.arange(5)[None] < np.array([[5], [2], [4]])
    got = jax.jit(_rl_process.prime_batch_norm)(r, mask)
    rm = np.where(mask, r.astype(np.float64), 0)
    to_go = np.cumsum(rm[:, ::-1], 1)[:, ::-1]
    np.testing.assert_allclose(got, rm / (np.abs(to_go).max() + 1e-6), 1e-5)

  def test_online_update_loss_and_rewards(self):
    config = _config("prime")
    config.rl.num_generations = G
    config.reward.implicit_prm.update = "after"
    config.reward.implicit_prm.norm = "none"
    mesh, rules = _setup.mesh_of(config), _setup.rules_of(config)
    policy, _ = _setup.build_model("causal_lm", config.model, mesh, rules, 0)
    ref_params = jax.tree.map(lambda x: x * 1.01, policy.params)
    proc = _rl_process.ProcessInputs(
      config,
      tokenizer=TOK,
      task=None,
      policy=policy,
      reference_params=policy.params,
      mesh=mesh,
      rules=rules,
    )
    tokens, mask = _rollout()
    n = 8
    tokens, mask = np.tile(tokens, (2, 1)), np.tile(mask, (2, 1))
    prompt = np.array([[PAD, 120, 62]] * n, np.int32)
    full = np.concatenate([prompt, tokens], 1)
    attn = np.concatenate([prompt != PAD, mask], 1)
    loss_mask = np.concatenate([np.zeros((n, 2), bool), mask], 1)
    sample = _Sample(prompt, prompt != PAD, tokens, mask)
    seq_r = np.linspace(0, 1, n).astype(np.float32)
    ref_lp = proc._logps(ref_params, full, attn, loss_mask)
    prm_lp = np.asarray(
      proc._logps(proc.state["params"], full, attn, loss_mask)
    )
    extra, metrics = proc.derive(
      None, sample, full, attn, loss_mask, seq_r, [{}] * n, ref_lp, None
    )
    beta = config.reward.implicit_prm.beta
    q = np.where(loss_mask, prm_lp.astype(np.float64) - ref_lp, 0)
    s = beta * q.sum(1)
    y = (seq_r > config.reward.implicit_prm.threshold).astype(np.float64)
    bce = -(y * np.log(_np_sigmoid(s)) + (1 - y) * np.log(_np_sigmoid(-s)))
    self.assertAlmostEqual(metrics["prm_loss"], bce.mean(), places=5)
    # update="after": rewards from the PRM before its update.
    np.testing.assert_allclose(extra["process_rewards"], beta * q, atol=1e-6)
    self.assertEqual(int(proc.state["step"]), 1)
    moved = jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))),
      proc.state["params"],
      policy.params,
    )
    self.assertGreater(max(jax.tree.leaves(moved)), 0.0)


class ConfigErrorsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("no_prm", "pure_min", {}, "set config.reward.process_model"),
    ("max_steps", "igpo", dict(max_steps=-1), "max_steps=-1"),
  )
  def test_bad_reward_config(self, advantage, reward, regex):
    with self.assertRaisesRegex(ValueError, regex):
      rl._check(_config(advantage, **reward))

  @parameterized.parameters(
    ("update", "during", "update='during'; valid choices are \\('before'"),
    ("norm", "l2", "norm='l2'; valid choices are \\('batch_norm', 'none'\\)"),
    ("beta", 0.0, "implicit_prm.beta=0.0; it must be > 0"),
  )
  def test_bad_implicit_prm(self, key, value, regex):
    config = _config("prime")
    config.reward.implicit_prm[key] = value
    with self.assertRaisesRegex(ValueError, regex):
      rl._check(config)

  @parameterized.parameters("pure_min", "igpo", "prime")
  def test_kl_in_reward_is_refused(self, advantage):
    config = _config(advantage, process_model="x")
    config.kl.mode = "reward"
    with self.assertRaisesRegex(ValueError, "kl.mode='loss'"):
      rl._check(config)

  def test_process_model_path_is_checked(self):
    config = _config("pure_min", process_model="/nonexistent")
    mesh, rules = _setup.mesh_of(config), _setup.rules_of(config)
    with self.assertRaisesRegex(ValueError, "process_model='/nonexistent'"):
      _rl_process.load_process_reward_model(
        "/nonexistent", config.model, mesh, rules
      )

  def test_process_estimator_needs_its_arrays(self):
    config = _config("igpo")
    _, _, ahyper = rl._check(config)
    with self.assertRaisesRegex(ValueError, "needs 'information_gain'"):
      rl.compute_advantages(
        config,
        ahyper,
        np.zeros(8, np.float32),
        np.ones(8, np.int32),
        np.ones((8, 5), bool),
        None,
        4,
      )


if __name__ == "__main__":
  absltest.main()
