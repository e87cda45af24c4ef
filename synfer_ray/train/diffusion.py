"""Training the generator's parts on Ray Train: the VAE, and the denoiser (UNet, text encoder, AU adapter).

The losses are pure functions. The two worker loops count optimiser steps (not epochs), read their
Ray Data shard over and over until the steps are done, report a checkpoint every
``checkpoint_every`` steps and resume from the last one after a worker failure. Weights in a
checkpoint are diffusers/transformers directories (safetensors); the optimiser, EMA and gradient
scaler state sit beside them as ``torch.save`` files of plain tensors, reloaded with ``weights_only``.

Devices: batches go to the worker's device (``ray.train.torch.get_device()``); every random draw
(noise, timesteps, dropout, mirroring) comes from a seeded CPU generator and is then moved there,
so a run draws the same numbers on a GPU as on a CPU. Precision: weights and optimiser state stay
fp32; ``precision`` (bf16, fp16) runs the forward under ``torch.autocast``, fp16 with a gradient
scaler. The UNet trains whole or through LoRA (peft); a LoRA checkpoint holds only the low-rank
weights (``unet_lora/``), which :func:`merge_lora` folds into a plain UNet at the end.
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

from synfer_ray.errors import SynferError

STATE_NAME = "synfer_state.json"
MODULES = ("unet", "text_encoder", "au_adapter")
LORA_DIR = "unet_lora"  # a LoRA run's UNet part in checkpoints and in the stage's components
LORA_WEIGHTS, LORA_CONFIG = "lora.safetensors", "lora.json"


# --- the math ------------------------------------------------------------------------------------

def _draw(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor drawn on the CPU (from a CPU generator) moved to where the model computes."""
    return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)


class Autoencode(nn.Module):
    """The VAE's training forward as one ``forward`` (so DDP syncs it): pixels -> (reconstruction, KL)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(pixels).latent_dist
        noise = _draw(torch.randn(posterior.mean.shape, generator=generator), pixels.device, posterior.mean.dtype)
        latents = posterior.mean + posterior.std * noise
        return self.vae.decode(latents).sample, posterior.kl().float().mean() / pixels[0].numel()


def vae_loss(reconstruction: torch.Tensor, kl: torch.Tensor, pixels: torch.Tensor, kl_weight: float):
    """L1 reconstruction + ``kl_weight`` * per-pixel KL; pixels in [-1, 1]. Returns (loss, parts)."""
    l1 = F.l1_loss(reconstruction.float(), pixels.float())
    kl = kl.float()
    return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}


def noisy_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """Forward diffusion at uniformly drawn timesteps: returns (noisy, noise, timesteps)."""
    noise = _draw(torch.randn(latents.shape, generator=generator), latents.device, latents.dtype)
    timesteps = _draw(torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                    generator=generator), latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict: the noise (epsilon) or SD 2.x's velocity (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise SynferError("scheduler.prediction_type", kind, "epsilon or v_prediction (the bundle's scheduler config)")


def epsilon_loss(predicted_noise: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32, whatever the prediction's dtype (also the v-prediction loss)."""
    return F.mse_loss(predicted_noise.float(), noise.float())


class Denoiser(nn.Module):
    """UNet + text encoder + AU adapter as one module, so DDP sees a single forward.

    Frozen parts keep ``requires_grad`` False; DDP only reduces the gradients of trainable ones.
    """

    def __init__(self, unet, text_encoder, au_adapter):
        super().__init__()
        self.unet, self.text_encoder, self.au_adapter = unet, text_encoder, au_adapter

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor,
                aus: torch.Tensor, au_scale: float = 1.0, keep: torch.Tensor | None = None) -> torch.Tensor:
        text = self.text_encoder(input_ids)[0]
        tokens = self.au_adapter.encode(aus, keep)
        context = torch.cat([text, tokens.to(text.dtype)], dim=1)
        return self.unet(noisy, timesteps, encoder_hidden_states=context,
                         cross_attention_kwargs={"au_scale": au_scale}).sample


def drop_conditions(input_ids: torch.Tensor, empty_ids: torch.Tensor, probability: float,
                    generator: torch.Generator | None = None):
    """(input ids, keep): a random ``probability`` share of rows get the empty caption, and ``keep``
    False, which asks the AU adapter for its unconditional tokens (see au_adapter.py)."""
    keep = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if probability <= 0:
        return input_ids, keep
    drop = _draw(torch.rand(input_ids.shape[0], generator=generator), input_ids.device) < probability
    input_ids = torch.where(drop[:, None], empty_ids.to(input_ids.device).expand_as(input_ids), input_ids)
    return input_ids, ~drop


def warmup_constant(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def merge_lora(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
               scale: float) -> dict[str, torch.Tensor]:
    """Plain weights with every LoRA pair folded in, ``W + scale * B @ A`` (peft's merge; ``scale`` is
    alpha / rank). ``lora`` is peft's state dict (``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``);
    Linear and Conv layers alike. Merged tensors come back in fp32, the others as they were."""
    merged = dict(weights)
    for key in lora:
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise SynferError("unet_lora", key, "LoRA weights named <layer>.lora_A.weight / <layer>.lora_B.weight "
                                                "(peft's state dict of a LoRA without bias or DoRA)")
        layer = key.removesuffix(".lora_A.weight")
        target = f"{layer}.weight"
        if target not in weights or f"{layer}.lora_B.weight" not in lora:
            raise SynferError("unet_lora", layer, "a layer of the UNet with both lora_A and lora_B weights")
        down, up = lora[key].float(), lora[f"{layer}.lora_B.weight"].float()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weights[target].shape)
        merged[target] = weights[target].float() + scale * delta
    return merged


def merge_lora_directory(unet_directory: Path, lora_directory: Path) -> None:
    """Fold the LoRA of ``lora_directory`` (``lora.safetensors`` + ``lora.json``) into the plain diffusers
    UNet in ``unet_directory``, in place; the whole UNet is then stored in fp32."""
    from safetensors.torch import load_file, save_file
    settings = json.loads((lora_directory / LORA_CONFIG).read_text())
    lora = load_file(lora_directory / LORA_WEIGHTS)
    files = sorted(unet_directory.glob("*.safetensors"))
    if not files:
        raise SynferError("unet", str(unet_directory), "a diffusers UNet directory with safetensors weights")
    done = set()
    for file in files:
        weights = load_file(file)
        mine = {k: v for k, v in lora.items() if k.rsplit(".lora_", 1)[0] + ".weight" in weights}
        merged = merge_lora(weights, mine, settings["alpha"] / settings["rank"])
        save_file({k: v.float().contiguous() for k, v in merged.items()}, file, metadata={"format": "pt"})
        done |= set(mine)
    if done != set(lora):
        raise SynferError("unet_lora", sorted(set(lora) - done)[:3], "LoRA layers that exist in the UNet")


# --- devices and precision -----------------------------------------------------------------------

class MixedPrecision:
    """``precision`` on ``device``: autocast for the forward, and the backward/step (with a gradient
    scaler for fp16). Weights and optimiser state stay fp32; fp32 turns both off."""

    def __init__(self, precision: str, device: torch.device | str, field: str = "precision"):
        from synfer_ray.precision import resolve
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type == "cpu":
            raise SynferError(field, precision, "fp32 or bf16 on CPU workers (fp16 with loss scaling is for "
                                                "GPUs: set scaling.use_gpu true)")
        self.dtype = resolve(precision, self.device, field=field)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def step(self, loss: torch.Tensor, optimizer, parameters, max_norm: float = 1.0) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def check_precision(precision: str, use_gpu: bool, field: str) -> None:
    """Refuse, before any Ray work, a precision the workers' device cannot run (fp16 on CPU)."""
    if not use_gpu:
        MixedPrecision(precision, "cpu", field)


# --- shared loop plumbing ------------------------------------------------------------------------

@dataclass(frozen=True)
class StageJob:
    """What every worker of one stage needs, as plain values."""

    stage: str  # "vae", "denoiser" or "adapter"
    components: str  # a bundle-layout directory (or hub id) with the starting weights
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    checkpoint_every: int
    log_every: int
    seed: int
    torch_threads: int
    precision: str = "fp32"
    kl_weight: float = 0.0
    caption_dropout: float = 0.0
    ema_decay: float = 0.0
    trainable: tuple[str, ...] = ()
    lora_rank: int = 0  # > 0: the UNet trains as LoRA of this rank (peft) instead of whole
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    adapter_source: str | None = None  # where au_adapter/ lives when the SD parts are elsewhere (base_model)
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None

    @property
    def precision_field(self) -> str:
        return {"vae": "vae.precision", "denoiser": "unet.precision"}.get(self.stage, "stage.precision")

    @property
    def saved_modules(self) -> tuple[str, ...]:
        """The checkpoint's sub-directories: the trainable parts, the UNet as ``unet_lora`` in LoRA runs."""
        return tuple(LORA_DIR if name == "unet" and self.lora_rank else name for name in self.trainable)


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


def _restore() -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The last checkpoint's loop state and its saved tensors (weights by module, optimiser, EMA and
    scaler state, all on the CPU); ``(None, {})`` on a fresh start. The caller applies them once the
    model sits on its device, so optimiser state follows the parameters there."""
    import ray.train
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None, {}
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = json.loads((directory / STATE_NAME).read_text())
        saved = {"weights": {name: _read_weights(directory / "weights" / name) for name in state["modules"]}}
        for name in ("optimizer", "ema", "scaler"):
            if (directory / f"{name}.pt").is_file():
                saved[name] = torch.load(directory / f"{name}.pt", weights_only=True, map_location="cpu")
        return state, saved


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


def _save_training_state(directory: Path, optimizer, precision: MixedPrecision, ema=None) -> None:
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if precision.scaler.is_enabled():
        torch.save(precision.scaler.state_dict(), directory / "scaler.pt")
    if ema is not None:
        torch.save(ema.state_dict(), directory / "ema.pt")


def _restore_training_state(saved: dict[str, Any], optimizer, precision: MixedPrecision, ema=None) -> None:
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    if "scaler" in saved and precision.scaler.is_enabled():
        precision.scaler.load_state_dict(saved["scaler"])
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])
        ema.to(precision.device)


# --- the VAE -------------------------------------------------------------------------------------

def vae_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import AutoencoderKL

    job: StageJob = loop_config["job"]
    torch.set_num_threads(job.torch_threads)
    rank, world = _context()
    device = ray.train.torch.get_device()
    precision = MixedPrecision(job.precision, device, job.precision_field)
    vae = AutoencoderKL.from_pretrained(job.components, subfolder="vae", use_safetensors=True,
                                        torch_dtype=torch.float32)
    state, saved = _restore()
    state = state or {"step": 0, "history": [], "modules": ["vae"]}
    if saved:
        vae.load_state_dict(saved["weights"]["vae"])
    model = ray.train.torch.prepare_model(Autoencode(vae), parallel_strategy="ddp" if world > 1 else None)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=job.lr, weight_decay=0.0)
    _restore_training_state(saved, optimizer, precision)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(job.warmup_steps),
                                                 last_epoch=state["step"] - 1 if state["step"] else -1)
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank + state["step"])
    tracker = _Tracker(job, rank)
    batches = _batches(ray.train.get_dataset_shard("train"), job, device, state["step"])
    sums, began = torch.zeros(3, device=device), time.perf_counter()
    model.train()
    while state["step"] < job.steps:
        pixels = next(batches)["pixels"].permute(0, 3, 1, 2).float() / 127.5 - 1
        with precision.autocast():
            loss, parts = vae_loss(*model(pixels, generator), pixels, job.kl_weight)
        precision.step(loss, optimizer, vae.parameters())
        schedule.step()
        state["step"] += 1
        sums += torch.stack([parts["l1"], parts["kl"], torch.ones((), device=device)])
        step = state["step"]
        if step % job.log_every == 0 or step == job.steps or step % job.checkpoint_every == 0:
            sums_cpu = sums.cpu()
            metrics = {"l1": float(sums_cpu[0] / sums_cpu[2]), "kl": float(sums_cpu[1] / sums_cpu[2]),
                       "images_per_s": float(sums_cpu[2]) * job.batch_size * world / (time.perf_counter() - began)}
            tracker.log(metrics, step)
            state["history"].append({"step": step, **metrics})
            sums, began = torch.zeros(3, device=device), time.perf_counter()
            if step % job.checkpoint_every == 0 or step == job.steps:
                _report(job, rank, state, {"step": step, **metrics}, lambda d: (
                    vae.save_pretrained(d / "weights" / "vae", safe_serialization=True),
                    _save_training_state(d, optimizer, precision)))


# --- the denoiser --------------------------------------------------------------------------------

def add_lora(unet, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """Freeze ``unet`` and give it trainable LoRA layers (peft, through diffusers' PeftAdapterMixin).

    Call before installing the AU adapter: its processors hold their own ``to_k``/``to_v``, which
    the target names would otherwise match.
    """
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                init_lora_weights="gaussian"))


def save_lora(unet, directory: Path, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """``lora.safetensors`` (peft's state dict of the UNet's LoRA layers) and ``lora.json`` (rank, alpha)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(weights, directory / LORA_WEIGHTS, metadata={"format": "pt"})
    (directory / LORA_CONFIG).write_text(json.dumps({"rank": rank, "alpha": alpha, "target_modules": list(targets)}))


def load_denoiser_parts(job: StageJob) -> dict[str, nn.Module]:
    """UNet (with LoRA layers in a LoRA run), text encoder and AU adapter, in fp32 whatever the stored dtype."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from synfer_ray.generator.au_adapter import AUAdapter
    source, fp32 = job.components, torch.float32
    parts = {"unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True,
                                                          torch_dtype=fp32),
             "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True,
                                                           dtype=fp32),
             "au_adapter": AUAdapter.from_pretrained(job.adapter_source or source, subfolder="au_adapter",
                                                     use_safetensors=True, torch_dtype=fp32)}
    if "au_adapter" in job.trainable:
        # Condition dropout teaches the null tokens as the unconditional input (au_adapter.py); an
        # older adapter trained further learns them too, and is saved saying so.
        parts["au_adapter"].register_to_config(null_unconditional=True)
    for name, module in parts.items():
        module.requires_grad_(name in job.trainable).train(name in job.trainable)
    if job.lora_rank and "unet" in job.trainable:
        add_lora(parts["unet"], job.lora_rank, job.lora_alpha, job.lora_targets)
    return parts


def denoiser_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import DDIMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    from synfer_ray.generator.au_adapter import install_au_adapter

    job: StageJob = loop_config["job"]
    torch.set_num_threads(job.torch_threads)
    rank, world = _context()
    device = ray.train.torch.get_device()
    precision = MixedPrecision(job.precision, device, job.precision_field)
    source = job.components
    parts = load_denoiser_parts(job)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    state, saved = _restore()
    state = state or {"step": 0, "history": [], "modules": list(job.saved_modules)}
    for name, weights in saved.get("weights", {}).items():
        if name == LORA_DIR:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(parts["unet"], weights)
        else:
            parts[name].load_state_dict(weights)
    # Before the adapter is installed: its K/V then also hang under the UNet's processors.
    trainable = [p for name in job.trainable for p in parts[name].parameters() if p.requires_grad]
    install_au_adapter(parts["unet"], parts["au_adapter"])
    model = ray.train.torch.prepare_model(Denoiser(**parts), parallel_strategy="ddp" if world > 1 else None)
    optimizer = torch.optim.AdamW(trainable, lr=job.lr, weight_decay=1e-2)
    ema = EMAModel(trainable, decay=job.ema_decay, use_ema_warmup=True) if job.ema_decay else None
    _restore_training_state(saved, optimizer, precision, ema)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(job.warmup_steps),
                                                 last_epoch=state["step"] - 1 if state["step"] else -1)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    scaling = parts_scaling_factor(source)
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank + state["step"])
    tracker = _Tracker(job, rank)
    batches = _batches(ray.train.get_dataset_shard("train"), job, device, state["step"])
    sums, began = torch.zeros(2, device=device), time.perf_counter()
    while state["step"] < job.steps:
        with precision.autocast():
            loss = denoiser_loss(model, scheduler, next(batches), scaling, empty_ids, job.caption_dropout,
                                 generator)
        precision.step(loss, optimizer, trainable)
        schedule.step()
        if ema is not None:
            ema.step(trainable)
        state["step"] += 1
        sums += torch.stack([loss.detach(), torch.ones((), device=device)])
        step = state["step"]
        if step % job.log_every == 0 or step == job.steps or step % job.checkpoint_every == 0:
            sums_cpu = sums.cpu()
            metrics = {"loss": float(sums_cpu[0] / sums_cpu[1]),
                       "images_per_s": float(sums_cpu[1]) * job.batch_size * world / (time.perf_counter() - began)}
            tracker.log(metrics, step)
            state["history"].append({"step": step, **metrics})
            sums, began = torch.zeros(2, device=device), time.perf_counter()
            if step % job.checkpoint_every == 0 or step == job.steps:
                _report(job, rank, state, {"step": step, **metrics},
                        lambda d: _save_denoiser(d, parts, job, optimizer, precision, ema, trainable))


def _save_denoiser(directory: Path, parts: dict[str, nn.Module], job: StageJob, optimizer,
                   precision: MixedPrecision, ema, trainable):
    """Raw weights (to resume), EMA weights (to sample), optimiser, scaler and EMA state."""
    from synfer_ray.generator.au_adapter import stock_attention

    def save(kind: str) -> None:
        with stock_attention(parts["unet"]):  # the adapter's K/V are saved once, in au_adapter/
            for name, saved in zip(job.trainable, job.saved_modules):
                if saved == LORA_DIR:
                    save_lora(parts["unet"], directory / kind / saved, job.lora_rank, job.lora_alpha,
                              job.lora_targets)
                else:
                    parts[name].save_pretrained(directory / kind / saved, safe_serialization=True)

    save("weights")
    _save_training_state(directory, optimizer, precision, ema)
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    save("ema")
    if ema is not None:
        ema.restore(trainable)


def parts_scaling_factor(source: str) -> float:
    """The latent scale of the VAE in ``source`` (a directory or hub id)."""
    from diffusers import AutoencoderKL
    return float(AutoencoderKL.load_config(source, subfolder="vae").get("scaling_factor", 1.0))


def denoiser_loss(model, scheduler, batch: dict[str, torch.Tensor], scaling: float, empty_ids: torch.Tensor,
                  caption_dropout: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One training batch's loss: posterior latent sample (maybe mirrored), caption/AU dropout, forward
    diffusion at random timesteps, prediction of the scheduler's target (noise, or velocity for SD 2.x)."""
    latents = pick_latents(batch, scaling, generator)
    input_ids, keep = drop_conditions(batch["input_ids"].long(), empty_ids, caption_dropout, generator)
    noisy, noise, timesteps = noisy_latents(scheduler, latents, generator)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return epsilon_loss(model(noisy, timesteps, input_ids, batch["aus"].float(), keep=keep), target)


def pick_latents(batch: dict[str, torch.Tensor], scaling: float, generator: torch.Generator | None = None):
    """A posterior sample of each row's latent, of the image or (at random) its mirror image."""
    mean, std = batch["latent_mean"].float(), batch["latent_std"].float()  # (B, 2, C, H, W)
    mirror = _draw(torch.randint(0, 2, (mean.shape[0],), generator=generator), mean.device)
    rows = torch.arange(mean.shape[0], device=mean.device)
    mean, std = mean[rows, mirror], std[rows, mirror]
    return (mean + std * _draw(torch.randn(mean.shape, generator=generator), mean.device)) * scaling
