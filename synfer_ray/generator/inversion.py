"""DDIM inversion: walk a clean latent back up the DDIM schedule to a noise latent.

Starting generation from the inversion of a reference face keeps a natural face layout
(METHOD.md section 1). The walk uses the same timesteps as the forward sampler, reversed, and
the usual approximation eps(x_t, t) ~ eps(x_{t-1}, t).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler


def ddim_invert(latents: torch.Tensor, scheduler: DDIMScheduler, num_steps: int,
                eps_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Map clean latents x_0 to x_T for ``num_steps`` DDIM steps; ``eps_of(x, t)`` predicts noise."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.flip(0)  # ascending: the forward walk, backwards
    alphas = scheduler.alphas_cumprod
    alpha_from = scheduler.final_alpha_cumprod  # the level the forward walk ends at
    x = latents
    for t in timesteps:
        alpha_to = alphas[t]
        eps = eps_of(x, t)
        x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
        x = alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps
        alpha_from = alpha_to
    return x
