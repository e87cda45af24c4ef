"""The user journey on a real cluster: `ray start --head` on 127.0.0.1 with token auth, the whole
flow submitted as one `ray job submit` of jobs/pipeline.py, results checked on disk and in a real
MLflow server."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import free_port
from synfer_ray.bundle import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A one-node cluster of our own, with its own temp dir, ports and auth token."""
    root = tmp_path_factory.mktemp("cluster")
    # Short: Ray's AF_UNIX socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                    *[f"{flag}={port}" for flag, port in ports.items()]],
                   env=env, check=True, capture_output=True, timeout=120)
    import requests
    try:
        deadline = time.monotonic() + 180  # the dashboard (Jobs API) comes up after `ray start` returns
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{dashboard}/api/version", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            pytest.fail("the Jobs API did not come up in 180 s")
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "root": root}
    finally:
        # `ray stop` would stop every Ray on this machine, the test session's own cluster too; stop
        # only the processes of this cluster (they all carry its temp dir on their command line).
        for process in psutil.process_iter(["cmdline"]):
            if str(temp_dir) in " ".join(process.info["cmdline"] or []):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_job_submitted_with_token_auth(head_node, mlflow_server, separable_parquet):
    root = head_node["root"]
    make_tiny_bundle(root / "bundle")
    config = {
        "generate": {"bundle": str(root / "bundle"), "output": str(root / "dataset"), "count": 64,
                     "rows_per_shard": 32, "sampling": {"steps": 4},
                     "generator": {"min_actors": 1, "max_actors": 2, "batch_size": 16},
                     "tracking": {"enabled": True, "uri": mlflow_server, "experiment": "journey"}},
        "train": {"name": "journey", "output": str(root / "train"),
                  "data": {"train": [{"path": str(root / "dataset"), "accepted_only": False}],
                           "test": {"path": str(separable_parquet["test"])}},
                  "optim": {"epochs": 2, "batch_size": 16}, "scaling": {"num_workers": 2},
                  "tracking": {"enabled": True, "uri": mlflow_server, "experiment": "journey"},
                  "register_as": "journey-model"},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    ray = str(Path(sys.executable).parent / "ray")
    submit = [ray, "job", "submit", "--address", head_node["address"], "--working-dir", str(ROOT), "--",
              "python", "jobs/pipeline.py", "--config", str(root / "pipeline.yaml")]

    # Without the token the Jobs API refuses the submission.
    anonymous = {k: v for k, v in head_node["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = subprocess.run(submit, env={**anonymous, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    done = subprocess.run(submit, env=head_node["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert "model:" in done.stdout

    assert pq.read_table(root / "dataset" / "data").num_rows == 64
    assert (root / "train" / "model" / "model.safetensors").is_file()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("journey")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs} >= {"generate", "journey"}
    trained = next(r for r in runs if r.info.run_name == "journey")
    assert "test_accuracy" in trained.data.metrics
    assert client.get_latest_versions("journey-model")[0].run_id == trained.info.run_id
