"""Gossip: a storage node finds and fills its gaps from its peers, without the writer.

Each round (every ``gossip_interval_s`` +-40% jitter, so six nodes do not march in step)
the node picks one random peer and asks for its NodeStatus: one RPC that lists the peer's
volumes and, per segment, its SCL, volume epoch and number of truncation ranges. Then, for
each of its own segments, in random order and within a byte budget per round:

1. Volumes: a volume the peer has and this node does not (it missed CreateVolume) is
   created locally with the peer's layout and creation epoch, if the peer holds every PG
   of it (six nodes, every PG on all six). In a fleet (docs/fleet.md) a node cannot tell
   from a peer which PGs are placed on it, so it learns no volume this way.

Only segments both nodes hold are compared (the same (volume, pg)), so gossip runs among
a PG's members (invariant 15); a round with a peer sharing no segment pulls nothing.
2. Epochs: if the peer's segment is at a higher volume epoch, or at the same epoch with
   more truncation ranges, the node asks SegmentState and adopts the epoch together with
   the ranges it lacks (AdoptEpochOp). A node that missed a Truncate learns it this way.
3. Records: if the peer's SCL is above this node's, the node pulls the missing records
   with FetchRecords (after = own SCL, upto = the end of the hole, ``max_bytes`` bounded),
   verifies them exactly like an Append (checksums, PG membership) and appends them
   through the same durable path at background priority. Its SCL then advances.
4. Hydration (storage_node/hydration.py): if the peer no longer keeps the log above this
   segment's SCL (its log_floor is higher: a new or wiped segment after the peers' GC),
   the segment first copies every page as of the peer's anchor, then pulls as in 3.
5. Repair (invariant 13): quarantined records are fetched one by one from the peer;
   quarantined page versions that cannot be rebuilt from the local log (the records
   below them were garbage-collected) are read from the peer as of the GC horizon.

Peers are not fenced: gossip requests carry volume epoch 0. All RPCs have short
deadlines; an unreachable peer simply costs its round. Work per round is bounded by
``gossip_round_bytes`` so that catch-up never crowds out foreground appends (the pulled
records also queue behind foreground work in the group committer).
"""

from __future__ import annotations

import asyncio
import random

from aurora_pb import storage_pb2 as pb
from engine.errors import RpcError
from engine.transport import Channel, Transport, service_of
from storage_node.errors import StorageError
from storage_node.hydration import hydrate, needs_hydration
from storage_node.node import StorageNode, node_logger
from storage_node.store import AdoptEpochOp, CreateVolumeOp, PutVersionsOp, verify_stored_page

RPC_TIMEOUT_S = 2.0
FETCHES_PER_SEGMENT_MAX = 16
REPAIRS_PER_ROUND_MAX = 64

STORAGE = service_of(pb, "Storage")


class Gossip:
    """The gossip task of one node (see module doc)."""

    def __init__(self, node: StorageNode, peers: list[str], transport: Transport,
                 seed: int | None = None) -> None:
        self.node = node
        self.transport = transport   # adds the simulated AZ delay and injected faults
        self.store = node.store
        self.peers = [p for p in peers if p]
        self.rng = random.Random(seed)
        self.log = node_logger("storage_node.gossip", node.node_id, node.az)
        self._channels: dict[str, Channel] = {}
        self._task: asyncio.Task | None = None
        self.rounds = 0

    def start(self) -> None:
        if self.peers:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gossip")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for ch in self._channels.values():
            await ch.close()

    def _stub(self, peer: str):
        ch = self._channels.get(peer)
        if ch is None:
            ch = self._channels[peer] = self.transport.channel(peer, timeout_s=RPC_TIMEOUT_S)
        return ch.stub(STORAGE)

    async def _run(self) -> None:
        interval = self.node.tuning.gossip_interval_s
        while True:
            await asyncio.sleep(interval * self.rng.uniform(0.6, 1.4))
            peer = self.rng.choice(self.peers)
            try:
                await self.round(peer)
            except asyncio.CancelledError:
                raise
            except RpcError as exc:   # a peer's refusal, or this node's own (StorageError)
                if not exc.unreachable:
                    self.log.warning("gossip with %s: %s", peer, exc)
            except Exception:
                self.log.exception("gossip round with %s failed", peer)
            self.rounds += 1

    async def round(self, peer: str) -> int:
        """One gossip round with ``peer``; returns the records pulled."""
        stub = self._stub(peer)
        status = await stub.NodeStatus(pb.NodeStatusRequest())
        await self._learn_volumes(status)
        theirs = {(s.volume, s.pg): s for s in status.segments}
        budget = self.node.tuning.gossip_round_bytes
        pulled = 0
        keys = self.store.segment_keys()
        self.rng.shuffle(keys)
        for key in keys:
            ps = theirs.get(key)
            if ps is None:
                continue
            m = self.store.segment(*key)
            if ps.volume_epoch > m.volume_epoch or (
                    ps.volume_epoch == m.volume_epoch and ps.truncations > len(m.truncs)):
                await self._adopt(stub, peer, key)
                m = self.store.segment(*key)
            if needs_hydration(m, ps):
                await hydrate(self.node, stub, peer, key, self.log)
                m = self.store.segment(*key)
            # A peer at an older epoch may call records chain-complete that this segment
            # knows are truncated: pulling them would never move the SCL.
            if ps.scl > m.scl and budget > 0 and ps.volume_epoch >= m.volume_epoch:
                n, nbytes = await self._pull(stub, peer, key, ps.scl, budget)
                pulled += n
                budget -= nbytes
        await self._repair(stub, peer, theirs)
        return pulled

    async def _learn_volumes(self, status: pb.NodeStatusReply) -> None:
        held: dict[str, int] = {}
        for s in status.segments:
            held[s.volume] = held.get(s.volume, 0) + 1
        for v in status.volumes:
            if held.get(v.volume, 0) < v.pg_count:
                continue   # the peer holds only some PGs: a fleet's placement, not ours to guess
            if v.parent:
                # A clone needs its fork tails and inherited set, which only its creator
                # (engine/writer/backtrack.py) knows: a node that missed CreateVolume does without
                # the clone (the writer needs 4 of 6; membership change is absent).
                continue
            try:
                self.store.volume(v.volume)
            except StorageError:
                created = await self.node.commit(CreateVolumeOp(
                    v.volume, v.pg_count, v.stripe_pages, v.volume_epoch,
                    pg_pages=v.pg_pages, stripe_width=v.stripe_width))
                if created:
                    self.log.info("gossip: learned volume %r from %s (missed its CreateVolume)",
                                  v.volume, status.node_id)

    async def _adopt(self, stub, peer: str, key: tuple) -> None:
        volume, pg = key
        state = await stub.SegmentState(pb.SegmentStateRequest(volume=volume, pg=pg))
        m = self.store.segment(volume, pg)
        if state.volume_epoch < m.volume_epoch:
            return
        mine = set(m.truncs)
        missing = tuple((t.start_lsn, t.end_lsn, t.epoch) for t in state.truncations
                        if (t.start_lsn, t.end_lsn, t.epoch) not in mine)
        if state.volume_epoch > m.volume_epoch or missing:
            self.log.info("gossip: segment %s/%d adopts epoch %d and %d truncation ranges from %s",
                          volume, pg, state.volume_epoch, len(missing), state.node_id or peer)
            # The peer's WHOLE set: a newer set replaces ours (a backtrack may have removed
            # a range), so a partial one would drop ranges we must keep.
            theirs = tuple((t.start_lsn, t.end_lsn, t.epoch) for t in state.truncations)
            await self.node.commit(AdoptEpochOp(volume, pg, state.volume_epoch, theirs),
                                   background=True)

    async def _pull(self, stub, peer: str, key: tuple, peer_scl: int, budget: int) -> tuple[int, int]:
        """Fetch records above own SCL from the peer until caught up or out of budget."""
        # BEGIN LAB 2: gossip pull: FetchRecords above own SCL (only the hole when records above it are already stored), append them, stop when caught up, out of budget or stuck
        volume, pg = key
        start_scl = self.store.segment(volume, pg).scl
        pulled = nbytes = 0
        for _ in range(FETCHES_PER_SEGMENT_MAX):
            scl = self.store.segment(volume, pg).scl
            if scl >= peer_scl or nbytes >= budget:
                break
            upto = peer_scl
            next_stored = await self.node.read_bg(self.store.next_stored_above, volume, pg, scl)
            if scl < next_stored - 1 < peer_scl:
                upto = next_stored - 1  # only the hole; what lies above it is already here
            reply = await stub.FetchRecords(pb.FetchRecordsRequest(
                volume=volume, pg=pg, after_lsn=scl, upto_lsn=upto,
                max_bytes=min(self.node.tuning.gossip_fetch_bytes, budget - nbytes),
                volume_epoch=0, sender=self.node.node_id))
            if not reply.records:
                break
            op = self.node.verify_append(volume, 0, 0, [(pg, 0, reply.records)], source="gossip")
            n = op.batches[0].scan.count
            acks = await self.node.append(op, background=True)
            pulled += n
            nbytes += len(reply.records)
            if acks.get(pg, scl) <= scl and not reply.more:
                break  # no progress: the peer's chain does not link to ours (yet)
        end_scl = self.store.segment(volume, pg).scl
        if pulled:
            self.log.info("gossip: pulled %d records (%d bytes) of %s/%d from %s; SCL %d -> %d",
                          pulled, nbytes, volume, pg, peer, start_scl, end_scl)
        return pulled, nbytes
        # END LAB 2

    async def _repair(self, stub, peer: str, theirs: dict) -> None:
        """Refetch quarantined records, and versions the log cannot rebuild (invariant 13)."""
        budget = REPAIRS_PER_ROUND_MAX
        for key in self.store.segment_keys():
            records, versions = self.store.quarantined(key)
            if not records and not versions:
                continue
            ps = theirs.get(key)
            if ps is None:
                continue
            volume, pg = key
            for lsn in sorted(records):
                if budget <= 0 or lsn > ps.scl:
                    break
                budget -= 1
                reply = await stub.FetchRecords(pb.FetchRecordsRequest(
                    volume=volume, pg=pg, after_lsn=lsn - 1, upto_lsn=lsn, volume_epoch=0,
                    sender=self.node.node_id))
                if not reply.records:
                    if lsn < ps.log_floor:
                        await self._supersede(stub, peer, key, lsn, ps)
                    continue
                op = self.node.verify_append(volume, 0, 0, [(pg, 0, reply.records)], source="repair")
                if op.batches[0].lsns() != [lsn]:
                    continue
                await self.node.append(op, background=True)
                self.log.info("repair: record %s/%d lsn %d refetched from %s", volume, pg, lsn, peer)
            m = self.store.segment(volume, pg)
            for page_id, lsn in sorted(versions):
                if budget <= 0:
                    break
                if not self.store.needs_peer_page(key, page_id, lsn):
                    continue  # background.py rebuilds it from the local log
                budget -= 1
                # As of the higher of the two GC horizons (capped at both SCLs): the page's
                # last record at or below it is >= the lost version, and the peer still
                # serves it (a read point below its own horizon's anchor is refused).
                read_point = min(max(lsn, m.gc_horizon, ps.gc_horizon), m.scl, ps.scl)
                if ps.volume_epoch != m.volume_epoch or read_point < lsn:
                    continue
                try:
                    reply = await stub.ReadPage(pb.ReadPageRequest(
                        volume=volume, pg=pg, page_id=page_id, read_point=read_point,
                        volume_epoch=m.volume_epoch))
                except RpcError as exc:
                    self.log.info("repair: page %d of %s/%d not available from %s: %s",
                                  page_id, volume, pg, peer, exc)
                    continue
                if not verify_stored_page(page_id, reply.page_lsn, reply.page):
                    continue
                await self.node.commit(PutVersionsOp(volume, pg, m.generation,
                                                     [(page_id, reply.page_lsn, reply.page)],
                                                     clears=[(page_id, lsn)]), background=True)
                self.log.info("repair: page %d of %s/%d (version %d) refetched from %s as of %d",
                              page_id, volume, pg, lsn, peer, reply.page_lsn)

    async def _supersede(self, stub, peer: str, key: tuple, lsn: int, ps) -> None:
        """A quarantined record no peer holds any more (they collected it below their GC
        horizon): restore its page from the peer's version as of the peer's GC anchor,
        which is at or above the record, and take the record out of quarantine (invariant
        13: nothing bad is served; reads of the page below that version are refused)."""
        volume, pg = key
        m = self.store.segment(volume, pg)
        page_id = await self.node.read_bg(self.store.page_of_record, volume, pg, lsn)
        if page_id is None:
            return
        # At or above the peer's GC horizon (capped at both SCLs): the peer serves read
        # points from its anchor up, and the page's version there is at or above ``lsn``.
        read_point = min(max(lsn, ps.gc_horizon, m.gc_horizon), m.scl, ps.scl)
        if read_point < lsn or ps.volume_epoch != m.volume_epoch:
            return
        try:
            reply = await stub.ReadPage(pb.ReadPageRequest(
                volume=volume, pg=pg, page_id=page_id, read_point=read_point,
                volume_epoch=m.volume_epoch))
        except RpcError as exc:
            self.log.info("repair: page %d of %s/%d not available from %s: %s", page_id, volume,
                          pg, peer, exc)
            return
        if reply.page_lsn < lsn or not verify_stored_page(page_id, reply.page_lsn, reply.page):
            return
        await self.node.commit(PutVersionsOp(volume, pg, m.generation,
                                             [(page_id, reply.page_lsn, reply.page)],
                                             superseded=[lsn]), background=True)
        self.log.info("repair: record %s/%d lsn %d (page %d) superseded by %s's version %d",
                      volume, pg, lsn, page_id, peer, reply.page_lsn)
