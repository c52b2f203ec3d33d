"""Results over seeds: mean and 95 % t-interval per arm, and the paired difference to a baseline arm.

With n seeds the interval is ``mean +- t(0.975, n-1) * sd / sqrt(n)``; the difference to the baseline is taken seed by
seed (same seed, same data draw), and ``excludes_zero`` says whether its interval lies entirely on one side of 0.
One seed gives no interval (NaN) and never excludes zero.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from training.active.report import aubc
from training.errors import DataError
from training.io.tables import read_json


def mean_interval(values, confidence: float = 0.95) -> dict[str, float]:
    """``mean, ci_low, ci_high, sd, n`` of ``values`` (t-interval; NaN bounds for fewer than 2 values)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "sd": float("nan"), "n": 1}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * sd / np.sqrt(v.size))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "sd": sd, "n": int(v.size)}


def compare_arms(per_seed: Mapping[str, Mapping[int, float]], baseline: str,
                 confidence: float = 0.95) -> dict[str, float | int | bool]:
    """Flat metrics ``<arm>/{mean,ci_low,ci_high,sd,n}`` and, for every other arm, ``<arm>/diff_{mean,ci_low,
    ci_high}``, ``<arm>/diff_excludes_zero`` and ``<arm>/diff_seeds_above`` (on how many seeds the arm is above
    the baseline) against ``baseline`` over the seeds both have."""
    if baseline not in per_seed:
        raise DataError(f"baseline arm '{baseline}' has no results (arms: {', '.join(per_seed)})")
    out: dict[str, float | int | bool] = {}
    for arm, values in per_seed.items():
        out.update({f"{arm}/{k}": v for k, v in mean_interval(values.values(), confidence).items()})
        if arm == baseline:
            continue
        common = sorted(set(values) & set(per_seed[baseline]))
        if not common:
            raise DataError(f"arm '{arm}' shares no seed with the baseline '{baseline}'")
        diffs = [values[s] - per_seed[baseline][s] for s in common]
        d = mean_interval(diffs, confidence)
        out.update({f"{arm}/diff_mean": d["mean"], f"{arm}/diff_ci_low": d["ci_low"],
                    f"{arm}/diff_ci_high": d["ci_high"],
                    f"{arm}/diff_excludes_zero": bool(d["ci_low"] > 0 or d["ci_high"] < 0),
                    f"{arm}/diff_seeds_above": int(sum(x > 0 for x in diffs))})
    return out


_SEED = re.compile(r"(?:^|[^a-z])s(?:eed)?_?(\d+)(?=\D*$)")


def metrics_per_seed(pattern: str, key: str) -> dict[int, float]:
    """``key`` from every JSON file matching ``pattern``; the seed is the number after ``s`` / ``seed`` in the
    file name (``metrics/ssl_fixmatch_s2.json`` -> 2)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no metrics files match {pattern}")
    out = {}
    for f in files:
        m = _SEED.search(os.path.basename(f))
        if not m:
            raise DataError(f"{f}: no seed in the file name (expected ..._s<seed>.json)")
        data = read_json(f)
        if key not in data:
            raise DataError(f"{f}: no metric '{key}'")
        out[int(m.group(1))] = float(data[key])
    return out


def al_per_seed(curve: pd.DataFrame, metric: str = "balanced_accuracy",
                at_labels: int | None = None) -> dict[str, dict[int, float]]:
    """Per strategy and seed, from an AL campaign's ``curve.csv``: the area under the budget curve, or with
    ``at_labels`` the metric at that many labels (one round)."""
    need = {"strategy", "seed", "n_labels", metric}
    if not need <= set(curve.columns):
        raise DataError(f"AL curve lacks column(s) {', '.join(sorted(need - set(curve.columns)))}")
    if at_labels is not None:
        at = curve[curve["n_labels"] == at_labels]
        if at.empty:
            raise DataError(f"AL curve has no round at {at_labels} labels (it has {sorted(set(curve['n_labels']))})")
        return {str(s): dict(zip(df["seed"].astype(int), df[metric].astype(float), strict=True))
                for s, df in at.groupby("strategy", sort=False)}
    return {str(s): {int(seed): aubc(g["n_labels"].to_numpy(), g[metric].to_numpy())
                     for seed, g in df.groupby("seed")} for s, df in curve.groupby("strategy", sort=False)}
