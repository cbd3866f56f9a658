"""Mini-transactions (MTRs): groups of redo records that change pages atomically.

Every page change the writer makes is a redo record (invariant 1: it never writes a page).
An MTR is the unit that must apply all-or-nothing: a B+tree split, a table creation, or a
whole client transaction ending in its COMMIT record. The last record of an MTR is tagged
CPL (consistency point); VDL only ever lands on a CPL, so neither storage nor a replica
(invariant 11) ever exposes half an MTR.

An MTR runs in three phases, all inside the database's commit lock::

    phase 1  PLAN     MtrPlan: the B+tree code decides every change, loading (and
                      pinning) the pages it needs from the buffer pool - this may await -
                      and applies each change to a private COPY of the page (a shadow)
                      with dummy LSNs, so later decisions see earlier ones. Nothing the
                      rest of the engine can see has changed; an error here (TooLargeError,
                      TableNotFound, a bug) abandons the plan with no trace.
    phase 2  RESERVE  await sink.wait_room(n) with n = len(plan.ops): the EXACT record
                      count, so the bound of invariant 6 is never a guess. A writer at
                      VDL + LAL stalls here.
    phase 3  EMIT     MiniTransaction, synchronous: for each planned change allocate an
                      LSN, stamp the backlinks, apply the record to the cached page with
                      engine.materialiser.apply (the same code storage runs, so the cache
                      and storage agree byte for byte), then finish(): tag the last record
                      CPL and hand all records to sink.submit() in one call.

Architecture invariant (MTR atomicity): there is NO await between the first LSN allocation
and finish(). The engine runs on one asyncio loop, so no other MTR can allocate LSNs in
between: an MTR's records have consecutive volume backlinks and no VDL can fall inside it.
``MiniTransaction.change`` asserts this. Phase 3 replays changes already applied once to
identical shadow copies, so it cannot fail with PageFullError (or any apply error) half
way; ``MtrPlan.execute`` also checks afterwards that cache and shadows agree.

Why plan first instead of "lock, load everything, allocate": a transaction's writes may
split pages whose need is known only after earlier writes of the same transaction have
been applied; planning on shadows finds them, loads them while awaiting is still allowed,
and yields the exact record count for wait_room.

Limits: an MTR holds at most MTR_RECORDS_MAX records and never more than the sink's LAL
(it could never fit under VDL + LAL); a bigger plan raises TooLargeError before any LSN is
allocated.

A commit in pieces (``execute(sink, piece_records=N)``, a big transaction: invariant 18)
    One plan, planned whole first (so nothing is emitted if planning fails), then emitted
    as several pieces of at most N records, each like phase 3 above (no await inside a
    piece), with the event loop free between pieces. ONLY the last record of the last
    piece is tagged CPL: VDL only lands on CPLs, so it can never land between pieces, and
    storage recovery truncates every piece of a commit whose last record did not become
    durable; a replica groups records into MTRs by their CPL, so it applies all pieces at
    once or none. The caller holds the commit lock for all pieces, so no other MTR's
    records fall between them, and ``wait_room`` reserves room for ALL records at once
    (VDL cannot move inside the commit, so a commit bigger than LAL could never finish).
    A failure after the first piece left the plan leaves records without a CPL in the
    cache: the Database stops writing (engine/db/database.py ``_execute``), and the next
    writer's recovery truncates them.
"""

from __future__ import annotations

import asyncio
import logging

from engine import materialiser
from engine.format import page as pagefmt
from engine.db.buffer_pool import BufferPool
from engine.errors import TooLargeError
from engine.format.redo import FLAG_CPL, RecordType, encode_record, with_flags

log = logging.getLogger("aurora.mtr")

#: Most records one MTR (one transaction's commit) may hold.
MTR_RECORDS_MAX = 1 << 16


class MtrPlan:
    """Phase 1: the changes an MTR will make, worked out on private copies of pages.

    ``ops`` lists (page_id, rtype, payload) in the order they will be logged. Pages the
    plan loads or changes are pinned in the buffer pool until ``release()``.
    """

    def __init__(self, pool: BufferPool, records_max: int = 0) -> None:
        self._pool = pool
        self.records_max = records_max or MTR_RECORDS_MAX   # most records this plan may hold
        self.ops: list[tuple[int, int, bytes]] = []     # planned records, in order
        self._shadows: dict[int, bytearray] = {}        # page_id -> changed private copy
        self._pins: dict[int, int] = {}                 # page_id -> pins this plan holds
        self.catalog_changed = False                     # a META catalog cell changed

    def page_limit(self) -> int | None:
        """First page id the volume's layout refuses (growth's maximum PG count), or None."""
        layout = getattr(self._pool.sink, "layout", None)
        return layout.page_limit if layout is not None else None

    async def load(self, page_id: int) -> bytearray | None:
        """The page as this plan sees it (its shadow if changed), loading and pinning it."""
        shadow = self._shadows.get(page_id)
        if shadow is not None:
            return shadow
        image = await self._pool.get(page_id, pin=True)
        if image is not None:
            self._pins[page_id] = self._pins.get(page_id, 0) + 1
        return image

    def page(self, page_id: int) -> bytearray:
        """Synchronous view of a page this plan already loaded (or changed, or created)."""
        shadow = self._shadows.get(page_id)
        if shadow is not None:
            return shadow
        assert self._pool.is_pinned(page_id), f"plan reads page {page_id} without holding it"
        image = self._pool.peek(page_id)
        assert image is not None
        return image

    def change(self, page_id: int, rtype: int, payload: bytes) -> bytearray:
        """Plan one record and apply it to the page's shadow; returns the shadow."""
        shadow = self._shadows.get(page_id)
        if shadow is None:
            real = self._pool.peek(page_id)
            if real is None:
                # Only a page nobody has (a freshly allocated id, or page 0 at bootstrap)
                # may be absent: phase 3 will find it absent too and create it.
                assert rtype == RecordType.INIT_PAGE, (
                    f"plan changes page {page_id}, which is not resident, with record type {rtype}")
            else:
                assert self._pool.is_pinned(page_id), (
                    f"plan changes page {page_id} without pinning it: it could be evicted before the MTR runs")
                shadow = bytearray(real)
        if len(self.ops) >= self.records_max:
            raise TooLargeError(
                f"transaction too large: its commit needs more than {self.records_max} redo records")
        prev = 0 if shadow is None else pagefmt.page_lsn(shadow)
        # Dummy LSNs: only the page chain (lsn > page_lsn, backlink == page_lsn) matters here.
        record = encode_record(prev + 1, 0, 0, prev, page_id, rtype, 0, payload)
        shadow = materialiser.apply(shadow, page_id, record, verify_pages=False)
        self._shadows[page_id] = shadow
        self.ops.append((page_id, rtype, payload))
        return shadow

    def release_unchanged(self) -> None:
        """Unpin pages this plan only read (e.g. a finished descent); changed ones stay."""
        for page_id in [p for p in self._pins if p not in self._shadows]:
            for _ in range(self._pins.pop(page_id)):
                self._pool.unpin(page_id)

    def release(self) -> None:
        """Unpin everything this plan pinned. Call exactly once, when the MTR is over."""
        for page_id, count in self._pins.items():
            for _ in range(count):
                self._pool.unpin(page_id)
        self._pins.clear()
        self._pool.trim()

    async def execute(self, sink, piece_records: int = 0, pause_s=None, on_piece=None) -> int:
        """Phases 2 and 3: reserve LSN room, then emit and apply the MTR. Returns its CPL.

        ``piece_records`` > 0: emit in pieces of at most that many records, the event loop
        free between them, only the very last record CPL (a commit in pieces, see the module
        doc; the caller holds the commit lock throughout). ``pause_s()``: seconds to sleep
        between pieces (a test hook: engine/hooks.py commit_piece_pause_s). ``on_piece(lsn, last)``
        runs after each piece is emitted, before the event loop runs anything else."""
        n = len(self.ops)
        assert n > 0, "an MTR needs at least one record"
        lal = getattr(sink, "lal", None)
        if lal is not None and n > lal:
            raise TooLargeError(f"transaction too large: its commit needs {n} redo records, "
                                f"more than the LSN allocation limit LAL = {lal}")
        await sink.wait_room(n)  # invariant 6: exact bound, for every piece at once
        size = piece_records if 0 < piece_records < n else n
        cpl = 0
        for start in range(0, n, size):
            if start:
                # Between pieces: records without a CPL are in the cache and the log, so
                # VDL cannot pass them until the last piece (invariant 18).
                delay = pause_s() if pause_s is not None else 0.0
                if delay > 0:
                    log.warning("commit in pieces: %d of %d records emitted (up to LSN %d, no "
                                "CPL yet); pausing %.3f s (test hook)", start, n, cpl, delay)
                await asyncio.sleep(delay)
            ops = self.ops[start:start + size]
            # --- MTR atomicity: no await from here to finish() ---------------------------
            mtr = MiniTransaction(sink, self._pool, len(ops))
            for page_id, rtype, payload in ops:
                mtr.change(page_id, self._pool.peek(page_id), rtype, payload)
            last = start + size >= n
            cpl = mtr.finish(cpl=last)
            if on_piece is not None:
                on_piece(cpl, last)
        self._check_cache()
        if size < n:
            log.info("commit in %d pieces: %d records, one CPL at LSN %d", -(-n // size), n, cpl)
        return cpl

    def _check_cache(self) -> None:
        """The cache now holds what the plan computed (all but page_lsn and checksum)."""
        for page_id, shadow in self._shadows.items():
            real = self._pool.peek(page_id)
            assert real is not None and real[4:8] == shadow[4:8] and real[16:] == shadow[16:], (
                f"page {page_id}: MTR result differs from its plan")


class MiniTransaction:
    """Phase 3: allocates LSNs, encodes records with backlinks, applies them to the cache.

    The caller has awaited ``sink.wait_room(budget_records)`` and must not await until
    ``finish()`` returns (see the module doc).
    """

    def __init__(self, sink, pool: BufferPool, budget_records: int) -> None:
        self._sink = sink
        self._pool = pool
        self._budget_records = budget_records               # reserved with wait_room
        self.records: list[tuple[int, int, bytes]] = []     # (pg, lsn, record bytes)
        self._finished = False

    def change(self, page_id: int, page: bytearray | None, rtype: int, payload: bytes) -> bytearray:
        """Log and apply one page change; ``page`` is the cached image (None: INIT of a new page)."""
        assert not self._finished, "change() after finish()"
        assert len(self.records) < self._budget_records, (
            f"invariant 6: MTR makes more than the {self._budget_records} records it reserved")
        pg = self._sink.layout.pg_of(page_id)
        prev_page_lsn = 0 if page is None else pagefmt.page_lsn(page)
        lsn, prev_volume_lsn, prev_pg_lsn = self._sink.allocator.allocate(pg)
        if self.records:
            assert prev_volume_lsn == self.records[-1][1], (
                f"MTR atomicity: LSN {prev_volume_lsn} was allocated inside this MTR by someone else")
        record = encode_record(lsn, prev_volume_lsn, prev_pg_lsn, prev_page_lsn,
                               page_id, rtype, 0, payload)
        image = materialiser.apply(page, page_id, record, verify_pages=False)
        if page is None:
            self._pool.put_new(page_id, image)
        else:
            assert image is page, "the materialiser must change a bytearray page in place"
        self.records.append((pg, lsn, record))
        return image

    def finish(self, cpl: bool = True) -> int:
        """Tag the last record CPL (unless ``cpl`` is False: a piece of a commit in pieces
        other than its last), submit the records in one call; returns the last LSN."""
        assert not self._finished and self.records, "finish() of an empty or finished MTR"
        self._finished = True
        pg, lsn, record = self.records[-1]
        if cpl:
            self.records[-1] = (pg, lsn, with_flags(record, FLAG_CPL))
        self._sink.submit(self.records)
        return lsn
