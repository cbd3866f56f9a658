"""Injected faults on the wire: the gRPC client interceptors that obey the fault file.

The fault file itself (its format, how a process re-reads it, the slow-disk rule) is read
by engine/hooks.py (``FaultState``, ``state_for``), which imports no grpc so that
storage_node/ can use it; this module adds what needs grpc. A process obeys the file only
if ``$AURORA_FAULTS_FILE`` names it when the process starts; without it no interceptor is
installed and nothing here costs anything.

Link kinds, applied by the CALLER's interceptor (the process named ``src``) on every RPC
it sends to ``dst`` ("*" matches any name):

    kind        unary RPCs (Append, ReadPage, FetchRecords, ...)       streams (redo stream)
    partition   fail at once with UNAVAILABLE; nothing is sent          fail at start; an open
                                                                        stream is cut within
                                                                        STREAM_CHECK_S
    drop        with probability p: half the time the request is        -
                lost (UNAVAILABLE, not sent), half the time the REPLY
                is lost (the server did the work, the caller sees
                UNAVAILABLE): callers must retry idempotently
    delay       sleep ms before the request and ms after the reply      each message ms later
    duplicate   with probability p the request is sent twice (the        -
                caller gets the second reply)
    reorder     each request waits a random 0..ms first, so later       -
                requests overtake earlier ones

A partition is one-way per rule; the nemesis writes both directions for a symmetric one.
Randomness comes from ``random.Random`` seeded with $AURORA_FAULTS_SEED and the process
name, so one seed gives one schedule; the exact interleaving of RPCs is still up to the
OS scheduler (this is a test of real processes, not a simulation).

Dependencies: grpc and engine/hooks.py. The names of the fault file that callers took
from here (FAULTS_FILE_ENV, FaultState, state_for, disk_delay_s, ...) are re-exported.
"""

from __future__ import annotations

import asyncio

import grpc

from engine.format.watched_json import CHECK_INTERVAL_S
from engine.hooks import (
    FAULTS_FILE_ENV, FAULTS_SEED_ENV, LINK_KINDS, FaultState, disk_delay_s, state_for)

STREAM_CHECK_S = 0.25

__all__ = ["CHECK_INTERVAL_S", "FAULTS_FILE_ENV", "FAULTS_SEED_ENV", "LINK_KINDS",
           "STREAM_CHECK_S", "FaultState", "client_interceptors", "disk_delay_s", "state_for"]


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details)


def _kinds(rules: list[dict]) -> dict[str, dict]:
    return {r["kind"]: r for r in rules}


class _UnaryFaults(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, state: FaultState, address: str) -> None:
        self.state = state
        self.address = address

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        rules = self.state.rules_to(self.address)
        if not rules:
            call = await continuation(client_call_details, request)
            return await call
        kinds = _kinds(rules)
        rng = self.state.rng
        name = self.state.names.get(self.address, self.address)
        if "partition" in kinds:
            raise _unavailable(f"nemesis: link {self.state.me} -> {name} is partitioned")
        drop = kinds.get("drop")
        lose_reply = False
        if drop is not None and rng.random() < float(drop.get("p", 1.0)):
            if rng.random() < 0.5:
                raise _unavailable(f"nemesis: request {self.state.me} -> {name} dropped")
            lose_reply = True
        delay_s = float(kinds["delay"].get("ms", 0.0)) / 1000.0 if "delay" in kinds else 0.0
        if "reorder" in kinds:
            delay_s += rng.random() * float(kinds["reorder"].get("ms", 10.0)) / 1000.0
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        dup = kinds.get("duplicate")
        if dup is not None and rng.random() < float(dup.get("p", 1.0)):
            try:
                first = await continuation(client_call_details, request)
                await first
            except grpc.RpcError:
                pass  # the duplicate's fate does not matter; the second send decides
        call = await continuation(client_call_details, request)
        response = await call
        if "delay" in kinds:
            await asyncio.sleep(float(kinds["delay"].get("ms", 0.0)) / 1000.0)
        if lose_reply:
            raise _unavailable(f"nemesis: reply {name} -> {self.state.me} dropped")
        return response


class _StreamFaults(grpc.aio.StreamStreamClientInterceptor):
    """Partition (and delay) for a bidirectional stream such as the redo stream."""

    def __init__(self, state: FaultState, address: str) -> None:
        self.state = state
        self.address = address

    def _partitioned(self) -> bool:
        return any(r["kind"] == "partition" for r in self.state.rules_to(self.address))

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        if self._partitioned():
            raise _unavailable(f"nemesis: link {self.state.me} -> {self.address} is partitioned")
        call = await continuation(client_call_details, request_iterator)
        call.add_done_callback(_stop_request_poller)
        return self._responses(call)

    async def _responses(self, call):
        it = call.__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=STREAM_CHECK_S)
                if done:
                    break
                if self._partitioned():
                    nxt.cancel()
                    call.cancel()
                    raise _unavailable("nemesis: stream cut by a partition")
            try:
                msg = nxt.result()
            except StopAsyncIteration:
                return
            rules = _kinds(self.state.rules_to(self.address))
            if "partition" in rules:
                call.cancel()
                raise _unavailable("nemesis: stream cut by a partition")
            if "delay" in rules:
                await asyncio.sleep(float(rules["delay"].get("ms", 0.0)) / 1000.0)
            yield msg


def _stop_request_poller(call) -> None:
    """Work around grpc.aio (1.85): an intercepted stream-stream call that FAILS keeps its
    request-consuming task blocked forever (cancel() skips it once the call is done); the
    task is then destroyed pending and asyncio logs ERROR lines. Cancel it when the call
    ends. The attribute is private, hence the getattr."""
    poller = getattr(call, "_async_request_poller", None)
    if poller is not None and not poller.done():
        poller.cancel()


def client_interceptors(me: str, address: str) -> list:
    """Interceptors for a channel from process ``me`` to ``address`` ([] without a fault
    file). Install them on every channel a process opens to another cluster process."""
    state = state_for(me)
    if state is None:
        return []
    return [_UnaryFaults(state, address), _StreamFaults(state, address)]

