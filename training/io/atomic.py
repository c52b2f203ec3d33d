"""Write outputs under a temporary name and rename them into place once complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from training.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``path``, on error delete it.

    Works for files and directories alike (whatever the body writes at the yielded path). A folder replaces a folder
    and a file a file; anything else raises :class:`DataError` and leaves ``path`` as it was.
    """
    final = Path(path)
    if final.parent.exists() and not final.parent.is_dir():
        raise DataError(f"{final.parent}: is a file, not a folder; cannot write {final.name} inside it")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=suffix if suffix is not None else ".tmp", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if final.exists() and tmp.is_dir() != final.is_dir():
            kinds = ("a folder", "a file") if final.is_dir() else ("a file", "a folder")
            raise DataError(f"{final}: is {kinds[0]}; this writes {kinds[1]} there. Remove it or choose another path")
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically, through a file object: the archive's records are then named ``archive/...``
    rather than after the temporary file's random name, so the same tensors give the same bytes."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)
