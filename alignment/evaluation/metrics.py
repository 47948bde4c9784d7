"""Reward-model evaluation metrics, computed on the host in float64 NumPy.

Inputs may be NumPy or JAX arrays (or lists); every function converts them
with ``np.asarray`` and returns Python floats or NumPy arrays. Nothing here is
jitted: these run once per evaluation over scores gathered from the device.

* Accuracy: :func:`pairwise_accuracy` (RewardBench), per subset with
  :func:`pairwise_accuracy_by_subset`, and :func:`best_of_n_accuracy`
  (RewardBench 2's best-of-4: the chosen response must beat every rejected
  one).
* Ties: ``ties="random"`` (default) scores a tie by the expected accuracy
  under uniform random tie-breaking: 0.5 for a pairwise tie, ``1/(1+k)``
  when the chosen response ties ``k`` rejected ones for the top score.
  ``"lose"`` counts ties as wrong, ``"win"`` as right.
* Calibration of preference probabilities: :func:`brier_score`,
  :func:`expected_calibration_error`, :func:`reliability_diagram_data` and
  :func:`plot_reliability_diagram` (matplotlib, imported lazily).
* Best-of-N: :func:`best_of_n_curve` (exact expected gold score of the
  proxy-selected sample among ``n`` drawn without replacement),
  :func:`best_of_n_kl`.
* :func:`win_rate` of one system's scores against another's.
"""

import math
from typing import NamedTuple

import numpy as np

__all__ = [
  "TIES_MODES",
  "SubsetAccuracy",
  "ReliabilityDiagram",
  "BestOfNCurve",
  "pairwise_accuracy",
  "pairwise_accuracy_by_subset",
  "best_of_n_accuracy",
  "win_rate",
  "preference_probabilities",
  "preference_calibration_data",
  "brier_score",
  "reliability_diagram_data",
  "expected_calibration_error",
  "plot_reliability_diagram",
  "best_of_n_kl",
  "best_of_n_curve",
]

TIES_MODES = ("random", "lose", "win")


def _as_float(x, name: str) -> np.ndarray:
  array = np.asarray(x, dtype=np.float64)
  if np.isnan(array).any():
    raise ValueError(f"{name} contains NaN.")
  return array


def _check_ties(ties: str) -> None:
  if ties not in TIES_MODES:
    raise ValueError(f"ties must be one of {TIES_MODES}, got {ties!r}.")


def _tie_credit(ties: str, num_tied):
  """Credit of an example whose chosen score ties ``num_tied`` rivals."""
  if ties == "random":
    return 1.0 / (1.0 + num_tied)
  return 1.0 if ties == "win" else 0.0


def _pairwise_correct(chosen, rejected, ties: str) -> np.ndarray:
  _check_ties(ties)
  chosen = _as_float(chosen, "chosen_scores")
  rejected = _as_float(rejected, "rejected_scores")
  if chosen.ndim != 1 or chosen.shape != rejected.shape:
    raise ValueError(
      "chosen_scores and rejected_scores must be 1-D of equal length, got "
      f"shapes {chosen.shape} and {rejected.shape}."
    )
  return np.where(
    chosen > rejected,
    1.0,
    np.where(chosen == rejected, _tie_credit(ties, 1), 0.0),
  )


def pairwise_accuracy(
  chosen_scores, rejected_scores, *, ties: str = "random"
) -> float:
  """Fraction of pairs whose chosen response scores higher.

  ``acc = mean_b 1[r_c > r_r]`` with ties scored by ``ties`` (RewardBench's
  metric; Lambert et al. 2024, arXiv:2403.13787).

  Args:
    chosen_scores: ``[B]`` scores of the preferred responses.
    rejected_scores: ``[B]`` scores of the dispreferred responses.
    ties: ``"random"`` (0.5), ``"lose"`` (0) or ``"win"`` (1).

  Returns:
    Accuracy in ``[0, 1]`` (NaN for an empty batch).
  """
  correct = _pairwise_correct(chosen_scores, rejected_scores, ties)
  return float(np.mean(correct)) if correct.size else math.nan


class SubsetAccuracy(NamedTuple):
  """Pairwise accuracy per subset.

  Attributes:
    labels: the distinct subset labels, sorted (``np.unique`` order).
    accuracy: float64 accuracy per label.
    counts: number of pairs per label.
    overall: accuracy over all pairs (micro average).
    macro: unweighted mean of the per-subset accuracies.
  """

  labels: np.ndarray
  accuracy: np.ndarray
  counts: np.ndarray
  overall: float
  macro: float

  def as_dict(self) -> dict:
    """``{label: accuracy}`` with Python scalars as keys and values."""
    return {
      label.item(): float(acc)
      for label, acc in zip(self.labels, self.accuracy, strict=True)
    }


def pairwise_accuracy_by_subset(
  chosen_scores, rejected_scores, subsets, *, ties: str = "random"
) -> SubsetAccuracy:
  """Pairwise accuracy per subset (RewardBench's per-subset table).

  Args:
    chosen_scores: ``[B]`` scores of the preferred responses.
    rejected_scores: ``[B]`` scores of the dispreferred responses.
    subsets: ``[B]`` subset labels (strings or integers).
    ties: tie rule, see :func:`pairwise_accuracy`.

  Returns:
    :class:`SubsetAccuracy`.
  """
  correct = _pairwise_correct(chosen_scores, rejected_scores, ties)
  subsets = np.asarray(subsets)
  if subsets.shape != correct.shape:
    raise ValueError(
      f"subsets must have shape {correct.shape}, got {subsets.shape}."
    )
  labels, inverse, counts = np.unique(
    subsets, return_inverse=True, return_counts=True
  )
  totals = np.bincount(inverse, weights=correct, minlength=len(labels))
  accuracy = totals / counts
  overall = float(np.mean(correct)) if correct.size else math.nan
  macro = float(np.mean(accuracy)) if len(labels) else math.nan
  return SubsetAccuracy(labels, accuracy, counts, overall, macro)


def best_of_n_accuracy(
  chosen_scores, rejected_scores, rejected_mask=None, *, ties: str = "random"
) -> float:
  """Accuracy when the chosen response must beat every rejected response.

  RewardBench 2 scores each prompt with 1 chosen and 3 rejected responses
  and counts it correct iff ``r_c > max_j r_j`` (random scoring gives 0.25;
  Malik et al. 2025, arXiv:2506.01937). A chosen score that ties the best
  rejected score(s) is scored by ``ties``; with ``"random"`` it earns
  ``1/(1+k)`` for ``k`` tied rejected responses.

  Args:
    chosen_scores: ``[B]`` scores of the correct responses.
    rejected_scores: ``[B, R]`` scores of the incorrect responses.
    rejected_mask: optional bool ``[B, R]``; False marks padding when prompts
      have different numbers of rejected responses (their scores may be
      NaN). Each row needs at least one valid entry.
    ties: ``"random"``, ``"lose"`` or ``"win"``.

  Returns:
    Accuracy in ``[0, 1]`` (NaN for an empty batch).
  """
  _check_ties(ties)
  chosen = _as_float(chosen_scores, "chosen_scores")
  rejected = np.asarray(rejected_scores, dtype=np.float64)
  if (
    chosen.ndim != 1
    or rejected.ndim != 2
    or (rejected.shape[0] != chosen.shape[0])
  ):
    raise ValueError(
      "chosen_scores must be [B] and rejected_scores [B, R], got shapes "
      f"{chosen.shape} and {rejected.shape}."
    )
  if rejected_mask is None:
    valid = np.ones(rejected.shape, bool)
  else:
    valid = np.asarray(rejected_mask, dtype=bool)
    if valid.shape != rejected.shape:
      raise ValueError(
        f"rejected_mask must have shape {rejected.shape}, got {valid.shape}."
      )
  if not valid.any(axis=1).all():
    raise ValueError("every row needs at least one valid rejected score.")
  if np.isnan(rejected[valid]).any():
    raise ValueError("rejected_scores contains NaN at valid positions.")
  if chosen.size == 0:
    return math.nan
  rejected = np.where(valid, rejected, -np.inf)
  best = rejected.max(axis=1)
  num_tied = np.sum(valid & (rejected == chosen[:, None]), axis=1)
  correct = np.where(
    chosen > best,
    1.0,
    np.where(chosen == best, _tie_credit(ties, num_tied), 0.0),
  )
  return float(np.mean(correct))


def win_rate(scores_a, scores_b, *, ties: str = "random") -> float:
  """Fraction of paired comparisons that system A wins against system B.

  ``mean_i 1[a_i > b_i]`` with ties scored by ``ties`` (``"random"``
  counts a tie as half a win, the AlpacaEval / Arena convention).

  Args:
    scores_a: ``[N]`` scores (reward or judge scores) of system A's outputs.
    scores_b: ``[N]`` scores of system B's outputs for the same prompts.
    ties: ``"random"``, ``"lose"`` or ``"win"``.

  Returns:
    Win rate of A in ``[0, 1]`` (NaN for no comparisons).
  """
  return pairwise_accuracy(scores_a, scores_b, ties=ties)


# ---------------------------------------------------------------------------
# Calibration.
# ---------------------------------------------------------------------------


def preference_probabilities(
  chosen_scores, rejected_scores, *, temperature: float = 1.0
) -> np.ndarray:
  """Bradley–Terry probability that the chosen response is preferred.

  ``p = σ((r_c - r_r) / T)``, computed stably in float64.

  Args:
    chosen_scores: ``[B]`` scores.
    rejected_scores: ``[B]`` scores.
    temperature: ``T > 0`` (temperature scaling).

  Returns:
    float64 ``[B]`` probabilities.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  diff = (
    _as_float(chosen_scores, "chosen_scores")
    - _as_float(rejected_scores, "rejected_scores")
  ) / temperature
  return np.exp(-np.logaddexp(0.0, -diff))


def preference_calibration_data(
  chosen_scores, rejected_scores, *, temperature: float = 1.0
):
  """Both orderings of each pair, as (probability, label) for calibration.

  Preference data always labels the chosen response the winner, so the
  calibration of ``p = σ(Δ/T)`` is measured on the pair in both
  orientations: ``(p, 1)`` and ``(1 - p, 0)``. The resulting ECE is
  symmetric, and a model that is right with probability ``p`` whenever it
  says ``p`` has ECE 0.

  Args:
    chosen_scores: ``[B]`` scores.
    rejected_scores: ``[B]`` scores.
    temperature: ``T > 0``.

  Returns:
    ``(probabilities, labels)``: float64 ``[2B]`` and bool ``[2B]``.
  """
  p = preference_probabilities(
    chosen_scores, rejected_scores, temperature=temperature
  )
  labels = np.concatenate([np.ones(p.shape, bool), np.zeros(p.shape, bool)])
  return np.concatenate([p, 1.0 - p]), labels


def _probs_and_labels(probabilities, labels):
  p = _as_float(probabilities, "probabilities").reshape(-1)
  y = np.asarray(labels).reshape(-1)
  if p.shape != y.shape:
    raise ValueError(
      f"probabilities and labels must have the same size, got "
      f"{p.size} and {y.size}."
    )
  if ((p < 0) | (p > 1)).any():
    raise ValueError("probabilities must lie in [0, 1].")
  y = y.astype(np.float64)
  if ((y != 0) & (y != 1)).any():
    raise ValueError("labels must be 0/1 or bool.")
  return p, y


def brier_score(probabilities, labels) -> float:
  """Brier score ``mean (p - y)^2`` of binary probability forecasts.

  Args:
    probabilities: predicted probabilities that the event (e.g. "the first
      response is preferred") happens.
    labels: 0/1 or bool outcomes, same size.

  Returns:
    The Brier score in ``[0, 1]``; 0.25 for constant 0.5 forecasts.
  """
  p, y = _probs_and_labels(probabilities, labels)
  return float(np.mean(np.square(p - y))) if p.size else math.nan


class ReliabilityDiagram(NamedTuple):
  """Binned calibration statistics (equal-width bins on ``[0, 1]``).

  Attributes:
    bin_edges: ``[num_bins + 1]`` edges; bin ``i`` is
      ``[edges[i], edges[i+1])``, the last one closed.
    bin_centers: ``[num_bins]`` bin mid-points.
    accuracy: ``[num_bins]`` mean label per bin (NaN for empty bins).
    confidence: ``[num_bins]`` mean predicted probability per bin (NaN for
      empty bins).
    counts: ``[num_bins]`` number of predictions per bin.
  """

  bin_edges: np.ndarray
  bin_centers: np.ndarray
  accuracy: np.ndarray
  confidence: np.ndarray
  counts: np.ndarray


def reliability_diagram_data(
  probabilities, labels, *, num_bins: int = 10
) -> ReliabilityDiagram:
  """Per-bin accuracy and confidence for a reliability diagram.

  Args:
    probabilities: predicted probabilities in ``[0, 1]``.
    labels: 0/1 or bool outcomes.
    num_bins: number of equal-width bins, ``>= 1``.

  Returns:
    :class:`ReliabilityDiagram`.
  """
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
  p, y = _probs_and_labels(probabilities, labels)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  index = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
  counts = np.bincount(index, minlength=num_bins)
  label_sum = np.bincount(index, weights=y, minlength=num_bins)
  prob_sum = np.bincount(index, weights=p, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    accuracy = np.where(counts > 0, label_sum / counts, np.nan)
    confidence = np.where(counts > 0, prob_sum / counts, np.nan)
  centers = 0.5 * (edges[:-1] + edges[1:])
  return ReliabilityDiagram(edges, centers, accuracy, confidence, counts)


def expected_calibration_error(
  probabilities, labels, *, num_bins: int = 10
) -> float:
  """Expected calibration error with equal-width bins.

  ``ECE = Σ_b (n_b / n) |acc_b - conf_b|`` (Naeini et al. 2015; Guo et al.
  2017, arXiv:1706.04599). Here the forecast is the probability of
  the positive label (for preferences: "the first response wins", see
  :func:`preference_calibration_data`), not the max-class confidence.

  Args:
    probabilities: predicted probabilities in ``[0, 1]``.
    labels: 0/1 or bool outcomes.
    num_bins: number of equal-width bins, ``>= 1``.

  Returns:
    ECE in ``[0, 1]`` (NaN for no predictions).
  """
  data = reliability_diagram_data(probabilities, labels, num_bins=num_bins)
  total = data.counts.sum()
  if total == 0:
    return math.nan
  filled = data.counts > 0
  gaps = np.abs(data.accuracy[filled] - data.confidence[filled])
  return float(np.sum(data.counts[filled] * gaps) / total)


def plot_reliability_diagram(
  data: ReliabilityDiagram, path, *, title: str | None = None
) -> None:
  """Writes a reliability diagram (accuracy vs confidence) as a PNG.

  Bars show each bin's accuracy, a marker its mean confidence, the diagonal
  perfect calibration; a lower panel shows the bin counts. Uses matplotlib's
  non-interactive ``Agg`` backend, imported only when called.

  Args:
    data: output of :func:`reliability_diagram_data`.
    path: output file path (``.png``).
    title: optional figure title; defaults to one with the ECE.
  """
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  widths = np.diff(data.bin_edges)
  total = data.counts.sum()
  filled = data.counts > 0
  ece = (
    float(
      np.sum(
        data.counts[filled]
        * np.abs(data.accuracy[filled] - data.confidence[filled])
      )
      / total
    )
    if total
    else math.nan
  )
  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
  )
  try:
    top.bar(
      data.bin_centers[filled],
      data.accuracy[filled],
      width=widths[filled],
      edgecolor="black",
      alpha=0.7,
      label="accuracy",
    )
    top.plot(
      data.bin_centers[filled],
      data.confidence[filled],
      "o",
      color="tab:red",
      label="mean confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize="small")
    top.set_title(title if title is not None else f"ECE = {ece:.4f}")
    bottom.bar(
      data.bin_centers,
      data.counts,
      width=widths,
      edgecolor="black",
      color="tab:gray",
    )
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
  finally:
    plt.close(fig)


# ---------------------------------------------------------------------------
# Best-of-N.
# ---------------------------------------------------------------------------


class BestOfNCurve(NamedTuple):
  """Expected scores of best-of-``n`` selection by a proxy reward.

  Attributes:
    ns: ``[len(ns)]`` the ``n`` values.
    gold: expected gold score of the proxy-selected sample, averaged over
      prompts.
    proxy: expected proxy score of the selected sample (the overoptimised
      quantity), averaged over prompts.
    kl: analytic KL of best-of-``n`` from the sampling policy,
      :func:`best_of_n_kl`.
  """

  ns: np.ndarray
  gold: np.ndarray
  proxy: np.ndarray
  kl: np.ndarray


def best_of_n_kl(n) -> np.ndarray:
  """``KL(best-of-n ‖ base) = log n - (n - 1)/n`` (an upper bound).

  Stiennon et al. (2020, arXiv:2009.01325); Beirami et al. (2024,
  arXiv:2401.01879) show it is an upper bound of the true KL.

  Args:
    n: integer(s) ``>= 1``.

  Returns:
    float64 array (0 at ``n = 1``).
  """
  n = np.asarray(n, dtype=np.float64)
  if (n < 1).any():
    raise ValueError("n must be >= 1.")
  return np.log(n) - (n - 1.0) / n


def _selection_weights(num_samples: int, n: int) -> np.ndarray:
  """P(the sample of proxy rank i wins a random n-subset), i = 0 is best."""
  total = math.comb(num_samples, n)
  return np.array(
    [math.comb(num_samples - 1 - i, n - 1) / total for i in range(num_samples)],
    dtype=np.float64,
  )


def best_of_n_curve(proxy_scores, gold_scores, ns) -> BestOfNCurve:
  """Exact expected gold score of best-of-``n`` selection by a proxy.

  For each prompt with ``M`` samples, a best-of-``n`` draw picks ``n`` of
  them uniformly without replacement and keeps the one with the highest
  proxy score. Sorting by proxy score (rank ``i = 0`` is best), the
  sample of rank ``i`` is kept with probability
  ``C(M-1-i, n-1) / C(M, n)``, so

  ``E[gold] = Σ_i C(M-1-i, n-1) / C(M, n) · gold_(i)``,

  the unbiased estimator used for overoptimisation curves (Nakano et al.
  2021, arXiv:2112.09332; Gao et al. 2022, arXiv:2210.10760).
  Proxy ties are broken uniformly at random (tied samples share their mean
  gold score), so the result does not depend on sample order.

  Args:
    proxy_scores: ``[P, M]`` proxy (reward-model) scores of ``M`` samples
      for each of ``P`` prompts.
    gold_scores: ``[P, M]`` gold scores of the same samples.
    ns: ``n`` values, each in ``[1, M]``.

  Returns:
    :class:`BestOfNCurve`, averaged over prompts.
  """
  proxy = _as_float(proxy_scores, "proxy_scores")
  gold = _as_float(gold_scores, "gold_scores")
  if proxy.ndim != 2 or proxy.shape != gold.shape:
    raise ValueError(
      "proxy_scores and gold_scores must both be [P, M], got "
      f"shapes {proxy.shape} and {gold.shape}."
    )
  num_samples = proxy.shape[1]
  ns = np.atleast_1d(np.asarray(ns))
  if not np.issubdtype(ns.dtype, np.integer):
    raise ValueError(f"ns must be integers, got dtype {ns.dtype}.")
  if ((ns < 1) | (ns > num_samples)).any():
    raise ValueError(f"every n must be in [1, {num_samples}], got {ns}.")
  order = np.argsort(-proxy, axis=1, kind="stable")
  proxy_sorted = np.take_along_axis(proxy, order, axis=1)
  gold_sorted = np.take_along_axis(gold, order, axis=1)
  # Random tie-breaking: replace gold by the mean of its proxy-tie group.
  for row in range(proxy_sorted.shape[0]):
    _, start, counts = np.unique(
      -proxy_sorted[row], return_index=True, return_counts=True
    )
    for s, c in zip(start, counts, strict=True):
      if c > 1:
        gold_sorted[row, s : s + c] = gold_sorted[row, s : s + c].mean()
  gold_curve, proxy_curve = [], []
  for n in ns:
    weights = _selection_weights(num_samples, int(n))
    gold_curve.append(float(np.mean(gold_sorted @ weights)))
    proxy_curve.append(float(np.mean(proxy_sorted @ weights)))
  return BestOfNCurve(
    ns.astype(np.int64),
    np.asarray(gold_curve),
    np.asarray(proxy_curve),
    best_of_n_kl(ns),
  )
