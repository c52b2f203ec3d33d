"""``spatial query | label | recalibrate | report``: a person in the loop (ask, label in the browser, refit the
temperature on the labels of new slides) and the screen report."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import (
    ModelOpt,
    ParamsOpt,
    ProgressOpt,
    SetOpt,
    check_at_least_one,
    check_outputs,
    check_port,
    default_model_uri,
    params_for,
    server_url,
    write_json,
)


def add_commands(app: typer.Typer) -> None:
    """Register ``query``, ``label``, ``recalibrate`` and ``report`` on the ``spatial`` typer app."""

    @app.command()
    def query(
        out: Annotated[Path, typer.Option(help="queries Parquet (the cells to label, in query order)")],
        model: ModelOpt = None,
        manifest: Annotated[Path | None, typer.Option(help="manifest CSV (default index.manifest)")] = None,
        strategy: Annotated[str | None, typer.Option(
            help="acquisition function (default label.strategy), or label_check: the cells whose slide label the "
                 "model disputes")] = None,
        n: Annotated[int | None, typer.Option(help="cells to query (default label.n)")] = None,
        labels: Annotated[Path | None, typer.Option(help="labels history; its cells are never queried again "
                                                    "(default label.labels)")] = None,
        splits: Annotated[Path | None, typer.Option(help="split table whose test cells are never queried "
                                                    "(default split.out when present; label.exclude_test)")] = None,
        round_: Annotated[int, typer.Option("--round", help="round number recorded in the output")] = 0,
        metrics: Annotated[Path | None, typer.Option(help="JSON summary (pool, scored, cells/s)")] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
        progress: ProgressOpt = True,
    ) -> None:
        """Pick the cells a person should label next: acquisition on the unlabeled pool with the current model."""
        from training.active.query import run_query
        from training.data.cellindex import build_index
        from training.data.labels import current_labels
        from training.data.splits import read_splits
        from training.engine import select_device
        from training.io.tables import write_table
        from training.tracking import resolve_model
        from training.uncertainty.ensemble import Ensemble

        p = params_for(params, set_)
        n = p.label.n if n is None else n
        check_at_least_one(n=n)
        check_outputs(files=[out, metrics])
        labels = labels or Path(p.label.labels)
        index = build_index(manifest or p.index.manifest, progress=False)
        exclude = None
        split_path = splits or Path(p.split.out)
        if p.label.exclude_test and split_path.is_file():
            table, _ = read_splits(split_path)
            exclude = table[table["split"] == "test"]
        elif splits is not None:
            raise typer.BadParameter(f"{splits}: not found")
        with tempfile.TemporaryDirectory(prefix="spatial-query-") as cache:
            path, info = resolve_model(model or default_model_uri(p), p.mlflow, cache_dir=cache)
            ens = Ensemble.load(path, device=select_device(p.score.device))
            res = run_query(ens, index, strategy or p.label.strategy, n,
                            labeled=current_labels(labels), exclude=exclude, pool_subsample=p.al.pool_subsample,
                            seed=p.al.seed, round_=round_, temperature=p.al.power_temperature,
                            batch_size=p.score.batch_size, num_workers=p.score.num_workers, progress=progress)
        summary = {"pool": res.pool, "scored": res.scored, "queried": len(res.queries),
                   "cells_per_s": res.scored / max(res.seconds_score, 1e-9), "strategy": strategy or p.label.strategy,
                   "model": {k: info.get(k) for k in ("name", "version", "alias", "uri")}}
        write_table(res.queries, out, summary)
        if metrics:
            write_json(metrics, summary)
        typer.echo(f"wrote {out}: {len(res.queries)} cells from a pool of {res.pool} ({res.scored} scored, "
                   f"{summary['cells_per_s']:.0f} cells/s)")

    @app.command()
    def label(
        queries: Annotated[Path, typer.Option(help="queries Parquet / CSV (source_file, cell_id, ...)")],
        labels: Annotated[Path | None, typer.Option(help="labels history to append to (default label.labels)")] = None,
        host: Annotated[str | None, typer.Option(help="bind address (default label.host = 127.0.0.1)")] = None,
        port: Annotated[int | None, typer.Option(help="port (default label.port)")] = None,
        annotator: Annotated[str, typer.Option(help="default annotator name shown on the page")] = "",
        allow_remote: Annotated[bool, typer.Option("--allow-remote", help="serve other machines too")] = False,
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Serve the labeling page for the queried cells (keyboard: digits = classes, u unsure, n new, z undo)."""
        from serving.labeling.app import Session, check_host, create_app, read_queries, serve

        p = params_for(params, set_, {"label.host": host, "label.port": port})
        cfg = p.label
        remote = allow_remote or cfg.allow_remote
        check_host(cfg.host, remote)
        check_outputs(files=[labels or cfg.labels])
        check_port(cfg.host, cfg.port)
        session = Session(read_queries(queries), labels or cfg.labels, list(p.split.classes), cfg.thumbnail_px,
                          cfg.thumbnail_cache, cfg.confident, annotator)
        typer.echo(f"labeling {len(session.cells)} cells -> {labels or cfg.labels} on {server_url(cfg.host, cfg.port)}",
                   err=True)
        serve(create_app(session, remote), cfg.host, cfg.port, remote)

    @app.command()
    def recalibrate(
        out: Annotated[Path, typer.Option(help="directory for the recalibrated copy of the ensemble")],
        model: ModelOpt = None,
        manifest: Annotated[Path | None, typer.Option(help="manifest CSV (default index.manifest)")] = None,
        labels: Annotated[Path | None, typer.Option(help="labels history (default label.labels)")] = None,
        group: Annotated[list[str] | None, typer.Option(
            "--group", help="use only the cells of this slide (repeatable; default: every labeled cell; "
                            "needed with --unlabeled)")] = None,
        unlabeled: Annotated[bool, typer.Option(
            "--unlabeled", help="no labels: set the temperature from the --group slides' unlabeled cells (ATC)")] = False,
        max_cells: Annotated[int, typer.Option(help="with --unlabeled: a seeded sample of at most this many cells")
                             ] = 2000,
        min_cells: Annotated[int, typer.Option(help="refuse with fewer cells")] = 100,
        metrics: Annotated[Path | None, typer.Option(help="JSON with the temperatures and what they were fitted on")
                           ] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
        progress: ProgressOpt = True,
    ) -> None:
        """Refit the ensemble's pooled temperature for new slides: on random cells a person labeled there (label them
        with `spatial query --strategy random` and `spatial label`), or with --unlabeled from the slides' unlabeled
        cells (ATC predicts their error rate); writes a copy of the ensemble that serves it."""
        from dataclasses import asdict

        from training.data.cellindex import build_index
        from training.data.labels import current_labels
        from training.engine import select_device
        from training.errors import DataError
        from training.tracking import resolve_model
        from training.uncertainty.ensemble import Ensemble
        from training.uncertainty.recalibration import (
            labeled_cells,
            recalibrate,
            recalibrate_unlabeled,
            unlabeled_cells,
            write_recalibrated,
        )

        p = params_for(params, set_)
        if unlabeled and labels:
            raise DataError("--labels and --unlabeled exclude each other: refit on labeled cells or on unlabeled ones")
        check_at_least_one(max_cells=max_cells, min_cells=min_cells)
        check_outputs(folders=[out], files=[metrics])
        labels = labels or Path(p.label.labels)
        if not unlabeled and not labels.is_file():  # elsewhere an absent history is an empty one; here it is a slip
            raise DataError(f"{labels}: labels file not found; label cells first (spatial label) or refit from "
                            "unlabeled cells with --unlabeled")
        index = build_index(manifest or p.index.manifest, progress=False)
        uri = model or default_model_uri(p)
        with tempfile.TemporaryDirectory(prefix="spatial-recalibrate-") as cache:
            path, _ = resolve_model(uri, p.mlflow, cache_dir=cache)
            ens = Ensemble.load(path, device=select_device(p.score.device))
            opts = {"batch_size": p.score.batch_size, "num_workers": p.score.num_workers, "min_cells": min_cells,
                    "progress": progress}
            if unlabeled:
                cells = unlabeled_cells(index, group or [], max_cells, seed=0)
                result = recalibrate_unlabeled(ens, cells, **opts)
                record = {**asdict(result), "from": str(uri)}
            else:
                cells = labeled_cells(index, current_labels(labels), list(ens.spec.classes), group, str(labels))
                result = recalibrate(ens, cells, **opts)
                record = {**asdict(result), "method": "labels", "labels": str(labels), "from": str(uri)}
            write_recalibrated(path, out, result.temperature, record)
        if metrics:
            write_json(metrics, record)
        head = f"wrote {out}: pooled temperature {result.previous_temperature:.3f} -> {result.temperature:.3f}"
        if unlabeled:
            typer.echo(f"{head} from {result.n_cells} unlabeled cells (ATC predicts {result.predicted_error:.1%} "
                       f"errors); mean confidence {result.mean_confidence_before:.4f} -> "
                       f"{result.mean_confidence_after:.4f}")
        else:
            typer.echo(f"{head} on {result.n_cells} labeled cells ({result.n_errors} misclassified); there NLL "
                       f"{result.nll_before:.4f} -> {result.nll_after:.4f}, ECE {result.ece_before:.4f} -> "
                       f"{result.ece_after:.4f}")

    @app.command()
    def report(
        out: Annotated[Path | None, typer.Option(help="HTML file (default report.out)")] = None,
        root: Annotated[Path, typer.Option(help="project folder the inputs are read from")] = Path("."),
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """One self-contained HTML report of the model, the label-efficiency studies and the screen."""
        from serving.report.build import build_report

        p = params_for(params, set_)
        out = out or Path(p.report.out)
        check_outputs(files=[out])
        sections = build_report(root, out, p)
        typer.echo(f"wrote {out}: sections {', '.join(sections) or 'none (no inputs found)'}")
