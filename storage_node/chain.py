"""The segment chain: SCL advance (invariant 4) and changes of the truncation set.

A mixin of ``storage_node.store.Store`` used inside a write transaction
(storage_node/writes.py): after an Append, a truncation or an adopted set, the SCL is
walked along the PG backlink chain of the stored log. It changes when the SCL rule or
the rule for truncation sets changes.

The SCL rule (invariant 4): starting from the persisted SCL, look at the next stored record
above it that is not inside a truncation range (a chained run that links to the SCL and
no range touches is taken whole, in one step). If its ``prev_pg_lsn`` equals the SCL, the
SCL moves to its LSN and the walk repeats; otherwise there is a hole and the SCL stays
until the missing record arrives (retransmit or gossip). Example: SCL 10, stored 14 (prev
12) and 16 (prev 14): the next record 14 does not link to 10, so SCL stays 10; when 12
(prev 10) arrives the walk goes 12, 14, 16 and SCL becomes 16.
"""

from __future__ import annotations

import bisect

from engine.errors import InvariantViolation
from engine.format.redo import LSN_MAX
from storage_node.errors import CorruptError
from storage_node.layout import (
    BE64, KIND_RUN, KIND_VERSION, PAGE_LSN, REC_PAGE, REC_PREV_PG, U32, U64, in_truncation,
    lowest_difference, overlaps_truncation, range_of, trunc_epoch)
from storage_node.runs import RUN_CHAINED, decode_run, run_key_lsn, visible_down


def first_lsn_of(batch) -> int:
    return batch.scan.first_lsn


class Chain:
    """SCL walk and truncation-set changes inside ``Store.apply_ops`` (mixin of Store)."""

    def _advance_scl(self, ctx, key: tuple, prefix: bytes, new: list = ()) -> None:
        """Follow the segment backlink chain from the SCL as far as it goes (invariant 4).

        ``new``: VerifiedBatches just stored. Fast path: a batch that is one piece of the
        chain (scan.chained) and links to the SCL moves the SCL to its last record with no
        LMDB read and no per-record work, unless a truncation range covers part of it.
        Then, and for anything else (holes, out-of-order batches, retransmits), the walk
        follows the stored log with a cursor; one seek tells whether anything stored
        earlier lies beyond.
        """
        # BEGIN LAB 2: the SCL walk: from m.scl follow stored records whose prev_pg_lsn links to the SCL, skipping truncation ranges; count dirty pages; set m.scl
        m = ctx.meta(key)
        scl = m.scl
        truncs = m.truncs
        dirty = ctx.dirty[key]
        if new:
            if len(new) > 1:
                new.sort(key=first_lsn_of)
            for batch in new:
                scan = batch.scan
                if not scan.chained or scan.first_prev_pg_lsn != scl:
                    break  # a hole, a retransmit or a stored record in between: the walk decides
                if truncs and overlaps_truncation(scan.first_lsn, scan.last_lsn, truncs):
                    break
                scl = scan.last_lsn
                for page_id, lsns in batch.pages.items():
                    dirty[page_id] += len(lsns)
        by_last = {batch.scan.last_lsn: batch for batch in new}
        cur = ctx.log_cur
        after = scl  # walked past: the SCL, or the end of a truncation range jumped over
        ok = cur.set_range(prefix + BE64.pack(scl + 1))
        while ok:
            k = cur.key()
            if k[:8] != prefix:
                break
            try:
                run = decode_run(cur.value())
            except CorruptError as exc:
                self.log.error("segment %s/%d: SCL walk stops at a bad log run (%s)", key[0],
                               key[1], exc)
                self.suspects.append((key, KIND_RUN, run_key_lsn(k)))
                break
            lsns = run.lsns
            value = run.value
            i = bisect.bisect_right(lsns, after) if lsns[0] <= after else 0
            if (i == 0 and run.flags & RUN_CHAINED
                    and U64.unpack_from(value, run.base + REC_PREV_PG)[0] == scl
                    and not (truncs and overlaps_truncation(lsns[0], lsns[-1], truncs))):
                # One piece of the chain linking to the SCL: take the whole run at once.
                scl = after = lsns[-1]
                batch = by_last.get(scl)
                if batch is not None and batch.scan.count == len(lsns):
                    for page_id, page_lsns in batch.pages.items():
                        dirty[page_id] += len(page_lsns)
                else:
                    base = run.base
                    dirty[U32.unpack_from(value, base + REC_PAGE)[0]] += 1
                    for end in run.ends[:-1]:
                        dirty[U32.unpack_from(value, base + end + REC_PAGE)[0]] += 1
                ok = cur.next()
                continue
            stop = jumped = False
            for j in range(i, len(lsns)):
                lsn = lsns[j]
                hidden = truncs and range_of(lsn, truncs)
                if hidden:  # jump over the whole range: a deep backtrack hides many records
                    if hidden[1] >= LSN_MAX:
                        stop = True
                    else:
                        after = hidden[1]
                        ok = cur.set_range(prefix + BE64.pack(after + 1))
                        jumped = True
                    break
                off = run.base + (run.ends[j - 1] if j else 0)
                if U64.unpack_from(value, off + REC_PREV_PG)[0] != scl:
                    stop = True  # a hole: the record linking to the SCL is missing
                    break
                scl = after = lsn
                dirty[U32.unpack_from(value, off + REC_PAGE)[0]] += 1
            if stop:
                break
            if not jumped:
                ok = cur.next()
        if scl < m.scl:  # not an assert: it must hold under python -O too
            raise InvariantViolation(4, f"segment {key[0]}/{key[1]}: the SCL walk ended at {scl}, "
                                        f"below the SCL {m.scl} it started from")
        m.scl = scl
        # END LAB 2

    def _chain_point_at_or_below(self, ctx, key: tuple, prefix: bytes, limit: int) -> int:
        """Highest visible record LSN <= limit (the chain point a truncation falls back to)."""
        m = ctx.meta(key)
        found = visible_down(ctx.log_cur, prefix, m.truncs, limit)
        quarantined = [q for q in self._quar_records.get(key, ()) if q <= limit
                       and not in_truncation(q, m.truncs)]
        if quarantined:
            found = max(found, max(quarantined))
        if found == 0 and m.log_floor <= limit:
            found = m.log_floor
        return found

    def _add_truncation(self, ctx, key: tuple, prefix: bytes, start: int, end: int,
                        epoch: int) -> bool:
        m = ctx.meta(key)
        if (start, end, epoch) in m.truncs:
            return False
        return self._change_truncations(ctx, key, prefix, m.truncs + ((start, end, epoch),))

    def _change_truncations(self, ctx, key: tuple, prefix: bytes, truncs) -> bool:
        """Make ``truncs`` the segment's truncation set: recompute the SCL from below the
        lowest LSN whose visibility changed and lower writer_vdl out of any range (a VDL
        inside a range belongs to a timeline that is no longer current). Page versions
        stay (see below). Cost: independent of how many records the new set hides or
        uncovers, apart from the SCL walk through uncovered ones."""
        m = ctx.meta(key)
        truncs = tuple(sorted(set(truncs), key=lambda t: (t[2], t[0])))
        low = lowest_difference(m.truncs, truncs)
        m.truncs = truncs
        m.volume_epoch = max(m.volume_epoch, trunc_epoch(truncs))
        if low is None:
            return False
        m.generation += 1
        if m.scl > low:
            m.scl = self._chain_point_at_or_below(ctx, key, prefix, low)
        self._advance_scl(ctx, key, prefix)
        for start, end, _epoch in truncs:
            if start < m.writer_vdl <= end:
                m.writer_vdl = start
        # Page versions stay: reads, coalescing and GC skip a version whose LSN a range
        # hides, and a version at a visible LSN is right on every timeline where that LSN
        # is visible (timelines share their history up to any LSN they both show: each
        # is an older one cut at its target, plus LSNs above everything allocated before).
        # Dropping them would cost time in proportion to what a backtrack hides.
        for item in self._quar_versions.get(key, ()):
            if item[1] > low:
                ctx.txn.delete(prefix + KIND_VERSION + PAGE_LSN.pack(*item), db=self.db_quarantine)
                ctx.quar_del.append((key, KIND_VERSION, item))
        ctx.reset_dirty.add(key)
        self.log.info("segment %s/%d: truncation set %s at epoch %d (changed above %d); SCL now "
                      "%d", key[0], key[1], [(t[0], t[1]) for t in truncs], trunc_epoch(truncs),
                      low, m.scl)
        return True
