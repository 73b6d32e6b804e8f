"""The `clotho-retrieve` command line: a thin Typer layer over the pipeline's Python functions.

This package holds the app, the ``command`` decorator and the workspace option; the commands live in
one module per part of the pipeline (data.py: download, demo-data, features, merge; models.py: train,
evaluate, table, explain; search.py: embed, index, export, query, status, serve). Each command imports
its stage lazily, so `--help` and `query` start fast. Every stage raises :class:`ClothoRetrieveError`
for problems the user can act on; the ``command`` decorator turns that into one red line on stderr and
exit status 1 (set ``CLOTHO_RETRIEVE_DEBUG=1`` to see the traceback instead).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer

from clotho_retrieve import __version__
from clotho_retrieve.utils import ClothoRetrieveError, err_console, one_line

app = typer.Typer(
    name="clotho-retrieve",
    help=(
        "Language-based audio retrieval on Clotho (Xiao et al., 2023).\n\n"
        "Pipeline: download -> features -> train -> evaluate -> embed -> query.\n"
        "Offline demo data: demo-data. The paper's Table I: table."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _fail(message: str) -> typer.Exit:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def command(name: str, **kwargs):
    """Register a CLI command that reports ClothoRetrieveError (and a failed disk write: full disk,
    no permission) as one line and exit status 1; set CLOTHO_RETRIEVE_DEBUG=1 for the traceback."""

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            from clotho_retrieve.safety import NO_SPACE, errno_of, is_write_error, no_space

            try:
                return fn(*args, **kw)
            except ClothoRetrieveError as exc:
                if os.environ.get("CLOTHO_RETRIEVE_DEBUG"):
                    raise
                raise _fail(str(exc)) from None
            except (OSError, RuntimeError) as exc:
                if os.environ.get("CLOTHO_RETRIEVE_DEBUG") or not is_write_error(exc):
                    raise
                where = getattr(exc, "filename", None) or name
                if errno_of(exc) in NO_SPACE:
                    raise _fail(str(no_space(where, None, f"what `{name}` writes"))) from None
                raise _fail(f"{where}: {getattr(exc, 'strerror', None) or one_line(exc)}") from None
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/]: finished work is kept; re-run the same command "
                                  "to resume")
                raise typer.Exit(130) from None

        return app.command(name, **kwargs)(wrapper)

    return decorator


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clotho-retrieve {__version__}")
        raise typer.Exit()


_workspace_root: Path | None = None  # --workspace, set by the root callback before any command runs


@app.callback()
def _root(
    version: bool | None = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    workspace: Path | None = typer.Option(
        None,
        "--workspace",
        "-w",
        help="Workspace folder (default: $CLOTHO_RETRIEVE_WORKSPACE, else the current folder): Clotho in "
        "data/clotho, features in data/features, runs in runs/, indexes in indexes/.",
    ),
) -> None:
    """Language-based audio retrieval on Clotho."""
    global _workspace_root
    _workspace_root = workspace


def _ws():
    """The workspace every stage takes its default inputs and outputs from (see workspace.py)."""
    from clotho_retrieve.workspace import Workspace

    return Workspace(_workspace_root)


# ----------------------------------------------------------------------------------------------
# download  (owned by clotho_retrieve/download.py)


def main() -> None:
    try:
        app(prog_name="clotho-retrieve")
    except SystemExit as exc:
        from clotho_retrieve.safety import hard_exit, hdf5_poisoned

        if hdf5_poisoned():  # an HDF5 file whose writes failed: HDF5's clean-up at exit could crash on it
            hard_exit(exc.code if isinstance(exc.code, int) else 1)
        raise


# The commands register themselves on `app` when imported, in pipeline order.
from clotho_retrieve.cli import data, models, search  # noqa: E402, F401
