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


def predicted_x0(latents: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor | float,
                 prediction: str = "epsilon") -> torch.Tensor:
    """The clean latent the model output implies at x_t (the UNet's input, VP scale):
    epsilon: x0 = (x_t - sqrt(1 - abar) * eps) / sqrt(abar); v: x0 = sqrt(abar) * x_t - sqrt(1 - abar) * v."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=latents.dtype, device=latents.device)
    if prediction == "v_prediction":
        return alpha_bar.sqrt() * latents - (1 - alpha_bar).sqrt() * output
    return (latents - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()


def predicted_noise(latents: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor | float,
                    prediction: str = "epsilon") -> torch.Tensor:
    """The noise the model output implies at x_t: itself, or sqrt(abar) * v + sqrt(1 - abar) * x_t."""
    if prediction != "v_prediction":
        return output
    alpha_bar = torch.as_tensor(alpha_bar, dtype=latents.dtype, device=latents.device)
    return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * latents


def guidance_steps(num_steps: int, window: float) -> set[int]:
    """Indices of the DDIM steps (0 = first, noisiest) in the late window of fraction ``window``."""
    count = math.ceil(window * num_steps) if window > 0 else 0
    return set(range(num_steps - min(count, num_steps), num_steps))


def normalised_descent(embedding: torch.Tensor, gradient: torch.Tensor, step_size: float) -> torch.Tensor:
    """One step of size ``step_size`` against the gradient, normalised per sample; in fp32, since a
    half-precision gradient's squared norm under- or overflows."""
    gradient = gradient.float()
    norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (gradient.dim() - 1))
    return (embedding.float() - step_size * gradient / norm).to(embedding.dtype)


def semantic_guidance_step(
    text_embedding: torch.Tensor,
    eps_of: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    classifier: torch.nn.Module,
    latents: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    targets: torch.Tensor,
    step_size: float,
    prediction: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated text embedding, per-sample loss before the update).

    ``eps_of(c)`` is the (guided) model output for text embedding ``c`` at this step, ``latents``
    the UNet's input x_t, ``prediction`` what the output is (epsilon or v) and ``decode(x0)`` maps
    latents to RGB images in [0, 1], as the classifier expects.
    """
    with torch.enable_grad():
        embedding = text_embedding.detach().requires_grad_(True)
        x0 = predicted_x0(latents, eps_of(embedding).float(), alpha_bar, prediction)
        images = decode(x0)
        loss = F.cross_entropy(classifier(images).float(), targets, reduction="none")
        # Summing keeps each sample's gradient its own: rows in a batch never steer each other.
        (gradient,) = torch.autograd.grad(loss.sum(), embedding)
    return normalised_descent(text_embedding, gradient, step_size).detach(), loss.detach()
