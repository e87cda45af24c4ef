"""A guide that reads latents: a FER classifier over a bundle's clean latents, for semantic guidance.

The pixel guide (``sg_classifier/``) needs each guided step's predicted clean latent decoded to a
full-resolution image, and its gradient back through the VAE decoder: at Stable Diffusion scale that
decode and its backward are most of a guided step's cost and memory. A latent guide reads the
predicted clean latent x0_hat itself (the UNet's scaled latent space, as the sampler holds it), so a
guided step costs the UNet's forward and backward and a few small convolutions.

It is trained (``synfer train`` with ``model.arch: latent-guide``, :mod:`synfer_ray.models`) on the
bundle's VAE latents of real faces and on the noisy x0 predictions that guidance shows it, and it
only fits the VAE it was trained on: its config keeps that VAE's hash. A bundle holds one in
``sg_latent_guide/``; ``sampling.sg_guide: latents`` selects it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

LATENT_GUIDE_DIR = "sg_latent_guide"


def _stage(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1),
                         nn.GroupNorm(min(8, channels_out), channels_out), nn.SiLU(),
                         nn.Conv2d(channels_out, channels_out, 3, padding=1),
                         nn.GroupNorm(min(8, channels_out), channels_out), nn.SiLU())


class LatentGuide(ModelMixin, ConfigMixin):
    """Latents (batch, C, h, w), in the sampler's scaled latent space -> logits over ``classes``.

    A small convolutional net: one stage at the latent's size, then stages that halve it down to
    about 6x6, then global average pooling and a linear head; the same net serves a 12x12 latent
    (faces-48) and a 64x64 one (SD 1.5 at 512) with a few more stages."""

    @register_to_config
    def __init__(self, classes: Sequence[str], latent_channels: int = 4, latent_size: int = 12, width: int = 64,
                 vae_sha256: str | None = None, bundle: str | None = None):
        super().__init__()
        stages, channels, size = [_stage(latent_channels, width, 1)], width, latent_size
        while size > 6:
            stages.append(_stage(channels, min(channels * 2, 4 * width), 2))
            channels, size = min(channels * 2, 4 * width), (size + 1) // 2
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(channels, len(classes))

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        return self.head(self.features(latents.to(weight.dtype)).mean(dim=(2, 3)))


def vae_sha256(bundle_path: str | Path) -> str:
    """The hash of a bundle's VAE weights: the latent space a latent guide was trained in."""
    digest = hashlib.sha256()
    for file in sorted((Path(bundle_path) / "vae").glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def is_latent_guide(path: str | Path) -> bool:
    """Whether ``path`` holds a saved :class:`LatentGuide` (its config names the class)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("_class_name") == LatentGuide.__name__
