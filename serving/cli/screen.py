"""``spatial bins | sequence | hits``: from per-cell scores to excision bins, (simulated) gRNA counts and gene hits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import ParamsOpt, SetOpt, check_outputs, params_for, write_json
from training.errors import SpatialError

ClassOpt = Annotated[str | None, typer.Option("--class", help="phenotype class (default bins.class_name)")]


def add_commands(app: typer.Typer) -> None:
    """Register ``bins``, ``sequence`` and ``hits`` on the ``spatial`` typer app."""

    @app.command()
    def bins(
        scores: Annotated[Path, typer.Argument(help="per-cell scores Parquet (`spatial score`)")],
        out: Annotated[Path, typer.Option(help="output folder: bins.parquet, bin_counts.csv, cell_sets.json")],
        class_name: ClassOpt = None,
        manifest: Annotated[Path | None, typer.Option(help="manifest for group/plate/well (default bins.manifest)")
                            ] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Assign every scored cell to an excision bin (bin 1 = most extreme; 0 = not excised)."""
        from serving.screen.bins import make_bins, write_bins

        p = params_for(params, set_)
        check_outputs(folders=[out])
        default = Path(p.bins.manifest) if p.bins.manifest else None
        man = manifest or (default if default is not None and default.is_file() else None)  # the default is optional
        result = make_bins(scores, p.bins, class_name, man)
        write_bins(result, out, {"scores": str(scores), "class": result["class_name"], **p.bins.model_dump()})
        counts = result["counts"]
        binned = int(counts.loc[counts["bin"] > 0, "cells"].sum())
        typer.echo(f"wrote {out}: {binned} of {len(result['bins'])} cells in {len(counts) - 1} bins "
                   f"(class {result['class_name']})")

    @app.command()
    def sequence(
        bins_dir: Annotated[Path, typer.Option("--bins", help="folder written by `spatial bins`")],
        out: Annotated[Path, typer.Option(help="output folder: counts.tsv, samples.csv, truth_genes.csv, ...")],
        manifest: Annotated[Path | None, typer.Option(help="the simulated screen's manifest (default "
                                                      "index.manifest); truth.parquet and library.csv beside it")
                            ] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """SIMULATOR ONLY: cut, amplify and sequence the bins of the simulated screen (and a realistic-size
        virtual screen drawn from the classifier's own scores), two replicates by default."""
        from serving.screen.sequencing import simulate, write_outputs
        from training.io.tables import read_table
        from training.sim.synth import load_gene_truth, load_library, load_truth

        p = params_for(params, set_)
        check_outputs(folders=[out])
        man = manifest or Path(p.index.manifest)
        table, meta = read_table(bins_dir / "bins.parquet")
        class_name = meta.get("class") or p.bins.class_name
        result = simulate(table, load_truth(man), load_library(man), p.synth, p.sequence, class_name)
        write_outputs(result, out, load_gene_truth(man))
        n = len(result["samples"])
        typer.echo(f"wrote {out}: {len(result['counts'])} gRNAs x {n} samples (SIMULATED sequencing)")

    @app.command()
    def hits(
        out: Annotated[Path, typer.Option(help="output folder: genes.csv, grnas.csv, volcano.png, rank.png, ...")],
        library: Annotated[Path, typer.Option(help="LIBRARY.csv: grna,gene,is_control")],
        counts: Annotated[Path | None, typer.Option(help="MAGeCK count table (sgRNA, Gene, one column per sample)")
                          ] = None,
        samples: Annotated[Path | None, typer.Option(help="SAMPLES.csv: sample,kind,bin,replicate,cells")] = None,
        cells: Annotated[Path | None, typer.Option("--cells", help="per-cell scores (`spatial score`): genotype "
                                                   "mode")] = None,
        genotypes: Annotated[Path | None, typer.Option(help="GENOTYPES.csv: source_file,cell_id,grna")] = None,
        class_name: ClassOpt = None,
        fdr: Annotated[float | None, typer.Option(help="BH level of is_hit (default hits.fdr)")] = None,
        method: Annotated[str | None, typer.Option(help="counts: spatial | sparcs | rra; cells: soft | threshold")] = None,
        truth: Annotated[Path | None, typer.Option(help="simulator truth_genes.csv: recall / FDP in the summary")
                         ] = None,
        metrics: Annotated[Path | None, typer.Option(help="JSON metrics for DVC")] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Call gene hits with an FDR calibrated on non-targeting controls (baselines reported beside)."""
        from serving.screen.calling import flat_metrics, run_cells, run_counts

        p = params_for(params, set_)
        check_outputs(folders=[out], files=[metrics])
        cfg = p.hits if fdr is None else p.hits.model_copy(update={"fdr": fdr})
        if not 0 < cfg.fdr < 1:
            raise SpatialError(f"--fdr must be in (0, 1), got {cfg.fdr}")
        if cells is not None:
            if counts is not None or samples is not None:
                raise SpatialError("give either --counts/--samples or --cells/--genotypes, not both")
            if genotypes is None:
                raise SpatialError("--cells needs --genotypes (source_file,cell_id,grna)")
            if method not in (None, "soft", "threshold"):
                raise SpatialError(f"--method for --cells must be soft or threshold, got '{method}'")
            summary = run_cells(cells, genotypes, library, class_name or p.bins.class_name, out, cfg, truth, method)
        else:
            if counts is None or samples is None:
                raise SpatialError("give --counts and --samples (or --cells and --genotypes)")
            if method not in (None, "spatial", "sparcs", "rra"):
                raise SpatialError(f"--method for counts must be spatial, sparcs or rra, got '{method}'")
            summary = run_counts(counts, samples, library, out, cfg, truth, method)
        if metrics:
            write_json(metrics, flat_metrics(summary))
        main = summary["methods"][summary["method"]]
        rule = f"p < {main['p_cut']}, not corrected, as published" if "p_cut" in main else f"FDR {cfg.fdr}"
        typer.echo(f"wrote {out}: {main['n_called']} of {main['n_genes']} genes called ({summary['method']}, {rule})")
