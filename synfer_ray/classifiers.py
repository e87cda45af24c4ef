"""FER classifiers: transformers image-classification backbones behind one image -> logits interface.

Every classifier here takes RGB images in [0, 1] as (batch, 3, H, W) at any size and returns
logits over its own class names. The sampler's semantic guidance and the labeler's ensemble use
any module with that contract.
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.model(pixel_values=(images - self.mean) / self.std).logits

    def save_pretrained(self, path: str | Path) -> None:
        self.model.config.synfer_image_size = self.image_size
        self.model.save_pretrained(str(path), safe_serialization=True)


def tiny_resnet(classes: Sequence[str], image_size: int = 48, seed: int = 0) -> FERClassifier:
    """A ~40K-parameter ResNet: the small-CNN preset for tests and the tiny bundle."""
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                          layer_type="basic", num_labels=len(classes),
                          id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    torch.manual_seed(seed)
    return FERClassifier(AutoModelForImageClassification.from_config(config), image_size).eval()


def load_classifier(source: str | Path, field: str = "classifier") -> FERClassifier:
    """Load a classifier saved by :meth:`FERClassifier.save_pretrained`, or any hub id / path."""
    try:
        model = AutoModelForImageClassification.from_pretrained(str(source), use_safetensors=True)
    except (OSError, ValueError) as error:
        raise SynferError(field, str(source), f"a directory or hub id holding a transformers "
                                              f"image classifier with safetensors weights ({error})") from error
    image_size = getattr(model.config, "synfer_image_size", None) or getattr(model.config, "image_size", 224)
    return FERClassifier(model, int(image_size)).eval()
