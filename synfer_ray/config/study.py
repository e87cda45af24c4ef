"""The ``synfer study`` job's config: the models it trains or takes, the four generated conditions,
the SG sweep and the downstream training on real plus synthetic faces."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from synfer_ray.config.common import PoolConfig, Precision, RayConfig, TrackingConfig, _Strict
from synfer_ray.config.generate import SamplingConfig, SgTarget


class StudyStage(_Strict):
    """A model the study trains from a config file (plus overrides), or takes as it is."""

    config: str | None = Field(None, description=(
        "The job config that trains this model: a YAML path or a preset name. Give config or model, not both."))
    overrides: list[str] = Field([], description=(
        "Dotted overrides applied to config, e.g. [optim.epochs=12, data.class_balanced_loss=true]."))
    model: str | None = Field(None, description=(
        "An existing trained model or bundle directory, used as it is instead of training one."))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.config is None) == (self.model is None):
            raise ValueError("give either config (to train it) or model (an existing one), not both or neither")
        return self


# The generated sets a study compares: text only, + AU conditioning, + semantic guidance, + the labeler's vote.
Condition = Literal["text", "text_au", "text_au_sg", "text_au_sg_labeler"]


class StudyGenerationConfig(_Strict):
    """The generated sets the study scores: one per condition, equal numbers per class, the same seeds,
    prompts and AUs in every condition."""

    per_class: int = Field(200, ge=1, description=(
        "Images per class in each condition (classes cycled, so every class gets exactly this many); also "
        "per class in the SG sweep."))
    seed: int = Field(1234, ge=0, description=(
        "Seed of the condition sets and the SG sweep; the downstream synthetic sets take the seeds after it."))
    # SG 8 on the AU tokens: the SG sweep's pick on faces-48 (docs/sg_sweep/faces48_v2.md).
    sampling: SamplingConfig = Field(SamplingConfig(steps=25, cfg_scale=3.0, au_scale=1.0, sg_scale=8.0),
                                     description=(
        "Sampling of every condition: text turns the AUs off (au_scale 0), the SG settings apply only to the "
        "conditions with SG, and the study's guide always guides (sampling.sg_classifier is replaced)."))
    tau: float = Field(0.5, ge=0, le=1, description=(
        "Acceptance threshold of the labelled condition and of the vote measured on the real test faces."))
    mirror_average: bool = Field(False, description=(
        "The labelled condition's voters also read each face's mirror image (labeling.mirror_average)."))
    conditions: list[Condition] = Field(["text", "text_au", "text_au_sg", "text_au_sg_labeler"], description=(
        "Which sets to make and score: text (prompt only), text_au (plus AU conditioning), text_au_sg (plus "
        "semantic guidance) and text_au_sg_labeler (plus the guide's and FERAnno's vote; needs labeler)."))
    rows_per_shard: int = Field(256, ge=1, description="Rows per shard of every generated set.")
    precision: Precision = Field("auto", description=(
        "Dtype of the generator and labelers while generating: auto is fp16 on CUDA and fp32 on CPU."))
    generator: PoolConfig = Field(PoolConfig(min_actors=2, max_actors=2, batch_size=16), description=(
        "The actor pool that samples images."))
    labeler: PoolConfig = Field(PoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=64), description=(
        "The actor pool that runs the voters."))


class StudySweepConfig(_Strict):
    """The SG sweep: the evaluator's agreement, diversity and a contact sheet at every (target, scale),
    from no SG to past the point where agreement falls; the study's sampling otherwise."""

    targets: list[SgTarget] = Field(["text", "au", "both"], min_length=1, description=(
        "SG targets swept: text, au and/or both."))
    scales: list[float] = Field([4, 8, 16, 32, 64, 128], min_length=1, description=(
        "SG scales swept (percent of the steered norm, each > 0); no SG, scale 0, is always the first point."))
    step_rules: list[Literal["fixed", "adaptive"]] = Field(["fixed"], min_length=1, description=(
        "Step rules swept: fixed, every sample's step is the scale; adaptive, times 1 - p(target) "
        "(sampling.sg_adaptive)."))

    @field_validator("scales")
    @classmethod
    def _positive(cls, scales: list[float]) -> list[float]:
        if any(scale <= 0 for scale in scales):
            raise ValueError("SG scales > 0 (no SG, scale 0, is always the sweep's first point)")
        return scales


class StudyDownstreamConfig(_Strict):
    """Downstream training: the same small classifier trained on real faces, synthetic faces and both, and
    tested on the held-out real faces."""

    real_rows: int = Field(2000, ge=7, description=(
        "N, the rows of real_train in the real subset; the synthetic-only sets are multiples of it."))
    multiples: list[int] = Field([1, 2], description=(
        "Sizes of the synthetic-only training sets, in multiples of real_rows."))
    condition: Condition = Field("text_au_sg_labeler", description=(
        "The condition whose generation settings make the synthetic training set."))
    synthetic_rows: Literal["accepted", "all"] = Field("accepted", description=(
        "accepted trains only on rows the labeler accepted (fewer than asked where acceptance is low); all "
        "trains on every generated row with its rectified label, so the sizes are as asked."))
    train: StudyStage = Field(..., description=(
        "The small classifier's train config (config plus overrides); the study sets its data, output and "
        "seed."))
    seeds: list[int] = Field([0], description="Training seeds; every downstream model is trained once per seed.")
    headline_synthetic_rows: int | None = Field(None, ge=7, description=(
        "The headline comparison (the paper's claim): the same model on every real training row, and on those "
        "plus a synthetic set of this many accepted rows, equally many per class (top-up passes). Set this or "
        "headline_rows; both null skips the comparison."))
    headline_max_rows: int | None = Field(None, ge=7, description=(
        "The row budget of headline_synthetic_rows: at most this many rows made in all; null: 20 times the "
        "target. Only with headline_synthetic_rows."))
    headline_rows: int | None = Field(None, ge=7, description=(
        "The headline comparison's other way to size its synthetic set: this many rows made, equally many "
        "asked of each class, keeping every row the labelers accept (so classes they accept more often weigh "
        "more)."))

    @model_validator(mode="after")
    def _one_headline_set(self) -> "StudyDownstreamConfig":
        if self.headline_max_rows is not None and self.headline_synthetic_rows is None:
            raise ValueError("headline_max_rows is the budget of headline_synthetic_rows; set that too, "
                             "or drop headline_max_rows")
        if self.headline_rows is not None and self.headline_synthetic_rows is not None:
            raise ValueError("headline_rows (rows made, every accepted one kept) and headline_synthetic_rows "
                             "(accepted rows per class) are two ways to size the headline set; set one")
        return self


class StudyConfig(_Strict):
    """SynFER's claims measured on real faces; every stage is cached, so a stopped study continues and a
    changed setting reruns only what it touches."""

    name: str = Field("study", description="Study name: the MLflow parent run and the report's title.")
    output: str = Field(..., description=(
        "Study directory: the cached stages (stages/), report/report.md and results.json."))
    real_train: str = Field(..., description=(
        "Labelled real faces the downstream models train on (e.g. FER-2013 train, Parquet)."))
    real_test: str = Field(..., description=(
        "Held-out real faces every classifier, vote and downstream model is tested on."))
    guide: StudyStage = Field(..., description=(
        "The FER classifier that guides SG and votes on labels; it never scores."))
    evaluator: StudyStage = Field(..., description=(
        "The FER classifier that scores generated faces; it must differ from the guide in weights, "
        "architecture, seed and data part."))
    generator: StudyStage = Field(..., description=(
        "The generator: a bundle (model), or a train-generator config trained with the guide as its "
        "sg_classifier and the evaluator as quality.evaluator."))
    labeler: StudyStage | None = Field(None, description=(
        "FERAnno: a train-labeler config trained over the generator's bundle, or a bundle that has labeler/; "
        "needed by the condition text_au_sg_labeler, null otherwise."))
    generation: StudyGenerationConfig = Field(StudyGenerationConfig(), description=(
        "The generated sets, one per condition, and how they are sampled and labelled."))
    sweep: StudySweepConfig | None = Field(None, description="The SG sweep; null skips it.")
    downstream: StudyDownstreamConfig = Field(..., description="Downstream training on real and synthetic faces.")
    ray: RayConfig = Field(RayConfig(num_cpus=4), description="The Ray cluster every stage runs on.")
    tracking: TrackingConfig = Field(TrackingConfig(enabled=True, experiment="synfer-study"), description=(
        "MLflow tracking: one parent run, every stage a child run."))
