"""Recovery on every open (invariant 10): fence, find VDL from a read quorum, truncate.

Nothing is replayed at the writer: recovery reads a few bytes of state per segment and the
metadata of the records written since the last VDL any writer told storage, so its time
does not grow with the amount of log written.

Steps, with the RPCs of proto/aurora_pb/storage.proto::

    1. Learn    SegmentState of every PG at every node; at least Vr = 3 answers per PG.
                old_epoch = highest volume epoch seen; since = highest writer_vdl seen
                (a VDL some writer reached: everything at or below it is durable).
                A volume no node knows is created (CreateVolume at a write quorum).
    2. Fence    SegmentState(fence=True, epoch = old_epoch + 1) at >= Vr nodes per PG,
                asking for the metadata of chain-complete records above `since` and each
                PG's chain tail at or below `since`. From now on those nodes reject the
                old writer; it can reach at most V - Vr = 3 < Vw nodes, so it can never
                make another write durable (invariant 9).
    3. Compute  Walk the volume backlink chain upward from `since` through the union of
                the records reported: VCL is where the chain breaks, VDL the last CPL on
                the way (invariant 5). Each PG's tail at VDL is the backlink for the next
                record of that PG.
    4. Truncate Durably record (VDL, end] under the new epoch at a write quorum of every
                PG, end = max(VDL + LAL, previous truncation end + LAL, highest LSN any
                segment reported): every LSN the old writer could have allocated. Records
                the old writer left above VDL vanish from SCLs, reads and gossip. LAL must
                not shrink between runs of a volume.
    5. Repair   Re-append the records in (since, VDL] (fetched from the segment that holds
                them) to every node, until Vw segments of every PG have an SCL at its tail:
                a record below the new VDL may have been on only one segment.
    6. Open     The writer starts with VDL, allocates LSNs from end + 1 (backlinks still
                point at VDL), and stays within max(VDL, end) + LAL (invariant 6).

Worked example (one PG, six segments, LAL = 100, previous truncation (0, 100], last
writer_vdl reported 1000)::

    segment   SCL    chain records above 1000 (lsn:flags)
    sn1       1007   1001 1002 1003:CPL 1004 1005:CPL 1006 1007
    sn2       1005   1001 1002 1003:CPL 1004 1005:CPL
    sn3       1003   1001 1002 1003:CPL
    sn4       1000   (none)
    sn5-sn6   (down)

    The union walks 1000 -> 1001 -> ... -> 1007: VCL 1007, VDL 1005 (last CPL).
    Truncation range (1005, max(1105, 200, 1007)] = (1005, 1105] under the new epoch, at
    sn1-sn4 (a write quorum: with sn4 down too, recovery would stop here and retry);
    records 1006, 1007 vanish. 1004 and 1005 were on two segments only: repair re-appends
    1001..1005 to every node it can reach, and the volume opens once four segments hold
    them. docs/recovery.md walks through a two-PG example step by step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aurora_pb import storage_pb2 as pb
from engine.errors import ErrorCode, RpcError, UnavailableError
from engine.materialiser import scan_batch
from engine.format.redo import FLAG_CPL
from engine.format.page import META_PAGE_ID
from engine.writer.storage_driver import StorageDriver, truncate_request  # noqa: F401 (re-exported)
from engine.format.volume import VR, VW

log = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    epoch: int
    vdl: int
    vcl: int
    since: int
    truncate_end: int
    pg_tails: dict[int, int]
    created: bool
    repaired_records: int
    seconds: float


class RecoveryError(UnavailableError):
    """Recovery could not reach the quorum it needs; nothing was opened."""


def newest_truncation_set(sets) -> tuple:
    """Of several truncation sets (each an iterable of TruncationRange messages or
    (start, end, epoch) tuples), the one of the highest epoch as sorted (start, end, epoch)
    tuples; sets of that same epoch are united (older single-range Truncates)."""
    # BEGIN LAB 4: the newest truncation set: the ranges of the highest epoch, sets of that epoch united, sorted by (epoch, start)
    best_epoch, best = 0, set()
    for ranges in sets:
        tuples = {(t.start_lsn, t.end_lsn, t.epoch) if hasattr(t, "start_lsn") else tuple(t)
                  for t in ranges}
        epoch = max((t[2] for t in tuples), default=0)
        if epoch > best_epoch:
            best_epoch, best = epoch, tuples
        elif epoch == best_epoch:
            best |= tuples
    return tuple(sorted(best, key=lambda t: (t[2], t[0])))
    # END LAB 4


def lower_out_of(lsn: int, truncs) -> int:
    """``lsn``, or the start of the truncation range that hides it."""
    # BEGIN LAB 4: lower an LSN out of the truncation range (start, end] that hides it
    for start, end, _epoch in truncs:
        if start < lsn <= end:
            return start
    return lsn
    # END LAB 4


def walk_volume_chain(by_prev: dict[int, tuple[int, int, bool]], since: int,
                      tails_at_since: dict[int, int], *, lal: int, last_truncate_end: int,
                      max_lsn_seen: int) -> tuple[int, int, dict[int, int], int]:
    """Recovery's computation, no I/O (invariants 6, 10): walk the volume backlink chain
    ``by_prev`` (prev volume LSN -> (lsn, pg, is_cpl), from a read quorum, annulled records
    left out) up from ``since``. Returns (VCL: the end of the walk, VDL: the last CPL on it,
    the PG tails at or below VDL, starting from ``tails_at_since``, and the end of the
    truncation range that annuls everything the previous writer may have allocated)."""
    # BEGIN LAB 4: walk the volume backlink chain (by_prev) up from since: VCL, VDL (last CPL), the PG tails at or below VDL, and truncate_end (invariants 6, 10)
    vcl = vdl = since
    tails = dict(tails_at_since)
    walked: list[tuple[int, int]] = []
    while vcl in by_prev:
        lsn, pg, cpl = by_prev[vcl]
        assert lsn > vcl, f"volume backlink chain goes backwards at {lsn}"
        walked.append((lsn, pg))
        vcl = lsn
        if cpl:
            vdl = lsn
    for lsn, pg in walked:
        if lsn <= vdl:
            tails[pg] = max(tails.get(pg, 0), lsn)
    # The previous writer allocated at most max(its VDL, its truncation end) + LAL
    # (invariant 6, StorageDriver.allocation_limit); annul all of that.
    truncate_end = max(vdl + lal, last_truncate_end + lal, max_lsn_seen)
    return vcl, vdl, tails, truncate_end
    # END LAB 4


async def gather_per_node(driver: StorageDriver, make_call, timeout_s: float,
                          names=None) -> dict:
    """Run make_call(name, stub) on every node (or on ``names``, e.g. one PG's members:
    ``driver.members(pg)``, invariant 15); return {name: reply or RpcError}."""
    names = list(driver.node_names if names is None else names)

    async def one(name):
        try:
            return await make_call(name, driver.stub(name))
        except RpcError as exc:
            return exc

    results = await asyncio.wait_for(
        asyncio.gather(*(one(n) for n in names)), timeout_s + 1.0)
    return dict(zip(names, results))


def _describe_errors(results: dict) -> str:
    return "; ".join(f"{n}: {r.code or r.status}"
                     for n, r in results.items() if isinstance(r, RpcError))


async def recover(driver: StorageDriver, *, create_if_missing: bool = True,
                  rpc_timeout_s: float = 3.0) -> RecoveryResult:
    """Run recovery against the driver's six nodes and configure the driver to open.

    The driver must be started but must not have shipped anything yet. On success its
    epoch, tracker, allocator and truncation list are set for the new epoch.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    volume = driver.volume
    layout = driver.layout
    pgs = range(layout.pg_count)
    created = False
    if layout.grows:
        # Growth: only PGs whose segments exist take part (docs/fleet.md).
        pgs, known = await _existing_pgs(driver, rpc_timeout_s)
        if not known:
            if not create_if_missing:
                raise RecoveryError(f"volume {volume!r} does not exist")
            await _create_volume(driver, rpc_timeout_s)
            created = True
            pgs = [layout.pg_of(META_PAGE_ID)]

    # 1. Learn. ----------------------------------------------------------------------
    async def learn(pg):
        return pg, await gather_per_node(
            driver, lambda name, stub: stub.SegmentState(
                pb.SegmentStateRequest(volume=volume, pg=pg), timeout_s=rpc_timeout_s),
            rpc_timeout_s, driver.members(pg))   # the PG's own six (invariant 15)

    learned = dict(await asyncio.gather(*(learn(pg) for pg in pgs)))
    unknown = [] if layout.grows else [n for n, r in learned[0].items()
               if isinstance(r, RpcError) and r.code == ErrorCode.UNKNOWN_VOLUME]
    known = [] if layout.grows else [n for n, r in learned[0].items() if not isinstance(r, RpcError)]
    if not layout.grows and not known and len(unknown) >= VW:
        if not create_if_missing:
            raise RecoveryError(f"volume {volume!r} does not exist")
        await _create_volume(driver, rpc_timeout_s)
        created = True
        learned = dict(await asyncio.gather(*(learn(pg) for pg in pgs)))

    old_epoch = 0
    for pg, results in learned.items():
        replies = [r for r in results.values() if not isinstance(r, RpcError)]
        if len(replies) < VR:
            raise RecoveryError(
                f"recovery needs {VR} segments of PG {pg}, reached {len(replies)} "
                f"({_describe_errors(results)})")
        for r in replies:
            old_epoch = max(old_epoch, r.volume_epoch)
    new_epoch = old_epoch + 1
    # Membership epochs (docs/membership.md, invariant 16): the highest any segment of the
    # PG reports (at least 1): this writer stamps it on every request for the PG. The
    # control plane tells the writer of a change in progress (InstanceAdmin.SetMembership).
    driver.adopt_membership_epochs({
        pg: max([1] + [r.membership_epoch for r in results.values() if not isinstance(r, RpcError)])
        for pg, results in learned.items()})
    # The current timeline: the truncation set of the highest epoch any segment reports.
    # Every set was written at a write quorum of every PG, so this read quorum sees the
    # newest one that any writer opened with. Sets replace each other whole (a backtrack
    # can remove a range), so a union of older sets would hide records of this timeline.
    current_set = newest_truncation_set(
        r.truncations for results in learned.values() for r in results.values()
        if not isinstance(r, RpcError))
    # since: the highest VDL a writer of THIS timeline reached. A writer_vdl inside a range
    # belongs to a timeline that a backtrack or recovery left: its range start is a VDL.
    since = 0
    for results in learned.values():
        for r in results.values():
            if not isinstance(r, RpcError):
                since = max(since, lower_out_of(r.writer_vdl, current_set))

    # 2. Fence. ----------------------------------------------------------------------
    async def fence_one(pg, stub):
        reply = await stub.SegmentState(
            pb.SegmentStateRequest(volume=volume, pg=pg, volume_epoch=new_epoch, fence=True,
                                   records_since=since, include_records=True, tail_bound=since),
            timeout_s=rpc_timeout_s)
        # One reply lists at most 65,536 records and does not say it was cut; a list that
        # stops below the segment's SCL was cut (up to LAL records may lie above `since`):
        # ask for the rest, or step 3 would stop short and truncate durable records.
        while reply.records and reply.records[-1].lsn < reply.scl:
            more = await stub.SegmentState(
                pb.SegmentStateRequest(volume=volume, pg=pg, include_records=True,
                                       records_since=reply.records[-1].lsn),
                timeout_s=rpc_timeout_s)
            if not more.records:
                break
            reply.records.extend(more.records)
        return reply

    async def fence(pg):
        return pg, await gather_per_node(
            driver, lambda name, stub: fence_one(pg, stub), rpc_timeout_s, driver.members(pg))

    fenced = dict(await asyncio.gather(*(fence(pg) for pg in pgs)))

    # 3. Compute. --------------------------------------------------------------------
    by_prev: dict[int, tuple[int, int, bool]] = {}   # prev_volume_lsn -> (lsn, pg, cpl)
    tails_at_since: dict[int, int] = {}
    max_lsn_seen = since
    last_truncate_end = 0
    best_node: dict[int, tuple[int, str]] = {}       # pg -> (scl, node) of the fullest
    # Every truncation range any segment reported. Each was recorded at a write quorum, so
    # this read quorum saw it even if the segment answering missed it (down during that
    # recovery, not yet told by gossip): such a segment still lists the annulled records,
    # whose backlinks collide with the newer epoch's, and would send the walk down them.
    current_set = newest_truncation_set(
        [current_set] + [r.truncations for results in fenced.values() for r in results.values()
                         if not isinstance(r, RpcError)])
    annulled_ranges = {(start, end) for start, end, _epoch in current_set}

    def annulled(lsn: int) -> bool:
        return any(start < lsn <= end for start, end in annulled_ranges)

    for results in fenced.values():  # the end of every range ever seen: LSNs allocated
        for r in results.values():
            if not isinstance(r, RpcError):
                for tr in r.truncations:
                    last_truncate_end = max(last_truncate_end, tr.end_lsn)
    for pg, results in fenced.items():
        replies = {n: r for n, r in results.items() if not isinstance(r, RpcError)}
        if len(replies) < VR:
            raise RecoveryError(
                f"could not fence {VR} segments of PG {pg} at epoch {new_epoch} "
                f"({_describe_errors(results)})")
        for name, r in replies.items():
            assert r.volume_epoch >= new_epoch or r.volume_epoch == 0, (
                f"invariant 9: {name} did not adopt epoch {new_epoch}")
            if not annulled(r.tail_lsn):
                tails_at_since[pg] = max(tails_at_since.get(pg, 0), r.tail_lsn)
            max_lsn_seen = max(max_lsn_seen, r.max_lsn)
            for tr in r.truncations:
                last_truncate_end = max(last_truncate_end, tr.end_lsn)
            if r.scl > best_node.get(pg, (-1, ""))[0]:
                best_node[pg] = (r.scl, name)
            for meta in r.records:
                if not annulled(meta.lsn):
                    by_prev[meta.prev_volume_lsn] = (meta.lsn, pg, bool(meta.flags & FLAG_CPL))

    vcl, vdl, tails, truncate_end = walk_volume_chain(
        by_prev, since, tails_at_since, lal=driver.lal, last_truncate_end=last_truncate_end,
        max_lsn_seen=max_lsn_seen)

    # 4. Truncate at a write quorum of every PG. -------------------------------------
    new_set = tuple(sorted(set(current_set) | {(vdl, truncate_end, new_epoch)},
                           key=lambda t: (t[2], t[0])))
    time_us = time.time_ns() // 1000

    async def truncate(pg):
        return pg, await gather_per_node(
            driver, lambda name, stub: stub.Truncate(
                truncate_request(volume, pg, new_epoch, new_set, time_us, vdl),
                timeout_s=rpc_timeout_s),
            rpc_timeout_s, driver.members(pg))

    truncated = dict(await asyncio.gather(*(truncate(pg) for pg in pgs)))
    for pg, results in truncated.items():
        ok = [n for n, r in results.items() if not isinstance(r, RpcError)]
        if len(ok) < VW:
            raise RecoveryError(
                f"truncation of PG {pg} reached {len(ok)} of the {VW} segments it needs "
                f"({_describe_errors(results)})")

    # 5. Repair: the records in (since, vdl] to a write quorum. ------------------------
    driver.epoch = new_epoch
    # This epoch's whole set: StorageDriver._send_truncations sends it to a node that
    # answers EPOCH_AHEAD (it missed this Truncate).
    driver.truncations = list(new_set)
    driver.truncation_history = (time_us, vdl)
    repaired = await _repair(driver, since, vdl, tails, best_node, rpc_timeout_s)

    # 6. Open. -----------------------------------------------------------------------
    driver.created_pgs = set(pgs)
    driver.reset_for_epoch(start_lsn=vdl, next_lsn=truncate_end + 1, pg_tails=tails)
    result = RecoveryResult(
        epoch=new_epoch, vdl=vdl, vcl=vcl, since=since, truncate_end=truncate_end,
        pg_tails=tails, created=created, repaired_records=repaired,
        seconds=loop.time() - started)
    log.info("recovered volume %s: epoch %d, VDL %d (VCL %d, since %d), truncated (%d, %d], "
             "repaired %d records in %.3fs", volume, new_epoch, vdl, vcl, since, vdl,
             truncate_end, repaired, result.seconds)
    return result


async def _existing_pgs(driver: StorageDriver, rpc_timeout_s: float) -> tuple[list[int], bool]:
    """(PGs whose segments exist, whether any node knows the volume), growth only.

    A PG counts as never created when Vr of its members answer NodeStatus without it: then
    at most V - Vr = 3 segments hold anything of it, so no record of it ever reached a
    write quorum (Vr + Vw > V). Every other PG is learned as usual, and recovery fails
    (and is retried) if fewer than Vr of its members answer.
    """
    states = await gather_per_node(
        driver, lambda name, stub: stub.NodeStatus(pb.NodeStatusRequest(), timeout_s=rpc_timeout_s),
        rpc_timeout_s)
    held: dict[str, set[int]] = {}
    known = False
    for name, reply in states.items():
        if isinstance(reply, RpcError):
            continue
        held[name] = {s.pg for s in reply.segments if s.volume == driver.volume}
        known |= any(v.volume == driver.volume for v in reply.volumes)
    pgs = []
    for pg in range(driver.layout.pg_count):
        without = sum(1 for n in driver.members(pg) if n in held and pg not in held[n])
        if without < VR:
            pgs.append(pg)
    return pgs, known


async def _create_volume(driver: StorageDriver, rpc_timeout_s: float) -> None:
    """Create the volume's segments where they are placed: each node is asked for exactly
    the PGs placed on it (invariant 15); every PG needs Vw of its members. A growing
    volume starts with the META page's PG only; the driver creates the others as pages
    need them."""
    layout = driver.layout
    first = [layout.pg_of(META_PAGE_ID)] if layout.grows else list(range(layout.pg_count))

    def placed_on(name: str) -> list[int]:
        return [pg for pg in first if name in driver.members(pg)]

    def request(name: str) -> pb.CreateVolumeRequest:
        return pb.CreateVolumeRequest(volume=driver.volume, pg_count=layout.pg_count,
                                      stripe_pages=layout.stripe_pages, volume_epoch=1,
                                      pg_pages=layout.pg_pages, stripe_width=layout.stripe_width,
                                      pgs=placed_on(name) if driver.memberships or layout.grows else ())
    hosts = [n for n in driver.node_names if placed_on(n)]
    results = await gather_per_node(
        driver, lambda name, stub: stub.CreateVolume(request(name), timeout_s=rpc_timeout_s),
        rpc_timeout_s, hosts)
    ok = [n for n, r in results.items() if not isinstance(r, RpcError)]
    for pg in first:
        placed = [n for n in driver.members(pg) if n in ok]
        if len(placed) < VW:
            raise RecoveryError(f"could create PG {pg} of volume {driver.volume!r} on only "
                                f"{len(placed)} of its nodes ({_describe_errors(results)})")
    log.info("created volume %s on %s", driver.volume, ", ".join(ok))


async def _repair(driver: StorageDriver, since: int, vdl: int, tails: dict[int, int],
                  best_node: dict[int, tuple[int, str]], rpc_timeout_s: float) -> int:
    """Make every record in (since, vdl] durable at Vw segments of its PG."""
    if vdl <= since:
        return 0
    chunks: dict[int, list[bytes]] = {}   # pg -> packed records, one FetchRecords answer each
    count = 0
    for pg, (scl, name) in best_node.items():
        if tails.get(pg, 0) <= since:
            continue  # no record of this PG in (since, vdl]
        after = since
        while True:  # an answer holds at most max_bytes (4 MiB by default): page through
            reply = await driver.stub(name).FetchRecords(
                pb.FetchRecordsRequest(volume=driver.volume, pg=pg, after_lsn=after, upto_lsn=vdl,
                                       volume_epoch=driver.epoch, sender=driver.instance),
                timeout_s=rpc_timeout_s)
            refs = scan_batch(reply.records)
            if refs:
                chunks.setdefault(pg, []).append(reply.records)
                count += len(refs)
                after = refs[-1][2]
            if not reply.more:
                break
            if not refs:
                raise RecoveryError(f"PG {pg}: FetchRecords after {after} made no progress")
    if not chunks:
        return 0
    best_scl: dict[tuple[str, int], int] = {}      # (node, pg) -> highest SCL acked
    results: dict = {}
    for i in range(max(len(c) for c in chunks.values())):  # the i-th answer of every PG
        def request(name: str) -> pb.AppendRequest:   # the PGs placed on ``name`` only
            return pb.AppendRequest(
                volume=driver.volume, volume_epoch=driver.epoch, writer_vdl=since,
                batches=[pb.PgBatch(pg=pg, membership_epoch=driver.membership_epoch(pg),
                                    records=c[i])
                         for pg, c in chunks.items() if i < len(c) and name in driver.members(pg)],
                sender=driver.instance)
        hosts = [n for n in driver.node_names
                 if any(i < len(c) and n in driver.members(pg) for pg, c in chunks.items())]
        results = await gather_per_node(
            driver, lambda name, stub: stub.Append(request(name), timeout_s=rpc_timeout_s),
            rpc_timeout_s, hosts)
        for name, reply in results.items():
            if not isinstance(reply, RpcError):
                for ack in reply.acks:
                    best_scl[(name, ack.pg)] = max(best_scl.get((name, ack.pg), 0), ack.scl)
    for pg in chunks:
        complete = sum(1 for name in driver.members(pg)
                       if best_scl.get((name, pg), 0) >= tails.get(pg, 0))
        if complete < VW:
            raise RecoveryError(
                f"repair of PG {pg} reached {complete} of {VW} segments "
                f"({_describe_errors(results)})")
    return count
