"""``spatial package``: the champion (or any model URI) as a self-contained Bento (registered on the main CLI by
:func:`add_commands`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.options import ModelOpt, ParamsOpt, SetOpt, check_outputs, default_model_uri, params_for, write_json


def add_commands(app: typer.Typer) -> None:
    """Register ``package`` on the ``spatial`` typer app."""

    @app.command()
    def package(
        model: ModelOpt = None,
        params: ParamsOpt = None,
        set_: SetOpt = None,
        build: Annotated[bool, typer.Option(help="build the Bento (--no-build: only the model store entry)")] = True,
        out: Annotated[Path | None, typer.Option(help="JSON with the model tag, the Bento tag, size and build time")
                       ] = None,
    ) -> None:
        """Save the model (default: the registry champion) into the BentoML model store with its registry metadata
        and build the Bento that carries it: `bentoml serve spatial:latest` then needs no registry."""
        from serving.bento.package import package as do_package

        p = params_for(params, set_)
        check_outputs(files=[out])
        repo = Path(__file__).resolve().parents[2]
        result = do_package(model or default_model_uri(p), p.mlflow, repo=repo, build=build)
        if out:
            write_json(out, result)
        made = "saved" if result["model_created"] else "already in the store"
        bento = f"; built Bento {result['bento']} ({result['bytes'] / 2**20:.1f} MB, {result['build_s']:.1f} s)" \
            if build else ""
        typer.echo(f"model {result['model']} {made}{bento}")
