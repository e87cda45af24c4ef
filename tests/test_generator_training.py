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
    dropped_ids, dropped = drop_conditions(ids, empty, 1.0)
    assert torch.equal(dropped_ids, empty.expand_as(ids)) and not dropped.any()
    kept_ids, kept = drop_conditions(ids, empty, 0.0)
    assert torch.equal(kept_ids, ids) and kept.all()
    # A dropped row gets the null AU tokens; neutral (all AUs zero) is a condition of its own.
    adapter = parts.au_adapter
    assert adapter.config.null_unconditional
    with torch.no_grad():
        assert torch.all(adapter.encode(aus, dropped) == 0)
        assert torch.equal(adapter.encode(aus, kept), adapter.encode(aus))
        neutral = adapter.encode(torch.zeros(1, 12))
        assert torch.equal(adapter.unconditional(1), torch.zeros_like(neutral))
        assert neutral.abs().mean() > 0.1
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
    from synfer_ray.train.generator_report import sample_grid_requests
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


# --- LoRA, precision and v-prediction (the GPU production path, checked on CPU) ----------------------

def test_merge_lora_is_w_plus_scaled_b_times_a():
    from synfer_ray.train.diffusion import merge_lora
    weights = {"layer.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "other.bias": torch.ones(2)}
    lora = {"layer.lora_A.weight": torch.tensor([[1.0, -1.0]]),  # rank 1: (r, in)
            "layer.lora_B.weight": torch.tensor([[2.0], [0.0], [1.0]])}  # (out, r)
    merged = merge_lora(weights, lora, scale=0.5)
    assert torch.equal(merged["layer.weight"], torch.tensor([[2.0, 1.0], [3.0, 4.0], [5.5, 5.5]]))
    assert merged["other.bias"] is weights["other.bias"]
    with pytest.raises(SynferError, match="lora_A and lora_B"):
        merge_lora(weights, {"missing.lora_A.weight": torch.ones(1, 2), "missing.lora_B.weight": torch.ones(3, 1)}, 1.0)


def stock_unet(parts):
    """A copy of the module's UNet with diffusers' own attention (other tests install the AU adapter)."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0
    unet = copy.deepcopy(parts.unet)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def test_lora_unet_merges_into_a_plain_unet_that_computes_the_same(parts):
    """peft's LoRA on the real UNet: the checkpoint state round-trips, and the merged plain UNet
    computes what the LoRA-wrapped one does (the text path; the AU path: the next test)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from synfer_ray.generator.au_adapter import stock_attention
    from synfer_ray.train.diffusion import add_lora, merge_lora
    unet, plain, original = stock_unet(parts), stock_unet(parts), stock_unet(parts)
    add_lora(unet, rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0"))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero; make the LoRA do something
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    lora = get_peft_model_state_dict(unet)
    again = stock_unet(parts)
    add_lora(again, rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0"))
    set_peft_model_state_dict(again, lora)  # what a resumed worker does
    assert all(torch.equal(v, get_peft_model_state_dict(again)[k]) for k, v in lora.items())
    with stock_attention(unet):
        base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(merge_lora(base, lora, scale=8.0 / 4), strict=True)
    latents, t, context = torch.randn(2, 4, 12, 12), torch.tensor([10, 500]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert torch.allclose(unet(latents, t, context).sample, plain(latents, t, context).sample, atol=1e-4)
        assert not torch.allclose(original(latents, t, context).sample, plain(latents, t, context).sample,
                                  atol=1e-3)


def test_au_attention_sees_the_lora_of_to_out(parts):
    import copy

    from peft import get_peft_model_state_dict

    from synfer_ray.generator.au_adapter import install_au_adapter, stock_attention
    from synfer_ray.train.diffusion import add_lora, merge_lora
    unet, plain = stock_unet(parts), stock_unet(parts)
    adapter = copy.deepcopy(parts.au_adapter)
    add_lora(unet, rank=4, alpha=8.0, targets=("to_out.0",))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    with stock_attention(unet):
        base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(merge_lora(base, get_peft_model_state_dict(unet), scale=2.0))
    install_au_adapter(unet, adapter)
    install_au_adapter(plain, adapter)
    latents, t, context = torch.randn(2, 4, 12, 12), torch.tensor([10, 500]), torch.randn(2, 81, 64)
    with torch.no_grad():
        a = unet(latents, t, context, cross_attention_kwargs={"au_scale": 1.0}).sample
        b = plain(latents, t, context, cross_attention_kwargs={"au_scale": 1.0}).sample
    assert torch.allclose(a, b, atol=1e-4)


def test_bf16_autocast_step_on_cpu_is_finite_and_fp16_on_cpu_is_refused(parts):
    import copy

    from diffusers import DDIMScheduler

    from synfer_ray.generator.au_adapter import install_au_adapter
    from synfer_ray.train.diffusion import MixedPrecision, check_precision, denoiser_loss
    unet, adapter = stock_unet(parts), copy.deepcopy(parts.au_adapter)
    install_au_adapter(unet, adapter)
    model = Denoiser(unet, copy.deepcopy(parts.text_encoder), adapter)
    batch = {"latent_mean": torch.randn(4, 2, 4, 12, 12), "latent_std": torch.full((4, 2, 4, 12, 12), 0.1),
             "input_ids": parts.tokenizer(["a happy smile"] * 4, padding="max_length", max_length=77,
                                          return_tensors="pt").input_ids, "aus": torch.rand(4, 12)}
    empty = parts.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    precision = MixedPrecision("bf16", "cpu", "unet.precision")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = unet.conv_in.weight.detach().clone()
    with precision.autocast():
        loss = denoiser_loss(model, DDIMScheduler.from_config(parts.scheduler.config), batch, 0.18, empty, 0.5,
                             torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    precision.step(loss, optimizer, list(model.parameters()))
    assert unet.conv_in.weight.dtype == torch.float32  # weights stay fp32
    assert torch.isfinite(unet.conv_in.weight).all() and not torch.equal(unet.conv_in.weight, before)
    with pytest.raises(SynferError, match=r"^unet\.precision: .*fp16.*fp32 or bf16 on CPU"):
        check_precision("fp16", use_gpu=False, field="unet.precision")
    check_precision("fp16", use_gpu=True, field="unet.precision")  # decided on the GPU worker


def test_v_prediction_scheduler_trains_on_the_velocity():
    from diffusers import DDIMScheduler

    from synfer_ray.train.diffusion import diffusion_target, denoiser_loss, pick_latents
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    assert torch.allclose(diffusion_target(scheduler, latents, noise, t), velocity)
    epsilon = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    assert diffusion_target(epsilon, latents, noise, t) is noise
    with pytest.raises(SynferError, match="prediction_type: got 'sample'; expected epsilon or v_prediction"):
        diffusion_target(DDIMScheduler.from_config(scheduler.config, prediction_type="sample"), latents, noise, t)
    # The loss of a model that predicts zeros is the mean square of the target the loop drew.
    batch = {"latent_mean": torch.randn(3, 2, 4, 8, 8), "latent_std": torch.full((3, 2, 4, 8, 8), 0.1),
             "input_ids": torch.zeros(3, 77, dtype=torch.int32), "aus": torch.zeros(3, 12)}
    zeros = lambda noisy, *_, **__: torch.zeros_like(noisy)  # noqa: E731
    loss = denoiser_loss(zeros, scheduler, batch, 0.5, torch.zeros(1, 77, dtype=torch.long), 0.0,
                         torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    drawn = pick_latents(batch, 0.5, generator)
    _, drawn_noise, drawn_t = noisy_latents(scheduler, drawn, generator)
    velocity = scheduler.get_velocity(drawn, drawn_noise, drawn_t)
    assert torch.isclose(loss, velocity.pow(2).mean()) and not torch.isclose(loss, drawn_noise.pow(2).mean())
