"""Real storage processes for the write-amplification benchmark (and its tests).

The benchmark drives the engine in its own process but keeps storage real: six
``aurora-lite storage-node`` processes for aurora-lite and four ``aurora-lite block-server``
processes for the baseline, each a fresh subprocess (``python -m engine.cli ...``, never a
fork of a process that runs gRPC) with its own data dir and log file under one base dir.
Processes are stopped by their own pid (SIGTERM, then SIGKILL after a grace period).

    group = start_storage_nodes(base_dir)          # sn1..sn6, two per AZ, peers wired
    group = start_block_servers(base_dir, latency)  # bs1 -> bs2 (az-a), bs3 -> bs4 (az-b)
    group.address("bs1"); group.az("bs1"); group.stop_all()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from engine.cluster.ports import free_ports
from engine.format.cluster_config import Latency
from engine.format.volume import AZS, NODES_PER_AZ

HOST = "127.0.0.1"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent     # holds engine/ and aurora_pb/
STORAGE_NODES = [(f"sn{i + 1}", AZS[i // NODES_PER_AZ]) for i in range(len(AZS) * NODES_PER_AZ)]
#: (name, AZ, mirror name or None). bs1 is the primary's block server, bs3 the standby's.
BLOCK_SERVERS = [("bs1", "az-a", "bs2"), ("bs2", "az-a", None),
                 ("bs3", "az-b", "bs4"), ("bs4", "az-b", None)]
PRIMARY_BLOCK_SERVER = "bs1"
STANDBY_BLOCK_SERVER = "bs3"
STOP_GRACE_S = 10.0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + path if path else "")
    return env


class Proc:
    """One subprocess with a log file and a port file."""

    def __init__(self, name: str, az: str, base: Path, argv_tail: list[str], service: str) -> None:
        self.name = name
        self.az = az
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "process.log"
        self.port_file = self.dir / "port"
        self.service = service
        self.argv_tail = argv_tail
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        assert self.port is not None, f"{self.name} is not serving"
        return f"{HOST}:{self.port}"

    def spawn(self, env: dict[str, str], log_level: str) -> None:
        if self.port_file.exists():
            self.port_file.unlink()
        argv = [sys.executable, "-m", "engine.cli", "--log-level", log_level, *self.argv_tail,
                "--port-file", str(self.port_file)]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=str(self.dir),
                                         start_new_session=True)

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(self._failure(f"wrote no port file within {timeout_s:.0f}s"))
            time.sleep(0.05)
        self.port = int(self.port_file.read_text().strip())
        from engine.transport.grpc_transport import GrpcTransport   # a launcher: composition root
        with GrpcTransport("bench").blocking_channel(self.address) as channel:
            while True:
                self._check_alive()
                if channel.serving(self.service, timeout_s=1.0):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(self._failure(f"not SERVING after {timeout_s:.0f}s"))
                time.sleep(0.05)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(self._failure(f"exited with code {self.proc.returncode}"))

    def _failure(self, what: str) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:] if self.log_path.exists() else []
        return f"{self.name} {what}; last lines of {self.log_path}:\n" + "\n".join(tail)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM this process (by its pid), SIGKILL it if it has not exited in time."""
        if not self.running():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def error_lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if " ERROR " in line or " CRITICAL " in line]


class ProcessGroup:
    """The processes of one configuration; a context manager that stops them all."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = {p.name: p for p in procs}

    def address(self, name: str) -> str:
        return self.procs[name].address

    def az(self, name: str) -> str:
        return self.procs[name].az

    def names(self) -> list[str]:
        return list(self.procs)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.running():
                proc.proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.stop()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def start_storage_nodes(base: Path, *, log_level: str = "WARNING", env: dict[str, str] | None = None,
                        timeout_s: float = 60.0) -> ProcessGroup:
    """sn1..sn6 (two per AZ), each knowing the others as gossip peers."""
    base = Path(base)
    ports = free_ports(len(STORAGE_NODES))
    addresses = {name: f"{HOST}:{port}" for (name, _), port in zip(STORAGE_NODES, ports)}
    procs = []
    for (name, az), port in zip(STORAGE_NODES, ports):
        peers = ",".join(a for n, a in addresses.items() if n != name)
        procs.append(Proc(name, az, base, [
            "storage-node", "--node-id", name, "--az", az, "--host", HOST, "--port", str(port),
            "--data-dir", str(base / name / "data"), "--peers", peers], "aurora_pb.Storage"))
    group = ProcessGroup(procs)
    child = child_env(env)
    try:
        for proc in procs:
            proc.spawn(child, log_level)
        for proc in procs:
            proc.wait_serving(timeout_s)
    except BaseException:
        group.stop_all()
        raise
    return group


def start_block_servers(base: Path, latency: Latency, *, log_level: str = "WARNING",
                        timeout_s: float = 60.0) -> ProcessGroup:
    """bs2 and bs4 first (the mirrors), then bs1 and bs3 pointing at them, with the
    intra-AZ one-way delay of ``latency`` on each mirror link."""
    base = Path(base)
    procs: dict[str, Proc] = {}
    child = child_env()
    group = ProcessGroup([])
    try:
        for wave in ([s for s in BLOCK_SERVERS if s[2] is None], [s for s in BLOCK_SERVERS if s[2]]):
            for name, az, mirror in wave:
                tail = ["block-server", "--name", name, "--az", az, "--host", HOST, "--port", "0",
                        "--data-dir", str(base / name / "data")]
                if mirror:
                    tail += ["--mirror", procs[mirror].address,
                             "--mirror-delay-ms", str(latency.one_way_ms(az, procs[mirror].az))]
                proc = Proc(name, az, base, tail, "aurora_pb.Block")
                procs[name] = proc
                group.procs[name] = proc
                proc.spawn(child, log_level)
            for name, _, _ in wave:
                procs[name].wait_serving(timeout_s)
    except BaseException:
        group.stop_all()
        raise
    group.procs = {name: procs[name] for name, _, _ in BLOCK_SERVERS}
    return group
