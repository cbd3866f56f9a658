"""Volume layout and quorum constants: which protection group (PG) holds which page.

A volume is an unbounded array of PAGE_SIZE pages. Page ids are striped over a fixed
number of PGs: ``stripe_pages`` consecutive pages go to one PG, the next stripe to the
next PG, wrapping around::

    pg_of(page_id) = (page_id // stripe_pages) % pg_count

so every PG grows as the volume grows and an MTR that touches neighbouring pages (a
B+tree split) usually spans several PGs. Each PG is stored as V = 6 segments, one on each
storage node, two per availability zone. Tests use small stripes so that many PGs and
cross-PG MTRs occur.

Quorum arithmetic (DESIGN.md section 3): a write is durable at Vw = 4 of V = 6 segments;
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
