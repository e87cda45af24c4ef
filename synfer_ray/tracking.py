"""MLflow: one run per job, with params, metrics and artifacts; a local SQLite store by default."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from synfer_ray.config import TrackingConfig


def tracking_uri(config: TrackingConfig) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory."""
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value
    return out


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Beside a local SQLite store, not in whatever directory the job happened to start in."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()
    return None  # a tracking server decides


class Run:
    """A thin handle over an active MLflow run (or nothing, when tracking is off)."""

    def __init__(self, mlflow_module=None, run_id: str | None = None, uri: str | None = None):
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        if self._mlflow:
            flat = {k: str(v)[:6000] for k, v in _flatten("", params, {}).items()}
            self._mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow and Path(directory).is_dir():
            self._mlflow.log_artifacts(str(directory), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow and Path(path).is_file():
            self._mlflow.log_artifact(str(path), artifact_path)

    def register_model(self, name: str, artifact_path: str, tags: dict[str, str]) -> dict | None:
        """Register the files under ``artifact_path`` of this run as a new version of ``name``."""
        if not self._mlflow:
            return None
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        client = MlflowClient(self.uri)
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # it exists: add a version
        source = f"{self._mlflow.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = client.create_model_version(name, source, run_id=self.run_id, tags=tags)
        return {"name": name, "version": version.version, "source": source}

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow:
            self._mlflow.set_tags(tags)


@contextlib.contextmanager
def start_run(config: TrackingConfig, run_name: str) -> Iterator[Run]:
    if not config.enabled:
        yield Run()
        return
    import mlflow
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(config.experiment) is None:
        mlflow.create_experiment(config.experiment, artifact_location=_artifact_root(uri, config.experiment))
    mlflow.set_experiment(config.experiment)
    # Inside another job's run (a study), this run becomes its child.
    parent = mlflow.active_run()
    with mlflow.start_run(run_name=run_name, nested=parent is not None) as active:
        yield Run(mlflow, active.info.run_id, uri)
