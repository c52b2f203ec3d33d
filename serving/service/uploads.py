"""Uploaded files for ``POST /score_file``: SPARCSpy ``.h5`` / scPortrait ``.h5sc`` (cell ids from the file) and
``.npy`` arrays (cell ids = row positions). The format is recognised by its magic bytes, not its name.

Uploads are untrusted: HDF5 files are opened by ``training.io.hdf5.open_hdf5`` with external storage, external
links and virtual datasets refused (they would read other files on the server), and the ``ReadLimits`` (cells, side,
channels, decoded bytes, HDF5 chunk size; ``serve.max_*``) are checked from the metadata before anything is read.
Cell ids are read in blocks into one int64 array (8 bytes x at most ``serve.max_upload_cells``) and must be unique;
pixels are read ``read(start, stop)`` a chunk at a time and checked like every other input (``training.io.pixels``),
so a big file is scored and streamed with bounded memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.service.validation import RequestError, check_size, select_channels
from training.errors import DataError
from training.io.formats import CellFile
from training.io.hdf5 import ForeignData, LimitExceeded, ReadLimits
from training.io.pixels import PIXEL_RANGE, bad_cells, describe_cell
from training.uncertainty.ensemble import EnsembleSpec

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
EXPECTED = "an HDF5 single-cell file (SPARCSpy .h5 or scPortrait .h5sc) or a .npy array (N, C, H, W) / (N, H, W)"


class Upload:
    """An opened upload: ``n`` cells, their ``cell_ids`` and ``read(start, stop)`` -> model-channel float32 pixels."""

    n: int
    cell_ids: np.ndarray

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


LIMIT_NAMES = ("serve.max_upload_cells", "serve.max_image_side", "serve.max_channels", "serve.max_decoded_mb",
               "serve.max_chunk_mb")


def upload_limits(max_cells: int, max_side: int, max_channels: int, max_decoded_mb: float, max_chunk_mb: float
                  ) -> ReadLimits:
    """The ``serve.max_*`` settings as ``ReadLimits`` (their messages name the settings)."""
    mb = 2**20
    return ReadLimits(max_cells, max_side, max_channels, int(max_decoded_mb * mb), int(max_chunk_mb * mb),
                      names=LIMIT_NAMES)


class _H5Upload(Upload):
    def __init__(self, path: Path, spec: EnsembleSpec, resize: bool, limits: ReadLimits | None):
        try:
            self.file = CellFile(path, allow_external=False, limits=limits)
        except LimitExceeded as exc:
            raise RequestError("file", _strip(exc, path), status=413, kind="too_large") from None
        except ForeignData as exc:  # the names of its objects only: no CLI flag, no path written in the file
            refs = "; ".join(f"{ref.kind} '{ref.name}'" for ref in exc.refs[:3])
            raise RequestError("file", f"the upload links to data outside itself ({refs}); upload a self-contained "
                               "file", kind="external_data") from None
        except DataError as exc:
            raise RequestError("file", f"unreadable upload ({_strip(exc, path)}); expected {EXPECTED}") from None
        try:
            self.channels = self.file.resolve_channels(spec.channels)
        except DataError as exc:
            self.file.close()
            raise RequestError("file", f"{_strip(exc, path)}; the model expects channels {', '.join(spec.channels)}",
                               kind="channels") from None
        try:
            self.cell_ids = self.file.check_unique_ids()
        except (DataError, OSError) as exc:
            self.file.close()
            raise RequestError("file", _strip(exc, path), kind="cell_ids") from None
        self.n = self.file.n_cells
        try:
            check_size(np.empty((0, 1, self.file.info.height, self.file.info.width)), spec.image_size, resize, "file")
        except RequestError:
            self.file.close()
            raise

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return self.file.read(start, stop, self.channels)
        except DataError as exc:
            raise RequestError("file", _strip(exc, Path(self.file.path)), kind="pixels") from None

    def close(self) -> None:
        self.file.close()


class _NpyUpload(Upload):
    def __init__(self, path: Path, spec: EnsembleSpec, resize: bool, limits: ReadLimits | None):
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise RequestError("file", f"unreadable .npy ({_strip(exc, path)}); expected {EXPECTED}") from None
        if self.array.dtype.kind != "f":
            raise RequestError("file", f".npy of dtype {self.array.dtype}; expected float16, float32 or float64 "
                               f"pixels ({PIXEL_RANGE})")
        if self.array.ndim not in (3, 4):
            raise RequestError("file", f".npy of shape {list(self.array.shape)}; expected (N, C, H, W) or (N, H, W)")
        if limits is not None:
            self._check_limits(limits)
        self.spec = spec
        select_channels(np.empty((0, *self.array.shape[1:])), spec.channels, spec.source_channels, "file")
        check_size(np.empty((0, 1, *self.array.shape[-2:])), spec.image_size, resize, "file")
        self.n = int(self.array.shape[0])
        self.cell_ids = np.arange(self.n, dtype=np.int64)

    def _check_limits(self, limits: ReadLimits) -> None:
        shape = self.array.shape
        n, c, side = shape[0], (shape[1] if len(shape) == 4 else 1), max(shape[-2:])
        decoded = self.array.nbytes
        for value, limit, name, what in ((n, limits.max_cells, 0, f"{n} cells"), (side, limits.max_side, 1,
                                         f"images of {shape[-2]}x{shape[-1]} pixels"),
                                         (c, limits.max_channels, 2, f"{c} channels"),
                                         (decoded, limits.max_decoded_bytes, 3, f"{decoded / 2**20:.0f} MB")):
            if limit is not None and value > limit:
                raise RequestError("file", f".npy holds {what}; expected at most the limit {limits.names[name]}",
                                   status=413, kind="too_large")

    def read(self, start: int, stop: int) -> np.ndarray:
        x = select_channels(np.asarray(self.array[start:stop], dtype=np.float32), self.spec.channels,
                            self.spec.source_channels, "file")
        bad = bad_cells(x)
        if len(bad):
            raise RequestError("file", f"row {start + int(bad[0])} holds {describe_cell(x[bad[0]])}; expected "
                               f"{PIXEL_RANGE}", kind="pixels")
        return x

    def close(self) -> None:
        del self.array


def open_upload(path: str | Path, spec: EnsembleSpec, resize: bool = True, limits: ReadLimits | None = None
                ) -> Upload:
    """Open an uploaded file after sniffing its format; every problem is a ``RequestError`` on field ``file``."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise RequestError("file", f"cannot read the upload ({exc})") from None
    if not head:
        raise RequestError("file", f"the upload is empty; expected {EXPECTED}")
    if head.startswith(HDF5_MAGIC):
        upload: Upload = _H5Upload(p, spec, resize, limits)
    elif head.startswith(NPY_MAGIC):
        upload = _NpyUpload(p, spec, resize, limits)
    else:
        raise RequestError("file", f"not a recognised file (no HDF5 or NPY signature); expected {EXPECTED}",
                           status=415, kind="file_type")
    if upload.n == 0:
        upload.close()
        raise RequestError("file", "the file holds no cells; expected at least one")
    return upload


def _strip(exc: Exception, path: Path) -> str:
    """DataError messages start with the (temporary) path; the client knows its file by another name."""
    return str(exc).replace(f"{path}: ", "").replace(str(path), "<upload>")
