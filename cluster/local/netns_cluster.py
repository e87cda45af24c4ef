"""A real multi-node Ray cluster on one Linux machine: each node a host of its own in a network namespace.

    python cluster/local/netns_cluster.py up --nodes 3      # prints the state file, addresses, token file
    python cluster/local/netns_cluster.py down --state /tmp/srXXXX/state.json

Namespaces are joined by veth pairs to a bridge in the root namespace; addresses come from the
benchmarking range 198.18.0.0/15 (never a real network; no route leaves the machine). Node 0 is
the head. Every node runs ``ray start`` with token auth, its own ``--temp-dir`` and its own
resources (``--num-cpus``, custom resources such as a fake ``accelerator``); all share one
storage directory for outputs and checkpoints, as an NFS mount would on a real cluster. A node is
lost by SIGKILLing every process in its namespace. ``down`` removes everything named in the state
file and is safe to repeat, also after a failed run. The state file and ``auth_token`` (the token
alone, for ``RAY_AUTH_TOKEN_PATH``) are mode 0600 in a 0700 directory. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUBNET_BASE = "198.18"


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster (None when it can)."""
    if os.geteuid() != 0:
        return "root is needed to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"srprobe{os.getpid() % 10000}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if created.returncode != 0:
        return f"`ip netns add` failed: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Node:
    index: int
    namespace: str
    veth: str
    address: str
    temp_dir: str
    num_cpus: int
    resources: dict = field(default_factory=dict)


@dataclass
class LocalCluster:
    name: str
    root: str  # short path: Ray's AF_UNIX sockets live under each node's temp dir
    bridge: str
    bridge_address: str
    shared: str
    token: str
    nodes: list[Node]
    state_file: str
    ray_bin: str

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:6379"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:8265"

    def client_env(self) -> dict[str, str]:
        """Environment for a client in the root namespace (ray job submit, ray.init)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.gcs_address})
        return env

    @property
    def token_file(self) -> Path:
        """The token alone (mode 0600), for clients that read ``RAY_AUTH_TOKEN_PATH``."""
        return Path(self.root) / "auth_token"

    def save(self) -> None:
        """Write the state file and the token file, both readable by root only (they hold the token)."""
        private_directory(self.root)
        write_private(self.state_file, json.dumps(asdict(self), indent=2))
        write_private(self.token_file, self.token)

    @classmethod
    def load(cls, state_file: str | Path) -> "LocalCluster":
        raw = json.loads(Path(state_file).read_text())
        raw["nodes"] = [Node(**node) for node in raw["nodes"]]
        return cls(**raw)

    # --- nodes -------------------------------------------------------------------------------

    def run_in(self, node: Node, command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        env = self.client_env()
        env.pop("RAY_ADDRESS")
        # Each node runs the Python environment that holds `ray` (an image with the package
        # installed, on a real cluster): job entrypoints such as `python jobs/x.py` must find it.
        env["PATH"] = f"{Path(self.ray_bin).parent}{os.pathsep}{env.get('PATH', '')}"
        # Every namespace shares the machine's hostname, which resolves to loopback: gloo (CPU
        # torch.distributed) would advertise 127.0.0.1 to the other nodes. Name its interface.
        env["GLOO_SOCKET_IFNAME"] = "eth0"
        # Ray Data's Parquet footer readers, 32 actors a read unless told (synfer_ray.pipeline's
        # PARQUET_FOOTER_ACTORS): as many as the cluster's CPUs.
        env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(sum(n.num_cpus for n in self.nodes))
        return subprocess.run(["ip", "netns", "exec", node.namespace, *command], env=env, check=check,
                              capture_output=True, text=True, **kwargs)

    def start_node(self, node: Node) -> None:
        command = [self.ray_bin, "start", f"--node-ip-address={node.address}", f"--temp-dir={node.temp_dir}",
                   f"--num-cpus={node.num_cpus}", f"--resources={json.dumps(node.resources)}",
                   "--disable-usage-stats"]
        if node.index == 0:
            command += ["--head", "--port=6379", f"--dashboard-host={node.address}", "--dashboard-port=8265"]
        else:
            command += [f"--address={self.gcs_address}"]
        result = self.run_in(node, command, check=False, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"ray start on node {node.index} failed:\n{result.stdout}\n{result.stderr}")

    def pids(self, node: Node) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True)
        return [int(p) for p in result.stdout.split()]

    def kill_node(self, node: Node) -> int:
        """Lose a node: SIGKILL every process in its namespace. Returns how many were killed."""
        killed = 0
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def wait_for_nodes(self, alive: int, timeout: float = 120) -> None:
        """Until the head reports ``alive`` live nodes (bounded)."""
        script = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                  "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = subprocess.run([sys.executable, "-c", script, self.gcs_address], env=self.client_env(),
                                    capture_output=True, text=True, timeout=60)
            last = result.stdout.strip() or result.stderr[-500:]
            if result.returncode == 0 and last.isdigit() and int(last) == alive:
                return
            time.sleep(2)
        raise TimeoutError(f"{alive} live nodes not reached in {timeout} s (last: {last})")


def private_directory(path: str | Path) -> None:
    """Create ``path`` (or take an existing one) with mode 0700: the cluster's token lives in it."""
    Path(path).mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` to a file with mode 0600 from its first byte (also when the file was there)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its old mode through os.open
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def up(nodes: int = 3, cpus: list[int] | None = None, resources: list[dict] | None = None,
       root: str | None = None, subnet: int | None = None) -> LocalCluster:
    """Create namespaces, bridge and addresses, start Ray on every node; tear down on any failure."""
    problem = missing_requirements()
    if problem:
        raise RuntimeError(problem)
    tag = secrets.token_hex(2)
    name = f"sr{tag}"
    subnet = subnet if subnet is not None else int(tag, 16) % 200 + 20
    root = root or f"/tmp/{name}"
    private_directory(root)
    cpus = cpus or [1] + [2] * (nodes - 1)
    resources = resources or [{}] + [{"accelerator": 1}] * (nodes - 1)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cluster = LocalCluster(
        name=name, root=root, bridge=f"{name}br", bridge_address=f"{SUBNET_BASE}.{subnet}.1",
        shared=str(Path(root) / "shared"), token=secrets.token_hex(32), state_file=str(Path(root) / "state.json"),
        ray_bin=ray_bin,
        nodes=[Node(index=i, namespace=f"{name}n{i}", veth=f"{name}v{i}", address=f"{SUBNET_BASE}.{subnet}.{10 + i}",
                    temp_dir=str(Path(root) / f"n{i}"), num_cpus=cpus[i], resources=resources[i])
               for i in range(nodes)])
    cluster.save()  # before anything exists, so `down` can always clean up
    try:
        Path(cluster.shared).mkdir(parents=True, exist_ok=True)
        _ip("link", "add", cluster.bridge, "type", "bridge")
        _ip("addr", "add", f"{cluster.bridge_address}/24", "dev", cluster.bridge)
        _ip("link", "set", cluster.bridge, "up")
        for node in cluster.nodes:
            _ip("netns", "add", node.namespace)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", f"{node.veth}p")
            _ip("link", "set", f"{node.veth}p", "netns", node.namespace)
            _ip("link", "set", node.veth, "master", cluster.bridge)
            _ip("link", "set", node.veth, "up")
            inside = ["netns", "exec", node.namespace, "ip"]
            _ip(*inside, "link", "set", f"{node.veth}p", "name", "eth0")
            _ip(*inside, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "route", "add", "default", "via", cluster.bridge_address)
            Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
        for node in cluster.nodes:
            cluster.start_node(node)
        cluster.wait_for_nodes(nodes)
    except BaseException:
        down(cluster.state_file)
        raise
    return cluster


def down(state_file: str | Path) -> None:
    """Kill every node's processes, delete namespaces and bridge, remove the directory. Idempotent."""
    if not Path(state_file).is_file():
        return
    cluster = LocalCluster.load(state_file)
    for node in cluster.nodes:
        if subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True).returncode == 0:
            cluster.kill_node(node)
    time.sleep(0.5)
    for node in cluster.nodes:
        _ip("netns", "del", node.namespace, check=False)
        _ip("link", "del", node.veth, check=False)
    _ip("link", "del", cluster.bridge, check=False)
    shutil.rmtree(cluster.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up")
    start.add_argument("--nodes", type=int, default=3)
    start.add_argument("--cpus", type=int, nargs="*", help="logical CPUs per node (head first)")
    stop = sub.add_parser("down")
    stop.add_argument("--state", required=True)
    args = parser.parse_args()
    if args.command == "up":
        cluster = up(args.nodes, args.cpus)
        print(json.dumps({"state": cluster.state_file, "address": cluster.gcs_address,
                          "dashboard": cluster.dashboard_url, "shared": cluster.shared,
                          "env": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token_file)}},
                         indent=2))
    else:
        down(args.state)


if __name__ == "__main__":
    main()
