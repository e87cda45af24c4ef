"""Labelled faces for training and evaluation: sources, label checks, decoding and augmentation.

Two Parquet shapes are read: labelled faces (``image`` bytes + ``label`` name, e.g. FER-2013) and
synfer datasets (a ``synfer generate`` directory: ``data/`` shards with ``label``, ``soft_label`` and
``accepted``). Decoding and augmentation are plain numpy, mapped by Ray Data in the training job.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from PIL import Image

from synfer_ray import taxonomy
from synfer_ray.data.shards import filesystem, is_uri
from synfer_ray.errors import SynferError


@dataclass(frozen=True)
class FaceSource:
    """Where one set of labelled faces lives, and what we know about it."""

    path: str  # a Parquet file or directory
    synthetic: bool  # a synfer dataset (has soft labels and the accepted flag)
    lineage: str  # sha256 of the dataset card, or of the file names and sizes

    @property
    def data_path(self) -> str:
        """What Parquet readers (pyarrow, Ray Data) open: a local path or a URI."""
        if not self.synthetic:
            return self.path
        return f"{self.path.rstrip('/')}/data" if is_uri(self.path) else str(Path(self.path) / "data")


def resolve_source(path: str, field: str) -> FaceSource:
    """A Parquet file or directory of labelled faces, or a finished synfer dataset, on a local path or
    any pyarrow filesystem URI (``s3://bucket/faces``)."""
    try:
        fs, root = filesystem(path)
        info = fs.get_file_info(root)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise SynferError(field, path, f"a local path or a URI pyarrow can open ({error})") from None
    if info.type == pafs.FileType.NotFound:
        raise SynferError(field, path, "an existing Parquet file or directory of labelled faces")
    directory = info.type == pafs.FileType.Directory
    path = path if is_uri(path) else str(Path(path))

    def is_file(name: str) -> bool:
        return directory and fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File

    if is_file("dataset.json"):
        with fs.open_input_stream(f"{root}/dataset.json") as stream:
            return FaceSource(path, True, hashlib.sha256(stream.read()).hexdigest())
    if is_file("generate_config.json"):
        raise SynferError(field, path, "a finished synfer dataset (no dataset.json yet: run generate again "
                                       "to finish it)")
    files = fs.get_file_info(pafs.FileSelector(root, recursive=True)) if directory else [info]
    if directory:
        files = [f for f in files if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")]
    if not files:
        raise SynferError(field, path, "a directory holding .parquet files")
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: PurePosixPath(f.path)):
        digest.update(f"{file.base_name}:{file.size}\n".encode())
    return FaceSource(path, False, digest.hexdigest())


def check_labels(source: FaceSource, classes: Sequence[str], field: str, accepted_only: bool = True) -> dict[str, int]:
    """Refuse a source with missing columns or labels outside ``classes``; return counts per class
    (of a synfer dataset's accepted rows only, unless ``accepted_only`` is False). The label column
    streams through in record batches: the driver never holds it whole."""
    dataset = pads.dataset(source.data_path, format="parquet")
    needed = {"image", "label"} | ({"accepted", "soft_label"} if source.synthetic else set())
    missing = needed - set(dataset.schema.names)
    if missing:
        raise SynferError(field, source.path, f"Parquet with columns {sorted(needed)}; missing {sorted(missing)}")
    use_accepted = source.synthetic and accepted_only
    raw: dict[str, int] = {}
    for batch in dataset.to_batches(columns=["label", "accepted"] if use_accepted else ["label"]):
        labels = batch.column(0)
        if use_accepted:
            labels = pc.filter(labels, pc.fill_null(batch.column(1), False))
        for item in pc.value_counts(labels).to_pylist():
            raw[str(item["values"])] = raw.get(str(item["values"]), 0) + int(item["counts"])
    counts: dict[str, int] = {}
    for name, count in sorted(raw.items()):
        canonical = taxonomy.EXPRESSION_ALIASES.get(name.strip().lower(), name.strip().lower())
        if canonical not in classes:
            raise SynferError(f"{field} (label column)", name,
                              f"one of the model's classes {list(classes)} (or an alias such as 'angry'); "
                              f"{count} rows have it")
        counts[canonical] = counts.get(canonical, 0) + int(count)
    return counts


def row_keys(images: Sequence[bytes]) -> np.ndarray:
    """A stable 64-bit id per row: a hash of its image bytes (the same row has the same id in any
    file, order or run)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(bytes(image), digest_size=8).digest(), "big")
                        for image in images), dtype=np.uint64, count=len(images))


def key_uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per row id, independent for each ``salt`` (splitmix64)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


SPLIT_SALT, LIMIT_SALT = 1, 2


@dataclass(frozen=True)
class RowSelection:
    """Which rows of a source a job reads, decided per row from its id (no shuffle, no driver):
    part ``k/n`` of the ids, accepted rows only, each row kept with probability ``keep`` (a limit
    or ratio: about ``keep * rows`` rows, the same ones on every run), and one side of a
    train/validation split of fraction ``val_fraction``."""

    part: str | None = None
    accepted_only: bool = False
    keep: float = 1.0
    seed: int = 0
    split: str | None = None  # "train", "validation" or None (no split)
    val_fraction: float = 0.0

    def mask(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        keys = row_keys(batch["image"])
        mask = np.ones(len(keys), bool)
        if self.part:
            index, count = map(int, self.part.split("/"))
            mask &= keys % np.uint64(count) == np.uint64(index - 1)
        if self.accepted_only:
            mask &= np.asarray(batch["accepted"], bool)
        if self.keep < 1:
            mask &= key_uniform(keys, LIMIT_SALT * 1000 + self.seed) < self.keep
        if self.split:
            validation = key_uniform(keys, SPLIT_SALT * 1000 + self.seed) < self.val_fraction
            mask &= validation if self.split == "validation" else ~validation
        return mask

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = self.mask(batch)
        return {key: value[mask] for key, value in batch.items()}


def in_part(images: Sequence[bytes], part: str | None) -> np.ndarray:
    """Mask of the rows in part ``"k/n"``, by a hash of the image bytes (stable across runs)."""
    return RowSelection(part=part).mask({"image": images})


def _decode(data: bytes, size: int) -> np.ndarray | None:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # any unreadable bytes are skipped and counted, never a crash
        return None
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode_faces(batch: dict[str, np.ndarray], classes: Sequence[str], image_size: int, soft: bool,
                 synthetic: bool) -> dict[str, np.ndarray]:
    """Parquet rows -> ``pixels`` (N, S, S, 3) uint8, ``target`` (N, K) float32, ``valid`` (N,) bool."""
    n = len(batch["image"])
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    target = np.zeros((n, len(classes)), np.float32)
    valid = np.zeros(n, bool)
    index = {c: i for i, c in enumerate(classes)}
    for row in range(n):
        decoded = _decode(batch["image"][row], image_size)
        if decoded is None:
            continue
        pixels[row], valid[row] = decoded, True
        name = str(batch["label"][row]).strip().lower()
        if synthetic and soft:
            target[row] = np.asarray(batch["soft_label"][row], np.float32)
        else:
            target[row, index[taxonomy.EXPRESSION_ALIASES.get(name, name)]] = 1.0
    return {"pixels": pixels, "target": target, "valid": valid}


def shuffled(dataset, shuffle: str, seed: int):
    """Training rows in a seeded random order (the same every epoch; the workers' local buffers
    reshuffle per epoch). "global" is Ray Data's all-to-all shuffle: sources written class by
    class (FER-2013's train.parquet, any folder import) must not reach a model in class runs, which
    a block order and a buffer of a few batches cannot undo. "blocks" only reorders blocks: cheaper,
    for sources whose rows are already in random order."""
    if shuffle == "global":
        return dataset.random_shuffle(seed=seed)
    return dataset.randomize_block_order(seed=seed)


def balance_classes(batch: dict[str, np.ndarray], repeats: Sequence[float],
                    seed: int | None = None) -> dict[str, np.ndarray]:
    """Class-balanced resampling: a row of class c appears floor(r_c) or ceil(r_c) times (r_c on
    average), with ``r_c = rows / (classes * count_c)``, so each class fills an equal share of an
    epoch of about the same length. Class = argmax of ``target``."""
    rng = np.random.default_rng(seed)
    wanted = np.asarray(repeats, np.float64)[batch["target"].argmax(axis=1)]
    copies = np.floor(wanted).astype(np.int64) + (rng.random(len(wanted)) < wanted - np.floor(wanted))
    index = np.repeat(np.arange(len(wanted)), copies)
    return {key: value[index] for key, value in batch.items()}


def augment(batch: dict[str, np.ndarray], crop_padding: int, flip: bool, color_jitter: float,
            seed: int | None = None) -> dict[str, np.ndarray]:
    """Random crop (reflect-padded), horizontal flip, brightness/contrast jitter; per image."""
    rng = np.random.default_rng(seed)
    pixels = batch["pixels"]
    n, size = pixels.shape[0], pixels.shape[1]
    out = np.empty_like(pixels)
    padded = np.pad(pixels, ((0, 0), (crop_padding,) * 2, (crop_padding,) * 2, (0, 0)), mode="reflect") \
        if crop_padding else pixels
    for i in range(n):
        dy, dx = rng.integers(0, 2 * crop_padding + 1, size=2) if crop_padding else (0, 0)
        image = padded[i, dy:dy + size, dx:dx + size].astype(np.float32)
        if flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if color_jitter:
            brightness = 1 + rng.uniform(-color_jitter, color_jitter)
            contrast = 1 + rng.uniform(-color_jitter, color_jitter)
            mean = image.mean()
            image = (image - mean) * contrast + mean * brightness
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return {**batch, "pixels": out}
