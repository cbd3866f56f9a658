"""Run a REAL writer process against a tests/harness.py StorageCluster.

    writer = WriterProcess(storage_cluster, base_dir, volume="v1", pg_count=8, stripe_pages=2,
                           lal=10_000, buffer_pool_pages=64)
    writer.start(timeout_s=60)      # fresh subprocess: `python -m engine.cli writer ...`
    with writer.client() as db: ...
    writer.kill()                   # SIGKILL;  writer.stop() -> exit code (SIGTERM)
    writer.start()                  # same volume again: runs recovery
    writer.error_lines()            # ERROR lines of its log

The cluster config is written to base_dir/cluster.json with the storage nodes' addresses,
a small layout (many PGs, so MTRs span PGs) and zero simulated latency unless asked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from engine.client import Client
from engine.format.cluster_config import ClusterConfig, Latency
from engine.format.cluster_config import NodeInfo
from tests.harness import NODE_AZS, REPO_ROOT, free_ports, wait_serving

SERVICE = "aurora_pb.Database"


class WriterProcess:
    """One writer instance process (see module doc)."""

    def __init__(self, cluster, base_dir: str | Path, *, volume: str = "v1", pg_count: int = 8,
                 stripe_pages: int = 2, lal: int = 10_000, buffer_pool_pages: int = 256,
                 latency: Latency | None = None, instance: str = "db1",
                 writer_address: str | None = None, config_path: Path | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.cluster = cluster
        self.base = Path(base_dir)
        self.base.mkdir(parents=True, exist_ok=True)
        self.instance = instance
        self.buffer_pool_pages = buffer_pool_pages
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.writer_address = writer_address   # set: this process is a replica of it
        self.extra_args = list(extra_args or [])  # e.g. ["--backtrack-window", "600"]
        self.log_path = self.base / f"{instance}.log"
        self.proc: subprocess.Popen | None = None
        if config_path is not None:
            self.config_path = Path(config_path)   # share the writer's cluster.json
        else:
            self.config_path = self.base / "cluster.json"
            nodes = [NodeInfo(name, NODE_AZS[name], cluster.address(name)) for name in cluster.nodes]
            ClusterConfig(nodes, volume=volume, pg_count=pg_count, stripe_pages=stripe_pages,
                          lal=lal, latency=latency or Latency(0.0, 0.0)).save(str(self.config_path))
        self.env = dict(os.environ)
        pythonpath = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")

    def start(self, timeout_s: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "writer already running"
        log = open(self.log_path, "ab")
        role = ["writer"] if self.writer_address is None else ["replica", "--writer", self.writer_address]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *role, "--cluster", str(self.config_path),
             "--instance", self.instance, "--port", str(self.port),
             "--buffer-pool-pages", str(self.buffer_pool_pages), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.base),
            start_new_session=True)
        log.close()
        wait_serving(self.address, timeout_s, self.proc, service=SERVICE)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> int:
        if not self.running():
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def replica(self, base_dir: str | Path, instance: str = "db2",
                buffer_pool_pages: int | None = None) -> "WriterProcess":
        """A replica process of this writer (not started), sharing its cluster.json."""
        return WriterProcess(self.cluster, base_dir, instance=instance,
                             buffer_pool_pages=buffer_pool_pages or self.buffer_pool_pages,
                             writer_address=self.address, config_path=self.config_path)

    def admin(self):
        """An InstanceAdmin stub (Promote, Follow) and its channel."""
        from aurora_pb import database_pb2_grpc
        channel = grpc.insecure_channel(self.address)
        return database_pb2_grpc.InstanceAdminStub(channel), channel

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.address, timeout_s=timeout_s)

    def error_lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if " ERROR " in line or " CRITICAL " in line]

    def close(self) -> None:
        self.kill()
