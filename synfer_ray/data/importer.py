"""``synfer data import``: labelled faces from common layouts into the one schema every job reads.

The labelled-faces schema (Parquet, one file per split under the output directory)::

    image      binary     encoded image bytes (PNG/JPEG as found; CSV pixels become PNG)
    label      string     canonical class name of the chosen class set
    caption    string     optional free text (null when the source has none)
    aus        list<f32>  optional AU intensities in [0, 1], in the order of metadata synfer.au_names
    source_id  string     stable id of the row in its source (file path, Parquet key, or content)

Sources: an image folder per class (RAF-DB / AffectNet style), a FER-2013-style CSV
(``emotion,pixels[,Usage]``) or Parquet with other column names. Labels map through a given map
(names or indices). Corrupt images, unknown labels and empty classes are refused with a count and
examples (or, with ``skip_bad``, dropped and listed in ``import_report.json``).

Row ids: a folder's file path, a Parquet ``--id-column``, or else the content: a hash of the image
(``#2``, ``#3`` ... for further copies of the same image), never the row's position or the file's
name, so adding, removing or reordering rows never changes another row's id. Rows go to ``train`` or
``validation`` by a seeded hash of the id (of the content, for content ids: copies of one image
land in the same split). A ``Usage`` column (FER-2013's; ``--usage-column`` for Parquet) keeps its
splits apart: ``Training`` rows are split train/validation, ``PublicTest`` and ``PrivateTest`` go
to ``public_test.parquet`` and ``private_test.parquet`` whole and never into train or validation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synfer_ray import taxonomy
from synfer_ray.errors import SynferError
from synfer_ray.images import png_bytes

SCHEMA_VERSION = "labelled-faces/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# FER-2013's CSV codes its classes 0..6 in this order.
FER2013_CODES = {"0": "anger", "1": "disgust", "2": "fear", "3": "happy", "4": "sad", "5": "surprise",
                 "6": "neutral"}
EXAMPLES = 5
# FER-2013's Usage values -> our split (None: train/validation by the id hash).
USAGE_SPLITS = {"Training": None, "PublicTest": "public_test", "PrivateTest": "private_test"}


@dataclass
class ImportOptions:
    kind: str = "auto"  # auto | folder | csv | parquet
    classes: tuple[str, ...] = taxonomy.AFFECTNET_7
    label_map: Mapping[str, str] | None = None  # source label (name or index, as text) -> class name
    image_column: str = "image"
    label_column: str = "label"
    caption_column: str | None = None
    aus_column: str | None = None
    au_names: tuple[str, ...] | None = None
    id_column: str | None = None
    usage_column: str | None = None  # CSV: "Usage" when the file has it
    val_fraction: float = 0.1
    seed: int = 0
    skip_bad: bool = False


@dataclass
class Row:
    source_id: str
    label: str
    image: bytes | None = None  # None: to be made from pixels
    pixels: np.ndarray | None = None
    caption: str | None = None
    aus: list[float] | None = None
    usage: str | None = None


@dataclass
class Rejections:
    corrupt: list[str] = field(default_factory=list)
    unknown_label: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"corrupt_images": {"count": len(self.corrupt), "examples": self.corrupt[:EXAMPLES]},
                "unknown_labels": {label: {"count": len(ids), "examples": ids[:EXAMPLES]}
                                   for label, ids in self.unknown_label.items()}}


def content_id(data: bytes) -> str:
    """The id part that names an image by its bytes (decoded pixels for CSV rows)."""
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def split_of(source_id: str, val_fraction: float, seed: int) -> str:
    """``train`` or ``validation``, from a seeded hash of the id alone (a copy suffix ``#k`` aside)."""
    source_id = source_id.split("#", 1)[0]
    digest = hashlib.blake2b(f"{seed}:{source_id}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") / 2 ** 64 < val_fraction else "train"


def detect_kind(source: Path) -> str:
    if source.is_dir():
        if any(p.suffix == ".parquet" for p in source.iterdir()):
            return "parquet"
        return "folder"
    if source.suffix.lower() == ".csv":
        return "csv"
    if source.suffix.lower() == ".parquet":
        return "parquet"
    raise SynferError("SRC", str(source), "an image folder per class, a FER-2013-style .csv, or .parquet")


def _folder_rows(source: Path, options: ImportOptions) -> Iterator[Row]:
    class_dirs = sorted(p for p in source.iterdir() if p.is_dir())
    if not class_dirs:
        raise SynferError("SRC", str(source), "a folder holding one sub-folder of images per class")
    for class_dir in class_dirs:
        for file in sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            yield Row(source_id=file.relative_to(source).as_posix(), label=class_dir.name, image=file.read_bytes())


def _csv_rows(source: Path, options: ImportOptions) -> Iterator[Row]:
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        label_column = "emotion" if options.label_column == "label" else options.label_column
        usage_column = options.usage_column or ("Usage" if "Usage" in (reader.fieldnames or []) else None)
        missing = {label_column, "pixels", usage_column} - {None} - set(reader.fieldnames or [])
        if missing:
            raise SynferError("SRC", str(source), f"a CSV with columns {sorted({label_column, 'pixels'})} "
                                                  f"(FER-2013 style); missing {sorted(missing)}")
        for record in reader:
            try:
                values = np.array(record["pixels"].split(), dtype=np.uint8)
                side = int(round(len(values) ** 0.5))
                pixels = values.reshape(side, side) if side * side == len(values) and side else None
            except ValueError:
                pixels = None
            content = pixels.tobytes() if pixels is not None else record["pixels"].encode()
            yield Row(source_id=content_id(content), label=record[label_column], pixels=pixels,
                      usage=record[usage_column] if usage_column else None)


def _parquet_rows(source: Path, options: ImportOptions) -> Iterator[Row]:
    import pyarrow.dataset as pads
    dataset = pads.dataset(str(source), format="parquet")
    wanted = [options.image_column, options.label_column] + [
        c for c in (options.caption_column, options.aus_column, options.id_column, options.usage_column) if c]
    missing = [c for c in wanted if c not in dataset.schema.names]
    if missing:
        raise SynferError("SRC", str(source), f"Parquet with columns {wanted}; missing {missing} "
                                              f"(name the columns with --image-column, --label-column, ...)")
    for batch in dataset.to_batches(columns=wanted):
        columns = {name: batch.column(name).to_pylist() for name in wanted}
        for row in range(batch.num_rows):
            image = columns[options.image_column][row]
            if isinstance(image, dict):  # HF datasets' {"bytes": ..., "path": ...}
                image = image.get("bytes")
            source_id = str(columns[options.id_column][row]) if options.id_column else \
                content_id(image or b"")
            yield Row(source_id=source_id, label=str(columns[options.label_column][row]), image=image,
                      caption=columns[options.caption_column][row] if options.caption_column else None,
                      aus=columns[options.aus_column][row] if options.aus_column else None,
                      usage=str(columns[options.usage_column][row]) if options.usage_column else None)


def _canonical(label: str, options: ImportOptions) -> str | None:
    mapped = label
    if options.label_map is not None:
        mapped = options.label_map.get(str(label).strip())
        if mapped is None:
            return None
    key = str(mapped).strip().lower()
    key = taxonomy.EXPRESSION_ALIASES.get(key, key)
    return key if key in options.classes else None


def _checked_image(row: Row) -> bytes | None:
    if row.pixels is not None:
        return png_bytes(row.pixels)
    if not row.image:
        return None
    try:
        with Image.open(io.BytesIO(row.image)) as image:
            image.load()
    except Exception:  # any unreadable bytes: counted and reported, never a crash
        return None
    return bytes(row.image)


def _schema(options: ImportOptions) -> pa.Schema:
    metadata = {"synfer.format": SCHEMA_VERSION, "synfer.classes": json.dumps(list(options.classes))}
    if options.au_names:
        metadata["synfer.au_names"] = json.dumps(list(options.au_names))
    return pa.schema([("image", pa.binary()), ("label", pa.string()), ("caption", pa.string()),
                      ("aus", pa.list_(pa.float32())), ("source_id", pa.string())], metadata=metadata)


def import_faces(source: str | Path, out: str | Path, options: ImportOptions) -> dict:
    """Convert ``source`` into ``out/{train,validation}.parquet`` and ``out/import_report.json``."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise SynferError("SRC", str(source), "an existing image folder, CSV or Parquet file/directory")
    if not 0 <= options.val_fraction < 1:
        raise SynferError("--val-fraction", options.val_fraction, "a fraction in [0, 1)")
    if options.aus_column and not options.au_names:
        raise SynferError("--au-set", None, "the AU names the aus column holds (fineface12 or opengraphau41)")
    kind = detect_kind(source) if options.kind == "auto" else options.kind
    if kind == "csv" and options.label_map is None:
        options.label_map = FER2013_CODES
    readers = {"folder": _folder_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    if kind not in readers:
        raise SynferError("--kind", kind, f"one of auto, {', '.join(readers)}")
    out.mkdir(parents=True, exist_ok=True)
    schema = _schema(options)
    staged: dict[str, Path] = {}
    writers: dict[str, pq.ParquetWriter] = {}
    buffers: dict[str, list[dict]] = {}
    counts: dict[str, dict[str, int]] = {}
    copies: dict[str, int] = {}  # content ids seen more than once, and how often
    seen: set[str] = set()
    rejections = Rejections()

    def open_split(split: str) -> None:
        staged[split] = out / f".{split}.parquet.tmp"
        writers[split] = pq.ParquetWriter(staged[split], schema)
        buffers[split], counts[split] = [], {name: 0 for name in options.classes}

    def flush(split: str) -> None:
        if buffers[split]:
            writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=schema))
            buffers[split].clear()

    for split in ("train", "validation"):
        open_split(split)
    try:
        for row in readers[kind](source, options):
            if row.usage is not None and row.usage not in USAGE_SPLITS:
                raise SynferError(options.usage_column or "Usage", row.usage,
                                  f"one of {list(USAGE_SPLITS)} (row {row.source_id})")
            label = _canonical(row.label, options)
            if label is None:
                rejections.unknown_label.setdefault(str(row.label), []).append(row.source_id)
                continue
            image = _checked_image(row)
            if image is None:
                rejections.corrupt.append(row.source_id)
                continue
            if row.aus is not None and options.au_names and len(row.aus) != len(options.au_names):
                raise SynferError(f"{options.aus_column} of {row.source_id}", f"{len(row.aus)} values",
                                  f"{len(options.au_names)} AU intensities ({', '.join(options.au_names)})")
            if row.source_id in seen:  # the same image again: its own id, the first copy's split
                copies[row.source_id] = copies.get(row.source_id, 1) + 1
                row.source_id = f"{row.source_id}#{copies[row.source_id]}"
            else:
                seen.add(row.source_id)
            split = USAGE_SPLITS.get(row.usage) or split_of(row.source_id, options.val_fraction, options.seed)
            if split not in writers:
                open_split(split)
            buffers[split].append({"image": image, "label": label, "caption": row.caption,
                                   "aus": row.aus, "source_id": row.source_id})
            counts[split][label] += 1
            if len(buffers[split]) >= 1024:
                flush(split)
        for split in writers:
            flush(split)
    except BaseException:  # a refused row: nothing staged survives, nothing already written is replaced
        for path in staged.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        for writer in writers.values():
            writer.close()
    report = {"source": str(source), "kind": kind, "classes": list(options.classes),
              "val_fraction": options.val_fraction, "seed": options.seed, "counts": counts,
              "rows": {split: sum(c.values()) for split, c in counts.items()}, "rejected": rejections.as_dict(),
              "skip_bad": options.skip_bad, "schema": SCHEMA_VERSION,
              "repeated_ids": {"count": len(copies), "examples": sorted(copies)[:EXAMPLES]}}
    try:
        _refuse_problems(report, rejections, options)
    except SynferError:
        for path in staged.values():
            path.unlink(missing_ok=True)
        raise
    for split, path in staged.items():
        path.replace(out / f"{split}.parquet")
    (out / "import_report.json").write_text(json.dumps(report, indent=2))
    return report


def _refuse_problems(report: dict, rejections: Rejections, options: ImportOptions) -> None:
    if not options.skip_bad:
        if rejections.corrupt:
            raise SynferError("SRC", report["source"], f"readable images; {len(rejections.corrupt)} are corrupt "
                                                       f"(e.g. {rejections.corrupt[:EXAMPLES]}); fix them, or pass "
                                                       f"--skip-bad to drop them and list them in the report")
        if rejections.unknown_label:
            listed = {label: len(ids) for label, ids in rejections.unknown_label.items()}
            raise SynferError("label", sorted(listed)[:EXAMPLES],
                              f"labels of the class set {list(options.classes)} (or a --label-map entry); "
                              f"unknown labels and their row counts: {listed}; e.g. rows "
                              f"{next(iter(rejections.unknown_label.values()))[:EXAMPLES]}")
    totals = {name: sum(report["counts"][split][name] for split in report["counts"]) for name in options.classes}
    empty = [name for name, count in totals.items() if count == 0]
    if empty:
        raise SynferError("classes", empty, f"at least one image per class of {list(options.classes)}; none for "
                                            f"{empty} (map labels onto them with --label-map, or choose a class "
                                            f"set without them with --expressions)")


def parse_label_map(text: str | None) -> dict[str, str] | None:
    """``"0=anger,1=disgust"`` or a path to a JSON/YAML mapping."""
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        import yaml
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise SynferError("--label-map", text, "a JSON/YAML mapping of source label -> class name")
        return {str(k): str(v) for k, v in loaded.items()}
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SynferError("--label-map", text, "SOURCE=CLASS pairs separated by commas, or a JSON/YAML file")
        pairs[key.strip()] = value.strip()
    return pairs


def class_counts_table(report: dict, classes: Sequence[str]) -> str:
    splits = list(report["counts"])  # train, validation, then public_test / private_test when imported
    lines = [f"{'class':<10} " + " ".join(f"{split:>12}" for split in splits)]
    for name in classes:
        lines.append(f"{name:<10} " + " ".join(f"{report['counts'][split][name]:>12}" for split in splits))
    lines.append(f"{'total':<10} " + " ".join(f"{report['rows'][split]:>12}" for split in splits))
    return "\n".join(lines)
