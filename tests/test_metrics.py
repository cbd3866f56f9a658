"""Prometheus metrics of every process, and the read-only dashboard (issue 23).

Scenario base: a real cluster started with `aurora-lite up --detach --dashboard-read-only`
(control plane, six storage nodes, writer db1, replica db2; tests/test_cli_tour.py's
fixture). The test scrapes every ``metrics`` URL `status --json` lists (and the control
plane's), parses them with prometheus-client's own parser, and runs `aurora-lite bench
load` between two scrapes. A fast in-process part checks ``Buckets`` against sorted data.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import Buckets
from tests.test_cli_tour import cluster, up  # noqa: F401 (cluster: the fixture)

STORAGE = {
    "aurora_storage_segment_scl": "gauge", "aurora_storage_segment_max_lsn": "gauge",
    "aurora_storage_gc_horizon": "gauge", "aurora_storage_segment_records": "gauge",
    "aurora_storage_append_requests": "counter", "aurora_storage_append_batches": "counter",
    "aurora_storage_append_records": "counter", "aurora_storage_append_bytes": "counter",
    "aurora_storage_gossip_records_pulled": "counter", "aurora_storage_pages_materialised": "counter",
    "aurora_storage_gc_records_deleted": "counter", "aurora_storage_scrub_errors": "counter",
    "aurora_storage_coalesce_backlog_records": "gauge", "aurora_storage_lmdb_commits": "counter",
    "aurora_storage_lmdb_commit_seconds": "histogram", "aurora_storage_lmdb_bytes_written": "counter",
}
INSTANCE = {
    "aurora_instance_info": "gauge", "aurora_instance_is_writer": "gauge", "aurora_vdl": "gauge",
    "aurora_volume_epoch": "gauge", "aurora_commits": "counter", "aurora_commit_aborts": "counter",
    "aurora_commit_latency_seconds": "histogram", "aurora_buffer_pool_hits": "counter",
    "aurora_buffer_pool_misses": "counter", "aurora_buffer_pool_pages": "gauge",
}
WRITER = {**INSTANCE, "aurora_vcl": "gauge", "aurora_pgcl": "gauge",
          "aurora_lsn_allocation_headroom": "gauge", "aurora_waiting_commits": "gauge",
          "aurora_redo_batches": "counter", "aurora_redo_records": "counter",
          "aurora_redo_record_bytes": "counter"}
REPLICA = {**INSTANCE, "aurora_replica_lag_seconds": "gauge", "aurora_replica_lag_lsn": "gauge"}
CONTROL = {"aurora_control_failovers": "counter", "aurora_control_repairs": "counter",
           "aurora_control_process_up": "gauge", "aurora_control_pg_write_quorum": "gauge",
           "aurora_control_pg_read_quorum": "gauge", "aurora_control_writer_vdl": "gauge"}


def scrape(url: str) -> dict:
    """{family name: family} of one /metrics page (the text format, parsed)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    """Sum of the samples called ``sample`` (default: ``name``, ``name_total`` for counters)
    whose labels include ``labels``."""
    fam = families[name]
    wanted = sample or (name + "_total" if fam.type == "counter" else name)
    return sum(s.value for s in fam.samples
               if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()))


def check_families(where: str, families: dict, expected: dict) -> None:
    for name in families:
        assert name.startswith("aurora_"), f"{where}: {name} does not start with aurora_"
    missing = sorted(set(expected) - set(families))
    assert not missing, f"{where}: missing {missing}"
    for name, kind in expected.items():
        assert families[name].type == kind, f"{where}: {name} is a {families[name].type}, not a {kind}"
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def scrape_all(state: dict) -> dict:
    out = {p["name"]: scrape(p["metrics"]) for p in state["processes"]}
    out["control-plane"] = scrape(state["control"]["metrics"])
    return out


def test_every_process_serves_metrics_that_move_under_load(cluster):
    """Scenario: every process of `status --json` has a metrics URL on 127.0.0.1; each
    page parses, every name starts with aurora_, each expected family has its type; a
    2 s write-only load moves the writer's commits, VDL and commit-latency histogram, the
    replica's VDL, and every storage node's appended records, SCL and LMDB commits.
    The read-only dashboard renders every node and the VDL on the server and refuses a
    POST with 403 even with the token."""
    cli = cluster
    up(cli, "--dashboard-read-only")
    cli("bench", "load", "--init", "--rows", "100", timeout=90)
    state = cli.status()
    for p in state["processes"]:
        assert p["metrics"].startswith("http://127.0.0.1:") and p["metrics"].endswith("/metrics"), p
    assert state["control"]["metrics"] == state["dashboard"] + "metrics"

    before = scrape_all(state)
    for name, families in before.items():
        expected = (CONTROL if name == "control-plane" else STORAGE if name.startswith("sn")
                    else WRITER if name == state["writer"] else REPLICA)
        check_families(name, families, expected)
    assert value(before["control-plane"], "aurora_control_process_up") == 8

    cli("bench", "load", "--clients", "2", "--duration", "2", "--no-progress", timeout=90)
    after = scrape_all(cli.status())

    w = state["writer"]
    for metric in ("aurora_commits", "aurora_vdl"):
        assert value(after[w], metric) > value(before[w], metric), metric
    assert value(after[w], "aurora_commit_latency_seconds", "aurora_commit_latency_seconds_count") > \
        value(before[w], "aurora_commit_latency_seconds", "aurora_commit_latency_seconds_count")
    assert value(after["db2"], "aurora_vdl") > value(before["db2"], "aurora_vdl")
    assert value(after["control-plane"], "aurora_control_writer_vdl") > 0
    for sn in (f"sn{i}" for i in range(1, 7)):
        for metric in ("aurora_storage_append_records", "aurora_storage_append_batches",
                       "aurora_storage_lmdb_commits"):
            assert value(after[sn], metric) > value(before[sn], metric), (sn, metric)
        assert value(after[sn], "aurora_storage_segment_scl", pg="0", volume="main") > \
            value(before[sn], "aurora_storage_segment_scl", pg="0", volume="main"), sn

    # The read-only dashboard: server-rendered names and VDL; POSTs refused.
    with urllib.request.urlopen(state["dashboard"], timeout=10) as r:
        html = r.read().decode()
    for p in state["processes"]:
        assert f'id="node-{p["name"]}"' in html
    assert 'id="vdl">' in html and "read-only" in html
    token = open(f"{cli.data_dir}/dashboard.token").read().strip()
    req = urllib.request.Request(state["dashboard"] + "api/action",
                                 json.dumps({"verb": "node-kill", "target": "sn1"}).encode(),
                                 headers={"X-Aurora-Token": token}, method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("a read-only dashboard accepted a POST")
    except urllib.error.HTTPError as exc:
        assert exc.code == 403
    assert cli.status()["by_name"]["sn1"]["state"] == "up"


def test_buckets_match_sorted_samples():
    """Buckets: counts per bound, sum, count and quantiles agree with the sorted samples
    (seeded; the seed is in the assertion message)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    b = Buckets()
    samples = [rng.expovariate(200.0) for _ in range(1000)]
    for s in samples:
        b.observe(s)
    fam = b.family("aurora_x_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    for bound in b.bounds:
        assert buckets[repr(bound)] == sum(1 for s in samples if s <= bound), (seed, bound)
    assert buckets["+Inf"] == len(samples) == b.count, seed
    assert abs(b.sum - sum(samples)) < 1e-9, seed
    ordered = sorted(samples)
    assert b.quantile(0.5) == ordered[500] and b.quantile(0.99) == ordered[990], seed
