"""What one message on the redo path costs: a grpc.aio stream, the same through the
transport's latency layer, and a bare asyncio TCP stream, side by side in one run.

    pytest bench/bench_transport.py --benchmark-only -s     (not part of the default `pytest`)

Why: every redo batch is six stream round trips (the writer writes it to six storage nodes
on their AppendStreams and reads six replies, docs/writer.md), so the CPU a round trip
costs, times six, divided by the transactions a batch carries, is a floor under the write
path's CPU per transaction (issue 16's goal). This measures that floor on this machine.

One process, one event loop per configuration, a server and a client in it (so the CPU
counted is both ends of the stream: what the writer's side plus a node's side cost). The
client keeps WINDOW messages in flight and sends MESSAGES AppendRequests carrying one
PgBatch of RECORD_BYTES bytes (about one 8-client boxcar); the server answers each with an
AppendReply. Configurations, alternated ROUNDS times so that a noisy machine weighs on
all of them alike:

    grpc          GrpcTransport's stream (engine/transport/grpc_transport.py), no latency
    grpc+links0   the same through engine/transport/links.py's LinkedStream with a zero
                  delay: the layer's own work per message (two pump tasks, a timer each way)
    grpc+links    the same with the AZ model's cross-AZ delay (the writer's real setting);
                  its CPU also counts gRPC's threads over the longer wall time
    tcp           asyncio streams, a 4-byte length and the same protobuf bytes: what the
                  messaging itself costs without gRPC (a reference, not a proposal: the
                  project's transport is gRPC)

Reported per configuration: median CPU microseconds per round trip (``time.process_time``
over the run, both ends) and wall microseconds; and the ratios to ``tcp``.
"""

from __future__ import annotations

import asyncio
import statistics
import struct
import time

from aurora_pb import storage_pb2 as pb
from engine.format.cluster_config import Latency, NodeInfo
from engine.transport import service_of
from engine.transport.grpc_transport import GrpcTransport
from engine.transport.latency import AzLatency

STORAGE = service_of(pb, "Storage")
MESSAGES = 3000
WINDOW = 4
RECORD_BYTES = 600
ROUNDS = 3
FRAME = struct.Struct("<I")


class _EchoNode:
    """AppendStream that answers each request with its seq (a node that stores nothing)."""

    async def AppendStream(self, requests, ctx):
        async for request in requests:
            yield pb.AppendReply(seq=request.seq)


def _request(seq: int) -> bytes:
    return pb.AppendRequest(volume="v", seq=seq, batches=[
        pb.PgBatch(pg=1, records=b"x" * RECORD_BYTES)]).SerializeToString()


async def _pump(write, read) -> tuple[float, float]:
    """Send MESSAGES with WINDOW in flight; returns (cpu_s, wall_s)."""
    await write(_request(0))
    await read()   # warm: channel and stream open
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sent = got = 0
    while got < MESSAGES:
        while sent < MESSAGES and sent - got < WINDOW:
            sent += 1
            await write(_request(sent))
        await read()
        got += 1
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def _grpc(with_links: bool, model: Latency | None = None) -> tuple[float, float]:
    server = await GrpcTransport("sn1").serve("127.0.0.1", 0, {STORAGE: _EchoNode()})
    address = f"127.0.0.1:{server.port}"
    transport = GrpcTransport("db1")
    if with_links:   # the writer in az-a, the node in az-b: the cross-AZ one-way delay
        transport.latency = AzLatency("az-a", "db1", nodes=[NodeInfo("sn1", "az-b", address)],
                                      model=model)
    try:
        async with transport.channel(address, timeout_s=10) as channel:
            stream = channel.stub(STORAGE).AppendStream()
            try:
                return await _pump(stream.write, stream.read)
            finally:
                stream.cancel()
    finally:
        await server.stop(0)


async def _tcp() -> tuple[float, float]:
    async def node(reader, writer):
        try:
            while True:
                (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                seq = pb.AppendRequest.FromString(await reader.readexactly(size)).seq
                reply = pb.AppendReply(seq=seq).SerializeToString()
                writer.write(FRAME.pack(len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(node, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])

    async def write(data: bytes) -> None:
        writer.write(FRAME.pack(len(data)) + data)

    async def read():
        (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
        return pb.AppendReply.FromString(await reader.readexactly(size))

    try:
        return await _pump(write, read)
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


CONFIGS = {"grpc": lambda: _grpc(False),
           "grpc+links0": lambda: _grpc(True, Latency(intra_az_ms=0.0, cross_az_ms=0.0)),
           "grpc+links": lambda: _grpc(True), "tcp": _tcp}


def test_stream_round_trip_cost(benchmark):
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}

    def run_all() -> None:
        for _ in range(ROUNDS):
            for name, make in CONFIGS.items():
                samples[name].append(asyncio.run(make()))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    cpu_us = {n: statistics.median(c for c, _w in s) / MESSAGES * 1e6 for n, s in samples.items()}
    wall_us = {n: statistics.median(w for _c, w in s) / MESSAGES * 1e6 for n, s in samples.items()}
    benchmark.extra_info.update({f"{n}_cpu_us": round(v, 1) for n, v in cpu_us.items()})
    benchmark.extra_info.update({f"{n}_wall_us": round(v, 1) for n, v in wall_us.items()})
    print(f"\none stream round trip ({RECORD_BYTES}-byte batch, {WINDOW} in flight, both ends; "
          f"median of {ROUNDS} alternated runs of {MESSAGES}):")
    for name in CONFIGS:
        print(f"  {name:<11} CPU {cpu_us[name]:7.1f} us   wall {wall_us[name]:7.1f} us   "
              f"CPU x{cpu_us[name] / cpu_us['tcp']:.1f} of tcp")
    print(f"  a redo batch is six round trips: {6 * cpu_us['grpc+links0'] / 1000:.2f} ms of CPU "
          f"on the writer's and the nodes' side together, before any storage work")
