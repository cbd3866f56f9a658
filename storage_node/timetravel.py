"""Time travel on a storage node: COMMIT records by time, timelines, a clone's shared bytes.

``find_commit`` maps a time (or an LSN bound) to a COMMIT record visible on a timeline,
continuing in the parent below a clone's fork; ``history`` lists the truncation sets
(timelines) this node recorded; ``volume_bytes`` splits a volume's bytes into its own and
those it shares with its ancestors (docs/clones.md). Read-only; a mixin of
``storage_node.store.Store``. It changes when time travel or clones change.
"""

from __future__ import annotations

import bisect
import itertools

from engine.format import page as pagefmt
from engine.format.redo import HEADER_SIZE, LSN_MAX
from storage_node.errors import CorruptError
from storage_node.layout import (
    BE32, BE64, HISTORY, REC_TYPE, RTYPE_COMMIT, TRUNC, U64, VolumeInfo, range_of, seg_prefix)
from storage_node.pageindex import group_lsns, group_of
from storage_node.runs import decode_run, get_record, run_key_lsn


class TimeTravelReads:
    """COMMIT lookup, timelines and clone space accounting (mixin of Store)."""

    def find_commit(self, volume: str, *, upto_lsn: int, max_time_us: int = 0,
                    after_lsn: int = 0, truncs=None, forward: bool = False) -> tuple[int, int]:
        """(lsn, timestamp_us) of a COMMIT record visible under ``truncs`` (default: the
        segment's own set) in (after_lsn, upto_lsn]: the newest one with timestamp <=
        max_time_us (0: any), or with ``forward`` the oldest one. (0, 0) if none.

        COMMIT records all change the META page, so they live in its PG; this walks that
        page's index (a linear walk: a real system would keep a time index). A clone
        continues in its parent (under the set it inherited) below the fork.
        """
        info = self.volume(volume)
        in_parent = info.parent_id and after_lsn < info.fork_lsn
        if forward and in_parent:
            found = self.find_commit(self._by_id[info.parent_id].name,
                                     upto_lsn=min(upto_lsn, info.fork_lsn), after_lsn=after_lsn,
                                     truncs=info.inherited, forward=True)
            if found[0]:
                return found
        found = self._find_commit_own(info, upto_lsn, max_time_us, after_lsn, truncs, forward)
        if found[0] or forward or not in_parent:
            return found
        return self.find_commit(self._by_id[info.parent_id].name,
                                upto_lsn=min(upto_lsn, info.fork_lsn), max_time_us=max_time_us,
                                after_lsn=after_lsn, truncs=info.inherited)

    def _find_commit_own(self, info: VolumeInfo, upto_lsn: int, max_time_us: int,
                         after_lsn: int, truncs, forward: bool) -> tuple[int, int]:
        pg = info.layout.pg_of(pagefmt.META_PAGE_ID)
        prefix = self._prefix(info.name, pg)   # UnknownSegmentError if not placed here
        base = prefix + BE32.pack(pagefmt.META_PAGE_ID)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            if truncs is None:
                truncs = m.truncs
                upto = min(upto_lsn, m.scl)
            else:  # another timeline: its records may lie above this timeline's SCL
                upto = min(upto_lsn, m.max_lsn)
            cur = txn.cursor(db=self.db_pageidx)
            log_cur = txn.cursor(db=self.db_log)
            # The META page's LSNs in page-index deltas: above all of its groups' LSNs.
            in_deltas = self._delta_lsns(txn, prefix, pagefmt.META_PAGE_ID, 0, LSN_MAX)
            low, high = after_lsn, upto
            while low < high:
                jumped = False
                if forward:
                    walk = itertools.chain(self._meta_lsns_up(cur, base, low),
                                           (lsn for lsn in in_deltas if lsn > low))
                else:
                    walk = itertools.chain((lsn for lsn in reversed(in_deltas) if lsn <= high),
                                           self._meta_lsns_down(cur, base, high))
                for lsn in walk:
                    if lsn <= low or lsn > high:
                        if forward and lsn > high or not forward and lsn <= low:
                            break
                        continue
                    hidden = range_of(lsn, truncs)
                    if hidden is not None:  # skip the whole range in one seek
                        if forward:
                            low = hidden[1]
                        else:
                            high = hidden[0]
                        jumped = True
                        break
                    rec = get_record(log_cur, prefix, lsn)
                    if rec is not None and rec[REC_TYPE] == RTYPE_COMMIT:
                        ts = U64.unpack_from(rec, HEADER_SIZE + 8)[0]
                        if forward or not max_time_us or ts <= max_time_us:
                            return lsn, ts
                if not jumped:
                    break
        return 0, 0

    @staticmethod
    def _meta_lsns_down(cur, base: bytes, high: int):
        """The META page's indexed LSNs <= high, newest first (page-index groups)."""
        positioned = cur.set_range(base + BE64.pack(high))
        ok = positioned and cur.key()[:12] == base
        if not ok:
            ok = cur.prev() if positioned else cur.last()
        while ok:
            k = cur.key()
            if k[:12] != base:
                return
            for lsn in reversed(group_lsns(group_of(k, cur.value()))):
                if lsn <= high:
                    yield lsn
            ok = cur.prev()

    @staticmethod
    def _meta_lsns_up(cur, base: bytes, low: int):
        """The META page's indexed LSNs > low, oldest first."""
        ok = cur.set_range(base + BE64.pack(low + 1))
        while ok:
            k = cur.key()
            if k[:12] != base:
                return
            for lsn in group_lsns(group_of(k, cur.value())):
                if lsn > low:
                    yield lsn
            ok = cur.next()

    def history(self, volume: str) -> list[tuple[int, int, int, tuple]]:
        """[(epoch, time_us, prev_vdl, truncation set)] of every truncation set this node
        recorded for the volume, oldest first: the timelines (``history`` rows,
        storage_node/layout.py)."""
        info = self.volume(volume)
        out = []
        base = BE32.pack(info.vol_id)
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_history)
            if cur.set_range(base):
                for k, v in cur.iternext():
                    if k[:4] != base:
                        break
                    time_us, prev_vdl, n = HISTORY.unpack_from(v, 0)
                    truncs = tuple(TRUNC.unpack_from(v, HISTORY.size + i * TRUNC.size)
                                   for i in range(n))
                    out.append((BE64.unpack_from(k, 4)[0], time_us, prev_vdl, truncs))
        return out

    def volume_bytes(self, volume: str) -> tuple[int, int]:
        """(owned, shared) bytes: the log and versions stored in this volume's own segments,
        and those of its ancestors' segments at or below the fork that it reads."""
        info = self.volume(volume)
        with self.env.begin() as txn:
            owned = self._segment_bytes(txn, info.vol_id, LSN_MAX)
            shared = 0
            child = info
            while child.parent_id:
                parent = self._by_id[child.parent_id]
                shared += self._segment_bytes(txn, parent.vol_id, child.fork_lsn)
                child = parent
        return owned, shared

    def _segment_bytes(self, txn, vol_id: int, upto: int) -> int:
        total = 0
        vol = BE32.pack(vol_id)
        cur = txn.cursor(db=self.db_log)
        if cur.set_range(vol):
            for k, v in cur.iternext():
                if k[:4] != vol:
                    break
                if run_key_lsn(k) <= upto:
                    total += len(k) + len(v)
                    continue
                try:
                    run = decode_run(v)
                except CorruptError:
                    continue
                below = bisect.bisect_right(run.lsns, upto)
                if below:  # the records at or below upto, and their share of the rest
                    total += run.ends[below - 1] + (len(k) + run.base) * below // len(run.lsns)
        cur = txn.cursor(db=self.db_versions)
        if cur.set_range(vol):
            for k, v in cur.iternext():
                if k[:4] != vol:
                    break
                if BE64.unpack_from(k, 12)[0] <= upto:
                    total += len(k) + len(v)
        return total
