"""``synfer study``: SynFER's claims measured on real faces, every stage through the normal jobs.

Stages (each cached under ``stages/<kind>-<hash of its config>/``, so a stopped study continues
and a changed setting reruns only what it touches):

1. two FER classifiers on real faces: the *guide* (semantic guidance, votes) and the *evaluator*
   (scores only), refused when they are not different models;
2. the generator bundle (given, or ``train-generator``), and optionally FERAnno (``train-labeler``);
3. one generated set per condition (text / + AU / + SG / + SG + labeler), equal numbers per class,
   the same seeds, prompts and AUs across conditions, scored by the evaluator;
4. optionally the SG sweep: the evaluator's agreement and diversity at each SG target, step rule
   and scale;
5. downstream: one small classifier trained on real only, synthetic only (multiples of the real
   size) and real + synthetic, per seed, tested on held-out real faces;
6. ``report.md`` with the tables, contact sheets and confusion matrices; MLflow: one parent run,
   every stage a child run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from synfer_ray.config import (ADDED_GENERATE_SETTINGS, DEFAULT_SG_TARGET, GenerateConfig, GeneratorTrainConfig,
                               StudyConfig, StudyStage, TrainConfig, TrackingConfig, build_config, load_config,
                               without_added_settings)
from synfer_ray.data.faces import resolve_source
from synfer_ray.errors import SynferError
from synfer_ray.evaluate import diversity_from_sums, evaluate_model, evaluate_votes, headline_figures
from synfer_ray.train.generator_report import (class_scales_text, curve_name, point_name, real_reference,
                                               sg_sweep, sweep_table)

CONDITION_TITLES = {"text": "(a) text only", "text_au": "(b) text + AU", "text_au_sg": "(c) text + AU + SG",
                    "text_au_sg_labeler": "(d) text + AU + SG + labeler"}


def config_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StageCache:
    """``run(kind, payload, make)``: the stored result of an identical earlier stage, or ``make(dir)``'s.
    ``times`` lists each stage this study used with the wall time that made it: a stage stopped and
    continued later (its shards and checkpoints kept) took several parts, and its time is their sum,
    a stopped part counted up to the last file it wrote (``parts.json``)."""

    PARTS_NAME = "parts.json"

    def __init__(self, root: Path):
        self.root = root / "stages"
        self.times: list[dict[str, Any]] = []

    def _earlier_parts(self, directory: Path) -> list[dict[str, float]]:
        """The parts of this stage that ran before and stopped, each with its seconds."""
        record, started = directory / self.PARTS_NAME, directory / "stage_config.json"
        parts = json.loads(record.read_text()) if record.is_file() else []
        if not parts and started.is_file():  # a part begun before parts were recorded
            parts = [{"started": started.stat().st_mtime}]
        if parts and "seconds" not in parts[-1]:
            written = [f.stat().st_mtime for f in directory.rglob("*") if f.is_file() and f.name != self.PARTS_NAME]
            parts[-1]["seconds"] = max(0.0, max(written, default=parts[-1]["started"]) - parts[-1]["started"])
        return parts

    def run(self, kind: str, payload: Any, make: Callable[[Path], dict]) -> dict:
        directory = self.root / f"{kind}-{config_hash(payload)}"
        done, started = directory / "done.json", directory / "stage_config.json"
        if done.is_file():
            result = json.loads(done.read_text())
            # Stages made before their time was recorded: the config is written as make() starts.
            seconds = result.get("seconds", done.stat().st_mtime - started.stat().st_mtime)
            self.times.append({"stage": directory.name, "seconds": seconds, "parts": result.get("stage_parts"),
                               "cached": True})
            return {**result, "cached": True}
        directory.mkdir(parents=True, exist_ok=True)
        parts = self._earlier_parts(directory) + [{"started": time.time()}]
        (directory / self.PARTS_NAME).write_text(json.dumps(parts))
        started.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        start = time.monotonic()
        made = make(directory)
        parts[-1]["seconds"] = time.monotonic() - start
        (directory / self.PARTS_NAME).write_text(json.dumps(parts))
        # stage_parts, not parts: a classifier stage's result already has parts (its data halves).
        result = {**made, "seconds": sum(part["seconds"] for part in parts), "stage_parts": len(parts)}
        done.write_text(json.dumps(result, indent=2, default=str))
        self.times.append({"stage": directory.name, "seconds": result["seconds"], "parts": len(parts),
                           "cached": False})
        return {**result, "cached": False}


def _preset_or_path(name: str) -> Path:
    from synfer_ray.presets import preset_path
    return Path(name) if Path(name).exists() else (preset_path(name) or Path(name))


def _load_stage(model, stage: StudyStage, field: str, extra: Sequence[str] = ()):
    try:
        return load_config(model, _preset_or_path(stage.config), [*stage.overrides, *extra])
    except SynferError as error:
        raise SynferError(f"{field}.{error.field}", error.value, error.accepted) from None


def _generate_fields(config: GenerateConfig, exclude: set[str]) -> dict:
    """A generate config's fields, less ``exclude``, as stage keys and lineage read them."""
    return without_added_settings(config.model_dump(mode="json", exclude=exclude), ADDED_GENERATE_SETTINGS)


def _identity(config) -> dict:
    """A stage's config without where it writes and how it is tracked: what decides its result."""
    return config.model_dump(mode="json", exclude={"output", "tracking", "register_as", "name", "ray"})


# --- classifiers -----------------------------------------------------------------------------

def _classifier_description(path: str) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    weights = sorted(Path(path).glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in weights)).hexdigest()
    return {"model_type": config.get("model_type") or config.get("_class_name"),
            "hidden_sizes": config.get("hidden_sizes"), "weights_sha256": digest}


def classifier_stage(stage: StudyStage, kind: str, cache: StageCache, tracking: TrackingConfig,
                     real_test: str) -> dict:
    """Train (or take) one classifier; its accuracy on the study's real test set is measured here."""
    from synfer_ray.train.fer import run_train

    def test_figures(model: str) -> dict:  # a class missed on real faces cannot be scored or voted for
        return headline_figures(evaluate_model(model, real_test))

    if stage.model:
        return {"model": stage.model, "arch": None, "seed": None, "parts": None, "test": test_figures(stage.model),
                **_classifier_description(stage.model)}
    config = _load_stage(TrainConfig, stage, kind)

    def make(directory: Path) -> dict:
        run_config = config.model_copy(update={"output": str(directory / "run"), "tracking": tracking,
                                               "register_as": None, "name": f"study-{kind}"})
        summary = run_train(run_config)
        last = summary["history"][-1]
        return {"model": summary["model"], "arch": config.model.arch, "seed": config.optim.seed,
                "parts": [s.part for s in config.data.train], "test": test_figures(summary["model"]),
                "train_rows": last["train_rows"], "val_rows": last.get("val_rows"),
                **_classifier_description(summary["model"])}
    return cache.run(kind, {**_identity(config), "real_test": real_test}, make)


def check_independent(guide: dict, evaluator: dict) -> None:
    """The evaluator must not be the guide: different weights, architecture, seed and data half."""
    if guide["weights_sha256"] == evaluator["weights_sha256"]:
        raise SynferError("evaluator", evaluator["model"], "a different model than the guide (same weights)")
    if guide["arch"] and evaluator["arch"] and guide["arch"] == evaluator["arch"]:
        raise SynferError("evaluator", evaluator["arch"], f"an architecture other than the guide's ({guide['arch']})")
    if (guide["model_type"], guide["hidden_sizes"]) == (evaluator["model_type"], evaluator["hidden_sizes"]):
        raise SynferError("evaluator", evaluator["model"], "an architecture other than the guide's "
                                                           f"({guide['model_type']} {guide['hidden_sizes']})")
    if guide["seed"] is not None and guide["seed"] == evaluator["seed"]:
        raise SynferError("evaluator.optim.seed", evaluator["seed"], "a seed other than the guide's")
    if guide["parts"] and evaluator["parts"] and set(guide["parts"]) & set(evaluator["parts"]) - {None}:
        raise SynferError("evaluator.data.train.part", evaluator["parts"], f"another part of the data than the "
                                                                           f"guide's {guide['parts']}")


# --- generator and labeler -------------------------------------------------------------------

def generator_stage(study: StudyConfig, guide: dict, evaluator: dict, cache: StageCache,
                    tracking: TrackingConfig) -> dict:
    from synfer_ray.train.generator import run_train_generator
    if study.generator.model:
        return {"bundle": study.generator.model}
    config = _load_stage(GeneratorTrainConfig, study.generator, "generator",
                         [f"sg_classifier={guide['model']}", f"quality.evaluator={evaluator['model']}"])

    def make(directory: Path) -> dict:
        summary = run_train_generator(config.model_copy(update={"output": str(directory / "run"),
                                                                "tracking": tracking}))
        return {"bundle": summary["bundle"], "quality": summary["quality"]}
    return cache.run("generator", _identity(config), make)


def labeler_stage(study: StudyConfig, bundle: str, cache: StageCache, tracking: TrackingConfig) -> dict | None:
    from synfer_ray.train.labeler import run_train_labeler
    if study.labeler is None:
        return None
    if study.labeler.model:
        return {"bundle": study.labeler.model, "test": None}
    config = _load_stage(TrainConfig, study.labeler, "labeler", ["model.arch=feranno", f"model.bundle={bundle}"])

    def make(directory: Path) -> dict:
        summary = run_train_labeler(config.model_copy(update={"output": str(directory / "run"), "tracking": tracking,
                                                              "register_as": None, "name": "study-labeler"}))
        history = summary.get("history") or [{}]
        return {"bundle": summary["bundle"], "test": summary.get("test"), "train_rows": history[-1].get("train_rows")}
    # A head is tied to the UNet it learnt over: a new bundle at the same path is a new stage.
    from synfer_ray.bundle import BundleManifest
    return cache.run("labeler", {**_identity(config), "bundle_content": BundleManifest.read(Path(bundle)).content_hash},
                     make)


def vote_stage(study: StudyConfig, guide: dict, labeler_bundle: str | None, cache: StageCache) -> dict[str, dict]:
    """The labelers' vote, as generate runs it (weighted mean, tau), on the real test faces: the guide
    alone and, with a labeler, the labeler alone and the two together; each also mirror-averaged
    (``labeling.mirror_average``). The labeler's vote adds information when the pair labels more faces
    right, or accepts more at the same share right, than the guide alone. One pass over the faces."""
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.config import LabelingConfig
    from synfer_ray.labeler.feranno import LABELER_DIR
    ensembles = {"guide": ([guide["model"]], None)}
    if labeler_bundle:
        labeler = str(Path(labeler_bundle) / LABELER_DIR)
        ensembles["labeler"] = ([labeler], None)
        ensembles["guide + labeler"] = ([guide["model"], labeler], [1.0, LabelingConfig().bundle_labeler_weight])

    def make(directory: Path) -> dict:
        reports = evaluate_votes(ensembles, study.real_test, study.generation.tau, mirror_readings=(False, True))
        return {"votes": {name + (", mirror-averaged" if mirror else ""): headline_figures(report)
                          for (name, mirror), report in reports.items()}}
    payload = {"guide": guide["weights_sha256"], "real_test": study.real_test, "tau": study.generation.tau,
               "labeler": labeler_bundle and BundleManifest.read(Path(labeler_bundle)).content_hash,
               "weights": {name: weights for name, (_, weights) in ensembles.items()}}
    return cache.run("votes", payload, make)["votes"]


# --- generation ------------------------------------------------------------------------------

def condition_config(study: StudyConfig, condition: str, bundles: dict[str, str], guide: str, count: int | None,
                     seed: int, output: str, tracking: TrackingConfig,
                     accepted_per_class: int | None = None, max_rows: int | None = None) -> GenerateConfig:
    """The normal generate config of one condition; only sampling and labeling differ between them.
    ``accepted_per_class`` asks for accepted rows (top-up passes) instead of ``count`` rows, within
    ``max_rows`` rows made."""
    sampling = study.generation.sampling
    labeled, guided = condition.endswith("_labeler"), "_sg" in condition
    raw = {
        "bundle": bundles["labeler" if labeled else "generator"], "output": output, "count": count, "seed": seed,
        "class_assignment": "cycled", "accepted_per_class": accepted_per_class,
        "max_rows": max_rows,
        "rows_per_shard": study.generation.rows_per_shard,
        "precision": study.generation.precision,
        "sampling": {"scheduler": sampling.scheduler, "steps": sampling.steps, "cfg_scale": sampling.cfg_scale,
                     "au_scale": 0.0 if condition == "text" else sampling.au_scale,
                     "sg_window": sampling.sg_window, "sg_classifier": guide,
                     # Without SG the SG settings change no face: left at their defaults, they leave the
                     # unguided conditions' stage keys alone when only the SG settings change.
                     "sg_scale": sampling.sg_scale if guided else 0.0,
                     "sg_target": sampling.sg_target if guided else DEFAULT_SG_TARGET,
                     "sg_adaptive": sampling.sg_adaptive and guided,
                     "sg_class_scales": sampling.sg_class_scales if guided else {}},
        "labeling": ({"voters": [{"path": guide, "name": "guide"}], "bundle_labeler": True,
                      "tau": study.generation.tau, "mirror_average": study.generation.mirror_average}
                     if labeled else {"voters": [], "bundle_labeler": False}),
        "generator": study.generation.generator.model_dump(), "labeler": study.generation.labeler.model_dump(),
        "ray": study.ray.model_dump(), "tracking": tracking.model_dump(),
    }
    return build_config(GenerateConfig, raw)


def headline_generate_config(study: StudyConfig, bundles: dict[str, str], guide: str, num_classes: int,
                             output: str, tracking: TrackingConfig) -> GenerateConfig:
    """The headline set: ``headline_rows`` rows (equally many per class) or ``headline_synthetic_rows``
    accepted rows (equally many per class, top-up passes within ``headline_max_rows``)."""
    downstream = study.downstream
    count = downstream.headline_rows and -(-downstream.headline_rows // num_classes) * num_classes
    per_class = downstream.headline_synthetic_rows and -(-downstream.headline_synthetic_rows // num_classes)
    return condition_config(study, downstream.condition, bundles, guide, count, study.generation.seed + 2, output,
                            tracking, accepted_per_class=per_class, max_rows=downstream.headline_max_rows)


def generation_stage(kind: str, config: GenerateConfig, cache: StageCache) -> dict:
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.generate import run_generate
    payload = {**_generate_fields(config, exclude={"output", "tracking", "ray", "generator", "labeler"}),
               "bundle": BundleManifest.read(Path(config.bundle)).content_hash,
               "generator.batch_size": config.generator.batch_size}

    def make(directory: Path) -> dict:
        card = run_generate(config.model_copy(update={"output": str(directory / "dataset")}), progress=False)
        return {"dataset": str(directory / "dataset"), "rows": card["rows"],
                "accepted_by_label": card["counts"]["accepted_by_label"],
                "accepted_targets": card.get("accepted_targets")}
    return cache.run(kind, payload, make)


class ScoreRows:
    """Ray Data actor: the evaluator's verdict on a batch of generated rows, as sums (no rows leave)."""

    def __init__(self, evaluator_path: str, classes: Sequence[str]):
        import torch

        from synfer_ray.classifiers import load_classifier
        torch.set_num_threads(1)
        self.evaluator = load_classifier(evaluator_path, field="evaluator")
        self.classes = list(classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from synfer_ray.classifiers import embed_images, predict_probabilities
        from synfer_ray.images import decode_rgb
        from synfer_ray.labeler.rectify import align_probabilities
        images = np.stack([decode_rgb(data) for data in batch["image"]])
        probabilities = align_probabilities(predict_probabilities(self.evaluator, images), self.evaluator.classes,
                                            self.classes, "evaluator")
        judged = np.asarray(self.classes)[probabilities.argmax(axis=1)]
        targets, labels = batch["target"].astype(str), batch["label"].astype(str)
        accepted = np.asarray(batch["accepted"], bool)
        embeddings = embed_images(self.evaluator, images)
        unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
        sums = {"rows": len(images), "fer_correct": int((judged == targets).sum()), "accepted": int(accepted.sum()),
                "label_matches_target": int((labels == targets).sum()),
                "label_agrees_with_evaluator": int((judged == labels).sum()),
                "accepted_label_agrees": int((judged[accepted] == labels[accepted]).sum()),
                "label_confidence": float(np.sum(batch["confidence"])),
                "evaluator_confidence": float(probabilities.max(axis=1).sum()),
                "per_class": {c: {"rows": int((targets == c).sum()), "correct": int(((targets == c) & (judged == c)).sum()),
                                  "unit_sum": unit[targets == c].sum(axis=0).tolist()}
                              for c in self.classes if (targets == c).any()}}
        return {"sums": np.array([json.dumps(sums)], dtype=object)}


def _add(total: dict, part: dict) -> dict:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            total[key] = (np.asarray(total[key]) + np.asarray(value)) if key in total else np.asarray(value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def score_dataset(dataset: str | Sequence[str], evaluator_path: str, classes: Sequence[str]) -> dict:
    """The evaluator's view of a generated set (or of several read as one): FER accuracy, label
    agreement, confidence, diversity. Scored inside Ray Data by evaluator actors; the driver adds up
    per-batch sums."""
    import ray.data
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    scored = ray.data.read_parquet([resolve_source(path, "dataset").data_path for path in datasets],
                                   columns=["image", "target", "label", "accepted", "confidence"]).map_batches(
        ScoreRows, batch_size=256, batch_format="numpy", fn_constructor_kwargs={
            "evaluator_path": evaluator_path, "classes": tuple(classes)},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=1)
    total: dict = {}
    for row in scored.iter_rows():
        _add(total, json.loads(row["sums"]))
    rows, per_class = total["rows"], total["per_class"]
    return {
        "rows": int(rows),
        "fer_accuracy": total["fer_correct"] / rows,
        "fer_accuracy_per_class": {c: per_class[c]["correct"] / per_class[c]["rows"] for c in classes if c in per_class},
        "acceptance": total["accepted"] / rows,
        "label_matches_target": total["label_matches_target"] / rows,
        "label_agrees_with_evaluator": total["label_agrees_with_evaluator"] / rows,
        "accepted_label_agrees_with_evaluator": total["accepted_label_agrees"] / total["accepted"]
        if total["accepted"] else float("nan"),
        "label_confidence": total["label_confidence"] / rows,
        "evaluator_confidence": total["evaluator_confidence"] / rows,
        "diversity": diversity_from_sums({c: (v["rows"], v["unit_sum"]) for c, v in per_class.items()}),
    }


def against_baseline(made: dict, plain: dict) -> dict:
    """Two :func:`score_dataset` readings of faces from the same seeds (e.g. with and without SG):
    the points of agreement with the asked class gained, and the share of diversity kept or lost."""
    return {"agreement_points": 100 * (made["fer_accuracy"] - plain["fer_accuracy"]),
            "diversity_change": made["diversity"] / plain["diversity"] - 1}


def sweep_base_settings(study: StudyConfig):
    """The sweep's base sampler settings: the study's, less what each point sets for itself (SG scale,
    target and step rule, one scale for every class; the sweep is what per-class scales are read
    from). So the study's own SG choice, which the sweep informs, does not make the sweep again."""
    import dataclasses

    from synfer_ray.generator.sampler import SamplerSettings
    return dataclasses.replace(SamplerSettings.from_config(study.generation.sampling), sg_scale=0.0,
                               sg_target=DEFAULT_SG_TARGET, sg_adaptive=False, sg_class_scales=())


def sweep_key(study: StudyConfig, bundle_hash: str, guide_sha256: str, evaluator_sha256: str) -> dict:
    """What decides the sweep's result; settings added since sweeps were first cached are left out
    at their old-behaviour values, so those sweeps stay valid."""
    import dataclasses
    payload = {"bundle": bundle_hash, "guide": guide_sha256, "evaluator": evaluator_sha256,
               "settings": dataclasses.asdict(sweep_base_settings(study)),
               "sweep": study.sweep.model_dump(mode="json"), "per_class": study.generation.per_class,
               "seed": study.generation.seed}
    return without_added_settings(payload, {"settings.sg_adaptive": False, "settings.sg_class_scales": (),
                                            "sweep.step_rules": ["fixed"]})


def sweep_stage(study: StudyConfig, bundle: str, guide: dict, evaluator: dict, cache: StageCache) -> dict | None:
    """``synfer bundle sg-sweep`` inside the study: the study's sampling, seeds, guide and evaluator, at
    every SG target and scale of ``study.sweep`` plus no SG; a contact sheet per point."""
    if study.sweep is None:
        return None
    from synfer_ray.bundle import BundleManifest
    base = sweep_base_settings(study)
    payload = sweep_key(study, BundleManifest.read(Path(bundle)).content_hash, guide["weights_sha256"],
                        evaluator["weights_sha256"])

    def make(directory: Path) -> dict:
        report = sg_sweep(Path(bundle), evaluator["model"], base, study.sweep.targets, study.sweep.scales,
                          study.generation.per_class, study.generation.seed, directory / "sweep",
                          sg_classifier=guide["model"], step_rules=study.sweep.step_rules)
        return {"directory": str(directory / "sweep"), "sg_classifier": guide["model"],
                "points": report["points"]}  # the pick is read from the points (sweep_table)
    return {**cache.run("sweep", payload, make), "real_reference": real_reference_stage(study, bundle, evaluator,
                                                                                        cache)}


def real_reference_stage(study: StudyConfig, bundle: str, evaluator: dict, cache: StageCache) -> dict:
    """The sweep's readings of real test faces (as many per class as the sweep makes), by the same
    evaluator: the scale its agreement and diversity are read against. A stage of its own, so that a
    sweep cached before it existed stays valid."""
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.classifiers import load_classifier
    manifest = BundleManifest.read(Path(bundle))
    payload = {"real_test": study.real_test,
               "evaluator": evaluator["weights_sha256"], "classes": list(manifest.classes),
               "resolution": manifest.resolution, "per_class": study.generation.per_class,
               "seed": study.generation.seed}

    def make(directory: Path) -> dict:
        model = load_classifier(evaluator["model"], field="evaluator")
        return real_reference(model, study.real_test, manifest.classes, study.generation.per_class,
                              study.generation.seed, manifest.resolution, field="real_test")
    return cache.run("reference", payload, make)


# --- downstream ------------------------------------------------------------------------------

def downstream_configs(study: StudyConfig, synthetic: str, seed: int,
                       headline: str | None = None) -> dict[str, TrainConfig]:
    base = _load_stage(TrainConfig, study.downstream.train, "downstream.train")
    n = study.downstream.real_rows
    # Every model picks its checkpoint on the same held-out real rows (never synthetic ones), and no
    # model trains on them.
    real = {"path": study.real_train, "limit": n, "split": "train"}
    validation = {"path": study.real_train, "split": "validation"}
    sets = {"real only": [real]}
    accepted_only = study.downstream.synthetic_rows == "accepted"
    for multiple in study.downstream.multiples:
        sets[f"synthetic only {multiple}x"] = [{"path": synthetic, "limit": multiple * n, "accepted_only": accepted_only}]
    sets["real + synthetic 1x"] = [real, {"path": synthetic, "limit": n, "accepted_only": accepted_only}]
    if headline is not None:
        everything = {**real, "limit": None}
        sets["all real"] = [everything]
        sets["all real + synthetic"] = [everything, {"path": headline, "accepted_only": True}]
    configs = {}
    for name, train in sets.items():
        raw = base.model_dump(mode="json")
        raw["data"]["train"] = train
        raw["data"]["validation"] = validation
        raw["data"]["test"] = {"path": study.real_test}
        raw["optim"]["seed"] = seed
        configs[name] = build_config(TrainConfig, raw)
    return configs


def downstream_stage(name: str, config: TrainConfig, cache: StageCache, tracking: TrackingConfig,
                     lineage: dict[str, str]) -> dict:
    from synfer_ray.train.fer import run_train
    payload = {**_identity(config), "lineage": {p.path: lineage.get(p.path, p.path) for p in config.data.train}}

    def make(directory: Path) -> dict:
        summary = run_train(config.model_copy(update={"output": str(directory / "run"), "tracking": tracking,
                                                      "register_as": None, "name": f"study-{name}"}))
        last = summary["history"][-1]
        return {"test": summary["test"], "eval": str(directory / "run" / "eval"), "train_rows": last["train_rows"],
                "val_rows": last.get("val_rows"), "source_rows": summary.get("source_rows"),
                "best_epoch": summary["best_epoch"]}
    return cache.run("downstream", payload, make)


# --- the whole study -------------------------------------------------------------------------

def _check_inputs(study: StudyConfig) -> None:
    for field in ("real_train", "real_test"):
        if not Path(getattr(study, field)).exists():
            raise SynferError(field, getattr(study, field), "an existing labelled-faces Parquet file or directory")
    for field in ("guide", "evaluator", "generator", "labeler"):
        stage = getattr(study, field)
        if stage is None:
            continue
        if stage.model and not Path(stage.model).exists():
            raise SynferError(f"{field}.model", stage.model, "an existing model directory")
        if stage.config and not _preset_or_path(stage.config).is_file():
            raise SynferError(f"{field}.config", stage.config, "an existing config file or preset name")
    if "text_au_sg_labeler" in study.generation.conditions + [study.downstream.condition] and study.labeler is None:
        raise SynferError("labeler", None, "a labeler stage for the condition text_au_sg_labeler "
                                           "(or drop that condition)")


def run_study(study: StudyConfig) -> dict[str, Any]:
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.pipeline import ensure_ray
    from synfer_ray.tracking import start_run
    from synfer_ray.train.fer import run_train  # noqa: F401  (import errors surface before Ray starts)

    _check_inputs(study)
    output = Path(study.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    (output / "study_config.json").write_text(study.model_dump_json(indent=2))
    cache = StageCache(output)
    tracking = study.tracking
    results: dict[str, Any] = {"name": study.name}
    with start_run(tracking, study.name) as parent:
        parent.log_params({"config": study.model_dump(mode="json")})
        parent.set_tags({"synfer.job": "study"})
        ensure_ray(study.ray)
        guide = classifier_stage(study.guide, "guide", cache, tracking, study.real_test)
        evaluator_info = classifier_stage(study.evaluator, "evaluator", cache, tracking, study.real_test)
        check_independent(guide, evaluator_info)
        results["classifiers"] = {"guide": guide, "evaluator": evaluator_info}
        generator = generator_stage(study, guide, evaluator_info, cache, tracking)
        labeler = labeler_stage(study, generator["bundle"], cache, tracking)
        bundles = {"generator": generator["bundle"], "labeler": labeler["bundle"] if labeler else None}
        results["generator"], results["labeler"] = generator, labeler
        results["votes"] = vote_stage(study, guide, bundles["labeler"], cache)
        classes = BundleManifest.read(Path(bundles["generator"])).classes
        count = study.generation.per_class * len(classes)
        results["conditions"], results["downstream"] = {}, {}

        def progress() -> None:  # the report so far: a study runs for hours, its tables fill as it goes
            write_report(study, {**results, "stage_times": cache.times}, classes, output / "report", complete=False)
        for condition in study.generation.conditions:
            config = condition_config(study, condition, bundles, guide["model"], count, study.generation.seed,
                                      str(output / "pending"), tracking)
            made = generation_stage(f"generate-{condition}", config, cache)
            results["conditions"][condition] = {**made, **score_dataset(made["dataset"], evaluator_info["model"], classes)}
            progress()
        results["sweep"] = sweep_stage(study, bundles["generator"], guide, evaluator_info, cache)
        progress()
        downstream = study.downstream
        headline = None
        if downstream.headline_synthetic_rows or downstream.headline_rows:
            synthetic_config = headline_generate_config(study, bundles, guide["model"], len(classes),
                                                        str(output / "pending"), tracking)
            headline = synthetic = generation_stage(f"headline-{downstream.condition}", synthetic_config, cache)
            results["headline_synthetic"] = headline
        else:
            # Rows made: the synthetic-only sets hold fewer than a multiple where accepted rows are kept.
            synthetic_count = max(downstream.multiples) * downstream.real_rows
            synthetic_config = condition_config(study, downstream.condition, bundles, guide["model"],
                                                -(-synthetic_count // len(classes)) * len(classes),
                                                study.generation.seed + 1, str(output / "pending"), tracking)
            synthetic = generation_stage(f"synthetic-{downstream.condition}", synthetic_config, cache)
        # With a headline set the small comparisons draw from it too: it holds enough accepted rows
        # for every multiple of the real subset (a set of 2N rows made holds 2N accepted ones only
        # where the labelers accept everything).
        results["synthetic"] = synthetic
        progress()
        lineage = {synthetic["dataset"]: config_hash(_generate_fields(synthetic_config, exclude={"output"}))}
        for seed in downstream.seeds:
            for name, config in downstream_configs(study, synthetic["dataset"], seed,
                                                   headline["dataset"] if headline else None).items():
                outcome = downstream_stage(name, config, cache, tracking, lineage)
                results["downstream"].setdefault(name, []).append({"seed": seed, **outcome})
                progress()
        results["stage_times"] = cache.times
        report = write_report(study, results, classes, output / "report")
        parent.log_metrics(flat_metrics(results))
        parent.log_artifacts(output / "report", "report")
        results["report"] = str(report)
        results["mlflow_run_id"] = parent.run_id
        (output / "results.json").write_text(json.dumps(results, indent=2, default=str))
        return results


def flat_metrics(results: dict) -> dict[str, float]:
    metrics = {}
    for condition, scores in results["conditions"].items():
        for key in ("fer_accuracy", "acceptance", "label_agrees_with_evaluator", "diversity"):
            metrics[f"{condition}.{key}"] = scores[key]
    for name, runs in results["downstream"].items():
        key = name.replace(" ", "_").replace("+", "plus")
        for metric in ("accuracy", "uar", "macro_f1"):
            metrics[f"downstream.{key}.{metric}"] = float(np.mean([r["test"][metric] for r in runs]))
    for name, vote in (results.get("votes") or {}).items():
        for metric in ("accuracy", "acceptance", "accepted_accuracy"):
            metrics[f"vote.{name.replace(' + ', '_and_').replace(', ', '_')}.{metric}"] = vote[metric]
    for point in (results.get("sweep") or {}).get("points", []):
        key = f"sweep.{point_name(point)}"
        metrics[f"{key}.agreement"], metrics[f"{key}.diversity"] = point["agreement"]["overall"], point["diversity"]
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


# --- the report ------------------------------------------------------------------------------

def _cell(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


SYNTHETIC_ROWS = {"accepted": "only those the labeler accepted, so fewer than asked where acceptance is low",
                  "all": "every generated row with its rectified label"}


def recall_lines(results: dict, classes: Sequence[str]) -> list[str]:
    """Per-class recall on the real test faces: a class a model misses on real faces it cannot
    score (evaluator) or vote for (guide, labeler) on generated ones."""
    models = [(role, (info or {}).get("test") or {}) for role, info in (
        ("guide", results["classifiers"]["guide"]), ("evaluator", results["classifiers"]["evaluator"]),
        ("labeler", results.get("labeler")))]
    models = [(role, test["recall"]) for role, test in models if test.get("recall")]
    if not models:
        return []
    return ["", "Recall per class on the real test faces (%):", "", "| model | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes)] + [
        f"| {role} | " + " | ".join(_cell([recall.get(c)]) for c in classes) + " |" for role, recall in models]


def budget_rows(results: dict) -> list[str]:
    """One table line per model upstream of the downstream ones: the real rows it learnt from."""
    from synfer_ray.bundle import BundleManifest
    lines = []
    for role, info in (("guide", results["classifiers"]["guide"]), ("evaluator", results["classifiers"]["evaluator"])):
        how = f"data part {info['parts']}" if info.get("parts") else "taken as given (its own training record)"
        lines.append(f"| {role} | {info.get('train_rows', 'n/a')} | {how} |")
    training = BundleManifest.read(Path(results["generator"]["bundle"])).training
    if training is None:
        lines.append("| generator | 0 | random or imported weights: no training record |")
    else:
        data = training.get("data") or {}
        counts = data.get("class_counts") or {}
        steps = len(training.get("steps", []))
        lines.append(f"| generator | {round(sum(counts.values())) if counts else 'not recorded'} | "
                     f"{data.get('path', 'not recorded')}" + (f", then {steps} further training step(s)"
                                                                if steps else "") + " |")
    labeler = results.get("labeler")
    if labeler:
        lines.append(f"| labeler (FERAnno) | {labeler.get('train_rows', 'n/a')} | over the generator's frozen UNet |")
    return lines


def _downstream_budget(run: dict, real_train: str) -> tuple[Any, Any]:
    """(real rows, synthetic rows) a downstream model trained on, from its per-source row counts."""
    sources = run.get("source_rows")
    if not sources:
        return "n/a", "n/a"
    real = sum(s["rows"] for s in sources if s["path"] == real_train)
    return real, sum(s["rows"] for s in sources) - real


def headline_lines(results: dict) -> list[str]:
    """The paper's headline claim: every real row vs every real row plus accepted synthetic rows."""
    runs = results["downstream"]
    if "all real" not in runs or "all real + synthetic" not in runs:
        return []
    real = [r["test"]["accuracy"] for r in runs["all real"]]
    mixed = [r["test"]["accuracy"] for r in runs["all real + synthetic"]]
    gap = np.mean(mixed) - np.mean(real)
    spread = max(np.std(real), np.std(mixed))
    verdict = ("a gain larger than the seeds' spread" if gap > spread else
               "no gain beyond the seeds' spread" if gap > -spread else "a loss larger than the seeds' spread")
    lines = ["", "## The headline claim: all real rows, with and without synthetic rows", "",
             f"Test accuracy over {len(real)} seed(s): all real {_cell(real)}, all real + synthetic {_cell(mixed)}; "
             f"gap {100 * gap:+.1f} points against a spread (std) of {100 * spread:.1f}: {verdict}."]
    made = results.get("headline_synthetic") or {}
    targets = made.get("accepted_targets")
    if targets:
        lines += ["", f"The synthetic set: {made['rows']} rows made for "
                      f"{sum(targets['wanted'].values())} accepted ({targets['stopped']}; budget {targets['budget']} "
                      "rows). Accepted rows per class, by final label:", "",
                  *_one_row_table({c: f"{targets['accepted'][c]} of {n}" for c, n in targets["wanted"].items()})]
    elif made.get("accepted_by_label"):
        accepted = made["accepted_by_label"]
        lines += ["", f"The synthetic set: {made['rows']} rows made, equally many asked of each class; the "
                      f"labelers accepted {sum(accepted.values())} ({sum(accepted.values()) / made['rows']:.1%}), "
                      "all of which the model adds. Accepted rows per class, by final label:", "",
                  *_one_row_table(accepted)]
    return lines


def _one_row_table(cells: dict) -> list[str]:
    """A Markdown table of one row, a column per key."""
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells),
            "| " + " | ".join(str(v) for v in cells.values()) + " |"]


def vote_lines(votes: dict[str, dict], tau: float) -> list[str]:
    """The labelers' vote on real faces: does the labeler's vote add to the guide's?"""
    if not votes:
        return []
    lines = ["", "The vote that labels generated rows (the weighted mean of the voters' probabilities), on the "
             f"real test faces: its label's accuracy, and the rows it accepts at tau {tau} with the share of "
             "them labelled right.", "", "| vote | accuracy | UAR | accepted | right among accepted |",
             "|---|---|---|---|---|"]
    return lines + [f"| {name} | {_cell([v.get('accuracy')])} | {_cell([v.get('uar')])} | "
                    f"{_cell([v.get('acceptance')])} | {_cell([v.get('accepted_accuracy')])} |"
                    for name, v in votes.items()]


def stage_time_lines(times: Sequence[dict]) -> list[str]:
    """Wall time of each stage, from the run that made it (a cached stage keeps its first time); a
    stage stopped and continued, the sum of its parts (stages made before parts were counted: the last)."""
    if not times:
        return []
    lines = ["", "## Stage times", "", f"Wall time that made each stage (under `stages/`); a stage stopped and "
             f"continued: the sum of its parts, a stopped part counted to the last file it wrote (parts: "
             f"blank for stages made before they were counted, which record only their last part); "
             f"{sum(t['seconds'] for t in times) / 3600:.1f} h in all.", "", "| stage | minutes | parts |",
             "|---|---|---|"]
    return lines + [f"| `{t['stage']}` | {t['seconds'] / 60:.1f} | {t.get('parts') or ''} |" for t in times]


def sweep_lines(results: dict, classes: Sequence[str], directory: Path,
                setting: tuple[str, float] | None = None) -> list[str]:
    """The SG sweep's table, with each point's contact sheet copied next to the report; ``setting``
    (curve, scale): the study's own, where the weak classes are read (default: the sweep's pick)."""
    sweep = results.get("sweep")
    if not sweep:
        return []
    sheets = []
    for point in sweep["points"]:
        name = f"sweep_{point_name(point)}.png"
        source = Path(sweep["directory"]) / point["contact_sheet"]
        if source.is_file():
            shutil.copy(source, directory / name)
            sheets.append(f"`{name}`")
    return ["", "## SG sweep (the evaluator's agreement with the asked class, %)", "",
            "The study's sampling and seeds at each SG target, step rule and scale (percent of the norm of what "
            "SG steers; adaptive: each face's step times 1 - p(target)), the same images per class at every "
            "point. Diversity: the mean within-class cosine distance of the evaluator's embeddings (0 = all "
            "alike), which the default rule reads; among agreed: the same over the faces the evaluator reads "
            "as asked; pixels: the same over mean-centred grey pixels (class-blind: identity, pose, light). "
            "Real faces: the same readings of as many real test faces per class, a seeded draw.", "",
            sweep_table(sweep, classes, setting).rstrip("\n"), "",
            "Contact sheets: " + ", ".join(sheets) + "."]


def study_sg_point(sampling) -> tuple[str, float] | None:
    """The study's SG setting (a SamplingConfig) as a sweep curve and scale, where the report reads
    which classes stay weak."""
    if not sampling.sg_scale:
        return None
    return curve_name({"sg_target": sampling.sg_target, "sg_adaptive": sampling.sg_adaptive}), sampling.sg_scale


def _under_output(study: StudyConfig, path: str) -> str:
    """A stage's path as the report shows it: relative to the study's output, so that the report reads
    the same wherever the study ran; paths outside it (a given model) are shown whole."""
    try:
        return str(Path(path).resolve().relative_to(Path(study.output).resolve()))
    except ValueError:
        return path


def write_report(study: StudyConfig, results: dict, classes: Sequence[str], directory: Path,
                 complete: bool = True) -> Path:
    """``report.md`` and its pictures; ``complete=False`` while stages are still to come."""
    directory.mkdir(parents=True, exist_ok=True)
    sampling = study.generation.sampling
    class_scales = f", class scales {class_scales_text(sampling.sg_class_scales)}" if sampling.sg_class_scales else ""
    guide, evaluator = results["classifiers"]["guide"], results["classifiers"]["evaluator"]
    lines = [f"# {study.name}: SynFER's claims on real faces", "",
             *([] if complete else ["**In progress**: this report is rewritten as each stage finishes; tables "
                                    "without rows are still to come.", ""]),
             f"Real train `{study.real_train}`, real test `{study.real_test}`. "
             f"{study.generation.per_class} images per class and condition, the same seeds, prompts and AUs in "
             f"every condition; sampling {study.generation.sampling.steps} {study.generation.sampling.scheduler} steps, CFG "
             f"{study.generation.sampling.cfg_scale}, SG scale {study.generation.sampling.sg_scale} on "
             f"{study.generation.sampling.sg_target}"
             f"{class_scales}"
             f"{' (adaptive: times 1 - p(target))' if study.generation.sampling.sg_adaptive else ''}, window "
             f"{study.generation.sampling.sg_window}; labeler tau {study.generation.tau}"
             f"{', each voter reading a face and its mirror image' if study.generation.mirror_average else ''}.", "",
             "## The classifiers", "",
             "| role | model | architecture | seed | data part | test accuracy | UAR |", "|---|---|---|---|---|---|---|"]
    for role, info in (("guide (SG, votes)", guide), ("evaluator (scores only)", evaluator)):
        test = info.get("test") or {}
        lines.append(f"| {role} | `{_under_output(study, info['model'])}` | {info.get('arch') or info.get('model_type')} | "
                     f"{info.get('seed')} | {info.get('parts')} | {_cell([test.get('accuracy')])} | "
                     f"{_cell([test.get('uar')])} |")
    labeler_test = (results.get("labeler") or {}).get("test")
    if labeler_test:
        lines.append(f"| labeler (votes with the guide) | `{_under_output(study, results['labeler']['bundle'])}` | feranno | | all | "
                     f"{_cell([labeler_test.get('accuracy')])} | {_cell([labeler_test.get('uar')])} |")
    lines += recall_lines(results, classes)
    lines += vote_lines(results.get("votes") or {}, study.generation.tau)
    lines += ["", "## Real-data budget", "", "Real faces every model learnt from (rows of "
              f"`{Path(study.real_train).name}`; the downstream models' are in their table below).", "",
              "| model | real rows it learnt from | how |", "|---|---|---|"]
    lines += budget_rows(results)
    lines += ["", "## Generation quality (the evaluator's view, %)", "",
              "| condition | FER accuracy | acceptance | final label = target | final label = evaluator | "
              "accepted: label = evaluator | evaluator confidence | diversity |", "|---|---|---|---|---|---|---|---|"]
    for condition, scores in results["conditions"].items():
        lines.append(f"| {CONDITION_TITLES[condition]} | {_cell([scores['fer_accuracy']])} | "
                     f"{_cell([scores['acceptance']])} | {_cell([scores['label_matches_target']])} | "
                     f"{_cell([scores['label_agrees_with_evaluator']])} | "
                     f"{_cell([scores['accepted_label_agrees_with_evaluator']])} | "
                     f"{_cell([scores['evaluator_confidence']])} | {scores['diversity']:.3f} |")
    lines += ["", "FER accuracy per class (%):", "", "| condition | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for condition, scores in results["conditions"].items():
        per_class = scores["fer_accuracy_per_class"]
        lines.append(f"| {CONDITION_TITLES[condition]} | " + " | ".join(_cell([per_class.get(c)]) for c in classes)
                     + " |")
        source = Path(scores["dataset"]) / "report" / "contact_sheet.png"
        if source.is_file():
            shutil.copy(source, directory / f"contact_{condition}.png")
    lines += sweep_lines(results, classes, directory, study_sg_point(study.generation.sampling))
    lines += ["", "## Downstream: a classifier trained on each set, tested on real faces (%)", "",
              f"Real subset N = {study.downstream.real_rows}; synthetic = condition "
              f"{CONDITION_TITLES[study.downstream.condition]} ({study.downstream.synthetic_rows} rows: "
              f"{SYNTHETIC_ROWS[study.downstream.synthetic_rows]}), the first rows of "
              f"{'the headline set' if results.get('headline_synthetic') else 'a set of rows made for the largest multiple'}"
              f"; seeds {study.downstream.seeds}; "
              f"chance = {100 / len(classes):.1f}. Every model picks its best epoch on held-out real validation "
              f"rows of real train (never synthetic rows) and trains on none of them; each seed draws its own "
              f"split, which every model of that seed shares (validation rows: one count a seed).", "",
              "| training data | real rows | synthetic rows | real validation rows | accuracy | UAR | macro-F1 |",
              "|---|---|---|---|---|---|---|"]
    for name, runs in results["downstream"].items():
        real_rows, synthetic_rows = _downstream_budget(runs[0], study.real_train)
        validation_rows = " / ".join(str(r.get("val_rows", "n/a")) for r in runs)
        lines.append(f"| {name} | {real_rows} | {synthetic_rows} | {validation_rows} | "
                     f"{_cell([r['test']['accuracy'] for r in runs])} | "
                     f"{_cell([r['test']['uar'] for r in runs])} | {_cell([r['test']['macro_f1'] for r in runs])} |")
        confusion = Path(runs[0]["eval"]) / "confusion_matrix.png"
        if confusion.is_file():
            shutil.copy(confusion, directory / f"confusion_{name.replace(' ', '_').replace('+', 'plus')}.png")
    lines += headline_lines(results)
    lines += stage_time_lines(results.get("stage_times", []))
    lines += ["", "Contact sheets: " + ", ".join(f"`contact_{c}.png`" for c in results["conditions"]) + "; "
              "confusion matrices: `confusion_*.png`.", ""]
    report = directory / "report.md"
    report.write_text("\n".join(lines))
    return report
