"""The strict base model, the settings every job shares (actor pools, Ray, MLflow tracking) and the
reader that turns YAML plus dotted ``key.sub=value`` overrides into a validated config.

Validation errors become :class:`SynferError` naming the dotted field, so a bad config fails before
any cluster work starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from synfer_ray.errors import SynferError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Weights and activations of a stage: auto is fp16 on CUDA and fp32 on CPU (synfer_ray.precision).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Training rows' order (synfer_ray.data.faces.shuffled): global, an all-to-all shuffle (sources sorted
# by class train correctly); blocks, block order only (cheaper, for sources already in random order).
Shuffle = Literal["global", "blocks"]


class PoolConfig(_Strict):
    """An actor pool of a generate job: how many actors, what each asks Ray for, and the batch it runs."""

    min_actors: int = Field(1, ge=1, description=(
        "Actors the pool keeps running; Ray Data starts at least this many."))
    max_actors: int = Field(2, ge=1, description=(
        "Most actors the pool may grow to while work waits; at least min_actors. With rows_per_shard null, "
        "shards are sized so each generator actor gets several."))
    num_cpus: float = Field(1.0, ge=0, description=(
        "Logical CPUs Ray reserves for each actor (fractions allowed); it decides how many actors fit on a node."))
    num_gpus: float = Field(0.0, ge=0, description=(
        "GPUs Ray reserves for each actor; above 0 the actor runs its model on CUDA, 0 runs it on CPU. "
        "Fractions (e.g. 0.5) let actors share a GPU."))
    batch_size: int = Field(16, ge=1, description=(
        "Images an actor runs through its model at once: sampled together in the generator pool, classified "
        "together in the labeler pool. Larger is faster until memory runs out; the generator pool's value is "
        "part of a dataset's identity (it changes float rounding), so a resumed dataset keeps it."))
    torch_threads: int = Field(1, ge=1, description=(
        "CPU threads PyTorch uses inside each actor; match it to num_cpus when actors run on CPU."))
    resources: dict[str, float] = Field({}, description=(
        "Custom Ray resources each actor asks for, e.g. {accelerator: 1}, to place actors on the nodes that "
        "advertise them."))

    @model_validator(mode="after")
    def _sizes(self):
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class RayConfig(_Strict):
    """Which Ray cluster a job runs on: an existing one, or a local one it starts."""

    address: str | None = Field(None, description=(
        "Address of a running Ray cluster to attach to (e.g. ray://head:10001 or auto); null: RAY_ADDRESS when "
        "set, else a local cluster started for the job."))
    # Train+Data and Data resume hang on a local cluster of only 2 logical CPUs.
    num_cpus: int | None = Field(None, ge=1, description=(
        "Logical CPUs of the local cluster started when no address is given; null: the machine's CPU count, "
        "at least 4. Keep it at 4 or more even on a smaller machine; ignored when attaching to a cluster."))


class TrackingConfig(_Strict):
    """MLflow tracking of a job: whether it logs a run, where, and under which experiment."""

    enabled: bool = Field(False, description=(
        "Log the job as an MLflow run (parameters, metrics, artifacts); false runs the job without MLflow."))
    uri: str | None = Field(None, description=(
        "MLflow tracking URI (a server URL or sqlite:///path); null: MLFLOW_TRACKING_URI when set, else "
        "mlflow.db in the working directory."))
    experiment: str = Field("synfer", description="MLflow experiment the run is logged under.")


Config = TypeVar("Config", bound=BaseModel)


def parse_value(text: str) -> Any:
    """An override's value as YAML would read it (numbers, booleans, lists, null)."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["sampling.steps=10", "data.train.0.limit=500"]`` applied to a nested dict (copied);
    a numeric part indexes into a list."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise SynferError("override", override, "KEY=VALUE with a dotted key, e.g. sampling.steps=10")
        node: Any = result
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SynferError(".".join(parts[:depth + 1]), override,
                                      f"an index below {len(node)} into the list {'.'.join(parts[:depth])}")
                part = int(part)
            elif not isinstance(node, dict):
                raise SynferError(".".join(parts[:depth + 1]), override,
                                  f"a key inside a section; {'.'.join(parts[:depth])} is a value")
            if last:
                node[part] = parse_value(value)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return result


_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
           "less_than": "< {lt}"}


def _first_error(error: ValidationError) -> SynferError:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    kind, value = first["type"], first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    if kind in _BOUNDS:
        message = "a number " + _BOUNDS[kind].format(**first.get("ctx", {}))
    elif kind == "extra_forbidden":
        message = "no such setting; check the spelling against the example configs in configs/"
    elif kind == "missing":
        message, value = "a value (this setting is required)", None
    else:
        message = message[0].lower() + message[1:]
    return SynferError(field, value, message)


def build_config(model: type[Config], raw: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """``raw`` (a parsed config) with ``overrides`` applied, validated into ``model``; the first error
    becomes a :class:`SynferError` naming its dotted field."""
    try:
        return model.model_validate(apply_overrides(raw, overrides))
    except ValidationError as error:
        raise _first_error(error) from None


def load_config(model: type[Config], path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML), apply overrides, validate into ``model``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SynferError("--config", str(path), "an existing YAML file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SynferError("--config", str(path), f"valid YAML ({error})") from None
        if not isinstance(raw, dict):
            raise SynferError("--config", str(path), "a YAML mapping of settings at the top level")
    return build_config(model, expand_environment(raw), overrides)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(value: Any) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in string values, so one config serves laptop and cluster."""
    if isinstance(value, dict):
        return {key: expand_environment(item) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_environment(item) for item in value]
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise SynferError(f"${{{name}}}", value, f"the environment variable {name} set, "
                                                         f"or a default written as ${{{name}:-DEFAULT}}")
            return default
        return _ENV_REFERENCE.sub(substitute, value)
    return value
