"""Refit the ensemble's pooled temperature on cells a person labeled on new slides (``spatial recalibrate``).

Why: the temperature fitted at training time comes from validation cells of the training slides, and new slides
want another one. In slide cross-validation on the simulated screen the temperature new slides wanted ranged from
0.77 to 1.20 while validation fitted 0.86-0.91; refitting on 200 random labeled cells of the new slides lowered the
ECE from 0.024 to 0.017 on average, 100 cells to 0.020, and 50 cells made it worse (0.028): with 96-98 % accuracy
50 cells hold one or two errors, too few to fit a temperature (benchmarks/FINDINGS.md, "Is the default split's test
pair an unlucky draw?"). Hence ``MIN_CELLS``.

Label a random sample of the new slides (``spatial query --strategy random``): cells picked because the model was
unsure of them are not representative, and a temperature fitted on them comes out too soft.

Without labels (``--unlabeled``), the temperature comes from the new slides' unlabeled cells by ATC
(``training/uncertainty/shift.py``), with the threshold the ensemble stored from its validation cells at training
time; see benchmarks/FINDINGS.md, "Can the new slides' own unlabeled cells set the temperature?", for what it does on
new slides.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.labels import abs_keys, check_known
from training.errors import DataError, ModelError
from training.evaluation.metrics import calibration_report
from training.io.atomic import atomic_path
from training.uncertainty.calibration import TEMPERATURE_BOUNDS, fit_temperature, pooled_log_probs
from training.uncertainty.decompose import softmax
from training.uncertainty.shift import label_free_temperature

MIN_CELLS = 100  # fewer labeled cells fit a temperature that is worse than none (see the module docstring)
UNLABELED_MAX_CELLS = 2000  # a seeded sample of the new slides' cells is enough to predict their error rate


@dataclass
class Recalibration:
    """What a refit found on the labeled cells (NLL and ECE there, before and after)."""

    temperature: float
    previous_temperature: float
    previous_calibration: str
    n_cells: int
    n_errors: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    cells_per_group: dict[str, int] = field(default_factory=dict)


@dataclass
class LabelFreeRecalibration:
    """What ATC found on the unlabeled cells of new slides (no NLL or ECE: there are no labels to measure them)."""

    temperature: float
    previous_temperature: float
    previous_calibration: str
    n_cells: int
    predicted_error: float
    atc_threshold: float
    mean_confidence_before: float
    mean_confidence_after: float
    cells_per_group: dict[str, int] = field(default_factory=dict)
    method: str = "atc"


def check_groups(index: pd.DataFrame, groups: list[str]) -> None:
    unknown = sorted(set(groups) - set(index["group"].astype(str)))
    if unknown:
        raise DataError(f"unknown group(s) {', '.join(unknown)}; the manifest has "
                        f"{', '.join(sorted(index['group'].astype(str).unique()))}")


def labeled_cells(index: pd.DataFrame, labels: pd.DataFrame, classes: list[str],
                  groups: list[str] | None = None, path: str = "labels.csv") -> pd.DataFrame:
    """Index rows (``source_file, row, cell_id, group``) of the cells labeled with one of ``classes``, with ``y``
    (class index); ``groups`` restricts them to those slides. Other labels (``unsure``, ``new:...``) are skipped;
    a labeled cell that is not in the index is an error naming ``path``."""
    use = labels[labels["label"].isin(classes)]
    if use.empty:
        raise DataError(f"{path}: no cell is labeled with one of the model's classes ({', '.join(classes)})")
    check_known(use, index, set(classes), path)
    pos = abs_keys(index["source_file"], index["cell_id"]).get_indexer(abs_keys(use["source_file"], use["cell_id"]))
    cells = index.iloc[pos][["source_file", "row", "cell_id", "group"]].reset_index(drop=True)
    cells["source_file"] = cells["source_file"].astype(str)
    cells["group"] = cells["group"].astype(str)
    cells["y"] = pd.Categorical(use["label"].to_numpy(), categories=classes).codes.astype(np.int64)
    if groups:
        check_groups(index, groups)
        cells = cells[cells["group"].isin(groups)].reset_index(drop=True)
    return cells


def unlabeled_cells(index: pd.DataFrame, groups: list[str], max_cells: int = UNLABELED_MAX_CELLS, seed: int = 0
                    ) -> pd.DataFrame:
    """Index rows (``source_file, row, cell_id, group``) of the slides ``groups``: all of them, or a seeded random
    sample of ``max_cells``."""
    if not groups:
        raise DataError("name the new slides whose unlabeled cells set the temperature (--group)")
    check_groups(index, groups)
    cells = index[index["group"].astype(str).isin(groups)][["source_file", "row", "cell_id", "group"]]
    if len(cells) > max_cells:
        cells = cells.sample(n=max_cells, random_state=seed).sort_index()
    cells = cells.reset_index(drop=True)
    cells["source_file"] = cells["source_file"].astype(str)
    cells["group"] = cells["group"].astype(str)
    return cells


def cells_per_group(groups: pd.Series | None) -> dict[str, int]:
    """How many of the cells come from each slide (sorted by slide)."""
    return {} if groups is None else {str(k): int(v) for k, v in groups.value_counts().sort_index().items()}


def check_enough(n: int, min_cells: int = MIN_CELLS, what: str = "labeled cell(s) of the model's classes") -> None:
    if n < min_cells:
        raise DataError(f"{n} {what}; a temperature needs at least {min_cells} random cells of the new slides "
                        "(fewer make calibration worse than none)")


def at_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits on an end of ``TEMPERATURE_BOUNDS`` (the fit had nothing to go on)."""
    return bool(np.isclose(temperature, TEMPERATURE_BOUNDS, rtol=1e-3).any())


def member_logits(ensemble, cells: pd.DataFrame, batch_size: int, num_workers: int, progress: bool) -> np.ndarray:
    """The members' raw logits for ``cells`` (index rows), in table order."""
    from training.data.loader import CellLoader

    loader = CellLoader(cells, ensemble.preprocess, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        cache=False)
    return ensemble.predict_batches(loader, total=len(loader), progress=progress, raw=True)["logits"]


def refit(logits: np.ndarray, y: np.ndarray, served: np.ndarray, previous: float, previous_calibration: str,
          groups: pd.Series | None = None, min_cells: int = MIN_CELLS) -> Recalibration:
    """The pooled temperature of member logits ``(N, M[, S], K)`` refitted on labels ``y`` (``served``: the
    probabilities the model gives now, for the before/after figures). A clear error when there are too few cells or
    the fit has nothing to go on (no misclassified cell: the temperature would run to its bound)."""
    y = np.asarray(y)
    check_enough(len(y), min_cells)
    logp = pooled_log_probs(logits)
    errors = int((logp.argmax(axis=1) != y).sum())
    t = fit_temperature(logp, y)
    if errors == 0 or at_bound(t):
        raise DataError(f"the {len(y)} labeled cells hold {errors} misclassified cell(s) and the fitted temperature "
                        f"{t:.3g} sits at a bound: label more random cells of the new slides")
    before, after = calibration_report(served, y), calibration_report(softmax(logp / t), y)
    return Recalibration(float(t), float(previous), previous_calibration, len(y), errors, before["nll"],
                         after["nll"], before["ece"], after["ece"], cells_per_group(groups))


def recalibrate(ensemble, cells: pd.DataFrame, *, batch_size: int = 256, num_workers: int = 0,
                min_cells: int = MIN_CELLS, progress: bool = False) -> Recalibration:
    """Score ``cells`` (from :func:`labeled_cells`) with ``ensemble`` and refit its pooled temperature on them."""
    check_enough(len(cells), min_cells)  # before reading any image
    logits = member_logits(ensemble, cells, batch_size, num_workers, progress)
    spec = ensemble.spec
    return refit(logits, cells["y"].to_numpy(), ensemble.combine(logits)["mean_probs"], spec.pooled_temperature,
                 spec.calibration, cells["group"], min_cells)


def refit_unlabeled(logits: np.ndarray, threshold: float, served: np.ndarray, previous: float,
                    previous_calibration: str, groups: pd.Series | None = None, min_cells: int = MIN_CELLS
                    ) -> LabelFreeRecalibration:
    """The pooled temperature of member logits ``(N, M[, S], K)`` of unlabeled cells, set by ATC from the
    validation ``threshold``; a clear error when there are too few cells or no temperature in range matches."""
    check_enough(len(logits), min_cells, "cell(s) on the named slides")
    logp = pooled_log_probs(logits)
    fit = label_free_temperature(logp, threshold)
    if at_bound(fit.temperature):
        raise DataError(f"ATC predicts {fit.predicted_error:.1%} errors on the {fit.n_cells} cells and no temperature "
                        f"in {TEMPERATURE_BOUNDS} matches that accuracy; label random cells of the new slides instead")
    after = softmax(logp / fit.temperature).max(axis=1).mean()
    return LabelFreeRecalibration(fit.temperature, float(previous), previous_calibration, fit.n_cells,
                                  fit.predicted_error, fit.threshold, float(served.max(axis=1).mean()), float(after),
                                  cells_per_group(groups))


def recalibrate_unlabeled(ensemble, cells: pd.DataFrame, *, batch_size: int = 256, num_workers: int = 0,
                          min_cells: int = MIN_CELLS, progress: bool = False) -> LabelFreeRecalibration:
    """Score the unlabeled ``cells`` (from :func:`unlabeled_cells`) with ``ensemble`` and set its pooled temperature
    by ATC, with the threshold the ensemble stored from its validation cells."""
    threshold = ensemble.spec.info.get("atc_threshold")
    if threshold is None:
        raise ModelError("this ensemble has no ATC threshold (trained before spatiAL stored one, or no validation "
                         "cell was misclassified): retrain it, or recalibrate on labeled cells")
    check_enough(len(cells), min_cells, "cell(s) on the named slides")  # before reading any image
    logits = member_logits(ensemble, cells, batch_size, num_workers, progress)
    spec = ensemble.spec
    return refit_unlabeled(logits, float(threshold), ensemble.combine(logits)["mean_probs"], spec.pooled_temperature,
                           spec.calibration, cells["group"], min_cells)


def write_recalibrated(src: Path, out: Path, temperature: float, record: dict) -> Path:
    """A copy of the ensemble directory ``src`` at ``out`` whose spec uses the pooled ``temperature``; ``record``
    (what was refitted, on what, and from which model) goes to ``spec.info["recalibration"]``. Written atomically
    (all or nothing)."""
    if out.resolve() == src.resolve():
        raise DataError(f"--out {out} is the model directory itself; write the recalibrated copy elsewhere")
    with atomic_path(out, suffix="") as tmp:
        shutil.copytree(src, tmp)
        spec_file = tmp / "spec.json"
        spec = json.loads(spec_file.read_text())
        spec["calibration"] = "pooled"
        spec["pooled_temperature"] = float(temperature)
        spec.setdefault("info", {})["recalibration"] = record
        spec_file.write_text(json.dumps(spec, indent=2))
    return out
