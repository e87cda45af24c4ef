"""Sampler throughput, precision and schedulers, in one run.

    python benchmarks/bench_sampler.py [--bundle PATH] [--batch 16] [--steps 20] [--repeats 3]
                                       [--evaluator PATH --per-class 20]

1. Images/s for no guidance, CFG and CFG+SG, as ratios to diffusers' own StableDiffusionPipeline
   (DDIM, CFG) on the same bundle, batch size and steps.
2. bf16 weights against fp32 (CFG 3, and CFG 3 + SG): images/s ratio and the largest pixel
   difference on the same rows.
3. Each fast scheduler (DPM-Solver++ 2M, UniPC, Euler) at ``--fast-steps`` against DDIM at
   ``--steps``: images/s ratio.
4. With ``--evaluator`` (a FER classifier trained on real faces that does not guide): how often it
   agrees with the asked class, ``--per-class`` samples per class (CFG 3 + the bundle's SG scale
   ``--sg``), for DDIM at ``--quality-steps`` in fp32 (the reference), bf16, and every fast
   scheduler at ``--fast-steps``.

Without --bundle a tiny bundle is made in a temporary directory. Each timed configuration runs
``repeats`` times, interleaved, and the best time is kept (this machine is noisy).

    python benchmarks/bench_sampler.py --sg-cost [--sg-batch 2] [--sg-resolution 256]

5. Instead of the above, what semantic guidance costs with each guide (``sg_cost.py``): on an
   ``sd15``-shaped random-weight bundle at ``--sg-resolution``, made in a temporary directory, and on
   the shipped ``models/faces-48``: a guided step's time and a whole sample's (``--sg-steps`` steps,
   the last ``--sg-window`` guided) as ratios to CFG + AU, and peak RSS. One line per guide:
   ``sg cost <bundle> <guide>: time 1.42x, peak memory 1.21x of CFG + AU``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synfer_ray import taxonomy
from synfer_ray.bundle import load_bundle, make_tiny_bundle
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings

FAST = ("dpmpp_2m", "unipc", "euler")


def requests_for(bundle, count: int, seed: int = 0) -> list[SampleRequest]:
    classes = bundle.classes
    return [SampleRequest(seed=seed + i, prompt=taxonomy.build_prompt(seed + i, classes[i % len(classes)]),
                          aus=taxonomy.sample_target_aus(seed + i, classes[i % len(classes)], bundle.au_names).tolist(),
                          target=classes[i % len(classes)]) for i in range(count)]


def best_times(runs: dict, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def agreement(sampler: GuidedSampler, evaluator, settings: SamplerSettings, per_class: int) -> tuple[float, np.ndarray]:
    from synfer_ray.classifiers import predict_probabilities
    from synfer_ray.train.generator_report import agreement_by_class, sample_grid_requests
    requests = sample_grid_requests(sampler.bundle.classes, sampler.bundle.au_names, per_class, seed=10_000)
    images = np.concatenate([sampler.generate(requests[i:i + 28], settings) for i in range(0, len(requests), 28)])
    shares = agreement_by_class(predict_probabilities(evaluator, images), [r.target for r in requests],
                                evaluator.classes)
    return shares["overall"], images


def sg_cost_lines(args) -> None:
    """Part 5: the SG cost of each guide on an SD 1.5-shaped bundle and on faces-48 (sg_cost.py)."""
    import sg_cost
    from synfer_ray.bundle import make_random_bundle

    work = Path(tempfile.mkdtemp(prefix="sg-cost-"))
    sd15 = work / f"sd15-{args.sg_resolution}"
    make_random_bundle(sd15, "sd15", resolution=args.sg_resolution)
    shipped = Path(__file__).resolve().parents[1] / "models" / "faces-48"
    print(f"batch {args.sg_batch}, CFG 3, SG {args.sg_scale:g} on the AU tokens, {args.threads} torch threads, "
          f"best of {args.sg_repeats}; peak memory = peak RSS of a fresh process (models included)")
    for label, path in ((f"sd15-{args.sg_resolution}", sd15), ("faces-48", shipped)):
        if not path.is_dir():
            print(f"{label}: not found at {path}, skipped")
            continue
        guide = sg_cost.random_latent_guide(path, work / f"{label}-latent-guide")
        sampler = GuidedSampler(load_bundle(path, sg_latent_guide=guide))
        requests = sg_cost.requests_for(sampler.bundle, args.sg_batch)
        started = time.perf_counter()
        parts = args.sg_parts.split(",")
        times = sg_cost.step_times(sampler, requests, list(sg_cost.MODES), args.sg_scale, args.sg_repeats) \
            if "time" in parts else None
        del sampler
        peaks = {mode: sg_cost.cpu_peak(path, guide, mode, args.sg_batch, args.sg_scale, args.threads)
                 for mode in [sg_cost.CFG, *sg_cost.MODES]} if "memory" in parts else None
        for line in sg_cost.report(label, times, peaks, args.sg_steps, args.sg_window):
            print(line, flush=True)
        print(f"  ({label} measured in {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fast-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sg", type=float, default=3.0)
    parser.add_argument("--evaluator", type=Path)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--quality-steps", type=int, default=25)
    parser.add_argument("--sg-cost", action="store_true", help="measure only what SG costs with each guide")
    parser.add_argument("--sg-batch", type=int, default=2)
    parser.add_argument("--sg-resolution", type=int, default=256)
    parser.add_argument("--sg-steps", type=int, default=25)
    parser.add_argument("--sg-window", type=float, default=0.4)
    parser.add_argument("--sg-scale", type=float, default=8.0)
    parser.add_argument("--sg-repeats", type=int, default=1)
    parser.add_argument("--sg-parts", default="time,memory", help="time, memory or both (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sg_cost:
        sg_cost_lines(args)
        return
    bundle_path = args.bundle
    if bundle_path is None:
        bundle_path = Path(tempfile.mkdtemp()) / "tiny"
        make_tiny_bundle(bundle_path)
    bundle = load_bundle(bundle_path)
    sampler = GuidedSampler(bundle)
    half = GuidedSampler(load_bundle(bundle_path, dtype=torch.bfloat16))
    size = bundle.manifest.resolution
    requests = requests_for(bundle, args.batch)
    steps = args.steps

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(bundle_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_cfg():
        pipe([r.prompt for r in requests], num_inference_steps=steps, guidance_scale=3.0, height=size,
             width=size, generator=[torch.Generator().manual_seed(r.seed) for r in requests], output_type="np")

    cfg, sg = SamplerSettings(steps=steps), SamplerSettings(steps=steps, sg_scale=args.sg)
    runs = {
        "diffusers SD pipeline, CFG 3": diffusers_cfg,
        "synfer, no guidance": lambda: sampler.generate(requests, SamplerSettings(steps=steps, cfg_scale=1.0)),
        "synfer, CFG 3 (text+AU)": lambda: sampler.generate(requests, cfg),
        "synfer, CFG 3 + SG": lambda: sampler.generate(requests, sg),
        "synfer bf16, CFG 3 (text+AU)": lambda: half.generate(requests, cfg),
        "synfer bf16, CFG 3 + SG": lambda: half.generate(requests, sg),
        **{f"synfer {name} {args.fast_steps} steps, CFG 3": (
            lambda name=name: sampler.generate(requests, SamplerSettings(steps=args.fast_steps, scheduler=name)))
           for name in FAST},
    }
    best = best_times(runs, args.repeats)
    rate = {name: args.batch / seconds for name, seconds in best.items()}
    reference = rate["diffusers SD pipeline, CFG 3"]
    print(f"bundle {bundle_path} ({size}x{size}), batch {args.batch}, {steps} steps (fast schedulers "
          f"{args.fast_steps}), {args.threads} torch threads, best of {args.repeats}")
    print(f"{'configuration':34s} {'images/s':>9s} {'vs diffusers':>13s}")
    for name, value in rate.items():
        print(f"{name:34s} {value:9.2f} {value / reference:12.2f}x")

    print()
    for label, settings, key in (("CFG 3", cfg, "CFG 3 (text+AU)"), (f"CFG 3 + SG {args.sg:g}", sg, "CFG 3 + SG")):
        difference = np.abs(sampler.generate(requests, settings).astype(int)
                            - half.generate(requests, settings).astype(int))
        print(f"bf16 vs fp32, {label}: {rate[f'synfer bf16, {key}'] / rate[f'synfer, {key}']:.2f}x images/s, "
              f"max pixel difference {difference.max()}/255, mean {difference.mean():.2f}")
    ddim = rate["synfer, CFG 3 (text+AU)"]
    for name in FAST:
        print(f"{name} at {args.fast_steps} steps vs DDIM at {steps}: "
              f"{rate[f'synfer {name} {args.fast_steps} steps, CFG 3'] / ddim:.2f}x images/s")

    if args.evaluator:
        from synfer_ray.models import load_classifier
        evaluator = load_classifier(args.evaluator, field="--evaluator")
        print(f"\nevaluator agreement with the asked class ({args.evaluator}, {args.per_class} per class, "
              f"CFG 3, SG {args.sg:g}):")
        reference_share, reference_images = agreement(
            sampler, evaluator, SamplerSettings(steps=args.quality_steps, sg_scale=args.sg), args.per_class)
        print(f"  DDIM {args.quality_steps} steps fp32: {100 * reference_share:.1f}%")
        share, images = agreement(half, evaluator, SamplerSettings(steps=args.quality_steps, sg_scale=args.sg),
                                  args.per_class)
        difference = np.abs(images.astype(int) - reference_images.astype(int))
        print(f"  DDIM {args.quality_steps} steps bf16: {100 * share:.1f}% (max pixel difference to fp32 "
              f"{difference.max()}/255, mean {difference.mean():.2f})")
        for name in FAST:
            share, _ = agreement(sampler, evaluator, SamplerSettings(steps=args.fast_steps, scheduler=name,
                                                                     sg_scale=args.sg), args.per_class)
            print(f"  {name} {args.fast_steps} steps fp32: {100 * share:.1f}%")


if __name__ == "__main__":
    main()
