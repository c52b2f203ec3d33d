"""The ``spatial`` command: a thin shell over library functions (DVC stages call these commands).

Every command takes ``--params FILE`` (default ``params.yaml`` when present) and ``--set key=value`` overrides
of the same dotted keys. User errors exit with code 2 and one message, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from training.config import Params, load_params
from training.errors import SpatialError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="spatiAL: label-efficient phenotyping of SPARCS single-cell screens.")

ParamsOpt = Annotated[Path | None, typer.Option("--params", help="params YAML (default: ./params.yaml if present)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a param: key=value (repeatable)")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")]


def params_for(path: Path | None, overrides: list[str] | None) -> Params:
    if path is None and Path("params.yaml").is_file():
        path = Path("params.yaml")
    return load_params(path, overrides or [])


def write_json(path: str | Path, obj: object) -> None:
    from training.atomic import atomic_path

    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# -- data ----------------------------------------------------------------------------------------
@app.command()
def synth(params: ParamsOpt = None, set_: SetOpt = None, out: Annotated[Path | None, typer.Option()] = None,
          progress: ProgressOpt = True) -> None:
    """Write the simulated SPARCS screen (control slides, timecourse, screen slides, truth, manifest)."""
    from training.synth import synthesize

    p = params_for(params, set_)
    manifest = synthesize(p.synth, out or p.synth.out, progress=progress)
    typer.echo(f"wrote {manifest}")


@app.command()
def inspect(files: Annotated[list[Path], typer.Argument(help="single-cell .h5 / .h5sc files")],
            max_cells: Annotated[int, typer.Option(help="cells scanned for NaN / range checks")] = 20_000) -> None:
    """Print one JSON object per file: format, shape, channels, cell id range, chunks and warnings."""
    from training.formats import inspect_file

    failed = False
    for f in files:
        try:
            typer.echo(json.dumps(inspect_file(f, max_cells=max_cells)))
        except SpatialError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(2)


@app.command()
def index(params: ParamsOpt = None, set_: SetOpt = None,
          manifest: Annotated[Path | None, typer.Option(help="manifest CSV (default index.manifest)")] = None,
          out: Annotated[Path | None, typer.Option(help="cell index Parquet (default index.out)")] = None,
          progress: ProgressOpt = True) -> None:
    """Build the cell index from the manifest's files (index datasets only, never pixels)."""
    from training.cellindex import build_index
    from training.tables import write_table

    p = params_for(params, set_)
    manifest = manifest or Path(p.index.manifest)
    out = out or Path(p.index.out)
    idx = build_index(manifest, progress=progress)
    write_table(idx, out, {"manifest": str(manifest), "n_cells": len(idx)})
    typer.echo(f"wrote {out}: {len(idx)} cells from {idx['source_file'].nunique()} files")


@app.command()
def split(params: ParamsOpt = None, set_: SetOpt = None,
          index_path: Annotated[Path | None, typer.Option("--index", help="cell index Parquet")] = None,
          out: Annotated[Path | None, typer.Option(help="splits Parquet (default split.out)")] = None,
          metrics: Annotated[Path | None, typer.Option(help="JSON with the split counts")] = None) -> None:
    """Group-wise train/val/test splits with class-balanced undersampling."""
    from training.splits import make_splits
    from training.tables import read_table, write_table

    p = params_for(params, set_)
    idx, _ = read_table(index_path or p.index.out)
    table, summary = make_splits(idx, p.split)
    out = out or Path(p.split.out)
    write_table(table, out, summary)
    if metrics:
        write_json(metrics, {k: sum(v.values()) for k, v in summary["counts"].items()})
    typer.echo(f"wrote {out}: " + ", ".join(f"{k}={sum(v.values())}" for k, v in summary["counts"].items()))


# -- training ------------------------------------------------------------------------------------
def load_split_table(p: Params, splits: Path | None, manifest: Path | None, out_dir: Path) -> tuple:
    """The split table: from ``--splits`` (a ``spatial split`` output) or built now from ``--manifest``."""
    from training.cellindex import build_index
    from training.splits import make_splits
    from training.tables import read_table, write_table

    if manifest is not None:
        table, summary = make_splits(build_index(manifest, progress=False), p.split)
        write_table(table, out_dir.parent / f"{out_dir.name}.splits.parquet", summary)
        return table, summary
    table, summary = read_table(splits or p.split.out)
    if "split" not in table.columns:
        raise SpatialError(f"{splits or p.split.out}: not a split table (no 'split' column); run `spatial split`")
    return table, summary


@app.command()
def train(params: ParamsOpt = None, set_: SetOpt = None,
          manifest: Annotated[Path | None, typer.Option(help="train on a manifest's files (index + split now)")] = None,
          splits: Annotated[Path | None, typer.Option(help="a split table (default split.out)")] = None,
          out: Annotated[Path, typer.Option(help="ensemble directory")] = Path("models/ensemble"),
          metrics: Annotated[Path | None, typer.Option(help="JSON with training metrics")] = None,
          resume: Annotated[bool, typer.Option(help="continue members from their last checkpoints")] = False,
          progress: ProgressOpt = True) -> None:
    """Train the configured regime as a deep ensemble; logs to MLflow (parent run + a run per member)."""
    from training.tracking import Tracker
    from training.train import prepare_data, train_ensemble

    p = params_for(params, set_)
    table, summary = load_split_table(p, splits, manifest, out)
    data = prepare_data(table, summary.get("classes") or p.split.classes, p)
    with Tracker(p, run_name=f"ensemble-{p.model.name}", tags={"stage": "train", "regime": p.train.regime}) as tr:
        ens = train_ensemble(data, p, out, resume=resume, progress=progress, tracker=tr)
        tr.log_metrics({"val_loss_best_mean": float(np.mean(ens.spec.info["best_val_loss"]))})
        result = {"members": ens.spec.n_members, "classes": ens.spec.classes, "mlflow_run_id": tr.run_id,
                  "temperatures": ens.spec.temperatures, "best_val_loss": ens.spec.info["best_val_loss"]}
    if metrics:
        write_json(metrics, result)
    typer.echo(f"wrote {out} ({ens.spec.n_members} members, classes {', '.join(ens.spec.classes)})")


@app.command()
def evaluate(params: ParamsOpt = None, set_: SetOpt = None,
             model: Annotated[Path, typer.Option(help="ensemble directory")] = Path("models/ensemble"),
             splits: Annotated[Path | None, typer.Option(help="split table (default split.out)")] = None,
             manifest: Annotated[Path | None, typer.Option(help="or evaluate on a manifest split now")] = None,
             out: Annotated[Path, typer.Option(help="report directory")] = Path("reports/evaluate"),
             metrics: Annotated[Path | None, typer.Option(help="flat metrics JSON (DVC)")] = None,
             progress: ProgressOpt = True) -> None:
    """Test-split metrics, calibration, held-out-class detection, plots and per-cell predictions."""
    from training.ensemble import Ensemble
    from training.evaluate import evaluate as run_eval
    from training.tracking import Tracker

    p = params_for(params, set_)
    ens = Ensemble.load(model)
    table, _ = load_split_table(p, splits, manifest, out)
    result = run_eval(ens, table, p, out, progress=progress)
    run_id = ens.spec.info.get("mlflow_run_id")
    with Tracker(p, run_name="evaluate", run_id=run_id) as tr:
        tr.log_metrics({f"test_{k}".replace("/", "_"): v for k, v in result.items()})
        tr.log_artifacts(out, "evaluate")
    if metrics:
        write_json(metrics, result)
    typer.echo(f"balanced accuracy {result['balanced_accuracy']:.3f}, NLL {result['nll']:.3f}, ECE {result['ece']:.3f}"
               f" -> {out}")


@app.command()
def register(params: ParamsOpt = None, set_: SetOpt = None,
             model: Annotated[Path, typer.Option(help="ensemble directory")] = Path("models/ensemble"),
             out: Annotated[Path | None, typer.Option(help="JSON with the registered version")] = None) -> None:
    """Log the ensemble as one MLflow model, register it and move the alias if it beats the holder."""
    from training.ensemble import Ensemble
    from training.tracking import Tracker, log_ensemble_model
    from training.tracking import register as do_register

    p = params_for(params, set_)
    ens = Ensemble.load(model)
    s = ens.spec.image_size
    example = np.random.default_rng(0).random((2, len(ens.spec.channels), s, s), dtype=np.float32)
    with Tracker(p, run_name="register", run_id=ens.spec.info.get("mlflow_run_id")) as tr:
        uri = log_ensemble_model(model, example)
        result = do_register(uri, tr.run_id, p.registry) | {"model_uri": uri, "run_id": tr.run_id}
    if out:
        write_json(out, result)
    moved = "moved to it" if result["alias_moved"] else f"stays on version {result['alias_version']}"
    typer.echo(f"registered {result['model_name']} version {result['version']}; alias '{result['alias']}' {moved}")


def _add_commands() -> None:
    """Commands that live beside their code: active learning, scoring/serving, tuning."""
    from serving.commands import add_commands as scoring_commands
    from training.al_commands import add_commands as al_commands
    from tuning.commands import add_commands as tuning_commands

    for add in (al_commands, scoring_commands, tuning_commands):
        add(app)


_add_commands()


def main() -> None:
    """Console entry point: user errors -> one line on stderr, exit code 2."""
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SpatialError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
