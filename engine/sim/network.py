"""The simulated network: the second implementation of the transport seam (engine/transport).

``SimNetwork`` connects every simulated process in memory; each process holds a
``SimTransport`` (its ``me`` is the process name) with the same ``channel`` / ``serve``
interface as engine/transport/grpc_transport.py, so the production handlers and callers
(storage_node/service.py, the StorageDriver, gossip, the redo stream) run unchanged. Every
message is serialised by the sender and parsed by the receiver (protobuf bytes, as on a
wire), and keeps the seven promises of engine/transport/__init__.py:

    promise                       how the simulation keeps it
    1, 2, 3 unary calls, errors   a handler's RpcError reaches the caller as a fresh
                                  RpcError (status, detail, code, trailing metadata);
                                  another exception becomes UNKNOWN; an unreachable or
                                  crashed server UNAVAILABLE; a deadline DEADLINE_EXCEEDED
    4 ordering                    unary calls may be reordered (the reorder fault); a
                                  stream delivers in order, at most once, or breaks
    5 latency                     each message is delivered its link's one-way delay late
                                  (the AZ latency model of engine/format/cluster_config.py)
    6 faults                      the network's own seeded rules (``LinkRules``), which
                                  mirror the fault file's kinds: partition (one-way),
                                  drop, delay, duplicate, reorder
    7 pre-serialised requests     bytes pass through as they are

Every delivery (request, reply, stream message, break) is an event of the trace
(engine/sim/trace.py) with its virtual time. No grpc, no sockets.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from google.protobuf import message_factory

from engine.errors import RpcError
from engine.format.cluster_config import Latency
from engine.sim.loop import SimProcess

log = logging.getLogger(__name__)


def _serialize(message) -> bytes:
    return bytes(message) if isinstance(message, (bytes, bytearray, memoryview)) \
        else message.SerializeToString()


def _methods(service):
    for m in service.methods:
        yield (m.name, message_factory.GetMessageClass(m.input_type),
               message_factory.GetMessageClass(m.output_type), m.client_streaming)


def _unavailable(detail: str) -> RpcError:
    return RpcError("UNAVAILABLE", detail)


@dataclass
class LinkRules:
    """The faults the schedule has injected right now (all off by default)."""

    blocked: set = field(default_factory=set)        # {(src, dst)}: one-way partitions
    drop_p: dict = field(default_factory=dict)       # {(src, dst) or (src, "*")...: p}
    dup_p: dict = field(default_factory=dict)
    delay_ms: dict = field(default_factory=dict)     # extra one-way delay
    reorder_ms: dict = field(default_factory=dict)   # random extra 0..ms per unary request

    @staticmethod
    def _get(table: dict, src: str, dst: str, default=0.0):
        for key in ((src, dst), (src, "*"), ("*", dst), ("*", "*")):
            if key in table:
                return table[key]
        return default


class _Context:
    """The CallContext a handler sees."""

    def __init__(self, peer: str, metadata: dict | None) -> None:
        self.peer = peer
        self.metadata = dict(metadata or {})
        self.trailing: dict[str, str] = {}

    def set_trailing(self, key: str, value: str) -> None:
        self.trailing[key] = value


class SimServer:
    """A serving process's handlers at one address."""

    def __init__(self, net: "SimNetwork", address: str, proc: SimProcess, handlers: dict) -> None:
        self.net = net
        self.address = address
        self.proc = proc
        self.port = int(address.rsplit(":", 1)[1])
        self.methods: dict[str, tuple] = {}      # "Service/Method" -> (fn, req_cls, reply_cls)
        self.services = [s.full_name for s in handlers]
        self.serving_names: set[str] = set()
        self.stopped = False
        for service, handler in handlers.items():
            for name, req_cls, reply_cls, is_stream in _methods(service):
                fn = getattr(handler, name, None)
                if fn is not None:
                    self.methods[f"{service.full_name}/{name}"] = (fn, req_cls, reply_cls, is_stream)

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        names = ([""] + self.services) if service is None else [service]
        for n in names:
            (self.serving_names.add if serving else self.serving_names.discard)(n)

    async def stop(self, grace_s: float | None) -> None:
        self.stopped = True
        self.net.unregister(self)

    async def wait_closed(self) -> None:
        while not self.stopped:
            await asyncio.sleep(1.0)

    @property
    def up(self) -> bool:
        return not self.stopped and not self.proc.dead


class SimNetwork:
    """Every simulated process's links (see the module doc)."""

    def __init__(self, rng, trace, latency: Latency, azs: dict[str, str]) -> None:
        self.rng = rng
        self.trace = trace
        self.latency = latency
        self.azs = azs                       # process name -> AZ
        self.servers: dict[str, SimServer] = {}
        self.names: dict[str, str] = {}      # address -> process name
        self.rules = LinkRules()
        self.streams: set["_SimStream"] = set()
        self.messages = 0

    # --- topology -----------------------------------------------------------------------

    def register(self, server: SimServer) -> None:
        self.servers[server.address] = server
        self.names[server.address] = server.proc.name

    def unregister(self, server: SimServer) -> None:
        if self.servers.get(server.address) is server:
            del self.servers[server.address]
        self.cut(lambda s: s.server is server, "server stopped")

    def name_of(self, address: str) -> str:
        return self.names.get(address, address)

    def one_way_s(self, src: str, dst: str) -> float:
        a, b = self.azs.get(src, "az-a"), self.azs.get(dst, "az-a")
        ms = self.latency.one_way_ms(a, b, from_node=src, to_node=dst)
        ms += LinkRules._get(self.rules.delay_ms, src, dst)
        return ms / 1000.0

    def blocked(self, src: str, dst: str) -> bool:
        return (src, dst) in self.rules.blocked

    def dropped(self, src: str, dst: str) -> bool:
        p = LinkRules._get(self.rules.drop_p, src, dst)
        return p > 0 and self.rng.random() < p

    def cut(self, match, why: str) -> int:
        """Break every open stream ``match(stream)`` selects (a partition, a crash)."""
        hit = [s for s in self.streams if match(s)]
        hit.sort(key=lambda s: s.serial)
        for s in hit:
            s.break_(_unavailable(f"stream {s.src}->{s.dst} cut: {why}"))
        return len(hit)

    def cut_blocked(self) -> int:
        return self.cut(lambda s: self.blocked(s.src, s.dst) or self.blocked(s.dst, s.src),
                        "partition")

    # --- unary calls --------------------------------------------------------------------

    async def unary(self, src: str, address: str, path: str, request, timeout_s, metadata,
                    reply_cls):
        dst = self.name_of(address)
        data = _serialize(request)
        loop = asyncio.get_running_loop()

        async def roundtrip():
            if self.blocked(src, dst):
                raise _unavailable(f"{src} -> {dst}: partitioned")
            delay = self.one_way_s(src, dst)
            reorder = LinkRules._get(self.rules.reorder_ms, src, dst)
            if reorder:
                delay += self.rng.random() * reorder / 1000.0
            await asyncio.sleep(delay)
            server = self.servers.get(address)
            if server is None or not server.up or self.blocked(src, dst):
                raise _unavailable(f"{src} -> {dst}: cannot connect")
            drop = self.dropped(src, dst)
            if drop and self.rng.random() < 0.5:
                self.trace.event(loop.time(), src, dst, path, "req-dropped", len(data))
                raise _unavailable(f"{src} -> {dst}: request dropped")
            copies = 2 if self.rng.random() < LinkRules._get(self.rules.dup_p, src, dst) else 1
            outcome = None
            for _ in range(copies):
                self.trace.event(loop.time(), src, dst, path, "req", len(data))
                outcome = await self._serve(server, src, path, data, metadata)
            back = self.one_way_s(dst, src)
            await asyncio.sleep(back)
            if drop or self.blocked(dst, src) or not server.up:
                self.trace.event(loop.time(), dst, src, path, "reply-lost", 0)
                raise _unavailable(f"{src} -> {dst}: reply lost")
            if isinstance(outcome, RpcError):
                self.trace.event(loop.time(), dst, src, path, "err " + outcome.status, 0)
                raise outcome
            self.trace.event(loop.time(), dst, src, path, "reply", len(outcome))
            return reply_cls.FromString(outcome)

        self.messages += 1
        if timeout_s is None:
            return await roundtrip()
        try:
            return await asyncio.wait_for(roundtrip(), timeout_s)
        except asyncio.TimeoutError:
            self.trace.event(loop.time(), src, dst, path, "deadline", 0)
            raise RpcError("DEADLINE_EXCEEDED", f"{src} -> {dst} {path}: deadline "
                                                f"{timeout_s:g} s exceeded") from None

    async def _serve(self, server: SimServer, src: str, path: str, data: bytes, metadata):
        """Run the handler as a task of the server's process; its outcome as bytes or an
        RpcError (a crash of the server while it runs: UNAVAILABLE)."""
        entry = server.methods.get(path)
        if entry is None:
            return RpcError("UNIMPLEMENTED", f"{path} is not served by {server.proc.name}")
        fn, req_cls, _reply_cls, _is_stream = entry
        ctx = _Context(src, metadata)

        async def run():
            try:
                reply = await fn(req_cls.FromString(data), ctx)
            except RpcError as exc:
                return RpcError(exc.status, exc.detail, exc.code,
                                {**ctx.trailing, **exc.metadata})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # promise 3: anything else is UNKNOWN, and logged
                log.exception("%s: handler %s failed", server.proc.name, path)
                return RpcError("UNKNOWN", f"{type(exc).__name__}: {exc}")
            return _serialize(reply)

        task = server.proc.spawn(run(), name=f"{server.proc.name}:{path}")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not asyncio.current_task().cancelling():
                return _unavailable(f"{server.proc.name} went away during {path}")
            task.cancel()
            raise

    # --- streams ------------------------------------------------------------------------

    def open_stream(self, src_proc_name: str, address: str, path: str, metadata, reply_cls):
        return _SimStream(self, src_proc_name, address, path, metadata, reply_cls)


class _SimStream:
    """Both ends of one bidirectional stream (the caller holds it as its Stream)."""

    _serials = 0

    def __init__(self, net: SimNetwork, src: str, address: str, path: str, metadata,
                 reply_cls) -> None:
        _SimStream._serials += 1
        self.serial = _SimStream._serials
        self.net = net
        self.src = src
        self.dst = net.name_of(address)
        self.path = path
        self.reply_cls = reply_cls
        self.to_client: asyncio.Queue = asyncio.Queue()
        self.to_server: asyncio.Queue = asyncio.Queue()
        self.error: RpcError | None = None
        self.handler_task: asyncio.Task | None = None
        self.server: SimServer | None = None
        self._next_up = 0.0          # delivery time of the last message each way (in order)
        self._next_down = 0.0
        loop = asyncio.get_running_loop()
        server = net.servers.get(address)
        if net.blocked(src, self.dst) or server is None or not server.up:
            self.error = _unavailable(f"{src} -> {self.dst}: cannot open {path}")
            return
        entry = server.methods.get(path)
        if entry is None:
            self.error = RpcError("UNIMPLEMENTED", f"{path} is not served by {self.dst}")
            return
        self.server = server
        net.streams.add(self)
        fn, req_cls, _reply, _is_stream = entry
        ctx = _Context(src, metadata)
        net.trace.event(loop.time(), src, self.dst, path, "open", 0)

        async def requests():
            while True:
                item = await self.to_server.get()
                if item is None:
                    return
                yield req_cls.FromString(item)

        async def run():
            try:
                async for reply in fn(requests(), ctx):
                    self._send_down(_serialize(reply))
                self._send_down(None)
            except RpcError as exc:
                self._send_down(RpcError(exc.status, exc.detail, exc.code,
                                         {**ctx.trailing, **exc.metadata}))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: stream handler %s failed", self.dst, path)
                self._send_down(RpcError("UNKNOWN", f"{type(exc).__name__}: {exc}"))

        self.handler_task = server.proc.spawn(run(), name=f"{self.dst}:{path}")

    def _deliver_at(self, up: bool) -> float:
        loop = asyncio.get_running_loop()
        a, b = (self.src, self.dst) if up else (self.dst, self.src)
        when = max(loop.time() + self.net.one_way_s(a, b), self._next_up if up else self._next_down)
        if up:
            self._next_up = when
        else:
            self._next_down = when
        return when

    def _send_down(self, item) -> None:
        """Server -> client: a reply (bytes), None (finished) or an RpcError."""
        if self.error is not None:
            return
        if isinstance(item, bytes) and self.net.dropped(self.dst, self.src):
            self.break_(_unavailable(f"stream {self.dst}->{self.src}: message dropped"))
            return
        loop = asyncio.get_running_loop()
        when = self._deliver_at(False)

        def deliver():
            if self.error is not None:
                return
            kind = "msg" if isinstance(item, bytes) else ("end" if item is None else "err")
            self.net.trace.event(loop.time(), self.dst, self.src, self.path, "s2c " + kind,
                                 len(item) if isinstance(item, bytes) else 0)
            self.to_client.put_nowait(item)
            if not isinstance(item, bytes):
                self.net.streams.discard(self)

        loop.call_at(when, deliver)

    def break_(self, error: RpcError) -> None:
        """The stream breaks: the caller's next read/write raises, the handler is cancelled."""
        if self.error is not None:
            return
        self.error = error
        self.net.streams.discard(self)
        self.net.trace.event(asyncio.get_running_loop().time(), self.src, self.dst, self.path,
                             "break", 0)
        self.to_client.put_nowait(error)
        if self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()

    # --- the caller's side (engine.transport.Stream) -------------------------------------

    async def read(self):
        if self.error is not None and self.to_client.empty():
            raise self.error
        item = await self.to_client.get()
        if isinstance(item, RpcError):
            self.to_client.put_nowait(item)    # every later read fails the same way
            raise item
        if item is None:
            self.to_client.put_nowait(None)
            return None
        return self.reply_cls.FromString(item)

    async def write(self, message) -> None:
        if self.error is not None:
            raise self.error
        data = _serialize(message)
        if self.net.dropped(self.src, self.dst):
            self.break_(_unavailable(f"stream {self.src}->{self.dst}: message dropped"))
            raise self.error
        loop = asyncio.get_running_loop()
        when = self._deliver_at(True)

        def deliver():
            if self.error is not None:
                return
            self.net.trace.event(loop.time(), self.src, self.dst, self.path, "c2s msg", len(data))
            self.to_server.put_nowait(data)

        loop.call_at(when, deliver)

    def cancel(self) -> None:
        if self.error is None:
            self.break_(RpcError("CANCELLED", "the caller cancelled the stream"))


class _Stub:
    def __init__(self, channel: "SimChannel", service) -> None:
        for name, _req_cls, reply_cls, is_stream in _methods(service):
            path = f"{service.full_name}/{name}"
            setattr(self, name, (self._stream(channel, path, reply_cls) if is_stream
                                 else self._unary(channel, path, reply_cls)))

    @staticmethod
    def _unary(channel: "SimChannel", path: str, reply_cls):
        async def call(request, *, timeout_s: float | None = None, metadata: dict | None = None):
            if channel.closed:
                raise RpcError("CANCELLED", "channel closed")
            if channel.transport.proc.dead:
                raise asyncio.CancelledError()   # a crashed process makes no more calls
            t = channel.timeout_s if timeout_s is None else timeout_s
            return await channel.transport.net.unary(channel.transport.me, channel.address, path,
                                                     request, t, metadata, reply_cls)
        return call

    @staticmethod
    def _stream(channel: "SimChannel", path: str, reply_cls):
        def open_stream(metadata: dict | None = None):
            if channel.transport.proc.dead:
                raise asyncio.CancelledError()
            return channel.transport.net.open_stream(channel.transport.me, channel.address, path,
                                                     metadata, reply_cls)
        return open_stream


class SimChannel:
    def __init__(self, transport: "SimTransport", address: str, timeout_s: float | None) -> None:
        self.transport = transport
        self.address = address
        self.timeout_s = timeout_s
        self.closed = False
        self._stubs: dict[str, _Stub] = {}

    def stub(self, service) -> _Stub:
        stub = self._stubs.get(service.full_name)
        if stub is None:
            stub = self._stubs[service.full_name] = _Stub(self, service)
        return stub

    async def serving(self, service: str = "", timeout_s: float = 1.0) -> bool:
        net = self.transport.net
        dst = net.name_of(self.address)
        me = self.transport.me
        await asyncio.sleep(net.one_way_s(me, dst) * 2)
        server = net.servers.get(self.address)
        return (server is not None and server.up and not net.blocked(me, dst)
                and not net.blocked(dst, me) and service in server.serving_names)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> "SimChannel":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SimTransport:
    """One simulated process's Transport (engine/transport/__init__.py)."""

    def __init__(self, net: SimNetwork, proc: SimProcess) -> None:
        self.net = net
        self.proc = proc
        self.me = proc.name
        self.latency = None

    def channel(self, address: str, *, timeout_s: float | None = None) -> SimChannel:
        return SimChannel(self, address, timeout_s)

    def blocking_channel(self, address: str, *, timeout_s: float | None = None):
        raise NotImplementedError("no blocking caller runs inside the simulation")

    async def serve(self, host: str, port: int, handlers: dict) -> SimServer:
        server = SimServer(self.net, f"{host}:{port}", self.proc, handlers)
        self.net.register(server)
        return server

    def one_way_ms(self, address: str) -> float:
        return self.net.one_way_s(self.me, self.net.name_of(address)) * 1000.0
