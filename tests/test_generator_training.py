"""`synfer train-generator`: the losses on their own, then a few-step run on a FER-2013 slice end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from synfer_ray import taxonomy
from synfer_ray.bundle import TINY_ARCHITECTURE, load_bundle, new_generator
from synfer_ray.cli import app
from synfer_ray.config import GeneratorArchitecture, GeneratorTrainConfig, load_config
from synfer_ray.errors import SynferError
from synfer_ray.presets import preset_path
from synfer_ray.train.diffusion import Autoencode, Denoiser, drop_conditions, epsilon_loss, noisy_latents, vae_loss


@pytest.fixture(scope="module")
def parts():
    return new_generator(GeneratorArchitecture(**TINY_ARCHITECTURE), seed=0)


def test_vae_loss_falls_when_fitting_a_batch(parts):
    torch.manual_seed(0)
    # Smooth images (a brightness ramp per image), the kind of signal a VAE learns first.
    ramp = torch.linspace(-1, 1, 48).view(1, 1, 1, 48)
    pixels = (ramp * torch.rand(8, 1, 1, 1) + torch.rand(8, 3, 1, 1) - 0.5).expand(8, 3, 48, 48).clamp(-1, 1)
    model = Autoencode(parts.vae)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(25):
        loss, terms = vae_loss(*model(pixels, torch.Generator().manual_seed(step)), pixels, kl_weight=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(terms["l1"]))
    assert losses[-1] < 0.7 * losses[0]


def test_denoiser_loss_falls_and_dropout_gives_the_unconditional_input(parts):
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(parts.scheduler.config)
    model = Denoiser(parts.unet, parts.text_encoder, parts.au_adapter)
    from synfer_ray.generator.au_adapter import install_au_adapter
    install_au_adapter(parts.unet, parts.au_adapter)
    ids = parts.tokenizer(["a happy smile"] * 8, padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = parts.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    aus = torch.rand(8, 12)
    dropped_ids, dropped_aus = drop_conditions(ids, aus, empty, 1.0)
    assert torch.equal(dropped_ids, empty.expand_as(ids)) and torch.all(dropped_aus == 0)
    kept_ids, kept_aus = drop_conditions(ids, aus, empty, 0.0)
    assert torch.equal(kept_ids, ids) and torch.equal(kept_aus, aus)
    latents = torch.randn(8, 4, 12, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def fixed_loss():
        noisy, noise, t = noisy_latents(scheduler, latents, torch.Generator().manual_seed(0))
        return epsilon_loss(model(noisy, t, ids, aus), noise)

    with torch.no_grad():
        before = float(fixed_loss())
    for step in range(30):
        noisy, noise, t = noisy_latents(scheduler, latents, torch.Generator().manual_seed(step))
        loss = epsilon_loss(model(noisy, t, ids, aus), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert float(fixed_loss()) < before


def test_faces48_preset_reads_fer2013_from_the_environment(monkeypatch):
    monkeypatch.setenv("SYNFER_FER2013", "/data/fer")
    config = load_config(GeneratorTrainConfig, preset_path("faces-48"))
    assert config.data.path == "/data/fer/train.parquet"
    sizes = new_generator(config.architecture)
    assert 5e6 < sum(p.numel() for p in sizes.unet.parameters()) < 8e6  # the size the preset promises
    assert 2e6 < sum(p.numel() for p in sizes.vae.parameters()) < 3.5e6


def test_unknown_labels_and_empty_classes_are_refused_before_ray(tmp_path, separable_parquet):
    import pyarrow.parquet as pq
    from synfer_ray.train.generator import run_train_generator
    from conftest import separable_faces
    table = separable_faces(3, seed=0)
    labels = ["smirk" if x == "happy" else x for x in table.column("label").to_pylist()]
    pq.write_table(table.set_column(1, "label", [labels]), tmp_path / "bad.parquet")
    raw = {"output": str(tmp_path / "out"), "data": {"path": str(tmp_path / "bad.parquet")}}
    with pytest.raises(SynferError, match="smirk"):
        run_train_generator(load_config(GeneratorTrainConfig, preset_path("tiny-generator"),
                                        [f"{k}={v}" for k, v in raw.items() if k == "output"]
                                        + [f"data.path={raw['data']['path']}"]))
    rows = table.filter(np.array([x != "disgust" for x in table.column("label").to_pylist()]))
    pq.write_table(rows, tmp_path / "no-disgust.parquet")
    with pytest.raises(SynferError, match=r"none of \['disgust'\]"):
        run_train_generator(load_config(GeneratorTrainConfig, preset_path("tiny-generator"),
                                        [f"output={tmp_path / 'out'}", f"data.path={tmp_path / 'no-disgust.parquet'}"]))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained_generator(ray_cluster, fer2013_dir, second_voter, tmp_path_factory):
    output = tmp_path_factory.mktemp("generator") / "run"
    result = CliRunner().invoke(app, ["train-generator", "--config", "tiny-generator", f"output={output}",
                                      f"data.path={fer2013_dir / 'train.parquet'}",
                                      f"quality.evaluator={second_voter}"])
    assert result.exit_code == 0, result.output
    return output, result.output


@pytest.mark.slow
def test_few_step_generator_on_fer2013_makes_a_bundle_the_sampler_uses(trained_generator):
    from synfer_ray.generator.sampler import GuidedSampler, SamplerSettings
    from synfer_ray.train.generator import sample_grid_requests
    output, printed = trained_generator
    assert "vae: step 6" in printed and "denoiser: step 6" in printed
    bundle = load_bundle(output / "bundle")  # the content hash verifies
    training = bundle.manifest.training
    assert training["data"]["class_counts"]["happy"] > 0 and len(training["data"]["lineage"]) == 64
    assert "label conditioning" in training["au_conditioning"]
    assert json.loads((output / "bundle" / "vae" / "config.json").read_text())["scaling_factor"] != 0.18215
    images = GuidedSampler(bundle).generate(sample_grid_requests(bundle.classes, bundle.au_names, 1, seed=5),
                                            SamplerSettings(steps=3))
    assert images.shape == (7, 48, 48, 3)
    quality = json.loads((output / "report" / "quality.json").read_text())
    assert set(quality["evaluator_agreement"]) == set(taxonomy.AFFECTNET_7) | {"overall"}
    for name in ("contact_sheet.png", "reconstructions.png"):
        assert (output / "report" / name).stat().st_size > 1000
    assert set(json.loads((output / "stages.json").read_text())) == {"vae", "denoiser"}


@pytest.mark.slow
def test_generate_one_and_a_finished_run_refusal(trained_generator, tmp_path):
    output, _ = trained_generator
    result = CliRunner().invoke(app, ["generate-one", "--bundle", str(output / "bundle"), "--expression", "happy",
                                      "-n", "2", "--steps", "3", "--out", str(tmp_path / "looks")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "looks").glob("*.png"))) == 2
    again = CliRunner().invoke(app, ["train-generator", "--config", "tiny-generator", f"output={output}"])
    assert again.exit_code == 2 and "this run is done" in again.output
