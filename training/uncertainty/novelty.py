"""Novelty scores: how unlike every training class a cell is (higher = more novel), fitted per ensemble member.

``uncertainty.novelty`` chooses one; each is fitted on the training cells of one member and averaged over members:

- ``mahalanobis``: class-conditional Gaussians with one shared covariance (Lee et al. 2018) on the penultimate
  features; distance to the nearest class mean (:class:`GaussianDensity`).
- ``relative_mahalanobis``: the same minus the distance to one background Gaussian of all training features
  (Ren et al. 2021), which removes the directions every class shares.
- ``knn``: deep nearest neighbours (Sun et al. 2022): Euclidean distance of the L2-normalised penultimate features
  to the k-th nearest training cell.
- ``multistage_knn``: ``knn`` on features pooled from every stage of the backbone (each stage's global average and
  spatial standard deviation, L2-normalised, concatenated), so early intensity statistics and local structure count
  beside the penultimate morphology.
- ``energy``: the negative free energy ``-logsumexp(logits)`` (Liu et al. 2020); nothing to fit.
- ``pixel_knn``: distance to the k-th nearest training cell in a fixed, untrained description of the pixels at full
  resolution (``training.uncertainty.pixel_descriptor``: intensity, blob and edge statistics), log-compressed and
  standardised on the training cells (:class:`PixelKNN`).
- ``pixel_mahalanobis``: relative Mahalanobis in the same pixel space, with a ridge on each covariance
  (:class:`PixelMahalanobis`).
- ``energy_multistage``, ``energy_pixel``, ``energy_multistage_pixel``, ``pixel_knn_mahalanobis``,
  ``energy_pixel_mahalanobis``: the named scores, each scaled by its training cells' median and interquartile range,
  summed (:class:`ScaledSum`).

The fitted state is plain arrays (``to_dict`` / ``from_dict``) so it can be saved in an ``.npz`` next to a
checkpoint; ``novelty_from_dict`` rebuilds any kind (files without a ``kind`` are ``mahalanobis``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import special
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

    kind = "mahalanobis"
    input = "features"

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


# -- the other scores ------------------------------------------------------------------------------------

NOVELTY_KINDS = ("mahalanobis", "relative_mahalanobis", "knn", "multistage_knn", "energy", "energy_multistage",
                 "pixel_knn", "energy_pixel", "energy_multistage_pixel", "pixel_mahalanobis", "pixel_knn_mahalanobis",
                 "energy_pixel_mahalanobis")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _check_rows(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"features must have shape (N, {dim if dim is not None else 'D'}), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    return x


def kth_nearest(x: np.ndarray, bank: np.ndarray, k: int, leave_self_out: bool = False, own_below: float = 1e-3
                ) -> np.ndarray:
    """Euclidean distance of each row of ``x`` to its ``k``-th nearest row of ``bank`` (k capped at the bank's size),
    one BLAS product per chunk (``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``). ``leave_self_out`` (scoring the bank's own
    cells): a row whose nearest entry is closer than ``own_below`` (itself, up to the bank's rounding) skips it."""
    k = min(k, bank.shape[0])
    bank_sq = (bank**2).sum(axis=1)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], 4096):
        q = x[i : i + 4096]
        d = np.sqrt(np.clip((q**2).sum(axis=1)[:, None] + bank_sq[None] - 2.0 * (q @ bank.T), 0.0, None))
        if leave_self_out:
            nearest = d.argmin(axis=1)
            own = d[np.arange(len(d)), nearest] < own_below
            d[np.flatnonzero(own), nearest[own]] = np.inf
        out[i : i + 4096] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Negative free energy ``-logsumexp(logits)`` (N,): low for cells the classifier's logits fit well."""
    return -special.logsumexp(np.asarray(logits, dtype=np.float64), axis=-1)


class RelativeMahalanobis:
    """Min over classes of the squared Mahalanobis distance minus that to a background Gaussian of all features."""

    kind = "relative_mahalanobis"
    input = "features"

    def __init__(self) -> None:
        self.classes_ = GaussianDensity()
        self.background_ = GaussianDensity()

    def fit(self, features: np.ndarray, labels: np.ndarray) -> RelativeMahalanobis:
        self.classes_.fit(features, labels)
        self.background_.fit(features, np.zeros(len(features), dtype=np.int64))
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        return (self.classes_.distances(features) ** 2).min(axis=1) - self.background_.distances(features)[:, 0] ** 2

    def to_dict(self) -> dict[str, np.ndarray | float]:
        return {**self.classes_.to_dict(), **{f"bg_{k}": v for k, v in self.background_.to_dict().items()}}

    @classmethod
    def from_dict(cls, d: dict) -> RelativeMahalanobis:
        obj = cls()
        obj.classes_ = GaussianDensity.from_dict({k: d[k] for k in _KEYS if k in d})
        obj.background_ = GaussianDensity.from_dict({k: d[f"bg_{k}"] for k in _KEYS if f"bg_{k}" in d})
        return obj


class KNNNovelty:
    """Deep nearest neighbours: distance of the L2-normalised query to its k-th nearest training cell.

    The bank keeps at most ``max_bank`` training cells (a seeded random subset), so the artifact stays small.
    ``input`` is ``features`` (penultimate) or ``stages`` (multi-stage pooled features, kind ``multistage_knn``).
    """

    def __init__(self, k: int = 10, max_bank: int = 5000, seed: int = 0, input: str = "features") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.max_bank, self.seed, self.input = int(k), int(max_bank), int(seed), input
        self.bank_: np.ndarray | None = None  # float64 holding float32-rounded rows: what is saved, exactly

    @property
    def kind(self) -> str:
        return "knn" if self.input == "features" else "multistage_knn"

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> KNNNovelty:
        x = _check_rows(features)
        if x.shape[0] == 0:
            raise ValueError("kNN novelty needs at least one training cell")
        if x.shape[0] > self.max_bank:
            x = x[np.sort(np.random.default_rng(self.seed).choice(x.shape[0], self.max_bank, replace=False))]
        self.bank_ = l2_normalize(x).astype(np.float32).astype(np.float64)
        return self

    def score(self, features: np.ndarray, leave_self_out: bool = False) -> np.ndarray:
        """Distance to the k-th nearest bank entry; ``leave_self_out`` (scoring the training cells themselves): a
        cell that is in the bank skips its own entry (distance 0), so it is measured like a new cell."""
        if self.bank_ is None:
            raise ModelError("KNNNovelty is not fitted: call fit() or from_dict() first")
        x = l2_normalize(_check_rows(features, self.bank_.shape[1]))
        # its own entry: equal up to the bank's float32 rounding (cosine > 1 - 2e-6)
        return kth_nearest(x, self.bank_, self.k, leave_self_out, own_below=2e-3)

    def to_dict(self) -> dict[str, np.ndarray | float]:
        if self.bank_ is None:
            raise ModelError("KNNNovelty is not fitted")
        return {"bank": self.bank_.astype(np.float32), "k": self.k, "input": self.input}

    @classmethod
    def from_dict(cls, d: dict) -> KNNNovelty:
        if "bank" not in d or "k" not in d:
            raise ModelError("kNN novelty model needs the keys 'bank' and 'k'")
        bank = np.asarray(d["bank"], dtype=np.float32).astype(np.float64)
        obj = cls(k=int(np.asarray(d["k"])), max_bank=max(1, bank.shape[0]), input=str(np.asarray(d.get("input", "features"))))
        obj.bank_ = bank
        return obj


class EnergyNovelty:
    """``energy_score`` of the member's logits; stateless."""

    kind = "energy"
    input = "logits"

    def fit(self, logits: np.ndarray | None = None, labels: np.ndarray | None = None) -> EnergyNovelty:
        return self

    def score(self, logits: np.ndarray) -> np.ndarray:
        return energy_score(logits)

    def to_dict(self) -> dict[str, np.ndarray | float]:
        return {}

    @classmethod
    def from_dict(cls, d: dict) -> EnergyNovelty:
        return cls()


class PixelSpace:
    """The space the pixel scores live in: each :func:`pixel_descriptor` statistic compressed by a signed log
    (``sign(x) log(1 + |x| / m)``, ``m`` its median magnitude on the training cells) and standardised on them."""

    def __init__(self) -> None:
        self.magnitude_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def _compress(self, x: np.ndarray) -> np.ndarray:
        return np.sign(x) * np.log1p(np.abs(x) / self.magnitude_)

    def fit(self, pixels: np.ndarray) -> PixelSpace:
        x = _check_rows(pixels)
        if x.shape[0] == 0:
            raise ValueError("pixel novelty needs at least one training cell")
        magnitude = np.median(np.abs(x), axis=0)
        self.magnitude_ = np.where(magnitude > 0, magnitude, 1.0)
        z = self._compress(x)
        sd = z.std(axis=0)
        self.mean_, self.scale_ = z.mean(axis=0), np.where(sd > 1e-12, sd, 1.0)
        return self

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        """Descriptor rows -> standardised signed-log statistics."""
        if self.mean_ is None:
            raise ModelError("the pixel novelty score is not fitted: call fit() or from_dict() first")
        return (self._compress(_check_rows(pixels, self.mean_.shape[0])) - self.mean_) / self.scale_

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"magnitude": self.magnitude_, "mean": self.mean_, "scale": self.scale_}

    @classmethod
    def from_dict(cls, d: dict, kind: str) -> PixelSpace:
        missing = [k for k in ("magnitude", "mean", "scale") if k not in d]
        if missing:
            raise ModelError(f"{kind} novelty model is missing keys {missing}")
        obj = cls()
        obj.magnitude_, obj.mean_, obj.scale_ = (np.asarray(d[k], dtype=np.float64) for k in ("magnitude", "mean", "scale"))
        if obj.mean_.ndim != 1 or obj.magnitude_.shape != obj.mean_.shape or obj.scale_.shape != obj.mean_.shape:
            raise ModelError(f"{kind} novelty model: 'magnitude', 'mean' and 'scale' need one shape, got "
                             f"{obj.magnitude_.shape}, {obj.mean_.shape}, {obj.scale_.shape}")
        return obj


class PixelKNN:
    """``pixel_knn``: distance to the k-th nearest training cell in :class:`PixelSpace` (no learned features). The
    distance is Euclidean, not on unit vectors, because how bright and how large a cell's structures are is the
    signal (a few large aggregates, no puncta at all)."""

    kind = "pixel_knn"
    input = "pixels"

    def __init__(self, k: int = 10, max_bank: int = 5000, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.max_bank, self.seed = int(k), int(max_bank), int(seed)
        self.space = PixelSpace()
        self.bank_: np.ndarray | None = None

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        """Descriptor rows -> the standardised space the bank lives in."""
        if self.bank_ is None:
            raise ModelError("PixelKNN is not fitted: call fit() or from_dict() first")
        return self.space.transform(pixels)

    def fit(self, pixels: np.ndarray, labels: np.ndarray | None = None) -> PixelKNN:
        z = self.space.fit(pixels).transform(pixels)
        if z.shape[0] > self.max_bank:
            z = z[np.sort(np.random.default_rng(self.seed).choice(z.shape[0], self.max_bank, replace=False))]
        self.bank_ = z
        return self

    def score(self, pixels: np.ndarray, leave_self_out: bool = False) -> np.ndarray:
        """Distance to the k-th nearest bank entry; ``leave_self_out``: a cell in the bank skips its own entry."""
        return kth_nearest(self.transform(pixels), self.bank_, self.k, leave_self_out)

    def to_dict(self) -> dict[str, np.ndarray | float]:
        if self.bank_ is None:
            raise ModelError("PixelKNN is not fitted")
        return {"bank": self.bank_, "k": self.k, **self.space.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> PixelKNN:
        if "bank" not in d or "k" not in d:
            raise ModelError(f"pixel_knn novelty model is missing keys {[k for k in ('bank', 'k') if k not in d]}")
        bank = np.asarray(d["bank"], dtype=np.float64)
        obj = cls(k=int(np.asarray(d["k"])), max_bank=max(1, bank.shape[0]))
        obj.space = PixelSpace.from_dict(d, "pixel_knn")
        if bank.ndim != 2 or bank.shape[1:] != obj.space.mean_.shape:
            raise ModelError(f"pixel_knn novelty model arrays have inconsistent shapes: bank {bank.shape}, "
                             f"mean {obj.space.mean_.shape}")
        obj.bank_ = bank
        return obj


def ridge_whitening(cov: np.ndarray, ridge: float) -> np.ndarray:
    """``W`` with ``W @ W.T = (cov + ridge * its largest eigenvalue * I)^-1``: Mahalanobis distances are Euclidean
    after ``x @ W``. The ridge keeps directions with almost no spread among the training cells from dominating."""
    evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
    top = float(evals.max(initial=0.0))
    if top <= 0:  # one cell, or every cell alike: plain Euclidean distances
        return np.eye(cov.shape[0])
    return evecs / np.sqrt(np.clip(evals, 0.0, None) + ridge * top)


class PixelMahalanobis:
    """``pixel_mahalanobis``: relative Mahalanobis (Ren et al. 2021) in :class:`PixelSpace`: the squared distance to
    the nearest training class's mean under the classes' pooled within-class covariance, minus the squared distance
    to the mean of all training cells under their covariance. The within-class covariance is what a distance that
    ignores the classes cannot see: a cell between two classes (a few puncta, between none and many) lies off both
    classes' own spread even where the kNN finds a training cell nearby (a weak responder). Each covariance carries a
    ridge of ``RIDGE`` times its largest eigenvalue: chosen by leave-one-class-out on the control classes (README
    'Novelty: which score'); Ledoit-Wolf's own shrinkage is far smaller and lets noise directions rule."""

    kind = "pixel_mahalanobis"
    input = "pixels"
    RIDGE = 0.01

    def __init__(self) -> None:
        self.space = PixelSpace()
        self.class_means_: np.ndarray | None = None  # (n_classes, D), whitened
        self.within_: np.ndarray | None = None
        self.background_mean_: np.ndarray | None = None  # (D,), whitened
        self.background_: np.ndarray | None = None

    def fit(self, pixels: np.ndarray, labels: np.ndarray | None = None) -> PixelMahalanobis:
        if labels is None:
            raise ValueError("pixel_mahalanobis needs the training cells' labels")
        z = self.space.fit(pixels).transform(pixels)
        y = np.asarray(labels)
        if y.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {y.shape}")
        classes, inverse = np.unique(y, return_inverse=True)
        means = np.stack([z[inverse == c].mean(axis=0) for c in range(classes.size)])
        resid = z - means[inverse]
        self.within_ = ridge_whitening(resid.T @ resid / z.shape[0], self.RIDGE)
        centre = z.mean(axis=0)
        self.background_ = ridge_whitening((z - centre).T @ (z - centre) / z.shape[0], self.RIDGE)
        self.class_means_, self.background_mean_ = means @ self.within_, centre @ self.background_
        return self

    def score(self, pixels: np.ndarray) -> np.ndarray:
        if self.class_means_ is None:
            raise ModelError("PixelMahalanobis is not fitted: call fit() or from_dict() first")
        z = self.space.transform(pixels)
        nearest = cdist(z @ self.within_, self.class_means_, metric="sqeuclidean").min(axis=1)
        return nearest - ((z @ self.background_ - self.background_mean_) ** 2).sum(axis=1)

    def to_dict(self) -> dict[str, np.ndarray | float]:
        if self.class_means_ is None:
            raise ModelError("PixelMahalanobis is not fitted")
        return {**self.space.to_dict(), "class_means": self.class_means_, "within": self.within_,
                "background_mean": self.background_mean_, "background": self.background_}

    @classmethod
    def from_dict(cls, d: dict) -> PixelMahalanobis:
        keys = ("class_means", "within", "background_mean", "background")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ModelError(f"pixel_mahalanobis novelty model is missing keys {missing}")
        obj = cls()
        obj.space = PixelSpace.from_dict(d, "pixel_mahalanobis")
        obj.class_means_, obj.within_, obj.background_mean_, obj.background_ = (
            np.asarray(d[k], dtype=np.float64) for k in keys)
        dim = obj.space.mean_.shape[0]
        if (obj.class_means_.ndim != 2 or obj.class_means_.shape[1] != dim or obj.within_.shape != (dim, dim)
                or obj.background_.shape != (dim, dim) or obj.background_mean_.shape != (dim,)):
            raise ModelError(f"pixel_mahalanobis novelty model arrays do not fit its {dim} statistics")
        return obj


_KNN = (KNNNovelty, PixelKNN)
# a sum's parts, in order; the kNN parts score the training cells leaving their own bank entry out
SUMS = {
    "energy_multistage": ("energy", "multistage_knn"),
    "energy_pixel": ("energy", "pixel_knn"),
    "energy_multistage_pixel": ("energy", "multistage_knn", "pixel_knn"),
    "pixel_knn_mahalanobis": ("pixel_knn", "pixel_mahalanobis"),
    "energy_pixel_mahalanobis": ("energy", "pixel_knn", "pixel_mahalanobis"),
}


class ScaledSum:
    """A sum of scores (``SUMS``), each centred on the median of its training-cell scores and divided by their
    interquartile range. They fail in different places: energy flags cells the logits fit badly (in-between
    phenotypes) but not a new structure the classifier maps onto a class; the multi-stage kNN flags local structure no
    training cell has; the pixel kNN what the pixels show whatever the classifier learned. Training cells are scored
    against a kNN bank leaving their own entry out."""

    def __init__(self, kind: str, k: int = 10, max_bank: int = 5000, seed: int = 0) -> None:
        if kind not in SUMS:
            raise ModelError(f"unknown summed novelty score '{kind}'; expected one of {', '.join(SUMS)}")
        self.kind = kind
        self.parts = [make_novelty(p, k, max_bank, seed) for p in SUMS[kind]]
        self.input = "+".join(dict.fromkeys(p.input for p in self.parts))
        self.centre_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def _by_input(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """``inputs`` keyed by kind of input; a bare array where every part reads the same one (``pixels``)."""
        return inputs if isinstance(inputs, dict) else {self.input: inputs}

    def _raw(self, inputs: dict[str, np.ndarray] | np.ndarray, leave_self_out: bool = False) -> np.ndarray:
        inputs = self._by_input(inputs)
        return np.stack([p.score(inputs[p.input], leave_self_out=True) if leave_self_out and isinstance(p, _KNN)
                         else p.score(inputs[p.input]) for p in self.parts], axis=1)

    def fit(self, inputs: dict[str, np.ndarray] | np.ndarray, labels: np.ndarray | None = None) -> ScaledSum:
        by_input = self._by_input(inputs)
        for p in self.parts:
            p.fit(by_input[p.input], labels)
        raw = self._raw(inputs, leave_self_out=True)
        q25, q50, q75 = np.quantile(raw, [0.25, 0.5, 0.75], axis=0)
        self.centre_, self.scale_ = q50, np.where(q75 - q25 > 0, q75 - q25, 1.0)
        return self

    def score(self, inputs: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
        if self.centre_ is None:
            raise ModelError(f"{self.kind} is not fitted: call fit() or from_dict() first")
        return ((self._raw(inputs) - self.centre_) / self.scale_).sum(axis=1)

    def to_dict(self) -> dict[str, np.ndarray | float]:
        if self.centre_ is None:
            raise ModelError(f"{self.kind} is not fitted")
        parts = {f"{p.kind}/{key}": v for p in self.parts for key, v in p.to_dict().items()}
        return {**parts, "centre": self.centre_, "scale": self.scale_}

    @classmethod
    def from_dict(cls, kind: str, d: dict) -> ScaledSum:
        if "centre" not in d or "scale" not in d:
            raise ModelError(f"{kind} novelty model needs the keys 'centre' and 'scale'")
        obj = cls(kind)
        legacy = kind == "energy_multistage" and "bank" in d  # saved before the sums were general: unprefixed kNN
        parts = []
        for p in obj.parts:
            own = d if legacy else {key.split("/", 1)[1]: v for key, v in d.items() if key.startswith(f"{p.kind}/")}
            parts.append(novelty_from_dict({"kind": p.kind, **own}))
        obj.parts = parts
        obj.centre_ = np.asarray(d["centre"], dtype=np.float64)
        obj.scale_ = np.asarray(d["scale"], dtype=np.float64)
        if obj.centre_.shape != (len(parts),) or obj.scale_.shape != (len(parts),):
            raise ModelError(f"{kind} novelty model: 'centre' and 'scale' need {len(parts)} entries")
        return obj


NoveltyModel = GaussianDensity | RelativeMahalanobis | KNNNovelty | EnergyNovelty | PixelKNN | PixelMahalanobis | ScaledSum


def novelty_inputs(model: NoveltyModel, outputs: dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
    """What ``model`` fits and scores, taken from a member's ``outputs`` (``features``, ``logits``, ``stages``,
    ``pixels``)."""
    keys = model.input.split("+")
    return outputs[keys[0]] if len(keys) == 1 else {k: outputs[k] for k in keys}


def make_novelty(kind: str, k: int = 10, max_bank: int = 5000, seed: int = 0) -> NoveltyModel:
    """An unfitted novelty model of ``kind`` (one of ``NOVELTY_KINDS``)."""
    if kind == "mahalanobis":
        return GaussianDensity()
    if kind == "relative_mahalanobis":
        return RelativeMahalanobis()
    if kind in ("knn", "multistage_knn"):
        return KNNNovelty(k, max_bank, seed, input="features" if kind == "knn" else "stages")
    if kind == "energy":
        return EnergyNovelty()
    if kind == "pixel_knn":
        return PixelKNN(k, max_bank, seed)
    if kind == "pixel_mahalanobis":
        return PixelMahalanobis()
    if kind in SUMS:
        return ScaledSum(kind, k, max_bank, seed)
    raise ModelError(f"unknown novelty score '{kind}'; expected one of {', '.join(NOVELTY_KINDS)}")


def novelty_to_dict(model: NoveltyModel) -> dict[str, np.ndarray | float | str]:
    """``to_dict`` plus the ``kind``, for ``np.savez``."""
    return {"kind": model.kind, **model.to_dict()}


def novelty_from_dict(d: dict) -> NoveltyModel:
    """Rebuild a saved novelty model of any kind (no ``kind`` key: a ``mahalanobis`` file from before the others)."""
    kind = str(np.asarray(d["kind"])) if "kind" in d else "mahalanobis"
    rest = {k: v for k, v in d.items() if k != "kind"}
    if kind == "mahalanobis":
        return GaussianDensity.from_dict(rest)
    if kind == "relative_mahalanobis":
        return RelativeMahalanobis.from_dict(rest)
    if kind in ("knn", "multistage_knn"):
        return KNNNovelty.from_dict(rest)
    if kind == "energy":
        return EnergyNovelty()
    if kind == "pixel_knn":
        return PixelKNN.from_dict(rest)
    if kind == "pixel_mahalanobis":
        return PixelMahalanobis.from_dict(rest)
    if kind in SUMS:
        return ScaledSum.from_dict(kind, rest)
    raise ModelError(f"unknown novelty score '{kind}' in a saved model; expected one of {', '.join(NOVELTY_KINDS)}")


def stage_features(stage_maps: list) -> np.ndarray:
    """Multi-stage pooled features: each stage map ``(N, C_i, H, W)`` pooled over space twice, by its mean and by its
    standard deviation, each L2-normalised, concatenated ``(N, 2 sum C_i)``. The standard deviation keeps what an
    average washes out: a few large bright structures in an otherwise ordinary cell (aggregates, debris clumps).
    Accepts torch tensors or arrays."""
    parts = []
    for fm in stage_maps:
        if hasattr(fm, "cpu"):  # torch: pool where the maps are (one pass for both moments)
            sd, mean = torch.std_mean(fm.float(), dim=(2, 3), correction=0)
            mean, sd = mean.cpu().numpy(), sd.cpu().numpy()
        else:
            a = np.asarray(fm, dtype=np.float64)
            mean, sd = a.mean(axis=(2, 3)), a.std(axis=(2, 3))
        parts += [l2_normalize(mean), l2_normalize(sd)]
    return np.concatenate(parts, axis=1)
