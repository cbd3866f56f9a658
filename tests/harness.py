"""Run REAL storage-node processes for tests and benchmarks.

Each node is a fresh subprocess (``sys.executable -m engine.cli storage-node ...``, never a
fork of a process that already runs gRPC) with its own data dir, log file and port file
under one base directory. Ports are chosen up front, so every node can be told the
addresses of all the others (--peers) and keeps its port across restarts.

API (everything else is private)::

    NODE_NAMES = ("sn1", ..., "sn6");  NODE_AZS = {"sn1": "az-a", "sn2": "az-a", "sn3": "az-b", ...}
    FAST_TUNING: dict of AURORA_SN_* variables with short background intervals (the default)

    cluster = StorageCluster(base_dir, names=NODE_NAMES, env=None, log_level="INFO")
    cluster.start(timeout_s=30.0) -> None          start every node; wait until all SERVING
    cluster.start_node(name, timeout_s=30.0)        start one stopped node (same dir and port)
    cluster.stop(name, timeout_s=15.0) -> int       SIGTERM, wait, return the exit code
    cluster.kill(name) -> None                      SIGKILL, wait (data dir kept)
    cluster.pause(name) / cluster.resume(name)      SIGSTOP / SIGCONT
    cluster.restart(name, timeout_s=30.0)           stop (SIGTERM) if running, then start_node
    cluster.running(name) -> bool
    cluster.ensure_all_running(timeout_s=30.0)      resume paused and start stopped nodes
    cluster.address(name) -> "127.0.0.1:port";  cluster.addresses() -> {name: address}
    cluster.data_dir(name) -> Path;  cluster.log_path(name) -> Path
    cluster.error_lines(name) -> list[str]          ERROR/CRITICAL lines of the node's log
    cluster.close() -> None                         SIGKILL everything still running
    wait_serving(address, timeout_s=30.0, proc=None, service=SERVICE)
                                                    health-check until SERVING

StorageCluster is also a context manager (close() on exit, even on failure). The pytest
fixture ``storage_cluster`` (tests/conftest.py) gives a six-node cluster shared by a test
module, with every node running at the start of each test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# One free-port search for the whole project; writer_harness imports it from here too.
from engine.cluster.ports import free_ports  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_NAMES = ("sn1", "sn2", "sn3", "sn4", "sn5", "sn6")
NODE_AZS = {"sn1": "az-a", "sn2": "az-a", "sn3": "az-b", "sn4": "az-b", "sn5": "az-c", "sn6": "az-c"}
SERVICE = "aurora_pb.Storage"

#: Short background intervals so tests see gossip, coalescing and scrubs within seconds.
FAST_TUNING = {
    "AURORA_SN_MAP_SIZE": str(1 << 30),
    "AURORA_SN_GOSSIP_INTERVAL_S": "0.2",
    "AURORA_SN_COALESCE_INTERVAL_S": "0.2",
    "AURORA_SN_COALESCE_SWEEP_S": "1.0",
    "AURORA_SN_GC_INTERVAL_S": "0.3",
    "AURORA_SN_SCRUB_INTERVAL_S": "1.0",
    "AURORA_SN_REPAIR_INTERVAL_S": "0.2",
}


def wait_serving(address: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None,
                 service: str = SERVICE) -> None:
    """Poll the gRPC health service of ``address`` until it says SERVING for the storage
    service; raise RuntimeError on timeout or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{address}: process exited with code {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address}: not SERVING after {timeout_s}s")
            time.sleep(0.05)


class _Node:
    def __init__(self, name: str, az: str, port: int, base: Path) -> None:
        self.name = name
        self.az = az
        self.port = port
        self.dir = base / name
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "node.log"
        self.port_file = self.dir / "port"
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.dir.mkdir(parents=True, exist_ok=True)


class StorageCluster:
    """N storage-node processes on 127.0.0.1 that all know each other (see module doc)."""

    def __init__(self, base_dir: str | Path, names: tuple[str, ...] = NODE_NAMES,
                 env: dict[str, str] | None = None, log_level: str = "INFO") -> None:
        self.base = Path(base_dir)
        self.base.mkdir(parents=True, exist_ok=True)
        ports = free_ports(len(names))
        self.nodes = {n: _Node(n, NODE_AZS.get(n, "az-a"), p, self.base) for n, p in zip(names, ports)}
        self.env = dict(os.environ)
        self.env.update(FAST_TUNING)
        self.env.update(env or {})
        pythonpath = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        self.log_level = log_level

    # -- addresses and files --------------------------------------------------------------

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.nodes[name].port}"

    def addresses(self) -> dict[str, str]:
        return {n: self.address(n) for n in self.nodes}

    def data_dir(self, name: str) -> Path:
        return self.nodes[name].data_dir

    def log_path(self, name: str) -> Path:
        return self.nodes[name].log_path

    def error_lines(self, name: str) -> list[str]:
        """ERROR and CRITICAL lines of the node's log (all its runs)."""
        path = self.nodes[name].log_path
        if not path.exists():
            return []
        return [line.rstrip("\n") for line in path.read_text(errors="replace").splitlines()
                if " ERROR " in line or " CRITICAL " in line]

    # -- lifecycle --------------------------------------------------------------------------

    def running(self, name: str) -> bool:
        proc = self.nodes[name].proc
        return proc is not None and proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every node, then wait until each one is SERVING."""
        for name in self.nodes:
            self._spawn(name)
        for name in self.nodes:
            self._wait(name, timeout_s)

    def start_node(self, name: str, timeout_s: float = 30.0) -> None:
        """Start one node (keeping its data dir and port) and wait until it is SERVING."""
        assert not self.running(name), f"{name} is already running"
        self._spawn(name)
        self._wait(name, timeout_s)

    def _spawn(self, name: str) -> None:
        node = self.nodes[name]
        if node.port_file.exists():
            node.port_file.unlink()
        peers = ",".join(self.address(n) for n in self.nodes if n != name)
        argv = [sys.executable, "-m", "engine.cli", "--log-level", self.log_level,
                "storage-node", "--node-id", name, "--az", node.az, "--host", "127.0.0.1",
                "--port", str(node.port), "--data-dir", str(node.data_dir), "--peers", peers,
                "--port-file", str(node.port_file)]
        with open(node.log_path, "a") as log:
            log.write(f"--- harness: starting {name} at {time.strftime('%H:%M:%S')} ---\n")
            log.flush()
            node.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO_ROOT),
                                         start_new_session=True)
        node.paused = False

    def _wait(self, name: str, timeout_s: float) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout_s
        try:
            while not node.port_file.exists():
                if node.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {node.proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} wrote no port file within {timeout_s}s")
                time.sleep(0.05)
            wait_serving(self.address(name), max(1.0, deadline - time.monotonic()), node.proc)
        except RuntimeError as exc:
            tail = node.log_path.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{exc}\n--- last lines of {node.log_path} ---\n" + "\n".join(tail)) from None

    def stop(self, name: str, timeout_s: float = 15.0) -> int:
        """SIGTERM a node and wait for it to exit; returns its exit code."""
        node = self.nodes[name]
        assert node.proc is not None, f"{name} was never started"
        if node.paused:
            self.resume(name)
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
                raise RuntimeError(f"{name} did not stop within {timeout_s}s of SIGTERM; killed")
        return node.proc.returncode

    def kill(self, name: str) -> None:
        """SIGKILL a node (no chance to clean up) and reap it. The data dir stays."""
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.paused = False

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stays alive but answers nothing (a hung node)."""
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def restart(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop (SIGTERM) if running, then start again with the same data dir and port."""
        if self.running(name):
            self.stop(name)
        self.start_node(name, timeout_s)

    def ensure_all_running(self, timeout_s: float = 30.0) -> None:
        """Resume paused nodes and start stopped ones (between tests)."""
        for name, node in self.nodes.items():
            if node.paused and self.running(name):
                self.resume(name)
            if not self.running(name):
                self.start_node(name, timeout_s)

    def close(self) -> None:
        """SIGKILL every node still running (safe to call twice, and on failures)."""
        for name, node in self.nodes.items():
            if node.proc is not None and node.proc.poll() is None:
                if node.paused:
                    node.proc.send_signal(signal.SIGCONT)
                node.proc.kill()
        for node in self.nodes.values():
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass

    def __enter__(self) -> "StorageCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
