"""The quality report of a trained generator: what it makes per class, how well the VAE
reconstructs, and how often a FER classifier trained on real faces agrees with the asked class."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from synfer_ray import taxonomy
from synfer_ray.config import DIVERSITY_TOLERANCE, QualityConfig, without_added_settings
from synfer_ray.errors import SynferError
from synfer_ray.evaluate import diversity_by_class, pixel_vectors, within_class_diversity
from synfer_ray.images import png_bytes
from synfer_ray.reports import contact_sheet

if TYPE_CHECKING:
    from synfer_ray.generator.sampler import SamplerSettings


def sample_grid_requests(classes: Sequence[str], au_names: Sequence[str], per_class: int, seed: int,
                         caption_style: str = "attributes"):
    """``per_class`` requests per class with seeded prompts and prototype AUs (jittered)."""
    from synfer_ray.generator.sampler import SampleRequest
    requests = []
    for index, name in enumerate(classes):
        for k in range(per_class):
            row_seed = seed + index * per_class + k
            prompt = taxonomy.build_prompt(row_seed, name, style=caption_style)
            requests.append(SampleRequest(seed=row_seed, prompt=prompt,
                                          aus=taxonomy.sample_target_aus(row_seed, name, au_names).tolist(),
                                          target=name))
    return requests


def predicted_classes(probabilities: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Each sample's argmax class, by name."""
    return np.asarray(classes)[probabilities.argmax(axis=1)]


def agreement_by_class(predicted: np.ndarray, targets: Sequence[str]) -> dict[str, float]:
    """Share of samples whose predicted class is their target, per target class and overall."""
    targets = np.asarray(targets)
    shares = {name: float((predicted[targets == name] == name).mean()) for name in dict.fromkeys(targets)}
    shares["overall"] = float((predicted == targets).mean())
    return shares


def sample_per_class(bundle, settings, per_class: int, seed: int, batch_size: int = 32):
    """(images uint8 (N, H, W, 3), targets) with ``per_class`` seeded samples of every class."""
    from synfer_ray.generator.sampler import GuidedSampler
    requests = sample_grid_requests(bundle.classes, bundle.au_names, per_class, seed, bundle.manifest.caption_style)
    sampler = GuidedSampler(bundle)  # on the bundle's device and dtype
    images = [sampler.generate(requests[start:start + batch_size], settings)
              for start in range(0, len(requests), batch_size)]
    return np.concatenate(images), [r.target for r in requests]


def class_contact_sheet(images: np.ndarray, targets: Sequence[str], classes: Sequence[str], path: Path,
                        per_class: int) -> Path:
    """:func:`contact_sheet` of uint8 images grouped by their asked class."""
    by_class: dict[str, list[bytes]] = {}
    for image, target in zip(images, targets):
        by_class.setdefault(target, []).append(png_bytes(image))
    return contact_sheet(by_class, classes, path, per_class=min(8, per_class))


def report_device():
    """Where a report samples and scores: the driver's GPU when it has one."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reconstructions(bundle, originals: np.ndarray, path: Path, cell: int = 64) -> float:
    """Originals (top row) above their VAE reconstructions; returns the mean absolute error in [0, 1]."""
    import torch
    from synfer_ray.generator.sampler import GuidedSampler
    sampler = GuidedSampler(bundle)
    with torch.no_grad():
        decoded = sampler.decode(sampler.encode_images(originals))
    rebuilt = (decoded.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    sheet = Image.new("RGB", (len(originals) * cell, 2 * cell), "white")
    for column, (original, copy) in enumerate(zip(originals, rebuilt)):
        for row, image in enumerate((original, copy)):
            sheet.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST),
                        (column * cell, row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return float(np.abs(rebuilt.astype(np.float32) - originals.astype(np.float32)).mean() / 255)


def originals_from(faces: dict[str, Sequence], classes: Sequence[str], size: int, count: int = 16) -> np.ndarray:
    """Up to ``count`` decodable real faces (uint8 RGB) from a batch of ``image`` + ``label`` rows."""
    from synfer_ray.data.faces import decode_faces
    decoded = decode_faces({k: list(v)[:count] for k, v in faces.items()}, classes, size, soft=False, synthetic=False)
    return decoded["pixels"][decoded["valid"]]


def quality_report(bundle_path: Path, quality: QualityConfig, out: Path, originals: np.ndarray) -> dict[str, Any]:
    """Write ``contact_sheet.png``, ``reconstructions.png`` and ``quality.json`` under ``out``."""
    from synfer_ray.bundle import load_bundle
    from synfer_ray.classifiers import predict_probabilities
    from synfer_ray.models import load_classifier
    from synfer_ray.generator.sampler import SamplerSettings
    from synfer_ray.precision import resolve
    device = report_device()
    dtype = resolve(quality.precision, device, field="quality.precision")
    bundle = load_bundle(bundle_path, sg_classifier=quality.sampling.sg_classifier,
                         sg_latent_guide=quality.sampling.sg_latent_guide, dtype=dtype).to(device)
    settings = SamplerSettings.from_config(quality.sampling)
    images, targets = sample_per_class(bundle, settings, quality.samples_per_class, quality.seed)
    class_contact_sheet(images, targets, bundle.classes, out / "contact_sheet.png", quality.samples_per_class)
    error = reconstructions(bundle, originals, out / "reconstructions.png")
    metrics: dict[str, float] = {"quality_reconstruction_mae": error}
    report: dict[str, Any] = {"settings": settings.__dict__, "samples_per_class": quality.samples_per_class,
                              "reconstruction_mae": error, "evaluator": quality.evaluator}
    if quality.evaluator:
        evaluator = load_classifier(quality.evaluator, field="quality.evaluator").to(device)
        probabilities = predict_probabilities(evaluator, images)
        shares = agreement_by_class(predicted_classes(probabilities, evaluator.classes), targets)
        report["evaluator_agreement"] = shares
        report["evaluator_confidence"] = float(probabilities.max(axis=1).mean())
        metrics.update({f"quality_agreement_{name}": share for name, share in shares.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    return {"metrics": metrics, "report": report}


# Sampler settings a sweep records that were added after sweeps were first kept, each with the value
# under which it behaves as before: sweeps that differ only there pool as one.
ADDED_SWEEP_SETTINGS: dict[str, Any] = {"sg_guide": "pixels", "sg_reuse_pass": False}


def _sweep_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """A sweep's recorded settings as pooling compares them: less the added settings at their old
    values, and less sg_checkpointing, which changes no face."""
    trimmed = without_added_settings(settings or {}, ADDED_SWEEP_SETTINGS)
    trimmed.pop("sg_checkpointing", None)
    return trimmed


def guide_line(report: dict[str, Any]) -> str:
    """The guide settings a sweep ran with, in words ('' for a sweep that did not record them)."""
    settings = report.get("settings") or {}
    if "sg_guide" not in settings:
        return ""
    latents = settings["sg_guide"] == "latents"
    source = report.get("sg_latent_guide" if latents else "sg_classifier") or "the bundle's"
    guide = f"latents (latent guide: {source})" if latents else f"pixels (classifier: {source})"
    passes = ("the guide's pass as the conditional half" if settings.get("sg_reuse_pass")
              else "a fresh conditional pass after each move")
    return f"Guide: {guide}; {passes}."


def sg_sweep(bundle_path: Path, evaluator_path: str, base: SamplerSettings, targets: Sequence[str],
             scales: Sequence[float], per_class: int, seed: int, out: Path, log=print,
             sg_classifier: str | None = None, step_rules: Sequence[str] = ("fixed",),
             real_faces: str | None = None, tolerance: float = DIVERSITY_TOLERANCE,
             sg_latent_guide: str | None = None) -> dict[str, Any]:
    """Evaluator agreement (overall and per class), within-class diversity and a contact sheet for
    every (SG target, step rule, scale), all from the same seeds; scale 0 (no SG) once, shared by
    every curve. SG follows ``base.sg_guide``: pixels, read by ``sg_classifier`` (default: the
    bundle's own guide), or latents, read by ``sg_latent_guide`` (default: the bundle's
    ``sg_latent_guide/``), with ``base``'s ``sg_reuse_pass`` and ``sg_checkpointing``; the step rule is
    ``fixed`` (every sample's step the scale) or ``adaptive`` (times 1 - p(target), guidance.py).
    With ``real_faces`` (labelled Parquet), the same readings of ``per_class`` real faces per class
    (:func:`real_reference`): what agreement and diversity are on real faces. ``tolerance`` bounds the
    diversity the default rule's pick and the per-class mixes may cost (:func:`best_within_diversity`).

    Writes ``sweep.json``, ``sweep.md`` and ``contact_<target>[_adaptive]_<scale>.png`` under ``out``.
    The evaluator must not be the guide: it judges what the guide steered.
    """
    import dataclasses
    import time

    from synfer_ray.bundle import load_bundle
    from synfer_ray.models import load_classifier
    device = report_device()  # fp32 throughout: the sweep's figures compare across machines
    bundle = load_bundle(bundle_path, sg_classifier=sg_classifier, sg_latent_guide=sg_latent_guide).to(device)
    if base.sg_guide == "latents" and bundle.sg_latent_guide is None and any(scale > 0 for scale in scales):
        # Refused now, not after the first point's minutes of sampling.
        raise SynferError("sg_guide", base.sg_guide, "pixels, or a latent guide for this bundle: --sg-latent-guide "
                                                     "or the bundle's sg_latent_guide/ (it has none)")
    evaluator = load_classifier(evaluator_path, field="evaluator").to(device)
    points = [("none", False, 0.0)] + [(target, rule == "adaptive", float(scale)) for target in targets
                                        for rule in step_rules for scale in scales if scale > 0]
    # Read first: a wrong path or label fails in seconds, before minutes of sampling.
    reference = real_reference(evaluator, real_faces, bundle.classes, per_class, seed, bundle.manifest.resolution,
                               field="--real-faces") if real_faces else None
    results = []
    out.mkdir(parents=True, exist_ok=True)
    for target, adaptive, scale in points:
        settings = dataclasses.replace(base, sg_scale=scale, sg_target=target if scale > 0 else base.sg_target,
                                       sg_adaptive=adaptive, sg_class_scales=())
        start = time.perf_counter()
        images, asked = sample_per_class(bundle, settings, per_class, seed)
        seconds = time.perf_counter() - start
        readings = face_readings(evaluator, images, asked)
        point = {"sg_target": target, "sg_adaptive": adaptive, "sg_scale": scale}
        sheet = class_contact_sheet(images, asked, bundle.classes, out / f"contact_{point_name(point)}.png",
                                    per_class)
        results.append({**point, **readings, "seconds": seconds, "contact_sheet": sheet.name})
        log(f"{curve_name(point):>14} SG {scale:>5g}: agreement {readings['agreement']['overall']:.1%}, "
            f"diversity {readings['diversity']:.4f}, {seconds:.0f} s")
    report = {"bundle": str(bundle_path), "bundle_hash": bundle.content_hash, "evaluator": evaluator_path,
              "sg_classifier": sg_classifier or "the bundle's",
              # The latent guide, where the sweep's guide reads latents (base.sg_guide in settings).
              "sg_latent_guide": (sg_latent_guide or "the bundle's") if base.sg_guide == "latents" else None,
              "per_class": per_class, "seed": seed, "settings": dataclasses.asdict(base), "points": results,
              "best_within_diversity": best_within_diversity(results, tolerance), "tolerance": tolerance}
    if reference:
        report["real_reference"] = reference
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    (out / "sweep.md").write_text(sweep_table(report, bundle.classes, tolerance=tolerance))
    return report


def pooled_sweep(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sweeps of one bundle, evaluator, sampler and guide at other seeds read as one sweep of all their
    faces: each point (SG target, step rule, scale) every sweep has, its readings averaged over the
    sweeps. Classes are of equal size, so a mean of shares is the share over all the faces; a mean of
    diversities weighs each sweep's pairs alike. A per-class mix read off one seed's 50 faces a class
    is the best of thousands of mixes on noisy readings, and loses more diversity on other faces than
    it promised (faces-48: 12.5% against 9.9%); more faces a reading shrink that winner's curse, and
    only a check on held-out faces (``synfer score``) says whether a pick holds (pooled: 10.7% against
    9.3%; docs/sg_sweep/faces48_v2_heldout_rounds.md)."""
    if len(reports) < 2:
        raise SynferError("sweeps", len(reports), "two or more sweep directories to pool")
    first = reports[0]
    for report in reports[1:]:
        for key in ("bundle_hash", "evaluator", "sg_classifier", "sg_latent_guide", "per_class", "settings"):
            same = (_sweep_settings(report.get(key)) == _sweep_settings(first.get(key)) if key == "settings"
                    else report.get(key) == first.get(key))
            if not same:
                raise SynferError(f"sweep {key}", report.get(key),
                                  f"the same {key} in every pooled sweep ({first.get(key)!r}); pool sweeps of "
                                  "one bundle, evaluator, guide and sampler that differ in --seed only")
    seeds = [report["seed"] for report in reports]
    if len(set(seeds)) < len(seeds):
        raise SynferError("sweep seed", seeds, "sweeps made at different --seed values (the same seed makes "
                                               "the same faces; pooling them adds no reading)")
    by_point = [{(curve_name(p), p["sg_scale"]): p for p in report["points"]} for report in reports]
    shared = [key for key in by_point[0] if all(key in sweep_points for sweep_points in by_point[1:])]
    # Which point it is, and the first sweep's contact sheet; the readings are every sweep's.
    naming = ("sg_target", "sg_adaptive", "sg_scale", "contact_sheet")
    points = [{**{name: value for name, value in by_point[0][key].items() if name in naming},
               **mean_readings([sweep_points[key] for sweep_points in by_point])} for key in shared]
    pooled = {**{key: first.get(key) for key in ("bundle", "bundle_hash", "evaluator", "sg_classifier",
                                                  "sg_latent_guide", "settings")},
              "per_class": first["per_class"] * len(reports), "seeds": seeds, "points": points,
              "best_within_diversity": best_within_diversity(points)}
    if all("real_reference" in report for report in reports):  # each sweep's seed drew other real faces
        references = [report["real_reference"] for report in reports]
        pooled["real_reference"] = {"faces": references[0]["faces"], "rows": sum(r["rows"] for r in references),
                                    **mean_readings(references)}
    return pooled


def mean_readings(readings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`face_readings` (and a point's seconds) of equal-sized sets of faces, averaged: what every
    set has."""
    mean_of = {}
    for name in ("agreement", "diversity_by_class"):  # per class (and overall)
        if all(name in r for r in readings):
            mean_of[name] = {key: float(np.mean([r[name][key] for r in readings])) for key in readings[0][name]}
    for name in ("diversity", "diversity_agreed", "pixel_diversity", "seconds"):
        if all(name in r for r in readings):
            mean_of[name] = float(np.mean([r[name] for r in readings]))
    return mean_of


def face_readings(evaluator, images: np.ndarray, asked: Sequence[str]) -> dict[str, Any]:
    """What the sweep reads of a set of faces, each with the class asked of it: the evaluator's
    agreement (overall and per class) and the within-class diversity of its embeddings, plus two
    readings of what SG costs: among the faces the evaluator reads as asked (is the variety of a
    class's expression kept, or only misread faces removed?), and class-blind, in pixels."""
    from synfer_ray.classifiers import embed_images, predict_probabilities
    probabilities = predict_probabilities(evaluator, images)
    asked_array = np.asarray(asked)
    embeddings = embed_images(evaluator, images)
    predicted = predicted_classes(probabilities, evaluator.classes)
    agreed = predicted == asked_array
    return {"agreement": agreement_by_class(predicted, asked_array),
            "diversity": within_class_diversity(embeddings, asked_array),
            "diversity_by_class": diversity_by_class(embeddings, asked_array),
            "diversity_agreed": within_class_diversity(embeddings[agreed], asked_array[agreed]),
            "pixel_diversity": within_class_diversity(pixel_vectors(images), asked_array)}


def sample_real_faces(data_path: str, classes: Sequence[str], per_class: int, seed: int, size: int,
                      field: str = "real_faces") -> tuple[np.ndarray, list[str]]:
    """(images uint8 (N, size, size, 3), labels): up to ``per_class`` labelled faces of each class, a
    seeded draw by row id (the same faces whatever the file order), streamed: the driver holds the
    draw, never the file."""
    import heapq

    import pyarrow.dataset as pads

    from synfer_ray.data.faces import check_labels, decode_faces, key_uniform, resolve_source, row_keys
    source = resolve_source(data_path, field)
    check_labels(source, classes, field, accepted_only=False)
    kept: dict[str, list[tuple[float, bytes]]] = {name: [] for name in classes}
    for batch in pads.dataset(source.data_path, format="parquet").to_batches(columns=["image", "label"]):
        images = batch.column("image").to_pylist()
        draws = key_uniform(row_keys(images), salt=seed)
        for draw, image, label in zip(draws, images, batch.column("label").to_pylist()):
            heap = kept[taxonomy.canonical_expression(str(label), classes, field)]
            heapq.heappush(heap, (-float(draw), image))  # the per_class smallest draws stay
            if len(heap) > per_class:
                heapq.heappop(heap)
    chosen = [(name, image) for name in classes for _, image in sorted(kept[name], reverse=True)]
    decoded = decode_faces({"image": [image for _, image in chosen], "label": [name for name, _ in chosen]},
                           classes, size, soft=False, synthetic=False)
    valid = decoded["valid"]
    return decoded["pixels"][valid], [name for (name, _), ok in zip(chosen, valid) if ok]


def real_reference(evaluator, data_path: str, classes: Sequence[str], per_class: int, seed: int,
                   size: int, field: str = "real_faces") -> dict[str, Any]:
    """:func:`face_readings` of real faces (:func:`sample_real_faces`, at the generator's resolution)."""
    images, labels = sample_real_faces(data_path, classes, per_class, seed, size, field)
    return {"faces": data_path, "rows": len(labels), **face_readings(evaluator, images, labels)}




def curve_name(point: dict[str, Any]) -> str:
    """A sweep curve: its SG target, and its step rule when adaptive (sweeps from before the rule
    existed have fixed steps only)."""
    return point["sg_target"] + (" adaptive" if point.get("sg_adaptive") else "")


def point_name(point: dict[str, Any]) -> str:
    """A point's name in files: ``au_16``, ``au_adaptive_16``."""
    return f"{curve_name(point).replace(' ', '_')}_{point['sg_scale']:g}"


def curve_peak(points: Sequence[dict[str, Any]], curve: str) -> float:
    """The scale of a curve's highest agreement: past it SG breaks faces, and rules read scales up to it."""
    return max((p for p in points if curve_name(p) == curve and p["sg_scale"] > 0),
               key=lambda p: p["agreement"]["overall"])["sg_scale"]


def best_within_diversity(points: Sequence[dict[str, Any]],
                          tolerance: float = DIVERSITY_TOLERANCE) -> dict[str, Any] | None:
    """The point of highest agreement whose diversity is within ``tolerance`` of no SG's:
    how the shipped default is chosen. Only scales up to each target's peak agreement count: past
    it the faces break, and broken faces are diverse again (faces-48's study sweep: au SG 128)."""
    plain = next((p for p in points if p["sg_scale"] == 0), None)
    if plain is None:
        return None
    floor = (1 - tolerance) * plain["diversity"]
    peaks = {curve: curve_peak(points, curve) for curve in {curve_name(p) for p in points if p["sg_scale"] > 0}}
    rising = [p for p in points if p["sg_scale"] == 0 or p["sg_scale"] <= peaks[curve_name(p)]]
    allowed = [p for p in rising if p["diversity"] >= floor]
    best = max(allowed, key=lambda p: p["agreement"]["overall"])
    return {"sg_target": best["sg_target"], "sg_adaptive": bool(best.get("sg_adaptive")),
            "sg_scale": best["sg_scale"], "agreement": best["agreement"]["overall"], "diversity": best["diversity"],
            "diversity_floor": floor}


CLASS_FLOOR = 0.30  # issue 19: no class read as asked less often than this


def class_scales_to_floor(points: Sequence[dict[str, Any]], curve: str, scale: float,
                          floor: float = CLASS_FLOOR) -> dict[str, dict[str, Any]]:
    """The classes the evaluator reads as asked less than ``floor`` of the time at ``scale`` on
    ``curve``, each with the smallest larger scale of that curve, up to its peak, at which it reaches
    ``floor`` (None where none does): per-class scales (``sampling.sg_class_scales``) that lift the
    weak classes without steering every other class harder. Rows of a class are made alike whatever
    their batch holds, so a class's reading at a shared scale is its reading at its own scale."""
    on_curve = sorted((p for p in points if curve_name(p) == curve and p["sg_scale"] > 0),
                      key=lambda p: p["sg_scale"])
    base = next((p for p in on_curve if p["sg_scale"] == scale), None)
    if base is None:
        return {}
    peak = curve_peak(points, curve)
    weak = {}
    for name, share in base["agreement"].items():
        if name == "overall" or share >= floor:
            continue
        reach = next((p for p in on_curve if scale < p["sg_scale"] <= peak and p["agreement"][name] >= floor), None)
        weak[name] = {"agreement": share, "sg_scale": reach["sg_scale"] if reach else None,
                      "reached": reach["agreement"][name] if reach else None}
    return weak


def class_scales_line(points: Sequence[dict[str, Any]], curve: str, scale: float) -> str:
    """One sentence: the classes under CLASS_FLOOR at (curve, scale), and the scales that lift them
    (empty where the sweep has no such point or no per-class readings)."""
    base = next((p for p in points if curve_name(p) == curve and p["sg_scale"] == scale), None)
    if base is None or set(base["agreement"]) <= {"overall"}:
        return ""  # not a point of this sweep, or no per-class readings
    weak = class_scales_to_floor(points, curve, scale)
    if not weak:
        return f"At {curve} SG {scale:g} no class is read as asked less than {CLASS_FLOOR:.0%} of the time."
    under = ", ".join(f"{name} {w['agreement']:.0%}" for name, w in weak.items())
    lifted = {name: w for name, w in weak.items() if w["sg_scale"] is not None}
    text = f"At {curve} SG {scale:g}, read as asked less than {CLASS_FLOOR:.0%} of the time: {under}."
    if lifted:
        scales = class_scales_text({name: w["sg_scale"] for name, w in lifted.items()})
        text += (" The smallest scale of the same curve that lifts each to it: "
                 + ", ".join(f"{name} {w['sg_scale']:g} ({w['reached']:.0%})" for name, w in lifted.items())
                 + f", i.e. `sampling.sg_class_scales={scales}`.")
    missing = [name for name, w in weak.items() if w["sg_scale"] is None]
    if missing:
        text += f" No scale up to the curve's peak lifts {', '.join(missing)}."
    return text


def class_scales_within_diversity(points: Sequence[dict[str, Any]], curve: str,
                                  tolerance: float = DIVERSITY_TOLERANCE,
                                  class_floor: float | None = None) -> dict[str, Any] | None:
    """Each class its own scale on one curve (0: no SG, read from the no-SG point), the mix of highest
    overall agreement whose diversity stays within ``tolerance`` of no SG's (``sampling.sg_class_scales``).
    Overall agreement and diversity are means over classes of equal size, and a class's faces do not
    depend on the other classes' scales, so every mix is read off the sweep's per-class figures: SG is
    spent on the classes where it buys agreement, not on those already legible. Scales up to the
    curve's peak; None for sweeps without per-class diversity (made before it was read). With
    ``class_floor``, only mixes that read every class as asked at least that often (None if none does)."""
    plain = next((p for p in points if p["sg_scale"] == 0), None)
    on_curve = [p for p in points if curve_name(p) == curve and p["sg_scale"] > 0]
    if plain is None or not on_curve or any("diversity_by_class" not in p for p in [plain, *on_curve]):
        return None
    peak = curve_peak(points, curve)
    options = [plain] + [p for p in on_curve if p["sg_scale"] <= peak]
    classes = list(plain["diversity_by_class"])
    # The Pareto front of (agreement sum, diversity sum) over the classes so far: a mix another beats
    # on both can never be the best, so the front stays small (7 classes x 6 scales: dozens of mixes).
    front: list[tuple[float, float, tuple[float, ...]]] = [(0.0, 0.0, ())]
    for name in classes:
        choices = [p for p in options if class_floor is None or p["agreement"][name] >= class_floor]
        grown = sorted(((agreement + p["agreement"][name], diversity + p["diversity_by_class"][name],
                         scales + (p["sg_scale"],)) for agreement, diversity, scales in front for p in choices),
                       key=lambda mix: (-mix[1], -mix[0]))
        front, best = [], -math.inf
        for mix in grown:
            if mix[0] > best:
                front.append(mix)
                best = mix[0]
    floor = (1 - tolerance) * plain["diversity"]
    count = len(classes)
    allowed = [mix for mix in front if mix[1] / count >= floor - 1e-12]
    if not allowed:
        return None
    agreement, diversity, scales = max(allowed, key=lambda mix: (mix[0], mix[1]))
    chosen = dict(zip(classes, scales))
    by_class = {name: next(p for p in options if p["sg_scale"] == chosen[name])["agreement"][name] for name in classes}
    return {"curve": curve, "scales": chosen, "agreement": agreement / count, "diversity": diversity / count,
            "diversity_floor": floor, "agreement_by_class": by_class}


def class_scales_text(scales: dict[str, float]) -> str:
    """``{neutral: 16, fear: 32}``: the classes steered, as ``sampling.sg_class_scales`` reads them."""
    return "{" + ", ".join(f"{name}: {scale:g}" for name, scale in scales.items() if scale > 0) + "}"


def class_scale_mix_lines(points: Sequence[dict[str, Any]], tolerance: float = DIVERSITY_TOLERANCE) -> list[str]:
    """Per curve, :func:`class_scales_within_diversity`'s mix as a table (none for older sweeps)."""
    curves = list(dict.fromkeys(curve_name(p) for p in points if p["sg_scale"] > 0))
    mixes = [mix for curve in curves if (mix := class_scales_within_diversity(points, curve, tolerance))]
    if not mixes:
        return []
    # The same with every class read as asked at least CLASS_FLOOR of the time, where that fits.
    floored = {curve: class_scales_within_diversity(points, curve, tolerance, class_floor=CLASS_FLOOR)
               for curve in curves}
    lines = ["", f"Each class its own scale on one curve (`sampling.sg_target` and `sampling.sg_class_scales`, "
                 f"`sampling.sg_scale=0`; unnamed classes unguided), the mix of highest agreement within "
                 f"{tolerance:.0%} of no SG's diversity (>= {mixes[0]['diversity_floor']:.4f}), read off "
                 f"each class's agreement and diversity at each point:", "",
             "| SG target | class scales | agreement | diversity | lowest class |", "|---|---|---|---|---|"]
    for mix in mixes:
        rows = [(mix["curve"], mix)]
        other = floored[mix["curve"]]
        if other is None:
            rows.append((f"{mix['curve']}, every class >= {CLASS_FLOOR:.0%}", None))
        elif other["scales"] != mix["scales"]:
            rows.append((f"{mix['curve']}, every class >= {CLASS_FLOOR:.0%}", other))
        for name, chosen in rows:
            if chosen is None:
                lines.append(f"| {name} | none within the diversity | | | |")
                continue
            lowest = min(chosen["agreement_by_class"], key=chosen["agreement_by_class"].get)
            lines.append(f"| {name} | `{class_scales_text(chosen['scales'])}` | **{chosen['agreement']:.1%}** | "
                         f"{chosen['diversity']:.4f} | {lowest} {chosen['agreement_by_class'][lowest]:.0%} |")
    return lines


# A diversity compares faces of a class in pairs: with fewer than two in every class (among agreed
# faces, where the evaluator agrees with almost none) there is no reading, and the cell says why.
TOO_FEW_FACES = "too few faces"


def _diversity_cell(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else TOO_FEW_FACES


def _class_cells(shares: dict[str, float], classes: Sequence[str]) -> str:
    # A class a point asked no faces of (a hand-made or foreign sweep) has no share to print.
    return " | ".join(f"{shares[name]:.0%}" if name in shares else "n/a" for name in classes)


def sweep_table(report: dict[str, Any], classes: Sequence[str], setting: tuple[str, float] | None = None,
                tolerance: float = DIVERSITY_TOLERANCE) -> str:
    """The sweep as a Markdown table: one line per (target, scale), agreement per class in percent;
    below it the default rule's pick and the classes left under CLASS_FLOOR at ``setting`` (a curve and
    scale; default: the pick) with the per-class scales that lift them. The rule and the mixes keep
    diversity within ``tolerance`` of no SG's; a smaller one than the target leaves a margin for the
    pick's luck (a pick at the bound lands past it on other faces)."""
    header = ("| SG target | SG scale | agreement | " + " | ".join(classes)
              + " | diversity | among agreed | pixels | seconds |")
    guide = guide_line(report)
    lines = ([guide, ""] if guide else []) + [header, "|" + "---|" * (len(classes) + 7)]
    for point in report["points"]:
        shares = point["agreement"]
        # Sweeps from before the two class-blind readings existed show n/a there.
        extra = " | ".join(_diversity_cell(point[key]) if key in point else "n/a"
                           for key in ("diversity_agreed", "pixel_diversity"))
        lines.append(f"| {curve_name(point)} | {point['sg_scale']:g} | **{shares['overall']:.1%}** | "
                     + _class_cells(shares, classes)
                     + f" | {_diversity_cell(point['diversity'])} | {extra} | {point['seconds']:.0f} |")
    reference = report.get("real_reference")
    if reference:
        shares = reference["agreement"]
        lines.append(f"| real faces | | *{shares['overall']:.1%}* | " + _class_cells(shares, classes)
                     + " | " + " | ".join(_diversity_cell(reference[key]) for key in
                                          ("diversity", "diversity_agreed", "pixel_diversity")) + " | |")
    # From the points, not a stored pick: a sweep cached before the rule changed reads by today's rule.
    best = best_within_diversity(report["points"], tolerance)
    if best:
        lines += ["", f"Highest agreement with diversity within {tolerance:.0%} of no SG (>= "
                      f"{best['diversity_floor']:.4f}): {curve_name(best)} SG {best['sg_scale']:g}, "
                      f"{best['agreement']:.1%}."]
        curve, scale = setting or (curve_name(best), best["sg_scale"])
        weak_classes = class_scales_line(report["points"], curve, scale) if scale > 0 else ""
        if weak_classes:
            lines += ["", weak_classes]
    lines += class_scale_mix_lines(report["points"], tolerance)
    return "\n".join(lines) + "\n"
