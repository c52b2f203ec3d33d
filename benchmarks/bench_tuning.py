"""Ray Tune sweep throughput: trials per hour for the default profile (params.yaml) on CPU, and on a GPU machine
with 1, 0.5 and 0.25 GPU per trial.

Every trial runs its full budget (FIFO scheduler: ASHA would stop trials early and inflate the rate), with the
default ``tune.space``; MLflow goes to a sqlite file and Tune results to a temporary directory. Ray is started
once before the clock starts; its start-up time is reported apart::

    .venv/bin/python benchmarks/bench_tuning.py [--params params.yaml] [--manifest data/raw/manifest.csv]
        [--num-samples 4] [--cpus-per-trial 1] [--gpus-per-trial 1,0.5,0.25] [--set key=value ...] [--json out]

Without ``--manifest`` the default profile's data are used (``index.manifest``; ``spatial synth`` writes them),
or a small simulated screen is written to a temporary directory when they are missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from floors import Floors, add_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, flush=True)


def manifest_for(p, given: str | None, tmp: Path) -> Path:
    if given:
        return Path(given)
    default = ROOT / p.index.manifest
    if default.is_file():
        return default
    from training.sim.synth import synthesize

    log(f"{default} not found: writing a small simulated screen to {tmp}")
    cfg = p.synth.model_copy(update={"cells_per_class": 400, "screen_slides": 1, "cells_per_screen_slide": 1000,
                                     "cells_per_timepoint": 20})
    return synthesize(cfg, tmp / "raw", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--gpus-per-trial", default="1,0.5,0.25", help="GPU settings to run when CUDA is available")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="params override key=value")
    ap.add_argument("--json", default=None, help="write the figures here")
    add_args(ap)
    args = ap.parse_args()

    import pandas as pd
    import ray
    import torch
    from mlflow import MlflowClient

    from training.config import load_params, resolve
    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from tuning.sweep import resolve_tracking_uri, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench-tuning-"))
    p = load_params(args.params if Path(args.params).is_file() else None, args.overrides)
    p = resolve(p.model_dump(mode="json"), {
        "tune.scheduler": "fifo", "tune.search": "random", "tune.num_samples": args.num_samples,
        "tune.storage_path": str(tmp / "ray"), "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "mlflow.experiment": "bench"})
    manifest = manifest_for(p, args.manifest, tmp)
    table, summary = make_splits(build_index(manifest, progress=False), p.split)
    classes = summary.get("classes") or p.split.classes
    counts = table["split"].value_counts().to_dict()
    log(f"data: {manifest} ({counts}); model {p.model.name} dims {p.model.dims} at {p.data.image_size}px, "
        f"{p.train.epochs} epochs; space {list(p.tune.space)}")

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    resources = ray.cluster_resources()
    log(f"ray start {ray_start:.1f} s; cluster {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")
    settings = [("cpu", args.cpus_per_trial, 0.0)]
    if torch.cuda.is_available() and resources.get("GPU", 0) > 0:
        settings += [(f"gpu{g}", args.cpus_per_trial, float(g)) for g in args.gpus_per_trial.split(",")]
    uri = resolve_tracking_uri(p, cluster=False)
    rows = []
    floors = Floors(args)
    try:
        for name, cpus, gpus in settings:
            t = time.perf_counter()
            res = run_sweep(p, table, classes, name=f"bench-{name}", cpus_per_trial=cpus, gpus_per_trial=gpus,
                            progress=False)
            wall = time.perf_counter() - t
            client = MlflowClient(uri)
            secs = [client.get_run(r).data.metrics.get("trial_seconds") for r in res.trials["mlflow_run_id"] if r]
            secs = [s for s in secs if s is not None]
            done = int((res.trials["status"] == "TERMINATED").sum())
            slots = resources.get("CPU", 0) // cpus
            if gpus:
                slots = min(slots, resources.get("GPU", 0) // gpus)
            row = {"setting": name, "cpus_per_trial": cpus, "gpus_per_trial": gpus, "trials": done,
                   "concurrent": int(min(slots, len(res.trials))), "wall_s": round(wall, 1),
                   "trials_per_hour": round(done / wall * 3600, 1),
                   "mean_trial_s": round(sum(secs) / len(secs), 1) if secs else None,
                   "best": round(res.best["value"], 4) if res.best else None}
            rows.append(row)
            log(json.dumps(row))
            # Tune's overhead: trial seconds over wall seconds x concurrent slots (1 = no time lost to scheduling)
            if secs and row["concurrent"]:
                floors.ratio(f"parallel efficiency, {name}", sum(secs) / (wall * row["concurrent"]), 0.5)
    finally:
        ray.shutdown()
    log("\n" + pd.DataFrame(rows).to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps({"ray_start_s": ray_start, "runs": rows, "device":
                                               torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                               "cpus": resources.get("CPU", 0)}, indent=2))
    floors.finish()


if __name__ == "__main__":
    main()
