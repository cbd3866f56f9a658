"""`aurora-lite bench load` end to end on a real cluster (issue 16, part 1).

Scenario base: a real cluster (`aurora-lite up --detach`: control plane, six storage nodes,
writer db1, replica db2) on a temporary data dir, driven only through the CLI; the
table it loads is read back with the client library.
"""

from __future__ import annotations

import json

import pytest

from engine.cluster import launcher
from engine.cluster.launcher import DataDir
from tests.test_cli_tour import cluster, up  # noqa: F401 (cluster: the fixture)

CLUSTER_PROCESSES = ["control-plane", "db1", "db2", "sn1", "sn2", "sn3", "sn4", "sn5", "sn6"]
DURATION_S = 3


def test_bench_load_init_and_write_only_run(cluster):
    """Scenario: a run before --init fails with one line naming --init; --init --rows 200
    loads 200 rows of 180 bytes and the row count; a 3 s write-only run with 2 clients
    prints JSON whose counts, latencies and CPU figures agree with each other."""
    cli = cluster
    up(cli)

    before = cli("bench", "load", "--clients", "1", "--duration", "1", check=1)
    assert "bench load --init --rows N" in before.stderr, before.stderr

    out = cli("bench", "load", "--init", "--rows", "200").stdout
    assert out.startswith("loaded 200 rows of 180 bytes"), out
    from engine.baseline import load
    from engine.client import ClusterClient
    info = launcher.read_control(DataDir(cli.data_dir))
    with ClusterClient(info["control"]["address"]) as client:
        assert load.table_rows(client) == 200
        assert len(client.get(load.row_key(200), load.LOAD_TABLE)) == load.VALUE_BYTES
        assert len(client.scan(table=load.LOAD_TABLE)) == 200

    run = cli("bench", "load", "--clients", "2", "--duration", str(DURATION_S), "--json", timeout=90)
    result = json.loads(run.stdout)
    assert "committed" in run.stderr, "no progress on stderr"
    assert result["workload"] == "write-only" and result["clients"] == 2
    assert result["workers"] == 2 and result["rows"] == 200
    assert result["committed"] > 0, result
    assert result["errors"] == 0, result["error_samples"]
    assert result["tps"] * DURATION_S == pytest.approx(result["committed"], rel=0.1)
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert 0 < result["commit_p50_ms"] <= result["commit_p99_ms"] <= result["p99_ms"]
    assert result["aborted"] >= 0 and result["retries"] >= 0
    # The boxcars' fill, from the writer's own counters: every commit is one COMMIT record
    # at least, in one batch, and a batch holds at least one record.
    assert result["commits_per_batch"] is not None, result
    assert 0 < result["commits_per_batch"] <= result["records_per_batch"], result

    per_txn = result["cpu_ms_per_txn"]
    assert sorted(set(per_txn) - {"load-generator", "total", "total_with_load_generator"}) == \
        sorted(CLUSTER_PROCESSES)
    assert per_txn["db1"] > 0 and all(per_txn[f"sn{i}"] > 0 for i in range(1, 7)), per_txn
    cluster_sum = sum(per_txn[name] for name in CLUSTER_PROCESSES)
    assert per_txn["total"] == pytest.approx(cluster_sum)
    assert per_txn["total_with_load_generator"] == pytest.approx(cluster_sum + per_txn["load-generator"])
    # CPU per transaction is CPU seconds over committed transactions.
    assert per_txn["db1"] == pytest.approx(result["cpu_s"]["db1"] * 1000 / result["committed"])
    assert 0 < result["load_generator_cores"] <= result["machine_cores"]
    assert result["load_generator_cores"] == pytest.approx(
        result["cpu_s"]["load-generator"] / result["duration_s"])
