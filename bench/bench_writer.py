"""The writer end to end: commit throughput and latency, and recovery time after a crash.

    pytest bench/bench_writer.py --benchmark-only       (not part of the default `pytest`)

Everything is a REAL process on 127.0.0.1: six storage nodes (tests/harness.py) with the
node's own background tuning (not the tests' short intervals), and one writer
(tests/writer_harness.py, `python -m engine.cli writer`) with the production layout and LAL
of engine/format/cluster_config.py (8 PGs of 64 pages, LAL 100,000) and the CLI's default buffer
pool (4096 pages = 32 MiB). Simulated latency is ZERO unless a result says
``latency=default`` (engine.format.cluster_config.Latency(): 0.25 ms one way inside an AZ, 1 ms
across AZs, slept by the writer's storage driver before each send and after each reply).

Load generator: threads in this process, each with its own engine.client.Client (its own
gRPC channel), each doing autocommit puts of a 100-byte random value under its own
increasing keys (``c<client>-<n>``). Threads are light here because a client spends almost
all its time blocked in gRPC (which releases the GIL); extra_info records the CPU the
generator used, so one can see it is not the bottleneck.

test_commit_throughput[latency-clients]  on a cluster warmed up by CLUSTER_WARMUP_S of 64
    clients on another volume; 1, 8 and 64 clients, WARMUP_S unrecorded, then
    DURATION_S measured: tx/s (commits that completed inside the window / its length), p50
    and p99 commit latency as the client sees it (put call to reply, i.e. to VDL >= the
    commit record, invariant 2), records per Append batch (group commit), CPU used by the
    writer, the storage nodes and the load generator (in cores), and before the load, over
    IDLE_S, the CPU the idle writer and nodes use (background work: gossip, coalescing, GC).

test_recovery_time  one storage cluster with one volume (and writer) per N in 10,000 and
    100,000: 64 clients commit until N transactions are acknowledged, for each volume in
    turn. Then RECOVERY_ROUNDS rounds; in each, every volume in turn gets a BURST_S burst of
    64 clients and its writer is SIGKILLed mid-burst (records above VDL in flight), then
    started again. Alternating the volumes makes the load of a shared 2-core machine fall
    on both alike. Recorded per volume (median and every round): ``recovery_s`` is
    ``seconds`` of the "recovered volume ..." log line of engine/writer/recovery.py (connect,
    learn, fence, compute VDL, truncate, repair); ``serve_s`` is from starting the new
    process to its health check saying SERVING (interpreter start, imports, recovery,
    reading META). After each restart every client's last acknowledged key and a sample of
    the others must be there. Also recorded: the records and page versions sn1 stores for
    the volume after its load (to see what grows with N).
    Goal (invariant 10: recovery does not replay the log): recovery_s at 100,000 within
    1.5x of recovery_s at 10,000.

A table of all results is printed at the end of the run. Knobs (environment):
AURORA_BENCH_DURATION_S (10), AURORA_BENCH_WARMUP_S (2), AURORA_BENCH_CLUSTER_WARMUP_S (15),
AURORA_BENCH_CLIENTS ("1,8,64"),
AURORA_BENCH_LATENCY ("zero,default"), AURORA_BENCH_RECOVERY_TXNS ("10000,100000"),
AURORA_BENCH_RECOVERY_ROUNDS (5), AURORA_BENCH_LOAD_BUDGET_S (1200: the load of one volume
must finish within it).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.format.cluster_config import DEFAULT_LAL, Latency  # noqa: E402
from engine.format.volume import DEFAULT_PG_COUNT, DEFAULT_STRIPE_PAGES  # noqa: E402
from tests.harness import FAST_TUNING, StorageCluster  # noqa: E402
from tests.storage_client import StorageClient  # noqa: E402
from tests.writer_harness import WriterProcess  # noqa: E402


def _env_list(name: str, default: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


DURATION_S = float(os.environ.get("AURORA_BENCH_DURATION_S", "10"))
WARMUP_S = float(os.environ.get("AURORA_BENCH_WARMUP_S", "2"))
CLIENTS = [int(x) for x in _env_list("AURORA_BENCH_CLIENTS", "1,8,64")]
LATENCIES = _env_list("AURORA_BENCH_LATENCY", "zero,default")
RECOVERY_TXNS = [int(x) for x in _env_list("AURORA_BENCH_RECOVERY_TXNS", "10000,100000")]
LOAD_BUDGET_S = float(os.environ.get("AURORA_BENCH_LOAD_BUDGET_S", "1200"))
LOAD_CLIENTS = 64                  # clients that load the volume before a recovery
RECOVERY_ROUNDS = int(os.environ.get("AURORA_BENCH_RECOVERY_ROUNDS", "5"))
BURST_S = 1.0                      # commits before each later crash, 64 clients
IDLE_S = 1.0                       # CPU of the idle processes is measured this long first
CLUSTER_WARMUP_S = float(os.environ.get("AURORA_BENCH_CLUSTER_WARMUP_S", "15"))
VALUE_BYTES = 100
BUFFER_POOL_PAGES = 4096           # the CLI default (engine/cli/__init__.py)
RECOVERY_GOAL_RATIO = 1.5          # recovery_s(100k) / recovery_s(10k) should stay below

#: The storage nodes run with their own defaults (storage_node/node.py Tuning), as
#: `aurora-lite up` starts them, not with the harness's short test intervals: an empty
#: AURORA_SN_* variable means "default" (Tuning.from_env).
NODE_ENV = {name: "" for name in FAST_TUNING}
LATENCY_MODELS = {"zero": Latency(0.0, 0.0), "default": Latency()}

RECOVERED_RE = re.compile(
    r"recovered volume (?P<volume>\S+): epoch (?P<epoch>\d+), VDL (?P<vdl>\d+) "
    r"\(VCL (?P<vcl>\d+), since (?P<since>\d+)\), truncated \((?P<t_start>\d+), "
    r"(?P<t_end>\d+)\], repaired (?P<repaired>\d+) records in (?P<seconds>[\d.]+)s")

#: Rows for the summary table, filled by the tests.
THROUGHPUT: list[dict] = []
RECOVERY: list[dict] = []


# --- Reporting ---------------------------------------------------------------------------

class _Summary:
    """Prints the results table at the end of the run (registered once per session)."""

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if THROUGHPUT:
            tr.section("writer: autocommit puts of 100-byte values, real processes")
            tr.write_line(f"{'latency':<9}{'clients':>8}{'tx/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
                          f"{'rec/batch':>11}{'writer':>8}{'nodes':>7}{'loadgen':>9}"
                          f"{'idle nodes':>12}{'loadavg':>9}")
            for r in THROUGHPUT:
                tr.write_line(f"{r['latency']:<9}{r['clients']:>8}{r['tx_per_s']:>9.0f}"
                              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['records_per_batch']:>11.1f}"
                              f"{r['writer_cpu']:>8.2f}{r['nodes_cpu']:>7.2f}{r['loadgen_cpu']:>9.2f}"
                              f"{r['nodes_idle_cpu']:>12.2f}{r['loadavg_1min']:>9.1f}")
            tr.write_line("writer, nodes, loadgen: CPU cores used in the window (all six "
                          "nodes together); idle nodes: the same just before the load; "
                          "loadavg: 1-minute load average of the machine")
        if RECOVERY:
            tr.section("writer: recovery after SIGKILL under load (64 clients), "
                       f"median of {RECOVERY_ROUNDS} crashes")
            tr.write_line(f"{'committed':>10}{'VDL':>9}{'load tx/s':>11}{'recovery s':>12}"
                          f"{'serve s':>9}{'repaired':>10}{'sn1 records':>13}{'sn1 versions':>14}")
            for r in RECOVERY:
                tr.write_line(f"{r['committed']:>10}{r['vdl']:>9}{r['load_tx_per_s']:>11.0f}"
                              f"{r['recovery_s']:>12.3f}{r['serve_s']:>9.2f}{r['repaired']:>10}"
                              f"{r['sn1_records']:>13}{r['sn1_page_versions']:>14}")
            by_n = {r["target"]: r for r in RECOVERY}
            if len(RECOVERY_TXNS) >= 2 and all(n in by_n for n in RECOVERY_TXNS[:2]):
                small, big = by_n[RECOVERY_TXNS[0]], by_n[RECOVERY_TXNS[1]]
                tr.write_line(
                    f"ratio {RECOVERY_TXNS[1]}/{RECOVERY_TXNS[0]}: recovery "
                    f"{big['recovery_s'] / small['recovery_s']:.2f}x, serve "
                    f"{big['serve_s'] / small['serve_s']:.2f}x (goal: recovery <= "
                    f"{RECOVERY_GOAL_RATIO}x)")
        if THROUGHPUT or RECOVERY:
            tr.write_line(f"1-minute load average at the end: {os.getloadavg()[0]:.1f} "
                          f"on {os.cpu_count()} CPUs")


@pytest.fixture(scope="session", autouse=True)
def _summary(request):
    request.config.pluginmanager.register(_Summary(), "bench_writer_summary")


# --- Processes ---------------------------------------------------------------------------

def _start_cluster(base: Path) -> StorageCluster:
    cluster = StorageCluster(base / "nodes", env=NODE_ENV, log_level="WARNING")
    cluster.start()
    return cluster


def _make_writer(cluster: StorageCluster, base: Path, volume: str, latency: str) -> WriterProcess:
    return WriterProcess(cluster, base / f"writer-{volume}", volume=volume,
                         pg_count=DEFAULT_PG_COUNT, stripe_pages=DEFAULT_STRIPE_PAGES,
                         lal=DEFAULT_LAL, buffer_pool_pages=BUFFER_POOL_PAGES,
                         latency=LATENCY_MODELS[latency])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nodes_cpu_s(cluster: StorageCluster) -> float:
    return sum(_cpu_s(n.proc.pid) for n in cluster.nodes.values())


def _driver_stats(writer: WriterProcess) -> dict:
    with writer.client() as db:
        return json.loads(db.status().json)["driver"]["stats"]


def _value(rng: random.Random) -> bytes:
    return rng.randbytes(VALUE_BYTES)


@pytest.fixture(scope="module")
def tput_cluster():
    base = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    cluster = _start_cluster(base)
    writers: dict[str, WriterProcess] = {}
    try:
        _warm_up(cluster, base)
        yield cluster, base, writers
    finally:
        for w in writers.values():
            w.close()
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)


def _warm_up(cluster: StorageCluster, base: Path) -> None:
    """CLUSTER_WARMUP_S of 64 clients on a throwaway volume, so that the first measured
    point does not pay for a fresh cluster (LMDB files growing, first fsyncs): without it
    whichever point ran first at 64 clients was about 25% slower."""
    writer = _make_writer(cluster, base, "warmup", "zero")
    writer.start()
    load = Load(writer.client, 64, b"warm-")
    load.start()
    time.sleep(CLUSTER_WARMUP_S)
    load.join()
    assert not load.errors, f"commits failed during the warm-up: {load.errors[:3]}"
    assert writer.stop() == 0


# --- Load --------------------------------------------------------------------------------

class Load:
    """``clients`` threads doing autocommit puts until ``stop`` is set (or ``target``
    commits were acknowledged, then they keep going until stopped). Each thread notes
    (start, end) of every acknowledged put; any error is kept and fails the benchmark."""

    def __init__(self, address_of, clients: int, prefix: bytes, target: int | None = None) -> None:
        self.address_of = address_of
        self.clients = clients
        self.prefix = prefix
        self.target = target
        self.stop = threading.Event()
        self.reached = threading.Event()
        self.times: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
        self.last_key: dict[int, bytes] = {}
        self.errors: list[BaseException] = []
        self.expect_errors = False   # set before a SIGKILL: errors are then expected
        self._acked = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True)
                         for c in range(clients)]

    def acked(self) -> int:
        with self._lock:
            return self._acked

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout_s: float = 60.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "load threads did not stop"

    def key(self, c: int, j: int) -> bytes:
        return self.prefix + b"c%02d-%09d" % (c, j)

    def _run(self, c: int) -> None:
        rng = random.Random(c)
        times = self.times[c]
        try:
            db = self.address_of()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
            return
        j = 0
        try:
            while not self.stop.is_set():
                key = self.key(c, j)
                value = _value(rng)
                t0 = time.perf_counter()
                db.put(key, value)
                t1 = time.perf_counter()
                times.append((t0, t1))
                self.last_key[c] = key
                j += 1
                with self._lock:
                    self._acked += 1
                    if self.target is not None and self._acked >= self.target:
                        self.reached.set()
        except Exception as exc:  # noqa: BLE001
            if not self.expect_errors:
                self.errors.append(exc)
        finally:
            db.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# --- (a) Commit throughput and latency ---------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("clients", CLIENTS)
@pytest.mark.parametrize("latency", LATENCIES)
def test_commit_throughput(benchmark, tput_cluster, latency, clients):
    cluster, base, writers = tput_cluster
    if latency not in writers:
        writers[latency] = _make_writer(cluster, base, f"tput-{latency}", latency)
        writers[latency].start()
    writer = writers[latency]
    load = Load(writer.client, clients, b"%s-%02d-" % (latency.encode(), clients))
    result = {}

    def run():
        idle0 = (_cpu_s(writer.proc.pid), _nodes_cpu_s(cluster))
        time.sleep(IDLE_S)
        idle1 = (_cpu_s(writer.proc.pid), _nodes_cpu_s(cluster))
        result["idle_cpu"] = [(b - a) / IDLE_S for a, b in zip(idle0, idle1)]
        stats0 = _driver_stats(writer)
        load.start()
        time.sleep(WARMUP_S)
        cpu0 = (_cpu_s(writer.proc.pid), _nodes_cpu_s(cluster), time.process_time())
        window_start = time.perf_counter()
        time.sleep(DURATION_S)
        window_end = time.perf_counter()
        cpu1 = (_cpu_s(writer.proc.pid), _nodes_cpu_s(cluster), time.process_time())
        load.join()
        stats1 = _driver_stats(writer)
        result.update(window_s=window_end - window_start, cpu=[b - a for a, b in zip(cpu0, cpu1)],
                      stats=(stats0, stats1), window=(window_start, window_end))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert not load.errors, f"commits failed: {load.errors[:3]}"
    ws, we = result["window"]
    latencies = sorted(t1 - t0 for per in load.times for t0, t1 in per if ws <= t1 <= we)
    assert latencies, "no commit completed in the measurement window"
    s0, s1 = result["stats"]
    batches = s1["batches"] - s0["batches"]
    records = s1["records"] - s0["records"]
    row = {
        "latency": latency, "clients": clients, "duration_s": round(result["window_s"], 2),
        "commits": len(latencies), "tx_per_s": len(latencies) / result["window_s"],
        "p50_ms": _percentile(latencies, 0.50) * 1000, "p99_ms": _percentile(latencies, 0.99) * 1000,
        "records_per_batch": records / max(1, batches),
        "records_per_tx": records / max(1, sum(len(p) for p in load.times)),
        "lal_stalls": s1["lal_stalls"] - s0["lal_stalls"],
        "writer_cpu": result["cpu"][0] / result["window_s"],
        "nodes_cpu": result["cpu"][1] / result["window_s"],
        "loadgen_cpu": result["cpu"][2] / result["window_s"],
        "writer_idle_cpu": result["idle_cpu"][0], "nodes_idle_cpu": result["idle_cpu"][1],
        "loadavg_1min": os.getloadavg()[0],
    }
    THROUGHPUT.append(row)
    benchmark.extra_info.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    benchmark.extra_info.update({"value_bytes": VALUE_BYTES, "load_generator": "threads, one Client each",
                                 "pg_count": DEFAULT_PG_COUNT, "stripe_pages": DEFAULT_STRIPE_PAGES,
                                 "lal": DEFAULT_LAL, "buffer_pool_pages": BUFFER_POOL_PAGES})
    print(f"\n{latency} latency, {clients:2d} clients: {row['tx_per_s']:7.0f} tx/s  "
          f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
          f"{row['records_per_batch']:.1f} records/batch")
    assert not writer.error_lines(), writer.error_lines()[:5]


# --- (b) Recovery time after N committed transactions ------------------------------------

def _recovery_line(log_path: Path, offset: int) -> dict:
    text = log_path.read_bytes()[offset:].decode(errors="replace")
    matches = list(RECOVERED_RE.finditer(text))
    assert matches, f"no 'recovered volume' line in {log_path} after offset {offset}"
    m = matches[-1]
    out = {k: int(v) for k, v in m.groupdict().items() if k not in ("volume", "seconds")}
    out["seconds"] = float(m["seconds"])
    return out


def _storage_totals(cluster: StorageCluster, volume: str) -> dict:
    """Records and page versions sn1 stores for the volume (every segment of it)."""
    client = StorageClient(cluster.addresses())
    try:
        segs = [s for s in client.status("sn1").segments if s.volume == volume]
    finally:
        client.close()
    return {"sn1_records": sum(s.records for s in segs),
            "sn1_page_versions": sum(s.page_versions for s in segs)}


def _check_acknowledged(writer: WriterProcess, load: Load, seed: int) -> None:
    """Every client's last acknowledged key and a sample of the others are there."""
    done = [(c, j) for c, per in enumerate(load.times) for j in range(len(per))]
    sample = random.Random(seed).sample(done, min(100, len(done)))
    with writer.client() as db:
        for c, key in load.last_key.items():
            assert db.get(key), f"acknowledged commit {key!r} lost"
        for c, j in sample:
            assert db.get(load.key(c, j)), f"acknowledged commit {load.key(c, j)!r} lost"


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


@pytest.mark.timeout(LOAD_BUDGET_S * len(RECOVERY_TXNS) + 300 + 60 * RECOVERY_ROUNDS)
def test_recovery_time(benchmark):
    """One storage cluster, one volume (and writer) per N in RECOVERY_TXNS, loaded in turn;
    then RECOVERY_ROUNDS rounds, each crashing and restarting every volume's writer in turn,
    so that the load of a shared machine falls on every N alike. The pytest-benchmark
    timing is of all restarts together; the per-N numbers are in extra_info["per_volume"]
    and in the summary table."""
    base = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    cluster = _start_cluster(base)
    volumes: dict[int, dict] = {}
    loadavg_start = os.getloadavg()[0]
    try:
        for n_txns in RECOVERY_TXNS:
            writer = _make_writer(cluster, base, f"rec{n_txns}", "zero")
            volumes[n_txns] = {"writer": writer, "committed": 0, "rounds": []}
            writer.start()
            load = Load(writer.client, LOAD_CLIENTS, b"", target=n_txns)
            t0 = time.monotonic()
            load.start()
            reached = load.reached.wait(LOAD_BUDGET_S)
            load.join()
            if not reached:
                pytest.fail(f"load reached only {load.acked()} of {n_txns} commits in "
                            f"{LOAD_BUDGET_S:.0f}s (AURORA_BENCH_LOAD_BUDGET_S)")
            assert not load.errors, f"commits failed during the load: {load.errors[:3]}"
            volumes[n_txns].update(committed=load.acked(), load_s=time.monotonic() - t0,
                                   **_storage_totals(cluster, f"rec{n_txns}"))
        order = [n for _ in range(RECOVERY_ROUNDS) for n in RECOVERY_TXNS]
        state: dict = {"next": 0}

        def crash():
            """SIGKILL the next writer while 64 clients commit (records above VDL in flight)."""
            n_txns = order[state["next"]]
            vol = volumes[n_txns]
            writer = vol["writer"]
            load = Load(writer.client, LOAD_CLIENTS, b"r%d-" % state["next"])
            load.start()
            time.sleep(BURST_S)
            load.expect_errors = True
            writer.kill()
            vol["committed"] += load.acked()
            load.join()
            state.update(n_txns=n_txns, load=load, offset=writer.log_path.stat().st_size)
            return (), {}

        def restart():
            """Timed: start that writer again (recovery) and wait until it serves; then read
            its recovery line and check the acknowledged commits."""
            vol = volumes[state["n_txns"]]
            writer = vol["writer"]
            started = time.monotonic()
            writer.start(timeout_s=120)
            serve_s = time.monotonic() - started
            line = _recovery_line(writer.log_path, state["offset"])
            vol["rounds"].append({"committed": vol["committed"], "recovery_s": line["seconds"],
                                  "serve_s": round(serve_s, 3), "vdl": line["vdl"],
                                  "since": line["since"], "repaired": line["repaired"],
                                  "truncated": f"({line['t_start']}, {line['t_end']}]"})
            _check_acknowledged(writer, state["load"], state["next"])
            state["next"] += 1

        benchmark.pedantic(restart, setup=crash, rounds=len(order), iterations=1)
        per_volume = {}
        for n_txns, vol in volumes.items():
            rounds = vol["rounds"]
            row = {
                "target": n_txns, "committed": rounds[0]["committed"],
                "load_tx_per_s": n_txns / vol["load_s"],
                "recovery_s": _median([r["recovery_s"] for r in rounds]),
                "serve_s": _median([r["serve_s"] for r in rounds]),
                "recovery_s_all": [r["recovery_s"] for r in rounds],
                "serve_s_all": [r["serve_s"] for r in rounds],
                "committed_all": [r["committed"] for r in rounds],
                "vdl": rounds[0]["vdl"], "since": rounds[0]["since"],
                "repaired": rounds[0]["repaired"], "truncated": rounds[0]["truncated"],
                "sn1_records": vol["sn1_records"], "sn1_page_versions": vol["sn1_page_versions"],
            }
            RECOVERY.append(row)
            per_volume[str(n_txns)] = {k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in row.items()}
            print(f"\n{row['committed']} committed: recovery {row['recovery_s']:.3f}s (median of "
                  f"{row['recovery_s_all']}), serving after {row['serve_s']:.2f}s (median of "
                  f"{row['serve_s_all']}); first round VDL {row['vdl']}, since {row['since']}, "
                  f"repaired {row['repaired']}")
        benchmark.extra_info.update({
            "per_volume": per_volume, "rounds": RECOVERY_ROUNDS, "burst_s": BURST_S,
            "load_clients": LOAD_CLIENTS,
            "loadavg_1min": [round(loadavg_start, 1), round(os.getloadavg()[0], 1)]})
        if len(RECOVERY_TXNS) >= 2:
            small, big = (per_volume[str(n)] for n in RECOVERY_TXNS[:2])
            benchmark.extra_info["recovery_ratio"] = round(big["recovery_s"] / small["recovery_s"], 2)
            benchmark.extra_info["serve_ratio"] = round(big["serve_s"] / small["serve_s"], 2)
        for vol in volumes.values():
            errors = vol["writer"].error_lines()
            assert not errors, errors[:5]
    finally:
        for vol in volumes.values():
            vol["writer"].close()
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
