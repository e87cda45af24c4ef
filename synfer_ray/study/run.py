"""``run_study``: the study's inputs checked, then every stage in order, the report rewritten as each finishes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synfer_ray.config import StudyConfig
from synfer_ray.errors import SynferError
from synfer_ray.study.report import write_report
from synfer_ray.study.scoring import flat_metrics, score_dataset
from synfer_ray.study.stages import (StageCache, _generate_fields, _preset_or_path, check_independent,
                                     classifier_stage, condition_config, config_hash, downstream_configs,
                                     downstream_stage, generation_stage, generator_stage, headline_generate_config,
                                     labeler_stage, sweep_stage, vote_stage)


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
