"""Temperature scaling (Guo et al. 2017): one scalar T that divides the logits, fitted on held-out cells.

Log-probabilities are valid logits too, so an ensemble's averaged probabilities can be calibrated with
``fit_temperature(np.log(mean_probs), labels)``.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special

from training.evaluation.metrics import check_scores_labels


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` under ``softmax(logits / temperature)``."""
    z, y = check_scores_labels(logits, labels, "logits")
    if y.size == 0:
        return float("nan")
    logp = special.log_softmax(z / temperature, axis=1)
    return float(-logp[np.arange(y.size), y].mean())


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the range every temperature fit searches (over log T)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T in ``bounds`` that minimises the NLL of ``labels`` under ``softmax(logits / T)``.

    Optimises over log T (bounded Brent), so the search is symmetric between sharpening and softening.
    Returns 1.0 when there are no labels. With very few cells the optimum may sit on a bound
    (e.g. all correct -> smallest T); the bounds keep it finite.
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    z, y = check_scores_labels(logits, labels, "logits")
    if y.size == 0:
        return 1.0
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        logp = special.log_softmax(z * np.exp(-log_t), axis=1)
        return float(-logp[rows, y].mean())

    res = optimize.minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-5})
    log_t = float(res.x)
    # Brent stops a little inside the interval; keep T = 1 when it is no worse (flat objective).
    if nll(0.0) <= nll(log_t) and lo <= 1.0 <= hi:
        return 1.0
    return float(np.exp(log_t))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(logits / temperature)`` along the last axis (float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def pooled_log_probs(member_logits: np.ndarray) -> np.ndarray:
    """Member logits ``(N, M, S, K)`` (or ``(N, M, K)``) -> log of the members' averaged probabilities ``(N, K)``.

    These are the logits of pool-then-calibrate: one temperature divides them after averaging, instead of one
    temperature per member before.
    """
    z = np.asarray(member_logits, dtype=np.float64)
    if z.ndim == 3:
        z = z[:, :, None]
    if z.ndim != 4:
        raise ValueError(f"member logits must have shape (N, M, S, K) or (N, M, K), got {z.shape}")
    n, m, s, k = z.shape
    logp = special.log_softmax(z, axis=-1).reshape(n, m * s, k)
    return special.logsumexp(logp, axis=1) - np.log(m * s)


def fit_pooled_temperature(member_logits: np.ndarray, labels: np.ndarray,
                           bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Pool-then-calibrate: the one temperature that minimises the NLL of the ensemble's averaged log-probabilities.

    Fit it on validation cells pooled across the validation groups (slides): a temperature from one slide does not
    transfer to another (README, "Uncertainty you can trust").
    """
    return fit_temperature(pooled_log_probs(member_logits), labels, bounds)
