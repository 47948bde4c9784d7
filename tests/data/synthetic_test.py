"""The default run's generated task: determinism, gold reward, BT labels."""

import numpy as np
from absl.testing import absltest, parameterized

from alignment.data import synthetic


class LettersTaskTest(parameterized.TestCase):
  def test_deterministic_in_seed(self):
    task = synthetic.LettersTask()
    self.assertEqual(task.sft_examples(20, 3), task.sft_examples(20, 3))
    self.assertNotEqual(task.sft_examples(20, 3), task.sft_examples(20, 4))
    self.assertEqual(task.preference_pairs(10, 1), task.preference_pairs(10, 1))

  @parameterized.parameters("first_half", "prompt_half", "in_prompt")
  def test_gold_reward_matches_definition(self, rule):
    task = synthetic.LettersTask(rule=rule)
    prompt = "qbcde>"
    preferred = {
      "first_half": set("abcdefghijklm"),
      "prompt_half": set("nopqrstuvwxyz"),
      "in_prompt": set("qbcde"),
    }[rule]
    completion = "abqzzyxwvu"  # longer than completion_len: the tail is ignored
    want = sum(c in preferred for c in completion[:8]) / 8
    self.assertAlmostEqual(task.gold_reward(prompt, completion), want)
    self.assertEqual(task.gold_reward(prompt, ""), 0.0)

  @parameterized.parameters("first_half", "prompt_half", "in_prompt")
  def test_demonstrations_match_closed_form(self, rule):
    task = synthetic.LettersTask(rule=rule)
    rows = task.sft_examples(4000, 0)
    mean = np.mean(
      [task.gold_reward(r["prompt"], r["completion"]) for r in rows]
    )
    self.assertAlmostEqual(
      mean, task.expected_demonstration_reward(), delta=0.01
    )

  def test_bradley_terry_labels(self):
    task = synthetic.LettersTask(label_temperature=1e-3)
    rows = task.preference_pairs(500, 0)
    diffs = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows])
    # At a tiny temperature the chosen side is (almost) always the better.
    self.assertTrue(np.all(diffs[diffs != 0] > 0))
    noisy = synthetic.LettersTask(label_temperature=10.0).preference_pairs(
      2000, 0
    )
    d = np.array([r["gold_chosen"] - r["gold_rejected"] for r in noisy])
    self.assertGreater(np.mean(d[d != 0] < 0), 0.3)  # labels flip often

  def test_bad_arguments(self):
    for kwargs, name in (
      (dict(rule="x"), "rule"),
      (dict(p_in=2.0), "p_in"),
      (dict(completion_len=0), "completion_len"),
      (dict(label_temperature=0.0), "label_temperature"),
      (dict(n_prompt_letters=0), "n_prompt_letters"),
    ):
      with self.assertRaisesRegex(ValueError, name):
        synthetic.LettersTask(**kwargs)
    with self.assertRaisesRegex(ValueError, "3 prompts but 2 completions"):
      synthetic.LettersTask().gold_rewards(["a>"] * 3, ["a"] * 2)


if __name__ == "__main__":
  absltest.main()
