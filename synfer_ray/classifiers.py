"""FER classifiers: transformers image-classification backbones behind one image -> logits interface.

Every classifier here takes RGB images in [0, 1] as (batch, 3, H, W) at any size and returns
logits over its own class names. The sampler's semantic guidance and the labeler's ensemble use
any module with that contract (FERAnno too: :mod:`synfer_ray.models` loads either kind by path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel, ResNetConfig

from synfer_ray.errors import SynferError

# ImageNet statistics: what pretrained transformers vision backbones expect.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class FERClassifier(nn.Module):
    """A transformers image classifier with the resizing and normalisation it needs."""

    def __init__(self, model: PreTrainedModel, image_size: int):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def classes(self) -> list[str]:
        id2label = self.model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (or grey) [0, 1] images at any size -> the backbone's input: its size, normalised."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        # In the backbone's dtype: DeepSpeed's mixed precision casts parameters but keeps buffers (these
        # mean/std) in fp32, and fp16 pixels minus an fp32 mean would reach the half weights as fp32.
        return ((images - self.mean) / self.std).to(self.model.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.pixel_values(images)).logits

    def save_pretrained(self, path: str | Path) -> None:
        self.model.config.synfer_image_size = self.image_size
        self.model.save_pretrained(str(path), safe_serialization=True)

    @classmethod
    def from_pretrained(cls, source: str | Path, field: str = "classifier") -> "FERClassifier":
        """Load one saved by :meth:`save_pretrained`, or any transformers image classifier (hub id / path),
        in eval mode and fp32; ``field`` names the setting in errors."""
        try:
            model = AutoModelForImageClassification.from_pretrained(str(source), use_safetensors=True)
        except (OSError, ValueError) as error:
            raise SynferError(field, str(source), f"a directory or hub id holding a transformers "
                                                  f"image classifier with safetensors weights ({error})") from error
        image_size = getattr(model.config, "synfer_image_size", None) or getattr(model.config, "image_size", 224)
        return cls(model.float(), int(image_size)).eval()  # fp16-shipped weights compute in fp32


def _pixels(model: nn.Module, images) -> torch.Tensor:
    """(rows, H, W, 3) uint8 numpy -> (rows, 3, H, W) in [0, 1] on the model's device and dtype."""
    weight = next(model.parameters())
    pixels = torch.from_numpy(images).to(weight.device).permute(0, 3, 1, 2)
    return (pixels.float() / 255).to(weight.dtype)


def predict_probabilities(model: nn.Module, images, batch_size: int = 256, mirror_average: bool = False):
    """(rows, H, W, 3) uint8 numpy images -> (rows, classes) softmax probabilities (numpy, fp32). With
    ``mirror_average``, the mean of each face's and its mirror image's: an expression reads the same
    mirrored, a model's errors often do not (FERAnno's diffusion features are not mirror-symmetric)."""
    plain, averaged = predict_readings(model, images, batch_size, mirrored=mirror_average)
    return averaged if mirror_average else plain


@torch.no_grad()
def predict_readings(model: nn.Module, images, batch_size: int = 256, mirrored: bool = False):
    """(plain probabilities, mirror-averaged ones or None) as :func:`predict_probabilities` gives each,
    from one pass in which the model reads each face (and, if ``mirrored``, its mirror image) once."""
    import numpy as np
    model.eval()
    plain, averaged = [], []
    for start in range(0, len(images), batch_size):
        pixels = _pixels(model, images[start:start + batch_size])
        probabilities = torch.softmax(model(pixels).float(), dim=1)
        plain.append(probabilities.cpu().numpy())
        if mirrored:
            flipped = torch.softmax(model(pixels.flip(-1)).float(), dim=1)
            averaged.append(((probabilities + flipped) / 2).cpu().numpy())
    if not plain:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32) if mirrored else None
    return np.concatenate(plain), np.concatenate(averaged) if mirrored else None


@torch.no_grad()
def embed_images(model: nn.Module, images, batch_size: int = 256):
    """(rows, H, W, 3) uint8 -> (rows, D) features before the classifier head (numpy): the last
    hidden state, pooled over space or tokens; models without one fall back to their logits."""
    import numpy as np
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = _pixels(model, images[start:start + batch_size])
        if isinstance(model, FERClassifier):
            hidden = model.model(pixel_values=model.pixel_values(pixels), output_hidden_states=True).hidden_states[-1]
            features = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)
        else:
            features = model(pixels)
        out.append(features.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def tiny_resnet(classes: Sequence[str], image_size: int = 48, seed: int = 0) -> FERClassifier:
    """A ~40K-parameter ResNet: the small-CNN preset for tests and the tiny bundle."""
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                          layer_type="basic", num_labels=len(classes),
                          id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    torch.manual_seed(seed)
    return FERClassifier(AutoModelForImageClassification.from_config(config), image_size).eval()


def _backbone_config(arch: str, classes: Sequence[str], image_size: int):
    from transformers import ConvNextConfig, ViTConfig
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    if arch == "small_cnn":
        return ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                            layer_type="basic", **labels)
    if arch == "small_convnext":  # a different family from small_cnn, for an independent evaluator
        return ConvNextConfig(num_channels=3, patch_size=2, num_stages=3, depths=[2, 2, 2], hidden_sizes=[48, 96, 192],
                              **labels)
    if arch == "resnet18":
        return ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                            layer_type="basic", **labels)
    if arch == "resnet50":
        return ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                            layer_type="bottleneck", **labels)
    if arch == "vit_b":
        return ViTConfig(image_size=image_size, patch_size=16 if image_size >= 96 else 8, **labels)
    if arch == "convnext_t":
        return ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], **labels)
    raise SynferError("model.arch", arch, f"one of {list(BACKBONES)} or feranno")


BACKBONES = ("small_cnn", "small_convnext", "resnet18", "resnet50", "vit_b", "convnext_t")


def build_backbone(arch: str, classes: Sequence[str], image_size: int, pretrained: str | None = None,
                   seed: int = 0) -> FERClassifier:
    """A backbone from its transformers config (random init), or ``pretrained`` weights with a new
    head over ``classes`` when the label sets differ."""
    if pretrained:
        labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
                  "label2id": {c: i for i, c in enumerate(classes)}}
        try:
            model = AutoModelForImageClassification.from_pretrained(pretrained, ignore_mismatched_sizes=True,
                                                                    **labels)
        except (OSError, ValueError) as error:
            raise SynferError("model.pretrained", pretrained, f"a transformers image classifier path or hub id "
                                                              f"({error})") from error
        return FERClassifier(model, image_size)
    torch.manual_seed(seed)
    return FERClassifier(AutoModelForImageClassification.from_config(_backbone_config(arch, classes, image_size)),
                         image_size)
