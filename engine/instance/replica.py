"""A read replica: the same volume, read-only, kept current by the writer's redo stream.

The replica mounts the volume read-only: a Database (engine/db/database.py) with
``read_only=True`` over a ReplicaSink. Its pages come from storage at the replica's own
read point (its VDL), and it follows the writer through the replication stream
(proto/aurora_pb/replication.proto, writer side engine/instance/replication.py)::

    writer --snapshot (VDL, PG tails)--> replica: new cache, read point = VDL
    writer --MTRs above VDL-----------> replica: buffered, NOT applied yet
    writer --VDL update---------------> replica: apply every buffered MTR whose CPL <= VDL,
                                        whole MTRs at once, to cached pages only

Invariant 11: a record is applied only if its LSN <= the VDL the replica was told, only to
pages it caches (others are read from storage when needed, as of the new VDL), and a whole
MTR at a time, all in one synchronous step of the event loop, so a reader never sees half
a split or half a transaction. A page being read from storage while MTRs are applied is
caught up when it arrives (ReplicaSink.catch_up_page), since storage answered as of an
older read point.

Lag: each VDL update carries the writer's wall-clock time when VDL got there; the lag of
an update is the time from then until the replica applied it (the same machine's clock), as
in [P17] Table 4. Lag in LSNs is the writer's last announced VDL minus the replica's.

Resynchronisation: if the stream ends (writer restart, replica too slow, network), the
replica keeps serving its last consistent state, resubscribes, and builds a fresh cache
and Database at the new snapshot before switching to it: it never serves a torn view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from aurora_pb import replication_pb2 as rpb
from engine import hooks, materialiser
from engine.db.database import Database
from engine.errors import ReadOnlyError, RpcError, WriteQuorumUnavailable
from engine.format.redo import FLAG_CPL
from engine.db.sink import LsnAllocator
from engine.writer.storage_driver import StorageDriver
from engine.format.volume import VolumeLayout
from engine.transport import service_of

REPLICATION = service_of(rpb, "Replication")

log = logging.getLogger(__name__)

FEEDBACK_INTERVAL_S = 0.2
LAG_SAMPLES_MAX = 2000
PENDING_RECORDS_MAX = 200_000   # buffered records above VDL before we resubscribe


def _percentile(values, q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ReplicaSink:
    """The RedoSink a read-only Database uses on a replica (see module doc)."""

    def __init__(self, reader: StorageDriver, vdl: int, pg_tails: dict[int, int]) -> None:
        self.reader = reader                 # used for read_page only; never ships redo
        self.layout = reader.layout
        self.lal = reader.lal
        self.allocator = LsnAllocator(vdl)   # last_volume_lsn = last applied VDL
        self._vdl = vdl
        reader.tracker.vdl = vdl
        reader.tracker.vdl_tails = dict(pg_tails)
        self._changed = asyncio.Event()
        self._fetching: dict[int, list[bytes]] = {}
        self._read_points: dict[int, int] = {}   # in-flight storage reads: id -> read point
        self._read_seq = 0

    @property
    def vdl(self) -> int:
        return self._vdl

    def oldest_read_point(self) -> int:
        return min(self._read_points.values(), default=self._vdl)

    async def wait_room(self, n_records: int) -> None:
        raise ReadOnlyError("this instance is a read replica")

    def submit(self, records) -> None:
        raise ReadOnlyError("this instance is a read replica")

    async def wait_durable(self, lsn: int, timeout_s: float | None = None) -> None:
        async def until():
            while self._vdl < lsn:
                self._changed.clear()
                await self._changed.wait()
        try:
            await asyncio.wait_for(until(), timeout_s)
        except asyncio.TimeoutError:
            raise WriteQuorumUnavailable(f"replica VDL {self._vdl} has not reached {lsn}") from None

    async def read_page(self, page_id: int, read_point: int) -> bytes | None:
        self._read_seq += 1
        token = self._read_seq
        self._read_points[token] = read_point
        self._fetching.setdefault(page_id, [])
        try:
            image = await self.reader.read_page(page_id, read_point)
        except BaseException:
            self._fetching.pop(page_id, None)
            raise
        finally:
            del self._read_points[token]
        if image is None:
            self._fetching.pop(page_id, None)
        return image

    def catch_up_page(self, page_id: int, frame: bytearray) -> None:
        """Apply the records that became visible while ``frame`` was being read."""
        records = self._fetching.pop(page_id, None)
        if records:
            materialiser.apply(frame, page_id, b"".join(records), verify_pages=False)

    def apply_visible(self, mtrs: list[list[tuple[int, int, bytes]]], vdl: int, pool) -> int:
        """Apply whole MTRs (all CPLs <= vdl) to cached pages, then move VDL. Synchronous."""
        # BEGIN LAB 5: apply each record to its page if cached (pool.peek), buffer it if the page is being fetched (self._fetching), keep the PG tails; then move the VDL (sink, tracker, allocator) and wake waiters (invariant 11)
        applied = 0
        tails = self.reader.tracker.vdl_tails
        for mtr in mtrs:
            for page_id, lsn, record in mtr:
                assert lsn <= vdl or hooks.replica_above_vdl(), \
                    f"invariant 11: record {lsn} above VDL {vdl}"
                page = pool.peek(page_id)
                if page is not None:
                    materialiser.apply(page, page_id, record, verify_pages=False)
                    applied += 1
                elif page_id in self._fetching:
                    self._fetching[page_id].append(record)
                tails[self.layout.pg_of(page_id)] = lsn
        self._vdl = vdl
        self.reader.tracker.vdl = vdl
        self.allocator.last_volume_lsn = vdl
        self._changed.set()
        return applied
        # END LAB 5


class Replica:
    """Follows a writer's redo stream and serves reads (see module doc)."""

    def __init__(self, driver: StorageDriver, writer_address: str, instance: str,
                 buffer_pool_pages: int) -> None:
        self.driver = driver
        self.writer_address = writer_address
        self.instance = instance
        self.buffer_pool_pages = buffer_pool_pages
        self.db: Database | None = None
        self.sink: ReplicaSink | None = None
        self.writer_vdl = 0
        self.writer_name = ""
        self.lag_ms: deque[float] = deque(maxlen=LAG_SAMPLES_MAX)
        self.resyncs = 0
        self.connected = False
        self.ready = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def follow(self, writer_address: str) -> None:
        """Switch to another writer (after a failover); resubscribes."""
        self.writer_address = writer_address
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay_s = 0.1
        while not self._stopping:
            try:
                await self._follow_once()
                delay_s = 0.1
            except asyncio.CancelledError:
                raise
            except RpcError as exc:
                log.info("redo stream from %s ended: %s", self.writer_address, exc)
            except asyncio.InvalidStateError as exc:
                # The feedback write found the call already finished (the writer went
                # away between two reads): the same as the stream ending.
                log.info("redo stream from %s ended: %s", self.writer_address, exc)
            except Exception:
                log.exception("replica stream failed; resubscribing")
            self.connected = False
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)

    async def _follow_once(self) -> None:
        async with self.driver.transport.channel(self.writer_address) as channel:
            call = channel.stub(REPLICATION).Subscribe()   # feedback goes out with call.write
            try:
                await self._consume(call)
            finally:
                call.cancel()

    async def _consume(self, call) -> None:
        """Read one subscription: the snapshot, then MTRs and VDL updates."""
        snapshot = await call.read()
        if snapshot is None or not snapshot.is_snapshot:
            raise RuntimeError("redo stream did not start with a snapshot")
        sink, db = await self._open_at(snapshot)
        pending: list[list[tuple[int, int, bytes]]] = []
        current: list[tuple[int, int, bytes]] = []
        pending_records = 0
        last_feedback = 0.0
        self.connected = True
        log.info("following writer %s at %s from VDL %d (epoch %d)", snapshot.writer,
                 self.writer_address, snapshot.vdl, snapshot.volume_epoch)
        while True:
            msg = await call.read()
            if msg is None:
                return
            if msg.volume_epoch != self.driver.epoch:
                raise RuntimeError(f"writer epoch changed to {msg.volume_epoch}; resubscribing")
            if msg.records:
                for ref in materialiser.scan_batch(msg.records):
                    offset, size, lsn, flags, page_id = ref[0], ref[1], ref[2], ref[8], ref[6]
                    current.append((page_id, lsn, bytes(msg.records[offset:offset + size])))
                    pending_records += 1
                    if flags & FLAG_CPL:
                        pending.append(current)
                        current = []
                if pending_records > PENDING_RECORDS_MAX:
                    raise RuntimeError("too many records above VDL; resubscribing")
            self.writer_vdl = max(self.writer_vdl, msg.vdl)
            above_vdl = hooks.replica_above_vdl()   # PLANTED BUG when True, test only
            if msg.vdl > sink.vdl or (above_vdl and pending):
                # BEGIN LAB 5: take the whole MTRs whose last record (its CPL) is <= msg.vdl off the front of pending: batch, pending, pending_records
                visible = 0
                while visible < len(pending) and pending[visible][-1][1] <= msg.vdl:
                    visible += 1
                batch, pending = pending[:visible], pending[visible:]
                pending_records -= sum(len(m) for m in batch)
                # END LAB 5
                if above_vdl and pending:   # PLANTED BUG: the MTRs above VDL are applied too
                    pending_records -= sum(len(m) for m in pending)
                    batch, pending = batch + pending, []
                # A read that gave up on optimistic retries holds this lock for its whole
                # run; it must not see an MTR applied halfway through it.
                async with db.mtr_lock:
                    sink.apply_visible(batch, max(msg.vdl, sink.vdl), db.pool)
                if msg.vdl_time_us:
                    self.lag_ms.append(max(0.0, (time.time_ns() // 1000 - msg.vdl_time_us) / 1000.0))
            now = time.monotonic()
            if now - last_feedback >= FEEDBACK_INTERVAL_S:
                last_feedback = now
                await call.write(rpb.ReplicaFeedback(
                    instance=self.instance, applied_vdl=sink.vdl,
                    oldest_read_point=sink.oldest_read_point()))

    async def _open_at(self, snapshot: rpb.RedoStreamMessage) -> tuple[ReplicaSink, Database]:
        """A fresh sink, cache and Database at the snapshot; swapped in once open."""
        self.driver.epoch = snapshot.volume_epoch
        self.writer_name = snapshot.writer
        if snapshot.pg_count and (snapshot.pg_count, snapshot.stripe_pages) != (
                self.driver.layout.pg_count, self.driver.layout.stripe_pages):
            raise RuntimeError("the writer's volume layout differs from this replica's config")
        sink = ReplicaSink(self.driver, snapshot.vdl, {t.pg: t.lsn for t in snapshot.pg_tails})
        db = Database(sink, buffer_pool_pages=self.buffer_pool_pages, read_only=True)
        await db.open()
        if self.db is not None:
            self.resyncs += 1
        self.sink, self.db = sink, db
        self.writer_vdl = snapshot.vdl
        self.ready.set()
        return sink, db

    def status(self) -> dict:
        lags = list(self.lag_ms)
        vdl = self.sink.vdl if self.sink else 0
        return {
            "writer": self.writer_name, "writer_address": self.writer_address,
            "connected": self.connected, "vdl": vdl, "writer_vdl": self.writer_vdl,
            "lag_lsn": max(0, self.writer_vdl - vdl),
            "lag_ms_p50": round(_percentile(lags, 0.5), 3),
            "lag_ms_p99": round(_percentile(lags, 0.99), 3),
            "lag_ms_last": round(lags[-1], 3) if lags else 0.0,
            "resyncs": self.resyncs,
            "oldest_read_point": self.sink.oldest_read_point() if self.sink else 0,
        }
