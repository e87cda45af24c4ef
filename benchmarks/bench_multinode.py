"""The cost of going multi-node: the generation pipeline on 1 node versus the same logical CPUs split
over 3 nodes (each a network namespace), in one run, plus the bytes that crossed node links.

    sudo .venv/bin/python benchmarks/bench_multinode.py [--count 512] [--steps 10]

Each side submits ``jobs/generate.py`` with ``ray job submit`` to a fresh cluster made by
``cluster/local/netns_cluster.py`` and reads the job's images/s from the dataset card (wall time
of the run, Ray start-up of the job driver included on both sides). Bytes moved are the veth
counters of every node (received + sent), so object transfers, control traffic and the
working-dir upload all count. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _netns():
    # A script, not a package module: import it from its folder.
    sys.path.insert(0, str(ROOT / "cluster" / "local"))
    import netns_cluster
    return netns_cluster


def link_bytes(cluster) -> int:
    total = 0
    for node in cluster.nodes:
        for direction in ("rx_bytes", "tx_bytes"):
            total += int(Path(f"/sys/class/net/{node.veth}/statistics/{direction}").read_text())
    return total


def run_side(netns, cpus: list[int], count: int, steps: int) -> dict:
    from synfer_ray.bundle import make_tiny_bundle
    cluster = netns.up(len(cpus), cpus=cpus, resources=[{}] * len(cpus))
    try:
        shared = Path(cluster.shared)
        make_tiny_bundle(shared / "bundle")
        total_cpus = sum(cpus)
        config = {"bundle": str(shared / "bundle"), "output": str(shared / "dataset"), "count": count,
                  "rows_per_shard": 32, "sampling": {"steps": steps},
                  "generator": {"min_actors": total_cpus - 1, "max_actors": total_cpus - 1, "batch_size": 16},
                  "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "batch_size": 64},
                  "tracking": {"enabled": False}}
        (shared / "generate.yaml").write_text(yaml.safe_dump(config))
        before = link_bytes(cluster)
        submitted = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster.dashboard_url,
             "--working-dir", str(ROOT), "--", "python", "jobs/generate.py", "--config", str(shared / "generate.yaml")],
            env=cluster.client_env(), capture_output=True, text=True, timeout=1800, cwd=ROOT)
        if submitted.returncode != 0:
            raise RuntimeError(submitted.stdout[-2000:] + submitted.stderr[-2000:])
        moved = link_bytes(cluster) - before
        card = json.loads((shared / "dataset" / "dataset.json").read_text())
        return {"nodes": len(cpus), "images_per_second": card["timing"]["images_per_second_this_run"],
                "wall_seconds": card["timing"]["wall_seconds_this_run"], "bytes_on_links": moved}
    finally:
        netns.down(cluster.state_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=6, help="logical CPUs in total on each side")
    args = parser.parse_args()
    netns = _netns()
    problem = netns.missing_requirements()
    if problem:
        sys.exit(f"bench_multinode needs root and ip netns: {problem}")
    began = time.perf_counter()
    one = run_side(netns, [args.cpus], args.count, args.steps)
    split = [args.cpus // 3 + (1 if i < args.cpus % 3 else 0) for i in range(3)]
    three = run_side(netns, split, args.count, args.steps)
    print(f"generation of {args.count} images, {args.steps} DDIM steps, {args.cpus} logical CPUs per side "
          f"({time.perf_counter() - began:.0f} s in all)")
    print(f"1 node  {[args.cpus]}: {one['images_per_second']:7.2f} img/s  1.00x   "
          f"{one['bytes_on_links'] / 2**20:8.1f} MiB on links")
    print(f"3 nodes {split}: {three['images_per_second']:7.2f} img/s  "
          f"{three['images_per_second'] / one['images_per_second']:.2f}x   "
          f"{three['bytes_on_links'] / 2**20:8.1f} MiB on links")


if __name__ == "__main__":
    main()
