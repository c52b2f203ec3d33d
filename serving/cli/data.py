"""``spatial synth | inspect | index | split``: raw files -> cell index -> splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import ParamsOpt, ProgressOpt, SetOpt, check_outputs, params_for, write_json
from training.errors import SpatialError


def add_commands(app: typer.Typer) -> None:
    @app.command()
    def synth(params: ParamsOpt = None, set_: SetOpt = None, out: Annotated[Path | None, typer.Option()] = None,
              progress: ProgressOpt = True) -> None:
        """Write the simulated SPARCS screen (control slides, timecourse, screen slides, truth, manifest)."""
        from training.sim.synth import synthesize

        p = params_for(params, set_)
        out = out or Path(p.synth.out)
        check_outputs(folders=[out])
        manifest = synthesize(p.synth, out, progress=progress)
        typer.echo(f"wrote {manifest}")


    @app.command()
    def inspect(files: Annotated[list[Path], typer.Argument(help="single-cell .h5 / .h5sc files")],
                max_cells: Annotated[int, typer.Option(help="cells scanned for NaN / range checks")] = 20_000) -> None:
        """Print one JSON object per file: format, shape, channels, cell id range, chunks and warnings."""
        from training.io.formats import inspect_file

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
        from training.data.cellindex import build_index
        from training.io.tables import write_table

        p = params_for(params, set_)
        manifest = manifest or Path(p.index.manifest)
        out = out or Path(p.index.out)
        check_outputs(files=[out])
        idx = build_index(manifest, progress=progress)
        write_table(idx, out, {"manifest": str(manifest), "n_cells": len(idx)})
        typer.echo(f"wrote {out}: {len(idx)} cells from {idx['source_file'].nunique()} files")


    @app.command()
    def split(params: ParamsOpt = None, set_: SetOpt = None,
              index_path: Annotated[Path | None, typer.Option("--index", help="cell index Parquet")] = None,
              out: Annotated[Path | None, typer.Option(help="splits Parquet (default split.out)")] = None,
              metrics: Annotated[Path | None, typer.Option(help="JSON with the split counts")] = None) -> None:
        """Group-wise train/val/test splits with class-balanced undersampling."""
        from training.data.cellindex import read_index
        from training.data.labels import current_labels
        from training.data.splits import make_splits
        from training.io.tables import write_table

        p = params_for(params, set_)
        out = out or Path(p.split.out)
        check_outputs(files=[out, metrics])
        idx = read_index(index_path or p.index.out)
        table, summary = make_splits(idx, p.split, current_labels(p.label.labels), p.label.labels)
        write_table(table, out, summary)
        if metrics:
            write_json(metrics, {k: sum(v.values()) for k, v in summary["counts"].items()})
        typer.echo(f"wrote {out}: " + ", ".join(f"{k}={sum(v.values())}" for k, v in summary["counts"].items()))
