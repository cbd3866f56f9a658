"""Chaos scenarios on harness processes: a nemesis Target over StorageCluster + WriterProcess.

    run = ChaosRun(tmp_path, seed, replicas=1, storage_env={...}, writer_env={...})
    run.start()                       six storage nodes, writer db1, replicas db2..
    run.nemesis.az_down("az-c") ...   faults (engine/chaos/nemesis.py)
    run.workload.start() ... stop()   bank + register + reads (engine/chaos/checkers.py)
    run.verdict(allow_log=[...])      every checker; returns violations (list of str)
    run.close()

Every process gets $AURORA_FAULTS_FILE (run.fault_file), so link and disk faults reach
it. Every failure message starts with the seed and the nemesis history, so it replays
with AURORA_SEED=<seed>.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc

from engine.chaos import checkers as cc
from engine.client import Client
from engine.hooks import FAULTS_FILE_ENV, FAULTS_SEED_ENV
from engine.chaos.nemesis import Nemesis
from tests.harness import StorageCluster
from tests.writer_harness import WriterProcess


class HarnessTarget:
    """engine.chaos.nemesis Target over harness processes."""

    corrupt_pattern = b"acct-"

    def __init__(self, storage: StorageCluster, instances: dict[str, WriterProcess],
                 fault_file: Path) -> None:
        self.cluster = storage
        self.procs = instances
        self.fault_file = fault_file
        self.storage = list(storage.nodes)
        self.instances = list(instances)
        self.incarnation = {n: 0 for n in self.storage}
        self._paused: set[str] = set()

    def writer(self) -> str:
        return self.instances[0]

    def replicas(self) -> list[str]:
        return self.instances[1:]

    def az(self, name: str) -> str:
        return self.cluster.nodes[name].az if name in self.cluster.nodes else "az-a"

    def address(self, name: str) -> str:
        return self.cluster.address(name) if name in self.cluster.nodes else self.procs[name].address

    def running(self, name: str) -> bool:
        return self.cluster.running(name) if name in self.cluster.nodes else self.procs[name].running()

    def paused(self, name: str) -> bool:
        return name in self._paused and self.running(name)

    def kill(self, name: str) -> None:
        self._paused.discard(name)
        if name in self.cluster.nodes:
            self.cluster.kill(name)
        else:
            self.procs[name].kill()

    def start(self, name: str) -> None:
        if name in self.cluster.nodes:
            self.cluster.start_node(name, timeout_s=60)
        else:
            self.procs[name].start(timeout_s=120)

    def pause(self, name: str) -> None:
        self._paused.add(name)
        if name in self.cluster.nodes:
            self.cluster.pause(name)
        else:
            self.procs[name].proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._paused.discard(name)
        if name in self.cluster.nodes:
            self.cluster.resume(name)
        else:
            self.procs[name].proc.send_signal(signal.SIGCONT)

    def data_dir(self, name: str) -> Path:
        return self.cluster.data_dir(name)

    def log_paths(self) -> dict[str, Path]:
        paths = {n: self.cluster.log_path(n) for n in self.storage}
        paths.update({n: p.log_path for n, p in self.procs.items()})
        return paths


class ChaosRun:
    """One scenario's cluster, nemesis, workload and checkers (see module doc)."""

    def __init__(self, base: Path, seed: int, *, replicas: int = 0, storage_env: dict | None = None,
                 writer_env: dict | None = None, pg_count: int = 4, lal: int = 10_000,
                 volume: str = "chaos") -> None:
        self.base = Path(base)
        self.seed = seed
        self.volume = volume
        self.fault_file = self.base / "faults.json"
        env = {FAULTS_FILE_ENV: str(self.fault_file), FAULTS_SEED_ENV: str(seed)}
        self.storage = StorageCluster(self.base / "storage", env={**env, **(storage_env or {})})
        self.writer = WriterProcess(self.storage, self.base / "db1", volume=volume, pg_count=pg_count,
                                    lal=lal, buffer_pool_pages=256)
        self.writer.env.update({**env, **(writer_env or {})})
        self.instances = {"db1": self.writer}
        for i in range(replicas):
            r = self.writer.replica(self.base / f"db{i + 2}", instance=f"db{i + 2}")
            r.env.update(env)
            self.instances[r.instance] = r
        self.target = HarnessTarget(self.storage, self.instances, self.fault_file)
        self.nemesis: Nemesis | None = None
        self.workload: cc.Workload | None = None
        self.sampler: cc.StateSampler | None = None
        self._clients: dict[str, Client] = {}

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, workload: bool = True, **workload_kw) -> "ChaosRun":
        self.fault_file.write_text("{}")
        self.storage.start(timeout_s=60)
        self.nemesis = Nemesis(self.target, self.seed)
        self.nemesis.note(f"seed {self.seed}")
        for proc in self.instances.values():
            proc.start(timeout_s=120)
        workload_kw.setdefault("commit_timeout_s", 30.0)
        self.workload = cc.Workload(self.writer_client, self.reader_clients, seed=self.seed, **workload_kw)
        self.workload.setup()
        self.sampler = cc.StateSampler(self.writer_status, self.node_status).start()
        if workload:
            self.workload.start()
        return self

    def close(self) -> None:
        if self.workload is not None:
            self.workload.stop(join_s=5)
        if self.sampler is not None:
            self.sampler.stop()
        for c in self._clients.values():
            c.close()
        for proc in self.instances.values():
            if proc.proc is not None and proc.running():
                proc.proc.send_signal(signal.SIGCONT)
            proc.close()
        self.storage.close()

    # --- clients ------------------------------------------------------------------------

    def client(self, name: str, timeout_s: float = 20.0) -> Client:
        c = self._clients.get(name)
        if c is None:
            c = self._clients[name] = Client(self.target.address(name), timeout_s=timeout_s)
        return c

    def writer_client(self) -> Client:
        return self.client("db1")

    def reader_clients(self) -> dict[str, Client]:
        return {"writer": self.client("db1", timeout_s=5.0),
                **{n: self.client(n, timeout_s=5.0) for n in self.target.replicas()}}

    def writer_status(self):
        return self.client("db1").status() if self.writer.running() else None

    def node_status(self) -> dict:
        from aurora_pb import storage_pb2 as spb
        from aurora_pb import storage_pb2_grpc as spb_grpc
        out = {}
        for n in self.target.storage:
            if not self.storage.running(n) or self.target.paused(n):
                continue
            try:
                with grpc.insecure_channel(self.storage.address(n)) as ch:
                    out[n] = (self.target.incarnation[n],
                              spb_grpc.StorageStub(ch).NodeStatus(spb.NodeStatusRequest(), timeout=2.0))
            except grpc.RpcError:
                pass
        return out

    # --- verdict ------------------------------------------------------------------------

    def header(self) -> str:
        hist = "\n".join(self.nemesis.history) if self.nemesis else ""
        counts = self.workload.counts() if self.workload else {}
        return (f"seed {self.seed} (replay: AURORA_SEED={self.seed}); workload {counts}\n"
                f"nemesis history:\n{hist}")

    def verdict(self, allow_log: list[str] = (), durable_at_ack: bool = True,
                min_reads: int = cc.BANK_READS_MIN) -> list[str]:
        """Stop the workload, heal, and run every checker. Returns the violations."""
        self.nemesis.heal()
        self.workload.stop()
        self.sampler.sample()
        out = cc.check_bank_reads(self.workload, min_reads)
        out += cc.check_lost_writes(self.workload, self.writer_client)
        self.sampler.sample()
        self.sampler.stop()
        out += cc.check_monotonic(self.sampler)
        if durable_at_ack:  # from the storage nodes' own SCL logs, next to the fault file
            out += cc.check_acks_held_by_storage(self.workload, self.fault_file.parent, self.volume)
        out += cc.scan_logs(self.target.log_paths(), allow_log)
        return out

    def assert_green(self, allow_log: list[str] = (), min_ok: int = cc.ACKED_OPS_MIN,
                     min_reads: int = cc.BANK_READS_MIN) -> None:
        violations = self.verdict(allow_log, min_reads=min_reads)
        counts = self.workload.counts()
        if violations:
            dump = self.base / "history.json"
            self.workload.dump(dump)
            violations.insert(0, f"full history: {dump}")
        assert not violations, self.header() + "\nviolations:\n" + "\n".join(violations[:30])
        print(f"workload: {counts}")
        assert counts["transfers_ok"] + counts["puts_ok"] >= min_ok, (
            f"only {counts['transfers_ok'] + counts['puts_ok']} ops acknowledged, at least "
            f"{min_ok} needed\n" + self.header())
