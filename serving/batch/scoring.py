"""Screen-wide batch scoring: every cell of many single-cell files through the ensemble, with bounded memory,
resumable, locally or on a Ray cluster.

The work is a list of chunks (``score.chunk_size`` consecutive rows of one file). Each chunk is read with the
streaming ``CellLoader`` (``shuffle=False, cache=False``) over its ``(source_file, row, cell_id)`` table, scored, and
written atomically as ``<out>.parts/part-<chunk>.parquet``. ``plan.json`` in that directory records the inputs, the
model and the chunking; a rerun with the same inputs skips the chunks already written, so a run killed at any point
continues where it stopped and the result holds every cell exactly once. Parts of a run with other inputs (a file
fixed after a failed run, another model or chunk size) are never mixed in: they are discarded and the run starts
over, so the command that failed is also the command that recovers. The final Parquet is assembled from the
parts (streamed, one part at a time) under a temporary name and renamed into place; the parts are then removed.

On Ray (``ray_address``), the pending chunks become a ``ray.data`` dataset of chunk descriptors; ``map_batches``
with an actor class (``ChunkScorer``) loads the ensemble once per actor, reads its own rows and writes its own part
files (so ``<out>.parts`` must be on storage every node can write, like the input files every node reads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from serving.model import ServedModel, crop_size_problem
from training.config import MlflowConfig, ScoreConfig
from training.errors import DataError
from training.io.atomic import atomic_path, check_destination
from training.io.formats import CellFile
from training.ray_cluster import check_reachable, connect

log = logging.getLogger(__name__)
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
ACTOR_START_TIMEOUT_S = 600  # Ray: a pool that cannot start (too few CPUs / GPUs) fails instead of waiting forever


@dataclass(frozen=True)
class Chunk:
    index: int
    source_file: str
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    files: list[dict[str, Any]]
    chunks: list[Chunk]
    chunk_size: int
    embeddings: bool
    model: dict[str, Any]

    @property
    def n_cells(self) -> int:
        return sum(f["n_cells"] for f in self.files)

    def key(self) -> dict[str, Any]:
        """What must match for a run to continue another's parts."""
        return {"version": PLAN_VERSION, "files": self.files, "chunk_size": self.chunk_size,
                "embeddings": self.embeddings, "model": self.model}


def parts_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def part_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:06d}.parquet"


def model_identity(model: ServedModel) -> dict[str, Any]:
    """Registry name/version plus a hash of the spec (temperatures, classes...), so a moved alias is noticed."""
    digest = hashlib.sha256((model.path / "spec.json").read_bytes()).hexdigest()[:16]
    return {"name": model.info.get("name"), "version": model.info.get("version"), "spec_sha256": digest}


def make_plan(files: Sequence[str | os.PathLike], chunk_size: int, model: ServedModel, embeddings: bool = False,
              channel_map: dict[str, str] | None = None) -> tuple[Plan, dict[str, np.ndarray]]:
    """Chunks over every file's rows, and each file's cell ids (from the index datasets only, never pixels).

    Every file is checked first: the model's channels, unique cell ids, and crops the HTTP service would accept too
    (``serving.model.crop_size_problem``)."""
    if not files:
        raise DataError("no input files given")
    entries, chunks, ids = [], [], {}
    seen = set()
    for f in files:
        path = os.path.abspath(os.fspath(f))
        if path in seen:
            raise DataError(f"{f}: listed twice")
        seen.add(path)
        with CellFile(path) as cf:
            try:
                cf.resolve_channels(model.spec.channels, channel_map)
            except DataError as exc:
                raise DataError(f"{exc}; the model needs {', '.join(model.spec.channels)}") from None
            problem = crop_size_problem(cf.info.height, cf.info.width, model.spec.image_size)
            if problem is not None:
                raise DataError(f"{f}: crops are {problem}")
            ids[path] = cf.check_unique_ids()
            n = cf.n_cells
        st = os.stat(path)
        entries.append({"path": path, "n_cells": n, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        for s in range(0, n, chunk_size):
            chunks.append(Chunk(len(chunks), path, s, min(s + chunk_size, n)))
    plan = Plan(entries, chunks, chunk_size, embeddings, model_identity(model))
    return plan, ids


def _check_or_write_plan(plan: Plan, parts: Path) -> list[str]:
    """Continue the parts in ``parts`` if they belong to this plan; else discard them (returns what changed)."""
    key = plan.key()
    plan_file = parts / PLAN_FILE
    changed: list[str] = []
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except (json.JSONDecodeError, OSError):
            old = {}
        if old == key:
            return changed
        changed = [k for k in key if old.get(k) != key[k]]
    if parts.is_dir() and any(parts.iterdir()):
        stale = len(list(parts.glob("part-*.parquet")))
        log.warning("%s: discarding %d part(s) of an earlier run with other inputs (changed: %s); starting over",
                    parts, stale, ", ".join(changed) or "no plan")
        shutil.rmtree(parts)
        changed = changed or ["plan"]

    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(plan_file, suffix=".json") as tmp:
        tmp.write_text(json.dumps(key, indent=2))
    return changed


def part_done(parts: Path, chunk: Chunk) -> bool:
    p = part_path(parts, chunk.index)
    if not p.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(p).metadata.num_rows == chunk.n
    except Exception:  # a damaged part is simply scored again
        return False


# -- one chunk -------------------------------------------------------------------------------------------------------
def score_chunk(ensemble, chunk: Chunk, cell_ids: np.ndarray, batch_size: int = 256, num_workers: int = 0,
                embeddings: bool = False, batches_done=None, channel_map: dict[str, str] | None = None
                ) -> pd.DataFrame:
    """Score rows ``chunk.start:chunk.stop`` of one file -> the per-cell table of ``Ensemble.to_frame``."""
    from training.data.loader import CellLoader

    table = pd.DataFrame({"source_file": chunk.source_file, "row": np.arange(chunk.start, chunk.stop, dtype=np.int64),
                          "cell_id": np.asarray(cell_ids, dtype=np.int64)})
    loader = CellLoader(table, ensemble.preprocess, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        cache=False, channel_map=channel_map or None)
    out = ensemble.predict_batches(_count(loader, batches_done), with_features=embeddings)
    df = ensemble.to_frame(out, table)
    if embeddings:
        df["embedding"] = list(out["features"].astype(np.float32))
    return df


def _count(batches: Iterable[dict], callback) -> Iterator[dict]:
    for batch in batches:
        yield batch
        if callback is not None:
            callback(len(batch["idx"]))


def write_part(df: pd.DataFrame, parts: Path, chunk: Chunk, meta: dict[str, Any] | None = None) -> Path:
    """Write one chunk's table atomically (``meta``: where it was scored, for the record)."""
    from training.io.tables import write_table

    return write_table(df, part_path(parts, chunk.index), {"chunk": asdict(chunk), **(meta or {})})


# -- the whole run ---------------------------------------------------------------------------------------------------
def score_files(files: Sequence[str | os.PathLike], model: str | os.PathLike | ServedModel, out: str | os.PathLike,
                cfg: ScoreConfig | None = None, embeddings: bool = False, ray_address: str | None = None,
                mlflow: MlflowConfig | None = None, progress: bool = True, keep_parts: bool = False,
                channel_map: dict[str, str] | None = None) -> dict[str, Any]:
    """Score every cell of ``files`` into the Parquet ``out`` (resumable; see the module docstring). ``model`` is an
    ensemble directory, ``models:/NAME@ALIAS`` (downloaded for the run, removed after) or a ``ServedModel``.
    ``channel_map``: model channel name -> file channel name (names also match ignoring case)."""
    check_destination(out, folder=False)  # before any cell is scored (atomic_path would refuse it only at the end)
    if ray_address:  # before the plan is written and the progress bar drawn
        check_reachable(ray_address)
    cfg = cfg or ScoreConfig()
    channel_map = dict(channel_map or {})
    if isinstance(model, ServedModel):
        return _score(files, model, out, cfg, embeddings, ray_address, mlflow, progress, keep_parts, channel_map)
    with tempfile.TemporaryDirectory(prefix="spatial-model-") as cache:
        served = ServedModel.resolve(os.fspath(model), mlflow, cache_dir=cache)
        return _score(files, served, out, cfg, embeddings, ray_address, mlflow, progress, keep_parts, channel_map)


def _score(files: Sequence[str | os.PathLike], served: ServedModel, out: str | os.PathLike, cfg: ScoreConfig,
           embeddings: bool, ray_address: str | None, mlflow: MlflowConfig | None, progress: bool, keep_parts: bool,
           channel_map: dict[str, str]) -> dict[str, Any]:
    plan, ids = make_plan(files, cfg.chunk_size, served, embeddings, channel_map)
    parts = parts_dir(out)
    discarded = _check_or_write_plan(plan, parts)
    todo = [c for c in plan.chunks if not part_done(parts, c)]
    done_cells = plan.n_cells - sum(c.n for c in todo)
    bar = tqdm(total=plan.n_cells, initial=done_cells, desc="score", unit="cell", disable=not progress,
               dynamic_ncols=True)
    try:
        if todo and ray_address:
            _run_ray(todo, served, cfg, parts, embeddings, ray_address, mlflow, bar, channel_map)
        elif todo:
            _run_local(todo, ids, served, cfg, parts, embeddings, bar, channel_map)
    finally:
        bar.close()
    missing = [c.index for c in plan.chunks if not part_done(parts, c)]
    if missing:
        raise DataError(f"{parts}: chunk(s) {missing[:10]} were not written; rerun to continue")
    meta = {"model": {**plan.model, "uri": served.info.get("uri"), "alias": served.info.get("alias")},
            "files": [f["path"] for f in plan.files], "n_cells": plan.n_cells, "classes": served.classes,
            "embeddings": embeddings}
    assemble(parts, plan, out, meta)
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return {"out": str(out), "n_cells": plan.n_cells, "chunks": len(plan.chunks), "resumed_chunks":
            len(plan.chunks) - len(todo), "files": len(plan.files), "discarded_run": discarded}


def _run_local(todo: list[Chunk], ids: dict[str, np.ndarray], served: ServedModel, cfg: ScoreConfig, parts: Path,
               embeddings: bool, bar, channel_map: dict[str, str] | None = None) -> None:
    import torch

    from training.engine import select_device
    from training.uncertainty.ensemble import Ensemble

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ens = Ensemble.load(served.path, device=select_device(cfg.device))
    for chunk in todo:
        df = score_chunk(ens, chunk, ids[chunk.source_file][chunk.start:chunk.stop], cfg.batch_size,
                         cfg.num_workers, embeddings, batches_done=bar.update, channel_map=channel_map)
        write_part(df, parts, chunk)


def assemble(parts: Path, plan: Plan, out: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Concatenate the parts in chunk order into ``out`` (atomic; one part in memory at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.io.tables import META_KEY

    writer = None
    with atomic_path(out, suffix=".parquet") as tmp:
        try:
            for chunk in plan.chunks:
                table = pq.read_table(part_path(parts, chunk.index))
                table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            if writer is None:  # no cells at all: an empty table with the right columns is still written
                pq.write_table(pa.table({"source_file": pa.array([], pa.string()),
                                         "cell_id": pa.array([], pa.int64())}), tmp)
        finally:
            if writer is not None:
                writer.close()
    return Path(out)


# -- Ray -------------------------------------------------------------------------------------------------------------
class ChunkScorer:
    """Ray Data actor: loads the ensemble once, then scores chunk descriptors and writes their parts."""

    def __init__(self, model_dir: str, model_uri: str, mlflow_uri: str | None, parts: str, batch_size: int,
                 num_workers: int, embeddings: bool, channel_map: dict[str, str] | None = None):
        from training.engine import select_device
        from training.uncertainty.ensemble import Ensemble

        path = Path(model_dir)
        if not (path / "spec.json").is_file():  # another node: resolve the registry URI there
            path = ServedModel.resolve(model_uri, MlflowConfig(tracking_uri=mlflow_uri)).path
        self.ensemble = Ensemble.load(path, device=select_device("auto"))
        self.parts, self.batch_size, self.num_workers = Path(parts), batch_size, num_workers
        self.embeddings, self.channel_map = embeddings, channel_map
        self._ids: dict[str, np.ndarray] = {}
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def _cell_ids(self, source: str) -> np.ndarray:
        if source not in self._ids:
            if len(self._ids) >= 4:
                self._ids.pop(next(iter(self._ids)))
            with CellFile(source) as f:
                self._ids[source] = f.cell_ids()
        return self._ids[source]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices, counts = [], []
        for i in range(len(batch["index"])):
            chunk = Chunk(int(batch["index"][i]), str(batch["source_file"][i]), int(batch["start"][i]),
                          int(batch["stop"][i]))
            df = score_chunk(self.ensemble, chunk, self._cell_ids(chunk.source_file)[chunk.start:chunk.stop],
                             self.batch_size, self.num_workers, self.embeddings, channel_map=self.channel_map)
            write_part(df, self.parts, chunk, {"ray_node": self.node})
            indices.append(chunk.index)
            counts.append(chunk.n)
        return {"index": np.asarray(indices, np.int64), "n": np.asarray(counts, np.int64)}


def _run_ray(todo: list[Chunk], served: ServedModel, cfg: ScoreConfig, parts: Path, embeddings: bool,
             address: str, mlflow: MlflowConfig | None, bar, channel_map: dict[str, str] | None = None) -> None:
    import ray
    import ray.data

    from training.tracking import tracking_uri

    started = connect(address, log_to_driver=False, include_dashboard=False)
    try:
        resources = ray.cluster_resources()
        gpus = cfg.ray_gpus_per_actor if cfg.ray_gpus_per_actor is not None else float(resources.get("GPU", 0) > 0)
        if cfg.ray_actors:
            actors = cfg.ray_actors
        elif gpus:
            actors = max(1, int(resources.get("GPU", 0) // gpus))
        else:
            actors = max(1, int(resources.get("CPU", 1) // cfg.ray_cpus_per_actor))
        actors = min(actors, len(todo))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # start once the whole pool is up, so work spreads
        ds = ray.data.from_items([asdict(c) for c in todo], override_num_blocks=len(todo))
        scored = ds.map_batches(
            ChunkScorer,
            fn_constructor_kwargs={
                "model_dir": str(served.path.resolve()), "model_uri": str(served.info.get("uri") or served.path),
                "mlflow_uri": tracking_uri(mlflow or MlflowConfig()), "parts": str(parts.resolve()),
                "batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "embeddings": embeddings,
                "channel_map": channel_map,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
            num_cpus=cfg.ray_cpus_per_actor,
            num_gpus=gpus,
        )
        for row in scored.iter_rows():
            bar.update(int(row["n"]))
    finally:
        if started:
            ray.shutdown()
