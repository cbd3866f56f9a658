"""Segment placement: which six storage nodes of the fleet hold each PG, and under which
membership epoch. Plain data and a pure placement function: no I/O (docs/fleet.md).

A fleet has N storage nodes (N >= 6, a multiple of 3), N / 3 per AZ, named sn1..snN in AZ
order (sn1..sn(N/3) in az-a, and so on; with N = 6 that is today's sn1, sn2 in az-a, sn3,
sn4 in az-b, sn5, sn6 in az-c). Each PG of a volume is stored as V = 6 segments on six
distinct nodes, two per AZ (AZ+1, ARCHITECTURE.md invariant 15). A PG's membership is::

    PgMembership(pg, epoch, members)   epoch: the membership epoch, >= 1 once placed
                                       members: six node names, two per AZ

and a ``Placement`` maps volume -> {pg: PgMembership}. Its JSON form (kept by the control
plane in cluster.json under "placement", and shown by `status --json`)::

    {"volumes": {"main": [{"pg": 0, "membership_epoch": 1,
                           "members": ["sn1", "sn2", "sn4", "sn5", "sn7", "sn8"]}, ...]}}

Placing a new PG (``place_pg``): in each AZ, take the two nodes holding the fewest
segments (over every volume), ties broken by node name in natural order (sn2 before
sn10). The same inputs always give the same members, so a placement can be recomputed and
checked, and the simulator stays deterministic. With six nodes every PG gets all six.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from engine.format.volume import AZS, NODES_PER_AZ, V

FLEET_NODES_MIN = V
FIRST_MEMBERSHIP_EPOCH = 1


def natural_key(name: str) -> tuple:
    """Sort key that orders sn2 before sn10 (digits compare as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def check_fleet_size(n_nodes: int) -> None:
    """ValueError unless ``n_nodes`` is a valid fleet size (>= 6, a multiple of 3)."""
    if n_nodes < FLEET_NODES_MIN or n_nodes % len(AZS):
        raise ValueError(f"a fleet has at least {FLEET_NODES_MIN} storage nodes and a multiple "
                         f"of {len(AZS)} (the same number in each AZ), not {n_nodes}")


def fleet_nodes(n_nodes: int) -> list[tuple[str, str]]:
    """[(name, az)] of a fleet of ``n_nodes``: sn1..snN, N / 3 consecutive names per AZ."""
    check_fleet_size(n_nodes)
    per_az = n_nodes // len(AZS)
    return [(f"sn{i + 1}", AZS[i // per_az]) for i in range(n_nodes)]


@dataclass(frozen=True)
class PgMembership:
    """One PG's segments: the six member nodes under membership epoch ``epoch``."""

    pg: int
    epoch: int
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        if self.pg < 0:
            raise ValueError(f"a PG number is >= 0, got {self.pg}")
        if self.epoch < FIRST_MEMBERSHIP_EPOCH:
            raise ValueError(f"PG {self.pg}: a membership epoch is >= {FIRST_MEMBERSHIP_EPOCH}, "
                             f"got {self.epoch}")
        if len(self.members) != V or len(set(self.members)) != V:
            raise ValueError(f"PG {self.pg}: a PG has {V} distinct member nodes, got "
                             f"{list(self.members)}")

    def to_json(self) -> dict:
        return {"pg": self.pg, "membership_epoch": self.epoch, "members": list(self.members)}

    @classmethod
    def from_json(cls, data: dict) -> "PgMembership":
        try:
            return cls(int(data["pg"]), int(data["membership_epoch"]),
                       tuple(str(m) for m in data["members"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a PG membership: {data!r} ({exc})") from None

    def check_azs(self, az_of: Mapping[str, str]) -> None:
        """ValueError unless the members are known nodes, two in each AZ."""
        unknown = [m for m in self.members if m not in az_of]
        if unknown:
            raise ValueError(f"PG {self.pg}: members {unknown} are not nodes of the fleet")
        for az in AZS:
            n = sum(1 for m in self.members if az_of[m] == az)
            if n != NODES_PER_AZ:
                raise ValueError(f"PG {self.pg}: {n} members in {az}, need {NODES_PER_AZ}")


class Placement:
    """volume -> {pg: PgMembership}. Mutable; the control plane is its one writer."""

    def __init__(self, volumes: Mapping[str, Mapping[int, PgMembership]] | None = None) -> None:
        self._volumes: dict[str, dict[int, PgMembership]] = {
            v: dict(pgs) for v, pgs in (volumes or {}).items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and self._volumes == other._volumes

    def __repr__(self) -> str:
        return f"Placement({self._volumes!r})"

    def volumes(self) -> list[str]:
        return sorted(self._volumes)

    def pgs(self, volume: str) -> dict[int, PgMembership]:
        """{pg: membership} of ``volume`` (a copy; empty if it has none placed)."""
        return dict(self._volumes.get(volume, {}))

    def get(self, volume: str, pg: int) -> PgMembership | None:
        return self._volumes.get(volume, {}).get(pg)

    def members(self, volume: str, pg: int) -> tuple[str, ...]:
        """The six members of ``pg``; KeyError if it is not placed."""
        membership = self.get(volume, pg)
        if membership is None:
            raise KeyError(f"PG {pg} of volume {volume!r} is not placed")
        return membership.members

    def put(self, volume: str, membership: PgMembership) -> None:
        """Record ``membership`` (a new PG, or a PG's next membership epoch)."""
        old = self.get(volume, membership.pg)
        if old is not None and membership.epoch < old.epoch:
            raise ValueError(f"PG {membership.pg} of {volume!r}: membership epoch "
                             f"{membership.epoch} is older than the recorded {old.epoch}")
        self._volumes.setdefault(volume, {})[membership.pg] = membership

    def segment_counts(self, nodes: Iterable[str] = ()) -> dict[str, int]:
        """Segments per node over every volume (nodes listed in ``nodes`` count from 0)."""
        counts = {n: 0 for n in nodes}
        for pgs in self._volumes.values():
            for membership in pgs.values():
                for m in membership.members:
                    counts[m] = counts.get(m, 0) + 1
        return counts

    def pgs_on(self, volume: str, node: str) -> list[int]:
        """The PGs of ``volume`` with a segment on ``node``, in order."""
        return sorted(pg for pg, m in self._volumes.get(volume, {}).items() if node in m.members)

    def to_json(self) -> dict:
        return {"volumes": {v: [self._volumes[v][pg].to_json() for pg in sorted(self._volumes[v])]
                            for v in sorted(self._volumes)}}

    @classmethod
    def from_json(cls, data: dict | None) -> "Placement":
        placement = cls()
        for volume, pgs in ((data or {}).get("volumes") or {}).items():
            for entry in pgs:
                placement.put(volume, PgMembership.from_json(entry))
        return placement


def place_pg(pg: int, nodes: Mapping[str, str], segment_counts: Mapping[str, int],
             exclude: Iterable[str] = ()) -> PgMembership:
    """A new PG's membership at epoch 1: in each AZ the NODES_PER_AZ least-loaded nodes.

    ``nodes`` maps node name -> AZ (the fleet); ``segment_counts`` the segments each node
    holds now (missing means 0); ``exclude`` nodes that must not be picked (failed ones).
    Ties are broken by natural name order, so the result is deterministic.
    """
    excluded = set(exclude)
    members: list[str] = []
    for az in AZS:
        candidates = sorted((n for n, a in nodes.items() if a == az and n not in excluded),
                            key=lambda n: (segment_counts.get(n, 0), natural_key(n)))
        if len(candidates) < NODES_PER_AZ:
            raise ValueError(f"cannot place PG {pg}: {az} has {len(candidates)} usable nodes, "
                             f"a PG needs {NODES_PER_AZ} per AZ")
        members.extend(sorted(candidates[:NODES_PER_AZ], key=natural_key))
    return PgMembership(pg, FIRST_MEMBERSHIP_EPOCH, tuple(members))


def pick_replacement(membership: PgMembership, leaving: str, nodes: Mapping[str, str],
                     segment_counts: Mapping[str, int], exclude: Iterable[str] = ()) -> str | None:
    """The least-loaded node of ``leaving``'s AZ that is not a member (nor excluded), or
    None if that AZ has no spare (a fleet of six)."""
    az = nodes[leaving]
    excluded = set(exclude) | set(membership.members)
    candidates = sorted((n for n, a in nodes.items() if a == az and n not in excluded),
                        key=lambda n: (segment_counts.get(n, 0), natural_key(n)))
    return candidates[0] if candidates else None
