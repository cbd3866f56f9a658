"""The writer's buffer pool: a bounded cache of page images, filled from storage, never flushed.

The writer never writes a page (invariant 1), so there is no write-back and no "dirty
flush": a page changed by an MTR is changed in this cache (by the same apply code storage
runs) and its redo records go to storage through the RedoSink. Dropping a cached page is
therefore safe exactly when storage can rebuild it, i.e. when every record of the page is
durable. That is invariant 7:

    (7) A page is evicted only if page_lsn <= VDL, so a miss can always be served by
        asking storage for the page as of the current VDL (the read point).

Frame states and the function that moves a page between them::

    absent --get() miss: read_page(page_id, read_point=VDL)--> resident, clean
    absent --put_new() (page created by an MTR's INIT_PAGE)--> resident, dirty
    resident --MTR applies a record--> dirty (page_lsn > VDL)
    dirty --acks move VDL past page_lsn--> clean            (no action here: computed)
    resident --pin()--> pinned --unpin() (as often as pinned)--> resident
    clean and unpinned --_evict() (LRU order; from a miss's _make_room or trim())--> absent

Capacity (``capacity_pages``) is a bound with two documented exceptions:

* When a miss finds the pool full and no unpinned page is clean, the miss WAITS (await
  sink.wait_durable, no spinning) until VDL passes the oldest unpinned dirty page, which
  then becomes evictable. Waiting is always safe: every dirty page belongs to an MTR that
  was already submitted, so VDL reaches it as soon as storage acks.
* When every resident page is pinned, waiting could deadlock (the waiter may hold the
  pins), so the pool OVERSHOOTS: it grows past capacity by at most the pages pinned by the
  running commit (the pages one MTR changes, plus the META page and the current
  root-to-leaf path).
* ``put_new`` never waits (it runs inside an MTR, which must not await), so pages created
  by MTRs (splits) may also overshoot while they are dirty. ``trim()`` (after every MTR,
  and on a hit while over capacity) drops clean pages without waiting, and the next miss
  waits as above, so this overshoot is bounded by the pages created by MTRs that are not
  durable yet (each holds a record above VDL, so there are at most LAL of them).

``overshoot_max`` records the worst overshoot seen.

Pins: a running commit pins every page it will change between planning and applying the
MTR (engine/db/mtr.py), so those pages cannot be evicted and reloaded in between. The META
page is pinned for the database's lifetime. Readers do not pin: they re-check after every
await instead (engine/db/database.py).

Eviction is LRU (an OrderedDict, least recently used first), skipping pinned and dirty
pages. Concurrent misses of the same page share one storage read.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from engine.format import page as pagefmt
from engine.errors import ChecksumError, InvariantViolation, PageOrderError

#: Smallest useful pool: the pinned META page plus a short root-to-leaf path.
CAPACITY_MIN_PAGES = 4


class BufferPool:
    """Bounded LRU cache of page images (bytearrays) for the writer; see the module doc."""

    def __init__(self, capacity_pages: int, sink) -> None:
        if capacity_pages < CAPACITY_MIN_PAGES:
            raise ValueError(f"capacity_pages must be >= {CAPACITY_MIN_PAGES}, got {capacity_pages}")
        self.capacity_pages = capacity_pages    # resident pages allowed (see overshoot rules)
        self._sink = sink                       # RedoSink: vdl, wait_durable, read_page
        self._frames: OrderedDict[int, bytearray] = OrderedDict()  # LRU first
        self._pins: dict[int, int] = {}         # page_id -> pin count (> 0 only)
        self._loading: dict[int, asyncio.Future] = {}  # page_id -> read in flight
        self.hits = 0                           # get() served from the cache
        self.misses = 0                         # get() that asked storage
        self.evictions = 0                      # pages dropped to make room
        self.vdl_waits = 0                      # misses that waited for VDL to evict
        self.overshoot_max = 0                  # most pages ever resident above capacity
        self.on_evict = None                    # optional callback(page_id) after an eviction
                                                # (engine/baseline/mirrored.py: MySQL's LRU flush)

    # --- Inspection ------------------------------------------------------------------------

    @property
    def sink(self):
        """The RedoSink pages come from (its ``layout`` says which PG holds a page)."""
        return self._sink

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, page_id: int) -> bool:
        return page_id in self._frames

    def peek(self, page_id: int) -> bytearray | None:
        """The resident image of ``page_id`` or None; no I/O, no LRU update, no counters."""
        return self._frames.get(page_id)

    def is_pinned(self, page_id: int) -> bool:
        return page_id in self._pins

    def resident_pages(self) -> list[int]:
        """Resident page ids, least recently used first."""
        return list(self._frames)

    def stats(self) -> dict:
        return {
            "capacity_pages": self.capacity_pages, "resident_pages": len(self._frames),
            "pinned_pages": len(self._pins), "hits": self.hits, "misses": self.misses,
            "evictions": self.evictions, "vdl_waits": self.vdl_waits,
            "overshoot_max": self.overshoot_max,
        }

    # --- Pins ------------------------------------------------------------------------------

    def pin(self, page_id: int) -> None:
        """Keep a resident page resident until a matching unpin()."""
        assert page_id in self._frames, f"pin of page {page_id}, which is not resident"
        self._pins[page_id] = self._pins.get(page_id, 0) + 1

    def unpin(self, page_id: int) -> None:
        count = self._pins.get(page_id, 0)
        assert count > 0, f"unpin of page {page_id}, which is not pinned"
        if count == 1:
            del self._pins[page_id]
        else:
            self._pins[page_id] = count - 1

    # --- Reads -----------------------------------------------------------------------------

    async def get(self, page_id: int, pin: bool = False) -> bytearray | None:
        """The cached image of ``page_id``, reading it from storage on a miss.

        Returns None if the page was never initialised (storage has no record of it); such
        a page is not cached. With ``pin=True`` the page comes back pinned.
        """
        while True:
            frame = self._frames.get(page_id)
            if frame is not None:
                self.hits += 1
                self._frames.move_to_end(page_id)
                if pin:
                    self.pin(page_id)
                if len(self._frames) > self.capacity_pages:
                    self.trim(keep=page_id)
                return frame
            loading = self._loading.get(page_id)
            if loading is None:
                break
            # Someone is reading this page: share their read, then look again (their read
            # may have found nothing, failed, or been evicted already).
            await asyncio.shield(loading)

        self.misses += 1
        done = asyncio.get_running_loop().create_future()
        self._loading[page_id] = done
        try:
            # Invariant 7 makes the current VDL a sufficient read point: the page was
            # evicted with page_lsn <= VDL then, and the writer changes only resident pages.
            read_point = self._sink.vdl
            image = await self._sink.read_page(page_id, read_point=read_point)
            if image is None:
                return None
            frame = bytearray(image)
            self._check_image(page_id, frame, read_point)
            await self._make_room()
            assert page_id not in self._frames, f"page {page_id} loaded twice"
            self._frames[page_id] = frame
            # A replica's sink applies the records that became visible while this page
            # was being read (engine/instance/replica.py); the writer's sink has no such hook.
            catch_up = getattr(self._sink, "catch_up_page", None)
            if catch_up is not None:
                catch_up(page_id, frame)
            self._note_size()
            if pin:
                self.pin(page_id)
            return frame
        finally:
            del self._loading[page_id]
            done.set_result(None)

    @staticmethod
    def _check_image(page_id: int, frame: bytearray, read_point: int) -> None:
        """Invariants 13 and 8 at the boundary: a page from storage must be whole, its own,
        and no newer than the read point."""
        if len(frame) != pagefmt.PAGE_SIZE:
            raise ChecksumError(f"page {page_id} from storage is {len(frame)} bytes, not {pagefmt.PAGE_SIZE}")
        if not pagefmt.verify_checksum(frame):
            raise ChecksumError(f"page {page_id} from storage fails its checksum")
        if pagefmt.page_id(frame) != page_id:
            raise PageOrderError(f"storage returned page {pagefmt.page_id(frame)} for page {page_id}")
        if pagefmt.page_lsn(frame) > read_point:
            raise PageOrderError(f"storage returned page {page_id} at LSN {pagefmt.page_lsn(frame)}, "
                                 f"above the read point {read_point}")

    # --- Pages created by an MTR -----------------------------------------------------------

    def put_new(self, page_id: int, image: bytearray, pin: bool = False) -> None:
        """Cache a page an MTR just created with INIT_PAGE (it is not in storage yet).

        Never waits (it runs inside an MTR, which must not await), so it may overshoot
        capacity; the next miss trims the pool back.
        """
        assert page_id not in self._frames, f"put_new of page {page_id}, which is resident"
        assert page_id not in self._loading, f"put_new of page {page_id} while it is being read"
        assert isinstance(image, bytearray) and len(image) == pagefmt.PAGE_SIZE
        self._frames[page_id] = image
        self._note_size()
        if pin:
            self.pin(page_id)

    # --- Eviction --------------------------------------------------------------------------

    def _note_size(self) -> None:
        over = len(self._frames) - self.capacity_pages
        if over > self.overshoot_max:
            self.overshoot_max = over

    def trim(self, keep: int | None = None) -> None:
        """Evict clean, unpinned pages (LRU first, never ``keep``) until within capacity;
        never waits."""
        if len(self._frames) <= self.capacity_pages:
            return
        vdl = self._sink.vdl
        victims = []
        excess = len(self._frames) - self.capacity_pages
        for page_id, frame in self._frames.items():
            if len(victims) >= excess:
                break
            if page_id != keep and page_id not in self._pins and pagefmt.page_lsn(frame) <= vdl:
                victims.append(page_id)
        for page_id in victims:
            self._evict(page_id)

    async def _make_room(self) -> None:
        """Evict until one more page fits, waiting for VDL if only dirty pages are left."""
        while len(self._frames) >= self.capacity_pages:
            vdl = self._sink.vdl
            oldest_dirty_lsn = None
            victim = None
            for page_id, frame in self._frames.items():  # LRU first
                if page_id in self._pins:
                    continue
                lsn = pagefmt.page_lsn(frame)
                if lsn <= vdl:
                    victim = page_id
                    break
                if oldest_dirty_lsn is None or lsn < oldest_dirty_lsn:
                    oldest_dirty_lsn = lsn
            if victim is not None:
                self._evict(victim)
                continue
            if oldest_dirty_lsn is None:
                return  # every resident page is pinned: overshoot rather than deadlock
            self.vdl_waits += 1
            await self._sink.wait_durable(oldest_dirty_lsn)

    def _evict(self, page_id: int) -> None:
        frame = self._frames[page_id]
        if page_id in self._pins:
            raise InvariantViolation(7, f"evicting pinned page {page_id}")
        if pagefmt.page_lsn(frame) > self._sink.vdl:
            raise InvariantViolation(7, f"evicting page {page_id} with page_lsn "
                                        f"{pagefmt.page_lsn(frame)} > VDL {self._sink.vdl}")
        del self._frames[page_id]
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(page_id)
