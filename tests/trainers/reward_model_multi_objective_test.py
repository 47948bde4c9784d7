"""``multi_objective_regression`` through the reward-model trainer.

* Data: the optional ``chosen_ratings`` / ``rejected_ratings`` columns of
  preference rows (JSONL through the generic builder with a field map,
  in-memory rows): NaN / null mark unrated attributes; bad input fails
  naming the file, line and field; K must agree across rows and with the
  head (``config.reward_model.direction``).
* The synthetic task rates its documented attributes (exact values plus
  rater noise) without changing its pairs.
* The trainer's loss function feeds the K heads of both responses against
  their ratings: a hand-built batch (NaN ratings, an unrated response, a
  filler row) gives the float64 NumPy loss, and a few optimiser steps
  reduce it.
* Evaluation: :func:`reward_model.attribute_report` equals a NumPy
  RMSE / Pearson recomputation (the end-to-end run of the variant is in
  ``reward_model_multi_objective_run_test.py``).
"""

import json
import math
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from flax import nnx

from alignment import config_lib, models
from alignment import data as data_lib
from alignment.data import batches as data_batches
from alignment.data import builders, synthetic
from alignment.data.records import DataError, RowError
from alignment.trainers import common
from alignment.trainers import reward_model as rm
from tests.trainers import _util

TOK = data_lib.load_tokenizer("byte")
_TMP = None


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix="alignment-rm-mo-")


def tearDownModule():
  _TMP.cleanup()


def _tmp(name):
  return pathlib.Path(_TMP.name) / name


def _jsonl(name, rows):
  path = _tmp(name)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _data_cfg(path, **kw):
  return config_lib.data(
    "jsonl",
    path=str(path),
    data_dir=str(_tmp("tfds")),
    max_prompt_len=8,
    max_completion_len=8,
    shuffle=False,
    **kw,
  )


def _config(arg="variant=multi_objective_regression,runlocal"):
  config = _util.load_config("reward_model", arg)
  config.data.data_dir = str(_tmp("data"))
  config.eval_data.data_dir = str(_tmp("data"))
  config.progress = False
  return config


def _pair(**kw):
  return dict({"prompt": "ab>", "chosen": "abc", "rejected": "xyz"}, **kw)


class DataColumnsTest(absltest.TestCase):
  def test_jsonl_ratings_with_a_field_map_and_unrated_values(self):
    path = _tmp("rated.jsonl")
    # NaN (Python's JSON extension) and null both mark an unrated value.
    path.write_text(
      '{"prompt": "ab>", "chosen": "a", "rejected": "z", '
      '"r": {"c": [1, 2.5, null], "j": [0, NaN, 4]}}\n'
      '{"prompt": "cd>", "chosen": "c", "rejected": "y", '
      '"r": {"c": [3, 1, 2], "j": [1, 1, 1]}}\n'
    )
    cfg = _data_cfg(
      path,
      field_map={"chosen_ratings": "r.c", "rejected_ratings": "r.j"},
    )
    it = data_lib.make_iterator("preference", cfg, TOK, batch_size=2)
    self.assertEqual(it.num_ratings, 3)
    self.assertEqual(it.ratings_source, f"{path}:1")
    self.assertEqual(rm.data_columns(it), ("ratings",))
    b = next(it)
    np.testing.assert_array_equal(
      b.chosen_ratings, [[1, 2.5, np.nan], [3, 1, 2]]
    )
    np.testing.assert_array_equal(
      b.rejected_ratings, [[0, np.nan, 4], [1, 1, 1]]
    )
    self.assertEqual(b.chosen_ratings.dtype, np.float32)
    # The trainer's targets: chosen rows then rejected rows, 0 where unrated.
    cols = rm.column_arrays(b)
    np.testing.assert_array_equal(
      cols["targets"], [[1, 2.5, 0], [3, 1, 2], [0, 0, 4], [1, 1, 1]]
    )
    np.testing.assert_array_equal(
      cols["target_mask"],
      [[1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1]],
    )
    # Data without ratings carries none.
    plain = _jsonl("plain.jsonl", [_pair(), _pair()])
    it = data_lib.make_iterator(
      "preference", _data_cfg(plain), TOK, batch_size=2
    )
    self.assertEqual(it.num_ratings, 0)
    self.assertIsNone(next(it).chosen_ratings)

  def test_bad_rows_name_the_field(self):
    cases = [
      (_pair(chosen_ratings=[1.0]), "missing_field", "rejected_ratings"),
      (
        _pair(chosen_ratings=[1, 2], rejected_ratings=[1]),
        "bad_value",
        "rejected_ratings",
      ),
      (
        _pair(chosen_ratings=[], rejected_ratings=[]),
        "bad_value",
        "chosen_ratings",
      ),
      (
        _pair(chosen_ratings=[1, math.inf], rejected_ratings=[1, 2]),
        "bad_value",
        "chosen_ratings[1]",
      ),
      (
        _pair(chosen_ratings=["4", 1], rejected_ratings=[1, 2]),
        "wrong_type",
        "chosen_ratings[0]",
      ),
      (
        _pair(chosen_ratings=[True], rejected_ratings=[1]),
        "wrong_type",
        "chosen_ratings[0]",
      ),
      (_pair(chosen_ratings=3.0, rejected_ratings=[1]), "wrong_type", None),
    ]
    for row, kind, field in cases:
      with self.subTest(row=row):
        with self.assertRaises(RowError) as cm:
          builders.convert_generic(row, "preference", {})
        self.assertEqual(cm.exception.kind, kind)
        if field:
          self.assertEqual(cm.exception.field, field)
    # Through a build: file, line and the mapped field path.
    path = _jsonl(
      "bad.jsonl",
      [
        _pair(c=[1, 2], j=[1, 2]),
        _pair(c=[1, 2], j=[1, -math.inf]),
      ],
    )
    cfg = _data_cfg(
      path, field_map={"chosen_ratings": "c", "rejected_ratings": "j"}
    )
    with self.assertRaisesRegex(
      DataError, rf"{path}:2: field 'j\[1\]': not finite"
    ):
      data_lib.make_iterator("preference", cfg, TOK, batch_size=2)

  def test_k_must_agree_across_rows_and_with_the_head(self):
    path = _jsonl(
      "k.jsonl",
      [
        _pair(chosen_ratings=[1, 2], rejected_ratings=[1, 2]),
        _pair(chosen_ratings=[1, 2, 3], rejected_ratings=[1, 2, 3]),
      ],
    )
    with self.assertRaisesRegex(
      DataError,
      rf"{path}:2: field 'chosen_ratings': 3 ratings per response, but the "
      rf"first rated row \({path}:1\) has 2",
    ):
      data_lib.make_iterator("preference", _data_cfg(path), TOK, batch_size=2)
    rows = [
      _pair(chosen_ratings=[1, 2], rejected_ratings=[1, 2]),
      _pair(chosen_ratings=[1, 2], rejected_ratings=[1, 2, 3]),
    ]
    cfg = _data_cfg(path)
    with self.assertRaisesRegex(
      DataError, r"rows:2: field 'rejected_ratings': 3 ratings"
    ):
      data_lib.make_iterator("preference", cfg, TOK, batch_size=2, rows=rows)
    # Two ratings per response against a 3-head model: named at start.
    it = data_lib.make_iterator(
      "preference", cfg, TOK, batch_size=2, rows=rows[:1] * 2
    )
    config = _config()
    with self.assertRaisesRegex(
      ValueError,
      r"config.data carries 2 ratings per response .*rows:1.*"
      r"config.reward_model.direction has K=3",
    ):
      rm.check_num_ratings(config, it)
    config.reward_model.direction = [0.5, 0.5]
    rm.check_num_ratings(config, it)
    config.reward_model.attributes = ["a", "b", "c"]
    with self.assertRaisesRegex(ValueError, "attributes names 3"):
      rm.attribute_names(config)


class SyntheticRatingsTest(absltest.TestCase):
  def test_ratings_are_the_attributes_plus_rater_noise(self):
    plain = synthetic.LettersTask()
    rated = synthetic.LettersTask(attributes=synthetic.ATTRIBUTES)
    exact = synthetic.LettersTask(
      attributes=synthetic.ATTRIBUTES, rating_noise=0.0
    )
    rows, noisy, clean = (
      t.preference_pairs(400, 3) for t in (plain, rated, exact)
    )
    keys = ("chosen_ratings", "rejected_ratings")
    # The pairs and labels do not change.
    self.assertEqual(
      [{k: v for k, v in r.items() if k not in keys} for r in noisy], rows
    )
    pred = set("abcdefghijklm")
    for r in clean[:50]:
      for side in ("chosen", "rejected"):
        y, x = r[side][:8], r["prompt"][:-1]
        want = [
          sum(c in pred for c in y) / 8,
          sum(c in x for c in y) / 8,
          len(set(y)) / 8,
          sum(c in "aeiou" for c in y) / 8,
          len(y) / 8,
        ]
        np.testing.assert_allclose(r[f"{side}_ratings"], want)
        self.assertEqual(r[f"gold_{side}"], want[0])
    diff = np.array([n[k] for n in noisy for k in keys]) - np.array(
      [c[k] for c in clean for k in keys]
    )
    self.assertAlmostEqual(diff.std(), 0.05, delta=0.005)
    self.assertAlmostEqual(diff.mean(), 0.0, delta=0.005)
    with self.assertRaisesRegex(ValueError, "attributes"):
      synthetic.LettersTask(attributes=("gold", "nope"))
    with self.assertRaisesRegex(ValueError, "rating_noise"):
      synthetic.LettersTask(rating_noise=-1.0)


def _tiny_model(k=3):
  cfg = models.get_preset("tiny", n_layers=1)
  return _util.split_model("multi_objective_reward", cfg, num_objectives=k)


def _hand_batch():
  rng = np.random.default_rng(0)
  b, length = 4, 10
  tokens = rng.integers(3, 200, (2, b, length)).astype(np.int32)
  tokens[1, :, :4] = tokens[0, :, :4]  # a pair shares its prompt
  attn = np.ones((b, length), bool)
  attn[1, -3:] = False
  comp = attn.copy()
  comp[:, :4] = False
  c_ratings = rng.uniform(-1, 1, (b, 3)).astype(np.float32)
  r_ratings = rng.uniform(-1, 1, (b, 3)).astype(np.float32)
  c_ratings[0, 1] = np.nan  # one unrated attribute
  r_ratings[2] = np.nan  # an unrated response
  r_ratings[3] = 1e6  # a filler row: ignored
  return data_batches.PreferenceBatch(
    tokens[0],
    attn,
    comp,
    tokens[1],
    attn,
    comp,
    np.array([True, True, True, False]),
    chosen_ratings=c_ratings,
    rejected_ratings=r_ratings,
  )


def _numpy_loss(rewards, ratings, example_mask):
  """Mean over rated real rows of the mean squared error over rated
  attributes (float64)."""
  rewards = np.asarray(rewards, np.float64)
  ratings = np.asarray(ratings, np.float64)
  per_row = []
  for row in range(len(rewards)):
    rated = np.isfinite(ratings[row])
    if example_mask[row] and rated.any():
      err = rewards[row, rated] - ratings[row, rated]
      per_row.append(np.mean(err**2))
  return float(np.mean(per_row))


class LossFeedTest(absltest.TestCase):
  def test_loss_fn_matches_numpy_and_training_reduces_it(self):
    config = _config()
    graphdef, params, rest = _tiny_model()
    loss_fn = rm.make_loss_fn(graphdef, rest, config)
    batch = _hand_batch()
    tx = optax.adam(3e-3)
    step = jax.jit(common.make_train_step(loss_fn, tx))
    state = {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(0)),
    }
    state, metrics = step(state, None, batch)  # metrics at the initial params
    model = nnx.merge(graphdef, params, rest)
    c, r = jax.jit(rm._pair_forward)(model, batch)
    rewards = np.concatenate([c.rewards, r.rewards])
    ratings = np.concatenate([batch.chosen_ratings, batch.rejected_ratings])
    mask = np.tile(batch.example_mask, 2)
    want = _numpy_loss(rewards, ratings, mask)
    np.testing.assert_allclose(metrics["rm_loss"], want, rtol=1e-5)
    rated = np.isfinite(ratings) & mask[:, None]
    err = (rewards - np.where(rated, ratings, 0))[rated]
    np.testing.assert_allclose(
      metrics["rating_rmse"], np.sqrt(np.mean(err**2)), rtol=1e-5
    )
    # Accuracy of the fixed-weight scalarisation (direction = gold head).
    v = np.asarray(config.reward_model.direction)
    acc = np.mean((c.rewards @ v > r.rewards @ v)[:3])
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    # (The filler row's 1e6 ratings and the unrated response, which the
    # oracle leaves out, would dominate the loss if they counted.)
    losses = [float(metrics["rm_loss"])]
    for _ in range(8):
      state, m = step(state, None, batch)
      losses.append(float(m["rm_loss"]))
    self.assertLess(losses[-1], 0.25 * losses[0], msg=losses)


class EvaluationTest(absltest.TestCase):
  def test_attribute_report_matches_numpy(self):
    rng = np.random.default_rng(2)
    gold = rng.normal(size=(50, 3))
    pred = gold + rng.normal(scale=0.3, size=gold.shape)
    gold[:7, 0] = np.nan
    gold[:, 2] = 1.0  # constant: no correlation
    got = rm.attribute_report(pred, gold, ["a", "b", "c"])
    for k, name in enumerate("abc"):
      keep = np.isfinite(gold[:, k])
      p, g = pred[keep, k], gold[keep, k]
      self.assertAlmostEqual(
        got["eval_rmse_by_attribute"][name],
        np.sqrt(np.mean((p - g) ** 2)),
        12,
      )
      self.assertEqual(got["eval_rated_by_attribute"][name], keep.sum())
      if name == "c":
        self.assertTrue(np.isnan(got["eval_pearson_by_attribute"][name]))
      else:
        self.assertAlmostEqual(
          got["eval_pearson_by_attribute"][name], np.corrcoef(p, g)[0, 1], 12
        )
    keep = np.isfinite(gold)
    self.assertAlmostEqual(
      got["eval_rating_rmse"], np.sqrt(np.mean((pred - gold)[keep] ** 2)), 12
    )
    with self.assertRaisesRegex(ValueError, "2 names for K=3"):
      rm.attribute_report(pred, gold, ["a", "b"])


if __name__ == "__main__":
  absltest.main()
