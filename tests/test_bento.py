"""Issue 15: the champion packaged as a self-contained Bento. A tiny ensemble is registered (which saves it into the
BentoML model store of the session's temporary ``BENTOML_HOME``), ``spatial package`` builds the Bento, and the built
Bento is served by ``bentoml serve`` with ``MLFLOW_TRACKING_URI`` pointing nowhere and no ``models/`` folder:
it answers with the probabilities of ``spatial score``. A second champion makes a new model version and a new Bento
tag, and the first Bento still serves the first model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from training.config import RegistryConfig
from training.io.formats import CellFile

NAME = "bento-test"
NOWHERE = "http://127.0.0.1:9"  # nothing listens there: a Bento that needs the registry cannot start


def register_model(ensemble: Path, db: str, accuracy: float) -> dict:
    """Log ``ensemble`` in a run with ``test_balanced_accuracy``, register it (the alias moves when it is better)."""
    from conftest import tiny_params

    from serving.bento.package import package_version
    from training.tracking import Tracker, log_ensemble_model, register
    from training.uncertainty.ensemble import Ensemble

    p = tiny_params(Path(db).parent, **{"mlflow.tracking_uri": f"sqlite:///{db}", "mlflow.experiment": "bento"})
    s = Ensemble.load(ensemble).spec.image_size
    example = np.random.default_rng(0).random((2, 1, s, s), dtype=np.float32)
    with Tracker(p, run_name="register") as tr:
        tr.log_metrics({"test_balanced_accuracy": accuracy})
        uri = log_ensemble_model(ensemble, example)
        return register(uri, tr.run_id, RegistryConfig(model_name=NAME, package=True), package_version)


def spatial_package(db: str, out: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "package", "--set", f"registry.model_name={NAME}",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


class BentoServer:
    """``bentoml serve <bento tag>`` in an empty directory, the registry unreachable."""

    def __init__(self, tag: str, workdir: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": NOWHERE, "BENTOML_DO_NOT_TRACK": "True"}
        for key in ("SPATIAL_MODEL", "SPATIAL_MODEL_DIR", "SPATIAL_SERVE_CONFIG", "SPATIAL_PARAMS"):
            env.pop(key, None)
        self.log = workdir / "serve.log"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", tag, "--port", str(self.port),
                                          "--host", "127.0.0.1"], cwd=workdir, env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

    def wait(self, timeout: float = 300) -> float:
        t, deadline = time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"bentoml serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return time.monotonic() - t
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"Bento not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def served_probabilities(tag: str, workdir: Path, images: np.ndarray, ids: np.ndarray) -> tuple[pd.DataFrame, dict]:
    server = BentoServer(tag, workdir)
    try:
        server.wait()
        r = server.client.post("/score", json={"images": images.tolist(), "cell_ids": ids.tolist()})
        assert r.status_code == 200, r.text
        meta = server.client.get("/metadata").json()
    finally:
        server.stop()
    cells = r.json()["cells"]
    df = pd.DataFrame([{"cell_id": c["cell_id"], **{f"prob_{k}": v for k, v in c["probabilities"].items()}}
                       for c in cells]).set_index("cell_id")
    return df, meta


def batch_probabilities(model: Path, screen: Path, out: Path) -> pd.DataFrame:
    from serving.batch.scoring import score_files

    df = pd.read_parquet(score_files([screen], model, out, progress=False)["out"]).set_index("cell_id")
    return df[[c for c in df.columns if c.startswith("prob_")]]


def test_package_refuses_a_bentoml_home_inside_the_project_before_saving_anything(tiny_ensemble):
    """A store inside the build context made the build copy itself until a path was too long, and broke later builds."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    from serving.bento.build import check_store_outside
    from serving.bento.package import package
    from training.errors import ConfigError

    home = Path(BentoMLContainer.bentoml_home.get()).resolve()

    def store() -> list[str]:
        return sorted(str(p) for p in (home / "models").rglob("*"))

    before = store()
    with pytest.raises(ConfigError, match=f"the BentoML home {home} is inside the project folder {home.parent},"):
        package(str(tiny_ensemble), repo=home.parent)
    assert store() == before
    check_store_outside(tiny_ensemble)  # a project folder elsewhere is fine


@pytest.mark.slow
def test_a_packaged_bento_serves_its_own_model_without_the_registry(tiny_ensemble, tiny_manifest, tmp_path,
                                                                     one_thread):
    import bentoml

    screen = tiny_manifest.parent / "screen_s0.h5sc"
    with CellFile(screen) as f:
        images, ids = f.read(0, 40, f.resolve_channels(["LC3B"])), f.cell_ids()[:40]
    first = tmp_path / "first"
    shutil.copytree(tiny_ensemble, first)
    second = tmp_path / "second"  # another model: the same members, other temperatures (other probabilities)
    shutil.copytree(tiny_ensemble, second)
    spec = json.loads((second / "spec.json").read_text())
    spec["temperatures"] = [t * 3 for t in spec["temperatures"]]
    (second / "spec.json").write_text(json.dumps(spec))
    db = str(tmp_path / "mlflow.db")

    # register -> the champion is in the model store with what a deployer needs
    reg1 = register_model(first, db, accuracy=0.6)
    assert reg1["alias_moved"] and reg1["bento_model"].startswith(f"{NAME}:v1-")
    entry = bentoml.models.get(reg1["bento_model"])
    meta = entry.info.metadata
    assert meta["mlflow_model_name"] == NAME and meta["mlflow_version"] == 1
    assert meta["mlflow_run_id"] and meta["metrics"]["test_balanced_accuracy"] == pytest.approx(0.6)
    assert meta["classes"] == ["bright", "spotty"] and meta["channels"] == ["LC3B"] and meta["image_size"] == 32
    assert (Path(entry.path) / "spec.json").is_file()

    # spatial package finds the store as register left it, and builds the Bento that carries the model
    pkg1 = spatial_package(db, tmp_path / "package1.json")
    assert pkg1["model"] == reg1["bento_model"] and pkg1["model_created"] is False
    bento1 = bentoml.bentos.get(pkg1["bento"])
    assert [str(m.tag) for m in bento1.info.models] == [pkg1["model"]]
    reqs = (Path(bento1.path) / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in reqs and "bentoml==1.4.39" in reqs and ">=" not in reqs

    # a better model takes the alias: a new store version and a new Bento tag
    reg2 = register_model(second, db, accuracy=0.9)
    assert reg2["alias_moved"] and reg2["bento_model"].startswith(f"{NAME}:v2-")
    pkg2 = spatial_package(db, tmp_path / "package2.json")
    assert pkg2["model"] == reg2["bento_model"] and pkg2["bento"] != pkg1["bento"]

    # each Bento serves its own model, the registry unreachable, no models/ folder: the numbers of spatial score
    for pkg, model, version, reg in ((pkg2, second, 2, reg2), (pkg1, first, 1, reg1)):
        http, served = served_probabilities(pkg["bento"], tmp_path / f"serve{version}", images, ids)
        want = batch_probabilities(model, screen, tmp_path / f"scores{version}.parquet").loc[ids.tolist()]
        np.testing.assert_allclose(http.to_numpy(), want[http.columns].to_numpy(), atol=1e-5, rtol=0)
        assert served["model"]["name"] == NAME and served["model"]["version"] == version
        assert served["model"]["run_id"] == bentoml.models.get(reg["bento_model"]).info.metadata["mlflow_run_id"]
        assert served["model"]["source"] == "bento"
