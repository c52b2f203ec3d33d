"""The ``spatial`` console entry: one typer app; each command module adds its commands to it.

User errors (:class:`training.errors.SpatialError`), usage errors (typer's own click: an unknown option, a
missing or mistyped value) and what the system refuses (:class:`OSError`: permission denied, disk full, a file name too
long) exit with code 2 and a message, without a traceback.
"""

from __future__ import annotations

import sys

import typer

from serving.cli import active, data, discover, label, package, screen, serving, studies, train, tuning
from training.errors import SpatialError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",  # a docstring's wrapped lines join; `code` renders as code
                  help="spatiAL: label-efficient phenotyping of SPARCS single-cell screens.")
for module in (data, train, active, serving, package, tuning, screen, discover, studies, label):
    module.add_commands(app)


def main() -> None:
    """Console entry point: user errors -> one line on stderr, exit code 2."""
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except (SpatialError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors (an unknown option, a missing or mistyped value)
        if hasattr(exc, "show"):
            exc.show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
