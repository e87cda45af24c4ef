"""The GPU path: the check's own plumbing everywhere, sampling and every stage on CUDA where there is one.

Tests marked ``gpu`` are collected everywhere and skip, saying why, without CUDA: CI never needs a
GPU. On a GPU machine (cluster/gpu/README.md): ``make gpu-test`` runs them with the carried packages.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Scripts, not package modules: import them from their folder.
sys.path.insert(0, str(ROOT / "cluster" / "gpu"))
import check  # noqa: E402
import wheels  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: torch sees no GPU here (on a GPU machine: make gpu-test)")


def test_every_travelling_package_has_an_exact_pin():
    pinned = wheels.pins(ROOT / "constraints.txt")
    for name in wheels.PINNED + wheels.SUPPORT:
        assert wheels.requirement(name, pinned).startswith(f"{name}==")


def _archive(tmp_path: Path, python: str) -> Path:
    """A site/ archive as `wheels.py build` lays it out: one pinned package, two support ones."""
    import pytest as installed
    import pluggy
    files = {"ray/__init__.py": b"", "pytest/__init__.py": b"", "pytest-9.dist-info/METADATA": b"",
             "pluggy/__init__.py": b"", "notonthismachine/__init__.py": b""}
    newer = ".".join(str(int(part) + 1) for part in pluggy.__version__.split(".")[:2])
    manifest = {"python": python, "pinned": {"ray": "2.60.0"},
                "support": {"pytest": {"version": installed.__version__, "files": ["pytest/__init__.py",
                                                                                 "pytest-9.dist-info/METADATA"]},
                            "pluggy": {"version": newer, "files": ["pluggy/__init__.py"]},
                            "notonthismachine": {"version": "1.0", "files": ["notonthismachine/__init__.py"]}}}
    files[wheels.MANIFEST] = json.dumps(manifest).encode()
    archive = tmp_path / "site.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"site/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_unpack_keeps_what_the_machine_lacks_and_uses_its_own_copies(tmp_path):
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = wheels.unpack(_archive(tmp_path, running), tmp_path / "out")
    assert (site / "ray" / "__init__.py").is_file()  # pinned: always ours
    assert (site / "notonthismachine" / "__init__.py").is_file()  # missing here: travels
    assert (site / "pluggy" / "__init__.py").is_file()  # older here than ours: ours wins
    assert not (site / "pytest").exists() and not (site / "pytest-9.dist-info").exists()  # the same here


def test_unpack_refuses_an_archive_for_another_python(tmp_path):
    with pytest.raises(SystemExit, match="make gpu-wheels PY="):
        wheels.unpack(_archive(tmp_path, "2.7"), tmp_path / "out")


def test_a_failing_stage_gets_its_line_and_the_next_stage_still_runs(tmp_path, monkeypatch):
    def broken(_):
        raise check.StageFailed("`synfer train` exited 2: error: optim.precision: got 'fp8'")

    def crashing(_):
        raise KeyError("summary")
    monkeypatch.setitem(check.RUNNERS, "train", broken)
    monkeypatch.setitem(check.RUNNERS, "evaluate", crashing)
    monkeypatch.setitem(check.RUNNERS, "serve", lambda _: "2 images over HTTP")
    state = check.Check("cpu", "bf16", tmp_path, tmp_path, timeout=5)
    lines = [check.line(check.run_stage(state, name)) for name in ("train", "evaluate", "serve")]
    assert lines[0].startswith("FAIL train") and "optim.precision" in lines[0]
    assert lines[1].startswith("FAIL evaluate") and "KeyError" in lines[1]
    assert lines[2].startswith("PASS serve") and lines[2].endswith("2 images over HTTP")


def test_the_reason_is_synfers_error_line_else_the_last_exception(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text("$ synfer train\nTraceback (most recent call last):\n  File x\nValueError: deep inside\n"
                   "error: scaling.use_gpu: got True; expected false on a machine without CUDA\nbye\n")
    assert check.last_error(log).startswith("error: scaling.use_gpu")
    log.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
                   "INFO node.py:438 -- Failed to get node info b'RPC error: Deadline Exceeded'\nexiting\n")
    assert check.last_error(log) == "RuntimeError: CUDA out of memory"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_sampling_on_cuda_matches_fp32(tiny_bundle_path, precision):
    from synfer_ray import taxonomy
    from synfer_ray.bundle import load_bundle
    from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
    from synfer_ray.precision import DTYPES, resolve
    dtype = resolve(precision, "cuda")
    assert dtype == DTYPES[precision]
    requests = [SampleRequest(seed=i, prompt=taxonomy.build_prompt(i, "happy"), target="happy",
                              aus=taxonomy.prototype_aus("happy", taxonomy.FINEFACE_12).tolist()) for i in range(4)]
    settings = SamplerSettings(steps=8, cfg_scale=3.0, au_scale=1.0, sg_scale=2.0)
    images = {}
    for name, kind in (("half", dtype), ("full", torch.float32)):
        bundle = load_bundle(tiny_bundle_path, dtype=kind).to("cuda")
        images[name] = GuidedSampler(bundle, device="cuda").generate(requests, settings)
        assert bundle.unet.dtype == kind and bundle.unet.device.type == "cuda"
    assert images["half"].shape == (4, 48, 48, 3) and images["half"].std() > 0
    # The same images up to rounding: a half-precision path that drifts would differ everywhere.
    difference = np.abs(images["half"].astype(np.float32) - images["full"].astype(np.float32)).mean()
    assert difference < 8, difference


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_every_stage_passes_on_the_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "cluster" / "gpu" / "check.py"), "--device", "cuda",
                           "--precision", "fp16", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900)
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == len(check.STAGES), done.stdout[-3000:]
    assert all(line.startswith("PASS") for line in verdicts), "\n".join(verdicts)
