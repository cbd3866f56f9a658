"""The storage-node process: ``aurora-lite storage-node --node-id sn1 --az az-a ...``.

Lifecycle::

    open LMDB (StorageNode)  ->  server on host:port (0 = any free port), through the
                                 transport seam (engine/transport, gRPC in a real process)
      -> health NOT_SERVING -> start group committer, gossip, background tasks
      -> health SERVING for "" and "aurora_pb.Storage" -> log "serving on host:port" and
         write the port to --port-file (atomically, once serving)
    SIGTERM / SIGINT:
      health NOT_SERVING -> stop gossip and background tasks -> server.stop(grace): in-flight
      RPCs finish, their commits included -> drain the group committer -> close LMDB -> exit 0
    SIGKILL: nothing acknowledged is lost, because every ack follows a synced LMDB commit
      (invariant 3); LMDB's copy-on-write B-tree needs no recovery on open.

Tuning knobs come from ``AURORA_SN_*`` environment variables (storage_node.node.Tuning).
Every log line carries the node id and AZ.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from aurora_pb import storage_pb2 as pb
from engine.transport import service_of
from storage_node import node as node_module
from storage_node.background import Background
from storage_node.gossip import Gossip
from storage_node.node import StorageNode, Tuning, node_logger
from storage_node.service import StorageService

SERVICE_NAME = "aurora_pb.Storage"
SHUTDOWN_GRACE_S = 5.0


class _TagForeignLines(logging.Filter):
    """Prefix log lines of other libraries (grpc, asyncio) with ``[node az]`` too."""

    def __init__(self, node_id: str, az: str) -> None:
        super().__init__()
        self.tag = f"[{node_id} {az}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("storage_node") and not getattr(record, "_node_tagged", False):
            record.msg = self.tag + str(record.msg)
            record._node_tagged = True
        return True


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    log = node_logger("storage_node.server", args.node_id, args.az)
    tuning = Tuning.from_env()
    node = StorageNode(args.node_id, args.az, args.data_dir, tuning)
    # The process entry point picks the transport: gRPC, with the cluster's simulated
    # latency on this node's calls to its peers (engine/transport/latency.py).
    from engine.transport.grpc_transport import GrpcTransport
    from engine.transport.latency import AzLatency
    latency = (AzLatency(args.az, args.node_id, path=args.cluster_config)
               if getattr(args, "cluster_config", None) else None)
    transport = GrpcTransport(args.node_id, latency)
    await node.start()
    try:
        server = await transport.serve(args.host, args.port,
                                       {service_of(pb, "Storage"): StorageService(node)})
    except (OSError, RuntimeError) as exc:
        log.error("cannot bind %s:%s: %s", args.host, args.port, exc)
        await node.close()
        return 1
    port = server.port
    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    gossip = Gossip(node, peers, transport)
    background = Background(node)
    gossip.start()
    background.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    metrics_server = None
    if getattr(args, "metrics_port", 0):
        from engine.metrics import registry_of, serve_metrics
        from storage_node.metrics import collector
        metrics_server = await serve_metrics(args.host, args.metrics_port, registry_of(collector(node)))

    await server.set_serving(True)
    log.info("serving on %s:%d (data dir %s, %d peers, materialiser %s)", args.host, port,
             args.data_dir, len(peers), _materialiser_name())
    if args.port_file:
        _write_port_file(args.port_file, port)
    # Everything built at start (modules, grpc, the store's mirrors) lives until exit:
    # move it out of the collector's sight, so full collections stay cheap.
    gc.freeze()

    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    await server.set_serving(False)
    if metrics_server is not None:
        await metrics_server.close()
    await gossip.close()
    await background.close()
    await server.stop(SHUTDOWN_GRACE_S)
    await node.close()
    log.info("stopped cleanly")
    return 0


def _materialiser_name() -> str:
    from engine import materialiser
    return materialiser.IMPLEMENTATION


#: The GIL switch interval of a storage-node process. The LMDB writer thread gives up the
#: GIL at every transaction begin and commit (fsync); with CPython's default 5 ms interval
#: it then waits up to 5 ms for the event-loop thread each time (a convoy): measured, that
#: tripled the wall time of a write transaction under load. 0.5 ms keeps handoffs short.
GIL_SWITCH_INTERVAL_S = 0.0005


#: Cyclic-GC thresholds of a storage-node process. An Append of 256 records allocates
#: ~800 tuples (record headers, LMDB items) that are garbage a few ms later through
#: reference counting alone; with CPython's default (700, 10, 10) that ran a collection
#: per request, each walking the 32 requests in flight: measured, 17% of the node's CPU
#: at 256 records per batch, all of it holding the GIL. Real cycles (rare here) are
#: still collected, just after more allocations.
GC_THRESHOLDS = (50_000, 20, 10)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``aurora-lite storage-node`` (engine/cli/__init__.py); returns the exit code."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)
    tag = f"[{args.node_id} {args.az}]"
    handlers = logging.getLogger().handlers
    if handlers and all(tag in (getattr(h.formatter, "_fmt", "") or "") for h in handlers):
        node_module.PREFIX_LINES = False  # the format already carries the tag
    else:
        tagger = _TagForeignLines(args.node_id, args.az)
        for handler in handlers:
            handler.addFilter(tagger)
    return asyncio.run(serve(args))
