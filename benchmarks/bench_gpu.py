"""GPU sampling throughput at SD scale: our sampler and the Ray Data pipeline against diffusers'
StableDiffusionPipeline on the same random-weight SD 1.5 bundle, DDIM, fp16, in one run.

    python benchmarks/bench_gpu.py                        # sd15 at 512x512, fp16, 25 steps, batch 8
    python benchmarks/bench_gpu.py --device cpu --precision bf16 --arch tiny --resolution 48   # here

On a CUDA host with this project's packages it runs as above. A GPU host without network access
runs it from the source tree with the wheel archive (cluster/gpu/README.md): `make gpu-wheels` on a
machine with the package index builds build/gpu-wheels/site.tar.xz, and on the host
(`make gpu-bench` there does the same)
    bash cluster/gpu/with-wheels.sh build/gpu-wheels/site.tar.xz benchmarks/bench_gpu.py

Configurations, each timed ``repeats`` times interleaved after a warm-up (best kept): diffusers
(CFG ``--cfg``), ours text only (CFG 1, AU 0), ours doing the reference's work (CFG, AU scale 0, SG
off), ours + CFG + AU (AU scale 1), ours + SG, and ``synfer_ray.generate`` on the same device (one
generator actor, a labeler actor, shard writes), whose images/s is its steady state: run at two
sizes, the extra rows over the extra seconds, so that actor start-up and model loading cancel (the
end-to-end figure is printed beside it). Peak memory is
``torch.cuda.max_memory_allocated`` per configuration in this process (both models' weights
included); the pipeline's actors are other processes, so its figure is nvidia-smi's rise.
Prints the three target lines: same work as diffusers >= 0.95x, pipeline vs sampler >= 0.9x, SG
time vs CFG time <= 2.5x; then the parts of one guided step (the CFG pass, and the UNet, the VAE
decoder and the guide each forward and backward) timed alone, to say where SG's time goes; then
what SG costs with each guide (benchmarks/sg_cost.py: the pixel guide, the latent guide, reusing the
guide's pass, recomputing activations), one line each:
``sg cost <bundle> <guide>: time 1.42x, peak memory 1.21x of CFG + AU`` (the whole sample at
``--steps`` with the last 40% guided; peak memory the allocator's, weights included).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from synfer_ray import taxonomy
from synfer_ray.bundle import load_bundle
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
from synfer_ray.precision import DTYPES

TARGETS = {"same work": 0.95, "pipeline": 0.9, "sg": 2.5}


def make_bundle(path: Path, arch: str, resolution: int, dtype: torch.dtype) -> None:
    try:
        from synfer_ray.bundle import make_random_bundle
    except ImportError:
        raise SystemExit("error: synfer_ray.bundle has no make_random_bundle(path, arch, resolution, seed) in this "
                         "tree yet (`synfer bundle make-random`); pass --bundle PATH to an existing bundle") from None
    make_random_bundle(path, arch=arch, resolution=resolution, seed=0, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceMemory:
    """nvidia-smi's used memory while a block runs (for work done by other processes)."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.rise = None

    @staticmethod
    def used() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(int(v) for v in out.split() if v.strip().isdigit())

    def __enter__(self):
        if self.enabled:
            self.baseline = self.peak = self.used()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.5):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.rise = self.peak - self.baseline


def run_pipeline(bundle_path: Path, args, device: torch.device) -> tuple[float, float, int | None]:
    """``synfer_ray.generate`` on the same device, at two sizes: (marginal images/s, end-to-end
    images/s of the larger run, MiB). The marginal rate, the extra rows over the extra seconds, is
    the pipeline's steady state: Ray's start, actor start-up and model loading cancel out."""
    from synfer_ray.config import GenerateConfig, build_config
    from synfer_ray.generate import run_generate
    from synfer_ray.pipeline import ensure_ray
    gpu = device.type == "cuda"
    rows_per_shard = 2 * args.batch
    scratch = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    runs = {}
    with DeviceMemory(device) as memory:
        for shards in (max(1, args.shards // 3), args.shards):
            config = build_config(GenerateConfig, {
                "bundle": str(bundle_path), "output": str(scratch / f"shards-{shards}"),
                "count": shards * rows_per_shard, "rows_per_shard": rows_per_shard, "precision": args.precision,
                "sampling": {"scheduler": "ddim", "steps": args.steps, "cfg_scale": args.cfg, "au_scale": 1.0,
                             "sg_scale": 0.0},
                "labeling": {"voters": [{"path": str(bundle_path / "sg_classifier"), "name": "guide"}]},
                "generator": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "num_gpus": 0.8 if gpu else 0,
                              "batch_size": args.batch, "torch_threads": args.threads},
                "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "num_gpus": 0.2 if gpu else 0,
                            "batch_size": 64},
                "ray": {"num_cpus": 4}, "tracking": {"enabled": False}})
            ensure_ray(config.ray)  # started before the clock: both runs share it
            began = time.perf_counter()
            card = run_generate(config, progress=False)
            runs[shards] = (card["rows"], time.perf_counter() - began)
    shutil.rmtree(scratch, ignore_errors=True)
    (small_rows, small_seconds), (rows, seconds) = runs.values()
    marginal = (rows - small_rows) / (seconds - small_seconds) if seconds > small_seconds else float("nan")
    return marginal, rows / seconds, memory.rise


def time_samplers(bundle_path: Path, args, device: torch.device, dtype: torch.dtype):
    """Best seconds and peak MiB per configuration of diffusers and our sampler, interleaved."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    bundle = load_bundle(bundle_path, dtype=dtype).to(device)
    sampler = GuidedSampler(bundle, device=device)
    size = bundle.manifest.resolution
    classes = bundle.classes
    requests = [SampleRequest(seed=i, prompt=taxonomy.build_prompt(i, classes[i % len(classes)]),
                              aus=taxonomy.sample_target_aus(i, classes[i % len(classes)], bundle.au_names).tolist(),
                              target=classes[i % len(classes)]) for i in range(args.batch)]
    pipe = StableDiffusionPipeline.from_pretrained(bundle_path, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_cfg():
        pipe([r.prompt for r in requests], num_inference_steps=args.steps, guidance_scale=args.cfg, height=size,
             width=size, generator=[torch.Generator().manual_seed(r.seed) for r in requests], output_type="np")

    def ours(**settings):
        return lambda: sampler.generate(requests, SamplerSettings(scheduler="ddim", steps=args.steps, **settings))

    runs = {  # the order main() reads them in: reference, text only, same work, CFG + AU, SG
        f"diffusers SD pipeline, CFG {args.cfg:g}": diffusers_cfg,
        "synfer, text only (CFG 1, AU 0)": ours(cfg_scale=1.0, au_scale=0.0),
        f"synfer, CFG {args.cfg:g}, AU 0 (same work)": ours(cfg_scale=args.cfg, au_scale=0.0),
        f"synfer, CFG {args.cfg:g} + AU 1": ours(cfg_scale=args.cfg, au_scale=1.0),
        f"synfer, CFG {args.cfg:g} + AU 1 + SG {args.sg_scale:g}": ours(cfg_scale=args.cfg, au_scale=1.0,
                                                                         sg_scale=args.sg_scale),
    }
    best, peak = time_runs(runs, args.repeats, device)
    parts = time_runs(sg_step_parts(sampler, requests, device), args.repeats, device)
    return best, peak, size, parts


def time_runs(runs: dict, repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, int | None]]:
    """Best seconds and peak MiB (CUDA) of each callable, after one warm-up each, interleaved."""
    best = dict.fromkeys(runs, float("inf"))
    peak: dict[str, int | None] = dict.fromkeys(runs)
    for run in runs.values():
        run()  # warm-up: kernels, allocator, cuDNN's choices
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
            if device.type == "cuda":
                peak[name] = max(peak[name] or 0, torch.cuda.max_memory_allocated(device) // 2**20)
    return best, peak


def sg_step_parts(sampler: GuidedSampler, requests: list, device: torch.device) -> dict:
    """The pieces of one guided step on this batch, each alone, to say where SG's time goes: the CFG
    pass every step makes, and the UNet, the VAE decoder and the guide each forward and backward as
    semantic guidance runs them (synfer_ray.generator.guidance.semantic_guidance_step)."""
    import numpy as np
    import torch.nn.functional as F
    bundle, batch = sampler.bundle, len(requests)
    generator = torch.Generator().manual_seed(0)
    side = bundle.unet.config.sample_size
    latents = torch.randn(batch, bundle.unet.config.in_channels, side, side, generator=generator).to(device)
    t = torch.tensor(500, device=device)
    text = sampler.encode_prompts([r.prompt for r in requests])
    aus = sampler.au_tokens(np.stack([np.asarray(r.aus, np.float32) for r in requests])).float()
    text_uncond = sampler.unconditional_text(batch)
    aus_uncond = bundle.au_adapter.unconditional(batch, device, sampler.dtype)
    targets = torch.tensor([sampler.sg_classes.index(r.target) for r in requests], device=device)

    def cfg_pass():
        with torch.no_grad():
            sampler.model_output(torch.cat([latents, latents]), t, torch.cat([text_uncond, text]),
                                 torch.cat([aus_uncond, aus]), 1.0)

    def unet_with_gradients():
        steered = text.detach().requires_grad_(True)
        sampler.model_output(latents, t, steered, aus, 1.0).sum().backward()

    def decoder_with_gradients():
        x0 = latents.detach().requires_grad_(True)
        sampler.decode(x0).float().sum().backward()

    images = sampler.decode(latents).float().detach()

    def guide_with_gradients():
        pixels = images.detach().requires_grad_(True)
        F.cross_entropy(sampler.sg_classifier(pixels).float(), targets).backward()

    return {"CFG pass (2 x batch, no gradients)": cfg_pass,
            "UNet forward + backward (batch)": unet_with_gradients,
            "VAE decoder forward + backward (batch)": decoder_with_gradients,
            "guide forward + backward (batch)": guide_with_gradients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--precision", default="fp16", choices=list(DTYPES))
    parser.add_argument("--arch", default="sd15", help="random-weight bundle architecture: sd15, sd21, tiny")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--bundle", type=Path, help="an existing bundle instead of a random one")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=7.5, help="CFG scale of the reference and of our CFG rows")
    parser.add_argument("--sg-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", type=int, default=6,
                        help="pipeline shards of 2 batches each (and a third as many for the start-up run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device here; use --device cpu "
                         "--precision bf16 --arch tiny --resolution 48 for a dry run")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    bundle_path = args.bundle
    scratch = None
    if bundle_path is None:
        scratch = Path(tempfile.mkdtemp(prefix="bench-gpu-bundle-"))
        bundle_path = scratch / args.arch
        began = time.perf_counter()
        make_bundle(bundle_path, args.arch, args.resolution, dtype)
        print(f"made a random {args.arch} bundle at {args.resolution}px in {time.perf_counter() - began:.0f} s",
              flush=True)
    best, peak, size, (part_seconds, part_peak) = time_samplers(bundle_path, args, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the samplers' models are gone: the pipeline's actors get the GPU
    rates = {name: args.batch / seconds for name, seconds in best.items()}
    reference, _, same_work, cfg_au, sg = list(best)
    steady, end_to_end, pipeline_mib = run_pipeline(bundle_path, args, device)
    pipeline = f"Ray Data pipeline (CFG {args.cfg:g} + AU 1, labels, writes)"
    rates[pipeline] = steady
    peak[pipeline] = pipeline_mib

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} torch threads"
    print(f"{args.arch} bundle {bundle_path} ({size}x{size}), {args.precision}, {name}; batch {args.batch}, "
          f"{args.steps} DDIM steps, best of {args.repeats}")
    print(f"{'configuration':48s} {'images/s':>9s} {'vs diffusers':>13s} {'peak MiB':>9s}")
    for label, rate in rates.items():
        memory = "-" if peak[label] is None else f"{peak[label]}{'*' if label == pipeline else ''}"
        print(f"{label:48s} {rate:9.3f} {rate / rates[reference]:12.2f}x {memory:>9s}")
    print(f"pipeline: marginal rate of {args.shards} shards over {max(1, args.shards // 3)}; end to end (actor "
          f"start-up, model loading, card) {end_to_end:.3f} images/s; * = nvidia-smi's rise (other processes)")
    checks = [("same work as diffusers (CFG, AU scale 0, SG off) vs diffusers", rates[same_work] / rates[reference],
               ">=", TARGETS["same work"]),
              ("pipeline (marginal rate) vs our sampler alone (CFG + AU)", rates[pipeline] / rates[cfg_au],
               ">=", TARGETS["pipeline"]),
              ("SG time vs CFG + AU time", best[sg] / best[cfg_au], "<=", TARGETS["sg"])]
    for label, ratio, sense, target in checks:
        met = ratio >= target if sense == ">=" else ratio <= target
        print(f"target: {label}: {ratio:.2f}x ({sense} {target}) {'met' if met else 'NOT MET'}")
    cfg_pass = next(iter(part_seconds.values()))
    print(f"one guided step's parts, best of {args.repeats} (ms; x the CFG pass every step makes; peak MiB):")
    for label, seconds in part_seconds.items():
        memory = "-" if part_peak[label] is None else part_peak[label]
        print(f"  {label:44s} {seconds * 1000:9.1f} {seconds / cfg_pass:7.2f}x {memory:>9}")
    for line in sg_cost_lines(bundle_path, args, device, dtype, size):
        print(line, flush=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def sg_cost_lines(bundle_path: Path, args, device: torch.device, dtype: torch.dtype, size: int) -> list[str]:
    """What SG costs with each guide on this bundle, batch and steps (sg_cost.py), at window 0.4."""
    import sg_cost
    if device.type == "cuda":
        torch.cuda.empty_cache()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-sg-cost-"))
    guide = sg_cost.random_latent_guide(bundle_path, work / "latent-guide")
    sampler = GuidedSampler(load_bundle(bundle_path, dtype=dtype, sg_latent_guide=guide).to(device))
    requests = sg_cost.requests_for(sampler.bundle, args.batch)
    modes = list(sg_cost.MODES)
    times = sg_cost.step_times(sampler, requests, modes, args.sg_scale, args.repeats, lambda: synchronize(device))
    if device.type == "cuda":
        peaks = {mode: sg_cost.cuda_peak(sampler, requests, mode, args.sg_scale) for mode in [sg_cost.CFG, *modes]}
    else:
        del sampler
        peaks = {mode: sg_cost.cpu_peak(bundle_path, guide, mode, args.batch, args.sg_scale, args.threads)
                 for mode in [sg_cost.CFG, *modes]}
    shutil.rmtree(work, ignore_errors=True)
    label = f"{args.arch}-{size}-{args.precision}"
    return [f"semantic guidance by guide, batch {args.batch}, SG {args.sg_scale:g} on the AU tokens:",
            *sg_cost.report(label, times, peaks, args.steps, 0.4)]


if __name__ == "__main__":
    main()
