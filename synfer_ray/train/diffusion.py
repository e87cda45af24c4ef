"""Training the generator's parts on Ray Train: the VAE, and the denoiser (UNet, text encoder, AU adapter).

The losses are pure functions. The two worker loops count optimiser steps (not epochs), read their
Ray Data shard over and over until the steps are done, report a checkpoint every
``checkpoint_every`` steps and resume from the last one after a worker failure. Weights in a
checkpoint are diffusers/transformers directories (safetensors); the optimiser and EMA state sit
beside them as ``torch.save`` files of plain tensors, reloaded with ``weights_only``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

STATE_NAME = "synfer_state.json"
MODULES = ("unet", "text_encoder", "au_adapter")


# --- the math ------------------------------------------------------------------------------------

class Autoencode(nn.Module):
    """The VAE's training forward as one ``forward`` (so DDP syncs it): pixels -> (reconstruction, KL)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator,
                                                               device=pixels.device)
        return self.vae.decode(latents).sample, posterior.kl().mean() / pixels[0].numel()


def vae_loss(reconstruction: torch.Tensor, kl: torch.Tensor, pixels: torch.Tensor, kl_weight: float):
    """L1 reconstruction + ``kl_weight`` * per-pixel KL; pixels in [-1, 1]. Returns (loss, parts)."""
    l1 = F.l1_loss(reconstruction, pixels)
    return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}


def noisy_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """Forward diffusion at uniformly drawn timesteps: returns (noisy, noise, timesteps)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def epsilon_loss(predicted_noise: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(predicted_noise.float(), noise.float())


class Denoiser(nn.Module):
    """UNet + text encoder + AU adapter as one module, so DDP sees a single forward.

    Frozen parts keep ``requires_grad`` False; DDP only reduces the gradients of trainable ones.
    """

    def __init__(self, unet, text_encoder, au_adapter):
        super().__init__()
        self.unet, self.text_encoder, self.au_adapter = unet, text_encoder, au_adapter

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor,
                aus: torch.Tensor, au_scale: float = 1.0) -> torch.Tensor:
        text = self.text_encoder(input_ids)[0]
        context = torch.cat([text, self.au_adapter.encode(aus)], dim=1)
        return self.unet(noisy, timesteps, encoder_hidden_states=context,
                         cross_attention_kwargs={"au_scale": au_scale}).sample


def drop_conditions(input_ids: torch.Tensor, aus: torch.Tensor, empty_ids: torch.Tensor, probability: float,
                    generator: torch.Generator | None = None):
    """Replace a random ``probability`` share of rows by the unconditional input (empty caption, zero AUs)."""
    if probability <= 0:
        return input_ids, aus
    drop = torch.rand(input_ids.shape[0], generator=generator, device=input_ids.device) < probability
    input_ids = torch.where(drop[:, None], empty_ids.expand_as(input_ids), input_ids)
    return input_ids, aus * (~drop)[:, None].to(aus.dtype)


def warmup_constant(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


# --- shared loop plumbing ------------------------------------------------------------------------

@dataclass(frozen=True)
class StageJob:
    """What every worker of one stage needs, as plain values."""

    stage: str  # "vae" or "denoiser"
    components: str  # a bundle-layout directory with the starting weights
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    checkpoint_every: int
    log_every: int
    seed: int
    torch_threads: int
    kl_weight: float = 0.0
    caption_dropout: float = 0.0
    ema_decay: float = 0.0
    trainable: tuple[str, ...] = ()
    adapter_source: str | None = None  # where au_adapter/ lives when the SD parts are elsewhere (base_model)
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None


def _batches(shard, job: StageJob, device, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The worker's shard, epoch after epoch, reshuffled locally each time."""
    while True:
        for batch in shard.iter_torch_batches(batch_size=job.batch_size, device=device, drop_last=True,
                                              local_shuffle_buffer_size=8 * job.batch_size,
                                              local_shuffle_seed=job.seed + epoch):
            yield batch
        epoch += 1


class _Tracker:
    """Rank 0's MLflow client; a no-op elsewhere or when tracking is off."""

    def __init__(self, job: StageJob, rank: int):
        self.client = None
        if rank == 0 and job.mlflow_run_id:
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(job.mlflow_uri)
        self.run_id, self.prefix = job.mlflow_run_id, job.stage

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(f"{self.prefix}_{k}", float(v), now, step)
                                                        for k, v in metrics.items()])


def _restore(optimizer, ema=None) -> dict[str, Any] | None:
    """Load the optimiser/EMA state of the last checkpoint; return its state (None on a fresh start)."""
    import ray.train
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        if ema is not None:
            ema.load_state_dict(torch.load(directory / "ema.pt", weights_only=True))
        state = json.loads((directory / STATE_NAME).read_text())
        state["directory_weights"] = {name: _read_weights(directory / "weights" / name)
                                      for name in state["modules"]}
        return state


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(directory.glob("*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def _report(job: StageJob, rank: int, state: dict[str, Any], metrics: dict[str, float], save) -> None:
    """Report metrics from every rank; rank 0 attaches a checkpoint written by ``save(directory)``."""
    import ray.train
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save(Path(directory))
        (Path(directory) / STATE_NAME).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _context():
    import ray.train
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


# --- the VAE -------------------------------------------------------------------------------------

def vae_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import AutoencoderKL

    job: StageJob = loop_config["job"]
    torch.set_num_threads(job.torch_threads)
    rank, world = _context()
    vae = AutoencoderKL.from_pretrained(job.components, subfolder="vae", use_safetensors=True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=job.lr, weight_decay=0.0)
    state = _restore(optimizer) or {"step": 0, "history": [], "modules": ["vae"]}
    if "directory_weights" in state:
        vae.load_state_dict(state.pop("directory_weights")["vae"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(job.warmup_steps),
                                                 last_epoch=state["step"] - 1 if state["step"] else -1)
    model = ray.train.torch.prepare_model(Autoencode(vae), parallel_strategy="ddp" if world > 1 else None)
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank + state["step"])
    tracker = _Tracker(job, rank)
    batches = _batches(ray.train.get_dataset_shard("train"), job, torch.device("cpu"), state["step"])
    sums, began = torch.zeros(3), time.perf_counter()
    model.train()
    while state["step"] < job.steps:
        pixels = next(batches)["pixels"].permute(0, 3, 1, 2).float() / 127.5 - 1
        loss, parts = vae_loss(*model(pixels, generator), pixels, job.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        state["step"] += 1
        sums += torch.stack([parts["l1"], parts["kl"], torch.tensor(1.0)])
        step = state["step"]
        if step % job.log_every == 0 or step == job.steps or step % job.checkpoint_every == 0:
            metrics = {"l1": float(sums[0] / sums[2]), "kl": float(sums[1] / sums[2]),
                       "images_per_s": float(sums[2]) * job.batch_size * world / (time.perf_counter() - began)}
            tracker.log(metrics, step)
            state["history"].append({"step": step, **metrics})
            sums, began = torch.zeros(3), time.perf_counter()
            if step % job.checkpoint_every == 0 or step == job.steps:
                _report(job, rank, state, {"step": step, **metrics}, lambda d: (
                    vae.save_pretrained(d / "weights" / "vae", safe_serialization=True),
                    torch.save(optimizer.state_dict(), d / "optimizer.pt")))


# --- the denoiser --------------------------------------------------------------------------------

def denoiser_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from synfer_ray.generator.au_adapter import AUAdapter, install_au_adapter

    job: StageJob = loop_config["job"]
    torch.set_num_threads(job.torch_threads)
    rank, world = _context()
    source = job.components
    parts = {"unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True),
             "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True),
             "au_adapter": AUAdapter.from_pretrained(job.adapter_source or source, subfolder="au_adapter",
                                                     use_safetensors=True)}
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    for name, module in parts.items():
        module.requires_grad_(name in job.trainable).train(name in job.trainable)
    trainable = [p for name in job.trainable for p in parts[name].parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=job.lr, weight_decay=1e-2)
    ema = EMAModel(trainable, decay=job.ema_decay, use_ema_warmup=True) if job.ema_decay else None
    state = _restore(optimizer, ema) or {"step": 0, "history": [], "modules": list(job.trainable)}
    for name, weights in state.pop("directory_weights", {}).items():
        parts[name].load_state_dict(weights)
    install_au_adapter(parts["unet"], parts["au_adapter"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(job.warmup_steps),
                                                 last_epoch=state["step"] - 1 if state["step"] else -1)
    model = ray.train.torch.prepare_model(Denoiser(**parts), parallel_strategy="ddp" if world > 1 else None)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    scaling = parts_scaling_factor(source)
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank + state["step"])
    tracker = _Tracker(job, rank)
    batches = _batches(ray.train.get_dataset_shard("train"), job, torch.device("cpu"), state["step"])
    sums, began = torch.zeros(2), time.perf_counter()
    while state["step"] < job.steps:
        loss = denoiser_loss(model, scheduler, next(batches), scaling, empty_ids, job.caption_dropout, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(trainable)
        state["step"] += 1
        sums += torch.stack([loss.detach(), torch.tensor(1.0)])
        step = state["step"]
        if step % job.log_every == 0 or step == job.steps or step % job.checkpoint_every == 0:
            metrics = {"loss": float(sums[0] / sums[1]),
                       "images_per_s": float(sums[1]) * job.batch_size * world / (time.perf_counter() - began)}
            tracker.log(metrics, step)
            state["history"].append({"step": step, **metrics})
            sums, began = torch.zeros(2), time.perf_counter()
            if step % job.checkpoint_every == 0 or step == job.steps:
                _report(job, rank, state, {"step": step, **metrics},
                        lambda d: _save_denoiser(d, parts, job.trainable, optimizer, ema, trainable))


def _save_denoiser(directory: Path, parts: dict[str, nn.Module], trainable_names, optimizer, ema, trainable):
    """Raw weights (to resume), EMA weights (to sample), optimiser and EMA state."""
    from synfer_ray.generator.au_adapter import stock_attention

    def save(kind: str) -> None:
        with stock_attention(parts["unet"]):  # the adapter's K/V are saved once, in au_adapter/
            for name in trainable_names:
                parts[name].save_pretrained(directory / kind / name, safe_serialization=True)

    save("weights")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), directory / "ema.pt")
        ema.store(trainable)
        ema.copy_to(trainable)
    save("ema")
    if ema is not None:
        ema.restore(trainable)


def parts_scaling_factor(source: str) -> float:
    config = json.loads((Path(source) / "vae" / "config.json").read_text())
    return float(config.get("scaling_factor", 1.0))


def denoiser_loss(model, scheduler, batch: dict[str, torch.Tensor], scaling: float, empty_ids: torch.Tensor,
                  caption_dropout: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One training batch's epsilon loss: posterior latent sample (maybe mirrored), caption/AU dropout,
    forward diffusion at random timesteps, noise prediction."""
    latents = pick_latents(batch, scaling, generator)
    input_ids, aus = drop_conditions(batch["input_ids"].long(), batch["aus"].float(), empty_ids, caption_dropout,
                                     generator)
    noisy, noise, timesteps = noisy_latents(scheduler, latents, generator)
    return epsilon_loss(model(noisy, timesteps, input_ids, aus), noise)


def pick_latents(batch: dict[str, torch.Tensor], scaling: float, generator: torch.Generator | None = None):
    """A posterior sample of each row's latent, of the image or (at random) its mirror image."""
    mean, std = batch["latent_mean"].float(), batch["latent_std"].float()  # (B, 2, C, H, W)
    mirror = torch.randint(0, 2, (mean.shape[0],), generator=generator)
    rows = torch.arange(mean.shape[0])
    mean, std = mean[rows, mirror], std[rows, mirror]
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
