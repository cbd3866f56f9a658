"""The cluster config file: where the storage nodes are, the volume layout, LAL, latency.

The launcher writes it as ``cluster.json`` in the data dir once the storage nodes are
serving; `aurora-lite writer --cluster FILE` and the tests read it. Example::

    {
      "volume": "main",
      "pg_count": 64, "stripe_pages": 64, "pg_pages": 2048, "stripe_width": 8,
      "lal": 100000,
      "storage_nodes": [{"name": "sn1", "az": "az-a", "address": "127.0.0.1:40001"}, ...],
      "placement": {"volumes": {"main": [{"pg": 0, "membership_epoch": 1,
                                          "members": ["sn1", "sn2", ...]}, ...]}},
      "latency": {"intra_az_ms": 0.25, "cross_az_ms": 1.0, "extra_az_ms": {"az-b": 50},
                  "extra_node_ms": {"sn3": 50}}
    }

``pg_pages`` and ``stripe_width`` (optional, 0 when absent) turn on growth: PGs of
``pg_pages`` pages, ``pg_count`` of them at most (engine/format/volume.py).

``storage_nodes`` lists the fleet: six nodes or more, a multiple of three, the same number
in each AZ (engine/format/placement.py). ``placement`` says which six nodes hold each PG of
each volume (docs/fleet.md); a config without it (written before the fleet existed, or by
a test) places every PG deterministically with ``place_pg``, which on six nodes puts every
PG on all six, as before.

Latency model (docs/decisions.md, design choice D5): a one-way delay between AZs and between an instance
and each AZ. ``intra_az_ms`` applies within an AZ, ``cross_az_ms`` across AZs, and
``extra_az_ms`` adds a per-AZ delay on every link into that AZ (`aurora-lite net delay`).
``extra_node_ms`` adds a per-node delay on every link into that one storage node (and on
the node's own calls to its peers): a slow outlier (`aurora-lite net delay --node`), which
the 4/6 write quorum should hide (bench/bench_outlier.py). ``extra_node_ms`` is optional in
the file; a config without it has no slow node.
Running processes pick a change up within 0.5 s: the transport's latency model
(engine/transport/latency.py) re-reads the file when it changes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from engine.format.placement import Placement, PgMembership, check_fleet_size, place_pg
from engine.format.volume import DEFAULT_PG_COUNT, DEFAULT_STRIPE_PAGES, VolumeLayout


@dataclass(frozen=True)
class NodeInfo:
    """One storage node of the cluster."""

    name: str
    az: str
    address: str


DEFAULT_LAL = 100_000
DEFAULT_INTRA_AZ_MS = 0.25
DEFAULT_CROSS_AZ_MS = 1.0


@dataclass
class Latency:
    intra_az_ms: float = DEFAULT_INTRA_AZ_MS
    cross_az_ms: float = DEFAULT_CROSS_AZ_MS
    extra_az_ms: dict[str, float] = field(default_factory=dict)
    extra_node_ms: dict[str, float] = field(default_factory=dict)   # node name -> extra ms

    def one_way_ms(self, from_az: str, to_az: str, *, from_node: str | None = None,
                   to_node: str | None = None) -> float:
        """One-way delay of a link; naming its end nodes adds their ``extra_node_ms``."""
        base = self.intra_az_ms if from_az == to_az else self.cross_az_ms
        return base + self.extra_az_ms.get(to_az, 0.0) + (
            self.extra_az_ms.get(from_az, 0.0) if from_az != to_az else 0.0) + (
            self.extra_node_ms.get(to_node, 0.0) if to_node else 0.0) + (
            self.extra_node_ms.get(from_node, 0.0) if from_node and from_node != to_node else 0.0)


@dataclass
class ClusterConfig:
    storage_nodes: list[NodeInfo]
    volume: str = "main"
    pg_count: int = DEFAULT_PG_COUNT
    stripe_pages: int = DEFAULT_STRIPE_PAGES
    pg_pages: int = 0          # growth: pages per PG (0: a fixed set of pg_count PGs)
    stripe_width: int = 0      # growth: PGs per extent
    lal: int = DEFAULT_LAL
    latency: Latency = field(default_factory=Latency)
    placement: Placement = field(default_factory=Placement)

    @property
    def layout(self) -> VolumeLayout:
        return VolumeLayout(self.pg_count, self.stripe_pages, self.pg_pages, self.stripe_width)

    def node_azs(self) -> dict[str, str]:
        """{node name: AZ} of the fleet."""
        return {n.name: n.az for n in self.storage_nodes}

    def memberships(self, volume: str | None = None) -> dict[int, PgMembership]:
        """{pg: membership} of every PG of ``volume`` (default: the cluster's volume).

        PGs the placement does not list are placed here, deterministically (least-loaded
        first, ties by name), and recorded in ``self.placement``: on six nodes that is all
        six for every PG. The launcher places and saves every PG when it writes the file,
        so a process reading it never places anything itself.
        """
        volume = volume or self.volume
        nodes = self.node_azs()
        for pg in range(self.pg_count):
            if self.placement.get(volume, pg) is None:
                self.placement.put(volume, place_pg(pg, nodes, self.placement.segment_counts(nodes)))
        pgs = self.placement.pgs(volume)
        for m in pgs.values():
            m.check_azs(nodes)
        return pgs

    def to_json(self) -> dict:
        return {
            "volume": self.volume, "pg_count": self.pg_count, "stripe_pages": self.stripe_pages,
            "pg_pages": self.pg_pages, "stripe_width": self.stripe_width,
            "lal": self.lal,
            "storage_nodes": [{"name": n.name, "az": n.az, "address": n.address}
                              for n in self.storage_nodes],
            "latency": {"intra_az_ms": self.latency.intra_az_ms,
                        "cross_az_ms": self.latency.cross_az_ms,
                        "extra_az_ms": dict(self.latency.extra_az_ms),
                        "extra_node_ms": dict(self.latency.extra_node_ms)},
            "placement": self.placement.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "ClusterConfig":
        nodes = [NodeInfo(n["name"], n["az"], n["address"]) for n in data["storage_nodes"]]
        check_fleet_size(len(nodes))
        lat = data.get("latency", {})
        return cls(
            storage_nodes=nodes, volume=data.get("volume", "main"),
            pg_count=int(data.get("pg_count", DEFAULT_PG_COUNT)),
            stripe_pages=int(data.get("stripe_pages", DEFAULT_STRIPE_PAGES)),
            pg_pages=int(data.get("pg_pages", 0)), stripe_width=int(data.get("stripe_width", 0)),
            lal=int(data.get("lal", DEFAULT_LAL)),
            latency=Latency(float(lat.get("intra_az_ms", DEFAULT_INTRA_AZ_MS)),
                            float(lat.get("cross_az_ms", DEFAULT_CROSS_AZ_MS)),
                            {k: float(v) for k, v in lat.get("extra_az_ms", {}).items()},
                            {k: float(v) for k, v in lat.get("extra_node_ms", {}).items()}),
            placement=Placement.from_json(data.get("placement")))

    @classmethod
    def load(cls, path: str) -> "ClusterConfig":
        with open(path) as f:
            return cls.from_json(json.load(f))

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(tmp, path)
