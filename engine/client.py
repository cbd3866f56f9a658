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
arrives as its own exception class, never a bare grpc.RpcError.
"""

from __future__ import annotations

import grpc

from aurora_pb import database_pb2 as pb
from aurora_pb import database_pb2_grpc as pb_grpc
from engine import errors

ERROR_CLASSES = {
    "KEY_NOT_FOUND": errors.KeyNotFound,
    "TABLE_NOT_FOUND": errors.TableNotFound,
    "CONFLICT": errors.ConflictError,
    "TOO_LARGE": errors.TooLargeError,
    "BAD_REQUEST": errors.DatabaseError,
    "WRITE_QUORUM_UNAVAILABLE": errors.WriteQuorumUnavailable,
    "UNAVAILABLE": errors.UnavailableError,
    "READ_ONLY": errors.ReadOnlyError,
    "FENCED": errors.FencedError,
    "TXN_CLOSED": errors.TransactionClosedError,
}
DEFAULT_TABLE = "default"


def translate(exc: grpc.RpcError) -> errors.DatabaseError:
    """The engine.errors exception for a failed call."""
    code = ""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == "aurora-error":
                code = value
    except Exception:
        pass
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED):
            cls = errors.UnavailableError
        else:
            cls = errors.DatabaseError
    return cls(exc.details() or exc.code().name)


class Client:
    """A connection to one database instance (the writer, or a replica for reads)."""

    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.DatabaseStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout_s: float | None | str = "default"):
        try:
            return method(request, timeout=self.timeout_s if timeout_s == "default" else timeout_s)
        except grpc.RpcError as exc:
            raise translate(exc) from None

    # --- Autocommit ----------------------------------------------------------------------

    def get(self, key: bytes, table: str = DEFAULT_TABLE) -> bytes:
        """The value of key; raises KeyNotFound."""
        return self._call(self._stub.Get, pb.GetRequest(table=table, key=key)).value

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
             table: str = DEFAULT_TABLE) -> list[tuple[bytes, bytes]]:
        """Keys in [start, end) in order, at most limit (0: server default)."""
        reply = self._call(self._stub.Scan, pb.ScanRequest(table=table, start=start, end=end, limit=limit))
        return [(kv.key, kv.value) for kv in reply.items]

    def status(self) -> pb.StatusReply:
        return self._call(self._stub.Status, pb.StatusRequest())

    # --- Transactions -----------------------------------------------------------------

    def begin(self) -> "Transaction":
        return Transaction(self, self._call(self._stub.Begin, pb.BeginRequest()).txn_id)

    def transaction(self) -> "Transaction":
        """A transaction usable as a context manager (commit on success, abort on error)."""
        return self.begin()


class Transaction:
    """Reads see the transaction's own writes; writes become visible at commit."""

    def __init__(self, client: Client, txn_id: int) -> None:
        self.client = client
        self.txn_id = txn_id
        self.closed = False

    def get(self, key: bytes, table: str = DEFAULT_TABLE) -> bytes:
        c = self.client
        return c._call(c._stub.Get, pb.GetRequest(table=table, key=key, txn_id=self.txn_id)).value

    def put(self, key: bytes, value: bytes, table: str = DEFAULT_TABLE) -> None:
        c = self.client
        c._call(c._stub.Put, pb.PutRequest(table=table, key=key, value=value, txn_id=self.txn_id))

    def delete(self, key: bytes, table: str = DEFAULT_TABLE) -> None:
        c = self.client
        c._call(c._stub.Delete, pb.DeleteRequest(table=table, key=key, txn_id=self.txn_id))

    def scan(self, start: bytes = b"", end: bytes = b"", limit: int = 0,
             table: str = DEFAULT_TABLE) -> list[tuple[bytes, bytes]]:
        c = self.client
        reply = c._call(c._stub.Scan, pb.ScanRequest(table=table, start=start, end=end,
                                                     limit=limit, txn_id=self.txn_id))
        return [(kv.key, kv.value) for kv in reply.items]

    def commit(self, timeout_s: float | None = None) -> int:
        """Commit; returns the commit LSN once durable. Raises ConflictError on conflict."""
        c = self.client
        self.closed = True
        reply = c._call(c._stub.Commit, pb.CommitRequest(txn_id=self.txn_id, timeout_ms=_ms(timeout_s)),
                        _deadline(timeout_s, c.timeout_s))
        return reply.commit_lsn

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
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


def _ms(timeout_s: float | None) -> int:
    return 0 if timeout_s is None else max(1, int(timeout_s * 1000))


def _deadline(timeout_s: float | None, default_s: float) -> float | None:
    """gRPC deadline of a write: a little longer than the server-side wait so that the
    server's clear WRITE_QUORUM_UNAVAILABLE arrives first; None (no deadline) when the
    caller asked to wait as long as it takes."""
    return None if timeout_s is None else timeout_s + 5.0
