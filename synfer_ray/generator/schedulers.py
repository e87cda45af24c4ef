"""The samplers users of diffusers expect, through diffusers' own scheduler classes.

Every scheduler is built from the bundle's scheduler config (its betas, timestep spacing and
prediction type), so a bundle trained with one schedule samples with any of them. What the
sampler and semantic guidance need beyond ``step()`` is the noise level of each step as
``alpha_bar`` (the VP signal share), read here in one way for all of them.
"""

from __future__ import annotations

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from synfer_ray.errors import SynferError

SCHEDULERS = ("ddim", "dpmpp_2m", "unipc", "euler")


def make_scheduler(name: str, config) -> DDIMScheduler | DPMSolverMultistepScheduler | UniPCMultistepScheduler \
        | EulerDiscreteScheduler:
    """A fresh scheduler ``name`` over ``config`` (multistep schedulers keep state: one per sampling run)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise SynferError("sampling.scheduler", name, f"one of {list(SCHEDULERS)}")


def alpha_bar_at(scheduler, index: int, timestep) -> torch.Tensor:
    """The signal share abar of step ``index``, as the UNet's (scaled) input sees it.

    Sigma-based schedulers (Euler, DPM-Solver++, UniPC) may interpolate between the training
    timesteps, so their own sigma is the truth: sigma^2 = (1 - abar) / abar. DDIM steps on the
    training timesteps themselves."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > index:
        sigma = sigmas[index].double()
        return (1.0 / (1.0 + sigma ** 2)).float()
    return scheduler.alphas_cumprod[int(timestep)].float()


def prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise SynferError("bundle/scheduler/scheduler_config.json.prediction_type", kind,
                          "epsilon or v_prediction (the UNet must predict noise or velocity)")
    return kind
