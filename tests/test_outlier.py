"""A slow storage node (an outlier): `net delay --node` reaches the latency model and the
writer, and commits go on. Performance (the commit p99 beside the baseline's) is measured
in bench/bench_outlier.py, not asserted here.

Scenario (real processes, through the CLI as a user would): `up --detach --replicas 0`,
`net delay --node sn3 --ms 50`; cluster.json and `status --json` carry
``extra_node_ms``; the writer's storage driver picks it up (its Status JSON shows sn3's
one-way delay as 50 ms on top of the cross-AZ 1 ms, the other nodes unchanged) and sn3's
Append round trip, as the driver waits for it, is at least the two sleeps it now contains;
puts still commit and read back; `net clear` removes the node delay. The pure pieces
(Latency, the transport's AzLatency) are checked on a cluster.json alone.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from engine.format.cluster_config import ClusterConfig, Latency
from engine.cluster.launcher import DataDir
from engine.format.volume import AZS
from tests.test_cli_tour import Cli, commit_lsn

SLOW = "sn3"            # az-b; the writer db1 is in az-a
SLOW_MS = 50.0


def test_latency_model_per_node():
    """extra_node_ms adds to every link into the node (and out of it), on top of the AZ
    model; the writer's AzLatency applies it on the links into that node only."""
    from engine.format.cluster_config import NodeInfo
    from engine.transport.latency import AzLatency

    lat = Latency(0.25, 1.0, {"az-c": 5.0}, {SLOW: SLOW_MS})
    assert lat.one_way_ms("az-a", "az-b") == 1.0                     # no node named: AZs only
    assert lat.one_way_ms("az-a", "az-b", to_node=SLOW) == 51.0
    assert lat.one_way_ms("az-b", "az-b", from_node="sn4", to_node=SLOW) == 50.25
    assert lat.one_way_ms("az-b", "az-c", from_node=SLOW, to_node="sn5") == 56.0
    infos = [NodeInfo(f"sn{i + 1}", AZS[i // 2], f"127.0.0.1:{40001 + i}") for i in range(6)]
    writer = AzLatency("az-a", "db1", model=lat, nodes=infos)
    assert [writer.one_way_ms(n.address) for n in infos] == [0.25, 0.25, 51.0, 1.0, 6.0, 6.0]
    plain = AzLatency("az-a", "db1", nodes=infos)
    assert [plain.one_way_ms(n.address) for n in infos] == [0.25, 0.25, 1.0, 1.0, 1.0, 1.0]
    # It survives cluster.json, and a file without it (older data dirs) has no slow node.
    nodes = [{"name": f"sn{i + 1}", "az": AZS[i // 2], "address": f"127.0.0.1:{40001 + i}"}
             for i in range(6)]
    config = ClusterConfig.from_json({"storage_nodes": nodes, "latency": {"extra_node_ms": {SLOW: 50}}})
    assert ClusterConfig.from_json(config.to_json()).latency.extra_node_ms == {SLOW: 50.0}
    assert ClusterConfig.from_json({"storage_nodes": nodes}).latency.extra_node_ms == {}


def test_gossip_latency_per_node(tmp_path):
    """A storage node's calls to a slow peer (and the slow node's own calls) carry its delay."""
    from engine.transport.latency import AzLatency

    nodes = [{"name": f"sn{i + 1}", "az": AZS[i // 2], "address": f"127.0.0.1:{40001 + i}"}
             for i in range(6)]
    path = str(tmp_path / "cluster.json")
    config = ClusterConfig.from_json({"storage_nodes": nodes})
    config.save(path)
    sn4 = AzLatency("az-b", "sn4", path=path, interval_s=0.0)
    sn3 = AzLatency("az-b", SLOW, path=path, interval_s=0.0)
    assert sn4.one_way_s("127.0.0.1:40003") == pytest.approx(0.00025)
    config.latency.extra_node_ms[SLOW] = SLOW_MS
    config.save(path)
    assert sn4.one_way_s("127.0.0.1:40003") == pytest.approx(0.05025)   # sn4 -> sn3
    assert sn4.one_way_s("127.0.0.1:40001") == pytest.approx(0.001)     # sn4 -> sn1: unchanged
    assert sn3.one_way_s("127.0.0.1:40001") == pytest.approx(0.051)     # sn3's own calls


def _writer_status(address: str) -> dict:
    from aurora_pb import database_pb2, database_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = database_pb2_grpc.DatabaseStub(channel).Status(database_pb2.StatusRequest(), timeout=10)
    return json.loads(reply.json)


def _wait_for(predicate, timeout_s: float, step_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step_s)


@pytest.fixture
def small_cluster(tmp_path):
    cli = Cli(tmp_path / "aurora")
    pids: list[int] = []
    try:
        out = cli("up", "--detach", "--replicas", "0", timeout=90).stdout
        assert "aurora-lite cluster is up" in out, out
        pids = cli.pids()
        yield cli
    finally:
        pids = pids or cli.pids()
        cli("down", check=None)
        cli.kill_leftovers(pids)


def test_slow_node_delay_is_applied_and_commits_go_on(small_cluster):
    cli = small_cluster
    state = cli.status()
    writer = state["by_name"][state["writer"]]
    assert writer["az"] == "az-a" and state["by_name"][SLOW]["az"] == "az-b"
    assert commit_lsn(cli("put", "before", "1"))

    out = cli("net", "delay", "--node", SLOW, "--ms", f"{SLOW_MS:g}").stdout
    assert f"every link into {SLOW} now has 50 ms of extra one-way delay" in out
    assert f"{SLOW} +50 ms" in out                                   # the network line
    dd = DataDir(cli.data_dir)
    assert json.load(open(dd.cluster_json))["latency"]["extra_node_ms"] == {SLOW: SLOW_MS}
    assert cli.status()["latency"]["extra_node_ms"] == {SLOW: SLOW_MS}
    assert ClusterConfig.load(dd.cluster_json).latency.one_way_ms("az-a", "az-b", to_node=SLOW) == 1.0 + SLOW_MS

    # The writer reloads cluster.json (every 0.5 s, before an RPC): commits make it look.
    lsns = []

    def applied() -> dict | None:
        lsns.append(commit_lsn(cli("put", f"k{len(lsns)}", "v")))
        nodes = _writer_status(writer["address"])["driver"]["nodes"]
        return nodes if nodes[SLOW]["link_delay_ms"] == pytest.approx(1.0 + SLOW_MS) else None

    nodes = _wait_for(applied, 20, step_s=0.3)
    assert nodes, _writer_status(writer["address"])["driver"]["nodes"]
    for name, node in nodes.items():
        if name != SLOW:
            assert node["link_delay_ms"] in (0.25, 1.0), (name, node)  # intra or cross AZ only
    # A few more commits, all through the slow node's sleeps; every one succeeds.
    for i in range(5):
        lsns.append(commit_lsn(cli("put", f"slow{i}", f"v{i}")))
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
    assert cli("get", "slow4").stdout.strip() == "v4"
    assert cli("get", "before").stdout.strip() == "1"
    # sn3's acks now include two 50 ms sleeps: its ack round trip (an EWMA) passes 50 ms
    # after a few more acks. A lower bound on the ack path, not a timing of commits.
    def slow_acks() -> bool:
        if _writer_status(writer["address"])["driver"]["nodes"][SLOW]["ack_ms"] >= SLOW_MS:
            return True
        commit_lsn(cli("put", "more", "x"))
        return False

    assert _wait_for(slow_acks, 30, step_s=0.0), _writer_status(writer["address"])["driver"]["nodes"]

    out = cli("net", "clear").stdout
    assert "extra network delays cleared" in out
    assert json.load(open(dd.cluster_json))["latency"]["extra_node_ms"] == {}
    assert commit_lsn(cli("put", "after", "1"))
    # Only storage nodes can be slowed, and one way of naming the target at a time.
    assert "unknown storage node 'db1'" in cli("net", "delay", "--node", "db1", "--ms", "5",
                                               check=2).stderr
    cli("net", "delay", "--node", SLOW, "--az", "az-b", "--ms", "5", check=2)
