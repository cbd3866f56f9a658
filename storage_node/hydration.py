"""Hydration: a new or wiped segment copies its PG from a peer (docs/membership.md).

Gossip (storage_node/gossip.py) pulls records above a segment's SCL, which works while a
peer still holds the record that links to it. A segment that is new (a spare that joins
the PG) or wiped (a node restarted with an empty data dir) has SCL 0, and its peers
garbage-collected the log below their GC horizon long ago (invariant 12 lets them), so no
pull can ever link to it. Hydration gives it a base to link to:

1. The gossip round sees a peer whose ``log_floor`` (records below it may be gone) is
   above this segment's SCL, at the same volume epoch and truncation set (gossip adopts
   those first).
2. ``FetchPageVersions`` with ``first``: the peer picks its anchor, the newest record at
   or below min(GC horizon, SCL) that GC always keeps, and answers with every page of the
   PG as of it, a bounded chunk per call (``hydration_chunk_bytes``); further calls
   repeat ``as_of`` and go on from the last page. Each page arrives with its checksum
   and is verified before it is stored (invariant 13); the versions are stored as they
   arrive (PutVersionsOp, background priority: foreground appends go first).
3. ``HydrateOp``: SCL and log_floor := the anchor (every page is here as of it, so the
   segment holds the PG's chain up to it), gc_horizon := the peer's; the SCL walk then
   takes the records above the anchor that the writer already sent this segment.
4. Gossip pulls the log above the anchor (FetchRecords) like for any node that was down,
   and the writer's appends keep arriving throughout: writes never stall. The segment
   reports "hydrating" (the control plane's view) until its SCL reaches the PGCL the
   membership change waits for.

While hydrating, the segment's SCL stays below everything it lacks, so it serves no read
it cannot (invariant 8) and its acks count for no record it does not hold (invariants 5 and 17).
A truncation during hydration (a recovery or backtrack bumps the segment's generation)
drops the HydrateOp; the next gossip round starts again. Counters: bytes installed and
seconds spent (NodeStatus ``hydrated_bytes``, ``hydration_s``: the MB/s of status).
"""

from __future__ import annotations

import time

from aurora_pb import storage_pb2 as pb
from storage_node.node import StorageNode
from storage_node.store import HydrateOp, PutVersionsOp, verify_stored_page

CHUNKS_MAX = 100_000   # a bound on the loop: 100,000 chunks of 4 MiB is far above any PG here


def needs_hydration(m, peer_segment) -> bool:
    """True if this segment (SegMeta ``m``) can only catch up with ``peer_segment`` (a
    SegmentStatus) through hydration: the peer no longer keeps the log above our SCL."""
    return (peer_segment.log_floor > m.scl and peer_segment.scl > m.scl
            and peer_segment.volume_epoch == m.volume_epoch
            and peer_segment.truncations == len(m.truncs))


async def hydrate(node: StorageNode, stub, peer: str, key: tuple, log) -> bool:
    """Hydrate segment ``key`` from ``peer`` (see the module doc). True if the segment's
    SCL reached the peer's anchor; False if the peer's state changed under us (the next
    gossip round tries again)."""
    volume, pg = key
    store = node.store
    m = store.segment(volume, pg)
    started = time.monotonic()
    generation = m.generation
    as_of = 0
    after_page = 0
    first = True
    nbytes = npages = 0
    horizon = 0
    for _ in range(CHUNKS_MAX):
        reply = await stub.FetchPageVersions(pb.FetchPageVersionsRequest(
            volume=volume, pg=pg, as_of=as_of, after_page=after_page, first=first,
            max_bytes=node.tuning.hydration_chunk_bytes))
        if first:
            as_of = reply.as_of
            horizon = reply.gc_horizon
            theirs = tuple((t.start_lsn, t.end_lsn, t.epoch) for t in reply.truncations)
            if reply.volume_epoch != m.volume_epoch or set(theirs) != set(m.truncs):
                log.info("hydration of %s/%d from %s: epochs or truncation sets differ; "
                         "gossip adopts first", volume, pg, peer)
                return False
            if as_of <= m.scl:
                return False
            log.info("hydrating %s/%d from %s: pages as of LSN %d (its GC horizon %d), then "
                     "the log above it", volume, pg, peer, as_of, horizon)
        first = False
        versions = []
        for image in reply.pages:
            if not verify_stored_page(image.page_id, image.page_lsn, image.page):
                log.warning("hydration of %s/%d: page %d from %s failed its checksum; "
                            "starting again later", volume, pg, image.page_id, peer)
                return False
            versions.append((image.page_id, image.page_lsn, bytes(image.page)))
            after_page = image.page_id
        if versions:
            await node.commit(PutVersionsOp(volume, pg, generation, versions), background=True)
            nbytes += sum(len(v[2]) for v in versions)
            npages += len(versions)
            node.counters.hydrated_bytes += sum(len(v[2]) for v in versions)
        if not reply.more:
            break
    scl = await node.commit(HydrateOp(volume, pg, generation, as_of, horizon), background=True)
    seconds = time.monotonic() - started
    node.counters.hydration_s += seconds
    ok = scl >= as_of
    if ok:
        node.counters.hydrations += 1
        log.info("hydrated %s/%d from %s: %d pages (%.1f MB) as of LSN %d in %.2f s (%.1f MB/s); "
                 "SCL now %d", volume, pg, peer, npages, nbytes / 1e6, as_of, seconds,
                 nbytes / 1e6 / max(seconds, 1e-6), scl)
    return ok
