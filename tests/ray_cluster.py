"""A real multi-node Ray cluster on this machine, in a network namespace of its own.

Ray advertises a node by the machine's network address, not by 127.0.0.1, so a cluster on the
host's namespace would talk over the machine's interface. Inside a fresh namespace the only
interface is loopback: every Ray process, and every `lookalike` run the tests point at the
cluster, runs through `ip netns exec` and cannot reach anything else.

Each node is a `ray start --block` process in its own session: stopping or killing a node is
signalling its process group (the raylet and the workers it started), by id. The head has no
CPUs, so whatever the cluster decodes runs on the worker nodes; each worker node also carries a
custom resource naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
HEAD_PORT = 6380
OBJECT_STORE_BYTES = 100 * 2**20  # the smallest Ray accepts comfortably; these tests move little


def ray_env(ray_tmp: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Ray node or driver; `ray_tmp` holds what Ray writes (sessions, logs,
    sockets, the address file that `auto` reads), which by default goes to the shared /tmp/ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LOOKALIKE_"))}
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    env.update(
        # Ray 2.60's token authentication breaks a second node when a token file exists: say it.
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        # Small machines: no warning storm about memory, no dashboard.
        RAY_DISABLE_IMPORT_WARNING="1",
    )
    env.update(extra)
    return env


class RayCluster:
    def __init__(self, root: Path):
        self.root = root
        self.namespace = f"lookalike-test-{os.getpid()}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.address = f"127.0.0.1:{HEAD_PORT}"
        # Short: Ray's unix sockets live below it, and their paths may not exceed 107 bytes.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lkray-", dir="/tmp"))

    def env(self, **extra: str) -> dict[str, str]:
        return ray_env(self.ray_tmp, **extra)

    def netns(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *command]

    def start(self, workers: int = 2) -> RayCluster:
        subprocess.run(["ip", "netns", "add", self.namespace], check=True)
        subprocess.run(self.netns("ip", "link", "set", "lo", "up"), check=True)
        self._node(
            "head",
            "--head",
            f"--port={HEAD_PORT}",
            "--num-cpus=0",
            "--node-ip-address=127.0.0.1",
        )
        self._wait_for_node("head", set())
        for i in range(workers):
            self.add_worker(f"worker{i}")
        return self

    def add_worker(self, name: str, cpus: int = 1, gpus: int = 0, **env: str) -> None:
        """`gpus`: what the node declares to Ray (it would count a GPU machine's own otherwise)."""
        known = set(self.alive_nodes())  # a node of the same name killed moments ago among them
        self._node(
            name,
            f"--address={self.address}",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f'--resources={{"{name}": 1}}',
            "--node-ip-address=127.0.0.1",
            env=env,
        )
        self._wait_for_node(name, known)

    def _node(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the node's life
        self.nodes[name] = subprocess.Popen(
            self.netns(
                str(RAY),
                "start",
                "--block",
                "--disable-usage-stats",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                *args,
            ),
            env=self.env(**(env or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive_nodes(self) -> dict[str, dict]:
        """NodeID -> resources of the nodes Ray lists alive (a node killed moments ago among them,
        until its heartbeats time out)."""
        code = (
            "import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False);"
            "print('NODES', json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
        )
        proc = subprocess.run(
            self.netns(sys.executable, "-c", code),
            env=self.env(RAY_ADDRESS=self.address),
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Ray's own log lines ("[2026-… W …] network_util.cc…") may come before or after ours.
        found = [line for line in proc.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(found[-1].removeprefix("NODES ")) if proc.returncode == 0 and found else {}

    def _wait_for_node(self, name: str, known: set[str], timeout: float = 120) -> None:
        """Until a node named `name` (its custom resource; the head's own marker) that is not one
        of the `known` NodeIDs is alive: counting nodes would count a killed one still listed."""
        marker = "node:__internal_head__" if name == "head" else name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"Ray node {node} exited: {(self.root / f'{node}.log').read_text()[-3000:]}")
            if any(marker in resources for node_id, resources in self.alive_nodes().items() if node_id not in known):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Ray node {name} did not join the cluster in {timeout} s")

    def kill(self, name: str) -> None:
        """kill -9 a node: its raylet and every process it started. Ray's workers start sessions
        of their own, so the node's process group is not enough: its whole process tree goes."""
        proc = self.nodes.pop(name)
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            proc = self.nodes.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        # Anything left in the namespace (a worker that outlived its raylet) goes with it.
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        for pid in listed.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", self.namespace], check=False)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
