"""A few images of one expression, written as PNGs with their provenance: for quick looks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from synfer_ray import taxonomy
from synfer_ray.bundle import Bundle, load_bundle
from synfer_ray.config import DEFAULT_SG_TARGET
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
from synfer_ray.errors import SynferError
from synfer_ray.images import png_bytes, read_rgb
from synfer_ray.precision import name_of


def expression_requests(bundle: Bundle, expression: str, aus: Mapping[str, float] | None, prompt: str | None,
                        seed: int, n: int, reference_image: np.ndarray | None = None,
                        aus_field: str = "aus") -> tuple[str, list[SampleRequest]]:
    """The rows of a quick look or an API call: seeds ``seed .. seed + n - 1``, the class prototype
    AUs unless ``aus`` is given, a prompt sampled from each seed unless ``prompt`` is given."""
    target = taxonomy.canonical_expression(expression, bundle.classes, field="expression")
    if aus:
        au_vector = taxonomy.ActionUnits.from_mapping(aus, bundle.au_names, field=aus_field).as_array()
    else:
        au_vector = taxonomy.prototype_aus(target, bundle.au_names)
    style = bundle.manifest.caption_style
    return target, [SampleRequest(seed=seed + k, prompt=prompt or taxonomy.build_prompt(seed + k, target, style=style),
                                  aus=au_vector.tolist(), target=target, reference=reference_image)
                    for k in range(n)]


def generate_pngs(bundle_path: Path, expression: str, out: Path, *, aus: Mapping[str, float] | None = None,
                  prompt: str | None = None, seed: int = 0, n: int = 4, steps: int = 25,
                  cfg_scale: float = 3.0, au_scale: float = 1.0, sg_scale: float = 0.0,
                  sg_window: float = 0.4, sg_target: str = DEFAULT_SG_TARGET, sg_adaptive: bool = False,
                  sg_classifier: Path | None = None, sg_guide: str = "pixels", sg_reuse_pass: bool = False,
                  sg_checkpointing: bool = False, sg_latent_guide: Path | None = None,
                  reference: Path | None = None, scheduler: str = "ddim", precision: str = "auto",
                  device: str = "cpu") -> list[Path]:
    """Write ``n`` PNGs (seeds ``seed`` .. ``seed + n - 1``) and one ``<name>.json`` beside each."""
    import torch

    from synfer_ray.precision import resolve
    settings = SamplerSettings(steps=steps, cfg_scale=cfg_scale, au_scale=au_scale, sg_scale=sg_scale,
                               sg_window=sg_window, scheduler=scheduler, sg_target=sg_target,
                               sg_adaptive=sg_adaptive, sg_guide=sg_guide, sg_reuse_pass=sg_reuse_pass,
                               sg_checkpointing=sg_checkpointing)
    if device not in ("cpu", "cuda"):
        raise SynferError("--device", device, "cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SynferError("--device", device, "cpu on a machine without CUDA")
    dtype = resolve(precision, device, field="--precision")
    bundle = load_bundle(bundle_path, sg_classifier=sg_classifier, sg_latent_guide=sg_latent_guide,
                         dtype=dtype).to(device)
    reference_image = read_rgb(reference, bundle.manifest.resolution, "--reference") if reference else None
    target, requests = expression_requests(bundle, expression, aus, prompt, seed, n, reference_image,
                                          aus_field="--au")
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
            "bundle_hash": bundle.content_hash, "settings": settings.__dict__,
            "precision": name_of(dtype)}, indent=2))
        written.append(stem.with_suffix(".png"))
    return written
