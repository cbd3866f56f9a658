"""Writer side of the replication stream (proto/aurora_pb/replication.proto).

The storage driver tells the hub about every MTR it ships and every VDL advance; the hub
fans them out to subscribed replicas, and aggregates the replicas' oldest read points into
PGMRPL, the GC horizon the writer sends to storage (invariant 12)::

    StorageDriver.submit(MTR) ----> hub.on_mtr ----> per-replica bounded queue --> stream
    StorageDriver VDL advance ----> hub.on_vdl ----> (same queues)
    replica feedback (applied VDL, oldest read point) --> hub --> PGMRPL --> SetGcHorizon

A subscription starts with a snapshot taken synchronously on the event loop: the VDL, each
PG's tail at it, and every MTR already shipped above it; after that each MTR and VDL
change is queued in order, so a replica sees every record above its snapshot exactly once.
A queue that overflows (a replica too slow to keep up) ends that subscription; the replica
resubscribes from a fresh snapshot. Queues are bounded by QUEUE_MAX messages and the
messages sent are merged up to MESSAGE_BYTES_MAX.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from aurora_pb import replication_pb2 as pb
from engine.errors import RpcError

log = logging.getLogger(__name__)

QUEUE_MAX = 20_000
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
GC_HORIZON_INTERVAL_S = float(os.environ.get("AURORA_GC_HORIZON_INTERVAL_S", "1.0"))


@dataclass
class _Subscriber:
    sub_id: int
    instance: str = "?"
    queue: deque = field(default_factory=deque)   # (records bytes, vdl, vdl_time_us)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    applied_vdl: int = 0
    oldest_read_point: int = 0


class ReplicationHub:
    """Fan-out of MTRs and VDL updates to replicas; PGMRPL from their feedback."""

    def __init__(self, driver, instance: str) -> None:
        self.driver = driver
        self.instance = instance
        self._subs: dict[int, _Subscriber] = {}
        self._next_id = 1
        # MTRs shipped but not yet covered by VDL: (cpl_lsn, packed records).
        self._above_vdl: deque[tuple[int, bytes]] = deque()
        self.vdl_time_us = time.time_ns() // 1000
        self.retention_floor = None  # callable -> LSN the backtrack window still needs
        self.closed = False
        driver.listeners.append(self)

    # --- Fed by the storage driver ---------------------------------------------------------

    def on_mtr(self, records: list[tuple[int, int, bytes]]) -> None:
        data = b"".join(r[2] for r in records)
        self._above_vdl.append((records[-1][1], data))
        self._publish(data, self.driver.vdl)

    def on_vdl(self, vdl: int) -> None:
        self.vdl_time_us = time.time_ns() // 1000
        above = self._above_vdl
        while above and above[0][0] <= vdl:
            above.popleft()
        self._publish(b"", vdl)

    def _publish(self, data: bytes, vdl: int) -> None:
        for sub in self._subs.values():
            if sub.overflowed:
                continue
            if len(sub.queue) >= QUEUE_MAX:
                sub.overflowed = True
                log.warning("replica %s fell %d messages behind; ending its stream", sub.instance, QUEUE_MAX)
            else:
                sub.queue.append((data, vdl, self.vdl_time_us))
            sub.wakeup.set()

    # --- Subscriptions -------------------------------------------------------------------

    def subscribe(self) -> tuple[_Subscriber, pb.RedoStreamMessage]:
        """Register a subscriber and return its snapshot message (taken atomically)."""
        driver = self.driver
        sub = _Subscriber(self._next_id)
        self._next_id += 1
        vdl = driver.vdl
        sub.applied_vdl = sub.oldest_read_point = vdl
        snapshot = pb.RedoStreamMessage(
            volume_epoch=driver.epoch, is_snapshot=True, vdl=vdl, vdl_time_us=self.vdl_time_us,
            pg_tails=[pb.PgTail(pg=pg, lsn=lsn) for pg, lsn in sorted(driver.tracker.vdl_tails.items())],
            pg_count=driver.layout.pg_count, stripe_pages=driver.layout.stripe_pages,
            writer=self.instance)
        for _cpl, data in self._above_vdl:
            sub.queue.append((data, vdl, self.vdl_time_us))
        self._subs[sub.sub_id] = sub
        return sub, snapshot

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subs.pop(sub.sub_id, None)

    def feedback(self, sub: _Subscriber, fb: pb.ReplicaFeedback) -> None:
        sub.instance = fb.instance or sub.instance
        sub.applied_vdl = max(sub.applied_vdl, fb.applied_vdl)
        sub.oldest_read_point = fb.oldest_read_point or sub.applied_vdl

    def close(self) -> None:
        """The writer closes (steps down, backtracks): end every stream; replicas
        resubscribe and rebuild their caches from the next writer's snapshot."""
        self.closed = True
        for sub in self._subs.values():
            sub.wakeup.set()

    def gc_horizon(self) -> int:
        """The GC horizon sent to storage: PGMRPL, further held back by lagging segments.

        PGMRPL is the lowest read point the writer or any replica may still use. The
        horizon is also kept at or below the lowest SCL of every segment (as last acked;
        0 for a segment that has not acked since this writer started): a node that was
        down catches up by pulling records from its peers (gossip), so its peers must
        not collect the records it still lacks. A node that stays down therefore holds
        GC back; replacing it (membership change) is deliberately absent. PGs that no
        segment has acked since this writer started do not count.
        """
        horizon = self.driver.vdl
        if self.retention_floor is not None:  # backtrack window (engine/writer/backtrack.py)
            horizon = min(horizon, self.retention_floor())
        for sub in self._subs.values():
            horizon = min(horizon, sub.oldest_read_point)
        tracker = self.driver.tracker
        for pg in range(self.driver.layout.pg_count):
            scls = [tracker.node_scl(node, pg) for node in tracker.segments(pg)]  # invariant 15
            if any(scls):  # a PG no segment has acked since this writer started is skipped
                horizon = min(horizon, min(scls))
        return horizon

    def status(self) -> list[dict]:
        vdl = self.driver.vdl
        return [{"instance": s.instance, "applied_vdl": s.applied_vdl,
                 "lag_lsn": max(0, vdl - s.applied_vdl), "queued": len(s.queue),
                 "oldest_read_point": s.oldest_read_point} for s in self._subs.values()]

    async def run_gc_horizon(self) -> None:
        """Send PGMRPL to storage every GC_HORIZON_INTERVAL_S (when it moved)."""
        sent = -1
        while True:
            await asyncio.sleep(GC_HORIZON_INTERVAL_S)
            horizon = self.gc_horizon()
            if horizon != sent and horizon > 0:
                await self.driver.set_gc_horizon(horizon)
                sent = horizon


class ReplicationService:
    """Serves Subscribe streams from a ReplicationHub: the Replication service's handler,
    plain async code served through the transport seam (engine/transport)."""

    def __init__(self, hub: ReplicationHub) -> None:
        self.hub = hub

    async def Subscribe(self, request_iterator, ctx):
        hub = self.hub
        sub, snapshot = hub.subscribe()

        async def read_feedback():
            async for fb in request_iterator:
                hub.feedback(sub, fb)

        reader = asyncio.get_running_loop().create_task(read_feedback())
        try:
            yield snapshot
            while True:
                if not sub.queue:
                    sub.wakeup.clear()
                    await sub.wakeup.wait()
                if hub.closed:
                    raise RpcError("UNAVAILABLE",
                                   "the writer reopened its volume (backtrack); resubscribe")
                if sub.overflowed:
                    raise RpcError("RESOURCE_EXHAUSTED",
                                   "replica fell behind the redo stream; resubscribe")
                parts, vdl, vdl_time_us, size = [], 0, 0, 0
                while sub.queue and size < MESSAGE_BYTES_MAX:
                    data, v, t = sub.queue.popleft()
                    if data:
                        parts.append(data)
                        size += len(data)
                    vdl, vdl_time_us = max(vdl, v), max(vdl_time_us, t)
                yield pb.RedoStreamMessage(volume_epoch=hub.driver.epoch, vdl=vdl,
                                           vdl_time_us=vdl_time_us, records=b"".join(parts))
        finally:
            hub.unsubscribe(sub)
            reader.cancel()
