"""Write amplification, aurora-lite vs the mirrored baseline, recorded by pytest-benchmark.

Run:  pytest bench/bench_write_amplification.py --benchmark-only -s
      (--benchmark-json out.json keeps every figure in extra_info)

It runs the same experiment as `aurora-lite bench write-amplification` (engine/baseline/wa_bench.py,
docs/benchmarks.md): both configurations over real storage processes, a healthy phase and
a slow-node phase each. One round: the run itself is the measurement, its wall time is
what pytest-benchmark times; the figures that matter go to ``extra_info``.

Settings come from the environment (defaults as the CLI's, shorter duration):

    AURORA_WA_ROWS=1000  AURORA_WA_CLIENTS=16  AURORA_WA_DURATION=10
    AURORA_WA_POOL_PAGES=256  AURORA_WA_SLOW_MS=10
    AURORA_WA_REDO_MB (unset: the baseline's redo log is scaled to the phase, as the CLI's)
    AURORA_WA_ORDER=aurora-lite,baseline   (one configuration at a time; alternate it)
"""

from __future__ import annotations

import asyncio
import os

from engine.baseline import wa_bench

FIGURES = ("tps", "compute_ios_per_txn", "compute_append_ios_per_txn", "compute_all_ios_per_txn",
           "chain_ios_per_txn",
           "compute_bytes_per_txn", "chain_bytes_per_txn", "busiest_node_ios_per_txn",
           "lmdb_bytes_per_txn", "read_ios_per_txn", "transactions", "aborts", "errors")


def _config() -> wa_bench.BenchConfig:
    env = os.environ.get
    return wa_bench.BenchConfig(
        rows=int(env("AURORA_WA_ROWS", "1000")), clients=int(env("AURORA_WA_CLIENTS", "16")),
        duration_s=float(env("AURORA_WA_DURATION", "10")),
        buffer_pool_pages=int(env("AURORA_WA_POOL_PAGES", "256")),
        slow_ms=float(env("AURORA_WA_SLOW_MS", "10")),
        redo_log_bytes=int(float(env("AURORA_WA_REDO_MB")) * 2**20) if env("AURORA_WA_REDO_MB") else None,
        configs=tuple(env("AURORA_WA_ORDER", "aurora-lite,baseline").split(",")))


def test_write_amplification(benchmark):
    cfg = _config()
    results: dict = {}

    def run() -> None:
        results.clear()
        results.update(asyncio.run(wa_bench.run_bench(cfg)))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info["config"] = results["config"]
    for r in results["runs"]:
        prefix = f"{r['config']}.{r['variant']}."
        for key in FIGURES:
            info[prefix + key] = round(r[key], 4) if isinstance(r[key], float) else r[key]
        info[prefix + "commit_p50_ms"] = round(r["commit_ms"]["p50"], 3)
        info[prefix + "commit_p99_ms"] = round(r["commit_ms"]["p99"], 3)
    for variant, c in results["comparison"].items():
        for key, value in c.items():
            info[f"{variant}.{key}"] = round(value, 3) if isinstance(value, float) else value
    info["paper"] = results["paper"]
    print()
    print(wa_bench.render(results))
    assert all(r["transactions"] > 0 for r in results["runs"])
