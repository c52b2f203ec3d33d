"""A person in the loop, timed: ``spatial query`` against batch scoring of the same cells, thumbnails per second
from a gzip HDF5 file, and the labeling page's first paint with 96 cells in headless Chromium.

The model and data are those of ``bench_scoring.py`` (random cells in two classes, the default model config: tiny
ConvNeXt, 64x64, LC3B, 3 members, 2 epochs), the pool a gzip-compressed ``.h5sc`` of ``--cells`` cells with
chunks (1, 1, H, W)::

    .venv/bin/python benchmarks/bench_labeling.py [--cells 4096] [--threads 1] [--check]

Figures and their baselines (measured in the same run):

* query: cells/s of the pool scoring inside ``spatial query`` (BALD: member logits kept) / cells/s of
  ``score_files`` on the same cells -> ratio; floor 0.7 (both stream the same reads through the same ensemble).
* thumbnails: composite + per-channel PNGs per second for 96 cells, cold cache / the rate of plain single-cell
  reads of the same rows -> ratio (rendering + PNG cost on top of the read); floor 0.1 and 200 thumbnails/s.
* page: first contentful paint and the time until all 96 composites and the per-channel images on screen are
  shown (the others load lazily when scrolled to), cold (thumbnails read from the file) and warm (server cache);
  floor: within 10 s cold.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
CHROMIUM = "/usr/bin/chromium"
N_PAGE = 96
# every composite (eager) and every per-channel image on screen (lazy below the fold) has been decoded
VISIBLE_LOADED = """() => Array.from(document.images).filter((im) => im.classList.contains('main')
    || im.getBoundingClientRect().top < innerHeight).every((im) => im.complete && im.naturalWidth > 0)"""


def log(msg: str) -> None:
    print(msg, flush=True)


def query_vs_batch(model_dir: Path, pool_file: Path, tmp: Path, batch_size: int) -> dict[str, float]:
    import pandas as pd

    from serving.batch.scoring import score_files
    from training.active.query import run_query
    from training.config import ScoreConfig
    from training.io.formats import CellFile
    from training.uncertainty.ensemble import Ensemble

    with CellFile(pool_file) as f:
        ids = f.cell_ids()
    index = pd.DataFrame({"source_file": str(pool_file), "row": np.arange(len(ids)), "cell_id": ids,
                          "label": pd.array([None] * len(ids), dtype="string"), "group": "screen"})
    ens = Ensemble.load(model_dir)
    run_query(ens, index.head(batch_size), "bald", 4, pool_subsample=None, batch_size=batch_size)  # warm-up
    t = time.perf_counter()
    res = run_query(ens, index, "bald", N_PAGE, pool_subsample=None, batch_size=batch_size)
    total = time.perf_counter() - t
    q_rate = res.scored / res.seconds_score
    t = time.perf_counter()
    out = score_files([pool_file], model_dir, tmp / "scores.parquet", ScoreConfig(batch_size=batch_size),
                      progress=False)
    b_rate = out["n_cells"] / (time.perf_counter() - t)
    res.queries.to_parquet(tmp / "queries.parquet")
    return {"query_cells_per_s": q_rate, "query_total_cells_per_s": res.scored / total, "batch_cells_per_s": b_rate,
            "query_ratio": q_rate / b_rate}


def thumbnails(tmp: Path) -> dict[str, float]:
    from serving.labeling.app import read_queries
    from serving.labeling.thumbs import Thumbnails, locate
    from training.io.formats import CellFile

    cells, layouts = locate(read_queries(tmp / "queries.parquet"))
    rows = cells["row"].to_numpy()
    name = str(cells["source_file"].iat[0])
    with CellFile(name) as f:
        t = time.perf_counter()
        for r in rows:
            f.read(int(r), int(r) + 1, check=False)
        read_rate = len(rows) / (time.perf_counter() - t)
    th = Thumbnails(cells, layouts, px=96, cache=0)
    n_img = len(layouts[name]["image"])
    t = time.perf_counter()
    n = 0
    for i in range(len(cells)):
        th.png(i, "composite")
        n += 1
        for c in range(n_img):
            th.png(i, str(c))
            n += 1
    rate = n / (time.perf_counter() - t)
    th.close()
    return {"thumbs_per_s": rate, "thumb_cells_per_s": rate / (1 + n_img), "raw_reads_per_s": read_rate,
            "thumb_ratio": (rate / (1 + n_img)) / read_rate}


def page_paint(tmp: Path) -> dict[str, float]:
    from browser_util import ARGS, free_port, wait_http  # tests/ helper: the same launch flags as the tests
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "label", "--queries", str(tmp / "queries.parquet"),
                             "--labels", str(tmp / "labels.csv"), "--port", str(port)], cwd=tmp,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/?annotator=bench"
    out = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/api/session", proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            for kind in ("cold", "warm"):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                t = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("body[data-ready='1']")
                page.wait_for_function(VISIBLE_LOADED, timeout=120_000)
                out[f"{kind}_shown_s"] = time.perf_counter() - t
                fcp = page.evaluate("() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime")
                out[f"{kind}_first_paint_s"] = (fcp or float("nan")) / 1000
                out["images"] = page.evaluate("() => document.images.length")
                page.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="exit 1 when a figure is below its floor")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_scoring import train_model, write_score_file, write_training_data

    with tempfile.TemporaryDirectory(prefix="bench-labeling-") as d:
        tmp = Path(d)
        log("training the benchmark model (random cells, 2 epochs, 3 members) ...")
        manifest = write_training_data(tmp / "data", "random")
        model = train_model(manifest, tmp / "model")
        pool = write_score_file(manifest, tmp / "pool.h5sc", a.cells)
        q = query_vs_batch(model, pool, tmp, a.batch_size)
        log(f"spatial query (bald, {a.cells} cells): {q['query_cells_per_s']:.0f} cells/s scoring "
            f"({q['query_total_cells_per_s']:.0f} cells/s with selection); batch scoring {q['batch_cells_per_s']:.0f} "
            f"cells/s; ratio {q['query_ratio']:.2f}")
        t = thumbnails(tmp)
        log(f"thumbnails (gzip HDF5, 96 cells, composite + per channel, cold): {t['thumbs_per_s']:.0f}/s "
            f"({t['thumb_cells_per_s']:.0f} cells/s); plain single-cell reads {t['raw_reads_per_s']:.0f}/s; "
            f"ratio {t['thumb_ratio']:.2f}")
        p = page_paint(tmp)
        log(f"labeling page ({N_PAGE} cells, {p['images']} images): first paint {p['cold_first_paint_s']:.2f} s, "
            f"all 96 composites and the channel images on screen {p['cold_shown_s']:.2f} s cold / "
            f"{p['warm_shown_s']:.2f} s warm")
    failed = []
    if q["query_ratio"] < 0.7:
        failed.append(f"query / batch scoring ratio {q['query_ratio']:.2f} < 0.7")
    if t["thumb_ratio"] < 0.1 or t["thumbs_per_s"] < 200:
        failed.append(f"thumbnails {t['thumbs_per_s']:.0f}/s (ratio {t['thumb_ratio']:.2f}) below 200/s or 0.1")
    if p["cold_shown_s"] > 10:
        failed.append(f"page took {p['cold_shown_s']:.1f} s > 10 s to show its images")
    for f in failed:
        log(f"FAIL {f}")
    if a.check and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
