"""Host-side rule rewards (NumPy / Python; never jitted).

Verifiable rewards for RLVR-style training: the completion's final answer is
extracted and compared with the reference answer of its prompt record.
"""

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
  "VERIFIERS",
  "extract_answer",
  "format_reward",
  "math_answer_reward",
  "exact_match_reward",
  "verify_batch",
]

_BOXED = re.compile(r"\\boxed\{")
_HASHES = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _boxed(text: str) -> str | None:
  """Contents of the last ``\\boxed{...}`` (balanced braces)."""
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None
  i = starts[-1]
  depth = 1
  j = i
  while j < len(text) and depth:
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    j += 1
  return text[i : j - 1].strip() if depth == 0 else None


def extract_answer(text: str) -> str | None:
  """The final answer of a solution: ``\\boxed{}`` > ``#### x`` > last number."""
  boxed = _boxed(text)
  if boxed is not None:
    return boxed
  m = _HASHES.search(text)
  if m:
    return m.group(1).strip()
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _reference_answer(reference: str) -> str:
  """A reference is a bare answer unless it carries ``\\boxed`` or ``####``."""
  boxed = _boxed(reference)
  if boxed is not None:
    return boxed
  m = _HASHES.search(reference)
  return m.group(1).strip() if m else reference.strip()


def _normalise(answer: str) -> str:
  a = answer.strip().strip("$").replace(",", "").replace(" ", "")
  a = a.removesuffix(".")
  return a.lower()


def _as_number(answer: str) -> float | None:
  a = _normalise(answer)
  try:
    if "/" in a:
      num, den = a.split("/", 1)
      return float(num) / float(den)
    return float(a)
  except (ValueError, ZeroDivisionError):
    return None


def math_answer_reward(completion: str, reference: str) -> float:
  """1.0 if the extracted answer equals the reference (numerically when both
  parse as numbers, else as normalised strings), 0.0 otherwise."""
  got = extract_answer(completion)
  want = _reference_answer(reference)
  if got is None:
    return 0.0
  a, b = _as_number(got), _as_number(want)
  if a is not None and b is not None:
    return float(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))
  return float(_normalise(got) == _normalise(want))


def exact_match_reward(completion: str, reference: str) -> float:
  """1.0 on an exact match after stripping whitespace."""
  return float(completion.strip() == reference.strip())


def format_reward(completion: str, pattern: str) -> float:
  """1.0 if the whole completion matches the regular expression."""
  return float(re.fullmatch(pattern, completion.strip(), re.DOTALL) is not None)


VERIFIERS = {
  "math_answer": math_answer_reward,
  "exact_match": exact_match_reward,
}


def verify_batch(
  completions: Sequence[str],
  records: Sequence[Mapping],
  *,
  kind: str = "math_answer",
  answer_key: str = "answer",
) -> np.ndarray:
  """Scores completions against their records' reference answers.

  Raises:
    ValueError: unknown ``kind`` or a record without ``answer_key``.
  """
  if kind not in VERIFIERS:
    raise ValueError(
      f"verify_batch: unknown kind={kind!r}; valid kinds are "
      f"{sorted(VERIFIERS)}."
    )
  if len(completions) != len(records):
    raise ValueError(
      f"verify_batch: {len(completions)} completions but "
      f"{len(records)} records."
    )
  fn = VERIFIERS[kind]
  out = np.zeros(len(completions), np.float64)
  for i, (c, r) in enumerate(zip(completions, records, strict=True)):
    if answer_key not in r:
      raise ValueError(
        f"verify_batch: record {i} has no {answer_key!r} "
        f"field; it has {sorted(r)}."
      )
    out[i] = fn(c, str(r[answer_key]))
  return out
