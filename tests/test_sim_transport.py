"""The simulated network (engine/sim/network.py) keeps the transport's promises too.

tests/test_transport.py pins the promises of engine/transport/__init__.py on the gRPC
implementation; here the same test functions run unchanged against the second
implementation, with their ``served`` helper pointed at a SimNetwork on a SimLoop
(virtual time: the 2 s handler and the 0.2 s deadline cost nothing). Blocking channels
and the links' latency are gRPC-side features the simulator does not offer; the
simulator's own latency and faults are exercised by tests/test_sim.py.
"""

from __future__ import annotations

import random

import pytest

from engine.format.cluster_config import Latency
from engine.sim.loop import SimLoop, SimProcess, virtual_time
from engine.sim.network import SimNetwork, SimTransport
from engine.sim.trace import Trace
from tests import test_transport as promises


def sim_served(body):
    """test_transport.served over the simulated network."""
    loop = SimLoop()
    net = SimNetwork(random.Random(0), Trace(), Latency(), {"sn1": "az-a", "db1": "az-b"})

    async def main():
        handlers = promises.Handlers()
        server = await SimTransport(net, SimProcess("sn1")).serve(
            "127.0.0.1", 7000, {promises.STORAGE: handlers, promises.REPLICATION: promises.Echo()})
        try:
            return await body(server, handlers, SimTransport(net, SimProcess("db1")),
                              "127.0.0.1:7000")
        finally:
            await server.stop(0)

    try:
        with virtual_time(loop):
            return loop.run_until_complete(main())
    finally:
        loop.close()


PROMISE_TESTS = [
    promises.test_unary_reply_metadata_and_pre_serialised_requests,
    promises.test_refusals_carry_status_code_and_metadata,
    promises.test_a_handler_bug_is_unknown_and_the_server_keeps_serving,
    promises.test_deadline_and_unreachable_server,
    promises.test_stream_keeps_order_ends_and_carries_errors,
    promises.test_health_reports_what_the_server_says,
]


@pytest.mark.parametrize("promise", PROMISE_TESTS, ids=[t.__name__ for t in PROMISE_TESTS])
def test_sim_network_keeps_the_promise(promise, monkeypatch):
    monkeypatch.setattr(promises, "served", sim_served)
    promise()


def test_partition_and_crash_break_a_stream_and_fail_calls():
    """Scenario: a one-way partition fails a unary call with UNAVAILABLE and cuts an open
    stream (the caller's next read raises); after healing, calls succeed; a crashed
    server's calls fail with UNAVAILABLE."""
    from aurora_pb import replication_pb2 as rpb
    from aurora_pb import storage_pb2 as pb
    from engine.errors import RpcError

    loop = SimLoop()
    net = SimNetwork(random.Random(0), Trace(keep=True), Latency(), {"sn1": "az-a", "db1": "az-b"})
    sn1 = SimProcess("sn1")

    async def main():
        await SimTransport(net, sn1).serve("sn1", 7000, {promises.STORAGE: promises.Handlers(),
                                                         promises.REPLICATION: promises.Echo()})
        client = SimTransport(net, SimProcess("db1"))
        channel = client.channel("sn1:7000", timeout_s=5)
        stream = channel.stub(promises.REPLICATION).Subscribe()
        assert (await stream.read()).is_snapshot
        net.rules.blocked.add(("db1", "sn1"))
        assert net.cut_blocked() == 1
        with pytest.raises(RpcError) as cut:
            await stream.read()
        with pytest.raises(RpcError) as blocked:
            await channel.stub(promises.STORAGE).NodeStatus(pb.NodeStatusRequest())
        net.rules.blocked.clear()
        healed = await channel.stub(promises.STORAGE).NodeStatus(pb.NodeStatusRequest())
        sn1.kill()
        with pytest.raises(RpcError) as crashed:
            await channel.stub(promises.STORAGE).NodeStatus(pb.NodeStatusRequest())
        return cut.value, blocked.value, healed, crashed.value, rpb

    with virtual_time(loop):
        cut, blocked, healed, crashed, _ = loop.run_until_complete(main())
    loop.close()
    assert cut.status == blocked.status == crashed.status == "UNAVAILABLE"
    assert healed.node_id == "sn1"
    assert any("break" in line for line in net.trace.lines)
