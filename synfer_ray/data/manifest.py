"""The seeded manifest: row ``i`` of a dataset (seed, target, AUs, prompt) as a pure function of ``i``.

Nothing is materialised: a shard asks for its index range, so ten million rows never sit in
memory and row ``i`` is the same on every run and every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synfer_ray import taxonomy

# Seeds stay below 2**63 so they fit Parquet's int64 and torch.Generator.manual_seed.
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class ManifestSpec:
    """What decides every row: the dataset seed, the classes and their mix, the AU space and jitter."""

    seed: int
    classes: tuple[str, ...]
    class_weights: tuple[float, ...]
    au_names: tuple[str, ...]
    au_jitter: float = 0.1
    extra_au_probability: float = 0.05
    extra_au_max: float = 0.3
    # "sampled": each row draws its class from the mix; "cycled": row i gets class i mod K, so every
    # prefix of the dataset has equal numbers per class (what a study compares).
    class_assignment: str = "sampled"
    # A top-up pass (data/passes.py): rows from ``quota_start`` on take their class from ``quotas``.
    quotas: tuple[tuple[str, int], ...] = ()
    quota_start: int = 0
    caption_style: str = "attributes"  # the bundle's (BundleManifest.caption_style)


@dataclass(frozen=True)
class ManifestRow:
    sample_id: int
    seed: int
    target: str
    aus: np.ndarray
    prompt: str


def row_seed(dataset_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for row ``index``, independent across rows and datasets."""
    state = np.random.SeedSequence(entropy=dataset_seed, spawn_key=(index,)).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & _SEED_MASK)


def manifest_row(spec: ManifestSpec, index: int) -> ManifestRow:
    seed = row_seed(spec.seed, index)
    if spec.quotas:
        from synfer_ray.data.passes import quota_target
        target = quota_target(spec.quotas, index - spec.quota_start)
    elif spec.class_assignment == "cycled":
        target = spec.classes[index % len(spec.classes)]
    else:
        target = taxonomy.sample_expression(seed, spec.classes, np.asarray(spec.class_weights))
    aus = taxonomy.sample_target_aus(seed, target, spec.au_names, jitter=spec.au_jitter,
                                     extra_au_probability=spec.extra_au_probability,
                                     extra_au_max=spec.extra_au_max)
    return ManifestRow(sample_id=index, seed=seed, target=target, aus=aus,
                       prompt=taxonomy.build_prompt(seed, target, style=spec.caption_style))


def manifest_rows(spec: ManifestSpec, start: int, stop: int) -> list[ManifestRow]:
    return [manifest_row(spec, index) for index in range(start, stop)]
