"""The 2-step runlocal of ``variant=multi_objective_regression``.

Trains on the synthetic task's attribute ratings and writes, in
``eval_reward_model.json``, per-attribute RMSE of the K heads and the
pairwise accuracy of their fixed-weight scalarisation
(``config.reward_model.direction``), equal to a NumPy recomputation from
what the trainer scored; the per-subset and best-of-4 entries of the other
reward-model runs are there too.
"""

import json
import pathlib
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

from alignment import trainers
from alignment.trainers import reward_model as rm
from tests.trainers import _util


def _config():
  config = _util.load_config(
    "reward_model", "variant=multi_objective_regression,runlocal"
  )
  root = pathlib.Path(tempfile.mkdtemp(prefix="alignment-rm-mo-run-"))
  config.data.data_dir = str(root / "data")
  config.eval_data.data_dir = str(root / "data")
  config.progress = False
  return config, root


class RunTest(absltest.TestCase):
  def test_runlocal_reports_attributes_and_scalarised_accuracy(self):
    config, root = _config()
    self.assertEqual(config.loss.name, "multi_objective_regression")
    self.assertEqual(rm.attribute_names(config), ["gold", "vowels", "distinct"])
    workdir = root / "run"
    seen = {}
    real = rm.evaluate_attribute_pairs

    def capture(*args, **kwargs):
      seen.update(real(*args, **kwargs))
      return seen

    with mock.patch.object(rm, "evaluate_attribute_pairs", capture):
      _, _, report = trainers.get_trainer(config.trainer).run(
        config, str(workdir)
      )
    on_disk = json.loads((workdir / "eval_reward_model.json").read_text())
    self.assertEqual(json.dumps(on_disk), json.dumps(report))
    v = np.asarray(config.reward_model.direction, np.float64)
    c, r = seen["chosen"] @ v, seen["rejected"] @ v
    self.assertEqual(on_disk["eval_pairs"], len(c))
    self.assertAlmostEqual(
      on_disk["eval_accuracy"], np.mean((c > r) + 0.5 * (c == r)), 6
    )
    pred = np.concatenate([seen["chosen"], seen["rejected"]])
    gold = np.concatenate([seen["chosen_ratings"], seen["rejected_ratings"]])
    self.assertEqual(gold.shape, (2 * len(c), 3))
    for k, name in enumerate(("gold", "vowels", "distinct")):
      self.assertAlmostEqual(
        on_disk["eval_rmse_by_attribute"][name],
        np.sqrt(np.mean((pred[:, k] - gold[:, k]) ** 2)),
        6,
      )
    self.assertIn("eval_best_of_4_accuracy", on_disk)
    self.assertIn("eval_accuracy_by_subset", on_disk)


if __name__ == "__main__":
  absltest.main()
