"""The base-model path: Stable Diffusion architectures with random weights (`synfer bundle make-random`),
a bundle over such a base (`bundle init`), fine-tuning it with LoRA (`train-generator --from`), training
its adapter (`train-adapter`), and generating from the result (`generate`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import WorkerKiller, separable_faces
from synfer_ray import taxonomy
from synfer_ray.bundle import SD_ARCHITECTURES, BundleManifest, load_bundle
from synfer_ray.cli import app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def tensors(path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(path).items()}


# --- the architectures ----------------------------------------------------------------------------

def test_sd_architectures_have_the_real_parameter_counts():
    """The configs as data build SD 1.5's and 2.1's networks (counted on the meta device, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    expected = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, 340_387_840)}
    for arch, counts in expected.items():
        spec = SD_ARCHITECTURES[arch]
        with torch.device("meta"):
            parts = (UNet2DConditionModel.from_config(spec["unet"]), AutoencoderKL.from_config(spec["vae"]),
                     CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])))
        assert tuple(sum(p.numel() for p in part.parameters()) for part in parts) == counts, arch
    assert SD_ARCHITECTURES["sd21"]["scheduler"][1]["prediction_type"] == "v_prediction"


def test_make_random_refuses_an_unknown_arch_and_a_resolution_sd_cannot_take(tmp_path):
    for args, message in ((["--arch", "sd3"], "arch: got 'sd3'"),
                          (["--arch", "sd15", "--resolution", "100"], "multiple of 64")):
        result = CliRunner().invoke(app, ["bundle", "make-random", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15") / "bundle"
    invoke("bundle", "make-random", path, "--arch", "sd15", "--resolution", "256")
    return path


@pytest.mark.slow
def test_make_random_sd15_writes_the_configs_of_stable_diffusion_15(sd15):
    unet = json.loads((sd15 / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["attention_head_dim"] == 8 and unet["layers_per_block"] == 2 and unet["sample_size"] == 32
    assert unet["down_block_types"][-1] == "DownBlock2D" and not unet["use_linear_projection"]
    vae = json.loads((sd15 / "vae" / "config.json").read_text())
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = json.loads((sd15 / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["intermediate_size"],
            text["hidden_act"], text["vocab_size"], text["max_position_embeddings"]) == (
        768, 12, 12, 3072, "quick_gelu", 49408, 77)
    scheduler = json.loads((sd15 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["prediction_type"] == "epsilon"
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"], scheduler["steps_offset"]) == (
        0.00085, 0.012, "scaled_linear", 1)
    weights = load_file(sd15 / UNET_FILE)
    assert {t.dtype for t in weights.values()} == {torch.float16}  # stored fp16 by default
    assert sum(t.numel() for t in weights.values()) == 859_520_964
    sample = weights["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].float()
    assert torch.isfinite(sample).all() and sample.std() > 0  # random, not empty
    bundle = load_bundle(sd15)
    assert len(bundle.tokenizer) == 49408 and bundle.tokenizer.eos_token_id == 49407
    assert bundle.manifest.resolution == 256 and bundle.sg_classifier is not None


@pytest.mark.slow
def test_generate_makes_256px_images_with_the_sd15_architecture(sd15, ray_cluster, tmp_path):
    output = tmp_path / "dataset"
    invoke("generate", "--config", "tiny", f"bundle={sd15}", f"output={output}", "count=2", "rows_per_shard=2",
           "sampling.steps=2", "sampling.sg_scale=0", "sampling.sg_class_scales={}",
           f"labeling.voters=[{{path: {sd15 / 'sg_classifier'}}}]",
           "generator.min_actors=1", "generator.max_actors=1", "generator.batch_size=2", "generator.torch_threads=2",
           "tracking.enabled=false")
    rows = pq.read_table(output / "data", columns=["image", "sample_id"]).to_pylist()
    assert sorted(r["sample_id"] for r in rows) == [0, 1]
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.size == (256, 256)


# --- a base model, a bundle over it, LoRA fine-tuning ---------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    invoke("bundle", "make-random", path, "--arch", "tiny")
    return path


@pytest.fixture(scope="module")
def over_base(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("over") / "bundle"
    invoke("bundle", "init", path, "--base", base)
    return path


def test_make_random_tiny_runs_in_diffusers_own_pipeline(base):
    from diffusers import StableDiffusionPipeline
    assert {t.dtype for t in load_file(base / UNET_FILE).values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a happy smile", num_inference_steps=2, height=48, width=48, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 48, 48, 3) and np.isfinite(images).all()


def test_init_over_a_random_base_is_a_bundle_like_over_real_weights(base, over_base):
    manifest = BundleManifest.read(over_base)
    assert manifest.base_model == str(base.resolve()) and manifest.resolution == 48  # taken from the base
    assert sorted(p.name for p in over_base.iterdir()) == ["au_adapter", "synfer_bundle.json"]
    bundle = load_bundle(over_base)
    assert bundle.unet.config.sample_size == 12 and bundle.au_names == taxonomy.FINEFACE_12
    assert bundle.vae.dtype == torch.float32  # fp16-stored base weights compute in fp32


@pytest.fixture(scope="module")
def lora_run(ray_cluster, fer2013_dir, over_base, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora") / "run"
    killed = []
    with WorkerKiller(lambda: any((output / "ray" / "tiny-generator-denoiser").glob("checkpoint_*"))) as killer:
        printed = invoke("train-generator", "--config", "tiny-generator", "--from", over_base,
                         f"output={output}", f"data.path={fer2013_dir / 'train.parquet'}", "data.limit=64",
                         "unet.unet_mode=lora", "unet.lora.rank=4", "unet.steps=60", "unet.checkpoint_every=10",
                         "unet.log_every=10", "unet.batch_size=16", "unet.lr=0.01", "unet.train_text_encoder=false",
                         "quality.samples_per_class=1", "quality.sampling.steps=2")
        killed = killer.killed
    return output, printed, killed


@pytest.mark.slow
def test_lora_fine_tune_keeps_the_base_vae_and_changes_only_the_unet_attention(base, lora_run):
    output, printed, killed = lora_run
    assert killed, "no training worker was killed"
    history = json.loads((output / "stages.json").read_text())
    steps = [record["step"] for record in history["denoiser"]["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # resumed from the LoRA checkpoint, each step once
    assert history["vae"]["kept"] and "denoiser: step 60" in printed
    trained = output / "bundle"
    assert tensors(trained / VAE_FILE).keys() == tensors(base / VAE_FILE).keys()
    assert all(torch.equal(a, tensors(trained / VAE_FILE)[k]) for k, a in tensors(base / VAE_FILE).items())
    scale = lambda root: json.loads((root / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(trained) == scale(base) == 0.18215
    before, after = tensors(base / UNET_FILE), tensors(trained / UNET_FILE)
    assert before.keys() == after.keys()  # a plain UNet: the LoRA is merged, no lora_ keys left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in {"to_q", "to_k", "to_v", "0"} and ".attn" in k for k in changed)
    assert torch.equal(before["conv_in.weight"], after["conv_in.weight"])
    assert not (trained / "unet_lora").exists() and not (trained / "sg_classifier").exists()
    manifest = BundleManifest.read(trained)
    assert manifest.base_model is None and manifest.training["config"]["unet"]["unet_mode"] == "lora"
    assert load_bundle(trained).unet.config.sample_size == 12
    from diffusers import StableDiffusionPipeline
    assert StableDiffusionPipeline.from_pretrained(trained).unet.config.sample_size == 12  # an ordinary SD directory


@pytest.mark.slow
def test_generate_from_the_fine_tuned_bundle(lora_run, ray_cluster, tmp_path):
    output, _, _ = lora_run
    dataset = tmp_path / "dataset"
    invoke("generate", "--config", "tiny", f"bundle={output / 'bundle'}", f"output={dataset}", "count=4",
           "rows_per_shard=4", "sampling.steps=2", "sampling.sg_scale=0", "sampling.sg_class_scales={}",
           "labeling.voters=[]",
           "generator.min_actors=1", "generator.max_actors=1", "tracking.enabled=false")
    table = pq.read_table(dataset / "data", columns=["image", "bundle_hash"])
    assert table.num_rows == 4
    assert set(table.column("bundle_hash").to_pylist()) == {BundleManifest.read(output / "bundle").content_hash}
    assert Image.open(io.BytesIO(table.column("image")[0].as_py())).size == (48, 48)


@pytest.mark.slow
def test_train_adapter_on_a_bundle_over_a_base_model(base, over_base, ray_cluster, tmp_path):
    faces = separable_faces(4, seed=3)
    labels = [taxonomy.EXPRESSION_ALIASES.get(x, x) for x in faces.column("label").to_pylist()]
    pq.write_table(pa.table({
        "image": faces.column("image"), "caption": [taxonomy.build_prompt(i, x) for i, x in enumerate(labels)],
        "aus": pa.array([taxonomy.sample_target_aus(i, x, taxonomy.FINEFACE_12).tolist()
                         for i, x in enumerate(labels)], pa.list_(pa.float32()))}), tmp_path / "rows.parquet")
    output = tmp_path / "adapter"
    invoke("train-adapter", "--config", CONFIGS / "train-adapter.yaml", f"bundle={over_base}", f"output={output}",
           f"data.path={tmp_path / 'rows.parquet'}", "stage.steps=2", "stage.batch_size=8", "stage.warmup_steps=0",
           "stage.checkpoint_every=2", "stage.log_every=1", "stage.lr=0.01", "scaling.num_workers=1",
           "tracking.enabled=false")
    trained = BundleManifest.read(output / "bundle")
    assert trained.base_model == str(base.resolve()) and trained.training["steps"][0]["job"] == "train-adapter"
    new, old = load_bundle(output / "bundle"), load_bundle(over_base)
    assert not torch.equal(new.au_adapter.encoder[0].weight, old.au_adapter.encoder[0].weight)
    assert torch.equal(new.unet.conv_in.weight, old.unet.conv_in.weight)  # the base stays frozen
