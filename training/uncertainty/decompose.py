"""Predictive uncertainty from an ensemble (or MC-dropout samples), split into aleatoric and epistemic parts.

All entropies are in **nats** (natural logarithm); the largest possible value for K classes is ``log K``.

For member probabilities ``p_m`` (m = 1..M) and their mean ``p̄``:

- total    = H[p̄]                 (entropy of the mean prediction)
- aleatoric = mean_m H[p_m]        (expected entropy: noise the members agree is there)
- epistemic = total - aleatoric    (mutual information between the prediction and the member; >= 0)
"""

from __future__ import annotations

import numpy as np
from scipy import special

FIELD_DESCRIPTIONS: dict[str, str] = {
    "probabilities": "Class probabilities averaged over the ensemble members (calibrated by temperature scaling), "
    "one per class in the order of `class_names`; they sum to 1.",
    "predicted_class": "The class with the highest averaged probability.",
    "confidence": "The highest averaged class probability (between 1/K and 1).",
    "entropy": "Total predictive uncertainty: entropy of the averaged probabilities in nats "
    "(0 = certain, log K = uniform); equals aleatoric + epistemic.",
    "aleatoric": "Data uncertainty: mean entropy of the individual members' predictions in nats, "
    "high when every member finds the cell ambiguous.",
    "epistemic": "Model uncertainty: mutual information (entropy minus aleatoric) in nats, "
    "high when the members disagree, e.g. on cells unlike the training data; 0 for a single model.",
    "novelty": "Novelty score averaged over members (the model's `uncertainty.novelty`; default "
    "energy_pixel_mahalanobis: the energy -logsumexp(logits) plus the distance of the cell's pixel description to the "
    "training cells' and its relative Mahalanobis distance to the training classes', each in units of the training "
    "cells' interquartile range); higher means less like any training class. Its scale "
    "depends on the model and the score: compare with the quantiles of the model's validation cells (the HTTP "
    "service's GET /metadata `novelty`, `spec.json` `info.novelty_val_quantiles`).",
}


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (max-subtracted) along ``axis``."""
    return special.softmax(np.asarray(logits, dtype=np.float64), axis=axis)


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis``, with ``0 log 0 = 0``."""
    return special.entr(np.asarray(probs, dtype=np.float64)).sum(axis=axis)


def decompose(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Split the predictive uncertainty of ``member_probs`` (M, N, K) into its parts.

    A 2-D array (N, K) is taken as a single member (M = 1). Returns float64 arrays
    ``mean_probs`` (N, K), ``confidence``, ``entropy`` (total), ``aleatoric``, ``epistemic`` (N,)
    and int64 ``predicted`` (N,). Entropies are in nats; ``epistemic`` is clipped at 0 against
    round-off, so ``entropy == aleatoric + epistemic`` up to ~1e-12.
    """
    p = np.asarray(member_probs, dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3:
        raise ValueError(f"member_probs must have shape (M, N, K) or (N, K), got {p.shape}")
    if p.shape[0] == 0 or p.shape[2] == 0:
        raise ValueError(f"member_probs needs at least one member and one class, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("member_probs contains NaN or infinite values")
    mean = p.mean(axis=0)
    total = entropy(mean)
    aleatoric = entropy(p).mean(axis=0)
    epistemic = np.clip(total - aleatoric, 0.0, None)
    return {
        "mean_probs": mean,
        "predicted": mean.argmax(axis=1).astype(np.int64),
        "confidence": mean.max(axis=1) if mean.shape[0] else np.zeros(0),
        "entropy": total,
        "aleatoric": aleatoric,
        "epistemic": epistemic,
    }


def decompose_logits(member_logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """``decompose`` for member logits (M, N, K) or (N, K), each member scaled by ``1 / temperature``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return decompose(softmax(np.asarray(member_logits, dtype=np.float64) / temperature, axis=-1))


def decompose_pooled(member_probs: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """``decompose`` after pool-then-calibrate: the averaged probabilities' log is divided by ``temperature``.

    ``mean_probs = softmax(log p̄ / T)`` and ``entropy`` is its entropy. ``epistemic`` is the mutual information of
    the members tempered the same way (``softmax(log p_m / T)``, so disagreement is measured on the calibrated
    scale), capped at ``entropy``; ``aleatoric = entropy - epistemic``, so the identity of ``decompose`` holds.
    ``temperature=1`` gives exactly ``decompose``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = np.asarray(member_probs, dtype=np.float64)
    if temperature == 1.0:
        return decompose(p)
    if p.ndim == 2:
        p = p[None]
    with np.errstate(divide="ignore"):
        logp = np.log(p)
        log_mean = np.log(p.mean(axis=0))
    tempered = decompose(softmax(logp / temperature, axis=-1))
    mean = softmax(log_mean / temperature, axis=-1)
    total = entropy(mean)
    epistemic = np.minimum(tempered["epistemic"], total)
    return {
        "mean_probs": mean,
        "predicted": mean.argmax(axis=1).astype(np.int64),
        "confidence": mean.max(axis=1) if mean.shape[0] else np.zeros(0),
        "entropy": total,
        "aleatoric": total - epistemic,
        "epistemic": epistemic,
    }
