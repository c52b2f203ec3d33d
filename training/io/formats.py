"""Read and write SPARCS single-cell image files with h5py (no scPortrait dependency).

Two layouts are supported:

* legacy SPARCSpy ``single_cells.h5``: ``single_cell_data`` float ``(N, C, H, W)`` (masks first, then
  image channels in [0, 1]), ``single_cell_index`` ``(N, 2)`` = ``[row, cell_id]``, optional
  ``label_names`` and ``single_cell_index_labelled``. SPARCSpy stores no channel names; ours are read
  from a ``channel_names`` attribute when present, else the thesis layout is assumed for 5 channels
  (nucleus mask, cytosol mask, nucleus, membrane, LC3B) and ``ch<i>`` otherwise.
* scPortrait ``.h5sc`` (AnnData on disk): ``obsm/single_cell_images`` ``(N, C, H, W)``, cell ids in
  ``obs/scportrait_cell_id`` (older files: ``obs/cell_id``), channel names and the mask /
  image-channel mapping in ``uns`` under ``single_cell_images/...`` and as dataset attributes.

Cell ids are always the stored ids, never row numbers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from training.errors import DataError
from training.io.atomic import atomic_path
from training.io.hdf5 import ReadLimits, open_hdf5
from training.io.pixels import PIXEL_RANGE, bad_cells, describe_cell

SPARCSPY_DATA = "single_cell_data"
SPARCSPY_INDEX = "single_cell_index"
H5SC_IMAGES = "obsm/single_cell_images"
H5SC_CELL_IDS = ("obs/scportrait_cell_id", "obs/cell_id")
UNS_PREFIX = "single_cell_images/"
THESIS_CHANNELS = ["nucleus_mask", "cytosol_mask", "nucleus", "membrane", "LC3B"]
THESIS_KINDS = ["mask", "mask", "image_channel", "image_channel", "image_channel"]


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _read_string_array(node: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in node[()].tolist()]


def match_channel(name: str, names: Sequence[str], channel_map: Mapping[str, str] | None = None,
                  where: str = "file") -> int:
    """Index of channel ``name`` in a file's ``names``. ``channel_map`` (model name -> file name, keys matched
    case-insensitively) renames first; then an exact match, else the one name equal ignoring case (SPARCSpy
    writes ``LC3B``, scPortrait ``lc3b``). Unknown or ambiguous names are a :class:`DataError` naming ``where``."""
    mapped = {k.casefold(): v for k, v in (channel_map or {}).items()}
    target = mapped.get(name.casefold(), name)
    if target in names:
        return list(names).index(target)
    hits = [i for i, n in enumerate(names) if n.casefold() == target.casefold()]
    if len(hits) == 1:
        return hits[0]
    shown = f"'{name}'" + (f" (mapped to '{target}')" if target != name else "")
    if hits:
        raise DataError(f"{where}: channel {shown} matches several channels ignoring case "
                        f"({', '.join(names[i] for i in hits)}); name one with data.channel_map / --channel-map")
    raise DataError(f"{where}: no channel named {shown} (channels: {', '.join(names)}); map names with "
                    f"data.channel_map or --channel-map MODEL=FILE")


@dataclass(frozen=True)
class CellFileInfo:
    path: str
    format: str
    n_cells: int
    channel_names: list[str]
    channel_kinds: list[str]
    height: int
    width: int
    dtype: str
    chunks: tuple[int, ...] | None
    compression: str | None

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def image_channels(self) -> list[int]:
        return [i for i, k in enumerate(self.channel_kinds) if k != "mask"]


class CellFile:
    """An open single-cell file. Opening validates the layout; pixels are read only by ``read``.

    The file is opened with ``training.io.hdf5.open_hdf5`` (no external storage, links or virtual datasets unless
    ``allow_external``); ``limits`` are checked from the metadata before anything is read.
    h5py handles must not cross process boundaries: open one per worker process.
    """

    def __init__(self, path: str | os.PathLike, allow_external: bool | None = None, limits: ReadLimits | None = None):
        self.path = str(path)
        self.limits = limits
        p = Path(path)
        if not p.exists():
            raise DataError(f"{self.path}: file not found")
        if not p.is_file():
            raise DataError(f"{self.path}: not a file")
        self._h5 = open_hdf5(p, allow_external)
        try:
            self._open_layout()
        except DataError:
            self._h5.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            self._h5.close()
            raise DataError(f"{self.path}: damaged or unreadable HDF5 structure ({exc})") from None

    # -- layout ------------------------------------------------------------------------------------
    def _open_layout(self) -> None:
        h5 = self._h5
        if SPARCSPY_DATA in h5:
            self.format = "sparcspy"
            self._images_name = SPARCSPY_DATA
            self._ids_name = SPARCSPY_INDEX
            if SPARCSPY_INDEX not in h5:
                raise DataError(f"{self.path}: dataset '{SPARCSPY_INDEX}' missing (expected (N, 2) [row, cell_id])")
        elif H5SC_IMAGES in h5:
            self.format = "h5sc"
            self._images_name = H5SC_IMAGES
            self._ids_name = next((n for n in H5SC_CELL_IDS if n in h5), None)
            if self._ids_name is None:
                raise DataError(f"{self.path}: dataset 'obs/scportrait_cell_id' missing (expected the cell ids)")
        else:
            raise DataError(
                f"{self.path}: no single-cell images found (expected dataset '{SPARCSPY_DATA}' for SPARCSpy "
                f"or '{H5SC_IMAGES}' for scPortrait .h5sc)"
            )
        ds = h5[self._images_name]
        if not isinstance(ds, h5py.Dataset):
            raise DataError(f"{self.path}: '{self._images_name}' is not a dataset")
        if ds.ndim != 4:
            raise DataError(
                f"{self.path}: dataset '{self._images_name}' has shape {ds.shape}; expected rank 4 (N, C, H, W)"
            )
        if ds.dtype.kind != "f":
            raise DataError(
                f"{self.path}: dataset '{self._images_name}' has dtype {ds.dtype}; expected float16/float32 in [0, 1]"
            )
        self._images = ds
        n, c, h, w = ds.shape
        ids = h5[self._ids_name]
        if not isinstance(ids, h5py.Dataset):
            raise DataError(f"{self.path}: '{self._ids_name}' is not a dataset")
        if self.limits is not None:
            self.limits.check_images(ds, self.path)
            self.limits.check_chunks(ids, self.path)
        if self.format == "sparcspy" and (ids.ndim != 2 or ids.shape[1] != 2):
            raise DataError(f"{self.path}: dataset '{SPARCSPY_INDEX}' has shape {ids.shape}; expected (N, 2)")
        if self.format == "h5sc" and ids.ndim != 1:
            raise DataError(f"{self.path}: dataset '{self._ids_name}' has shape {ids.shape}; expected (N,)")
        if ids.shape[0] != n:
            raise DataError(
                f"{self.path}: dataset '{self._ids_name}' has {ids.shape[0]} rows but '{self._images_name}' has {n}"
            )
        names, kinds = self._channel_metadata(c)
        self.info = CellFileInfo(
            path=self.path,
            format=self.format,
            n_cells=n,
            channel_names=names,
            channel_kinds=kinds,
            height=h,
            width=w,
            dtype=str(ds.dtype),
            chunks=tuple(ds.chunks) if ds.chunks else None,
            compression=ds.compression,
        )

    def _channel_metadata(self, c: int) -> tuple[list[str], list[str]]:
        attrs = self._images.attrs
        names = _decode(attrs.get("channel_names")) if "channel_names" in attrs else None
        kinds = _decode(attrs.get("channel_mapping")) if "channel_mapping" in attrs else None
        if self.format == "h5sc":
            uns = self._h5.get("uns")
            if names is None and uns is not None and f"{UNS_PREFIX}channel_names" in uns:
                names = self._read_names(uns[f"{UNS_PREFIX}channel_names"], c)
            if kinds is None and uns is not None and f"{UNS_PREFIX}channel_mapping" in uns:
                kinds = self._read_names(uns[f"{UNS_PREFIX}channel_mapping"], c)
        if names is None:
            names = list(THESIS_CHANNELS) if c == len(THESIS_CHANNELS) else [f"ch{i}" for i in range(c)]
        if kinds is None:
            kinds = list(THESIS_KINDS) if c == len(THESIS_KINDS) else ["image_channel"] * c
        names, kinds = [str(x) for x in names], [str(x) for x in kinds]
        if len(names) != c:
            raise DataError(f"{self.path}: {len(names)} channel names for {c} channels in '{self._images_name}'")
        if len(kinds) != c:
            raise DataError(f"{self.path}: channel_mapping has {len(kinds)} entries for {c} channels")
        return names, kinds

    def _read_names(self, node: Any, c: int) -> list[str]:
        """A per-channel string array, its size checked before it is read."""
        if not isinstance(node, h5py.Dataset) or node.size != c:
            raise DataError(f"{self.path}: '{node.name.lstrip('/')}' does not hold one entry per channel ({c})")
        return _read_string_array(node)

    # -- index -------------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return self.info.n_cells

    def cell_ids(self, start: int = 0, stop: int | None = None, block: int = 65_536) -> np.ndarray:
        """The stored cell ids of rows ``start:stop`` as int64 (reads only the index dataset, ``block`` rows at a
        time into one preallocated array)."""
        ids = self._h5[self._ids_name]
        stop = self.n_cells if stop is None else stop
        out = np.empty(max(stop - start, 0), np.int64)
        for s in range(start, stop, block):
            e = min(s + block, stop)
            raw = ids[s:e, 1] if self.format == "sparcspy" else ids[s:e]
            if raw.dtype.kind not in "iuf":
                try:
                    raw = np.asarray([int(v.decode() if isinstance(v, bytes) else v) for v in raw], dtype=np.int64)
                except (ValueError, TypeError):
                    raise DataError(f"{self.path}: cell ids in '{self._ids_name}' are not integers") from None
            elif raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
                raise DataError(f"{self.path}: cell ids in '{self._ids_name}' are not integers")
            out[s - start:e - start] = raw
        return out

    def rows_of(self, cell_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The row of each of ``cell_ids`` (in their order) as int64; a ``DataError`` names the file and the first
        ids it does not hold. Ids are unique per file (``check_unique_ids``)."""
        wanted = np.asarray(cell_ids, dtype=np.int64)
        pos = pd.Series(np.arange(self.n_cells), index=self.check_unique_ids()).reindex(wanted).to_numpy()
        missing = np.isnan(pos)
        if missing.any():
            raise DataError(f"{self.path}: {int(missing.sum())} cell(s) are not in the file, e.g. cell_id "
                            f"{wanted[missing][:5].tolist()}")
        return pos.astype(np.int64)

    def check_unique_ids(self) -> np.ndarray:
        """All cell ids, refused (``DataError``) when one repeats: a cell is addressed by (file, cell id)."""
        ids = self.cell_ids()
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            dup = uniq[counts > 1]
            raise DataError(f"{self.path}: {len(ids) - len(uniq)} duplicated cell id(s) in '{self._ids_name}' "
                            f"(e.g. {', '.join(map(str, dup[:5].tolist()))}); expected one distinct id per cell")
        return ids

    def obs_table(self) -> pd.DataFrame:
        """Per-cell annotation columns stored beside the images: SPARCSpy's ``single_cell_index_labelled`` (named by
        ``label_names``) or the ``obs`` columns of a ``.h5sc`` (plain and AnnData-categorical), one row per cell. A
        table whose rows are not one per cell is a DataError naming it."""
        h5 = self._h5
        cols: dict[str, Any] = {}
        try:
            if self.format == "sparcspy" and "single_cell_index_labelled" in h5:
                table = np.asarray(_decode(h5["single_cell_index_labelled"][()]), dtype=object)
                names = _decode(h5["label_names"][()]) if "label_names" in h5 else []
                names = [names] if isinstance(names, str) else list(np.ravel(names))
                if table.ndim != 2 or len(table) != self.n_cells:
                    raise DataError(f"{self.path}: 'single_cell_index_labelled' has shape {table.shape}; expected "
                                    f"one row per cell ({self.n_cells})")
                for j in range(table.shape[1]):
                    cols[str(names[j]) if j < len(names) else f"label_{j}"] = table[:, j]
            elif self.format == "h5sc" and "obs" in h5:
                obs = h5["obs"]
                index_key = obs.attrs.get("_index", "_index")
                for key, node in obs.items():
                    if key in (index_key, "scportrait_cell_id", "cell_id"):
                        continue
                    if isinstance(node, h5py.Group) and {"codes", "categories"} <= set(node):
                        codes = np.asarray(node["codes"][()]).astype(np.int64)
                        cats = np.asarray(list(_decode(node["categories"][()])) + [None], dtype=object)
                        if codes.ndim != 1 or (codes.size and codes.max() >= len(cats) - 1):
                            raise DataError(f"{self.path}: obs column '{key}' has codes beyond its "
                                            f"{len(cats) - 1} categories")
                        values = cats[np.where(codes < 0, len(cats) - 1, codes)]  # -1: a missing value
                    elif isinstance(node, h5py.Dataset) and node.ndim == 1:
                        values = node[()]
                        values = _decode(values) if values.dtype.kind in "OS" else values
                    else:
                        continue
                    if len(values) != self.n_cells:
                        raise DataError(f"{self.path}: obs column '{key}' has {len(values)} values for "
                                        f"{self.n_cells} cells")
                    cols[key] = values
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: a per-cell annotation is not UTF-8 text ({exc.reason})") from None
        return pd.DataFrame(cols)

    # -- pixels ------------------------------------------------------------------------------------
    def resolve_channels(self, spec: Sequence[str | int] | None,
                         channel_map: Mapping[str, str] | None = None) -> list[int]:
        """Channel indices for names or indices; empty/None selects the image (non-mask) channels. Names are
        matched by :func:`match_channel` (``channel_map`` first, then exact, then case-insensitive)."""
        names = self.info.channel_names
        if not spec:
            return self.info.image_channels or list(range(len(names)))
        out = []
        for item in spec:
            if isinstance(item, str) and not item.lstrip("-").isdigit():
                out.append(match_channel(item, names, channel_map, where=str(self.path)))
            else:
                i = int(item)
                if not 0 <= i < len(names):
                    raise DataError(f"{self.path}: channel index {i} out of range 0..{len(names) - 1}")
                out.append(i)
        return out

    def read(self, start: int, stop: int, channels: Sequence[int] | None = None, check: bool = True) -> np.ndarray:
        """Rows ``start:stop`` as float32 ``(n, c, H, W)``; one contiguous read per channel."""
        if not 0 <= start <= stop <= self.n_cells:
            raise DataError(f"{self.path}: rows {start}:{stop} outside 0..{self.n_cells}")
        chans = list(range(self.info.n_channels)) if channels is None else list(channels)
        out = np.empty((stop - start, len(chans), self.info.height, self.info.width), dtype=np.float32)
        try:
            for j, c in enumerate(chans):
                out[:, j] = self._images[start:stop, c]
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read rows {start}:{stop} of '{self._images_name}' ({exc})") from None
        if check:
            bad = bad_cells(out)
            if len(bad):
                raise DataError(f"{self.path}: '{self._images_name}' row {start + int(bad[0])} holds "
                                f"{describe_cell(out[bad[0]])}; expected {PIXEL_RANGE}")
        return out

    def read_rows(self, rows: np.ndarray, channels: Sequence[int] | None = None, max_gap: int = 8) -> np.ndarray:
        """Arbitrary rows in the order given, read as contiguous runs (never h5py fancy indexing); rows up to
        ``max_gap`` apart share one read, which is cheaper than a second HDF5 call."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            c = self.info.n_channels if channels is None else len(channels)
            return np.empty((0, c, self.info.height, self.info.width), np.float32)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows) and (np.diff(rows) == 1).all():  # already one contiguous run: no gather copy
            return self.read(lo, hi, channels)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((len(rows), *self.read(0, 0, channels).shape[1:]), np.float32)
        for a, b in contiguous_runs(sorted_rows, max_gap):
            lo, hi = int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1
            block = self.read(lo, hi, channels)
            out[order[a:b]] = block[sorted_rows[a:b] - lo]
        return out

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> CellFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def contiguous_runs(sorted_rows: np.ndarray, max_gap: int = 1) -> list[tuple[int, int]]:
    """Split sorted row numbers into ``(a, b)`` position ranges whose rows are at most ``max_gap`` apart.

    Duplicated rows stay in one run. With ``max_gap > 1`` a run may span a few unused rows, which is
    still far cheaper than a separate HDF5 read.
    """
    if len(sorted_rows) == 0:
        return []
    breaks = np.nonzero(np.diff(sorted_rows) > max_gap)[0] + 1
    edges = np.concatenate([[0], breaks, [len(sorted_rows)]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


# -- writers ---------------------------------------------------------------------------------------
def _check_images(images: np.ndarray, cell_ids: np.ndarray, names: Sequence[str], kinds: Sequence[str]) -> None:
    if images.ndim != 4:
        raise DataError(f"images have shape {images.shape}; expected (N, C, H, W)")
    if len(cell_ids) != len(images):
        raise DataError(f"{len(cell_ids)} cell ids for {len(images)} images")
    if len(np.unique(cell_ids)) != len(cell_ids):
        raise DataError("cell ids are not unique")
    if len(names) != images.shape[1] or len(kinds) != images.shape[1]:
        raise DataError(f"{len(names)} channel names / {len(kinds)} kinds for {images.shape[1]} channels")


def _default_names(c: int, names: Sequence[str] | None, kinds: Sequence[str] | None) -> tuple[list[str], list[str]]:
    if names is None:
        names = THESIS_CHANNELS if c == len(THESIS_CHANNELS) else [f"ch{i}" for i in range(c)]
    if kinds is None:
        kinds = THESIS_KINDS if c == len(THESIS_KINDS) and list(names) == THESIS_CHANNELS else ["image_channel"] * c
    return list(names), list(kinds)


def _create_images(group: h5py.Group, name: str, images: np.ndarray, compression: str | None) -> h5py.Dataset:
    n, c, h, w = images.shape
    return group.create_dataset(
        name,
        data=images.astype(np.float16, copy=False),
        chunks=(1, 1, h, w) if n else None,
        compression=compression,
    )


def write_sparcspy(
    path: str | os.PathLike,
    images: np.ndarray,
    cell_ids: np.ndarray,
    channel_names: Sequence[str] | None = None,
    channel_kinds: Sequence[str] | None = None,
    labels: pd.DataFrame | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write a legacy SPARCSpy ``single_cells.h5`` atomically (float16, ``(1,1,H,W)`` chunks)."""
    names, kinds = _default_names(images.shape[1], channel_names, channel_kinds)
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    _check_images(images, cell_ids, names, kinds)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        ds = _create_images(h5, SPARCSPY_DATA, images, compression)
        ds.attrs["channel_names"] = np.array(names, dtype="S")
        ds.attrs["channel_mapping"] = np.array(kinds, dtype="S")
        h5.create_dataset(SPARCSPY_INDEX, data=np.stack([np.arange(len(cell_ids)), cell_ids], axis=1))
        if labels is not None and len(labels.columns):
            h5.create_dataset("label_names", data=np.array(list(labels.columns), dtype="S"))
            h5.create_dataset("single_cell_index_labelled", data=labels.astype(str).to_numpy().astype("S"))
    return Path(path)


def _write_anndata_frame(group: h5py.Group, index: Sequence[str], columns: dict[str, np.ndarray]) -> None:
    str_dtype = h5py.string_dtype()
    group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index"})
    group.attrs["column-order"] = np.array(list(columns), dtype=object) if columns else np.array([], dtype="S")
    idx = group.create_dataset("_index", data=np.array(list(index), dtype=object), dtype=str_dtype)
    idx.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    for name, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "OUS":
            ds = group.create_dataset(name, data=values.astype(str).astype(object), dtype=str_dtype)
            ds.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        else:
            ds = group.create_dataset(name, data=values)
            ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def write_h5sc(
    path: str | os.PathLike,
    images: np.ndarray,
    cell_ids: np.ndarray,
    channel_names: Sequence[str] | None = None,
    channel_kinds: Sequence[str] | None = None,
    obs: pd.DataFrame | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write a scPortrait ``.h5sc`` (AnnData on disk) atomically, with the metadata scPortrait's extraction writes
    (1.8.0): ``var`` indexed ``0..C-1`` with ``channels`` and ``channel_mapping`` columns, and the image stack's
    description (cell and channel counts, image size, channel names and kinds, compression) both in
    ``uns/single_cell_images`` and as attributes of ``obsm/single_cell_images``. scPortrait's readers, datasets and
    plots use these (its ``cell_grid`` needs ``n_channels``)."""
    names, kinds = _default_names(images.shape[1], channel_names, channel_kinds)
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    _check_images(images, cell_ids, names, kinds)
    n, c, h, w = images.shape
    str_dtype = h5py.string_dtype()
    description: dict[str, Any] = {
        "n_cells": n, "n_channels": c, "n_masks": kinds.count("mask"), "n_image_channels": c - kinds.count("mask"),
        "image_size_x": h, "image_size_y": w, **({"image_size": h} if h == w else {}),
        **({"compression": compression} if compression else {}),
    }
    with atomic_path(path, suffix=".h5sc") as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        columns = {"scportrait_cell_id": cell_ids}
        if obs is not None:
            columns.update({c: obs[c].to_numpy() for c in obs.columns})
        _write_anndata_frame(h5.create_group("obs"), [str(i) for i in range(n)], columns)
        _write_anndata_frame(h5.create_group("var"), [str(i) for i in range(c)],
                             {"channels": np.array(names, dtype=object), "channel_mapping": np.array(kinds, dtype=object)})
        obsm = h5.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        ds = _create_images(obsm, "single_cell_images", images, compression)
        ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        ds.attrs["channel_names"] = np.array(names, dtype=object)
        ds.attrs["channel_mapping"] = np.array(kinds, dtype=object)
        ds.attrs.update(description)
        uns = h5.create_group("uns")
        uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        uns.create_group(UNS_PREFIX.rstrip("/")).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        for key, values in (("channel_names", names), ("channel_mapping", kinds)):
            d = uns.create_dataset(f"{UNS_PREFIX}{key}", data=np.array(values, dtype=object), dtype=str_dtype)
            d.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        for key, value in description.items():
            d = (uns.create_dataset(f"{UNS_PREFIX}{key}", data=value, dtype=str_dtype) if isinstance(value, str)
                 else uns.create_dataset(f"{UNS_PREFIX}{key}", data=value))
            d.attrs.update({"encoding-type": "string" if isinstance(value, str) else "numeric-scalar",
                            "encoding-version": "0.2.0"})
        for group in ("layers", "obsp", "varm", "varp"):
            g = h5.create_group(group)
            g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return Path(path)


def write_cells(path: str | os.PathLike, images: np.ndarray, cell_ids: np.ndarray, fmt: str, **kwargs: Any) -> Path:
    """Write ``fmt`` = ``sparcspy`` or ``h5sc``."""
    if fmt == "sparcspy":
        kwargs.pop("obs", None)
        return write_sparcspy(path, images, cell_ids, **kwargs)
    if fmt == "h5sc":
        kwargs.pop("labels", None)
        return write_h5sc(path, images, cell_ids, **kwargs)
    raise DataError(f"unknown single-cell format '{fmt}' (expected 'sparcspy' or 'h5sc')")


# -- inspection ------------------------------------------------------------------------------------
def annotation_summary(table: pd.DataFrame, shown: int = 5) -> dict[str, dict[str, Any]]:
    """Each annotation column: how many distinct values, and the first ``shown`` of them in order (JSON-safe: a
    missing or non-finite value reads as null)."""
    out = {}
    for col in table.columns:
        values = pd.Series(pd.unique(table[col].dropna()))
        numbers = pd.to_numeric(values, errors="coerce")  # SPARCSpy stores numbers as text: "2.0" before "10.0"
        key = numbers if numbers.notna().all() else values.astype(str) if values.dtype == object else values
        values = values.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)
        first = [v.item() if isinstance(v, np.generic) else v for v in values.iloc[:shown]]
        out[str(col)] = {"distinct": len(values), "missing": int(table[col].isna().sum()),
                         "values": [None if isinstance(v, float) and not np.isfinite(v) else v for v in first]}
    return out


def inspect_file(path: str | os.PathLike, max_cells: int = 20_000, block: int = 1_000) -> dict[str, Any]:
    """Summary of one file; pixel checks scan up to ``max_cells`` cells in contiguous blocks spread
    over the file (all cells when the file is smaller)."""
    with CellFile(path) as f:
        info = f.info
        ids = f.cell_ids()
        warnings: list[str] = []
        n = info.n_cells
        if n and len(np.unique(ids)) != n:
            warnings.append(f"duplicated cell ids: {n - len(np.unique(ids))} repeats")
        starts = range(0, n, block) if n <= max_cells else np.linspace(0, n - block, max_cells // block).astype(int)
        nonfinite = outside = scanned = 0
        for s in starts:
            e = min(int(s) + block, n)
            x = f.read(int(s), e, check=False)
            finite = np.isfinite(x)
            nonfinite += int((~finite).sum())
            outside += int(((x < 0) | (x > 1))[finite].sum())
            scanned += e - int(s)
        if nonfinite:
            warnings.append(f"NaN/Inf present: {nonfinite} pixel values in {scanned} scanned cells")
        if outside:
            warnings.append(f"values outside [0, 1]: {outside} pixel values in {scanned} scanned cells")
        try:
            annotations = annotation_summary(f.obs_table())
        except DataError as exc:
            annotations = {}
            warnings.append(str(exc))
        return {
            "path": info.path,
            "format": info.format,
            "n_cells": n,
            "n_channels": info.n_channels,
            "height": info.height,
            "width": info.width,
            "dtype": info.dtype,
            "channel_names": info.channel_names,
            "channel_mapping": info.channel_kinds,
            "cell_id_min": int(ids.min()) if n else None,
            "cell_id_max": int(ids.max()) if n else None,
            "chunks": list(info.chunks) if info.chunks else None,
            "compression": info.compression,
            "scanned_cells": scanned,
            "annotations": annotations,
            "warnings": warnings,
        }
