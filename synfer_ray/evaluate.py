"""Evaluation of faces: a classifier, or the vote of several as generate's labelers vote, on labelled
faces (accuracy, UAR, macro-F1, per-class table, confusion matrix, acceptance) and the within-class
diversity of a set of faces in any embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def evaluate_model(model_path: str | Path, data_path: str, batch_size: int = 256, device: str = "auto",
                   mirror_average: bool = False) -> dict[str, Any]:
    """Evaluate a saved classifier on labelled faces (in this process, on ``device``: auto is CUDA where
    torch sees it; fp32, so figures compare across machines; skipped images counted)."""
    return {**evaluate_ensemble([model_path], data_path, batch_size=batch_size, device=device,
                                mirror_average=mirror_average),
            "model": str(model_path)}


def evaluate_ensemble(model_paths: Sequence[str | Path], data_path: str, weights: Sequence[float] | None = None,
                      tau: float = 0.5, batch_size: int = 256, device: str = "auto",
                      mirror_average: bool = False) -> dict[str, Any]:
    """Evaluate classifiers voting as a generate run's labelers do (the weighted mean of their
    probabilities, :func:`synfer_ray.labeler.rectify.rectify`; ``mirror_average`` as
    ``labeling.mirror_average``) on labelled faces: the usual report of the vote's label, plus which
    share of rows the vote accepts at ``tau`` and how many of those it labels right. With one model,
    that model's own report."""
    return evaluate_votes({"vote": (model_paths, weights)}, data_path, tau, batch_size, device,
                          (mirror_average,))[("vote", mirror_average)]


def evaluate_votes(ensembles: Mapping[str, tuple[Sequence[str | Path], Sequence[float] | None]], data_path: str,
                   tau: float = 0.5, batch_size: int = 256, device: str = "auto",
                   mirror_readings: Sequence[bool] = (False,)) -> dict[tuple[str, bool], dict[str, Any]]:
    """:func:`evaluate_ensemble` for several votes at once, each read plainly and/or mirror-averaged
    (``mirror_readings``), keyed ``(name, mirror_average)``: one pass over the data in which each
    model reads each face (and its mirror image) once, however many votes it is in."""
    import pyarrow.dataset as pads
    import torch

    from synfer_ray.classifiers import predict_readings
    from synfer_ray.models import load_classifier
    from synfer_ray.data.faces import check_labels, decode_faces, resolve_source
    from synfer_ray.errors import SynferError
    from synfer_ray.labeler.rectify import align_probabilities, rectify
    if device not in ("auto", "cpu", "cuda"):
        raise SynferError("--device", device, "auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SynferError("--device", device, "cpu or auto on a machine without CUDA")
    paths = list(dict.fromkeys(str(path) for members, _ in ensembles.values() for path in members))
    models = {path: load_classifier(path, field="model").to(device) for path in paths}
    classes = tuple(models[paths[0]].classes)
    source = resolve_source(data_path, "data")
    check_labels(source, classes, "data")
    batches = pads.dataset(source.data_path, format="parquet").to_batches(columns=["image", "label"],
                                                                            batch_size=batch_size)
    votes = [(name, mirror) for mirror in mirror_readings for name in ensembles]
    matrix = {vote: np.zeros((len(classes),) * 2, np.int64) for vote in votes}
    accepted, accepted_right = dict.fromkeys(votes, 0), dict.fromkeys(votes, 0)
    skipped = 0
    for batch in batches:  # streamed: the test set is never held whole
        columns = {"image": batch.column("image").to_pylist(), "label": batch.column("label").to_pylist()}
        by_size = {size: decode_faces(columns, classes, size, soft=False, synthetic=False)
                   for size in {model.image_size for model in models.values()}}
        # A face one model cannot decode is skipped by all.
        valid = np.logical_and.reduce([decoded["valid"] for decoded in by_size.values()])
        skipped += int((~valid).sum())
        if not valid.any():
            continue
        truth = next(iter(by_size.values()))["target"][valid].argmax(axis=1)
        readings = {}  # path -> {mirror: probabilities}
        for path, model in models.items():
            pixels = by_size[model.image_size]["pixels"][valid]
            plain, averaged = predict_readings(model, pixels, batch_size, mirrored=True in mirror_readings)
            readings[path] = {mirror: align_probabilities(probabilities, model.classes, classes, "model")
                              for mirror, probabilities in ((False, plain), (True, averaged))
                              if probabilities is not None}
        for name, mirror in votes:
            members, weights = ensembles[name]
            vote = rectify(np.stack([readings[str(path)][mirror] for path in members]), weights, tau)
            matrix[(name, mirror)] += confusion_matrix(truth, vote.label_index, len(classes))
            accepted[(name, mirror)] += int(vote.accepted.sum())
            accepted_right[(name, mirror)] += int((vote.label_index == truth)[vote.accepted].sum())
    reports = {}
    for name, mirror in votes:
        report = metrics_from_confusion(matrix[(name, mirror)], classes)
        report.update(skipped=skipped, data=data_path, models=[str(path) for path in ensembles[name][0]],
                      mirror_average=mirror, tau=tau,
                      acceptance=accepted[(name, mirror)] / max(int(matrix[(name, mirror)].sum()), 1),
                      accepted_accuracy=(accepted_right[(name, mirror)] / accepted[(name, mirror)]
                                         if accepted[(name, mirror)] else float("nan")))
        reports[(name, mirror)] = report
    return reports


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
