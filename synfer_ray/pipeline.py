"""Ray Data: shard items -> GenerateShard actors -> LabelShard actors -> WriteShard actors.

A shard is the unit of work, retry and resume: each stage takes whole shards (one item per shard,
its rows as Arrow IPC bytes), so a retried task redoes exactly one shard and a shard is committed
only when all of its rows are made and labelled. Stages stream: shard 0 can be on disk while
shard 9 is still being sampled, and Ray's backpressure bounds what is in flight.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from synfer_ray.config import LabelingConfig, PoolConfig, RayConfig
from synfer_ray.data.manifest import ManifestSpec, manifest_rows
from synfer_ray.data.shards import ShardPlan, ShardStore
from synfer_ray.generator.sampler import SamplerSettings


@dataclass(frozen=True)
class GenerateJob:
    """Everything a worker needs, as plain values (validated before any Ray work)."""

    bundle: str
    output: str
    spec: ManifestSpec
    plan: ShardPlan
    settings: SamplerSettings
    sg_classifier: str | None
    sg_latent_guide: str | None  # a latent guide overriding the bundle's sg_latent_guide/
    labeling: LabelingConfig
    generator: PoolConfig
    labeler: PoolConfig
    precision: str = "auto"  # of the generator's and the labelers' weights (synfer_ray.precision)


WRITER_ACTORS = 2  # committing is I/O: two keep up with many GPU generators


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _custom(pool: PoolConfig) -> dict:
    return {"resources": dict(pool.resources)} if pool.resources else {}


class GenerateShard:
    """Actor: loads the bundle once, then turns shard items into tables of images."""

    def __init__(self, job: GenerateJob):
        import torch

        from synfer_ray.bundle import load_bundle
        from synfer_ray.generator.sampler import GuidedSampler
        from synfer_ray.precision import device_for, resolve
        torch.set_num_threads(job.generator.torch_threads)
        self.job = job
        device = device_for(job.generator.num_gpus)
        dtype = resolve(job.precision, device)
        bundle = load_bundle(job.bundle, verify=False, sg_classifier=job.sg_classifier,
                             sg_latent_guide=job.sg_latent_guide, dtype=dtype).to(device)
        self.sampler = GuidedSampler(bundle, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from synfer_ray.generator.rows import generate_rows
        tables, seconds = [], []
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            began = time.perf_counter()
            rows = manifest_rows(self.job.spec, int(start), int(stop))
            table = generate_rows(self.sampler, rows, self.job.settings, self.job.generator.batch_size, int(shard))
            tables.append(to_ipc(table))
            seconds.append(time.perf_counter() - began)
        return {"shard": batch["shard"], "table": np.array(tables, dtype=object),
                "seconds": np.array(seconds)}


class LabelShard:
    """Actor: loads the voters once, then appends votes and rectified labels to each shard."""

    def __init__(self, job: GenerateJob):
        import torch

        from synfer_ray.labeler.ensemble import PseudoLabeler, load_voters
        from synfer_ray.precision import device_for, resolve
        torch.set_num_threads(job.labeler.torch_threads)
        labeling = job.labeling
        device = device_for(job.labeler.num_gpus)
        voters = load_voters(labeling.voters, device, bundle_labeler=job.bundle if labeling.bundle_labeler else None,
                             bundle_labeler_weight=labeling.bundle_labeler_weight,
                             dtype=resolve(job.precision, device))
        self.labeler = PseudoLabeler(voters, job.spec.classes, job.labeling.tau,
                                     job.labeling.require_target_agreement, job.labeler.batch_size,
                                     job.labeling.mirror_average)
        self.keep_rejected = job.labeling.keep_rejected

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tables, seconds = [], []
        for data, generate_seconds in zip(batch["table"], batch["seconds"]):
            began = time.perf_counter()
            table = self.labeler.label_table(from_ipc(data))
            if not self.keep_rejected:
                table = table.filter(table.column("accepted"))
            tables.append(to_ipc(table))
            seconds.append(generate_seconds + time.perf_counter() - began)
        return {"shard": batch["shard"], "table": np.array(tables, dtype=object), "seconds": np.array(seconds)}


class WriteShard:
    """Actor: counts each finished shard (the card's statistics), commits it atomically with its
    record, and returns the record (JSON) for the driver.
    An actor, not a task: tasks at a fraction of a CPU started one fresh Python worker per shard
    (each importing torch through the pickled job), which made a 20-shard run 7x slower."""

    def __init__(self, job: GenerateJob):
        self.plan = job.plan
        self.classes = job.spec.classes
        self.store = ShardStore(job.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        from synfer_ray.data.card import shard_statistics
        records = []
        for shard, data, seconds in zip(batch["shard"], batch["table"], batch["seconds"]):
            table = from_ipc(data)
            records.append(self.store.commit_shard(self.plan, int(shard), table, float(seconds),
                                                   shard_statistics(table, self.classes)))
        return {"shard": batch["shard"], "record": np.array([json.dumps(r) for r in records], dtype=object)}


# Ray Data 2.60 starts this many actors (processes) to read Parquet footers for every Parquet read,
# 32 unless told: on a few cores that is most of a small read (FER-2013's test labels: 8 s vs 2.8 s
# with 2 on 2 cores) and most of a Ray Data pass on a small multi-node cluster.
PARQUET_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def footer_readers_for(num_cpus: int) -> None:
    """A local cluster of ``num_cpus`` logical CPUs reads footers with as many actors, at most Ray's
    32; set before its processes start (they inherit it); a value already set is kept."""
    os.environ.setdefault(PARQUET_FOOTER_ACTORS, str(max(1, min(32, num_cpus))))


def ensure_ray(config: RayConfig) -> None:
    """Attach to the cluster in ``config.address`` / ``RAY_ADDRESS``, or start a local one."""
    import ray
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        num_cpus = config.num_cpus or max(4, os.cpu_count() or 1)
        footer_readers_for(num_cpus)
        # With the dashboard (on 127.0.0.1): Train V2's placement-group cleaner asks the State API,
        # which the dashboard serves, whether a training run's controller is still alive.
        ray.init(num_cpus=num_cpus)


def run_shards(job: GenerateJob, shards: list[int]) -> Iterator[dict]:
    """Generate, label and commit ``shards`` of ``job.plan``; yield each shard's record as it lands."""
    import ray
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = [{"shard": k, "start": job.plan.rows(k)[0], "stop": job.plan.rows(k)[1]} for k in shards]
    gen, lab = job.generator, job.labeler
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(GenerateShard, batch_size=1, fn_constructor_kwargs={"job": job},
                     compute=ray.data.ActorPoolStrategy(min_size=gen.min_actors, max_size=gen.max_actors),
                     num_cpus=gen.num_cpus, num_gpus=gen.num_gpus, **_custom(gen))
        .map_batches(LabelShard, batch_size=1, fn_constructor_kwargs={"job": job},
                     compute=ray.data.ActorPoolStrategy(min_size=lab.min_actors, max_size=lab.max_actors),
                     num_cpus=lab.num_cpus, num_gpus=lab.num_gpus, **_custom(lab))
        .map_batches(WriteShard, batch_size=1, fn_constructor_kwargs={"job": job},
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=WRITER_ACTORS), num_cpus=0.25)
    )
    import json
    for row in dataset.iter_rows():
        yield json.loads(row["record"])
