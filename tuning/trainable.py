"""One trial: a function of the config (dotted overrides on top of the base params) that trains one member
with the one engine, reports per epoch and logs its own nested MLflow run.

:func:`run_trial` runs anywhere (tests call it directly); :func:`tune_trial` is the Ray Tune entry point: it
reports every epoch with ``ray.tune.report(metrics, checkpoint=...)`` (the engine's ``last.pt`` plus the trial's
MLflow run id) and resumes from ``ray.tune.get_checkpoint()`` after a retry or an interrupted sweep.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from training.config import Params, resolve
from training.errors import ConfigError
from tuning.space import REGIME_KEY, REGIMES, decode

log = logging.getLogger(__name__)
TRIAL_STATE = "trial.json"
MEMBER = "member_0"  # train_member(0, ...) checkpoints under work/member_0/
QUERIES = "queries.parquet"
Report = Callable[[dict[str, Any], "Path | None"], None]

# MLflow tags shared by the sweep driver and the trials
TAG_SWEEP = "spatial.sweep"
TAG_ROLE = "spatial.role"
TAG_TRIAL = "spatial.trial_id"
TAG_COMPLETED = "spatial.completed"
TAG_BEST = "spatial.best_trial"
TAG_STOPPED = "spatial.stopped"
TAG_SCHEDULER_STOP = "spatial.stopped_by_scheduler"


@dataclass
class TrialContext:
    """What every trial needs besides its config (picklable; sent once through the object store)."""

    raw: dict[str, Any]
    classes: list[str]
    tracking_uri: str | None
    experiment: str
    parent_run_id: str | None = None
    sweep: str = "sweep"
    threads: int = 1
    manifest: str | None = None  # for the active-learning oracle (simulator truth beside the manifest)
    tags: dict[str, str] = field(default_factory=dict)


def trial_params(raw: dict[str, Any], overrides: dict[str, Any]) -> tuple[Params, str]:
    """The trial's validated params and its regime (``supervised``, ``semisupervised`` or ``active``).

    ``active`` is not a training regime: the campaign trains its models with ``supervised`` (or
    ``semisupervised`` when ``al.semisupervised``)."""
    ov = dict(overrides)
    regime = ov.get(REGIME_KEY, raw.get("train", {}).get("regime", "supervised"))
    if regime not in REGIMES:
        raise ConfigError(f"{REGIME_KEY}: '{regime}' is not one of {', '.join(REGIMES)}")
    if regime == "active":
        ov.pop(REGIME_KEY, None)
        semi = resolve(raw, ov).al.semisupervised
        ov[REGIME_KEY] = "semisupervised" if semi else "supervised"
    return resolve(raw, ov), regime


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, int | float) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class TrialRun:
    """The trial's nested MLflow run (client API: no global active-run state inside Ray workers)."""

    def __init__(self, ctx: TrialContext, trial_id: str, params: Params, overrides: dict[str, Any], regime: str,
                 run_id: str | None = None):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        self.client = MlflowClient(ctx.tracking_uri)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        from training.tracking import ensure_experiment

        exp_id = ensure_experiment(self.client, ctx.experiment)
        tags = {MLFLOW_RUN_NAME: f"trial-{trial_id}", TAG_SWEEP: ctx.sweep, TAG_ROLE: "trial", TAG_TRIAL: trial_id,
                "regime": regime, "stage": "tune", "spatial.overrides": json.dumps(overrides, sort_keys=True),
                **ctx.tags}
        if ctx.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = ctx.parent_run_id
        run = self.client.create_run(exp_id, run_name=f"trial-{trial_id}", tags=tags)
        self.run_id = run.info.run_id
        flat = {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in params.flat().items()}
        flat["tune.trial_regime"] = regime
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in sorted(flat.items())])
        import yaml

        self.client.log_text(self.run_id, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False),
                             "params.yaml")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in _finite(metrics).items()])

    def finish(self, final: dict[str, Any], status: str = "FINISHED") -> None:
        if final:
            self.log_metrics(final, step=0)
        if status == "FINISHED":
            self.client.set_tag(self.run_id, TAG_COMPLETED, "true")
        self.client.set_terminated(self.run_id, status)


class EpochReporter:
    """The engine's end-of-epoch hook (called after the epoch's checkpoint is saved): each epoch goes to MLflow and
    to Tune together, with a copy of that epoch's checkpoint. The newest epoch waits for the next one (or
    :meth:`flush`): :meth:`log_pending` logs it to MLflow before the trial's run is closed and its Tune report comes
    after, so a scheduler stop there loses nothing. A failed report (a retried trial) leaves the later epochs
    unlogged, so the retry from the last checkpoint logs no epoch twice; a trial resumed from an older checkpoint
    after its run had gone further logs the epochs it runs again (MLflow keeps both values at that step)."""

    def __init__(self, run: TrialRun | None, report: Report | None, extra: dict[str, Any]):
        self.run, self.report, self.extra = run, report, extra
        self.pending: tuple[int, dict[str, Any], tempfile.TemporaryDirectory | None] | None = None
        self.logged = -1

    def __call__(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        copy = None
        if self.report is not None and checkpoint is not None:
            copy = tempfile.TemporaryDirectory(prefix="spatial-ckpt-")
            rel = Path(MEMBER) / checkpoint.name
            (Path(copy.name) / rel).parent.mkdir(parents=True)
            shutil.copy2(checkpoint, Path(copy.name) / rel)
            (Path(copy.name) / TRIAL_STATE).write_text(json.dumps({"epoch": epoch, **self.extra}))
        self.flush()
        self.pending = (epoch, dict(metrics), copy)

    def log_pending(self) -> None:
        """Log the waiting epoch to MLflow (before the run is closed; its Tune report follows in :meth:`flush`)."""
        if self.pending is not None:
            self._log(*self.pending[:2])

    def _log(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.run is not None and epoch != self.logged:
            self.run.log_metrics(metrics, epoch)
        self.logged = epoch

    def flush(self) -> None:
        if self.pending is None:
            return
        (epoch, metrics, copy), self.pending = self.pending, None
        try:
            self._log(epoch, metrics)
            if self.report is not None:
                self.report({**metrics, "epoch": epoch, **self.extra}, Path(copy.name) if copy is not None else None)
        finally:
            if copy is not None:
                copy.cleanup()


class RoundReporter:
    """Active-learning rounds: logged and reported as they finish (no checkpoint: a retried campaign starts
    over), except the last one, which :meth:`flush` reports after the MLflow run is closed."""

    def __init__(self, run: TrialRun | None, report: Report | None, extra: dict[str, Any], last_round: int):
        self.run, self.report, self.extra, self.last_round = run, report, extra, last_round
        self.pending: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []

    def __call__(self, row: dict[str, Any]) -> None:
        metrics = {"val_balanced_accuracy": row["balanced_accuracy"], "val_accuracy": row["accuracy"],
                   "val_macro_f1": row["macro_f1"], "val_loss": row["nll"], "n_labels": row["n_labels"],
                   "n_trained": row["n_trained"], "seconds_train": row["seconds_train"]}
        self.rows.append(metrics)
        if self.run is not None:
            self.run.log_metrics(metrics, int(row["round"]))
        self.pending.append({**metrics, "round": int(row["round"]), **self.extra})
        if int(row["round"]) < self.last_round:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            result = self.pending.pop(0)
            if self.report is not None:
                self.report(result, None)


def _trained(params: Params, data, work: Path, resume: bool, reporter: EpochReporter) -> dict[str, Any]:
    """Member 0 of the configuration's ensemble, trained by ``train_member`` exactly as ``spatial train`` would
    (same seed, label fraction, loaders, objective); the novelty model is skipped (not a trial metric)."""
    from training.regimes.ensemble_training import train_member

    p = params.model_copy(update={"uncertainty": params.uncertainty.model_copy(update={"novelty": "none"})})
    _, temperature, _, res, _ = train_member(0, data, p, work, resume=resume, progress=False, on_epoch_end=reporter)
    held = next((h for h in res.history if h["epoch"] == res.weights_epoch), res.history[-1] if res.history else {})
    final = {f"final_{k}": v for k, v in held.items() if k.startswith("val_")}
    final.update(best_epoch=res.best_epoch, best_val_loss=res.best_val_loss, epochs_run=res.epochs_run,
                 stopped_early_patience=int(res.stopped_early), temperature=temperature)
    return final


def campaign_data(data):
    """``data`` with the validation split as the campaign's evaluation set (``test``) and the real test split
    set aside: sweeps choose on validation data, never on the test split."""
    import numpy as np

    cells = data.cells.copy()
    split = cells["split"].astype(str).to_numpy()
    cells["split"] = np.where(split == "test", "reserved_test", np.where(split == "val", "test", split))
    return type(data)(cells, data.classes, data.channels, data.source_channels, data.image_size)


def _active(params: Params, data, ctx: TrialContext, run: TrialRun | None, report: Report | None,
            extra: dict[str, Any], progress: bool) -> tuple[dict[str, Any], RoundReporter]:
    """One active-learning campaign (strategy ``al.strategies[0]``, seed ``al.seed``); each round is a report.

    The queried cells (``queries.parquet``) are logged to the trial's run: ``spatial tune --promote`` trains the
    ensemble on them."""
    from training.active.campaign import run_campaign
    from training.active.oracle import make_oracle

    strategy = params.al.strategies[0] if params.al.strategies else "random"
    oracle = make_oracle(params.al.oracle, data.classes, data.cells, params.al.state_classes, ctx.manifest,
                         params.al.labels_csv)
    reporter = RoundReporter(run, report, extra, last_round=params.al.rounds)
    curve = run_campaign(params, campaign_data(data), strategy, params.al.seed, oracle, report=reporter,
                         progress=progress)
    if run is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / QUERIES
            curve.attrs["queries"].to_parquet(path, index=False)
            run.client.log_artifact(run.run_id, str(path))
            curve.to_csv(Path(tmp) / "curve.csv", index=False)
            run.client.log_artifact(run.run_id, str(Path(tmp) / "curve.csv"))
    last = reporter.rows[-1]
    final = {f"final_{k}": v for k, v in last.items() if k.startswith("val_")}
    final.update(n_labels=last["n_labels"], n_trained=last["n_trained"], oracle=oracle.kind)
    return final, reporter


def run_trial(config: dict[str, Any], table: pd.DataFrame, ctx: TrialContext, report: Report | None = None,
              work_dir: str | Path | None = None, trial_id: str | None = None, progress: bool = False
              ) -> dict[str, Any]:
    """Train the trial's configuration and return its final metrics (also logged to MLflow).

    ``config``: dotted overrides (a Tune trial config). ``report(metrics, checkpoint_dir)`` is called once per
    epoch (round, for active learning). ``work_dir`` holding a previous attempt's ``trial.json`` + ``last.pt``
    resumes that attempt, in the same MLflow run."""
    from training.data.trainset import prepare_data

    overrides = decode(config)
    trial_id = trial_id or uuid.uuid4().hex[:8]
    params, regime = trial_params(ctx.raw, overrides)
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="spatial-trial-")) if own_tmp else Path(work_dir)
    state_file = work / TRIAL_STATE
    previous = json.loads(state_file.read_text()) if state_file.is_file() else None
    t0 = time.perf_counter()
    run = None
    try:
        if ctx.tracking_uri:
            run = TrialRun(ctx, trial_id, params, overrides, regime,
                           run_id=(previous or {}).get("mlflow_run_id"))
        extra = {"trial_regime": regime, **({"mlflow_run_id": run.run_id} if run else {})}
        data = prepare_data(table, ctx.classes, params)
        if regime == "active":
            final, reporter = _active(params, data, ctx, run, report, extra, progress)
        else:
            reporter = EpochReporter(run, report, extra)
            final = _trained(params, data, work, resume=previous is not None, reporter=reporter)
        final["trial_seconds"] = time.perf_counter() - t0
        if isinstance(reporter, EpochReporter):
            reporter.log_pending()
        if run is not None:
            run.finish(final)
        reporter.flush()  # the last report comes after MLflow is closed: a scheduler stop ends the trial there
        return {**final, **extra}
    except (SystemExit, KeyboardInterrupt) as exc:  # Tune stops a trial (scheduler, end of sweep) with SystemExit
        if run is not None:
            try:
                stopped = isinstance(exc, SystemExit) and exc.code in (0, None)
                run.client.set_tag(run.run_id, TAG_STOPPED, "stopped by Tune" if stopped else "interrupted")
                run.client.set_terminated(run.run_id, "FINISHED" if stopped else "KILLED")
            except Exception:
                log.warning("could not close MLflow run %s", run.run_id)
        raise
    except BaseException as exc:
        if run is not None:
            try:
                run.client.set_tag(run.run_id, "spatial.error", f"{type(exc).__name__}: {exc}"[:5000])
                run.client.set_terminated(run.run_id, "FAILED")
            except Exception:  # the tracking server may be what failed
                log.warning("could not mark MLflow run %s as failed", run.run_id)
        raise
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def tune_trial(config: dict[str, Any], table: pd.DataFrame | None = None, ctx: TrialContext | None = None) -> None:
    """Ray Tune function trainable (wrap with ``tune.with_parameters(tune_trial, table=..., ctx=...)``)."""
    import torch
    from ray import tune

    if table is None or ctx is None:
        raise ConfigError("tune_trial needs table= and ctx= (use tune.with_parameters)")
    torch.set_num_threads(max(1, ctx.threads))
    trial_id = tune.get_context().get_trial_id() or uuid.uuid4().hex[:8]

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics, checkpoint=ckpt)

    with tempfile.TemporaryDirectory(prefix="spatial-trial-") as work:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                shutil.copytree(d, work, dirs_exist_ok=True)
        run_trial(config, table, ctx, report=report, work_dir=work, trial_id=trial_id)
