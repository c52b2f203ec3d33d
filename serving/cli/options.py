"""Shared pieces of every ``spatial`` command: the ``--params/--set/--progress`` options and small helpers.

Command modules import from here; nothing outside ``serving.cli`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from training.config import Params, load_params
from training.errors import DataError

ParamsOpt = Annotated[Path | None, typer.Option("--params", help="params YAML (default: ./params.yaml if present)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a param: key=value (repeatable)")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="ensemble directory or models:/NAME@ALIAS (default $SPATIAL_MODEL, else "
    "models:/<registry.model_name>@<registry.alias>)")]


def params_for(path: Path | None, overrides: list[str] | None, options: dict[str, object] | None = None) -> Params:
    """The params of a command: ``path`` (default ``./params.yaml``), then ``--set`` overrides, then ``options``:
    command-line options that stand for a param (``{"serve.port": port}``; None = not given). Options are validated
    as ``--set`` is, so ``--port 99999`` is the same clear error as ``--set serve.port=99999``."""
    if path is None and Path("params.yaml").is_file():
        path = Path("params.yaml")
    given = [f"{key}={json.dumps(value)}" for key, value in (options or {}).items() if value is not None]
    return load_params(path, [*(overrides or []), *given])


def default_model_uri(p: Params) -> str:
    from training.tracking import default_model_uri as from_registry

    return from_registry(p.registry)


def check_at_least_one(**options: int) -> None:
    """A clear error (exit 2) for a count option below 1, named as on the command line (``max_cells`` ->
    ``--max-cells``)."""
    for name, value in options.items():
        if value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_outputs(folders: Iterable[str | Path | None] = (), files: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before a command does its work, outputs it could only fail to write at the end: a file where a folder
    goes, a folder where a file goes, a path under a file (None = an output not asked for)."""
    from training.io.atomic import check_destination

    for folder, paths in ((True, folders), (False, files)):
        for path in paths:
            if path is not None:
                check_destination(path, folder)


def check_port(host: str, port: int) -> None:
    """Refuse now, before a model is loaded, an address a server could not listen on (the port taken, the host not
    this machine's): the servers would fail later, uvicorn with its own exit code, BentoML after its workers start."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise DataError(f"--host {host}: {exc.strerror}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a closing port is free
        try:
            probe.bind(address)
        except OSError as exc:
            raise DataError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") from None


def server_url(host: str, port: int, path: str = "/") -> str:
    """Where a server bound to ``host:port`` answers, for the line that announces it: a wildcard bind (0.0.0.0, ::)
    names this machine's host name and the loopback address (BentoML's own log says localhost for both)."""
    import socket

    if host in ("0.0.0.0", "::", ""):
        loopback = "127.0.0.1" if host != "::" else "[::1]"
        return (f"http://{socket.gethostname()}:{port}{path} (every interface; http://{loopback}:{port}{path} on "
                "this machine)")
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def _finite_or_null(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: object) -> None:
    """``obj`` as strict JSON: NaN and inf (an interval from one seed, a metric without data) become ``null``, which
    every JSON reader takes; ``NaN`` is not JSON."""
    from training.io.atomic import atomic_path

    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(text + "\n")


def load_split_table(p: Params, splits: Path | None, manifest: Path | None, out_dir: Path) -> tuple:
    """The split table: from ``--splits`` (a ``spatial split`` output) or built now from ``--manifest``."""
    from training.data.cellindex import build_index
    from training.data.splits import make_splits, read_splits
    from training.io.tables import write_table

    if manifest is not None:
        from training.data.labels import current_labels

        table, summary = make_splits(build_index(manifest, progress=False), p.split,
                                     current_labels(p.label.labels), p.label.labels)
        write_table(table, out_dir.parent / f"{out_dir.name}.splits.parquet", summary)
        return table, summary
    return read_splits(splits or p.split.out, p.split)
