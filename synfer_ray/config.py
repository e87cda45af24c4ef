"""Typed job configs, read from YAML plus dotted ``key.sub=value`` overrides, validated once here.

Validation errors become :class:`SynferError` naming the dotted field, so a bad config fails before
any cluster work starts.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synfer_ray.errors import SynferError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Generate settings added after records of a config were first kept (a dataset's identity, a study
# stage's key), each with the value under which it behaves as it did before it existed. Compared
# through without_added_settings, a record from before a setting was added still matches a config
# that leaves it at that value, so hours of shards or stages stay valid across an upgrade.
ADDED_GENERATE_SETTINGS: dict[str, Any] = {"sampling.sg_adaptive": False, "labeling.mirror_average": False,
                                           "sampling.sg_class_scales": {}}


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


class PoolConfig(_Strict):
    """An actor pool: sizes, per-actor resources and the batch each call takes."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    torch_threads: int = Field(1, ge=1)
    resources: dict[str, float] = {}  # custom Ray resources per actor, e.g. {accelerator: 1}

    @model_validator(mode="after")
    def _sizes(self):
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class AUSamplingConfig(_Strict):
    mode: Literal["prototype"] = "prototype"
    jitter: float = Field(0.1, ge=0, le=1)
    extra_probability: float = Field(0.05, ge=0, le=1)
    extra_max: float = Field(0.3, ge=0, le=1)


Precision = Literal["auto", "fp32", "bf16", "fp16"]
Scheduler = Literal["ddim", "dpmpp_2m", "unipc", "euler"]
# Training rows' order (synfer_ray.data.faces.shuffled): global, an all-to-all shuffle (sources sorted
# by class train correctly); blocks, block order only (cheaper, for sources already in random order).
Shuffle = Literal["global", "blocks"]
# What semantic guidance steers (synfer_ray.generator.guidance.SG_TARGETS). The default, the AU tokens,
# is the faces-48 sweep's best agreement within 10% of no SG's diversity (docs/sg_sweep/faces48_v2.md).
SgTarget = Literal["text", "au", "both"]
DEFAULT_SG_TARGET: SgTarget = "au"
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
    # diffusers' own scheduler classes; DDIM stays the inversion walk whichever one samples.
    scheduler: Scheduler = "ddim"
    steps: int = Field(25, ge=1, le=1000)
    cfg_scale: float = Field(3.0, ge=0)
    au_scale: float = Field(1.0, ge=0)
    sg_scale: float = Field(0.0, ge=0)  # percent of the steered conditioning's norm per guided step
    sg_window: float = Field(0.4, ge=0, le=1)
    sg_target: SgTarget = DEFAULT_SG_TARGET
    sg_adaptive: bool = False  # each sample's step times 1 - p(target) (guidance.py)
    # The SG scale of the named classes (the others take sg_scale): SG spent where it buys agreement,
    # not on classes already legible. The SG sweep reads the best mix off each class's agreement and
    # diversity; the study's, sg_target both, sg_scale 0, {neutral: 8, sad: 8, fear: 32, anger: 8}:
    # +14.9 points at 9.6% less diversity, every class >= 48% (docs/study.md).
    sg_class_scales: ClassScales = {}
    sg_classifier: str | None = None


class VoterConfig(_Strict):
    path: str
    weight: float = Field(1.0, gt=0)
    name: str | None = None


class LabelingConfig(_Strict):
    """The pseudo-label ensemble; with no voters every row keeps its target as its label."""

    voters: list[VoterConfig] = []
    bundle_labeler: bool = True  # the bundle's FERAnno (labeler/), when it has one, votes too
    bundle_labeler_weight: float = Field(1.0, gt=0)
    tau: float = Field(0.5, ge=0, le=1)
    require_target_agreement: bool = False
    keep_rejected: bool = True
    # Each voter reads a face and its mirror image and votes their mean (twice the labeling compute).
    # FER-2013 test (synfer evaluate --mirror-average): faces-48's guide 55.8% -> 56.3%; the study's
    # FERAnno 53.0% -> 55.1%, guide 53.0% -> 53.9%, their vote 55.2% -> 56.8% (docs/study.md).
    mirror_average: bool = False


class RayConfig(_Strict):
    address: str | None = None
    # Logical CPUs for a local cluster; Train+Data and Data resume hang with only 2 (RAY-2.60.md).
    num_cpus: int | None = Field(None, ge=1)


class TrackingConfig(_Strict):
    enabled: bool = False
    uri: str | None = None
    experiment: str = "synfer"


class GenerateConfig(_Strict):
    bundle: str
    output: str
    # Rows of the first pass; with accepted_per_class it defaults to the sum of the targets.
    count: int | None = Field(None, ge=1)
    # Accepted-count targets: N accepted rows per class (or {class: N}); top-up passes add rows for
    # the classes short of it until each has N, or max_rows rows exist, or max_passes passes ran.
    accepted_per_class: int | dict[str, int] | None = None
    max_rows: int | None = Field(None, ge=1)  # the budget; default 20x the sum of the targets
    max_passes: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    class_mix: dict[str, float] | None = None
    class_assignment: Literal["sampled", "cycled"] = "sampled"  # cycled: row i is class i mod K
    aus: AUSamplingConfig = AUSamplingConfig()
    sampling: SamplingConfig = SamplingConfig()
    labeling: LabelingConfig = LabelingConfig()
    # Rows per shard (the unit of work, retry and resume); null: about 256 MB of PNGs per file, at most
    # 10,000 rows, and at least 4 shards per generator actor (data/shards.py auto_rows_per_shard).
    rows_per_shard: int | None = Field(None, ge=1)
    # Weights and activations of the generator and the labelers, cast once at load. auto: fp16 on
    # CUDA, the CPU default elsewhere (see synfer_ray.precision).
    precision: Precision = "auto"
    generator: PoolConfig = PoolConfig()
    labeler: PoolConfig = PoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=64)
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()

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


Config = TypeVar("Config", bound=BaseModel)


def parse_value(text: str) -> Any:
    """An override's value as YAML would read it (numbers, booleans, lists, null)."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["sampling.steps=10", "data.train.0.limit=500"]`` applied to a nested dict (copied);
    a numeric part indexes into a list."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise SynferError("override", override, "KEY=VALUE with a dotted key, e.g. sampling.steps=10")
        node: Any = result
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SynferError(".".join(parts[:depth + 1]), override,
                                      f"an index below {len(node)} into the list {'.'.join(parts[:depth])}")
                part = int(part)
            elif not isinstance(node, dict):
                raise SynferError(".".join(parts[:depth + 1]), override,
                                  f"a key inside a section; {'.'.join(parts[:depth])} is a value")
            if last:
                node[part] = parse_value(value)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return result


_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
           "less_than": "< {lt}"}


def _first_error(error: ValidationError) -> SynferError:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    kind, value = first["type"], first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    if kind in _BOUNDS:
        message = "a number " + _BOUNDS[kind].format(**first.get("ctx", {}))
    elif kind == "extra_forbidden":
        message = "no such setting; check the spelling against the example configs in configs/"
    elif kind == "missing":
        message, value = "a value (this setting is required)", None
    else:
        message = message[0].lower() + message[1:]
    return SynferError(field, value, message)


def build_config(model: type[Config], raw: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    try:
        return model.model_validate(apply_overrides(raw, overrides))
    except ValidationError as error:
        raise _first_error(error) from None


def load_config(model: type[Config], path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML), apply overrides, validate into ``model``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SynferError("--config", str(path), "an existing YAML file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SynferError("--config", str(path), f"valid YAML ({error})") from None
        if not isinstance(raw, dict):
            raise SynferError("--config", str(path), "a YAML mapping of settings at the top level")
    return build_config(model, expand_environment(raw), overrides)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(value: Any) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in string values, so one config serves laptop and cluster."""
    if isinstance(value, dict):
        return {key: expand_environment(item) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_environment(item) for item in value]
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise SynferError(f"${{{name}}}", value, f"the environment variable {name} set, "
                                                         f"or a default written as ${{{name}:-DEFAULT}}")
            return default
        return _ENV_REFERENCE.sub(substitute, value)
    return value


class SourceConfig(_Strict):
    path: str
    limit: int | None = Field(None, ge=1)  # a seeded random subset of this many rows
    # "k/n": only the rows whose image hash falls in part k of n (disjoint halves for a guide and
    # an evaluator); duplicated images always land in the same part.
    part: str | None = Field(None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*$")
    accepted_only: bool = True  # synfer datasets: train on accepted rows only
    # Mixing: rows drawn from this source per row of data.train[0] (after that source's filters
    # and limit), a seeded random subset; e.g. 0.5 = one synthetic row for every two real ones.
    ratio: float | None = Field(None, gt=0)
    # One side of this source's train/validation split (data.val_fraction, by row id and optim seed):
    # a validation source of held-out real rows beside training sources that exclude them. Unset,
    # data.train[0] gives its "train" side when no data.validation is named.
    split: Literal["train", "validation"] | None = None

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
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    color_jitter: float = Field(0.2, ge=0, le=1)


class TrainDataConfig(_Strict):
    train: list[SourceConfig] = Field(..., min_length=1)
    validation: SourceConfig | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)  # used when no validation source is given
    test: SourceConfig | None = None  # real held-out faces, evaluated after training
    labels: Literal["hard", "soft"] = "hard"
    class_balanced_loss: bool = False  # weight the loss by inverse class frequency
    class_balanced_sampling: bool = False  # resample rows so every class is seen equally often
    shuffle: Shuffle = "global"
    # Decoded rows kept in Ray's object store across epochs (synfer_ray.train.fer.cache_decoded_rows):
    # auto when they fit a quarter of it, always, or never (read and decode every epoch).
    cache: Literal["auto", "always", "never"] = "auto"
    image_size: int = Field(48, ge=8)
    augment: AugmentConfig = AugmentConfig()

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
    """FERAnno's diffusion features and head sizes (METHOD.md section 3)."""

    timestep: int = Field(1, ge=0, le=999)
    feature_blocks: list[str] = []  # empty: mid_block and every up block
    attention_layers: list[str] = []  # empty: every mid/up cross-attention layer
    attention_tokens: int = Field(8, ge=1, le=75)
    size: int = Field(0, ge=0)  # feature grid; 0 = latent size, at most 16
    dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    # Each input channel standardised before the branches (feranno.py says why); false: the head as
    # before it existed. Part of the study's labeler stage key, so a study made before retrains.
    standardize_inputs: bool = True


class ModelConfig(_Strict):
    arch: Literal["small_cnn", "small_convnext", "feranno", "resnet18", "resnet50", "vit_b",
                  "convnext_t"] = "small_cnn"
    pretrained: str | None = None
    expressions: str = "affectnet7"
    bundle: str | None = None  # feranno: the bundle whose frozen UNet gives the features
    labeler: LabelerModelConfig = LabelerModelConfig()

    @model_validator(mode="after")
    def _feranno_needs_a_bundle(self):
        if self.arch == "feranno" and not self.bundle:
            raise ValueError("arch feranno needs model.bundle: the bundle whose UNet features it reads")
        return self


class OptimConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    gradient_accumulation: int = Field(1, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    # DeepSpeed's mixed precision: bf16 where the hardware has it, fp16 with loss scaling on GPUs.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    max_failures: int = Field(2, ge=0)
    resources_per_worker: dict[str, float] = {}  # custom Ray resources per worker, e.g. {accelerator: 1}

    def worker_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **self.resources_per_worker}


class TrainConfig(_Strict):
    name: str = "fer"
    output: str
    data: TrainDataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig(enabled=True, experiment="synfer-train")
    register_as: str | None = "synfer-fer"  # MLflow registered-model name; null to skip


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)


class ServeConfig(_Strict):
    bundle: str
    voters: list[VoterConfig] = []  # the labeler's ensemble; the bundle's guide when empty
    mirror_average: bool = False  # each voter also reads the mirror image (labeling.mirror_average)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    max_images: int = Field(8, ge=1, le=64)
    max_steps: int = Field(50, ge=1, le=1000)
    default_steps: int = Field(20, ge=1)
    max_batch_size: int = Field(8, ge=1)  # rows sampled together across concurrent requests
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    request_timeout_s: float = Field(120, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024)  # a bigger request body gets 413 before it is parsed
    api_key_env: str | None = None  # env var holding the key; set but missing: refuses to start
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = {}  # custom Ray resources per replica
    torch_threads: int = Field(2, ge=1)
    precision: Precision = "auto"  # the replica's weights and activations, as in generate
    scheduler: Scheduler = "ddim"  # a request's default sampler
    sg_target: SgTarget = DEFAULT_SG_TARGET  # a request's default semantic-guidance target
    sg_adaptive: bool = False  # a request's default step rule: fixed, or adaptive (times 1 - p(target))
    # A request without sg_scale is steered at its expression's scale here, else at sg_scale: the
    # bundle's sweep-chosen per-class default (generate's sampling.sg_class_scales) served as is.
    sg_scale: float = Field(0.0, ge=0, le=100)
    sg_class_scales: ClassScales = {}
    max_ongoing_requests: int = Field(32, ge=1)
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    ray: RayConfig = RayConfig()


class PipelineConfig(_Strict):
    """generate -> train -> evaluate in one job; ``train.data`` names the generated output itself."""

    generate: GenerateConfig
    train: TrainConfig


# --- generator, adapter and labeler training ----------------------------------------------------

class LabelledFacesConfig(_Strict):
    """Labelled faces (the documented Parquet schema, or FER-2013-style ``image`` + ``label``)."""

    path: str
    limit: int | None = Field(None, ge=1)  # a seeded random subset of this many rows
    part: str | None = Field(None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*$")
    shuffle: Shuffle = "global"


class GeneratorArchitecture(_Strict):
    """Sizes of a generator trained from scratch (ignored with ``from_bundle``)."""

    resolution: int = Field(48, ge=8)
    vae_channels: list[int] = [32, 64, 128]  # len - 1 downsamplings by 2
    vae_norm_groups: int = Field(16, ge=1)
    latent_channels: int = Field(4, ge=1)
    unet_channels: list[int] = [64, 128, 128]
    unet_attention_levels: list[bool] = [False, True, True]  # cross-attention per level
    unet_layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    norm_groups: int = Field(32, ge=1)
    text_hidden: int = Field(128, ge=8)  # also the UNet's cross-attention width
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    au_tokens: int = Field(4, ge=1)
    adapter_hidden: int = Field(256, ge=1)
    au_set: str = "fineface12"
    expressions: str = "affectnet7"

    @model_validator(mode="after")
    def _levels(self):
        if len(self.unet_attention_levels) != len(self.unet_channels):
            raise ValueError("unet_attention_levels needs one flag per entry of unet_channels")
        if self.resolution % 2 ** (len(self.vae_channels) - 1):
            raise ValueError(f"resolution {self.resolution} must divide by 2^(len(vae_channels) - 1)")
        return self


class StageConfig(_Strict):
    """One optimisation stage (VAE, UNet or adapter), counted in optimiser steps."""

    steps: int = Field(..., ge=0)
    # Mixed precision (torch.autocast; fp16 adds a gradient scaler); weights and optimiser stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)


class VAEStageConfig(StageConfig):
    steps: int = Field(800, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    # With from_bundle the bundle's VAE and its scaling factor are kept as they are (an SD VAE must
    # not relearn 48x48 faces); true fine-tunes it for ``steps`` steps and measures the scale anew.
    finetune: bool = False


class LoRAConfig(_Strict):
    """Low-rank adapters on the UNet's attention projections (peft), merged into the UNet at the end."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class DenoiserStageConfig(StageConfig):
    steps: int = Field(6000, ge=0)
    lr: float = Field(5e-4, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)  # text and AUs dropped together: CFG's unconditional
    ema_decay: float = Field(0.999, ge=0, lt=1)
    train_text_encoder: bool = True
    train_adapter: bool = True
    au_jitter: float = Field(0.1, ge=0, le=1)  # prototype AUs for rows without AUs
    # Captions for rows without one: only the expression (the text path learns the class), or the
    # attribute template older bundles were trained with (taxonomy.CAPTION_STYLES).
    captions: Literal["expression", "attributes"] = "expression"
    # Each class's rows are repeated about (largest class / class) ** class_balance times: 1 samples
    # the classes evenly (disgust is 1.5% of FER-2013 train), 0 keeps the data's own mix.
    class_balance: float = Field(1.0, ge=0, le=1)
    unet_mode: Literal["full", "lora"] = "full"  # lora: train low-rank adapters (``lora``), not every weight
    lora: LoRAConfig = LoRAConfig()


class QualityConfig(_Strict):
    """The report after training: contact sheets, reconstructions, evaluator agreement."""

    evaluator: str | None = None  # a FER classifier trained on real faces (`synfer train`), not the guide
    samples_per_class: int = Field(32, ge=1)
    sampling: SamplingConfig = SamplingConfig(steps=25, cfg_scale=3.0)
    precision: Precision = "auto"  # the sampling bundle's; the evaluator always scores in fp32
    seed: int = Field(10_000, ge=0)


class GeneratorTrainConfig(_Strict):
    name: str = "generator"
    output: str  # run directory; the bundle is written to <output>/bundle
    data: LabelledFacesConfig
    from_bundle: str | None = None  # fine-tune this bundle instead of starting from scratch
    architecture: GeneratorArchitecture = GeneratorArchitecture()
    vae: VAEStageConfig = VAEStageConfig()
    unet: DenoiserStageConfig = DenoiserStageConfig()
    sg_classifier: str | None = None  # copied into the bundle for semantic guidance
    quality: QualityConfig = QualityConfig()
    seed: int = Field(0, ge=0)
    scaling: ScalingConfig = ScalingConfig(num_workers=1, torch_threads=2)
    ray: RayConfig = RayConfig(num_cpus=4)
    tracking: TrackingConfig = TrackingConfig(enabled=True, experiment="synfer-generator")


class AdapterTrainConfig(_Strict):
    """Train only the AU adapter of a bundle on image + caption + AU rows (FEText-style Parquet)."""

    name: str = "adapter"
    bundle: str
    output: str  # run directory; the new bundle version is written to <output>/bundle
    data: LabelledFacesConfig
    stage: DenoiserStageConfig = DenoiserStageConfig(steps=500, lr=1e-4, train_text_encoder=False)
    seed: int = Field(0, ge=0)
    scaling: ScalingConfig = ScalingConfig(num_workers=2)
    ray: RayConfig = RayConfig(num_cpus=4)
    tracking: TrackingConfig = TrackingConfig(enabled=True, experiment="synfer-adapter")


# --- the study -------------------------------------------------------------------------------------

class StudyStage(_Strict):
    """A model the study trains from a config file (plus overrides), or takes as it is."""

    config: str | None = None  # a config path or preset name
    overrides: list[str] = []
    model: str | None = None  # an existing trained model / bundle, used as it is

    @model_validator(mode="after")
    def _one_source(self):
        if (self.config is None) == (self.model is None):
            raise ValueError("give either config (to train it) or model (an existing one), not both or neither")
        return self


class StudyGenerationConfig(_Strict):
    per_class: int = Field(200, ge=1)  # images per class and condition (equal numbers, class_assignment cycled)
    seed: int = Field(1234, ge=0)
    # SG 8 on the AU tokens: the sg-sweep's pick on faces-48 (docs/sg_sweep/faces48_v2.md).
    sampling: SamplingConfig = SamplingConfig(steps=25, cfg_scale=3.0, au_scale=1.0, sg_scale=8.0)
    tau: float = Field(0.5, ge=0, le=1)
    mirror_average: bool = False  # the labeled conditions' labeling.mirror_average
    conditions: list[Literal["text", "text_au", "text_au_sg", "text_au_sg_labeler"]] = [
        "text", "text_au", "text_au_sg", "text_au_sg_labeler"]
    rows_per_shard: int = Field(256, ge=1)
    precision: Precision = "auto"
    generator: PoolConfig = PoolConfig(min_actors=2, max_actors=2, batch_size=16)
    labeler: PoolConfig = PoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=64)


class StudySweepConfig(_Strict):
    """The SG sweep: the evaluator's agreement, diversity and a contact sheet at every (target, scale),
    from no SG to past the point where agreement falls; the study's sampling otherwise."""

    targets: list[SgTarget] = Field(["text", "au", "both"], min_length=1)
    scales: list[float] = Field([4, 8, 16, 32, 64, 128], min_length=1)  # percent of the steered norm
    # fixed: every sample's step is the scale; adaptive: times 1 - p(target) (sampling.sg_adaptive).
    step_rules: list[Literal["fixed", "adaptive"]] = Field(["fixed"], min_length=1)

    @field_validator("scales")
    @classmethod
    def _positive(cls, scales: list[float]) -> list[float]:
        if any(scale <= 0 for scale in scales):
            raise ValueError("SG scales > 0 (no SG, scale 0, is always the sweep's first point)")
        return scales


class StudyDownstreamConfig(_Strict):
    real_rows: int = Field(2000, ge=7)  # N: the real subset; synthetic sets are multiples of it
    multiples: list[int] = [1, 2]
    condition: Literal["text", "text_au", "text_au_sg", "text_au_sg_labeler"] = "text_au_sg_labeler"
    # "accepted": only rows the labeler accepted (fewer than asked where acceptance is low);
    # "all": every generated row with its rectified label, so the sizes are as asked.
    synthetic_rows: Literal["accepted", "all"] = "accepted"
    train: StudyStage  # the small classifier's TrainConfig (data and output are set by the study)
    seeds: list[int] = [0]
    # The paper's headline claim: the same model and schedule on every real training row, and on
    # those plus a synthetic set; off when both are null. Real rows are those of real_train minus the
    # validation split every model shares. The set is either
    # - headline_synthetic_rows: this many accepted rows, equally many per class (accepted-count
    #   targets, top-up passes), within headline_max_rows rows made in all (a class the labelers
    #   rarely accept would otherwise use the whole default of 20x the target); or
    # - headline_rows: this many rows made, equally many asked of each class, and every row the
    #   labelers accept (the paper's way: the classes the vote accepts more often weigh more).
    headline_synthetic_rows: int | None = Field(None, ge=7)
    headline_max_rows: int | None = Field(None, ge=7)
    headline_rows: int | None = Field(None, ge=7)

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
    name: str = "study"
    output: str
    real_train: str  # labelled real faces (FER-2013 train)
    real_test: str  # held-out real faces every downstream model is tested on
    guide: StudyStage  # guides (SG) and votes; never scores
    evaluator: StudyStage  # scores; a different architecture, seed and data half than the guide
    generator: StudyStage  # a bundle (model) or a train-generator config
    labeler: StudyStage | None = None  # a train-labeler config (over the generator's bundle) or a bundle
    generation: StudyGenerationConfig = StudyGenerationConfig()
    sweep: StudySweepConfig | None = None  # off when null
    downstream: StudyDownstreamConfig
    ray: RayConfig = RayConfig(num_cpus=4)
    tracking: TrackingConfig = TrackingConfig(enabled=True, experiment="synfer-study")
