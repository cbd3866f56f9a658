"""Simulated AZ latency: the one-way delay of each link, from the cluster's latency model.

docs/decisions.md, design choice D5: simulated AZs are real failure domains with real latency. cluster.json's
``latency`` object (format and model in engine/format/cluster_config.py, ``Latency``) gives
a delay within an AZ, across AZs, per AZ and per slowed node. A transport built with an
``AzLatency`` sleeps ``one_way_s(address)`` before each unary request and again before its
reply (engine/transport/__init__.py, promise 5), so quorum behaviour and outliers show on
one machine.

``AzLatency`` knows this process's AZ and name, and each storage node's address, AZ and
name. Built with ``path`` (the cluster.json of a running cluster) it re-reads the file
when it changes (engine/format/watched_json.py), so `aurora-lite net delay` reaches running
processes within half a second. Addresses it does not know (an instance, a client) get no
delay.

No grpc, no asyncio: any transport, the simulator's included, can use it.
"""

from __future__ import annotations

import logging

from engine.format.cluster_config import ClusterConfig, Latency
from engine.format.watched_json import CHECK_INTERVAL_S, WatchedJson

log = logging.getLogger(__name__)


class AzLatency:
    """``one_way_s(address)`` from this process (``az``, ``name``) to each storage node."""

    def __init__(self, az: str, name: str | None = None, *, model: Latency | None = None,
                 nodes: list | None = None, path: str | None = None,
                 interval_s: float = CHECK_INTERVAL_S) -> None:
        self.az = az
        self.name = name
        self.model = model or Latency()
        self._nodes: dict[str, tuple[str, str]] = {}      # address -> (az, name)
        self.set_nodes(nodes or [])
        self._watch = WatchedJson(path, interval_s) if path else None
        if self._watch is not None:
            self._reload(force=True)

    def set_nodes(self, nodes: list) -> None:
        """The storage nodes' NodeInfo (name, az, address) whose links are delayed."""
        self._nodes = {n.address: (n.az, n.name) for n in nodes}

    def set_model(self, model: Latency) -> None:
        if model != self.model:
            log.info("simulated latency: intra-AZ %g ms, cross-AZ %g ms, extra %s, slow nodes %s",
                     model.intra_az_ms, model.cross_az_ms, model.extra_az_ms or "none",
                     model.extra_node_ms or "none")
        self.model = model

    def _reload(self, force: bool = False) -> None:
        data = self._watch.poll(force=force)
        if not data:
            return
        try:
            config = ClusterConfig.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("cannot read the latency of %s: %s", self._watch.path, exc)
            return
        self.set_nodes(config.storage_nodes)
        self.set_model(config.latency)

    def one_way_ms(self, address: str) -> float:
        if self._watch is not None:
            self._reload()
        peer = self._nodes.get(address)
        if peer is None:
            return 0.0
        to_az, to_name = peer
        return self.model.one_way_ms(self.az, to_az, from_node=self.name, to_node=to_name)

    def one_way_s(self, address: str) -> float:
        return self.one_way_ms(address) / 1000.0
