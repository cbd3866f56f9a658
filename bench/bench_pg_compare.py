"""pgbench and sysbench, aurora-lite vs PostgreSQL with a synchronous standby, recorded by
pytest-benchmark.

Run:  pytest bench/bench_pg_compare.py --benchmark-only -s
      (--benchmark-json out.json keeps every figure in extra_info)

The same run as `aurora-lite bench pgbench` (engine/baseline/pg_compare.py,
docs/postgres.md): a throwaway aurora-lite cluster, then (when the PostgreSQL server
binaries are installed) a local primary with a synchronous standby, the same clients and
workloads against both. One round: the run is the measurement; tps, latency and log bytes
per transaction of each go to ``extra_info``. Needs pgbench, psql and sysbench.

    AURORA_PG_CLIENTS=8  AURORA_PG_DURATION=30  AURORA_PG_SCALE=1  AURORA_PG_TABLE_SIZE=10000
    AURORA_PG_WORKLOADS=pgbench,pgbench-prepared,oltp_write_only
"""

from __future__ import annotations

import os
import shutil

import pytest

from engine.baseline import pg_compare

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("pgbench", "psql", "sysbench")),
    reason="needs pgbench, psql (postgresql-client) and sysbench")


def test_pg_compare(benchmark):
    env = os.environ.get
    kw = dict(scale=int(env("AURORA_PG_SCALE", "1")), clients=int(env("AURORA_PG_CLIENTS", "8")),
              duration_s=int(env("AURORA_PG_DURATION", "30")),
              sysbench_table_size=int(env("AURORA_PG_TABLE_SIZE", "10000")),
              workloads=env("AURORA_PG_WORKLOADS", "pgbench,pgbench-prepared,oltp_write_only").split(","))
    report = benchmark.pedantic(lambda: pg_compare.compare(**kw), rounds=1, iterations=1)
    print("\n" + pg_compare.format_report(report))
    for system in ("aurora-lite", "postgresql"):
        for workload, figures in (report.get(system) or {}).items():
            for name, value in figures.items():
                benchmark.extra_info[f"{system}.{workload}.{name}"] = value
    benchmark.extra_info.update({f"ratio_tps.{w}": v for w, v in (report.get("ratio_tps") or {}).items()})
    assert all(r["transactions"] > 0 for r in report["aurora-lite"].values())
