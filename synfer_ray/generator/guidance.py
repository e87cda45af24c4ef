"""Semantic guidance (METHOD.md section 2): steer the conditioning with a FER classifier's gradient.

At a late step the sampler predicts the clean latent x0_hat, decodes it, asks the guiding
classifier how far the image is from the target expression (cross-entropy), and moves the steered
conditioning one step down that loss: ``c <- c - (lambda / 100) * ||c|| * grad_c L / ||grad_c L||``.

What is steered (``sg_target``): the text embedding (the paper), the AU tokens, or both, each by its
own step. The step is ``lambda`` percent of the norm of what it steers, per sample: a 77-token text
embedding and 4 AU tokens have very different norms, and so do the encoders of different bundles, so
an absolute length would mean something else on every one (METHOD.md's lambda is absolute; on the
faces-48 text embedding, norm about 100, the two coincide).

Adaptive steps (``adaptive``) scale each sample's step by ``1 - p``, p the guide's probability that the
face it predicts already shows the asked class, so a face that reads as its class is barely moved. On
faces-48 they trade agreement for diversity as fixed steps do, but do not break faces at large scales
(docs/results/study.md, the SG sweep).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

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


# What semantic guidance may steer: the text embedding, the AU tokens, or both.
SG_TARGETS = {"text": ("text",), "au": ("au",), "both": ("text", "au")}


def _per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1).norm(dim=1).view(-1, *[1] * (tensor.dim() - 1))


def relative_descent(embedding: torch.Tensor, gradient: torch.Tensor,
                     step_size: float | torch.Tensor) -> torch.Tensor:
    """One step against the gradient of length ``step_size`` percent of the embedding's norm (a number,
    or one per sample), per sample; in fp32, since a half-precision gradient's squared norm under- or
    overflows."""
    embedding, gradient = embedding.float(), gradient.float()
    step_size = torch.as_tensor(step_size, dtype=torch.float32, device=embedding.device)
    if step_size.dim():
        step_size = step_size.view(-1, *[1] * (embedding.dim() - 1))
    length = step_size / 100 * _per_sample_norm(embedding)
    return embedding - length * gradient / _per_sample_norm(gradient).clamp_min(1e-12)


class GuidedStep(NamedTuple):
    """What one semantic-guidance step gives: the moved conditions, each sample's loss before the move,
    and the (guided) model output its forward pass made, before the move: a sampler may take that as
    the step's own output instead of a fresh pass under the moved conditions (``sg_reuse_pass``)."""

    conditions: dict[str, torch.Tensor]
    loss: torch.Tensor
    output: torch.Tensor


def semantic_guidance_step(
    conditions: dict[str, torch.Tensor],
    steered: Sequence[str],
    eps_of: Callable[..., torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    classifier: torch.nn.Module,
    latents: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    targets: torch.Tensor,
    step_size: float | torch.Tensor,
    prediction: str = "epsilon",
    adaptive: bool = False,
) -> GuidedStep:
    """The conditions with the ``steered`` ones moved, the per-sample loss before the move, and the
    model output for the conditions before the move.

    ``conditions`` are the conditional inputs by name (``text``, ``au``), ``eps_of(**conditions)`` the
    (guided) model output for them at this step, ``latents`` the UNet's input x_t, ``prediction``
    what the output is (epsilon or v) and ``decode(x0)`` maps latents to RGB images in [0, 1], as
    the classifier expects (for a guide that reads latents, the identity). Each steered condition takes its own relative step (``step_size``: one for
    all samples, or one per sample); ``adaptive`` scales each sample's by ``1 - p(target)``.
    """
    with torch.enable_grad():
        inputs = {name: value.detach().requires_grad_(name in steered) for name, value in conditions.items()}
        output = eps_of(**inputs).float()
        x0 = predicted_x0(latents, output, alpha_bar, prediction)
        loss = F.cross_entropy(classifier(decode(x0)).float(), targets, reduction="none")
        # Summing keeps each sample's gradient its own: rows in a batch never steer each other.
        gradients = torch.autograd.grad(loss.sum(), [inputs[name] for name in steered])
    # p(target) = exp(-cross-entropy).
    steps = step_size * -torch.expm1(-loss.detach()) if adaptive else step_size
    moved = dict(conditions)
    for name, gradient in zip(steered, gradients):
        moved[name] = relative_descent(conditions[name], gradient, steps).detach()
    return GuidedStep(moved, loss.detach(), output.detach())
