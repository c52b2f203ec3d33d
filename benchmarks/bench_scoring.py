"""Scoring throughput: the model's pure forward loop, in-process batch scoring from a gzip HDF5 file, the HTTP
service under concurrent clients (adaptive batching), and a load run (latency, errors, memory).

The script trains its own model with the default params model config (convnext_custom, dims 16,32,64,128, depths
1,1,2,1, 64x64, LC3B only, 3 members) on data it writes (``training.sim.synth``, or random cells with ``--data random``),
writes a gzip-compressed scPortrait file of ``--cells`` cells to score, and prints the figures::

    .venv/bin/python benchmarks/bench_scoring.py [--cells 16384] [--seconds 60] [--clients 16] [--threads N]

Targets: batch scoring >= 0.8x the pure loop; HTTP >= 0.7x in-process batch scoring; the load run has no errors
and flat memory.

``--hostile`` adds the issue-14 figures: the server's peak RSS while it answers hostile uploads (a few-KB file
claiming 2x10^8 cells, the ``--cells`` file tiled past ``serve.max_chunk_mb`` and stored as one gzip chunk,
2048-pixel crops, external links into a
server-side file) against the peak of the valid ``--cells`` upload measured in the same run, with their status
codes, and the number of retry warnings the load run left in the server log. ``--check`` exits 1 unless: the
throughput ratios meet their targets, the load run had no errors, every hostile upload got its 4xx, and the largest
hostile peak stays under the valid upload's (or 64 MB).

``--threads`` sets PyTorch's threads in this process and in the service's model runner alike. On a machine other
jobs share, two OpenMP threads on two busy cores collapse (3-4x slower than one); ``--threads 1`` gives stable
figures there.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from floors import Floors, add_args

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, flush=True)


# -- data and model --------------------------------------------------------------------------------------------------
def write_training_data(root: Path, source: str) -> Path:
    """A small labelled set: simulated SPARCS slides (or random cells) in two classes; returns the manifest."""
    import pandas as pd

    if source == "synth":
        from training.config import SynthConfig
        from training.sim.synth import synthesize

        fields = SynthConfig.model_fields
        extra = {"compression": "gzip"} if "compression" in fields else {}
        cfg = SynthConfig(image_size=64, cells_per_class=400, slides_per_condition=2, timecourse_hours=[0.0],
                          cells_per_timepoint=10, screen_slides=1, cells_per_screen_slide=2048, format="h5sc",
                          **extra)
        return synthesize(cfg, root, progress=False)
    from training.io.formats import write_h5sc

    rng = np.random.default_rng(0)
    rows = []
    for label, level in (("stimulated", 0.6), ("atg5_ko", 0.2)):
        for s in range(2):
            x = rng.random((400, 5, 64, 64), dtype=np.float32) * level
            name = f"{label}_s{s}.h5sc"
            write_h5sc(root / name, x, np.arange(400) + 1000 * s)
            rows.append({"path": name, "label": label, "group": f"{label}_s{s}"})
    write_h5sc(root / "screen_s1.h5sc", rng.random((2048, 5, 64, 64), dtype=np.float32) * 0.4, np.arange(2048))
    rows.append({"path": "screen_s1.h5sc", "label": "", "group": "screen_s1"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def train_model(manifest: Path, out: Path) -> Path:
    from training.config import resolve
    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.regimes.ensemble_training import train_ensemble

    params = resolve({}, {
        "split.classes": ["stimulated", "atg5_ko"], "split.max_per_class": None, "split.test_fraction": 0.5,
        "split.val_fraction": 0.2, "data.channels": ["LC3B"], "data.image_size": 64, "train.epochs": 2,
        "train.patience": None,
    })
    table, summary = make_splits(build_index(manifest, progress=False), params.split)
    data = prepare_data(table, summary["classes"], params)
    train_ensemble(data, params, out, progress=False)
    return out


def write_score_file(manifest: Path, out: Path, n: int) -> Path:
    """``n`` screen cells (the simulated screen slide, tiled) in a gzip-compressed ``.h5sc``, chunks (1, 1, H, W)."""
    import pandas as pd

    from training.io.formats import CellFile, write_h5sc

    m = pd.read_csv(manifest, keep_default_na=False)
    screen = manifest.parent / m.loc[m["label"] == "", "path"].iloc[0]
    with CellFile(screen) as f:
        cells, names, kinds = f.read(0, f.n_cells), f.info.channel_names, f.info.channel_kinds
    reps = -(-n // len(cells))
    images = np.concatenate([cells] * reps)[:n]
    write_h5sc(out, images, np.arange(n, dtype=np.int64) * 3 + 1, channel_names=names, channel_kinds=kinds,
               compression="gzip")
    return out


# -- the three throughputs ---------------------------------------------------------------------------------------------
def pure_forward(model_dir: Path, score_file: Path, batch_size: int, n: int) -> float:
    """Cells/s of ``Ensemble.predict_tensor`` over model-ready tensors already in memory (no I/O, no preprocessing)."""

    from training.io.formats import CellFile
    from training.uncertainty.ensemble import Ensemble

    ens = Ensemble.load(model_dir)
    with CellFile(score_file) as f:
        x = ens.preprocess(f.read(0, min(n, f.n_cells), f.resolve_channels(ens.spec.channels)))
    ens.predict_tensor(x[:batch_size])  # warm-up
    t = time.perf_counter()
    for s in range(0, len(x), batch_size):
        ens.predict_tensor(x[s : s + batch_size])
    rate = len(x) / (time.perf_counter() - t)
    del x
    return rate


def batch_scoring(model_dir: Path, score_file: Path, out: Path, batch_size: int) -> tuple[float, int]:
    from serving.batch.scoring import score_files
    from training.config import ScoreConfig

    t = time.perf_counter()
    result = score_files([score_file], model_dir, out, ScoreConfig(batch_size=batch_size), progress=False)
    return result["n_cells"] / (time.perf_counter() - t), result["n_cells"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``spatial serve`` in a subprocess (its own session, so it and its workers can be stopped together)."""

    def __init__(self, model_dir: Path, workdir: Path, threads: int | None):
        self.port = free_port()
        env = {**os.environ, "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
        sets = []
        if threads:
            sets += ["--set", f"serve.torch_threads={threads}"]
        self.log = open(workdir / "serve.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             *sets], cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout}s; see {self.log.name}")

    def rss_mb(self) -> float:
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def request_bodies(score_file: Path, per_request: int, n_requests: int, encoding: str) -> list[tuple[bytes, int]]:
    """Pre-encoded ``/score`` bodies of the model's channel (what a client holding the crops would send)."""
    from training.io.formats import CellFile

    with CellFile(score_file) as f:
        x = f.read(0, min(f.n_cells, per_request * n_requests), f.resolve_channels(["LC3B"]))
        ids = f.cell_ids()[: len(x)]
    bodies = []
    for i in range(n_requests):
        s = (i * per_request) % len(x)
        part = x[s : s + per_request]
        if encoding == "b64":
            a = np.ascontiguousarray(part, dtype=np.float16)
            images: object = {"b64": base64.b64encode(a.tobytes()).decode(), "dtype": "float16", "shape": list(a.shape)}
        else:  # nested lists, values at the stored (float16) precision
            images = part.astype(np.float16).astype(np.float64).round(5).tolist()
        body = json.dumps({"images": images, "cell_ids": ids[s : s + len(part)].tolist()}).encode()
        bodies.append((body, len(part)))
    return bodies


def http_throughput(url: str, bodies: list[tuple[bytes, int]], clients: int) -> tuple[float, int]:
    import httpx

    local = threading.local()
    errors = []

    def send(item: tuple[bytes, int]) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=300)
        r = local.client.post("/score", content=item[0], headers={"content-type": "application/json"})
        if r.status_code != 200:
            errors.append(r.status_code)
        return item[1]

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, bodies[: clients * 2]))  # warm-up (adaptive batching learns its latency model)
        t = time.perf_counter()
        cells = sum(pool.map(send, bodies))
        dt = time.perf_counter() - t
    return cells / dt, len(errors)


def load_run(server: Server, bodies: list[tuple[bytes, int]], clients: int, seconds: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    cells = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            i = k
            while time.monotonic() < stop:
                body, n = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    r = c.post("/score", content=body, headers={"content-type": "application/json"})
                    ok = r.status_code == 200 and len(r.json()["cells"]) == n
                    err = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    err = type(exc).__name__
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    cells[0] += n if err is None else 0
                    if err:
                        errors.append(err)
                i += clients

    rss_start = server.rss_mb()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ms = sorted(1000 * x for x in latencies)
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "cells_per_s": cells[0] / wall, "p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))],
            "rss_start_mb": rss_start, "rss_end_mb": server.rss_mb()}


def write_hostile_files(d: Path, score_file: Path) -> dict[str, Path]:
    """Uploads an attacker would send; each must be refused from its metadata, before any pixel is read."""
    import h5py

    from training.config import ServeConfig

    d.mkdir(parents=True, exist_ok=True)
    files = {}
    files["claims 2e8 cells (8 KB)"] = d / "claims.h5sc"
    with h5py.File(files["claims 2e8 cells (8 KB)"], "w") as h5:
        h5.create_dataset("obsm/single_cell_images", shape=(2 * 10**8, 5, 32, 32), dtype="f2", chunks=(1, 1, 32, 32))
        h5.create_dataset("obs/scportrait_cell_id", shape=(2 * 10**8,), dtype="i8", chunks=(65536,))
    files["one gzip chunk"] = d / "one_chunk.h5sc"
    with h5py.File(score_file, "r") as src, h5py.File(files["one gzip chunk"], "w") as h5:
        data = src["obsm/single_cell_images"][()]
        over = int(ServeConfig().max_chunk_mb * 2**20 // data[0].nbytes) + 1  # cells in a chunk just over the limit
        data = np.resize(data, (max(len(data), over), *data.shape[1:]))  # tiled: any --cells gives a refused chunk
        ds = h5.create_dataset("obsm/single_cell_images", data=data, chunks=data.shape, compression="gzip")
        ds.attrs.update(dict(src["obsm/single_cell_images"].attrs))
        h5.create_dataset("obs/scportrait_cell_id", data=np.arange(len(data)))
    files["2048-pixel crops"] = d / "wide.h5sc"
    with h5py.File(files["2048-pixel crops"], "w") as h5:
        h5.create_dataset("obsm/single_cell_images", shape=(64, 5, 2048, 2048), dtype="f2", chunks=(1, 1, 2048, 2048),
                          compression="gzip", fillvalue=0)
        h5.create_dataset("obs/scportrait_cell_id", data=np.arange(64))
    files["external links"] = d / "links.h5sc"
    with h5py.File(files["external links"], "w") as h5:
        h5["obsm/single_cell_images"] = h5py.ExternalLink(str(score_file), "obsm/single_cell_images")
        h5["obs/scportrait_cell_id"] = h5py.ExternalLink(str(score_file), "obs/scportrait_cell_id")
    return files


def upload_peak(server: Server, path: Path) -> tuple[int, float, float]:
    """POST ``path`` to /score_file; (status, peak server RSS above the level before, seconds)."""
    import httpx

    base, peak, done = server.rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    try:
        with open(path, "rb") as fh:
            r = httpx.post(server.url + "/score_file", files={"file": (path.name, fh)}, timeout=600)
            r.read()
    finally:
        done.set()
        th.join()
    return r.status_code, max(peak[0] - base, 0.0), time.perf_counter() - t


def hostile_run(server: Server, work: Path, score_file: Path) -> dict[str, dict[str, float]]:
    status, legit_mb, legit_s = upload_peak(server, score_file)
    log(f"valid upload ({score_file.stat().st_size / 2**20:.1f} MB, all cells scored): HTTP {status}, peak RSS "
        f"+{legit_mb:.0f} MB, {legit_s:.1f}s")
    out = {"valid": {"status": status, "peak_mb": legit_mb}}
    for name, path in write_hostile_files(work / "hostile", score_file).items():
        status, mb, secs = upload_peak(server, path)
        out[name] = {"status": status, "peak_mb": mb}
        log(f"hostile upload {name:>24s} ({path.stat().st_size / 2**10:7.0f} KB): HTTP {status}, peak RSS +{mb:.0f} MB"
            f" = {mb / max(legit_mb, 1):.2f}x the valid upload's, {secs:.2f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=16384, help="cells in the gzip HDF5 file scored end to end")
    ap.add_argument("--seconds", type=float, default=60, help="length of the load run")
    ap.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    ap.add_argument("--per-request", type=int, default=32, help="cells per HTTP request")
    ap.add_argument("--batch-size", type=int, default=256, help="score.batch_size in-process")
    ap.add_argument("--threads", type=int, default=None, help="PyTorch threads (in-process and server runner)")
    ap.add_argument("--data", choices=["synth", "random"], default="synth")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data / model here (default: a temp dir)")
    add_args(ap)
    ap.add_argument("--hostile", action="store_true", help="also the hostile uploads (peak server RSS)")
    ap.add_argument("--skip-throughput", action="store_true", help="only the server: load run (+ --hostile)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"workdir {work}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
        f"load average {os.getloadavg()[0]:.1f}")

    t = time.perf_counter()
    manifest = work / "data" / "manifest.csv"
    if not manifest.is_file():
        manifest = write_training_data(work / "data", args.data)
    model_dir = work / "model"
    if not (model_dir / "spec.json").is_file():
        train_model(manifest, model_dir)
    score_file = work / f"screen_{args.cells}.h5sc"
    if not score_file.is_file():
        write_score_file(manifest, score_file, args.cells)
    log(f"setup (data {args.data}, 3-member ensemble, {args.cells}-cell gzip file): {time.perf_counter() - t:.0f}s")

    floors = Floors(args)
    inproc = 0.0
    if not args.skip_throughput:
        # the machine may be shared: the pure loop is measured before and after batch scoring, the ratio uses the mean
        fwd1 = pure_forward(model_dir, score_file, args.batch_size, min(args.cells, 8192))
        out = work / "scores.parquet"
        out.unlink(missing_ok=True)
        inproc, n = batch_scoring(model_dir, score_file, out, args.batch_size)
        fwd2 = pure_forward(model_dir, score_file, args.batch_size, min(args.cells, 8192))
        fwd = (fwd1 + fwd2) / 2
        log(f"pure forward loop (in memory, predict_tensor, batch {args.batch_size}): {fwd:8.0f} cells/s "
            f"(before {fwd1:.0f}, after {fwd2:.0f})")
        log(f"in-process batch scoring from gzip HDF5 ({n} cells):  {inproc:8.0f} cells/s  = {inproc / fwd:.2f}x pure "
            "loop (target >= 0.8)")
        floors.ratio("batch scoring / pure forward loop", inproc / fwd, 0.8)

    server = Server(model_dir, work, args.threads)
    try:
        server.wait()
        n_req = max(args.clients * 4, 4096 // args.per_request)
        for enc in ("json", "b64") if not args.skip_throughput else ():
            bodies = request_bodies(score_file, args.per_request, n_req, enc)
            rate, errs = http_throughput(server.url, bodies, args.clients)
            log(f"HTTP /score, {args.clients} clients x {args.per_request} cells, {enc:4s} bodies:  {rate:8.0f} cells/s "
                f"= {rate / inproc:.2f}x in-process (target >= 0.7), errors {errs}")
            # the server's front and runner processes share the cores with the clients: only on bigger machines
            floors.ratio(f"HTTP /score ({enc}) / in-process", rate / inproc, 0.7, two_core=False)
        bodies = request_bodies(score_file, args.per_request, n_req, "json")
        res = load_run(server, bodies, args.clients, args.seconds)
        log(f"load run {args.seconds:.0f}s, {args.clients} clients, JSON: {res['requests']} requests, {res['errors']} errors "
            f"{res['error_kinds'] or ''}, {res['cells_per_s']:.0f} cells/s, p50 {res['p50_ms']:.0f} ms, "
            f"p99 {res['p99_ms']:.0f} ms, server RSS {res['rss_start_mb']:.0f} -> {res['rss_end_mb']:.0f} MB")
        retries = sum("runner call(s) dropped" in line for line in Path(server.log.name).read_text().splitlines())
        log(f"retry warnings in the server log after the load run: {retries}")
        if res["errors"]:
            floors.failed.append(f"{res['errors']} errors in the load run")
        if args.hostile:
            hostile = hostile_run(server, work, score_file)
            legit = hostile.pop("valid")
            worst = max(v["peak_mb"] for v in hostile.values())
            if any(not 400 <= v["status"] < 500 for v in hostile.values()):
                floors.failed.append("a hostile upload did not get a 4xx")
            if worst > max(legit["peak_mb"], 64):
                floors.failed.append(f"a hostile upload peaked at +{worst:.0f} MB, over the valid upload's")
    finally:
        server.stop()
    log(f"load average at the end {os.getloadavg()[0]:.1f}")
    floors.finish()


if __name__ == "__main__":
    main()
