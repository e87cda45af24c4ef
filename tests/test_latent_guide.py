"""The latent guide: trained as a classifier over a bundle's frozen VAE, saved, loaded, and installed into a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from synfer_ray import taxonomy
from synfer_ray.bundle import load_bundle, make_tiny_bundle
from synfer_ray.config import TrainConfig, build_config
from synfer_ray.errors import SynferError
from synfer_ray.generator.latent_guide import LATENT_GUIDE_DIR, LatentGuide
from synfer_ray.models import (NOISY_SHARE, LatentGuideClassifier, build_classifier, install_latent_guide,
                               load_classifier)


@pytest.fixture(scope="module")
def guide(tiny_bundle_path) -> LatentGuideClassifier:
    return build_classifier("latent-guide", taxonomy.AFFECTNET_7, 48, seed=0, bundle=str(tiny_bundle_path))


@pytest.fixture(scope="module")
def saved_guide(guide, tmp_path_factory):
    path = tmp_path_factory.mktemp("latent-guide") / "model"
    guide.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_bundle_path(tmp_path_factory):
    """A tiny bundle with other weights, so another VAE."""
    path = tmp_path_factory.mktemp("bundles") / "tiny-other"
    make_tiny_bundle(path, seed=1)
    return path


def test_only_the_head_trains_and_it_reads_noisy_predictions_in_training(guide, sampler):
    trainable = [p for p in guide.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in guide.head.parameters()}
    config = guide.head.config
    assert (config.latent_size, config.latent_channels) == (12, 4)  # 48 px through the tiny VAE's 4x
    images = torch.rand(6, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    # The latents are the sampler's: what GuidedSampler.encode_images gives for the same faces.
    faces = (images * 255).round().to(torch.uint8)
    clean = guide.clean_latents(faces.float() / 255)
    assert torch.allclose(clean, sampler.encode_images(faces.permute(0, 2, 3, 1).numpy()), atol=1e-5)
    try:
        guide.train()
        assert guide.head.training and not guide.vae.training and not guide.unet.training
        seen = guide.guide_inputs(faces.float() / 255)
        changed = (seen - clean).flatten(1).abs().amax(dim=1) > 0
        assert int(changed.sum()) == round(NOISY_SHARE * len(images))  # half the rows, the others clean
        assert torch.equal(seen[~changed], clean[~changed])
        logits = guide(images)
        logits.sum().backward()  # the head learns; nothing frozen collects a gradient
        frozen = [*guide.vae.parameters(), *guide.unet.parameters()]
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in guide.head.parameters())
    finally:
        guide.head.zero_grad(set_to_none=True)
        guide.eval()
    with torch.no_grad():
        assert torch.equal(guide.guide_inputs(images), guide.clean_latents(images))
        assert torch.equal(guide(images), guide(images))


def test_a_saved_guide_loads_as_a_classifier_over_its_bundle(guide, saved_guide, tiny_bundle_path):
    files = sorted(p.name for p in saved_guide.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]  # the head only, no bundle weights
    config = json.loads((saved_guide / "config.json").read_text())
    assert config["bundle"] == str(tiny_bundle_path.resolve()) and len(config["vae_sha256"]) == 64
    loaded = load_classifier(saved_guide)
    assert isinstance(loaded, LatentGuideClassifier) and not loaded.training
    assert loaded.classes == list(taxonomy.AFFECTNET_7) and loaded.image_size == 48
    images = torch.rand(3, 3, 64, 64)  # any size: resized to the bundle's resolution
    with torch.no_grad():
        assert torch.allclose(loaded(images), guide.eval()(images), atol=1e-6)


def test_a_guide_is_refused_on_a_bundle_with_another_vae(saved_guide, other_bundle_path, tmp_path):
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(saved_guide, moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "bundle": str(other_bundle_path)}))
    with pytest.raises(SynferError, match=r"model: .*trained on the VAE of .*tiny-other.*another VAE .*tiny"):
        load_classifier(moved, field="model")
    with pytest.raises(SynferError, match="guide: .*another VAE"):
        install_latent_guide(other_bundle_path, saved_guide, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_installed_guide_makes_a_new_bundle_version_that_verifies(guide, saved_guide, tiny_bundle_path, tmp_path):
    from synfer_ray.cli import app
    out = tmp_path / "with-guide"
    result = CliRunner().invoke(app, ["bundle", "add-latent-guide", str(tiny_bundle_path), str(saved_guide), str(out)])
    assert result.exit_code == 0, result.output
    installed = out / LATENT_GUIDE_DIR
    assert json.loads((installed / "config.json").read_text())["bundle"] is None  # read with its enclosing bundle
    info = CliRunner().invoke(app, ["bundle", "info", str(out)])
    assert info.exit_code == 0 and json.loads(info.output)["intact"]
    bundle = load_bundle(out)
    assert bundle.content_hash != load_bundle(tiny_bundle_path).content_hash
    assert bundle.manifest.training["steps"][-1]["job"] == "add-latent-guide"
    assert isinstance(bundle.sg_latent_guide, LatentGuide)
    images = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        expected = guide.eval()(images)
        assert torch.allclose(bundle.sg_latent_guide(guide.clean_latents(images)), expected, atol=1e-6)
        assert torch.allclose(load_classifier(installed)(images), expected, atol=1e-6)
    again = CliRunner().invoke(app, ["bundle", "add-latent-guide", str(tiny_bundle_path), str(saved_guide), str(out)])
    assert again.exit_code == 2 and "out:" in again.output  # nothing is replaced


def test_a_latent_guide_config_needs_a_bundle_and_refuses_zero_3(tiny_bundle_path, tmp_path):
    from synfer_ray.train.fer import run_train
    raw = {"output": str(tmp_path / "run"), "data": {"train": [{"path": "faces.parquet"}]},
           "model": {"arch": "latent-guide"}, "tracking": {"enabled": False}, "register_as": None}
    with pytest.raises(SynferError, match="model.*latent-guide needs model.bundle"):
        build_config(TrainConfig, raw)
    config = build_config(TrainConfig, {**raw, "model": {"arch": "latent-guide", "bundle": str(tmp_path / "none")}})
    with pytest.raises(SynferError, match="model.bundle"):
        run_train(config)
    config = build_config(TrainConfig, {**raw, "model": {"arch": "latent-guide", "bundle": str(tiny_bundle_path)},
                                        "optim": {"zero_stage": 3}})
    with pytest.raises(SynferError, match="optim.zero_stage.*latent-guide"):
        run_train(config)


# The shipped faces-48 bundle, not the tiny one: the tiny bundle's random VAE gives latents of std ~0.05
# (its scaling factor was never fitted), which the head learns from only after hundreds of steps; faces-48's
# are of std ~1, as a trained VAE's are.
FACES_48 = Path(__file__).resolve().parents[1] / "models" / "faces-48"


@pytest.mark.slow
def test_synfer_train_trains_a_latent_guide_that_evaluates_and_installs(ray_cluster, separable_parquet, tmp_path):
    from synfer_ray.evaluate import evaluate_model
    from synfer_ray.train.fer import MODEL_DIR, run_train
    output = tmp_path / "run"
    config = build_config(TrainConfig, {
        "name": "latent-guide-test", "output": str(output),
        "data": {"train": [{"path": str(separable_parquet["train"])}], "test": {"path": str(separable_parquet["test"])},
                 "val_fraction": 0.15},
        "model": {"arch": "latent-guide", "bundle": str(FACES_48)},
        # Two workers under ZeRO-2: the frozen VAE and UNet stay out of the partitioned gradients.
        "optim": {"epochs": 3, "batch_size": 8, "lr": 0.005, "zero_stage": 2},
        "scaling": {"num_workers": 2}, "tracking": {"enabled": False}, "register_as": None})
    summary = run_train(config)
    losses = [epoch["train_loss"] for epoch in summary["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert summary["test"]["accuracy"] > 0.3  # chance is 1/7
    report = evaluate_model(output / MODEL_DIR, str(separable_parquet["test"]))  # as `synfer evaluate` reads it
    assert report["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    install_latent_guide(FACES_48, output / MODEL_DIR, tmp_path / "bundle")
    assert isinstance(load_bundle(tmp_path / "bundle").sg_latent_guide, LatentGuide)
