"""The read path of a storage node: pages as of a read point, records, segment state.

``read_page`` materialises a page (ReadPage, invariant 8) from its newest good version and
the page's later records, through engine.materialiser; a clone's page with no version of
its own starts from its parent's as of the fork. ``fetch_records``, ``segment_state`` and
``next_stored_above`` serve gossip, recovery and the writer's state queries. Every method
opens its own read transaction (any thread) and never serves bytes that fail their
checksum (invariant 13): those go to ``self.suspects`` for the scrubber. A mixin of
``storage_node.store.Store``. It changes when the way a page or record is read changes.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import replace

from engine import materialiser
from engine.errors import ChecksumError, PageOrderError
from engine.format import page as pagefmt
from engine.format.redo import HEADER_SIZE, LSN_MAX
from storage_node.errors import (
    CorruptError, PageNotFoundError, ReadPointAboveSclError, ReadPointBelowGcError, WrongPgError)
from storage_node.layout import (
    BE32, BE64, KIND_RECORD, KIND_RUN, KIND_VERSION, PAGE_LSN, REC_FLAGS, REC_PREV_VOL, U64,
    SegMeta, in_truncation, lowest_difference, seg_prefix)
from storage_node.ops import verify_stored_page, verify_stored_record
from storage_node.runs import decode_run, records_up, run_key_lsn, visible_down

#: Upper bounds on one answer (TigerBeetle style: every batch has a limit).
FETCH_BYTES_DEFAULT = 4 << 20
FETCH_BYTES_MAX = 16 << 20
STATE_RECORDS_MAX = 65536
READ_VERSION_FALLBACKS = 3


class Reads:
    """Page materialisation and record reads (mixin of Store; see the module doc)."""

    def read_page(self, volume: str, pg: int, page_id: int, read_point: int,
                  epoch: int, min_scl: int = 0, membership_epoch: int = 0) -> tuple[bytes, int, int]:
        """(page bytes, page_lsn, scl): the page as of ``read_point`` (invariant 8).

        Newest materialised version <= read point plus the page's later records up to it,
        applied with engine.materialiser. Refuses read points above the SCL or below the GC
        horizon; never uses records under a truncation range; never serves bytes that fail
        their checksum (invariant 13).

        ``min_scl`` (ReadPageRequest.min_scl): the caller knows the PG has no record in
        (min_scl, read_point], so SCL >= min_scl suffices; the page is then built as of
        min(read_point, SCL), which is the same page.
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        info = self._volumes[volume]
        if info.layout.pg_of(page_id) != pg:
            raise WrongPgError(f"page {page_id} belongs to pg {info.layout.pg_of(page_id)}, not {pg}")
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            self._check_epoch(m, epoch, "ReadPage", key)
            self._check_membership(m, membership_epoch, "ReadPage", key)
            required = min_scl if 0 < min_scl < read_point else read_point
            if required > m.scl:
                raise ReadPointAboveSclError(
                    f"read point {read_point} (min_scl {min_scl}) is above the SCL {m.scl} of "
                    f"segment {volume}/{pg}")
            read_point = min(read_point, m.scl)
            if read_point < m.gc_horizon:
                # The horizon is a volume LSN; this PG's last record at or below it (kept by
                # GC as the chain anchor) is the lowest read point whose pages survive.
                floor = self._visible_at_or_below(txn, prefix, m, min(m.gc_horizon, m.scl))
                # A hydrated segment holds no log below its log_floor (docs/membership.md).
                floor = max(floor, m.log_floor)
                if read_point < floor:
                    raise ReadPointBelowGcError(
                        f"read point {read_point} is below the GC horizon {m.gc_horizon} of "
                        f"segment {volume}/{pg} (its last record at or below it is {floor})")
            image = self._build_page(txn, key, prefix, m, page_id, read_point)
        return bytes(image), pagefmt.page_lsn(image), m.scl

    def _visible_at_or_below(self, txn, prefix: bytes, m: SegMeta, limit: int) -> int:
        """Highest stored, visible record LSN <= limit in a segment (0 if none)."""
        return visible_down(txn.cursor(db=self.db_log), prefix, m.truncs, limit)

    def _page_versions_desc(self, txn, prefix: bytes, page_id: int, upto: int, truncs, limit: int):
        """Up to ``limit`` (lsn, bytes) versions of a page with lsn <= upto, newest first."""
        cur = txn.cursor(db=self.db_versions)
        base = prefix + BE32.pack(page_id)
        out = []
        if upto < LSN_MAX:
            positioned = cur.set_range(prefix + PAGE_LSN.pack(page_id, upto + 1))
        else:
            positioned = page_id < 0xFFFFFFFF and cur.set_range(prefix + BE32.pack(page_id + 1))
        ok = cur.prev() if positioned else cur.last()
        while ok and len(out) < limit:
            k = cur.key()
            if k[:12] != base:
                break
            lsn = BE64.unpack_from(k, 12)[0]
            if not in_truncation(lsn, truncs):
                out.append((lsn, cur.value()))
            ok = cur.prev()
        return out

    def _page_records(self, txn, key: tuple, prefix: bytes, page_id: int, after: int, upto: int,
                      truncs, fetched: dict | None = None) -> tuple[bytes, int]:
        """The page's visible records in (after, upto], packed, and how many.

        ``fetched``: {lsn: record bytes} already read for many pages at once in one walk
        over the runs (coalescing, GC: _records_by_lsn); otherwise the page's own are read.
        CorruptError if one is missing (quarantined) or in a run that fails its check."""
        lsns = self._page_lsns(txn, prefix, page_id, after, upto)
        if truncs:
            lsns = [lsn for lsn in lsns if not in_truncation(lsn, truncs)]
        if not lsns:
            return b"", 0
        if fetched is None:
            fetched = self._records_by_lsn(txn, key, prefix, lsns)
        parts = [fetched.get(lsn) for lsn in lsns]
        if None in parts:
            lsn = lsns[parts.index(None)]
            raise CorruptError(
                f"record {key[0]}/{key[1]} lsn {lsn} of page {page_id} is quarantined or in a "
                f"log run that failed its checksum, and not repaired yet")
        return b"".join(parts), len(parts)

    def _records_by_lsn(self, txn, key: tuple, prefix: bytes, lsns: list[int]) -> dict[int, bytes]:
        """{lsn: record bytes} of the stored ones among ``lsns`` (ascending): one seek and
        one decode per run that holds any of them, not one per record. A run that fails
        its check is reported to the scrubber and its records are left out."""
        cur = txn.cursor(db=self.db_log)
        out: dict[int, bytes] = {}
        run = None
        run_last = -1
        i = 0
        for lsn in lsns:
            if lsn > run_last:  # the next run that can hold it
                if not cur.set_range(prefix + BE64.pack(lsn)) or cur.key()[:8] != prefix:
                    break
                run_last = run_key_lsn(cur.key())
                try:
                    run = decode_run(cur.value())
                except CorruptError:
                    self.suspects.append((key, KIND_RUN, run_last))
                    run = None
                i = 0
            if run is None:
                continue
            i = bisect.bisect_left(run.lsns, lsn, i)
            if i < len(run.lsns) and run.lsns[i] == lsn:
                out[lsn] = run.record(i)
        return out

    def _clone_base(self, txn, volume: str, page_id: int) -> bytearray | None:
        """A clone's page as of its fork: the parent's page as of fork_lsn, built from the
        parent's segment on this node under the parent's truncation set at the fork; None
        if the page did not exist then. Recursive for a clone of a clone."""
        # BEGIN LAB 6: a clone's page: build the parent's page as of the fork under the truncation set the clone inherited (refuse if the parent's segment is not complete to the fork tail)
        info = self._volumes[volume]
        parent = self._by_id[info.parent_id]
        pg = parent.layout.pg_of(page_id)
        pkey = (parent.name, pg)
        if not info.fork_tails[pg] and pkey not in self._segs:
            return None   # the parent had no record of this PG at the fork (growth)
        pprefix = seg_prefix(parent.vol_id, pg)
        pm = self._read_meta(txn, pprefix)
        if pm.scl < info.fork_tails[pg]:
            raise ReadPointAboveSclError(
                f"clone {volume!r}: segment {parent.name}/{pg} of its parent is complete only to "
                f"{pm.scl}, below its last record {info.fork_tails[pg]} at the fork "
                f"{info.fork_lsn}; gossip will fill it")
        # Versions above the lowest LSN where the parent's set now differs from the one the
        # clone inherited were built for another timeline of the parent: not for us.
        low = lowest_difference(pm.truncs, info.inherited)
        cap = info.fork_lsn if low is None else min(info.fork_lsn, low)
        view = replace(pm, truncs=info.inherited)
        try:
            return self._build_page(txn, pkey, pprefix, view, page_id, info.fork_lsn,
                                    version_cap=cap)
        except PageNotFoundError:
            return None
        # END LAB 6

    def _build_page(self, txn, key: tuple, prefix: bytes, m: SegMeta, page_id: int,
                    read_point: int, version_cap: int | None = None) -> bytearray:
        """Materialise a page as of read_point from the newest good version plus records
        (a clone's page with no version of its own starts from its parent's, _clone_base)."""
        vupto = read_point if version_cap is None else min(read_point, version_cap)
        candidates = self._page_versions_desc(txn, prefix, page_id, vupto, m.truncs,
                                              READ_VERSION_FALLBACKS)
        clone = self._volumes[key[0]].parent_id != 0
        quarantined = [v for v in self._quar_versions.get(key, ()) if v[0] == page_id
                       and v[1] <= read_point]
        for base_lsn, base in candidates + [(0, None)]:
            if base is not None and not verify_stored_page(page_id, base_lsn, base):
                self.suspects.append((key, KIND_VERSION, (page_id, base_lsn)))
                continue  # never serve it; fall back to an older version
            records, n = self._page_records(txn, key, prefix, page_id, base_lsn, read_point, m.truncs)
            if base is None and clone:
                base = self._clone_base(txn, key[0], page_id)
                if base is None and n == 0:
                    raise PageNotFoundError(
                        f"page {page_id} has no INIT_PAGE at or below read point {read_point}")
            try:
                image = materialiser.apply(None if base is None else bytearray(base), page_id,
                                           records, upto_lsn=read_point)
            except ChecksumError as exc:
                self.log.error("read of %s/%d page %d: stored record failed its checksum: %s",
                               key[0], key[1], page_id, exc)
                self._suspect_records(txn, prefix, key, records)
                raise CorruptError(f"page {page_id}: a stored record failed its checksum") from None
            except PageOrderError as exc:
                if base is None and not candidates and not quarantined and m.log_floor == 0:
                    raise PageNotFoundError(
                        f"page {page_id} has no INIT_PAGE at or below read point {read_point}") from None
                self.log.warning("read of %s/%d page %d from base %d failed: %s",
                                 key[0], key[1], page_id, base_lsn, exc)
                continue
            if image is None:
                if candidates or quarantined:
                    continue
                raise PageNotFoundError(
                    f"page {page_id} has no INIT_PAGE at or below read point {read_point}")
            assert pagefmt.verify_checksum(image), "materialised page must carry a valid checksum"
            assert pagefmt.page_lsn(image) <= read_point
            return image
        raise CorruptError(
            f"page {page_id} of {key[0]}/{key[1]} cannot be built as of {read_point}: its stored "
            f"versions failed their checksums and the log below them is gone; awaiting repair")

    def _suspect_records(self, txn, prefix: bytes, key: tuple, records: bytes) -> None:
        off = 0
        # Walk record by record with the header's own length; report the bad ones.
        while off + HEADER_SIZE <= len(records):
            lsn = U64.unpack_from(records, off)[0]
            size = HEADER_SIZE + struct.unpack_from("<H", records, off + 38)[0]
            if not verify_stored_record(lsn, records[off:off + size]):
                self.suspects.append((key, KIND_RECORD, lsn))
            off += size

    def fetch_records(self, volume: str, pg: int, after_lsn: int, upto_lsn: int,
                      max_bytes: int, epoch: int, membership_epoch: int = 0):
        """Chain-complete, visible records in (after_lsn, upto_lsn], packed.

        Returns (records, scl, more, volume_epoch, truncs). ``upto_lsn`` 0 means the SCL;
        it is capped at the SCL. Stops before a quarantined record (never served) and when
        ``max_bytes`` is reached (``more`` is then True). ``epoch`` 0 = a peer (unfenced).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        max_bytes = min(max_bytes or FETCH_BYTES_DEFAULT, FETCH_BYTES_MAX)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            if epoch:
                self._check_epoch(m, epoch, "FetchRecords", key)
            self._check_membership(m, membership_epoch, "FetchRecords", key)
            upto = m.scl if upto_lsn == 0 else min(upto_lsn, m.scl)
            bad = [q for q in self._quar_records.get(key, ()) if after_lsn < q <= upto]
            if bad:
                upto = min(bad) - 1
            parts = []
            total = 0
            more = False
            cur = txn.cursor(db=self.db_log)
            if upto > after_lsn:
                try:
                    for lsn, run, i in records_up(cur, prefix, after_lsn):
                        if lsn > upto:
                            break
                        if m.truncs and in_truncation(lsn, m.truncs):
                            continue
                        v = run.record(i)
                        if total + len(v) > max_bytes and parts:
                            more = True
                            break
                        if not verify_stored_record(lsn, v):
                            self.suspects.append((key, KIND_RECORD, lsn))
                            break  # never serve bad bytes (invariant 13)
                        parts.append(v)
                        total += len(v)
                except CorruptError:
                    self.suspects.append((key, KIND_RUN, run_key_lsn(cur.key())))
                    # serve what came before the bad run; the rest after its repair
        return b"".join(parts), m.scl, more, m.volume_epoch, m.truncs

    def segment_state(self, volume: str, pg: int, records_since: int = 0,
                      include_records: bool = False, limit: int = STATE_RECORDS_MAX,
                      tail_bound: int = 0, membership_epoch: int = 0):
        """(SegMeta, [(lsn, prev_volume_lsn, flags)], more, tail_lsn) of a segment, read in
        one snapshot. ``tail_lsn`` is the highest chain-complete, untruncated LSN <=
        tail_bound (0 if tail_bound is 0): recovery stamps the first new record's PG
        backlink with it."""
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        records = []
        more = False
        tail = 0
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            self._check_membership(m, membership_epoch, "SegmentState", key)
            if tail_bound:
                bound = min(tail_bound, m.scl)
                tail = self._visible_at_or_below(txn, prefix, m, bound)
                lost = [q for q in self._quar_records.get(key, ())
                        if q <= bound and not in_truncation(q, m.truncs)]
                tail = max([tail] + lost)
                if tail == 0 and m.log_floor <= bound:
                    tail = m.log_floor
            if include_records:
                cur = txn.cursor(db=self.db_log)
                for lsn, run, i in records_up(cur, prefix, records_since):
                    if lsn > m.scl:
                        break
                    if m.truncs and in_truncation(lsn, m.truncs):
                        continue
                    if len(records) >= limit:
                        more = True
                        break
                    off = run.base + (run.ends[i - 1] if i else 0)
                    records.append((lsn, U64.unpack_from(run.value, off + REC_PREV_VOL)[0],
                                    run.value[off + REC_FLAGS]))
        return m, records, more, tail

    def hydration_pages(self, volume: str, pg: int, as_of: int, after_page: int, first: bool,
                        max_bytes: int):
        """One chunk of a hydration answer (FetchPageVersions, docs/membership.md):
        (SegMeta, as_of, [(page_id, page_lsn, bytes)], more).

        ``as_of`` 0 picks the anchor: the newest visible record at or below min(GC horizon,
        SCL), which GC always keeps, so every record of the PG above it is still in this
        log and a segment that holds every page as of it can pull the rest by gossip. Each
        page is built as of the anchor like a read (checksums verified, invariant 13);
        pages with no INIT_PAGE at or below it are left out (their records are above it).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        max_bytes = min(max_bytes or FETCH_BYTES_DEFAULT, FETCH_BYTES_MAX)
        out = []
        total = 0
        more = False
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            if not as_of:
                as_of = max(self._visible_at_or_below(txn, prefix, m, min(m.gc_horizon, m.scl)),
                            m.log_floor)
            if as_of > m.scl:
                raise ReadPointAboveSclError(
                    f"hydration as of {as_of}: segment {volume}/{pg} is complete only to {m.scl}")
            if as_of < m.log_floor:
                raise ReadPointBelowGcError(
                    f"hydration as of {as_of}: segment {volume}/{pg} kept no log below {m.log_floor}")
            start = 0 if first else after_page + 1
            while True:
                pages = self._pages_from(txn, prefix, start, 64)
                if not pages:
                    break
                for page_id in pages:
                    if total >= max_bytes:
                        more = True
                        break
                    try:
                        image = self._build_page(txn, key, prefix, m, page_id, as_of)
                    except PageNotFoundError:
                        continue
                    out.append((page_id, pagefmt.page_lsn(image), bytes(image)))
                    total += len(image)
                if more or len(pages) < 64:
                    break
                start = pages[-1] + 1
        return m, as_of, out, more

    def page_of_record(self, volume: str, pg: int, lsn: int) -> int | None:
        """The page a stored (or quarantined) record belongs to, from the page index (None
        if the index lists it for no page). Linear in the segment's pages: repairs only."""
        prefix = self._prefix(volume, pg)
        with self.env.begin() as txn:
            start = 0
            while True:
                pages = self._pages_from(txn, prefix, start, 256)
                for page_id in pages:
                    if self._page_lsns(txn, prefix, page_id, lsn - 1, lsn) == [lsn]:
                        return page_id
                if len(pages) < 256:
                    return None
                start = pages[-1] + 1

    def next_stored_above(self, volume: str, pg: int, lsn: int) -> int:
        """The lowest stored, visible LSN > lsn (0 if none): where the hole above the SCL
        ends (gossip fetches only the hole)."""
        prefix = self._prefix(volume, pg)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            for found, _run, _i in records_up(txn.cursor(db=self.db_log), prefix, lsn):
                if not in_truncation(found, m.truncs):
                    return found
        return 0
