"""Pictures for people: contact sheets and per-class confidence histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

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


def confidence_histograms(histograms: Mapping[str, Sequence[int]], classes: Sequence[str], path: Path,
                          tau: float | None = None) -> Path:
    """One small histogram of label confidence per final class, from counts per equal bin over [0, 1]
    (what each shard's writer records)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(4, len(classes))
    rows = -(-len(classes) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.4 * rows), squeeze=False)
    for axis, name in zip(axes.flat, classes):
        counts = np.asarray(histograms.get(name, []), dtype=np.int64)
        if len(counts):
            axis.stairs(counts, np.linspace(0, 1, len(counts) + 1), fill=True, color="tab:blue")
        if tau is not None:
            axis.axvline(tau, color="tab:red", linestyle="--", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_title(f"{name} (n={int(counts.sum())})", fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(classes):]:
        axis.axis("off")
    figure.suptitle("label confidence by final class", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
