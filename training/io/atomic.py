"""Write outputs under a temporary name and rename them into place once complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from training.errors import DataError


def check_destination(path: str | os.PathLike, folder: bool) -> Path:
    """``path`` if a ``folder`` (else a file) can be written there; otherwise :class:`DataError`.

    Refused: an existing path of the other kind, a path under a file, and a folder this process cannot create files
    in (probed with a file created and removed at once: permission bits do not say it for root, nor for a read-only
    mount). A command checks its outputs so before its work, and a wrong ``--out`` or ``--metrics`` costs nothing;
    :func:`atomic_path` checks the kind again when it renames.
    """
    final = Path(path)
    _check_ancestors(final)
    _check_writable(final)
    _check_kind(final, folder)
    return final


def _check_kind(final: Path, folder: bool) -> None:
    if final.exists() and final.is_dir() != folder:
        kinds = ("a folder", "a file") if final.is_dir() else ("a file", "a folder")
        raise DataError(f"{final}: is {kinds[0]}; this writes {kinds[1]} there. Remove it or choose another path")


def _check_ancestors(final: Path) -> None:
    ancestor = next((a for a in final.parents if a.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise DataError(f"{ancestor}: is a file, not a folder; cannot write {final} inside it")


def _check_writable(final: Path) -> None:
    folder = next((a for a in final.parents if a.exists()), None)
    if folder is None:
        return
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DataError(f"{final}: cannot write in {folder} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``path``, on error delete it.

    Works for files and directories alike (whatever the body writes at the yielded path). A folder replaces a folder
    and a file a file; anything else raises :class:`DataError` and leaves ``path`` as it was.
    """
    final = Path(path)
    _check_ancestors(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=suffix if suffix is not None else ".tmp", dir=final.parent
        )
    except OSError as exc:  # named by the output asked for, not by the temporary name
        raise DataError(f"{final}: cannot write in {final.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        _check_kind(final, folder=tmp.is_dir())
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
