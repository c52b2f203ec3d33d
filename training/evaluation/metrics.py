"""Evaluation metrics: classification, calibration, out-of-distribution detection, agreement with a reference.

Every report is a flat ``dict`` of plain Python numbers (JSON- and MLflow-friendly); undefined values are NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm


def check_scores_labels(scores: np.ndarray, labels: np.ndarray, name: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    """Validate per-class ``scores`` (N, K) (probabilities or logits) and integer ``labels`` (N,) in [0, K)."""
    p = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, K) with K >= 1, got {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if y.size:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= p.shape[1]:
            raise ValueError(f"labels must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contain NaN or infinite values")
    return p, y.astype(np.int64)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes that occur in ``labels`` (scikit-learn's definition); NaN without cells.

    The one balanced accuracy of the project: validation (engine), evaluation, active learning and tuning."""
    y, pred = np.asarray(labels), np.asarray(predicted)
    if not y.size:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skm.balanced_accuracy_score(y, pred))


def classification_report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro F1 and per-class precision/recall/F1/support of ``argmax(probs)``.

    Per-class keys are ``"precision/<class>"`` etc. for every class in ``class_names`` (0 where undefined);
    ``macro_f1`` and ``balanced_accuracy`` average over the classes that occur in ``labels`` or predictions
    (resp. in ``labels``). ``confusion_matrix`` is a (K, K) nested list, rows = true, columns = predicted.
    """
    p, y = check_scores_labels(probs, labels)
    k = p.shape[1]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names but probs has {k} columns")
    pred = p.argmax(axis=1)
    idx = list(range(k))
    cm = skm.confusion_matrix(y, pred, labels=idx) if y.size else np.zeros((k, k), dtype=np.int64)
    out: dict = {"n": int(y.size)}
    if y.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["accuracy"] = float(skm.accuracy_score(y, pred))
            out["balanced_accuracy"] = balanced_accuracy(y, pred)
            out["macro_f1"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
            prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    else:
        out.update(accuracy=float("nan"), balanced_accuracy=float("nan"), macro_f1=float("nan"))
        prec = rec = f1 = np.zeros(k)
        sup = np.zeros(k, dtype=np.int64)
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(prec[i])
        out[f"recall/{name}"] = float(rec[i])
        out[f"f1/{name}"] = float(f1[i])
        out[f"support/{name}"] = int(sup[i])
    out["confusion_matrix"] = np.asarray(cm, dtype=np.int64).tolist()
    return out


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins (lo, hi] on [0, 1]; confidence 0 falls in the first bin."""
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Per confidence bin: ``bin, lower, upper, confidence`` (mean max-prob), ``accuracy``, ``count``.

    All ``n_bins`` rows are returned; empty bins have NaN confidence/accuracy and count 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = check_scores_labels(probs, labels)
    conf = p.max(axis=1) if y.size else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if y.size else np.zeros(0)
    b = _bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "lower": edges[:-1],
            "upper": edges[1:],
            "confidence": mean_conf,
            "accuracy": acc,
            "count": count.astype(np.int64),
        }
    )


def ece_from_bins(bins: pd.DataFrame) -> tuple[float, float]:
    """(ECE, MCE) of a ``reliability_bins`` table: count-weighted mean / max of |accuracy - confidence|."""
    filled = bins[bins["count"] > 0]
    if filled.empty:
        return float("nan"), float("nan")
    gap = (filled["accuracy"] - filled["confidence"]).abs().to_numpy()
    w = filled["count"].to_numpy(dtype=np.float64)
    return float((gap * w).sum() / w.sum()), float(gap.max())


def calibration_report(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """``nll`` (mean, nats), ``brier`` (mean over cells of sum_k (p_k - y_k)^2, in [0, 2]),
    ``ece`` and ``mce`` over ``n_bins`` equal-width confidence bins. NLL clips probabilities at 1e-12."""
    p, y = check_scores_labels(probs, labels)
    if y.size == 0:
        return {"n": 0, "nll": float("nan"), "brier": float("nan"), "ece": float("nan"), "mce": float("nan")}
    rows = np.arange(y.size)
    nll = float(_per_cell(p, y, n_bins)[0].mean())
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1.0
    brier = float(((p - onehot) ** 2).sum(axis=1).mean())
    ece, mce = ece_from_bins(reliability_bins(p, y, n_bins))
    return {"n": int(y.size), "nll": nll, "brier": brier, "ece": ece, "mce": mce}


def _per_cell(probs: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell: NLL, confidence bin, and (correct - confidence), whose per-bin sums give the ECE."""
    rows = np.arange(y.size)
    conf = probs.max(axis=1)
    gap = (probs.argmax(axis=1) == y).astype(np.float64) - conf
    return -np.log(np.clip(probs[rows, y], 1e-12, None)), _bin_index(conf, n_bins), gap


def paired_bootstrap(probs: np.ndarray, baselines: Sequence[np.ndarray], labels: np.ndarray, n_bins: int = 15,
                     n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """NLL and ECE of ``probs`` minus the mean over ``baselines`` (e.g. the ensemble vs its members), on the same
    cells, with a 95 % percentile interval from ``n_boot`` resamples of the cells (same resample for all).
    Keys: ``<metric>_diff``, ``<metric>_diff_ci_low``, ``<metric>_diff_ci_high``; negative = ``probs`` is better."""
    p, y = check_scores_labels(probs, labels)
    if not baselines:
        raise ValueError("paired_bootstrap needs at least one baseline")
    cells = [_per_cell(p, y, n_bins)] + [_per_cell(check_scores_labels(b, y)[0], y, n_bins) for b in baselines]
    n = y.size
    if n == 0:
        return {f"{m}_diff{s}": float("nan") for m in ("nll", "ece") for s in ("", "_ci_low", "_ci_high")}
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    draws: dict[str, list[np.ndarray]] = {"nll": [], "ece": []}

    def stats(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NLL and ECE per resample (rows of ``idx``) for each model: arrays (n_models, rows)."""
        offsets = (np.arange(idx.shape[0]) * n_bins)[:, None]
        nll, ece = [], []
        for cell_nll, cell_bin, cell_gap in cells:
            nll.append(cell_nll[idx].mean(axis=1))
            per_bin = np.bincount((offsets + cell_bin[idx]).ravel(), weights=cell_gap[idx].ravel(),
                                  minlength=idx.shape[0] * n_bins).reshape(idx.shape[0], n_bins)
            ece.append(np.abs(per_bin).sum(axis=1) / n)
        return np.array(nll), np.array(ece)

    full = stats(np.arange(n)[None])
    for start in range(0, n_boot, chunk):
        nll, ece = stats(rng.integers(0, n, (min(chunk, n_boot - start), n)))
        draws["nll"].append(nll[0] - nll[1:].mean(axis=0))
        draws["ece"].append(ece[0] - ece[1:].mean(axis=0))
    out = {}
    for i, metric in enumerate(("nll", "ece")):
        d = np.concatenate(draws[metric])
        out[f"{metric}_diff"] = float(full[i][0, 0] - full[i][1:, 0].mean())
        out[f"{metric}_diff_ci_low"], out[f"{metric}_diff_ci_high"] = (float(v) for v in np.percentile(d, [2.5, 97.5]))
    return out


ECE_TIE = 1e-6  # ECEs this close are ties: a draw with as many correct cells per bin as observed has its ECE
#                 up to float rounding (summation order, float32 tables: ~1e-9)


def ece_null_draws(probs: np.ndarray, n_bins: int = 15, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """The ECEs a *perfectly calibrated* model with these confidences would show on this many cells:
    ``draws`` seeded draws, in each every cell's top prediction correct with probability its confidence
    (consistency resampling, Broecker & Smith 2007). Same bins as ``calibration_report``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not np.all(np.isfinite(p)):
        raise ValueError(f"probs must be a finite (N, K) array, got shape {p.shape}")
    n = p.shape[0]
    if n == 0:
        return np.full(draws, np.nan)
    conf = p.max(axis=1)
    bins = _bin_index(conf, n_bins)
    rng = np.random.default_rng(seed)
    ece = []
    chunk = max(1, 4_000_000 // n)
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        gap = (rng.random((rows, n)) < conf).astype(np.float64) - conf
        offsets = (np.arange(rows) * n_bins)[:, None]
        per_bin = np.bincount((offsets + bins).ravel(), weights=gap.ravel(), minlength=rows * n_bins)
        ece.append(np.abs(per_bin.reshape(rows, n_bins)).sum(axis=1) / n)
    return np.concatenate(ece)


def ece_noise_summary(null: np.ndarray, observed: float | None = None) -> dict[str, float]:
    """Median and 95th percentile of ``ece_null_draws`` (``ece_if_calibrated_median`` / ``_q95``: an observed ECE
    below the 95th percentile cannot be told apart from perfect calibration on these cells) and, with ``observed``,
    ``ece_calibration_p``: the Monte Carlo p-value ``(1 + #{draws >= observed}) / (1 + draws)`` (ties within
    ``ECE_TIE``) of the hypothesis that the model is perfectly calibrated (small: the miscalibration is real).
    NaN without cells or without a finite ``observed``."""
    empty = bool(np.isnan(null).all())
    nan = float("nan")
    out = {"ece_if_calibrated_median": nan if empty else float(np.median(null)),
           "ece_if_calibrated_q95": nan if empty else float(np.quantile(null, 0.95))}
    if observed is not None:
        tied_or_above = np.count_nonzero(null >= observed - ECE_TIE)
        out["ece_calibration_p"] = (float((1 + tied_or_above) / (1 + null.size))
                                    if not empty and np.isfinite(observed) else nan)
    return out


def ece_if_calibrated(probs: np.ndarray, n_bins: int = 15, draws: int = 1000, seed: int = 0,
                      observed: float | None = None) -> dict[str, float]:
    """How large an ECE sampling noise alone explains on these cells: :func:`ece_noise_summary` of
    :func:`ece_null_draws`."""
    return ece_noise_summary(ece_null_draws(probs, n_bins, draws, seed), observed)


def _scores(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def ood_report(score_in: np.ndarray, score_out: np.ndarray) -> dict:
    """How well a score separates out-of-distribution cells (positives) from in-distribution ones.

    Higher score = more novel.

    ``auroc``; ``aupr`` (average precision, out = positive) and ``aupr_in`` (in = positive, negated score);
    ``fpr95``: fraction of in-distribution cells flagged at the highest threshold that still flags >= 95 % of
    the out-of-distribution cells. All NaN when either side is empty.
    """
    s_in, s_out = _scores(score_in, "score_in"), _scores(score_out, "score_out")
    out = {"n_in": int(s_in.size), "n_out": int(s_out.size)}
    if s_in.size == 0 or s_out.size == 0:
        return out | {
            "auroc": float("nan"),
            "aupr": float("nan"),
            "aupr_in": float("nan"),
            "fpr95": float("nan"),
        }
    y = np.r_[np.zeros(s_in.size), np.ones(s_out.size)]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    i = int(np.searchsorted(tpr, 0.95 - 1e-12, side="left"))
    return out | {
        "auroc": float(skm.roc_auc_score(y, s)),
        "aupr": float(skm.average_precision_score(y, s)),
        "aupr_in": float(skm.average_precision_score(1 - y, -s)),
        "fpr95": float(fpr[min(i, fpr.size - 1)]),
    }


def reference_agreement(scores: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> dict:
    """Compare per-cell scores with a reference classifier's (e.g. the SPARCS autophagy classifier 2.1).

    Pairs where either value is NaN are dropped (``n`` counts the pairs used, ``n_dropped`` the rest).
    ``pearson`` / ``spearman`` correlations; calls are ``score > threshold`` on both sides; ``agreement``
    is the fraction of equal calls and ``cohen_kappa`` their chance-corrected agreement. Undefined -> NaN.
    """
    a = np.asarray(scores, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"scores and reference must have the same length, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    out = {"n": int(a.size), "n_dropped": int((~ok).sum())}
    nan = float("nan")
    if a.size == 0:
        return out | {"pearson": nan, "spearman": nan, "agreement": nan, "cohen_kappa": nan}
    ca, cb = a > threshold, b > threshold
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        varied = a.size >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0
        pearson = float(stats.pearsonr(a, b)[0]) if varied else nan
        spearman = float(stats.spearmanr(a, b)[0]) if varied else nan
        kappa = float(skm.cohen_kappa_score(ca, cb)) if np.unique(np.r_[ca, cb]).size > 1 else nan
    return out | {
        "pearson": pearson,
        "spearman": spearman,
        "agreement": float((ca == cb).mean()),
        "cohen_kappa": kappa,
    }
