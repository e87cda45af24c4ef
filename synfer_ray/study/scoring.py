"""The evaluator's reading of generated sets: agreement with the asked class, label agreement,
confidence and diversity, scored inside Ray Data; and the study's figures as flat MLflow metrics."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from synfer_ray.data.faces import resolve_source
from synfer_ray.evaluate import diversity_from_sums
from synfer_ray.train.generator_report import point_name


class ScoreRows:
    """Ray Data actor: the evaluator's verdict on a batch of generated rows, as sums (no rows leave)."""

    def __init__(self, evaluator_path: str, classes: Sequence[str]):
        import torch

        from synfer_ray.models import load_classifier
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
