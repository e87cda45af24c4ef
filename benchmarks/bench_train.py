"""Training throughput: the Ray Train + DeepSpeed loop against a plain single-process PyTorch loop
on the same cores, model, data and global batch, in one run.

    python benchmarks/bench_train.py [--data PATH] [--rows 6000] [--epochs 3] [--batches 128,64]

The Ray side is the shipped ``configs/train-fer2013.yaml`` (its workers, ZeRO stage and model);
the first global batch listed is that config's (workers x per-worker batch), the others show how
per-step costs (gradient collectives, worker sync) weigh at smaller steps. Data: FER-2013 train
(``SYNFER_FER2013`` or ../shared/data/fer2013/train.parquet) when present, else a generated
separable set. Throughput is training images/s over the epochs after the first (the first pays for
start-up); decoding and augmentation are included on both sides. The plain loop runs before and
after each Ray run and the ratio is taken against their mean, because this machine drifts. At the
shipped batch the Ray run is repeated with ``data.cache: never`` (every epoch reads, decodes and
shuffles its rows again): the ratio of the two is what keeping the decoded rows buys.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "configs/train-fer2013.yaml"


def default_data() -> Path | None:
    candidates = [os.environ.get("SYNFER_FER2013"), ROOT.parent / "shared/data/fer2013"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.parquet").is_file():
            return Path(candidate) / "train.parquet"
    return None


def plain_loop(data: Path, rows: int, epochs: int, arch: str, batch: int, threads: int) -> float:
    import torch

    from synfer_ray import taxonomy
    from synfer_ray.models import build_classifier
    from synfer_ray.data.faces import augment, decode_faces
    from synfer_ray.train.losses import soft_cross_entropy
    torch.set_num_threads(threads)
    table = pq.read_table(data, columns=["image", "label"])
    table = table.take(np.random.default_rng(0).permutation(table.num_rows)[:rows])
    classes = taxonomy.AFFECTNET_7
    model = build_classifier(arch, classes, 48)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        began = time.perf_counter()
        for start in range(0, rows, batch):
            chunk = table.slice(start, batch).to_pydict()
            decoded = augment(decode_faces(chunk, classes, 48, soft=False, synthetic=False), 4, True, 0.2)
            pixels = torch.from_numpy(decoded["pixels"]).permute(0, 3, 1, 2).float() / 255
            loss = soft_cross_entropy(model(pixels), torch.from_numpy(decoded["target"]), 0.1,
                                      valid=torch.from_numpy(decoded["valid"]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - began)
    return rows / np.mean(times[1:])


def ray_loop(shipped, data: Path, rows: int, epochs: int, global_batch: int,
             cache: str = "auto") -> tuple[float, float, str]:
    """The shipped TrainConfig on ``data`` with this global batch: (images/s, data-wait share, label)."""
    from synfer_ray.train.fer import run_train
    workers = shipped.scaling.num_workers
    config = shipped.model_copy(update={
        "output": str(Path(tempfile.mkdtemp()) / "bench"), "register_as": None,
        "tracking": shipped.tracking.model_copy(update={"enabled": False}),
        "data": shipped.data.model_copy(update={
            "train": [shipped.data.train[0].model_copy(update={"path": str(data), "limit": int(rows / 0.9)})],
            "validation": None, "test": None, "val_fraction": 0.1, "cache": cache}),
        "optim": shipped.optim.model_copy(update={"epochs": epochs, "batch_size": global_batch // workers,
                                                  "early_stopping_patience": None})})
    summary = run_train(config)
    later = summary["history"][1:]
    images_per_second = float(np.mean([h["train_rows"] / h["train_seconds"] for h in later]))
    waiting = float(np.sum([h["data_wait_seconds"] for h in later]) / np.sum([h["train_seconds"] for h in later]))
    label = f"Ray Train {workers} workers + DeepSpeed ZeRO-{shipped.optim.zero_stage}"
    return images_per_second, waiting, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", default=None,
                        help="global batches, comma-separated; default: the shipped config's, then half of it")
    args = parser.parse_args()
    from synfer_ray.config import TrainConfig, load_config
    shipped = load_config(TrainConfig, SHIPPED_CONFIG)
    shipped_batch = shipped.scaling.num_workers * shipped.optim.batch_size
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [shipped_batch, shipped_batch // 2]
    threads = shipped.scaling.num_workers * shipped.scaling.torch_threads  # the cores the Ray side trains on
    data = args.data
    if data is None:
        import sys
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import separable_faces
        data = Path(tempfile.mkdtemp()) / "faces.parquet"
        pq.write_table(separable_faces(args.rows // 7 + 1, seed=0), data)
    import ray
    ray.init(num_cpus=shipped.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    lines = []
    for batch in batches:
        before = plain_loop(data, args.rows, args.epochs, shipped.model.arch, batch, threads)
        distributed, waiting, label = ray_loop(shipped, data, args.rows, args.epochs, batch)
        after = plain_loop(data, args.rows, args.epochs, shipped.model.arch, batch, threads)
        plain = (before + after) / 2
        note = " (shipped config)" if batch == shipped_batch else ""
        lines += [f"global batch {batch}{note}:",
                  f"  plain PyTorch loop, 1 process x {threads} threads: {plain:8.1f} img/s  1.00x "
                  f"(before {before:.1f}, after {after:.1f})",
                  f"  {label}:    {distributed:8.1f} img/s  {distributed / plain:.2f}x "
                  f"(waiting on data {waiting:.0%} of the time)"]
        if batch == shipped_batch:  # the same run with every epoch reading and decoding its rows again
            streamed, streamed_waiting, _ = ray_loop(shipped, data, args.rows, args.epochs, batch, cache="never")
            lines.append(f"  the same, data.cache never:  {streamed:8.1f} img/s  {streamed / plain:.2f}x "
                         f"(waiting on data {streamed_waiting:.0%} of the time); kept rows vs streamed: "
                         f"{distributed / streamed:.2f}x")
    ray.shutdown()
    print(f"data {data}, {args.rows} rows, {shipped.model.arch}, epochs 2..{args.epochs}, target >= 0.80x")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
