"""Data-layer figures: cell-index build time and loader throughput against raw h5py and the thesis pattern.

    python benchmarks/bench_data.py [--cells 8000] [--index-files 40] [--index-cells 100000]

1. Index build for a manifest of 40 files x 100,000 cells whose pixel datasets are allocated but never written
   (the index reads only the id datasets). Target: under 10 s.
2. Loader on one gzip, (1,1,H,W)-chunked 128x128 5-channel file, reading the LC3B channel:
   - raw h5py contiguous slices of that channel (the ceiling);
   - spatiAL's CellLoader with 0 / 1 / 2 worker processes (target: 1 worker >= 0.8x raw);
   - the thesis pattern measured in the same run: one ``ds[i]`` per cell (all channels) appended to Python lists.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from floors import Floors, add_args

from training.data.cellindex import build_index
from training.data.loader import CellLoader, Preprocess
from training.io.formats import write_h5sc


def bench_index(root: Path, n_files: int, n_cells: int) -> float:
    rows = []
    for i in range(n_files):
        path = root / f"slide_{i:02d}.h5sc"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("obsm/single_cell_images", shape=(n_cells, 5, 128, 128), dtype="f2",
                              chunks=(1, 1, 128, 128), compression="gzip")
            h5.create_dataset("obs/scportrait_cell_id", data=np.arange(n_cells, dtype=np.int64) * 3 + i)
        rows.append({"path": path.name, "label": "" if i % 4 else "stimulated", "group": f"slide_{i}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    t = time.perf_counter()
    idx = build_index(root / "manifest.csv", progress=False)
    dt = time.perf_counter() - t
    assert len(idx) == n_files * n_cells
    return dt


def smooth_cells(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Cell-like images (blobs + noise) so gzip sees realistic, not random, data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, 5, size, size), np.float16)
    for s in range(0, n, 256):
        k = min(256, n - s)
        cx, cy = rng.uniform(0.4, 0.6, (2, k, 1, 1))
        r = np.hypot(yy - cy, xx - cx)
        cell = (r < 0.35).astype(np.float32)
        for c in range(5):
            out[s : s + k, c] = np.clip(cell * rng.uniform(0.2, 0.8, (k, 1, 1)) + rng.normal(0, 0.02, (k, size, size)),
                                        0, 1)
    return out


def rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=8000)
    ap.add_argument("--index-files", type=int, default=40)
    ap.add_argument("--index-cells", type=int, default=100_000)
    add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "idx").mkdir()
        dt = bench_index(root / "idx", args.index_files, args.index_cells)
        print(f"index build: {args.index_files} files x {args.index_cells:,} cells in {dt:.2f} s "
              f"({args.index_files * args.index_cells / dt:,.0f} cells/s; target < 10 s)")

        n = args.cells
        path = root / "slide.h5sc"
        write_h5sc(path, smooth_cells(n, 128), np.arange(n) * 2 + 1)
        print(f"loader file: {n:,} cells, 5x128x128 float16, gzip, chunks (1,1,128,128), {path.stat().st_size / 2**20:.0f} MiB")

        def raw():
            with h5py.File(path) as h5:
                ds = h5["obsm/single_cell_images"]
                for s in range(0, n, 256):
                    ds[s : s + 256, 4]

        def thesis():
            data, labels = [], []
            with h5py.File(path) as h5:
                ds = h5["obsm/single_cell_images"]
                for i in range(n):
                    data.append(torch.from_numpy(ds[i].astype(np.float32))[4:5])
                    labels.append(0)

        table = pd.DataFrame({"source_file": str(path), "row": np.arange(n), "cell_id": np.arange(n) * 2 + 1})

        def loader(workers: int):
            def run():
                for _ in CellLoader(table, Preprocess(("LC3B",)), batch_size=256, shuffle=True, num_workers=workers):
                    pass
            return run

        floors = Floors(args)
        r_raw = rate(n, raw)
        r_thesis = rate(n, thesis)
        print(f"raw h5py contiguous LC3B reads: {r_raw:,.0f} cells/s (ceiling)")
        print(f"thesis pattern (ds[i] per cell + Python lists): {r_thesis:,.0f} cells/s")
        for workers in (0, 1, 2):
            r = rate(n, loader(workers))
            print(f"CellLoader shuffled, {workers} worker(s): {r:,.0f} cells/s = {r / r_raw:.2f}x raw, "
                  f"{r / r_thesis:.1f}x thesis pattern")
            if workers == 0:
                floors.ratio("loader (0 workers) / raw h5py", r / r_raw, 0.6)
                floors.ratio("loader (0 workers) / thesis pattern", r / r_thesis, 3.0)
            if workers == 2:
                floors.ratio("loader (2 workers) / raw h5py", r / r_raw, 1.2, two_core=False)
        print(f"(cores: {os.cpu_count()})")
    floors.finish()


if __name__ == "__main__":
    main()
