"""`synfer data import`: three source layouts, counts, a split fixed by the id hash, refusals."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from synfer_ray import taxonomy
from synfer_ray.cli import app
from synfer_ray.data.importer import ImportOptions, import_faces, split_of
from synfer_ray.errors import SynferError

CLASSES = taxonomy.AFFECTNET_7


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 48), value, np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def make_folder(root, per_class: int = 3, extra: dict[str, list[bytes]] | None = None):
    for k, name in enumerate(["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i}.png").write_bytes(png(10 * k + i))
    for name, images in (extra or {}).items():
        (root / name).mkdir(exist_ok=True)
        for i, data in enumerate(images):
            (root / name / f"x{i}.png").write_bytes(data)
    return root


def read(out, split):
    return pq.read_table(out / f"{split}.parquet")


def test_folder_per_class_is_imported_with_counts_and_schema(tmp_path):
    report = import_faces(make_folder(tmp_path / "src"), tmp_path / "out", ImportOptions(val_fraction=0.3))
    total = {name: report["counts"]["train"][name] + report["counts"]["validation"][name] for name in CLASSES}
    assert total == dict.fromkeys(CLASSES, 3)  # 'angry' folder became 'anger'
    table = pa.concat_tables([read(tmp_path / "out", "train"), read(tmp_path / "out", "validation")])
    assert table.schema.names == ["image", "label", "caption", "aus", "source_id"]
    assert table.num_rows == 21 and set(table.column("label").to_pylist()) == set(CLASSES)
    assert table.schema.metadata[b"synfer.format"] == b"labelled-faces/1"
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["rows"] == report["rows"]


def test_fer2013_csv_with_codes_becomes_png_faces(tmp_path):
    lines = ["emotion,pixels,Usage"] + [f"{code},{' '.join(['128'] * 2304)},Training" for code in range(7)] * 2
    (tmp_path / "fer.csv").write_text("\n".join(lines) + "\n")
    report = import_faces(tmp_path / "fer.csv", tmp_path / "out", ImportOptions(val_fraction=0.0))
    assert report["rows"] == {"train": 14, "validation": 0}
    table = read(tmp_path / "out", "train")
    assert table.column("label").to_pylist()[:7] == ["anger", "disgust", "fear", "happy", "sad", "surprise",
                                                     "neutral"]
    assert Image.open(io.BytesIO(table.column("image")[0].as_py())).size == (48, 48)


def fer_csv(path, rows) -> None:
    """A FER-2013-style CSV of (code, grey level, Usage) rows, each face one flat grey level."""
    lines = ["emotion,pixels,Usage"] + [f"{code},{' '.join([str(level)] * 2304)},{usage}"
                                        for code, level, usage in rows]
    path.write_text("\n".join(lines) + "\n")


def test_usage_keeps_fer2013_test_splits_apart(tmp_path):
    rows = [(k % 7, k, "Training") for k in range(60)] + [(k % 7, 100 + k, "PublicTest") for k in range(14)] + \
        [(k % 7, 200 + k, "PrivateTest") for k in range(7)]
    fer_csv(tmp_path / "fer.csv", rows)
    report = import_faces(tmp_path / "fer.csv", tmp_path / "out", ImportOptions(val_fraction=0.3))
    assert report["rows"]["public_test"] == 14 and report["rows"]["private_test"] == 7
    assert report["rows"]["train"] + report["rows"]["validation"] == 60 and report["rows"]["validation"] > 0
    levels = {split: {Image.open(io.BytesIO(data)).getpixel((0, 0))
                      for data in read(tmp_path / "out", split).column("image").to_pylist()}
              for split in ("train", "validation", "public_test", "private_test")}
    assert levels["train"] | levels["validation"] == set(range(60))  # no test face in train or validation
    assert levels["public_test"] == set(range(100, 114)) and levels["private_test"] == set(range(200, 207))
    fer_csv(tmp_path / "bad.csv", [(0, 1, "Training"), (1, 2, "Validation")])
    with pytest.raises(SynferError, match="Usage.*PublicTest"):
        import_faces(tmp_path / "bad.csv", tmp_path / "out-bad", ImportOptions())
    assert not list((tmp_path / "out-bad").glob("*.parquet*"))  # nothing staged survives a refusal


def test_csv_and_parquet_row_ids_come_from_content_not_position(tmp_path):
    rows = [(k % 7, k, "Training") for k in range(40)]
    fer_csv(tmp_path / "a.csv", rows)
    fer_csv(tmp_path / "b.csv", [(0, 250, "Training"), (0, 5, "Training")] + rows[::-1])  # reordered, one copy more
    import_faces(tmp_path / "a.csv", tmp_path / "out-a", ImportOptions(val_fraction=0.3))
    report = import_faces(tmp_path / "b.csv", tmp_path / "out-b", ImportOptions(val_fraction=0.3))

    def ids(out, split):
        return set(read(out, split).column("source_id").to_pylist())
    for split in ("train", "validation"):  # every row of a keeps its id and its split in b
        assert ids(tmp_path / "out-a", split) <= ids(tmp_path / "out-b", split)
    copies = [i for i in ids(tmp_path / "out-b", "train") | ids(tmp_path / "out-b", "validation") if "#" in i]
    assert len(copies) == 1 and report["repeated_ids"]["count"] == 1
    original = copies[0].split("#")[0]
    assert any(original in ids(tmp_path / "out-b", s) and copies[0] in ids(tmp_path / "out-b", s)
               for s in ("train", "validation"))  # a copy lands in its original's split
    pq.write_table(pa.table({"image": [png(i) for i in range(14)], "label": [CLASSES[i % 7] for i in range(14)]}),
                   tmp_path / "c.parquet")
    pq.write_table(pa.table({"image": [png(i) for i in range(13, -1, -1)],
                             "label": [CLASSES[i % 7] for i in range(13, -1, -1)]}), tmp_path / "d.parquet")
    for name in ("c", "d"):
        import_faces(tmp_path / f"{name}.parquet", tmp_path / f"out-{name}", ImportOptions(val_fraction=0.3))
    for split in ("train", "validation"):
        assert ids(tmp_path / "out-c", split) == ids(tmp_path / "out-d", split)


def test_parquet_with_other_column_names_and_a_label_map(tmp_path):
    pq.write_table(pa.table({"img": [png(i) for i in range(14)], "y": [i % 7 for i in range(14)],
                             "text": [f"face {i}" for i in range(14)], "key": [f"k{i}" for i in range(14)]}),
                   tmp_path / "src.parquet")
    mapping = "0=neutral,1=happy,2=sad,3=surprise,4=fear,5=disgust,6=anger"
    result = CliRunner().invoke(app, ["data", "import", str(tmp_path / "src.parquet"), str(tmp_path / "out"),
                                      "--image-column", "img", "--label-column", "y", "--caption-column", "text",
                                      "--id-column", "key", "--label-map", mapping, "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "14" in result.output
    table = read(tmp_path / "out", "train")
    assert table.column("source_id").to_pylist()[0] == "k0" and table.column("caption").to_pylist()[1] == "face 1"
    assert table.column("label").to_pylist()[:2] == ["neutral", "happy"]


def test_split_depends_only_on_the_id_and_seed(tmp_path):
    ids = [f"train/happy/{i}.png" for i in range(2000)]
    splits = [split_of(i, 0.1, seed=0) for i in ids]
    assert splits == [split_of(i, 0.1, seed=0) for i in ids]  # deterministic
    assert 0.07 < splits.count("validation") / len(ids) < 0.13
    assert splits != [split_of(i, 0.1, seed=1) for i in ids]  # the seed changes it
    first = import_faces(make_folder(tmp_path / "a", per_class=6), tmp_path / "out-a", ImportOptions(val_fraction=0.3))
    bigger = make_folder(tmp_path / "b", per_class=6, extra={"happy": [png(200), png(201)]})
    second = import_faces(bigger, tmp_path / "out-b", ImportOptions(val_fraction=0.3))
    val_a = set(read(tmp_path / "out-a", "validation").column("source_id").to_pylist())
    val_b = set(read(tmp_path / "out-b", "validation").column("source_id").to_pylist())
    assert val_a == {i for i in val_b if "/x" not in i}  # extra rows never move existing ones
    assert second["rows"]["train"] + second["rows"]["validation"] == first["rows"]["train"] + \
        first["rows"]["validation"] + 2


def test_corrupt_image_is_refused_with_count_and_example_and_nothing_is_replaced(tmp_path):
    out = tmp_path / "out"
    import_faces(make_folder(tmp_path / "good"), out, ImportOptions())
    before = (out / "train.parquet").read_bytes()
    source = make_folder(tmp_path / "src", extra={"happy": [b"\x89PNG truncated", b"not an image"]})
    with pytest.raises(SynferError, match=r"2 are corrupt.*happy/x0.png.*--skip-bad"):
        import_faces(source, out, ImportOptions())
    assert (out / "train.parquet").read_bytes() == before and not list(out.glob(".*tmp"))
    report = import_faces(source, out, ImportOptions(skip_bad=True))
    assert report["rejected"]["corrupt_images"]["count"] == 2


def test_unknown_label_is_refused_naming_it(tmp_path):
    source = make_folder(tmp_path / "src", extra={"contempt": [png(1)], "bored": [png(2), png(3)]})
    with pytest.raises(SynferError, match=r"bored.*'bored': 2.*'contempt': 1"):
        import_faces(source, tmp_path / "out", ImportOptions())
    report = import_faces(source, tmp_path / "out8", ImportOptions(classes=taxonomy.AFFECTNET_8, skip_bad=True))
    assert report["rejected"]["unknown_labels"]["bored"]["count"] == 2
    assert report["counts"]["train"]["contempt"] + report["counts"]["validation"]["contempt"] == 1


def test_missing_column_is_refused(tmp_path):
    pq.write_table(pa.table({"pixels": [png(1)], "label": ["happy"]}), tmp_path / "src.parquet")
    with pytest.raises(SynferError, match=r"missing \['image'\].*--image-column"):
        import_faces(tmp_path / "src.parquet", tmp_path / "out", ImportOptions())


def test_empty_class_is_refused(tmp_path):
    source = make_folder(tmp_path / "src")
    for file in (source / "disgust").iterdir():
        file.unlink()
    with pytest.raises(SynferError, match=r"none for \['disgust'\]"):
        import_faces(source, tmp_path / "out", ImportOptions())
