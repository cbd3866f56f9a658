"""The writer instance process: recovery, then the database gRPC service.

`aurora-lite writer --cluster CLUSTER.json --instance db1 --az az-a --port 0` starts one
asyncio event loop (grpc.aio) that holds the whole engine: the storage driver, the
buffer pool, the B+tree tables and the transactions. Page changes are synchronous code;
only waiting on storage is async (DESIGN.md section 4).

Startup: connect to the six storage nodes, run recovery (invariant 10, engine/recovery.py)
until it succeeds (retrying while fewer than a quorum of nodes answer), bootstrap the
META page of a brand-new volume, then serve. A client error never kills the writer: each
RPC's exceptions become a gRPC status with an "aurora-error" code (see
proto/aurora_pb/database.proto). SIGTERM stops serving, waits a grace period for in-flight
commits, and exits 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aurora_pb import database_pb2 as pb
from aurora_pb import database_pb2_grpc as pb_grpc
from engine import errors
from engine.cluster_config import ClusterConfig, LatencyWatcher
from engine.database import Database
from engine.recovery import RecoveryError, recover
from engine.storage_driver import StorageDriver
from engine.volume import AZS

log = logging.getLogger(__name__)

SCAN_LIMIT_DEFAULT = 1000
SCAN_LIMIT_MAX = 100_000
TXN_IDLE_TIMEOUT_S = 60.0

# exception class -> (grpc status, aurora-error code); first match wins (subclasses first).
ERROR_MAP: list[tuple[type, grpc.StatusCode, str]] = [
    (errors.KeyNotFound, grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND"),
    (errors.TableNotFound, grpc.StatusCode.NOT_FOUND, "TABLE_NOT_FOUND"),
    (errors.ConflictError, grpc.StatusCode.ABORTED, "CONFLICT"),
    (errors.TooLargeError, grpc.StatusCode.INVALID_ARGUMENT, "TOO_LARGE"),
    (errors.WriteQuorumUnavailable, grpc.StatusCode.UNAVAILABLE, "WRITE_QUORUM_UNAVAILABLE"),
    (errors.FencedError, grpc.StatusCode.FAILED_PRECONDITION, "FENCED"),
    (errors.ReadOnlyError, grpc.StatusCode.FAILED_PRECONDITION, "READ_ONLY"),
    (errors.TransactionClosedError, grpc.StatusCode.FAILED_PRECONDITION, "TXN_CLOSED"),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
    (errors.DatabaseError, grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
]


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Turn an engine exception into the service's error contract."""
    for cls, status, code in ERROR_MAP:
        if isinstance(exc, cls):
            break
    else:
        log.exception("internal error serving a request", exc_info=exc)
        status, code = grpc.StatusCode.INTERNAL, "INTERNAL"
    context.set_trailing_metadata((("aurora-error", code),))
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    await context.abort(status, message or code)


def _table(name: str) -> str:
    return name or "default"


def _timeout(ms: int) -> float | None:
    return ms / 1000.0 if ms else None


class DatabaseService(pb_grpc.DatabaseServicer):
    """gRPC face of engine.database.Database."""

    def __init__(self, db: Database, driver: StorageDriver, instance: str) -> None:
        self.db = db
        self.driver = driver
        self.instance = instance
        self.txns: dict[int, tuple[object, float]] = {}   # txn_id -> (txn, last use)
        self._ids = itertools.count(1)
        self.started_at = time.time()

    def _txn(self, txn_id: int):
        entry = self.txns.get(txn_id)
        if entry is None:
            raise errors.TransactionClosedError(f"transaction {txn_id} is not open on {self.instance}")
        self.txns[txn_id] = (entry[0], time.monotonic())
        return entry[0]

    async def reap_idle(self) -> None:
        while True:
            await asyncio.sleep(TXN_IDLE_TIMEOUT_S / 4)
            now = time.monotonic()
            for txn_id, (txn, used) in list(self.txns.items()):
                if now - used > TXN_IDLE_TIMEOUT_S:
                    log.warning("aborting transaction %d idle for %.0fs", txn_id, now - used)
                    self.txns.pop(txn_id, None)
                    txn.abort()

    async def ensure_tables(self, tables) -> None:
        """A write to a table that does not exist creates it (database.proto)."""
        for table in sorted(set(tables) - set(self.db.tables())):
            try:
                await self.db.create_table(table)
            except errors.TableExistsError:
                pass  # created by a concurrent request

    async def Get(self, request, context):
        try:
            table = _table(request.table)
            if request.txn_id:
                value = await self._txn(request.txn_id).get(table, request.key)
            else:
                value = await self.db.get(table, request.key)
            if value is None:
                raise errors.KeyNotFound(f"key {request.key!r} not found in table {table!r}")
            return pb.GetReply(value=value, read_point=self.driver.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Put(self, request, context):
        try:
            if request.txn_id:
                txn = self._txn(request.txn_id)
                await self.ensure_tables([_table(request.table)])
                txn.put(_table(request.table), request.key, request.value)
                return pb.WriteReply(vdl=self.driver.vdl)
            await self.ensure_tables([_table(request.table)])
            lsn = await self.db.put(_table(request.table), request.key, request.value,
                                    timeout_s=_timeout(request.timeout_ms))
            return pb.WriteReply(commit_lsn=lsn, vdl=self.driver.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Delete(self, request, context):
        try:
            if request.txn_id:
                self._txn(request.txn_id).delete(_table(request.table), request.key)
                return pb.WriteReply(vdl=self.driver.vdl)
            table = _table(request.table)
            if table not in self.db.tables() or await self.db.get(table, request.key) is None:
                raise errors.KeyNotFound(f"key {request.key!r} not found in table {table!r}")
            lsn = await self.db.delete(table, request.key, timeout_s=_timeout(request.timeout_ms))
            return pb.WriteReply(commit_lsn=lsn, vdl=self.driver.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Scan(self, request, context):
        try:
            limit = request.limit or SCAN_LIMIT_DEFAULT
            if limit > SCAN_LIMIT_MAX:
                raise errors.DatabaseError(f"scan limit {limit} exceeds the maximum {SCAN_LIMIT_MAX}")
            start = request.start or None
            end = request.end or None
            if request.txn_id:
                items = await self._txn(request.txn_id).scan(_table(request.table), start, end, limit)
            else:
                items = await self.db.scan(_table(request.table), start, end, limit)
            return pb.ScanReply(items=[pb.KeyValue(key=k, value=v) for k, v in items],
                                read_point=self.driver.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Begin(self, request, context):
        try:
            txn = self.db.begin()
            txn_id = next(self._ids)
            self.txns[txn_id] = (txn, time.monotonic())
            return pb.BeginReply(txn_id=txn_id)
        except Exception as exc:
            await abort_with(context, exc)

    async def Commit(self, request, context):
        try:
            txn = self._txn(request.txn_id)
            self.txns.pop(request.txn_id, None)
            await self.ensure_tables(list(txn._writes))
            lsn = await txn.commit(timeout_s=_timeout(request.timeout_ms))
            return pb.WriteReply(commit_lsn=lsn or 0, vdl=self.driver.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Abort(self, request, context):
        entry = self.txns.pop(request.txn_id, None)
        if entry is not None:
            entry[0].abort()
        return pb.AbortReply()

    async def Status(self, request, context):
        state = {
            "instance": self.instance, "role": "writer", "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "open_txns": len(self.txns), "driver": self.driver.status(),
            "database": self.db.stats(),
        }
        return pb.StatusReply(instance=self.instance, role="writer", vdl=self.driver.vdl,
                              volume_epoch=self.driver.epoch, json=json.dumps(state))


async def open_database(config: ClusterConfig, *, instance: str, az: str,
                        buffer_pool_pages: int, recovery_timeout_s: float = 120.0,
                        cluster_path: str | None = None):
    """Connect, recover (retrying until a quorum answers) and open the database.
    With ``cluster_path``, latency changes in that file apply live (`net delay`)."""
    reload = None
    if cluster_path:
        watcher = LatencyWatcher(cluster_path)

        def reload():
            latency = watcher.poll()
            return None if latency is None else latency.from_az(az, AZS)
    driver = StorageDriver(config.volume, config.storage_nodes, config.layout, epoch=0,
                           lal=config.lal, instance=instance,
                           link_delay_ms=config.latency.from_az(az, AZS), link_delay_reload=reload)
    await driver.start()
    deadline = time.monotonic() + recovery_timeout_s
    delay_s = 0.2
    while True:
        try:
            result = await recover(driver)
            break
        except (RecoveryError, asyncio.TimeoutError, grpc.RpcError) as exc:
            if time.monotonic() > deadline:
                await driver.close()
                raise
            log.warning("recovery not possible yet (%s); retrying in %.1fs", exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
    db = Database(driver, buffer_pool_pages=buffer_pool_pages)
    if result.vdl == 0:
        await db.bootstrap()
    else:
        await db.open()
    return driver, db, result


async def serve(args) -> int:
    config = ClusterConfig.load(args.cluster)
    driver, db, result = await open_database(
        config, instance=args.instance, az=args.az, buffer_pool_pages=args.buffer_pool_pages,
        cluster_path=args.cluster)
    service = DatabaseService(db, driver, args.instance)
    server = grpc.aio.server()
    pb_grpc.add_DatabaseServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    for name in ("", "aurora_pb.Database"):
        await _set_serving(health_servicer, name)
    log.info("writer %s serving on %s:%d (volume %s, epoch %d, VDL %d)", args.instance,
             args.host, port, config.volume, driver.epoch, driver.vdl)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reaper = asyncio.create_task(service.reap_idle())
    await stop.wait()
    log.info("writer %s stopping", args.instance)
    reaper.cancel()
    await server.stop(grace=3.0)
    await driver.close()
    return 0


async def _set_serving(servicer, name: str) -> None:
    result = servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if asyncio.iscoroutine(result):
        await result


def main(args) -> int:
    return asyncio.run(serve(args))
