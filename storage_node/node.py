"""One storage node in-process: the store, its group committer, executors and counters.

``StorageNode`` is what the rpc layer (service.py), gossip (gossip.py) and the background
tasks (background.py) share. It imports no grpc: requests reach it as plain values and
refusals leave it as storage_node.errors exceptions.

Threads: the event loop runs request handling and scheduling; one thread runs LMDB write
transactions (commit.py); ``read_executor`` (2 threads) runs foreground LMDB reads and page
materialisation; ``bg_executor`` (1 thread) runs background reads (coalesce, GC, scrub
planning) so they never hold up a foreground read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from dataclasses import dataclass, fields

from engine import hooks
from storage_node.commit import GroupCommitter
from storage_node.store import AppendOp, Store, verify_and_prepare


#: False when the process's log format already carries ``[node az]`` (engine/cli/__init__.py does
#: that for the storage-node subcommand); True in-process, where several nodes share a log.
PREFIX_LINES = True


class NodeLog(logging.LoggerAdapter):
    """Prefixes every line with the node id and AZ, e.g. ``[sn1 az-a] ...``."""

    def process(self, msg, kwargs):
        if PREFIX_LINES:
            return f"[{self.extra['node_id']} {self.extra['az']}] {msg}", kwargs
        return msg, kwargs


def node_logger(name: str, node_id: str, az: str) -> NodeLog:
    return NodeLog(logging.getLogger(name), {"node_id": node_id, "az": az})


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass
class Tuning:
    """Knobs of the background work. Each can be set by an environment variable
    ``AURORA_SN_<FIELD NAME IN CAPITALS>`` (tests shorten the intervals)."""

    map_size: int = 16 << 30              # LMDB map size in bytes (sparse)
    gossip_interval_s: float = 0.3        # mean pause between gossip rounds (+-40% jitter)
    gossip_fetch_bytes: int = 1 << 20     # max_bytes of one FetchRecords
    gossip_round_bytes: int = 8 << 20     # records pulled per round, all segments
    discover_every_rounds: int = 5        # learn volumes from a peer every N rounds
    coalesce_interval_s: float = 0.25     # coalescer wake-up period
    coalesce_records: int = 32            # fold a page once it has this many new records
    coalesce_records_busy: int = 4096     # ... while foreground appends are heavy (folding
    #                                       costs ~2 us per record: LMDB reads + apply)
    busy_records_per_s: float = 20000.0   # foreground ingest rate that counts as heavy
    coalesce_busy_share: float = 0.25     # ... and the share of wall time folding may take then;
    #                                       the backlog left is folded once the load drops
    coalesce_sweep_s: float = 5.0         # fold every page with any new record this often
    coalesce_pages: int = 16              # pages per coalesce transaction
    index_fold_deltas: int = 16           # fold a segment's page-index deltas (one row per
    #                                       write txn) into per-page rows once it has this
    #                                       many while appends are heavy; any, otherwise
    gc_interval_s: float = 1.0
    gc_pages: int = 16                    # pages per GC step (one transaction)
    scrub_interval_s: float = 30.0        # pause between full scrub passes
    scrub_records: int = 512              # records verified per scrub step
    scrub_versions: int = 32              # page versions verified per scrub step
    scrub_pause_s: float = 0.05           # pause between scrub steps
    repair_interval_s: float = 0.5
    hydration_chunk_bytes: int = 4 << 20  # page bytes per FetchPageVersions (docs/membership.md)

    @classmethod
    def from_env(cls) -> "Tuning":
        t = cls()
        for f in fields(cls):
            raw = os.environ.get("AURORA_SN_" + f.name.upper())
            if raw:
                setattr(t, f.name, type(getattr(t, f.name))(float(raw)))
        return t


@dataclass
class Counters:
    """NodeStatus counters (since this process started)."""

    append_rpcs: int = 0
    append_batches: int = 0          # per-PG batches of the writer's Appends
    records_received: int = 0
    bytes_received: int = 0
    pages_materialised: int = 0
    scrub_errors_found: int = 0
    gossip_records_pulled: int = 0
    gc_records_deleted: int = 0
    hydrated_bytes: int = 0          # page bytes installed by hydration (docs/membership.md)
    hydration_s: float = 0.0         # wall time spent hydrating
    hydrations: int = 0              # segments hydrated


class StorageNode:
    """Store + group committer + executors + counters of one node (see module doc)."""

    def __init__(self, node_id: str, az: str, data_dir: str, tuning: Tuning | None = None) -> None:
        self.node_id = node_id
        self.az = az
        self.tuning = tuning or Tuning()
        self.log = node_logger("storage_node", node_id, az)
        self.store = Store(data_dir, node_id, map_size=self.tuning.map_size,
                           logger=node_logger("storage_node.store", node_id, az))
        self.counters = Counters()
        hooks.warn_if_planted(f"storage node {node_id}")   # test-only switches
        self.committer: GroupCommitter | None = None
        self.read_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lmdb-read")
        self.bg_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmdb-bg")

    async def start(self) -> None:
        self.committer = GroupCommitter(self.store, node_logger("storage_node.commit", self.node_id, self.az))
        self.committer.start()

    async def close(self) -> None:
        """Finish queued commits, stop the executors, close LMDB."""
        if self.committer is not None:
            await self.committer.close()
        self.read_executor.shutdown(wait=True)
        self.bg_executor.shutdown(wait=True)
        self.store.close()
        self.log.info("store closed")

    # -- helpers for the rpc layer and the background tasks ---------------------------------

    async def read(self, fn, *args):
        """Run a Store read method in the foreground read pool."""
        return await asyncio.get_running_loop().run_in_executor(self.read_executor, fn, *args)

    async def read_bg(self, fn, *args):
        """Run a Store read method in the background pool (lower priority work)."""
        return await asyncio.get_running_loop().run_in_executor(self.bg_executor, fn, *args)

    async def commit(self, op, background: bool = False):
        return await self.committer.submit(op, background)

    def verify_append(self, volume: str, epoch: int, writer_vdl: int, batches,
                      source: str = "writer") -> AppendOp:
        """Verify every batch of one request (checksums, lengths, types, PG membership)
        BEFORE anything is stored; raise the first refusal. ``batches`` yields
        (pg, membership_epoch, records bytes)."""
        info = self.store.volume(volume)
        verified = []
        for pg, membership_epoch, buf in batches:
            verified.append(verify_and_prepare(info.layout, info.vol_id, pg, buf, membership_epoch))
        return AppendOp(volume, epoch, writer_vdl, verified, source)

    async def append(self, op: AppendOp, background: bool = False) -> dict[int, int]:
        """Make a verified AppendOp durable; return {pg: scl} (invariant 3)."""
        result = await (await self.append_future(op, background))
        if isinstance(result, Exception):
            raise result
        return result

    async def append_future(self, op: AppendOp, background: bool = False) -> asyncio.Future:
        """Queue a verified AppendOp for group commit (waiting only for a queue slot) and
        return the future of its {pg: scl}, set once the transaction holding it committed
        with sync (invariant 3); a refusal is the future's value, not raised. AppendStream
        keeps many requests in flight this way, with no task each."""
        n = sum(b.scan.count for b in op.batches)
        nbytes = sum(len(b.buf) for b in op.batches)
        if op.source == "writer":
            self.counters.append_batches += len(op.batches)
            self.counters.records_received += n
            self.counters.bytes_received += nbytes
        else:
            self.counters.gossip_records_pulled += n
        defer_s = hooks.ack_before_commit_s()
        if defer_s and op.source == "writer" and not background:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(self._ack_before_commit(op, defer_s))   # PLANTED BUG, test only
            return fut
        fut = await self.committer.enqueue(op, background)
        if op.source == "writer" and hooks.scl_overclaim():
            return self._overclaim(op, fut)   # PLANTED BUG, test only
        return fut

    def _overclaim(self, op: AppendOp, fut: asyncio.Future) -> asyncio.Future:
        """Planted bug (engine/hooks.py): ack each batch's highest LSN as the SCL, even when
        a gap in the chain holds the real SCL lower (invariant 4)."""
        out = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future) -> None:
            result = f.result()
            if not isinstance(result, Exception):
                result = dict(result)
                for batch in op.batches:
                    result[batch.pg] = max(result.get(batch.pg, 0), batch.scan.max_lsn)
            if not out.done():
                out.set_result(result)

        fut.add_done_callback(done)
        return out

    def _ack_before_commit(self, op: AppendOp, defer_s: float) -> dict[int, int]:
        """Planted bug (engine/hooks.py): claim every batch is stored, commit later."""
        loop = asyncio.get_running_loop()
        loop.call_later(defer_s, lambda: loop.create_task(self.commit(op)))
        acks: dict[int, int] = {}
        for batch in op.batches:
            scl = self.store.segment(op.volume, batch.pg).scl
            acks[batch.pg] = max(scl, batch.scan.max_lsn)
        return acks
