"""The gRPC implementation of the transport seam (engine/transport/__init__.py).

The only module of the engine's layers that imports grpc. It owns everything gRPC-specific:
channels and their options, the message size limit, deadlines, generic stubs and server
handlers built from the protobuf service descriptors (no generated ``*_pb2_grpc`` code
needed), the mapping between gRPC status + trailing metadata and ``engine.errors.RpcError``
in both directions, and the health service. Latency and injected faults act in
engine/transport/links.py around every call, the same for any transport.

    piece                    what it does
    GrpcTransport            one per process: channels, blocking channels, servers
    _Channel / _Stub         unary calls (request may be pre-serialised bytes), streams
    _Stream                  the caller's end of a bidirectional stream
    _BlockingChannel         the same with blocking calls (client library, CLI)
    GrpcServer               grpc.aio server + health; handlers are plain async methods
    error mapping            grpc.RpcError -> RpcError (_error_of); RpcError -> abort
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.errors import METADATA_ERROR, RpcError
from engine.transport.links import Links

log = logging.getLogger(__name__)

#: The largest message any aurora-lite RPC may carry, both ways (a redo batch is sealed at
#: 4 MiB; page fetches and hydration replies are the large ones).
MESSAGE_BYTES_MAX = 64 * 1024 * 1024

#: How long one connection attempt may take before gRPC gives it up (gRPC core takes it from
#: ``grpc.min_reconnect_backoff_ms``). A refused connection fails at once whatever this is;
#: it bounds only a handshake that is slow, e.g. a control plane busy starting six nodes
#: on two cores. At 100 ms such handshakes failed and callers saw UNAVAILABLE from a
#: healthy process; gRPC's default (20 s) would hide a paused process for too long.
CONNECT_TIMEOUT_MIN_MS = 2000

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    # Reconnect to a restarted process quickly (gRPC's defaults back off up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MIN_MS),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.so_reuseport", 0),   # two servers must never share a port by accident
]


def _serialize(request) -> bytes:
    return request if isinstance(request, (bytes, bytearray, memoryview)) else request.SerializeToString()


def _message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)


def _error_of(exc: grpc.RpcError) -> RpcError:
    """The RpcError a caller sees for a failed gRPC call (promise 2)."""
    try:
        status = exc.code().name
    except Exception:
        status = "UNKNOWN"
    try:
        detail = exc.details() or ""
    except Exception:
        detail = str(exc)
    pairs: dict[str, str] = {}
    try:
        for key, value in exc.trailing_metadata() or ():
            pairs[key] = value if isinstance(value, str) else value.decode()
    except Exception:
        pass
    code = pairs.pop(METADATA_ERROR, "")
    return RpcError(status, detail, code, pairs)


def _methods(service):
    """(name, path, request class, reply class, is_stream) of each method of ``service``."""
    for m in service.methods:
        if m.client_streaming != m.server_streaming:
            raise NotImplementedError(f"{m.full_name}: only unary and bidirectional methods")
        yield (m.name, f"/{service.full_name}/{m.name}", _message_class(m.input_type),
               _message_class(m.output_type), m.client_streaming)


# --- Calling ---------------------------------------------------------------------------


class _Stream:
    """The caller's end of a bidirectional stream, as gRPC gives it (errors mapped);
    engine/transport/links.py wraps it in the link's latency and faults."""

    def __init__(self, call) -> None:
        self._call = call

    async def read(self):
        try:
            msg = await self._call.read()
        except grpc.RpcError as exc:
            raise _error_of(exc) from None
        return None if msg is grpc.aio.EOF else msg

    async def write(self, message) -> None:
        try:
            await self._call.write(message)
        except grpc.RpcError as exc:
            raise _error_of(exc) from None
        except asyncio.InvalidStateError as exc:
            # The call already finished (the server went away between two reads).
            raise RpcError("CANCELLED", f"stream already ended: {exc}") from None

    def cancel(self) -> None:
        self._call.cancel()


class _Stub:
    def __init__(self, channel: "_Channel", service) -> None:
        for name, path, req_cls, reply_cls, is_stream in _methods(service):
            if is_stream:
                mc = channel._grpc.stream_stream(path, request_serializer=_serialize,
                                                 response_deserializer=reply_cls.FromString)
                setattr(self, name, self._stream_method(channel, mc))
            else:
                mc = channel._grpc.unary_unary(path, request_serializer=_serialize,
                                               response_deserializer=reply_cls.FromString)
                setattr(self, name, self._unary_method(channel, mc))

    @staticmethod
    def _unary_method(channel: "_Channel", mc):
        async def call(request, *, timeout_s: float | None = None, metadata: dict | None = None):
            timeout = timeout_s if timeout_s is not None else channel.timeout_s
            md = tuple(metadata.items()) if metadata else None

            async def send():
                try:
                    return await mc(request, timeout=timeout, metadata=md)
                except grpc.RpcError as exc:
                    raise _error_of(exc) from None
            return await channel._links.unary(channel.address, send)
        return call

    @staticmethod
    def _stream_method(channel: "_Channel", mc):
        def open_stream(metadata: dict | None = None):
            channel._links.check_stream_start(channel.address)
            call = mc(metadata=tuple(metadata.items()) if metadata else None)
            return channel._links.stream(channel.address, _Stream(call))
        return open_stream


class _Channel:
    def __init__(self, address: str, links: Links, timeout_s: float | None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._links = links
        self._grpc = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stubs: dict[str, _Stub] = {}

    def stub(self, service) -> _Stub:
        stub = self._stubs.get(service.full_name)
        if stub is None:
            stub = self._stubs[service.full_name] = _Stub(self, service)
        return stub

    async def serving(self, service: str = "", timeout_s: float = 1.0) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self._grpc).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._grpc.close()

    async def __aenter__(self) -> "_Channel":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _BlockingStub:
    def __init__(self, channel: "_BlockingChannel", service) -> None:
        for name, path, req_cls, reply_cls, is_stream in _methods(service):
            if is_stream:
                continue   # no blocking caller uses a stream
            mc = channel._grpc.unary_unary(path, request_serializer=_serialize,
                                           response_deserializer=reply_cls.FromString)
            setattr(self, name, self._method(channel, mc))

    @staticmethod
    def _method(channel: "_BlockingChannel", mc):
        def call(request, *, timeout_s: float | None = None, metadata: dict | None = None):
            timeout = timeout_s if timeout_s is not None else channel.timeout_s
            try:
                return mc(request, timeout=timeout,
                          metadata=tuple(metadata.items()) if metadata else None)
            except grpc.RpcError as exc:
                raise _error_of(exc) from None

        def future(request, *, timeout_s: float | None = None, metadata: dict | None = None):
            timeout = timeout_s if timeout_s is not None else channel.timeout_s
            return _Pending(mc.future(request, timeout=timeout,
                                      metadata=tuple(metadata.items()) if metadata else None))
        call.future = future
        return call


class _Pending:
    """A blocking call in flight (``stub.Method.future(request)``)."""

    def __init__(self, future) -> None:
        self._future = future

    def result(self, timeout_s: float | None = None):
        """The reply; TimeoutError if not done within timeout_s; RpcError if it failed."""
        try:
            return self._future.result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise TimeoutError from None
        except grpc.FutureCancelledError:
            raise RpcError("CANCELLED", "the call was cancelled by its caller") from None
        except grpc.RpcError as exc:
            raise _error_of(exc) from None

    def cancel(self) -> None:
        self._future.cancel()


class _BlockingChannel:
    def __init__(self, address: str, timeout_s: float | None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._grpc = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stubs: dict[str, _BlockingStub] = {}

    def stub(self, service) -> _BlockingStub:
        stub = self._stubs.get(service.full_name)
        if stub is None:
            stub = self._stubs[service.full_name] = _BlockingStub(self, service)
        return stub

    def serving(self, service: str = "", timeout_s: float = 1.0) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(self._grpc).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout_s: float) -> None:
        try:
            grpc.channel_ready_future(self._grpc).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise RpcError("UNAVAILABLE", f"cannot connect to {self.address} within "
                                          f"{timeout_s:g} s") from None

    def close(self) -> None:
        self._grpc.close()

    def __enter__(self) -> "_BlockingChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- Serving ---------------------------------------------------------------------------


class _Context:
    """The CallContext a handler sees."""

    def __init__(self, context) -> None:
        self._context = context
        self.peer = context.peer()
        self.metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        self.trailing: dict[str, str] = {}

    def set_trailing(self, key: str, value: str) -> None:
        self.trailing[key] = value


async def _abort(context, ctx: _Context, exc: RpcError) -> None:
    pairs = {**ctx.trailing, **exc.trailing()}
    await context.abort(getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN),
                        exc.detail or str(exc), trailing_metadata=tuple(pairs.items()))


def _unary_handler(fn):
    async def behaviour(request, context):
        ctx = _Context(context)
        try:
            reply = await fn(request, ctx)
        except RpcError as exc:
            await _abort(context, ctx, exc)
            return None  # not reached: abort raises
        if ctx.trailing:
            context.set_trailing_metadata(tuple(ctx.trailing.items()))
        return reply
    return behaviour


def _stream_handler(fn):
    async def behaviour(request_iterator, context):
        ctx = _Context(context)
        try:
            async for reply in fn(request_iterator, ctx):
                yield reply
        except RpcError as exc:
            await _abort(context, ctx, exc)
    return behaviour


class GrpcServer:
    """A grpc.aio server running handler objects, with the standard health service."""

    def __init__(self, server, health_servicer, port: int, services: list[str]) -> None:
        self._server = server
        self._health = health_servicer
        self._services = services
        self.port = port

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ([""] + self._services) if service is None else [service]:
            await self._health.set(name, status)

    async def stop(self, grace_s: float | None) -> None:
        await self._server.stop(grace_s)

    async def wait_closed(self) -> None:
        await self._server.wait_for_termination()


class GrpcTransport:
    """The Transport of a real process (see engine/transport/__init__.py for the promises)."""

    def __init__(self, me: str, latency=None) -> None:
        self.me = me
        self._links = Links(me, latency)

    @property
    def latency(self):
        return self._links.latency

    @latency.setter
    def latency(self, value) -> None:
        self._links.latency = value

    def one_way_ms(self, address: str) -> float:
        return self._links.one_way_s(address) * 1000.0

    def channel(self, address: str, *, timeout_s: float | None = None) -> _Channel:
        return _Channel(address, self._links, timeout_s)

    def blocking_channel(self, address: str, *, timeout_s: float | None = None) -> _BlockingChannel:
        return _BlockingChannel(address, timeout_s)

    async def serve(self, host: str, port: int, handlers: dict) -> GrpcServer:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        for service, handler in handlers.items():
            table = {}
            for name, _path, req_cls, reply_cls, is_stream in _methods(service):
                fn = getattr(handler, name, None)
                if fn is None:
                    continue   # UNIMPLEMENTED for the caller
                make = grpc.stream_stream_rpc_method_handler if is_stream else grpc.unary_unary_rpc_method_handler
                table[name] = make((_stream_handler if is_stream else _unary_handler)(fn),
                                   request_deserializer=req_cls.FromString,
                                   response_serializer=reply_cls.SerializeToString)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, table),))
        health_servicer = health.aio.HealthServicer()
        for service in handlers:
            await health_servicer.set(service.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen on {host}:{port}")
        await server.start()
        return GrpcServer(server, health_servicer, bound, [s.full_name for s in handlers])
