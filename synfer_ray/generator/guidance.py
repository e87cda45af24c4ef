"""Semantic guidance (METHOD.md section 2): steer the text embedding with a FER classifier's gradient.

At a late DDIM step the sampler predicts the clean latent x0_hat, decodes it, asks the guiding
classifier how far the image is from the target expression (cross-entropy), and moves the text
embedding one normalised step down that loss: ``c <- c - lambda * grad_c L / ||grad_c L||``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def predicted_x0(latents: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=latents.dtype, device=latents.device)
    return (latents - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def guidance_steps(num_steps: int, window: float) -> set[int]:
    """Indices of the DDIM steps (0 = first, noisiest) in the late window of fraction ``window``."""
    count = math.ceil(window * num_steps) if window > 0 else 0
    return set(range(num_steps - min(count, num_steps), num_steps))


def normalised_descent(embedding: torch.Tensor, gradient: torch.Tensor, step_size: float) -> torch.Tensor:
    """One step of size ``step_size`` against the gradient, normalised per sample."""
    norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (gradient.dim() - 1))
    return embedding - step_size * gradient / norm


def semantic_guidance_step(
    text_embedding: torch.Tensor,
    eps_of: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    classifier: torch.nn.Module,
    latents: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    targets: torch.Tensor,
    step_size: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated text embedding, per-sample loss before the update).

    ``eps_of(c)`` is the (guided) noise prediction for text embedding ``c`` at this step and
    ``decode(x0)`` maps latents to RGB images in [0, 1], as the classifier expects.
    """
    with torch.enable_grad():
        embedding = text_embedding.detach().requires_grad_(True)
        images = decode(predicted_x0(latents, eps_of(embedding), alpha_bar))
        loss = F.cross_entropy(classifier(images), targets, reduction="none")
        # Summing keeps each sample's gradient its own: rows in a batch never steer each other.
        (gradient,) = torch.autograd.grad(loss.sum(), embedding)
    return normalised_descent(text_embedding, gradient, step_size).detach(), loss.detach()
