"""Volume layout and quorum constants: which protection group (PG) holds which page.

A volume is an unbounded array of PAGE_SIZE pages. Page ids are striped over a fixed
number of PGs: ``stripe_pages`` consecutive pages go to one PG, the next stripe to the
next PG, wrapping around::

    pg_of(page_id) = (page_id // stripe_pages) % pg_count

so every PG grows as the volume grows and an MTR that touches neighbouring pages (a
B+tree split) usually spans several PGs. Each PG is stored as V = 6 segments, one on each
storage node, two per availability zone. Tests use small stripes so that many PGs and
cross-PG MTRs occur.

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
    """How a volume's pages map to PGs."""

    pg_count: int = DEFAULT_PG_COUNT
    stripe_pages: int = DEFAULT_STRIPE_PAGES

    def __post_init__(self) -> None:
        if self.pg_count < 1 or self.stripe_pages < 1:
            raise ValueError(f"pg_count and stripe_pages must be >= 1, got {self}")

    def pg_of(self, page_id: int) -> int:
        """The PG that stores ``page_id``."""
        return (page_id // self.stripe_pages) % self.pg_count
