"""Per-shard statistics, written by the shard writer with each shard, and their sum: the card's figures.

The driver never re-reads rows to describe a dataset: each writer counts its own shard (targets,
labels, accepted rows, confidence histograms per class, a few example rows per class for the
contact sheet) and the card adds those counts up. The cost of finishing a run is then the number
of shards, not the number of rows.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

CONFIDENCE_BINS = 20  # histogram bins over [0, 1]
EXAMPLES_PER_CLASS = 8  # rows per target class a shard offers to the contact sheet


def shard_statistics(table: pa.Table, classes: Sequence[str]) -> dict:
    """Counts of one labelled shard, per class (lists in ``classes`` order)."""
    target = np.asarray(table.column("target").to_pylist(), dtype=object)
    label = np.asarray(table.column("label").to_pylist(), dtype=object)
    accepted = np.asarray(table.column("accepted").to_numpy(zero_copy_only=False), bool)
    confidence = np.asarray(table.column("confidence").to_numpy(zero_copy_only=False), np.float64)
    bins = np.minimum((confidence * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1)
    stats = {"rows": int(table.num_rows), "accepted": int(accepted.sum()),
             "label_matches_target": int((label == target).sum()),
             "target": [], "label": [], "accepted_by_label": [], "accepted_by_target": [],
             "confidence_sum": [], "confidence_histogram": [], "examples": {}}
    for name in classes:
        is_label, is_target = label == name, target == name
        stats["target"].append(int(is_target.sum()))
        stats["label"].append(int(is_label.sum()))
        stats["accepted_by_label"].append(int((is_label & accepted).sum()))
        stats["accepted_by_target"].append(int((is_target & accepted & is_label).sum()))
        stats["confidence_sum"].append(float(confidence[is_label].sum()))
        stats["confidence_histogram"].append(np.bincount(bins[is_label], minlength=CONFIDENCE_BINS).tolist())
        offsets = np.flatnonzero(is_target)[:EXAMPLES_PER_CLASS]
        if len(offsets):
            stats["examples"][name] = offsets.tolist()
    return stats


def total_statistics(shard_stats: Iterable[dict], classes: Sequence[str]) -> dict:
    """The sum of shard statistics (examples dropped: they point into single shards)."""
    k = len(classes)
    total = {"rows": 0, "accepted": 0, "label_matches_target": 0,
             **{key: np.zeros(k, np.int64) for key in ("target", "label", "accepted_by_label", "accepted_by_target")},
             "confidence_sum": np.zeros(k), "confidence_histogram": np.zeros((k, CONFIDENCE_BINS), np.int64)}
    for stats in shard_stats:
        for key in ("rows", "accepted", "label_matches_target"):
            total[key] += stats[key]
        for key in ("target", "label", "accepted_by_label", "accepted_by_target", "confidence_sum",
                    "confidence_histogram"):
            total[key] += np.asarray(stats[key])
    return total


def card_figures(total: dict, classes: Sequence[str]) -> dict:
    """The card's counts and rates, as plain JSON values."""
    rows = total["rows"]
    return {
        "rows": int(rows),
        "counts": {key: {c: int(v) for c, v in zip(classes, total[key])}
                   for key in ("target", "label", "accepted_by_label")},
        "acceptance_rate": total["accepted"] / rows if rows else 0.0,
        "label_agrees_with_target": total["label_matches_target"] / rows if rows else 0.0,
        "mean_confidence": {c: float(total["confidence_sum"][i] / total["label"][i]) if total["label"][i] else None
                            for i, c in enumerate(classes)},
        "confidence_histogram": {"bins": CONFIDENCE_BINS,
                                 "by_label": {c: total["confidence_histogram"][i].tolist()
                                              for i, c in enumerate(classes)}},
    }
