"""Shared fixtures: one tiny bundle per test session, built by the same code users run."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synfer_ray.bundle import load_bundle, make_tiny_bundle
from synfer_ray.generator.sampler import GuidedSampler
from synfer_ray.pipeline import footer_readers_for

TORCH_THREADS = 2
torch.set_num_threads(TORCH_THREADS)
# Every Ray cluster a test starts (in this process, `ray start`, a command's own) reads Parquet
# footers with 4 actors, as the local cluster of 4 CPUs that ensure_ray starts would.
footer_readers_for(4)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Code under test may set torch's thread count in this process; the next test starts at 2 again."""
    yield
    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "tiny"
    make_tiny_bundle(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_path):
    return load_bundle(tiny_bundle_path)


@pytest.fixture(scope="session")
def sampler(tiny_bundle) -> GuidedSampler:
    return GuidedSampler(tiny_bundle)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (4 logical CPUs: 2 deadlock Train+Data)."""
    import os

    import ray
    # Hermetic: no token written to the user's home by a test cluster (issue-7 tests set their own).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "SYNFER_TEST_API_KEY": "test-key"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def own_ray_worker_pids(fragment: str) -> list[int]:
    """PIDs of processes named like ``fragment`` (e.g. RayTrainWorker) that belong to this test
    session's Ray instance, never to another Ray cluster running on the same machine."""
    import psutil
    import ray
    session = ray._private.worker._global_node.get_session_dir_path()
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        if fragment not in " ".join(process.info["cmdline"] or []):
            continue
        try:
            raylet = process.parent()
            if raylet is not None and session in " ".join(raylet.cmdline()):
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


class WorkerKiller:
    """SIGKILLs one of this session's Ray processes named like ``fragment`` once ``ready()`` holds
    (e.g. the first checkpoint exists); bounded by ``deadline_s``. Use as a context manager."""

    def __init__(self, ready, fragment: str = "RayTrainWorker", deadline_s: float = 400, settle_s: float = 4):
        import threading
        self.ready, self.fragment, self.deadline_s, self.settle_s = ready, fragment, deadline_s, settle_s
        self.killed: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import os
        import signal
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline and not self.killed:
            if self.ready():
                pids = own_ray_worker_pids(self.fragment)
                if pids:
                    time.sleep(self.settle_s)  # past Ray Train's 2 s health poll, so the report is registered
                    try:
                        os.kill(pids[-1], signal.SIGKILL)
                        self.killed.append(pids[-1])
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)

    def __enter__(self) -> "WorkerKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join(timeout=5)


@pytest.fixture(scope="session")
def fer2013_dir() -> Path:
    """FER-2013 from SYNFER_FER2013 or ../shared/data/fer2013; tests that need it skip where it is absent."""
    import os
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"
    path = Path(os.environ.get("SYNFER_FER2013", default))
    if not (path / "train.parquet").is_file():
        pytest.skip(f"FER-2013 not found at {path} (set SYNFER_FER2013 to a folder holding train.parquet)")
    return path


@pytest.fixture(scope="session")
def second_voter(tmp_path_factory) -> Path:
    """A second FER classifier (other seed) so the labeler's ensemble has two voters."""
    from synfer_ray import taxonomy
    from synfer_ray.classifiers import tiny_resnet
    path = tmp_path_factory.mktemp("voters") / "voter-b"
    tiny_resnet(list(taxonomy.AFFECTNET_7), seed=11).save_pretrained(path)
    return path


def separable_faces(per_class: int, seed: int, corrupt: int = 0):
    """Labelled 48x48 grey faces whose class is a bright square at its own place: easy to learn.
    Labels use FER-2013's names ('angry'), so aliasing is exercised too."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from synfer_ray import taxonomy
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, name in enumerate(taxonomy.AFFECTNET_7):
        for _ in range(per_class):
            pixels = rng.normal(100, 20, (48, 48))
            row, column = divmod(k, 3)
            pixels[6 + row * 14:16 + row * 14, 6 + column * 14:16 + column * 14] += 120
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L").save(buffer, "PNG")
            images.append(buffer.getvalue())
            labels.append("angry" if name == "anger" else name)
    images += [b"\x89PNG but truncated %d" % i for i in range(corrupt)]  # distinct rows (ids are content hashes)
    labels += ["happy"] * corrupt
    return pa.table({"image": images, "label": labels})


@pytest.fixture(scope="session")
def separable_parquet(tmp_path_factory) -> dict[str, Path]:
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("faces")
    pq.write_table(separable_faces(40, seed=0, corrupt=5), root / "train.parquet")
    pq.write_table(separable_faces(10, seed=1), root / "test.parquet")
    return {"train": root / "train.parquet", "test": root / "test.parquet"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert server.poll() is None, (root / "server.log").read_text()
            time.sleep(0.5)
    else:
        pytest.fail("mlflow server did not start in 90 s")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)
