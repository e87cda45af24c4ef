"""Losses and schedules shared by the training loops (pure torch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                       class_weights: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against probability targets (one-hot or soft), smoothed, optionally weighted
    by the class of each row's largest target, averaged over ``valid`` rows (0 if none)."""
    classes = logits.shape[1]
    target = target * (1 - label_smoothing) + label_smoothing / classes
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    weight = torch.ones_like(per_row) if class_weights is None else class_weights[target.argmax(dim=1)]
    if valid is not None:
        weight = weight * valid.to(weight.dtype)
    # Summing a zero-weighted loss keeps backward() (and its collectives) running on every worker.
    return (per_row * weight).sum() / weight.sum().clamp_min(1e-12)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.0):
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
