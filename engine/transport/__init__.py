"""The transport seam: the one interface through which aurora-lite processes call each other.

Every RPC between processes goes through it: writer -> storage (Append, ReadPage, Truncate,
...), storage -> storage (gossip), writer -> replica (the redo stream), the control plane
-> instances and nodes, and client -> instance. Callers never touch grpc objects: they
hold a ``Transport``, open ``Channel``s to addresses, and call methods of a protobuf
service on a stub. Servers register plain handler objects whose methods are ordinary
``async def Method(self, request, ctx)`` over protobuf messages. The gRPC implementation
(engine/transport/grpc_transport.py) is the only module of the engine's layers that imports
grpc; the deterministic simulator (step 11) implements the same interface over a
simulated network, so the same handlers and callers run in both.

What a Transport promises (docs/transport.md says it at length; a second implementation
must keep every line):

  1. Unary calls: ``await stub.Method(request, timeout_s=...)`` returns the reply message or
     raises ``engine.errors.RpcError``; it never raises a transport library's own
     exception type. ``timeout_s`` None means the channel's default deadline (None: none).
  2. Errors: ``RpcError.status`` is one of ``STATUSES`` (gRPC's status names);
     ``RpcError.code`` is the aurora-error machine code a handler set (``ErrorCode``), ""
     if none; ``RpcError.metadata`` the other trailing pairs (e.g.
     ``aurora-current-epoch``). A call that cannot reach its server fails with
     UNAVAILABLE; one that outlives its deadline with DEADLINE_EXCEEDED. Either may have
     been executed by the server or not: callers retry only idempotent requests.
  3. A handler that raises ``RpcError`` makes the caller see that status, detail, code and
     metadata. Any other exception becomes status UNKNOWN (and is logged by the server):
     handlers must refuse bad input with a typed error instead.
  4. Ordering: no order between two unary calls, even on one channel (the simulator
     reorders them). Within one stream, messages arrive in the order written, each at most
     once; a stream that breaks ends with an RpcError from ``read``/``write`` (or None from
     ``read`` when the server finished it).
  5. Latency: a Transport built with a ``LinkDelay`` adds its one-way delay before a unary
     request is sent and again before its reply is delivered (engine/transport/latency.py);
     on a stream, every message each way is delivered its one-way delay late, pipelined
     (a stream's write returns once the message is queued; a break shows on the next
     read or write).
  6. Faults: when the fault file is active (engine/hooks.py), calls obey its rules on the
     caller's side (partition, drop, delay, duplicate, reorder); see docs/reliability.md.
  7. A request may be passed to a unary call or a stream's write already serialised
     (``bytes``): one Append batch is serialised once for six nodes (docs/decisions.md,
     design choice D2).

No grpc, no asyncio at import: engine/writer, storage_node and the simulator import this.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from engine.errors import RpcError

__all__ = ["STATUSES", "BlockingChannel", "CallContext", "Channel", "LinkDelay", "RpcError",
           "Server", "Stream", "Transport", "service_of"]

#: The status names a transport reports (gRPC's own; the simulator uses the same words).
STATUSES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
            "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
            "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
            "UNAUTHENTICATED")


def service_of(pb_module, name: str):
    """The ServiceDescriptor of service ``name`` in a generated ``*_pb2`` module, e.g.
    ``service_of(storage_pb2, "Storage")``: what ``Channel.stub`` and ``Transport.serve`` take."""
    return pb_module.DESCRIPTOR.services_by_name[name]


class LinkDelay(Protocol):
    """The simulated one-way delay of the link from this process to ``address``."""

    def one_way_s(self, address: str) -> float: ...


class CallContext(Protocol):
    """What a handler may learn about, and add to, the call it serves."""

    #: The caller's address as the transport saw it (for logs).
    peer: str
    #: The request's metadata (key -> value).
    metadata: dict[str, str]

    def set_trailing(self, key: str, value: str) -> None:
        """Add a trailing metadata pair to the reply (or to the error the handler raises)."""


class Stream(Protocol):
    """The caller's end of a bidirectional stream (``stub.Method()`` on a stream method)."""

    async def read(self) -> Any | None:
        """The next message from the server; None once the server finished the stream.
        Raises RpcError if the stream broke."""

    async def write(self, message: Any) -> None:
        """Send one message to the server (in order); raises RpcError if the stream broke."""

    def cancel(self) -> None:
        """End the stream from this side; the server's handler sees it cancelled."""


class Channel(Protocol):
    """A connection from this process to one address, for any number of calls."""

    address: str

    def stub(self, service) -> Any:
        """An object with one attribute per method of ``service`` (a ServiceDescriptor):
        unary methods are ``async (request, *, timeout_s=None, metadata=None) -> reply``;
        bidirectional stream methods are ``(metadata=None) -> Stream``."""

    async def serving(self, service: str = "", timeout_s: float = 1.0) -> bool:
        """True if the server answers and reports ``service`` ("" = the process) serving."""

    async def close(self) -> None:
        """Release the connection; calls in flight fail with CANCELLED."""


class BlockingChannel(Protocol):
    """The same as Channel for blocking callers (the client library and the CLI)."""

    address: str

    def stub(self, service) -> Any:
        """As Channel.stub, but unary methods block: ``(request, *, timeout_s=None,
        metadata=None) -> reply``. ``stub.Method.future(request, ...)`` starts the call
        and returns a pending call: ``.result(timeout_s)`` (TimeoutError while not done,
        RpcError if it failed) and ``.cancel()``."""

    def serving(self, service: str = "", timeout_s: float = 1.0) -> bool:
        """As Channel.serving, blocking."""

    def wait_ready(self, timeout_s: float) -> None:
        """Block until connected; RpcError UNAVAILABLE if that takes over timeout_s."""

    def close(self) -> None: ...


class Server(Protocol):
    """A listening server: its handlers run until ``stop``."""

    #: The port actually bound (``serve`` with port 0 picks one).
    port: int

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """What health checks report for ``service`` ("" = the process; None = the process
        and every service it serves). A new server reports NOT_SERVING until told."""

    async def stop(self, grace_s: float | None) -> None:
        """Stop accepting calls; let calls in flight finish for up to ``grace_s``."""

    async def wait_closed(self) -> None:
        """Return when the server has stopped."""


class Transport(Protocol):
    """Opens channels and serves handlers. One per process, named for its process (``me``),
    whose name the fault rules and the latency model use."""

    me: str
    latency: LinkDelay | None

    def channel(self, address: str, *, timeout_s: float | None = None) -> Channel:
        """A channel to ``address``; ``timeout_s`` is the default deadline of its unary calls."""

    def blocking_channel(self, address: str, *, timeout_s: float | None = None) -> BlockingChannel:
        """A channel for blocking callers."""

    async def serve(self, host: str, port: int, handlers: dict) -> Server:
        """Serve ``handlers`` ({ServiceDescriptor: handler object}) on host:port (0 = any
        free port). A handler method is ``async def Method(self, request, ctx)`` for a
        unary method and ``async def Method(self, requests: AsyncIterator, ctx)`` yielding
        replies (an async generator) for a bidirectional stream."""

    def one_way_ms(self, address: str) -> float:
        """The simulated one-way delay to ``address`` now (0 without a latency model)."""


# For type checkers: a bidi handler's request side.
Requests = AsyncIterator
