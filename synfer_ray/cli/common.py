"""What every command group shares: error reporting, ``--config`` resolution (paths and presets), AU pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from synfer_ray.errors import SynferError
from synfer_ray.presets import preset_path

# Each built-in config (synfer_ray/presets/<name>.yaml) -> the command whose --config takes it by name.
PRESETS: dict[str, str] = {
    "tiny": "generate",
    "faces-48": "train-generator",
    "tiny-generator": "train-generator",
}

def fail(error: SynferError) -> None:
    """Print the error (field, bad value, what is accepted) in red on stderr and exit with status 2."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def config_help(command: str, what: str = "YAML config path") -> str:
    """The ``--config`` help of ``command``, naming the presets it takes by name."""
    names = [name for name, job in PRESETS.items() if job == command]
    return f"{what}, or a preset name ({', '.join(names)})." if names else f"{what}."


def config_path(config: str | None) -> Path | None:
    """An existing file as given; otherwise the built-in preset of that name; otherwise the path as given
    (so that loading it reports the missing file)."""
    if config is None:
        return None
    return Path(config) if Path(config).exists() else (preset_path(config) or Path(config))


def parse_aus(pairs: list[str]) -> dict[str, float]:
    """``["AU12=0.8", ...]`` -> ``{"AU12": 0.8}``; names are checked against the bundle later."""
    aus = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            aus[name.strip()] = float(value)
        except ValueError:
            raise SynferError("--au", pair, "NAME=VALUE, e.g. --au AU12=0.8") from None
        if not sep:
            raise SynferError("--au", pair, "NAME=VALUE, e.g. --au AU12=0.8")
    return aus
