"""The ``synfer serve`` job's config: the Ray Serve deployment, its limits and request defaults."""

from __future__ import annotations

from pydantic import Field

from synfer_ray.config.common import Precision, RayConfig, _Strict
from synfer_ray.config.generate import DEFAULT_SG_TARGET, ClassScales, Scheduler, SgGuide, SgTarget, VoterConfig


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling: how many replicas run, and the load that adds one."""

    min_replicas: int = Field(1, ge=1, description="Replicas kept running, even when idle.")
    max_replicas: int = Field(1, ge=1, description="Most replicas Serve may scale up to under load.")
    target_ongoing_requests: float = Field(4, gt=0, description=(
        "Requests in flight per replica that Serve aims for: above it, it adds replicas (up to max_replicas)."))


class ServeConfig(_Strict):
    """The generator over HTTP on Ray Serve: limits, request defaults and resources (also the args of
    `serve deploy` with import_path synfer_ray.serve:app_builder)."""

    bundle: str = Field(..., description="Directory of the generator bundle to serve.")
    voters: list[VoterConfig] = Field([], description=(
        "FER classifiers that label each returned image, besides the bundle's labeler; with neither, the "
        "bundle's guide (sg_classifier/) labels them."))
    mirror_average: bool = Field(False, description=(
        "Each voter also reads the mirror image and votes the mean of the two readings (as generate's "
        "labeling.mirror_average): steadier labels at twice the labeling compute."))
    host: str = Field("127.0.0.1", description=(
        "Interface Serve's HTTP proxy binds with `synfer serve`; 0.0.0.0 exposes it to the network (set "
        "api_key_env then)."))
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy with `synfer serve`.")
    route_prefix: str = Field("/", description="URL path the app is served under, e.g. /synfer.")
    max_images: int = Field(8, ge=1, le=64, description=(
        "Most images one request may ask for (n); more gets 422."))
    max_steps: int = Field(50, ge=1, le=1000, description=(
        "Most sampling steps one request may ask for; more gets 422."))
    default_steps: int = Field(20, ge=1, description=(
        "Sampling steps of a request that does not say; keep it at most max_steps."))
    max_batch_size: int = Field(8, ge=1, description=(
        "Most image rows sampled together across concurrent requests; a request of up to this many rows is "
        "never split between batches."))
    batch_wait_timeout_s: float = Field(0.05, ge=0, description=(
        "Seconds a batch waits for more requests' rows before sampling what it has; 0 never waits."))
    request_timeout_s: float = Field(120, gt=0, description=(
        "Seconds after which a request gets 504 and its rows not yet sampled are dropped."))
    max_body_bytes: int = Field(64 * 1024, ge=1024, description=(
        "Largest request body in bytes; a bigger one gets 413 before it is parsed."))
    api_key_env: str | None = Field(None, description=(
        "Name of an environment variable holding the API key that every generate request must send in "
        "X-API-Key; set but missing or empty where a replica runs, the server refuses to start. null: no key."))
    num_cpus: float = Field(1, gt=0, description="Logical CPUs Ray reserves for each replica.")
    num_gpus: float = Field(0, ge=0, description=(
        "GPUs Ray reserves for each replica; above 0 the replica samples on CUDA, 0 on CPU. Fractions let "
        "replicas share a GPU."))
    resources: dict[str, float] = Field({}, description=(
        "Custom Ray resources each replica asks for, e.g. {accelerator: 1}."))
    torch_threads: int = Field(2, ge=1, description="CPU threads PyTorch uses inside each replica.")
    precision: Precision = Field("auto", description=(
        "Dtype of the replica's weights and activations, as in generate: auto is fp16 on CUDA and fp32 on "
        "CPU."))
    scheduler: Scheduler = Field("ddim", description=(
        "Sampler of a request that does not name one: ddim, dpmpp_2m, unipc or euler."))
    sg_target: SgTarget = Field(DEFAULT_SG_TARGET, description=(
        "Semantic-guidance target of a request that does not name one: text, au or both."))
    sg_adaptive: bool = Field(False, description=(
        "Step rule of a request that does not say: false a fixed step, true each image's step times "
        "1 - p(target)."))
    sg_guide: SgGuide = Field("pixels", description=(
        "What the guide reads for a request that does not say: pixels (the decoded image, read by the bundle's "
        "sg_classifier/) or latents (the predicted clean latent, read by the latent guide; no decode, so "
        "guided requests cost less time and memory). latents needs the bundle's sg_latent_guide/ or "
        "sg_latent_guide."))
    sg_reuse_pass: bool = Field(False, description=(
        "Whether a request that does not say takes the guide's UNet pass as each guided step's conditional "
        "half (one UNet pass fewer per guided step; the move acts from the next step on)."))
    sg_checkpointing: bool = Field(False, description=(
        "Recompute the UNet's and VAE decoder's activations in the backward pass of guided steps instead of "
        "storing them: less GPU memory per replica, more time, the same images."))
    sg_latent_guide: str | None = Field(None, description=(
        "Directory of a saved latent guide for requests with sg_guide latents; null: the bundle's own "
        "sg_latent_guide/."))
    sg_scale: float = Field(0.0, ge=0, le=100, description=(
        "SG scale (percent of the steered norm) of a request without sg_scale whose expression is not in "
        "sg_class_scales; 0 serves those unguided."))
    sg_class_scales: ClassScales = Field({}, description=(
        "Per-expression SG scale of a request without sg_scale ({class: scale}, the bundle's class names), "
        "e.g. the per-class mix an SG sweep chose for generate's sampling.sg_class_scales."))
    max_ongoing_requests: int = Field(32, ge=1, description=(
        "Most requests a replica handles at once; Serve queues the rest."))
    autoscaling: AutoscalingConfig = Field(AutoscalingConfig(), description=(
        "How many replicas Serve runs, and the load at which it adds one."))
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster Serve runs on.")
