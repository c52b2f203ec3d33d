"""Run a Ray Tune sweep over ``tune.space``: locally or on an existing Ray cluster, logged to MLflow.

One MLflow parent run per sweep; each trial logs its own nested run (:mod:`tuning.trainable`). A driver-side
callback closes the runs of trials the scheduler stopped, marks failed attempts, and collects every trial's
final state, so errored trials are reported (``trials.csv``, parent run), never dropped.

On a cluster (``--address`` / ``$RAY_ADDRESS``) MLflow must be a tracking server (``http://...``) and the
storage path shared storage (NFS path mounted at the same place on every node, or ``s3://`` / ``gs://``), and the
data files must be readable at the same absolute paths on every node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from training.config import Params, resolve
from training.errors import ConfigError, TrainingError
from training.ray_cluster import connect
from tuning.space import REGIME_KEY, grid_points, max_iterations, parse_space, to_param_space
from tuning.trainable import (
    TAG_BEST,
    TAG_COMPLETED,
    TAG_ROLE,
    TAG_SCHEDULER_STOP,
    TAG_SWEEP,
    TAG_TRIAL,
    TrialContext,
    tune_trial,
)

log = logging.getLogger(__name__)
_FINAL_TRIALS: dict[str, list[dict[str, Any]]] = {}  # sweep name -> trial rows, filled by the driver callback
REMOTE_TRACKING = ("http://", "https://", "databricks")


@dataclass
class SweepResult:
    name: str
    path: str
    parent_run_id: str | None
    trials: pd.DataFrame
    best: dict[str, Any] | None
    interrupted: bool = False
    metric: str = "val_balanced_accuracy"
    mode: str = "max"
    info: dict[str, Any] = field(default_factory=dict)
    params: Params | None = None  # a resumed sweep's own params (those it was started with)

    @property
    def failed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "ERROR"]


# -- where it runs ---------------------------------------------------------------------------------------------
def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_tracking_uri(params: Params, cluster: bool) -> str:
    """The tracking URI trials get: absolute for sqlite; a server on a cluster, which must answer now (not in every
    trial after Ray has started)."""
    from training.tracking import check_server, repo_root, tracking_uri

    uri = tracking_uri(params.mlflow)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(repo_root() / uri[len('sqlite:///'):]).resolve()}"
    if cluster and not uri.startswith(REMOTE_TRACKING):
        raise ConfigError(
            f"mlflow.tracking_uri is '{uri}', but trials on a Ray cluster cannot share a local store: start "
            "`mlflow server` on the head node and pass --tracking-uri http://HEAD:5000 "
            "(or set mlflow.tracking_uri / $MLFLOW_TRACKING_URI)"
        )
    check_server(uri)
    return uri


def resolve_storage(storage: str | None, cluster: bool) -> str:
    from training.tracking import repo_root

    if storage is None:
        if cluster:
            raise ConfigError(
                "tune.storage_path is not set: on a Ray cluster trials and checkpoints need shared storage "
                "(an NFS path mounted on every node, or s3:// / gs://); pass --storage-path"
            )
        return str(repo_root() / "ray_results")
    return storage if _is_uri(storage) else str(Path(storage).expanduser().resolve())


def _check_resources(cpus: float, gpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    if gpus > 0 and have.get("GPU", 0) < gpus:
        raise ConfigError(f"tune.gpus_per_trial={gpus:g}, but the Ray cluster has {have.get('GPU', 0):g} GPU(s)")
    if have.get("CPU", 0) < cpus:
        raise ConfigError(f"tune.cpus_per_trial={cpus:g}, but the Ray cluster has {have.get('CPU', 0):g} CPU(s)")


def latest_sweep(storage: str) -> str:
    """The most recently changed restorable sweep under a local storage path."""
    root = Path(storage)
    found = sorted((p for p in root.glob("*/tuner.pkl")), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise ConfigError(f"--resume: no sweep to resume under {storage} (pass --name)")
    return found[-1].parent.name


# -- MLflow bookkeeping on the driver ----------------------------------------------------------------------------
def _trial_runs(client, experiment_id: str, sweep: str, status: str | None = None) -> list:
    flt = f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'trial'"
    if status:
        flt += f" and attributes.status = '{status}'"
    return client.search_runs([experiment_id], flt, max_results=5000, order_by=["attributes.start_time ASC"])


def _error_text(trial) -> str:
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be gone
        err = None
    if err is None:
        return ""
    text = str(err).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), "")[:500]


class MlflowTrialCallback(tune.Callback):
    """Driver-side callback: closes trial runs Tune stopped or that failed, collects every trial's final state."""

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, metric: str):
        self.tracking_uri, self.experiment, self.sweep, self.metric = tracking_uri, experiment, sweep, metric
        self._client = None
        self._started: set[str] = set()  # trials started / ended in this session: started and never ended
        self._ended: set[str] = set()  # = cut off by an interruption (Tune marks them TERMINATED at cleanup)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _client=None, _started=set(), _ended=set())

    @property
    def client(self):
        from mlflow import MlflowClient

        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _open(self, trial_id: str, statuses: tuple[str, ...] = ("RUNNING",)) -> list:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        return [r for r in _trial_runs(self.client, exp.experiment_id, self.sweep)
                if r.data.tags.get(TAG_TRIAL) == trial_id and r.info.status in statuses
                and not r.data.tags.get(TAG_COMPLETED)]

    def _close(self, trial_id: str, status: str, tags: dict[str, str],
               statuses: tuple[str, ...] = ("RUNNING",)) -> None:
        try:
            for run in self._open(trial_id, statuses):
                for k, v in tags.items():
                    self.client.set_tag(run.info.run_id, k, v)
                self.client.set_terminated(run.info.run_id, status)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not kill the sweep
            log.warning("could not update the MLflow run of trial %s: %s", trial_id, exc)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._started.add(trial.trial_id)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial.trial_id, "FAILED", {"spatial.error": _error_text(trial) or "retried",
                                               "spatial.retry": str(trial.num_failures)})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.add(trial.trial_id)
        self._close(trial.trial_id, "FAILED", {"spatial.error": _error_text(trial) or "failed"})

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.add(trial.trial_id)
        it = (trial.last_result or {}).get("training_iteration")
        self._close(trial.trial_id, "FINISHED", {TAG_SCHEDULER_STOP: f"after {it} report(s)"},
                    ("RUNNING", "FINISHED"))

    def on_experiment_end(self, trials: list, **info) -> None:
        rows = []
        for t in trials:
            last = dict(t.last_result or {})
            analysis = (t.metric_analysis or {}).get(self.metric, {})
            cut = t.trial_id in self._started and t.trial_id not in self._ended
            if cut:  # the sweep was interrupted while this trial ran
                self._close(t.trial_id, "KILLED", {"spatial.interrupted": "true"}, ("RUNNING", "FINISHED"))
            rows.append({
                "trial_id": t.trial_id, "status": "INTERRUPTED" if cut else t.status, "config": dict(t.config),
                "last": last,
                "best_value": analysis.get("max") if analysis else None,
                "min_value": analysis.get("min") if analysis else None,
                "num_failures": int(t.num_failures), "error": _error_text(t) if t.status == "ERROR" else "",
            })
        _FINAL_TRIALS[self.sweep] = rows


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# -- the sweep ---------------------------------------------------------------------------------------------------
def _absolute_paths(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["source_file"] = [os.path.abspath(p) for p in table["source_file"].astype(str)]
    return table


def _parent_run(params: Params, name: str, resume: bool):
    """The sweep's parent run: reopened on resume (found by its tags), else a new one."""
    from mlflow import MlflowClient

    from training.tracking import Tracker, configure

    tags = {TAG_SWEEP: name, TAG_ROLE: "sweep", "stage": "tune"}
    run_id = None
    if resume:
        configure(params.mlflow)
        client = MlflowClient()
        exp = client.get_experiment_by_name(params.mlflow.experiment)
        if exp is not None:
            found = client.search_runs([exp.experiment_id],
                                       f"tags.`{TAG_SWEEP}` = '{name}' and tags.`{TAG_ROLE}` = 'sweep'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            run_id = found[0].info.run_id if found else None
    return Tracker(params, run_name=name, tags=tags, run_id=run_id)


def _summary(rows: list[dict[str, Any]], keys: list[str], metric: str, mode: str,
             run_ids: dict[str, str]) -> pd.DataFrame:
    out = []
    for r in rows:
        last, cfg = r["last"], r["config"]
        value = last.get(metric)
        row = {
            "trial_id": r["trial_id"], "status": r["status"],
            "regime": last.get("trial_regime") or cfg.get(REGIME_KEY) or "",
            metric: float(value) if isinstance(value, int | float) else math.nan,
            f"{metric}_{mode}": r["best_value" if mode == "max" else "min_value"],
            "iterations": last.get("training_iteration", 0), "num_failures": r["num_failures"], "error": r["error"],
            "mlflow_run_id": last.get("mlflow_run_id") or run_ids.get(r["trial_id"], ""),
        }
        row.update({k: json.dumps(cfg[k]) if isinstance(cfg.get(k), list | dict) else cfg.get(k) for k in keys})
        out.append(row)
    return pd.DataFrame(out)


def _pick_best(trials: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    ok = trials[(trials["status"] == "TERMINATED") & trials[metric].notna()]
    if ok.empty:
        return None
    return ok.loc[ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()]


def _regimes(specs: dict[str, dict[str, Any]], params: Params) -> set[str]:
    """The training regimes the sweep's trials will use (``active`` trials train semi-supervised with
    ``al.semisupervised``)."""
    dim = specs.get(REGIME_KEY)
    named = set(dim["values"]) if dim and "values" in dim else {params.train.regime}
    if "active" in named:
        named.discard("active")
        semi = specs.get("al.semisupervised", {}).get("values", [params.al.semisupervised])
        named |= {"semisupervised" if s else "supervised" for s in semi}
    return named


def check_unlabeled(specs: dict[str, dict[str, Any]], params: Params, table: pd.DataFrame) -> None:
    """Refuse, once and before any trial starts, a sweep with semi-supervised trials on a split without unlabeled
    cells (every such trial would fail on each retry)."""
    if "semisupervised" not in _regimes(specs, params):
        return
    fractions = specs.get("ssl.label_fraction", {})
    hides = params.ssl.label_fraction < 1 or fractions.get("type") in ("uniform", "loguniform") or any(
        v < 1 for v in fractions.get("values", []))
    if hides or ("split" in table and (table["split"].astype(str) == "unlabeled").any()):
        return
    raise ConfigError("tune.space has semi-supervised trials but the split has no unlabeled cells (no screen files "
                      "in the manifest, split.unlabeled_max=0?) and ssl.label_fraction=1 hides no labels: add screen "
                      "files, set ssl.label_fraction < 1, or drop semisupervised from tune.space.train.regime")


def run_sweep(params: Params, table: pd.DataFrame, classes: list[str], *, name: str | None = None,
              resume: bool = False, num_samples: int | None = None, address: str | None = None,
              storage_path: str | None = None, cpus_per_trial: float | None = None,
              gpus_per_trial: float | None = None, manifest: str | Path | None = None,
              callbacks: list | tuple = (), trainable=None, progress: bool = True) -> SweepResult:
    """Run (or ``resume``) the sweep described by ``params.tune`` on the split ``table``.

    Arguments override the matching ``tune.*`` params; ``manifest`` lets active-learning trials find the
    simulator's truth (their oracle). ``trainable`` replaces :func:`tune_trial` (tests)."""
    # every epoch is a checkpoint by design; Tune's "snapshotting too often" warning is noise for short epochs
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    given = {"num_samples": num_samples, "address": address, "storage_path": storage_path,
             "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial, "name": name}
    updates = {f"tune.{k}": v for k, v in given.items() if v is not None}
    if updates:  # validated like --set (e.g. a negative --gpus-per-trial is a ConfigError)
        params = resolve(params.model_dump(mode="json"), updates)
    cfg = params.tune
    if not resume:  # a resumed sweep checks its own space below
        specs = parse_space(cfg.space, params)
        check_unlabeled(specs, params, table)
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    cluster = bool(address)
    uri = resolve_tracking_uri(params, cluster)
    storage = resolve_storage(cfg.storage_path, cluster)
    name = cfg.name or (latest_sweep(storage) if resume and not _is_uri(storage) else None)
    if name is None:
        if resume:
            raise ConfigError("--resume with a remote storage path needs --name")
        name = time.strftime("sweep-%Y%m%d-%H%M%S")
    path = f"{storage.rstrip('/')}/{name}"
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"--resume: no restorable sweep at {path}")
    if not resume and exists:
        raise ConfigError(f"sweep '{name}' already exists at {path}: pass --resume to continue it, "
                          "or --name for a new sweep")
    where = {"tune.address": cfg.address, "tune.storage_path": cfg.storage_path, "tune.out": cfg.out,
             "mlflow.tracking_uri": uri, "tune.name": name}
    if resume:  # the sweep's own settings (trial count, space, training config); only where it runs from here
        params = _resumed_params(path, name, params, given, where)
        cfg = params.tune
        specs = parse_space(cfg.space, params)
        check_unlabeled(specs, params, table)
    else:
        params = resolve(params.model_dump(mode="json"), where)

    started = connect(address, log_to_driver=progress)
    try:
        _check_resources(cfg.cpus_per_trial, cfg.gpus_per_trial)
        tracker = _parent_run(params, name, resume)
        status = "FAILED"
        try:
            ctx = TrialContext(raw=params.model_dump(mode="json"), classes=list(classes), tracking_uri=uri,
                               experiment=params.mlflow.experiment, parent_run_id=tracker.run_id, sweep=name,
                               threads=max(1, int(cfg.cpus_per_trial)),
                               manifest=os.path.abspath(manifest) if manifest else None)
            fn = tune.with_resources(
                tune.with_parameters(trainable or tune_trial, table=_absolute_paths(table), ctx=ctx),
                {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
            )
            _FINAL_TRIALS.pop(name, None)
            if resume:
                _close_stale_runs(uri, params.mlflow.experiment, name)
                tuner = tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=True)
            else:
                tuner = tune.Tuner(fn, param_space=to_param_space(specs, optuna=cfg.search == "optuna"),
                                   tune_config=_tune_config(cfg, specs, params),
                                   run_config=tune.RunConfig(
                                       name=name, storage_path=storage,
                                       failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                       callbacks=[MlflowTrialCallback(uri, params.mlflow.experiment, name, cfg.metric),
                                                  *callbacks],
                                       verbose=1 if progress else 0))
                _write_record(path, ctx.raw)
            tuner.fit()
            result = _collect(name, path, tracker.run_id, specs, cfg, uri, params.mlflow.experiment)
            result.params = params if resume else None
            _log_parent(tracker, result)
            status = "KILLED" if result.interrupted else "FINISHED"
        finally:
            tracker.close(status)
    finally:
        if started:
            import ray

            ray.shutdown()
    if not result.interrupted and result.best is None:
        first = next((e for e in result.trials["error"] if e), "no trial reported the metric")
        raise TrainingError(f"sweep '{name}': no trial completed with {cfg.metric} ({len(result.trials)} trials; "
                            f"first error: {first}); see {path}")
    return result


# -- what a sweep recorded, for --resume ------------------------------------------------------------------------
SWEEP_RECORD = "spatial_sweep.json"  # next to Tune's tuner.pkl: the params the sweep's trials train with
RESUME_FLAGS = ("num_samples", "cpus_per_trial", "gpus_per_trial")


def _fs_path(path: str, file: str):
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(path)
    return fs, f"{root.rstrip('/')}/{file}"


def _write_record(path: str, raw: dict[str, Any]) -> None:
    fs, file = _fs_path(path, SWEEP_RECORD)
    with fs.open_output_stream(file) as f:
        f.write(json.dumps(raw, indent=1, default=str).encode())


def _read_record(path: str) -> dict[str, Any] | None:
    import pyarrow.fs

    fs, file = _fs_path(path, SWEEP_RECORD)
    if fs.get_file_info(file).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_file(file) as f:
        return json.loads(f.readall())


def _tuner_settings(path: str) -> dict[str, Any]:
    """``tune.*`` settings the sweep's ``tuner.pkl`` knows (sweeps recorded before :data:`SWEEP_RECORD`)."""
    import ray.cloudpickle

    fs, file = _fs_path(path, "tuner.pkl")
    with fs.open_input_file(file) as f:
        tc = ray.cloudpickle.loads(f.readall()).get("_tune_config")
    if tc is None:
        return {}
    out = {"tune.num_samples": tc.num_samples, "tune.metric": tc.metric, "tune.mode": tc.mode}
    if tc.search_alg is not None:
        out["tune.search"] = "optuna" if "Optuna" in type(tc.search_alg).__name__ else "random"
    return {k: v for k, v in out.items() if v is not None}


def _resumed_params(path: str, name: str, params: Params, given: dict[str, Any], where: dict[str, Any]) -> Params:
    """The params a resumed sweep runs with: those it was started with (``spatial_sweep.json``; for an older
    sweep the current ones with the trial count, metric, mode and search its Tuner recorded), with only ``where``
    (address, storage, tracking URI, outputs) from this call. An explicit flag that differs is refused."""
    raw = _read_record(path)
    if raw is None:
        raw = resolve(params.model_dump(mode="json"), _tuner_settings(path)).model_dump(mode="json")
    own = resolve(raw, {}).tune
    for key in RESUME_FLAGS:
        if given[key] is not None and given[key] != getattr(own, key):
            raise ConfigError(f"--resume: sweep '{name}' was started with tune.{key}={getattr(own, key):g}; a "
                              f"resumed sweep keeps its settings (drop --{key.replace('_', '-')})")
    return resolve(raw, where)


def _tune_config(cfg, specs: dict, params: Params):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_t = max_iterations(specs, params)
    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=min(cfg.grace_period, max_t), reduction_factor=cfg.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(points_to_evaluate=grid_points(specs, params.seed) or None, seed=params.seed)
    else:
        search = BasicVariantGenerator(random_state=params.seed, max_concurrent=cfg.max_concurrent_trials or 0)
    return tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler, search_alg=search,
                           num_samples=cfg.num_samples, reuse_actors=True, trial_dirname_creator=_trial_dirname,
                           max_concurrent_trials=cfg.max_concurrent_trials if cfg.search == "optuna" else None)


def expected_trials(specs: dict, cfg) -> int:
    """Trials a complete sweep has: ``num_samples`` (Optuna) or ``num_samples`` per grid point (random)."""
    if cfg.search == "optuna":
        return cfg.num_samples
    return cfg.num_samples * math.prod(len(d["values"]) for d in specs.values() if d["type"] == "grid")


def _close_stale_runs(uri: str, experiment: str, sweep: str) -> None:
    """Before resuming: trial runs the interruption cut off (neither completed nor stopped by the scheduler, e.g.
    left RUNNING by a killed driver) are marked KILLED; a trial resumed from its checkpoint reopens its own run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    for run in _trial_runs(client, exp.experiment_id, sweep):
        tags = run.data.tags
        if run.info.status in ("RUNNING", "FINISHED") and not tags.get(TAG_COMPLETED) \
                and not tags.get(TAG_SCHEDULER_STOP):
            client.set_terminated(run.info.run_id, "KILLED")


def _collect(name: str, path: str, parent_id: str, specs: dict, cfg, uri: str, experiment: str) -> SweepResult:
    from mlflow import MlflowClient

    rows = _FINAL_TRIALS.pop(name, None)
    if rows is None:
        raise TrainingError(f"sweep '{name}' ended without reporting its trials (see {path})")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = _trial_runs(client, exp.experiment_id, name) if exp else []
    run_ids = {r.data.tags.get(TAG_TRIAL): r.info.run_id for r in runs}  # latest attempt wins (ordered by start)
    trials = _summary(rows, list(specs), cfg.metric, cfg.mode, run_ids)
    interrupted = bool((~trials["status"].isin(["TERMINATED", "ERROR"])).any()) \
        or len(trials) < expected_trials(specs, cfg)
    best_row = _pick_best(trials, cfg.metric, cfg.mode) if not interrupted else None
    best = None
    if best_row is not None:
        from tuning.space import decode

        row = next(r for r in rows if r["trial_id"] == best_row["trial_id"])
        best = {"sweep": name, "trial_id": best_row["trial_id"], "metric": cfg.metric, "mode": cfg.mode,
                "value": float(best_row[cfg.metric]), "regime": best_row["regime"],
                "overrides": decode(row["config"]), "mlflow_run_id": best_row["mlflow_run_id"],
                "parent_run_id": parent_id, "path": path,
                "n_trials": len(trials), "n_errored": int((trials["status"] == "ERROR").sum())}
        for r in runs:  # exactly one best trial per sweep (a resumed sweep may have tagged another)
            if r.data.tags.get(TAG_BEST) and r.info.run_id != best["mlflow_run_id"]:
                client.delete_tag(r.info.run_id, TAG_BEST)
        if best["mlflow_run_id"]:
            client.set_tag(best["mlflow_run_id"], TAG_BEST, "true")
    return SweepResult(name=name, path=path, parent_run_id=parent_id, trials=trials, best=best,
                       interrupted=interrupted, metric=cfg.metric, mode=cfg.mode,
                       info={"completed_runs": sum(1 for r in runs if r.data.tags.get(TAG_COMPLETED))})


def _log_parent(tracker, result: SweepResult) -> None:
    import mlflow

    t = result.trials
    tracker.log_metrics({"n_trials": len(t), "n_terminated": int((t["status"] == "TERMINATED").sum()),
                         "n_errored": int((t["status"] == "ERROR").sum()),
                         "n_retries": int(t["num_failures"].sum())})
    mlflow.log_text(t.to_csv(index=False), "trials.csv")
    if result.failed.size:
        mlflow.set_tag("spatial.failed_trials", ",".join(result.failed["trial_id"]))
    if result.interrupted:
        mlflow.set_tag("spatial.interrupted", "true")
    if result.best:
        b = result.best
        tracker.log_metrics({f"best_{b['metric']}": b["value"]})
        mlflow.set_tags({"spatial.best_trial_id": b["trial_id"], "spatial.best_run_id": b["mlflow_run_id"],
                         "spatial.best_regime": b["regime"]})
        mlflow.log_dict(b, "best.json")


def write_outputs(result: SweepResult, params: Params, out_dir: str | Path) -> dict[str, Path]:
    """``best.json`` (the winner's overrides and metric), ``best_params.yaml`` (full params with the winner's
    overrides; ``spatial train --params`` takes it) and ``trials.csv`` (one row per trial, failures included)."""
    import yaml

    from training.io.atomic import atomic_path
    from tuning.trainable import trial_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out / "trials.csv", "best": out / "best.json", "best_params": out / "best_params.yaml"}
    with atomic_path(paths["trials"], suffix=".csv") as tmp:
        result.trials.to_csv(tmp, index=False)
    if result.best is None:
        return {"trials": paths["trials"]}
    with atomic_path(paths["best"], suffix=".json") as tmp:
        tmp.write_text(json.dumps(result.best, indent=2, sort_keys=True, default=str) + "\n")
    base = result.params or params  # a resumed sweep's trials trained with the params it was started with
    best_params, regime = trial_params(base.model_dump(mode="json"), result.best["overrides"])
    header = (f"# best trial {result.best['trial_id']} of sweep {result.name}: {result.metric}="
              f"{result.best['value']:.4f} (regime {regime})\n")
    if regime == "active":
        header += "# regime 'active': an active-learning campaign (al.*) trains train.regime below\n"
    with atomic_path(paths["best_params"], suffix=".yaml") as tmp:
        tmp.write_text(header + yaml.safe_dump(best_params.model_dump(mode="json"), sort_keys=False))
    return paths
