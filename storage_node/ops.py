"""The write operations of a storage node and the verification of incoming bytes.

An op (``AppendOp``, ``TruncateOp``, ``FoldIndexOp``, ...) is a plain value that says what
one step of a write transaction does; ``Store.apply_ops`` (storage_node/writes.py) runs a
list of them in ONE LMDB write transaction. ``verify_and_prepare`` checks an Append's
batch before anything is stored (and shapes it for the transaction); the
``verify_stored_*`` functions check bytes read back from LMDB (invariant 13). This module
changes when an operation's fields change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from engine import materialiser
from engine.errors import ChecksumError, FormatError
from engine.format import page as pagefmt
from engine.format.volume import VolumeLayout
from storage_node.errors import BadChecksumError, MalformedError, WrongPgError
from storage_node.layout import PAGE_SIZE
from storage_node.pageindex import FOLD_DELTAS_MAX
from storage_node.runs import encode_run


class BatchScan(NamedTuple):
    """What one pass over a verified batch tells (engine.materialiser.scan_batch_run)."""

    count: int             # records
    first_lsn: int
    first_prev_pg_lsn: int  # the segment-chain backlink of the first record
    last_lsn: int
    max_lsn: int
    chained: bool          # every record links to the one before it: one piece of the chain
    bad_backlink_lsn: int  # first record with a backlink not below its LSN (0: none)
    ascending: bool        # every LSN above the one before it


class VerifiedBatch(NamedTuple):
    """One PG batch of an Append, verified and ready to store (verify_and_prepare)."""

    pg: int
    membership_epoch: int
    buf: bytes
    run: bytes             # the batch as one ``log`` value (head, directory, records)
    pages: dict            # {page_id: [lsn, ...]} in batch order, for ``pageidx``
    scan: BatchScan

    def lsns(self) -> list[int]:
        """Every record LSN of the batch, ascending."""
        return sorted(lsn for lsns in self.pages.values() for lsn in lsns)


@dataclass
class AppendOp:
    """Store verified batches of one volume. ``epoch`` 0 = from a peer (gossip/repair)."""

    volume: str
    epoch: int
    writer_vdl: int
    batches: list  # [VerifiedBatch]
    source: str = "writer"  # writer | gossip | repair


@dataclass
class CreateVolumeOp:
    volume: str
    pg_count: int
    stripe_pages: int
    epoch: int
    parent: str = ""     # a clone of this volume ...
    fork_lsn: int = 0    # ... as of this LSN (a CPL <= the parent's VDL)
    fork_tails: tuple = ()  # per PG: the parent's last record <= fork_lsn (the creator
    pgs: tuple = ()      # the PGs placed on this node; () = every PG (docs/fleet.md)
    pg_pages: int = 0    # growth (engine/format/volume.py)
    stripe_width: int = 0


@dataclass
class DropVolumeOp:
    volume: str


@dataclass
class TruncateOp:
    """Add one range (start, end] under ``epoch``; or, when ``replace`` is not None, make
    ``replace`` (ranges (start, end, epoch)) the segment's whole truncation set and write a
    history row (time_us, prev_vdl). ``start_lsn``/``end_lsn`` are then unused."""

    volume: str
    pg: int
    start_lsn: int
    end_lsn: int
    epoch: int
    replace: tuple | None = None
    time_us: int = 0
    prev_vdl: int = 0
    set_writer_vdl: int = 0  # backtrack: the target is durable and the new lowest VDL
    membership_epoch: int = 0  # the PG's, from the writer (invariant 16; 0: none)


@dataclass
class AdoptEpochOp:
    """Adopt a higher epoch (fence) and/or truncation ranges learned from a peer."""

    volume: str
    pg: int
    epoch: int
    truncs: tuple = ()
    reject_stale: bool = False  # True for SegmentState(fence=true) from a writer


@dataclass
class AdoptMembershipOp:
    """SetMembership from the control plane: adopt a higher membership epoch (invariant 16);
    a lower one is refused with STALE_MEMBERSHIP."""

    volume: str
    pg: int
    membership_epoch: int


@dataclass
class HydrateOp:
    """The end of a hydration (docs/membership.md): the page versions as of ``anchor`` are
    stored (PutVersionsOp), so the segment now holds the PG as of ``anchor``, a PG chain
    record a peer kept: SCL := anchor and log_floor := anchor if the segment's own chain
    is below it, then the SCL walk takes the records above it that are already here.
    Dropped if a truncation happened since the pages were fetched (``generation``)."""

    volume: str
    pg: int
    generation: int
    anchor: int
    gc_horizon: int


@dataclass
class SetGcHorizonOp:
    volume: str
    horizon: int
    epoch: int


@dataclass
class PutVersionsOp:
    """Page versions built by the coalescer, GC or a repair. Dropped if a truncation
    happened since they were planned (``generation`` changed)."""

    volume: str
    pg: int
    generation: int
    versions: list  # [(page_id, lsn, bytes)]
    clears: list = field(default_factory=list)  # quarantined (page_id, lsn) this repairs
    #: Quarantined record LSNs that no peer holds any more (they collected them) and that a
    #: version among ``versions`` at or above them supersedes: their rows leave the
    #: quarantine; the record stays absent, so a read below that version is refused.
    superseded: list = field(default_factory=list)


@dataclass
class GcStepOp:
    volume: str
    pg: int
    generation: int
    put_versions: list  # [(page_id, lsn, bytes)]
    delete_records: list  # [(page_id, lsn)]
    delete_versions: list  # [(page_id, lsn)]
    done_horizon: int = 0  # when > 0: the pass is complete up to this horizon
    log_floor: int = 0


@dataclass
class FoldIndexOp:
    """Fold a segment's oldest page-index deltas into its per-page groups (background;
    ``max_deltas`` bounds the transaction: a fold's puts hold up the appends behind it)."""

    volume: str
    pg: int
    max_deltas: int = FOLD_DELTAS_MAX


@dataclass
class QuarantineOp:
    volume: str
    pg: int
    records: list  # [lsn]
    versions: list  # [(page_id, lsn)]
    runs: list = field(default_factory=list)  # [last lsn] of log runs with a bad directory


# --- Verification of incoming bytes (before anything is stored) ------------------------------


def verify_and_prepare(layout: VolumeLayout, vol_id: int, pg: int, buf: bytes,
                       membership_epoch: int = 0) -> VerifiedBatch:
    """Verify a PG batch and build what the write transaction stores, in one pass over
    the records (the Append hot path, run on the event loop while the writer thread waits
    for its fsync, so the transaction itself puts one value and joins index lists).

    Raises BadChecksumError, MalformedError or WrongPgError: the caller rejects the whole
    request and stores nothing of it.
    """
    if not 0 <= pg < layout.pg_count:
        raise MalformedError(f"pg {pg} out of range (volume has {layout.pg_count} PGs)")
    try:
        directory, pages, summary = materialiser.scan_batch_run(buf)
    except ChecksumError as exc:
        raise BadChecksumError(f"pg {pg}: {exc}") from None
    except FormatError as exc:
        raise MalformedError(f"pg {pg}: {exc}") from None
    scan = BatchScan(*summary)
    stripe = layout.stripe_pages
    count = layout.pg_count
    grows = layout.grows
    # Per distinct page, not per record: a batch touches few pages many times.
    for page_id, lsns in pages.items():
        if (layout.pg_of(page_id) if grows else (page_id // stripe) % count) != pg:
            raise WrongPgError(
                f"record lsn {lsns[0]}: page {page_id} belongs to pg {layout.pg_of(page_id)}, "
                f"not to the batch's pg {pg}")
    if scan.bad_backlink_lsn:
        raise MalformedError(
            f"record lsn {scan.bad_backlink_lsn}: a backlink is not below its own LSN")
    run = encode_run(directory, scan.count, scan.chained, buf) if scan.count else b""
    return VerifiedBatch(pg, membership_epoch, buf, run, pages, scan)


def verify_stored_record(key_lsn: int, value) -> bool:
    """True if a stored log value is exactly one intact record with the key's LSN."""
    try:
        refs = materialiser.scan_batch(value)
    except FormatError:
        return False
    return len(refs) == 1 and refs[0][2] == key_lsn and refs[0][1] == len(value)


def verify_stored_page(page_id: int, lsn: int, value) -> bool:
    """True if a stored page version is intact and is the page it claims to be."""
    return (len(value) == PAGE_SIZE and pagefmt.verify_checksum(value)
            and pagefmt.page_id(value) == page_id and pagefmt.page_lsn(value) == lsn)

