"""GuidedSampler: batched sampling with classifier-free guidance on text + AUs, and semantic guidance.

Each row is fully determined by (bundle, seed, prompt, AUs, target, settings): its starting noise
comes from its own seeded CPU generator in fp32 (the same draw on every device), so a row's image
does not depend on which rows share its batch beyond float rounding.

Precision: the weights take the bundle's dtype (fp32, bf16 or fp16, cast once at load); the UNet,
VAE, text encoder and guide compute in it. The latents, the scheduler's arithmetic and the text
embedding and AU tokens that semantic guidance steers stay fp32: each step's model output is cast up before the
scheduler sees it, which keeps multistep solvers and the normalised SG step numerically safe.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from synfer_ray.bundle import Bundle
from synfer_ray.config import DEFAULT_SG_TARGET
from synfer_ray.errors import SynferError
from synfer_ray.generator.guidance import SG_TARGETS, guidance_steps, predicted_noise, semantic_guidance_step
from synfer_ray.generator.latent_guide import LatentGuide
from synfer_ray.generator.inversion import ddim_invert
from synfer_ray.generator.schedulers import SCHEDULERS, alpha_bar_at, make_scheduler, prediction_type

MAX_STEPS = 1000
# What a guided step's classifier reads: the decoded image (the bundle's sg_classifier/) or the
# predicted clean latent itself (its sg_latent_guide/, no VAE decode and no backward through it).
SG_GUIDES = ("pixels", "latents")


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample. ``cfg_scale`` 1 turns CFG off; ``sg_scale`` 0 turns semantic guidance off, else
    each guided step moves ``sg_target`` by ``sg_scale`` percent of its norm (see guidance.py), times
    ``1 - p(target)`` per sample with ``sg_adaptive``. ``sg_class_scales`` (class -> scale; a mapping
    is kept as sorted pairs) gives the named classes' rows their own scale instead of ``sg_scale``.

    The cost of a guided step: ``sg_guide`` "latents" reads x0_hat with the latent guide instead of
    decoding it for the pixel guide; ``sg_reuse_pass`` takes the guide's own forward pass as the step's
    conditional half (one UNet pass fewer; the moved conditioning acts from the next step on);
    ``sg_checkpointing`` recomputes activations in the guide's backward instead of keeping them (less
    memory, the same images)."""

    steps: int = 25
    cfg_scale: float = 3.0
    au_scale: float = 1.0
    sg_scale: float = 0.0
    sg_window: float = 0.4
    scheduler: str = "ddim"
    sg_target: str = DEFAULT_SG_TARGET
    sg_adaptive: bool = False
    sg_class_scales: tuple[tuple[str, float], ...] = ()
    sg_guide: str = "pixels"
    sg_reuse_pass: bool = False
    sg_checkpointing: bool = False

    @classmethod
    def from_config(cls, sampling) -> "SamplerSettings":
        """From a :class:`synfer_ray.config.SamplingConfig` (generate, quality report, study)."""
        return cls(steps=sampling.steps, cfg_scale=sampling.cfg_scale, au_scale=sampling.au_scale,
                   sg_scale=sampling.sg_scale, sg_window=sampling.sg_window, scheduler=sampling.scheduler,
                   sg_target=sampling.sg_target, sg_adaptive=sampling.sg_adaptive,
                   sg_class_scales=sampling.sg_class_scales,
                   sg_guide=sampling.sg_guide, sg_reuse_pass=sampling.sg_reuse_pass,
                   sg_checkpointing=sampling.sg_checkpointing)

    def __post_init__(self):
        # Frozen and hashable whatever the caller passed: a mapping becomes sorted (class, scale) pairs.
        pairs = self.sg_class_scales.items() if isinstance(self.sg_class_scales, Mapping) else self.sg_class_scales
        object.__setattr__(self, "sg_class_scales", tuple(sorted((str(c), float(v)) for c, v in pairs)))
        if self.scheduler not in SCHEDULERS:
            raise SynferError("scheduler", self.scheduler, f"one of {list(SCHEDULERS)}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise SynferError("steps", self.steps, f"an integer in [1, {MAX_STEPS}]")
        for name in ("cfg_scale", "au_scale", "sg_scale"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise SynferError(name, value, "a finite number >= 0")
        for name, value in self.sg_class_scales:
            if not np.isfinite(value) or value < 0:
                raise SynferError(f"sg_class_scales.{name}", value, "a finite number >= 0")
        if self.sg_target not in SG_TARGETS:
            raise SynferError("sg_target", self.sg_target, f"one of {list(SG_TARGETS)}")
        if self.sg_guide not in SG_GUIDES:
            raise SynferError("sg_guide", self.sg_guide, f"one of {list(SG_GUIDES)}")
        if not 0 <= self.sg_window <= 1:
            raise SynferError("sg_window", self.sg_window, "a fraction of the steps in [0, 1]")

    @property
    def uses_sg(self) -> bool:
        """Whether semantic guidance runs at all: some row has a scale above 0."""
        return self.sg_scale > 0 or any(scale > 0 for _, scale in self.sg_class_scales)

    def sg_scale_of(self, target: str | None) -> float:
        """The SG scale of a row asking for ``target``."""
        return dict(self.sg_class_scales).get(target, self.sg_scale)


@dataclass(frozen=True)
class SampleRequest:
    """One image to make. ``aus`` follows the bundle's AU order; ``reference`` (H, W, 3 uint8) asks
    for layout initialisation from its DDIM inversion."""

    seed: int
    prompt: str
    aus: Sequence[float]
    target: str | None = None
    reference: np.ndarray | None = None


class GuidedSampler:
    """The SynFER sampler over a loaded :class:`Bundle`; pure PyTorch, on the bundle's device and dtype."""

    def __init__(self, bundle: Bundle, sg_classifier: torch.nn.Module | None = None,
                 sg_classes: Sequence[str] | None = None, device: str | torch.device | None = None,
                 sg_latent_guide: LatentGuide | None = None):
        self.bundle = bundle
        self.device = torch.device(device) if device is not None else bundle.unet.device
        self.dtype = bundle.unet.dtype
        self.prediction = prediction_type(bundle.scheduler)
        self.sg_classifier = sg_classifier if sg_classifier is not None else bundle.sg_classifier
        if sg_classes is None and self.sg_classifier is not None:
            sg_classes = getattr(self.sg_classifier, "classes", bundle.classes)
        self.sg_classes = list(sg_classes) if sg_classes is not None else None
        self.sg_latent_guide = sg_latent_guide if sg_latent_guide is not None else bundle.sg_latent_guide
        self._empty_prompt: torch.Tensor | None = None

    def guide(self, settings: "SamplerSettings") -> tuple[torch.nn.Module | None, list[str] | None]:
        """The classifier a guided step reads with, for ``settings.sg_guide``, and its classes."""
        if settings.sg_guide == "latents":
            guide = self.sg_latent_guide
            return guide, (guide.classes if guide is not None else None)
        return self.sg_classifier, self.sg_classes

    # --- inputs ----------------------------------------------------------------------------

    def check(self, requests: Sequence[SampleRequest], settings: SamplerSettings) -> None:
        """Raise :class:`SynferError` naming the field of the first bad request."""
        n_aus = len(self.bundle.au_names)
        size = self.bundle.manifest.resolution
        for name, _ in settings.sg_class_scales:
            if name not in self.bundle.classes:
                raise SynferError(f"sg_class_scales.{name}", name, f"a class of the bundle: {list(self.bundle.classes)}")
        for i, request in enumerate(requests):
            if not isinstance(request.seed, (int, np.integer)) or request.seed < 0:
                raise SynferError(f"rows[{i}].seed", request.seed, "an integer >= 0")
            aus = np.asarray(request.aus, dtype=np.float64)
            if aus.shape != (n_aus,):
                raise SynferError(f"rows[{i}].aus", list(request.aus),
                                  f"{n_aus} values, one per AU of the bundle: {list(self.bundle.au_names)}")
            if not np.all((aus >= 0) & (aus <= 1)):
                raise SynferError(f"rows[{i}].aus", list(request.aus), "intensities in [0, 1]")
            if request.target is not None and request.target not in self.bundle.classes:
                raise SynferError(f"rows[{i}].target", request.target, f"one of {list(self.bundle.classes)}")
            if request.reference is not None and request.reference.shape != (size, size, 3):
                raise SynferError(f"rows[{i}].reference", request.reference.shape,
                                  f"an RGB uint8 image of shape ({size}, {size}, 3)")
            if settings.uses_sg:
                guide, guide_classes = self.guide(settings)
                if guide is None and settings.sg_guide == "latents":
                    raise SynferError("sg_guide", settings.sg_guide,
                                      "pixels, or a bundle with sg_latent_guide/ or an sg_latent_guide path "
                                      "(train one with `synfer train` and model.arch latent-guide)")
                if guide is None:
                    raise SynferError("sg_scale", settings.sg_scale,
                                      "0, or a bundle with sg_classifier/ or a --sg-classifier path")
                if request.target not in (guide_classes or ()):
                    raise SynferError(f"rows[{i}].target", request.target,
                                      f"with semantic guidance, a class of the guiding classifier: {guide_classes}")

    # --- components ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings in fp32 (what semantic guidance steers); cast to the model dtype per call."""
        tokens = self.bundle.tokenizer(list(prompts), padding="max_length", truncation=True,
                                       max_length=self.bundle.tokenizer.model_max_length, return_tensors="pt")
        return self.bundle.text_encoder(tokens.input_ids.to(self.device))[0].float()

    def unconditional_text(self, batch: int) -> torch.Tensor:
        """The empty prompt's embedding (CFG's unconditional text), encoded once, for ``batch`` rows."""
        if self._empty_prompt is None:
            self._empty_prompt = self.encode_prompts([""])
        return self._empty_prompt.expand(batch, -1, -1)

    def initial_noise(self, seeds: Sequence[int], scheduler=None) -> torch.Tensor:
        """Each row's starting latent from its own CPU generator in fp32, exactly as diffusers draws
        it on CPU, then moved: the same noise on every device and at every precision."""
        config = self.bundle.unet.config
        shape = (1, config.in_channels, config.sample_size, config.sample_size)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
                 for s in seeds]
        sigma = (scheduler or self.bundle.scheduler).init_noise_sigma
        return torch.cat(noise).to(self.device) * sigma

    @contextmanager
    def recomputing(self, enabled: bool) -> Iterator[None]:
        """Within: the UNet and the VAE keep no activations for the backward pass but recompute them
        (diffusers' gradient checkpointing; it acts only where gradients are taken, i.e. on guided
        steps)."""
        modules = [m for m in (self.bundle.unet, self.bundle.vae) if getattr(m, "_supports_gradient_checkpointing", False)]
        if not enabled or not modules:
            yield
            return
        for module in modules:
            module.enable_gradient_checkpointing()
        try:
            yield
        finally:
            for module in modules:
                module.disable_gradient_checkpointing()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> RGB images in [0, 1], (batch, 3, H, W), in the model dtype."""
        vae = self.bundle.vae
        return (vae.decode((latents / vae.config.scaling_factor).to(self.dtype)).sample / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """(batch, H, W, 3) uint8 -> clean latents (the posterior mean), fp32."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device, self.dtype)
        vae = self.bundle.vae
        return vae.encode(pixels / 127.5 - 1).latent_dist.mean.float() * vae.config.scaling_factor

    def model_output(self, latents, t, text, aus_tokens, au_scale) -> torch.Tensor:
        """The UNet's output (noise or velocity, per the bundle's scheduler) in fp32."""
        context = torch.cat([text.to(self.dtype), aus_tokens.to(self.dtype)], dim=1)
        return self.bundle.unet(latents.to(self.dtype), t, encoder_hidden_states=context,
                                cross_attention_kwargs={"au_scale": au_scale}).sample.float()

    def au_tokens(self, aus: np.ndarray) -> torch.Tensor:
        """(batch, n_aus) AU intensities -> the adapter's conditioning tokens, in the model dtype."""
        return self.bundle.au_adapter.encode(torch.as_tensor(aus, dtype=self.dtype, device=self.device))

    # --- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def invert(self, images: np.ndarray, prompts: Sequence[str], aus: np.ndarray, steps: int,
               au_scale: float = 1.0) -> torch.Tensor:
        """DDIM inversion of (batch, H, W, 3) uint8 images under their own prompt and AUs (no CFG)."""
        text = self.encode_prompts(prompts)
        au_tokens = self.au_tokens(aus)
        scheduler = DDIMScheduler.from_config(self.bundle.scheduler.config)
        alphas = scheduler.alphas_cumprod.to(self.device)
        return ddim_invert(self.encode_images(images), scheduler, steps,
                           lambda x, t: predicted_noise(x, self.model_output(x, t, text, au_tokens, au_scale),
                                                        alphas[int(t)], self.prediction))

    def sample_latents(self, requests: Sequence[SampleRequest], settings: SamplerSettings,
                       init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """The final clean latents for ``requests`` (fp32); ``init_latents`` replaces the seeded noise
        (x_T at the DDIM scale, as :meth:`invert` returns it)."""
        self.check(requests, settings)
        scheduler = make_scheduler(settings.scheduler, self.bundle.scheduler.config)
        scheduler.set_timesteps(settings.steps, device=self.device)
        batch = len(requests)
        aus = np.stack([np.asarray(r.aus, dtype=np.float32) for r in requests])
        text = self.encode_prompts([r.prompt for r in requests])
        with torch.no_grad():
            au_cond = self.au_tokens(aus).float()  # fp32 like the text: semantic guidance may steer it
            au_uncond = self.bundle.au_adapter.unconditional(batch, self.device, self.dtype)
        latents = self.initial_noise([r.seed for r in requests], scheduler) if init_latents is None \
            else init_latents.float() * scheduler.init_noise_sigma
        references = [i for i, r in enumerate(requests) if r.reference is not None]
        if references and init_latents is None:
            ref_images = np.stack([requests[i].reference for i in references])
            inverted = self.invert(ref_images, [requests[i].prompt for i in references],
                                   aus[references], settings.steps, settings.au_scale)
            latents[references] = inverted * scheduler.init_noise_sigma
        use_cfg = settings.cfg_scale != 1.0
        text_uncond = self.unconditional_text(batch)
        sg_at = guidance_steps(settings.steps, settings.sg_window) if settings.uses_sg else set()
        targets = step_sizes = None
        guide, guide_classes = self.guide(settings)
        # The latent guide reads x0_hat as it is: nothing to decode, nothing to back-propagate through.
        guide_input = (lambda x0: x0) if settings.sg_guide == "latents" else self.decode
        if sg_at:
            targets = torch.tensor([guide_classes.index(r.target) for r in requests], device=self.device)
            step_sizes = settings.sg_scale if not settings.sg_class_scales else torch.tensor(
                [settings.sg_scale_of(r.target) for r in requests], dtype=torch.float32, device=self.device)
        for i, t in enumerate(scheduler.timesteps):
            # The UNet's input: x_t at the VP scale (Euler keeps x0 + sigma * eps and scales it here).
            model_input = scheduler.scale_model_input(latents, t)
            guiding = i in sg_at
            with torch.no_grad():
                # At a guided step the conditional half comes from the guide's pass or after the
                # conditions move, so only the unconditional half is made now.
                if use_cfg and not guiding:
                    both = self.model_output(torch.cat([model_input, model_input]), t,
                                             torch.cat([text_uncond, text]), torch.cat([au_uncond, au_cond]),
                                             settings.au_scale)
                    eps_uncond, eps_cond = both.chunk(2)
                elif use_cfg:
                    eps_uncond = self.model_output(model_input, t, text_uncond, au_uncond, settings.au_scale)
                else:
                    eps_uncond = None
                    eps_cond = None if guiding else self.model_output(model_input, t, text, au_cond, settings.au_scale)

            def guided(eps_text: torch.Tensor) -> torch.Tensor:
                if eps_uncond is None:
                    return eps_text
                return eps_uncond + settings.cfg_scale * (eps_text - eps_uncond)

            if guiding:
                with self.recomputing(settings.sg_checkpointing):
                    step = semantic_guidance_step(
                        {"text": text, "au": au_cond}, SG_TARGETS[settings.sg_target],
                        lambda text, au: guided(self.model_output(model_input, t, text, au, settings.au_scale)),
                        guide_input, guide, model_input, alpha_bar_at(scheduler, i, t).to(self.device),
                        targets, step_sizes, self.prediction, adaptive=settings.sg_adaptive)
                text, au_cond = step.conditions["text"], step.conditions["au"]
                if settings.sg_reuse_pass:
                    output = step.output  # already guided: CFG over the guide's own conditional pass
                else:
                    with torch.no_grad():
                        output = guided(self.model_output(model_input, t, text, au_cond, settings.au_scale))
            else:
                output = guided(eps_cond)
            with torch.no_grad():
                latents = scheduler.step(output, t, latents).prev_sample
        return latents

    def generate_float(self, requests: Sequence[SampleRequest], settings: SamplerSettings) -> torch.Tensor:
        """RGB images in [0, 1] as (batch, 3, H, W) fp32."""
        latents = self.sample_latents(requests, settings)
        with torch.no_grad():
            return self.decode(latents).float()

    def generate(self, requests: Sequence[SampleRequest], settings: SamplerSettings) -> np.ndarray:
        """(batch, H, W, 3) uint8 images."""
        images = self.generate_float(requests, settings)
        return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
