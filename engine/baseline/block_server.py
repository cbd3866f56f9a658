"""A networked block server for the mirrored page-writing baseline: ``aurora-lite block-server``.

The baseline of the write-amplification benchmark (engine/baseline/mirrored.py, docs/benchmarks.md)
is mirrored MySQL's storage path [P17 Fig. 2]. Its storage is four of these processes::

    AZ a:  bs1 (primary's block server) --mirror--> bs2
    AZ b:  bs3 (standby's block server) --mirror--> bs4

A block server is a disk with a network port, nothing more: it stores opaque bytes at
(volume, area, offset) and acks a write only once it is durable. It knows no redo record,
no page format and no quorum. One that was started with ``--mirror ADDR`` also sends every
write it receives from a database to that mirror, in parallel with its own commit, and
acks only when both hold it (EBS mirrors inside its AZ before acking). A write that came
from a primary (``from_primary``) is not forwarded again.

Durability: one LMDB environment opened with sync; concurrent Write requests are
group-committed by the loop the storage nodes use too (engine/group_commit.py): one
writer task takes every pending request into ONE write transaction (synced commit) while
the next ones queue, so the batch size follows the load with no timer. The transaction
runs in a single-thread executor, never on the event loop.

LMDB key layout (one unnamed database)::

    OFFSET  SIZE  MEANING
    0       n     volume name, UTF-8
    n       1     0x00 separator
    n+1     1     area (aurora_pb.BlockArea: 1 redo, 2 binlog, 3 double-write, 4 page, 5 meta)
    n+2     8     offset, big-endian: redo/binlog: write slot (the log is circular, see
                  engine/baseline/mirrored.py); double-write: 0; page: page id; meta: 0
    value         the bytes of the write (a later write to the same key replaces them)

``lmdb_bytes_written`` counts key + value bytes of every put, as the storage nodes count
theirs, so the two can be compared per transaction.

Simulated latency: ``--mirror-delay-ms`` is the one-way delay on the link to the mirror
(engine/cluster_config.Latency: intra-AZ by default); the server sleeps it before sending
and after the reply, like engine/writer/storage_driver.py. ``Configure`` changes it on a running
server (the benchmark's slow-node variant adds the slow node's extra delay to every link
into it).

Lifecycle: open LMDB -> server (engine/transport, gRPC) -> health SERVING for "" and "aurora_pb.Block" ->
port file. SIGTERM/SIGINT: NOT_SERVING, finish in-flight RPCs, drain the committer, close.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import struct

import lmdb

from aurora_pb import block_pb2 as pb
from engine.baseline.io_count import block_request_ios
from engine.errors import RpcError
from engine.group_commit import GroupCommitLoop
from engine.transport import Transport, service_of

log = logging.getLogger(__name__)

SERVICE_NAME = "aurora_pb.Block"
SHUTDOWN_GRACE_S = 5.0
MAP_SIZE_DEFAULT = 4 << 30          # sparse; the areas are bounded (circular logs, pages)
TXN_REQUESTS_MAX = 512              # Write requests in one LMDB transaction
PENDING_REQUESTS_MAX = 2048         # queued requests; submitters wait above it
MIRROR_TIMEOUT_S = 10.0
BLOCK = service_of(pb, "Block")
AREAS = frozenset(v.number for v in pb.BlockArea.DESCRIPTOR.values if v.number != 0)
_OFFSET = struct.Struct(">Q")


def block_key(volume: str, area: int, offset: int) -> bytes:
    """The LMDB key of a block (see the module doc's layout table)."""
    return volume.encode("utf-8") + b"\0" + bytes((area,)) + _OFFSET.pack(offset)


class BlockStore:
    """The LMDB environment of one block server. Writes only from the committer thread."""

    def __init__(self, path: str, map_size: int = MAP_SIZE_DEFAULT) -> None:
        os.makedirs(path, exist_ok=True)
        # sync=True, metasync=True: a commit returns once the data is on disk.
        self.env = lmdb.open(path, map_size=map_size, sync=True, metasync=True, max_dbs=0)
        self.lmdb_bytes_written = 0
        self.write_txns = 0

    def put_all(self, item_lists: list[list[tuple[bytes, bytes]]]) -> int:
        """Put every (key, value) of every list in ONE synced transaction; returns bytes."""
        nbytes = 0
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor()
            for items in item_lists:
                cursor.putmulti(items)
                nbytes += sum(len(k) + len(v) for k, v in items)
        self.lmdb_bytes_written += nbytes
        self.write_txns += 1
        return nbytes

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            value = txn.get(key)
            return None if value is None else bytes(value)

    def close(self) -> None:
        self.env.close()


class GroupCommitter(GroupCommitLoop):
    """One writer task: every pending request goes into the next LMDB transaction
    (the loop of engine/group_commit.py, foreground lane only)."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        super().__init__(self._put_all, owner="block server", logger=log,
                         txn_items_max=TXN_REQUESTS_MAX, fg_pending_max=PENDING_REQUESTS_MAX,
                         task_name="block-commit", thread_name="lmdb-writer")

    def _put_all(self, item_lists: list[list[tuple[bytes, bytes]]]) -> list[None]:
        """One synced transaction for every request of the round (committer thread)."""
        self.store.put_all(item_lists)
        return [None] * len(item_lists)


class BlockService:
    """aurora_pb.Block over a BlockStore (see module doc): plain handlers, served through
    the transport seam."""

    def __init__(self, name: str, az: str, store: BlockStore, committer: GroupCommitter,
                 mirror: str | None, mirror_delay_ms: float, transport: Transport) -> None:
        self.name = name
        self.az = az
        self.store = store
        self.committer = committer
        self.mirror = mirror or ""
        self.mirror_delay_ms = mirror_delay_ms
        self._mirror_write = None
        self._channel = None
        if self.mirror:
            self._channel = transport.channel(self.mirror)
            self._mirror_write = self._channel.stub(BLOCK).Write
        self.read_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lmdb-read")
        self.counters = dict(write_rpcs=0, block_writes=0, write_ios=0, bytes_received=0,
                             mirror_rpcs=0, mirror_ios=0, mirror_bytes=0, read_rpcs=0, read_bytes=0)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self.read_executor.shutdown(wait=True)

    async def Write(self, request: pb.BlockWriteRequest, context) -> pb.BlockWriteReply:
        items = []
        for w in request.writes:
            if w.area not in AREAS:
                raise RpcError("INVALID_ARGUMENT", f"unknown block area {w.area}")
            items.append((block_key(request.volume, w.area, w.offset), w.data))
        ios = block_request_ios(len(w.data) for w in request.writes)
        c = self.counters
        c["write_rpcs"] += 1
        c["block_writes"] += len(items)
        c["write_ios"] += ios
        c["bytes_received"] += request.ByteSize()
        if self._mirror_write is None or request.from_primary:
            await self.committer.submit(items)
            return pb.BlockWriteReply(server=self.name, mirrored=False)
        request.from_primary = True
        data = request.SerializeToString()
        local = asyncio.ensure_future(self.committer.submit(items))
        try:
            await self._to_mirror(data, ios)
        except RpcError as exc:
            await local  # our own copy is durable anyway; the caller will retry both
            raise RpcError("UNAVAILABLE", f"mirror {self.mirror} failed: {exc}") from None
        await local
        return pb.BlockWriteReply(server=self.name, mirrored=True)

    async def _to_mirror(self, data: bytes, ios: int) -> None:
        delay_s = self.mirror_delay_ms / 1000.0
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        c = self.counters
        c["mirror_rpcs"] += 1
        c["mirror_ios"] += ios
        c["mirror_bytes"] += len(data)
        await self._mirror_write(data, timeout_s=MIRROR_TIMEOUT_S)
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    async def Read(self, request: pb.BlockReadRequest, context) -> pb.BlockReadReply:
        key = block_key(request.volume, request.area, request.offset)
        value = await asyncio.get_running_loop().run_in_executor(self.read_executor, self.store.get, key)
        self.counters["read_rpcs"] += 1
        if value is None:
            return pb.BlockReadReply(found=False)
        self.counters["read_bytes"] += len(value)
        return pb.BlockReadReply(found=True, data=value)

    async def Status(self, request, context) -> pb.BlockStatusReply:
        return pb.BlockStatusReply(
            server=self.name, az=self.az, mirror=self.mirror, mirror_delay_ms=self.mirror_delay_ms,
            lmdb_bytes_written=self.store.lmdb_bytes_written, write_txns=self.store.write_txns,
            **self.counters)

    async def Configure(self, request: pb.BlockConfigureRequest, context) -> pb.BlockConfigureReply:
        if request.mirror_delay_ms < 0:
            raise RpcError("INVALID_ARGUMENT", "mirror_delay_ms must be >= 0")
        if request.mirror_delay_ms != self.mirror_delay_ms:
            log.info("one-way delay to the mirror now %.3f ms", request.mirror_delay_ms)
        self.mirror_delay_ms = request.mirror_delay_ms
        return pb.BlockConfigureReply()


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    store = BlockStore(args.data_dir, args.map_size)
    committer = GroupCommitter(store)
    from engine.transport.grpc_transport import GrpcTransport   # the process entry point
    transport = GrpcTransport(args.node_id)
    service = BlockService(args.node_id, args.az, store, committer, args.mirror,
                           args.mirror_delay_ms, transport)
    committer.start()
    try:
        server = await transport.serve(args.host, args.port, {BLOCK: service})
    except (OSError, RuntimeError) as exc:
        log.error("cannot bind %s:%s: %s", args.host, args.port, exc)
        await committer.close()
        await service.close()
        store.close()
        return 1
    port = server.port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.set_serving(True)
    log.info("serving on %s:%d (data dir %s, mirror %s, %.3f ms one-way)", args.host, port,
             args.data_dir, args.mirror or "none", args.mirror_delay_ms)
    if args.port_file:
        _write_port_file(args.port_file, port)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    await server.set_serving(False)
    await server.stop(SHUTDOWN_GRACE_S)
    await committer.close()
    await service.close()
    store.close()
    log.info("stopped cleanly")
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``aurora-lite block-server``; returns the exit code."""
    return asyncio.run(serve(args))

