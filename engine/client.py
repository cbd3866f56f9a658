"""Python client library for the database service (proto/aurora_pb/database.proto).

Synchronous, thread-safe (one gRPC channel), and it turns the service's errors back into
the exceptions of engine/errors.py::

    from engine.client import Client
    with Client("127.0.0.1:50051") as db:
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"
        with db.transaction() as txn:          # commits on exit, aborts on exception
            txn.put(b"a", txn.get(b"k") + b"!")

Network failures and a writer that is down raise UnavailableError; every error the
service sends (not found, conflict, too large, read-only, fenced, quorum unavailable)
arrives as its own exception class, never a bare transport error (engine/transport).

Through the control plane, a client follows the endpoint instead of one address, and
finds the new writer after a failover by itself::

    from engine.client import Client
    with Client.for_endpoint("127.0.0.1:40000", "cluster") as db:   # or ClusterClient(...)
        db.put(b"k", b"v")            # re-resolves and retries only when that is safe
    reads = Client.for_endpoint(control, "reader")          # spreads reads over replicas
    one = Client.for_endpoint(control, "instance:db2")      # or "custom:NAME"

When is a failed write retried? Only when the client KNOWS nothing was written
(``retry_safe`` on the error, from ``translate``):

    failure                                                     retried   raises
    connection refused / "failed to connect" (never sent)       yes       -
    READ_ONLY (the instance is a replica now)                   yes       -
    server says aurora-nothing-done (fenced / starting, up front) yes     -
    connection lost mid-call, deadline, FENCED or "shutting     no        CommitOutcomeUnknown
      down" after the commit was accepted
    WRITE_QUORUM_UNAVAILABLE (the --timeout passed)             no        WriteQuorumUnavailable
    no answer while the control plane made another instance    no        CommitOutcomeUnknown
      the writer (the old one is paused or cut off; checked every WATCH_INTERVAL_S)

so a commit whose outcome is unknown is never reported as done, nor silently sent twice.
Reads are retried on any unavailability (they change nothing).

Transactions buffer their writes in the client. ``put`` and ``delete`` send nothing; the
commit carries every buffered write in ONE call (CommitRequest.ops), so a transaction that
only writes costs one RPC. A read inside the transaction answers a key it wrote from the
buffer (a buffered delete: KeyNotFound) and merges the buffer over the server's scan; the
first read sends Begin, so that first-committer-wins counts from before it (a key this
transaction writes that another one committed after that -> ConflictError at commit). A
transaction that reads nothing begins on the instance at its commit (docs/decisions.md
11). Size limits (KEY_MAX, VALUE_MAX, TXN_WRITES_MAX) are checked at ``put``, as before.

A transaction lives on the instance where it began: once it has read, it is never moved;
if that instance fails, commit raises UnavailableError (nothing committed) or
CommitOutcomeUnknown, and the caller runs the transaction again (``begin`` re-resolves). A
transaction of a ClusterClient that read nothing has begun nowhere: its commit is a write
like ``put``, sent where the endpoint leads and retried on a new writer only when nothing
was done (the table above).
"""

from __future__ import annotations

import itertools
import threading
import time


from aurora_pb import database_pb2 as pb
from engine import errors
from engine.db.btree import check_key, check_value, table_key
from engine.db.database import SCAN_LIMIT_DEFAULT, SCAN_LIMIT_MAX, TXN_WRITES_MAX
from engine.errors import METADATA_NOTHING_DONE, ErrorCode, RpcError
from engine.transport import Transport, service_of

ERROR_CLASSES = {
    ErrorCode.KEY_NOT_FOUND: errors.KeyNotFound,
    ErrorCode.TABLE_NOT_FOUND: errors.TableNotFound,
    ErrorCode.CONFLICT: errors.ConflictError,
    ErrorCode.TOO_LARGE: errors.TooLargeError,
    ErrorCode.BAD_REQUEST: errors.DatabaseError,
    ErrorCode.WRITE_QUORUM_UNAVAILABLE: errors.WriteQuorumUnavailable,
    ErrorCode.UNAVAILABLE: errors.UnavailableError,
    ErrorCode.READ_ONLY: errors.ReadOnlyError,
    ErrorCode.FENCED: errors.FencedError,
    ErrorCode.TXN_CLOSED: errors.TransactionClosedError,
    ErrorCode.OUT_OF_WINDOW: errors.OutOfWindowError,
}
DEFAULT_TABLE = "default"
NOTHING_DONE_KEY = METADATA_NOTHING_DONE     # engine/instance/server.py sets it
DATABASE = service_of(pb, "Database")


def default_transport() -> Transport:
    """The transport a client uses when given none: gRPC. The client library is a
    composition root, like the process entry points: it may pick the implementation."""
    from engine.transport.grpc_transport import GrpcTransport
    return GrpcTransport("client")
# gRPC's words for a call that never left the client (no connection to the server).
NOT_SENT_DETAILS = ("failed to connect to all addresses",)


def translate(exc: RpcError) -> errors.DatabaseError:
    """The engine.errors exception for a failed call, with ``retry_safe`` set: True only
    if the request certainly changed nothing (see the module doc)."""
    code = exc.code
    nothing_done = exc.metadata.get(NOTHING_DONE_KEY) == "1"
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        cls = errors.UnavailableError if exc.unreachable else errors.DatabaseError
    details = exc.detail or exc.status
    out = cls(details)
    not_sent = (not code and exc.status == "UNAVAILABLE"
                and any(s in details.lower() for s in NOT_SENT_DETAILS))
    out.retry_safe = nothing_done or code == ErrorCode.READ_ONLY or not_sent
    return out


def retry_safe(exc: BaseException) -> bool:
    """True if the failed request certainly changed nothing (see translate)."""
    return bool(getattr(exc, "retry_safe", False))


class Client:
    """A connection to one database instance (the writer, or a replica for reads)."""

    @staticmethod
    def for_endpoint(control_address: str, endpoint: str = "cluster", **kwargs) -> "ClusterClient":
        """A client of an endpoint, resolved through the control plane at control_address:
        "cluster" | "reader" | "instance:NAME" | "custom:NAME" (see ClusterClient)."""
        return ClusterClient(control_address, endpoint, **kwargs)

    def __init__(self, address: str, *, timeout_s: float = 30.0,
                 transport: Transport | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = (transport or default_transport()).blocking_channel(address)
        self._stub = self._channel.stub(DATABASE)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout_s: float | None | str = "default"):
        try:
            return method(request, timeout_s=self.timeout_s if timeout_s == "default" else timeout_s)
        except RpcError as exc:
            raise translate(exc) from None

    def _call_watched(self, method, request, timeout_s: float | None, abandon):
        """_call for a commit that may wait long: every WATCH_INTERVAL_S ask ``abandon()``;
        a reason (a string) cancels the call and raises CommitOutcomeUnknown (the commit
        was sent: it may or may not complete on the instance we stop waiting for)."""
        future = method.future(request, timeout_s=timeout_s)
        while True:
            try:
                return future.result(WATCH_INTERVAL_S)
            except TimeoutError:
                reason = abandon()
                if reason:
                    future.cancel()
                    raise errors.CommitOutcomeUnknown(reason) from None
            except RpcError as exc:
                raise translate(exc) from None

    # --- Autocommit ----------------------------------------------------------------------

    def get(self, key: bytes, table: str = DEFAULT_TABLE, *, as_of_lsn: int = 0,
            as_of_time_us: int = 0) -> bytes:
        """The value of key; raises KeyNotFound. ``as_of_lsn`` / ``as_of_time_us``: as the
        volume was at the last commit at or before it (time travel, OutOfWindowError
        outside the retention window)."""
        return self._call(self._stub.Get, pb.GetRequest(
            table=table, key=key, as_of_lsn=as_of_lsn, as_of_time_us=as_of_time_us)).value

    def put(self, key: bytes, value: bytes, table: str = DEFAULT_TABLE,
            timeout_s: float | None = None) -> int:
        """Insert or replace; returns the commit LSN once durable (VDL >= it)."""
        reply = self._call(self._stub.Put, pb.PutRequest(
            table=table, key=key, value=value, timeout_ms=_ms(timeout_s)), _deadline(timeout_s, self.timeout_s))
        return reply.commit_lsn

    def delete(self, key: bytes, table: str = DEFAULT_TABLE, timeout_s: float | None = None) -> int:
        """Delete key; raises KeyNotFound if absent. Returns the commit LSN."""
        reply = self._call(self._stub.Delete, pb.DeleteRequest(
            table=table, key=key, timeout_ms=_ms(timeout_s)), _deadline(timeout_s, self.timeout_s))
        return reply.commit_lsn

    def scan(self, start: bytes = b"", end: bytes = b"", limit: int = 0,
             table: str = DEFAULT_TABLE, *, as_of_lsn: int = 0,
             as_of_time_us: int = 0) -> list[tuple[bytes, bytes]]:
        """Keys in [start, end) in order, at most limit (0: server default); as of a
        point like ``get``."""
        reply = self._call(self._stub.Scan, pb.ScanRequest(
            table=table, start=start, end=end, limit=limit, as_of_lsn=as_of_lsn,
            as_of_time_us=as_of_time_us))
        return [(kv.key, kv.value) for kv in reply.items]

    def status(self) -> pb.StatusReply:
        return self._call(self._stub.Status, pb.StatusRequest())

    # --- Transactions -----------------------------------------------------------------

    def begin(self) -> "Transaction":
        """A transaction on this instance. Sends nothing: Begin goes with its first read,
        its writes with its commit (module doc)."""
        return Transaction(self)

    def transaction(self) -> "Transaction":
        """A transaction usable as a context manager (commit on success, abort on error)."""
        return self.begin()


class Transaction:
    """Writes are buffered here and sent with the commit (one RPC); reads see the
    transaction's own writes (from the buffer) merged over the instance's committed state.

    ``txn_id`` is the instance's id of the transaction: 0 until it began there (its first
    read, or for a transaction that only writes, its commit)."""

    def __init__(self, client: "Client | None", txn_id: int = 0) -> None:
        self.client = client
        self.txn_id = txn_id
        self.closed = False
        self._writes: dict[tuple[str, bytes], bytes | None] = {}   # (table, key) -> value | None

    # --- Buffered writes ------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, table: str = DEFAULT_TABLE) -> None:
        """Buffer insert-or-replace; sent with the commit."""
        self._buffer(table, key, check_value(value))

    def delete(self, key: bytes, table: str = DEFAULT_TABLE) -> None:
        """Buffer a delete (nothing happens at commit if the key is absent then)."""
        self._buffer(table, key, None)

    def _buffer(self, table: str, key: bytes, value: bytes | None) -> None:
        self._check_open()
        table = table or DEFAULT_TABLE
        table_key(table)
        entry = (table, check_key(key))
        if entry not in self._writes and len(self._writes) >= TXN_WRITES_MAX:
            raise errors.TooLargeError(
                f"transaction writes more than TXN_WRITES_MAX = {TXN_WRITES_MAX} keys")
        self._writes[entry] = value

    def _ops(self) -> list:
        return [pb.WriteOp(table=table, key=key, delete=True) if value is None
                else pb.WriteOp(table=table, key=key, value=value)
                for (table, key), value in self._writes.items()]

    def _check_open(self) -> None:
        if self.closed:
            raise errors.TransactionClosedError("transaction is closed (committed or aborted)")

    # --- Reads ------------------------------------------------------------------------------

    def _begin(self) -> Client:
        """The client of the instance the transaction lives on, after Begin if not yet sent."""
        if not self.txn_id:
            c = self.client
            self.txn_id = c._call(c._stub.Begin, pb.BeginRequest()).txn_id
        return self.client

    def get(self, key: bytes, table: str = DEFAULT_TABLE) -> bytes:
        self._check_open()
        table = table or DEFAULT_TABLE
        key = check_key(key)
        if (table, key) in self._writes:
            value = self._writes[(table, key)]
            if value is None:
                raise errors.KeyNotFound(f"key {key!r} not found in table {table!r}")
            return value
        c = self._begin()
        try:
            return c._call(c._stub.Get, pb.GetRequest(table=table, key=key, txn_id=self.txn_id)).value
        except errors.TableNotFound:
            if self._writes_table(table):   # created at commit: so far only our writes are in it
                raise errors.KeyNotFound(f"key {key!r} not found in table {table!r}") from None
            raise

    def scan(self, start: bytes = b"", end: bytes = b"", limit: int = 0,
             table: str = DEFAULT_TABLE) -> list[tuple[bytes, bytes]]:
        """Keys in [start, end) in order, at most limit (0: the server's default), the
        buffered writes merged over the instance's scan."""
        self._check_open()
        table = table or DEFAULT_TABLE
        limit = limit or SCAN_LIMIT_DEFAULT
        mine = {k: v for (t, k), v in self._writes.items()
                if t == table and k >= start and (not end or k < end)}
        c = self._begin()
        if not mine:
            reply = c._call(c._stub.Scan, pb.ScanRequest(table=table, start=start, end=end,
                                                         limit=limit, txn_id=self.txn_id))
            return [(kv.key, kv.value) for kv in reply.items]
        # Each buffered delete can hide one row of the instance's scan: ask for that many
        # more, and page on while a full page still leaves fewer than limit rows.
        ask = limit if limit > SCAN_LIMIT_MAX else min(
            SCAN_LIMIT_MAX, limit + sum(1 for v in mine.values() if v is None))
        theirs: dict[bytes, bytes] = {}
        cursor = start
        while True:
            try:
                reply = c._call(c._stub.Scan, pb.ScanRequest(table=table, start=cursor, end=end,
                                                             limit=ask, txn_id=self.txn_id))
            except errors.TableNotFound:
                if self._writes_table(table):
                    break
                raise
            for kv in reply.items:
                theirs[kv.key] = kv.value
            if len(reply.items) < ask:
                break   # the instance has no more rows in the range
            last = reply.items[-1].key
            if len(_merged(theirs, mine, last)) >= limit:
                break   # the rows up to the page's last key are exact and fill limit
            cursor = last + b"\x00"
        return sorted(_merged(theirs, mine, None).items())[:limit]

    def _writes_table(self, table: str) -> bool:
        return any(t == table for t, _ in self._writes)

    # --- End ------------------------------------------------------------------------------

    def _commit_request(self, timeout_s: float | None) -> pb.CommitRequest:
        return pb.CommitRequest(txn_id=self.txn_id, timeout_ms=_ms(timeout_s), ops=self._ops())

    def commit(self, timeout_s: float | None = None) -> int:
        """Commit: the buffered writes and the commit in one call; returns the commit LSN
        once durable (0 if nothing was written). Raises ConflictError on conflict."""
        self._check_open()
        self.closed = True
        if not self.txn_id and not self._writes:
            return 0    # read nothing, wrote nothing: nothing to send
        c = self.client
        reply = c._call(c._stub.Commit, self._commit_request(timeout_s),
                        _deadline(timeout_s, c.timeout_s))
        return reply.commit_lsn

    def abort(self) -> None:
        """Drop the buffered writes; end the instance's transaction if it began there."""
        if self.closed:
            return
        self.closed = True
        self._writes.clear()
        if self.txn_id:
            c = self.client
            c._call(c._stub.Abort, pb.AbortRequest(txn_id=self.txn_id))

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.closed:
                self.commit()
        else:
            try:
                self.abort()
            except errors.DatabaseError:
                pass


# --- Through the control plane --------------------------------------------------------------

ENDPOINT_KINDS = ("cluster", "reader", "instance", "custom")
WATCH_INTERVAL_S = 0.5          # a waiting commit checks this often whether the writer moved
FAILOVER_WAIT_S = 30.0          # how long a write waits for a new writer
RETRY_DELAY_S = (0.05, 0.25)    # first and longest pause between resolutions
# A resolution may wait while the control plane resumes an auto-paused serverless
# instance (docs/serverless.md: launch and recovery, seconds on a loaded machine).
RESOLVE_TIMEOUT_S = 60.0
# A reader or custom endpoint is resolved again this often, so that replicas added since
# (replica auto scaling, `replica add`) get their share of the reads and a replica being
# drained stops getting new ones (docs/serverless.md).
REFRESH_S = 2.0


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """"cluster" -> ("cluster", ""); "instance:db2" -> ("instance", "db2"). ValueError if bad."""
    kind, _, name = endpoint.partition(":")
    if kind not in ENDPOINT_KINDS or (kind in ("instance", "custom")) != bool(name):
        raise ValueError(f"bad endpoint {endpoint!r}: cluster, reader, instance:NAME or custom:NAME")
    return kind, name


class ClusterClient:
    """A client of one endpoint of a cluster, resolved through its control plane.

    The same calls as Client (get, put, delete, scan, begin/transaction, status). Each call
    goes to a target the control plane named for the endpoint (ResolveEndpoint): the writer
    for "cluster", the next replica in turn for "reader" and "custom:NAME" (spreading reads),
    the named instance for "instance:NAME". After a failure the client resolves again:
    reads are retried until ``failover_wait_s``; writes only when nothing was done (module
    doc), also until ``failover_wait_s``, unless the control plane says no writer can come
    (the writer is down and no replica is up to take over): then at once. Thread-safe.
    """

    def __init__(self, control_address: str, endpoint: str = "cluster", *,
                 timeout_s: float = 30.0, failover_wait_s: float = FAILOVER_WAIT_S,
                 transport: Transport | None = None) -> None:
        from aurora_pb import control_pb2   # only clients of a cluster need it

        self.kind, self.name = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self.control_address = control_address
        self.timeout_s = timeout_s
        self.failover_wait_s = failover_wait_s
        self._pb = control_pb2
        self._transport = transport or default_transport()
        self._control_channel = self._transport.blocking_channel(control_address)
        self._control = self._control_channel.stub(service_of(control_pb2, "Control"))
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}          # address -> Client (one channel each)
        self._targets: list[tuple[str, str]] = []      # (instance, address)
        self._turn = itertools.count()
        self._resolved_at = 0.0                         # time.monotonic() of the last resolve
        self.resolution = None                          # the last ResolveReply
        self.resolutions = 0                            # how many times it asked
        self.retries = 0                                # requests sent again after a failure
        self.resolve()

    # --- Resolution ---------------------------------------------------------------------

    def resolve(self):
        """Ask the control plane where the endpoint leads now; returns the ResolveReply."""
        try:
            reply = self._control.ResolveEndpoint(self._pb.ResolveRequest(endpoint=self.endpoint),
                                                  timeout_s=RESOLVE_TIMEOUT_S)
        except RpcError as exc:
            if exc.status == "NOT_FOUND":
                raise errors.DatabaseError(exc.detail) from None
            raise errors.UnavailableError(
                f"the control plane at {self.control_address} cannot resolve {self.endpoint!r}: "
                f"{exc.status}: {exc.detail}") from None
        with self._lock:
            self.resolution = reply
            self.resolutions += 1
            self._resolved_at = time.monotonic()
            self._targets = [(t.instance, t.address) for t in reply.targets]
        return reply

    def _client(self, address: str) -> Client:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = Client(address, timeout_s=self.timeout_s,
                                                         transport=self._transport)
            return client

    def _target(self) -> tuple[str, Client]:
        """The next target: the writer, the named instance, or replicas in turn."""
        if self.kind in ("reader", "custom") and time.monotonic() - self._resolved_at > REFRESH_S:
            try:
                self.resolve()
            except errors.UnavailableError:
                pass   # keep the targets we have; a failed call resolves again
        with self._lock:
            targets = list(self._targets)
        if not targets:
            raise errors.UnavailableError(f"endpoint {self.endpoint!r} leads nowhere right now")
        instance, address = targets[next(self._turn) % len(targets)]
        return instance, self._client(address)

    @property
    def instance(self) -> str:
        """The instance the endpoint led to last (the writer, for "cluster")."""
        with self._lock:
            return self._targets[0][0] if self._targets else ""

    @property
    def address(self) -> str:
        with self._lock:
            return self._targets[0][1] if self._targets else ""

    def _pause(self, attempt: int, deadline: float, what: str, exc: Exception) -> None:
        """Wait before the next attempt; give up (raise) past the deadline."""
        if time.monotonic() >= deadline:
            raise errors.UnavailableError(
                f"{what}: no instance of endpoint {self.endpoint!r} answered within "
                f"{self.failover_wait_s:.0f}s (last error: {exc})") from exc
        low, high = RETRY_DELAY_S
        time.sleep(min(high, low * (2 ** min(attempt, 8)), max(0.0, deadline - time.monotonic())))

    # --- Calls ----------------------------------------------------------------------------

    def _read(self, what: str, call):
        """A read: on unavailability, resolve again and try (another target) until the deadline."""
        deadline = time.monotonic() + self.failover_wait_s
        for attempt in itertools.count():
            instance, client = self._target()
            try:
                return call(client)
            except errors.UnavailableError as exc:
                if isinstance(exc, errors.WriteQuorumUnavailable):
                    raise
                self._after_failure(attempt, deadline, f"{what} at {instance}", exc)

    def _write(self, what: str, call):
        """A commit: retried on the (new) writer only if nothing was done (module doc).
        ``call(client, abandon)`` sends it, watching ``abandon`` while it waits."""
        deadline = time.monotonic() + self.failover_wait_s
        for attempt in itertools.count():
            instance, client = self._target()
            try:
                return call(client, self._abandon_if_moved(instance))
            except errors.CommitOutcomeUnknown:
                raise
            except (errors.UnavailableError, errors.ReadOnlyError) as exc:
                if isinstance(exc, errors.WriteQuorumUnavailable):
                    raise
                if not retry_safe(exc):
                    raise errors.CommitOutcomeUnknown(
                        f"{what}: {instance} at {client.address} failed after the commit was "
                        f"sent ({type(exc).__name__}: {exc}); it may or may not have committed "
                        f"(read the key to find out)") from exc
                if self.kind != "cluster" and isinstance(exc, errors.ReadOnlyError):
                    raise errors.ReadOnlyError(
                        f"{what}: endpoint {self.endpoint!r} led to {instance}, which does not "
                        f"take writes ({exc}); write through the cluster endpoint") from exc
                self._after_failure(attempt, deadline, what, exc)

    def _after_failure(self, attempt: int, deadline: float, what: str, exc: Exception) -> None:
        """Resolve again; retry at once if the endpoint moved, else after a pause; raise if
        waiting cannot help (nothing can answer) or the deadline passed."""
        before = self._targets_now()
        reply = self.resolve()
        self.retries += 1
        if self.kind == "cluster" and not reply.writer_possible:
            raise errors.UnavailableError(
                f"{what}: the writer {reply.writer} at {reply.writer_address} does not answer "
                f"and no replica is up to take over ({exc})") from exc
        if self.kind != "cluster" and not any(t.up for t in reply.targets):
            raise errors.UnavailableError(
                f"{what}: no instance of endpoint {self.endpoint!r} is up ({exc})") from exc
        if self._targets_now() != before and time.monotonic() < deadline:
            return   # moved (a failover happened): go to the new target at once
        self._pause(attempt, deadline, what, exc)
        self.resolve()

    def _abandon_if_moved(self, instance: str):
        """For a commit waiting on ``instance``: a reason to stop waiting once the control
        plane has made another instance the writer (the one we wait on was deposed: it is
        paused or cut off, and storage fences it). None while it is still the writer."""
        def check() -> str | None:
            if self.kind != "cluster":
                return None
            try:
                reply = self.resolve()
            except errors.DatabaseError:
                return None
            if reply.writer != instance:
                return (f"the writer changed from {instance} to {reply.writer} while the "
                        f"commit waited on {instance}: it may or may not have committed "
                        f"(read the key to find out)")
            return None
        return check

    def _targets_now(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._targets)

    def get(self, key: bytes, table: str = DEFAULT_TABLE, **as_of) -> bytes:
        """The value of key; raises KeyNotFound. ``as_of_lsn=`` / ``as_of_time_us=``:
        time travel (Client.get)."""
        return self._read("get", lambda c: c.get(key, table, **as_of))

    def scan(self, start: bytes = b"", end: bytes = b"", limit: int = 0,
             table: str = DEFAULT_TABLE, **as_of) -> list[tuple[bytes, bytes]]:
        return self._read("scan", lambda c: c.scan(start, end, limit, table, **as_of))

    def get_at(self, key: bytes, table: str = DEFAULT_TABLE) -> tuple[bytes, int, str]:
        """(value, read point, instance): which instance answered and as of which VDL."""
        def call(c: Client):
            reply = c._call(c._stub.Get, pb.GetRequest(table=table, key=key))
            return reply.value, reply.read_point, c.address
        value, read_point, address = self._read("get", call)
        with self._lock:
            instance = next((i for i, a in self._targets if a == address), address)
        return value, read_point, instance

    def put(self, key: bytes, value: bytes, table: str = DEFAULT_TABLE,
            timeout_s: float | None = None) -> int:
        """Insert or replace; returns the commit LSN once durable. See the module doc for
        what happens when the writer fails meanwhile."""
        request = pb.PutRequest(table=table, key=key, value=value, timeout_ms=_ms(timeout_s))
        return self._write(f"put {key!r}", lambda c, abandon: c._call_watched(
            c._stub.Put, request, _deadline(timeout_s, c.timeout_s), abandon).commit_lsn)

    def delete(self, key: bytes, table: str = DEFAULT_TABLE, timeout_s: float | None = None) -> int:
        request = pb.DeleteRequest(table=table, key=key, timeout_ms=_ms(timeout_s))
        return self._write(f"delete {key!r}", lambda c, abandon: c._call_watched(
            c._stub.Delete, request, _deadline(timeout_s, c.timeout_s), abandon).commit_lsn)

    def status(self) -> pb.StatusReply:
        return self._read("status", lambda c: c.status())

    def begin(self) -> "Transaction":
        """A transaction of this endpoint. Sends nothing: it begins (Begin, on the instance
        the endpoint leads to then, where it stays) at its first read; one that only writes
        begins at its commit, sent like a put (module doc)."""
        return PinnedTransaction(self)

    def transaction(self) -> "Transaction":
        return self.begin()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        self._control_channel.close()

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PinnedTransaction(Transaction):
    """A transaction of a ClusterClient. Its first read begins it on the instance the
    endpoint leads to (retried like a read until one answers) and pins it there; its
    commit then says whether its outcome is known, and stops waiting
    (CommitOutcomeUnknown) once that instance is no longer the writer. A transaction that
    read nothing commits through the endpoint like a put (retried only if nothing was done)."""

    def __init__(self, cluster: ClusterClient) -> None:
        super().__init__(None)
        self.cluster = cluster
        self.abandon = lambda: None

    def _begin(self) -> Client:
        if self.txn_id:
            return self.client
        cluster = self.cluster

        def call(c: Client) -> None:
            self.txn_id = c._call(c._stub.Begin, pb.BeginRequest()).txn_id
            self.client = c
            with cluster._lock:
                instance = next((i for i, a in cluster._targets if a == c.address), c.address)
            self.abandon = cluster._abandon_if_moved(instance)
        cluster._read("begin", call)
        return self.client

    def commit(self, timeout_s: float | None = None) -> int:
        self._check_open()
        self.closed = True
        if not self.txn_id:
            if not self._writes:
                return 0    # read nothing, wrote nothing: nothing to send
            # Begun nowhere: the commit is a write like a put, retried only if nothing was done.
            request = self._commit_request(timeout_s)
            return self.cluster._write(
                f"transaction of {len(self._writes)} writes", lambda c, abandon: c._call_watched(
                    c._stub.Commit, request, _deadline(timeout_s, c.timeout_s), abandon).commit_lsn)
        c = self.client
        try:
            return c._call_watched(c._stub.Commit, self._commit_request(timeout_s),
                                   _deadline(timeout_s, c.timeout_s), self.abandon).commit_lsn
        except errors.CommitOutcomeUnknown:
            raise
        except (errors.UnavailableError, errors.ReadOnlyError) as exc:
            if isinstance(exc, errors.WriteQuorumUnavailable):
                raise   # the --timeout passed; the commit may still complete (as for Client)
            if retry_safe(exc):
                raise errors.UnavailableError(
                    f"transaction {self.txn_id} on {self.client.address}: nothing was committed "
                    f"({exc}); run it again (begin re-resolves the writer)") from exc
            raise errors.CommitOutcomeUnknown(
                f"transaction {self.txn_id} on {self.client.address}: the instance failed after "
                f"the commit was sent ({type(exc).__name__}: {exc}); it may or may not have "
                f"committed") from exc


def _merged(theirs: dict[bytes, bytes], mine: dict[bytes, bytes | None],
            upto: bytes | None) -> dict[bytes, bytes]:
    """The instance's rows with a transaction's buffered writes over them (None: deleted),
    only keys <= upto if given."""
    out = {k: v for k, v in theirs.items() if upto is None or k <= upto}
    for key, value in mine.items():
        if upto is not None and key > upto:
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _ms(timeout_s: float | None) -> int:
    return 0 if timeout_s is None else max(1, int(timeout_s * 1000))


def _deadline(timeout_s: float | None, default_s: float) -> float | None:
    """gRPC deadline of a write: a little longer than the server-side wait so that the
    server's clear WRITE_QUORUM_UNAVAILABLE arrives first; None (no deadline) when the
    caller asked to wait as long as it takes."""
    return None if timeout_s is None else timeout_s + 5.0
