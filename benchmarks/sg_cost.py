"""What semantic guidance costs, per guide, as ratios to CFG + AU on the same bundle, batch and steps.

Shared by ``bench_sampler.py --sg-cost`` (CPU) and ``bench_gpu.py`` (CUDA). Each guide mode is a set of
sampler settings (``sg_guide``, ``sg_reuse_pass``, ``sg_checkpointing``). Time: a CFG + AU step and a
guided step are each timed inside one sampling loop (1 and 2 CFG steps, then 1 CFG + 1 guided step,
best of ``repeats``, modes interleaved), and the whole sample at ``steps`` steps with the last
``window`` of them guided follows from those. Peak memory: on CUDA the allocator's peak of one such
sample; on CPU the peak RSS of a fresh process while it samples, after loading the bundle (models
included, as a user's worker holds them).

    python benchmarks/sg_cost.py --child '{"bundle": ..., "mode": ..., ...}'   # one CPU memory reading
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from synfer_ray import taxonomy
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings

# Guide mode -> the sampler settings it changes (the rest as CFG + AU + SG on the AU tokens).
MODES = {
    "pixels": {},
    "pixels+reuse": {"sg_reuse_pass": True},
    "pixels+checkpointing": {"sg_checkpointing": True},
    "latents": {"sg_guide": "latents"},
    "latents+reuse": {"sg_guide": "latents", "sg_reuse_pass": True},
    "latents+reuse+checkpointing": {"sg_guide": "latents", "sg_reuse_pass": True, "sg_checkpointing": True},
}
CFG = "CFG + AU"


def requests_for(bundle, count: int, seed: int = 0) -> list[SampleRequest]:
    classes = bundle.classes
    return [SampleRequest(seed=seed + i, prompt=taxonomy.build_prompt(seed + i, classes[i % len(classes)]),
                          aus=taxonomy.sample_target_aus(seed + i, classes[i % len(classes)], bundle.au_names).tolist(),
                          target=classes[i % len(classes)]) for i in range(count)]


def random_latent_guide(bundle_path: Path, directory: Path) -> Path:
    """A latent guide of the bundle's latent shape with seeded random weights, saved: its cost is
    that of a trained one (the weights do not change the arithmetic)."""
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.generator.latent_guide import LatentGuide
    torch.manual_seed(0)
    unet = json.loads((Path(bundle_path) / "unet" / "config.json").read_text())
    guide = LatentGuide(classes=list(BundleManifest.read(Path(bundle_path)).classes),
                        latent_channels=unet["in_channels"], latent_size=unet["sample_size"])
    guide.save_pretrained(directory)
    return directory


def settings_for(mode: str, sg_scale: float) -> SamplerSettings:
    base = SamplerSettings(steps=2, cfg_scale=3.0, sg_scale=sg_scale, sg_target="au")
    return replace(base, **MODES[mode]) if mode != CFG else replace(base, sg_scale=0.0)


def _sample(sampler: GuidedSampler, requests, settings: SamplerSettings, sync) -> float:
    start = time.perf_counter()
    sampler.sample_latents(requests, settings)
    sync()
    return time.perf_counter() - start


def step_times(sampler: GuidedSampler, requests, modes, sg_scale: float, repeats: int, sync=lambda: None) -> dict:
    """{"cfg_step": s, "overhead": s, mode: guided step s}: best of ``repeats``, modes interleaved."""
    cfg = settings_for(CFG, 0.0)
    runs = {"one": replace(cfg, steps=1), "two": cfg,
            **{mode: replace(settings_for(mode, sg_scale), sg_window=0.5) for mode in modes}}
    best = dict.fromkeys(runs, math.inf)
    # Warm-up: the first CFG step and the first guided step (kernels, allocator); the rest are alike.
    for name in ("two", modes[0]):
        _sample(sampler, requests, runs[name], sync)
    for _ in range(repeats):
        for name, settings in runs.items():
            best[name] = min(best[name], _sample(sampler, requests, settings, sync))
    cfg_step = best["two"] - best["one"]
    overhead = best["one"] - cfg_step
    return {"cfg_step": cfg_step, "overhead": overhead,
            **{mode: best[mode] - overhead - cfg_step for mode in modes}}


def sample_ratio(times: dict, mode: str, steps: int, window: float) -> float:
    """A whole sample with SG over the last ``window`` of ``steps``, against the same sample with CFG + AU."""
    guided = math.ceil(window * steps)
    cfg = steps * times["cfg_step"] + times["overhead"]
    return ((steps - guided) * times["cfg_step"] + guided * times[mode] + times["overhead"]) / cfg


def cuda_peak(sampler: GuidedSampler, requests, mode: str, sg_scale: float) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sampler.sample_latents(requests, replace(settings_for(mode, sg_scale), sg_window=0.5))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def cpu_peak(bundle: Path, latent_guide: Path, mode: str, batch: int, sg_scale: float, threads: int) -> float:
    """Peak RSS (GiB) of a fresh process that loads the bundle and makes one sample in ``mode``."""
    child = {"bundle": str(bundle), "latent_guide": str(latent_guide), "mode": mode, "batch": batch,
             "sg_scale": sg_scale, "threads": threads}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(child)], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode:
        raise RuntimeError(f"memory reading of {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_gib"]


def report(label: str, times: dict | None, peaks: dict | None, steps: int, window: float) -> list[str]:
    """The lines the issue asks for, one per guide mode, then the figures behind them (a part not
    measured, time or memory, reads "-")."""
    lines = []
    for mode in MODES:
        time_ratio = f"{sample_ratio(times, mode, steps, window):.2f}x" if times else "-"
        memory_ratio = f"{peaks[mode] / peaks[CFG]:.2f}x" if peaks else "-"
        lines.append(f"sg cost {label} {mode}: time {time_ratio}, peak memory {memory_ratio} of CFG + AU")
    cfg_time = f"{times['cfg_step']:.3f} s" if times else "-"
    cfg_peak = f"{peaks[CFG]:.2f} GiB" if peaks else "-"
    lines.append(f"  {label}: CFG + AU step {cfg_time}, peak {cfg_peak}; whole sample = {steps} steps, "
                 f"SG over the last {window:g}")
    for mode in MODES:
        step = f"{times[mode]:.3f} s ({times[mode] / times['cfg_step']:.2f}x a CFG + AU step)" if times else "-"
        peak = f"{peaks[mode]:.2f} GiB" if peaks else "-"
        lines.append(f"  {label} {mode}: guided step {step}, peak {peak}")
    return lines


def _child(spec: dict) -> None:
    from synfer_ray.bundle import load_bundle
    torch.set_num_threads(spec["threads"])
    bundle = load_bundle(spec["bundle"], sg_latent_guide=spec["latent_guide"])
    sampler = GuidedSampler(bundle)
    requests = requests_for(bundle, spec["batch"])
    settings = settings_for(spec["mode"], spec["sg_scale"])
    # Loading casts the stored fp16 weights to fp32 and briefly holds both: a peak of its own, above
    # sampling's. Reset the high-water mark (Linux: clear_refs 5) so it reads sampling's peak, the
    # models' resident weights included.
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    sampler.sample_latents(requests, replace(settings, sg_window=0.5))
    print(json.dumps({"peak_gib": _high_water_kib() / 2**20}))


def _high_water_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", required=True, help="JSON: bundle, latent_guide, mode, batch, sg_scale, threads")
    _child(json.loads(parser.parse_args().child))
