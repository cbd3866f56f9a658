"""The load generator behind `aurora-lite bench load`: pgbench-style load on a running cluster.

It drives the cluster only as a user would, through the client library (engine/client.py,
``ClusterClient`` of the "cluster" endpoint), and measures what a throughput goal needs:
transactions/s, latency percentiles, aborts, retries, and the CPU every process spent per
committed transaction, read from the processes' own counters (/proc/PID/stat).

    table ``sbtest`` (LOAD_TABLE)   key b"%08d" % id, id in 1..rows   value VALUE_BYTES random
    table ``sbtest_meta``           key b"rows" -> the row count, so a run knows the ids

Workloads (one "transaction" each; ids uniform in 1..rows, drawn independently):

    write-only   SysBench oltp_write_only-like: begin; put i1; put i2; delete i3; put i3;
                 commit (one engine.client transaction; the client buffers the four
                 writes and sends them with the commit: one RPC)
    read-only    READS_PER_READ_TXN autocommit point reads (the writer answers them)
    mixed        begin; get i1; get i2 (inside the transaction); then the write-only writes;
                 commit (Begin before the first get, two Gets, Commit with the writes)

A write-write conflict (first committer wins) aborts the attempt: it counts in ``aborted``
and the client goes on with new ids (as SysBench does). Other database errors count in
``errors``. ``retries`` is what the client library resent after a failure
(``ClusterClient.retries``). Latency is per transaction, from ``begin()`` to the commit's
acknowledgement (``p50_ms`` ...); ``commit_*_ms`` time the Commit call alone (which
carries the transaction's writes).

Why processes: a client call holds the GIL while it builds and parses messages, so C
threads in one process saturate one core long before the cluster does. The generator runs
``workers`` processes (multiprocessing, spawn: fresh interpreters, never a fork of a process
that runs gRPC), each with C / workers client threads, each thread with its own
ClusterClient. Each worker reports its own CPU seconds over the measured window
(``time.process_time``, every thread of the process); the generator's cores used = its CPU
seconds / wall seconds, so a reader sees whether it could have been the bottleneck.

The measured window starts after ``warmup_s`` of load and lasts ``duration_s``; only
transactions that complete inside it count; CPU counters are read at its two ends.
Library code: it takes a ``make_transport`` factory (called in each worker) and never
picks a transport itself (engine/cli/load.py does, docs/transport.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import random
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Callable

from engine import errors
from engine.client import ClusterClient
from engine.transport import Transport

log = logging.getLogger(__name__)

LOAD_TABLE = "sbtest"
META_TABLE = "sbtest_meta"
META_ROWS_KEY = b"rows"
VALUE_BYTES = 180
WORKLOADS = ("write-only", "read-only", "mixed")
READS_PER_READ_TXN = 10          # SysBench oltp_read_only runs ten point selects
INIT_ROWS_PER_TXN = 100          # rows per loading transaction (about 19 KiB of values)
INIT_THREADS = 4                 # loading clients
VALUE_POOL = 64                  # distinct random values per client thread
WORKER_START_TIMEOUT_S = 60.0    # a worker must connect within this
CLIENT_TIMEOUT_S = 30.0          # per RPC (the client library's default)
ERROR_SAMPLES_MAX = 5
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def row_key(row_id: int) -> bytes:
    return b"%08d" % row_id


# --- CPU counters ---------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (all its threads), from
    /proc/PID/stat (fields 14 and 15, in clock ticks); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sample_cpu(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: process_cpu_s(pid) for name, pid in pids.items()}


#: The writer's counters whose change over the window gives the boxcars' fill
#: (engine/instance/metrics.py).
BOXCAR_COUNTERS = ("aurora_commits_total", "aurora_redo_batches_total", "aurora_redo_records_total")


def sample_writer_counters(metrics_url: str | None) -> dict[str, float] | None:
    """The writer's commit and redo-batch counters, scraped from its /metrics page; None if
    there is no URL or the page does not answer (the run goes on without them)."""
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=2.0) as reply:
            text = reply.read().decode()
    except (OSError, ValueError):
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in BOXCAR_COUNTERS:
            found[name] = float(rest.rsplit(" ", 1)[1])
    return found if len(found) == len(BOXCAR_COUNTERS) else None


def boxcars(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """Commits and redo records per batch over the window (None when not sampled or when
    the writer restarted in between)."""
    if not before or not after:
        return {"commits_per_batch": None, "records_per_batch": None}
    batches = after["aurora_redo_batches_total"] - before["aurora_redo_batches_total"]
    commits = after["aurora_commits_total"] - before["aurora_commits_total"]
    records = after["aurora_redo_records_total"] - before["aurora_redo_records_total"]
    if batches <= 0 or commits < 0 or records < 0:
        return {"commits_per_batch": None, "records_per_batch": None}
    return {"commits_per_batch": commits / batches, "records_per_batch": records / batches}


# --- Loading ---------------------------------------------------------------------------------


def init_table(make_client: Callable[[], ClusterClient], rows: int,
               progress: Callable[[int, int], None] | None = None,
               threads: int = INIT_THREADS, seed: int = 1) -> float:
    """Write rows 1..rows (VALUE_BYTES random bytes each) and the row count; returns seconds.
    Rows already there are replaced, so --init can be run again (with more rows, too)."""
    if rows < 1:
        raise ValueError(f"--rows must be at least 1, got {rows}")
    started = time.monotonic()
    chunks = [(lo, min(rows, lo + INIT_ROWS_PER_TXN - 1))
              for lo in range(1, rows + 1, INIT_ROWS_PER_TXN)]
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for chunk in chunks:
        todo.put(chunk)
    loaded = [0]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def loader(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        try:
            with make_client() as client:
                while not failures:
                    try:
                        lo, hi = todo.get_nowait()
                    except queue.Empty:
                        return
                    with client.transaction() as txn:
                        for row_id in range(lo, hi + 1):
                            txn.put(row_key(row_id), rng.randbytes(VALUE_BYTES), LOAD_TABLE)
                    with lock:
                        loaded[0] += hi - lo + 1
                        done = loaded[0]
                    if progress is not None:
                        progress(done, rows)
        except BaseException as exc:   # re-raised in the caller's thread below
            failures.append(exc)

    pool = [threading.Thread(target=loader, args=(n,), daemon=True)
            for n in range(max(1, min(threads, len(chunks))))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failures:
        raise failures[0]
    with make_client() as client:
        client.put(META_ROWS_KEY, str(rows).encode(), META_TABLE)
    return time.monotonic() - started


def table_rows(client: ClusterClient) -> int:
    """The row count --init wrote; DatabaseError (KeyNotFound) if it never ran."""
    return int(client.get(META_ROWS_KEY, META_TABLE))


# --- One worker process ---------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one worker process measured inside the window."""

    committed: int = 0
    aborted: int = 0
    errors: int = 0
    retries: int = 0
    latencies_ms: list[float] = field(default_factory=list)         # whole transaction
    commit_latencies_ms: list[float] = field(default_factory=list)  # the Commit call alone
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    failure: str = ""


class _Values:
    """A pool of random values per client thread, so a transaction costs no formatting."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pool = [rng.randbytes(VALUE_BYTES) for _ in range(VALUE_POOL)]

    def next(self) -> bytes:
        return self.rng.choice(self.pool)


def _write_txn(client: ClusterClient, rng: random.Random, values: _Values, rows: int,
               reads: int) -> float:
    """One write-only (reads=0) or mixed transaction; returns the Commit call's seconds."""
    i1, i2, i3 = rng.randint(1, rows), rng.randint(1, rows), rng.randint(1, rows)
    txn = client.begin()
    try:
        for row_id in (i1, i2)[:reads]:
            txn.get(row_key(row_id), LOAD_TABLE)
        txn.put(row_key(i1), values.next(), LOAD_TABLE)
        txn.put(row_key(i2), values.next(), LOAD_TABLE)
        txn.delete(row_key(i3), LOAD_TABLE)
        txn.put(row_key(i3), values.next(), LOAD_TABLE)
        started = time.perf_counter()
        txn.commit()
        return time.perf_counter() - started
    finally:
        if not txn.closed:
            try:
                txn.abort()
            except errors.DatabaseError:
                pass


def _read_txn(client: ClusterClient, rng: random.Random, rows: int) -> float:
    for _ in range(READS_PER_READ_TXN):
        client.get(row_key(rng.randint(1, rows)), LOAD_TABLE)
    return 0.0


def run_worker(make_transport: Callable[[], Transport], control_address: str, workload: str,
               clients: int, rows: int, seed: int, ready, go, window, committed_counts,
               worker_number: int, results, endpoint: str = "cluster") -> None:
    """The body of one worker process (multiprocessing target): ``clients`` threads, each
    with its own ClusterClient, run ``workload`` from ``go`` until the window's end.

    ready: a queue the worker puts its number of connected clients on (or an error);
    go: an Event set when every worker is ready; window: a shared array (start, end) in
    ``time.monotonic()`` seconds (one clock for all processes of the machine);
    committed_counts: a shared array of committed counts, one slot per worker (``worker_number``),
    for progress; results: a queue for the WorkerResult."""
    logging.getLogger().setLevel(logging.WARNING)
    result = WorkerResult()
    lock = threading.Lock()
    try:
        transport = make_transport()
        conns = [ClusterClient(control_address, endpoint, timeout_s=CLIENT_TIMEOUT_S,
                               transport=transport) for _ in range(clients)]
        for c in conns:
            c.status()   # connect now, not inside the window
    except Exception as exc:  # reported to the parent, which stops the run
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(clients)
    go.wait()
    start_s, end_s = window[0], window[1]

    def client_loop(number: int, client: ClusterClient) -> None:
        rng = random.Random(seed * 10_000 + number)
        values = _Values(rng)
        while time.monotonic() < end_s:
            began = time.perf_counter()
            try:
                if workload == "read-only":
                    commit_s = _read_txn(client, rng, rows)
                else:
                    commit_s = _write_txn(client, rng, values, rows, 2 if workload == "mixed" else 0)
                outcome = "committed"
            except errors.ConflictError:
                outcome = "aborted"
            except errors.DatabaseError as exc:
                outcome = "errors"
                sample = f"{type(exc).__name__}: {exc}"
            elapsed_s = time.perf_counter() - began
            now = time.monotonic()
            if not start_s <= now <= end_s:
                continue
            with lock:
                if outcome == "committed":
                    result.committed += 1
                    result.latencies_ms.append(elapsed_s * 1000.0)
                    if workload != "read-only":
                        result.commit_latencies_ms.append(commit_s * 1000.0)
                    committed_counts[worker_number] = result.committed
                elif outcome == "aborted":
                    result.aborted += 1
                else:
                    result.errors += 1
                    if len(result.error_samples) < ERROR_SAMPLES_MAX:
                        result.error_samples.append(sample)

    threads = [threading.Thread(target=client_loop, args=(n, c), daemon=True)
               for n, c in enumerate(conns)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start_s - time.monotonic()))
    cpu_start_s = time.process_time()
    retries_start = sum(c.retries for c in conns)
    time.sleep(max(0.0, end_s - time.monotonic()))
    result.cpu_s = time.process_time() - cpu_start_s
    result.retries = sum(c.retries for c in conns) - retries_start
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 5.0)
    for c in conns:
        c.close()
    results.put(asdict(result))


# --- The run -------------------------------------------------------------------------------


@dataclass
class LoadConfig:
    clients: int = 8
    duration_s: float = 10.0
    workload: str = "write-only"
    workers: int = 0          # 0: min(clients, cores)
    warmup_s: float = 1.0
    seed: int = 1
    endpoint: str = "cluster"   # "reader": a read-only load on the replicas (docs/serverless.md)

    def worker_count(self) -> int:
        if self.workers > 0:
            return min(self.workers, self.clients)
        return max(1, min(self.clients, os.cpu_count() or 1))

    def check(self) -> None:
        if self.clients < 1:
            raise ValueError(f"--clients must be at least 1, got {self.clients}")
        if self.duration_s <= 0:
            raise ValueError(f"--duration must be positive, got {self.duration_s}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.warmup_s < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup_s}")
        if self.endpoint not in ("cluster", "reader"):
            raise ValueError(f"--endpoint must be cluster or reader, got {self.endpoint!r}")
        if self.endpoint == "reader" and self.workload != "read-only":
            raise ValueError("--endpoint reader needs --workload read-only (replicas take no writes)")


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; 0.0 if empty."""
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def run_load(cfg: LoadConfig, make_transport: Callable[[], Transport], control_address: str,
             cluster_pids: dict[str, int], rows: int,
             progress: Callable[[float, int], None] | None = None,
             writer_metrics_url: str | None = None) -> dict:
    """Run the load; return the result (see summarise). ``cluster_pids``: name -> pid of
    every cluster process whose CPU to count. ``progress(elapsed_s, committed)`` is called
    about once a second inside the window. ``writer_metrics_url``: the writer's /metrics,
    scraped at the window's edges for the boxcars' fill (commits per redo batch)."""
    cfg.check()
    ctx = multiprocessing.get_context("spawn")
    n_workers = cfg.worker_count()
    shares = [cfg.clients // n_workers + (1 if i < cfg.clients % n_workers else 0)
              for i in range(n_workers)]
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    window = ctx.Array("d", 2, lock=False)
    committed = ctx.Array("q", n_workers, lock=False)
    procs = [ctx.Process(target=run_worker, name=f"bench-load-{i}", daemon=True,
                         args=(make_transport, control_address, cfg.workload, share, rows,
                               cfg.seed * 100 + i, ready, go, window, committed, i, results,
                               cfg.endpoint))
             for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        for _ in procs:
            try:
                answer = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise errors.UnavailableError(
                    f"the load generator's workers did not connect within {WORKER_START_TIMEOUT_S:.0f}s") from None
            if isinstance(answer, str):
                raise errors.UnavailableError(f"a load worker could not connect: {answer}")
        start_s = time.monotonic() + cfg.warmup_s
        window[0], window[1] = start_s, start_s + cfg.duration_s
        go.set()
        time.sleep(max(0.0, start_s - time.monotonic()))
        cpu_before = sample_cpu(cluster_pids)
        writer_before = sample_writer_counters(writer_metrics_url)
        me_before_s = time.process_time()
        wall_before_s = time.monotonic()
        while (now := time.monotonic()) < window[1]:
            time.sleep(min(1.0, window[1] - now))
            if progress is not None:
                progress(min(cfg.duration_s, time.monotonic() - start_s), sum(committed))
        cpu_after = sample_cpu(cluster_pids)
        writer_after = sample_writer_counters(writer_metrics_url)
        me_cpu_s = time.process_time() - me_before_s
        wall_s = time.monotonic() - wall_before_s
        worker_results = []
        for _ in procs:
            worker_results.append(WorkerResult(**results.get(timeout=CLIENT_TIMEOUT_S + 30.0)))
    finally:
        go.set()
        for p in procs:
            p.join(timeout=CLIENT_TIMEOUT_S + 10.0)
            if p.is_alive():
                p.kill()
    cluster_cpu_s = {name: (cpu_after[name] - cpu_before[name])
                     if cpu_before[name] is not None and cpu_after[name] is not None else None
                     for name in cluster_pids}
    result = summarise(cfg, rows, n_workers, wall_s, worker_results, cluster_cpu_s, me_cpu_s)
    result.update(boxcars(writer_before, writer_after))
    return result


def summarise(cfg: LoadConfig, rows: int, n_workers: int, wall_s: float,
              worker_results: list[WorkerResult], cluster_cpu_s: dict[str, float | None],
              parent_cpu_s: float) -> dict:
    """The result of a run, as `bench load --json` prints it.

    cpu_ms_per_txn: one entry per cluster process, ``load-generator`` (the workers and this
    process), ``total`` (every cluster process: the database's own cost) and
    ``total_with_load_generator``. A process that was gone at either end of the window
    (restarted, failed over) has null and is left out of the totals."""
    committed = sum(r.committed for r in worker_results)
    latencies = sorted(x for r in worker_results for x in r.latencies_ms)
    commit_latencies = sorted(x for r in worker_results for x in r.commit_latencies_ms)
    generator_cpu_s = sum(r.cpu_s for r in worker_results) + parent_cpu_s
    per_txn = 1000.0 / committed if committed else 0.0
    cpu_ms_per_txn: dict[str, float | None] = {
        name: (cpu_s * per_txn if cpu_s is not None else None) for name, cpu_s in cluster_cpu_s.items()}
    cluster_total_s = sum(v for v in cluster_cpu_s.values() if v is not None)
    cpu_ms_per_txn["load-generator"] = generator_cpu_s * per_txn
    cpu_ms_per_txn["total"] = cluster_total_s * per_txn
    cpu_ms_per_txn["total_with_load_generator"] = (cluster_total_s + generator_cpu_s) * per_txn
    cores = os.cpu_count() or 1
    return {
        "workload": cfg.workload, "clients": cfg.clients, "workers": n_workers, "rows": rows,
        "duration_s": wall_s, "warmup_s": cfg.warmup_s,
        "tps": committed / wall_s if wall_s > 0 else 0.0,
        "committed": committed,
        "aborted": sum(r.aborted for r in worker_results),
        "errors": sum(r.errors for r in worker_results),
        "retries": sum(r.retries for r in worker_results),
        "error_samples": [s for r in worker_results for s in r.error_samples][:ERROR_SAMPLES_MAX],
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99), "max_ms": latencies[-1] if latencies else 0.0,
        "commit_p50_ms": percentile(commit_latencies, 50),
        "commit_p95_ms": percentile(commit_latencies, 95),
        "commit_p99_ms": percentile(commit_latencies, 99),
        "cpu_s": {**cluster_cpu_s, "load-generator": generator_cpu_s},
        "cpu_ms_per_txn": cpu_ms_per_txn,
        "load_generator_cores": generator_cpu_s / wall_s if wall_s > 0 else 0.0,
        "machine_cores": cores,
        "machine_busy_fraction": (cluster_total_s + generator_cpu_s) / (wall_s * cores) if wall_s > 0 else 0.0,
    }


def render(result: dict) -> str:
    """The result as text, for `bench load` without --json."""
    r = result
    lines = [
        f"workload {r['workload']}: {r['clients']} clients in {r['workers']} worker processes, "
        f"{r['rows']} rows, {r['duration_s']:.1f} s measured after {r['warmup_s']:.1f} s warm-up",
        f"transactions/s   {r['tps']:.1f}  ({r['committed']} committed, {r['aborted']} aborted, "
        f"{r['errors']} errors, {r['retries']} retries)",
        f"latency ms       p50 {r['p50_ms']:.1f}  p95 {r['p95_ms']:.1f}  p99 {r['p99_ms']:.1f}  "
        f"max {r['max_ms']:.1f}  (whole transaction)",
    ]
    if r["workload"] != "read-only":
        lines.append(f"commit call ms   p50 {r['commit_p50_ms']:.1f}  p95 {r['commit_p95_ms']:.1f}  "
                     f"p99 {r['commit_p99_ms']:.1f}")
    if r.get("commits_per_batch") is not None:
        lines.append(f"boxcars          {r['commits_per_batch']:.2f} commits and "
                     f"{r['records_per_batch']:.1f} redo records per batch sent to storage")
    lines.append("")
    lines.append(f"{'process':<28}{'CPU s':>9}{'CPU ms/txn':>12}")
    for name, per_txn in r["cpu_ms_per_txn"].items():
        if name in ("total", "total_with_load_generator"):
            continue
        cpu_s = r["cpu_s"].get(name)
        lines.append(f"{name:<28}{_num(cpu_s, 9, 2)}{_num(per_txn, 12, 3)}")
    lines.append(f"{'total (cluster)':<28}{'':>9}{_num(r['cpu_ms_per_txn']['total'], 12, 3)}")
    lines.append(f"{'total with load generator':<28}{'':>9}"
                 f"{_num(r['cpu_ms_per_txn']['total_with_load_generator'], 12, 3)}")
    lines.append("")
    lines.append(f"load generator used {r['load_generator_cores']:.2f} cores; the machine's "
                 f"{r['machine_cores']} cores were {r['machine_busy_fraction'] * 100:.0f}% busy "
                 f"with the cluster and the generator")
    if r["error_samples"]:
        lines.append("errors, e.g.: " + "; ".join(r["error_samples"]))
    return "\n".join(lines)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
