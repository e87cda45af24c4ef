"""The study's stages, each cached by its config (``stages/<kind>-<hash>/``): the two classifiers, the
generator, FERAnno, the labelers' vote, the generated sets, the SG sweep and its real reference, the
downstream models; and the configs each stage runs with."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from synfer_ray.config import (ADDED_GENERATE_SETTINGS, DEFAULT_SG_TARGET, GenerateConfig, GeneratorTrainConfig,
                               StudyConfig, StudyStage, TrainConfig, TrackingConfig, build_config, load_config,
                               without_added_settings)
from synfer_ray.config.generate import without_row_neutral_settings
from synfer_ray.errors import SynferError
from synfer_ray.evaluate import evaluate_model, evaluate_votes, headline_figures
from synfer_ray.train.generator_report import real_reference, sg_sweep


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
    """A generate config's fields, less ``exclude`` and the settings that change no row's bytes, as stage
    keys and lineage read them."""
    fields = without_row_neutral_settings(config.model_dump(mode="json", exclude=exclude))
    return without_added_settings(fields, ADDED_GENERATE_SETTINGS)


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
                     "sg_class_scales": sampling.sg_class_scales if guided else {},
                     "sg_guide": sampling.sg_guide if guided else "pixels",
                     "sg_reuse_pass": sampling.sg_reuse_pass and guided,
                     "sg_checkpointing": sampling.sg_checkpointing and guided,
                     "sg_latent_guide": sampling.sg_latent_guide if guided else None},
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


# --- SG sweep ------------------------------------------------------------------------------

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

    from synfer_ray.generator.latent_guide import is_latent_guide
    settings = dataclasses.asdict(sweep_base_settings(study))
    settings.pop("sg_checkpointing", None)  # changes no face: the same sweep with it on or off
    payload = {"bundle": bundle_hash, "guide": guide_sha256, "evaluator": evaluator_sha256,
               "settings": settings,
               "sweep": study.sweep.model_dump(mode="json"), "per_class": study.generation.per_class,
               "seed": study.generation.seed}
    # A latent guide given by path guides by its weights (the bundle's own is in the bundle's hash).
    latent_guide = study.generation.sampling.sg_latent_guide
    if latent_guide and settings["sg_guide"] == "latents" and is_latent_guide(latent_guide):
        payload["latent_guide"] = _classifier_description(latent_guide)["weights_sha256"]
    return without_added_settings(payload, {"settings.sg_adaptive": False, "settings.sg_class_scales": (),
                                            "sweep.step_rules": ["fixed"], "settings.sg_guide": "pixels",
                                            "settings.sg_reuse_pass": False})


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
                          sg_classifier=guide["model"], step_rules=study.sweep.step_rules,
                          sg_latent_guide=study.generation.sampling.sg_latent_guide)
        return {"directory": str(directory / "sweep"), "sg_classifier": guide["model"],
                "points": report["points"]}  # the pick is read from the points (sweep_table)
    return {**cache.run("sweep", payload, make), "real_reference": real_reference_stage(study, bundle, evaluator,
                                                                                        cache)}


def real_reference_stage(study: StudyConfig, bundle: str, evaluator: dict, cache: StageCache) -> dict:
    """The sweep's readings of real test faces (as many per class as the sweep makes), by the same
    evaluator: the scale its agreement and diversity are read against. A stage of its own, so that a
    sweep cached before it existed stays valid."""
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.models import load_classifier
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
