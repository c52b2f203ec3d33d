"""The packaged Bento: build time and size, and its cold start to ``/readyz`` against the registry-resolving start
measured in the same run.

Setup (reused from ``--workdir``): the ``bench_scoring.py`` model (simulated data, default model config, 64x64,
3 members), logged and registered as ``models:/bench-phenotype@champion`` in a sqlite MLflow store in the workdir
(which also saves it into the BentoML model store of a temporary ``BENTOML_HOME``), then ``spatial package``'s
library call builds the Bento. Then, alternating, ``--repeats`` times each:

* registry start (what a Bento without a model does): ``bentoml serve serving.service.api:SpatialScorer`` from the
  repository with ``SPATIAL_MODEL=models:/bench-phenotype@champion`` and the sqlite tracking URI;
* Bento start: ``bentoml serve <bento tag>`` in an empty directory, ``MLFLOW_TRACKING_URI`` pointing nowhere.

Prints the medians and the ratio registry / Bento. ``--check`` exits 1 unless the Bento starts at most 1.1x as
slowly as the registry start (ratio >= 0.9); it needs ``--repeats`` of 3 or more, since one start is too noisy::

    .venv/bin/python benchmarks/bench_bento.py [--repeats 3] [--workdir DIR] [--check]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NAME = "bench-phenotype"
NOWHERE = "http://127.0.0.1:9"


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(cmd: list[str], cwd: Path, env: dict[str, str], logfile: Path, timeout: float = 600) -> float:
    """Seconds from process start to the first 200 from ``/readyz``; the server is stopped afterwards."""
    import httpx

    port = free_port()
    with open(logfile, "w") as fh:
        t = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--port", str(port), "--host", "127.0.0.1"], cwd=cwd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.perf_counter() - t < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {logfile}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        return time.perf_counter() - t
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            raise RuntimeError(f"not ready after {timeout}s; see {logfile}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="keep data / model here (default: a temp dir)")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check and args.repeats < 3:  # one cold start swings by more than the check's 10 % margin
        ap.error("--check needs --repeats 3 or more: a single cold start varies by more than the 10 % margin")

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-bento-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml is imported
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_scoring import train_model, write_training_data

    from serving.bento.package import package, package_version
    from training.config import resolve
    from training.tracking import Tracker, log_ensemble_model, register

    log(f"workdir {work}; cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    manifest = work / "data" / "manifest.csv"
    if not manifest.is_file():
        manifest = write_training_data(work / "data", "synth")
    model_dir = work / "model"
    if not (model_dir / "spec.json").is_file():
        train_model(manifest, model_dir)
    db = f"sqlite:///{work / 'mlflow.db'}"
    p = resolve({}, {"mlflow.tracking_uri": db, "mlflow.experiment": "bench", "registry.model_name": NAME})
    with Tracker(p, run_name="register") as tr:
        tr.log_metrics({"test_balanced_accuracy": 1.0})
        uri = log_ensemble_model(model_dir, np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32))
        reg = register(uri, tr.run_id, p.registry, package_version)
    log(f"registered {NAME} version {reg['version']}; model store entry {reg['bento_model']}")
    built = package(f"models:/{NAME}@champion", p.mlflow, repo=ROOT)
    log(f"Bento {built['bento']}: build {built['build_s']:.1f}s, size {built['bytes'] / 2**20:.1f} MB "
        f"({built['requirements']} pinned requirements)")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPATIAL_", "MLFLOW_"))}
    registry_env = {**env, "SPATIAL_MODEL": f"models:/{NAME}@champion", "MLFLOW_TRACKING_URI": db,
                    "PYTHONPATH": str(ROOT)}
    bento_env = {**env, "MLFLOW_TRACKING_URI": NOWHERE}
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    bentoml = [sys.executable, "-m", "bentoml", "serve"]
    starts: dict[str, list[float]] = {"registry": [], "bento": []}
    for i in range(args.repeats):
        starts["registry"].append(cold_start([*bentoml, "serving.service.api:SpatialScorer"], ROOT, registry_env,
                                             work / f"registry{i}.log"))
        starts["bento"].append(cold_start([*bentoml, built["bento"]], empty, bento_env, work / f"bento{i}.log"))
        log(f"round {i + 1}: registry start {starts['registry'][-1]:.1f}s, Bento start {starts['bento'][-1]:.1f}s")
    reg_s, bento_s = statistics.median(starts["registry"]), statistics.median(starts["bento"])
    ratio = reg_s / bento_s
    log(f"cold start to /readyz (median of {args.repeats}): registry-resolving {reg_s:.1f}s, packaged Bento "
        f"{bento_s:.1f}s -> registry / Bento = {ratio:.2f}x (target >= 0.9)")
    log(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.check and ratio < 0.9:
        log("check: the Bento starts more slowly than the registry-resolving service")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
