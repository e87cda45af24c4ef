"""Any classifier a job names: a transformers FER classifier, a FERAnno head over a bundle's frozen UNet,
or a latent guide over a bundle's frozen VAE.

All map RGB [0, 1] images (batch, 3, H, W) to logits over their ``classes``. Loading a FERAnno head or
a latent guide loads its bundle, so this sits above both :mod:`synfer_ray.bundle` (which loads only
transformers classifiers and bare latent guides, for semantic guidance) and
:mod:`synfer_ray.labeler.feranno`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synfer_ray.bundle import MANIFEST_NAME, Bundle, BundleManifest, load_bundle, load_latent_guide, new_bundle_version
from synfer_ray.classifiers import FERClassifier, build_backbone
from synfer_ray.config import LabelerModelConfig
from synfer_ray.errors import SynferError
from synfer_ray.generator.guidance import predicted_x0
from synfer_ray.generator.latent_guide import LATENT_GUIDE_DIR, LatentGuide, is_latent_guide, vae_sha256
from synfer_ray.generator.sampler import GuidedSampler
from synfer_ray.generator.schedulers import prediction_type
from synfer_ray.labeler.feranno import is_feranno, load_feranno, new_feranno

# Training shows the latent guide what semantic guidance shows it: x0 predictions from the late part of
# the schedule where SG acts (the shipped sampling.sg_window, 0.4: with 25 DDIM steps, t from 361 to 1).
SG_WINDOW = 0.4
NOISY_SHARE = 0.5  # of each training batch's rows, read as noisy x0 predictions instead of clean latents


def load_classifier(source: str | Path, field: str = "classifier") -> nn.Module:
    """Load a FERAnno labeler or a latent guide (each with its bundle), a classifier saved by
    :meth:`FERClassifier.save_pretrained`, or any transformers image classifier (hub id / path);
    ``field`` names the setting in errors."""
    if is_feranno(source):
        return load_feranno(source, field=field)
    if is_latent_guide(source):
        return load_latent_guide_classifier(source, field=field)
    return FERClassifier.from_pretrained(source, field=field)


def build_classifier(arch: str, classes: Sequence[str], image_size: int, pretrained: str | None = None,
                     seed: int = 0, bundle: str | None = None, labeler: dict | None = None) -> nn.Module:
    """A new classifier to train: ``feranno`` is a fresh FERAnno head over the frozen diffusion features of
    ``bundle`` (``labeler`` holds its feature settings and sizes); ``latent-guide`` a fresh latent guide
    over ``bundle``'s frozen VAE (images are resized to the bundle's resolution, not ``image_size``); any
    other ``arch`` is a transformers backbone (see :func:`synfer_ray.classifiers.build_backbone`)."""
    if arch == "feranno":
        return new_feranno(bundle, classes, LabelerModelConfig.model_validate(labeler or {}), seed=seed)
    if arch == "latent-guide":
        return new_latent_guide(bundle, classes, seed=seed)
    return build_backbone(arch, classes, image_size, pretrained=pretrained, seed=seed)


# --- the latent guide, trained and read as an image classifier ---------------------------------

class LatentGuideClassifier(nn.Module):
    """Images in [0, 1] (batch, 3, H, W) -> logits, through the bundle's frozen VAE encoder (posterior
    mean times the scaling factor: the sampler's latent space) and a :class:`LatentGuide` head.

    In training mode, NOISY_SHARE of each batch's rows reach the head as what semantic guidance shows
    it: the clean latent noised to a random timestep in the last SG_WINDOW of the schedule, and the
    frozen UNet's x0 prediction from there under the empty prompt and the unconditional AU tokens. Only
    the head trains; in eval mode the head reads the clean latents, deterministically."""

    def __init__(self, bundle: Bundle, head: LatentGuide):
        super().__init__()
        self.vae, self.unet, self.head = bundle.vae, bundle.unet, head
        self.vae.requires_grad_(False).eval()
        self.unet.requires_grad_(False).eval()
        self.image_size = bundle.manifest.resolution
        self.prediction = prediction_type(bundle.scheduler)
        self.last_timestep = int(SG_WINDOW * bundle.scheduler.config.num_train_timesteps)
        self.register_buffer("alphas_cumprod", bundle.scheduler.alphas_cumprod.float(), persistent=False)
        # CFG's unconditional branch, exactly as the sampler builds it; the text encoder is not kept.
        with torch.no_grad():
            context = torch.cat([GuidedSampler(bundle).unconditional_text(1),
                                 bundle.au_adapter.unconditional(1).float()], dim=1)
        self.register_buffer("unconditional", context, persistent=False)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    def train(self, mode: bool = True) -> "LatentGuideClassifier":
        self.training = mode
        self.head.train(mode)
        self.vae.eval()  # the bundle is frozen, in training too
        self.unet.eval()
        return self

    @torch.no_grad()
    def clean_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the bundle's scaled latents (fp32), as ``GuidedSampler.encode_images``."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear",
                                   align_corners=False, antialias=True)
        vae = self.vae
        # The weights' dtype: DeepSpeed's mixed precision casts parameters, not the pixels.
        return vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist.mean.float() * vae.config.scaling_factor

    @torch.no_grad()
    def noisy_predictions(self, latents: torch.Tensor) -> torch.Tensor:
        """The frozen UNet's x0 prediction from each latent noised to a random timestep in [0, last_timestep]."""
        batch = latents.shape[0]
        timesteps = torch.randint(0, self.last_timestep + 1, (batch,), device=latents.device)
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * torch.randn_like(latents)
        dtype = self.unet.dtype
        output = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=self.unconditional.to(dtype).expand(
            batch, -1, -1), cross_attention_kwargs={"au_scale": 1.0}).sample.float()
        return predicted_x0(noisy, output, alpha_bar, self.prediction)

    def guide_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The latents the head reads: clean ones, with NOISY_SHARE of the rows (random ones) replaced by
        noisy x0 predictions in training mode."""
        latents = self.clean_latents(images)
        if self.training:
            rows = torch.randperm(latents.shape[0], device=latents.device)[:round(NOISY_SHARE * latents.shape[0])]
            latents = latents.clone()
            latents[rows] = self.noisy_predictions(latents[rows])
        return latents

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.guide_inputs(images))

    def save_pretrained(self, path: str | Path) -> None:
        """Only the head (config.json + safetensors); its config names the bundle and its VAE's hash."""
        self.head.save_pretrained(str(path), safe_serialization=True)


def _own_vae_hash(bundle_path: Path) -> str | None:
    # A base_model bundle keeps no VAE of its own to hash (bundle.load_bundle checks nothing there either).
    return vae_sha256(bundle_path) if (bundle_path / "vae").is_dir() else None


def new_latent_guide(bundle_path: str | Path, classes: Sequence[str], seed: int = 0) -> LatentGuideClassifier:
    """A fresh head sized for the bundle's latents, over its frozen VAE (and UNet, for training)."""
    if not bundle_path:
        raise SynferError("model.bundle", bundle_path, "the bundle whose latents the latent guide reads")
    bundle_path = Path(bundle_path).resolve()
    bundle = load_bundle(bundle_path)
    vae = bundle.vae.config
    torch.manual_seed(seed)
    head = LatentGuide(classes=list(classes), latent_channels=vae.latent_channels,
                       latent_size=bundle.manifest.resolution // 2 ** (len(vae.block_out_channels) - 1),
                       vae_sha256=_own_vae_hash(bundle_path), bundle=str(bundle_path))
    return LatentGuideClassifier(bundle, head)


def load_latent_guide_classifier(path: str | Path, field: str = "classifier") -> LatentGuideClassifier:
    """A saved latent guide over its bundle: the enclosing one when it sits in ``<bundle>/sg_latent_guide``,
    else the one its config names; refused unless it was trained on that bundle's VAE."""
    path = Path(path)
    enclosing = path.resolve().parent
    named = json.loads((path / "config.json").read_text()).get("bundle")
    bundle_path = enclosing if (enclosing / MANIFEST_NAME).is_file() else Path(named or "")
    if not (bundle_path / MANIFEST_NAME).is_file():
        raise SynferError(field, str(path), f"a latent guide inside a bundle ({LATENT_GUIDE_DIR}/), or one whose "
                                            f"bundle {named!r} (config.json bundle) exists")
    head = load_latent_guide(path, bundle_path if _own_vae_hash(bundle_path) else None, field=field).float()
    return LatentGuideClassifier(load_bundle(bundle_path), head.eval()).eval()


def install_latent_guide(bundle_path: str | Path, guide_path: str | Path, out_path: str | Path) -> BundleManifest:
    """A new version of the bundle at ``out_path`` holding the guide as ``sg_latent_guide/`` (its config's
    bundle path cleared, the content hash resealed); refused unless the guide was trained on this
    bundle's VAE."""
    from synfer_ray.train.labeler import head_for_bundle
    bundle_path, guide_path, out_path = Path(bundle_path), Path(guide_path), Path(out_path)
    BundleManifest.read(bundle_path)  # a clear error for a wrong bundle path
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise SynferError("out", str(out_path), "a new or empty directory for the new bundle version (nothing "
                                                "there is replaced)")
    # The same check as loading it from the new bundle will make, before anything is copied.
    guide = load_latent_guide(guide_path, bundle_path if _own_vae_hash(bundle_path) else None, field="guide")
    with tempfile.TemporaryDirectory(prefix="synfer-latent-guide-") as staging:
        head = head_for_bundle(guide_path, Path(staging) / LATENT_GUIDE_DIR)
        return new_bundle_version(bundle_path, out_path, {LATENT_GUIDE_DIR: head},
                                  {"job": "add-latent-guide", "classes": list(guide.classes),
                                   "vae_sha256": guide.config.vae_sha256})
