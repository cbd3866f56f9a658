"""The storage driver: ships redo to each PG's six storage nodes and turns their acks into VDL.

This is the real ``RedoSink`` (engine/db/sink.py). It is the only part of the writer that
talks to storage, and it never sends a page (invariant 1).

Write path::

    engine MTR --submit(records)--> open batch (per PG) --seal--> one AppendRequest,
                                                                   serialised ONCE
          --> the same bytes to all six nodes, each on its own long-lived AppendStream
          <-- replies tagged with the batch's seq: per PG SCL
          --> QuorumTracker: PGCL -> VCL -> VDL
          --> CommitQueue releases every commit whose LSN <= VDL (invariant 2)

Boxcars follow placement (docs/fleet.md, invariant 15): each PG lives on six nodes of the
fleet (``memberships``; without it every PG is on the six ``nodes``). A sealed batch is
serialised once per PG; a node is sent one Append holding exactly the PG batches it hosts
(the request header plus those PGs' serialised parts, concatenated: protobuf merges
repeated fields), so different PGs' batches travel to different node sets, and a node
hosting none of a batch's PGs is not sent it. A batch has reached write quorum when each
of its PGs has Vw acks from that PG's members.

Growth (docs/fleet.md): with a growing layout a PG's segments are created when its first
record is submitted: the driver asks the PG's six members to CreateVolume with just that
PG (and sends them this epoch's truncation set), and holds the open batch until Vw of
them have it (one round trip, once per PG; nothing else stops). ``created_pgs`` is what
recovery found plus what this driver created. A node that missed the creation answers
UNKNOWN_SEGMENT and is asked again.

Batching without a timer: a sealed batch is "in flight" until Vw = 4 nodes acked it.
While fewer than ``max_inflight_batches`` (1) are in flight the open batch is sealed and
sent at once (a lone commit goes out immediately); otherwise records pile up in the open
batch and leave together when the in-flight batch reaches quorum. So the batch size
follows the load: one record at one client, hundreds at 64. One batch in flight rather
than two: on the 2-core machine every batch costs six stream messages and six synced
LMDB transactions, so fuller boxcars beat the shorter wait (measured side by side: about
1.4x the transactions per batch at 8 clients, 1.6-2x at 64, with more tx/s, less CPU
per transaction and no worse commit p99).

One stream per node (``_node_loop``): a sender writes the node's outbox in seq order,
a reader matches each reply to its batch by ``seq``. A stream that breaks (node down,
partition) or whose oldest unanswered batch is older than ``rpc_timeout_s`` (node paused)
is cancelled and reopened with backoff, and every batch written to it and not answered is
written again, unless its records are durable by then (VCL passed them): a node that
missed records fills its gap from its peers by gossip; a retransmit is idempotent on the
node. Slow nodes never hold a commit back as long as four others ack (outlier tolerance).
Membership epochs (docs/membership.md, invariants 16 and 17): every request for a PG carries
the PG's membership epoch from the quorum core's view of it (``tracker.pg_view``); the
control plane moves it (``set_membership``, InstanceAdmin.SetMembership). A batch refused
with STALE_MEMBERSHIP (the node knows a newer epoch than this writer) makes the driver
ask that node's SegmentState for its epochs, adopt the higher ones for the same members
(the fleet of six keeps its names), stamp the batch again and resend it: no commit fails.
Refusals come per batch: STALE_EPOCH means a newer writer has taken over: the driver
becomes fenced and every waiting commit fails with FencedError (invariant 9); EPOCH_AHEAD
means the node missed a Truncate: it is sent this epoch's truncation set, then the batch
again; any other refusal is retried with backoff like a failed send.

Reads (invariant 8): no quorum. One segment whose SCL covers the read is asked, the one
with the lowest measured latency first; if it does not answer within ``hedge_after_s`` a
second one is asked too, and the first good answer wins.

Every call goes through the transport seam (engine/transport): the driver holds one channel
per node and never sees a grpc object. The transport adds the simulated AZ latency of each
link (docs/decisions.md D5, engine/transport/latency.py) and injected faults; ``status()``
shows per node the one-way delay now (``link_delay_ms``), the measured round trip
(``latency_ms``, delays included: reads prefer the nearest segment, invariant 8) and the
round trip of its Append acks (``ack_ms``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from aurora_pb import storage_pb2 as pb
from engine import hooks
from engine.errors import (
    METADATA_CURRENT_EPOCH,
    METADATA_CURRENT_MEMBERSHIP,
    ErrorCode,
    FencedError,
    RpcError,
    UnavailableError,
    WriteQuorumUnavailable,
)
from engine.format.cluster_config import NodeInfo  # noqa: F401  (re-exported)
from engine.format.placement import PgMembership
from engine.writer.quorum import CommitQueue, QuorumTracker
from engine.format.redo import FLAG_CPL
from engine.db.sink import LsnAllocator
from engine.transport import Channel, Transport, service_of
from engine.format.volume import VW, VolumeLayout

log = logging.getLogger(__name__)

BATCH_BYTES_MAX = 4 * 1024 * 1024        # an open batch is sealed at this size regardless
STORAGE = service_of(pb, "Storage")


def truncate_request(volume: str, pg: int, epoch: int, truncs, time_us: int,
                     prev_vdl: int, set_writer_vdl: int = 0) -> pb.TruncateRequest:
    """A Truncate that makes ``truncs`` the segment's whole truncation set (and records
    the timeline it starts: from time_us, after a timeline that ended at prev_vdl)."""
    return pb.TruncateRequest(
        volume=volume, pg=pg, volume_epoch=epoch, replace=True,
        set=[pb.TruncationRange(start_lsn=s, end_lsn=e, epoch=ep) for s, e, ep in truncs],
        time_us=time_us, prev_vdl=prev_vdl, set_writer_vdl=set_writer_vdl)


@dataclass
class _Node:
    info: NodeInfo
    channel: Channel
    stub: Any                   # the Storage service's stub on ``channel``
    latency_ewma_s: float = 0.002
    ack_ewma_s: float = 0.0     # Append round trip incl. simulated delay (status only)
    up: bool = True
    rpcs: int = 0
    bytes_sent: int = 0
    failures: int = 0
    # The AppendStream (see _node_loop): batches to write, as (batch, may_skip) in seq
    # order (may_skip: a resend, dropped if durable by the time it is written); batches
    # written and not answered (seq -> (batch, written at), in seq order); batches refused
    # with EPOCH_AHEAD, written again after the truncation set.
    outbox: collections.deque = field(default_factory=collections.deque)
    unacked: dict = field(default_factory=dict)
    refused: list = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stream_error: RpcError | None = None     # why the current stream must be reopened
    stream: Any = None                       # the open stream, if any
    send_truncations: bool = False
    backoff_s: float = 0.05
    streams_opened: int = 0


@dataclass
class _Batch:
    seq: int
    request_bytes: bytes          # the whole request: every PG batch (what a node hosting all gets)
    pgs: tuple[int, ...]
    max_lsn: int
    records: int
    header: bytes = b""           # the request without its PG batches
    parts: dict = field(default_factory=dict)     # pg -> that PG batch, serialised once
    acked: dict = field(default_factory=dict)     # pg -> members that acked it
    quorum_reached: bool = False

    def bytes_for(self, pgs: tuple[int, ...]) -> bytes:
        """The Append for a node hosting ``pgs`` of this batch (protobuf concatenation
        merges repeated fields, so header + parts is one request)."""
        if pgs == self.pgs:
            return self.request_bytes
        return self.header + b"".join(self.parts[pg] for pg in pgs)


class StorageDriver:
    """RedoSink over six real storage nodes (see module doc)."""

    def __init__(self, volume: str, nodes: list[NodeInfo], layout: VolumeLayout, *,
                 epoch: int, lal: int, start_lsn: int = 0, next_lsn: int | None = None,
                 pg_tails: dict[int, int] | None = None, instance: str = "writer",
                 max_inflight_batches: int = 1, rpc_timeout_s: float = 5.0,
                 hedge_after_s: float = 0.05, transport: Transport,
                 memberships: Mapping[int, PgMembership] | None = None) -> None:
        assert lal > 0
        names = [n.name for n in nodes]
        # Which six nodes hold each PG (invariant 15); None: every PG on the six ``nodes``.
        self.memberships: dict[int, PgMembership] = dict(memberships or {})
        if not self.memberships:
            assert len(nodes) == 6, "without a placement a volume is stored on six nodes"
        for pg, m in self.memberships.items():
            unknown = set(m.members) - set(names)
            assert not unknown, f"PG {pg} is placed on nodes this driver was not given: {unknown}"
        self.volume = volume
        self.layout = layout
        self.epoch = epoch
        self.lal = lal
        self.instance = instance
        self.max_inflight_batches = max_inflight_batches
        self.rpc_timeout_s = rpc_timeout_s
        self.hedge_after_s = hedge_after_s
        self.transport = transport
        self.node_infos = list(nodes)
        self.tracker = QuorumTracker(names, start_lsn, pg_tails, self._pg_members())
        # PGs whose segments exist; a growing volume starts with none (recovery fills it in).
        self.created_pgs: set[int] = set() if layout.grows else set(range(layout.pg_count))
        self._creating: dict[int, None] = {}   # PGs being created (their records wait)
        self.allocator = LsnAllocator(start_lsn, pg_tails, next_lsn)
        self.commits = CommitQueue()
        self.truncations: list[tuple[int, int, int]] = []  # this epoch's truncation set
        self.truncation_history: tuple[int, int] = (0, 0)  # (time_us, prev_vdl) of that set
        self.epoch_floor_lsn = start_lsn  # end of this epoch's truncation range
        self.fenced: FencedError | None = None
        # Observers of shipped MTRs and VDL advances (the replication hub): objects with
        # on_mtr(records) and on_vdl(vdl). Called synchronously; they must not block.
        self.listeners: list = []
        self._nodes: dict[str, _Node] = {}
        self._open: dict[int, list[bytes]] = {}
        self._open_bytes = 0
        self._open_max_lsn = 0
        self._open_records = 0
        self._inflight: list[_Batch] = []  # sealed, not yet acked by VW nodes nor durable
        self._batch_seq = 0
        self._vdl_changed = asyncio.Event()
        # Insertion-ordered (a dict, not a set): closing cancels them in a fixed order, so
        # a seed of the simulator replays the same events (engine/sim).
        self._tasks: dict[asyncio.Task, None] = {}
        self._closed = False
        # Counters for status and the write-amplification benchmark.
        self.stats = {"batches": 0, "records": 0, "record_bytes": 0, "append_rpcs": 0,
                      "append_bytes": 0, "read_rpcs": 0, "hedged_reads": 0, "retries": 0,
                      "lal_stalls": 0}

    # --- Lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        hooks.warn_if_planted(f"instance {self.instance}")   # test-only switches
        for info in self.node_infos:
            # The transport adds simulated latency and injected faults (engine/transport).
            channel = self.transport.channel(info.address, timeout_s=self.rpc_timeout_s)
            self._nodes[info.name] = _Node(info, channel, channel.stub(STORAGE))
        for node in self._nodes.values():
            self._spawn(self._node_loop(node))
        self._spawn(self._watchdog())

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for fut in self.commits.drain():
            if not fut.done():
                fut.set_exception(UnavailableError("writer is shutting down"))
        self._vdl_changed.set()   # an MTR stalled in wait_room learns it at once
        for node in self._nodes.values():
            await node.channel.close()

    def reset_for_epoch(self, start_lsn: int, next_lsn: int, pg_tails: dict[int, int]) -> None:
        """Start a new epoch's bookkeeping after recovery (nothing may be in flight)."""
        assert not self._inflight and not self._open and not len(self.commits)
        for node in self._nodes.values():   # resends of the old epoch: durable or annulled
            node.outbox.clear()
            node.refused.clear()
        views = self.tracker.membership
        self.tracker = QuorumTracker(self.node_names, start_lsn, pg_tails, self._pg_members())
        self.tracker.membership = dict(views)   # a new volume epoch keeps the PGs' members
        self.allocator = LsnAllocator(start_lsn, pg_tails, next_lsn)
        self.epoch_floor_lsn = next_lsn - 1
        self.fenced = None

    def stub(self, name: str):
        """The Storage stub of node ``name`` (engine/transport)."""
        return self._nodes[name].stub

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.node_infos]

    def members(self, pg: int) -> tuple[str, ...]:
        """The nodes that hold ``pg`` (invariant 15): its six, or during a membership
        change the old six and the new members (they get every batch too, invariant 17)."""
        view = self.tracker.membership.get(pg)
        if view is not None:
            extra = tuple(n for n in (view.new_members or ()) if n not in view.members)
            return tuple(view.members) + extra
        m = self.memberships.get(pg)
        return m.members if m is not None else tuple(self.node_names)

    def membership_epoch(self, pg: int) -> int:
        """``pg``'s membership epoch, stamped on every request for it (invariant 16,
        docs/membership.md: the control plane's view once it told one; else the placement's;
        0 without a placement, as before the fleet)."""
        view = self.tracker.membership.get(pg)
        m = self.memberships.get(pg)
        return max(view.epoch if view is not None else 0, m.epoch if m is not None else 0)

    def pgs_on(self, name: str) -> list[int]:
        """The created PGs of this volume with a segment on node ``name``."""
        return [pg for pg in sorted(self.created_pgs) if name in self.members(pg)]

    def _pg_members(self) -> dict[int, tuple[str, ...]]:
        return {pg: m.members for pg, m in self.memberships.items()}

    # --- RedoSink ----------------------------------------------------------------------

    @property
    def vdl(self) -> int:
        return self.tracker.vdl

    async def wait_room(self, n_records: int) -> None:
        """Invariant 6: wait until n_records more LSNs stay within VDL + LAL."""
        if n_records > self.lal:
            raise ValueError(f"an MTR of {n_records} records can never fit under LAL {self.lal}")
        self._check_fenced()
        if self.allocator.next_lsn + n_records - 1 > self.allocation_limit():
            self.stats["lal_stalls"] += 1
        while self.allocator.next_lsn + n_records - 1 > self.allocation_limit():
            self._check_fenced()
            self._vdl_changed.clear()
            await self._vdl_changed.wait()
        self.allocator.limit_lsn = self.allocation_limit()

    def allocation_limit(self) -> int:
        """Highest LSN that may be allocated now (invariant 6).

        LSNs of a new epoch start above the truncation range (VDL, end], and everything at
        or below ``end`` is either durable or annulled, so the limit counts LAL from
        max(VDL, end). Recovery truncates up to end + LAL of the previous epoch, which
        covers every LSN the previous writer could have allocated.
        """
        return max(self.tracker.vdl, self.epoch_floor_lsn) + self.lal

    def submit(self, records: list[tuple[int, int, bytes]]) -> None:
        self._check_fenced()
        for pg, lsn, record in records:
            if pg not in self.created_pgs and pg not in self._creating:
                self._creating[pg] = None
                self._spawn(self._create_pg(pg))
            self.tracker.record_sent(lsn, pg, bool(record[37] & FLAG_CPL))
            self._open.setdefault(pg, []).append(record)
            self._open_bytes += len(record)
            self._open_records += 1
            self._open_max_lsn = lsn
        for listener in self.listeners:
            listener.on_mtr(records)
        self._maybe_seal()

    async def wait_durable(self, lsn: int, timeout_s: float | None = None) -> None:
        self._check_fenced()
        if self.tracker.vdl >= lsn:
            return
        fut = asyncio.get_running_loop().create_future()
        self.commits.put(lsn, fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise WriteQuorumUnavailable(
                f"write quorum unavailable: commit LSN {lsn} is not durable after {timeout_s:.1f}s "
                f"(VDL {self.tracker.vdl}; nodes up: {self.nodes_up()}); the commit may still "
                f"complete when a node returns") from None

    async def wait_vdl_change(self, timeout_s: float) -> None:
        self._vdl_changed.clear()
        try:
            await asyncio.wait_for(self._vdl_changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def nodes_up(self) -> list[str]:
        return [n.info.name for n in self._nodes.values() if n.up]

    # --- Sending -----------------------------------------------------------------------

    async def _create_pg(self, pg: int) -> None:
        """Create ``pg``'s segments on its members (growth); retried until Vw have it."""
        backoff_s = 0.05
        while not self._closed and self.fenced is None:
            ok = await self._create_segments(self.members(pg), [pg])
            if len(ok) >= VW:
                log.info("PG %d of %s created on %s", pg, self.volume, ", ".join(ok))
                self.created_pgs.add(pg)
                self._creating.pop(pg, None)
                self._maybe_seal()
                return
            log.warning("PG %d of %s: segments created on only %d of %d nodes; retrying",
                        pg, self.volume, len(ok), VW)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)

    async def _create_segments(self, names, pgs: list[int]) -> list[str]:
        """CreateVolume of ``pgs`` (plus this epoch's truncation set) on ``names``; the
        nodes that have them now."""
        layout = self.layout
        time_us, prev_vdl = self.truncation_history

        async def one(name: str) -> str | None:
            stub = self._nodes[name].stub
            try:
                await stub.CreateVolume(pb.CreateVolumeRequest(
                    volume=self.volume, pg_count=layout.pg_count, stripe_pages=layout.stripe_pages,
                    pg_pages=layout.pg_pages, stripe_width=layout.stripe_width,
                    volume_epoch=max(self.epoch, 1), pgs=pgs))
                for pg in pgs if self.truncations else ():
                    await stub.Truncate(truncate_request(self.volume, pg, self.epoch,
                                                         self.truncations, time_us, prev_vdl))
                return name
            except RpcError as exc:
                if exc.code == ErrorCode.STALE_EPOCH:
                    self._fence(self._nodes[name], exc)
                log.debug("creating PGs %s on %s failed: %s", pgs, name, exc)
                return None

        return [n for n in await asyncio.gather(*(one(n) for n in names)) if n]

    def _maybe_seal(self) -> None:
        if self._creating and any(pg in self._creating for pg in self._open):
            return   # a new PG's segments are being created: one round trip (growth)
        while self._open and (len(self._inflight) < self.max_inflight_batches
                              or self._open_bytes >= BATCH_BYTES_MAX):
            self._seal_and_send()

    def _seal_and_send(self) -> None:
        self._batch_seq += 1
        pgs = tuple(sorted(self._open))
        header = pb.AppendRequest(
            volume=self.volume, volume_epoch=self.epoch, writer_vdl=self.tracker.vdl,
            sender=self.instance, seq=self._batch_seq).SerializeToString()
        # Each PG batch serialised once, for its six segments (see the module doc).
        parts = {pg: pb.AppendRequest(batches=[pb.PgBatch(
            pg=pg, membership_epoch=self.membership_epoch(pg),
            records=b"".join(self._open[pg]))]).SerializeToString() for pg in pgs}
        data = header + b"".join(parts[pg] for pg in pgs)
        batch = _Batch(self._batch_seq, data, pgs, self._open_max_lsn, self._open_records,
                       header, parts, {pg: set() for pg in pgs})
        self.stats["batches"] += 1
        self.stats["records"] += self._open_records
        self.stats["record_bytes"] += self._open_bytes
        self._open = {}
        self._open_bytes = 0
        self._open_records = 0
        self._inflight.append(batch)
        for node in self._nodes.values():
            if not self._hosted(node, batch):
                continue   # this node holds none of the batch's PGs
            node.outbox.append((batch, False))
            if node.stream is None and len(node.outbox) > 64:
                self._prune(node)   # a node that is down must not hoard durable batches
            node.wake.set()

    def _hosted(self, node: _Node, batch: _Batch) -> tuple[int, ...]:
        """The PGs of ``batch`` that ``node`` holds."""
        if not self.memberships:
            return batch.pgs
        name = node.info.name
        return tuple(pg for pg in batch.pgs if name in self.members(pg))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[task] = None
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    def _delay_ms(self, node: _Node) -> float:
        """One-way simulated delay to ``node`` now (the transport applies it)."""
        return self.transport.one_way_ms(node.info.address)

    def _durable(self, batch: _Batch) -> bool:
        return self.tracker.vcl >= batch.max_lsn

    def _prune(self, node: _Node) -> None:
        """Drop batches that no longer need this node from its outbox (VCL passed them)."""
        node.outbox = collections.deque(e for e in node.outbox if not self._durable(e[0]))

    def _open_stream(self, node: _Node):
        """A new AppendStream to ``node`` (a transport Stream)."""
        return node.stub.AppendStream()

    async def _write_append(self, node: _Node, stream, batch: _Batch) -> None:
        """Write one batch to ``node``'s stream: its PGs' parts, serialised once for all six."""
        await stream.write(batch.bytes_for(self._hosted(node, batch)))

    async def _node_loop(self, node: _Node) -> None:
        """The life of ``node``'s AppendStream: open, write the outbox, reopen on a break
        (see the module doc). Replies are handled by ``_read_replies``."""
        while not self._closed and self.fenced is None:
            stream = reader = None
            try:
                if node.send_truncations:
                    await self._send_truncations(node)
                    self._requeue_refused(node)
                node.stream_error = None
                stream = node.stream = self._open_stream(node)
                node.streams_opened += 1
                reader = asyncio.ensure_future(self._read_replies(node, stream))
                self._prune(node)   # what became durable while no stream was open
                while node.stream_error is None and not self._closed and self.fenced is None:
                    if node.send_truncations:
                        await self._send_truncations(node)
                        self._requeue_refused(node)
                        continue
                    if node.outbox:
                        batch, may_skip = node.outbox.popleft()
                        if may_skip and self._durable(batch):
                            continue
                        node.unacked[batch.seq] = (batch, time.monotonic())
                        await self._write_append(node, stream, batch)
                        continue
                    node.wake.clear()
                    await node.wake.wait()
                if node.stream_error is not None:
                    raise node.stream_error
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling() or node.stream_error is None:
                    raise   # the driver is closing
                self._stream_broke(node, node.stream_error)   # a write the watchdog cut
            except RpcError as exc:
                if exc.code == ErrorCode.STALE_EPOCH:   # from a Truncate
                    self._fence(node, exc)
                    return
                self._stream_broke(node, exc)
            finally:
                node.stream = None
                if stream is not None:
                    stream.cancel()
                if reader is not None:
                    reader.cancel()
                # Written and not answered: written again first, in seq order, if still
                # needed (a retransmit is idempotent on the node).
                again = [(b, True) for b, _t in node.unacked.values()]
                node.unacked.clear()
                node.outbox.extendleft(reversed(again))
            if self._closed or self.fenced is not None:
                return
            self.stats["retries"] += 1
            await asyncio.sleep(node.backoff_s)
            node.backoff_s = min(node.backoff_s * 2, 1.0)

    def _stream_broke(self, node: _Node, exc: RpcError) -> None:
        node.failures += 1
        if node.up:
            log.warning("append stream to %s broke: %s", node.info.name, exc)
        node.up = False

    async def _read_replies(self, node: _Node, stream) -> None:
        """Match each reply of ``node``'s stream to its batch (by seq) and act on it."""
        try:
            while True:
                reply = await stream.read()
                if reply is None:
                    raise RpcError("UNAVAILABLE", f"{node.info.name} ended the append stream")
                entry = node.unacked.pop(reply.seq, None)
                if entry is None:
                    continue   # a batch of a stream already given up
                batch, written = entry
                if reply.error_status:
                    self._on_refusal(node, batch, RpcError(
                        reply.error_status, reply.error_detail, reply.error_code,
                        dict(reply.error_metadata)))
                    continue
                ack_s = time.monotonic() - written
                self._observe_latency(node, ack_s)
                node.ack_ewma_s = ack_s if not node.ack_ewma_s else 0.8 * node.ack_ewma_s + 0.2 * ack_s
                sent_bytes = len(batch.bytes_for(self._hosted(node, batch)))
                node.rpcs += 1
                node.bytes_sent += sent_bytes
                node.backoff_s = 0.05
                self.stats["append_rpcs"] += 1
                self.stats["append_bytes"] += sent_bytes
                if not node.up:
                    log.info("storage node %s is answering again", node.info.name)
                node.up = True
                self._on_acks(node, reply, batch)
        except RpcError as exc:
            if node.stream_error is None:
                node.stream_error = exc
            node.wake.set()

    def _on_refusal(self, node: _Node, batch: _Batch, exc: RpcError) -> None:
        """One batch refused by ``node`` (nothing of it stored)."""
        if exc.code == ErrorCode.STALE_MEMBERSHIP:
            log.info("append to %s refused: %s", node.info.name, exc.detail)
            self._spawn(self._refresh_membership(node, batch, exc))
            return
        if exc.code == ErrorCode.STALE_EPOCH:
            self._fence(node, exc)
            for other in self._nodes.values():
                other.wake.set()
            return
        if exc.code == ErrorCode.EPOCH_AHEAD:
            node.refused.append(batch)
            node.send_truncations = True
            node.wake.set()
            return
        if exc.code == ErrorCode.UNKNOWN_SEGMENT:   # it missed a PG's creation: again
            self._spawn(self._create_segments(
                [node.info.name], [pg for pg in self._hosted(node, batch) if pg in self.created_pgs]))
        node.failures += 1
        if node.up:
            log.warning("append to %s refused: %s", node.info.name, exc)
        node.up = False
        self.stats["retries"] += 1

        def again() -> None:
            if not self._durable(batch):
                node.outbox.append((batch, True))
                node.wake.set()
        asyncio.get_running_loop().call_later(node.backoff_s, again)
        node.backoff_s = min(node.backoff_s * 2, 1.0)

    # --- Membership (docs/membership.md) -----------------------------------------------

    def set_membership(self, pg: int, epoch: int, members, new_members=None, forget=()) -> int:
        """Move ``pg`` to membership ``epoch`` (InstanceAdmin.SetMembership): the quorum core
        counts acks by the new sets from now on (invariant 17), and during a transition the
        PG's batches go to the members of both sets (``members``). Members must be storage
        nodes this driver knows. Returns the PG's epoch after the call."""
        if not 0 <= pg < self.layout.pg_count:
            raise ValueError(f"volume {self.volume!r} has no PG {pg}")
        unknown = sorted((set(members) | set(new_members or ())) - set(self._nodes))
        if unknown and self._nodes:
            raise ValueError(f"PG {pg}: members {unknown} are not storage nodes of this writer")
        before = self.tracker.pg_view(pg)
        self.tracker.set_membership(pg, epoch, members, new_members, forget)
        after = self.tracker.pg_view(pg)
        if after.epoch != before.epoch and new_members is None and self.memberships:
            # A change completed: the placement follows (routing, recovery, GC).
            self.memberships[pg] = PgMembership(pg, epoch, tuple(members))
            self.tracker.pg_members[pg] = tuple(members)
        if after.epoch != before.epoch:
            log.info("PG %d: membership epoch %d -> %d (%r%s)", pg, before.epoch, after.epoch,
                     after, f"; forgetting {', '.join(forget)}" if forget else "")
            # The PGCL may rise under the new sets only with new acks; nothing moves back
            # (invariant 5). Commits waiting on acks already counted are released as usual.
        return after.epoch

    def adopt_membership_epochs(self, epochs: dict[int, int]) -> None:
        """Adopt higher membership epochs learned from storage (recovery's SegmentState,
        a STALE_MEMBERSHIP refusal) for the PG's current members."""
        for pg, epoch in epochs.items():
            view = self.tracker.pg_view(pg)
            if len(view.members) != len(set(view.members)) or len(view.members) != 6:
                continue   # a PG not placed yet (a growing volume): nothing to stamp
            if epoch > self.membership_epoch(pg):
                members = view.new_members or view.members
                self.tracker.set_membership(pg, epoch, members)
                log.info("PG %d: adopted membership epoch %d from storage", pg, epoch)

    async def _refresh_membership(self, node: _Node, batch: _Batch, exc: RpcError) -> None:
        """A batch was refused with STALE_MEMBERSHIP: learn the node's epochs for the
        batch's PGs, adopt the higher ones, stamp the batch again and resend it."""
        epochs = {}
        for pg in batch.pgs:
            try:
                state = await node.stub.SegmentState(pb.SegmentStateRequest(
                    volume=self.volume, pg=pg))
                epochs[pg] = state.membership_epoch
            except RpcError as err:
                log.info("membership refresh from %s failed: %s", node.info.name, err)
        if not epochs:
            current = int(exc.metadata.get(METADATA_CURRENT_MEMBERSHIP, 0) or 0)
            epochs = {pg: current for pg in batch.pgs}
        self.adopt_membership_epochs(epochs)
        self._restamp(batch)
        await asyncio.sleep(node.backoff_s)
        node.backoff_s = min(node.backoff_s * 2, 1.0)
        if not self._durable(batch):
            node.outbox.append((batch, True))
            node.wake.set()

    def _restamp(self, batch: _Batch) -> None:
        """Serialise the batch's PG parts again with the PGs' current membership epochs
        (the same records; every node gets these bytes from now on)."""
        for pg in batch.pgs:
            part = pb.AppendRequest.FromString(batch.parts[pg])
            for b in part.batches:
                b.membership_epoch = self.membership_epoch(b.pg)
            batch.parts[pg] = part.SerializeToString()
        batch.request_bytes = batch.header + b"".join(batch.parts[pg] for pg in batch.pgs)

    def _requeue_refused(self, node: _Node) -> None:
        node.send_truncations = False
        refused = sorted(node.refused, key=lambda b: b.seq)
        node.refused.clear()
        node.outbox.extendleft(reversed([(b, True) for b in refused]))

    async def _watchdog(self) -> None:
        """Break a stream whose oldest unanswered batch waited over ``rpc_timeout_s`` (a
        paused or wedged node): its batches are then resent or dropped like any other's."""
        period_s = max(0.05, min(1.0, self.rpc_timeout_s / 4))
        while not self._closed:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for node in self._nodes.values():
                if node.unacked and node.stream_error is None:
                    _batch, written = next(iter(node.unacked.values()))
                    if now - written > self.rpc_timeout_s:
                        node.stream_error = RpcError(
                            "DEADLINE_EXCEEDED", f"no append reply from {node.info.name} "
                                                 f"for {now - written:.1f} s")
                        node.wake.set()
                        if node.stream is not None:
                            node.stream.cancel()   # also ends a write stuck in flow control

    def _on_acks(self, node: _Node, reply: pb.AppendReply, batch: _Batch) -> None:
        moved = False
        for ack in reply.acks:
            moved |= self.tracker.ack(node.info.name, ack.pg, ack.scl)
        for pg in self._hosted(node, batch):
            batch.acked[pg].add(node.info.name)
        if all(len(acked) >= VW for acked in batch.acked.values()):
            batch.quorum_reached = True   # every PG of the batch at Vw of its own members
        # A batch stops counting as in flight once VW nodes acked it, or once VCL passed
        # its records (a later batch's acks can cover it).
        vcl = self.tracker.vcl
        self._inflight = [b for b in self._inflight
                          if not (b.quorum_reached or b.max_lsn <= vcl)]
        if moved:
            self._release_commits()
        self._maybe_seal()

    def _release_commits(self) -> None:
        for fut in self.commits.release(self.tracker.vdl):
            if not fut.done():
                fut.set_result(None)
        for listener in self.listeners:
            listener.on_vdl(self.tracker.vdl)
        self._vdl_changed.set()

    def _fence(self, node: _Node, exc: RpcError) -> None:
        if self.fenced is not None:
            return
        current = int(exc.metadata.get(METADATA_CURRENT_EPOCH, 0) or 0)
        self.fenced = FencedError(
            f"this writer is fenced: storage node {node.info.name} is at volume epoch "
            f"{current}, this writer has epoch {self.epoch}; a newer writer took over")
        log.warning("%s", self.fenced)  # expected after a failover: not an ERROR
        for fut in self.commits.drain():
            if not fut.done():
                fut.set_exception(self.fenced)
        self._vdl_changed.set()

    def _check_fenced(self) -> None:
        """Refuse work this driver can never make durable: fenced by a newer epoch, or
        closed (the writer stepped down or is stopping: nothing ships any more). Without
        the second check an MTR emitted on a closed driver (a session that began its
        transaction before its instance stepped down) waited the whole durable timeout and
        was reported as "write quorum unavailable" with every node up."""
        if self.fenced is not None:
            raise self.fenced
        if self._closed:
            raise UnavailableError(
                f"writer {self.instance} stepped down or is stopping (epoch {self.epoch}): its "
                f"storage driver is closed and ships nothing more; reconnect to the cluster "
                f"endpoint (the writer now)")

    async def _send_truncations(self, node: _Node) -> None:
        """A node missed one or more Truncates: send it this epoch's whole truncation set
        (it replaces the node's older set; engine/writer/recovery.py truncate_request)."""
        log.info("node %s is behind epoch %d; sending it the truncation set", node.info.name, self.epoch)
        time_us, prev_vdl = self.truncation_history
        for pg in self.pgs_on(node.info.name):
            try:
                request = truncate_request(self.volume, pg, self.epoch, self.truncations,
                                           time_us, prev_vdl)
                request.membership_epoch = self.membership_epoch(pg)
                await node.stub.Truncate(request)
            except RpcError as exc:
                if exc.code != ErrorCode.STALE_EPOCH:
                    raise

    def _observe_latency(self, node: _Node, seconds: float) -> None:
        node.latency_ewma_s = 0.8 * node.latency_ewma_s + 0.2 * seconds

    # --- Reads -------------------------------------------------------------------------

    async def read_page(self, page_id: int, read_point: int, min_scl: int | None = None) -> bytes | None:
        """The page as of read_point from one segment, hedged (invariant 8). A read refused
        for a stale membership epoch (invariant 16) is asked again once, with the epoch the
        refusal told (``_read_one`` adopts it): a replica learns the PG's epoch this way."""
        epoch_before = self.membership_epoch(self.layout.pg_of(page_id))
        try:
            return await self._read_page(page_id, read_point, min_scl)
        except UnavailableError:
            if self.membership_epoch(self.layout.pg_of(page_id)) == epoch_before:
                raise
            return await self._read_page(page_id, read_point, min_scl)

    async def _read_page(self, page_id: int, read_point: int, min_scl: int | None) -> bytes | None:
        pg = self.layout.pg_of(page_id)
        if min_scl is None:
            # Each PG's tail at the current VDL is >= its tail at any older read point, so a
            # segment complete to it holds every record of the PG at or below read_point.
            min_scl = self.tracker.min_scl_for_read(pg) if read_point <= self.tracker.vdl else read_point
        request = pb.ReadPageRequest(volume=self.volume, pg=pg, page_id=page_id,
                                     read_point=read_point, volume_epoch=self.epoch,
                                     min_scl=min_scl, membership_epoch=self.membership_epoch(pg))
        candidates = sorted(
            (self._nodes[name] for name in self.members(pg)),
            key=lambda n: (not n.up, self.tracker.node_scl(n.info.name, pg) < min_scl,
                           n.latency_ewma_s))
        errors: list[str] = []
        pending: set[asyncio.Task] = set()
        started: dict[asyncio.Task, int] = {}   # hedge order: ties go to the first started
        index = 0
        try:
            while index < len(candidates) or pending:
                if index < len(candidates) and len(pending) < 2:
                    node = candidates[index]
                    index += 1
                    task = asyncio.ensure_future(self._read_one(node, request))
                    started[task] = index
                    pending.add(task)
                    if len(pending) == 2:
                        self.stats["hedged_reads"] += 1
                wait_s = self.hedge_after_s if index < len(candidates) and len(pending) < 2 else None
                done, pending = await asyncio.wait(pending, timeout=wait_s,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=started.__getitem__):
                    outcome = task.result()
                    if outcome[0] == "ok":
                        return outcome[1]
                    if outcome[0] == "absent":
                        return None
                    errors.append(outcome[1])
        finally:
            for task in sorted(pending, key=started.__getitem__):
                task.cancel()
        raise UnavailableError(
            f"no segment of PG {pg} could serve page {page_id} at read point {read_point}: "
            + "; ".join(errors))

    async def _read_one(self, node: _Node, request: pb.ReadPageRequest):
        try:
            started = time.monotonic()
            reply = await node.stub.ReadPage(request)
            self._observe_latency(node, time.monotonic() - started)
            self.stats["read_rpcs"] += 1
            node.up = True
            return ("ok", reply.page)
        except asyncio.CancelledError:
            raise
        except RpcError as exc:
            if exc.code == ErrorCode.PAGE_NOT_FOUND:
                return ("absent", None)
            if exc.code == ErrorCode.STALE_EPOCH:
                self._fence(node, exc)
            if exc.code == ErrorCode.STALE_MEMBERSHIP:
                current = int(exc.metadata.get(METADATA_CURRENT_MEMBERSHIP, 0) or 0)
                self.adopt_membership_epochs({request.pg: current})
            if exc.unreachable:
                node.up = False
            return ("error", f"{node.info.name}: {exc}")

    # --- Control -----------------------------------------------------------------------

    async def set_gc_horizon(self, horizon_lsn: int) -> None:
        """Send PGMRPL to every node (best effort; GC is only an optimisation)."""
        request = pb.SetGcHorizonRequest(volume=self.volume, horizon_lsn=horizon_lsn,
                                         volume_epoch=self.epoch)

        async def one(node: _Node) -> None:
            try:
                await node.stub.SetGcHorizon(request)
            except RpcError as exc:
                log.debug("SetGcHorizon to %s failed: %s", node.info.name, exc)

        await asyncio.gather(*(one(n) for n in self._nodes.values()))

    def status(self) -> dict:
        snap = self.tracker.snapshot()
        snap.update({
            "epoch": self.epoch, "lal": self.lal, "next_lsn": self.allocator.next_lsn,
            "allocation_limit": self.allocation_limit(),
            "inflight_batches": len(self._inflight), "open_records": self._open_records,
            "created_pgs": sorted(self.created_pgs),
            "waiting_commits": len(self.commits), "fenced": self.fenced is not None,
            "stats": dict(self.stats),
            "nodes": {n.info.name: {"az": n.info.az, "address": n.info.address, "up": n.up,
                                    "latency_ms": round(n.latency_ewma_s * 1000, 3),
                                    "link_delay_ms": round(self._delay_ms(n), 3),
                                    "ack_ms": round(n.ack_ewma_s * 1000, 3),
                                    "rpcs": n.rpcs, "bytes_sent": n.bytes_sent,
                                    "failures": n.failures, "streams": n.streams_opened,
                                    "unacked": len(n.unacked)}
                      for n in self._nodes.values()},
        })
        return snap
