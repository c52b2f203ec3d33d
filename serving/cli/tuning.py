"""``spatial tune``: the Ray Tune sweep command (registered on the main CLI by :func:`add_commands`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import (
    ParamsOpt,
    ProgressOpt,
    SetOpt,
    check_outputs,
    load_split_table,
    params_for,
    write_json,
)


def tune_command(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    manifest: Annotated[Path | None, typer.Option(help="sweep on a manifest's files (index + split now)")] = None,
    splits: Annotated[Path | None, typer.Option(help="a split table (default split.out)")] = None,
    num_samples: Annotated[int | None, typer.Option(help="random: samples per grid point; optuna: trials")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (HEAD_IP:6379); default "
                                                "tune.address, $RAY_ADDRESS, else a local Ray")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(help="GPUs per trial, e.g. 0.25")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs per trial")] = None,
    storage_path: Annotated[str | None, typer.Option(help="Tune results/checkpoints; shared storage on a "
                                                     "cluster (NFS path or s3://...)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (a server on a cluster)")] = None,
    name: Annotated[str | None, typer.Option(help="sweep name (default tune.name, else `sweep-<time>`)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted sweep (default: the latest)")] = False,
    out: Annotated[Path | None, typer.Option(help="best.json, best_params.yaml, trials.csv (default tune.out)")]
    = None,
    promote: Annotated[bool, typer.Option(help="retrain the best config as an ensemble and register it")] = False,
    best: Annotated[Path | None, typer.Option(help="promote this best.json instead of sweeping")] = None,
    model_out: Annotated[Path | None, typer.Option(help="promoted ensemble dir (default tune.promote_out)")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Ray Tune sweep over tune.space (regimes and hyperparameters), one MLflow run per trial; --promote
    registers the winner as the champion ensemble."""
    from training.config import resolve
    from training.errors import ConfigError

    p = params_for(params, set_)
    if tracking_uri:
        p = resolve(p.model_dump(mode="json"), {"mlflow.tracking_uri": tracking_uri})
    out_dir = out or Path(p.tune.out)
    if best is not None and not promote:
        raise ConfigError("--best is only used with --promote")
    check_outputs(folders=[out_dir, (model_out or Path(p.tune.promote_out)) if promote else None])
    table, summary = load_split_table(p, splits, manifest, out_dir)
    classes = summary.get("classes") or p.split.classes
    if best is not None:
        if not best.is_file():
            raise ConfigError(f"{best}: best config not found")
        from training.io.tables import read_json

        winner, base = read_json(best), p
    else:
        from tuning.sweep import run_sweep, write_outputs

        result = run_sweep(p, table, classes, name=name, resume=resume, num_samples=num_samples, address=address,
                           storage_path=storage_path, cpus_per_trial=cpus_per_trial,
                           gpus_per_trial=gpus_per_trial, progress=progress,
                           manifest=manifest or (Path(p.index.manifest) if Path(p.index.manifest).is_file() else None))
        written = write_outputs(result, p, out_dir)
        t = result.trials
        typer.echo(f"sweep {result.name}: {int((t['status'] == 'TERMINATED').sum())}/{len(t)} trials finished "
                   f"-> {written['trials']} (MLflow parent run {result.parent_run_id})")
        for _, row in result.failed.iterrows():
            typer.echo(f"warning: trial {row['trial_id']} failed after {row['num_failures']} attempt(s): "
                       f"{row['error']}", err=True)
        if result.interrupted:
            typer.echo(f"sweep interrupted; continue it with: spatial tune --resume --name {result.name}", err=True)
            raise typer.Exit(130)
        b = result.best
        typer.echo(f"best trial {b['trial_id']} ({b['regime']}): {b['metric']}={b['value']:.4f} "
                   f"-> {written['best_params']}")
        winner, base = b, result.params or p  # a resumed sweep's own training config, not this call's
    if promote:
        from serving.bento.package import package_version
        from tuning.promote import promote as do_promote

        res = do_promote(winner, base, table, classes, model_out or Path(p.tune.promote_out), progress=progress,
                         package=package_version)
        write_json(out_dir / "promote.json", res)
        moved = "moved to it" if res["alias_moved"] else f"stays on version {res['alias_version']}"
        typer.echo(f"registered {res['model_name']} version {res['version']} (test balanced accuracy "
                   f"{res['test_balanced_accuracy']:.3f}); alias '{res['alias']}' {moved}")


def add_commands(app: typer.Typer) -> None:
    """Register ``spatial tune`` on ``app``."""
    app.command("tune")(tune_command)
