"""Evaluation of faces: a classifier on labelled faces (accuracy, UAR, macro-F1, per-class table, confusion
matrix) and the within-class diversity of a set of faces in any embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix  # rows: true class, columns: predicted


def metrics_from_confusion(matrix: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, UAR (mean recall over classes present), macro-F1 and the per-class table."""
    true_counts = matrix.sum(axis=1)
    predicted_counts = matrix.sum(axis=0)
    hits = np.diag(matrix)
    recall = np.divide(hits, true_counts, out=np.zeros(len(hits)), where=true_counts > 0)
    precision = np.divide(hits, predicted_counts, out=np.zeros(len(hits)), where=predicted_counts > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(hits)),
                   where=(precision + recall) > 0)
    present = true_counts > 0
    return {
        "accuracy": float(hits.sum() / max(matrix.sum(), 1)),
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "rows": int(matrix.sum()),
        "per_class": {c: {"support": int(true_counts[i]), "recall": float(recall[i]),
                          "precision": float(precision[i]), "f1": float(f1[i])} for i, c in enumerate(classes)},
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
    }


def class_diversities_from_sums(by_class: dict[str, tuple[int, np.ndarray]]) -> dict[str, float]:
    """Each class's mean pairwise cosine distance (0 = all alike), from its count n and sum S of unit
    embeddings: the sum of all cosine similarities is |S|^2. Classes of fewer than 2 rows have none."""
    return {name: float((n * n - np.dot(total, total)) / (n * (n - 1))) for name, (n, total) in by_class.items()
            if n >= 2}


def diversity_from_sums(by_class: dict[str, tuple[int, np.ndarray]]) -> float:
    """:func:`class_diversities_from_sums` averaged over classes."""
    values = list(class_diversities_from_sums(by_class).values())
    return float(np.mean(values)) if values else float("nan")


def _unit_sums(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, tuple[int, np.ndarray]]:
    unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
    return {name: (int((labels == name).sum()), unit[labels == name].sum(axis=0))
            for name in dict.fromkeys(labels.tolist())}


def diversity_by_class(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """:func:`class_diversities_from_sums` over rows held in memory."""
    return class_diversities_from_sums(_unit_sums(embeddings, labels))


def within_class_diversity(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """:func:`diversity_from_sums` over rows held in memory."""
    return diversity_from_sums(_unit_sums(embeddings, labels))


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """(rows, H, W, 3) uint8 -> (rows, H*W) grey pixels less each image's mean: a class-blind
    embedding, whose within-class diversity is that of identity, pose and light."""
    grey = images.astype(np.float32).mean(axis=-1).reshape(len(images), -1)
    return grey - grey.mean(axis=1, keepdims=True)


def headline_figures(report: dict) -> dict:
    """The figures a run summary keeps of a test report: the overall ones and each class's recall (a
    class a classifier cannot see on real faces it cannot score or vote for on generated ones)."""
    return {**{k: report[k] for k in ("accuracy", "uar", "macro_f1", "rows", "acceptance", "accepted_accuracy")
               if k in report},
            "skipped": report.get("skipped", 0),
            "recall": {name: row["recall"] for name, row in report["per_class"].items()}}


def plot_confusion(report: dict, path: Path, title: str = "confusion matrix (row-normalised)") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matrix = np.asarray(report["confusion_matrix"], dtype=float)
    normalised = matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
    classes = report["classes"]
    figure, axis = plt.subplots(figsize=(1 + 0.8 * len(classes), 1 + 0.7 * len(classes)))
    axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(classes)), classes, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            axis.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                      color="white" if normalised[i, j] > 0.5 else "black")
    axis.set_title(f"{title}\nacc {report['accuracy']:.3f}  UAR {report['uar']:.3f}  "
                   f"macro-F1 {report['macro_f1']:.3f}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def format_report(report: dict) -> str:
    lines = [f"accuracy {report['accuracy']:.4f}  UAR {report['uar']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
             f"(rows {report['rows']}, skipped {report.get('skipped', 0)}"
             f"{', each face averaged with its mirror image' if report.get('mirror_average') else ''})",
             f"{'class':10s} {'support':>8s} {'recall':>7s} {'precision':>9s} {'f1':>6s}"]
    for name, row in report["per_class"].items():
        lines.append(f"{name:10s} {row['support']:8d} {row['recall']:7.3f} {row['precision']:9.3f} {row['f1']:6.3f}")
    return "\n".join(lines)


def write_report(report: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "eval_report.json").write_text(json.dumps(report, indent=2))
    (directory / "eval_report.txt").write_text(format_report(report) + "\n")
    return [directory / "eval_report.json", directory / "eval_report.txt",
            plot_confusion(report, directory / "confusion_matrix.png")]
