"""The ``synfer`` command line. Each command parses its options once and calls one library function.

One module per command group, registered on :data:`app` here:

- ``generate``: generate, generate-one, inspect, score, demo
- ``train``: train, train-generator, train-labeler, train-adapter, evaluate
- ``study``: study, pipeline (jobs made of other jobs)
- ``serve``: serve
- ``bundle``: the ``synfer bundle`` group; ``data``: the ``synfer data`` group
- ``common``: error reporting, ``--config`` resolution (paths and presets), AU pairs
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

import synfer_ray
from synfer_ray.cli import bundle, data, generate, serve, study, train
from synfer_ray.cli.common import PRESETS

__all__ = ["COMMAND_CONFIGS", "PRESETS", "app", "click_command", "main"]

app = typer.Typer(help="Make labelled synthetic facial-expression datasets with SynFER, on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for group in (generate, train, study, serve):
    app.add_typer(group.app)
app.add_typer(bundle.app, name="bundle")
app.add_typer(data.app, name="data")

# Each command that reads --config plus key=value overrides -> its job name in synfer_ray.config.JOB_CONFIGS
# (the model the file and overrides are validated into). A --config also takes a preset by name: PRESETS.
COMMAND_CONFIGS: dict[str, str] = {
    "generate": "generate",
    "train": "train",
    "train-generator": "train-generator",
    "train-labeler": "train-labeler",
    "train-adapter": "train-adapter",
    "serve": "serve",
    "study": "study",
    "pipeline": "pipeline",
}


def _installed_version() -> str:
    try:
        return version("synfer-ray")
    except PackageNotFoundError:  # run from a checkout on sys.path (jobs/), not installed
        return synfer_ray.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"synfer-ray {_installed_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print the installed synfer-ray version and exit."),
) -> None:
    pass


def click_command():
    """The whole command tree as a Click group (Typer's own Click), for generating the CLI reference."""
    return typer.main.get_command(app)


def main() -> None:
    app()
