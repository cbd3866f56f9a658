"""What happens to a call on its way: simulated latency and injected faults, for any transport.

A transport calls ``Links.unary(address, send)`` around every unary call and wraps every
stream in ``Links.stream(address, raw)`` (``LinkedStream``). Two things act there, both on
the CALLER's side, both optional:

- latency (engine/transport/latency.py): sleep the link's one-way delay before the request
  and again before the reply is delivered (promise 5 of engine/transport/__init__.py); on
  a stream, each message in either direction is delivered its one-way delay late,
  pipelined (a delayed stream carries as many messages per second as an undelayed one);
- the fault file (engine/hooks.py, docs/reliability.md) when $AURORA_FAULTS_FILE is set:

    kind        unary calls                                        streams
    partition   fail at once with UNAVAILABLE; nothing is sent      fail at start; an open
                                                                    stream is cut within
                                                                    STREAM_CHECK_S
    drop        with probability p: half the time the request is     with probability p per
                lost (UNAVAILABLE, not sent), half the time the      message written, the same
                REPLY is lost (the server did the work, the caller   halves; the stream breaks
                sees UNAVAILABLE): callers must retry idempotently   (UNAVAILABLE) at that
                                                                     write or at the next read
    delay       sleep ms before the request and ms after the reply    each message ms later
                                                                     (both ways, pipelined)
    duplicate   with probability p the request is sent twice (the     -
                caller gets the second reply)
    reorder     each request waits a random 0..ms first, so later      -
                requests overtake earlier ones

Written once here instead of as gRPC interceptors, the simulator's network and the gRPC
one obey the same rules. No grpc.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable

from engine.errors import RpcError
from engine.hooks import FaultState, state_for

#: How often an open stream checks whether a partition now cuts it.
STREAM_CHECK_S = 0.25
#: Messages of one stream that may wait for their delay on the way out; ``write`` waits above.
STREAM_OUTBOX_MAX = 1024


def _unavailable(detail: str) -> RpcError:
    return RpcError("UNAVAILABLE", detail)


class Links:
    """The latency and fault rules of the calls one process (``me``) makes."""

    def __init__(self, me: str, latency=None, faults: FaultState | None = None) -> None:
        self.me = me
        self.latency = latency            # a LinkDelay, or None
        self.faults = faults if faults is not None else state_for(me)

    def one_way_s(self, address: str) -> float:
        return self.latency.one_way_s(address) if self.latency is not None else 0.0

    def _name(self, address: str) -> str:
        return self.faults.names.get(address, address) if self.faults else address

    async def unary(self, address: str, send: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``send()`` (one attempt of the call) under this link's latency and faults."""
        delay_s = self.one_way_s(address)
        rules = self.faults.rules_to(address) if self.faults is not None else []
        if not rules:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            reply = await send()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            return reply
        kinds = {r["kind"]: r for r in rules}
        rng = self.faults.rng
        name = self._name(address)
        if "partition" in kinds:
            raise _unavailable(f"nemesis: link {self.me} -> {name} is partitioned")
        lose_reply = False
        drop = kinds.get("drop")
        if drop is not None and rng.random() < float(drop.get("p", 1.0)):
            if rng.random() < 0.5:
                raise _unavailable(f"nemesis: request {self.me} -> {name} dropped")
            lose_reply = True
        fault_delay_s = float(kinds["delay"].get("ms", 0.0)) / 1000.0 if "delay" in kinds else 0.0
        before_s = delay_s + fault_delay_s
        if "reorder" in kinds:
            before_s += rng.random() * float(kinds["reorder"].get("ms", 10.0)) / 1000.0
        if before_s > 0:
            await asyncio.sleep(before_s)
        dup = kinds.get("duplicate")
        if dup is not None and rng.random() < float(dup.get("p", 1.0)):
            try:
                await send()
            except RpcError:
                pass  # the duplicate's fate does not matter; the second send decides
        reply = await send()
        if delay_s + fault_delay_s > 0:
            await asyncio.sleep(delay_s + fault_delay_s)
        if lose_reply:
            raise _unavailable(f"nemesis: reply {name} -> {self.me} dropped")
        return reply

    def check_stream_start(self, address: str) -> None:
        """Refuse to open a stream across a partitioned link."""
        if self._partitioned(address):
            raise _unavailable(f"nemesis: link {self.me} -> {self._name(address)} is partitioned")

    def _partitioned(self, address: str) -> bool:
        return self.faults is not None and any(
            r["kind"] == "partition" for r in self.faults.rules_to(address))

    def stream(self, address: str, raw):
        """The caller's end of a stream to ``address`` under this link's latency and faults.
        ``raw`` is the transport's own end (``read``/``write``/``cancel``, errors already
        RpcError, ``read`` None at the end); with neither a latency model nor a fault file
        it is returned as it is."""
        if self.latency is None and self.faults is None:
            return raw
        return LinkedStream(self, address, raw)


_EOF = object()


class LinkedStream:
    """A stream whose messages obey the link's latency and fault rules (module doc).

    Delays are pipelined, not serialised: a message written at t leaves at t + delay (in
    order, by one pump task), and one that arrives at t is readable from t + delay (a
    second pump reads ahead to stamp arrivals), so a stream carries as many messages per
    second with a delay as without. ``write`` returns once the message is queued (it
    waits only while STREAM_OUTBOX_MAX messages are queued); an error of the link shows
    on the next ``write`` or ``read``.
    """

    def __init__(self, links: Links, address: str, raw) -> None:
        self._links = links
        self._address = address
        self._raw = raw
        self._inbox: collections.deque = collections.deque()    # (readable at, message)
        self._in_end: Any = None          # _EOF, or the RpcError that ended the read side
        self._in_wake = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._outbox: collections.deque = collections.deque()   # (leaves at, message)
        self._out_wake = asyncio.Event()
        self._out_room = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._error: RpcError | None = None   # what broke the stream (cut, write, cancel)
        self._lose_next_read = False          # a drop rule lost the answer to a write

    def _delay_s(self) -> float:
        delay_s = self._links.one_way_s(self._address)
        faults = self._links.faults
        if faults is not None:
            for rule in faults.rules_to(self._address):
                if rule["kind"] == "delay":
                    delay_s += float(rule.get("ms", 0.0)) / 1000.0
        return delay_s

    def _dropped(self) -> bool:
        """True if a drop rule loses this written message: then half the time it is lost
        on the way out (the stream breaks at once, nothing sent), half the time the
        answer is (it is sent, and the stream breaks at the next read). A stream cannot
        lose one message and go on (promise 4), so it breaks."""
        faults = self._links.faults
        if faults is None:
            return False
        for rule in faults.rules_to(self._address):
            if rule["kind"] == "drop" and faults.rng.random() < float(rule.get("p", 1.0)):
                if faults.rng.random() < 0.5:
                    return True
                self._lose_next_read = True
        return False

    def _cut(self, detail: str) -> RpcError:
        self._fail(_unavailable(f"nemesis: {detail} ({self._links.me} -> "
                                f"{self._links._name(self._address)})"))
        return self._error

    def _fail(self, error: RpcError) -> None:
        if self._error is None:
            self._error = error
        self._in_wake.set()
        self._out_room.set()
        self._raw.cancel()
        me = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not None and task is not me:
                task.cancel()

    def _check_partition(self) -> None:
        if self._links._partitioned(self._address):
            raise self._cut("stream cut by a partition")

    async def write(self, message: Any) -> None:
        if self._error is not None:
            raise self._error
        self._check_partition()
        if self._dropped():
            raise self._cut("stream request dropped")
        self._outbox.append((asyncio.get_running_loop().time() + self._delay_s(), message))
        self._out_wake.set()
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._pump_out())
        while len(self._outbox) >= STREAM_OUTBOX_MAX and self._error is None:
            self._out_room.clear()
            await self._out_room.wait()
        if self._error is not None:
            raise self._error

    async def _pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._outbox:
                    self._out_wake.clear()
                    await self._out_wake.wait()
                    continue
                wait_s = self._outbox[0][0] - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                _at, message = self._outbox.popleft()
                self._out_room.set()
                await self._raw.write(message)
        except RpcError as exc:
            self._fail(exc)

    async def read(self) -> Any:
        if self._reader is None and self._error is None:
            self._reader = asyncio.ensure_future(self._pump_in())
        loop = asyncio.get_running_loop()
        checking = self._links.faults is not None
        while True:
            if self._error is not None:
                raise self._error
            if self._inbox:
                wait_s = self._inbox[0][0] - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(min(wait_s, STREAM_CHECK_S) if checking else wait_s)
                    if checking:
                        self._check_partition()
                    continue
                _at, message = self._inbox.popleft()
                if checking:
                    self._check_partition()
                    if self._lose_next_read:
                        raise self._cut("stream reply dropped")
                return message
            if self._in_end is not None:
                if self._in_end is _EOF:
                    return None
                raise self._in_end
            self._in_wake.clear()
            if not checking:
                await self._in_wake.wait()
                continue
            try:
                await asyncio.wait_for(self._in_wake.wait(), STREAM_CHECK_S)
            except asyncio.TimeoutError:
                self._check_partition()

    async def _pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await self._raw.read()
                if message is None:
                    self._in_end = _EOF
                    return
                self._inbox.append((loop.time() + self._delay_s(), message))
                self._in_wake.set()
        except RpcError as exc:
            self._in_end = exc
        except asyncio.CancelledError:
            self._in_end = self._error or RpcError("CANCELLED", "the stream was cancelled")
            raise
        finally:
            self._in_wake.set()

    def cancel(self) -> None:
        self._fail(RpcError("CANCELLED", "the stream was cancelled by its caller"))
