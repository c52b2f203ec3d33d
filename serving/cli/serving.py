"""``spatial score`` (screen-wide batch scoring) and ``spatial serve`` (the BentoML HTTP service)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import (
    ModelOpt,
    ParamsOpt,
    ProgressOpt,
    SetOpt,
    check_outputs,
    check_port,
    default_model_uri,
    params_for,
    server_url,
    write_json,
)


def parse_map(items: list[str] | None) -> dict[str, str]:
    """``["LC3B=lc3b", ...]`` -> ``{"LC3B": "lc3b"}``; a malformed item is a ConfigError naming it."""
    from training.errors import ConfigError

    out = {}
    for item in items or []:
        model_name, sep, file_name = item.partition("=")
        if not sep or not model_name.strip() or not file_name.strip():
            raise ConfigError(f"--channel-map expects MODEL=FILE (e.g. LC3B=lc3b), got '{item}'")
        out[model_name.strip()] = file_name.strip()
    return out


def add_commands(app: typer.Typer) -> None:
    """Register ``score`` and ``serve`` on the ``spatial`` typer app."""

    @app.command()
    def score(
        files: Annotated[list[Path], typer.Argument(help="single-cell .h5 / .h5sc files")],
        out: Annotated[Path, typer.Option(help="output Parquet (parts go to `<out>.parts/` until done)")],
        model: ModelOpt = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
        ray_address: Annotated[str | None, typer.Option(
            "--ray-address", envvar="RAY_ADDRESS", help="run on this Ray cluster (e.g. auto, ray://host:10001)")] = None,
        embeddings: Annotated[bool, typer.Option("--embeddings", help="add the penultimate features")] = False,
        keep_parts: Annotated[bool, typer.Option("--keep-parts", help="keep `<out>.parts/` after assembly")] = False,
        metrics: Annotated[Path | None, typer.Option(help="JSON summary of the run")] = None,
        channel_map: Annotated[list[str] | None, typer.Option(
            "--channel-map", help="MODEL=FILE channel name (repeatable), e.g. LC3B=lc3b; over data.channel_map")] = None,
        allow_external_hdf5: Annotated[bool, typer.Option(
            "--allow-external-hdf5", help="trust FILES to read other files (HDF5 external storage, external links, "
            "virtual datasets); refused by default")] = False,
        progress: ProgressOpt = True,
    ) -> None:
        """Score every cell of FILES with the ensemble (resumable: rerun the same command to continue, also after
        fixing an input that made a run fail)."""
        from serving.batch.scoring import score_files
        from training.io.hdf5 import ENV_ALLOW_EXTERNAL

        if allow_external_hdf5:
            os.environ[ENV_ALLOW_EXTERNAL] = "1"  # inherited by loader workers and local Ray workers
        p = params_for(params, set_)
        check_outputs(files=[metrics])
        result = score_files(files, model or default_model_uri(p), out, p.score, embeddings=embeddings,
                             ray_address=ray_address or None, mlflow=p.mlflow, progress=progress,
                             keep_parts=keep_parts, channel_map={**p.data.channel_map, **parse_map(channel_map)})
        if metrics:
            write_json(metrics, result)
        resumed = f", {result['resumed_chunks']} chunk(s) from an earlier run" if result["resumed_chunks"] else ""
        if result["discarded_run"]:
            resumed += f" (parts of an earlier run with other {', '.join(result['discarded_run'])} were discarded)"
        typer.echo(f"wrote {out}: {result['n_cells']} cells from {result['files']} file(s){resumed}")

    @app.command()
    def serve(
        model: ModelOpt = None,
        host: Annotated[str | None, typer.Option(help="bind address (default serve.host = 127.0.0.1)")] = None,
        port: Annotated[int | None, typer.Option(help="port (default serve.port)")] = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Start the BentoML HTTP service (POST /score, /score_file; GET /metadata, /livez, /readyz, /metrics)."""
        from serving.model import ENV_MODEL, ENV_MODEL_DIR, ENV_MODEL_INFO, ServedModel
        from serving.service.api import ENV_SERVE_CONFIG

        p = params_for(params, set_, {"serve.host": host, "serve.port": port})
        cfg = p.serve
        check_port(cfg.host, cfg.port)
        uri = model or default_model_uri(p)
        with tempfile.TemporaryDirectory(prefix="spatial-serve-") as cache:
            served = ServedModel.resolve(uri, p.mlflow, cache_dir=cache)
            # every weight and novelty file read once here (on the CPU; the model is small): a missing or corrupt one
            # is a one-line ModelError now, not a BentoML worker that fails and restarts forever
            from training.uncertainty.ensemble import Ensemble

            Ensemble.load(served.path)
            os.environ.update({
                ENV_MODEL: uri,
                ENV_MODEL_DIR: str(served.path.resolve()),
                ENV_MODEL_INFO: json.dumps(served.info),
                ENV_SERVE_CONFIG: cfg.model_dump_json(),
            })
            os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
            import bentoml

            typer.echo(f"serving {served.info.get('name')} (version {served.info.get('version')}, classes "
                       f"{', '.join(served.classes)}) on {server_url(cfg.host, cfg.port, '')}")
            bentoml.serve("serving.service.api:SpatialScorer", host=cfg.host, port=cfg.port,
                          working_dir=str(Path(__file__).resolve().parents[2]), blocking=True)
