"""Dataset shards: the plan (which manifest rows each shard holds), atomic commits, resume, the card.

A dataset directory (local path or any pyarrow/fsspec URI such as ``s3://bucket/ds``)::

    data/shard-00000-of-00004.parquet   committed shards of the first pass, each written whole or not at all
    data/pass-01-shard-00000-of-00002.parquet   shards of top-up pass 1 (accepted-count targets)
    _shards/shard-00000.json            per-shard record: rows, sha256, bytes, seconds, statistics
    _shards/index.json                  every record in one file, written when a run finishes
    _passes.json                        the passes planned so far (top-up passes are recorded before they run)
    _tmp/                               shards being written (ignored by Parquet readers)
    generate_config.json                the config that made it; a different one is refused
    dataset.json                        the card, written when every shard is committed
    report/                             contact sheet and confidence histograms

Names starting with ``_`` are skipped by pyarrow, Ray Data, DuckDB and Hugging Face readers, so
``data/`` reads as one clean table at any moment.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from synfer_ray.errors import SynferError

CONFIG_NAME = "generate_config.json"
CARD_NAME = "dataset.json"
PASSES_NAME = "_passes.json"
INDEX_NAME = "_shards/index.json"


ROW_GROUP_ROWS = 256  # Parquet row groups: a reader can fetch a few rows of a big shard
TARGET_SHARD_BYTES = 256 << 20  # img2dataset-sized shard files
MAX_ROWS_PER_SHARD = 10_000


def auto_rows_per_shard(count: int, resolution: int, actors: int) -> int:
    """Rows per shard when the config leaves it open: files of about TARGET_SHARD_BYTES (a PNG face
    takes about 1.5 bytes a pixel), at most MAX_ROWS_PER_SHARD, and at least 4 shards per generator
    actor so a small run still keeps every actor busy."""
    by_bytes = TARGET_SHARD_BYTES // int(resolution * resolution * 1.5)
    by_parallelism = -(-count // (4 * max(1, actors)))
    return int(max(16, min(MAX_ROWS_PER_SHARD, by_bytes, by_parallelism)))


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one pass: manifest rows ``start .. start + count - 1`` in runs of ``rows_per_shard``."""

    count: int
    rows_per_shard: int
    start: int = 0
    pass_index: int = 0  # 0: the first pass (its file names are those of a run without passes)

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.rows_per_shard)

    def rows(self, shard: int) -> tuple[int, int]:
        first = shard * self.rows_per_shard
        return self.start + first, self.start + min(first + self.rows_per_shard, self.count)

    @property
    def _prefix(self) -> str:
        return f"pass-{self.pass_index:02d}-" if self.pass_index else ""

    def file_name(self, shard: int) -> str:
        return f"{self._prefix}shard-{shard:05d}-of-{self.num_shards:05d}.parquet"

    def record_name(self, shard: int) -> str:
        return f"_shards/{self._prefix}shard-{shard:05d}.json"


def is_uri(location: str) -> bool:
    return "://" in str(location)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (``s3://bucket/key``, ``gs://``, ``hdfs://``, ``file://``) -> its pyarrow
    filesystem and the path on it (a local path made absolute). S3 endpoints and credentials come
    from the standard variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
    of the process that opens it: every Ray node needs them."""
    if is_uri(location):
        fs, root = pafs.FileSystem.from_uri(str(location))
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    return fs, root.rstrip("/")


class ShardStore:
    """A dataset directory on any pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def check_writable(self) -> None:
        """Create the directory and write a probe file, or raise naming ``output``."""
        probe = self.path("_tmp", f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.path("_tmp"), recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"ok")
            self.fs.delete_file(probe)
        except (OSError, pa.ArrowException) as error:
            raise SynferError("output", self.uri, f"a directory or URI this user can write to ({error})") from None

    # --- json sidecars ---------------------------------------------------------------------

    def write_json(self, relative: str, payload: Any) -> None:
        self._atomic_write(relative, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, relative: str) -> Any:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return json.loads(stream.read())

    def _atomic_write(self, relative: str, data: bytes) -> None:
        final = self.path(relative)
        temporary = self.path("_tmp", f"{uuid.uuid4().hex}-{relative.replace('/', '_')}")
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        self.fs.create_dir(self.path("_tmp"), recursive=True)
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        # A rename on local and POSIX-like filesystems; object stores make each object whole anyway.
        self.fs.move(temporary, final)

    # --- shards ----------------------------------------------------------------------------

    def data_files(self) -> set[str]:
        """The names in ``data/``: one listing, however many passes and shards ask."""
        selector = pafs.FileSelector(self.path("data"), allow_not_found=True)
        return {info.base_name for info in self.fs.get_file_info(selector)}

    def committed(self, plan: ShardPlan, names: set[str] | None = None) -> set[int]:
        """Shards whose Parquet file is in ``data/`` (a commit is all or nothing)."""
        names = self.data_files() if names is None else names
        return {k for k in range(plan.num_shards) if plan.file_name(k) in names}

    def commit_shard(self, plan: ShardPlan, shard: int, table: pa.Table, seconds: float,
                     statistics: dict | None = None) -> dict:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        data = buffer.getvalue()
        start, stop = plan.rows(shard)
        record = {"shard": shard, "pass": plan.pass_index, "file": f"data/{plan.file_name(shard)}",
                  "start": start, "stop": stop, "rows": table.num_rows, "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "seconds": round(seconds, 3),
                  "statistics": statistics}
        # Record first: a shard file never exists without its record, so resume can trust data/.
        self.write_json(plan.record_name(shard), record)
        self._atomic_write(f"data/{plan.file_name(shard)}", data)
        return record

    def shard_record(self, plan: ShardPlan, shard: int) -> dict:
        return self.read_json(plan.record_name(shard))

    def records(self, plans: list[ShardPlan]) -> list[dict]:
        """The records of every committed shard of ``plans``: from ``_shards/index.json`` where it has
        them (one read), the rest one file each (shards committed since the index was written)."""
        indexed = {}
        if self.exists(INDEX_NAME):
            indexed = {record["file"]: record for record in self.read_json(INDEX_NAME)["records"]}
        names = self.data_files()
        records = []
        for plan in plans:
            for k in sorted(self.committed(plan, names)):
                record = indexed.get(f"data/{plan.file_name(k)}")
                records.append(record if record is not None else self.shard_record(plan, k))
        return records

    def write_index(self, records: list[dict]) -> None:
        self.write_json(INDEX_NAME, {"records": records})

    def read_rows(self, record: dict, offsets: list[int], columns: list[str]) -> pa.Table:
        """Rows ``offsets`` of one committed shard, reading only the row groups that hold them."""
        groups = sorted({offset // ROW_GROUP_ROWS for offset in offsets})
        with self.fs.open_input_file(self.path(record["file"])) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read_row_groups(groups, columns=columns)
        positions = {group: index * ROW_GROUP_ROWS for index, group in enumerate(groups)}
        return table.take([positions[o // ROW_GROUP_ROWS] + o % ROW_GROUP_ROWS for o in offsets])

    def clear(self) -> None:
        """Delete everything this module writes (for --overwrite)."""
        for directory in ("data", "_shards", "_tmp", "report"):
            if self.exists(directory):
                self.fs.delete_dir(self.path(directory))
        for name in (CONFIG_NAME, CARD_NAME, PASSES_NAME):
            if self.exists(name):
                self.fs.delete_file(self.path(name))
