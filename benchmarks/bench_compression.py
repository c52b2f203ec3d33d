"""gzip against lzf for the simulator's files: are the bytes repeatable, and what does each cost?

    python benchmarks/bench_compression.py [--cells-per-class 200] [--repeats 10] [--out reports/compression.json]
                                           [--check]

Runs ``spatial synth`` ``--repeats`` times with the same seed for each codec, with one and two worker threads in
turn (the synth promises the same output for any number; the pipeline uses two), a small screen of the default look
(64x64, 5 channels, SPARCSpy and scPortrait files alternating). Prints per codec:

- how many of the output trees were byte-identical to the first (by MD5 of every file);
- how many files differed at least once, and whether their pixels were still equal, bit for bit;
- the size, the time of a synth run, and the time to read every cell one at a time;
- the ratio gzip / lzf of the reads.

Floors: gzip's runs must all be byte-identical, and its reads at least 0.5x lzf's throughput. lzf's repeats are
printed, not checked: h5py's LZF compressor leaves its hash table uninitialised (liblzf's ``INIT_HTAB 0``), so a
chunk's bytes can depend on what the thread compressed before it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from floors import Floors, add_args

from serving.cli.options import write_json
from training.config import SynthConfig
from training.evaluation.study_summary import machine
from training.io.formats import CellFile
from training.sim.synth import synthesize


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_cells_per_s(manifest: Path) -> float:
    """Every cell of every file, one ``read`` per cell."""
    n, t = 0, time.perf_counter()
    for rel in pd.read_csv(manifest)["path"]:
        with CellFile(manifest.parent / rel) as f:
            for i in range(f.n_cells):
                f.read(i, i + 1)
            n += f.n_cells
    return n / (time.perf_counter() - t)


def same_pixels(a: Path, b: Path) -> bool:
    with CellFile(a) as fa, CellFile(b) as fb:
        return bool(np.array_equal(fa.read(0, fa.n_cells).view(np.uint16), fb.read(0, fb.n_cells).view(np.uint16)))


def measure(codec: str, cfg: SynthConfig, root: Path, repeats: int) -> dict[str, float | int]:
    runs, seconds = [], []
    for k in range(repeats):
        t = time.perf_counter()
        run = cfg.model_copy(update={"compression": codec, "workers": 1 + k % 2})
        manifest = synthesize(run, root / f"{codec}_{k}", progress=False)
        seconds.append(time.perf_counter() - t)
        runs.append(digests(manifest.parent))
    first = runs[0]
    images = [p for p in first if p.endswith((".h5", ".h5sc"))]
    differ = [(k, p) for k, r in enumerate(runs) for p in first if r[p] != first[p]]
    return {
        "runs_identical_to_first": sum(r == first for r in runs),
        "files_differing_once": len({p for _, p in differ}),
        "differing_files_same_pixels": all(same_pixels(root / f"{codec}_0" / p, root / f"{codec}_{k}" / p)
                                           for k, p in differ),
        "image_files": len(images),
        "bytes": sum((root / f"{codec}_0" / p).stat().st_size for p in images),
        "synth_s": round(sum(seconds) / repeats, 2),
        "read_cells_per_s": round(read_cells_per_s(root / f"{codec}_0" / "manifest.csv"), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells-per-class", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    add_args(ap)
    a = ap.parse_args()
    floors = Floors(a)
    cfg = SynthConfig(cells_per_class=a.cells_per_class, cells_per_timepoint=a.cells_per_class // 4,
                      cells_per_screen_slide=a.cells_per_class * 2, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        res = {codec: measure(codec, cfg, Path(tmp), a.repeats) for codec in ("gzip", "lzf")}
    for codec, r in res.items():
        print(f"{codec:4s}  {r['runs_identical_to_first']} of {a.repeats} runs byte-identical to the first, "
              f"{r['files_differing_once']} file(s) differed at least once (pixels equal: "
              f"{r['differing_files_same_pixels']}); {r['bytes'] / 1e6:.1f} MB in "
              f"{r['image_files']} image files; synth {r['synth_s']:.1f} s; read {r['read_cells_per_s']:,.0f} cells/s",
              flush=True)
    if res["lzf"]["runs_identical_to_first"] == a.repeats:
        print("lzf   every run matched here: its differing bytes come from what a thread compressed before, so they "
              "show by chance (1 of 10 runs at the default 200 cells per class); fewer cells or repeats can miss them",
              flush=True)
    ratio = res["gzip"]["read_cells_per_s"] / res["lzf"]["read_cells_per_s"]
    floors.ratio("gzip / lzf, one-cell reads", ratio, 0.5)
    floors.ratio("gzip runs byte-identical (share)", res["gzip"]["runs_identical_to_first"] / a.repeats, 1.0)
    if a.out:
        write_json(a.out, {"config": cfg.model_dump(exclude={"compression", "out", "workers"}), "repeats": a.repeats,
                           "codecs": res, "gzip_over_lzf_read": round(ratio, 3), "machine": machine()})
    floors.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
