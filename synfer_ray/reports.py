"""Pictures for people: contact sheets and per-class confidence histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from synfer_ray.images import decode_rgb


def contact_sheet(images_by_class: dict[str, Sequence[bytes]], classes: Sequence[str], path: Path,
                  per_class: int = 8, cell: int = 64) -> Path:
    """One row per class, ``per_class`` images each, the class name at the left."""
    label_width = 90
    sheet = Image.new("RGB", (label_width + per_class * cell, len(classes) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(classes):
        draw.text((4, row * cell + cell // 2 - 6), name, fill="black")
        for column, data in enumerate(list(images_by_class.get(name, []))[:per_class]):
            face = Image.fromarray(decode_rgb(data)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(face, (label_width + column * cell, row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def confidence_histograms(confidence: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                          path: Path, tau: float | None = None) -> Path:
    """One small histogram of label confidence per final class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = np.asarray(labels)
    columns = min(4, len(classes))
    rows = -(-len(classes) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.4 * rows), squeeze=False)
    for axis, name in zip(axes.flat, classes):
        values = confidence[labels == name]
        axis.hist(values, bins=20, range=(0, 1), color="tab:blue")
        if tau is not None:
            axis.axvline(tau, color="tab:red", linestyle="--", linewidth=1)
        axis.set_title(f"{name} (n={len(values)})", fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(classes):]:
        axis.axis("off")
    figure.suptitle("label confidence by final class", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
