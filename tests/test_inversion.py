import numpy as np
import torch
from diffusers import DDIMScheduler

from synfer_ray import taxonomy
from synfer_ray.generator.inversion import ddim_invert
from synfer_ray.generator.sampler import SampleRequest, SamplerSettings

DATA_STD = 0.5


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def gaussian_data_eps(scheduler):
    """The exact noise predictor for data ~ N(0, DATA_STD^2): a model trained to perfection."""
    def eps(x, t):
        alpha = scheduler.alphas_cumprod[t]
        return (1 - alpha).sqrt() * x / (alpha * DATA_STD**2 + 1 - alpha)
    return eps


def round_trip_error(num_steps: int) -> float:
    scheduler = sd_scheduler()
    eps = gaussian_data_eps(scheduler)
    clean = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * DATA_STD
    x = ddim_invert(clean, scheduler, num_steps, eps)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x).prev_sample
    return (x - clean).abs().max().item()


def test_inversion_round_trip_converges_with_steps():
    errors = {n: round_trip_error(n) for n in (10, 50, 200)}
    print("DDIM inversion round-trip max abs error by steps:", errors)
    assert errors[10] > errors[50] > errors[200]
    assert errors[200] < 0.02


def test_inverted_noise_looks_like_noise():
    scheduler = sd_scheduler()
    clean = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * DATA_STD
    noise = ddim_invert(clean, scheduler, 50, gaussian_data_eps(scheduler))
    assert 0.9 < noise.std().item() < 1.1


def test_bundle_inversion_round_trip(sampler, tiny_bundle):
    """Through the real UNet and VAE: invert an image, regenerate from it without CFG."""
    row = SampleRequest(seed=4, prompt=taxonomy.build_prompt(4, "happy"),
                        aus=taxonomy.prototype_aus("happy", tiny_bundle.au_names).tolist(), target="happy")
    image = sampler.generate([row], SamplerSettings(steps=10))
    clean = sampler.encode_images(image)
    noise = sampler.invert(image, [row.prompt], np.asarray([row.aus]), steps=10)
    rebuilt = sampler.sample_latents([row], SamplerSettings(steps=10, cfg_scale=1.0), init_latents=noise)
    error = (rebuilt - clean).abs().mean().item()
    # Untrained weights break the eps(x_t) ~ eps(x_t-1) assumption, so only sanity is asserted here;
    # convergence is asserted above with an exact noise predictor.
    print(f"tiny-bundle inversion round trip: mean abs latent error {error:.3f}")
    assert torch.isfinite(rebuilt).all() and noise.shape == clean.shape
