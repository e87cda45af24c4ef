"""Manifest rows -> a table of PNG images with their generation provenance (no labels yet)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pyarrow as pa

from synfer_ray.data.manifest import ManifestRow
from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
from synfer_ray.images import png_bytes
from synfer_ray.precision import name_of

# The columns generate_rows writes, in order, with what each holds (the docs' format reference).
PROVENANCE_COLUMNS: dict[str, str] = {
    "sample_id": "The row's index in the dataset's manifest: row i is the same on every run.",
    "shard": "The shard the row was written in.",
    "image": "The face, PNG bytes (RGB).",
    "width": "Image width in pixels (the bundle's resolution).",
    "height": "Image height in pixels.",
    "seed": "The row's sampling seed (initial noise); with the other settings it reproduces the image.",
    "prompt": "The text prompt the generator was conditioned on.",
    "target": "The expression asked for (class name).",
    "target_index": "The index of `target` in the bundle's classes.",
    "au_names": "The names of the action units in `aus`, in order.",
    "aus": "The action-unit intensities (0-1) the generator was conditioned on.",
    "steps": "Sampling steps.",
    "cfg_scale": "Classifier-free guidance scale on the text.",
    "au_scale": "Guidance scale on the AU tokens.",
    "sg_scale": "The row's own semantic-guidance scale (percent of the steered norm; 0: unguided).",
    "sg_window": "The fraction of the last sampling steps that semantic guidance acted on.",
    "sg_target": "What semantic guidance steered: text, au or both.",
    "sg_adaptive": "Whether each guided step was scaled by 1 - p(target).",
    "sg_guide": "What the guide of each guided step read: pixels (the decoded image) or latents (the "
                "predicted clean latent).",
    "sg_reuse_pass": "Whether each guided step took the guide's UNet pass as its conditional half (the move "
                     "acting from the next step on) instead of a fresh pass after the move.",
    "scheduler": "The diffusers scheduler that sampled the row.",
    "precision": "The generator's weight dtype (fp32, bf16, fp16).",
    "bundle_hash": "Content hash of the generator bundle that made the row.",
}

ENCODE_THREADS = 2  # enough to hide 8 PNGs of 512x512 behind one batch's sampling on an H200


def generate_rows(sampler: GuidedSampler, rows: Sequence[ManifestRow], settings: SamplerSettings,
                  batch_size: int, shard: int = 0) -> pa.Table:
    """Sample ``rows`` in consecutive batches of ``batch_size`` (so a row's batch, and therefore its
    bytes, depend only on its position in the shard) and return one table row per image."""
    bundle = sampler.bundle
    # A batch's PNGs are encoded while the next batch samples: at 512x512 one PNG takes 30-120 ms of
    # CPU (zlib), so 8 of them encoded in turn would leave a GPU idle for up to a second per batch.
    # Pillow's encoder releases the GIL; the bytes are those of encoding in turn.
    with ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="png") as encoder:
        encoded = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            requests = [SampleRequest(seed=r.seed, prompt=r.prompt, aus=r.aus.tolist(), target=r.target)
                        for r in chunk]
            encoded.extend(encoder.submit(png_bytes, image) for image in sampler.generate(requests, settings))
        images = [future.result() for future in encoded]
    n = len(rows)
    au_names = list(bundle.au_names)
    size = bundle.manifest.resolution
    return pa.table({
        "sample_id": pa.array([r.sample_id for r in rows], pa.int64()),
        "shard": pa.array([shard] * n, pa.int32()),
        "image": pa.array(images, pa.binary()),
        "width": pa.array([size] * n, pa.int32()),
        "height": pa.array([size] * n, pa.int32()),
        "seed": pa.array([r.seed for r in rows], pa.int64()),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "target": pa.array([r.target for r in rows], pa.string()),
        "target_index": pa.array([bundle.classes.index(r.target) for r in rows], pa.int32()),
        "au_names": pa.array([au_names] * n, pa.list_(pa.string())),
        "aus": pa.array([r.aus.astype(np.float32) for r in rows], pa.list_(pa.float32())),
        "steps": pa.array([settings.steps] * n, pa.int32()),
        "cfg_scale": pa.array([settings.cfg_scale] * n, pa.float32()),
        "au_scale": pa.array([settings.au_scale] * n, pa.float32()),
        "sg_scale": pa.array([settings.sg_scale_of(r.target) for r in rows], pa.float32()),  # the row's own
        "sg_window": pa.array([settings.sg_window] * n, pa.float32()),
        "sg_target": pa.array([settings.sg_target] * n, pa.string()),
        "sg_adaptive": pa.array([settings.sg_adaptive] * n, pa.bool_()),
        "sg_guide": pa.array([settings.sg_guide] * n, pa.string()),
        "sg_reuse_pass": pa.array([settings.sg_reuse_pass] * n, pa.bool_()),
        "scheduler": pa.array([settings.scheduler] * n, pa.string()),
        "precision": pa.array([name_of(sampler.dtype)] * n, pa.string()),
        "bundle_hash": pa.array([bundle.content_hash] * n, pa.string()),
    })
