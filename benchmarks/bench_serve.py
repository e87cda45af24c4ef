"""Serve throughput and latency at 1 and 8 concurrent clients, and the batching gain against
max_batch_size 1, in one run (loopback only; every loop bounded in count and time).

    python benchmarks/bench_serve.py [--bundle PATH] [--requests 24] [--steps 10]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load(url: str, clients: int, count: int, steps: int, time_limit: float = 300) -> dict:
    deadline = time.monotonic() + time_limit
    latencies: list[float] = []

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        began = time.perf_counter()
        reply = requests.post(url, json={"expression": "happy", "seed": i, "steps": steps}, timeout=120)
        reply.raise_for_status()
        latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"rps": len(latencies) / wall, "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import ray
    from ray import serve

    from synfer_ray.config import ServeConfig, build_config
    from synfer_ray.serve import build_app
    bundle = args.bundle
    if bundle is None:
        from synfer_ray.bundle import make_tiny_bundle
        bundle = Path(tempfile.mkdtemp()) / "tiny"
        make_tiny_bundle(bundle)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results = {}
    for batch in (8, 1):
        config = build_config(ServeConfig, {"bundle": str(bundle), "max_batch_size": batch, "torch_threads": 2,
                                            "max_steps": args.steps})
        serve.run(build_app(config), name=f"b{batch}", route_prefix=f"/b{batch}", blocking=False)
        url = f"{base}/b{batch}/v1/generate"
        for _ in range(120):
            try:
                if requests.get(f"{base}/b{batch}/healthz", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        load(url, 2, 4, args.steps)  # warm-up
        for clients in (1, 8):
            results[(batch, clients)] = load(url, clients, args.requests, args.steps)
        serve.delete(f"b{batch}")
    serve.shutdown()
    print(f"bundle {bundle}, {args.steps} steps, {args.requests} requests of 1 image per setting, 1 replica")
    print(f"{'max_batch_size':>14s} {'clients':>7s} {'req/s':>7s} {'p50 s':>7s} {'p99 s':>7s}")
    for (batch, clients), r in results.items():
        print(f"{batch:14d} {clients:7d} {r['rps']:7.2f} {r['p50']:7.2f} {r['p99']:7.2f}")
    gain = results[(8, 8)]["rps"] / results[(1, 8)]["rps"]
    print(f"batching gain at 8 clients (max_batch_size 8 vs 1): {gain:.2f}x")


if __name__ == "__main__":
    main()
