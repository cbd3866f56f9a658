"""FakeSink: an in-memory RedoSink (engine/db/sink.py) for fast in-process engine tests.

It plays the storage driver plus six storage nodes, without quorums or gRPC:

* ``submit`` keeps every record and checks what storage would check: checksums, that one
  call is one MTR or one piece of a commit in pieces (no CPL but on its last record; a
  piece other than a commit's last has none: invariant 18), and the three backlink
  chains (volume, PG, page). Anything wrong is appended to ``violations`` (tests assert it stays empty).
* Acks: ``ack_delay_s=0.0`` acks each record on the next loop turn, ``> 0`` after that
  delay plus a seeded random jitter (so acks arrive out of order), ``None`` only when the
  test calls ``ack`` / ``ack_upto`` / ``ack_all`` (to hold VDL back on purpose).
* VCL = highest LSN with every submitted record at or below it acked; VDL = highest CPL
  <= VCL (invariant 5, docs/glossary.md). ``vdl_history`` keeps every VDL it reached.
* ``read_page(page_id, read_point)`` rebuilds the page by applying the stored records with
  engine.format.materialise_py, the reference materialiser, up to the read point (None if the
  page has no record there), caching the newest version per page like a segment does.
* ``wait_room`` enforces invariant 6 (VDL + LAL) like the real driver, and the allocator
  records a violation if an LSN is ever allocated above VDL + LAL.
"""

from __future__ import annotations

import asyncio
import random

from engine.format import materialise_py
from engine.errors import WriteQuorumUnavailable
from engine.format.redo import FLAG_CPL, read_header
from engine.db.sink import LsnAllocator
from engine.format.volume import VolumeLayout


class CheckingAllocator(LsnAllocator):
    """LsnAllocator that reports any LSN allocated above VDL + LAL (invariant 6)."""

    def __init__(self, sink: "FakeSink") -> None:
        super().__init__()
        self._sink = sink
        self.max_ahead = 0          # largest (lsn - VDL) seen at allocation time

    def allocate(self, pg: int) -> tuple[int, int, int]:
        result = super().allocate(pg)
        lsn, vdl = result[0], self._sink.vdl
        self.max_ahead = max(self.max_ahead, lsn - vdl)
        if lsn > vdl + self._sink.lal:
            self._sink.violations.append(
                f"invariant 6: LSN {lsn} allocated above VDL {vdl} + LAL {self._sink.lal}")
        return result


class FakeSink:
    """In-memory RedoSink; see the module doc."""

    def __init__(self, layout: VolumeLayout | None = None, lal: int = 100_000,
                 ack_delay_s: float | None = 0.0, jitter_s: float = 0.0, seed: int = 0,
                 read_delay_s: float = 0.0) -> None:
        self.layout = layout or VolumeLayout(pg_count=4, stripe_pages=2)
        self.lal = lal
        self.allocator = CheckingAllocator(self)
        self.ack_delay_s = ack_delay_s      # None: manual acks
        self.jitter_s = jitter_s
        self.read_delay_s = read_delay_s
        self._rng = random.Random(seed)
        self.records: dict[int, bytes] = {}     # lsn -> record bytes as submitted
        self.cpls: set[int] = set()
        self._order: list[int] = []             # submitted LSNs, in order
        self._acked: set[int] = set()
        self._complete = 0                      # _order[:_complete] are all acked
        self._vcl = 0
        self._vdl = 0
        self.vdl_history: list[int] = []
        self._changed = asyncio.Event()         # replaced (after set) whenever VDL moves
        self._last_lsn = 0
        self._pg_tails: dict[int, int] = {}
        self._page_records: dict[int, list[tuple[int, bytes]]] = {}
        self._page_cache: dict[int, tuple[int, bytes]] = {}  # page -> (records applied, image)
        self.violations: list[str] = []
        self.submits = 0
        self.reads = 0
        self.room_waits = 0

    # --- RedoSink --------------------------------------------------------------------------

    @property
    def vdl(self) -> int:
        return self._vdl

    @property
    def vcl(self) -> int:
        return self._vcl

    async def wait_room(self, n_records: int) -> None:
        if n_records > self.lal:
            raise ValueError(f"an MTR of {n_records} records can never fit under LAL {self.lal}")
        while self.allocator.next_lsn + n_records - 1 > self._vdl + self.lal:
            self.room_waits += 1
            await self._wait_change()
        self.allocator.limit_lsn = self._vdl + self.lal

    def submit(self, records: list[tuple[int, int, bytes]]) -> None:
        self.submits += 1
        if not records:
            self.violations.append("empty MTR submitted")
            return
        for i, (pg, lsn, record) in enumerate(records):
            self._check_record(pg, lsn, record, last=(i == len(records) - 1))
            self.records[lsn] = record
            self._order.append(lsn)
            _, _, _, _, _, _, page_id, _, flags = read_header(record, 0)
            if flags & FLAG_CPL:
                self.cpls.add(lsn)
            self._page_records.setdefault(page_id, []).append((lsn, record))
        if self.ack_delay_s is None:
            return
        loop = asyncio.get_running_loop()
        for _, lsn, _ in records:
            delay = self.ack_delay_s + (self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
            if delay <= 0:
                loop.call_soon(self.ack, [lsn])
            else:
                loop.call_later(delay, self.ack, [lsn])

    async def wait_durable(self, lsn: int, timeout_s: float | None = None) -> None:
        async def until() -> None:
            while self._vdl < lsn:
                await self._wait_change()

        if self._vdl >= lsn:
            return
        try:
            await asyncio.wait_for(until(), timeout_s)
        except asyncio.TimeoutError:
            raise WriteQuorumUnavailable(
                f"fake: LSN {lsn} not durable after {timeout_s}s (VDL {self._vdl})") from None

    async def read_page(self, page_id: int, read_point: int) -> bytes | None:
        self.reads += 1
        if read_point > self._vdl:
            self.violations.append(f"read of page {page_id} at {read_point} above VDL {self._vdl}")
        await asyncio.sleep(self.read_delay_s)  # always yields: reads are real awaits
        image = self.materialise(page_id, read_point)
        return None if image is None else bytes(image)

    # --- Test controls ---------------------------------------------------------------------

    def ack(self, lsns) -> None:
        """Ack these submitted LSNs (as if 4 of 6 segments held them) and advance VDL."""
        for lsn in lsns:
            assert lsn in self.records, f"ack of unknown LSN {lsn}"
            self._acked.add(lsn)
        moved = False
        while self._complete < len(self._order) and self._order[self._complete] in self._acked:
            lsn = self._order[self._complete]
            self._complete += 1
            self._vcl = lsn
            if lsn in self.cpls:
                self._vdl = lsn
                moved = True
        if moved:
            self.vdl_history.append(self._vdl)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def ack_upto(self, lsn: int) -> None:
        self.ack([x for x in self._order if x <= lsn and x not in self._acked])

    def ack_all(self) -> None:
        self.ack([x for x in self._order if x not in self._acked])

    def unacked(self) -> list[int]:
        return [x for x in self._order if x not in self._acked]

    @property
    def last_submitted_lsn(self) -> int:
        return self._order[-1] if self._order else 0

    async def settle(self) -> None:
        """Return once every submitted record is durable (acking them all if manual)."""
        if self.ack_delay_s is None:
            self.ack_all()
        while self._vdl < self.last_submitted_lsn:
            await self._wait_change()

    def materialise(self, page_id: int, upto_lsn: int) -> bytearray | None:
        """The page as of ``upto_lsn``, built with the reference materialiser."""
        recs = self._page_records.get(page_id)
        if not recs:
            return None
        start, image = 0, None
        cached = self._page_cache.get(page_id)
        if cached is not None and recs[cached[0] - 1][0] <= upto_lsn:
            start, image = cached[0], bytearray(cached[1])
        end = start
        while end < len(recs) and recs[end][0] <= upto_lsn:
            end += 1
        if end > start:
            image = materialise_py.apply(image, page_id, b"".join(r for _, r in recs[start:end]))
        if image is not None and (cached is None or end > cached[0]):
            self._page_cache[page_id] = (end, bytes(image))
        return image

    # --- Internals -------------------------------------------------------------------------

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _check_record(self, pg: int, lsn: int, record: bytes, last: bool) -> None:
        try:
            ref = read_header(record, 0)
        except Exception as exc:  # noqa: BLE001 - any format error is a violation
            self.violations.append(f"bad record at LSN {lsn}: {exc!r}")
            return
        if ref.size != len(record) or ref.lsn != lsn:
            self.violations.append(f"record at LSN {lsn}: header says LSN {ref.lsn}, size {ref.size}")
        if pg != self.layout.pg_of(ref.page_id):
            self.violations.append(f"LSN {lsn}: pg {pg} but page {ref.page_id} is in pg {self.layout.pg_of(ref.page_id)}")
        if lsn <= self._last_lsn or ref.prev_volume_lsn != self._last_lsn:
            self.violations.append(
                f"LSN {lsn}: volume backlink {ref.prev_volume_lsn}, expected {self._last_lsn}")
        if ref.prev_pg_lsn != self._pg_tails.get(pg, 0):
            self.violations.append(
                f"LSN {lsn}: PG backlink {ref.prev_pg_lsn}, expected {self._pg_tails.get(pg, 0)}")
        page_recs = self._page_records.get(ref.page_id)
        page_tail = page_recs[-1][0] if page_recs else 0
        if ref.prev_page_lsn != page_tail:
            self.violations.append(
                f"LSN {lsn}: page {ref.page_id} backlink {ref.prev_page_lsn}, expected {page_tail}")
        if ref.flags & FLAG_CPL and not last:
            self.violations.append(f"LSN {lsn}: CPL flag inside an MTR (not its last record)")
        self._last_lsn = lsn
        self._pg_tails[pg] = lsn
