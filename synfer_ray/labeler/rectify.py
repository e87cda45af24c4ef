"""Label rectification (METHOD.md section 3): an ensemble vote -> soft label, final label, accepted.

Pure numpy, so the rule is tested on hand-made probability tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from synfer_ray.errors import SynferError


@dataclass(frozen=True)
class Rectified:
    soft_label: np.ndarray  # (rows, classes) weighted mean of the voters' probabilities
    label_index: np.ndarray  # (rows,) argmax of soft_label
    confidence: np.ndarray  # (rows,) max of soft_label
    accepted: np.ndarray  # (rows,) bool


def rectify(votes: np.ndarray, weights: Sequence[float] | None = None, tau: float = 0.5,
            targets: np.ndarray | None = None, require_target_agreement: bool = False) -> Rectified:
    """``votes`` is (voters, rows, classes) of probabilities over one shared class list.

    Soft label = weighted mean over voters; final label = its argmax; a row is accepted when its
    confidence is >= ``tau`` and, if asked, its final label equals its target index.
    """
    votes = np.asarray(votes, dtype=np.float64)
    if votes.ndim != 3 or votes.shape[0] == 0:
        raise SynferError("votes", votes.shape, "an array of shape (voters >= 1, rows, classes)")
    weights = np.ones(votes.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (votes.shape[0],) or np.any(weights <= 0):
        raise SynferError("weights", weights.tolist(), f"{votes.shape[0]} positive weights, one per voter")
    if require_target_agreement and targets is None:
        raise SynferError("targets", None, "target indices when require_target_agreement is on")
    soft = np.tensordot(weights / weights.sum(), votes, axes=1)
    label = soft.argmax(axis=1)
    confidence = soft.max(axis=1)
    accepted = confidence >= tau
    if require_target_agreement:
        accepted &= label == np.asarray(targets)
    return Rectified(soft.astype(np.float32), label, confidence.astype(np.float32), accepted)


def align_probabilities(probabilities: np.ndarray, voter_classes: Sequence[str],
                        classes: Sequence[str], voter: str) -> np.ndarray:
    """Re-order a voter's (rows, its classes) probabilities onto ``classes``; extra classes are dropped
    and the rest renormalised, so an 8-class voter can vote on a 7-class dataset."""
    missing = [c for c in classes if c not in voter_classes]
    if missing:
        raise SynferError(f"labeling.voters[{voter}]", list(voter_classes),
                          f"a classifier that knows every dataset class; it lacks {missing}")
    picked = probabilities[:, [list(voter_classes).index(c) for c in classes]]
    return picked / np.clip(picked.sum(axis=1, keepdims=True), 1e-12, None)
