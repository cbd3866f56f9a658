"""Background plans: the read phase of coalescing, GC and scrubbing.

Each ``plan_*`` / ``scrub_*`` method reads one bounded step in a read transaction (the
background executor of storage_node/node.py) and returns the op that makes it durable
(``PutVersionsOp``, ``GcStepOp``; QuarantineOp for scrub findings), which
storage_node/background.py submits to the group commit. ``sweep_dirty`` rebuilds the
coalescer's dirty counts. Invariant 12 (GC keeps what a read point may need) and
invariant 14 (page versions are a cache of the log) live here. A mixin of
``storage_node.store.Store``. It changes when a background policy changes.
"""

from __future__ import annotations

import bisect
from typing import Iterable

from engine import materialiser
from engine.errors import FormatError
from engine.format import page as pagefmt
from storage_node.errors import CorruptError, StorageError
from storage_node.layout import (
    BE32, BE64, KIND_VERSION, PAGE_LSN, SegMeta, in_truncation, lowest_difference, seg_prefix)
from storage_node.ops import GcStepOp, PutVersionsOp, verify_stored_page, verify_stored_record
from storage_node.pageindex import group_lsns, group_of
from storage_node.runs import decode_run, run_key_lsn, runs_up

WALK_COALESCE_MIN = 1024  # records a coalesce step needs before it walks the runs whole
WALK_APPLY_BYTES = 1 << 20  # records handed to the materialiser per call by that walk


class Plans:
    """Coalesce, GC and scrub planning (mixin of Store; see the module doc)."""

    def _pages_from(self, txn, prefix: bytes, start_page: int, max_pages: int) -> list[int]:
        """Distinct page ids >= start_page having records or versions, ascending."""
        pages: set[int] = set()
        for db in (self.db_pageidx, self.db_versions):
            cur = txn.cursor(db=db)
            page = start_page
            found = 0
            while found < max_pages and page <= 0xFFFFFFFF:
                if not cur.set_range(prefix + PAGE_LSN.pack(page, 0)):
                    break
                k = cur.key()
                if k[:8] != prefix:
                    break
                page = PAGE_LSN.unpack_from(k, 8)[0]
                pages.add(page)
                found += 1
                page += 1
        for _last, delta in self._delta_rows(txn, prefix):
            pages.update(p for p in delta if p >= start_page)
        return sorted(pages)[:max_pages]

    def _backlogs(self, txn, prefix, m, pages, upto) -> dict[int, tuple]:
        """Per page: (LSN and bytes of its newest visible version <= upto, or (0, None);
        the visible LSNs in (that version, upto] the page index lists)."""
        out = {}
        for page_id in pages:
            newest = self._page_versions_desc(txn, prefix, page_id, upto, m.truncs, 1)
            base_lsn, base = newest[0] if newest else (0, None)
            lsns = self._page_lsns(txn, prefix, page_id, base_lsn, upto)
            if m.truncs:
                lsns = [lsn for lsn in lsns if not in_truncation(lsn, m.truncs)]
            out[page_id] = (base_lsn, base, lsns)
        return out

    def _fetch_for_pages(self, txn, key, prefix, backlogs: dict) -> dict[int, bytes]:
        """The records of ``backlogs`` (``_backlogs``), read in ONE walk over the runs: a
        page's records are spread over many runs, and the pages of one coalesce or GC
        step share them."""
        wanted = sorted(lsn for _base_lsn, _base, lsns in backlogs.values() for lsn in lsns)
        return self._records_by_lsn(txn, key, prefix, wanted)

    def _materialise_upto(self, txn, key, prefix, m, page_id, upto, min_records=1, fetched=None):
        """(lsn, bytes, n) of a new version of page as of its last visible record <= upto,
        built from its newest good version; None if nothing new or not buildable."""
        candidates = self._page_versions_desc(txn, prefix, page_id, upto, m.truncs, 1)
        base_lsn, base = candidates[0] if candidates else (0, None)
        if base is not None and not verify_stored_page(page_id, base_lsn, base):
            self.suspects.append((key, KIND_VERSION, (page_id, base_lsn)))
            return None
        try:
            records, n = self._page_records(txn, key, prefix, page_id, base_lsn, upto, m.truncs,
                                            fetched)
        except CorruptError:
            return None
        if n < min_records or n == 0:
            return None
        try:
            if base is None and self._volumes[key[0]].parent_id:
                start = self._clone_base(txn, key[0], page_id)
            else:
                start = None if base is None else bytearray(base)
            image = materialiser.apply(start, page_id, records, upto_lsn=upto)
        except (FormatError, StorageError) as exc:
            self.log.warning("coalesce %s/%d page %d: %s", key[0], key[1], page_id, exc)
            return None
        if image is None:
            return None
        return pagefmt.page_lsn(image), bytes(image), n

    def _coalesce_by_walk(self, txn, key, m, backlogs: dict, min_records) -> list | None:
        """New versions as of the SCL of ``pages``, built in ONE pass of the Cython
        materialiser over the runs that hold their records (``apply_to_pages`` per run:
        records of other pages are skipped, records at or below a page's version are
        already in it), not record by record in Python. For the busy case: many pages
        with long backlogs. Returns None where the per-page path must decide instead
        (a truncation set, quarantined records, a clone, a small backlog, a bad byte, a
        walk much longer than the records needed)."""
        if m.truncs or self._quar_records.get(key) or self._volumes[key[0]].parent_id:
            return None
        upto = m.scl
        prefix = seg_prefix(self._volumes[key[0]].vol_id, key[1])
        images: dict[int, bytearray | None] = {}
        low = upto
        needed = 0
        for page_id, (base_lsn, base, lsns) in backlogs.items():
            if base is not None and not verify_stored_page(page_id, base_lsn, base):
                return None
            if len(lsns) < max(1, min_records):
                continue
            images[page_id] = None if base is None else bytearray(base)
            low = min(low, lsns[0] - 1)
            needed += len(lsns)
        if needed < WALK_COALESCE_MIN:
            return None
        starts = {p: (0 if image is None else pagefmt.page_lsn(image)) for p, image in images.items()}
        walked = 0
        spans: list = []
        span_bytes = 0
        verify = True  # the base images once; after that they are our own
        try:
            for run, i in runs_up(txn.cursor(db=self.db_log), prefix, low):
                if run.lsns[i] > upto:
                    break
                j = bisect.bisect_right(run.lsns, upto)
                spans.append(run.span(i, j))
                span_bytes += len(spans[-1])
                walked += j - i
                if walked > 8 * needed + 4096:
                    return None  # mostly other pages' records: the per-page path is cheaper
                last = j < len(run.lsns)
                if span_bytes >= WALK_APPLY_BYTES or last:
                    materialiser.apply_to_pages(images, b"".join(spans), upto, verify)
                    spans, span_bytes, verify = [], 0, False
                if last:
                    break
            if spans:
                materialiser.apply_to_pages(images, b"".join(spans), upto, verify)
        except (FormatError, StorageError):
            return None
        return [(p, pagefmt.page_lsn(image), bytes(image)) for p, image in images.items()
                if image is not None and pagefmt.page_lsn(image) > starts[p]]

    def plan_coalesce(self, volume: str, pg: int, pages: Iterable[int] | None = None,
                      start_page: int = 0, max_pages: int = 16, min_records: int = 1):
        """Build new page versions as of the SCL for ``pages`` (or the next ``max_pages``
        pages from ``start_page``). Returns (PutVersionsOp or None, next_page or None)."""
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        qv = self._quar_versions.get(key, ())
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            next_page = None
            if pages is None:
                pages = self._pages_from(txn, prefix, start_page, max_pages + 1)
                if len(pages) > max_pages:
                    next_page = pages[max_pages]
                    pages = pages[:max_pages]
            versions = []
            pages = [p for p in pages if not any(v[0] == p for v in qv)]  # repaired first
            backlogs = self._backlogs(txn, prefix, m, pages, m.scl)
            walked = self._coalesce_by_walk(txn, key, m, backlogs, min_records)
            if walked is not None:
                op = PutVersionsOp(volume, pg, m.generation, walked) if walked else None
                return op, next_page
            fetched = self._fetch_for_pages(txn, key, prefix, backlogs)
            for page_id in pages:
                built = self._materialise_upto(txn, key, prefix, m, page_id, m.scl, min_records,
                                               fetched)
                if built is not None:
                    versions.append((page_id, built[0], built[1]))
        op = PutVersionsOp(volume, pg, m.generation, versions) if versions else None
        return op, next_page

    def sweep_dirty(self, volume: str, pg: int) -> dict[int, int]:
        """Count, per page, the complete visible records above its newest version."""
        prefix = self._prefix(volume, pg)
        counts: dict[int, int] = {}
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            newest: dict[int, int] = {}
            cur = txn.cursor(db=self.db_versions)
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if k[:8] != prefix:
                        break
                    page_id, lsn = PAGE_LSN.unpack_from(k, 8)
                    if lsn <= m.scl and not in_truncation(lsn, m.truncs):
                        newest[page_id] = lsn
            cur = txn.cursor(db=self.db_pageidx)
            if cur.set_range(prefix):
                for k, v in cur.iternext():
                    if k[:8] != prefix:
                        break
                    page_id = BE32.unpack_from(k, 8)[0]
                    floor = newest.get(page_id, 0)
                    n = sum(1 for lsn in group_lsns(group_of(k, v))
                            if floor < lsn <= m.scl and not in_truncation(lsn, m.truncs))
                    if n:
                        counts[page_id] = counts.get(page_id, 0) + n
            for _last, delta in self._delta_rows(txn, prefix):
                for page_id, lsns in delta.items():
                    floor = newest.get(page_id, 0)
                    n = sum(1 for lsn in lsns
                            if floor < lsn <= m.scl and not in_truncation(lsn, m.truncs))
                    if n:
                        counts[page_id] = counts.get(page_id, 0) + n
        return counts

    def _gc_cap(self, volume: str, m: SegMeta, horizon: int) -> int:
        """Lower a GC horizon so GC keeps what other read points may need (invariant 12):
        never into a truncation range that reaches above it (a backtrack may make those
        records visible again) and never past a live clone's fork or the lowest LSN where
        our set differs from the one that clone inherited."""
        info = self._volumes[volume]
        for child in self._volumes.values():
            if child.parent_id == info.vol_id:
                horizon = min(horizon, child.fork_lsn)
                low = lowest_difference(m.truncs, child.inherited)
                if low is not None:
                    horizon = min(horizon, low)
        for _ in range(len(m.truncs) + 1):
            capped = min([horizon] + [t[0] for t in m.truncs if t[0] < horizon <= t[1]])
            if capped == horizon:
                break
            horizon = capped
        return horizon

    def plan_gc(self, volume: str, pg: int, horizon: int, start_page: int, max_pages: int = 16):
        """One bounded GC step below ``horizon`` (<= SCL) for pages from ``start_page``.

        Invariant 12: for each page keep the newest version <= horizon (building it first if
        the page has later records <= horizon) and everything above it; delete older
        versions and the records they cover. The segment's newest record <= horizon (the
        chain anchor) is always kept so that SCL bookkeeping never loses its footing.
        Returns (GcStepOp, next_page or None).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        qr, qv = self.quarantined(key)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            # Never above the writer's last reported VDL: recovery walks the volume chain
            # upward from the highest writer_vdl a read quorum reports, through the
            # records above it, so those records must survive GC even if a (stale)
            # horizon says otherwise, or recovery would truncate acknowledged commits.
            horizon = self._gc_cap(volume, m, min(horizon, m.scl, m.writer_vdl))
            anchor = self._visible_at_or_below(txn, prefix, m, horizon)
            pages = self._pages_from(txn, prefix, start_page, max_pages + 1)
            next_page = pages[max_pages] if len(pages) > max_pages else None
            op = GcStepOp(volume, pg, m.generation, [], [], [], log_floor=anchor)
            fetched = self._fetch_for_pages(
                txn, key, prefix, self._backlogs(txn, prefix, m, pages[:max_pages], horizon))
            for page_id in pages[:max_pages]:
                if any(v[0] == page_id for v in qv):
                    continue
                recs = [lsn for lsn in self._page_lsns(txn, prefix, page_id, 0, horizon)
                        if not in_truncation(lsn, m.truncs)]
                if any(r in qr for r in recs):
                    continue
                versions = [lsn for lsn, _b in self._page_versions_desc(
                    txn, prefix, page_id, horizon, m.truncs, 1 << 30)]
                keep = versions[0] if versions else 0
                if recs and recs[-1] > keep:
                    built = self._materialise_upto(txn, key, prefix, m, page_id, horizon,
                                                   fetched=fetched)
                    if built is None:
                        continue
                    keep = built[0]
                    op.put_versions.append((page_id, built[0], built[1]))
                if not keep:
                    continue
                op.delete_records.extend((page_id, r) for r in recs if r <= keep and r != anchor)
                op.delete_versions.extend((page_id, v) for v in versions if v < keep)
        if next_page is None:
            op.done_horizon = horizon
        return op, next_page

    def scrub_records(self, volume: str, pg: int, after_lsn: int, max_items: int):
        """Verify the stored records above ``after_lsn``, whole runs at a time, until at
        least ``max_items`` are checked. Returns (bad lsns, [last lsn of each run whose
        directory is bad], last lsn checked, done)."""
        prefix = self._prefix(volume, pg)
        bad = []
        bad_runs = []
        last = after_lsn
        n = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_log)
            ok = cur.set_range(prefix + BE64.pack(after_lsn + 1))
            while ok:
                k = cur.key()
                if k[:8] != prefix:
                    return bad, bad_runs, last, True
                if n >= max_items:
                    return bad, bad_runs, last, False
                run_last = run_key_lsn(k)
                try:
                    run = decode_run(cur.value())
                except CorruptError:
                    bad_runs.append(run_last)
                    n += 1
                    last = run_last
                    ok = cur.next()
                    continue
                lsns = run.lsns
                start = bisect.bisect_right(lsns, after_lsn) if lsns[0] <= after_lsn else 0
                try:  # one pass over the whole span; record by record only if it fails
                    refs = materialiser.scan_batch(run.span(start, len(lsns)))
                    good = [ref[2] for ref in refs] == list(lsns[start:])
                except FormatError:
                    good = False
                if not good:
                    bad.extend(lsns[i] for i in range(start, len(lsns))
                               if not verify_stored_record(lsns[i], run.record(i)))
                n += len(lsns) - start
                last = run_last
                ok = cur.next()
        return bad, bad_runs, last, True

    def scrub_versions(self, volume: str, pg: int, after: tuple, max_items: int):
        """Verify up to ``max_items`` page versions after key (page_id, lsn).
        Returns (bad [(page_id, lsn)], last (page_id, lsn), done)."""
        prefix = self._prefix(volume, pg)
        bad = []
        last = after
        n = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_versions)
            start = prefix + PAGE_LSN.pack(*after)
            if cur.set_range(start):
                for k, v in cur.iternext():
                    if k == start:
                        continue
                    if k[:8] != prefix:
                        return bad, last, True
                    if n >= max_items:
                        return bad, last, False
                    last = PAGE_LSN.unpack_from(k, 8)
                    if not verify_stored_page(last[0], last[1], v):
                        bad.append(last)
                    n += 1
        return bad, last, True

    def take_suspects(self) -> list:
        """Bad bytes the read path stumbled on since the last call (for the scrubber)."""
        out = []
        while self.suspects:
            out.append(self.suspects.popleft())
        return out

    def buildable_version(self, volume: str, pg: int, page_id: int, lsn: int):
        """Rebuild a quarantined page version from the local log if it still can be.

        Returns the version bytes (identical to the lost ones, invariant 14) or None if the
        records below it were garbage-collected (then a peer must provide the page).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            built = self._materialise_upto(txn, key, prefix, m, page_id, lsn)
            # A base version at lsn itself would be the bad one (it is deleted, so not here).
        if built is None or built[0] != lsn:
            return None
        return built[1]
