"""The write path of a storage node: ``Store.apply_ops`` and what each op does.

``apply_ops`` runs a list of ops (storage_node/ops.py) in ONE LMDB write transaction,
commits it with sync and only then publishes the new state to the in-memory mirrors
(invariant 3; the group commit of storage_node/commit.py calls it). Each ``_op_*``
validates before it writes, so a refused op changes nothing. A mixin of
``storage_node.store.Store``; it leans on the log-run, page-index and chain mixins
(storage_node/runs.py, pageindex.py, chain.py). It changes when a state transition
changes.

State transitions and the functions that make them (all inside ``apply_ops``):

    CreateVolumeOp   volumes + one segments row per PG          _op_create_volume
    AppendOp         a log run (or a merge with the runs it      _op_append
                     overlaps) + a pagedelta row (or pageidx
                     rows), SCL walk, max_lsn,
                     writer_vdl; repairs clear quarantine rows
    TruncateOp       a truncation range + epoch, or (backtrack,   _op_truncate
                     recovery) a whole new truncation set that
                     replaces the old one plus a history row;
                     SCL recomputed from the lowest changed
                     LSN; writer_vdl lowered out of any range
                     (or set to a backtrack's target)
    DropVolumeOp     mark a volume dropped (clones keep reading   _op_drop_volume
                     its segments; nothing is deleted)
    AdoptEpochOp     a higher epoch (fencing) and a peer's       _op_adopt_epoch
                     truncation set if its epoch is higher
                     (gossip; replaces, never merges)
    SetGcHorizonOp   gc_horizon = max(old, new)                  _op_set_gc_horizon
    AdoptMembershipOp  membership_epoch = max(old, new); a lower  _op_adopt_membership
                     one is refused (invariant 16)
    HydrateOp        a hydrated segment: SCL and log_floor := the  _op_hydrate
                     anchor its page versions are as of, then the
                     SCL walk (docs/membership.md)
    PutVersionsOp    versions rows from the coalescer / repair   _op_put_versions
    GcStepOp         delete records and versions no read point   _op_gc_step
                     >= horizon needs (invariant 12)
    FoldIndexOp      a segment's pagedelta rows into pageidx     _op_fold_index
    QuarantineOp     move bad bytes out of log / versions into   _op_quarantine
                     quarantine (invariant 13); a run with a bad
                     directory: every LSN indexed in its range
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

from engine.format.volume import VolumeLayout
from storage_node.errors import (
    CorruptError, MalformedError, ReadPointBelowGcError, StaleEpochError, StorageError,
    UnknownSegmentError, UnknownVolumeError)
from storage_node.layout import (
    BE32, BE64, HISTORY, KIND_RECORD, KIND_VERSION, LOG_KEY, PAGE_LSN, TRUNC, U32, U64,
    SegMeta, VolumeInfo, in_truncation, seg_prefix, trunc_epoch)
from storage_node.ops import (
    AdoptEpochOp, AdoptMembershipOp, AppendOp, HydrateOp, CreateVolumeOp, DropVolumeOp, FoldIndexOp, GcStepOp, PutVersionsOp,
    QuarantineOp, SetGcHorizonOp, TruncateOp, verify_stored_page, verify_stored_record)
from storage_node.runs import decode_run, get_record, run_key_lsn


class WriteTxn:
    """Per-write-transaction scratch state: cursors, metadata copies, post-commit work."""

    def __init__(self, store, txn) -> None:
        self.store = store
        self.txn = txn
        self.log_cur = txn.cursor(db=store.db_log)
        self.idx_cur = txn.cursor(db=store.db_pageidx)
        self.metas: dict[tuple, SegMeta] = {}
        #: Page-index groups to write at the end of the transaction, per segment:
        #: {key: (prefix, max_lsn before this txn, {page_id: [lsn]}, order)}, where
        #: order = [every batch so far ascending and above the ones before, highest LSN].
        self.idx_pending: dict[tuple, tuple] = {}
        self.new_volumes: dict[str, VolumeInfo] = {}
        self.dirty: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.reset_dirty: set = set()
        self.quar_add: list = []  # (key, kind, item)
        self.quar_del: list = []
        self.bytes_written = 0
        self.repairs = 0
        self.deltas: dict[tuple, int] = {}  # segment -> page-index deltas after this txn

    def meta(self, key: tuple) -> SegMeta:
        m = self.metas.get(key)
        if m is None:
            stored = self.store._segs.get(key)
            if stored is None:   # a PG not placed on this node (invariant 15): refused
                raise UnknownSegmentError(f"PG {key[1]} of volume {key[0]!r} is not placed on "
                                          f"this node")
            m = self.metas[key] = stored.copy()
        return m


class Writes:
    """``apply_ops`` and the op handlers (mixin of Store; see the module doc)."""

    def apply_ops(self, ops: list) -> list:
        """Run ``ops`` in one LMDB write transaction, commit with sync, return per-op results.

        A result is the op's return value or the StorageError that refused it; a refused
        op changed nothing (every op validates before it writes). Any other exception
        aborts the whole transaction and propagates: nothing of it is stored.
        """
        results: list = [None] * len(ops)
        with self.env.begin(write=True) as txn:
            ctx = WriteTxn(self, txn)
            for i, op in enumerate(ops):
                if ctx.idx_pending and type(op) is not AppendOp:
                    self._flush_index(ctx)  # GC and others see the index complete
                try:
                    results[i] = self._dispatch[type(op)](self, ctx, op)
                except StorageError as exc:
                    results[i] = exc
            self._flush_index(ctx)
            for key, m in ctx.metas.items():
                prefix = seg_prefix(self._vol_of(ctx, key[0]).vol_id, key[1])
                value = m.encode()
                txn.put(prefix, value, db=self.db_segments)
                ctx.bytes_written += len(prefix) + len(value)
            for i, op in enumerate(ops):  # acks carry the SCL after the whole commit
                if isinstance(op, AppendOp) and isinstance(results[i], dict):
                    results[i] = {pg: ctx.metas[(op.volume, pg)].scl for pg in results[i]}
        # Committed and synced: publish the new state to the in-memory mirrors.
        self._publish(ctx)
        return results

    def _hosts(self, ctx, volume: str, pg: int) -> bool:
        """True if this node holds a segment of ``volume``'s ``pg`` (committed or in ctx)."""
        return (volume, pg) in ctx.metas or (volume, pg) in self._segs

    def _volume_epoch(self, ctx, volume: str) -> int:
        """The highest volume epoch among this node's segments of ``volume``."""
        return max((ctx.meta(k).volume_epoch for k in list(self._segs) + list(ctx.metas)
                    if k[0] == volume), default=0)

    def _vol_of(self, ctx, name: str) -> VolumeInfo:
        info = ctx.new_volumes.get(name) or self._volumes.get(name)
        if info is None:
            raise UnknownVolumeError(f"unknown volume {name!r}")
        return info

    def _publish(self, ctx) -> None:
        if ctx.new_volumes:
            volumes = dict(self._volumes)
            by_id = dict(self._by_id)
            for info in ctx.new_volumes.values():
                volumes[info.name] = info
                by_id[info.vol_id] = info
            self._volumes, self._by_id = volumes, by_id
        new_keys = [k for k in ctx.metas if k not in self._segs]
        if new_keys:
            segs = dict(self._segs)
            segs.update(ctx.metas)
            qr = dict(self._quar_records)
            qv = dict(self._quar_versions)
            for k in new_keys:
                qr[k] = frozenset()
                qv[k] = frozenset()
            self._quar_records, self._quar_versions = qr, qv
            self._segs = segs
        else:
            self._segs.update(ctx.metas)
        for key, kind, item in ctx.quar_add:
            if kind == KIND_RECORD:
                self._quar_records[key] = self._quar_records[key] | {item}
            else:
                self._quar_versions[key] = self._quar_versions[key] | {item}
        for key, kind, item in ctx.quar_del:
            if kind == KIND_RECORD:
                self._quar_records[key] = self._quar_records[key] - {item}
            else:
                self._quar_versions[key] = self._quar_versions[key] - {item}
                self._peer_pages.discard((key, item[0], item[1]))
        with self._dirty_lock:
            for key in ctx.reset_dirty:
                self._dirty[key] = {}
            for key, pages in ctx.dirty.items():
                target = self._dirty.setdefault(key, {})
                for p, n in pages.items():
                    target[p] = target.get(p, 0) + n
        self.needs_sweep |= ctx.reset_dirty
        self._deltas.update(ctx.deltas)
        self.lmdb_bytes_written += ctx.bytes_written
        self.write_txns += 1
        self.scrub_repairs += ctx.repairs

    def _op_create_volume(self, ctx, op: CreateVolumeOp):
        if op.pg_count < 1 or op.stripe_pages < 1:
            raise MalformedError(f"CreateVolume {op.volume!r}: pg_count and stripe_pages must be >= 1")
        if not op.volume:
            raise MalformedError("CreateVolume: empty volume name")
        try:
            layout = VolumeLayout(op.pg_count, op.stripe_pages, op.pg_pages, op.stripe_width)
        except ValueError as exc:
            raise MalformedError(f"CreateVolume {op.volume!r}: {exc}") from None
        # The segments placed on this node (a fleet, docs/fleet.md; invariant 15): only
        # these get a row, so only these take appends, gossip and GC. () = every PG.
        hosted = tuple(op.pgs) or tuple(range(op.pg_count))
        if any(not 0 <= pg < op.pg_count for pg in hosted):
            raise MalformedError(f"CreateVolume {op.volume!r}: pgs {list(op.pgs)} outside "
                                 f"0..{op.pg_count - 1}")
        parent = None
        if op.parent:
            parent = self._vol_of(ctx, op.parent)
            if parent.layout != layout:
                raise MalformedError(
                    f"CreateVolume {op.volume!r}: a clone has its parent's layout {parent.layout}")
        existing = ctx.new_volumes.get(op.volume) or self._volumes.get(op.volume)
        if existing is not None:
            if existing.layout != layout:
                raise MalformedError(
                    f"CreateVolume {op.volume!r}: exists with layout {existing.layout}, "
                    f"asked for pg_count={op.pg_count} stripe_pages={op.stripe_pages}")
            if parent is not None and (existing.parent_id, existing.fork_lsn) != (
                    parent.vol_id, op.fork_lsn):
                raise MalformedError(
                    f"CreateVolume {op.volume!r}: a volume of that name already exists "
                    f"(not a clone of {op.parent!r} at LSN {op.fork_lsn})")
            missing = [pg for pg in hosted if not self._hosts(ctx, op.volume, pg)]
            if not missing or parent is not None:
                return False
            fork = existing.fork_lsn
            if existing.parent_id:
                # A clone grows too, by PGs its parent had no record of at the fork: they
                # start complete up to the fork, like its first segments.
                inherited = [pg for pg in missing if existing.fork_tails[pg]]
                if inherited:
                    raise MalformedError(f"CreateVolume {op.volume!r}: PGs {inherited} of a clone "
                                         f"come with the clone's creation (its parent has records)")
            epoch = self._volume_epoch(ctx, op.volume) or op.epoch
            for pg in missing:   # a PG newly placed on this node: an empty segment (growth)
                ctx.metas[(op.volume, pg)] = SegMeta(scl=fork, volume_epoch=epoch, writer_vdl=fork,
                                                     max_lsn=fork, log_floor=fork)
            self.log.info("volume %r: segments of PGs %s added", op.volume, missing)
            return True
        inherited: tuple = ()
        if parent is not None:
            if op.fork_lsn < 1:
                raise MalformedError(f"CreateVolume {op.volume!r}: a clone needs a fork LSN >= 1")
            if len(op.fork_tails) != op.pg_count or any(t > op.fork_lsn for t in op.fork_tails):
                raise MalformedError(f"CreateVolume {op.volume!r}: a clone needs one fork tail "
                                     f"<= the fork LSN per PG ({op.pg_count})")
            absent = [pg for pg in hosted if not self._hosts(ctx, parent.name, pg)]
            if absent:
                raise MalformedError(f"CreateVolume {op.volume!r}: a clone's segments sit on "
                                     f"its parent's; PGs {absent} of {parent.name!r} are not here")
            metas = [ctx.meta((parent.name, pg)) for pg in hosted]
            horizon = max(m.gc_horizon for m in metas)
            if horizon > op.fork_lsn:
                raise ReadPointBelowGcError(
                    f"CreateVolume {op.volume!r}: fork LSN {op.fork_lsn} is below the GC horizon "
                    f"{horizon} of {parent.name!r}; pages as of it may be gone")
            # The parent's set at the fork: every PG holds the same set once gossip settles;
            # take the newest this node has, restricted to what lies at or below the fork.
            newest = max((m.truncs for m in metas), key=trunc_epoch)
            inherited = tuple(t for t in newest if t[0] < op.fork_lsn)
        txn = ctx.txn
        vol_id = U32.unpack(txn.get(b"next_vol_id", db=self.db_node))[0]
        txn.put(b"next_vol_id", U32.pack(vol_id + 1), db=self.db_node)
        info = VolumeInfo(op.volume, vol_id, layout, op.epoch,
                          parent.vol_id if parent else 0, op.fork_lsn if parent else 0, False,
                          tuple(sorted(set(inherited))),
                          tuple(op.fork_tails) if parent else ())
        txn.put(op.volume.encode(), info.encode(), db=self.db_volumes)
        ctx.new_volumes[op.volume] = info
        fork = info.fork_lsn
        for pg in hosted:
            # A clone's segments start complete up to the fork: its first records link to it.
            ctx.metas[(op.volume, pg)] = SegMeta(scl=fork, volume_epoch=op.epoch, writer_vdl=fork,
                                                 max_lsn=fork, log_floor=fork)
        if parent is not None:
            self.log.info("created volume %r: a clone of %r as of LSN %d, %d PGs, epoch %d",
                          op.volume, parent.name, fork, op.pg_count, op.epoch)
        else:
            self.log.info("created volume %r: %d PGs of stripe %d at epoch %d",
                          op.volume, op.pg_count, op.stripe_pages, op.epoch)
        return True

    def _op_drop_volume(self, ctx, op: DropVolumeOp):
        info = self._vol_of(ctx, op.volume)
        if info.dropped:
            return False
        info = replace(info, dropped=True)
        ctx.txn.put(op.volume.encode(), info.encode(), db=self.db_volumes)
        ctx.new_volumes[op.volume] = info
        self.log.info("volume %r dropped (its segments stay while clones read them)", op.volume)
        return True

    def _op_append(self, ctx, op: AppendOp):
        info = self._vol_of(ctx, op.volume)
        if info.dropped and op.epoch:
            raise UnknownVolumeError(f"volume {op.volume!r} was dropped")
        # Validate everything before writing anything: a refused request stores nothing.
        for pg, membership_epoch, *_rest in op.batches:
            if not 0 <= pg < info.layout.pg_count:
                raise MalformedError(f"volume {op.volume!r} has no pg {pg}")
            if not self._hosts(ctx, op.volume, pg):
                raise UnknownSegmentError(f"Append: PG {pg} of {op.volume!r} is not placed on "
                                          f"this node")
            m = ctx.meta((op.volume, pg))
            if op.epoch:
                self._check_epoch(m, op.epoch, "Append", (op.volume, pg))
                self._check_membership(m, membership_epoch, "Append", (op.volume, pg))
        touched: dict[int, list] = {}
        for batch in op.batches:
            pg, membership_epoch, buf, run, pages, scan = batch
            key = (op.volume, pg)
            m = ctx.meta(key)
            new = touched.setdefault(pg, [])
            if not scan.count:
                continue
            new.append(batch)
            prefix = seg_prefix(info.vol_id, pg)
            if scan.ascending and (scan.first_lsn > m.max_lsn or not self._run_overlaps(
                    ctx, prefix, scan.first_lsn, scan.last_lsn)):
                # The usual case: above everything stored, or in a gap between runs.
                ctx.txn.put(prefix + BE64.pack(scan.last_lsn), run, db=self.db_log)
                added = scan.count
                ctx.bytes_written += len(run) + LOG_KEY.size
            else:  # a retransmit, or gossip/repair filling holes among stored records
                added = self._merge_into_log(ctx, prefix, decode_run(run))
            pending = ctx.idx_pending.get(key)
            if pending is None:
                pending = ctx.idx_pending[key] = (seg_prefix(info.vol_id, pg), m.max_lsn, {},
                                                  [True, m.max_lsn])
            index = pending[2]
            order = pending[3]
            if not scan.ascending or scan.first_lsn <= order[1]:
                order[0] = False
            order[1] = max(order[1], scan.max_lsn)
            for page_id, lsns in pages.items():
                have = index.get(page_id)
                if have is None:
                    index[page_id] = list(lsns)
                else:
                    have.extend(lsns)
            m.n_records += added
            quarantined = self._quar_records.get(key)
            if quarantined:
                prefix = seg_prefix(info.vol_id, pg)
                for lsn in batch.lsns():
                    if lsn in quarantined:
                        ctx.txn.delete(prefix + KIND_RECORD + BE64.pack(lsn), db=self.db_quarantine)
                        ctx.quar_del.append((key, KIND_RECORD, lsn))
                        ctx.repairs += 1
                        self.log.warning("repaired quarantined record %s/%d lsn %d (%s)",
                                         op.volume, pg, lsn, op.source)
            if scan.max_lsn > m.max_lsn:
                m.max_lsn = scan.max_lsn
            if membership_epoch > m.membership_epoch:
                m.membership_epoch = membership_epoch
            if op.writer_vdl > m.writer_vdl:
                m.writer_vdl = op.writer_vdl
        for pg, new in touched.items():
            self._advance_scl(ctx, (op.volume, pg), seg_prefix(info.vol_id, pg), new)
        return {pg: 0 for pg in touched}

    def _op_fold_index(self, ctx, op: "FoldIndexOp"):
        info = self._vol_of(ctx, op.volume)
        ctx.meta((op.volume, op.pg))  # the segment must exist
        return self._fold_deltas(ctx, (op.volume, op.pg), seg_prefix(info.vol_id, op.pg),
                                 op.max_deltas)

    def _op_truncate(self, ctx, op: TruncateOp):
        info = self._vol_of(ctx, op.volume)
        if not 0 <= op.pg < info.layout.pg_count:
            raise MalformedError(f"volume {op.volume!r} has no pg {op.pg}")
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if op.epoch < m.volume_epoch:
            raise StaleEpochError(
                f"Truncate: epoch {op.epoch} is stale; segment {op.volume}/{op.pg} is at epoch "
                f"{m.volume_epoch}", m.volume_epoch)
        self._check_membership(m, op.membership_epoch, "Truncate", key)
        prefix = seg_prefix(info.vol_id, op.pg)
        if op.replace is None:
            if op.end_lsn <= op.start_lsn:
                raise MalformedError(f"Truncate: empty range ({op.start_lsn}, {op.end_lsn}]")
            self._add_truncation(ctx, key, prefix, op.start_lsn, op.end_lsn, op.epoch)
        else:
            for start, end, epoch in op.replace:
                if end <= start or epoch > op.epoch:
                    raise MalformedError(
                        f"Truncate: bad range ({start}, {end}] of epoch {epoch} in a set of "
                        f"epoch {op.epoch}")
            if trunc_epoch(op.replace) != op.epoch:
                raise MalformedError(f"Truncate: a new truncation set must hold a range of its "
                                     f"epoch {op.epoch}")
            if op.epoch > trunc_epoch(m.truncs) or set(op.replace) != set(m.truncs):
                self._change_truncations(ctx, key, prefix, op.replace)
            if op.set_writer_vdl:
                # A backtrack target is a commit at or below the VDL of its timeline, so
                # everything visible at or below it is durable: recovery starts there
                # instead of re-walking (and re-appending) what a forward backtrack uncovered.
                m.writer_vdl = op.set_writer_vdl
            hist_key = BE32.pack(info.vol_id) + BE64.pack(op.epoch)
            ctx.txn.put(hist_key, HISTORY.pack(op.time_us, op.prev_vdl, len(op.replace))
                        + b"".join(TRUNC.pack(*t) for t in sorted(op.replace)),
                        db=self.db_history)
        m.volume_epoch = max(m.volume_epoch, op.epoch)
        return m.scl

    def _op_adopt_epoch(self, ctx, op: AdoptEpochOp):
        info = self._vol_of(ctx, op.volume)
        if not 0 <= op.pg < info.layout.pg_count:
            raise MalformedError(f"volume {op.volume!r} has no pg {op.pg}")
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if op.reject_stale and op.epoch < m.volume_epoch:
            raise StaleEpochError(
                f"SegmentState(fence): epoch {op.epoch} is stale; segment {op.volume}/{op.pg} "
                f"is at epoch {m.volume_epoch}", m.volume_epoch)
        if op.epoch < m.volume_epoch and not op.truncs:
            return m.volume_epoch
        prefix = seg_prefix(info.vol_id, op.pg)
        if op.truncs:
            # A peer's set: a newer one replaces ours whole (a backtrack may have removed a
            # range); one of the same epoch can only add ranges (older single-range adds).
            theirs, ours = trunc_epoch(op.truncs), trunc_epoch(m.truncs)
            if theirs > ours:
                self._change_truncations(ctx, key, prefix, op.truncs)
            elif theirs == ours and not set(op.truncs) <= set(m.truncs):
                self._change_truncations(ctx, key, prefix, tuple(set(m.truncs) | set(op.truncs)))
        if op.epoch > m.volume_epoch:
            self.log.info("segment %s/%d: adopting epoch %d (was %d)", op.volume, op.pg,
                          op.epoch, m.volume_epoch)
            m.volume_epoch = op.epoch
        return m.volume_epoch

    def _op_set_gc_horizon(self, ctx, op: SetGcHorizonOp):
        info = self._vol_of(ctx, op.volume)
        metas = [ctx.meta((op.volume, pg)) for pg in range(info.layout.pg_count)
                 if self._hosts(ctx, op.volume, pg)]
        if not metas:
            raise UnknownSegmentError(f"SetGcHorizon: no segment of {op.volume!r} on this node")
        top = max(m.volume_epoch for m in metas)
        if op.epoch < top:
            raise StaleEpochError(
                f"SetGcHorizon: epoch {op.epoch} is stale; volume {op.volume!r} is at epoch {top}", top)
        for m in metas:
            if op.horizon > m.gc_horizon:
                m.gc_horizon = op.horizon
        return max(m.gc_horizon for m in metas)

    def _op_adopt_membership(self, ctx, op: AdoptMembershipOp):
        info = self._vol_of(ctx, op.volume)
        if not 0 <= op.pg < info.layout.pg_count:
            raise MalformedError(f"volume {op.volume!r} has no pg {op.pg}")
        m = ctx.meta((op.volume, op.pg))
        self._check_membership(m, op.membership_epoch, "SetMembership", (op.volume, op.pg))
        if op.membership_epoch > m.membership_epoch:
            self.log.info("segment %s/%d: membership epoch %d -> %d", op.volume, op.pg,
                          m.membership_epoch, op.membership_epoch)
            m.membership_epoch = op.membership_epoch
        return m.membership_epoch

    def _op_hydrate(self, ctx, op: HydrateOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if m.generation != op.generation or in_truncation(op.anchor, m.truncs):
            return m.scl  # a truncation since the fetch: the next gossip round starts again
        if op.gc_horizon > m.gc_horizon:
            m.gc_horizon = op.gc_horizon
        if op.anchor > m.scl:
            # Every page of the PG is here as of the anchor (its versions were stored by the
            # PutVersionsOps before this one), so the segment holds the PG's chain up to it;
            # the log below it stays absent for good (log_floor), as on a peer after GC.
            self.log.info("segment %s/%d hydrated: SCL %d -> %d (log_floor %d)", op.volume,
                          op.pg, m.scl, op.anchor, op.anchor)
            m.scl = op.anchor
            if op.anchor > m.log_floor:
                m.log_floor = op.anchor
            if op.anchor > m.max_lsn:
                m.max_lsn = op.anchor
            if op.anchor > m.gc_done:
                m.gc_done = op.anchor
            self._advance_scl(ctx, key, seg_prefix(info.vol_id, op.pg))
            ctx.reset_dirty.add(key)
        return m.scl

    def _put_version(self, ctx, key: tuple, prefix: bytes, m: SegMeta, page_id: int,
                     lsn: int, image: bytes) -> bool:
        assert verify_stored_page(page_id, lsn, image), "a page version must verify before it is stored"
        if in_truncation(lsn, m.truncs):
            return False
        added = ctx.txn.put(prefix + PAGE_LSN.pack(page_id, lsn), image, db=self.db_versions,
                            overwrite=False)
        if added:
            m.n_versions += 1
            ctx.bytes_written += 20 + len(image)
        if (page_id, lsn) in self._quar_versions.get(key, ()):
            ctx.txn.delete(prefix + KIND_VERSION + PAGE_LSN.pack(page_id, lsn), db=self.db_quarantine)
            ctx.quar_del.append((key, KIND_VERSION, (page_id, lsn)))
            ctx.repairs += 1
        return added

    def _op_put_versions(self, ctx, op: PutVersionsOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if m.generation != op.generation:
            return 0  # a truncation happened since the plan: the versions may be wrong
        prefix = seg_prefix(info.vol_id, op.pg)
        n = 0
        for page_id, lsn, image in op.versions:
            n += self._put_version(ctx, key, prefix, m, page_id, lsn, image)
        for page_id, lsn in op.clears:
            if (page_id, lsn) in self._quar_versions.get(key, ()) and \
                    (key, KIND_VERSION, (page_id, lsn)) not in ctx.quar_del:
                ctx.txn.delete(prefix + KIND_VERSION + PAGE_LSN.pack(page_id, lsn), db=self.db_quarantine)
                ctx.quar_del.append((key, KIND_VERSION, (page_id, lsn)))
                ctx.repairs += 1
        for lsn in op.superseded:
            if lsn in self._quar_records.get(key, ()) and \
                    (key, KIND_RECORD, lsn) not in ctx.quar_del:
                ctx.txn.delete(prefix + KIND_RECORD + BE64.pack(lsn), db=self.db_quarantine)
                ctx.quar_del.append((key, KIND_RECORD, lsn))
                ctx.repairs += 1
                self.log.warning("repaired quarantined record %s/%d lsn %d: no peer holds it any "
                                 "more; its page is restored from a peer's version at or above it",
                                 op.volume, op.pg, lsn)
        return n

    def _op_gc_step(self, ctx, op: GcStepOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if m.generation != op.generation:
            return 0
        prefix = seg_prefix(info.vol_id, op.pg)
        self._fold_deltas(ctx, key, prefix)  # _unindex edits page groups only
        for page_id, lsn, image in op.put_versions:
            self._put_version(ctx, key, prefix, m, page_id, lsn, image)
        removed = 0
        unindex: dict[int, set] = {}
        gone = self._delete_records(ctx, prefix, [lsn for _page_id, lsn in op.delete_records])
        m.n_records -= len(gone)
        removed += len(gone)
        for page_id, lsn in op.delete_records:
            unindex.setdefault(page_id, set()).add(lsn)
        for page_id, dels in unindex.items():
            self._unindex(ctx, prefix, page_id, dels)
        for page_id, lsn in op.delete_versions:
            if ctx.txn.delete(prefix + PAGE_LSN.pack(page_id, lsn), db=self.db_versions):
                m.n_versions -= 1
                removed += 1
        if op.log_floor > m.log_floor:
            m.log_floor = op.log_floor
        if op.done_horizon > m.gc_done:
            m.gc_done = op.done_horizon
        return removed

    def _op_quarantine(self, ctx, op: QuarantineOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        prefix = seg_prefix(info.vol_id, op.pg)
        now = U64.pack(int(time.time()))
        found = 0
        records = set(op.records)
        cur = ctx.log_cur
        for run_last in op.runs:
            # A run whose directory is bad: none of its records can be located, so every
            # LSN the page index lists in its range is quarantined and refetched.
            k = prefix + BE64.pack(run_last)
            value = ctx.txn.get(k, db=self.db_log)
            if value is None:
                continue
            try:
                decode_run(value)
                continue  # rewritten meanwhile
            except CorruptError:
                pass
            low = 0
            if cur.set_key(k) and cur.prev() and cur.key()[:8] == prefix:
                low = run_key_lsn(cur.key())
            already = self._quar_records.get(key, frozenset())
            lost = [lsn for lsn in self._indexed_lsns(ctx.txn, prefix, low, run_last)
                    if lsn not in already]
            ctx.txn.delete(k, db=self.db_log)
            m.n_records -= len(lost)
            for lsn in lost:
                records.discard(lsn)
                self._quarantine_record(ctx, key, prefix, lsn, now)
            found += 1
            self.log.error("scrub: log run %s/%d (%d, %d] failed its directory checksum; its %d "
                           "records are quarantined, will refetch from a peer", op.volume, op.pg,
                           low, run_last, len(lost))
        bad = []
        for lsn in sorted(records):
            try:
                rec = get_record(cur, prefix, lsn)
            except CorruptError:
                continue  # its run is bad: a runs entry handles it
            if rec is not None and not verify_stored_record(lsn, rec):
                bad.append(lsn)
        gone = self._delete_records(ctx, prefix, bad)
        m.n_records -= len(gone)
        for lsn, _rec in gone:
            self._quarantine_record(ctx, key, prefix, lsn, now)
            found += 1
            self.log.error("scrub: record %s/%d lsn %d failed its checksum; quarantined, "
                           "will refetch from a peer", op.volume, op.pg, lsn)
        for page_id, lsn in op.versions:
            vk = prefix + PAGE_LSN.pack(page_id, lsn)
            value = ctx.txn.get(vk, db=self.db_versions)
            if value is None or verify_stored_page(page_id, lsn, value):
                continue
            ctx.txn.delete(vk, db=self.db_versions)
            m.n_versions -= 1
            ctx.txn.put(prefix + KIND_VERSION + PAGE_LSN.pack(page_id, lsn), now, db=self.db_quarantine)
            ctx.quar_add.append((key, KIND_VERSION, (page_id, lsn)))
            found += 1
            self.log.error("scrub: page version %s/%d page %d lsn %d failed its checksum; "
                           "quarantined, will rebuild", op.volume, op.pg, page_id, lsn)
        return found

    def _quarantine_record(self, ctx, key: tuple, prefix: bytes, lsn: int, now: bytes) -> None:
        ctx.txn.put(prefix + KIND_RECORD + BE64.pack(lsn), now, db=self.db_quarantine)
        ctx.quar_add.append((key, KIND_RECORD, lsn))

    _dispatch = {
        CreateVolumeOp: _op_create_volume,
        AppendOp: _op_append,
        TruncateOp: _op_truncate,
        DropVolumeOp: _op_drop_volume,
        AdoptEpochOp: _op_adopt_epoch,
        SetGcHorizonOp: _op_set_gc_horizon,
        AdoptMembershipOp: _op_adopt_membership,
        HydrateOp: _op_hydrate,
        PutVersionsOp: _op_put_versions,
        GcStepOp: _op_gc_step,
        QuarantineOp: _op_quarantine,
        FoldIndexOp: _op_fold_index,
    }
