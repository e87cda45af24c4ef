"""Pipeline throughput against the ideal, and memory at N and 10*N rows, in one run.

    python benchmarks/bench_generate.py [--rows 64] [--steps 10] [--batch 16] [--workers 2]

Ideal = one plain in-process sampler loop per core (``--workers`` processes, one torch thread
each, same bundle, batch and steps), timed after model loading. The pipeline is timed twice:
end to end (Ray start-up and actor loading included) and in steady state (first to last shard
commit). Memory: peak RSS of the driver and of the largest Ray worker, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _plain_loop(bundle: str, rows: int, batch: int, steps: int, queue) -> None:
    import torch

    from synfer_ray.bundle import load_bundle
    from synfer_ray.data.manifest import ManifestSpec, manifest_rows
    from synfer_ray.generator.rows import generate_rows
    from synfer_ray.generator.sampler import GuidedSampler, SamplerSettings
    torch.set_num_threads(1)
    loaded = load_bundle(bundle)
    sampler = GuidedSampler(loaded)
    spec = ManifestSpec(0, loaded.classes, tuple([1 / len(loaded.classes)] * len(loaded.classes)), loaded.au_names)
    settings = SamplerSettings(steps=steps)
    manifest = manifest_rows(spec, 0, rows)
    start = time.perf_counter()
    generate_rows(sampler, manifest, settings, batch)
    queue.put(time.perf_counter() - start)


def ideal_rate(bundle: str, rows: int, batch: int, steps: int, workers: int) -> float:
    queue = mp.get_context("spawn").Queue()
    processes = [mp.get_context("spawn").Process(target=_plain_loop, args=(bundle, rows // workers, batch, steps,
                                                                           queue)) for _ in range(workers)]
    for process in processes:
        process.start()
    seconds = max(queue.get() for _ in processes)
    for process in processes:
        process.join()
    return rows / seconds


class PeakMemory:
    """Peak RSS of any Ray worker process (sampled), in MiB."""

    def __init__(self):
        self.worker_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            for process in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                if cmdline.startswith("ray::") and process.info["memory_info"]:
                    self.worker_peak = max(self.worker_peak, process.info["memory_info"].rss / 2**20)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def pipeline_run(bundle: str, output: Path, rows: int, batch: int, steps: int, workers: int) -> dict:
    from synfer_ray.config import GenerateConfig, build_config
    from synfer_ray.data.shards import ShardPlan, ShardStore
    from synfer_ray.generate import run_generate
    config = build_config(GenerateConfig, {
        "bundle": bundle, "output": str(output), "count": rows, "rows_per_shard": batch * 2,
        "sampling": {"steps": steps},
        "generator": {"min_actors": workers, "max_actors": workers, "num_cpus": 1, "batch_size": batch,
                      "torch_threads": 1},
        "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
    })
    began = time.perf_counter()
    with PeakMemory() as memory:
        card = run_generate(config, progress=False)
    total = time.perf_counter() - began
    store, plan = ShardStore(str(output)), ShardPlan(rows, batch * 2)
    commits = sorted(Path(store.path("data", plan.file_name(k))).stat().st_mtime for k in range(plan.num_shards))
    first_shard_rows = batch * 2
    steady = (rows - first_shard_rows) / max(commits[-1] - commits[0], 1e-9)
    return {"rows": card["rows"], "end_to_end": rows / total, "steady": steady, "worker_peak_mib": memory.worker_peak,
            "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    bundle = args.bundle
    if bundle is None:
        from synfer_ray.bundle import make_tiny_bundle
        bundle = scratch / "tiny"
        make_tiny_bundle(bundle)
    import ray
    ray.init(num_cpus=max(4, args.workers + 2), include_dashboard=False, log_to_driver=False)
    small = pipeline_run(str(bundle), scratch / "n", args.rows, args.batch, args.steps, args.workers)
    large = pipeline_run(str(bundle), scratch / "10n", args.rows * 10, args.batch, args.steps, args.workers)
    ideal = ideal_rate(str(bundle), args.rows * 2, args.batch, args.steps, args.workers)
    print(f"bundle {bundle}, batch {args.batch}, {args.steps} steps, {args.workers} generator actors / processes")
    print(f"ideal (plain loop per core, after loading):   {ideal:7.2f} img/s")
    for name, run in (("N", small), ("10N", large)):
        print(f"pipeline {name:3s} = {run['rows']:5d} rows: end to end {run['end_to_end']:6.2f} img/s "
              f"({run['end_to_end'] / ideal:.2f}x ideal), steady state {run['steady']:6.2f} img/s "
              f"({run['steady'] / ideal:.2f}x ideal)")
    print(f"peak RSS, N -> 10N: largest Ray worker {small['worker_peak_mib']:.0f} -> {large['worker_peak_mib']:.0f} MiB "
          f"({large['worker_peak_mib'] / small['worker_peak_mib']:.2f}x); driver {small['driver_peak_mib']:.0f} -> "
          f"{large['driver_peak_mib']:.0f} MiB (ru_maxrss, cumulative)")
    ray.shutdown()


if __name__ == "__main__":
    main()
