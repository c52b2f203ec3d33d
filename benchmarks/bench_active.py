"""Active learning round cost: seconds per round and the share spent training vs scoring the pool.

Part 1 (default profile): one campaign with the ``al`` defaults of params.yaml on the simulated screen
(``--manifest``, default ``data/raw/manifest.csv``; simulated into a temp folder when missing).

Part 2 (pool size): the same round on pools of 10^4, 10^5, 10^6 cells (``--sizes``). The pool files are written
once into ``--work`` (LC3B channel only, 64 px, lzf; up to 10^5 cells per file, 10^6 cells ~ 2-3 GB) by repeating
simulated stimulated / ATG5-KO cells; scoring reads a random ``al.pool_subsample`` of the pool each round, so
what grows with the pool is bookkeeping and the scatter of those reads, not the model work.

    .venv/bin/python benchmarks/bench_active.py [--sizes 10000,100000,1000000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from floors import Floors, add_args

from training.active.campaign import run_campaign
from training.active.oracle import ManifestOracle, make_oracle
from training.config import Params, load_params
from training.data.cellindex import build_index
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.io.formats import CellFile, write_h5sc
from training.sim.synth import synthesize

CLASSES = ["stimulated", "atg5_ko"]
FILE_CELLS = 100_000
TEST_SUFFIX = "_s3"  # the pool-size runs test on the third slide of each class


def shares(curve: pd.DataFrame) -> dict:
    rounds = curve[curve["round"] < curve["round"].max()]  # rounds that also scored the pool
    total = rounds[["seconds_train", "seconds_score", "seconds_eval"]].sum(axis=1)
    return {
        "rounds": int(len(curve)),
        "seconds_per_round": float(total.mean()),
        "seconds_train": float(rounds["seconds_train"].mean()),
        "seconds_score": float(rounds["seconds_score"].mean()),
        "seconds_eval": float(rounds["seconds_eval"].mean()),
        "share_train": float(rounds["seconds_train"].sum() / total.sum()),
        "share_score": float(rounds["seconds_score"].sum() / total.sum()),
    }


def default_profile(params: Params, manifest: Path, strategy: str) -> dict:
    table, summary = make_splits(build_index(manifest, progress=False), params.split)
    data = prepare_data(table, summary["classes"], params)
    oracle = make_oracle(params.al.oracle, data.classes, build_index(manifest, progress=False),
                         params.al.state_classes, manifest, params.al.labels_csv)
    t = time.perf_counter()
    curve = run_campaign(params, data, strategy, 0, oracle, progress=False)
    out = {"strategy": strategy, "pool": int(data.cells["split"].isin(params.al.pool).sum()),
           "seconds_campaign": time.perf_counter() - t, **shares(curve)}
    out["final_balanced_accuracy"] = float(curve["balanced_accuracy"].iloc[-1])
    return out


def base_cells(manifest: Path) -> dict[str, np.ndarray]:
    """LC3B crops of the simulated slides of each class except the test slides (``*_s3``), which the big pools
    repeat."""
    index = build_index(manifest, progress=False)
    out = {}
    for cls in CLASSES:
        parts = []
        files = index.loc[(index["label"] == cls) & ~index["group"].astype(str).str.endswith(TEST_SUFFIX), "source_file"]
        for f in files.astype(str).unique():
            with CellFile(f) as cf:
                parts.append(cf.read(0, cf.n_cells, cf.resolve_channels(["LC3B"])).astype(np.float16))
        out[cls] = np.concatenate(parts)
    return out


def write_pool(work: Path, n: int, base: dict[str, np.ndarray]) -> pd.DataFrame:
    """Pool files of ``n`` cells (half per class, <= 100k cells per file); returns their cell table."""
    rows, start = [], 0
    per_class = n // 2
    for cls in CLASSES:
        imgs = base[cls]
        for k, lo in enumerate(range(0, per_class, FILE_CELLS)):
            m = min(FILE_CELLS, per_class - lo)
            path = work / f"pool_{n}_{cls}_{k}.h5sc"
            ids = np.arange(start, start + m, dtype=np.int64) + 1
            start += m
            if not path.is_file():
                reps = np.resize(np.arange(len(imgs)), m)
                write_h5sc(path, imgs[reps], ids, channel_names=["LC3B"], channel_kinds=["image_channel"],
                           compression="lzf")
            rows.append(pd.DataFrame({"source_file": str(path), "row": np.arange(m), "cell_id": ids, "label": cls,
                                      "group": path.stem}))
    return pd.concat(rows, ignore_index=True)


def pool_size(params: Params, manifest: Path, work: Path, n: int, base: dict[str, np.ndarray], strategy: str) -> dict:
    t = time.perf_counter()
    pool = write_pool(work, n, base)
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(manifest, progress=False)
    test = index[index["label"].isin(CLASSES) & index["group"].astype(str).str.endswith(TEST_SUFFIX)]
    cells = pd.concat([pool.assign(split="train"), test.assign(split="test")], ignore_index=True)
    cells["label"] = cells["label"].astype("string")
    data = prepare_data(cells, CLASSES, params)
    oracle = ManifestOracle(cells, CLASSES)
    t_setup = time.perf_counter() - t
    t = time.perf_counter()
    curve = run_campaign(params, data, strategy, 0, oracle, progress=False)
    return {"pool": n, "strategy": strategy, "seconds_write_files": t_write, "seconds_setup": t_setup,
            "seconds_campaign": time.perf_counter() - t, **shares(curve)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", type=Path, default=Path("data/raw/manifest.csv"))
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--strategy", default="margin")
    ap.add_argument("--rounds", type=int, default=2, help="acquisition rounds in the pool-size runs")
    ap.add_argument("--work", type=Path, default=None, help="folder for the pool files (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params if Path(args.params).is_file() else None, args.sets)
    tmp = Path(tempfile.mkdtemp(prefix="bench_active_"))
    work = args.work or tmp
    work.mkdir(parents=True, exist_ok=True)
    manifest = args.manifest
    try:
        if not manifest.is_file():
            print(f"{manifest} missing: simulating the default screen into {tmp}")
            manifest = synthesize(params.synth, tmp / "raw", progress=False)
        floors = Floors(args)
        results: dict = {"params": {k: v for k, v in params.al.model_dump().items() if k != "state_classes"},
                         "torch_threads": args.threads}
        if not args.skip_default:
            results["default_profile"] = default_profile(params, manifest, args.strategy)
            print(json.dumps(results["default_profile"], indent=1))
        sizes = [int(float(s)) for s in args.sizes.split(",") if s]
        if sizes:
            base = base_cells(manifest)
            p = params.model_copy(update={"al": params.al.model_copy(update={"rounds": args.rounds,
                                                                             "full_data": False})})
            results["pool_size"] = []
            for n in sizes:
                r = pool_size(p, manifest, work, n, base, args.strategy)
                results["pool_size"].append(r)
                print(json.dumps(r, indent=1))
            if len(sizes) > 1:  # a round scores a fixed subsample: the pool size may cost bookkeeping, not model work
                small, large = results["pool_size"][0], results["pool_size"][-1]
                floors.ratio(f"round speed, pool {large['pool']:,} / pool {small['pool']:,}",
                             small["seconds_per_round"] / large["seconds_per_round"], 0.5)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floors.finish()


if __name__ == "__main__":
    main()
