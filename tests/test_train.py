"""FER training end to end: 2 Ray Train workers, DeepSpeed ZeRO-2, a real MLflow server on
127.0.0.1, a worker killed mid-run, corrupt images in the data."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import WorkerKiller
from synfer_ray.cli import app
from synfer_ray.config import TrainConfig, build_config
from synfer_ray.errors import SynferError
from synfer_ray.train.fer import run_train

# Enough epochs that the worker killed 4 s after the first checkpoint dies mid-run: with the decoded
# rows kept in the object store an epoch of these 280 rows takes 1-2 s on a 2-core machine.
EPOCHS = 15


def train_raw(faces: dict[str, Path], output: Path, tracking_uri: str | None) -> dict:
    return {
        "name": "fer-test", "output": str(output),
        "data": {"train": [{"path": str(faces["train"])}], "test": {"path": str(faces["test"])},
                 "val_fraction": 0.15},
        "optim": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.003, "zero_stage": 2},
        "scaling": {"num_workers": 2, "max_failures": 2},
        "tracking": {"enabled": tracking_uri is not None, "uri": tracking_uri, "experiment": "fer-test"},
        "register_as": "fer-test-model",
    }


@pytest.fixture(scope="module")
def trained(ray_cluster, separable_parquet, mlflow_server, tmp_path_factory):
    """One run; a training worker is SIGKILLed after the first checkpoint is registered."""
    output = tmp_path_factory.mktemp("train") / "run"
    with WorkerKiller(lambda: any((output / "ray" / "fer-test").glob("checkpoint_*"))) as killer:
        summary = run_train(build_config(TrainConfig, train_raw(separable_parquet, output, mlflow_server)))
    killed = killer.killed
    return summary, output, killed


@pytest.mark.slow
def test_loss_falls_and_test_accuracy_is_well_above_chance(trained):
    summary, output, _ = trained
    losses = [row["train_loss"] for row in summary["history"]]
    assert losses[-1] < losses[0]
    assert summary["test"]["accuracy"] > 0.5  # chance is 1/7
    assert all(0 <= row["data_wait_seconds"] < row["train_seconds"] for row in summary["history"])
    assert (output / "model" / "model.safetensors").is_file()
    assert (output / "eval" / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(trained):
    summary, _, killed = trained
    assert killed, "no training worker was killed"
    epochs = [int(row["epoch"]) for row in summary["history"]]
    # Resumed, not restarted: every epoch reported once, in order.
    assert epochs == sorted(set(epochs)) and epochs[-1] == EPOCHS - 1


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted(trained):
    summary, _, _ = trained
    skipped = [int(row["skipped_images"]) for row in summary["history"]]
    assert all(0 < s <= 5 for s in skipped)  # 5 corrupt rows; some may fall in the validation split


@pytest.mark.slow
def test_mlflow_server_has_params_metrics_artifacts_and_the_registered_model(trained, mlflow_server):
    from mlflow.tracking import MlflowClient
    summary, _, _ = trained
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["config.optim.zero_stage"] == "2"
    assert "lineage.train.0" in run.data.params
    # Epochs redone after the worker loss are logged again at the same step.
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")} == set(range(EPOCHS))
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval", "model", "train_config.json", "summary.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.safetensors",
                                                                                 "model/config.json"}
    version = client.get_model_version("fer-test-model", summary["registered"]["version"])
    assert version.run_id == run.info.run_id and version.tags["lineage.train.0"] == summary["lineage"][
        "lineage.train.0"]


@pytest.mark.slow
def test_evaluate_command_reproduces_the_test_figures(trained, separable_parquet, tmp_path):
    summary, output, _ = trained
    result = CliRunner().invoke(app, ["evaluate", str(output / "model"), str(separable_parquet["test"]),
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert f"accuracy {summary['test']['accuracy']:.4f}" in result.output
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()


def test_finished_output_is_refused(tmp_path, separable_parquet):
    (tmp_path / "done" / "model").mkdir(parents=True)
    with pytest.raises(SynferError, match="^output: .*--overwrite"):
        run_train(build_config(TrainConfig, train_raw(separable_parquet, tmp_path / "done", None)))


def test_unknown_labels_are_refused_before_ray(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synfer_ray import pipeline
    monkeypatch.setattr(pipeline, "ensure_ray", lambda *_: pytest.fail("Ray was started"))
    pq.write_table(pa.table({"image": [b"x"], "label": ["bored"]}), tmp_path / "bad.parquet")
    raw = train_raw({"train": tmp_path / "bad.parquet", "test": tmp_path / "bad.parquet"}, tmp_path / "o", None)
    with pytest.raises(SynferError, match=r"data.train\[0\].path \(label column\): got 'bored'"):
        run_train(build_config(TrainConfig, raw))
