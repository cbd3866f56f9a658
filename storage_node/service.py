"""The Storage service's handlers: translate requests into StorageNode / Store calls.

Every handler is a plain ``async def Method(self, request, ctx)`` over protobuf messages,
served through the transport seam (engine/transport; the gRPC adapter is generic): it checks
the request's sizes and counts against their bounds (storage_node/validate.py), turns
protobuf fields into plain values, runs the call (LMDB reads in the read executor, writes
through the group committer) and lets a storage_node.errors.StorageError travel as the
caller's RpcError (status, ``aurora-error`` code, and ``aurora-current-epoch`` for
STALE_EPOCH). A refused request changes nothing, and the node keeps serving: no handler
lets an exception kill the server.

    RPC            what it does                                     store / node call
    Append         verify all batches, group-commit, ack SCLs       verify_append, append
    AppendStream   the same per request over one long-lived stream  verify_append,
                   (the writer's path; replies tagged with seq)     append_future
    ReadPage       page as of a read point (invariant 8)            Store.read_page
    SegmentState   state (+ fence: adopt a higher epoch first)      AdoptEpochOp, segment_state
    FetchRecords   chain-complete records in (after, upto]          Store.fetch_records
    Truncate       durable truncation range under a new epoch       TruncateOp
    CreateVolume   segments of a volume (idempotent)                CreateVolumeOp
    SetGcHorizon   PGMRPL for GC (invariant 12)                     SetGcHorizonOp
    SetMembership  a higher membership epoch (invariant 16)         AdoptMembershipOp
    FetchPageVersions  pages as of the GC anchor, for hydration     Store.hydration_pages
    NodeStatus     counters and per-segment state                   in-memory mirrors
    FindCommit     a COMMIT record by time or LSN (time -> LSN)     Store.find_commit
    VolumeHistory  the volume's truncation sets (timelines)         Store.history
    DropVolume     mark a volume dropped (clones keep reading it)   DropVolumeOp
    VolumeBytes    bytes a volume owns / shares with its ancestors  Store.volume_bytes
"""

from __future__ import annotations

import asyncio
import functools

from aurora_pb import storage_pb2 as pb
from engine.errors import FormatError
from engine.format.page import META_PAGE_ID
from engine.format.volume import DEFAULT_STRIPE_PAGES
from storage_node import validate
from storage_node.errors import StorageError, UnbuildablePageError
from storage_node.node import StorageNode, node_logger
from storage_node.store import (
    AdoptEpochOp,
    AdoptMembershipOp,
    CreateVolumeOp,
    DropVolumeOp,
    SetGcHorizonOp,
    TruncateOp,
)


def _truncs_pb(truncs) -> list:
    return [pb.TruncationRange(start_lsn=s, end_lsn=e, epoch=ep) for s, e, ep in truncs]


def refusals(method):
    """Log a refusal (a StorageError) before the transport carries it to the caller."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except StorageError as exc:
            self.log.info("%s refused (%s): %s", method.__name__, exc.code, exc.detail)
            raise

    return wrapper


class StorageService:
    """aurora_pb.Storage over one StorageNode."""

    def __init__(self, node: StorageNode) -> None:
        self.node = node
        self.store = node.store
        self.log = node_logger("storage_node.service", node.node_id, node.az)

    @refusals
    async def Append(self, request: pb.AppendRequest, context) -> pb.AppendReply:
        node = self.node
        node.counters.append_rpcs += 1
        validate.check_append(request.volume, [b.pg for b in request.batches])
        op = node.verify_append(request.volume, request.volume_epoch, request.writer_vdl,
                                ((b.pg, b.membership_epoch, b.records) for b in request.batches))
        acks = await node.append(op)
        return pb.AppendReply(acks=[pb.PgAck(pg=pg, scl=scl) for pg, scl in acks.items()],
                              node_id=node.node_id)

    async def AppendStream(self, requests, context):
        """Append over one long-lived stream: each request is verified and queued for group
        commit as it arrives (so many are in flight, and requests that arrive during one
        fsync share the next transaction), and its reply is written once its transaction
        committed with sync (invariant 3), in request order (the group-commit loop is
        FIFO, so waiting in order costs nothing). A refusal is that request's reply
        (error_* fields); the stream goes on."""
        node = self.node
        pending: asyncio.Queue = asyncio.Queue()   # (seq, future or refusal), in order; None: end

        async def read_requests() -> None:
            try:
                async for request in requests:
                    try:
                        pending.put_nowait((request.seq, await self._queue_append(request)))
                    except StorageError as exc:
                        pending.put_nowait((request.seq, exc))
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while True:
                item = await pending.get()
                if item is None:
                    break
                seq, outcome = item
                if isinstance(outcome, asyncio.Future):
                    outcome = await outcome
                if isinstance(outcome, StorageError):
                    self.log.info("AppendStream request %d refused (%s): %s", seq, outcome.code,
                                  outcome.detail)
                    yield pb.AppendReply(seq=seq, node_id=node.node_id,
                                         error_status=outcome.status, error_code=outcome.code,
                                         error_detail=outcome.detail,
                                         error_metadata=outcome.metadata)
                elif isinstance(outcome, Exception):
                    raise outcome   # a failed LMDB transaction: the stream ends with it
                else:
                    yield pb.AppendReply(
                        seq=seq, node_id=node.node_id,
                        acks=[pb.PgAck(pg=pg, scl=scl) for pg, scl in outcome.items()])
            await reader   # its error (a broken stream), if any
        finally:
            reader.cancel()

    async def _queue_append(self, request: pb.AppendRequest) -> asyncio.Future:
        """Verify one Append request and queue it for group commit: the future of its acks."""
        node = self.node
        node.counters.append_rpcs += 1
        validate.check_append(request.volume, [b.pg for b in request.batches])
        op = node.verify_append(request.volume, request.volume_epoch, request.writer_vdl,
                                ((b.pg, b.membership_epoch, b.records) for b in request.batches))
        return await node.append_future(op)

    @refusals
    async def ReadPage(self, request: pb.ReadPageRequest, context) -> pb.ReadPageReply:
        validate.check_volume_name(request.volume)
        validate.check_pg(request.pg)
        try:
            page, page_lsn, scl = await self.node.read(
                self.store.read_page, request.volume, request.pg, request.page_id,
                request.read_point, request.volume_epoch, request.min_scl,
                request.membership_epoch)
        except FormatError as exc:
            # A stored record passed its checksum but cannot apply (docs/storage-node.md,
            # "Records that cannot apply"): this page is refused, the node serves the rest.
            self.log.warning("ReadPage %s/%d page %d as of %d: cannot be built: %s",
                             request.volume, request.pg, request.page_id, request.read_point, exc)
            raise UnbuildablePageError(
                f"page {request.page_id} of {request.volume}/{request.pg} cannot be built as "
                f"of {request.read_point}: {exc}") from None
        return pb.ReadPageReply(page=page, page_lsn=page_lsn, scl=scl)

    @refusals
    async def SegmentState(self, request: pb.SegmentStateRequest, context) -> pb.SegmentStateReply:
        validate.check_volume_name(request.volume)
        validate.check_pg(request.pg)
        m = self.store.segment(request.volume, request.pg)  # UNKNOWN_VOLUME / MALFORMED early
        self.store._check_membership(m, request.membership_epoch, "SegmentState",
                                     (request.volume, request.pg))
        if request.fence and request.volume_epoch:
            await self.node.commit(AdoptEpochOp(request.volume, request.pg, request.volume_epoch,
                                                reject_stale=True))
        m, records, _more, tail = await self.node.read(
            self.store.segment_state, request.volume, request.pg, request.records_since,
            request.include_records, 65536, request.tail_bound, request.membership_epoch)
        return pb.SegmentStateReply(
            scl=m.scl, volume_epoch=m.volume_epoch, membership_epoch=m.membership_epoch,
            writer_vdl=m.writer_vdl, gc_horizon=m.gc_horizon, max_lsn=m.max_lsn,
            truncations=_truncs_pb(m.truncs),
            records=[pb.RecordMeta(lsn=lsn, prev_volume_lsn=pv, flags=fl) for lsn, pv, fl in records],
            node_id=self.node.node_id, tail_lsn=tail)

    @refusals
    async def FetchRecords(self, request: pb.FetchRecordsRequest, context) -> pb.FetchRecordsReply:
        validate.check_volume_name(request.volume)
        validate.check_pg(request.pg)
        records, scl, more, epoch, truncs = await self.node.read(
            self.store.fetch_records, request.volume, request.pg, request.after_lsn,
            request.upto_lsn, request.max_bytes, request.volume_epoch, request.membership_epoch)
        return pb.FetchRecordsReply(records=records, scl=scl, more=more, volume_epoch=epoch,
                                    truncations=_truncs_pb(truncs))

    @refusals
    async def Truncate(self, request: pb.TruncateRequest, context) -> pb.TruncateReply:
        validate.check_volume_name(request.volume)
        validate.check_pg(request.pg)
        validate.check_truncation_set("Truncate", len(request.set))
        replace = None
        if request.replace:
            replace = tuple((t.start_lsn, t.end_lsn, t.epoch) for t in request.set)
        scl = await self.node.commit(TruncateOp(request.volume, request.pg, request.start_lsn,
                                                request.end_lsn, request.volume_epoch, replace,
                                                request.time_us, request.prev_vdl,
                                                request.set_writer_vdl, request.membership_epoch))
        return pb.TruncateReply(scl=scl)

    @refusals
    async def FindCommit(self, request: pb.FindCommitRequest, context) -> pb.FindCommitReply:
        validate.check_volume_name(request.volume)
        validate.check_truncation_set("FindCommit", len(request.set))
        truncs = None
        if request.use_set:
            truncs = tuple((t.start_lsn, t.end_lsn, t.epoch) for t in request.set)
        lsn, time_us = await self.node.read(functools.partial(
            self.store.find_commit, request.volume, upto_lsn=request.upto_lsn,
            max_time_us=request.max_time_us, after_lsn=request.after_lsn, truncs=truncs,
            forward=request.forward))
        info = self.store.volume(request.volume)
        scl = self.store.segment(request.volume, info.layout.pg_of(META_PAGE_ID)).scl
        return pb.FindCommitReply(lsn=lsn, time_us=time_us, scl=scl)

    @refusals
    async def VolumeHistory(self, request: pb.VolumeHistoryRequest, context) -> pb.VolumeHistoryReply:
        validate.check_volume_name(request.volume)
        entries = await self.node.read(self.store.history, request.volume)
        return pb.VolumeHistoryReply(entries=[
            pb.TimelineEntry(epoch=e, time_us=t, prev_vdl=v, set=_truncs_pb(truncs))
            for e, t, v, truncs in entries])

    @refusals
    async def DropVolume(self, request: pb.VolumeDropRequest, context) -> pb.VolumeDropReply:
        validate.check_volume_name(request.volume)
        dropped = await self.node.commit(DropVolumeOp(request.volume))
        return pb.VolumeDropReply(dropped=dropped)

    @refusals
    async def VolumeBytes(self, request: pb.VolumeBytesRequest, context) -> pb.VolumeBytesReply:
        validate.check_volume_name(request.volume)
        owned, shared = await self.node.read(self.store.volume_bytes, request.volume)
        return pb.VolumeBytesReply(owned_bytes=owned, shared_bytes=shared)

    @refusals
    async def CreateVolume(self, request: pb.CreateVolumeRequest, context) -> pb.CreateVolumeReply:
        validate.check_create_volume(request.volume, request.pg_count, request.stripe_pages,
                                     len(request.fork_tails))
        created = await self.node.commit(CreateVolumeOp(
            request.volume, request.pg_count, request.stripe_pages or DEFAULT_STRIPE_PAGES,
            request.volume_epoch, request.parent, request.fork_lsn, tuple(request.fork_tails),
            tuple(sorted(set(request.pgs))), request.pg_pages, request.stripe_width))
        return pb.CreateVolumeReply(created=created)

    @refusals
    async def SetGcHorizon(self, request: pb.SetGcHorizonRequest, context) -> pb.SetGcHorizonReply:
        validate.check_volume_name(request.volume)
        horizon = await self.node.commit(SetGcHorizonOp(request.volume, request.horizon_lsn,
                                                        request.volume_epoch))
        return pb.SetGcHorizonReply(gc_horizon=horizon)

    @refusals
    async def SetMembership(self, request: pb.SetMembershipRequest, context) -> pb.SetMembershipReply:
        validate.check_volume_name(request.volume)
        validate.check_pg(request.pg)
        epoch = await self.node.commit(AdoptMembershipOp(request.volume, request.pg,
                                                         request.membership_epoch))
        return pb.SetMembershipReply(membership_epoch=epoch)

    @refusals
    async def FetchPageVersions(self, request: pb.FetchPageVersionsRequest,
                                context) -> pb.FetchPageVersionsReply:
        validate.check_volume_name(request.volume)
        validate.check_pg(request.pg)
        m, as_of, pages, more = await self.node.read_bg(
            self.store.hydration_pages, request.volume, request.pg, request.as_of,
            request.after_page, request.first, request.max_bytes)
        return pb.FetchPageVersionsReply(
            pages=[pb.PageImage(page_id=p, page_lsn=lsn, page=b) for p, lsn, b in pages],
            as_of=as_of, more=more, scl=m.scl, gc_horizon=m.gc_horizon,
            volume_epoch=m.volume_epoch, truncations=_truncs_pb(m.truncs),
            membership_epoch=m.membership_epoch)

    async def NodeStatus(self, request: pb.NodeStatusRequest, context) -> pb.NodeStatusReply:
        return status_reply(self.node)


def status_reply(node: StorageNode) -> pb.NodeStatusReply:
    """NodeStatusReply from the in-memory mirrors (no LMDB access)."""
    store = node.store
    c = node.counters
    segments = []
    quarantined = 0
    for (volume, pg), m in sorted(store.segments()):
        qr, qv = store.quarantined((volume, pg))
        quarantined += len(qr) + len(qv)
        segments.append(pb.SegmentStatus(
            volume=volume, pg=pg, scl=m.scl, volume_epoch=m.volume_epoch, max_lsn=m.max_lsn,
            gc_horizon=m.gc_horizon, records=m.n_records, page_versions=m.n_versions,
            truncations=len(m.truncs), membership_epoch=m.membership_epoch,
            writer_vdl=m.writer_vdl, log_floor=m.log_floor))
    by_id = {v.vol_id: v.name for v in store.volumes()}
    volumes = [pb.VolumeInfo(volume=v.name, pg_count=v.layout.pg_count,
                             pg_pages=v.layout.pg_pages, stripe_width=v.layout.stripe_width,
                             stripe_pages=v.layout.stripe_pages, volume_epoch=v.created_epoch,
                             parent=by_id.get(v.parent_id, ""), fork_lsn=v.fork_lsn,
                             dropped=v.dropped)
               for v in store.volumes()]
    return pb.NodeStatusReply(
        node_id=node.node_id, az=node.az, records_received=c.records_received,
        bytes_received=c.bytes_received, lmdb_bytes_written=store.lmdb_bytes_written,
        write_txns=store.write_txns, pages_materialised=c.pages_materialised,
        scrub_errors_found=c.scrub_errors_found, scrub_repairs=store.scrub_repairs,
        gossip_records_pulled=c.gossip_records_pulled, append_rpcs=c.append_rpcs,
        segments=segments, volumes=volumes, gc_records_deleted=c.gc_records_deleted,
        quarantined=quarantined, incarnation=store.incarnation, hydrated_bytes=c.hydrated_bytes,
        hydration_s=c.hydration_s, hydrations=c.hydrations)
