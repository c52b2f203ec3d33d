"""The one way an HDF5 file from elsewhere is opened: read-only, self-contained, within limits.

Three HDF5 features make a read of one file return the bytes of another on the same disk: a dataset whose raw data
lives in *external storage* (``H5Pset_external``: any file, e.g. ``/etc/passwd``), an *external link* (a name that
resolves into another HDF5 file) and a *virtual dataset* (a view assembled from datasets of other files). A file
handed to the scoring service, or scored by a user who did not write it, must not read anything but itself, so
``open_hdf5`` refuses all three unless the caller opts in (``allow_external=True``, the CLI's
``--allow-external-hdf5`` for one's own files, or ``$SPATIAL_ALLOW_EXTERNAL_HDF5=1`` which that flag sets so that
loader workers inherit it). Uploads to the HTTP service always refuse.

``ReadLimits`` are checked from metadata only (shapes, dtypes, chunk shapes), before any pixel or id is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from training.errors import DataError

ENV_ALLOW_EXTERNAL = "SPATIAL_ALLOW_EXTERNAL_HDF5"
MAX_OBJECTS = 10_000  # links walked to prove a file self-contained; our layouts have a few dozen
MB = 2**20


def external_allowed(allow_external: bool | None = None) -> bool:
    """``allow_external`` if given, else ``$SPATIAL_ALLOW_EXTERNAL_HDF5`` (``1`` / ``true``)."""
    if allow_external is not None:
        return allow_external
    return os.environ.get(ENV_ALLOW_EXTERNAL, "").strip().lower() in ("1", "true", "yes")


class ForeignRef(NamedTuple):
    """One way a file reads another: the object ``name``, the ``kind`` of reference and ``where`` it points."""

    name: str
    kind: str  # "external link" | "external raw storage" | "virtual dataset"
    where: str = ""  # "to <file>" | "in '<file>'" (a path written in the file)

    def __str__(self) -> str:
        return f"'{self.name}': {self.kind}" + (f" {self.where}" if self.where else "")


class ForeignData(DataError):
    """A file that reads other files (``refs``), refused by ``open_hdf5``."""

    def __init__(self, message: str, refs: list[ForeignRef]) -> None:
        super().__init__(message)
        self.refs = refs


def foreign_references(h5: h5py.File, max_objects: int = MAX_OBJECTS) -> list[ForeignRef]:
    """Every way ``h5`` reads another file (external links, external raw storage, virtual datasets). External links
    are reported, never followed."""
    found: list[ForeignRef] = []
    count = [0]

    def visit(name: str, link: h5py.HardLink | h5py.SoftLink | h5py.ExternalLink) -> bool | None:
        count[0] += 1
        if count[0] > max_objects:
            raise DataError(f"more than {max_objects} HDF5 objects; expected a single-cell file")
        if isinstance(link, h5py.ExternalLink):
            found.append(ForeignRef(name, "external link", f"to {link.filename}"))
        elif isinstance(link, h5py.HardLink):
            obj = h5.get(name)
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    found.append(ForeignRef(name, "virtual dataset"))
                elif obj.external:
                    found.append(ForeignRef(name, "external raw storage", f"in {obj.external[0][0]!r}"))
        return None

    h5.visititems_links(visit)
    return found


def open_hdf5(path: str | os.PathLike, allow_external: bool | None = None) -> h5py.File:
    """Open ``path`` read-only; refuse (``ForeignData`` naming the file and the objects) a file that reads other
    files, unless external data is allowed (see the module docstring)."""
    p = Path(path)
    try:
        h5 = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    if external_allowed(allow_external):
        return h5
    try:
        refs = foreign_references(h5)
    except DataError as exc:
        h5.close()
        raise DataError(f"{path}: {exc}") from None
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        h5.close()
        raise DataError(f"{path}: damaged or unreadable HDF5 structure ({exc})") from None
    if refs:
        h5.close()
        raise ForeignData(f"{path}: refers to data outside the file ({'; '.join(map(str, refs[:3]))}); expected a "
                          "self-contained file (for a trusted file of your own: --allow-external-hdf5)", refs)
    return h5


class LimitExceeded(DataError):
    """A file larger than the reader's ``ReadLimits`` (judged from its metadata; nothing was read)."""


@dataclass(frozen=True)
class ReadLimits:
    """Largest file a reader accepts, judged from metadata before reading (``None`` = no limit)."""

    max_cells: int | None = None
    max_side: int | None = None
    max_channels: int | None = None
    max_decoded_bytes: int | None = None  # the whole image dataset, decoded
    max_chunk_bytes: int | None = None  # one HDF5 storage chunk, decoded (h5py decodes whole chunks)
    names: tuple[str, str, str, str, str] = ("max_cells", "max_side", "max_channels", "max_decoded_mb",
                                             "max_chunk_mb")  # the settings a message points to

    def check_images(self, ds: h5py.Dataset, path: str) -> None:
        n, c, h, w = ds.shape
        decoded = n * c * h * w * ds.dtype.itemsize
        for value, limit, name, what in (
            (n, self.max_cells, self.names[0], f"{n} cells"),
            (max(h, w), self.max_side, self.names[1], f"images of {h}x{w} pixels"),
            (c, self.max_channels, self.names[2], f"{c} channels"),
            (decoded, self.max_decoded_bytes, self.names[3], f"{decoded / MB:.0f} MB of decoded pixels"),
        ):
            if limit is not None and value > limit:
                shown = f"{limit / MB:g} MB" if name.endswith("_mb") else str(limit)
                raise LimitExceeded(f"{path}: '{ds.name.lstrip('/')}' holds {what}; expected at most {shown} ({name})")
        self.check_chunks(ds, path)

    def check_chunks(self, ds: h5py.Dataset, path: str) -> None:
        if self.max_chunk_bytes is None or not ds.chunks:
            return
        size = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        if size > self.max_chunk_bytes:
            raise LimitExceeded(f"{path}: '{ds.name.lstrip('/')}' is stored in chunks of {size / MB:.1f} MB decoded "
                            f"(chunk shape {list(ds.chunks)}); expected at most {self.max_chunk_bytes / MB:g} MB "
                            f"({self.names[4]})")
