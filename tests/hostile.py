"""Hand-made hostile single-cell files (issue 14), shared by the library, CLI and HTTP tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from training.io.formats import write_h5sc

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"  # stands for a server-side file such as /etc/passwd


def secret_file(d: Path) -> Path:
    p = d / "passwd"
    p.write_bytes(SECRET)
    return p


def external_storage(d: Path, images: np.ndarray) -> Path:
    """A valid-looking .h5sc whose cell-id dataset's bytes live in another file (HDF5 external raw storage)."""
    n = len(SECRET)
    path = write_h5sc(d / "external_storage.h5sc", images[:n], np.arange(n))
    with h5py.File(path, "a") as h5:
        del h5["obs/scportrait_cell_id"]
        h5["obs"].create_dataset("scportrait_cell_id", shape=(n,), dtype="u1",
                                 external=[(str(secret_file(d)), 0, n)])
    return path


def external_link(d: Path, target: Path) -> Path:
    """Images and ids are external links into ``target`` (a server-side screen file)."""
    path = d / "external_link.h5sc"
    with h5py.File(path, "w") as h5:
        h5["obsm/single_cell_images"] = h5py.ExternalLink(str(target), "obsm/single_cell_images")
        h5["obs/scportrait_cell_id"] = h5py.ExternalLink(str(target), "obs/scportrait_cell_id")
    return path


def virtual_dataset(d: Path, target: Path) -> Path:
    """Images are a virtual dataset over ``target``'s images; the ids are stored in the file itself."""
    with h5py.File(target, "r") as src:
        shape, dtype, n = src["obsm/single_cell_images"].shape, src["obsm/single_cell_images"].dtype, None
        n = shape[0]
    path = d / "virtual.h5sc"
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[:] = h5py.VirtualSource(str(target), "obsm/single_cell_images", shape=shape)
    with h5py.File(path, "w") as h5:
        h5.create_virtual_dataset("obsm/single_cell_images", layout)
        h5.create_dataset("obs/scportrait_cell_id", data=np.arange(n))
    return path


def claims_many_cells(d: Path, n: int = 2 * 10**8) -> Path:
    """A few-KB file whose (never written) datasets claim ``n`` cells: reading ids or pixels would allocate GBs."""
    path = d / "claims_many.h5sc"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("obsm/single_cell_images", shape=(n, 5, 32, 32), dtype="f2", chunks=(1, 1, 32, 32))
        h5.create_dataset("obs/scportrait_cell_id", shape=(n,), dtype="i8", chunks=(65536,))
    return path


def one_big_chunk(d: Path, images: np.ndarray) -> Path:
    """Valid cells stored as ONE gzip chunk: a small file whose first read decodes the whole dataset."""
    path = d / "one_chunk.h5sc"
    write_h5sc(path, images, np.arange(len(images)))
    with h5py.File(path, "a") as h5:
        data = h5["obsm/single_cell_images"][()]
        attrs = dict(h5["obsm/single_cell_images"].attrs)
        del h5["obsm/single_cell_images"]
        ds = h5.create_dataset("obsm/single_cell_images", data=data, chunks=data.shape, compression="gzip")
        ds.attrs.update(attrs)
    return path


def duplicated_ids(d: Path, images: np.ndarray, ids: np.ndarray) -> Path:
    path = write_h5sc(d / "dup_ids.h5sc", images, ids)
    with h5py.File(path, "a") as h5:
        h5["obs/scportrait_cell_id"][1] = h5["obs/scportrait_cell_id"][0]
    return path


def out_of_range(d: Path, images: np.ndarray, ids: np.ndarray, row: int, value: float = 5.0,
                 name: str = "out_of_range.h5sc") -> Path:
    x = images.copy()
    x[row, 4, 3, 3] = value
    with np.errstate(over="ignore"):  # a value beyond float16 is written as inf, on purpose
        return write_h5sc(d / name, x, ids)
