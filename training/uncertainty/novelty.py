"""Feature-density novelty: class-conditional Gaussians with one shared covariance (Lee et al. 2018).

Fitted on the penultimate features of the training cells; a cell's novelty is its Mahalanobis distance
to the nearest class mean, so phenotypes unlike every training class score high even when the
classifier is confident. The fitted state is plain arrays (``to_dict`` / ``from_dict``) so it can be
saved in an ``.npz`` next to a checkpoint.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.covariance import LedoitWolf

from training.errors import ModelError

_CHUNK = 65536
_KEYS = ("classes", "class_means", "precision", "mean", "scale", "shrinkage")


class GaussianDensity:
    """Class means + shared Ledoit-Wolf covariance; ``score`` = min over classes of the Mahalanobis distance.

    With ``standardize`` the features are first centred and scaled per dimension (constant dimensions keep
    scale 1). The shared covariance is pooled from within-class residuals of classes with >= 2 cells; a
    class with a single cell contributes its mean only. If no class has two cells, the covariance of all
    features around their overall mean is used instead, and with a single cell overall the identity.
    """

    def __init__(self, standardize: bool = True) -> None:
        self.standardize = standardize
        self.classes_: np.ndarray | None = None
        self.class_means_: np.ndarray | None = None
        self.precision_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.shrinkage_: float = float("nan")
        self._whiten: np.ndarray | None = None

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, features: np.ndarray, labels: np.ndarray) -> GaussianDensity:
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"features must have shape (N, D) with N, D >= 1, got {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or infinite values")
        d = x.shape[1]
        if self.standardize:
            self.mean_ = x.mean(axis=0)
            sd = x.std(axis=0)
            self.scale_ = np.where(sd > 1e-12 * max(1.0, float(np.abs(x).max())), sd, 1.0)
        else:
            self.mean_, self.scale_ = np.zeros(d), np.ones(d)
        x = (x - self.mean_) / self.scale_

        classes, inverse = np.unique(y, return_inverse=True)
        counts = np.bincount(inverse, minlength=classes.size)
        means = np.zeros((classes.size, d))
        np.add.at(means, inverse, x)
        means /= counts[:, None]
        pooled = counts[inverse] >= 2
        if pooled.sum() >= 2:
            resid = x[pooled] - means[inverse[pooled]]
            lw = LedoitWolf(assume_centered=True).fit(resid)
            precision, shrinkage = lw.precision_, float(lw.shrinkage_)
        elif x.shape[0] >= 2:
            lw = LedoitWolf().fit(x)
            precision, shrinkage = lw.precision_, float(lw.shrinkage_)
        else:
            precision, shrinkage = np.eye(d), 1.0
        self.classes_, self.class_means_, self.precision_, self.shrinkage_ = (
            classes,
            means,
            precision,
            shrinkage,
        )
        self._whiten = None
        return self

    # -- scoring ---------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.precision_ is None:
            raise ModelError("GaussianDensity is not fitted: call fit() or from_dict() first")

    def _whitening(self) -> np.ndarray:
        """W with W @ W.T = precision, so Mahalanobis distances are Euclidean after ``x @ W``."""
        if self._whiten is None:
            w, v = np.linalg.eigh((self.precision_ + self.precision_.T) / 2)
            self._whiten = v * np.sqrt(np.clip(w, 0.0, None))
        return self._whiten

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to each class mean, shape (N, n_classes)."""
        self._check_fitted()
        x = np.asarray(features, dtype=np.float64)
        d = self.class_means_.shape[1]
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"features must have shape (N, {d}), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or infinite values")
        w = self._whitening()
        centres = self.class_means_ @ w
        out = np.empty((x.shape[0], centres.shape[0]))
        for i in range(0, x.shape[0], _CHUNK):  # bounded memory for screen-sized inputs
            z = ((x[i : i + _CHUNK] - self.mean_) / self.scale_) @ w
            out[i : i + _CHUNK] = np.sqrt(cdist(z, centres, metric="sqeuclidean"))
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        """Novelty (N,): distance to the nearest class mean; higher = more novel."""
        dist = self.distances(features)
        return dist.min(axis=1) if dist.shape[0] else np.zeros(0)

    def nearest_class(self, features: np.ndarray) -> np.ndarray:
        """The label of the nearest class mean for each row."""
        return self.classes_[self.distances(features).argmin(axis=1)]

    # -- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, np.ndarray | float]:
        """Plain arrays (and one float) for ``np.savez``; ``classes`` keeps the label dtype."""
        self._check_fitted()
        return {
            "classes": np.asarray(self.classes_),
            "class_means": self.class_means_.copy(),
            "precision": self.precision_.copy(),
            "mean": self.mean_.copy(),
            "scale": self.scale_.copy(),
            "shrinkage": float(self.shrinkage_),
        }

    @classmethod
    def from_dict(cls, d: dict) -> GaussianDensity:
        """Rebuild from ``to_dict`` output (or an ``np.load``-ed npz holding those keys)."""
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ModelError(f"novelty model is missing keys {missing}; expected {list(_KEYS)}")
        means = np.asarray(d["class_means"], dtype=np.float64)
        precision = np.asarray(d["precision"], dtype=np.float64)
        dim = means.shape[1] if means.ndim == 2 else -1
        if dim < 1 or precision.shape != (dim, dim) or np.shape(d["mean"]) != (dim,) or np.shape(d["scale"]) != (dim,):
            raise ModelError(
                f"novelty model arrays have inconsistent shapes: class_means {means.shape}, precision "
                f"{precision.shape}, mean {np.shape(d['mean'])}, scale {np.shape(d['scale'])}"
            )
        obj = cls(standardize=True)
        obj.classes_ = np.asarray(d["classes"])
        obj.class_means_ = means
        obj.precision_ = precision
        obj.mean_ = np.asarray(d["mean"], dtype=np.float64)
        obj.scale_ = np.asarray(d["scale"], dtype=np.float64)
        obj.shrinkage_ = float(np.asarray(d["shrinkage"]))
        obj.standardize = not (np.all(obj.mean_ == 0) and np.all(obj.scale_ == 1))
        return obj
