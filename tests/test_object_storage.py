"""Object storage end to end: datasets, training sources, Ray Train checkpoints and MLflow artifacts
on ``s3://`` URIs, against an S3 server (moto) on 127.0.0.1.

Everything runs as the commands a user types, on a Ray cluster of its own whose processes carry
the standard AWS_* variables (as every node of a real cluster must): the session's in-process
cluster may have started before this module set them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from synfer_ray.data.shards import ShardPlan, ShardStore
from test_generate import settled_commits

BUCKET = "synfer-test"
COUNT, PER_SHARD = 40, 2  # twenty shards: the kill lands long before the last one
pytestmark = pytest.mark.slow


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
    pytest.fail(f"nothing listened on 127.0.0.1:{port} within {seconds} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen, seconds: float = 30) -> None:
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=seconds)


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """An S3 server (moto) on a free loopback port with one bucket; the AWS_* variables that point
    pyarrow, boto3 and MLflow at it are set in this process and returned for subprocesses."""
    import boto3
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    log = root / "moto.log"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # no credential lookups off the machine
    try:
        _wait_for_port(port, server, log, 60)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield env
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def commands_env(s3_env):
    """The environment of every command (and of the Ray cluster and the MLflow server)."""
    return {**os.environ, **s3_env, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


_RAY_HEAD = textwrap.dedent("""
    import pathlib, sys
    import ray
    ray.init(num_cpus=4, object_store_memory=1 << 30, include_dashboard=False, _node_ip_address="127.0.0.1")
    pathlib.Path(sys.argv[1]).write_text(ray.get_runtime_context().gcs_address)
    sys.stdin.read()  # until the test closes it
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def ray_address(commands_env, tmp_path_factory):
    """A local Ray cluster started with the S3 variables, held by a small driver until the module ends."""
    root = tmp_path_factory.mktemp("ray-s3")
    address_file, log = root / "address", root / "head.log"
    head = subprocess.Popen([sys.executable, "-c", _RAY_HEAD, str(address_file)], env=commands_env,
                            stdin=subprocess.PIPE, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists() or not address_file.read_text():
            assert head.poll() is None, log.read_text()
            if time.monotonic() > deadline:
                pytest.fail(f"Ray did not start in 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield address_file.read_text()
    finally:
        head.stdin.close()  # the driver shuts its cluster down
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _stop(head)


@pytest.fixture(scope="module")
def mlflow_s3(commands_env, tmp_path_factory):
    """`mlflow server` on loopback whose artifact root is on S3: clients write artifacts there directly."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    port = free_port()
    log = root / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
         f"s3://{BUCKET}/mlflow", "--no-serve-artifacts", "--workers", "1"],
        env=commands_env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, server, log, 90)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(server)


def synfer(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "synfer_ray.cli", *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def generate_config(path: Path, bundle: Path, output: str, tracking_uri: str | None) -> Path:
    raw = {"bundle": str(bundle), "output": output, "count": COUNT, "seed": 5, "rows_per_shard": PER_SHARD,
           "sampling": {"steps": 4, "sg_scale": 0.0}, "labeling": {"voters": []},
           "generator": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 8, "torch_threads": 1},
           "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
           "tracking": {"enabled": tracking_uri is not None, "uri": tracking_uri, "experiment": "s3-generate"}}
    path.write_text(yaml.safe_dump(raw))
    return path


def read_bytes(store: ShardStore, *parts: str) -> bytes:
    with store.fs.open_input_stream(store.path(*parts)) as stream:
        return stream.read()


def images_by_id(location: str) -> dict[int, bytes]:
    import pyarrow.parquet as pq
    table = pq.read_table(f"{location}/data", columns=["sample_id", "image"])
    return dict(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist()))


@pytest.fixture(scope="module")
def generated(commands_env, ray_address, mlflow_s3, tiny_bundle_path, tmp_path_factory):
    """A local reference run; then a run to s3:// whose driver is SIGKILLed after its first commit,
    and the same command again."""
    tmp_path = tmp_path_factory.mktemp("generate-s3")
    reference = str(tmp_path / "reference")
    synfer(["generate", "--config", str(generate_config(tmp_path / "local.yaml", tiny_bundle_path, reference, None)),
            f"ray.address={ray_address}"], commands_env)
    output = f"s3://{BUCKET}/ds"
    config = generate_config(tmp_path / "s3.yaml", tiny_bundle_path, output, mlflow_s3)
    command = [sys.executable, "-m", "synfer_ray.cli", "generate", "--config", str(config),
               f"ray.address={ray_address}"]
    driver = subprocess.Popen(command, env=commands_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plan, store = ShardPlan(COUNT, PER_SHARD), ShardStore(output)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None and not store.committed(plan):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    survivors = settled_commits(store, plan)
    before = {k: read_bytes(store, "data", plan.file_name(k)) for k in survivors}
    synfer(["generate", "--config", str(config), f"ray.address={ray_address}"], commands_env)
    return {"reference": reference, "output": output, "store": store, "plan": plan, "survivors": survivors,
            "before": before}


def test_generate_to_s3_resumes_after_a_killed_driver_to_the_rows_of_an_uninterrupted_run(generated):
    store, plan, survivors = generated["store"], generated["plan"], generated["survivors"]
    assert 0 < len(survivors) < plan.num_shards, "the kill should land mid-run"
    card = store.read_json("dataset.json")
    made_before = sum(plan.rows(k)[1] - plan.rows(k)[0] for k in survivors)
    assert card["rows"] == COUNT and card["timing"]["rows_made_this_run"] == COUNT - made_before
    for k, data in generated["before"].items():  # finished shards were not redone
        assert read_bytes(store, "data", plan.file_name(k)) == data
    assert images_by_id(generated["output"]) == images_by_id(generated["reference"])
    assert store.exists("report", "contact_sheet.png") and store.exists("_shards", "index.json")


def test_inspect_reads_the_s3_dataset_and_finds_no_problem(generated, commands_env):
    result = synfer(["inspect", generated["output"]], commands_env, timeout=120)
    assert "all shards intact" in result.stdout and f"rows {COUNT} / requested {COUNT}" in result.stdout


@pytest.fixture(scope="module")
def trained(generated, commands_env, ray_address, mlflow_s3, separable_parquet, tmp_path_factory):
    """`synfer train` reading real faces and the generated dataset from S3, checkpointing to S3,
    logging artifacts to S3 through MLflow."""
    import pyarrow.fs as pafs
    for name in ("train", "test"):
        pafs.copy_files(str(separable_parquet[name]), f"s3://{BUCKET}/faces/{name}.parquet")
    raw = {"name": "s3-fer", "output": f"s3://{BUCKET}/train",
           "data": {"train": [{"path": f"s3://{BUCKET}/faces/train.parquet"},
                              {"path": generated["output"], "limit": 20}],
                    "test": {"path": f"s3://{BUCKET}/faces/test.parquet"}, "val_fraction": 0.15},
           "optim": {"epochs": 1, "batch_size": 32, "lr": 0.003, "zero_stage": 2},
           "scaling": {"num_workers": 2, "max_failures": 0},
           "ray": {"address": ray_address},
           "tracking": {"enabled": True, "uri": mlflow_s3, "experiment": "s3-train"},
           "register_as": "s3-fer"}
    config = tmp_path_factory.mktemp("train-s3") / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = synfer(["train", "--config", str(config)], commands_env, timeout=500)
    store = ShardStore(raw["output"])
    return store, store.read_json("summary.json"), result.stdout


def test_train_reads_s3_sources_and_writes_checkpoints_model_and_report_to_s3(trained):
    import pyarrow.fs as pafs
    store, summary, stdout = trained
    assert f"model: s3://{BUCKET}/train/model" in stdout and summary["model"] == f"s3://{BUCKET}/train/model"
    assert summary["test"]["rows"] == 70 and [row["epoch"] for row in summary["history"]] == [0]
    assert summary["history"][0]["train_rows"] > 0
    assert len(summary["lineage"]) == 3  # two training sources and the test set, each hashed
    for name in ("model/model.safetensors", "model/config.json", "eval/confusion_matrix.png",
                 "train_config.json", "summary.json"):
        assert store.exists(name), name
    run_dir = store.path("ray", "s3-fer")
    names = {info.base_name for info in store.fs.get_file_info(pafs.FileSelector(run_dir))}
    assert any(name.startswith("checkpoint_") for name in names), names  # Ray Train's storage is on S3


def test_mlflow_artifacts_and_registered_model_live_on_s3(trained, mlflow_s3):
    from mlflow.tracking import MlflowClient
    _, summary, _ = trained
    client = MlflowClient(mlflow_s3)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.safetensors",
                                                                                 "model/config.json"}
    store = ShardStore(run.info.artifact_uri)
    assert store.exists("model", "model.safetensors") and store.exists("summary.json")
    [version] = client.search_model_versions("name='s3-fer'")
    assert version.run_id == run.info.run_id and version.source == f"{run.info.artifact_uri}/model"
    generate_runs = client.search_runs([client.get_experiment_by_name("s3-generate").experiment_id])
    assert any(ShardStore(r.info.artifact_uri).exists("report", "contact_sheet.png") for r in generate_runs)
