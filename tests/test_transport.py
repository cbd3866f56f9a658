"""The transport seam keeps the promises engine/transport/__init__.py (and docs/transport.md)
makes, over its gRPC implementation.

Scenario base: an in-process server of the Storage service (and the Replication stream)
whose handlers are plain objects, served by GrpcTransport on 127.0.0.1, called through a
second GrpcTransport. No storage node: these tests pin the contract that every caller and
a second implementation (the step-11 simulator) rely on.
"""

from __future__ import annotations

import asyncio

import pytest

from aurora_pb import replication_pb2 as rpb
from aurora_pb import storage_pb2 as pb
from engine.errors import METADATA_CURRENT_EPOCH, ErrorCode, RpcError
from engine.transport import service_of
from engine.transport.grpc_transport import GrpcTransport
from storage_node.errors import StaleEpochError

STORAGE = service_of(pb, "Storage")
REPLICATION = service_of(rpb, "Replication")


class Handlers:
    """Storage handlers that each show one behaviour."""

    def __init__(self) -> None:
        self.seen_metadata: dict[str, str] = {}
        self.appends = 0

    async def NodeStatus(self, request, ctx):
        self.seen_metadata = dict(ctx.metadata)
        ctx.set_trailing("x-note", "hello")
        return pb.NodeStatusReply(node_id="sn1", az="az-a")

    async def Append(self, request, ctx):
        self.appends += 1
        return pb.AppendReply(acks=[pb.PgAck(pg=b.pg, scl=len(b.records)) for b in request.batches])

    async def Truncate(self, request, ctx):
        raise StaleEpochError("epoch 3 is older than the segment's 5", current_epoch=5)

    async def SegmentState(self, request, ctx):
        raise RpcError("OUT_OF_RANGE", "nothing there", ErrorCode.READ_POINT_ABOVE_SCL,
                       {"x-hint": "wait"})

    async def ReadPage(self, request, ctx):
        raise ValueError("a bug in a handler")

    async def FetchRecords(self, request, ctx):
        await asyncio.sleep(2.0)
        return pb.FetchRecordsReply()


class Echo:
    """Replication.Subscribe as an echo: one reply per feedback message, then an error
    once it has seen ``fail_after`` of them."""

    fail_after = 3

    async def Subscribe(self, requests, ctx):
        yield rpb.RedoStreamMessage(is_snapshot=True, vdl=0)
        n = 0
        async for feedback in requests:
            n += 1
            if n > self.fail_after:
                raise RpcError("RESOURCE_EXHAUSTED", "too many", ErrorCode.UNAVAILABLE)
            yield rpb.RedoStreamMessage(vdl=feedback.applied_vdl)


def served(body):
    """Run body(server, handlers, client_transport, address) against a fresh server."""
    async def main():
        handlers = Handlers()
        server = await GrpcTransport("sn1").serve("127.0.0.1", 0, {STORAGE: handlers,
                                                                   REPLICATION: Echo()})
        try:
            return await body(server, handlers, GrpcTransport("db1"), f"127.0.0.1:{server.port}")
        finally:
            await server.stop(0)
    return asyncio.run(main())


def test_unary_reply_metadata_and_pre_serialised_requests():
    """Scenario: a reply comes back; request metadata reaches the handler; a request given
    as bytes (serialised once for six nodes) is the same request (promise 7)."""
    async def body(server, handlers, transport, address):
        async with transport.channel(address, timeout_s=5) as channel:
            stub = channel.stub(STORAGE)
            reply = await stub.NodeStatus(pb.NodeStatusRequest(), metadata={"x-who": "db1"})
            request = pb.AppendRequest(volume="v", batches=[pb.PgBatch(pg=2, records=b"abc")])
            as_message = await stub.Append(request)
            as_bytes = await stub.Append(request.SerializeToString())
            return reply, handlers.seen_metadata, as_message, as_bytes, handlers.appends
    reply, md, as_message, as_bytes, appends = served(body)
    assert (reply.node_id, reply.az) == ("sn1", "az-a")
    assert md.get("x-who") == "db1"
    assert as_message == as_bytes and [(a.pg, a.scl) for a in as_bytes.acks] == [(2, 3)]
    assert appends == 2


def test_refusals_carry_status_code_and_metadata():
    """Scenario: a handler's RpcError (and a StorageError, which is one) reaches the caller
    with its status, its aurora-error code and its other metadata (promises 2 and 3)."""
    async def body(server, handlers, transport, address):
        out = {}
        async with transport.channel(address, timeout_s=5) as channel:
            stub = channel.stub(STORAGE)
            for name, request in (("Truncate", pb.TruncateRequest()),
                                  ("SegmentState", pb.SegmentStateRequest())):
                with pytest.raises(RpcError) as info:
                    await getattr(stub, name)(request)
                out[name] = info.value
        return out
    out = served(body)
    stale = out["Truncate"]
    assert (stale.status, stale.code) == ("FAILED_PRECONDITION", ErrorCode.STALE_EPOCH)
    assert stale.metadata[METADATA_CURRENT_EPOCH] == "5"
    assert "older than the segment's 5" in stale.detail
    above = out["SegmentState"]
    assert (above.status, above.code, above.metadata.get("x-hint")) == (
        "OUT_OF_RANGE", ErrorCode.READ_POINT_ABOVE_SCL, "wait")
    assert not stale.unreachable and not above.unreachable


def test_a_handler_bug_is_unknown_and_the_server_keeps_serving():
    """Scenario: a handler raising anything but RpcError gives the caller UNKNOWN (promise
    3); the next call is served normally."""
    async def body(server, handlers, transport, address):
        async with transport.channel(address, timeout_s=5) as channel:
            stub = channel.stub(STORAGE)
            with pytest.raises(RpcError) as info:
                await stub.ReadPage(pb.ReadPageRequest())
            return info.value, await stub.NodeStatus(pb.NodeStatusRequest())
    bug, after = served(body)
    assert bug.status == "UNKNOWN" and bug.code == ""
    assert after.node_id == "sn1"


def test_deadline_and_unreachable_server():
    """Scenario: a call past its deadline fails with DEADLINE_EXCEEDED; a call to a port no
    one listens on fails with UNAVAILABLE; both are ``unreachable`` (promise 2)."""
    async def body(server, handlers, transport, address):
        async with transport.channel(address, timeout_s=5) as channel:
            with pytest.raises(RpcError) as slow:
                await channel.stub(STORAGE).FetchRecords(pb.FetchRecordsRequest(), timeout_s=0.2)
        async with transport.channel("127.0.0.1:1", timeout_s=2) as channel:
            with pytest.raises(RpcError) as down:
                await channel.stub(STORAGE).NodeStatus(pb.NodeStatusRequest())
        return slow.value, down.value
    slow, down = served(body)
    assert slow.status == "DEADLINE_EXCEEDED" and slow.unreachable
    assert down.status == "UNAVAILABLE" and down.unreachable


def test_stream_keeps_order_ends_and_carries_errors():
    """Scenario: a bidirectional stream delivers the server's messages in order; the
    handler's RpcError ends it with that error at the caller (promise 4)."""
    async def body(server, handlers, transport, address):
        async with transport.channel(address) as channel:
            stream = channel.stub(REPLICATION).Subscribe()
            first = await stream.read()
            got = []
            for vdl in (10, 20, 30):
                await stream.write(rpb.ReplicaFeedback(applied_vdl=vdl))
                got.append((await stream.read()).vdl)
            await stream.write(rpb.ReplicaFeedback(applied_vdl=40))
            with pytest.raises(RpcError) as info:
                await stream.read()
            stream.cancel()
            return first, got, info.value
    first, got, error = served(body)
    assert first.is_snapshot
    assert got == [10, 20, 30]
    assert (error.status, error.code) == ("RESOURCE_EXHAUSTED", ErrorCode.UNAVAILABLE)


def test_health_reports_what_the_server_says():
    """Scenario: a new server is NOT_SERVING until it says otherwise, for the process and
    for each service; set_serving(False) takes it back."""
    async def body(server, handlers, transport, address):
        async with transport.channel(address) as channel:
            before = (await channel.serving(), await channel.serving(STORAGE.full_name))
            await server.set_serving(True)
            during = (await channel.serving(), await channel.serving(STORAGE.full_name))
            await server.set_serving(False)
            after = await channel.serving()
        async with transport.channel("127.0.0.1:1") as channel:
            nobody = await channel.serving(timeout_s=0.5)
        return before, during, after, nobody
    assert served(body) == ((False, False), (True, True), False, False)


def test_blocking_channel_calls_futures_and_readiness():
    """Scenario: the blocking side (client library, CLI) gets the same replies and errors,
    a pending call can be waited on in slices and cancelled, and readiness times out
    with UNAVAILABLE."""
    async def body(server, handlers, transport, address):
        def blocking():
            with transport.blocking_channel(address, timeout_s=5) as channel:
                stub = channel.stub(STORAGE)
                reply = stub.NodeStatus(pb.NodeStatusRequest())
                with pytest.raises(RpcError) as refused:
                    stub.Truncate(pb.TruncateRequest())
                pending = stub.FetchRecords.future(pb.FetchRecordsRequest())
                with pytest.raises(TimeoutError):
                    pending.result(0.1)
                pending.cancel()
                with pytest.raises(RpcError) as cancelled:
                    pending.result(1.0)
            with transport.blocking_channel("127.0.0.1:1") as dead:
                with pytest.raises(RpcError) as not_ready:
                    dead.wait_ready(0.3)
            return reply, refused.value, cancelled.value, not_ready.value
        return await asyncio.to_thread(blocking)
    reply, refused, cancelled, not_ready = served(body)
    assert reply.node_id == "sn1"
    assert refused.code == ErrorCode.STALE_EPOCH
    assert cancelled.status == "CANCELLED"
    assert not_ready.status == "UNAVAILABLE"


def test_latency_is_added_both_ways():
    """Scenario: with a LinkDelay of 30 ms to the server, a call takes at least 60 ms
    (promise 5); the delay is asked per call, so a change acts at once."""
    class Fixed:
        def __init__(self) -> None:
            self.s = 0.03
            self.asked: list[str] = []

        def one_way_s(self, address: str) -> float:
            self.asked.append(address)
            return self.s

    async def body(server, handlers, transport, address):
        delay = Fixed()
        transport.latency = delay
        loop = asyncio.get_running_loop()
        async with transport.channel(address, timeout_s=5) as channel:
            stub = channel.stub(STORAGE)
            await stub.NodeStatus(pb.NodeStatusRequest())       # connect
            started = loop.time()
            await stub.NodeStatus(pb.NodeStatusRequest())
            delayed = loop.time() - started
        return delayed, delay.asked, transport.one_way_ms(address)
    delayed, asked, one_way_ms = served(body)
    assert delayed >= 0.06
    assert asked and set(asked) == {asked[0]}
    assert one_way_ms == pytest.approx(30.0)


def test_stream_messages_are_delayed_both_ways_and_pipelined():
    """Scenario: with a LinkDelay of 250 ms, each stream message is delivered 250 ms late,
    each way (promise 5), in order; three messages written back to back come back after
    about one round trip, not three: the delay is pipelined, so a delayed stream carries
    as many messages per second as an undelayed one."""
    class Fixed:
        def one_way_s(self, address: str) -> float:
            return 0.25

    async def body(server, handlers, transport, address):
        transport.latency = Fixed()
        loop = asyncio.get_running_loop()
        async with transport.channel(address) as channel:
            stream = channel.stub(REPLICATION).Subscribe()
            started = loop.time()
            first = await stream.read()          # sent by the server at once
            first_s = loop.time() - started
            started = loop.time()
            for vdl in (10, 20, 30):
                await stream.write(rpb.ReplicaFeedback(applied_vdl=vdl))
            got = [(await stream.read()).vdl for _ in range(3)]
            three_s = loop.time() - started
            stream.cancel()
        return first, first_s, got, three_s
    first, first_s, got, three_s = served(body)
    assert first.is_snapshot and first_s >= 0.25
    assert got == [10, 20, 30]
    assert 0.5 <= three_s < 1.4, three_s   # one after another would take >= 1.5 s
