"""Uploaded files for ``POST /score_file``: SPARCSpy ``.h5`` / scPortrait ``.h5sc`` (cell ids from the file) and
``.npy`` arrays (cell ids = row positions). The format is recognised by its magic bytes, not its name.

Reads are chunked (``read(start, stop)``), so a big file is scored and streamed with bounded memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.service.validation import RequestError, check_size, select_channels
from training.errors import DataError
from training.io.formats import CellFile
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


class _H5Upload(Upload):
    def __init__(self, path: Path, spec: EnsembleSpec, resize: bool):
        try:
            self.file = CellFile(path)
        except DataError as exc:
            raise RequestError("file", f"unreadable upload ({_strip(exc, path)}); expected {EXPECTED}") from None
        try:
            self.channels = self.file.resolve_channels(spec.channels)
            self.cell_ids = self.file.cell_ids()
        except DataError as exc:
            self.file.close()
            raise RequestError("file", f"{_strip(exc, path)}; the model expects channels {', '.join(spec.channels)}",
                               kind="channels") from None
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
    def __init__(self, path: Path, spec: EnsembleSpec, resize: bool):
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise RequestError("file", f"unreadable .npy ({exc}); expected {EXPECTED}") from None
        if self.array.dtype.kind not in "iuf":
            raise RequestError("file", f".npy of dtype {self.array.dtype}; expected numbers (float16/float32)")
        if self.array.ndim not in (3, 4):
            raise RequestError("file", f".npy of shape {list(self.array.shape)}; expected (N, C, H, W) or (N, H, W)")
        self.spec = spec
        select_channels(np.empty((0, *self.array.shape[1:])), spec.channels, spec.source_channels, "file")
        check_size(np.empty((0, 1, *self.array.shape[-2:])), spec.image_size, resize, "file")
        self.n = int(self.array.shape[0])
        self.cell_ids = np.arange(self.n, dtype=np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        x = select_channels(np.asarray(self.array[start:stop], dtype=np.float32), self.spec.channels,
                            self.spec.source_channels, "file")
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            raise RequestError("file", f"row {start + int(np.flatnonzero(~finite)[0])} holds NaN or Inf pixels; "
                               "expected finite values in [0, 1]", kind="pixels")
        return x

    def close(self) -> None:
        del self.array


def open_upload(path: str | Path, spec: EnsembleSpec, resize: bool = True) -> Upload:
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
        upload: Upload = _H5Upload(p, spec, resize)
    elif head.startswith(NPY_MAGIC):
        upload = _NpyUpload(p, spec, resize)
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
