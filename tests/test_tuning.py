"""Ray Tune sweeps (tuning/): search spaces, the trial function, local and multi-node sweeps logged to MLflow,
retries, resuming an interrupted sweep, and promoting the winner to the registry alias."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_params
from mlflow import MlflowClient
from ray import tune

from training.data.cellindex import build_index
from training.data.splits import make_splits
from training.errors import ConfigError
from tuning.space import decode, grid_points, max_iterations, parse_space, to_param_space
from tuning.sweep import SweepResult, resolve_storage, resolve_tracking_uri, run_sweep, write_outputs
from tuning.trainable import TAG_BEST, TAG_COMPLETED, TAG_TRIAL, TrialContext, run_trial

TINY_AL = {"al.initial": 8, "al.query_size": 8, "al.rounds": 1, "al.epochs": 1, "al.min_steps": 2,
           "al.strategies": ["margin"], "al.mc_samples": 2, "al.pool_subsample": None, "al.full_data": False}


def sweep_params(tmp: Path, space: dict, **over):
    return tiny_params(tmp, **{"train.epochs": 2, "tune.storage_path": str(tmp / "ray"), "tune.out": str(tmp / "out"),
                               "tune.num_samples": 1, "tune.space": space, "tune.max_failures": 1, **TINY_AL, **over})


@pytest.fixture(scope="module")
def sweep_data(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, list[str]]:
    p = tiny_params(tmp_path_factory.mktemp("split"))
    table, summary = make_splits(build_index(tiny_manifest, progress=False), p.split)
    return table, summary["classes"]


@pytest.fixture(scope="module")
def _ray_module():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def local_ray(_ray_module):
    """One local Ray (2 CPUs) shared by the local-sweep tests, shut down at the end of the module."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def trial_runs(uri: str, experiment: str, sweep: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`spatial.sweep` = '{sweep}' and tags.`spatial.role` = 'trial'",
                              order_by=["attributes.start_time ASC"])


# -- search spaces ----------------------------------------------------------------------------------------------
def test_space_is_validated_against_the_config(tmp_path: Path):
    p = tiny_params(tmp_path)
    space = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
             "model.dims": {"type": "choice", "values": [[8, 16, 16, 32], [8, 8, 16, 16]]},
             "train.epochs": {"type": "randint", "low": 1, "high": 3},
             "train.regime": {"type": "grid", "values": ["supervised", "semisupervised", "active"]}}
    specs = parse_space(space, p)
    ray_space = to_param_space(specs)
    assert ray_space["train.regime"] == {"grid_search": ["supervised", "semisupervised", "active"]}
    assert ray_space["model.dims"].categories == [[8, 16, 16, 32], [8, 8, 16, 16]]
    # Optuna: grid -> categorical with every combination queued first; list values travel as JSON
    opt = to_param_space(specs, optuna=True)
    assert opt["model.dims"].categories == ["[8, 16, 16, 32]", "[8, 8, 16, 16]"]
    points = grid_points(specs, seed=0)
    assert [pt["train.regime"] for pt in points] == ["supervised", "semisupervised", "active"]
    assert all(set(pt) == set(space) and 1e-4 <= pt["train.lr"] <= 1e-2 for pt in points)
    assert decode(points[0])["model.dims"] in ([8, 16, 16, 32], [8, 8, 16, 16])
    assert max_iterations(specs, p) == max(3, p.al.rounds + 1)

    bad = [
        ({"train.lrr": {"type": "uniform", "low": 0, "high": 1}}, "tune.space.train.lrr: not a config key"),
        ({"train.lr": {"type": "loguniform", "low": 0, "high": 1}}, "0 < low < high"),
        ({"train.lr": {"type": "normal", "low": 0, "high": 1}}, "unknown type 'normal'"),
        ({"model.dims": {"type": "choice", "values": [["a"]]}}, "tune.space.model.dims: value"),
        ({"train.regime": {"type": "grid", "values": ["supervised", "bandit"]}}, "regime must be one of"),
        ({"train.optimizer": {"type": "choice", "values": ["adamw", "lion"]}}, "'lion' is not valid"),
        ({}, "tune.space is empty"),
    ]
    for space, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            parse_space(space, p)


def test_default_space_sweeps_the_regimes_and_refuses_ssl_without_unlabeled_cells(sweep_data, tmp_path: Path):
    from training.config import TuneConfig

    space = TuneConfig().space
    assert space["train.regime"] == {"type": "grid", "values": ["supervised", "semisupervised", "active"]}
    table, classes = sweep_data
    labeled_only = table[table["split"].astype(str) != "unlabeled"]
    p = sweep_params(tmp_path, space)
    with pytest.raises(ConfigError, match="semi-supervised trials but the split has no unlabeled cells"):
        run_sweep(p, labeled_only, classes, progress=False)  # refused before Ray starts: no trial ever runs
    assert not (tmp_path / "ray").exists()
    # a hidden label fraction gives FixMatch its unlabeled cells; a supervised-only space needs none
    from tuning.sweep import check_unlabeled

    check_unlabeled(parse_space(space, p), tiny_params(tmp_path, **{"ssl.label_fraction": 0.5}), labeled_only)
    sup = {"train.regime": {"type": "grid", "values": ["supervised", "active"]}}
    check_unlabeled(parse_space(sup, p), p, labeled_only)


def test_cluster_needs_a_tracking_server_and_shared_storage(tmp_path: Path):
    p = tiny_params(tmp_path)
    with pytest.raises(ConfigError, match="mlflow server"):
        resolve_tracking_uri(p, cluster=True)
    with pytest.raises(ConfigError, match="shared storage"):
        resolve_storage(None, cluster=True)
    served = tiny_params(tmp_path, **{"mlflow.tracking_uri": "http://10.0.0.1:5000"})
    assert resolve_tracking_uri(served, cluster=True) == "http://10.0.0.1:5000"
    assert resolve_storage("s3://bucket/sweeps", cluster=True) == "s3://bucket/sweeps"


def test_failed_cluster_connection_hints_at_token_authentication(monkeypatch: pytest.MonkeyPatch):
    """A cluster with token authentication refuses a client without RAY_AUTH_MODE=token with only Ray's log lines
    and "Failed to connect": the one-line error says what to export; with token mode set there is no hint."""
    from training.ray_cluster import connect_error

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    msg = connect_error("192.0.2.2:6399", ConnectionError("Failed to connect to Ray cluster\nmore"))
    assert msg.startswith("cannot connect to the Ray cluster at '192.0.2.2:6399': Failed to connect to Ray cluster;")
    assert "\n" not in msg and "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN" in msg
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert connect_error("h:1", RuntimeError("x")) == "cannot connect to the Ray cluster at 'h:1': x"


def test_active_learning_winner_trains_on_the_cells_its_campaign_labeled(sweep_data):
    from tuning.promote import active_table

    table, _ = sweep_data
    pool = table[table["split"] == "train"]
    asked = pool.iloc[:6]
    queries = pd.DataFrame({"source_file": asked["source_file"].to_numpy(), "cell_id": asked["cell_id"].to_numpy(),
                            "label": ["spotty", "bright", None, "bright", "spotty", "bright"]})
    out = active_table(table, queries, ["train"])
    train = out[out["split"] == "train"]
    assert len(train) == 5  # "none of these" answers train nothing
    assert list(train["label"]) == ["spotty", "bright", "bright", "spotty", "bright"]
    assert (out["split"] == "unlabeled").sum() == (table["split"] == "unlabeled").sum() + len(pool) - 5
    assert out.loc[out["split"] == "unlabeled", "label"].isna().sum() >= len(pool) - 5
    for split in ("val", "test", "heldout"):
        assert (out["split"] == split).sum() == (table["split"] == split).sum()


# -- the trial function, outside Tune ---------------------------------------------------------------------------
def test_trial_reports_every_epoch_and_resumes_from_its_checkpoint(sweep_data, tmp_path: Path):
    table, classes = sweep_data
    p = tiny_params(tmp_path, **{"train.epochs": 2})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = TrialContext(raw=p.model_dump(mode="json"), classes=classes, tracking_uri=uri, experiment="trials")
    saved: list[tuple[int, Path | None]] = []
    bacc: dict[int, list[float]] = {}

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        keep = None
        if checkpoint_dir is not None:
            keep = tmp_path / f"ckpt{len(saved)}-epoch{metrics['epoch']}"
            shutil.copytree(checkpoint_dir, keep)
        saved.append((metrics["epoch"], keep))
        bacc.setdefault(metrics["epoch"], []).append(metrics["val_balanced_accuracy"])

    full = run_trial({"train.lr": 3e-3}, table, ctx, report=report, trial_id="t0")
    assert [e for e, _ in saved] == [0, 1] and all(c is not None for _, c in saved)
    ckpt0 = saved[0][1]
    assert (ckpt0 / "member_0" / "last.pt").is_file()
    assert json.loads((ckpt0 / "trial.json").read_text())["mlflow_run_id"] == full["mlflow_run_id"]

    # a retried attempt resumes after epoch 0 in the same MLflow run and ends bit-identical (CPU)
    saved.clear()
    again = run_trial({"train.lr": 3e-3}, table, ctx, report=report, work_dir=ckpt0, trial_id="t0")
    assert [e for e, _ in saved] == [1]
    assert again["mlflow_run_id"] == full["mlflow_run_id"]
    assert again["final_val_loss"] == full["final_val_loss"]

    client = MlflowClient(uri)
    run = client.get_run(full["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[TAG_COMPLETED] == "true"
    assert float(run.data.params["train.lr"]) == 3e-3
    history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 1]  # epoch 1 ran in both calls, epoch 0 once
    # what Tune got is what MLflow got, and the resumed epoch 1 scored exactly as the first attempt's
    assert sorted((m.step, m.value) for m in history) == sorted((e, v) for e, vs in bacc.items() for v in vs)
    assert len(set(bacc[1])) == 1


# -- local Ray --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_sweep_logs_parent_and_nested_trial_runs(sweep_data, local_ray, tmp_path: Path):
    """4 trials, Optuna search with the regime grid queued first: supervised, semi-supervised and active learning
    side by side; ASHA may stop trials early; one parent run and 4 nested runs, the best one tagged."""
    table, classes = sweep_data
    space = {"train.regime": {"type": "grid", "values": ["supervised", "semisupervised", "active"]},
             "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}
    p = sweep_params(tmp_path, space, **{"tune.search": "optuna", "tune.num_samples": 4})
    result = run_sweep(p, table, classes, name="local", progress=False)
    t = result.trials
    assert len(t) == 4 and set(t["status"]) == {"TERMINATED"}
    assert {"supervised", "semisupervised", "active"} <= set(t["regime"])
    assert t["val_balanced_accuracy"].between(0, 1).all()

    uri = resolve_tracking_uri(p, cluster=False)
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 4
    runs = trial_runs(uri, "tests", "local")
    assert len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {result.parent_run_id}
    assert {r.data.tags[TAG_TRIAL] for r in runs} == set(t["trial_id"])
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.status, r.data.tags.get("spatial.error"), r.data.tags.get("spatial.stopped_by_scheduler")) for r in runs]
    for r in runs:  # per-epoch (per-round) metrics and the resolved config
        assert client.get_metric_history(r.info.run_id, "val_balanced_accuracy")
        assert r.data.params["train.regime"] in ("supervised", "semisupervised")
    best = [r for r in runs if r.data.tags.get(TAG_BEST) == "true"]
    assert len(best) == 1 and best[0].info.run_id == result.best["mlflow_run_id"]
    assert result.best["value"] == t[result.metric].max()

    paths = write_outputs(result, p, tmp_path / "out")
    assert len(pd.read_csv(paths["trials"])) == 4
    assert json.loads(paths["best"].read_text())["trial_id"] == result.best["trial_id"]
    assert "train:" in paths["best_params"].read_text()


def flaky_trial(config: dict, table=None, ctx=None) -> None:
    """tune_trial, except that the trial with label_smoothing 0.05 raises once after its first checkpointed
    epoch and the one with 0.1 raises on every attempt."""
    mode = {0.05: "once", 0.1: "always"}.get(config["train.label_smoothing"])
    restored = tune.get_checkpoint() is not None

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)
        if mode == "always" or (mode == "once" and not restored):
            raise RuntimeError(f"injected failure in epoch {metrics['epoch']}")

    with tempfile.TemporaryDirectory() as work:
        if restored:
            with tune.get_checkpoint().as_directory() as d:
                shutil.copytree(d, work, dirs_exist_ok=True)
        run_trial(config, table, ctx, report=report, work_dir=work, trial_id=tune.get_context().get_trial_id())


@pytest.mark.slow
def test_failing_trials_are_retried_and_reported(sweep_data, local_ray, tmp_path: Path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    table, classes = sweep_data
    p = sweep_params(tmp_path, {"train.label_smoothing": {"type": "grid", "values": [0.05, 0.1]}},
                     **{"tune.scheduler": "fifo"})
    result = run_sweep(p, table, classes, name="flaky", progress=False, trainable=flaky_trial)
    t = result.trials.set_index("train.label_smoothing")
    assert t.loc[0.05, "status"] == "TERMINATED" and t.loc[0.05, "num_failures"] == 1
    assert t.loc[0.05, "iterations"] == 2  # resumed after epoch 0, not restarted
    assert t.loc[0.1, "status"] == "ERROR" and t.loc[0.1, "num_failures"] == 2
    assert "injected failure" in t.loc[0.1, "error"]
    assert result.best is not None and result.best["overrides"]["train.label_smoothing"] == 0.05

    uri = resolve_tracking_uri(p, cluster=False)
    runs = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(uri, "tests", "flaky")}
    assert len(runs) == 2  # the retried trial continued its own run
    retried = runs[t.loc[0.05, "trial_id"]]
    assert retried.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(retried.info.run_id, "val_loss")]
    assert sorted(steps) == [0, 1]
    assert runs[t.loc[0.1, "trial_id"]].info.status == "FAILED"
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.data.tags["spatial.failed_trials"] == t.loc[0.1, "trial_id"]
    assert parent.data.metrics["n_errored"] == 1
    written = write_outputs(result, p, tmp_path / "out")
    assert "ERROR" in set(pd.read_csv(written["trials"])["status"])


class InterruptAfter(tune.Callback):
    """Sends the driver SIGUSR1 (Tune's "stop and save" signal, like Ctrl+C) once ``n`` trials have completed."""

    def __init__(self, n: int, marker: Path):
        self.n, self.marker, self.done = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done >= self.n and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep_data, local_ray, tmp_path: Path):
    table, classes = sweep_data
    space = {"train.label_smoothing": {"type": "grid", "values": [0.0, 0.02, 0.04]}}
    p = sweep_params(tmp_path, space, **{"tune.scheduler": "fifo", "tune.max_concurrent_trials": 1})
    first = run_sweep(p, table, classes, name="resumable", progress=False,
                      callbacks=[InterruptAfter(1, tmp_path / "interrupted")])
    assert first.interrupted and first.best is None
    done = set(first.trials.loc[first.trials["status"] == "TERMINATED", "trial_id"])
    assert 1 <= len(done) < 3
    uri = resolve_tracking_uri(p, cluster=False)
    assert MlflowClient(uri).get_run(first.parent_run_id).info.status == "KILLED"

    resumed_at = time.time() * 1000
    second = run_sweep(p, table, classes, name="resumable", resume=True, progress=False)
    assert not second.interrupted and set(second.trials["status"]) == {"TERMINATED"} and len(second.trials) == 3
    assert second.parent_run_id == first.parent_run_id
    runs = [r for r in trial_runs(uri, "tests", "resumable") if r.info.status == "FINISHED"]
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags[TAG_TRIAL], []).append(r)
    assert set(by_trial) == set(second.trials["trial_id"])
    for trial_id in done:  # finished before the interruption: one run, never started again
        assert len(by_trial[trial_id]) == 1 and by_trial[trial_id][0].info.start_time < resumed_at
    assert MlflowClient(uri).get_run(second.parent_run_id).info.status == "FINISHED"


def instant_trial(config: dict, table=None, ctx=None) -> None:
    """One report, no training: the trial's metric is its label smoothing, its epochs what the sweep trains."""
    tune.report({"val_balanced_accuracy": config["train.label_smoothing"], "epochs": ctx.raw["train"]["epochs"]})


def test_finished_sweep_resumed_without_its_flags_keeps_its_own_settings(sweep_data, local_ray, tmp_path: Path):
    """`--resume --name` without the flags the sweep started with: its trial count and training config, not the
    current ones (num_samples 4 would expect 8 trials and report the finished sweep as interrupted)."""
    import ray.cloudpickle
    import yaml

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    table, classes = sweep_data
    space = {"train.label_smoothing": {"type": "grid", "values": [0.0, 0.1]}}
    p = sweep_params(tmp_path, space, **{"train.epochs": 1, "tune.scheduler": "fifo"})
    first = run_sweep(p, table, classes, name="done", progress=False, trainable=instant_trial)
    assert not first.interrupted and len(first.trials) == 2

    current = sweep_params(tmp_path, space, **{"tune.num_samples": 4})  # the defaults of a plain `spatial tune`
    for record in (True, False):  # False: a sweep recorded before spatial_sweep.json (its tuner.pkl knows the count)
        if not record:
            (tmp_path / "ray" / "done" / "spatial_sweep.json").unlink()
        again = run_sweep(current, table, classes, name="done", resume=True, progress=False, trainable=instant_trial)
        assert not again.interrupted and len(again.trials) == 2 and again.best["value"] == 0.1
        paths = write_outputs(again, current, tmp_path / f"out{record}")
        assert json.loads(paths["best"].read_text())["trial_id"] == first.best["trial_id"]
        if record:  # best_params.yaml has the sweep's train.epochs, not the current one
            assert yaml.safe_load(paths["best_params"].read_text())["train"]["epochs"] == 1
    with pytest.raises(ConfigError, match=r"started with tune.num_samples=1"):
        run_sweep(current, table, classes, name="done", resume=True, num_samples=3, progress=False)


@pytest.mark.slow
def test_tune_command_promotes_the_winner_to_champion(sweep_data, tiny_manifest, tiny_ensemble, local_ray,
                                                      tmp_path: Path):
    import numpy as np
    import typer
    import yaml
    from typer.testing import CliRunner

    from serving.cli.tuning import add_commands
    from training.tracking import Tracker, log_ensemble_model, register

    space = {"train.lr": {"type": "loguniform", "low": 2e-3, "high": 5e-3}}
    p = sweep_params(tmp_path, space, **{"ensemble.members": 2})
    # a weak champion holds the alias first
    with Tracker(p, run_name="weak") as tr:
        tr.log_metrics({"test_balanced_accuracy": 0.0})
        uri = log_ensemble_model(tiny_ensemble, np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32))
        assert register(uri, tr.run_id, p.registry)["alias_moved"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))

    app = typer.Typer()
    add_commands(app)
    app.command("noop")(lambda: None)  # a second command keeps `tune` a subcommand
    res = CliRunner().invoke(app, ["tune", "--params", str(params_file), "--manifest", str(tiny_manifest),
                                   "--name", "promo", "--promote", "--model-out", str(tmp_path / "tuned"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "best trial" in res.output and "alias 'champion' moved to it" in res.output
    promoted = json.loads((tmp_path / "out" / "promote.json").read_text())
    client = MlflowClient(p.mlflow.tracking_uri)
    holder = client.get_model_version_by_alias(p.registry.model_name, "champion")
    assert int(holder.version) == promoted["version"] == 2
    run = client.get_run(promoted["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == json.loads((tmp_path / "out" / "best.json").read_text())["parent_run_id"]
    assert (tmp_path / "tuned" / "spec.json").is_file()
    import bentoml  # the promoted champion is in the BentoML model store, as `spatial register` leaves it

    stored = bentoml.models.get(promoted["bento_model"]).info.metadata
    assert stored["mlflow_version"] == 2 and stored["mlflow_run_id"] == promoted["run_id"]


# -- a 2-node Ray cluster with an MLflow tracking server ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start (exit code {proc.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the local Ray of the tests above
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_sweep_on_a_two_node_cluster_logs_to_a_tracking_server(sweep_data, mlflow_server, two_node_cluster,
                                                               tmp_path: Path):
    import ray

    table, classes = sweep_data
    space = {"train.regime": {"type": "grid", "values": ["supervised", "semisupervised"]},
             "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}
    p = sweep_params(tmp_path, space, **{"tune.num_samples": 2, "mlflow.tracking_uri": mlflow_server,
                                         "tune.storage_path": str(tmp_path / "shared")})
    result: SweepResult = run_sweep(p, table, classes, name="cluster", address=two_node_cluster.address,
                                    progress=False)
    assert not ray.is_initialized()  # run_sweep connected, so it disconnected
    assert len(result.trials) == 4 and set(result.trials["status"]) == {"TERMINATED"}
    runs = trial_runs(mlflow_server, "tests", "cluster")
    assert len(runs) == 4 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {result.parent_run_id}
    assert MlflowClient(mlflow_server).get_run(result.parent_run_id).info.status == "FINISHED"
    assert Path(result.path).is_dir() and str(result.path).startswith(str(tmp_path / "shared"))
