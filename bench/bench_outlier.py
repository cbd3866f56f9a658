"""Outlier tolerance: commit latency with one storage node 50 ms slow, aurora-lite vs baseline.

    pytest bench/bench_outlier.py --benchmark-only -s     (not part of the default `pytest`)

Issue 9: "with one storage node 50 ms slow, commit p99 stays close to the healthy p99 (the
quorum does not wait for the slowest two)". Both systems run side by side in ONE run, on
the processes and the engine of the write-amplification benchmark (engine/baseline/wa_bench.py,
docs/benchmarks.md): six real `aurora-lite storage-node` processes behind the real storage
driver (4/6 write quorum), and four real `aurora-lite block-server` processes behind the
mirrored page-writing baseline (engine/baseline/mirrored.py: every write goes bs1 -> bs2, then
bs3 -> bs4, and waits for all four). One engine per system in this process, the same
SysBench-like write-only transactions (engine/baseline/workload.py) on ROWS rows, the same
default AZ latency (0.25 ms one way within an AZ, 1 ms across; the instance is in az-a).

The slow node comes from the latency model itself (engine/cluster_config.Latency
``extra_node_ms``, what `aurora-lite net delay --node sn3 --ms 50` writes to cluster.json):
SLOW_MS of extra ONE-WAY delay on every link into the node, slept before the request and
after the reply, so every round trip to it is 2 x SLOW_MS longer. aurora-lite: sn3 (az-b),
applied by the storage driver (``AuroraConfig.set_latency``). Baseline: bs4 (az-b, the
standby's mirror), applied to bs3's mirror link (``BaselineConfig.set_latency``). The
baseline commits with a redo write then a binlog write, each through the whole chain, so
it should pay about 4 x SLOW_MS per commit; aurora-lite's commit waits for the 4th of six
acks and should not pay it.

Per client count C (AURORA_OUTLIER_CLIENTS, default 1 and 8), a fixed number of committed
transactions T per phase (AURORA_OUTLIER_TXNS, paired with the client counts, default 200
and 800) per system and condition, run one system at a time, never two at once, in
half-phases of T/2 in ABBA order (healthy, slow, slow, healthy; in each, aurora-lite then
the baseline), so that drift during the test (background work after the load, other
processes on a shared machine) falls on both conditions; the two halves' commits are
pooled. Recorded in
extra_info per system: commit p50 / p99 (ms, the engine's commit call to durability) and
tx/s in each condition, and the ratios slow_p99 / healthy_p99, slow_p50 / healthy_p50,
slow_tps / healthy_tps, and the latency the slow node added (slow - healthy, p50 and p99;
with T=200 the p99 is the 2nd-worst commit, so on a shared machine the p50 figures are
the steadier ones); plus, as evidence that the delay was applied, the storage driver's
per-node ack round trip (``ack_ms``) after the slow phase and the baseline's configured
mirror delay. The only assertion on numbers is the claim itself, loosely: the slow node
adds less to aurora-lite's median commit latency than to the baseline's (the p99 ratios
are reported, not asserted: on two cores shared with other test runs a p99 of a few hundred
commits is dominated by CPU stalls).

Knobs: AURORA_OUTLIER_CLIENTS ("1,8"), AURORA_OUTLIER_TXNS ("200,800"),
AURORA_OUTLIER_SLOW_MS (50), AURORA_OUTLIER_NODE (sn3), AURORA_OUTLIER_BLOCK_SERVER (bs4),
AURORA_OUTLIER_ROWS (1000). Three to five minutes at the defaults on two shared cores; most of
it is the baseline's slow phase with one client (3-4 commits/s).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aurora_pb import block_pb2 as bpb  # noqa: E402
from aurora_pb import block_pb2_grpc as bpb_grpc  # noqa: E402
from engine.baseline import procs as bench_procs, wa_bench  # noqa: E402
from engine.baseline.mirrored import REDO_LOG_BYTES_DEFAULT  # noqa: E402
from engine.format.cluster_config import Latency  # noqa: E402


def _env_list(name: str, default: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


CLIENTS = [int(x) for x in _env_list("AURORA_OUTLIER_CLIENTS", "1,8")]
TXNS = [int(x) for x in _env_list("AURORA_OUTLIER_TXNS", "200,800")]
if len(TXNS) < len(CLIENTS):
    TXNS += [TXNS[-1]] * (len(CLIENTS) - len(TXNS))
SLOW_MS = float(os.environ.get("AURORA_OUTLIER_SLOW_MS", "50"))
SLOW_NODE = os.environ.get("AURORA_OUTLIER_NODE", "sn3")
SLOW_BLOCK_SERVER = os.environ.get("AURORA_OUTLIER_BLOCK_SERVER", "bs4")
ROWS = int(os.environ.get("AURORA_OUTLIER_ROWS", "1000"))
WARMUP_TXNS, WARMUP_CLIENTS = 100, 4      # per system, unrecorded, after the load
SYSTEMS = ("aurora-lite", "baseline")
VARIANTS = ("healthy", "slow")

HEALTHY = Latency()
SLOW = Latency(extra_node_ms={SLOW_NODE: SLOW_MS, SLOW_BLOCK_SERVER: SLOW_MS})

#: One row per (clients, system), for the table printed at the end.
RESULTS: list[dict] = []


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        if not RESULTS:
            return
        tr = terminalreporter
        tr.section(f"outlier tolerance: one node +{SLOW_MS:g} ms one way "
                   f"({SLOW_NODE} / {SLOW_BLOCK_SERVER}), real processes")
        tr.write_line(f"{'system':<12}{'clients':>8}{'txns':>6}{'healthy p50':>13}{'p99':>9}"
                      f"{'tx/s':>8}{'slow p50':>10}{'p99':>9}{'tx/s':>8}"
                      f"{'p99 ratio':>11}{'p50 ratio':>11}{'tps ratio':>11}{'p50 +ms':>9}")
        for r in RESULTS:
            h, s = r["healthy"], r["slow"]
            tr.write_line(f"{r['system']:<12}{r['clients']:>8}{r['transactions']:>6}"
                          f"{h['p50_ms']:>13.1f}{h['p99_ms']:>9.1f}{h['tps']:>8.1f}"
                          f"{s['p50_ms']:>10.1f}{s['p99_ms']:>9.1f}{s['tps']:>8.1f}"
                          f"{r['p99_ratio']:>11.2f}{r['p50_ratio']:>11.2f}{r['tps_ratio']:>11.2f}"
                          f"{r['p50_added_ms']:>+9.1f}")
        tr.write_line("latencies in ms (commit call to durable); ratio = slow / healthy; "
                      "p50 +ms = slow p50 - healthy p50")


@pytest.fixture(scope="session", autouse=True)
def _register_summary(request):
    if not request.config.pluginmanager.has_plugin("bench_outlier_summary"):
        request.config.pluginmanager.register(_Summary(), "bench_outlier_summary")


class Systems:
    """Both systems, loaded and warm, on one event loop kept across the tests."""

    def __init__(self, loop, cfg, aurora, baseline) -> None:
        self.loop, self.cfg, self.aurora, self.baseline = loop, cfg, aurora, baseline

    async def set_latency(self, latency: Latency) -> None:
        self.aurora.set_latency(latency)
        await self.baseline.set_latency(latency)


@pytest.fixture(scope="module")
def systems():
    loop = asyncio.new_event_loop()
    base = Path(tempfile.mkdtemp(prefix="aurora-lite-outlier-"))
    # The baseline keeps MySQL's full 96 MiB redo log here: this bench measures what a slow
    # node adds to commit latency, and its short phases would otherwise get the
    # write-amplification bench's log scaled to them (wa_bench.scaled_redo_log_bytes).
    cfg = wa_bench.BenchConfig(rows=ROWS, clients=WARMUP_CLIENTS, duration_s=None,
                               transactions=WARMUP_TXNS, slow_phase=False, slow_ms=0.0,
                               redo_log_bytes=REDO_LOG_BYTES_DEFAULT)
    groups, configs, ok = [], [], False
    try:
        sn = bench_procs.start_storage_nodes(base / "aurora-lite")
        groups.append(sn)
        bs = bench_procs.start_block_servers(base / "baseline", HEALTHY)
        groups.append(bs)
        for config in (wa_bench.AuroraConfig(cfg, sn), wa_bench.BaselineConfig(cfg, bs)):
            configs.append(config)
            loop.run_until_complete(config.setup(None))
        aurora, baseline = configs
        systems = Systems(loop, cfg, aurora, baseline)
        loop.run_until_complete(systems.set_latency(HEALTHY))
        for config in configs:   # after the load: let background work settle into a warm-up
            loop.run_until_complete(config.measure("warmup", None, seed=7))
        yield systems
        ok = True
    finally:
        for config in configs:
            try:
                loop.run_until_complete(config.close())
            except Exception as exc:  # closing must not hide the real failure
                print(f"closing {config.name} failed: {exc!r}")
        for group in groups:
            group.stop_all()
        loop.close()
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"bench_outlier failed; process logs kept in {base}")


async def _mirror_delay_ms(address: str) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await bpb_grpc.BlockStub(channel).Status(bpb.BlockStatusRequest(), timeout=10)
    return reply.mirror_delay_ms


#: Half-phases in ABBA order: whatever drifts during a test (background work after the
#: load or the previous test, other processes on the machine) falls on both conditions.
ORDER = ("healthy", "slow", "slow", "healthy")


async def _phases(systems: Systems, clients: int, transactions: int) -> dict:
    """Per half-phase in ORDER: set the condition, then aurora-lite, then baseline, each
    committing transactions / 2 with ``clients`` clients. Samples of the two halves of a
    condition are pooled: p50 / p99 over all its commits, tx/s = commits / time."""
    from engine.baseline import workload as wa_workload
    from engine.baseline.io_count import percentile

    runs = {(name, v): {"latencies_ms": [], "transactions": 0, "elapsed_s": 0.0, "errors": 0,
                        "aborts": 0, "error_samples": [], "page_reads": 0, "hedged_reads": 0,
                        "gossip_records": 0}
            for name in SYSTEMS for v in VARIANTS}
    evidence: dict = {}
    half = max(1, transactions // 2)
    try:
        for number, variant in enumerate(ORDER):
            await systems.set_latency(SLOW if variant == "slow" else HEALTHY)
            seed = 1000 + 10 * clients + number
            for name, config in zip(SYSTEMS, (systems.aurora, systems.baseline)):
                stats = config.driver.stats if name == "aurora-lite" else config.sink.stats
                stats_before = dict(stats)
                gossip_before = (await wa_bench.storage_node_status(config.group)
                                 if name == "aurora-lite" else {})
                phase = await wa_workload.run_clients(config.db, ROWS, clients,
                                                      transactions=half, seed=seed)
                r = runs[(name, variant)]
                r["latencies_ms"] += [x * 1000 for x in phase.commit_latencies_s]
                r["transactions"] += phase.committed
                r["elapsed_s"] += phase.elapsed_s
                r["errors"] += phase.errors
                r["aborts"] += phase.aborted
                r["error_samples"] += phase.error_samples
                for key in ("page_reads", "hedged_reads"):
                    r[key] += stats.get(key, 0) - stats_before.get(key, 0)
                if gossip_before:
                    after = await wa_bench.storage_node_status(config.group)
                    r["gossip_records"] += sum(after[n]["gossip_records_pulled"]
                                               - gossip_before[n]["gossip_records_pulled"] for n in after)
            if variant == "slow" and not evidence:
                nodes = systems.aurora.driver.status()["nodes"]
                evidence["aurora-lite.link_delay_ms"] = {n: v["link_delay_ms"] for n, v in nodes.items()}
                evidence["aurora-lite.ack_ms"] = {n: v["ack_ms"] for n, v in nodes.items()}
                sender = next((n for n, _, m in bench_procs.BLOCK_SERVERS if m == SLOW_BLOCK_SERVER), None)
                chain = systems.baseline.chain
                evidence["baseline.instance_delay_ms"] = {t.name: t.delay_ms
                                                          for t in (chain.primary, chain.standby)}
                if sender:
                    evidence[f"baseline.mirror_delay_ms.{sender}"] = await _mirror_delay_ms(
                        systems.baseline.group.address(sender))
    finally:
        await systems.set_latency(HEALTHY)
    for r in runs.values():
        lat, n = r.pop("latencies_ms"), r["transactions"]
        r["commit_ms"] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                          "max": max(lat, default=0.0)}
        r["tps"] = n / r["elapsed_s"] if r["elapsed_s"] else 0.0
        r["page_reads_per_txn"] = r.pop("page_reads") / n if n else 0.0
        r["gossip_records_per_txn"] = r.pop("gossip_records") / n if n else 0.0
    return {"runs": runs, "evidence": evidence}


PHASES = list(zip(CLIENTS, TXNS))


@pytest.mark.parametrize("clients,transactions", PHASES, ids=[f"clients{c}-txns{t}" for c, t in PHASES])
def test_outlier(benchmark, systems, clients, transactions):
    out: dict = {}

    def run() -> None:
        out.clear()
        out.update(systems.loop.run_until_complete(_phases(systems, clients, transactions)))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    runs = out["runs"]
    info = benchmark.extra_info
    info.update({"clients": clients, "transactions_per_phase": transactions, "rows": ROWS,
                 "slow_ms_one_way": SLOW_MS, "slow_node": SLOW_NODE,
                 "slow_block_server": SLOW_BLOCK_SERVER,
                 "latency": {"intra_az_ms": HEALTHY.intra_az_ms, "cross_az_ms": HEALTHY.cross_az_ms}})
    ratios = {}
    for name in SYSTEMS:
        row = {"system": name, "clients": clients, "transactions": transactions}
        for variant in VARIANTS:
            r = runs[(name, variant)]
            fig = {"p50_ms": r["commit_ms"]["p50"], "p99_ms": r["commit_ms"]["p99"], "tps": r["tps"],
                   "committed": r["transactions"], "errors": r["errors"], "aborts": r["aborts"],
                   # what else the slow node could cost: storage reads (buffer pool misses,
                   # snapshot reads as of VDL), hedged reads, gap filling by gossip
                   "page_reads_per_txn": r["page_reads_per_txn"],
                   "hedged_reads": r["hedged_reads"],
                   "gossip_records_per_txn": r["gossip_records_per_txn"]}
            row[variant] = fig
            for key, value in fig.items():
                info[f"{name}.{variant}.{key}"] = round(value, 3) if isinstance(value, float) else value
            assert r["transactions"] >= transactions and r["errors"] == 0, (name, variant, r["error_samples"])
        h, s = row["healthy"], row["slow"]
        row["p99_ratio"] = s["p99_ms"] / h["p99_ms"]
        row["p50_ratio"] = s["p50_ms"] / h["p50_ms"]
        row["tps_ratio"] = s["tps"] / h["tps"]
        row["p50_added_ms"] = s["p50_ms"] - h["p50_ms"]      # what the slow node added
        row["p99_added_ms"] = s["p99_ms"] - h["p99_ms"]
        for key in ("p99_ratio", "p50_ratio", "tps_ratio", "p50_added_ms", "p99_added_ms"):
            info[f"{name}.{key}"] = round(row[key], 3)
        ratios[name] = row["p99_ratio"]
        RESULTS.append(row)
    info["evidence"] = out["evidence"]
    print(f"\nclients={clients} txns={transactions}: slow_p99/healthy_p99 aurora-lite "
          f"{ratios['aurora-lite']:.2f}, baseline {ratios['baseline']:.2f}; evidence {out['evidence']}")
    # The claim of issue 9, loosely: the quorum hides the slow node better than the chain.
    # Asserted on the median latency the slow node added, not on p99 ratios: the baseline's
    # sleeps alone add 4 x SLOW_MS to each of its commits, while a p99 of a few hundred
    # samples on two shared cores moves by more than that (docs/benchmarks.md).
    added = {r["system"]: r["p50_added_ms"] for r in RESULTS[-2:]}
    assert added["aurora-lite"] < added["baseline"], added
