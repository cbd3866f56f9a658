"""Simulated AZ latency on a storage node's calls to its peers (gossip).

The writer's storage driver delays its own RPCs (engine/writer/storage_driver.py); this module
does the same for node-to-node traffic. ``PeerLatency`` reads the cluster config file
(DATA_DIR/cluster.json, written by the control plane; format in engine/format/cluster_config.py)
for each peer's AZ and the latency model, and re-reads it when it changes, so
`aurora-lite net delay` reaches running nodes within ``CHECK_INTERVAL_S``.
``delay_interceptors(latency, peer)`` gives the gRPC channel interceptors that sleep the
one-way delay before each request and after each reply.

It reads the JSON itself instead of importing engine.format.cluster_config: storage_node/ uses
only engine's format and materialiser modules (DESIGN.md section 4). The model is the same
as ``engine.format.cluster_config.Latency.one_way_ms``: intra_az_ms within an AZ, cross_az_ms
across, plus extra_az_ms of the destination AZ (and of the source AZ across AZs), plus
extra_node_ms of the peer and of this node (``name``), a slow outlier node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import grpc

CHECK_INTERVAL_S = 0.5

log = logging.getLogger("storage_node.latency")


class PeerLatency:
    """One-way delay in seconds from this node (in ``az``) to a peer address."""

    def __init__(self, path: str, az: str, interval_s: float = CHECK_INTERVAL_S,
                 name: str | None = None) -> None:
        self.path = path
        self.az = az
        self.name = name          # this node's name: its own extra_node_ms slows its calls too
        self.interval_s = interval_s
        self._next_check_s = 0.0
        self._signature = None
        self._peer_az: dict[str, str] = {}
        self._intra_ms = 0.0
        self._cross_ms = 0.0
        self._extra_ms: dict[str, float] = {}
        self._peer_name: dict[str, str] = {}
        self._node_extra_ms: dict[str, float] = {}
        self._check()

    def _check(self) -> None:
        now = time.monotonic()
        if now < self._next_check_s:
            return
        self._next_check_s = now + self.interval_s
        try:
            st = os.stat(self.path)
        except OSError:
            return
        signature = (st.st_mtime_ns, st.st_ino, st.st_size)
        if signature == self._signature:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
            lat = data.get("latency", {})
            peer_az = {n["address"]: n["az"] for n in data["storage_nodes"]}
            peer_name = {n["address"]: n["name"] for n in data["storage_nodes"]}
            node_extra = {k: float(v) for k, v in lat.get("extra_node_ms", {}).items()}
            intra, cross = float(lat.get("intra_az_ms", 0.0)), float(lat.get("cross_az_ms", 0.0))
            extra = {k: float(v) for k, v in lat.get("extra_az_ms", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read the latency of %s: %s", self.path, exc)
            return
        self._signature = signature
        changed = ((intra, cross, extra, node_extra)
                   != (self._intra_ms, self._cross_ms, self._extra_ms, self._node_extra_ms))
        self._peer_az, self._intra_ms, self._cross_ms, self._extra_ms = peer_az, intra, cross, extra
        self._peer_name, self._node_extra_ms = peer_name, node_extra
        if changed:
            log.info("simulated latency: intra-AZ %g ms, cross-AZ %g ms, extra %s, slow nodes %s",
                     intra, cross, extra or "none", node_extra or "none")

    def one_way_s(self, peer: str) -> float:
        self._check()
        to_az = self._peer_az.get(peer)
        if to_az is None:
            return 0.0
        if to_az == self.az:
            ms = self._intra_ms + self._extra_ms.get(to_az, 0.0)
        else:
            ms = self._cross_ms + self._extra_ms.get(to_az, 0.0) + self._extra_ms.get(self.az, 0.0)
        if self._node_extra_ms:
            ms += self._node_extra_ms.get(self._peer_name.get(peer, ""), 0.0)
            ms += self._node_extra_ms.get(self.name, 0.0) if self.name else 0.0
        return ms / 1000.0


class _DelayInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Sleeps the one-way delay before the request and after the reply."""

    def __init__(self, latency: PeerLatency, peer: str) -> None:
        self.latency = latency
        self.peer = peer

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        delay_s = self.latency.one_way_s(self.peer)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        call = await continuation(client_call_details, request)
        response = await call
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        return response


def delay_interceptors(latency: PeerLatency | None, peer: str) -> list:
    """Interceptors for a channel to ``peer`` ([] when no latency is simulated)."""
    return [] if latency is None else [_DelayInterceptor(latency, peer)]
