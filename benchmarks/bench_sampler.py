"""Sampler throughput: images/s for no guidance, CFG and CFG+SG, as ratios to diffusers' own
StableDiffusionPipeline (DDIM, CFG) on the same bundle, batch size and steps, in one run.

    python benchmarks/bench_sampler.py [--bundle PATH] [--batch 16] [--steps 20] [--repeats 3]

Without --bundle a tiny bundle is made in a temporary directory. Each configuration is timed
``repeats`` times, interleaved, and the best time is kept (this machine is noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from synfer_ray import taxonomy
from synfer_ray.bundle import load_bundle, make_tiny_bundle
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle_path = args.bundle
    if bundle_path is None:
        bundle_path = Path(tempfile.mkdtemp()) / "tiny"
        make_tiny_bundle(bundle_path)
    bundle = load_bundle(bundle_path)
    sampler = GuidedSampler(bundle)
    size = bundle.manifest.resolution
    classes = bundle.classes
    requests = [SampleRequest(seed=i, prompt=taxonomy.build_prompt(i, classes[i % len(classes)]),
                              aus=taxonomy.sample_target_aus(i, classes[i % len(classes)], bundle.au_names).tolist(),
                              target=classes[i % len(classes)]) for i in range(args.batch)]

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(bundle_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_cfg():
        pipe([r.prompt for r in requests], num_inference_steps=args.steps, guidance_scale=3.0, height=size,
             width=size, generator=[torch.Generator().manual_seed(r.seed) for r in requests], output_type="np")

    runs = {
        "diffusers SD pipeline, CFG 3": diffusers_cfg,
        "synfer, no guidance": lambda: sampler.generate(requests, SamplerSettings(steps=args.steps, cfg_scale=1.0)),
        "synfer, CFG 3 (text+AU)": lambda: sampler.generate(requests, SamplerSettings(steps=args.steps)),
        "synfer, CFG 3 + SG": lambda: sampler.generate(requests, SamplerSettings(steps=args.steps, sg_scale=3.0)),
    }
    best = dict.fromkeys(runs, float("inf"))
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    reference = args.batch / best["diffusers SD pipeline, CFG 3"]
    print(f"bundle {bundle_path} ({size}x{size}), batch {args.batch}, {args.steps} DDIM steps, "
          f"{args.threads} torch threads, best of {args.repeats}")
    print(f"{'configuration':34s} {'images/s':>9s} {'vs diffusers':>13s}")
    for name, seconds in best.items():
        rate = args.batch / seconds
        print(f"{name:34s} {rate:9.2f} {rate / reference:12.2f}x")


if __name__ == "__main__":
    main()
