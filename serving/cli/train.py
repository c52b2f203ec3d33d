"""``spatial train | evaluate | register``: the steps of :mod:`training.workflow` (one DVC stage each),
``spatial pretrain``: contrastive pretraining of the encoder that ``train`` can start from, and
``spatial refit-novelty``: another novelty score on a trained ensemble, without retraining it."""

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
    load_split_table,
    params_for,
    write_json,
)


def add_commands(app: typer.Typer) -> None:
    @app.command()
    def train(params: ParamsOpt = None, set_: SetOpt = None,
              manifest: Annotated[Path | None, typer.Option(help="train on a manifest's files (index + split now)")] = None,
              splits: Annotated[Path | None, typer.Option(help="a split table (default split.out)")] = None,
              out: Annotated[Path, typer.Option(help="ensemble directory")] = Path("models/ensemble"),
              metrics: Annotated[Path | None, typer.Option(help="JSON with training metrics")] = None,
              resume: Annotated[bool, typer.Option(help="continue members from their last checkpoints")] = False,
              progress: ProgressOpt = True) -> None:
        """Train the configured regime as a deep ensemble; logs to MLflow (parent run + a run per member)."""
        from training import workflow
        from training.data.trainset import prepare_data
        from training.tracking import Tracker

        p = params_for(params, set_)
        check_outputs(folders=[out], files=[metrics])
        table, summary = load_split_table(p, splits, manifest, out)
        data = prepare_data(table, summary.get("classes") or p.split.classes, p)
        with Tracker(p, run_name=f"ensemble-{p.model.name}", tags={"stage": "train", "regime": p.train.regime}) as tr:
            ens, result = workflow.train(data, p, out, tr, resume=resume, progress=progress)
        if metrics:
            write_json(metrics, result)
        typer.echo(f"wrote {out} ({ens.spec.n_members} members, classes {', '.join(ens.spec.classes)})")


    @app.command()
    def pretrain(params: ParamsOpt = None, set_: SetOpt = None,
                 manifest: Annotated[Path | None, typer.Option(help="pretrain on a manifest's files (index + split now)")] = None,
                 splits: Annotated[Path | None, typer.Option(help="a split table (default split.out)")] = None,
                 out: Annotated[Path, typer.Option(help="directory for encoder.pt and pretrain.json")] = Path("models/pretrain"),
                 progress: ProgressOpt = True) -> None:
        """Pretrain the encoder contrastively (SimCLR) on the training and unlabeled cells, labels unused; fine-tune
        from it with `spatial train --set model.pretrained=OUT/encoder.pt`."""
        from training.data.trainset import prepare_data
        from training.regimes.contrastive import ENCODER, pretrain_encoder
        from training.tracking import Tracker

        p = params_for(params, set_)
        check_outputs(folders=[out])
        table, summary = load_split_table(p, splits, manifest, out)
        data = prepare_data(table, summary.get("classes") or p.split.classes, p)
        with Tracker(p, run_name=f"pretrain-{p.model.name}", tags={"stage": "pretrain"}) as tr:
            result = pretrain_encoder(data, p, out, progress=progress, log_metrics=tr.log_metrics)
            tr.log_metrics({"pretrain_probe_val_balanced_accuracy": result["probe_val_balanced_accuracy"],
                            "pretrain_probe_val_balanced_accuracy_random_init":
                                result["probe_val_balanced_accuracy_random_init"]})
        typer.echo(f"wrote {out / ENCODER} ({result['epochs']} epochs on {result['cells']} cells); linear probe "
                   f"{result['probe_val_balanced_accuracy']:.3f} (random init "
                   f"{result['probe_val_balanced_accuracy_random_init']:.3f})")

    @app.command()
    def evaluate(params: ParamsOpt = None, set_: SetOpt = None,
                 model: Annotated[Path, typer.Option(help="ensemble directory")] = Path("models/ensemble"),
                 splits: Annotated[Path | None, typer.Option(help="split table (default split.out)")] = None,
                 manifest: Annotated[Path | None, typer.Option(help="or evaluate on a manifest split now")] = None,
                 out: Annotated[Path, typer.Option(help="report directory")] = Path("reports/evaluate"),
                 metrics: Annotated[Path | None, typer.Option(help="flat metrics JSON (DVC)")] = None,
                 progress: ProgressOpt = True) -> None:
        """Test-split metrics, calibration, held-out-class detection, plots and per-cell predictions."""
        from training import workflow
        from training.tracking import Tracker
        from training.uncertainty.ensemble import Ensemble

        p = params_for(params, set_)
        check_outputs(folders=[out], files=[metrics])
        ens = Ensemble.load(model)
        table, _ = load_split_table(p, splits, manifest, out)
        with Tracker(p, run_name="evaluate", run_id=ens.spec.info.get("mlflow_run_id")) as tr:
            result = workflow.evaluate(ens, table, p, out, tr, progress=progress)
        if metrics:
            write_json(metrics, result)
        typer.echo(f"balanced accuracy {result['balanced_accuracy']:.3f}, NLL {result['nll']:.3f}, ECE {result['ece']:.3f}"
                   f" -> {out}")


    @app.command()
    def register(params: ParamsOpt = None, set_: SetOpt = None,
                 model: Annotated[Path, typer.Option(help="ensemble directory")] = Path("models/ensemble"),
                 out: Annotated[Path | None, typer.Option(help="JSON with the registered version")] = None) -> None:
        """Log the ensemble as one MLflow model, register it and move the alias if it beats the holder."""
        from serving.bento.package import package_version
        from training import workflow
        from training.tracking import Tracker
        from training.uncertainty.ensemble import Ensemble

        p = params_for(params, set_)
        check_outputs(files=[out])
        ens = Ensemble.load(model)
        with Tracker(p, run_name="register", run_id=ens.spec.info.get("mlflow_run_id")) as tr:
            result = workflow.register(model, p, tr, package=package_version)
        if out:
            write_json(out, result)
        moved = "moved to it" if result["alias_moved"] else f"stays on version {result['alias_version']}"
        typer.echo(f"registered {result['model_name']} version {result['version']}; alias '{result['alias']}' {moved}")


    @app.command("refit-novelty")
    def refit_novelty_command(
        out: Annotated[Path, typer.Option(help="directory for the copy of the ensemble with the new score")],
        model: ModelOpt = None,
        splits: Annotated[Path | None, typer.Option(help="the split table the model was trained on (default "
                                                          "split.out): its training cells are the reference")] = None,
        manifest: Annotated[Path | None, typer.Option(help="or split a manifest's files now")] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Fit `uncertainty.novelty` anew on a trained ensemble's members and training cells and write a copy that
        serves it; the members, temperatures and classes stay as they were. Example: `spatial refit-novelty --set
        uncertainty.novelty=pixel_knn --out models/ensemble_pixel_knn` for in-between phenotypes."""
        import tempfile

        from training.data.trainset import prepare_data
        from training.errors import DataError
        from training.regimes.ensemble_training import refit_novelty
        from training.tracking import resolve_model
        from training.uncertainty.ensemble import Ensemble

        p = params_for(params, set_)
        uri = model or default_model_uri(p)
        check_outputs(folders=[out])
        with tempfile.TemporaryDirectory(prefix="spatial-refit-novelty-") as cache:
            path, _ = resolve_model(uri, p.mlflow, cache_dir=cache)
            if out.resolve() == Path(path).resolve():
                raise DataError(f"--out {out} is the model directory itself; write the copy elsewhere")
            ens = Ensemble.load(path)
            spec, pre = ens.spec, ens.spec.preprocess
            # the reference cells go through the model's own preprocessing, whatever the params file says
            p = params_for(params, set_, {"data.channels": list(spec.channels), "data.image_size": pre["image_size"],
                                          "data.resize": pre["resize"], "data.normalize": pre["normalize"],
                                          "data.mean": pre["mean"], "data.std": pre["std"]})
            table, _ = load_split_table(p, splits, manifest, out)
            data = prepare_data(table, list(spec.classes), p)
            previous = spec.info.get("novelty_score", "none" if not spec.has_novelty else "unknown")
            ens = refit_novelty(ens, data, p)
            ens.spec.info["novelty_refit"] = {"from": str(uri), "previous": previous,
                                              "score": p.uncertainty.novelty,
                                              "training_cells": len(data.split("train"))}
            ens.save(out)
        q95 = ens.spec.info.get("novelty_val_quantiles", {}).get("0.95")
        reference = f"; its validation cells' 95th percentile {q95:.3f}" if q95 is not None else ""
        typer.echo(f"wrote {out}: novelty {previous} -> {p.uncertainty.novelty}, fitted on "
                   f"{ens.spec.info['novelty_refit']['training_cells']} training cells{reference}")
