"""The generator and AU-adapter training jobs' configs: labelled faces, the generator's architecture,
the VAE and denoiser stages, LoRA, and the quality report after training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from synfer_ray.config.common import Precision, RayConfig, Shuffle, TrackingConfig, _Strict
from synfer_ray.config.generate import SamplingConfig
from synfer_ray.config.train import ScalingConfig


class LabelledFacesConfig(_Strict):
    """Labelled faces (the documented Parquet schema, or FER-2013-style ``image`` + ``label``)."""

    path: str = Field(..., description=(
        "A Parquet file or directory of faces with image and label columns, and optionally caption and aus "
        "(per-row AU intensities in the bundle's AU order), e.g. from `synfer data import`; a local path or a "
        "URI."))
    limit: int | None = Field(None, ge=1, description=(
        "Read about this many rows, a seeded random subset (the same rows on every run); null reads all."))
    part: str | None = Field(None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*$", description=(
        "k/n: only the rows whose image hash falls in part k of n; null reads every part."))
    shuffle: Shuffle = Field("global", description=(
        "Order of the training rows: global, an all-to-all shuffle (needed when the source is written class "
        "by class); blocks only reorders blocks, cheaper, for sources already in random order."))


class GeneratorArchitecture(_Strict):
    """Sizes of a generator trained from scratch (ignored with ``from_bundle``)."""

    resolution: int = Field(48, ge=8, description=(
        "Side of the generated faces in pixels; must divide by 2^(len(vae_channels) - 1)."))
    vae_channels: list[int] = Field([32, 64, 128], description=(
        "VAE channels per level; each level after the first halves the resolution, so the latent side is "
        "resolution / 2^(len - 1)."))
    vae_norm_groups: int = Field(16, ge=1, description=(
        "Group-norm groups in the VAE; must divide every entry of vae_channels."))
    latent_channels: int = Field(4, ge=1, description="Channels of the VAE latent that the UNet denoises.")
    unet_channels: list[int] = Field([64, 128, 128], description=(
        "UNet channels per level (one entry per down/up level)."))
    unet_attention_levels: list[bool] = Field([False, True, True], description=(
        "Per UNet level, whether it has cross-attention to the text and AU tokens; one flag per entry of "
        "unet_channels."))
    unet_layers_per_block: int = Field(1, ge=1, description="ResNet layers in each UNet block.")
    attention_head_dim: int = Field(8, ge=1, description="Width of each attention head in the UNet.")
    norm_groups: int = Field(32, ge=1, description=(
        "Group-norm groups in the UNet; must divide every entry of unet_channels."))
    text_hidden: int = Field(128, ge=8, description=(
        "Width of the CLIP-style text encoder, which is also the UNet's cross-attention width."))
    text_layers: int = Field(2, ge=1, description="Transformer layers of the text encoder.")
    text_heads: int = Field(4, ge=1, description="Attention heads of the text encoder.")
    au_tokens: int = Field(4, ge=1, description=(
        "Conditioning tokens the AU adapter turns each AU vector into."))
    adapter_hidden: int = Field(256, ge=1, description="Hidden width of the AU adapter's two-layer MLP.")
    au_set: str = Field("fineface12", description=(
        "The AU space the generator is conditioned on: fineface12 (12 AUs) or opengraphau41 (41 AUs)."))
    expressions: str = Field("affectnet7", description=(
        "The class set: affectnet7 or affectnet8 (plus contempt); the training faces must cover every class."))

    @model_validator(mode="after")
    def _levels(self):
        if len(self.unet_attention_levels) != len(self.unet_channels):
            raise ValueError("unet_attention_levels needs one flag per entry of unet_channels")
        if self.resolution % 2 ** (len(self.vae_channels) - 1):
            raise ValueError(f"resolution {self.resolution} must divide by 2^(len(vae_channels) - 1)")
        return self


class StageConfig(_Strict):
    """One optimisation stage (VAE, UNet or adapter), counted in optimiser steps."""

    steps: int = Field(..., ge=0, description="Optimiser steps of the stage; 0 skips its training.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "Mixed precision of the forward pass (torch.autocast; fp16 adds a gradient scaler and needs GPU "
        "workers); weights and optimiser state stay fp32."))
    batch_size: int = Field(64, ge=1, description=(
        "Rows per step on each worker; the global batch is this times scaling.num_workers."))
    lr: float = Field(1e-3, gt=0, description="Learning rate, reached after the warmup and then kept.")
    warmup_steps: int = Field(100, ge=0, description=(
        "Steps over which the learning rate ramps up linearly from near 0; 0 starts at lr."))
    checkpoint_every: int = Field(500, ge=1, description=(
        "Steps between checkpoints, the points a failed or stopped run resumes from."))
    log_every: int = Field(50, ge=1, description="Steps between logged metrics (loss, throughput).")


class VAEStageConfig(StageConfig):
    """The VAE stage: the autoencoder learns to compress faces to latents."""

    steps: int = Field(800, ge=0, description="Optimiser steps of the VAE stage; 0 skips its training.")
    kl_weight: float = Field(1e-6, ge=0, description=(
        "Weight of the KL term against the L1 reconstruction loss; higher gives smoother latents and blurrier "
        "reconstructions."))
    finetune: bool = Field(False, description=(
        "With from_bundle, fine-tune the bundle's VAE for steps steps and measure its latent scale anew; "
        "false keeps it and its scale as they are (an SD VAE should not relearn small faces)."))


class LoRAConfig(_Strict):
    """Low-rank adapters on the UNet's attention projections (peft), merged into the UNet at the end."""

    rank: int = Field(16, ge=1, description=(
        "Rank of each adapter; higher adapts more at more trainable weights."))
    alpha: float = Field(16.0, gt=0, description=(
        "LoRA scaling: the adapters' update is multiplied by alpha / rank."))
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], description=(
        "Names of the UNet's modules that get adapters (peft's target_modules)."))


class DenoiserStageConfig(StageConfig):
    """The denoiser stage: the UNet with the text encoder and the AU adapter learn to denoise face latents
    under their caption and AUs."""

    steps: int = Field(6000, ge=0, description="Optimiser steps of the denoiser stage; 0 skips its training.")
    lr: float = Field(5e-4, gt=0, description="Learning rate, reached after the warmup and then kept.")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description=(
        "Share of training rows whose text and AUs are both dropped, which teaches the unconditional "
        "prediction that classifier-free guidance needs; 0 leaves CFG nothing to compare against."))
    ema_decay: float = Field(0.999, ge=0, lt=1, description=(
        "Decay of the exponential moving average of the trained weights, which are what is saved; 0 saves the "
        "raw weights."))
    train_text_encoder: bool = Field(True, description=(
        "train-generator: train the text encoder with the UNet; false keeps it frozen."))
    train_adapter: bool = Field(True, description=(
        "train-generator: train the AU adapter with the UNet; false keeps it frozen."))
    au_jitter: float = Field(0.1, ge=0, le=1, description=(
        "Rows without their own AUs are conditioned on their class's prototype AUs with this Gaussian "
        "jitter (intensities in [0, 1])."))
    captions: Literal["expression", "attributes"] = Field("expression", description=(
        "train-generator: the caption of a row without its own: expression names only the expression (the "
        "text path learns the class); attributes puts it in a template of random attributes that say "
        "nothing about the image."))
    class_balance: float = Field(1.0, ge=0, le=1, description=(
        "train-generator: each class's rows are repeated about (largest class / class) ** class_balance "
        "times; 1 samples the classes evenly, 0 keeps the data's own mix."))
    unet_mode: Literal["full", "lora"] = Field("full", description=(
        "train-generator: full trains every UNet weight; lora trains low-rank adapters (lora) and merges them "
        "into the UNet at the end."))
    lora: LoRAConfig = Field(LoRAConfig(), description="The adapters trained with unet_mode lora.")


class QualityConfig(_Strict):
    """The report after training: contact sheets, reconstructions, evaluator agreement."""

    evaluator: str | None = Field(None, description=(
        "A FER classifier trained on real faces (`synfer train`), not the guide, that scores whether the "
        "samples read as their class; null leaves agreement out of the report."))
    samples_per_class: int = Field(32, ge=1, description="Images sampled per class for the report.")
    sampling: SamplingConfig = Field(SamplingConfig(steps=25, cfg_scale=3.0), description=(
        "How the report's images are sampled."))
    precision: Precision = Field("auto", description=(
        "Dtype of the bundle while sampling the report: auto is fp16 on CUDA and fp32 on CPU; the evaluator "
        "always scores in fp32."))
    seed: int = Field(10_000, ge=0, description=(
        "Seed of the report's samples; the same seed gives the same faces for comparing runs."))


class GeneratorTrainConfig(_Strict):
    """A generator bundle (VAE, then UNet + text encoder + AU adapter) trained or fine-tuned on labelled
    faces, with a quality report."""

    name: str = Field("generator", description="Run name, in MLflow and in Ray Train's storage.")
    output: str = Field(..., description=(
        "Run directory: stage checkpoints, the bundle (<output>/bundle) and the report. A stopped run resumes "
        "from its last finished stage; a finished one is refused unless --overwrite."))
    data: LabelledFacesConfig = Field(..., description="The faces the generator learns from.")
    from_bundle: str | None = Field(None, description=(
        "Fine-tune this bundle instead of training from scratch (architecture is then ignored); --from on the "
        "command line sets it."))
    architecture: GeneratorArchitecture = Field(GeneratorArchitecture(), description=(
        "Sizes of a generator trained from scratch."))
    vae: VAEStageConfig = Field(VAEStageConfig(), description=(
        "The first stage: the VAE learns to encode faces to latents (kept as it is with from_bundle)."))
    unet: DenoiserStageConfig = Field(DenoiserStageConfig(), description=(
        "The second stage: the UNet, text encoder and AU adapter learn to denoise the latents."))
    sg_classifier: str | None = Field(None, description=(
        "A FER classifier copied into the bundle as its guide for semantic guidance (sg_classifier/); null "
        "ships the bundle without one."))
    quality: QualityConfig = Field(QualityConfig(), description=(
        "The quality report written after training: contact sheets, reconstructions, evaluator agreement."))
    seed: int = Field(0, ge=0, description=(
        "Seed of the initial weights, the row subset, the noise and timesteps drawn in training and the "
        "shuffle."))
    scaling: ScalingConfig = Field(ScalingConfig(num_workers=1, torch_threads=2), description=(
        "Ray Train workers of each stage."))
    ray: RayConfig = Field(RayConfig(num_cpus=4), description=(
        "The Ray cluster the job runs on; half its num_cpus (at least 1) encode faces to latents."))
    tracking: TrackingConfig = Field(TrackingConfig(enabled=True, experiment="synfer-generator"), description=(
        "MLflow tracking of the run: parameters, per-step metrics and the trained artifacts."))


class AdapterTrainConfig(_Strict):
    """Only the AU adapter of a bundle trained on image + caption + AU rows (FEText-style Parquet), written
    as a new version of the bundle."""

    name: str = Field("adapter", description="Run name, in MLflow and in Ray Train's storage.")
    bundle: str = Field(..., description="Directory of the bundle whose AU adapter is trained.")
    output: str = Field(..., description=(
        "Run directory; the new bundle version is written to <output>/bundle. A finished one is refused "
        "unless --overwrite."))
    data: LabelledFacesConfig = Field(..., description=(
        "Faces with image, caption and aus columns (AU vectors in the bundle's AU order)."))
    stage: DenoiserStageConfig = Field(DenoiserStageConfig(steps=500, lr=1e-4, train_text_encoder=False),
                                       description=(
        "The training stage. Only the AU adapter trains, so train_text_encoder, train_adapter, captions, "
        "class_balance, unet_mode and lora are not used here."))
    seed: int = Field(0, ge=0, description=(
        "Seed of the row subset, the noise and timesteps drawn in training and the shuffle."))
    scaling: ScalingConfig = Field(ScalingConfig(num_workers=2), description=(
        "Ray Train workers of the training stage: how many, and CPUs, GPUs and threads for each."))
    ray: RayConfig = Field(RayConfig(num_cpus=4), description=(
        "The Ray cluster the job runs on; half its num_cpus (at least 1) encode faces to latents."))
    tracking: TrackingConfig = Field(TrackingConfig(enabled=True, experiment="synfer-adapter"), description=(
        "MLflow tracking of the run: parameters, per-step metrics and the trained artifacts."))
