"""The reward-model trainer's held-out evaluation: per subset and best-of-N.

* :func:`reward_model.subset_report` equals a float64 NumPy recomputation
  of per-subset pairwise accuracy (ties earn 1/2) from the scored pairs.
* :func:`reward_model.best_of_n_report` equals a NumPy recomputation of
  RewardBench 2's best-of-4 (the gold-best response must outscore the three
  others; lists of another size or with a tied gold best are skipped).
* The synthetic pairs carry a ``subset`` by their gold gap and preference
  batches a ``subset_id`` into the iterator's ``subset_names``.
* A 2-step runlocal of ``configs/reward_model.py`` writes both into
  ``eval_reward_model.json``, equal to a recomputation from the scores the
  trainer computed.
"""

import json
import pathlib
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

from alignment import trainers
from alignment.data import synthetic
from alignment.trainers import _data, pipeline
from alignment.trainers import reward_model as rm
from tests.trainers import _util


def _subset_oracle(chosen, rejected, ids, names):
  acc, pairs = {}, {}
  for i, name in enumerate(names):
    sel = ids == i
    if not sel.any():
      continue
    c, r = chosen[sel].astype(np.float64), rejected[sel].astype(np.float64)
    acc[name] = float(np.mean((c > r) + 0.5 * (c == r)))
    pairs[name] = int(sel.sum())
  return acc, pairs


def _best_of_oracle(scores, gold, mask, n):
  wins, used = [], 0
  for s, g, m in zip(scores, gold, mask, strict=True):
    if m.sum() != n:
      continue
    g = np.where(m, g, -np.inf)
    best = np.flatnonzero(g == g.max())
    if len(best) != 1:
      continue
    used += 1
    c = s[best[0]]
    others = [s[j] for j in range(len(s)) if m[j] and j != best[0]]
    top = max(others)
    tied = sum(o == c for o in others)
    wins.append(1.0 if c > top else (1.0 / (1 + tied) if c == top else 0.0))
  return (float(np.mean(wins)) if wins else float("nan")), used


class ReportsTest(absltest.TestCase):
  def test_subset_report_matches_numpy(self):
    rng = np.random.default_rng(0)
    n = 200
    chosen = rng.integers(0, 4, n).astype(np.float32)  # many ties
    rejected = rng.integers(0, 4, n).astype(np.float32)
    names = ("chat", "code", "math", "safety")
    ids = rng.integers(0, 3, n).astype(np.int32)  # "safety" has no pairs
    got = rm.subset_report(chosen, rejected, ids, names)
    acc, pairs = _subset_oracle(chosen, rejected, ids, names)
    self.assertEqual(sorted(got["eval_accuracy_by_subset"]), sorted(acc))
    for name, a in acc.items():
      self.assertAlmostEqual(got["eval_accuracy_by_subset"][name], a, 12)
    self.assertEqual(got["eval_pairs_by_subset"], pairs)
    self.assertAlmostEqual(
      got["eval_accuracy_macro"], np.mean(list(acc.values())), 12
    )
    # Pairs without a subset are reported, not dropped.
    ids[:5] = -1
    got = rm.subset_report(chosen, rejected, ids, names)
    self.assertEqual(got["eval_pairs_by_subset"]["(none)"], 5)
    self.assertEqual(sum(got["eval_pairs_by_subset"].values()), n)
    self.assertEqual(rm.subset_report([], [], [], names), {})

  def test_best_of_n_report_matches_numpy(self):
    rng = np.random.default_rng(1)
    b, k = 300, 5
    scores = rng.integers(0, 3, (b, k)).astype(np.float32)  # ties
    gold = rng.integers(0, 8, (b, k)) / 8.0
    mask = np.ones((b, k), bool)
    mask[:, 4] = False  # lists of 4 ...
    mask[:40, 3] = False  # ... and 40 lists of 3
    mask[40:60, 4] = True  # ... and 20 of 5
    scores = np.where(mask, scores, np.nan)
    got = rm.best_of_n_report(scores, gold, mask, 4)
    want, used = _best_of_oracle(scores, gold, mask, 4)
    self.assertGreater(used, 50)
    self.assertAlmostEqual(got["eval_best_of_4_accuracy"], want, 12)
    self.assertEqual(got["eval_best_of_4_lists"], used)
    self.assertEqual(got["eval_best_of_4_skipped"], b - used)
    # A perfect scorer (the gold itself) wins every counted list.
    perfect = rm.best_of_n_report(gold, gold, mask, 4)
    self.assertEqual(perfect["eval_best_of_4_accuracy"], 1.0)
    empty = rm.best_of_n_report(scores[:40], gold[:40], mask[:40], 4)
    self.assertTrue(np.isnan(empty["eval_best_of_4_accuracy"]))
    self.assertEqual(empty["eval_best_of_4_lists"], 0)
    with self.assertRaisesRegex(ValueError, "eval_best_of"):
      rm.best_of_n_report(scores, gold, mask, 1)

  def test_pipeline_report_line(self):
    rm_report = {
      "eval_accuracy": 0.75,
      "eval_pairs": 8,
      "eval_ece": 0.1,
      "eval_brier": 0.2,
      "eval_accuracy_by_subset": {"easy": 1.0, "hard": 0.5},
      "eval_pairs_by_subset": {"easy": 4, "hard": 4},
      "eval_best_of_4_accuracy": 0.5,
      "eval_best_of_4_lists": 6,
    }
    policy = {"gold_reward": 0.5}
    text = pipeline.render_report(
      {
        "reward_model": rm_report,
        "policies": {"sft": policy, "dpo": policy, "grpo": policy},
        "wall_seconds": 1.0,
      }
    )
    self.assertIn(
      "per subset: easy 1.000 (n=4), hard 0.500 (n=4); best-of-4 0.500 on "
      "6 lists (chance 0.25).",
      text,
    )

  def test_synthetic_pairs_carry_their_difficulty(self):
    config = _util.load_config("reward_model", "runlocal")
    tok = _data.tokenizer_of(config)
    it = _data.iterator(
      config, "preference", tok, data_config=config.eval_data, batch_size=16
    )
    self.assertEqual(it.subset_names, ("easy", "hard"))
    batch = next(iter(it))
    gap = np.abs(batch.chosen_score - batch.rejected_score)
    want = np.where(gap >= synthetic.EASY_GAP - 1e-6, 0, 1)
    np.testing.assert_array_equal(batch.subset_id, want)


class EndToEndTest(absltest.TestCase):
  def test_runlocal_writes_subsets_and_best_of_4(self):
    config = _util.load_config("reward_model", "runlocal")
    config.progress = False
    self.assertEqual(config.eval_best_of, 4)
    workdir = pathlib.Path(tempfile.mkdtemp()) / "rm"
    seen = {}
    real_pairs, real_lists = rm.evaluate_pairs, rm.evaluate_lists

    def pairs(*args, **kwargs):
      seen["pairs"] = real_pairs(*args, **kwargs)
      seen["names"] = args[2].subset_names
      return seen["pairs"]

    def lists(*args, **kwargs):
      seen["lists"] = real_lists(*args, **kwargs)
      return seen["lists"]

    with (
      mock.patch.object(rm, "evaluate_pairs", pairs),
      mock.patch.object(rm, "evaluate_lists", lists),
    ):
      _, _, report = trainers.get_trainer(config.trainer).run(
        config, str(workdir)
      )
    on_disk = json.loads((workdir / "eval_reward_model.json").read_text())
    self.assertEqual(on_disk, report)

    chosen, rejected, ids = seen["pairs"]
    self.assertEqual(seen["names"], ("easy", "hard"))
    acc, pairs_by = _subset_oracle(chosen, rejected, ids, seen["names"])
    self.assertEqual(on_disk["eval_pairs_by_subset"], pairs_by)
    self.assertEqual(sum(pairs_by.values()), on_disk["eval_pairs"])
    for name, a in acc.items():
      self.assertAlmostEqual(on_disk["eval_accuracy_by_subset"][name], a, 6)

    scores, gold, mask = seen["lists"]
    self.assertEqual(scores.shape[1], 4)
    self.assertTrue(mask.all())
    want, used = _best_of_oracle(scores, gold, mask, 4)
    self.assertGreater(used, 0)
    self.assertEqual(on_disk["eval_best_of_4_lists"], used)
    self.assertEqual(used + on_disk["eval_best_of_4_skipped"], len(scores))
    self.assertAlmostEqual(on_disk["eval_best_of_4_accuracy"], want, 6)


if __name__ == "__main__":
  absltest.main()
