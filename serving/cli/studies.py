"""``spatial seeds`` (results over seeds with intervals) and ``spatial summary`` (reports/summary.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import check_outputs, write_json


def _interval(lo: float, hi: float, sign: str = "") -> str:
    """``[lo, hi]`` of ``spatial seeds``, or why there is none (NaN bounds: one seed)."""
    return "[no interval from one seed]" if lo != lo else f"[{lo:{sign}.4f}, {hi:{sign}.4f}]"


def add_commands(app: typer.Typer) -> None:
    """Register ``seeds`` and ``summary`` on the ``spatial`` typer app."""

    @app.command()
    def seeds(
        out: Annotated[Path, typer.Option(help="JSON: mean and 95 % interval per arm, differences to the baseline")],
        baseline: Annotated[str, typer.Option(help="the arm the others are compared with")],
        arm: Annotated[list[str] | None, typer.Option(
            help="NAME=GLOB of per-seed metrics files (`..._s<seed>.json`); repeat per arm")] = None,
        key: Annotated[str, typer.Option(help="the metric compared (with --arm)")] = "balanced_accuracy",
        al_curve: Annotated[Path | None, typer.Option(
            help="an AL campaign's curve.csv: compare the strategies' areas under the budget curve")] = None,
        at_labels: Annotated[int | None, typer.Option(
            help="with --al-curve: compare the balanced accuracy at this many labels instead")] = None,
    ) -> None:
        """Compare arms over seeds: mean, 95 % t-interval, paired difference to the baseline and whether it
        excludes zero."""
        import pandas as pd

        from training.errors import DataError
        from training.evaluation.seeds import al_per_seed, compare_arms, metrics_per_seed

        check_outputs(files=[out])
        if al_curve is not None:
            per_seed = al_per_seed(pd.read_csv(al_curve), at_labels=at_labels)
        elif arm:
            per_seed = {}
            for item in arm:
                name, sep, pattern = item.partition("=")
                if not sep or not name or not pattern:
                    raise DataError(f"--arm {item!r}: expected NAME=GLOB")
                per_seed[name] = metrics_per_seed(pattern, key)
        else:
            raise DataError("give --arm NAME=GLOB (repeated) or --al-curve")
        result = compare_arms(per_seed, baseline)
        write_json(out, result)
        for name in per_seed:
            line = f"{name}: {result[f'{name}/mean']:.4f} {_interval(result[f'{name}/ci_low'], result[f'{name}/ci_high'])}"
            if name != baseline:
                line += (f", minus {baseline} {result[f'{name}/diff_mean']:+.4f} "
                         f"{_interval(result[f'{name}/diff_ci_low'], result[f'{name}/diff_ci_high'], '+')}, above on "
                         f"{result[f'{name}/diff_seeds_above']} of {result[f'{name}/n']} seeds")
            typer.echo(line)

    @app.command()
    def summary(
        metrics_dir: Annotated[Path, typer.Option(help="folder of metrics JSON files")] = Path("metrics"),
        out: Annotated[Path, typer.Option(help="the Markdown summary")] = Path("reports/summary.md"),
    ) -> None:
        """Write the run summary (every metrics file, with commit and machine) as Markdown."""
        from training.evaluation.study_summary import write_summary

        check_outputs(files=[out])
        write_summary(metrics_dir, out)
        typer.echo(f"wrote {out}")
