"""Every shipped config parses into its typed model (so examples never rot)."""

from pathlib import Path

import pytest

from synfer_ray.config import GenerateConfig, TrainConfig, load_config
from synfer_ray.presets import preset_path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"sd15-1m.yaml": GenerateConfig, "train-fer2013.yaml": TrainConfig, "train-r50.yaml": TrainConfig}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_example_config_validates(name):
    load_config(MODELS[name], ROOT / "configs" / name)


def test_tiny_preset_validates_and_overrides_apply():
    config = load_config(GenerateConfig, preset_path("tiny"), ["count=10", "sampling.steps=3"])
    assert config.count == 10 and config.sampling.steps == 3
