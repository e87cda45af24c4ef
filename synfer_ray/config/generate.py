"""The generate job's config: AU and diffusion sampling, semantic guidance (SG), the pseudo-label
ensemble, and the settings added since datasets were first recorded."""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, Field, field_validator, model_validator

from synfer_ray.config.common import PoolConfig, Precision, RayConfig, TrackingConfig, _Strict

# Generate settings added after records of a config were first kept (a dataset's identity, a study
# stage's key), each with the value under which it behaves as it did before it existed. Compared
# through without_added_settings, a record from before a setting was added still matches a config
# that leaves it at that value, so hours of shards or stages stay valid across an upgrade.
ADDED_GENERATE_SETTINGS: dict[str, Any] = {"sampling.sg_adaptive": False, "labeling.mirror_average": False,
                                           "sampling.sg_class_scales": {}, "sampling.sg_guide": "pixels",
                                           "sampling.sg_reuse_pass": False, "sampling.sg_latent_guide": None}
# Generate settings that change how rows are computed but never their bytes: left out of a dataset's
# identity and of a study stage's key, so turning one on resumes what was made without it.
ROW_NEUTRAL_SETTINGS: tuple[str, ...] = ("sampling.sg_checkpointing",)


def without_added_settings(record: dict, added: Mapping[str, Any]) -> dict:
    """A copy of ``record`` (a dumped config) less each setting of ``added`` (dotted paths) that holds
    its old-behaviour value; set otherwise, it stays and so tells the two records apart."""
    trimmed = copy.deepcopy(record)
    for path, old_behaviour in added.items():
        *parents, key = path.split(".")
        node: Any = trimmed
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == old_behaviour:
            del node[key]
    return trimmed


def without_row_neutral_settings(record: dict) -> dict:
    """A copy of ``record`` (a dumped generate config) less :data:`ROW_NEUTRAL_SETTINGS`."""
    trimmed = copy.deepcopy(record)
    for path in ROW_NEUTRAL_SETTINGS:
        *parents, key = path.split(".")
        node: Any = trimmed
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return trimmed


class AUSamplingConfig(_Strict):
    """How each row's target action-unit (AU) intensities are drawn from its expression."""

    mode: Literal["prototype"] = Field("prototype", description=(
        "How AUs are chosen: prototype, the expression's typical (EMFACS) AU intensities with seeded random "
        "jitter; the only mode."))
    jitter: float = Field(0.1, ge=0, le=1, description=(
        "Standard deviation of the Gaussian noise added to each of the prototype's active AUs (intensities in "
        "[0, 1]); 0 gives every row of a class the same AUs, higher values give more varied faces."))
    extra_probability: float = Field(0.05, ge=0, le=1, description=(
        "Chance that an AU outside the expression's prototype is switched on for a row; 0 keeps rows to their "
        "prototype's AUs."))
    extra_max: float = Field(0.3, ge=0, le=1, description=(
        "Largest intensity of such an extra AU (drawn uniformly from 0 to this)."))


# diffusers' own scheduler classes; DDIM stays the inversion walk whichever one samples.
Scheduler = Literal["ddim", "dpmpp_2m", "unipc", "euler"]
# What semantic guidance steers (synfer_ray.generator.guidance.SG_TARGETS). The default, the AU tokens,
# is the faces-48 sweep's best agreement within 10% of no SG's diversity (docs/sg_sweep/faces48_v2.md).
SgTarget = Literal["text", "au", "both"]
DEFAULT_SG_TARGET: SgTarget = "au"
# What a guided step's guide reads (synfer_ray.generator.sampler.SamplerSettings.sg_guide).
SgGuide = Literal["pixels", "latents"]
# How much within-class diversity SG may cost against no SG when a sweep picks a default.
DIVERSITY_TOLERANCE = 0.10


def _class_scales_are_steps(scales: dict[str, float]) -> dict[str, float]:
    for name, scale in scales.items():
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"the scale of {name!r} must be a finite number >= 0 (percent of the steered "
                             f"norm), got {scale}")
    return scales


# Class -> SG scale (percent of the steered norm): sampling's and Serve's per-class defaults.
ClassScales = Annotated[dict[str, float], AfterValidator(_class_scales_are_steps)]


class SamplingConfig(_Strict):
    """How each image is sampled: the scheduler and its steps, classifier-free guidance, the AU weight and
    semantic guidance (SG) by a FER classifier."""

    scheduler: Scheduler = Field("ddim", description=(
        "The diffusion sampler (diffusers' schedulers): ddim, dpmpp_2m (DPM-Solver++), unipc or euler. "
        "DPM-Solver++ and UniPC reach a given quality in fewer steps than DDIM."))
    steps: int = Field(25, ge=1, le=1000, description=(
        "Denoising steps per image; sampling time grows linearly with it."))
    cfg_scale: float = Field(3.0, ge=0, description=(
        "Classifier-free guidance scale over the text and AU conditions together: 1 turns CFG off (one model "
        "pass per step instead of two); higher values follow the conditions more closely at less diversity."))
    au_scale: float = Field(1.0, ge=0, description=(
        "Weight of the AU tokens' cross-attention in the UNet: 0 ignores the AUs (text only), 1 is how the "
        "adapter was trained, higher stresses them."))
    sg_scale: float = Field(0.0, ge=0, description=(
        "Semantic guidance step, in percent of the norm of the steered conditioning per guided step, for "
        "classes not named in sg_class_scales; 0 turns SG off for them. Larger steps raise how often faces "
        "read as their class and lower their diversity; the SG sweep (synfer bundle sg-sweep) shows the "
        "trade-off."))
    sg_window: float = Field(0.4, ge=0, le=1, description=(
        "Fraction of the steps, the last (least noisy) ones, at which semantic guidance runs; 0 never guides, "
        "1 guides every step."))
    sg_target: SgTarget = Field(DEFAULT_SG_TARGET, description=(
        "What semantic guidance steers: text (the prompt embedding), au (the AU tokens) or both, each moved "
        "by its own relative step."))
    sg_adaptive: bool = Field(False, description=(
        "Scale each image's SG step by 1 - p(target), the guiding classifier's belief that the face already "
        "shows its class, so faces that read right are barely moved; false uses the same step for every "
        "image."))
    sg_class_scales: ClassScales = Field({}, description=(
        "Per-class SG scales (class -> percent of the steered norm); the classes named take this scale "
        "instead of sg_scale, so SG is spent on classes that need it and not on those already legible. "
        "Names follow the bundle's classes (aliases such as angry are accepted); {} uses sg_scale for all."))
    sg_classifier: str | None = Field(None, description=(
        "Directory of a saved FER classifier that guides SG; null: the bundle's own sg_classifier/. Needed "
        "only when some scale is above 0; it must know every class it guides towards."))
    sg_guide: SgGuide = Field("pixels", description=(
        "What the guide of a guided step reads: pixels, the predicted clean image decoded by the VAE and read "
        "by the pixel classifier (sg_classifier); latents, the predicted clean latent read directly by a "
        "latent guide (the bundle's sg_latent_guide/ or sg_latent_guide), with no decode, so a guided step "
        "costs much less time and memory. The results page on semantic guidance compares the two."))
    sg_reuse_pass: bool = Field(False, description=(
        "Take the guide's own UNet pass as the guided step's conditional half, one UNet pass fewer per guided "
        "step; the moved conditioning then acts from the next step on. False makes a fresh conditional pass "
        "after the move, so the move acts on the step that made it."))
    sg_checkpointing: bool = Field(False, description=(
        "On guided steps, recompute the UNet's and the VAE decoder's activations during the backward pass "
        "instead of storing them: less memory, more time, the same images. It does not change a dataset's "
        "identity, so it may be switched between a run and its resumption."))
    sg_latent_guide: str | None = Field(None, description=(
        "Directory of a saved latent guide that guides SG when sg_guide is latents; null: the bundle's own "
        "sg_latent_guide/. It must have been trained on the bundle's VAE and know every class it guides "
        "towards."))


class VoterConfig(_Strict):
    """One FER classifier that votes on each generated image's label."""

    path: str = Field(..., description=(
        "Directory of a saved FER classifier (config.json + safetensors, e.g. a `synfer train` model/). It "
        "must know every class of the bundle; extra classes are dropped and the rest renormalised."))
    weight: float = Field(1.0, gt=0, description=(
        "The voter's weight in the weighted mean of the voters' probabilities."))
    name: str | None = Field(None, description=(
        "Name recorded with the voter's votes in each row; null: the directory's name."))


class LabelingConfig(_Strict):
    """The pseudo-label ensemble: voters' probabilities are averaged into a soft label, whose top class is
    the row's label and whose top probability decides acceptance; with no voters every row keeps its target
    as its label."""

    voters: list[VoterConfig] = Field([], description=(
        "FER classifiers that vote on every image, besides the bundle's labeler; none and no bundle labeler: "
        "each row's label is its target and every row is accepted."))
    bundle_labeler: bool = Field(True, description=(
        "Let the bundle's FERAnno labeler (its labeler/ directory, from `synfer train-labeler`) vote first "
        "when the bundle has one; false leaves it out."))
    bundle_labeler_weight: float = Field(1.0, gt=0, description=(
        "Weight of the bundle's labeler in the vote, against each voter's weight."))
    tau: float = Field(0.5, ge=0, le=1, description=(
        "Acceptance threshold: a row is accepted when the soft label's top probability is at least tau. "
        "Higher keeps fewer, more certain rows; 0 accepts every row."))
    require_target_agreement: bool = Field(False, description=(
        "Also require the voted label to equal the class the row was generated for; true drops rows that "
        "came out as another expression."))
    keep_rejected: bool = Field(True, description=(
        "Write rejected rows too, with accepted false (training reads accepted rows only by default); false "
        "drops them from the shards."))
    mirror_average: bool = Field(False, description=(
        "Each voter reads a face and its mirror image and votes their mean: steadier labels at twice the "
        "labeling compute."))


class GenerateConfig(_Strict):
    """A labelled synthetic dataset made from a bundle: sharded, resumable, and reproducible from its seed."""

    bundle: str = Field(..., description="Directory of the generator bundle (e.g. models/faces-48).")
    output: str = Field(..., description=(
        "Dataset directory or URI (e.g. s3://bucket/set). A rerun with the same settings resumes it; one with "
        "settings that change the rows is refused unless --overwrite."))
    count: int | None = Field(None, ge=1, description=(
        "Rows of the first pass; with accepted_per_class it defaults to the sum of the targets. Give count, "
        "accepted_per_class or both."))
    accepted_per_class: int | dict[str, int] | None = Field(None, description=(
        "Accepted rows wanted per class: one number for every class, or {class: N}. Top-up passes add rows "
        "for the classes still short until each has its N, max_rows rows exist or max_passes passes ran; "
        "null makes exactly count rows."))
    max_rows: int | None = Field(None, ge=1, description=(
        "The row budget of accepted_per_class: at most this many rows made over all passes; null: 20 times "
        "the sum of the targets. Only with accepted_per_class."))
    max_passes: int = Field(8, ge=1, description=(
        "Most passes, the first included, that accepted_per_class may run before it stops short."))
    seed: int = Field(0, ge=0, description=(
        "Dataset seed: with the same bundle and settings, row i is the same image on every run and machine."))
    class_mix: dict[str, float] | None = Field(None, description=(
        "Share of each class among the rows ({class: weight}, weights summing to 1; classes left out get "
        "none); null: every class equally likely. Only with class_assignment sampled."))
    class_assignment: Literal["sampled", "cycled"] = Field("sampled", description=(
        "How each row gets its class: sampled draws it from class_mix by the row's seed; cycled gives row i "
        "class i mod K, so every prefix of the dataset has equal numbers per class."))
    aus: AUSamplingConfig = Field(AUSamplingConfig(), description="How each row's target AUs are drawn.")
    sampling: SamplingConfig = Field(SamplingConfig(), description=(
        "How each image is sampled: scheduler, steps, guidance scales and semantic guidance."))
    labeling: LabelingConfig = Field(LabelingConfig(), description="How each image is labelled and accepted.")
    rows_per_shard: int | None = Field(None, ge=1, description=(
        "Rows per shard, the unit of work, retry and resume; null: about 256 MB of PNGs per file, at most "
        "10,000 rows, and at least 4 shards per generator actor."))
    precision: Precision = Field("auto", description=(
        "Dtype of the generator's and labelers' weights and activations: auto is fp16 on CUDA and fp32 on "
        "CPU; fp16 is refused on CPU, bf16 where the GPU lacks it."))
    generator: PoolConfig = Field(PoolConfig(), description="The actor pool that samples images.")
    labeler: PoolConfig = Field(PoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=64), description=(
        "The actor pool that runs the voters on each shard."))
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster the job runs on.")
    tracking: TrackingConfig = Field(TrackingConfig(), description=(
        "MLflow tracking of the job: its settings, the dataset card, report and row counts as one run."))

    @model_validator(mode="after")
    def _cycled_is_uniform(self):
        if self.class_assignment == "cycled" and self.class_mix:
            raise ValueError("class_assignment cycled gives every class the same share; drop class_mix or use sampled")
        return self

    @model_validator(mode="after")
    def _count_or_targets(self):
        if self.count is None and self.accepted_per_class is None:
            raise ValueError("give count (rows to make) or accepted_per_class (accepted rows per class to reach)")
        if self.accepted_per_class is None and self.max_rows is not None:
            raise ValueError("max_rows is the budget of accepted_per_class; set that too, or drop max_rows")
        targets = self.accepted_per_class
        if isinstance(targets, dict) and any(n < 0 for n in targets.values()):
            raise ValueError("accepted_per_class: every target must be >= 0")
        if isinstance(targets, int) and targets < 1:
            raise ValueError("accepted_per_class must be >= 1 (or a map of class -> N)")
        if self.max_rows is not None and self.count is not None and self.max_rows < self.count:
            raise ValueError(f"max_rows ({self.max_rows}) must be >= count ({self.count}), the first pass")
        return self

    @field_validator("class_mix")
    @classmethod
    def _mix_sums_to_one(cls, mix):
        if mix is None:
            return mix
        for name, weight in mix.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight}")
        total = sum(mix.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"weights must sum to 1 (they sum to {total:g})")
        return mix
