"""FERAnno (diffusion features -> labels) and AU-adapter training on Ray Train, on the tiny bundle."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import WorkerKiller, separable_faces
from synfer_ray import taxonomy
from synfer_ray.bundle import load_bundle
from synfer_ray.config import AdapterTrainConfig, GenerateConfig, LabelerModelConfig, TrainConfig, build_config
from synfer_ray.errors import SynferError
from synfer_ray.labeler.features import FeatureSettings, features_for_bundle
from synfer_ray.labeler.feranno import new_feranno
from synfer_ray.models import load_classifier


def test_features_have_the_declared_shapes(tiny_bundle_path):
    bundle = load_bundle(tiny_bundle_path)  # its own copy: the extractor installs capture processors
    extractor = features_for_bundle(bundle, FeatureSettings(timestep=1, attention_tokens=5))
    images = torch.rand(3, 3, 48, 48)
    features, attention = extractor(images)
    unet = bundle.unet
    assert extractor.blocks == ["mid_block", "up_blocks.0", "up_blocks.1"]
    channels = unet.config.block_out_channels
    # mid and the first up block run at the coarsest width, the last up block at the finest.
    assert features.shape == (3, channels[-1] + channels[-1] + channels[0], 12, 12)
    layers = extractor.layers
    assert layers and all("attn2" in name and not name.startswith("down") for name in layers)
    assert attention.shape == (3, 5 * len(layers), 12, 12)
    assert torch.all(attention >= 0) and torch.all(attention <= 1)
    again, _ = extractor(images)
    assert torch.equal(features, again)  # deterministic: no noise at the feature timestep


def test_feranno_saves_and_loads_with_its_bundle(tiny_bundle_path, tmp_path):
    import shutil
    bundle_copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_path, bundle_copy)
    model = new_feranno(bundle_copy, taxonomy.AFFECTNET_7, LabelerModelConfig(dim=32, heads=2))
    images = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 48, 48))  # moves the input standardisation's running statistics
        logits = model.eval()(images)
    # Each input channel standardised: the attention maps (probabilities ~1/77) as much as the features.
    assert model.head.config.standardize_inputs
    attention_norm = model.head.attention_branch.encode[0]
    assert isinstance(attention_norm, torch.nn.BatchNorm2d) and attention_norm.running_mean.abs().sum() > 0
    assert logits.shape == (2, 7)
    model.save_pretrained(tmp_path / "labeler")
    loaded = load_classifier(tmp_path / "labeler")  # found through the bundle path in its config
    assert loaded.classes == list(taxonomy.AFFECTNET_7)
    with torch.no_grad():
        assert torch.allclose(loaded(images), logits, atol=1e-5)
    (bundle_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    with pytest.raises(SynferError, match="UNet differs"):
        load_classifier(tmp_path / "labeler")
    # A head saved before the standardisation existed (no such key in its config) loads without it.
    from synfer_ray.labeler.feranno import FERAnno
    config = json.loads((tmp_path / "labeler" / "config.json").read_text())
    config.pop("standardize_inputs")
    older = FERAnno.from_config(config)
    assert isinstance(older.attention_branch.encode[0], torch.nn.Conv2d)
    # ... and a training config can still ask for that head (model.labeler.standardize_inputs: false).
    from synfer_ray.models import build_classifier
    plain = build_classifier("feranno", taxonomy.AFFECTNET_7, 48, bundle=str(tiny_bundle_path),
                             labeler={"dim": 32, "heads": 2, "standardize_inputs": False})
    assert not plain.head.config.standardize_inputs


def labeler_config(bundle, faces, output) -> TrainConfig:
    return build_config(TrainConfig, {
        "name": "labeler-test", "output": str(output),
        "data": {"train": [{"path": str(faces["train"])}], "test": {"path": str(faces["test"])},
                 "val_fraction": 0.15},
        "model": {"arch": "feranno", "bundle": str(bundle), "labeler": {"dim": 32, "heads": 2}},
        "optim": {"epochs": 10, "batch_size": 16, "lr": 0.003, "zero_stage": 2},
        "scaling": {"num_workers": 2}, "tracking": {"enabled": False}, "register_as": None})


@pytest.fixture(scope="module")
def trained_labeler(ray_cluster, tiny_bundle_path, separable_parquet, tmp_path_factory):
    from synfer_ray.train.labeler import run_train_labeler
    output = tmp_path_factory.mktemp("labeler") / "run"
    return run_train_labeler(labeler_config(tiny_bundle_path, separable_parquet, output)), output


@pytest.mark.slow
def test_feranno_learns_a_separable_set_on_two_workers(trained_labeler):
    summary, _ = trained_labeler
    losses = [epoch["train_loss"] for epoch in summary["history"]]
    assert losses[-1] < losses[0]
    assert summary["test"]["accuracy"] > 0.5  # chance is 1/7


@pytest.mark.slow
def test_generation_pipeline_votes_with_the_bundles_labeler(trained_labeler, ray_cluster, tiny_bundle_path, tmp_path):
    from synfer_ray.generate import run_generate
    summary, output = trained_labeler
    bundle = output / "bundle"
    # inside the bundle the head reads the enclosing UNet; the trained head outside names its bundle
    assert json.loads((bundle / "labeler" / "config.json").read_text())["bundle"] is None
    assert json.loads((output / "model" / "config.json").read_text())["bundle"] == str(tiny_bundle_path.resolve())
    assert load_bundle(bundle).manifest.training["steps"][0]["job"] == "train-labeler"
    config = build_config(GenerateConfig, {
        "bundle": str(bundle), "output": str(tmp_path / "dataset"), "count": 8, "rows_per_shard": 8,
        "sampling": {"steps": 3}, "labeling": {"tau": 0.0}})
    run_generate(config)
    table = pq.read_table(tmp_path / "dataset" / "data")
    assert table.num_rows == 8
    assert all(voters == ["feranno"] for voters in table.column("voters").to_pylist())
    assert all(len(votes) == 1 and len(votes[0]) == 7 for votes in table.column("votes").to_pylist())


def test_labeler_config_needs_a_bundle():
    with pytest.raises(SynferError, match="model.*feranno needs model.bundle"):
        build_config(TrainConfig, {"output": "x", "data": {"train": [{"path": "y"}]}, "model": {"arch": "feranno"}})


# --- the AU adapter -------------------------------------------------------------------------------

def fetext_rows(path, rows_per_class: int = 24):
    """Image + caption + AU rows: each class's faces paired with its prototype AUs and a caption."""
    faces = separable_faces(rows_per_class, seed=3)
    labels = [taxonomy.EXPRESSION_ALIASES.get(x, x) for x in faces.column("label").to_pylist()]
    aus = [taxonomy.sample_target_aus(i, label, taxonomy.FINEFACE_12).tolist() for i, label in enumerate(labels)]
    captions = [taxonomy.build_prompt(i, label) for i, label in enumerate(labels)]
    pq.write_table(pa.table({"image": faces.column("image"), "caption": captions,
                             "aus": pa.array(aus, pa.list_(pa.float32()))}), path)
    return path


def adapter_config(bundle, data, output, steps: int) -> AdapterTrainConfig:
    return build_config(AdapterTrainConfig, {
        "name": "adapter-test", "bundle": str(bundle), "output": str(output), "data": {"path": str(data)},
        "stage": {"steps": steps, "batch_size": 16, "lr": 0.003, "warmup_steps": 2, "checkpoint_every": 10,
                  "log_every": 5, "ema_decay": 0.0, "caption_dropout": 0.0},
        "scaling": {"num_workers": 2, "max_failures": 2}, "tracking": {"enabled": False}})


def fixed_batch_loss(bundle_path, data_path, seed: int = 0) -> float:
    """The diffusion loss of a bundle on fixed rows, noise and timesteps (the thing the adapter lowers)."""
    from synfer_ray.data.conditioning import EncodeForDenoiser
    from synfer_ray.train.diffusion import Denoiser, epsilon_loss, noisy_latents
    bundle = load_bundle(bundle_path)
    table = pq.read_table(data_path).slice(0, 96)
    encoded = EncodeForDenoiser(str(bundle_path), bundle.classes, bundle.au_names, 0.0, 48)(
        {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names})
    generator = torch.Generator().manual_seed(seed)
    latents = torch.from_numpy(encoded["latent_mean"][:, 0]) * bundle.vae.config.scaling_factor
    noisy, noise, timesteps = noisy_latents(bundle.scheduler, latents, generator)
    model = Denoiser(bundle.unet, bundle.text_encoder, bundle.au_adapter)
    with torch.no_grad():
        prediction = model(noisy, timesteps, torch.from_numpy(encoded["input_ids"]).long(),
                           torch.from_numpy(encoded["aus"]))
    return float(epsilon_loss(prediction, noise))


@pytest.mark.slow
def test_adapter_training_lowers_the_loss_survives_a_killed_worker_and_reloads(
        ray_cluster, tiny_bundle_path, tmp_path):
    from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
    from synfer_ray.train.adapter import run_train_adapter
    data = fetext_rows(tmp_path / "fetext.parquet")
    output = tmp_path / "adapter"
    with WorkerKiller(lambda: any((output / "ray" / "adapter-test").glob("checkpoint_*"))) as killer:
        summary = run_train_adapter(adapter_config(tiny_bundle_path, data, output, steps=40))
    killed = killer.killed
    assert killed, "no training worker was killed"
    steps = [record["step"] for record in summary["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # each logged step once, in order, to the end
    before = fixed_batch_loss(tiny_bundle_path, data)
    after = fixed_batch_loss(output / "bundle", data)
    assert after < before, (before, after)
    bundle = load_bundle(output / "bundle")
    original = load_bundle(tiny_bundle_path)
    assert bundle.content_hash != original.content_hash
    assert torch.equal(bundle.unet.conv_in.weight, original.unet.conv_in.weight)  # the UNet stayed frozen
    assert not torch.equal(bundle.au_adapter.encoder[0].weight, original.au_adapter.encoder[0].weight)
    images = GuidedSampler(bundle).generate(
        [SampleRequest(seed=1, prompt="a happy smile", aus=taxonomy.prototype_aus("happy", bundle.au_names).tolist())],
        SamplerSettings(steps=3))
    assert images.shape == (1, 48, 48, 3)


def test_adapter_data_without_aus_is_refused_before_ray(tiny_bundle_path, tmp_path):
    from synfer_ray.train.adapter import run_train_adapter
    faces = separable_faces(2, seed=0)
    pq.write_table(faces.append_column("caption", pa.array(["x"] * faces.num_rows)), tmp_path / "rows.parquet")
    with pytest.raises(SynferError, match=r"missing \['aus'\]"):
        run_train_adapter(adapter_config(tiny_bundle_path, tmp_path / "rows.parquet", tmp_path / "out", steps=2))
    assert not (tmp_path / "out").exists()
