"""Rule-based verifiers: answer extraction and matching."""

import numpy as np
from absl.testing import absltest, parameterized

from alignment.rewards import _verifiers


class ExtractAnswerTest(parameterized.TestCase):
  @parameterized.parameters(
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("nested \\boxed{a_{1}} then \\boxed{42}", "42"),
    ("reasoning...\n#### 1,234", "1,234"),
    ("I think 3 apples and 5 pears", "5"),
    ("no answer here", None),
  )
  def test_extract(self, text, want):
    self.assertEqual(_verifiers.extract_answer(text), want)


class MathAnswerRewardTest(parameterized.TestCase):
  @parameterized.parameters(
    ("#### 1,234", "1234", 1.0),
    ("\\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{3}", "#### 4", 0.0),
    ("\\boxed{x+1}", "x + 1", 1.0),
    ("nothing", "3", 0.0),
  )
  def test_reward(self, completion, reference, want):
    self.assertEqual(_verifiers.math_answer_reward(completion, reference), want)

  def test_verify_batch(self):
    got = _verifiers.verify_batch(
      ["#### 2", "#### 3"], [{"answer": "2"}, {"answer": "#### 2"}]
    )
    np.testing.assert_array_equal(got, [1.0, 0.0])

  def test_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "unknown kind='nope'"):
      _verifiers.verify_batch(["a"], [{"answer": "a"}], kind="nope")
    with self.assertRaisesRegex(ValueError, "record 0 has no 'answer'"):
      _verifiers.verify_batch(["a"], [{"solution": "a"}])
    with self.assertRaisesRegex(ValueError, "2 completions but 1 records"):
      _verifiers.verify_batch(["a", "b"], [{"answer": "a"}])

  def test_format_and_exact(self):
    self.assertEqual(_verifiers.format_reward("<a>x</a>", r"<a>.*</a>"), 1.0)
    self.assertEqual(_verifiers.exact_match_reward(" y ", "y"), 1.0)


if __name__ == "__main__":
  absltest.main()
