"""A compute instance process (writer or read replica) and its gRPC services.

`aurora-lite writer --cluster CLUSTER.json --instance db1 --az az-a --port 0` starts the
writer; `aurora-lite replica --writer ADDRESS ...` starts a read replica of it (see
engine/instance/replica.py); a replica can be promoted (InstanceAdmin.Promote, failover). One
asyncio event loop that holds the whole engine: the storage driver, the
buffer pool, the B+tree tables and the transactions. Page changes are synchronous code;
only waiting on storage is async (docs/decisions.md, design choice D4).

Startup: connect to the six storage nodes, run recovery (invariant 10, engine/writer/recovery.py)
until it succeeds (retrying while fewer than a quorum of nodes answer), bootstrap the
META page of a brand-new volume, then serve. A client error never kills the writer: each
RPC's exceptions become a transport error (status plus "aurora-error" code) (see
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


from aurora_pb import database_pb2 as pb
from aurora_pb import replication_pb2 as rpb
from engine import errors, hooks
from engine.errors import METADATA_NOTHING_DONE, ErrorCode, RpcError
from engine.transport import Transport, service_of
from engine.writer.backtrack import BacktrackNotStarted, TimeTravel
from engine.format.cluster_config import ClusterConfig
from engine.db.database import Database
from engine.writer.recovery import RecoveryError, recover
from engine.instance.replica import Replica
from engine.instance import capacity as cap
from engine.pg.sql import Backend
from engine.instance.replication import ReplicationHub, ReplicationService
from engine.writer.storage_driver import StorageDriver

log = logging.getLogger(__name__)

SCAN_LIMIT_DEFAULT = 1000
SCAN_LIMIT_MAX = 100_000
TXN_IDLE_TIMEOUT_S = 60.0

# exception class -> (transport status, aurora-error code); first match wins (subclasses first).
ERROR_MAP: list[tuple[type, str, ErrorCode]] = [
    (errors.KeyNotFound, "NOT_FOUND", ErrorCode.KEY_NOT_FOUND),
    (errors.TableNotFound, "NOT_FOUND", ErrorCode.TABLE_NOT_FOUND),
    (errors.ConflictError, "ABORTED", ErrorCode.CONFLICT),
    (errors.TooLargeError, "INVALID_ARGUMENT", ErrorCode.TOO_LARGE),
    (errors.WriteQuorumUnavailable, "UNAVAILABLE", ErrorCode.WRITE_QUORUM_UNAVAILABLE),
    (errors.FencedError, "FAILED_PRECONDITION", ErrorCode.FENCED),
    (errors.ReadOnlyError, "FAILED_PRECONDITION", ErrorCode.READ_ONLY),
    (errors.TransactionClosedError, "FAILED_PRECONDITION", ErrorCode.TXN_CLOSED),
    (errors.OutOfWindowError, "OUT_OF_RANGE", ErrorCode.OUT_OF_WINDOW),
    (errors.UnavailableError, "UNAVAILABLE", ErrorCode.UNAVAILABLE),
    (errors.DatabaseError, "INVALID_ARGUMENT", ErrorCode.BAD_REQUEST),
]


# Trailing metadata key set (to "1") on an error that left the database untouched: the
# write was refused before it started, so a client may safely send it elsewhere (the new
# writer after a failover). Its absence promises nothing (see engine/client.py).
NOTHING_DONE_KEY = METADATA_NOTHING_DONE


class NothingDone(Exception):
    """Wraps an error raised before a write touched anything (see NOTHING_DONE_KEY)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


async def abort_with(ctx, exc: Exception) -> None:
    """Refuse the request: raise the RpcError that carries an engine exception over the
    service's error contract (status, ``aurora-error`` code, NOTHING_DONE_KEY)."""
    metadata = {}
    if isinstance(exc, NothingDone):
        metadata[NOTHING_DONE_KEY] = "1"
        exc = exc.exc
    if isinstance(exc, errors.CommitRefused):
        metadata[NOTHING_DONE_KEY] = "1"   # refused before any record was logged
    for cls, status, code in ERROR_MAP:
        if isinstance(exc, cls):
            break
    else:
        log.exception("internal error serving a request", exc_info=exc)
        status, code = "INTERNAL", "INTERNAL"
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    raise RpcError(status, message or code, code, metadata)


DEFAULT_TABLE = "default"


def _table(name: str) -> str:
    return name or DEFAULT_TABLE


def _timeout(ms: int) -> float | None:
    return ms / 1000.0 if ms else None


RPC_NAMES = ("Get", "Put", "Delete", "Scan", "Begin", "Commit", "Abort", "Status")
# The requests that take an admission slot (engine/instance/capacity.py): the work a
# capacity unit's CPU share limits. Status and Abort never wait.
ADMITTED_RPCS = ("Get", "Put", "Delete", "Scan", "Begin", "Commit")


class DatabaseService:
    """The Database service's handlers over engine.db.database.Database, for whichever role
    the instance has now: plain async methods, served through the transport seam."""

    def __init__(self, inst: "Instance") -> None:
        self.inst = inst
        self.instance = inst.name
        self.txns: dict[int, tuple[object, float]] = {}   # txn_id -> (txn, last use)
        self._ids = itertools.count(1)
        self.started_at = time.time()
        self.rpcs = dict.fromkeys(RPC_NAMES, 0)            # calls served, per method (Status)
        for name in ADMITTED_RPCS:
            setattr(self, name, self._admitted(getattr(self, name)))

    def _admitted(self, handler):
        """``handler`` run inside one of the instance's admission slots (its CPU share)."""
        admission = self.inst.admission

        async def run(request, context):
            async with admission.slot():
                return await handler(request, context)
        run.__name__ = handler.__name__
        return run

    def _txn(self, txn_id: int):
        entry = self.txns.get(txn_id)
        if entry is None:
            raise errors.TransactionClosedError(f"transaction {txn_id} is not open on {self.instance}")
        self.txns[txn_id] = (entry[0], time.monotonic())
        return entry[0]

    def _check_writer(self) -> None:
        """Refuse a commit up front unless this instance is the writer now.

        Raises NothingDone: the client learns that nothing was written and may retry on
        the new writer. A commit accepted here and failing later (fenced by storage, the
        writer stepping down) carries no such promise: its outcome is unknown."""
        role = self.inst.role
        if self.inst.backtracking:
            raise NothingDone(errors.UnavailableError(
                f"{self.instance} is backtracking its volume; retry in a moment"))
        if role == "writer":
            return
        if role == "fenced":
            raise NothingDone(self.inst.driver.fenced)
        if role == "replica":
            raise NothingDone(errors.ReadOnlyError(
                f"{self.instance} is a read replica: writes go to the writer (the cluster endpoint)"))
        raise NothingDone(errors.UnavailableError(f"instance {self.instance} is {role}, not serving writes yet"))

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
        db = self.db
        missing = [table for table in tables if not db.has_table(table)]
        for table in sorted(set(missing)):
            try:
                await self.db.create_table(table)
            except errors.TableExistsError:
                pass  # created by a concurrent request

    async def Get(self, request, context):
        self.rpcs["Get"] += 1
        try:
            table = _table(request.table)
            read_point = self.inst.vdl
            if request.as_of_lsn or request.as_of_time_us:
                read_point = await self.inst.as_of_read_point(request)
                value = await self.db.get_as_of(table, request.key, read_point)
            elif request.txn_id:
                value = await self._txn(request.txn_id).get(table, request.key)
            else:
                value = await self.db.get(table, request.key)
            if value is None:
                raise errors.KeyNotFound(f"key {request.key!r} not found in table {table!r}")
            if not (request.as_of_lsn or request.as_of_time_us):
                read_point = _read_point(request, self.inst.vdl)
            return pb.GetReply(value=value, read_point=read_point)
        except Exception as exc:
            await abort_with(context, exc)

    async def Put(self, request, context):
        self.rpcs["Put"] += 1
        try:
            if request.txn_id:
                txn = self._txn(request.txn_id)
                await self.ensure_tables([_table(request.table)])
                txn.put(_table(request.table), request.key, request.value)
                return pb.WriteReply(vdl=self.inst.vdl)
            self._check_writer()
            await self.ensure_tables([_table(request.table)])
            lsn = await self.db.put(_table(request.table), request.key, request.value,
                                    timeout_s=_timeout(request.timeout_ms))
            return pb.WriteReply(commit_lsn=lsn, vdl=self.inst.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Delete(self, request, context):
        self.rpcs["Delete"] += 1
        try:
            if request.txn_id:
                self._txn(request.txn_id).delete(_table(request.table), request.key)
                return pb.WriteReply(vdl=self.inst.vdl)
            self._check_writer()
            table = _table(request.table)
            if table not in self.db.tables() or await self.db.get(table, request.key) is None:
                raise errors.KeyNotFound(f"key {request.key!r} not found in table {table!r}")
            lsn = await self.db.delete(table, request.key, timeout_s=_timeout(request.timeout_ms))
            return pb.WriteReply(commit_lsn=lsn, vdl=self.inst.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Scan(self, request, context):
        self.rpcs["Scan"] += 1
        try:
            limit = request.limit or SCAN_LIMIT_DEFAULT
            if limit > SCAN_LIMIT_MAX:
                raise errors.DatabaseError(f"scan limit {limit} exceeds the maximum {SCAN_LIMIT_MAX}")
            start = request.start or None
            end = request.end or None
            read_point = self.inst.vdl
            if request.as_of_lsn or request.as_of_time_us:
                read_point = await self.inst.as_of_read_point(request)
                items = await self.db.scan_as_of(_table(request.table), start, end, limit, read_point)
            elif request.txn_id:
                items = await self._txn(request.txn_id).scan(_table(request.table), start, end, limit)
            else:
                items = await self.db.scan(_table(request.table), start, end, limit)
            return pb.ScanReply(items=[pb.KeyValue(key=k, value=v) for k, v in items],
                                read_point=read_point if (request.as_of_lsn or request.as_of_time_us)
                                else _read_point(request, self.inst.vdl))
        except Exception as exc:
            await abort_with(context, exc)

    async def Begin(self, request, context):
        self.rpcs["Begin"] += 1
        try:
            txn = self.db.begin()
            txn_id = next(self._ids)
            self.txns[txn_id] = (txn, time.monotonic())
            return pb.BeginReply(txn_id=txn_id)
        except Exception as exc:
            await abort_with(context, exc)

    async def Commit(self, request, context):
        """Commit a transaction with the writes it carries (CommitRequest.ops). txn_id 0:
        one that read nothing, begun here and now (docs/decisions.md 11)."""
        self.rpcs["Commit"] += 1
        try:
            if request.txn_id:
                txn = self._txn(request.txn_id)
                self.txns.pop(request.txn_id, None)
            else:
                txn = None
            if request.ops or (txn is not None and txn._writes):
                try:
                    self._check_writer()
                except NothingDone:
                    if txn is not None:
                        txn.abort()
                    raise
            if txn is None:
                txn = self.db.begin(conflicts_from_commit=True)
            try:
                await self.ensure_tables({_table(op.table) for op in request.ops} | txn._writes.keys())
                for op in request.ops:
                    if op.delete:
                        txn.delete(_table(op.table), op.key)
                    else:
                        txn.put(_table(op.table), op.key, op.value)
            except BaseException:
                txn.abort()
                raise
            lsn = await txn.commit(timeout_s=_timeout(request.timeout_ms))
            return pb.WriteReply(commit_lsn=lsn or 0, vdl=self.inst.vdl)
        except Exception as exc:
            await abort_with(context, exc)

    async def Abort(self, request, context):
        self.rpcs["Abort"] += 1
        entry = self.txns.pop(request.txn_id, None)
        if entry is not None:
            entry[0].abort()
        return pb.AbortReply()

    @property
    def db(self) -> Database:
        return self.inst.database()

    async def Status(self, request, context):
        self.rpcs["Status"] += 1
        state = {"instance": self.instance, "pid": os.getpid(),
                 "uptime_s": round(time.time() - self.started_at, 1),
                 "open_txns": len(self.txns), "rpcs": dict(self.rpcs), **self.inst.status()}
        return pb.StatusReply(instance=self.instance, role=self.inst.role, vdl=self.inst.vdl,
                              volume_epoch=self.inst.epoch, json=json.dumps(state))


def _read_point(request, vdl: int) -> int:
    """The read point of the read this request just did (engine.db.database.LAST_READ_POINT)."""
    from engine.db.database import LAST_READ_POINT
    return (LAST_READ_POINT.get() or vdl) if not request.txn_id else vdl


async def recover_until_open(driver: StorageDriver, recovery_timeout_s: float = 120.0):
    """Run recovery, retrying while fewer than a quorum of nodes answer."""
    deadline = time.monotonic() + recovery_timeout_s
    delay_s = 0.2
    while True:
        try:
            return await recover(driver)
        except (RecoveryError, asyncio.TimeoutError, RpcError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("recovery not possible yet (%s); retrying in %.1fs", exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)


class Instance:
    """One compute instance: the writer, or a read replica that can be promoted.

    Roles and the transitions between them (the function that makes each)::

        replica --promote(): stop following, recovery under a new epoch--> writer
        writer  --storage answers STALE_EPOCH (a newer writer took over)--> fenced
        writer/fenced --follow(address): close the driver, follow that writer--> replica
        replica --follow(address)--> replica (resubscribed to another writer)
    """

    def __init__(self, args, config: ClusterConfig, transport: Transport) -> None:
        self.args = args
        self.transport = transport
        self.name = args.instance
        self.config = config
        self.driver: StorageDriver | None = None
        self.db: Database | None = None
        self.hub: ReplicationHub | None = None
        self.replica: Replica | None = None
        self.recovery = None
        self.timetravel: TimeTravel | None = None
        self.backtracking = False
        self._background: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self.pg_backend = Backend(self.database, lambda: self.role != "writer")
        self.pg_port = 0
        # Capacity (engine/instance/capacity.py, docs/serverless.md): a serverless instance
        # (--acu) sizes its buffer pool and admission limit from its ACU and changes them in
        # place on SetCapacity; a provisioned one has --buffer-pool-pages and no limit.
        acu = getattr(args, "acu", None)
        self.serverless = acu is not None
        if self.serverless:
            self.acu = cap.check_acu(acu, "--acu")
            self.pool_pages = cap.buffer_pool_pages(self.acu)
            self.admission = cap.Admission(cap.admission_slots(self.acu))
        else:
            self.pool_pages = args.buffer_pool_pages
            self.acu = cap.acu_of_pages(self.pool_pages)
            self.admission = cap.Admission(None)
        self.cpu_enforcement, self.cpu_enforcement_why = cap.cpu_enforcement()
        self.capacity_changes = 0

    @property
    def role(self) -> str:
        if self.replica is not None:
            return "replica"
        if self.driver is not None and self.driver.fenced is not None:
            return "fenced"
        return "writer" if self.db is not None else "starting"

    @property
    def vdl(self) -> int:
        if self.replica is not None:
            return self.replica.sink.vdl if self.replica.sink else 0
        return self.driver.vdl if self.driver is not None else 0

    @property
    def epoch(self) -> int:
        return self.driver.epoch if self.driver is not None else 0

    def database(self) -> Database:
        if self.replica is not None:
            if self.replica.db is None:
                raise errors.UnavailableError(f"replica {self.name} has not caught up with a writer yet")
            return self.replica.db
        if self.db is None:
            raise errors.UnavailableError(f"instance {self.name} is still starting")
        return self.db

    def _new_driver(self) -> StorageDriver:
        config, args = self.config, self.args
        return StorageDriver(config.volume, config.storage_nodes, config.layout, epoch=0,
                             lal=config.lal, instance=self.name, transport=self.transport,
                             memberships=config.memberships())   # invariant 15

    async def start_writer(self) -> None:
        driver = self._new_driver()
        await driver.start()
        self.recovery = await recover_until_open(driver)
        db = Database(driver, buffer_pool_pages=self.pool_pages)
        if os.environ.get(hooks.FAULTS_FILE_ENV):
            db.piece_pause_s = lambda: hooks.commit_piece_pause_s(self.name)
        if self.recovery.vdl == 0:
            await db.bootstrap()
        else:
            await db.open()
        if DEFAULT_TABLE not in db.tables():
            # The table clients use when they name none always exists, so a read of it
            # says "key not found", never "table not found".
            await db.create_table(DEFAULT_TABLE)
        timetravel = TimeTravel(driver, getattr(self.args, "backtrack_window", None))
        await timetravel.on_open()
        db.on_commit = timetravel.clock.add
        self.driver, self.db, self.timetravel = driver, db, timetravel
        self.hub = ReplicationHub(driver, self.name)
        self.hub.retention_floor = timetravel.retention_floor
        self._background.append(asyncio.get_running_loop().create_task(self.hub.run_gc_horizon()))

    async def start_replica(self, writer_address: str) -> None:
        driver = self._new_driver()
        await driver.start()
        self.driver = driver
        self.replica = Replica(driver, writer_address, self.name, self.pool_pages)
        self.replica.start()

    async def promote(self):
        async with self._lock:
            if self.replica is None:
                return self.recovery
            log.info("promoting %s: recovery under a new epoch", self.name)
            replica, self.replica = self.replica, None
            await replica.stop()
            await self.driver.close()
            self.driver = None
            await self.start_writer()
            log.info("%s is now the writer (epoch %d, VDL %d)", self.name, self.epoch, self.vdl)
            return self.recovery

    async def follow(self, writer_address: str) -> None:
        async with self._lock:
            if self.replica is not None:
                self.replica.follow(writer_address)
                return
            log.info("%s steps down and follows the writer at %s", self.name, writer_address)
            await self._stop_writer()
            await self.start_replica(writer_address)

    # --- Time travel (engine/writer/backtrack.py) -----------------------------------------------

    def _writer_timetravel(self, what: str) -> TimeTravel:
        if self.replica is not None:
            raise errors.DatabaseError(f"{what} is served by the writer, not by replica {self.name}")
        if self.timetravel is None or self.role != "writer":
            raise errors.UnavailableError(f"{what}: {self.name} is not an open writer now")
        return self.timetravel

    async def as_of_read_point(self, request) -> int:
        """The commit LSN an as-of Get/Scan reads at (inside the window)."""
        tt = self._writer_timetravel("a time-travel read")
        lsn, _time_us = await tt.resolve_current(lsn=request.as_of_lsn,
                                                 time_us=request.as_of_time_us, what="as-of read")
        return lsn

    async def backtrack(self, to_lsn: int, to_time_us: int) -> dict:
        """Rewind the volume in place (module doc of engine/writer/backtrack.py): pause writes, hide
        everything after the target under a new epoch (kept), reopen through recovery."""
        async with self._lock:
            tt = self._writer_timetravel("backtrack")
            started = time.monotonic()
            target, target_time_us, truncs = await tt.resolve_backtrack(lsn=to_lsn, time_us=to_time_us)
            self.backtracking = True
            try:
                log.warning("backtrack of %s to commit LSN %d: pausing writes, dropping "
                            "uncommitted work", self.config.volume, target)
                try:
                    await tt.write_backtrack(target, truncs)
                except BacktrackNotStarted as exc:
                    raise exc.exc from None
                except Exception as exc:
                    # Part of the new set may be on some nodes, and this writer's epoch is
                    # stale there: reopen through recovery, which takes the newest set a
                    # read quorum holds (the backtrack happened or it did not).
                    log.warning("backtrack of %s failed while writing (%s); reopening "
                                "through recovery", self.config.volume, exc)
                    await self._stop_writer()
                    self.database_service_reset()
                    await self.start_writer()
                    raise errors.UnavailableError(
                        f"backtrack interrupted ({exc}); the writer reopened at VDL "
                        f"{self.vdl}: check with `backtrack info` or a read") from None
                await self._stop_writer()
                self.database_service_reset()
                await self.start_writer()
            finally:
                self.backtracking = False
            seconds = time.monotonic() - started
            log.warning("backtracked %s to LSN %d in %.3fs: epoch %d, VDL %d",
                        self.config.volume, target, seconds, self.epoch, self.vdl)
            return {"target_lsn": target, "target_time_us": target_time_us,
                    "volume_epoch": self.epoch, "vdl": self.vdl, "seconds": seconds}

    def database_service_reset(self) -> None:
        """Open client transactions die with a backtrack (their reads were of the old state)."""
        if self.service is not None:
            self.service.txns.clear()

    service = None

    async def _stop_writer(self) -> None:
        for task in self._background:
            task.cancel()
        self._background.clear()
        if self.hub is not None:
            self.hub.close()
        if self.driver is not None:
            await self.driver.close()
        self.driver = self.db = self.hub = self.timetravel = None

    async def close(self) -> None:
        if self.replica is not None:
            await self.replica.stop()
            self.replica = None
        await self._stop_writer()

    # --- Capacity (serverless, docs/serverless.md) -------------------------------------------

    def set_capacity(self, acu: float) -> dict:
        """Change this instance's capacity in place: the buffer pool grows or shrinks
        (shrinking evicts only clean, unpinned pages: invariant 7), the admission limit
        follows; no restart, no connection dropped, no request refused."""
        acu = cap.check_acu(acu, "ACU")
        if not self.serverless:
            raise errors.DatabaseError(f"{self.name} is provisioned (--buffer-pool-pages), not serverless")
        before = self.acu
        self.acu = acu
        self.pool_pages = cap.buffer_pool_pages(acu)
        evicted = 0
        db = self._current_db()
        if db is not None:
            evicted = db.pool.resize(self.pool_pages)
        if self.replica is not None:
            self.replica.buffer_pool_pages = self.pool_pages   # a resync's new cache too
        self.admission.set_limit(cap.admission_slots(acu))
        if acu != before:
            self.capacity_changes += 1
            log.info("capacity of %s: %g -> %g ACU (buffer pool %d pages, %d evicted; "
                     "admission limit %d)", self.name, before, acu, self.pool_pages, evicted,
                     self.admission.limit)
        return {"acu": acu, "previous_acu": before, "buffer_pool_pages": self.pool_pages,
                "evicted_pages": evicted, "admission_limit": self.admission.limit,
                "resident_pages": len(db.pool) if db is not None else 0}

    def _current_db(self) -> Database | None:
        if self.replica is not None:
            return self.replica.db
        return self.db

    def capacity_status(self) -> dict:
        """What the scaling loop reads (engine/cluster/scaling.py) and `status` shows."""
        db = self._current_db()
        pool = db.pool if db is not None else None
        return {
            "serverless": self.serverless, "acu": self.acu,
            "buffer_pool_pages": self.pool_pages,
            "resident_pages": len(pool) if pool is not None else 0,
            "pool_hits": pool.hits if pool is not None else 0,
            "pool_misses": pool.misses if pool is not None else 0,
            "cpu_share_cores": cap.cpu_share_cores(self.acu),
            "cpu_seconds": round(cap.cpu_seconds(), 6),
            "monotonic_s": round(time.monotonic(), 6),
            "cpu_enforcement": self.cpu_enforcement,
            "cpu_enforcement_why": self.cpu_enforcement_why,
            "admission": self.admission.stats(),
            "changes": self.capacity_changes,
        }

    def status(self) -> dict:
        state = {"role": self.role, "volume": self.config.volume,
                 "capacity": self.capacity_status()}
        if self.pg_port:
            state["postgres"] = {"port": self.pg_port, **self.pg_backend.counters,
                                 **self.pg_backend.locks.counters,
                                 "errors_by_sqlstate": dict(self.pg_backend.errors_by_sqlstate)}
        if self.replica is not None:
            state["replica"] = self.replica.status()
            if self.replica.db is not None:
                state["database"] = self.replica.db.stats()
        elif self.db is not None:
            state["driver"] = self.driver.status()
            state["database"] = self.db.stats()
            state["replicas"] = self.hub.status() if self.hub else []
            state["gc_horizon"] = self.hub.gc_horizon() if self.hub else 0
            if self.recovery is not None:
                state["recovery"] = {"epoch": self.recovery.epoch, "vdl": self.recovery.vdl,
                                     "seconds": round(self.recovery.seconds, 4),
                                     "truncate_end": self.recovery.truncate_end}
        return state


class InstanceAdminService:
    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    async def Promote(self, request, context):
        try:
            result = await self.inst.promote()
            return pb.PromoteReply(volume_epoch=self.inst.epoch, vdl=self.inst.vdl,
                                   recovery_seconds=result.seconds if result else 0.0)
        except Exception as exc:
            await abort_with(context, exc)

    async def Follow(self, request, context):
        try:
            await self.inst.follow(request.writer_address)
            return pb.FollowReply()
        except Exception as exc:
            await abort_with(context, exc)

    async def SetCapacity(self, request, context):
        try:
            return pb.SetCapacityReply(**self.inst.set_capacity(request.acu))
        except ValueError as exc:
            await abort_with(context, errors.DatabaseError(str(exc)))
        except Exception as exc:
            await abort_with(context, exc)

    async def Backtrack(self, request, context):
        try:
            return pb.BacktrackReply(**await self.inst.backtrack(request.to_lsn, request.to_time_us))
        except Exception as exc:
            await abort_with(context, exc)

    async def BacktrackInfo(self, request, context):
        try:
            tt = self.inst._writer_timetravel("backtrack info")
            await tt.load_history()
            return pb.BacktrackInfoReply(**await tt.window())
        except Exception as exc:
            await abort_with(context, exc)

    async def CreateClone(self, request, context):
        try:
            started = time.monotonic()
            tt = self.inst._writer_timetravel("clone")
            if not request.name:
                raise errors.DatabaseError("clone: a name is required")
            if request.at_lsn or request.at_time_us:
                lsn, time_us = await tt.resolve_current(lsn=request.at_lsn, time_us=request.at_time_us,
                                                        what="clone")
            else:
                lsn, time_us = await tt.find_commit(upto_lsn=self.inst.vdl)
            await tt.create_clone(request.name, lsn)
            return pb.CreateCloneReply(fork_lsn=lsn, fork_time_us=time_us,
                                       seconds=time.monotonic() - started)
        except Exception as exc:
            await abort_with(context, exc)

    async def ListVolumes(self, request, context):
        try:
            return pb.ListVolumesReply(volumes=await list_volumes(self.inst.driver))
        except Exception as exc:
            await abort_with(context, exc)

    async def DropVolume(self, request, context):
        try:
            if request.name == self.inst.config.volume:
                raise errors.DatabaseError(f"{request.name!r} is this writer's own volume; stop "
                                           f"its writer and drop it from another")
            await drop_volume(self.inst.driver, request.name)
            return pb.DropVolumeReply()
        except Exception as exc:
            await abort_with(context, exc)

    async def SetMembership(self, request, context):
        """A membership change step from the control plane (docs/membership.md)."""
        try:
            driver = self.inst.driver
            if driver is None or self.inst.role != "writer":
                raise errors.UnavailableError(f"{self.inst.name} is not the writer")
            try:
                epoch = driver.set_membership(
                    request.pg, request.membership_epoch, list(request.members),
                    list(request.new_members) or None, list(request.forget))
            except ValueError as exc:
                raise errors.DatabaseError(str(exc)) from None
            return pb.InstanceMembershipReply(membership_epoch=epoch)
        except Exception as exc:
            await abort_with(context, exc)


async def list_volumes(driver) -> list:
    """Every volume the reachable storage nodes hold, with bytes from the first node that
    answers for it (one copy of six)."""
    from aurora_pb import storage_pb2 as spb
    if driver is None:
        raise errors.UnavailableError("no storage driver yet")
    found: dict[str, object] = {}
    for name in driver.node_names:
        try:
            reply = await driver.stub(name).NodeStatus(spb.NodeStatusRequest(), timeout_s=5.0)
        except RpcError:
            continue
        for v in reply.volumes:
            if v.volume in found:
                continue
            try:
                b = await driver.stub(name).VolumeBytes(spb.VolumeBytesRequest(volume=v.volume),
                                                        timeout_s=30.0)
            except RpcError:
                continue
            found[v.volume] = pb.VolumeEntry(name=v.volume, parent=v.parent, fork_lsn=v.fork_lsn,
                                             dropped=v.dropped, owned_bytes=b.owned_bytes,
                                             shared_bytes=b.shared_bytes)
    return [found[k] for k in sorted(found)]


async def drop_volume(driver, volume: str) -> None:
    from aurora_pb import storage_pb2 as spb
    ok, errs = 0, []
    for name in driver.node_names:
        try:
            await driver.stub(name).DropVolume(spb.VolumeDropRequest(volume=volume), timeout_s=5.0)
            ok += 1
        except RpcError as exc:
            errs.append(exc)
    if errs and errs[0].status == "NOT_FOUND" and ok == 0:
        raise errors.DatabaseError(f"no volume named {volume!r}")
    if ok < 4:
        raise errors.UnavailableError(f"drop of {volume!r} reached only {ok} storage nodes")


async def serve(args) -> int:
    config = ClusterConfig.load(args.cluster)
    if getattr(args, "volume", None) and args.volume != config.volume:
        # A clone's segments sit on its parent's nodes (they share their bytes), so every
        # volume of a cluster uses the cluster volume's placement (docs/fleet.md).
        for membership in config.memberships().values():
            config.placement.put(args.volume, membership)
        config.volume = args.volume
    from engine.transport.grpc_transport import GrpcTransport   # the process entry point
    from engine.transport.latency import AzLatency
    transport = GrpcTransport(args.instance, AzLatency(args.az, args.instance, path=args.cluster))
    inst = Instance(args, config, transport)
    role = "replica" if getattr(args, "writer", None) else "writer"
    if role == "writer":
        await inst.start_writer()
    else:
        await inst.start_replica(args.writer)
    service = DatabaseService(inst)
    inst.service = service
    server = await transport.serve(args.host, args.port, {
        service_of(pb, "Database"): service,
        service_of(pb, "InstanceAdmin"): InstanceAdminService(inst),
        service_of(rpb, "Replication"): _ReplicationRouter(inst),
    })
    port = server.port
    if role == "replica":
        # Serving means answering reads: wait for the first snapshot from the writer.
        await inst.replica.ready.wait()
    metrics_server = None
    if getattr(args, "metrics_port", 0):
        from engine.instance.metrics import collector
        from engine.metrics import registry_of, serve_metrics
        metrics_server = await serve_metrics(args.host, args.metrics_port, registry_of(collector(inst)))
    pg_server = None
    if getattr(args, "pg_port", -1) >= 0:
        # The PostgreSQL front end (docs/postgres.md): same process, same Database.
        from engine.pg.protocol import PgServer
        pg_server = PgServer(inst.pg_backend)
        inst.pg_port = await pg_server.start(args.host, args.pg_port)
        log.info("%s %s serves PostgreSQL on %s:%d", role, args.instance, args.host, inst.pg_port)
    await server.set_serving(True)
    log.info("%s %s serving on %s:%d (volume %s, epoch %d, VDL %d)", role, args.instance,
             args.host, port, config.volume, inst.epoch, inst.vdl)
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
    log.info("%s %s stopping", inst.role, args.instance)
    reaper.cancel()
    if metrics_server is not None:
        await metrics_server.close()
    if pg_server is not None:
        await pg_server.stop()
    await server.stop(3.0)
    await inst.close()
    return 0


class _ReplicationRouter:
    """Serves the redo stream while this instance is the writer; refuses it otherwise."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    async def Subscribe(self, request_iterator, context):
        hub = self.inst.hub
        if hub is None or self.inst.role != "writer":
            raise RpcError("FAILED_PRECONDITION",
                           f"{self.inst.name} is a {self.inst.role}, not the writer",
                           ErrorCode.READ_ONLY)
        async for message in ReplicationService(hub).Subscribe(request_iterator, context):
            yield message


def main(args) -> int:
    return asyncio.run(serve(args))
