"""Generator (UNet) training throughput: the Ray Train denoiser stage against a plain PyTorch loop on
the same cores, model, latents and batch, in one run.

    python benchmarks/bench_train_generator.py [--rows 2048] [--steps 60] [--batch 64] [--preset faces-48]

Both sides train UNet + text encoder + AU adapter with the same step (posterior sample of a
mirrored-or-not latent, caption dropout, epsilon loss, AdamW, clipping, EMA); images/s counts
the steps after the first logging interval (start-up excluded on both sides).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_latents(components: Path, rows: int, classes, au_names) -> dict[str, np.ndarray]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import separable_faces

    from synfer_ray.data.conditioning import EncodeForDenoiser
    table = separable_faces(rows // 7 + 1, seed=0).slice(0, rows)
    encode = EncodeForDenoiser(str(components), classes, au_names, 0.1, 48, torch_threads=2)
    batch = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in ("image", "label")}
    return encode(batch)


def plain_loop(components: Path, latents: dict, steps: int, batch: int, threads: int, warm: int) -> float:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from synfer_ray.generator.au_adapter import AUAdapter, install_au_adapter
    from synfer_ray.train.diffusion import Denoiser, denoiser_loss, parts_scaling_factor
    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(components, subfolder="unet")
    text = CLIPTextModel.from_pretrained(components, subfolder="text_encoder")
    adapter = AUAdapter.from_pretrained(components, subfolder="au_adapter")
    install_au_adapter(unet, adapter)
    tokenizer = CLIPTokenizer.from_pretrained(components, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(components, subfolder="scheduler")
    model = Denoiser(unet, text, adapter).train()
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=1e-2)
    ema = EMAModel(parameters, decay=0.999, use_ema_warmup=True)
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    scale = parts_scaling_factor(str(components))
    generator = torch.Generator().manual_seed(0)
    rows = len(latents["label"])
    began = None
    for step in range(steps):
        if step == warm:
            began = time.perf_counter()
        index = np.random.default_rng(step).choice(rows, batch, replace=False)
        chunk = {k: torch.from_numpy(np.asarray(v[index])) for k, v in latents.items()}
        loss = denoiser_loss(model, scheduler, chunk, scale, empty, 0.1, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.step(parameters)
    return (steps - warm) * batch / (time.perf_counter() - began)


def ray_loop(components: Path, latents: dict, steps: int, batch: int, workers: int, threads: int,
             warm: int) -> float:
    import ray.data

    from synfer_ray.config import DenoiserStageConfig, ScalingConfig
    from synfer_ray.tracking import Run
    from synfer_ray.train.diffusion import denoiser_loop
    from synfer_ray.train.generator import fit_stage, stage_job
    dataset = ray.data.from_items([{k: v[i] for k, v in latents.items()} for i in range(len(latents["label"]))])
    settings = DenoiserStageConfig(steps=steps, batch_size=batch // workers, warmup_steps=0, log_every=warm,
                                   checkpoint_every=steps)
    scaling = ScalingConfig(num_workers=workers, torch_threads=threads, cpus_per_worker=1)
    job = stage_job("denoiser", components, settings, 0, scaling, Run(), caption_dropout=0.1, ema_decay=0.999,
                    trainable=("unet", "text_encoder", "au_adapter"))
    _, history, _ = fit_stage(denoiser_loop, job, dataset, scaling, "bench", Path(tempfile.mkdtemp()), "global")
    return float(np.mean([h["images_per_s"] for h in history[1:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warm", type=int, default=10, help="steps excluded from the timing (start-up)")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--preset", default="faces-48", help="generator preset whose architecture is timed")
    args = parser.parse_args()
    from synfer_ray.bundle import new_generator
    from synfer_ray.config import GeneratorTrainConfig, load_config
    from synfer_ray.presets import preset_path
    from synfer_ray import taxonomy
    architecture = load_config(GeneratorTrainConfig, preset_path(args.preset)).architecture
    components = Path(tempfile.mkdtemp()) / "components"
    classes = taxonomy.expression_set(architecture.expressions)
    au_names = taxonomy.au_set(architecture.au_set)
    new_generator(architecture).save(components, classes, architecture.resolution)
    latents = make_latents(components, args.rows, classes, au_names)
    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {}
    for workers, threads in ((1, 2), (2, 1)):
        results[(workers, threads)] = ray_loop(components, latents, args.steps, args.batch, workers, threads,
                                               args.warm)
    ray.shutdown()
    plain = plain_loop(components, latents, args.steps, args.batch, threads=2, warm=args.warm)
    print(f"{args.preset} generator, global batch {args.batch}, steps {args.warm + 1}..{args.steps}")
    print(f"plain PyTorch loop, 1 process x 2 threads:      {plain:7.1f} img/s  1.00x")
    for (workers, threads), value in results.items():
        print(f"Ray Train {workers} worker(s) x {threads} thread(s) (DDP):  {value:7.1f} img/s  {value / plain:.2f}x")


if __name__ == "__main__":
    main()
