"""``spatial discover`` (the discovery queue of new phenotypes) and ``spatial genotypes`` (simulated screen only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import (
    ModelOpt,
    ParamsOpt,
    ProgressOpt,
    SetOpt,
    check_outputs,
    default_model_uri,
    params_for,
    write_json,
)
from training.errors import SpatialError


def add_commands(app: typer.Typer) -> None:
    """Register ``discover`` and ``genotypes`` on the ``spatial`` typer app."""

    @app.command()
    def discover(
        scores: Annotated[Path, typer.Option(
            help="per-cell scores of `spatial score` (with --embeddings for the model reference)")],
        out: Annotated[Path, typer.Option(help="output directory (cells.parquet, clusters.csv, galleries...)")],
        model: ModelOpt = None,
        genotypes: Annotated[Path | None, typer.Option(help="CSV source_file,cell_id,grna")] = None,
        library: Annotated[Path | None, typer.Option(help="CSV grna,gene,is_control")] = None,
        threshold: Annotated[float | None, typer.Option(
            help="novelty threshold (default: discover.quantile of the controls' or the model's validation cells' "
                 "novelty)")] = None,
        truth_genes: Annotated[Path | None, typer.Option(
            help="simulator truth_genes.csv: report whether the planted novel gene tops the top cluster")] = None,
        metrics: Annotated[Path | None, typer.Option(help="JSON metrics (metrics/discovery.json)")] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
        progress: ProgressOpt = True,
    ) -> None:
        """Cells unlike the screen's controls (or the model's training cells), clustered; genes enriched per cluster."""
        import math
        import tempfile

        from serving.discovery.run import discover as run_discover
        from serving.model import ServedModel

        p = params_for(params, set_)
        check_outputs(folders=[out], files=[metrics])
        if threshold is not None and not math.isfinite(threshold):
            raise SpatialError(f"--threshold must be a finite number, got {threshold}")
        with tempfile.TemporaryDirectory(prefix="spatial-model-") as cache:
            served = ServedModel.resolve(str(model or default_model_uri(p)), p.mlflow, cache_dir=cache)
            result = run_discover(scores, served.spec.info, served.spec.channels[0], out, p.discover,
                                  genotypes, library, threshold, truth_genes, served, progress)
        if metrics:
            write_json(metrics, result)
        top = f"; top gene of the top cluster: {result['top_cluster_top_gene']}" if "top_cluster_top_gene" in result else ""
        typer.echo(f"wrote {out}: {result['n_novel']} of {result['n_scored']} cells above {result['reference']} novelty "
                   f"{result['threshold']:.4g}, {result['n_clusters']} cluster(s){top}")

    @app.command()
    def genotypes(
        truth: Annotated[Path, typer.Option(help="the simulator's truth.parquet")] = Path("data/raw/truth.parquet"),
        out: Annotated[Path, typer.Option(help="CSV source_file,cell_id,grna")] = Path("data/screen/genotypes.csv"),
    ) -> None:
        """Simulated screen only: each screen cell's gRNA from the simulator's truth, as GENOTYPES.csv."""
        from serving.discovery.genotypes import genotypes_from_truth

        check_outputs(files=[out])
        n = genotypes_from_truth(truth, truth.parent, out)
        typer.echo(f"wrote {out}: {n} cells")
