"""The throughput ceiling of aurora-lite's write path: a bare six-way quorum append loop.

Issue 16, part 2. What aurora-lite's commit path could do on this machine if it spent
nothing but the unavoidable: six storage processes that make appends durable, one stream
to each, a writer that boxcars transactions and releases each at a write quorum. No
engine, no B+tree, no redo format, no client RPC, no background work. Measured side by side
with `aurora-lite bench load` (bench/bench_throughput.py), it says how far the real write
path is from its own ceiling.

    storage process (x6)   a grpc.aio server with one bidirectional stream method. Appends
                           arrive on ONE stream from the writer; all appends pending when
                           the previous commit finished go into ONE LMDB write transaction
                           (the environment opened with sync: the commit fsyncs; invariant
                           3 of ARCHITECTURE.md: ack only after it), then one ack carries
                           the highest sequence number now durable (and how many commits
                           the node has made, for records-per-fsync).
    writer process         C clients, asyncio tasks, each looping "make a transaction of
                           TXN_RECORDS records of RECORD_BYTES bytes (concatenated), wait
                           for its release". A sender boxcars every transaction pending
                           when it is free into one batch (no timer: boxcars fill under
                           load), writes it to the six streams, and a transaction is
                           released once QUORUM of the six nodes acked its batch
                           (invariant 5's 4/6, for one PG).

Parameters are the issue's, exactly: 5 records of 120 bytes, 4 of 6, LMDB with sync, one
stream per node. There is no simulated AZ latency (aurora-lite's default cluster adds 0.25
ms / 1 ms one way to each unary call): the ceiling is the machine's, not the network's.

Run:  python bench/ceiling.py run --clients 8 --duration 15 [--json]
      (``run_ceiling(...)`` does the same from Python; bench/bench_throughput.py uses it)

CPU per transaction is read from each process's own counters (/proc/PID/stat utime +
stime) at the two ends of the measured window, by the writer, which also counts only
the transactions released inside the window. bench/ is outside the layer rules: this file
uses grpc and lmdb directly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

TXN_RECORDS = 5
RECORD_BYTES = 120
NODES = 6
QUORUM = 4
NODE_NAMES = [f"st{i + 1}" for i in range(NODES)]
METHOD = "/ceiling.Storage/Append"
MAP_SIZE_BYTES = 8 << 30
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
_SEQ = struct.Struct(">Q")
_ACK = struct.Struct(">QQ")        # highest durable batch sequence number, commits so far
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


# --- Storage process ------------------------------------------------------------------------


async def storage_main(data_dir: str, port_file: str) -> None:
    import grpc
    import lmdb

    env = lmdb.open(data_dir, map_size=MAP_SIZE_BYTES, sync=True, metasync=True)
    disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb")
    commits = [0]

    def write(batch: list[bytes]) -> None:
        # One write transaction for every append pending; its commit fsyncs (sync=True).
        with env.begin(write=True) as txn:
            for message in batch:
                txn.put(message[:_SEQ.size], message[_SEQ.size:], append=True)
        commits[0] += 1

    async def append(request_iterator, context):
        loop = asyncio.get_running_loop()
        pending: list[bytes] = []
        wake = asyncio.Event()
        done = False

        async def committer() -> None:
            while True:
                await wake.wait()
                wake.clear()
                if not pending:
                    if done:
                        return
                    continue
                batch = pending[:]
                pending.clear()
                await loop.run_in_executor(disk, write, batch)
                # Ack only after the commit returned (durable), with the highest seq in it.
                await context.write(_ACK.pack(_SEQ.unpack_from(batch[-1])[0], commits[0]))
                if pending or done:
                    wake.set()

        task = asyncio.create_task(committer())
        try:
            async for message in request_iterator:
                pending.append(message)
                wake.set()
        finally:
            done = True
            wake.set()
            try:
                await asyncio.wait_for(task, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(append)   # raw bytes both ways
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("ceiling.Storage", {"Append": handler}),))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    await server.wait_for_termination()


# --- Writer process -------------------------------------------------------------------------


async def writer_main(addresses: list[str], storage_pids: list[int], clients: int,
                      duration_s: float, warmup_s: float) -> dict:
    import grpc

    loop = asyncio.get_running_loop()
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    streams = [ch.stream_stream(METHOD)() for ch in channels]   # no serializers: bytes
    pending: list[tuple[bytes, asyncio.Future]] = []
    have_work = asyncio.Event()
    in_flight: collections.deque = collections.deque()     # (seq, futures), in seq order
    acked = [0] * NODES
    node_commits = [0] * NODES
    counters = {"batches": 0, "batched_txns": 0}
    seq_box = [0]

    async def sender() -> None:
        while True:
            await have_work.wait()
            have_work.clear()
            if not pending:
                continue
            txns = pending[:]
            pending.clear()
            seq_box[0] += 1
            seq = seq_box[0]
            message = _SEQ.pack(seq) + b"".join(payload for payload, _ in txns)
            in_flight.append((seq, [fut for _, fut in txns]))
            counters["batches"] += 1
            counters["batched_txns"] += len(txns)
            for stream in streams:
                await stream.write(message)
            if pending:
                have_work.set()

    async def ack_reader(node: int) -> None:
        stream = streams[node]
        while True:
            message = await stream.read()
            if message is grpc.aio.EOF:
                return
            acked[node], node_commits[node] = _ACK.unpack(message)
            durable = sorted(acked)[NODES - QUORUM]        # QUORUM-th highest: 4 of 6 hold it
            while in_flight and in_flight[0][0] <= durable:
                for fut in in_flight.popleft()[1]:
                    if not fut.done():
                        fut.set_result(None)

    latencies_ms: list[float] = []
    window = {"start": float("inf"), "end": float("inf")}
    stop = [False]

    async def client(number: int) -> None:
        records = [os.urandom(RECORD_BYTES) for _ in range(TXN_RECORDS)]
        while not stop[0]:
            began = time.perf_counter()
            payload = b"".join(records)                 # 5 records of 120 bytes
            fut = loop.create_future()
            pending.append((payload, fut))
            have_work.set()
            await fut
            now = time.monotonic()
            if window["start"] <= now <= window["end"]:
                latencies_ms.append((time.perf_counter() - began) * 1000.0)

    tasks = [asyncio.create_task(sender())]
    tasks += [asyncio.create_task(ack_reader(i)) for i in range(NODES)]
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), START_TIMEOUT_S)
    tasks += [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(warmup_s)
    window["start"] = time.monotonic()
    window["end"] = window["start"] + duration_s
    me = os.getpid()
    cpu_before = {"writer": process_cpu_s(me),
                  **{n: process_cpu_s(p) for n, p in zip(NODE_NAMES, storage_pids)}}
    batches_before, txns_before = counters["batches"], counters["batched_txns"]
    commits_before = list(node_commits)
    await asyncio.sleep(duration_s)
    cpu_after = {"writer": process_cpu_s(me),
                 **{n: process_cpu_s(p) for n, p in zip(NODE_NAMES, storage_pids)}}
    wall_s = time.monotonic() - window["start"]
    batches = counters["batches"] - batches_before
    batched = counters["batched_txns"] - txns_before
    fsyncs = [after - before for after, before in zip(node_commits, commits_before)]
    stop[0] = True
    for t in tasks:
        t.cancel()
    for s in streams:
        s.cancel()
    for ch in channels:
        await ch.close()

    committed = len(latencies_ms)
    latencies_ms.sort()
    cpu_s = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    per_txn = 1000.0 / committed if committed else 0.0
    cpu_ms_per_txn = {name: v * per_txn for name, v in cpu_s.items()}
    cpu_ms_per_txn["total"] = sum(cpu_s.values()) * per_txn
    return {
        "clients": clients, "duration_s": wall_s, "warmup_s": warmup_s,
        "tps": committed / wall_s, "committed": committed,
        "p50_ms": percentile(latencies_ms, 50), "p95_ms": percentile(latencies_ms, 95),
        "p99_ms": percentile(latencies_ms, 99), "max_ms": latencies_ms[-1] if latencies_ms else 0.0,
        "cpu_s": cpu_s, "cpu_ms_per_txn": cpu_ms_per_txn,
        "txns_per_batch": batched / batches if batches else 0.0,
        "txns_per_fsync": batched / (sum(fsyncs) / NODES) if sum(fsyncs) else 0.0,
        "txn_records": TXN_RECORDS, "record_bytes": RECORD_BYTES, "quorum": f"{QUORUM}/{NODES}",
    }


# --- Orchestration --------------------------------------------------------------------------


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_ceiling(clients: int, duration_s: float, warmup_s: float = 1.0,
                base_dir: str | None = None) -> dict:
    """Start six storage processes and the writer, measure, stop them all, remove their
    data; return the writer's result (tps, p50_ms, p99_ms, cpu_ms_per_txn, ...)."""
    root = tempfile.mkdtemp(prefix="ceiling-", dir=base_dir)
    storage: list[subprocess.Popen] = []
    try:
        port_files = []
        for name in NODE_NAMES:
            node_dir = os.path.join(root, name)
            os.makedirs(node_dir)
            port_file = os.path.join(root, f"{name}.port")
            port_files.append(port_file)
            storage.append(_spawn(["storage", "--data-dir", node_dir, "--port-file", port_file],
                                  os.path.join(root, f"{name}.log")))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(os.path.exists(p) for p in port_files):
            dead = [p.args for p in storage if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"ceiling storage processes did not start (see {root}/*.log)")
            time.sleep(0.05)
        addresses = []
        for p in port_files:
            with open(p) as f:
                addresses.append(f"{HOST}:{f.read().strip()}")
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "writer", "--nodes", ",".join(addresses),
             "--storage-pids", ",".join(str(p.pid) for p in storage), "--clients", str(clients),
             "--duration", str(duration_s), "--warmup", str(warmup_s)],
            capture_output=True, text=True, timeout=duration_s + warmup_s + 120)
        if out.returncode != 0:
            raise RuntimeError(f"ceiling writer failed ({out.returncode}): {out.stderr[-2000:]}")
        return json.loads(out.stdout)
    finally:
        for proc in storage:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def render(result: dict) -> str:
    r = result
    lines = [f"ceiling: {r['clients']} clients, {r['duration_s']:.1f} s, transactions of "
             f"{r['txn_records']} x {r['record_bytes']} bytes, release at {r['quorum']}",
             f"transactions/s  {r['tps']:.0f}   p50 {r['p50_ms']:.2f} ms  p95 {r['p95_ms']:.2f} ms  "
             f"p99 {r['p99_ms']:.2f} ms",
             f"boxcar          {r['txns_per_batch']:.1f} transactions per batch, "
             f"{r['txns_per_fsync']:.1f} per fsync", "",
             f"{'process':<10}{'CPU s':>8}{'CPU ms/txn':>12}"]
    for name, per_txn in r["cpu_ms_per_txn"].items():
        cpu = f"{r['cpu_s'][name]:>8.2f}" if name in r["cpu_s"] else f"{'':>8}"
        lines.append(f"{name:<10}{cpu}{per_txn:>12.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="start the processes, measure, print, stop")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--base-dir", default=None, help="where the LMDB files go (default: $TMPDIR)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("storage", help="(started by run) one storage process")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--port-file", required=True)
    p = sub.add_parser("writer", help="(started by run) the writer; prints its result as JSON")
    p.add_argument("--nodes", required=True, help="six host:port, comma-separated")
    p.add_argument("--storage-pids", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command == "storage":
        asyncio.run(storage_main(args.data_dir, args.port_file))
        return 0
    if args.command == "writer":
        result = asyncio.run(writer_main(args.nodes.split(","),
                                         [int(p) for p in args.storage_pids.split(",")],
                                         args.clients, args.duration, args.warmup))
        print(json.dumps(result))
        return 0
    result = run_ceiling(args.clients, args.duration, args.warmup, args.base_dir)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
