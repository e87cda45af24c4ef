"""Every shipped config parses into its typed model (so examples never rot)."""

import json
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
          "faces-48-v2.yaml": GeneratorTrainConfig, "latent-guide-faces48.yaml": TrainConfig}
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


def test_guided_step_settings_validate_and_a_bad_guide_is_refused_naming_it():
    from synfer_ray.errors import SynferError
    config = load_config(GenerateConfig, preset_path("tiny"), [
        "sampling.sg_guide=latents", "sampling.sg_reuse_pass=true", "sampling.sg_checkpointing=true",
        "sampling.sg_latent_guide=guides/latent"])
    sampling = config.sampling
    assert (sampling.sg_guide, sampling.sg_reuse_pass, sampling.sg_checkpointing, sampling.sg_latent_guide) == \
        ("latents", True, True, "guides/latent")
    settings = SamplerSettings.from_config(sampling)
    assert (settings.sg_guide, settings.sg_reuse_pass, settings.sg_checkpointing) == ("latents", True, True)
    plain = load_config(GenerateConfig, preset_path("tiny")).sampling
    assert (plain.sg_guide, plain.sg_reuse_pass, plain.sg_checkpointing, plain.sg_latent_guide) == \
        ("pixels", False, False, None)
    with pytest.raises(SynferError, match=r"^sampling.sg_guide: .*pixels.*latents"):
        load_config(GenerateConfig, preset_path("tiny"), ["sampling.sg_guide=decoded"])
    with pytest.raises(SynferError, match=r"^sg_guide: .*pixels.*latents"):
        build_config(ServeConfig, {"bundle": "b", "sg_guide": "decoded"})
    with pytest.raises(SynferError, match=r"^sg_guide: "):
        SamplerSettings(sg_guide="decoded")


def test_a_dataset_identity_from_before_the_guide_settings_matches_them_at_their_defaults():
    from synfer_ray.config import ADDED_GENERATE_SETTINGS, without_added_settings
    from synfer_ray.generate import identity
    config = load_config(GenerateConfig, preset_path("tiny"))
    now = identity(config, "hash")
    older = json.loads(json.dumps(now))
    for key in ("sg_guide", "sg_reuse_pass", "sg_latent_guide"):
        del older["sampling"][key]
    assert without_added_settings(older, ADDED_GENERATE_SETTINGS) == without_added_settings(now, ADDED_GENERATE_SETTINGS)
    # Set, each changes the rows: the older dataset is not the same one.
    for override in ("sampling.sg_guide=latents", "sampling.sg_reuse_pass=true", "sampling.sg_latent_guide=g"):
        changed = identity(load_config(GenerateConfig, preset_path("tiny"), [override]), "hash")
        assert without_added_settings(older, ADDED_GENERATE_SETTINGS) != \
            without_added_settings(changed, ADDED_GENERATE_SETTINGS), override


def test_activation_checkpointing_leaves_a_datasets_identity_and_the_studys_stage_keys_alone(tmp_path):
    from synfer_ray.config import TrackingConfig
    from synfer_ray.generate import identity
    from synfer_ray.study import _generate_fields, condition_config, config_hash, sweep_key
    plain = load_config(GenerateConfig, preset_path("tiny"))
    checkpointed = load_config(GenerateConfig, preset_path("tiny"), ["sampling.sg_checkpointing=true"])
    assert identity(checkpointed, "hash") == identity(plain, "hash")
    assert "sg_checkpointing" not in identity(plain, "hash")["sampling"]
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "labeler": {"model": "l"}, "downstream": {"real_rows": 100, "train": {"model": "t"}},
           "sweep": {"targets": ["au"], "scales": [8]}}

    def study(**sampling):
        return build_config(StudyConfig, {**raw, "generation": {"sampling": {"sg_scale": 8.0, **sampling}}})

    def key(condition: str, **sampling):
        config = condition_config(study(**sampling), condition, {"generator": "b", "labeler": "l"}, "g", 70, 0,
                                  "out", TrackingConfig(enabled=False))
        return config_hash(_generate_fields(config, {"output"}))
    # At their defaults the guide settings leave every stage key as it was before they existed.
    fields = _generate_fields(condition_config(study(), "text_au_sg", {"generator": "b", "labeler": "l"}, "g", 70,
                                               0, "out", TrackingConfig(enabled=False)), {"output"})["sampling"]
    assert not {"sg_guide", "sg_reuse_pass", "sg_checkpointing", "sg_latent_guide"} & set(fields)
    assert not {"sg_guide", "sg_reuse_pass", "sg_checkpointing"} & set(sweep_key(study(), "b", "g", "e")["settings"])
    assert key("text_au_sg", sg_checkpointing=True) == key("text_au_sg")
    assert sweep_key(study(sg_checkpointing=True), "b", "g", "e") == sweep_key(study(), "b", "g", "e")
    # A guide that reads latents makes other faces: a new guided stage and sweep; the unguided keep theirs.
    assert key("text_au_sg", sg_guide="latents") != key("text_au_sg")
    assert key("text_au", sg_guide="latents", sg_reuse_pass=True) == key("text_au")
    assert sweep_key(study(sg_guide="latents"), "b", "g", "e") != sweep_key(study(), "b", "g", "e")
    guided = condition_config(study(sg_guide="latents", sg_latent_guide="lg"), "text_au_sg",
                              {"generator": "b", "labeler": "l"}, "g", 70, 0, "out", TrackingConfig(enabled=False))
    assert (guided.sampling.sg_guide, guided.sampling.sg_latent_guide) == ("latents", "lg")
