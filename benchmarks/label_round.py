"""One labeling round on the simulated screen, with the simulator's truth playing the person at the keyboard.

Run at the repository root after ``dvc repro register`` (a trained ``models/ensemble``)::

    .venv/bin/python benchmarks/label_round.py [--n 96] [--strategy power_bald] [--figures benchmarks/figures]

It runs ``spatial query`` on the unlabeled pool, starts ``spatial label`` on a free loopback port, and in headless
Chromium presses the key of each cell's true phenotype (on / partial -> stimulated, off / blocked -> atg5_ko, novel
-> ``n`` "novel", debris / doublet -> ``u``), then screenshots the page, runs ``spatial split`` to show the labels
joining the split, and writes the report. The labels go to ``--labels`` (default a scratch file, so the repository's
``labels.csv`` stays as it is unless you point it there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
KEYS = {"on": "1", "partial": "1", "blocked": "2", "off": "2", "debris": "u", "doublet": "u", "novel": "n"}


def spatial(project: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"spatial {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def main() -> None:
    from browser_util import ARGS, CHROMIUM, free_port, wait_http
    from playwright.sync_api import sync_playwright

    from training.sim.synth import load_truth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--strategy", default="power_bald")
    ap.add_argument("--model", default="models/ensemble")
    ap.add_argument("--labels", type=Path, default=None)
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=ROOT, help="the project (dvc repo) to work in")
    a = ap.parse_args()
    project = a.root.resolve()
    figures = a.figures.resolve() if a.figures else None
    os.chdir(project)
    tmp = Path(tempfile.mkdtemp(prefix="label-round-"))
    labels = (a.labels or tmp / "labels.csv").resolve()
    queries = tmp / "queries.parquet"
    t = time.perf_counter()
    print(spatial(project, "query", "--model", a.model, "--strategy", a.strategy, "--n", str(a.n), "--out", str(queries),
                  "--labels", str(labels), "--metrics", str(tmp / "query.json"), "--no-progress"))
    print(f"spatial query: {time.perf_counter() - t:.1f} s wall")
    q = pd.read_parquet(queries)
    truth = load_truth(project / "data/raw/manifest.csv")
    truth["key"] = [os.path.abspath(f) for f in truth["source_file"].astype(str)]
    q["key"] = [os.path.abspath(f) for f in q["source_file"]]
    states = q.merge(truth[["key", "cell_id", "state"]], on=["key", "cell_id"], how="left")["state"]
    print("true states of the queried cells:", states.value_counts().to_dict())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "label", "--queries", str(queries), "--labels",
                             str(labels), "--port", str(port)], cwd=project, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/session", proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            t = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/?annotator=sim-person")
            page.wait_for_selector("body[data-ready='1']")
            page.on("dialog", lambda d: d.accept("novel"))
            for state in states:
                page.keyboard.press(KEYS.get(str(state), "u"))
            page.wait_for_function(f"document.querySelector('#progress').textContent === 'labeled {len(q)} / {len(q)}'",
                                   timeout=120_000)
            print(f"labeled {len(q)} cells in {time.perf_counter() - t:.1f} s (keyboard, one key per cell)")
            page.evaluate("() => window.scrollTo(0, 0)")
            page.select_option("#sort", "uncertainty")
            page.wait_for_function("Array.from(document.images).filter((im) => im.getBoundingClientRect().top < "
                                   "innerHeight).every((im) => im.complete && im.naturalWidth > 0)")
            if figures:
                page.screenshot(path=str(figures / "labeling_page.png"))
            print("second look:", page.locator("#review").text_content()[:300])
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(spatial(project, "split", "--out", str(tmp / "splits.parquet"), "--metrics", str(tmp / "split.json"),
                  "--set", f"label.labels={labels}"))
    summary = json.loads((tmp / "split.json").read_text())
    print("split with the labels:", summary)
    print(spatial(project, "report", "--out", str(project / "reports/screen/index.html")))
    if figures:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((project / "reports/screen/index.html").as_uri())
            page.screenshot(path=str(figures / "screen_report.png"), full_page=True)
            browser.close()
    print(f"outputs in {tmp}")


if __name__ == "__main__":
    main()
