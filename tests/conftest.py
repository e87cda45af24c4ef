"""Shared fixtures: one tiny bundle per test session, built by the same code users run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synfer_ray.bundle import load_bundle, make_tiny_bundle
from synfer_ray.generator.sampler import GuidedSampler

torch.set_num_threads(2)


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
