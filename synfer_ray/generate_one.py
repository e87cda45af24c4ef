"""A few images of one expression, written as PNGs with their provenance: for quick looks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from synfer_ray import taxonomy
from synfer_ray.bundle import load_bundle
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
from synfer_ray.images import png_bytes, read_rgb


def generate_pngs(bundle_path: Path, expression: str, out: Path, *, aus: Mapping[str, float] | None = None,
                  prompt: str | None = None, seed: int = 0, n: int = 4, steps: int = 25,
                  cfg_scale: float = 3.0, au_scale: float = 1.0, sg_scale: float = 0.0,
                  sg_window: float = 0.4, sg_classifier: Path | None = None,
                  reference: Path | None = None) -> list[Path]:
    """Write ``n`` PNGs (seeds ``seed`` .. ``seed + n - 1``) and one ``<name>.json`` beside each."""
    settings = SamplerSettings(steps=steps, cfg_scale=cfg_scale, au_scale=au_scale, sg_scale=sg_scale,
                               sg_window=sg_window)
    bundle = load_bundle(bundle_path, sg_classifier=sg_classifier)
    target = taxonomy.canonical_expression(expression, bundle.classes)
    if aus:
        au_vector = taxonomy.ActionUnits.from_mapping(aus, bundle.au_names, field="--au").as_array()
    else:
        au_vector = taxonomy.prototype_aus(target, bundle.au_names)
    reference_image = read_rgb(reference, bundle.manifest.resolution, "--reference") if reference else None
    requests = [SampleRequest(seed=seed + k, prompt=prompt or taxonomy.build_prompt(seed + k, target),
                              aus=au_vector.tolist(), target=target, reference=reference_image)
                for k in range(n)]
    sampler = GuidedSampler(bundle)
    sampler.check(requests, settings)  # all inputs checked before the first write
    images = sampler.generate(requests, settings)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for request, image in zip(requests, images):
        stem = out / f"{target}_seed{request.seed}"
        stem.with_suffix(".png").write_bytes(png_bytes(image))
        stem.with_suffix(".json").write_text(json.dumps({
            "seed": request.seed, "prompt": request.prompt, "target": target,
            "aus": dict(zip(bundle.au_names, map(float, request.aus))),
            "reference": str(reference) if reference else None,
            "bundle_hash": bundle.content_hash, "settings": settings.__dict__}, indent=2))
        written.append(stem.with_suffix(".png"))
    return written
