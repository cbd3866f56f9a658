"""The write-amplification benchmark: aurora-lite against the mirrored baseline, one run.

``aurora-lite bench write-amplification`` (engine/cli/bench.py) and
bench/bench_write_amplification.py call ``run_bench``. The experiment is [P17 3.2,
Table 1] on one machine (method and results in docs/benchmarks.md)::

    this process: ONE asyncio loop, the engine (engine.db.database.Database) and C coroutine
                  clients running engine/baseline/workload.py (SysBench oltp_write_only-like)
      config aurora-lite: Database over CountingDriver (engine/writer/storage_driver.py, counted)
                          -> six real storage-node processes, 4/6 write quorum
      config baseline:    Database over BaselineSink (engine/baseline/mirrored.py)
                          -> four real block-server processes, mirrored chain

The two configurations share everything but the sink: the engine, the buffer pool size,
the workload, the seed, gRPC, LMDB with sync, and the simulated AZ latency
(engine/cluster_config.Latency; the instance is in az-a). Each gets its own processes and
a fresh volume, creates the tables and loads N rows, runs its measured phases (healthy,
then slow, of the same length) and is shut down, its processes stopped, before the next
configuration starts: the two never run at once, not even idle (aurora-lite's storage
nodes keep gossiping, coalescing and scrubbing in the background, on the same two cores).
The order is ``BenchConfig.configs``; runs alternate it (docs/benchmarks.md).

The baseline's redo log is MySQL's 96 MiB scaled to the phase as [P17]'s 30-minute run
was to it (``scaled_redo_log_bytes``), so checkpoint flushing writes pages during a short
phase as it did there; ``BenchConfig.redo_log_bytes`` overrides it.

Slow node: one storage node (sn4, az-b) or one block server (bs4, the standby's mirror,
az-b) gets ``slow_ms`` of extra one-way delay on every link into it, for writes and reads
(the sender sleeps it before the request and after the reply, as the AZ delay itself).
The 4/6 quorum should hide it; the chain cannot, since every write waits for bs4.

What is measured per phase (counting rules R1-R7 in engine/baseline/io_count.py):

    compute I/Os/txn   aurora-lite: every PG batch of every Append request the instance
                       sends (R2; six copies of each, each request a message on a node's
                       AppendStream), and beside it the old count, each Append one write
                       (R2-old, ``compute_append_ios_per_txn``).
                       baseline: every write the instance sends to ITS OWN block server
                       (bs1), which is what [P17 Table 1] counts for MySQL ("not counting
                       the chained replication within EBS nor the cross-AZ writes").
    + standby          baseline only: also the writes the instance ships to bs3.
    whole path         every write every storage process received (baseline: plus the
                       mirror hops bs1->bs2 and bs3->bs4, from the block servers' Status).
    per node           I/Os each storage node / block server received per transaction.
    LMDB bytes/txn     key + value bytes put into LMDB by all nodes (NodeStatus / Status
                       deltas), background work (coalescing, gossip) included.
    tx/s, commit p50/p99 from the clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from aurora_pb import block_pb2 as bpb
from aurora_pb import storage_pb2 as spb
from engine.baseline import procs as bench_procs, workload as wa_workload
from engine.baseline.mirrored import REDO_LOG_BYTES_DEFAULT, BaselineSink, BlockChain, BlockTarget
from engine.format.cluster_config import DEFAULT_LAL, Latency
from engine.db.database import Database
from engine.baseline.io_count import PAPER, Ledger, format_table, per_txn, percentile, ratio
from engine.writer.recovery import recover
from engine.format.cluster_config import NodeInfo
from engine.writer.storage_driver import StorageDriver
from engine.transport import service_of
from engine.transport.links import Links
from engine.transport.latency import AzLatency
from engine.format.volume import VolumeLayout

log = logging.getLogger(__name__)

INSTANCE_AZ = "az-a"
VOLUME = "wa"
SLOW_STORAGE_NODE = "sn4"
SLOW_BLOCK_SERVER = "bs4"
CONFIGS = ("aurora-lite", "baseline")
Progress = Callable[[str, float, str], None]    # (phase label, fraction done, detail)

#: [P17 Table 1]'s run: SysBench write-only for 30 minutes (780,000 MySQL transactions,
#: about 433 tx/s) through MySQL's default redo log of 2 x 48 MiB.
P17_RUN_S = 1800.0
REDO_LOG_MIN_BYTES = 128 << 10      # floor of the scaled log: a few load transactions


def scaled_redo_log_bytes(duration_s: float | None, transactions: int | None) -> int:
    """The baseline's redo log capacity scaled to one measured phase as [P17]'s mirrored
    MySQL was to its run: 96 MiB for 30 minutes at 433 tx/s (780,000 transactions), i.e.
    96 MiB x transactions / 780,000, or, for a phase given by its duration, 96 MiB x
    duration / 1800 s. A phase then wraps the log as often as [P17]'s run did when it
    commits at [P17]'s MySQL rate (less often when slower; the report prints the wraps),
    so checkpoint flushing writes pages several times per phase, as it did there."""
    if transactions is not None:
        fraction = transactions / PAPER["mysql_transactions"]
    elif duration_s is not None:
        fraction = duration_s / P17_RUN_S
    else:
        raise ValueError("give a duration or a transaction count")
    scaled = int(REDO_LOG_BYTES_DEFAULT * fraction) // 4096 * 4096
    return max(REDO_LOG_MIN_BYTES, min(REDO_LOG_BYTES_DEFAULT, scaled))


@dataclass
class BenchConfig:
    """Every knob of one benchmark run (all of them are printed with the results)."""

    rows: int = 1000
    clients: int = 16
    duration_s: float | None = 20.0
    transactions: int | None = None         # per phase, instead of (or besides) a duration
    buffer_pool_pages: int = 256            # both configurations (2 MiB of 8 KiB pages)
    redo_log_bytes: int | None = None       # baseline's redo log; None: scaled_redo_log_bytes
    slow_ms: float = 10.0                   # extra one-way delay into the slow node
    slow_phase: bool = True
    configs: tuple[str, ...] = CONFIGS
    seed: int = 1
    lal: int = DEFAULT_LAL
    pg_count: int = 8
    stripe_pages: int = 64
    intra_az_ms: float = Latency().intra_az_ms
    cross_az_ms: float = Latency().cross_az_ms
    base_dir: str | None = None             # default: a fresh temporary dir, removed after
    keep_dir: bool = False
    process_log_level: str = "WARNING"

    @property
    def latency(self) -> Latency:
        return Latency(self.intra_az_ms, self.cross_az_ms)

    @property
    def redo_log_bytes_used(self) -> int:
        """The baseline's redo log capacity: as given, else scaled to the phase."""
        if self.redo_log_bytes is not None:
            return self.redo_log_bytes
        return scaled_redo_log_bytes(self.duration_s, self.transactions)

    def to_json(self) -> dict:
        out = asdict(self)
        out["configs"] = list(self.configs)
        out["redo_log_bytes_used"] = self.redo_log_bytes_used
        return out


# --- aurora-lite: the real driver, counted ----------------------------------------------------


class CountingDriver(StorageDriver):
    """The real StorageDriver with every Append and ReadPage counted in a Ledger, and an
    optional extra one-way delay to some nodes (the slow-node phase).

    It counts every Append request written to a node's AppendStream (one I/O each, as a
    unary Append was), delays each node's stream by its extra delay (both ways, read live
    so a phase can change it) and wraps the ReadPage callables after ``start``; the
    driver's batching, quorum tracking and retries are untouched.
    """

    def __init__(self, *args, ledger: Ledger, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        self.extra_delay_ms: dict[str, float] = {}   # node name -> extra one-way ms
        self._payload_cache: tuple[bytes | None, list[int]] = (None, [])

    async def start(self) -> None:
        await super().start()
        for node in self._nodes.values():
            node.stub.ReadPage = self._counted_read(node.info.name, node.stub.ReadPage)

    def _open_stream(self, node):
        extra = self

        class ExtraDelay:   # a LinkDelay: this node's extra one-way delay now
            def one_way_s(self, _address: str) -> float:
                return extra.extra_delay_ms.get(node.info.name, 0.0) / 1000.0
        return Links(f"wa-bench-{node.info.name}", ExtraDelay()).stream(
            node.info.address, super()._open_stream(node))

    async def _write_append(self, node, stream, batch) -> None:
        data = batch.bytes_for(self._hosted(node, batch))
        self.ledger.sent_append(node.info.name, self._payload(data), len(data))
        await super()._write_append(node, stream, batch)

    async def read_page(self, page_id: int, read_point: int, min_scl: int | None = None) -> bytes | None:
        """The driver's read (hedged), timed: what a buffer pool miss waits for."""
        started = time.perf_counter()
        try:
            return await super().read_page(page_id, read_point, min_scl)
        finally:
            self.stats["page_reads"] = self.stats.get("page_reads", 0) + 1
            self.stats["page_read_ms_total"] = (self.stats.get("page_read_ms_total", 0.0)
                                                + (time.perf_counter() - started) * 1000)

    def _payload(self, data: bytes) -> list[int]:
        """The record bytes of each PG batch of a serialised Append (R2 counts each)."""
        cached, sizes = self._payload_cache
        if cached is not data:  # the same bytes object goes to all six nodes: parse once
            sizes = [len(b.records) for b in spb.AppendRequest.FromString(data).batches]
            self._payload_cache = (data, sizes)
        return sizes

    def _counted_read(self, name: str, call):
        async def read_page(request, **kwargs):
            extra_s = self.extra_delay_ms.get(name, 0.0) / 1000.0
            if extra_s:
                await asyncio.sleep(extra_s)
            reply = await call(request, **kwargs)
            if extra_s:
                await asyncio.sleep(extra_s)
            self.ledger.read(name, len(reply.page))
            return reply
        return read_page


# --- Node counters -------------------------------------------------------------------------


def bench_transport(latency=None):
    """The transport of the benchmark's own process: gRPC. The benchmark is a composition
    root (like a process entry point): it starts the processes it measures and talks to
    them, so it picks the implementation."""
    from engine.transport.grpc_transport import GrpcTransport
    return GrpcTransport("bench", latency)


async def storage_node_status(group) -> dict[str, dict]:
    """NodeStatus counters of every storage node (name -> dict)."""
    out = {}
    for name in group.names():
        async with bench_transport().channel(group.address(name)) as channel:
            reply = await channel.stub(service_of(spb, "Storage")).NodeStatus(
                spb.NodeStatusRequest(), timeout_s=10)
        out[name] = {"az": reply.az, "records_received": reply.records_received,
                     "bytes_received": reply.bytes_received, "append_rpcs": reply.append_rpcs,
                     "lmdb_bytes_written": reply.lmdb_bytes_written, "write_txns": reply.write_txns,
                     "gossip_records_pulled": reply.gossip_records_pulled,
                     "pages_materialised": reply.pages_materialised}
    return out


async def block_server_status(group) -> dict[str, dict]:
    """Status counters of every block server (name -> dict)."""
    out = {}
    for name in group.names():
        async with bench_transport().channel(group.address(name)) as channel:
            reply = await channel.stub(service_of(bpb, "Block")).Status(bpb.BlockStatusRequest(),
                                                                        timeout_s=10)
        out[name] = {"az": reply.az, "write_rpcs": reply.write_rpcs, "block_writes": reply.block_writes,
                     "write_ios": reply.write_ios, "bytes_received": reply.bytes_received,
                     "mirror_rpcs": reply.mirror_rpcs, "mirror_ios": reply.mirror_ios,
                     "mirror_bytes": reply.mirror_bytes, "lmdb_bytes_written": reply.lmdb_bytes_written,
                     "write_txns": reply.write_txns, "read_rpcs": reply.read_rpcs,
                     "read_bytes": reply.read_bytes}
    return out


async def configure_mirror_delay(address: str, delay_ms: float) -> None:
    async with bench_transport().channel(address) as channel:
        await channel.stub(service_of(bpb, "Block")).Configure(
            bpb.BlockConfigureRequest(mirror_delay_ms=delay_ms), timeout_s=10)


def counter_delta(after: dict[str, dict], before: dict[str, dict]) -> dict[str, dict]:
    """after - before for every numeric counter of every node (strings kept from after)."""
    out = {}
    for name, counters in after.items():
        prev = before.get(name, {})
        out[name] = {k: (v - prev.get(k, 0) if isinstance(v, (int, float)) else v)
                     for k, v in counters.items()}
    return out


# --- One phase's figures (pure) ---------------------------------------------------------------


def summarise(config: str, variant: str, phase: wa_workload.PhaseResult, writes: Ledger,
              headline: list[str], compute: list[str], nodes: dict[str, dict],
              extra: dict | None = None) -> dict:
    """The figures of one measured phase, per committed transaction (R7).

    ``writes``: the instance's sends during the phase (a Ledger delta). ``headline``: the
    destinations of the headline compute figure; ``compute``: every destination the
    instance writes to. ``nodes``: per storage process, counter deltas with at least
    ``received_ios``, ``received_bytes``, ``lmdb_bytes_written`` and ``write_txns``.
    """
    n = phase.committed
    latencies_ms = [s * 1000 for s in phase.commit_latencies_s]
    head = writes.total(headline)
    comp = writes.total(compute)
    chain_ios = sum(v["received_ios"] for v in nodes.values())
    chain_append_ios = sum(v.get("received_append_ios", v["received_ios"]) for v in nodes.values())
    chain_bytes = sum(v["received_bytes"] for v in nodes.values())
    per_node = {name: {"az": v.get("az", ""),
                       "ios_per_txn": per_txn(v["received_ios"], n),
                       "append_ios_per_txn": per_txn(v.get("received_append_ios", v["received_ios"]), n),
                       "bytes_per_txn": per_txn(v["received_bytes"], n),
                       "lmdb_bytes_per_txn": per_txn(v["lmdb_bytes_written"], n),
                       "write_txns_per_txn": per_txn(v["write_txns"], n),
                       "counters": v}
                for name, v in nodes.items()}
    busiest = max(per_node, key=lambda k: per_node[k]["ios_per_txn"]) if per_node else None
    reads = writes.read_total()
    return {
        "config": config, "variant": variant,
        "transactions": n, "aborts": phase.aborted, "errors": phase.errors,
        "error_samples": phase.error_samples, "elapsed_s": phase.elapsed_s,
        "tps": n / phase.elapsed_s if phase.elapsed_s else 0.0,
        "commit_ms": {"p50": percentile(latencies_ms, 50), "p99": percentile(latencies_ms, 99),
                      "mean": sum(latencies_ms) / len(latencies_ms) if latencies_ms else 0.0,
                      "max": max(latencies_ms, default=0.0)},
        "compute_ios_per_txn": per_txn(head.ios, n),
        "compute_all_ios_per_txn": per_txn(comp.ios, n),
        "chain_ios_per_txn": per_txn(chain_ios, n),
        # The same sends by R2-old (an Append is one write of all its PG batches): the
        # headline before issue 16. Identical for the baseline (R3 is unchanged).
        "compute_append_ios_per_txn": per_txn(head.append_ios, n),
        "chain_append_ios_per_txn": per_txn(chain_append_ios, n),
        "compute_writes_per_request": per_txn(comp.writes, comp.requests),
        "compute_bytes_per_txn": per_txn(comp.bytes, n),
        "chain_bytes_per_txn": per_txn(chain_bytes, n),
        "compute_requests_per_txn": per_txn(comp.requests, n),
        "read_ios_per_txn": per_txn(reads.ios, n),
        "page_reads_per_txn": per_txn((extra or {}).get("page_reads", 0), n),
        "page_read_ms_mean": per_txn((extra or {}).get("page_read_ms_total", 0.0),
                                     (extra or {}).get("page_reads", 0)),
        "busiest_node": busiest,
        "busiest_node_ios_per_txn": per_node[busiest]["ios_per_txn"] if busiest else 0.0,
        "busiest_node_append_ios_per_txn": per_node[busiest]["append_ios_per_txn"] if busiest else 0.0,
        "lmdb_bytes_per_txn": per_txn(sum(v["lmdb_bytes_written"] for v in nodes.values()), n),
        "gossip_records_per_txn": per_txn(sum(v.get("gossip_records_pulled", 0) for v in nodes.values()), n),
        "nodes": per_node,
        "writes": {dest: t.to_json() for dest, t in writes.writes.items()},
        "extra": extra or {},
    }


# --- The two configurations ------------------------------------------------------------------


async def _measure(db, cfg: BenchConfig, label: str, progress: Progress | None, seed: int):
    def report(result: wa_workload.PhaseResult, elapsed_s: float) -> None:
        if progress is None:
            return
        if cfg.duration_s:
            fraction = elapsed_s / cfg.duration_s
        else:
            fraction = result.committed / max(1, cfg.transactions or 1)
        progress(label, min(1.0, fraction),
                 f"{result.committed} txns, {result.committed / max(elapsed_s, 1e-9):,.0f} tx/s")

    phase = await wa_workload.run_clients(db, cfg.rows, cfg.clients, duration_s=cfg.duration_s,
                                          transactions=cfg.transactions, seed=seed, progress=report)
    if progress is not None:
        progress(label, 1.0, f"{phase.committed} txns in {phase.elapsed_s:.1f} s")
    return phase


async def _load(db, cfg: BenchConfig, label: str, progress: Progress | None) -> None:
    await wa_workload.create_schema(db)

    def loaded(rows: int) -> None:
        if progress is not None:
            progress(label, rows / cfg.rows, f"{rows}/{cfg.rows} rows")

    await wa_workload.load(db, cfg.rows, seed=cfg.seed, progress=loaded)


def phase_seed(cfg: BenchConfig, variant: str) -> int:
    """The clients' seed of a phase: the same for both configurations, different for each
    phase (replaying the healthy phase's choices would rewrite rows with the values they
    already hold, which the engine skips, and the slow phase would log far less)."""
    return cfg.seed * 10 + {"healthy": 1, "slow": 2}[variant]


def _pool_delta(after: dict, before: dict) -> dict:
    return {k: (v - before.get(k, 0) if k in ("hits", "misses", "evictions", "vdl_waits") else v)
            for k, v in after.items()}


class AuroraConfig:
    """aurora-lite over the storage nodes of ``group``: the real driver, counted."""

    name = "aurora-lite"

    def __init__(self, cfg: BenchConfig, group) -> None:
        self.cfg = cfg
        self.group = group
        self.ledger = Ledger()
        nodes = [NodeInfo(n, group.az(n), group.address(n)) for n in group.names()]
        self.transport = bench_transport(AzLatency(INSTANCE_AZ, "bench", model=cfg.latency,
                                                   nodes=nodes))
        self.driver = CountingDriver(VOLUME, nodes, VolumeLayout(cfg.pg_count, cfg.stripe_pages),
                                     epoch=0, lal=cfg.lal, instance="bench", ledger=self.ledger,
                                     transport=self.transport)
        self.db: Database | None = None

    async def setup(self, progress: Progress | None) -> None:
        """Create the volume (recovery), the tables, and load the rows."""
        await self.driver.start()
        await recover(self.driver)
        self.db = Database(self.driver, self.cfg.buffer_pool_pages)
        await self.db.bootstrap()
        await _load(self.db, self.cfg, "aurora-lite: load", progress)

    def set_latency(self, latency: Latency) -> None:
        """Apply a whole latency model (AZ delays and cluster.json-style ``extra_node_ms``)
        to the running driver, as a writer reloading cluster.json would
        (bench/bench_outlier.py)."""
        self.transport.latency.set_model(latency)

    async def measure(self, variant: str, progress: Progress | None, seed: int | None = None) -> dict:
        cfg, driver = self.cfg, self.driver
        slow = SLOW_STORAGE_NODE if variant == "slow" else None
        driver.extra_delay_ms = {slow: cfg.slow_ms} if slow else {}
        before, nodes_before = self.ledger.snapshot(), await storage_node_status(self.group)
        stats_before, pool_before = dict(driver.stats), self.db.pool.stats()
        db_before = dict(self.db.counters)
        try:
            phase = await _measure(self.db, cfg, f"aurora-lite: {variant}", progress,
                                      phase_seed(cfg, variant) if seed is None else seed)
        finally:
            driver.extra_delay_ms = {}
        delta = self.ledger.delta(before)
        counters = counter_delta(await storage_node_status(self.group), nodes_before)
        for name, c in counters.items():
            sent = delta.writes.get(name)
            c["received_ios"] = sent.ios if sent else 0      # the instance's sends = receipts
            c["received_append_ios"] = sent.append_ios if sent else 0
            c["received_bytes"] = sent.bytes if sent else 0
        extra = {k: driver.stats[k] - stats_before.get(k, 0) for k in driver.stats}
        extra["buffer_pool"] = _pool_delta(self.db.pool.stats(), pool_before)
        extra["database"] = {k: v - db_before.get(k, 0) for k, v in self.db.counters.items()}
        run = summarise(self.name, variant, phase, delta, self.group.names(), self.group.names(),
                        counters, extra)
        run["slow_node"], run["slow_ms"] = slow, cfg.slow_ms if slow else 0.0
        return run

    async def close(self) -> None:
        await self.driver.close()


class BaselineConfig:
    """The baseline over the block servers of ``group``: BaselineSink and its chain."""

    name = "baseline"

    def __init__(self, cfg: BenchConfig, group) -> None:
        self.cfg = cfg
        self.group = group
        self.ledger = Ledger()
        lat = cfg.latency
        self.primary = bench_procs.PRIMARY_BLOCK_SERVER
        self.standby = bench_procs.STANDBY_BLOCK_SERVER
        self.chain = BlockChain(
            VOLUME,
            BlockTarget(self.primary, group.az(self.primary), group.address(self.primary),
                        lat.one_way_ms(INSTANCE_AZ, group.az(self.primary))),
            BlockTarget(self.standby, group.az(self.standby), group.address(self.standby),
                        lat.one_way_ms(INSTANCE_AZ, group.az(self.standby))),
            self.ledger, instance="bench", transport=bench_transport())
        self.sink = BaselineSink(self.chain, layout=VolumeLayout(cfg.pg_count, cfg.stripe_pages),
                                 lal=cfg.lal, binlog_tables={wa_workload.TABLE},
                                 redo_log_bytes=cfg.redo_log_bytes_used)
        # The slow block server is bs4, the mirror of bs3: bs3 sends it every write.
        self.slow_sender = next(n for n, _, mirror in bench_procs.BLOCK_SERVERS
                                if mirror == SLOW_BLOCK_SERVER)
        self.mirror_ms = lat.one_way_ms(group.az(self.slow_sender), group.az(SLOW_BLOCK_SERVER))
        self.db: Database | None = None

    async def setup(self, progress: Progress | None) -> None:
        await self.chain.start()
        await self.sink.start()
        self.db = Database(self.sink, self.cfg.buffer_pool_pages)
        self.db.pool.on_evict = self.sink.page_evicted   # MySQL's LRU flush (engine/baseline/mirrored.py)
        await self.db.bootstrap()
        await _load(self.db, self.cfg, "baseline: load", progress)
        await self.sink.quiesce()

    async def set_latency(self, latency: Latency) -> None:
        """Apply a whole latency model to the chain: the instance's links to bs1 and bs3
        and each mirror link (bs1->bs2, bs3->bs4, through ``Configure``), with the
        ``extra_node_ms`` of the block servers at either end, as aurora-lite's driver and
        gossip apply it to storage nodes (bench/bench_outlier.py)."""
        group = self.group
        for target in (self.chain.primary, self.chain.standby):
            target.delay_ms = latency.one_way_ms(INSTANCE_AZ, target.az, to_node=target.name)
        for name, az, mirror in bench_procs.BLOCK_SERVERS:
            if mirror:
                ms = latency.one_way_ms(az, group.az(mirror), from_node=name, to_node=mirror)
                await configure_mirror_delay(group.address(name), ms)
                if name == self.slow_sender:
                    self.mirror_ms = ms      # what ``measure`` restores after a slow phase

    async def measure(self, variant: str, progress: Progress | None, seed: int | None = None) -> dict:
        cfg, sink = self.cfg, self.sink
        slow = SLOW_BLOCK_SERVER if variant == "slow" else None
        sender = self.group.address(self.slow_sender)
        await configure_mirror_delay(sender, self.mirror_ms + (cfg.slow_ms if slow else 0.0))
        before, nodes_before = self.ledger.snapshot(), await block_server_status(self.group)
        kinds_before, stats_before = self.chain.kinds.snapshot(), dict(sink.stats)
        pool_before, status_before = self.db.pool.stats(), sink.status()
        db_before = dict(self.db.counters)
        try:
            phase = await _measure(self.db, cfg, f"baseline: {variant}", progress,
                                      phase_seed(cfg, variant) if seed is None else seed)
        finally:
            await configure_mirror_delay(sender, self.mirror_ms)
        delta = self.ledger.delta(before)
        counters = counter_delta(await block_server_status(self.group), nodes_before)
        for c in counters.values():
            c["received_ios"] = c["write_ios"]
            c["received_bytes"] = c["bytes_received"]
        kinds = self.chain.kinds.delta(kinds_before)
        status_after = sink.status()
        extra = {k: sink.stats[k] - stats_before.get(k, 0) for k in sink.stats}
        extra["ios_per_txn_by_kind"] = {k: per_txn(t.ios, phase.committed) for k, t in kinds.writes.items()}
        extra["redo_log_bytes"] = sink.redo_log_bytes
        extra["data_pages"] = len(sink.pages)
        extra["redo_log_wraps"] = extra.get("redo_bytes", 0) / sink.redo_log_bytes
        extra["buffer_pool"] = _pool_delta(self.db.pool.stats(), pool_before)
        extra["database"] = {k: v - db_before.get(k, 0) for k, v in self.db.counters.items()}
        # Flushing owed at the edges of the phase: pages evicted while dirty and not yet
        # written, and all dirty pages (the end effect on the page-write counts).
        for key in ("evicted_dirty", "dirty_pages", "checkpoint_age"):
            extra[key + "_at_start"] = status_before[key]
            extra[key + "_at_end"] = status_after[key]
        run = summarise(self.name, variant, phase, delta, [self.primary],
                        [self.primary, self.standby], counters, extra)
        run["slow_node"], run["slow_ms"] = slow, cfg.slow_ms if slow else 0.0
        return run

    async def close(self) -> None:
        await self.sink.close()


async def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict:
    """Run every configuration of ``cfg`` over fresh real processes; return the results.

    One configuration at a time, in the order of ``cfg.configs``: start its processes,
    create and load the tables, measure its phases (healthy, then slow), close it and
    STOP its processes; only then start the next. So while one configuration is measured
    the other's processes are not running (aurora-lite's storage nodes would otherwise
    gossip, coalesce, collect garbage and scrub on the same cores). Alternate the order
    across runs (``configs=("baseline", "aurora-lite")``) so that neither always goes
    first; docs/benchmarks.md does.
    """
    for name in cfg.configs:
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")
    if len(set(cfg.configs)) != len(cfg.configs):
        raise ValueError(f"a configuration is named twice in {cfg.configs}")
    if cfg.duration_s is None and cfg.transactions is None:
        raise ValueError("give a duration or a transaction count")
    base = Path(cfg.base_dir) if cfg.base_dir else Path(tempfile.mkdtemp(prefix="aurora-lite-wa-"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs: list[dict] = []
    ok = False
    try:
        for name in cfg.configs:
            runs.extend(await _run_config(cfg, name, base, progress))
        ok = True
    finally:
        if ok and not cfg.keep_dir and not cfg.base_dir:
            shutil.rmtree(base, ignore_errors=True)
        elif not ok:
            log.error("benchmark failed; process logs kept in %s", base)
    return {"config": cfg.to_json(), "started": started, "seconds": time.time() - started,
            "base_dir": str(base) if (cfg.keep_dir or cfg.base_dir) else None,
            "order": list(cfg.configs), "runs": runs, "comparison": compare(runs), "paper": PAPER}


async def _run_config(cfg: BenchConfig, name: str, base: Path, progress: Progress | None) -> list[dict]:
    """One configuration from start to stop: processes, load, every phase, shutdown."""
    if progress:
        progress(f"{name}: start", 0.0, "starting processes")
    if name == "aurora-lite":
        group = await asyncio.to_thread(bench_procs.start_storage_nodes, base / name,
                                        log_level=cfg.process_log_level)
    else:
        group = await asyncio.to_thread(bench_procs.start_block_servers, base / name,
                                        cfg.latency, log_level=cfg.process_log_level)
    config = None
    try:
        config = AuroraConfig(cfg, group) if name == "aurora-lite" else BaselineConfig(cfg, group)
        await config.setup(progress)
        runs = []
        for variant in ("healthy", "slow") if cfg.slow_phase else ("healthy",):
            run = await config.measure(variant, progress)
            run["started_at"] = time.time() - run["elapsed_s"]
            runs.append(run)
        return runs
    finally:
        if config is not None:
            try:
                await config.close()
            except Exception as exc:  # closing must not hide the real failure
                log.warning("closing %s failed: %r", name, exc)
        await asyncio.to_thread(group.stop_all)


# --- Comparison, table, chart -----------------------------------------------------------------


def find_run(runs: list[dict], config: str, variant: str) -> dict | None:
    return next((r for r in runs if r["config"] == config and r["variant"] == variant), None)


def compare(runs: list[dict]) -> dict:
    """aurora-lite's advantage per variant: the [P17] ratios, computed the same way."""
    out = {}
    for variant in ("healthy", "slow"):
        a, b = find_run(runs, "aurora-lite", variant), find_run(runs, "baseline", variant)
        if a is None or b is None:
            continue
        out[variant] = {
            "ios_ratio": ratio(b["compute_ios_per_txn"], a["compute_ios_per_txn"]),
            "ios_ratio_append_rule": ratio(b["compute_append_ios_per_txn"], a["compute_append_ios_per_txn"]),
            "ios_ratio_with_standby": ratio(b["compute_all_ios_per_txn"], a["compute_all_ios_per_txn"]),
            "ios_ratio_whole_path": ratio(b["chain_ios_per_txn"], a["chain_ios_per_txn"]),
            "txn_ratio": ratio(a["tps"], b["tps"]),
            "per_node_ratio": ratio(b["busiest_node_ios_per_txn"], a["busiest_node_ios_per_txn"]),
            "p50_ratio": ratio(b["commit_ms"]["p50"], a["commit_ms"]["p50"]),
            "p99_ratio": ratio(b["commit_ms"]["p99"], a["commit_ms"]["p99"]),
            "goal_ios_ratio_met": (ratio(b["compute_ios_per_txn"], a["compute_ios_per_txn"]) or 0) >= PAPER["ios_ratio"],
            "goal_tps_ahead": a["tps"] > b["tps"],
        }
    return out


def _x(value) -> str:
    return "-" if value is None else f"{value:.1f}x"


def render(results: dict) -> str:
    """The human-readable report: settings, one table per variant, per-node table."""
    cfg = results["config"]
    runs = results["runs"]
    paper = results["paper"]
    lines = [
        "Write amplification: aurora-lite vs a mirrored page-writing baseline "
        "(SysBench oltp_write_only-like)",
        f"rows={cfg['rows']} clients={cfg['clients']} "
        + (f"duration={cfg['duration_s']:g}s " if cfg.get("duration_s") else "")
        + (f"transactions={cfg['transactions']} " if cfg.get("transactions") else "")
        + f"buffer pool={cfg['buffer_pool_pages']} pages (8 KiB) "
        f"latency one-way intra-AZ {cfg['intra_az_ms']:g} ms, cross-AZ {cfg['cross_az_ms']:g} ms; "
        f"baseline redo log {cfg.get('redo_log_bytes_used', 0) / 2**20:.2f} MiB; "
        f"I/O = 4 KiB of one write, a write = one PG batch to one segment "
        f"(engine/baseline/io_count.py R1-R7)",
        "",
    ]
    paper_tps_aurora = paper["aurora_transactions"] / 1800
    paper_tps_mysql = paper["mysql_transactions"] / 1800
    for variant in ("healthy", "slow"):
        a, b = find_run(runs, "aurora-lite", variant), find_run(runs, "baseline", variant)
        if a is None and b is None:
            continue
        cmp_ = results["comparison"].get(variant, {})
        if variant == "healthy":
            title = "Healthy storage"
        else:
            title = (f"One slow node: +{cfg['slow_ms']:g} ms one-way on every link into "
                     f"{SLOW_STORAGE_NODE} (aurora-lite) / {SLOW_BLOCK_SERVER} (baseline)")
        show_paper = variant == "healthy"

        def val(run, key, sub=None):
            if run is None:
                return None
            value = run.get(key)
            return value.get(sub) if sub and value is not None else value

        rows = [
            ["transactions committed", val(a, "transactions"), val(b, "transactions"), "",
             paper["aurora_transactions"], paper["mysql_transactions"], ""],
            ["transactions/s", val(a, "tps"), val(b, "tps"), _x(cmp_.get("txn_ratio")),
             paper_tps_aurora, paper_tps_mysql, _x(paper["txn_ratio"])],
            ["commit latency p50 (ms)", val(a, "commit_ms", "p50"), val(b, "commit_ms", "p50"),
             _x(cmp_.get("p50_ratio")), None, None, ""],
            ["commit latency p99 (ms)", val(a, "commit_ms", "p99"), val(b, "commit_ms", "p99"),
             _x(cmp_.get("p99_ratio")), None, None, ""],
            ["I/Os per txn from the instance [P17 rule]", val(a, "compute_ios_per_txn"),
             val(b, "compute_ios_per_txn"), _x(cmp_.get("ios_ratio")),
             paper["aurora_ios_per_txn"], paper["mysql_ios_per_txn"], _x(paper["ios_ratio"])],
            ["  old count: an Append = one write (R2-old)", val(a, "compute_append_ios_per_txn"),
             val(b, "compute_append_ios_per_txn"), _x(cmp_.get("ios_ratio_append_rule")),
             None, None, ""],
            ["  + shipping to the standby", val(a, "compute_all_ios_per_txn"),
             val(b, "compute_all_ios_per_txn"), _x(cmp_.get("ios_ratio_with_standby")), None, None, ""],
            ["  whole storage path (incl. mirrors)", val(a, "chain_ios_per_txn"),
             val(b, "chain_ios_per_txn"), _x(cmp_.get("ios_ratio_whole_path")), None, None, ""],
            ["bytes sent per txn from the instance", val(a, "compute_bytes_per_txn"),
             val(b, "compute_bytes_per_txn"), "", None, None, ""],
            ["bytes per txn, whole storage path", val(a, "chain_bytes_per_txn"),
             val(b, "chain_bytes_per_txn"), "", None, None, ""],
            ["I/Os per txn at the busiest node", val(a, "busiest_node_ios_per_txn"),
             val(b, "busiest_node_ios_per_txn"), _x(cmp_.get("per_node_ratio")), None, None,
             _x(paper["per_node_ratio"])],
            ["LMDB bytes written per txn (all nodes)", val(a, "lmdb_bytes_per_txn"),
             val(b, "lmdb_bytes_per_txn"), "", None, None, ""],
            ["records pulled by gossip per txn (not above)", val(a, "gossip_records_per_txn"),
             val(b, "gossip_records_per_txn"), "", None, None, ""],
            ["read I/Os per txn (not in the above)", val(a, "read_ios_per_txn"),
             val(b, "read_ios_per_txn"), "", None, None, ""],
            ["buffer pool misses per txn", val(a, "page_reads_per_txn"),
             val(b, "page_reads_per_txn"), "", None, None, ""],
            ["  their mean wait (ms)", val(a, "page_read_ms_mean"), val(b, "page_read_ms_mean"),
             "", None, None, ""],
            ["aborted attempts (write conflicts)", val(a, "aborts"), val(b, "aborts"), "", None, None, ""],
            ["other errors", val(a, "errors"), val(b, "errors"), "", None, None, ""],
        ]
        header = ["", "aurora-lite", "baseline", "advantage"]
        if show_paper:
            header += ["[P17] Aurora", "[P17] MySQL", "[P17] adv."]
        lines.append(title)
        lines.append(format_table(header, [r[:len(header)] for r in rows]))
        lines.append("")
    node_rows = []
    for run in runs:
        for name, node in run["nodes"].items():
            node_rows.append([f"{run['config']} {run['variant']} {name} ({node['az']})",
                              node["ios_per_txn"], node["bytes_per_txn"], node["lmdb_bytes_per_txn"],
                              node["write_txns_per_txn"]])
    if node_rows:
        lines.append("Per storage node / block server (received, per committed transaction)")
        lines.append(format_table(["", "I/Os", "bytes", "LMDB bytes", "LMDB txns"], node_rows))
        lines.append("")
    for run in runs:
        if run["config"] == "baseline":
            kinds = run["extra"].get("ios_per_txn_by_kind", {})
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items()))
            lines.append(f"baseline {run['variant']}: I/Os per txn to bs1 by write kind: {parts}; "
                         f"pages flushed {run['extra'].get('pages_flushed', 0)} "
                         f"(LRU {run['extra'].get('lru_pages_flushed', 0)}, checkpoint "
                         f"{run['extra'].get('checkpoint_pages_flushed', 0)}), "
                         f"log groups {run['extra'].get('groups', 0)}, redo written "
                         f"{run['extra'].get('redo_log_wraps', 0):.1f}x the redo log, evicted pages awaiting "
                         f"their write at start/end {run['extra'].get('evicted_dirty_at_start', 0)}/"
                         f"{run['extra'].get('evicted_dirty_at_end', 0)}")
        else:
            e = run["extra"]
            gossip = sum(n["counters"].get("gossip_records_pulled", 0) for n in run["nodes"].values())
            lines.append(f"aurora-lite {run['variant']}: batches {e.get('batches', 0)} "
                         f"({per_txn(e.get('records', 0), e.get('batches', 0)):.1f} records, "
                         f"{per_txn(run['transactions'], e.get('batches', 0)):.1f} txns each), "
                         f"append RPCs {e.get('append_rpcs', 0)} "
                         f"({run.get('compute_writes_per_request', 0):.2f} PG batches each), "
                         f"retries {e.get('retries', 0)}, "
                         f"records pulled by gossip {gossip}, hedged reads {e.get('hedged_reads', 0)}")
    for variant, c in results["comparison"].items():
        lines.append(f"{variant}: baseline/aurora-lite I/Os per txn = {_x(c['ios_ratio'])} "
                     f"(goal >= {paper['ios_ratio']}x: {'met' if c['goal_ios_ratio_met'] else 'NOT met'}); "
                     f"aurora-lite tx/s / baseline = {_x(c['txn_ratio'])} "
                     f"({'ahead' if c['goal_tps_ahead'] else 'NOT ahead'})")
    return "\n".join(lines)


def write_chart(results: dict, path: str) -> bool:
    """A PNG with four panels (I/Os per txn, tx/s, commit latency, busiest node I/Os).
    Returns False, writing nothing, when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = results["runs"]
    labels = [f"{r['config']}\n{r['variant']}" for r in runs]
    colors = ["tab:blue" if r["config"] == "aurora-lite" else "tab:orange" for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "write I/Os per transaction from the instance", [r["compute_ios_per_txn"] for r in runs]),
        (axes[0][1], "transactions per second", [r["tps"] for r in runs]),
        (axes[1][0], "commit latency p99 (ms)", [r["commit_ms"]["p99"] for r in runs]),
        (axes[1][1], "I/Os per transaction at the busiest node", [r["busiest_node_ios_per_txn"] for r in runs]),
    ]
    for ax, title, values in panels:
        ax.bar(labels, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.2f}" if v < 100 else f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    axes[0][0].axhline(PAPER["aurora_ios_per_txn"], color="tab:blue", ls="--", lw=1, label="[P17] Aurora 0.95")
    axes[0][0].axhline(PAPER["mysql_ios_per_txn"], color="tab:orange", ls="--", lw=1, label="[P17] MySQL 7.4")
    axes[0][0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"aurora-lite vs mirrored baseline: rows={cfg['rows']} clients={cfg['clients']} "
                 f"pool={cfg['buffer_pool_pages']} pages, slow node +{cfg['slow_ms']:g} ms", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def dumps(results: dict) -> str:
    return json.dumps(results, indent=2, sort_keys=True, default=str)

