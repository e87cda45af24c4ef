"""``synfer data``: bring labelled faces into the schema every job reads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synfer_ray.cli.common import fail
from synfer_ray.errors import SynferError

app = typer.Typer(help="Bring labelled faces into the schema every job reads.", no_args_is_help=True)


@app.command("import")
def data_import(
    source: Path = typer.Argument(..., help="Image folder per class, FER-2013-style CSV, or Parquet."),
    out: Path = typer.Argument(..., help="Output directory (train.parquet, validation.parquet, report)."),
    kind: str = typer.Option("auto", help="auto, folder, csv or parquet."),
    expressions: str = typer.Option("affectnet7", help="Class set: affectnet7 or affectnet8."),
    label_map: Optional[str] = typer.Option(None, help="SOURCE=CLASS pairs (0=anger,1=disgust) or a JSON/YAML file."),
    image_column: str = typer.Option("image", help="Parquet: the image-bytes column."),
    label_column: str = typer.Option("label", help="Parquet/CSV: the label column (CSV default: emotion)."),
    caption_column: Optional[str] = typer.Option(None, help="Parquet: a caption column."),
    aus_column: Optional[str] = typer.Option(None, help="Parquet: an AU-vector column."),
    au_set: Optional[str] = typer.Option(None, help="AU names of the AU column: fineface12 or opengraphau41."),
    id_column: Optional[str] = typer.Option(None, help="Parquet: a stable row id (default: a hash of the image)."),
    usage_column: Optional[str] = typer.Option(
        None, help="Parquet: FER-2013-style Usage (Training / PublicTest / PrivateTest); CSV: Usage when present."),
    val_fraction: float = typer.Option(0.1, help="Share of rows for validation (by id hash)."),
    seed: int = typer.Option(0, help="Seed of the split hash."),
    skip_bad: bool = typer.Option(False, help="Drop corrupt images and unknown labels (listed in the report)."),
) -> None:
    """Convert labelled faces into the labelled-faces Parquet schema, split train/validation by id hash."""
    from synfer_ray import taxonomy
    from synfer_ray.data.importer import ImportOptions, class_counts_table, import_faces, parse_label_map
    try:
        classes = taxonomy.expression_set(expressions)
        options = ImportOptions(kind=kind, classes=classes, label_map=parse_label_map(label_map),
                                image_column=image_column, label_column=label_column,
                                caption_column=caption_column, aus_column=aus_column,
                                au_names=taxonomy.au_set(au_set) if au_set else None, id_column=id_column,
                                usage_column=usage_column,
                                val_fraction=val_fraction, seed=seed, skip_bad=skip_bad)
        report = import_faces(source, out, options)
    except SynferError as error:
        fail(error)
    typer.echo(class_counts_table(report, classes))
    rejected = report["rejected"]
    dropped = rejected["corrupt_images"]["count"] + sum(v["count"] for v in rejected["unknown_labels"].values())
    if dropped:
        typer.echo(f"dropped {dropped} rows (see {out / 'import_report.json'})")
    typer.echo(f"wrote {out / 'train.parquet'} and {out / 'validation.parquet'}")
