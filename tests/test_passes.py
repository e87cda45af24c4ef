"""Top-up passes and per-shard statistics: the pure parts of accepted-count targets and the card."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from synfer_ray.data.card import card_figures, shard_statistics, total_statistics
from synfer_ray.data.manifest import ManifestSpec, manifest_rows
from synfer_ray.data.passes import Pass, plan_top_up, quota_target, shortfall

CLASSES = ("neutral", "happy", "sad")


def test_a_top_up_pass_asks_each_short_class_for_its_missing_rows_over_its_acceptance():
    first = Pass(0, 0, 300, 100)
    step = plan_top_up([first], wanted={"neutral": 50, "happy": 50, "sad": 50},
                       made_by_target={"neutral": 100, "happy": 100, "sad": 100},
                       accepted={"neutral": 10, "happy": 60, "sad": 0}, budget_left=10_000,
                       rows_per_shard=lambda rows: 64)
    # neutral: 40 missing at 10% -> 400 * 1.15; happy is done; sad never accepted -> the 2% floor
    assert step == Pass(1, 300, 460 + 2875, 64, (("neutral", 460), ("sad", 2875)))
    assert shortfall({"neutral": 50, "happy": 50}, {"neutral": 10, "happy": 60}) == {"neutral": 40}


def test_the_budget_scales_a_pass_down_and_ends_the_passes():
    first = Pass(0, 0, 100, 50)
    step = plan_top_up([first], {"neutral": 50, "sad": 50}, {"neutral": 50, "sad": 50}, {"neutral": 25, "sad": 25},
                       budget_left=30, rows_per_shard=lambda rows: rows)
    assert step.count <= 30 and dict(step.quotas) == {"neutral": 15, "sad": 15}
    assert plan_top_up([first], {"neutral": 50}, {"neutral": 50}, {"neutral": 0}, 0, lambda rows: rows) is None
    assert plan_top_up([first], {"neutral": 5}, {"neutral": 50}, {"neutral": 9}, 100, lambda rows: rows) is None


def test_a_top_up_pass_makes_new_rows_of_its_quota_classes_after_the_existing_ones():
    spec = ManifestSpec(seed=1, classes=CLASSES, class_weights=(1 / 3,) * 3, au_names=("AU1", "AU12"))
    first = manifest_rows(spec, 0, 10)
    top_up = ManifestSpec(**{**spec.__dict__, "quotas": (("neutral", 3), ("sad", 2)), "quota_start": 10})
    rows = manifest_rows(top_up, 10, 15)
    assert [r.target for r in rows] == ["neutral"] * 3 + ["sad"] * 2
    assert [r.sample_id for r in rows] == list(range(10, 15))
    assert not {r.seed for r in rows} & {r.seed for r in first}
    assert manifest_rows(top_up, 12, 14)[0].seed == rows[2].seed  # any slice makes the same rows
    with pytest.raises(IndexError):
        quota_target((("neutral", 3),), 3)


def labelled(targets, labels, confidence, accepted):
    return pa.table({"target": targets, "label": labels, "confidence": pa.array(confidence, pa.float32()),
                     "accepted": accepted})


def test_the_card_is_the_sum_of_the_shards_statistics():
    one = shard_statistics(labelled(["sad", "sad", "happy"], ["sad", "happy", "happy"], [0.9, 0.4, 0.99],
                                    [True, False, True]), CLASSES)
    two = shard_statistics(labelled(["neutral"] * 2, ["neutral", "sad"], [0.5, 0.05], [True, False]), CLASSES)
    assert one["examples"] == {"sad": [0, 1], "happy": [2]}
    figures = card_figures(total_statistics([one, two], CLASSES), CLASSES)
    assert figures["rows"] == 5 and figures["acceptance_rate"] == pytest.approx(3 / 5)
    assert figures["counts"]["label"] == {"neutral": 1, "happy": 2, "sad": 2}
    assert figures["counts"]["accepted_by_label"] == {"neutral": 1, "happy": 1, "sad": 1}
    assert figures["mean_confidence"]["sad"] == pytest.approx((0.9 + 0.05) / 2)
    assert figures["label_agrees_with_target"] == pytest.approx(3 / 5)
    histogram = figures["confidence_histogram"]["by_label"]
    assert sum(histogram["happy"]) == 2 and histogram["happy"][-1] == 1 and histogram["sad"][1] == 1
    assert np.sum([sum(v) for v in histogram.values()]) == 5
