"""Built-in configs, usable by name wherever a config path is taken (``--config tiny``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def preset_path(name: str) -> Path | None:
    candidate = resources.files(__package__) / f"{name}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None
