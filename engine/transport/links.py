"""What happens to a call on its way: simulated latency and injected faults, for any transport.

A transport calls ``Links.unary(address, send)`` around every unary call and wraps every
stream in ``Links.stream(address, stream)``. Two things act there, both on the CALLER's
side, both optional:

- latency (engine/transport/latency.py): sleep the link's one-way delay before the request
  and again before the reply is delivered (promise 5 of engine/transport/__init__.py);
- the fault file (engine/hooks.py, docs/reliability.md) when $AURORA_FAULTS_FILE is set:

    kind        unary calls                                        streams
    partition   fail at once with UNAVAILABLE; nothing is sent      fail at start; an open
                                                                    stream is cut within
                                                                    STREAM_CHECK_S
    drop        with probability p: half the time the request is     -
                lost (UNAVAILABLE, not sent), half the time the
                REPLY is lost (the server did the work, the caller
                sees UNAVAILABLE): callers must retry idempotently
    delay       sleep ms before the request and ms after the reply    each message ms later
    duplicate   with probability p the request is sent twice (the     -
                caller gets the second reply)
    reorder     each request waits a random 0..ms first, so later      -
                requests overtake earlier ones

Written once here instead of as gRPC interceptors, the simulator's network and the gRPC
one obey the same rules. No grpc.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from engine.errors import RpcError
from engine.hooks import FaultState, state_for

#: How often an open stream checks whether a partition now cuts it.
STREAM_CHECK_S = 0.25


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

    async def stream_read(self, address: str, read: Callable[[], Awaitable[Any]],
                          cancel: Callable[[], None]) -> Any:
        """One ``read()`` of a stream, cut with UNAVAILABLE if a partition appears meanwhile,
        and delayed by a ``delay`` rule."""
        if self.faults is None:
            return await read()
        nxt = asyncio.ensure_future(read())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=STREAM_CHECK_S)
            if done:
                break
            if self._partitioned(address):
                nxt.cancel()
                cancel()
                raise _unavailable("nemesis: stream cut by a partition")
        msg = nxt.result()
        kinds = {r["kind"]: r for r in self.faults.rules_to(address)}
        if "partition" in kinds:
            cancel()
            raise _unavailable("nemesis: stream cut by a partition")
        if "delay" in kinds and msg is not None:
            await asyncio.sleep(float(kinds["delay"].get("ms", 0.0)) / 1000.0)
        return msg
