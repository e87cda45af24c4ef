"""PseudoLabeler: every voter classifies the stored images; rectification turns the votes into labels."""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from synfer_ray.classifiers import predict_probabilities
from synfer_ray.config import VoterConfig
from synfer_ray.images import decode_rgb
from synfer_ray.labeler.feranno import LABELER_DIR
from synfer_ray.labeler.rectify import align_probabilities, rectify
from synfer_ray.models import load_classifier


# The columns label_table appends to a generated table, with what each holds (the docs' format reference).
LABEL_COLUMNS: dict[str, str] = {
    "voters": "The names of the voters (classifiers, FERAnno) whose probabilities are in `votes`.",
    "votes": "Each voter's class probabilities for the row (voters x classes).",
    "soft_label": "The weight-averaged votes (probabilities over classes); one-hot on the target where there "
                  "are no voters.",
    "label": "The final label (class name): the soft label's most probable class.",
    "label_index": "The index of `label` in the bundle's classes.",
    "confidence": "The soft label's probability of `label`.",
    "accepted": "Whether `confidence` >= `labeling.tau` (and, with `labeling.require_target_agreement`, "
                "`label` equals `target`); training reads accepted rows only.",
}


@dataclass
class Voter:
    name: str
    model: torch.nn.Module  # RGB [0, 1] (batch, 3, H, W) -> logits
    classes: Sequence[str]
    weight: float = 1.0


def load_voters(voters: Sequence[VoterConfig], device: str | torch.device = "cpu", field: str = "labeling.voters",
                bundle_labeler: str | None = None, bundle_labeler_weight: float = 1.0,
                dtype: torch.dtype = torch.float32) -> list[Voter]:
    """Load each configured voter once, on ``device`` in ``dtype``; its name defaults to its
    directory's name. With ``bundle_labeler`` (a bundle path) that bundle's FERAnno labeler votes
    first, where it has one."""
    loaded = []
    if bundle_labeler and (Path(bundle_labeler) / LABELER_DIR).is_dir():
        model = load_classifier(Path(bundle_labeler) / LABELER_DIR, field="bundle/labeler").to(device, dtype)
        loaded.append(Voter("feranno", model, model.classes, bundle_labeler_weight))
    for index, voter in enumerate(voters):
        model = load_classifier(voter.path, field=f"{field}[{index}].path").to(device, dtype)
        loaded.append(Voter(voter.name or os.path.basename(voter.path.rstrip("/")), model, model.classes,
                            voter.weight))
    return loaded


class PseudoLabeler:
    def __init__(self, voters: Sequence[Voter], classes: Sequence[str], tau: float = 0.5,
                 require_target_agreement: bool = False, batch_size: int = 64, mirror_average: bool = False):
        self.voters = list(voters)
        self.mirror_average = mirror_average
        self.classes = list(classes)
        self.tau = tau
        self.require_target_agreement = require_target_agreement
        self.batch_size = batch_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(voters, rows, dataset classes) probabilities for (rows, H, W, 3) uint8 images."""
        return np.stack([align_probabilities(predict_probabilities(voter.model, images, self.batch_size,
                                                                   self.mirror_average),
                                             voter.classes, self.classes, voter.name)
                         for voter in self.voters])

    def label_table(self, table: pa.Table) -> pa.Table:
        """Append votes, soft label, final label, confidence and the accepted flag to ``table``."""
        n = table.num_rows
        targets = np.asarray(table.column("target_index").to_numpy(), dtype=np.int64)
        if self.voters:
            images = np.stack([decode_rgb(data) for data in table.column("image").to_pylist()])
            votes = self.probabilities(images)
            result = rectify(votes, [v.weight for v in self.voters], self.tau, targets,
                             self.require_target_agreement)
            soft, label, confidence, accepted = (result.soft_label, result.label_index, result.confidence,
                                                 result.accepted)
        else:  # no voters: the target is the label, as in a plain conditional generator
            votes = np.zeros((0, n, len(self.classes)), np.float32)
            soft = np.eye(len(self.classes), dtype=np.float32)[targets]
            label, confidence, accepted = targets, np.ones(n, np.float32), np.ones(n, bool)
        names = [v.name for v in self.voters]
        columns = {
            "voters": pa.array([names] * n, pa.list_(pa.string())),
            "votes": pa.array([votes[:, i].tolist() for i in range(n)],
                              pa.list_(pa.list_(pa.float32()))),
            "soft_label": pa.array(list(soft.astype(np.float32)), pa.list_(pa.float32())),
            "label": pa.array([self.classes[i] for i in label], pa.string()),
            "label_index": pa.array(label, pa.int32()),
            "confidence": pa.array(confidence, pa.float32()),
            "accepted": pa.array(accepted, pa.bool_()),
        }
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table
