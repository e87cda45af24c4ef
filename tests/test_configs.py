"""Every shipped config parses into its typed model (so examples never rot)."""

from pathlib import Path

import pytest

import yaml

from synfer_ray.config import (AdapterTrainConfig, GenerateConfig, GeneratorTrainConfig, PipelineConfig, ServeConfig,
                               StudyConfig, TrainConfig, build_config, load_config)
from synfer_ray.generator.sampler import SamplerSettings
from synfer_ray.presets import preset_path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"sd15-1m.yaml": GenerateConfig, "train-fer2013.yaml": TrainConfig, "train-r50.yaml": TrainConfig,
          "serve.yaml": ServeConfig, "pipeline-tiny.yaml": PipelineConfig, "fer2013-guide.yaml": TrainConfig,
          "fer2013-evaluator.yaml": TrainConfig, "train-labeler.yaml": TrainConfig,
          "train-adapter.yaml": AdapterTrainConfig, "study.yaml": StudyConfig, "pipeline-gpu.yaml": PipelineConfig,
          "faces-48-v2.yaml": GeneratorTrainConfig}
PRESETS = {"tiny": GenerateConfig, "faces-48": GeneratorTrainConfig, "tiny-generator": GeneratorTrainConfig}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                        if p.name != "serve-app.yaml"))
def test_example_config_validates(name):
    load_config(MODELS[name], ROOT / "configs" / name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_validates(name):
    load_config(PRESETS[name], preset_path(name))


def test_every_preset_and_config_is_covered():
    presets = {p.stem for p in preset_path("tiny").parent.glob("*.yaml")}
    assert presets == set(PRESETS)


def test_serve_app_config_is_valid_for_ray_serve_and_for_us():
    from ray.serve.schema import ServeDeploySchema
    raw = yaml.safe_load((ROOT / "configs" / "serve-app.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    application = schema.applications[0]
    assert application.import_path == "synfer_ray.serve:app_builder"
    build_config(ServeConfig, application.args)


def test_tiny_preset_validates_and_overrides_apply():
    config = load_config(GenerateConfig, preset_path("tiny"), ["count=10", "sampling.steps=3"])
    assert config.count == 10 and config.sampling.steps == 3
    # Its per-class SG mix names faces-48's classes (generate refuses unknown names), and no SG at all
    # takes clearing the mix as well as sg_scale 0.
    from synfer_ray.bundle import BundleManifest
    assert set(config.sampling.sg_class_scales) <= set(BundleManifest.read(ROOT / "models" / "faces-48").classes)
    off = load_config(GenerateConfig, preset_path("tiny"), ["sampling.sg_scale=0", "sampling.sg_class_scales={}"])
    assert not SamplerSettings.from_config(off.sampling).uses_sg and SamplerSettings.from_config(config.sampling).uses_sg


def test_overrides_reach_into_lists_and_name_bad_keys():
    from synfer_ray.config import apply_overrides
    from synfer_ray.errors import SynferError
    raw = {"data": {"train": [{"path": "a"}, {"path": "b"}]}, "count": 3}
    changed = apply_overrides(raw, ["data.train.1.limit=50", "count=7", "new.section.value=[1, 2]"])
    assert changed["data"]["train"][1] == {"path": "b", "limit": 50} and changed["count"] == 7
    assert changed["new"]["section"]["value"] == [1, 2] and raw["count"] == 3
    with pytest.raises(SynferError, match=r"^data.train.5: .*index below 2"):
        apply_overrides(raw, ["data.train.5.limit=1"])
    with pytest.raises(SynferError, match=r"^count.x: .*count is a value"):
        apply_overrides(raw, ["count.x=1"])
    with pytest.raises(SynferError, match="^override: "):
        apply_overrides(raw, ["count"])
