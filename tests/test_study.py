"""`synfer study` scaled down to minutes: every table cell produced, guide and evaluator different models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from synfer_ray.config import StudyConfig, build_config
from synfer_ray.errors import SynferError
from synfer_ray.evaluate import pixel_vectors, within_class_diversity
from synfer_ray.study import StageCache, check_independent


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    labels = np.array(["a"] * 4 + ["b"] * 4)
    same = np.tile([[1.0, 0.0]], (8, 1))
    assert within_class_diversity(same, labels) == pytest.approx(0.0, abs=1e-9)
    spread = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]] * 2, dtype=float)
    assert within_class_diversity(spread, labels) == pytest.approx(4 / 3)  # mean cosine distance of 4 axes
    # In pixels, class-blind: the same face lighter or darker is no variety; a face and its negative are.
    rng = np.random.default_rng(0)
    face = rng.integers(60, 190, (8, 8, 1)).repeat(3, axis=2)
    lighter = np.stack([face, face + 20, face - 30, face + 5]).astype(np.uint8)
    assert within_class_diversity(pixel_vectors(lighter), labels[:4]) == pytest.approx(0.0, abs=1e-6)
    negative = np.stack([face, 255 - face]).astype(np.uint8)
    assert within_class_diversity(pixel_vectors(negative), labels[:2]) == pytest.approx(2.0)


def test_the_evaluator_must_not_be_the_guide():
    guide = {"model": "g", "arch": "small_cnn", "seed": 0, "parts": ["1/2"], "weights_sha256": "x",
             "model_type": "resnet", "hidden_sizes": [32]}
    with pytest.raises(SynferError, match="same weights"):
        check_independent(guide, dict(guide))
    with pytest.raises(SynferError, match="architecture other than"):
        check_independent(guide, {**guide, "weights_sha256": "y", "seed": 1, "parts": ["2/2"]})
    other = {**guide, "weights_sha256": "y", "arch": "resnet18", "hidden_sizes": [64]}
    with pytest.raises(SynferError, match="seed other than"):
        check_independent(guide, {**other, "parts": ["2/2"]})
    with pytest.raises(SynferError, match="another part"):
        check_independent(guide, {**other, "seed": 1})
    check_independent(guide, {**other, "seed": 1, "parts": ["2/2"]})


def test_stage_cache_reuses_an_identical_stage_only(tmp_path):
    cache, calls = StageCache(tmp_path), []

    def make(directory):
        calls.append(directory)
        return {"value": len(calls)}
    first = cache.run("k", {"a": 1}, make)
    assert (first["value"], first["cached"]) == (1, False) and first["seconds"] >= 0
    assert cache.run("k", {"a": 1}, make) == {**first, "cached": True}
    assert cache.run("k", {"a": 2}, make)["value"] == 2 and len(calls) == 2
    # Each stage used, with the wall time of the run that made it (kept by a cached stage).
    assert [(t["cached"], t["seconds"]) for t in cache.times] == [(False, first["seconds"]), (True, first["seconds"]),
                                                                  (False, cache.times[2]["seconds"])]


def test_a_stage_stopped_and_continued_records_the_time_of_every_part(tmp_path):
    import os
    cache = StageCache(tmp_path)

    def stopped(directory):  # wrote a shard 30 s in, then the study was stopped
        (directory / "shard-0.parquet").write_text("rows")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cache.run("headline", {"a": 1}, stopped)
    directory = next((tmp_path / "stages").iterdir())
    parts = json.loads((directory / "parts.json").read_text())
    assert len(parts) == 1 and "seconds" not in parts[0]
    os.utime(directory / "shard-0.parquet", (parts[0]["started"] + 30,) * 2)

    def continued(directory):
        assert (directory / "shard-0.parquet").is_file()  # the first part's work is kept
        return {"rows": 2, "parts": ["1/2"]}  # a result's own fields (a classifier's data halves) are kept
    result = cache.run("headline", {"a": 1}, continued)
    assert result["stage_parts"] == 2 and 30 <= result["seconds"] < 35
    assert cache.times[-1]["parts"] == 2 and result["parts"] == ["1/2"]
    assert StageCache(tmp_path).run("headline", {"a": 1}, continued)["seconds"] == result["seconds"]
    from synfer_ray.study import stage_time_lines
    assert f"| `{directory.name}` | 0.5 | 2 |" in stage_time_lines(cache.times)


def test_a_headline_budget_needs_a_headline_target(tmp_path):
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "downstream": {"train": {"config": "x.yaml"}, "headline_max_rows": 1000}}
    with pytest.raises(SynferError, match="headline_max_rows is the budget of headline_synthetic_rows"):
        build_config(StudyConfig, raw)
    raw["downstream"]["headline_synthetic_rows"] = 70
    assert build_config(StudyConfig, raw).downstream.headline_max_rows == 1000


def test_the_headline_set_is_sized_by_rows_made_or_by_accepted_rows_per_class(tmp_path):
    from synfer_ray.config import TrackingConfig
    from synfer_ray.study import headline_generate_config, headline_lines
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "downstream": {"train": {"config": "x.yaml"}, "headline_rows": 100, "headline_synthetic_rows": 70}}
    with pytest.raises(SynferError, match="two ways to size the headline set; set one"):
        build_config(StudyConfig, raw)
    bundles, tracking = {"generator": "b", "labeler": "b-labeler"}, TrackingConfig(enabled=False)
    del raw["downstream"]["headline_synthetic_rows"]
    made = headline_generate_config(build_config(StudyConfig, raw), bundles, "g", 7, "out", tracking)
    # Rows made: rounded up to equally many per class, no accepted-count targets, labelled by the vote.
    assert (made.count, made.accepted_per_class, made.max_rows, made.bundle) == (105, None, None, "b-labeler")
    del raw["downstream"]["headline_rows"]
    raw["downstream"].update(headline_synthetic_rows=70, headline_max_rows=700)
    accepted = headline_generate_config(build_config(StudyConfig, raw), bundles, "g", 7, "out", tracking)
    assert (accepted.count, accepted.accepted_per_class, accepted.max_rows) == (None, 10, 700)
    # The report names what a rows-made set holds: every accepted row, per class by final label.
    runs = {"all real": [{"test": {"accuracy": 0.5}}], "all real + synthetic": [{"test": {"accuracy": 0.52}}]}
    lines = "\n".join(headline_lines({"downstream": runs, "headline_synthetic": {
        "rows": 105, "accepted_targets": None, "accepted_by_label": {"happy": 30, "sad": 12}}}))
    assert "105 rows made" in lines and "accepted 42 (40.0%)" in lines and "| 30 | 12 |" in lines
    assert "gap +2.0 points" in lines


def test_a_sweep_scale_must_be_positive(tmp_path):
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "downstream": {"train": {"config": "x.yaml"}}, "sweep": {"scales": [0, 8]}}
    with pytest.raises(SynferError, match="sweep.scales"):
        build_config(StudyConfig, raw)
    raw["sweep"] = {"targets": ["au"], "scales": [8, 64]}
    assert build_config(StudyConfig, raw).sweep.targets == ["au"]
    raw["sweep"] = {"targets": ["eyes"]}
    with pytest.raises(SynferError, match="sweep.targets"):
        build_config(StudyConfig, raw)


def test_downstream_synthetic_rows_choose_accepted_or_all(tmp_path):
    from synfer_ray.study import downstream_configs
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({"output": "unused", "data": {"train": [{"path": "x"}]}}))
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "downstream": {"real_rows": 100, "multiples": [1, 3], "train": {"config": str(train)}}}
    for rows, accepted_only in (("accepted", True), ("all", False)):
        raw["downstream"]["synthetic_rows"] = rows
        configs = downstream_configs(build_config(StudyConfig, raw), "synthetic", seed=0)
        assert [s.limit for s in configs["synthetic only 3x"].data.train] == [300]
        mixed = configs["real + synthetic 1x"].data.train
        assert [(s.path, s.limit, s.accepted_only, s.split) for s in mixed] == [
            ("real.parquet", 100, True, "train"), ("synthetic", 100, accepted_only, None)]
    # Every model of a seed picks its checkpoint on the same held-out real rows, synthetic-only ones too.
    configs = downstream_configs(build_config(StudyConfig, raw), "synthetic", seed=0, headline="headline")
    assert set(configs) == {"real only", "synthetic only 1x", "synthetic only 3x", "real + synthetic 1x", "all real",
                            "all real + synthetic"}
    for config in configs.values():
        assert (config.data.validation.path, config.data.validation.split) == ("real.parquet", "validation")
        assert all(s.split == "train" for s in config.data.train if s.path == "real.parquet")
    assert [(s.path, s.limit) for s in configs["all real + synthetic"].data.train] == [("real.parquet", None),
                                                                                     ("headline", None)]


def classifier_yaml(path, faces, arch, seed, part, epochs=1, test=False, **model):
    data = {"train": [{"path": str(faces["train"]), "part": part}], "val_fraction": 0.2}
    if test:
        data["test"] = {"path": str(faces["test"])}
    path.write_text(yaml.safe_dump({
        "output": "unused", "data": data,
        "model": {"arch": arch, **model}, "optim": {"epochs": epochs, "batch_size": 32, "seed": seed, "zero_stage": 0},
        "scaling": {"num_workers": 1, "torch_threads": 1}}))
    return str(path)


@pytest.mark.slow
@pytest.mark.long  # the longest run of the suite: `make test-long`
def test_scaled_down_study_fills_every_table_cell(ray_cluster, tiny_bundle_path, separable_parquet, tmp_path):
    from synfer_ray.study import run_study
    faces = separable_parquet
    study = build_config(StudyConfig, {
        "name": "study-ci", "output": str(tmp_path / "study"),
        "real_train": str(faces["train"]), "real_test": str(faces["test"]),
        "guide": {"config": classifier_yaml(tmp_path / "guide.yaml", faces, "small_cnn", 0, "1/2")},
        "evaluator": {"config": classifier_yaml(tmp_path / "evaluator.yaml", faces, "small_convnext", 1, "2/2")},
        "generator": {"model": str(tiny_bundle_path)},
        "labeler": {"config": classifier_yaml(tmp_path / "labeler.yaml", faces, "feranno", 0, None, test=True,
                                              labeler={"dim": 16, "heads": 2})},
        "generation": {"per_class": 2, "sampling": {"steps": 2, "cfg_scale": 2.0, "sg_scale": 1.0},
                       "tau": 0.0, "generator": {"min_actors": 1, "max_actors": 1, "batch_size": 8}},
        "sweep": {"targets": ["au", "text"], "scales": [4]},
        # One multiple: every further one is one more training of the same kind (downstream_configs'
        # test covers several).
        "downstream": {"real_rows": 70, "multiples": [1],
                       "train": {"config": classifier_yaml(tmp_path / "small.yaml", faces, "small_cnn", 0, None)},
                       "seeds": [0], "headline_synthetic_rows": 14, "headline_max_rows": 70},
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "study-ci"},
    })
    results = run_study(study)
    guide_model = results["classifiers"]["guide"]["model"]
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "n/a" not in report and "nan" not in report  # every cell has a figure
    assert str(tmp_path / "study") not in report  # stage paths read relative to the study's output
    assert f"| guide (SG, votes) | `{Path(guide_model).relative_to(tmp_path / 'study')}` |" in report
    assert "In progress" not in report  # rewritten after every stage (partial), and complete at the end
    for title in ("(a) text only", "(b) text + AU", "(c) text + AU + SG", "(d) text + AU + SG + labeler",
                  "real only", "synthetic only 1x", "real + synthetic 1x", "all real",
                  "all real + synthetic", "guide", "evaluator", "generator", "labeler (FERAnno)"):
        assert re.search(rf"\| {re.escape(title)} \| \d", report), title
    assert "## The headline claim" in report and "## Real-data budget" in report and "## Stage times" in report
    assert "Recall per class on the real test faces" in report and "Accepted rows per class" in report
    assert results["headline_synthetic"]["accepted_targets"]["budget"] == 70
    # The labelers' vote on real faces, the guide alone and with the labeler (tau 0 accepts every face).
    assert re.search(r"\| guide \+ labeler \| \d+\.\d \| \d+\.\d \| 100\.0 \| \d", report)
    assert list(results["votes"]) == ["guide", "labeler", "guide + labeler", "guide, mirror-averaged",
                                      "labeler, mirror-averaged", "guide + labeler, mirror-averaged"]
    assert re.search(r"\| labeler, mirror-averaged \| \d+\.\d \|", report)
    for role in ("guide", "evaluator", "labeler"):
        assert re.search(rf"\| {role} \| \d", report.split("Recall per class")[1]), role
    # Synthetic-only models choose their checkpoint on real rows: the same count as the real-only model's.
    downstream = results["downstream"]
    assert downstream["synthetic only 1x"][0]["val_rows"] == downstream["real only"][0]["val_rows"] > 0
    assert results["headline_synthetic"]["rows"] >= 14
    # The small comparisons draw from the headline set: no second synthetic set is made.
    assert results["synthetic"]["dataset"] == results["headline_synthetic"]["dataset"]
    assert not list((tmp_path / "study" / "stages").glob("synthetic-*"))
    guide, evaluator = results["classifiers"]["guide"], results["classifiers"]["evaluator"]
    assert guide["weights_sha256"] != evaluator["weights_sha256"] and guide["arch"] != evaluator["arch"]
    for condition in ("text", "text_au", "text_au_sg"):  # without the labeler the label is the target
        assert results["conditions"][condition]["label_matches_target"] == 1.0
    assert results["conditions"]["text_au_sg_labeler"]["rows"] == 14
    # The SG sweep: no SG, then each target at each scale, with a contact sheet per point.
    assert [(p["sg_target"], p["sg_scale"]) for p in results["sweep"]["points"]] == [
        ("none", 0), ("au", 4), ("text", 4)]
    assert results["sweep"]["sg_classifier"] == guide_model  # steered by the study's guide, not the bundle's
    assert "## SG sweep" in report and re.search(r"\| text \| 4 \| \*\*\d", report)
    # Read against real test faces: as many per class as the sweep makes, by the same evaluator.
    assert results["sweep"]["real_reference"]["rows"] == 14 and re.search(r"\| real faces \| \| \*\d", report)
    for name in ("contact_text.png", "contact_text_au_sg_labeler.png", "confusion_real_only.png",
                 "sweep_none_0.png", "sweep_au_4.png", "sweep_text_4.png"):
        assert (tmp_path / "study" / "report" / name).is_file()
    # One parent run, every stage a child run of it.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("study-ci").experiment_id])
    parent = [r for r in runs if r.info.run_id == results["mlflow_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) >= 3 + 5 + 5  # guide, evaluator, labeler; 5 generations; 5 downstream runs
    assert "fer_accuracy" in json.dumps(parent.data.metrics)
    assert "vote.guide_and_labeler_mirror-averaged.accuracy" in parent.data.metrics
    # A second run takes every stage from the cache.
    again = run_study(study)
    assert all(d["cached"] for runs_ in again["downstream"].values() for d in runs_) and again["sweep"]["cached"]
    assert again["votes"] == results["votes"] and [t["cached"] for t in again["stage_times"]
                                                   if t["stage"].startswith("votes-")] == [True]


def test_mirror_averaged_labeling_reaches_the_labeled_conditions_and_only_then_their_stage_keys(tmp_path):
    from synfer_ray.config import TrackingConfig
    from synfer_ray.study import _generate_fields, config_hash, condition_config
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "labeler": {"model": "l"}, "downstream": {"real_rows": 100, "train": {"model": "t"}}}

    def generate(condition: str, mirror: bool):
        raw["generation"] = {"mirror_average": mirror}
        return condition_config(build_config(StudyConfig, raw), condition, {"generator": "b", "labeler": "l"},
                                "g", 70, 0, "out", TrackingConfig(enabled=False))
    off, on = generate("text_au_sg_labeler", False), generate("text_au_sg_labeler", True)
    assert on.labeling.mirror_average and not off.labeling.mirror_average
    assert not generate("text_au_sg", True).labeling.mirror_average  # no voters there: nothing to mirror
    # Off, the key is the one stages cached before the setting existed; on, the stage is a new one.
    assert "mirror_average" not in _generate_fields(off, {"output"})["labeling"]
    assert config_hash(_generate_fields(on, {"output"})) != config_hash(_generate_fields(off, {"output"}))


def test_class_scales_reach_the_guided_conditions_and_not_the_sweeps_key(tmp_path):
    from synfer_ray.config import TrackingConfig
    from synfer_ray.study import _generate_fields, condition_config, config_hash, sweep_key
    raw = {"output": str(tmp_path), "real_train": "real.parquet", "real_test": "test.parquet",
           "guide": {"model": "g"}, "evaluator": {"model": "e"}, "generator": {"model": "b"},
           "labeler": {"model": "l"}, "downstream": {"real_rows": 100, "train": {"model": "t"}},
           "sweep": {"targets": ["au"], "scales": [8]}}

    def generate(condition: str, scales: dict, target: str = "au"):
        raw["generation"] = {"sampling": {"sg_scale": 8.0, "sg_class_scales": scales, "sg_target": target}}
        return condition_config(build_config(StudyConfig, raw), condition, {"generator": "b", "labeler": "l"},
                                "g", 70, 0, "out", TrackingConfig(enabled=False))
    off, on = generate("text_au_sg", {}), generate("text_au_sg", {"fear": 32.0})
    assert on.sampling.sg_class_scales == {"fear": 32.0} and generate("text_au_sg_labeler", {"fear": 32.0}) \
        .sampling.sg_class_scales == {"fear": 32.0}
    assert generate("text_au", {"fear": 32.0}).sampling.sg_class_scales == {}  # no SG there: no class steered

    def key(config):
        return config_hash(_generate_fields(config, {"output"}))
    # Without SG the SG settings change no face, nor the unguided conditions' keys (cached stages stay).
    for condition in ("text", "text_au"):
        assert key(generate(condition, {"fear": 32.0}, "both")) == key(generate(condition, {}, "au"))
    assert key(generate("text_au_sg", {}, "both")) != key(generate("text_au_sg", {}, "au"))
    # Empty, the key is the one stages cached before the setting existed; set, the stage is a new one.
    assert "sg_class_scales" not in _generate_fields(off, {"output"})["sampling"]
    assert config_hash(_generate_fields(on, {"output"})) != config_hash(_generate_fields(off, {"output"}))
    # Each sweep point sets its own scale, target and step rule, every class alike: the study's SG
    # choice, which the sweep informs, leaves its key (and its cached stage) as it was.
    swept = sweep_key(build_config(StudyConfig, raw), "b", "g", "e")
    for sampling in ({"sg_scale": 8.0}, {"sg_scale": 32.0, "sg_target": "both", "sg_adaptive": True}, {}):
        assert sweep_key(build_config(StudyConfig, {**raw, "generation": {"sampling": sampling}}), "b", "g", "e") \
            == swept
    assert swept != sweep_key(build_config(StudyConfig, {**raw, "generation": {"sampling": {"sg_window": 0.8}}}),
                              "b", "g", "e")
    assert "sg_class_scales" not in sweep_key(build_config(StudyConfig, raw), "b", "g", "e")["settings"]
