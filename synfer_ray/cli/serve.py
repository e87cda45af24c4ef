"""``synfer serve``: the generator over HTTP on Ray Serve."""

from __future__ import annotations

from pathlib import Path

import typer

from synfer_ray.cli.common import config_help, config_path, fail
from synfer_ray.errors import SynferError

app = typer.Typer()


@app.command("serve")
def serve(
    config: str = typer.Option(..., "--config", "-c", help=config_help("serve", "YAML ServeConfig path")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. port=8080 max_images=4."),
) -> None:
    """Serve the generator over HTTP with Ray Serve (binds 127.0.0.1 unless host says otherwise)."""
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.config import ServeConfig, load_config
    from synfer_ray.serve import run_serve
    try:
        parsed = load_config(ServeConfig, config_path(config), overrides or [])
        BundleManifest.read(Path(parsed.bundle))  # a missing bundle fails here, not in a replica
        run_serve(parsed)
    except SynferError as error:
        fail(error)
