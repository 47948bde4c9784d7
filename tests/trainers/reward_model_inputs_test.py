"""What the reward-model trainer feeds each objective, and when it refuses.

* Every named variant of ``configs/reward_model.py`` (objectives whose
  inputs need a particular head or data column: BT regression, scaled BT,
  the ties models, BRME, adaptive margin, SCAN) passes the start check on
  the synthetic data and traces its train step (``jax.eval_shape``, nothing
  compiled) on a real batch of that data; BRME scores with its nominal
  reward.
* The inputs read from data columns and step labels have the documented
  values (regression targets = scores = the synthetic task's gold reward;
  magnitude; ties; SCAN's outcome).
* Objectives that cannot be fed fail at start with a message naming
  ``config.loss.name``, the missing arrays, the head and what is supplied;
  ``run`` fails before building a model when the data lacks a column.
* Outputs are read by the model's kind, never by their rank: a GPM's
  ``[B, D]`` embeddings are not an ensemble's ``[M, B]`` scores, even when
  the shapes coincide.
"""

import pathlib
import re
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

from alignment import config_lib, losses, models
from alignment import data as data_lib
from alignment.data import batches as data_batches
from alignment.data import synthetic
from alignment.trainers import _data, _setup, common, rl
from alignment.trainers import reward_model as rm
from tests.trainers import _util

MODEL = models.get_preset("tiny", n_layers=1)
TX = optax.adamw(1e-3)
VARIANTS = _util.config_module("reward_model").VARIANTS
HEADS = {  # variant -> model kind
  "bt_regression": "reward",
  "scaled_bt": "reward",
  "ties_rao_kupper": "reward",
  "ties_davidson": "reward",
  "brme": "ensemble_stacked",
  "adaptive_margin": "ensemble_heads",
  "prm_scan": "value",
  "multi_objective_regression": "multi_objective_reward",
}
_TMP = None


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix="alignment-rm-inputs-")


def tearDownModule():
  _TMP.cleanup()


def _config(arg):
  config = _util.load_config("reward_model", arg)
  config.data.data_dir = str(pathlib.Path(_TMP.name) / "data")
  return config


def _abstract(kind, **kwargs):
  module = nnx.eval_shape(
    lambda: models.build_model(kind, MODEL, rngs=nnx.Rngs(0), **kwargs)
  )
  return nnx.split(module, nnx.Param, ...)


def _state(params):
  return {
    "params": params,
    "opt_state": jax.eval_shape(TX.init, params),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }


def _tokens(n, length=10, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(3, 200, (n, length)), jnp.int32)


class VariantsTest(parameterized.TestCase):
  def test_variants_cover_the_objectives_that_need_inputs(self):
    self.assertEqual(set(VARIANTS), set(HEADS))
    for name, (loss, _) in VARIANTS.items():
      self.assertIn(loss, losses.REWARD_MODEL_LOSSES, name)
    with self.assertRaisesRegex(ValueError, "variant='nope'"):
      _util.load_config("reward_model", "variant=nope")
    with self.assertRaisesRegex(ValueError, "trains 'brme', not loss='gpm'"):
      _util.load_config("reward_model", "variant=brme,loss=gpm")

  @parameterized.named_parameters(*[(v, v) for v in sorted(VARIANTS)])
  def test_variant_feeds_its_objective_on_synthetic_data(self, variant):
    config = _config(f"variant={variant},members=2,runlocal")
    self.assertEqual(config.loss.name, VARIANTS[variant][0])
    kind, kwargs = rm.model_kind(config)
    self.assertEqual(kind, HEADS[variant])
    batches = _data.iterator(
      config, rm.data_kind(config), _data.tokenizer_of(config)
    )
    columns = rm.data_columns(batches)
    if rm.data_kind(config) == "preference":
      # The synthetic gold reward; attribute ratings when the task rates.
      rated = variant == "multi_objective_regression"
      self.assertEqual(columns, ("scores", "ratings") if rated else ("scores",))
    rm.check_inputs(config, columns)  # the start check of rm.run
    graphdef, params, rest = _abstract(kind, **kwargs)
    step = common.make_train_step(rm.make_loss_fn(graphdef, rest, config), TX)
    state, metrics = jax.eval_shape(step, _state(params), None, next(batches))
    self.assertEqual(
      jax.tree.structure(state["params"]), jax.tree.structure(params)
    )
    self.assertEqual(metrics["rm_loss"].shape, ())
    if rm.data_kind(config) == "preference":
      self.assertIn("accuracy", metrics)
    else:
      self.assertIn("step_accuracy", metrics)

  def test_brme_scores_with_the_nominal_reward(self):
    config = _config("variant=brme,members=2,runlocal")
    kind, kwargs = rm.model_kind(config)
    self.assertEqual(kwargs["member_kind"], "gaussian_reward")
    graphdef, params, rest = _abstract(kind, **kwargs)
    self.assertEqual(rm.head_kind(nnx.merge(graphdef, params, rest)), kind)
    tokens = jax.ShapeDtypeStruct((3, 10), jnp.int32)
    mask = jax.ShapeDtypeStruct((3, 10), jnp.bool_)
    # Evaluation scores are [B] (the most confident member), not [M, B].
    score = jax.eval_shape(
      rm.make_score_fn(graphdef, rest), params, tokens, mask
    )
    self.assertEqual(score.shape, (3,))


class InputsTest(absltest.TestCase):
  def test_synthetic_scores_are_the_gold_reward(self):
    config = _config("variant=bt_regression,runlocal")
    config.data.shuffle = False
    batches = _data.iterator(config, "preference", _data.tokenizer_of(config))
    self.assertTrue(batches.has_scores)
    self.assertFalse(batches.has_margin)
    batch = next(batches)
    task = synthetic.LettersTask(**config.data.task)
    rows = task.preference_pairs(config.data.num_examples, 0)
    idx = batches.last_source_indices
    np.testing.assert_allclose(
      batch.chosen_score, [rows[i]["gold_chosen"] for i in idx], rtol=1e-6
    )
    np.testing.assert_allclose(
      batch.rejected_score, [rows[i]["gold_rejected"] for i in idx], rtol=1e-6
    )

  def test_column_arrays(self):
    cfg = config_lib.data(
      "synthetic", max_prompt_len=8, max_completion_len=8, shuffle=False
    )
    tok = data_lib.load_tokenizer("byte")
    base = {"prompt": "ab>", "chosen": "x", "rejected": "y"}
    rows = [
      dict(base, chosen_score=3.0, rejected_score=1.0),
      dict(base, chosen_score=2.0, rejected_score=2.0),
      dict(base, chosen_score=0.0, rejected_score=0.5),
    ]
    batch = next(
      data_lib.make_iterator("preference", cfg, tok, batch_size=3, rows=rows)
    )
    got = rm.column_arrays(batch)
    self.assertEqual(
      set(got), {"chosen_targets", "rejected_targets", "magnitude", "ties"}
    )
    np.testing.assert_allclose(got["chosen_targets"], [3.0, 2.0, 0.0])
    np.testing.assert_allclose(got["rejected_targets"], [1.0, 2.0, 0.5])
    np.testing.assert_allclose(got["magnitude"], [2.0, 0.0, 0.5])
    np.testing.assert_array_equal(got["ties"], [False, True, False])
    # A margin column wins for magnitude and ties.
    margin = np.array([0.0, 1.0, -2.0], np.float32)
    got = rm.column_arrays(batch._replace(margin=margin))
    np.testing.assert_allclose(got["margin"], margin)
    np.testing.assert_allclose(got["magnitude"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(got["ties"], [True, False, False])
    none = rm.column_arrays(
      batch._replace(chosen_score=None, rejected_score=None)
    )
    self.assertEqual(none, {})

  def test_step_arrays(self):
    batch = data_batches.StepBatch(
      np.zeros((3, 6), np.int32),
      np.ones((3, 6), bool),
      np.zeros((3, 3), np.int32),
      np.array([[1.0, 0.25, 1.0], [1.0, 0.0, 9.0], [0.5, 0.6, 0.0]]),
      np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0]], bool),
      np.ones(3, bool),
    )
    got = rm.step_arrays(batch, self_confidence=0.8)
    # The outcome is the last real step's label (padding ignored).
    np.testing.assert_array_equal(got["outcome_correct"], [True, False, True])
    np.testing.assert_allclose(got["step_mc_scores"], batch.step_labels)
    np.testing.assert_allclose(got["self_confidence"], [0.8] * 3)
    np.testing.assert_array_equal(got["step_labels"], batch.step_labels > 0.5)
    # prm_scan on these inputs: row 0 correct (all steps), row 1 wrong with
    # the error at step 1, row 2 correct.
    _, aux = jax.jit(losses.prm_scan_loss)(
      jnp.zeros((3, 3)),
      got["step_mc_scores"],
      got["self_confidence"],
      got["outcome_correct"],
      got["step_mask"],
    )
    np.testing.assert_array_equal(
      aux.step_mask, [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    )


class RefusalsTest(absltest.TestCase):
  def test_no_data_can_feed_it_fails_in_loss_spec(self):
    cases = {
      "bt_adaptive_margin": r"\['ensemble_chosen_rewards', "
      r"'ensemble_rejected_rewards'\].*ensemble=heads",
    }
    for name, detail in cases.items():
      config = _config(f"loss={name},runlocal")
      with self.assertRaisesRegex(
        ValueError,
        rf"config.loss.name='{name}' needs arrays {detail}",
      ):
        rm.loss_spec(config)
      with self.assertRaisesRegex(ValueError, r"'reward' head .* supplies"):
        rm.loss_spec(config)

  def test_missing_data_column_is_named(self):
    for name, missing in (
      ("bt_regression", ["chosen_targets", "rejected_targets"]),
      ("scaled_bt", ["magnitude"]),
      ("bt_ties_rao_kupper", ["ties"]),
      ("bt_ties_davidson", ["ties"]),
      ("multi_objective_regression", ["rewards", "targets"]),
    ):
      config = _config(f"loss={name},runlocal")
      rm.loss_spec(config)  # some data can feed it
      with self.assertRaisesRegex(
        ValueError,
        re.escape(f"'{name}' needs arrays {missing}")
        + r".*with columns \[\].*(chosen_score|chosen_ratings)",
      ):
        rm.check_inputs(config, ())
    # A margin column alone feeds scaled BT and the ties models.
    rm.check_inputs(_config("loss=scaled_bt,runlocal"), ("margin",))
    rm.check_inputs(_config("loss=bt_ties_davidson,runlocal"), ("margin",))

  def test_run_fails_before_building_the_model(self):
    path = pathlib.Path(_TMP.name) / "pairs.jsonl"
    path.write_text('{"prompt": "ab>", "chosen": "a", "rejected": "z"}\n' * 4)
    config = _config("variant=bt_regression,runlocal")
    config.data.source = "jsonl"
    config.data.path = str(path)
    with mock.patch.object(
      _setup, "setup_run", side_effect=AssertionError("model built")
    ):
      with self.assertRaisesRegex(
        ValueError, r"needs arrays \['chosen_targets', 'rejected_targets'\]"
      ):
        rm.run(config, str(pathlib.Path(_TMP.name) / "run"))

  def test_heads_that_cannot_be_ensembled(self):
    with self.assertRaisesRegex(ValueError, "'brme' needs Gaussian ensemble"):
      rm.model_kind(_config("loss=brme,ensemble=heads,runlocal"))
    with self.assertRaisesRegex(
      ValueError, "ensemble.kind='stacked' ensembles scalar reward heads"
    ):
      rm.model_kind(_config("loss=gaussian_bt,ensemble=stacked,runlocal"))
    # BRME without an ensemble arg still gets M Gaussian members.
    kind, kwargs = rm.model_kind(_config("loss=brme,members=3,runlocal"))
    self.assertEqual(
      (kind, kwargs["num_members"], kwargs["member_kind"]),
      ("ensemble_stacked", 3, "gaussian_reward"),
    )


class _SquareGPM(models.PreferenceEmbeddingModel):
  """A GPM stub: the tokens as ``[N, D]`` "embeddings" (D = L)."""

  def __init__(self):
    pass

  def __call__(self, tokens, *, attention_mask=None):
    del attention_mask
    return tokens.astype(jnp.float32)


class _SquareHeads(models.MultiHeadEnsembleRewardModel):
  """An ensemble stub: the tokens as ``[M, N]`` member scores (M = L)."""

  def __init__(self):
    pass

  def __call__(self, tokens, *, attention_mask=None):
    del attention_mask
    return tokens.astype(jnp.float32).T


class ByKindNotRankTest(absltest.TestCase):
  """B = 2 pairs give 2B = 4 rows of 4 tokens: a GPM with D = 4 and an
  ensemble with M = 4 both output square [4, 4] arrays."""

  def test_pair_forward_and_scores(self):
    c, r = _tokens(2, length=4, seed=1), _tokens(2, length=4, seed=2)
    ones = jnp.ones(c.shape, bool)
    batch = data_batches.PreferenceBatch(
      c, ones, ones, r, ones, ones, jnp.ones(2, bool)
    )
    gpm, heads = _SquareGPM(), _SquareHeads()
    self.assertEqual(rm.head_kind(gpm), "preference_embedding")
    self.assertEqual(rm.head_kind(heads), "ensemble_heads")
    both = jnp.concatenate([c, r]).astype(jnp.float32)
    got_c, got_r = rm._pair_forward(gpm, batch)  # rows: [B, D]
    np.testing.assert_array_equal(got_c, both[:2])
    np.testing.assert_array_equal(got_r, both[2:])
    got_c, got_r = rm._pair_forward(heads, batch)  # columns: [M, B]
    np.testing.assert_array_equal(got_c, both.T[:, :2])
    np.testing.assert_array_equal(got_r, both.T[:, 2:])
    # Scores: an ensemble's member mean; a GPM has none.
    ens = both.T
    np.testing.assert_allclose(
      rm.scalar_score(ens, "ensemble_heads"), ens.mean(0), rtol=1e-6
    )
    np.testing.assert_array_equal(rm.scalar_score(ens[0], "reward"), ens[0])
    with self.assertRaisesRegex(ValueError, "no scalar score"):
      rm.scalar_score(both, "preference_embedding")
    gauss = models.GaussianReward(ens, -ens / 100)
    np.testing.assert_allclose(
      rm.scalar_score(gauss, "ensemble_stacked"),
      losses.brme_nominal_reward(ens, -ens / 100),
    )
    np.testing.assert_array_equal(
      rm.scalar_score(gauss, "gaussian_reward"), ens
    )

  def test_rl_reward_scorer_reads_the_kind(self):
    config = _util.load_config("rl", "reward=model,runlocal")
    tok = _data.tokenizer_of(config)
    graphdef, params, rest = _abstract("preference_embedding", embed_dim=4)
    with self.assertRaisesRegex(ValueError, "GPM"):
      rl.RewardScorer(
        config, tok, reward_params=params, reward_model=(graphdef, rest)
      )
    # M = 3 members, N = 4 samples: the aggregate is over members, [N].
    graphdef, params, rest = _abstract("ensemble_heads", num_heads=3)
    scorer = rl.RewardScorer(
      config, tok, reward_params=params, reward_model=(graphdef, rest)
    )
    tokens = jax.ShapeDtypeStruct((4, 10), jnp.int32)
    mask = jax.ShapeDtypeStruct((4, 10), jnp.bool_)
    self.assertEqual(
      jax.eval_shape(scorer._score, params, tokens, mask).shape, (4,)
    )


if __name__ == "__main__":
  absltest.main()
