"""Millions of rows: cost per row and the driver's memory from 10^4 to 10^6 rows, in one run.

    python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--train] [--work DIR]

The generator is the real pipeline (manifest -> GenerateShard actors -> LabelShard actors ->
WriteShard actors -> card and report) with a generator cheap enough for 10^6 rows on 2 cores: a
tiny random-weight SD-layout bundle at 16x16 (4x4 latents), 1 DDIM step, CFG and SG off, labelled
by the bundle's tiny guide (tau 0: its random weights are never confident, so every row is accepted). Shard sizes are the default (``rows_per_shard`` null).

For each size, ``synfer generate`` runs as its own driver process (so its peak RSS is its own):
rows/s end to end (Ray start included), the driver's peak RSS, the time to finish (index, report,
card), the time to resume the already-complete run, and ``synfer inspect``. With ``--train``, one
epoch of ``synfer train`` (small CNN at 16x16, 2 workers) over the largest set: the driver's peak
RSS and the workers' ``data_wait_seconds``. The last two lines are the targets' ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CHILD = "--child"


def _child(kind: str, config_path: str) -> None:
    """One driver: run the job, then print its result and this process's peak RSS as JSON."""
    began = time.perf_counter()
    if kind == "generate":
        from synfer_ray.config import GenerateConfig, load_config
        from synfer_ray.generate import run_generate
        card = run_generate(load_config(GenerateConfig, config_path), progress=False)
        result = {"rows": card["rows"], "timing": card["timing"], "shards": card["shards"]}
    elif kind == "inspect":
        from synfer_ray.config import GenerateConfig, load_config
        from synfer_ray.generate import inspect_dataset
        _, problems = inspect_dataset(load_config(GenerateConfig, config_path).output)
        result = {"problems": problems}
    else:
        from synfer_ray.config import TrainConfig, load_config
        from synfer_ray.train.fer import run_train
        summary = run_train(load_config(TrainConfig, config_path))
        result = {"history": summary["history"]}
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, config: dict, work: Path, log) -> dict:
    path = work / f"{kind}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, __file__, CHILD, kind, str(path)], capture_output=True, text=True)
    log.write(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{kind} failed (rc {done.returncode}); see the log:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def generate_config(bundle: Path, output: Path, rows: int) -> dict:
    return {
        "bundle": str(bundle), "output": str(output), "count": rows, "seed": 0,
        "sampling": {"steps": 1, "cfg_scale": 1.0, "sg_scale": 0.0},
        "labeling": {"voters": [{"path": str(bundle / "sg_classifier"), "name": "guide"}], "tau": 0.0},
        "generator": {"min_actors": 2, "max_actors": 2, "num_cpus": 1, "batch_size": 512, "torch_threads": 1},
        "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "batch_size": 512},
        "ray": {"num_cpus": 4}, "tracking": {"enabled": False},
    }


def train_config(dataset: Path, output: Path) -> dict:
    return {
        "name": "scale", "output": str(output),
        "data": {"train": [{"path": str(dataset)}], "image_size": 16, "val_fraction": 0.01,
                 "augment": {"crop_padding": 2}},
        "model": {"arch": "small_cnn"},
        "optim": {"epochs": 1, "batch_size": 256, "zero_stage": 0},
        "scaling": {"num_workers": 2}, "ray": {"num_cpus": 4},
        "tracking": {"enabled": False}, "register_as": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--train", action="store_true", help="one training epoch over the largest set")
    parser.add_argument("--work", type=Path, help="where the datasets go (default: a temporary directory)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    from synfer_ray.bundle import make_tiny_bundle
    bundle = work / "tiny-16"
    if not bundle.is_dir():
        make_tiny_bundle(bundle, resolution=16)
    results = {}
    with (work / "bench_scale.log").open("w") as log:
        for rows in args.sizes:
            config = generate_config(bundle, work / f"ds-{rows}", rows)
            first = run_child("generate", config, work, log)
            resumed = run_child("generate", config, work, log)
            inspected = run_child("inspect", config, work, log)
            assert first["rows"] == rows and not inspected["problems"], (first, inspected)
            results[rows] = {"rows_per_s": rows / first["seconds"], "rss": first["peak_rss_mb"],
                             "finish": first["timing"]["finish_seconds"], "resume": resumed["seconds"],
                             "inspect": inspected["seconds"], "seconds": first["seconds"], "shards": first["shards"]}
            r = results[rows]
            print(f"{rows:>9,d} rows in {r['shards']:4d} shards: {r['rows_per_s']:8.1f} rows/s end to end "
                  f"({r['seconds']:.0f} s), driver peak RSS {r['rss']:.0f} MB, finish {r['finish']:.2f} s, "
                  f"resume of the complete run {r['resume']:.1f} s, inspect {r['inspect']:.1f} s", flush=True)
        if args.train:
            largest = max(args.sizes)
            trained = run_child("train", train_config(work / f"ds-{largest}", work / "train"), work, log)
            epoch = trained["history"][-1]
            print(f"synfer train, 1 epoch over {largest:,d} rows (small CNN 16x16, 2 workers): "
                  f"{trained['seconds']:.0f} s, {epoch['train_rows'] / epoch['train_seconds']:.0f} img/s, "
                  f"data_wait_seconds {epoch['data_wait_seconds']:.1f} of {epoch['train_seconds']:.1f}, "
                  f"driver peak RSS {trained['peak_rss_mb']:.0f} MB", flush=True)
    sizes = sorted(results)
    if len(sizes) >= 2:
        top, second, bottom = sizes[-1], sizes[-2], sizes[0]
        print(f"rows/s ratio 10^{len(str(top)) - 1} vs 10^{len(str(second)) - 1}: "
              f"{results[top]['rows_per_s'] / results[second]['rows_per_s']:.2f}x")
        print(f"driver peak RSS ratio 10^{len(str(top)) - 1} vs 10^{len(str(bottom)) - 1}: "
              f"{results[top]['rss'] / results[bottom]['rss']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == CHILD:
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
