"""MLflow: where runs go, the run layout of an ensemble, the one logged model and the registry alias.

Tracking URI: ``mlflow.tracking_uri`` in params, else ``$MLFLOW_TRACKING_URI``, else a sqlite file ``mlflow.db``
at the repository root as an absolute path. Inside ``dvc exp run --temp`` (which works in a copy under
``.dvc/tmp/exps/``) the root is the original repository's, so runs are not lost with the copy.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.config import MlflowConfig, Params, RegistryConfig
from training.errors import ConfigError, ModelError

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def repo_root(start: Path | None = None) -> Path:
    """The repository root: the folder holding ``.dvc`` or ``.git`` (outside any DVC temp experiment copy)."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:  # .../repo/.dvc/tmp/exps/<tmp>/... -> .../repo
        here = Path(*parts[: parts.index(".dvc")])
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir() or (d / ".git").exists():
            return d
    return here


def tracking_uri(cfg: MlflowConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


@functools.lru_cache(maxsize=8)
def check_server(uri: str, timeout: float = 5.0) -> None:
    """Refuse a tracking server that does not answer, in seconds: MLflow's client retries for minutes first, silently.
    Any HTTP answer counts (a server behind authentication may refuse ``/health``); only no answer is an error."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except OSError as exc:  # URLError, a refused connection, a timeout
        raise ConfigError(f"MLflow tracking server {uri} does not answer ({getattr(exc, 'reason', exc)}); start it "
                          "(`mlflow server`, README: MLflow) or set mlflow.tracking_uri or $MLFLOW_TRACKING_URI to one "
                          "that runs") from None


# The MLflow 3 UI opens an experiment by its kind: untagged experiments with no runs yet are shown in the GenAI
# view (traces, token usage). This tag (read by mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT) makes the
# runs table the first thing a user sees.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns/<name>`` beside the database, not
    MLflow's default ``./mlruns`` of whatever folder the process runs in (a benchmark's temporary store would put its
    artifacts into the checkout, mixed with the pipeline's). ``None`` (the store decides) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / name).as_uri()


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name`` (created if missing, its artifacts placed by :func:`artifact_location`), tagged
    as model training (:data:`EXPERIMENT_KIND`)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name, artifact_location(client.tracking_uri, name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another process (parallel trials)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def configure(cfg: MlflowConfig) -> str:
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(MlflowClient(uri), cfg.experiment))
    return uri


def log_params(params: Params) -> None:
    """The full resolved config: flat dotted params plus ``params.yaml`` as an artifact."""
    import mlflow
    import yaml

    flat = {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in params.flat().items()}
    mlflow.log_params(flat)
    mlflow.log_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), "params.yaml")


class MemberRun:
    """A nested run for one ensemble member; ``log_metrics`` is what the engine calls per epoch."""

    def __init__(self, name: str, parent_id: str):
        import mlflow

        self._run = mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)}, step=step)

    def close(self) -> None:
        import mlflow

        mlflow.end_run()


class Tracker:
    """A parent run (one per ensemble, AL campaign or sweep) with nested children."""

    def __init__(self, params: Params, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        import mlflow

        configure(params.mlflow)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
        self.run_id = self.run.info.run_id
        if run_id is None:
            log_params(params)

    def member(self, k: int, prefix: str = "member") -> MemberRun:
        return MemberRun(f"{prefix}-{k}", self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and np.isfinite(v)},
                           step=step)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        p = Path(path)
        (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.end_run(status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


# -- the logged model ---------------------------------------------------------------------------------
def model_requirements() -> list[str]:
    """Pinned requirements of the logged model: the packages scoring imports, at the installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "torchvision", "timm", "numpy", "pandas", "scipy", "scikit-learn", "h5py", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def log_ensemble_model(ensemble_dir: str | Path, example: np.ndarray) -> str:
    """Log the ensemble directory as one pyfunc model in the active run; returns its model URI."""
    import mlflow
    from mlflow.models import infer_signature

    from training.uncertainty.ensemble import Ensemble

    ens = Ensemble.load(ensemble_dir)
    if len(example) < 2:
        raise ModelError("the input example needs a batch of at least 2 cells")
    output = ens.to_frame(ens.predict_images(example))
    info = mlflow.pyfunc.log_model(
        name="ensemble",
        python_model=str(Path(__file__).with_name("mlflow_model.py")),  # models from code: nothing pickled
        artifacts={"ensemble": str(ensemble_dir)},
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=model_requirements(),  # explicit: inferring them costs ~40 s of subprocess imports
        code_paths=[str(Path(__file__).parent)],  # the `training` package travels with the model
    )
    return info.model_uri


def register(model_uri: str, run_id: str, cfg: RegistryConfig,
             package: Callable[[RegistryConfig, int, str], str] | None = None) -> dict[str, Any]:
    """Register ``model_uri``; move ``cfg.alias`` to the new version if its run's ``cfg.metric`` beats the holder's.
    ``package(cfg, version, run_id)`` (the CLI passes ``serving.bento.package.package_version``) then saves the new
    champion into the BentoML model store when ``registry.package`` is on."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    mv = mlflow.register_model(model_uri, cfg.model_name)
    new_value = client.get_run(run_id).data.metrics.get(cfg.metric)
    current = None
    try:
        holder = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
        current = client.get_run(holder.run_id).data.metrics.get(cfg.metric) if holder.run_id else None
    except MlflowException:
        holder = None
    better = (
        holder is None
        or current is None
        or (new_value is not None and (new_value > current if cfg.greater_is_better else new_value < current))
    )
    if better:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, mv.version)
    packaged = package(cfg, int(mv.version), run_id) if better and cfg.package and package else None
    return {
        "model_name": cfg.model_name,
        "version": int(mv.version),
        "alias": cfg.alias,
        "alias_moved": bool(better),
        "alias_version": int(mv.version) if better else int(holder.version),
        "metric": cfg.metric,
        "value": new_value,
        "previous_value": current,
        "bento_model": packaged,
    }


ENV_MODEL = "SPATIAL_MODEL"


def default_model_uri(registry: RegistryConfig | None = None) -> str:
    """``$SPATIAL_MODEL``, else ``models:/<registry.model_name>@<registry.alias>`` (the registry params)."""
    r = registry or RegistryConfig()
    return os.environ.get(ENV_MODEL) or f"models:/{r.model_name}@{r.alias}"
def resolve_model(uri: str | os.PathLike, mlflow_cfg: MlflowConfig | None = None,
                  cache_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """A local ensemble directory for ``uri`` (a directory, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``)
    and what is known about it (name, version, alias)."""
    s = os.fspath(uri)
    if not s.startswith("models:/"):
        p = Path(s)
        if not (p / "spec.json").is_file():
            raise ModelError(f"{p}: not an ensemble directory (expected spec.json) and not a models:/ URI")
        return p, {"name": p.name, "version": None, "alias": None, "uri": s}
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(mlflow_cfg or MlflowConfig())
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    ref = s[len("models:/") :]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            alias = None
            mv = client.get_model_version(name, version)
        dst = Path(cache_dir or tempfile.mkdtemp(prefix="spatial-model-"))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst)))
    except MlflowException as exc:
        hint = ("; `spatial register` registers one (`dvc repro register`, a stage of `make run`)"
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else "")
        raise ModelError(f"model URI '{s}' does not resolve in {mlflow.get_tracking_uri()}: {exc.message}{hint}"
                         ) from None
    found = next((p.parent for p in local.rglob("spec.json")), None)
    if found is None:
        raise ModelError(f"model URI '{s}' holds no spatiAL ensemble")
    return found, {"name": name, "version": int(mv.version), "alias": alias, "uri": s, "run_id": mv.run_id}
