"""``spatial al``: simulated active-learning campaigns (registered on the main CLI by :func:`add_commands`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import (
    ParamsOpt,
    ProgressOpt,
    SetOpt,
    check_outputs,
    params_for,
    write_json,
)

log = logging.getLogger(__name__)



def strategies_from(options: list[str] | None, default: list[str]) -> list[str]:
    """``--strategy a --strategy b`` or ``--strategy a,b``; unknown names are a ConfigError."""
    from training.active.acquisition import check_strategy

    names = [s.strip() for opt in (options or []) for s in opt.split(",") if s.strip()] or list(default)
    if not names:
        from training.errors import ConfigError

        raise ConfigError("no active learning strategy given (--strategy or al.strategies)")
    return list(dict.fromkeys(check_strategy(n) for n in names))


def add_commands(app: typer.Typer) -> None:
    @app.command("al")
    def al(
        out: Annotated[Path, typer.Option(help="campaign folder (curve.csv, queries.parquet, summary.json, plots)")],
        manifest: Annotated[Path | None, typer.Option(help="manifest CSV (default index.manifest)")] = None,
        splits: Annotated[Path | None, typer.Option(help="a split table (default: split the manifest now)")] = None,
        strategy: Annotated[list[str] | None, typer.Option(
            "--strategy", help="acquisition strategy, repeatable or comma-separated (default al.strategies)")] = None,
        seeds: Annotated[int | None, typer.Option(help="campaigns per strategy (al.seeds)")] = None,
        initial: Annotated[int | None, typer.Option(help="initial labels (al.initial)")] = None,
        query_size: Annotated[int | None, typer.Option("--query-size", help="labels per round (al.query_size)")] = None,
        rounds: Annotated[int | None, typer.Option(help="acquisition rounds (al.rounds)")] = None,
        labels: Annotated[Path | None, typer.Option(help="oracle: CSV source_file,cell_id,label a person gave")] = None,
        metrics: Annotated[Path | None, typer.Option(help="flat summary metrics JSON (DVC)")] = None,
        params: ParamsOpt = None, set_: SetOpt = None, progress: ProgressOpt = True,
    ) -> None:
        """Simulated pool-based active learning: train, score the pool, query, label, repeat; per strategy and seed."""

        overrides = list(set_ or [])
        for key, value in (("seeds", seeds), ("initial", initial), ("query_size", query_size), ("rounds", rounds)):
            if value is not None:
                overrides.append(f"al.{key}={value}")
        if labels is not None:
            overrides += [f"al.labels_csv={labels}", "al.oracle=labels"]
        p = params_for(params, overrides)
        check_outputs(folders=[out], files=[metrics])
        names = strategies_from(strategy, p.al.strategies)
        summary, flat = run_al(p, names, out, manifest, splits, progress)
        if metrics:
            write_json(metrics, flat)
        lines = [f"{n}: AUBC {s['aubc']:.3f}" + (f", labels to {round(100 * summary['target_fraction'])} % "
                 f"{s['labels_to_target'] if s.get('labels_to_target') is not None else '> budget'}"
                 if "labels_to_target" in s else "") for n, s in summary["strategies"].items()]
        typer.echo(f"wrote {out}\n" + "\n".join(lines))


def run_al(p, strategies: list[str], out: Path, manifest: Path | None = None, splits: Path | None = None,
           progress: bool = True) -> tuple[dict, dict]:
    """Validate, then run every (strategy, seed) campaign and the full-data references; write the outputs
    atomically into ``out`` and log to MLflow (a parent run, a nested run per campaign, one per round in it)."""
    import mlflow
    import pandas as pd

    from training.active.campaign import check_budget, full_data_reference, pool_table, run_campaign
    from training.active.oracle import make_oracle
    from training.active.report import flat_metrics, write_outputs
    from training.data.cellindex import build_index, labels_in
    from training.data.splits import make_splits, read_splits
    from training.data.trainset import prepare_data
    from training.errors import DataError
    from training.io.atomic import atomic_path
    from training.tracking import Tracker

    manifest = manifest or Path(p.index.manifest)
    index = build_index(manifest, progress=False) if manifest.is_file() else None
    if p.al.classes and p.al.classes != p.split.classes:
        # a campaign on other classes than the classifier's: split the manifest for those classes
        if index is None:
            raise DataError(f"al.classes={p.al.classes} needs the manifest to split; {manifest} not found")
        p = p.model_copy(update={"split": p.split.model_copy(update={"classes": list(p.al.classes)})})
        if splits is not None:
            log.warning("al.classes differ from split.classes: splitting %s for %s instead of using %s",
                        manifest, ", ".join(p.al.classes), splits)
        splits = None
    if splits is not None:
        table, split_summary = read_splits(splits, p.split)
    elif index is not None:
        from training.data.labels import current_labels

        table, split_summary = make_splits(index, p.split, current_labels(p.label.labels), p.label.labels)
    else:
        raise DataError(f"{manifest}: manifest not found (give --manifest or --splits)")
    classes = split_summary.get("classes") or p.split.classes or labels_in(table)
    data = prepare_data(table, classes, p)
    oracle = make_oracle(p.al.oracle, data.classes, index if index is not None else data.cells,
                         p.al.state_classes, manifest if manifest.is_file() else None, p.al.labels_csv)
    pool = pool_table(data, p, oracle)
    budget = check_budget(p, len(pool))
    seeds = [p.al.seed + i for i in range(p.al.seeds)]
    meta = {"strategies": strategies, "seeds": seeds, "pool": len(pool), "pool_splits": list(p.al.pool),
            "pool_per_class": {c: int((pool["y"] == i).sum()) for i, c in enumerate(data.classes)},
            "oracle": oracle.kind, "classes": data.classes, "budget": budget, "test": int((data.cells["split"] == "test").sum()),
            "initial": p.al.initial, "initial_method": p.al.initial_method, "query_size": p.al.query_size,
            "rounds": p.al.rounds, "semisupervised": p.al.semisupervised}
    curves, queries, refs = [], [], []
    with Tracker(p, run_name="al", tags={"stage": "al", "oracle": oracle.kind}) as tr, \
            atomic_path(out, suffix="") as tmp:
        if p.al.full_data:
            for seed in seeds[: p.al.full_data_seeds]:
                ref = full_data_reference(p, data, seed, oracle, progress)
                refs.append(ref)
                tr.log_metrics({f"full_data/{k}": v for k, v in ref.items() if k != "seed"}, step=seed)
        for name in strategies:
            for seed in seeds:
                with mlflow.start_run(run_name=f"{name}-seed{seed}", nested=True,
                                      tags={"strategy": name, "seed": str(seed)}):
                    curve = run_campaign(p, data, name, seed, oracle, report=_round_logger(name, seed),
                                         progress=progress)
                queries.append(curve.attrs.pop("queries"))
                curves.append(curve)
        reference = pd.DataFrame(refs) if refs else None
        summary = write_outputs(tmp, pd.concat(curves, ignore_index=True), pd.concat(queries, ignore_index=True),
                                reference, meta=meta)
        flat = flat_metrics(summary)
        tr.log_metrics({k.replace("/", "_"): v for k, v in flat.items() if v is not None})
        tr.log_artifacts(tmp, "al")
    return summary, flat


def _round_logger(strategy: str, seed: int):
    """``report`` for run_campaign: a nested run per round, and the curve on the campaign run (step = labels)."""
    import math

    import mlflow

    def report(row: dict) -> None:
        numbers = {k: float(v) for k, v in row.items()
                   if isinstance(v, int | float) and k not in ("seed", "round") and math.isfinite(v)}
        mlflow.log_metrics(numbers, step=int(row["n_labels"]))
        with mlflow.start_run(run_name=f"{strategy}-seed{seed}-round{row['round']}", nested=True,
                              tags={"strategy": strategy, "seed": str(seed), "round": str(row["round"])}):
            mlflow.log_metrics(numbers)

    return report
