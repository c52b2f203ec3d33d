"""Campaign outputs: learning curves, summary (area under the budget curve, labels to reach 95 % of the
full-data balanced accuracy, both also as a ratio to random), plots.

Files written by :func:`write_outputs` in the campaign folder::

    curve.csv          strategy, seed, round, n_labels, balanced_accuracy, macro_f1, nll (+ timings)
    curve_mean.csv     n_labels + one column per strategy: balanced accuracy averaged over seeds (DVC plots)
    reference.csv      the full-data reference per seed
    queries.parquet    strategy, seed, round, source_file, cell_id, score, label
    summary.json       per strategy: aubc, labels_to_target, their ratios to random, final accuracy
    learning_curve.png balanced accuracy and NLL vs labels, mean with a min-max band over seeds
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRIC = "balanced_accuracy"


def aubc(n_labels: np.ndarray, values: np.ndarray) -> float:
    """Area under the budget curve, normalised by the budget range: the mean value over the budget."""
    x, y = np.asarray(n_labels, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def labels_to_reach(n_labels: np.ndarray, values: np.ndarray, target: float) -> int | None:
    """The fewest labels at which the curve reaches ``target`` (None: not within the budget)."""
    order = np.argsort(n_labels, kind="stable")
    x, y = np.asarray(n_labels)[order], np.asarray(values)[order]
    hit = np.nonzero(y >= target - 1e-12)[0]
    return int(x[hit[0]]) if hit.size else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(b, float) and math.isnan(b)):
        return None
    return float(a) / float(b)


def summarize(curves: pd.DataFrame, reference: pd.DataFrame | None, target_fraction: float = 0.95) -> dict:
    """Per strategy: mean/sd of the per-seed AUBC, labels for the seed-mean curve to reach ``target_fraction`` x
    the mean full-data balanced accuracy (also per seed), ratios to random, final accuracy, seconds per round."""
    out: dict = {"metric": METRIC, "target_fraction": target_fraction, "budget": int(curves["n_labels"].max())}
    target = None
    if reference is not None and len(reference):
        full = float(reference[METRIC].mean())
        target = target_fraction * full
        out["full_data"] = {METRIC: full, "sd": float(reference[METRIC].std(ddof=0)),
                            "n_labels": int(reference["n_labels"].iloc[0]), "seeds": int(len(reference)),
                            "macro_f1": float(reference["macro_f1"].mean()), "nll": float(reference["nll"].mean())}
        out["target_balanced_accuracy"] = target
    strategies: dict[str, dict] = {}
    for name, df in curves.groupby("strategy", sort=False):
        per_seed = [aubc(g["n_labels"].to_numpy(), g[METRIC].to_numpy()) for _, g in df.groupby("seed")]
        mean_curve = df.groupby("n_labels")[METRIC].mean()
        last = df[df["round"] == df["round"].max()]
        s = {"seeds": int(df["seed"].nunique()), "aubc": float(np.mean(per_seed)), "aubc_sd": float(np.std(per_seed)),
             "final_n_labels": int(last["n_labels"].max()), "final_balanced_accuracy": float(last[METRIC].mean()),
             "final_macro_f1": float(last["macro_f1"].mean()), "final_nll": float(last["nll"].mean()),
             "seconds_per_round": float((df["seconds_train"] + df["seconds_score"] + df["seconds_eval"]).mean())}
        if target is not None:
            s["labels_to_target"] = labels_to_reach(mean_curve.index.to_numpy(), mean_curve.to_numpy(), target)
            s["labels_to_target_per_seed"] = [
                labels_to_reach(g["n_labels"].to_numpy(), g[METRIC].to_numpy(), target) for _, g in df.groupby("seed")]
        strategies[str(name)] = s
    base = strategies.get("random")
    for s in strategies.values():
        s["aubc_ratio_to_random"] = _ratio(s["aubc"], base["aubc"]) if base else None
        if target is not None:
            s["labels_to_target_ratio_to_random"] = (
                _ratio(s["labels_to_target"], base["labels_to_target"]) if base else None)
            if base and base["labels_to_target"] is None and s["labels_to_target"] is not None:
                # random never got there within the budget: the ratio is at most this bound
                s["labels_to_target_ratio_to_random_at_most"] = s["labels_to_target"] / out["budget"]
    out["strategies"] = strategies
    return out


NONE_OF_THE_CLASSES = "(none of the classes)"


def query_labels(queries: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per strategy, the share of each answer among the cells it queried after the initial set (rounds >= 1): whether
    a strategy finds the rare classes of an imbalanced pool. Shares of all queried cells, in label order; answers
    of none of the classes (no label) count as ``NONE_OF_THE_CLASSES``."""
    asked = queries[queries["round"] > 0]
    return {str(name): {str(k): float(v) for k, v in
                        df["label"].fillna(NONE_OF_THE_CLASSES).value_counts(normalize=True).sort_index().items()}
            for name, df in asked.groupby("strategy", sort=False)}


def flat_metrics(summary: dict) -> dict[str, float | int | None]:
    """DVC metrics: ``full_data_balanced_accuracy``, ``<strategy>/aubc``, ``<strategy>/labels_to_95`` ..."""
    pct = round(100 * summary["target_fraction"])
    flat: dict[str, float | int | None] = {"budget": summary["budget"]}
    if "full_data" in summary:
        flat["full_data_balanced_accuracy"] = summary["full_data"][METRIC]
        flat[f"target_{pct}_balanced_accuracy"] = summary["target_balanced_accuracy"]
    for name, s in summary["strategies"].items():
        flat[f"{name}/aubc"] = s["aubc"]
        flat[f"{name}/aubc_ratio_to_random"] = s["aubc_ratio_to_random"]
        flat[f"{name}/final_balanced_accuracy"] = s["final_balanced_accuracy"]
        if "labels_to_target" in s:
            flat[f"{name}/labels_to_{pct}"] = s["labels_to_target"]
            flat[f"{name}/labels_to_{pct}_ratio_to_random"] = s["labels_to_target_ratio_to_random"]
    return flat


def plot_learning_curves(curves: pd.DataFrame, reference: pd.DataFrame | None, path: Path,
                         target_fraction: float = 0.95) -> None:
    """Balanced accuracy and NLL vs labels: mean over seeds with a min-max band; full-data reference lines."""
    from matplotlib import colormaps

    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    cmap = colormaps["tab10"]
    for ax, metric in zip(axes, (METRIC, "nll"), strict=True):
        for i, (name, df) in enumerate(curves.groupby("strategy", sort=False)):
            g = df.groupby("n_labels")[metric]
            mean = g.mean()
            ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3, color=cmap(i % 10),
                    label=f"{name} (n={df['seed'].nunique()})")
            ax.fill_between(mean.index, g.min().to_numpy(), g.max().to_numpy(), color=cmap(i % 10), alpha=0.2, lw=0)
        if reference is not None and len(reference):
            full = float(reference[metric].mean())
            ax.axhline(full, color="black", ls="--", lw=1, label=f"full data ({int(reference['n_labels'].iloc[0])})")
            if metric == METRIC:
                ax.axhline(target_fraction * full, color="grey", ls=":", lw=1,
                           label=f"{round(100 * target_fraction)} % of full data")
        ax.set_xlabel("labels (queried cells)")
        ax.set_ylabel(metric.replace("_", " ") + " (test)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Active learning: test metrics vs labels (band: min-max over seeds)")
    from training.io.atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def write_outputs(out_dir: str | Path, curves: pd.DataFrame, queries: pd.DataFrame,
                  reference: pd.DataFrame | None, target_fraction: float = 0.95, meta: dict | None = None) -> dict:
    """Write every campaign output into ``out_dir``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves.to_csv(out / "curve.csv", index=False)
    mean = curves.groupby(["n_labels", "strategy"], sort=False)[METRIC].mean().unstack("strategy")
    mean = mean[list(pd.unique(curves["strategy"]))].reset_index()
    mean.columns.name = None
    mean.to_csv(out / "curve_mean.csv", index=False)
    if reference is not None:
        reference.to_csv(out / "reference.csv", index=False)
    queries.to_parquet(out / "queries.parquet", index=False)
    summary = summarize(curves, reference, target_fraction)
    summary["query_labels"] = query_labels(queries)
    if meta:
        summary["campaign"] = meta
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_learning_curves(curves, reference, out / "learning_curve.png", target_fraction)
    return summary
