"""Any classifier a job names: a transformers FER classifier, or a FERAnno head over a bundle's frozen UNet.

Both map RGB [0, 1] images (batch, 3, H, W) to logits over their ``classes``. Loading a FERAnno head
loads its bundle, so this sits above both :mod:`synfer_ray.bundle` (which loads only transformers
classifiers, for its ``sg_classifier/``) and :mod:`synfer_ray.labeler.feranno`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from synfer_ray.classifiers import FERClassifier, build_backbone
from synfer_ray.config import LabelerModelConfig
from synfer_ray.labeler.feranno import is_feranno, load_feranno, new_feranno


def load_classifier(source: str | Path, field: str = "classifier") -> nn.Module:
    """Load a FERAnno labeler (with its bundle), a classifier saved by :meth:`FERClassifier.save_pretrained`,
    or any transformers image classifier (hub id / path); ``field`` names the setting in errors."""
    if is_feranno(source):
        return load_feranno(source, field=field)
    return FERClassifier.from_pretrained(source, field=field)


def build_classifier(arch: str, classes: Sequence[str], image_size: int, pretrained: str | None = None,
                     seed: int = 0, bundle: str | None = None, labeler: dict | None = None) -> nn.Module:
    """A new classifier to train: ``feranno`` is a fresh FERAnno head over the frozen diffusion features of
    ``bundle`` (``labeler`` holds its feature settings and sizes); any other ``arch`` is a transformers
    backbone (see :func:`synfer_ray.classifiers.build_backbone`)."""
    if arch == "feranno":
        return new_feranno(bundle, classes, LabelerModelConfig.model_validate(labeler or {}), seed=seed)
    return build_backbone(arch, classes, image_size, pretrained=pretrained, seed=seed)
