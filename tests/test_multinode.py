"""A real 3-node Ray cluster (head + 2 workers, each in its own network namespace) losing a node
while it generates, trains and serves. Skips, saying what is missing, without root or `ip netns`."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from synfer_ray.bundle import make_tiny_bundle
from synfer_ray.train.fer import STATE_NAME

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]
# Enough that the node lost after the first checkpoint is lost mid-run: with the decoded rows kept in
# the object store (data.cache) an epoch takes seconds (it took 2 min reading them again each epoch).
EPOCHS = 8


def _netns():
    # A script, not a package module: import it from its folder.
    sys.path.insert(0, str(ROOT / "cluster" / "local"))
    import netns_cluster
    return netns_cluster


netns = _netns()


@pytest.fixture(scope="module")
def cluster():
    problem = netns.missing_requirements()
    if problem:
        pytest.skip(f"the multi-node tests need root and `ip netns`: {problem}")
    # The head has no accelerator: work that asks for one lands on the two worker nodes.
    made = netns.up(3, cpus=[2, 2, 2], resources=[{}, {"accelerator": 1}, {"accelerator": 1}])
    try:
        yield made
    finally:
        netns.down(made.state_file)


def replace_node(cluster, index: int) -> None:
    """A lost node comes back as a fresh machine (new temp dir), and the cluster sees 3 nodes again."""
    node = cluster.nodes[index]
    cluster.kill_node(node)
    node.temp_dir = f"{node.temp_dir}r"
    Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
    cluster.start_node(node)
    cluster.wait_for_nodes(len(cluster.nodes))


def submit(cluster, entrypoint: list[str]) -> str:
    result = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
                             cluster.dashboard_url, "--working-dir", str(ROOT), "--no-wait", "--", *entrypoint],
                            env=cluster.client_env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return next(line.split("'")[1] for line in result.stdout.splitlines() if "submitted successfully" in line)


def job_status(cluster, job_id: str) -> str:
    """The job's status through the Jobs SDK (the CLI's wording differs per state), in a
    subprocess so that the token client's environment stays out of this test process."""
    script = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
              "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    result = subprocess.run([sys.executable, "-c", script, cluster.dashboard_url, job_id], env=cluster.client_env(),
                            capture_output=True, text=True, timeout=60)
    lines = result.stdout.split()
    return lines[-1] if result.returncode == 0 and lines else "UNKNOWN"


def stop_job(cluster, job_id: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "stop", "--address", cluster.dashboard_url,
                    job_id], env=cluster.client_env(), capture_output=True, text=True, timeout=120)


def wait_for_job(cluster, job_id: str, timeout: float = 600) -> str:
    """The job's final status; a job still running at the deadline is stopped and reported as such."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(cluster, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(3)
    stop_job(cluster, job_id)
    return f"still running after {timeout} s (stopped)"


def job_logs(cluster, job_id: str) -> str:
    result = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "logs", "--address",
                             cluster.dashboard_url, job_id], env=cluster.client_env(), capture_output=True, text=True,
                            timeout=60)
    return result.stdout[-3000:]


def wait_until(predicate, timeout: float, what: str, cluster=None, job_id: str | None = None) -> None:
    """Until ``predicate()`` holds; fails at once, with the job's log, if ``job_id`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job_id and job_status(cluster, job_id) in ("FAILED", "STOPPED"):
            pytest.fail(f"the job ended before {what}:\n{job_logs(cluster, job_id)}")
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout} s" + (f"; the job's log:\n{job_logs(cluster, job_id)}"
                                                                 if job_id else ""))


def test_generation_survives_losing_a_worker_node(cluster):
    from synfer_ray.generate import inspect_dataset
    shared = Path(cluster.shared)
    make_tiny_bundle(shared / "bundle")
    output = shared / "generated"
    config = {"bundle": str(shared / "bundle"), "output": str(output), "count": 96, "rows_per_shard": 8,
              "sampling": {"steps": 4},
              "generator": {"min_actors": 2, "max_actors": 2, "batch_size": 8, "resources": {"accelerator": 1}},
              "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "batch_size": 8},
              "tracking": {"enabled": False}}
    (shared / "generate.yaml").write_text(yaml.safe_dump(config))
    job = submit(cluster, ["python", "jobs/generate.py", "--config", str(shared / "generate.yaml")])
    wait_until(lambda: len(list((output / "data").glob("*.parquet"))) >= 2, 300, "two committed shards",
               cluster, job)
    killed = cluster.kill_node(cluster.nodes[2])  # one of the two generator actors lived there
    assert killed > 0
    time.sleep(5)
    replace_node(cluster, 2)  # as an autoscaler would: the lost actor's resources come back
    status = wait_for_job(cluster, job)
    resubmitted = status != "SUCCEEDED"
    if resubmitted:  # the documented recovery: run the same job again; finished shards are kept
        status = wait_for_job(cluster, submit(cluster, ["python", "jobs/generate.py", "--config",
                                                        str(shared / "generate.yaml")]))
    assert status == "SUCCEEDED", status
    table = pq.read_table(output / "data")
    ids = table.column("sample_id").to_pylist()
    print(f"generation: {table.num_rows} rows, {len(ids) - len(set(ids))} duplicates, "
          f"resubmitted={resubmitted}, processes killed on the lost node: {killed}")
    assert sorted(ids) == list(range(96))  # exactly the requested rows, no duplicates
    assert inspect_dataset(str(output))[1] == []  # no torn shard


def test_training_resumes_on_shared_storage_after_losing_a_node(cluster, separable_parquet):
    shared = Path(cluster.shared)
    output = shared / "train"
    config = {
        "name": "multinode", "output": str(output),
        "data": {"train": [{"path": str(separable_parquet["train"])}], "test": {"path": str(separable_parquet["test"])},
                 "val_fraction": 0.15},
        "optim": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.003, "zero_stage": 2},
        "scaling": {"num_workers": 2, "max_failures": 3, "resources_per_worker": {"accelerator": 1}},
        "tracking": {"enabled": False}, "register_as": None}
    (shared / "train.yaml").write_text(yaml.safe_dump(config))
    job = submit(cluster, ["python", "jobs/train.py", "--config", str(shared / "train.yaml")])
    # Before it: the decoded rows kept (two Ray Data passes, ~100 s each on this 2-core netns cluster).
    wait_until(lambda: any((output / "ray" / "multinode").glob("checkpoint_*")), 900, "a first checkpoint",
               cluster, job)
    time.sleep(4)  # past Ray Train's health poll, so the checkpoint is registered
    assert job_status(cluster, job) == "RUNNING", "the node should be lost mid-run"
    cluster.kill_node(cluster.nodes[2])
    time.sleep(5)
    # The histories the checkpoints on shared storage hold (each epoch's loss and seconds).
    saved = [json.loads(state.read_text())["history"]
             for state in (output / "ray" / "multinode").glob(f"checkpoint_*/{STATE_NAME}")]
    replace_node(cluster, 2)  # the group needs two accelerators again: a replacement node joins
    assert wait_for_job(cluster, job, timeout=900) == "SUCCEEDED"
    summary = json.loads((output / "summary.json").read_text())
    epochs = [h["epoch"] for h in summary["history"]]
    # Resumed, not restarted: the finished run's first epochs are exactly (same measured seconds)
    # those of a checkpoint written before the node was lost.
    carried = max((len(h) for h in saved if h and summary["history"][:len(h)] == h), default=0)
    print(f"training: epochs {epochs}, {carried} epoch(s) carried over from the checkpoint (resumed at epoch "
          f"{carried}), test accuracy {summary['test']['accuracy']:.3f}")
    assert epochs == list(range(EPOCHS))  # every epoch once, in order
    assert carried >= 1, "the run restarted instead of resuming from its checkpoint"


def test_serving_recovers_after_losing_a_replica_node(cluster):
    import requests
    from PIL import Image
    shared = Path(cluster.shared)
    if not (shared / "bundle").is_dir():
        make_tiny_bundle(shared / "bundle")
    app = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000},
           "applications": [{"name": "synfer", "route_prefix": "/", "import_path": "synfer_ray.serve:app_builder",
                             "args": {"bundle": str(shared / "bundle"), "num_cpus": 1, "torch_threads": 1,
                                      "resources": {"accelerator": 1}, "max_steps": 10,
                                      "autoscaling": {"min_replicas": 2, "max_replicas": 2}}}]}
    (shared / "serve.yaml").write_text(yaml.safe_dump(app))
    deployed = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(shared / "serve.yaml"),
                               "--address", cluster.dashboard_url], env=cluster.client_env(), capture_output=True,
                              text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = f"http://{cluster.head.address}:8000/v1/generate"
    body = {"expression": "happy", "n": 1, "steps": 3, "seed": 5}

    def ask() -> tuple[bool, str]:
        try:
            response = requests.post(url, json=body, timeout=30)
        except requests.RequestException as error:
            return False, type(error).__name__
        if response.status_code != 200:
            return False, str(response.status_code)
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["png_base64"])))
        image.load()  # a corrupt image raises here
        assert image.size == (48, 48)
        return True, "ok"

    wait_until(lambda: ask()[0], 300, "the first served image")
    outcomes: list[tuple[float, bool, str]] = []
    stop = threading.Event()

    def stream():
        began = time.monotonic()
        for _ in range(200):  # bounded in count ...
            if stop.is_set() or time.monotonic() - began > 150:  # ... and in time
                break
            outcomes.append((time.monotonic(), *ask()))
            time.sleep(0.2)

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    time.sleep(5)
    killed_at = time.monotonic()
    cluster.kill_node(cluster.nodes[2])
    client.join(timeout=170)
    stop.set()
    after = [(t, ok, why) for t, ok, why in outcomes if t > killed_at]
    failures = [why for _, ok, why in after if not ok]
    recovered = next((t - killed_at for t, ok, _ in after if ok and all(o for tt, o, _ in after if tt > t)), None)
    print(f"serving: {len(outcomes)} requests, {len(failures)} failed after the kill ({set(failures)}), "
          f"recovered after {recovered:.1f} s" if recovered is not None else "never recovered")
    assert after and after[-1][1], "requests did not succeed again"
    assert recovered is not None and recovered < 120
    replace_node(cluster, 2)
