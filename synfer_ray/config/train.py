"""The FER classifier training job's config (``synfer train`` and ``synfer train-labeler``): data
sources and their mix, augmentation, the model (FERAnno's head included), optimiser and Ray Train
scaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from synfer_ray.config.common import RayConfig, Shuffle, TrackingConfig, _Strict


class SourceConfig(_Strict):
    """One source of labelled faces: a Parquet file or directory, or a finished synfer dataset, and which
    of its rows to read."""

    path: str = Field(..., description=(
        "Labelled faces: a Parquet file or directory with image and label columns, or a finished synfer "
        "dataset; a local path or a URI such as s3://bucket/faces."))
    limit: int | None = Field(None, ge=1, description=(
        "Read about this many rows, a seeded random subset (the same rows on every run); null reads all."))
    part: str | None = Field(None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*$", description=(
        "k/n: only the rows whose image hash falls in part k of n, e.g. 1/2 and 2/2 for the disjoint halves "
        "of a guide and an evaluator; duplicated images always land in the same part. null reads every part."))
    accepted_only: bool = Field(True, description=(
        "For a synfer dataset, read only the rows the labelers accepted; false reads every row with its "
        "voted label. Ignored for other sources."))
    ratio: float | None = Field(None, gt=0, description=(
        "Mix this source in at this many rows per row of data.train[0] (after that source's filters and "
        "limit), a seeded random subset; e.g. 0.5 gives one row of this source for every two of the first. "
        "Give limit or ratio, not both; not on data.train[0]."))
    split: Literal["train", "validation"] | None = Field(None, description=(
        "Read one side of this source's train/validation split (data.val_fraction, by row id and the optim "
        "seed): train for a training source whose held-out rows serve as the validation source. null: no "
        "split, except that data.train[0] gives its train side when no data.validation is named."))

    @model_validator(mode="after")
    def _ratio_or_limit(self):
        if self.ratio is not None and self.limit is not None:
            raise ValueError("give a source either limit (rows) or ratio (rows per row of data.train[0]), not both")
        return self

    @field_validator("part")
    @classmethod
    def _part_in_range(cls, part):
        if part is not None:
            index, count = map(int, part.split("/"))
            if index > count:
                raise ValueError(f"part {index} of {count} does not exist; write k/n with 1 <= k <= n")
        return part


class AugmentConfig(_Strict):
    """Random augmentation of each training image, drawn anew every epoch."""

    crop_padding: int = Field(4, ge=0, description=(
        "Pixels of reflect padding around the image before a random crop back to its size; 0 turns the crop "
        "off."))
    flip: bool = Field(True, description="Mirror each image horizontally with probability 0.5.")
    color_jitter: float = Field(0.2, ge=0, le=1, description=(
        "Largest relative change of brightness and of contrast (each drawn uniformly within +-this); 0 turns "
        "it off."))


class TrainDataConfig(_Strict):
    """What a classifier trains, validates and is tested on, and how the rows are read."""

    train: list[SourceConfig] = Field(..., min_length=1, description=(
        "Training sources, read together. The first is the base that the others' ratio counts against; with "
        "no data.validation it also gives the validation rows (its val_fraction)."))
    validation: SourceConfig | None = Field(None, description=(
        "Rows every epoch is validated on and the best checkpoint is chosen by; null: a val_fraction split of "
        "data.train[0]."))
    val_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "Share of rows held out for validation, from data.train[0] when no validation source is given, and "
        "for the two sides of any source with split set."))
    test: SourceConfig | None = Field(None, description=(
        "Held-out real faces the best model is evaluated on after training (accuracy, UAR, macro-F1, "
        "confusion matrix); null skips the test."))
    labels: Literal["hard", "soft"] = Field("hard", description=(
        "Targets of synfer rows: hard trains on the voted label, soft on the voters' mean probabilities (the "
        "soft label). Real faces always train on their label."))
    class_balanced_loss: bool = Field(False, description=(
        "Weight the loss of each class by its inverse frequency in the training mix, so rare classes count "
        "as much as common ones."))
    class_balanced_sampling: bool = Field(False, description=(
        "Resample training rows every epoch so each class fills an equal share of it (rare classes repeated, "
        "common ones thinned); the epoch keeps about the same length."))
    shuffle: Shuffle = Field("global", description=(
        "Order of the training rows: global, an all-to-all shuffle (needed when a source is written class by "
        "class, as FER-2013 and folder imports are); blocks only reorders blocks, cheaper, for sources already "
        "in random order."))
    cache: Literal["auto", "always", "never"] = Field("auto", description=(
        "Keep the decoded rows in Ray's object store after the first epoch instead of reading and decoding "
        "them every epoch: auto when they fit a quarter of the store, always, or never."))
    image_size: int = Field(48, ge=8, description=(
        "Side in pixels that every face is resized to before training and evaluation."))
    augment: AugmentConfig = Field(AugmentConfig(), description="Random augmentation of the training images.")

    @model_validator(mode="after")
    def _first_source_is_the_base(self):
        if self.train[0].ratio is not None:
            raise ValueError("data.train[0] is what the other sources' ratio counts against; give it a limit "
                             "instead of a ratio, or put the source with the ratio after it")
        for name in ("validation", "test"):
            if getattr(self, name) is not None and getattr(self, name).ratio is not None:
                raise ValueError(f"data.{name}: ratio mixes training sources; use limit here")
        return self


class LabelerModelConfig(_Strict):
    """FERAnno's diffusion features and head sizes (METHOD.md section 3); read with model.arch feranno."""

    timestep: int = Field(1, ge=0, le=999, description=(
        "Diffusion timestep at which the frozen UNet reads each face's latent; small values keep the face "
        "almost noise-free."))
    feature_blocks: list[str] = Field([], description=(
        "UNet blocks whose output feature maps the head reads (e.g. mid_block, up_blocks.1); empty: the mid "
        "block and every up block."))
    attention_layers: list[str] = Field([], description=(
        "Cross-attention layers whose text-attention maps the head reads; empty: every cross-attention layer "
        "of the mid and up blocks."))
    attention_tokens: int = Field(8, ge=1, le=75, description=(
        "Prompt tokens (after the start token) whose attention maps are kept."))
    size: int = Field(0, ge=0, description=(
        "Side of the grid that the feature and attention maps are resized to; 0: the latent size, at most 16."))
    dim: int = Field(128, ge=8, description="Width of the head's token embeddings.")
    heads: int = Field(4, ge=1, description="Attention heads of the head's cross-attention fusion.")
    # Why it helps: feranno.py's _Branch. It is part of the study's labeler stage key, so changing it
    # retrains a study's labeler.
    standardize_inputs: bool = Field(True, description=(
        "Standardise each input channel (batch norm) before the head's branches, which balances the feature "
        "and attention maps' very different scales; false builds the head without it."))


class ModelConfig(_Strict):
    """The classifier to train: its architecture, starting weights and classes."""

    arch: Literal["small_cnn", "small_convnext", "feranno", "latent-guide", "resnet18", "resnet50", "vit_b",
                  "convnext_t"] = Field("small_cnn", description=(
        "Architecture: small_cnn and small_convnext are small and quick (two families, so a guide and an "
        "evaluator can differ); resnet18, resnet50, vit_b and convnext_t are standard backbones; feranno is "
        "the labeler head over a bundle's frozen diffusion features (train-labeler sets it); latent-guide is "
        "a semantic-guidance classifier over a bundle's VAE latents (needs model.bundle; install it with "
        "`synfer bundle add-latent-guide`)."))
    pretrained: str | None = Field(None, description=(
        "A transformers image classifier (path or hub id) to start from, with a new head over the classes; "
        "null starts from random weights. Not used by feranno or latent-guide."))
    expressions: str = Field("affectnet7", description=(
        "The class set: affectnet7 (neutral, happy, sad, surprise, fear, disgust, anger) or affectnet8 "
        "(plus contempt). Every source's labels must fall in it."))
    bundle: str | None = Field(None, description=(
        "feranno and latent-guide only, and required with them: the generator bundle whose frozen UNet gives "
        "FERAnno's features, or whose VAE latents (and UNet's noisy x0 predictions) the latent guide reads."))
    labeler: LabelerModelConfig = Field(LabelerModelConfig(), description=(
        "FERAnno's features and head sizes; used only with arch feranno."))

    @model_validator(mode="after")
    def _bundle_archs_need_a_bundle(self):
        if self.arch == "feranno" and not self.bundle:
            raise ValueError("arch feranno needs model.bundle: the bundle whose UNet features it reads")
        if self.arch == "latent-guide" and not self.bundle:
            raise ValueError("arch latent-guide needs model.bundle: the bundle whose VAE latents it reads")
        return self


class OptimConfig(_Strict):
    """The optimiser (AdamW, warmup then cosine decay) and its schedule, under DeepSpeed."""

    epochs: int = Field(10, ge=1, description=(
        "Passes over the training rows; each ends with a validation pass and a checkpoint."))
    batch_size: int = Field(64, ge=1, description=(
        "Rows per step on each worker; the global batch is this times scaling.num_workers."))
    lr: float = Field(1e-3, gt=0, description="Peak learning rate, reached after the warmup.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW's decoupled weight decay; 0 turns it off.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Share of all optimiser steps spent ramping the learning rate up linearly before the cosine decay."))
    label_smoothing: float = Field(0.1, ge=0, lt=1, description=(
        "Share of each target spread evenly over all classes; 0 trains on the targets as they are."))
    gradient_accumulation: int = Field(1, ge=1, description=(
        "Batches whose gradients are summed before each optimiser step, for a larger effective batch on the "
        "same memory."))
    zero_stage: int = Field(2, ge=0, le=3, description=(
        "DeepSpeed ZeRO stage: 0 off, 1 partitions optimiser state, 2 also gradients, 3 also weights across "
        "workers. train-labeler and model.arch latent-guide accept 0 to 2."))
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "DeepSpeed's training precision: fp32, or mixed bf16 or fp16 (with loss scaling) on GPU workers only; "
        "bf16 where the GPU supports it."))
    early_stopping_patience: int | None = Field(None, ge=1, description=(
        "Stop after this many epochs without a better validation accuracy; null trains every epoch."))
    seed: int = Field(0, ge=0, description=(
        "Seed of the weights' initialisation, the row subsets (limit, ratio), the train/validation split and "
        "the shuffle."))


class ScalingConfig(_Strict):
    """Ray Train workers: how many, and what each one asks Ray for."""

    num_workers: int = Field(2, ge=1, description=(
        "Training workers (processes) running data-parallel, each on its share of every epoch."))
    use_gpu: bool = Field(False, description=(
        "Give each worker one GPU (NCCL between workers); false trains on CPU (gloo)."))
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs Ray reserves for each worker.")
    torch_threads: int = Field(1, ge=1, description="CPU threads PyTorch uses inside each worker.")
    max_failures: int = Field(2, ge=0, description=(
        "Times a failed run is restarted from its last checkpoint before the job fails; 0 fails at once."))
    resources_per_worker: dict[str, float] = Field({}, description=(
        "Custom Ray resources each worker asks for, e.g. {accelerator: 1}, to place workers on the nodes that "
        "advertise them."))

    def worker_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **self.resources_per_worker}


class TrainConfig(_Strict):
    """A FER classifier trained on Ray Train with DeepSpeed, tested on real faces and tracked in MLflow
    (train-labeler trains FERAnno this way, with model.arch feranno)."""

    name: str = Field("fer", description="Run name, in MLflow and in Ray Train's storage.")
    output: str = Field(..., description=(
        "Run directory or URI (e.g. s3://bucket/run): checkpoints, the best model (model/), its evaluation "
        "(eval/) and summary.json. A finished output is refused unless --overwrite."))
    data: TrainDataConfig = Field(..., description=(
        "The training, validation and test faces, and how their rows are read."))
    model: ModelConfig = Field(ModelConfig(), description=(
        "The classifier to train: architecture, starting weights and class set."))
    optim: OptimConfig = Field(OptimConfig(), description=(
        "The optimiser, its learning-rate schedule, precision and seed."))
    scaling: ScalingConfig = Field(ScalingConfig(), description=(
        "Ray Train workers: how many, and CPUs, GPUs and threads for each."))
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster the job runs on.")
    tracking: TrackingConfig = Field(TrackingConfig(enabled=True, experiment="synfer-train"), description=(
        "MLflow tracking of the run: parameters, per-step metrics and the trained artifacts."))
    register_as: str | None = Field("synfer-fer", description=(
        "MLflow registered-model name the best model is added to as a new version (needs tracking enabled); "
        "null skips registering."))
