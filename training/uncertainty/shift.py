"""A temperature for new slides from their unlabeled cells: Average Thresholded Confidence (ATC; Garg et al.,
"Leveraging unlabeled data to predict out-of-distribution performance", ICLR 2022).

A temperature fitted on validation cells of the training slides does not transfer to new slides (they want
0.77-1.20 where validation fitted 0.86-0.91; benchmarks/FINDINGS.md, "Is the default split's test pair an unlucky
draw?"). ATC predicts the error rate on new cells without their labels:

1. on the validation cells, the threshold below which exactly as many cells' confidence falls as there are
   misclassified validation cells;
2. on the new cells, the share whose confidence falls below it is the predicted error rate;
3. the new cells' temperature is the one at which their mean confidence equals the predicted accuracy.

The confidence is the ensemble's pooled maximum log-probability. A temperature keeps the order of the cells'
confidences, so steps 1 and 2 do not depend on it; only step 3 uses temperature scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

from training.evaluation.metrics import check_scores_labels
from training.uncertainty.calibration import TEMPERATURE_BOUNDS


def confidence(logp: np.ndarray) -> np.ndarray:
    """The score ATC thresholds: each cell's largest log-probability, log-softmax of ``logp`` first (so raw logits
    and pooled log-probabilities give the same score)."""
    z = np.asarray(logp, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected (cells, classes) log-probabilities, got shape {z.shape}")
    return special.log_softmax(z, axis=1).max(axis=1)


def atc_threshold(logp: np.ndarray, labels: np.ndarray) -> float:
    """The confidence threshold below which as many validation cells fall as are misclassified (midway between the
    n-th and (n+1)-th lowest confidence, n = misclassified cells; -inf when none is, +inf when all are)."""
    z, y = check_scores_labels(logp, labels, "log-probabilities")
    if y.size == 0:
        raise ValueError("no validation cells to set the ATC threshold on")
    n_errors = int((z.argmax(axis=1) != y).sum())
    s = np.sort(confidence(z))
    if n_errors == 0:
        return float("-inf")
    if n_errors == y.size:
        return float("inf")
    return float((s[n_errors - 1] + s[n_errors]) / 2)


def finite_or_none(threshold: float) -> float | None:
    """A threshold as stored in an ensemble's spec (JSON has no infinities): ``None`` when it is not finite."""
    return float(threshold) if np.isfinite(threshold) else None


def predicted_error(logp: np.ndarray, threshold: float) -> float:
    """ATC's error rate for unlabeled cells: the share whose confidence is below ``threshold``."""
    return float((confidence(logp) < threshold).mean())


def temperature_for_accuracy(logp: np.ndarray, accuracy: float,
                             bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature at which the cells' mean confidence (largest probability of ``softmax(logp / T)``) equals
    ``accuracy``; the nearer bound when no temperature in ``bounds`` reaches it. The mean confidence falls
    monotonically as T grows, so the root is unique."""
    z = np.asarray(logp, dtype=np.float64)
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])

    def gap(log_t: float) -> float:
        return float(special.softmax(z * np.exp(-log_t), axis=1).max(axis=1).mean() - accuracy)

    if gap(lo) <= 0:  # even the sharpest temperature is not confident enough
        return float(bounds[0])
    if gap(hi) >= 0:  # even the softest is too confident
        return float(bounds[1])
    return float(np.exp(optimize.brentq(gap, lo, hi, xtol=1e-8)))


@dataclass(frozen=True)
class LabelFreeTemperature:
    """What ATC found on a set of unlabeled cells."""

    temperature: float
    predicted_error: float
    threshold: float
    n_cells: int


def label_free_temperature(logp: np.ndarray, threshold: float) -> LabelFreeTemperature:
    """The temperature for unlabeled cells (``logp``: their pooled log-probabilities) from a validation threshold
    (:func:`atc_threshold`)."""
    z = np.asarray(logp, dtype=np.float64)
    if len(z) == 0:
        raise ValueError("no cells to fit a temperature on")
    err = predicted_error(z, threshold)
    return LabelFreeTemperature(temperature_for_accuracy(z, 1.0 - err), err, float(threshold), len(z))
