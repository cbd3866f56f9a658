"""Quorum bookkeeping: acks -> SCL -> PGCL -> VCL -> VDL, and commit release. No I/O.

Like etcd's raft core, this is a plain state machine: the storage driver feeds it the
records it sent and the acks it got, and asks it questions. It can be tested exhaustively
and handed to students as a lab (tests/test_quorum.py).

Definitions (docs/glossary.md, [P17] 4.1, [P18] 2.3)::

    SCL(node, pg)  reported by a node in every ack: highest LSN up to which its segment of
                   pg holds every record of pg (invariant 4).
    PGCL(pg)       the Vw-th highest SCL among the V segments of pg: the highest LSN that
                   4 of 6 segments hold completely (invariant 5).
    VCL            highest LSN below which every record, in every PG, is at or below its
                   PG's PGCL, i.e. met write quorum.
    VDL            highest CPL <= VCL. Commits, reads and replicas key off VDL.

Worked example 1 [P17 4.1]: CPLs at 900, 1000 and 1100, log complete up to 1007:
VCL = 1007, VDL = 1000.
Worked example 2 [P18 2.3]: PG1 holds the odd LSNs, PG2 the even ones; PGCL(PG1) = 103,
PGCL(PG2) = 104. Record 105 (PG1) is above PGCL(PG1), so VCL = 104.

How VCL is found: the tracker keeps the records not yet known durable in LSN order. After
an ack raises some PGCL, it pops records from the front while each is at or below its PG's
PGCL. VCL is then just below the first record still pending (or the newest record sent
if none is). Each record is pushed once and popped once, so the work per record is O(1).

Membership changes [P18 4.1] (docs/membership.md, invariant 17): each PG has a membership
epoch and a member set (six segment names, 2 per AZ). To replace segment F of ABCDEF by G,
the PG passes through a TRANSITIONAL epoch with two sets, old ABCDEF and new ABCDEG: a
record is durable when Vw = 4 of the old set AND 4 of the new set hold it (PGCL = the
lower of the two sets' 4th-highest SCLs), and a read or recovery needs Vr = 3 of either
set. Once G holds everything up to the PGCL, the PG moves to ABCDEG alone under the next
epoch. A second failure during a change is one more transition (epoch + 1, the new set
changed again). A segment that comes back WIPED under its old name (the fleet of six: no
spare, so it rebuilds in place) is "forgotten": the SCLs it reported before the wipe no
longer count, since its disk no longer holds them. PGCL never moves back within a volume
epoch (invariant 5): records already declared durable stay durable; only new records
need the transitional quorum. Worked example, one PG, old ABCDEF and new ABCDEG::

    SCL  A 10  B 10  C 9  D 8  E 8  F 10  G 0
    old set ABCDEF: 4th highest = 9 ; new set ABCDEG: 4th highest = 8  ->  PGCL 8

Invariant 5: none of SCL, PGCL, VCL, VDL ever moves backwards within an epoch; an SCL
lower than one already seen from the same node (a reordered reply) is ignored. The checks
that guard it raise InvariantViolation (engine/errors.py), not ``assert``, so they hold
under ``python -O`` too.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Iterable, Mapping

from engine import hooks
from engine.errors import InvariantViolation
from engine.format.volume import V, VR, VW

# Test-only planted bug (engine/hooks.py): PGCL one segment short of Vw.
_PGCL_RANK = VW - 1 if hooks.vdl_short_quorum() else VW


class QuorumTracker:
    """Turns per-node SCL acks into PGCL, VCL and VDL for one volume epoch.

    ``start_lsn`` is the durable starting point (0 for a new volume, the recovered VDL
    after recovery): everything at or below it is durable and consistent.
    ``pg_members`` says which V nodes hold each PG (a fleet, docs/fleet.md); without it
    every PG is on the V ``nodes``. PGCL counts only a PG's own members (invariant 15).
    """

    def __init__(self, nodes: Iterable[str], start_lsn: int = 0,
                 pg_tails: dict[int, int] | None = None,
                 pg_members: Mapping[int, Iterable[str]] | None = None) -> None:
        self.nodes = tuple(nodes)
        self.pg_members = {pg: tuple(m) for pg, m in (pg_members or {}).items()}
        if not self.pg_members:
            assert len(self.nodes) == V, f"a PG has {V} segments, got nodes {self.nodes}"
        for pg, members in self.pg_members.items():
            assert len(set(members)) == V, f"PG {pg} has {V} segments, got {members}"
        self.scl: dict[tuple[str, int], int] = {}      # (node, pg) -> highest SCL reported
        self.pgcl: dict[int, int] = {}                  # pg -> PG complete LSN
        self.vcl = start_lsn
        self.vdl = start_lsn
        self.last_sent_lsn = start_lsn
        # Records not yet at write quorum, in LSN order: (lsn, pg, is_cpl).
        self._pending: deque[tuple[int, int, bool]] = deque()
        # Records at write quorum but above VDL: (lsn, pg). Drained into vdl_tails.
        self._durable_above_vdl: deque[tuple[int, int]] = deque()
        # pg -> LSN of the newest record of that PG at or below VDL (the PG's tail as
        # seen by a reader at read point VDL; see ReadPage.min_scl).
        self.vdl_tails: dict[int, int] = dict(pg_tails or {})
        # pg -> its membership (membership epoch, member sets); a PG not listed is at
        # epoch 0 with ``nodes`` as its one set (invariant 17, set_membership).
        self.membership: dict[int, PgView] = {}

    # --- Feeding -----------------------------------------------------------------------

    def record_sent(self, lsn: int, pg: int, is_cpl: bool) -> None:
        """Register a record that was (or is about to be) shipped, in LSN order."""
        if lsn <= self.last_sent_lsn:
            raise InvariantViolation(5, f"records must be registered in LSN order ({lsn} <= "
                                        f"{self.last_sent_lsn}): VCL would skip a record")
        self.last_sent_lsn = lsn
        self._pending.append((lsn, pg, is_cpl))

    def set_membership(self, pg: int, epoch: int, members: Iterable[str],
                       new_members: Iterable[str] | None = None,
                       forget: Iterable[str] = ()) -> None:
        """The PG moves to membership ``epoch``: ``members`` alone, or the transition
        ``members`` (old) -> ``new_members`` (new). ``forget``: members whose earlier SCLs
        no longer count (wiped; they start again from 0). An epoch at or below the PG's
        current one is ignored (a late or repeated message)."""
        view = self.membership.get(pg)
        if view is not None and epoch <= view.epoch:
            return
        new = PgView(epoch, tuple(members), None if new_members is None else tuple(new_members))
        for s in new.sets():
            if len(s) != V or len(set(s)) != V:
                raise ValueError(f"PG {pg}: a member set has {V} distinct segments, got {s}")
        self.membership[pg] = new
        for name in forget:
            self.scl.pop((name, pg), None)

    def pg_view(self, pg: int) -> "PgView":
        """The PG's membership: epoch and member set(s) (epoch 0: the tracker's nodes)."""
        return self.membership.get(pg) or PgView(0, self.segments(pg), None)

    def write_quorum(self, pg: int, holders: Iterable[str]) -> bool:
        """True if ``holders`` are a write quorum of pg now: Vw of every member set."""
        held = set(holders)
        return all(len(held & set(s)) >= VW for s in self.pg_view(pg).sets())

    def read_quorum(self, pg: int, responders: Iterable[str]) -> bool:
        """True if ``responders`` are a read (recovery) quorum of pg: Vr of ANY member set."""
        got = set(responders)
        return any(len(got & set(s)) >= VR for s in self.pg_view(pg).sets())

    def ack(self, node: str, pg: int, scl: int) -> bool:
        """A node reports its SCL for pg. Returns True if VDL moved forward."""
        key = (node, pg)
        if scl <= self.scl.get(key, 0):
            return False  # nothing new, or a reordered older reply (invariant 5)
        view = self.membership.get(pg)
        if view is not None and not view.has(node):
            return False  # no longer (or not yet) a member of pg: its ack counts nowhere
        self.scl[key] = scl
        new_pgcl = self._pgcl(pg)
        if new_pgcl <= self.pgcl.get(pg, 0):
            return False
        self.pgcl[pg] = new_pgcl
        return self._advance()

    # --- Questions ---------------------------------------------------------------------

    def pending_count(self) -> int:
        """Records sent but not yet at write quorum."""
        return len(self._pending)

    def segments(self, pg: int) -> tuple[str, ...]:
        """The V nodes that hold ``pg``."""
        return self.pg_members.get(pg, self.nodes)

    def node_scl(self, node: str, pg: int) -> int:
        return self.scl.get((node, pg), 0)

    def min_scl_for_read(self, pg: int) -> int:
        """Lowest segment SCL that can serve a read of ``pg`` at read point VDL."""
        return self.vdl_tails.get(pg, 0)

    def snapshot(self) -> dict[str, Any]:
        """The state as plain data, for status output and tests."""
        return {
            "vcl": self.vcl, "vdl": self.vdl, "last_sent_lsn": self.last_sent_lsn,
            "pending": len(self._pending), "pgcl": dict(self.pgcl),
            "scl": {f"{n}/{p}": s for (n, p), s in sorted(self.scl.items())},
            "membership": {pg: {"epoch": v.epoch, "members": list(v.members),
                                "new_members": None if v.new_members is None else list(v.new_members)}
                           for pg, v in sorted(self.membership.items())},
        }

    # --- Internals ---------------------------------------------------------------------

    def _pgcl(self, pg: int) -> int:
        """PGCL under the PG's membership: the Vw-th highest SCL of its one set, or in a
        transition the lower of the two sets' (a write needs Vw of BOTH, invariant 17)."""
        view = self.membership.get(pg)
        if view is None:
            return self._quorum_scl(pg)
        return min(self._rank_scl(pg, s) for s in view.sets())

    def _rank_scl(self, pg: int, members: tuple) -> int:
        scls = sorted((self.scl.get((n, pg), 0) for n in members), reverse=True)
        return scls[_PGCL_RANK - 1]

    def _quorum_scl(self, pg: int) -> int:
        """The VW-th highest SCL of pg's segments (0 if fewer than VW have reported)."""
        # BEGIN LAB 1: PGCL: the Vw-th highest SCL among the segments of pg (use _PGCL_RANK)
        scls = sorted((self.scl.get((n, pg), 0) for n in self.segments(pg)), reverse=True)
        return scls[_PGCL_RANK - 1]
        # END LAB 1

    def _advance(self) -> bool:
        old_vdl = self.vdl
        old_vcl = self.vcl
        # BEGIN LAB 1: pop records at or below their PG's PGCL; set VDL at each CPL popped, then VCL
        pending = self._pending
        while pending:
            lsn, pg, is_cpl = pending[0]
            if lsn > self.pgcl.get(pg, 0):
                break
            pending.popleft()
            self._durable_above_vdl.append((lsn, pg))
            if is_cpl:
                self.vdl = lsn
        self.vcl = pending[0][0] - 1 if pending else self.last_sent_lsn
        # END LAB 1
        if self.vdl > self.vcl:
            raise InvariantViolation(5, f"VDL {self.vdl} above VCL {self.vcl}")
        if self.vcl < old_vcl or self.vdl < old_vdl:
            raise InvariantViolation(5, f"VCL/VDL moved back within an epoch: VCL {old_vcl} -> "
                                        f"{self.vcl}, VDL {old_vdl} -> {self.vdl}")
        if self.vdl != old_vdl:
            drained = self._durable_above_vdl
            while drained and drained[0][0] <= self.vdl:
                lsn, pg = drained.popleft()
                self.vdl_tails[pg] = lsn
        return self.vdl > old_vdl


class PgView:
    """A PG's membership as the quorum core sees it: epoch, the member set, and in a
    transitional epoch the new set beside the old one (invariant 17)."""

    __slots__ = ("epoch", "members", "new_members")

    def __init__(self, epoch: int, members: tuple, new_members: tuple | None) -> None:
        self.epoch = epoch
        self.members = members
        self.new_members = new_members

    @property
    def transitional(self) -> bool:
        return self.new_members is not None

    def sets(self) -> tuple:
        return (self.members,) if self.new_members is None else (self.members, self.new_members)

    def has(self, name: str) -> bool:
        return name in self.members or (self.new_members is not None and name in self.new_members)

    def __repr__(self) -> str:
        if self.new_members is None:
            return f"PgView(epoch {self.epoch}: {','.join(self.members)})"
        return (f"PgView(epoch {self.epoch}: {','.join(self.members)} -> "
                f"{','.join(self.new_members)})")


class CommitQueue:
    """Waiters keyed by LSN, released in LSN order once VDL reaches them (invariant 2).

    The driver puts a token (an asyncio.Future, in practice) per committing MTR and, after
    every ack that moved VDL, takes the tokens whose LSN <= VDL. One ack can release many
    commits: that is group commit without a timer.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, lsn: int, token: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (lsn, self._seq, token))

    def release(self, vdl: int) -> list[Any]:
        """Remove and return every token whose LSN <= vdl, lowest LSN first."""
        # BEGIN LAB 1: commit release: pop every token with LSN <= vdl from the heap, lowest first
        out = []
        heap = self._heap
        while heap and heap[0][0] <= vdl:
            out.append(heapq.heappop(heap)[2])
        return out
        # END LAB 1

    def drain(self) -> list[Any]:
        """Remove and return every token (on shutdown or fencing)."""
        out = [t for _, _, t in sorted(self._heap)]
        self._heap.clear()
        return out
