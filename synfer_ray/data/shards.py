"""Dataset shards: the plan (which manifest rows each shard holds), atomic commits, resume, the card.

A dataset directory (local path or any pyarrow/fsspec URI such as ``s3://bucket/ds``)::

    data/shard-00000-of-00004.parquet   committed shards, each written whole or not at all
    _shards/shard-00000.json            per-shard record: rows, sha256, bytes, seconds
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


@dataclass(frozen=True)
class ShardPlan:
    count: int
    rows_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.rows_per_shard)

    def rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.count)

    def file_name(self, shard: int) -> str:
        return f"shard-{shard:05d}-of-{self.num_shards:05d}.parquet"


class ShardStore:
    """A dataset directory on any pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        self.root = self.root.rstrip("/")

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

    def committed(self, plan: ShardPlan) -> set[int]:
        """Shards whose Parquet file is in ``data/`` (a commit is all or nothing)."""
        selector = pafs.FileSelector(self.path("data"), allow_not_found=True)
        names = {info.base_name for info in self.fs.get_file_info(selector)}
        return {k for k in range(plan.num_shards) if plan.file_name(k) in names}

    def commit_shard(self, plan: ShardPlan, shard: int, table: pa.Table, seconds: float) -> dict:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        start, stop = plan.rows(shard)
        record = {"shard": shard, "file": f"data/{plan.file_name(shard)}", "start": start, "stop": stop,
                  "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                  "seconds": round(seconds, 3)}
        # Record first: a shard file never exists without its record, so resume can trust data/.
        self.write_json(f"_shards/shard-{shard:05d}.json", record)
        self._atomic_write(f"data/{plan.file_name(shard)}", data)
        return record

    def shard_record(self, shard: int) -> dict:
        return self.read_json(f"_shards/shard-{shard:05d}.json")

    def read_table(self, plan: ShardPlan, columns: list[str] | None = None) -> pa.Table:
        files = [self.path("data", plan.file_name(k)) for k in sorted(self.committed(plan))]
        return pq.ParquetDataset(files, filesystem=self.fs).read(columns=columns)

    def clear(self) -> None:
        """Delete everything this module writes (for --overwrite)."""
        for directory in ("data", "_shards", "_tmp", "report"):
            if self.exists(directory):
                self.fs.delete_dir(self.path(directory))
        for name in (CONFIG_NAME, CARD_NAME):
            if self.exists(name):
                self.fs.delete_file(self.path(name))
