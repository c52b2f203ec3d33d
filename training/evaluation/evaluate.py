"""Evaluate an ensemble on the fixed test split and the held-out classes.

One scoring pass gives member logits; every view (calibrated ensemble, uncalibrated, a single member) is
derived from them, so the comparisons are on exactly the same cells. Outputs in ``out_dir``:

``metrics.json`` (flat, DVC metrics), ``predictions.parquet`` (per test / held-out cell), ``reliability.csv``
(DVC plot), ``confusion.png``, ``reliability.png``, ``embedding.png``, ``uncertainty.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Params
from training.data.loader import loader_for
from training.data.splits import class_table
from training.errors import DataError
from training.evaluation.metrics import (
    calibration_report,
    classification_report,
    ece_if_calibrated,
    ood_report,
    paired_bootstrap,
    reference_agreement,
    reliability_bins,
)
from training.evaluation.plots import plot_confusion, plot_embedding, plot_reliability, plot_uncertainty_hist
from training.io.tables import write_table
from training.uncertainty.calibration import pooled_log_probs
from training.uncertainty.decompose import softmax
from training.uncertainty.ensemble import Ensemble
from training.uncertainty.shift import label_free_temperature

OOD_SCORES = {
    "max_prob": lambda o: 1.0 - o["confidence"],
    "entropy": lambda o: o["entropy"],
    "mutual_info": lambda o: o["epistemic"],
    "density": lambda o: o["novelty"],
}


def score_split(ens: Ensemble, cells: pd.DataFrame, params: Params, progress: bool = False) -> dict[str, np.ndarray]:
    """Raw ensemble outputs (member logits, novelty, features) for ``cells``, in table order."""
    loader = loader_for(cells, params.data, ens.spec.channels, shuffle=False, seed=0, cache=False,
                        batch_size=params.score.batch_size)
    return ens.predict_batches(loader, total=len(loader), progress=progress, with_features=True, raw=True)


def ood_metrics(out_in: dict[str, np.ndarray], out_out: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    res = {}
    for name, fn in OOD_SCORES.items():
        r = ood_report(fn(out_in), fn(out_out))
        for key in ("auroc", "aupr", "fpr95"):
            res[f"{prefix}/{name}/{key}"] = r[key]
    return res


def heldout_metrics(cells: pd.DataFrame, out: dict[str, np.ndarray], test_mask: np.ndarray) -> dict[str, float]:
    """Held-out-class detection against the test cells, for each uncertainty score: pooled (``heldout/``), per class
    (``heldout_<class>/``) and, for a class imaged at several timepoints, the AUROC per timepoint
    (``heldout_<class>_<t>h/<score>/auroc``, in time order): where along a timecourse its cells stop looking new."""
    held = cells["split"].to_numpy() == "heldout"
    if not held.any():
        return {}
    ref = {k: v[test_mask] for k, v in out.items()}

    def part(mask: np.ndarray, prefix: str) -> dict[str, float]:
        return ood_metrics(ref, {k: v[mask] for k, v in out.items()}, prefix)

    res = part(held, "heldout")
    labels = cells["label"].astype(str).to_numpy()
    times = (pd.to_numeric(cells["timepoint"], errors="coerce").to_numpy(dtype=float) if "timepoint" in cells
             else np.full(len(cells), np.nan))
    for cls in sorted(set(labels[held])):
        m = held & (labels == cls)
        res.update(part(m, f"heldout_{cls}"))
        timepoints = np.unique(times[m & ~np.isnan(times)])
        if len(timepoints) > 1:
            for t in timepoints:
                per = part(m & (times == t), f"heldout_{cls}_{t:g}h")
                res.update({k: v for k, v in per.items() if k.endswith("/auroc")})
    return res


def evaluate(ens: Ensemble, splits: pd.DataFrame, params: Params, out_dir: str | Path,
             progress: bool = True) -> dict[str, Any]:
    """Compute every evaluation metric and plot; returns the flat metrics dict (also written as JSON)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = ens.spec.classes
    cells = splits[splits["split"].isin(["test", "heldout"])].reset_index(drop=True)
    cells["y"] = class_table(cells, classes).to_numpy()
    test_mask = (cells["split"] == "test").to_numpy()
    if not test_mask.any():
        raise DataError("the split has no test cells")
    raw = score_split(ens, cells, params, progress)
    logits, y = raw["logits"], cells["y"].to_numpy()
    views = {
        "": ens.combine(logits),
        "uncalibrated/": ens.combine(logits, calibration="none"),
    }
    for v in views.values():
        v["novelty"] = raw["novelty"]
    ens_out = views[""]
    metrics: dict[str, Any] = {}
    report = classification_report(ens_out["mean_probs"][test_mask], y[test_mask], classes)
    cm = report.pop("confusion_matrix")
    metrics.update(report)
    n_bins = params.evaluate.ece_bins
    for prefix, v in views.items():
        cal = calibration_report(v["mean_probs"][test_mask], y[test_mask], n_bins)
        metrics.update({f"{prefix}{k}": cal[k] for k in ("nll", "brier", "ece")})
    metrics.update(ece_if_calibrated(ens_out["mean_probs"][test_mask], n_bins, seed=params.seed,
                                     observed=metrics["ece"]))
    metrics.update(single_member_metrics(ens, logits[test_mask], y[test_mask], n_bins,
                                         ens_out["mean_probs"][test_mask]))
    metrics.update(calibration_modes(ens, logits[test_mask], y[test_mask], n_bins))
    metrics.update(label_free_metrics(ens, logits[test_mask], y[test_mask], n_bins))
    metrics.update(heldout_metrics(cells, ens_out, test_mask))
    held = cells["split"].to_numpy() == "heldout"
    # per-cell predictions
    table = ens.to_frame(ens_out, cells)
    table.insert(2, "label", cells["label"].astype(str).to_numpy())
    table.insert(3, "split", cells["split"].astype(str).to_numpy())
    write_table(table, out_dir / "predictions.parquet", {"classes": classes})
    if params.evaluate.reference_scores:
        metrics.update(_reference(table, params.evaluate.reference_scores, classes))
    # plots
    bins_before = reliability_bins(views["uncalibrated/"]["mean_probs"][test_mask], y[test_mask], n_bins)
    bins_after = reliability_bins(ens_out["mean_probs"][test_mask], y[test_mask], n_bins)
    bins_after.assign(view="calibrated").pipe(
        lambda b: pd.concat([bins_before.assign(view="uncalibrated"), b])
    ).to_csv(out_dir / "reliability.csv", index=False)
    plot_confusion(cm, classes, out_dir / "confusion.png", title="test split")
    plot_reliability(bins_before, bins_after, out_dir / "reliability.png")
    labels = np.where(test_mask, cells["label"].astype(str), cells["label"].astype(str) + " (held out)")
    plot_embedding(raw["features"], labels, out_dir / "embedding.png", title="penultimate features (PCA)")
    groups = {"training classes (test)": ens_out["epistemic"][test_mask]}
    groups.update({f"{c} (held out)": ens_out["epistemic"][held & (cells["label"] == c).to_numpy()]
                   for c in sorted(cells.loc[held, "label"].unique())})
    plot_uncertainty_hist(groups, out_dir / "uncertainty.png", xlabel="epistemic uncertainty (mutual information, nats)")
    return {k: (float(v) if isinstance(v, int | float | np.floating) else v) for k, v in metrics.items()}


def single_member_metrics(ens: Ensemble, logits: np.ndarray, y: np.ndarray, n_bins: int,
                          ensemble_probs: np.ndarray | None = None) -> dict[str, float]:
    """What one calibrated member scores on its own: ``single_member/<metric>`` is the mean over the K members
    (the usual deep-ensemble baseline), ``single_member_best/<metric>`` the best member for that metric, and
    ``ensemble_vs_single/{nll,ece}_diff[_ci_low|_ci_high]`` the ensemble minus the mean member with a 95 % paired
    bootstrap interval over the test cells (an interval below 0: the ensemble is better beyond noise).
    ``ensemble_probs`` are the ensemble's probabilities for these cells when the caller has them already."""
    per_member, member_probs = [], []
    for k in range(ens.spec.n_members):
        probs = ens.combine(logits, members=[k])["mean_probs"]
        member_probs.append(probs)
        cal = calibration_report(probs, y, n_bins)
        per_member.append({"nll": cal["nll"], "brier": cal["brier"], "ece": cal["ece"],
                           "balanced_accuracy": classification_report(probs, y, ens.spec.classes)["balanced_accuracy"]})
    res = {}
    for key in per_member[0]:
        values = np.array([m[key] for m in per_member])
        res[f"single_member/{key}"] = float(values.mean())
        res[f"single_member_best/{key}"] = float(values.max() if key == "balanced_accuracy" else values.min())
    if ens.spec.n_members > 1:  # is the ensemble's gain larger than the resampling noise of the test cells?
        if ensemble_probs is None:
            ensemble_probs = ens.combine(logits)["mean_probs"]
        diff = paired_bootstrap(ensemble_probs, member_probs, y, n_bins)
        res.update({f"ensemble_vs_single/{k}": v for k, v in diff.items()})
    return res


def calibration_modes(ens: Ensemble, logits: np.ndarray, y: np.ndarray, n_bins: int) -> dict[str, float]:
    """``calibration/<mode>/{nll,ece}`` for every calibration the artifact can apply (pooled, member, none), each
    with the ensemble-minus-mean-member difference and its 95 % paired bootstrap interval (members calibrated by
    their own temperatures), so the choice of ``uncertainty.calibration`` is made on the same cells."""
    if ens.spec.n_members < 2:
        return {}
    member_probs = [ens.combine(logits, members=[k])["mean_probs"] for k in range(ens.spec.n_members)]
    res = {}
    for mode in ("pooled", "member", "none"):
        probs = ens.combine(logits, calibration=mode)["mean_probs"]
        cal = calibration_report(probs, y, n_bins)
        res.update({f"calibration/{mode}/nll": cal["nll"], f"calibration/{mode}/ece": cal["ece"]})
        res.update({f"calibration/{mode}/{k}": v for k, v in paired_bootstrap(probs, member_probs, y, n_bins).items()})
    return res


def label_free_metrics(ens: Ensemble, logits: np.ndarray, y: np.ndarray, n_bins: int) -> dict[str, float]:
    """``label_free/{temperature,predicted_error,nll,ece}``: what ``spatial recalibrate --unlabeled`` would serve on
    these cells (ATC's temperature from their outputs alone, with the threshold the ensemble stored at training), so
    the pipeline shows the label-free figure beside the validation temperature's. Empty when the artifact has no
    threshold."""
    threshold = ens.spec.info.get("atc_threshold")
    if threshold is None:
        return {}
    logp = pooled_log_probs(logits)
    fit = label_free_temperature(logp, float(threshold))
    cal = calibration_report(softmax(logp / fit.temperature), y, n_bins)
    return {"label_free/temperature": fit.temperature, "label_free/predicted_error": fit.predicted_error,
            "label_free/nll": cal["nll"], "label_free/ece": cal["ece"]}


def _reference(table: pd.DataFrame, path: str, classes: list[str]) -> dict[str, float]:
    """Agreement with a reference classifier's per-cell scores (CSV ``cell_id,score``; optional ``source_file``)."""
    ref = pd.read_csv(path)
    if not {"cell_id", "score"} <= set(ref.columns):
        raise DataError(f"{path}: expected columns cell_id,score (got {', '.join(ref.columns)})")
    keys = ["source_file", "cell_id"] if "source_file" in ref.columns else ["cell_id"]
    merged = table.merge(ref[[*keys, "score"]], on=keys, how="inner")
    if merged.empty:
        raise DataError(f"{path}: no cell ids in common with the evaluated cells")
    res = reference_agreement(merged[f"prob_{classes[0]}"].to_numpy(), merged["score"].to_numpy())
    return {f"reference/{k}": v for k, v in res.items()}
