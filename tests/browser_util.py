"""Headless Chromium for the page tests: Debian's ``/usr/bin/chromium`` driven by Playwright for Python (never a
browser download). Tests that need it are skipped when either is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SPATIAL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@contextlib.contextmanager
def labeling_server(workdir: Path, labels: Path) -> Iterator[tuple[str, int]]:
    """``spatial label`` on ``workdir/queries.parquet`` (classes bright and spotty) on a free port, as a subprocess
    started where the tests run from; yields its URL (no trailing slash) and port, and stops it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "label", "--queries", str(workdir / "queries.parquet"),
                             "--labels", str(labels), "--port", str(port), "--set", "split.classes=[bright,spotty]"],
                            cwd=workdir, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/api/session", proc)
        yield url, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll the JavaScript ``expression`` in ``page`` until it is true. Playwright's ``wait_for_function`` evaluates
    its predicate as a string inside the page, which the pages' Content-Security-Policy forbids (no eval)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f} s: {expression}")
        time.sleep(0.05)


def keep_figure(shot: Path, name: str) -> None:
    """Copy a screenshot to ``$SPATIAL_FIGURES_DIR`` (README figures) when that is set."""
    dest = os.environ.get("SPATIAL_FIGURES_DIR")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(dest) / name)
