"""Injected faults: the fault file every process reads, and the gRPC interceptors that obey it.

The nemesis (engine/chaos/nemesis.py) breaks a running cluster in two ways: with signals
(SIGKILL, SIGSTOP/SIGCONT, restarts; it owns those) and by rewriting ONE JSON file, the
fault file, that every process of the cluster re-reads (by mtime, at most every
``CHECK_INTERVAL_S``, like storage_node/latency.py re-reads cluster.json). A process
obeys the file only if ``$AURORA_FAULTS_FILE`` names it when the process starts; without
it no interceptor is installed and nothing here costs anything.

Fault file (all keys optional)::

    {
      "names": {"127.0.0.1:40011": "sn1", ...},      address -> process name
      "links": [                                       per directed link, src -> dst
        {"src": "db1", "dst": "sn5", "kind": "partition"},
        {"src": "sn1", "dst": "*",   "kind": "drop", "p": 0.2},
        {"src": "*",   "dst": "sn3", "kind": "delay", "ms": 30},
        {"src": "db1", "dst": "sn2", "kind": "duplicate", "p": 0.5},
        {"src": "db1", "dst": "sn4", "kind": "reorder", "ms": 20}
      ],
      "disk": {"sn3": {"delay_ms": 50}}                slow fsync of one storage node
    }

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

Dependencies: grpc only. storage_node/ imports this module (a test hook, like
storage_node/latency.py; it is not the B+tree, buffer pool or driver of DESIGN.md s4).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import zlib

import grpc

FAULTS_FILE_ENV = "AURORA_FAULTS_FILE"
FAULTS_SEED_ENV = "AURORA_FAULTS_SEED"
CHECK_INTERVAL_S = 0.5
STREAM_CHECK_S = 0.25
LINK_KINDS = ("partition", "drop", "delay", "duplicate", "reorder")

log = logging.getLogger("aurora_lite.faults")


class FaultState:
    """The fault file as seen by one process (``me``), re-read when it changes."""

    def __init__(self, path: str, me: str, interval_s: float = CHECK_INTERVAL_S) -> None:
        self.path = path
        self.me = me
        self.interval_s = interval_s
        seed = int(os.environ.get(FAULTS_SEED_ENV, "0") or 0)
        self.rng = random.Random(seed * 1_000_003 + zlib.crc32(me.encode()))
        self._next_check_s = 0.0
        self._signature = None
        self.names: dict[str, str] = {}
        self.links: list[dict] = []
        self.disk: dict[str, dict] = {}
        self.check(force=True)

    def check(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_check_s:
            return
        self._next_check_s = now + self.interval_s
        try:
            st = os.stat(self.path)
        except OSError:
            if self.links or self.disk:
                log.info("fault file %s is gone: no faults", self.path)
            self.links, self.disk, self._signature = [], {}, None
            return
        signature = (st.st_mtime_ns, st.st_ino, st.st_size)
        if signature == self._signature:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
            names = dict(data.get("names", {}))
            links = [dict(r) for r in data.get("links", [])]
            disk = {k: dict(v) for k, v in data.get("disk", {}).items()}
            for rule in links:
                assert rule.get("kind") in LINK_KINDS, rule
        except (OSError, ValueError, TypeError, AssertionError) as exc:
            log.warning("cannot read the fault file %s: %s", self.path, exc)
            return
        self._signature = signature
        mine = [r for r in links if r.get("src") in (self.me, "*")]
        if mine != [r for r in self.links if r.get("src") in (self.me, "*")] or disk != self.disk:
            log.info("injected faults now: links %s, disk %s", mine or "none",
                     disk.get(self.me, "none"))
        self.names, self.links, self.disk = names, links, disk

    def rules_to(self, address: str) -> list[dict]:
        """Link rules for a call from this process to ``address`` (re-reads when due)."""
        self.check()
        if not self.links:
            return []
        dst = self.names.get(address, address)
        return [r for r in self.links
                if r.get("src") in (self.me, "*") and r.get("dst") in (dst, "*")]

    def disk_delay_s(self) -> float:
        self.check()
        spec = self.disk.get(self.me) or self.disk.get("*")
        return float(spec.get("delay_ms", 0.0)) / 1000.0 if spec else 0.0


_STATES: dict[str, FaultState] = {}


def state_for(me: str) -> FaultState | None:
    """This process's FaultState, or None when $AURORA_FAULTS_FILE is not set."""
    path = os.environ.get(FAULTS_FILE_ENV)
    if not path:
        return None
    st = _STATES.get(me)
    if st is None:
        st = _STATES[me] = FaultState(path, me)
        log.info("%s obeys the fault file %s", me, path)
    return st


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


def disk_delay_s(me: str) -> float:
    """Extra seconds before each LMDB commit of storage node ``me`` (0 without faults)."""
    state = state_for(me)
    return 0.0 if state is None else state.disk_delay_s()


# --- The storage nodes' own record of their SCLs (chaos mode only) -------------------------
#
# In chaos mode every storage node appends one line per durable write transaction that
# changed the SCL of any of its segments, to ``scl-<node>.log`` next to the fault file
# (not in the node's data dir: a wiped node keeps its record). The durability checker
# (engine/chaos/checkers.py, check_acks_held_by_storage) reads them. One line per segment
# whose SCL changed, written after the LMDB commit returned and before any ack of that
# transaction is sent::
#
#     <monotonic_s> <wall_s> <volume> <pg> <scl>
#
# monotonic_s is time.monotonic() (CLOCK_MONOTONIC, shared by every process of the host,
# the clock the workload stamps its acks with); wall_s is for people reading the file.

SCL_LOG_PREFIX = "scl-"


def scl_log_path(me: str, faults_file: str | None = None) -> str | None:
    """Where storage node ``me`` records its SCLs; None outside chaos mode."""
    faults_file = faults_file or os.environ.get(FAULTS_FILE_ENV)
    if not faults_file:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(faults_file)), f"{SCL_LOG_PREFIX}{me}.log")


class SclLog:
    """Appends the SCL changes of one storage node's write transactions (see above)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last: dict[tuple, int] = {}
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, segments) -> None:
        """``segments``: [((volume, pg), meta with .scl)] after a commit; one write()."""
        now_mono, now_wall = time.monotonic(), time.time()
        lines = []
        for key, meta in segments:
            if self._last.get(key) != meta.scl:
                self._last[key] = meta.scl
                lines.append(f"{now_mono:.6f} {now_wall:.6f} {key[0]} {key[1]} {meta.scl}\n")
        if lines:
            os.write(self._fd, "".join(lines).encode())

    def close(self) -> None:
        os.close(self._fd)


def scl_log_for(me: str) -> SclLog | None:
    path = scl_log_path(me)
    return None if path is None else SclLog(path)
