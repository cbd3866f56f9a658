"""The seam between the engine (B+tree, MTRs, buffer pool) and the storage driver.

The engine changes pages synchronously on one asyncio loop and hands the redo records it
made to a ``RedoSink``; only waiting on storage is async. engine/writer/storage_driver.py is the
real sink (six storage nodes over gRPC); tests may use an in-memory one.

LSNs are record sequence numbers: every record gets the next integer. ``LsnAllocator``
stamps the three backlinks of docs/glossary.md (previous LSN in the volume, in the
record's PG, and for its page; the page backlink is the page's own page_lsn).
"""

from __future__ import annotations

from typing import Protocol

from engine.errors import InvariantViolation
from engine.format.volume import VolumeLayout


class LsnAllocator:
    """Hands out LSNs in order and remembers the volume and per-PG chain tails.

    Pure bookkeeping, no I/O. The limit (invariant 6, VDL + LAL) is enforced by the sink
    before an MTR starts; ``allocate`` checks it was respected (InvariantViolation, never
    an assert: the check survives ``python -O``).
    """

    def __init__(self, last_lsn: int = 0, pg_tails: dict[int, int] | None = None,
                 next_lsn: int | None = None) -> None:
        self.last_volume_lsn = last_lsn          # LSN of the newest record allocated
        self.pg_tails: dict[int, int] = dict(pg_tails or {})  # pg -> newest LSN in that PG
        self.limit_lsn: int | None = None        # highest LSN allowed now (VDL + LAL)
        # After recovery the next LSN jumps past the truncation range (VDL, VDL + LAL]
        # while the backlinks still point at VDL: LSNs need not be dense, chains must be.
        self.next_lsn = last_lsn + 1 if next_lsn is None else next_lsn
        assert self.next_lsn > last_lsn

    def allocate(self, pg: int) -> tuple[int, int, int]:
        """(lsn, prev_volume_lsn, prev_pg_lsn) for a new record in ``pg``."""
        lsn = self.next_lsn
        if self.limit_lsn is not None and lsn > self.limit_lsn:
            raise InvariantViolation(6, f"LSN {lsn} would be allocated above VDL + LAL = "
                                        f"{self.limit_lsn}")
        self.next_lsn = lsn + 1
        prev_volume = self.last_volume_lsn
        prev_pg = self.pg_tails.get(pg, 0)
        self.last_volume_lsn = lsn
        self.pg_tails[pg] = lsn
        return lsn, prev_volume, prev_pg


class RedoSink(Protocol):
    """What the engine needs from storage. Implemented by engine.writer.storage_driver."""

    layout: VolumeLayout
    allocator: LsnAllocator

    @property
    def vdl(self) -> int:
        """Volume durable LSN: highest CPL whose every earlier record met write quorum."""

    async def wait_room(self, n_records: int) -> None:
        """Wait until ``n_records`` more LSNs fit under VDL + LAL (invariant 6), then set
        ``allocator.limit_lsn``. Call before an MTR allocates its first LSN."""

    def submit(self, records: list[tuple[int, int, bytes]]) -> None:
        """Ship (pg, lsn, record_bytes) of one finished MTR, in LSN order. Never blocks:
        the driver batches per PG and sends while earlier sends are in flight."""

    async def wait_durable(self, lsn: int, timeout_s: float | None = None) -> None:
        """Return once VDL >= lsn (invariant 2). Raises WriteQuorumUnavailable on timeout."""

    async def read_page(self, page_id: int, read_point: int) -> bytes | None:
        """The page as of ``read_point`` from one segment (invariant 8); None if the page
        was never initialised."""
