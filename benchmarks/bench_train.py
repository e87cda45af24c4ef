"""Training throughput: the Ray Train + DeepSpeed loop against a plain single-process PyTorch loop
on the same cores, model, data and global batch, in one run.

    python benchmarks/bench_train.py [--data PATH] [--rows 3000] [--epochs 3] [--arch small_cnn]

Data: FER-2013 train (``SYNFER_FER2013`` or ../shared/data/fer2013/train.parquet) when present,
else a generated separable set. Throughput is training images/s over the epochs after the first
(the first pays for start-up); decoding and augmentation are included on both sides.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def default_data() -> Path | None:
    candidates = [os.environ.get("SYNFER_FER2013"), Path(__file__).resolve().parents[2] / "shared/data/fer2013"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.parquet").is_file():
            return Path(candidate) / "train.parquet"
    return None


def plain_loop(data: Path, rows: int, epochs: int, arch: str, batch: int, threads: int) -> float:
    import torch

    from synfer_ray import taxonomy
    from synfer_ray.classifiers import build_classifier
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


def ray_loop(data: Path, rows: int, epochs: int, arch: str, batch: int, workers: int, zero: int) -> float:
    from synfer_ray.config import TrainConfig, build_config
    from synfer_ray.train.fer import run_train
    output = Path(tempfile.mkdtemp()) / "bench"
    config = build_config(TrainConfig, {
        "name": "bench", "output": str(output),
        "data": {"train": [{"path": str(data), "limit": int(rows / 0.9)}], "val_fraction": 0.1},
        "model": {"arch": arch},
        "optim": {"epochs": epochs, "batch_size": batch // workers, "zero_stage": zero},
        "scaling": {"num_workers": workers}, "tracking": {"enabled": False}, "register_as": None})
    summary = run_train(config)
    later = summary["history"][1:]
    return float(np.mean([h["train_rows"] / h["train_seconds"] for h in later]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2)
    args = parser.parse_args()
    data = args.data
    if data is None:
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import separable_faces
        data = Path(tempfile.mkdtemp()) / "faces.parquet"
        pq.write_table(separable_faces(args.rows // 7 + 1, seed=0), data)
    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    distributed = ray_loop(data, args.rows, args.epochs, args.arch, args.batch, args.workers, args.zero)
    ray.shutdown()
    plain = plain_loop(data, args.rows, args.epochs, args.arch, args.batch, threads=args.workers)
    print(f"data {data}, {args.rows} rows, {args.arch}, global batch {args.batch}, epochs 2..{args.epochs}")
    print(f"plain PyTorch loop, 1 process x {args.workers} threads: {plain:8.1f} img/s  1.00x")
    print(f"Ray Train {args.workers} workers + DeepSpeed ZeRO-{args.zero}:    {distributed:8.1f} img/s  "
          f"{distributed / plain:.2f}x")


if __name__ == "__main__":
    main()
