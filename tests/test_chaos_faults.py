"""The fault rules (engine/hooks.py's fault file, applied by engine/transport/links.py)
do what the fault file says, on calls through the transport.

Scenario base: an in-process Storage server (plain handler, GrpcTransport) whose
NodeStatus counts calls, and a channel of process "db1" towards it (named "sn1" in the
fault file). No cluster: these tests only prove that each link fault really acts, so the
scenario tests that rely on them are not vacuous.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from aurora_pb import storage_pb2 as pb
from engine import hooks
from engine import hooks as faults
from engine.errors import RpcError
from engine.transport import service_of
from engine.transport.grpc_transport import GrpcTransport

STORAGE = service_of(pb, "Storage")


class CountingStorage:
    def __init__(self) -> None:
        self.calls = 0

    async def NodeStatus(self, request, context):
        self.calls += 1
        return pb.NodeStatusReply(node_id="sn1")

    async def AppendStream(self, requests, context):
        async for request in requests:
            self.calls += 1
            yield pb.AppendReply(seq=request.seq)


def run_with(tmp_path, monkeypatch, rules, body):
    path = tmp_path / "faults.json"
    monkeypatch.setenv(faults.FAULTS_FILE_ENV, str(path))
    monkeypatch.setattr(hooks, "_STATES", {})

    async def main():
        servicer = CountingStorage()
        server = await GrpcTransport("sn1").serve("127.0.0.1", 0, {STORAGE: servicer})
        address = f"127.0.0.1:{server.port}"
        path.write_text(json.dumps({"names": {address: "sn1"}, "links": rules}))
        channel = GrpcTransport("db1").channel(address)
        stub = channel.stub(STORAGE)
        try:
            return await body(stub, servicer, path, address)
        finally:
            await channel.close()
            await server.stop(0)

    return asyncio.run(main())


async def _outcomes(stub, n):
    ok = err = 0
    for _ in range(n):
        try:
            await stub.NodeStatus(pb.NodeStatusRequest(), timeout_s=2)
            ok += 1
        except RpcError as exc:
            assert exc.status == "UNAVAILABLE"
            err += 1
    return ok, err


def test_partition_sends_nothing(tmp_path, monkeypatch):
    async def body(stub, srv, path, address):
        return await _outcomes(stub, 5), srv.calls
    (ok, err), calls = run_with(tmp_path, monkeypatch, [{"src": "db1", "dst": "sn1", "kind": "partition"}], body)
    assert (ok, err, calls) == (0, 5, 0)


def test_rules_of_other_links_do_not_apply(tmp_path, monkeypatch):
    async def body(stub, srv, path, address):
        return await _outcomes(stub, 3), srv.calls
    rules = [{"src": "db2", "dst": "sn1", "kind": "partition"}, {"src": "db1", "dst": "sn2", "kind": "partition"}]
    (ok, err), calls = run_with(tmp_path, monkeypatch, rules, body)
    assert (ok, err, calls) == (3, 0, 3)


def test_drop_loses_requests_and_replies(tmp_path, monkeypatch):
    """p=1: every call fails; about half reached the server (their replies were lost)."""
    async def body(stub, srv, path, address):
        return await _outcomes(stub, 40), srv.calls
    (ok, err), calls = run_with(tmp_path, monkeypatch, [{"src": "*", "dst": "sn1", "kind": "drop", "p": 1.0}], body)
    assert ok == 0 and err == 40
    assert 5 <= calls <= 35, calls   # both requests and replies were dropped


async def _stream_outcomes(stub, n):
    """n streams, each one request and its reply: (answered, broken)."""
    ok = err = 0
    for seq in range(n):
        stream = stub.AppendStream()
        try:
            await stream.write(pb.AppendRequest(seq=seq))
            reply = await stream.read()
            assert reply.seq == seq
            ok += 1
        except RpcError as exc:
            assert exc.status == "UNAVAILABLE"
            err += 1
        finally:
            stream.cancel()
    return ok, err


def test_drop_breaks_streams_before_or_after_the_server_saw_the_request(tmp_path, monkeypatch):
    """p=1 on a stream: no request gets its reply; the stream breaks at the write (the
    request lost) or at the read (the reply lost: the server saw it), about half each."""
    async def body(stub, srv, path, address):
        outcome = await _stream_outcomes(stub, 40)
        await asyncio.sleep(0.2)   # requests in flight reach the server
        return outcome, srv.calls
    (ok, err), calls = run_with(tmp_path, monkeypatch, [{"src": "*", "dst": "sn1", "kind": "drop", "p": 1.0}], body)
    assert ok == 0 and err == 40
    assert 5 <= calls <= 35, calls


def test_stream_messages_obey_delay_and_partition(tmp_path, monkeypatch):
    """A delay rule delays a stream message each way; a partition written while a stream
    is open cuts it within STREAM_CHECK_S, and no new stream opens across it."""
    async def body(stub, srv, path, address):
        started = time.monotonic()
        delayed = await _stream_outcomes(stub, 2)
        elapsed = time.monotonic() - started
        stream = stub.AppendStream()
        await stream.write(pb.AppendRequest(seq=1))
        path.write_text(json.dumps({"names": {address: "sn1"}, "links": [
            {"src": "db1", "dst": "sn1", "kind": "partition"}]}))
        await asyncio.sleep(faults.CHECK_INTERVAL_S + 0.1)
        with pytest.raises(RpcError) as cut:
            while True:
                await stream.read()   # the reply, if it came before the cut, then the cut
        with pytest.raises(RpcError) as refused:
            stub.AppendStream()
        return delayed, elapsed, cut.value.status, refused.value.status
    delayed, elapsed, cut, refused = run_with(
        tmp_path, monkeypatch, [{"src": "db1", "dst": "sn1", "kind": "delay", "ms": 50}], body)
    assert delayed == (2, 0) and elapsed >= 2 * 2 * 0.05
    assert (cut, refused) == ("UNAVAILABLE", "UNAVAILABLE")


def test_duplicate_sends_twice(tmp_path, monkeypatch):
    async def body(stub, srv, path, address):
        return await _outcomes(stub, 4), srv.calls
    (ok, err), calls = run_with(tmp_path, monkeypatch, [{"src": "db1", "dst": "*", "kind": "duplicate", "p": 1.0}], body)
    assert (ok, err, calls) == (4, 0, 8)


def test_delay_and_reorder_wait(tmp_path, monkeypatch):
    async def body(stub, srv, path, address):
        started = time.monotonic()
        await _outcomes(stub, 3)
        return time.monotonic() - started
    elapsed = run_with(tmp_path, monkeypatch, [{"src": "db1", "dst": "sn1", "kind": "delay", "ms": 50}], body)
    assert elapsed >= 3 * 2 * 0.05


def test_fault_file_rewrite_is_picked_up(tmp_path, monkeypatch):
    """A partition written while the channel is open acts within CHECK_INTERVAL_S, and
    clearing it heals the link."""
    async def body(stub, srv, path, address):
        first = await _outcomes(stub, 1)
        path.write_text(json.dumps({"names": {address: "sn1"},
                                    "links": [{"src": "db1", "dst": "sn1", "kind": "partition"}]}))
        await asyncio.sleep(faults.CHECK_INTERVAL_S + 0.1)
        cut = await _outcomes(stub, 1)
        path.write_text(json.dumps({"names": {address: "sn1"}, "links": []}))
        await asyncio.sleep(faults.CHECK_INTERVAL_S + 0.1)
        healed = await _outcomes(stub, 1)
        return first, cut, healed
    assert run_with(tmp_path, monkeypatch, [], body) == ((1, 0), (0, 1), (1, 0))


def test_no_fault_file_no_faults(monkeypatch):
    monkeypatch.delenv(faults.FAULTS_FILE_ENV, raising=False)
    monkeypatch.setattr(faults, "_STATES", {})
    assert faults.state_for("db1") is None
    assert GrpcTransport("db1")._links.faults is None
    assert faults.disk_delay_s("sn1") == 0.0


def test_disk_rule_follows_the_fault_file(tmp_path, monkeypatch):
    """The slow-disk hook (engine/hooks.py, no grpc) reads the disk rule of its own node,
    follows a rewrite within CHECK_INTERVAL_S, and falls back to no delay when the file is
    removed; a rule with an unknown link kind is refused whole (the previous rules stay)."""
    path = tmp_path / "faults.json"
    monkeypatch.setenv(hooks.FAULTS_FILE_ENV, str(path))
    monkeypatch.setattr(hooks, "_STATES", {})
    path.write_text(json.dumps({"disk": {"sn1": {"delay_ms": 40}}}))
    assert hooks.disk_delay_s("sn1") == pytest.approx(0.04)
    assert hooks.disk_delay_s("sn2") == 0.0
    path.write_text(json.dumps({"disk": {"*": {"delay_ms": 5}},
                                "links": [{"src": "sn1", "dst": "*", "kind": "explode"}]}))
    time.sleep(hooks.CHECK_INTERVAL_S + 0.1)
    assert hooks.disk_delay_s("sn1") == pytest.approx(0.04)
    path.write_text(json.dumps({"disk": {"*": {"delay_ms": 5}}}))
    time.sleep(hooks.CHECK_INTERVAL_S + 0.1)
    assert hooks.disk_delay_s("sn1") == pytest.approx(0.005)
    path.unlink()
    time.sleep(hooks.CHECK_INTERVAL_S + 0.1)
    assert hooks.disk_delay_s("sn1") == 0.0
    assert hooks.state_for("sn1").links == []
