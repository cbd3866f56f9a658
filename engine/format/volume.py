"""Volume layout and quorum constants: which protection group (PG) holds which page.

A volume is an unbounded array of PAGE_SIZE pages. Page ids are striped over a fixed
number of PGs: ``stripe_pages`` consecutive pages go to one PG, the next stripe to the
next PG, wrapping around::

    pg_of(page_id) = (page_id // stripe_pages) % pg_count

so every PG grows as the volume grows and an MTR that touches neighbouring pages (a
B+tree split) usually spans several PGs. Each PG is stored as V = 6 segments, one on each
storage node, two per availability zone. Tests use small stripes so that many PGs and
cross-PG MTRs occur.

Growth (storage auto-scaling, docs/fleet.md): with ``pg_pages`` > 0 a PG holds at most
``pg_pages`` pages, and the volume is a row of extents of ``stripe_width`` PGs each; an
extent's pages are striped over its PGs exactly as above, and the next extent starts new
PGs::

    extent_pages   = stripe_width * pg_pages
    pg_of(page_id) = (page_id // extent_pages) * stripe_width
                     + (page_id // stripe_pages) % stripe_width

So the first extent (PGs 0..stripe_width-1) is today's layout, and the volume grows by
whole PGs as its pages do. ``pg_count`` is then the MAXIMUM PG count (a multiple of
stripe_width): page ids at or above ``page_limit`` = pg_count * pg_pages are refused
("volume full"), Aurora's 128 TB limit scaled down.

Quorum arithmetic (ARCHITECTURE.md, Invariants): a write is durable at Vw = 4 of V = 6 segments;
Vr = 3 are enough to read and to recover. Vr + Vw > V makes every read quorum overlap every
write quorum; 2 * Vw > V makes two write quorums overlap, so two writers cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass

V = 6   # segments per PG
VW = 4  # write quorum
VR = 3  # read / recovery quorum
assert VR + VW > V, "every read quorum must overlap every write quorum"
assert 2 * VW > V, "two write quorums must overlap"

AZS = ("az-a", "az-b", "az-c")
NODES_PER_AZ = 2
assert len(AZS) * NODES_PER_AZ == V
# AZ+1: losing one AZ leaves V - 2 = 4 >= VW (writes go on); losing an AZ and one more
# node leaves 3 >= VR (reads and recovery go on, writes wait).
assert V - NODES_PER_AZ >= VW
assert V - NODES_PER_AZ - 1 >= VR

DEFAULT_PG_COUNT = 8
DEFAULT_STRIPE_PAGES = 64
# Growth (`up` on a new data dir): 16 MiB PGs striped 8 wide, at most 64 PGs (1 GiB).
DEFAULT_PG_SIZE_MB = 16
DEFAULT_STRIPE_WIDTH = 8
DEFAULT_MAX_PGS = 64

# Bounds on what a request may ask of a storage node (storage_node/validate.py checks
# them where requests arrive; a request beyond one is refused as MALFORMED and names it).
# Each is far above what aurora-lite uses (8 PGs of 64-page stripes by default) and far
# below what would make a node build millions of rows in one write transaction.
PG_COUNT_MAX = 1024            # PGs of one volume: CreateVolume writes one row per PG
STRIPE_PAGES_MAX = 1 << 20     # pages per stripe (8 GiB of pages in one PG's stripe)
VOLUME_NAME_MAX_BYTES = 255    # a volume name is an LMDB key (LMDB's limit is 511 bytes)
APPEND_BATCHES_MAX = PG_COUNT_MAX  # PG batches in one Append (one per PG)
TRUNCATION_SET_MAX = 4096      # ranges in one truncation set (Truncate, FindCommit)


@dataclass(frozen=True)
class VolumeLayout:
    """How a volume's pages map to PGs (see the module doc).

    ``pg_pages`` 0: a fixed set of ``pg_count`` PGs, striped (the layout before growth).
    ``pg_pages`` > 0: growth; ``pg_count`` is the maximum, PGs come in extents of
    ``stripe_width``.
    """

    pg_count: int = DEFAULT_PG_COUNT
    stripe_pages: int = DEFAULT_STRIPE_PAGES
    pg_pages: int = 0
    stripe_width: int = 0

    def __post_init__(self) -> None:
        if self.pg_count < 1 or self.stripe_pages < 1:
            raise ValueError(f"pg_count and stripe_pages must be >= 1, got {self}")
        if self.pg_pages or self.stripe_width:
            if self.pg_pages < self.stripe_pages or self.pg_pages % self.stripe_pages:
                raise ValueError(f"a PG's pages ({self.pg_pages}) must be a whole number of "
                                 f"stripes of {self.stripe_pages} pages")
            if self.stripe_width < 1 or self.pg_count % self.stripe_width:
                raise ValueError(f"the maximum PG count ({self.pg_count}) must be a multiple "
                                 f"of the stripe width ({self.stripe_width})")

    @property
    def grows(self) -> bool:
        """True if PGs are added as the volume grows (``pg_pages`` > 0)."""
        return self.pg_pages > 0

    @property
    def page_limit(self) -> int | None:
        """First page id beyond the maximum PG count (None: no limit but page ids')."""
        return self.pg_count * self.pg_pages if self.pg_pages else None

    def pg_of(self, page_id: int) -> int:
        """The PG that stores ``page_id``."""
        if not self.pg_pages:
            return (page_id // self.stripe_pages) % self.pg_count
        width = self.stripe_width
        return (page_id // (width * self.pg_pages)) * width + (page_id // self.stripe_pages) % width
