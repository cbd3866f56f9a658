"""The storage fleet on real processes (docs/fleet.md): placement, routing per PG, growth,
the maximum PG count, status, and a restart.

Scenario base: one cluster per fleet size (9 storage nodes for every test, 12 for the
growth and routing test, to keep the suite short), started through the
CLI (`aurora-lite up --storage-nodes N --pg-size-mb 0.5 --stripe-width 2 --max-pgs M`:
PGs of 64 pages, so a few MiB of rows grow the volume across every PG). Clients commit
rows in transactions; every acknowledged row is read back. The nodes themselves are asked
(NodeStatus) which segments they hold: exactly the PGs the placement put on them
(invariant 15), so different PGs live on different node sets. Writing past the maximum
gets a clear "volume full" error and loses nothing. `down` + `up` keeps the placement.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from engine.client import ClusterClient
from engine.errors import TooLargeError
from engine.format.placement import Placement
from engine.format.volume import AZS
from tests.storage_client import StorageClient
from tests.test_cli_tour import Cli, one_error_line

VALUE_BYTES = 1380          # near VALUE_MAX: about three rows a page once leaves split
ROWS_PER_TXN = 20
STRIPE_WIDTH = 2
MAX_PGS = {9: 6, 12: 8}     # 0.5 MiB PGs: a volume of at most 3 / 4 MiB


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory):
    n_nodes = request.param
    cli = Cli(tmp_path_factory.mktemp(f"fleet{n_nodes}") / "aurora")
    pids: list[int] = []
    try:
        out = cli("up", "--detach", "--replicas", "0", "--storage-nodes", str(n_nodes),
                  "--pg-size-mb", "0.5", "--stripe-width", str(STRIPE_WIDTH),
                  "--max-pgs", str(MAX_PGS[n_nodes]), timeout=120).stdout
        assert "cluster endpoint:" in out, out
        pids = cli.pids()
        yield cli, n_nodes, {}   # {key: value} of every acknowledged row, shared by the tests
        pids = cli.pids() or pids
    finally:
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids or cli.pids())


def _client(cli: Cli) -> ClusterClient:
    with open(os.path.join(cli.data_dir, "control.json")) as f:
        return ClusterClient(json.load(f)["control"]["address"])


def _config(cli: Cli) -> dict:
    with open(os.path.join(cli.data_dir, "cluster.json")) as f:
        return json.load(f)


def _write_rows(client: ClusterClient, acked: dict, n_txns: int, tag: str) -> Exception | None:
    """Commit ``n_txns`` transactions of ROWS_PER_TXN rows; record the acknowledged ones.
    Returns the error that stopped it (rows of that transaction are not acknowledged)."""
    for t in range(n_txns):
        rows = {f"{tag}-{t:04d}-{i:02d}".encode(): (f"{tag}{t}.{i}".encode() * 200)[:VALUE_BYTES]
                for i in range(ROWS_PER_TXN)}
        txn = client.begin()
        for k, v in rows.items():
            txn.put(k, v)
        try:
            txn.commit()
        except TooLargeError as exc:
            return exc
        acked.update(rows)
    return None


def _read_back(client: ClusterClient, acked: dict) -> None:
    wrong = [k for k, v in acked.items() if client.get(k) != v]
    assert not wrong, f"{len(wrong)} of {len(acked)} acknowledged rows read back wrong: {wrong[:5]}"


def _node_segments(cli: Cli) -> dict[str, set[int]]:
    """{node: PGs of volume main it holds}, asked of every node (NodeStatus)."""
    config = _config(cli)
    nodes = {n["name"]: n["address"] for n in config["storage_nodes"]}
    client = StorageClient(nodes)
    try:
        return {name: {s.pg for s in client.status(name).segments if s.volume == "main"}
                for name in nodes}
    finally:
        client.close()


@pytest.mark.parametrize("fleet", [9, 12], ids=["fleet9", "fleet12"], indirect=True)
def test_growth_placement_and_routing(fleet):
    """Rows are committed until the volume spans several extents of PGs; every row reads
    back; each node holds exactly the created PGs placed on it, two per AZ per PG, and
    different PGs sit on different node sets (boxcars follow placement)."""
    cli, n_nodes, acked = fleet
    client = _client(cli)
    try:
        error = _write_rows(client, acked, 30, "a")
        assert error is None, f"{n_nodes} nodes: a 1.6 MiB volume was refused: {error}"
        _read_back(client, acked)
    finally:
        client.close()
    state = cli.status()
    pgs = {p["pg"]: p for p in state["pgs"]}
    assert state["volume"]["pg_count"] == len(pgs) > STRIPE_WIDTH, state["volume"]
    assert state["volume"]["bytes"] > 1024 * 1024, state["volume"]
    placement = Placement.from_json(_config(cli)["placement"])
    azs = {n["name"]: n["az"] for n in _config(cli)["storage_nodes"]}
    for pg, p in pgs.items():
        members = [m["node"] for m in p["members"]]
        assert tuple(members) == placement.members("main", pg), (pg, members)
        assert p["membership_epoch"] == 1
        assert sorted(azs[m] for m in members) == sorted(AZS * 2), (pg, members)
        assert all(m["state"] == "healthy" for m in p["members"]), p
    assert len({tuple(p["members"][i]["node"] for i in range(6)) for p in pgs.values()}) > 1, (
        "every PG on the same six nodes: the fleet does not spread them")
    held = _node_segments(cli)
    for node, segments in held.items():
        expected = {pg for pg in pgs if node in placement.members("main", pg)}
        assert segments == expected, (f"{node} holds segments of PGs {sorted(segments)}, the "
                                      f"placement puts {sorted(expected)} there")
    # Every node of the fleet holds something, and the SCL a node reports for a PG is the
    # one status shows (the writer only sent each PG's batches to its members).
    assert all(held.values()), held


@pytest.mark.parametrize("fleet", [9], ids=["fleet9"], indirect=True)
def test_volume_full_is_a_clear_error_and_loses_nothing(fleet):
    """Writing past --max-pgs: the client gets TooLargeError ("volume full"), the CLI one
    error line; every row acknowledged before is still there and reads still work."""
    cli, n_nodes, acked = fleet
    client = _client(cli)
    try:
        error = _write_rows(client, acked, 400, "b")
        assert isinstance(error, TooLargeError), f"{n_nodes} nodes: no volume-full error: {error}"
        assert "volume full" in str(error) and "nothing of this request was written" in str(error)
    finally:
        client.close()
    # The CLI: a put that still fits a page succeeds (and counts); one that needs a new
    # page gets one error line.
    for i in range(12):
        key, value = f"cli-{i:02d}", "c" * 1400
        result = cli("put", key, value, check=None, record=False)
        if result.returncode == 0:
            acked[key.encode()] = value.encode()
            continue
        assert "volume full" in one_error_line(result), result.stderr
        break
    else:
        pytest.fail("12 more rows of 1,400 bytes fit a full volume")
    client = _client(cli)
    try:
        _read_back(client, acked)
    finally:
        client.close()
    state = cli.status()
    assert state["volume"]["pg_count"] == MAX_PGS[n_nodes], state["volume"]


@pytest.mark.parametrize("fleet", [9], ids=["fleet9"], indirect=True)
def test_placement_survives_a_restart(fleet):
    """`down` then `up` (no fleet flags): the same nodes, the same placement in
    cluster.json and in status, and every acknowledged row."""
    cli, n_nodes, acked = fleet
    before = _config(cli)
    pgs_before = [(p["pg"], [m["node"] for m in p["members"]]) for p in cli.status()["pgs"]]
    cli("down", record=False, timeout=60)
    cli("up", "--detach", timeout=120, record=False)
    after = _config(cli)
    assert len(after["storage_nodes"]) == n_nodes
    assert after["placement"] == before["placement"]
    assert [(p["pg"], [m["node"] for m in p["members"]]) for p in cli.status()["pgs"]] == pgs_before
    client = _client(cli)
    try:
        _read_back(client, acked)
    finally:
        client.close()


# --- In process: a node's segments, the growth layout (fast, no cluster) -------------------


def test_a_node_holds_and_serves_only_the_pgs_placed_on_it(tmp_path):
    """CreateVolume with ``pgs`` makes only those segments; an Append or read of another
    PG is refused with UNKNOWN_SEGMENT and stores nothing; asking again adds segments."""
    from engine.format.volume import VolumeLayout
    from storage_node import errors as E
    from storage_node import store as S
    from tests.storage_client import ChainBuilder
    from tests.test_storage_node_store import append

    chain = ChainBuilder("v", VolumeLayout(4, 4))
    st = S.Store(str(tmp_path / "sn"), "sn", map_size=1 << 30)
    try:
        assert st.apply_ops([S.CreateVolumeOp("v", 4, 4, 1, pgs=(0, 2))]) == [True]
        assert sorted(st.segment_keys()) == [("v", 0), ("v", 2)]
        recs = chain.next_records(40, pages=list(range(16)))   # pages of every PG
        mine = [r for r in recs if r.pg in (0, 2)]
        with pytest.raises(E.UnknownSegmentError):
            append(st, chain, recs)                   # PGs 1 and 3 are not here: all refused
        assert st.segment("v", 0).scl == 0 and st.segment("v", 0).n_records == 0
        with pytest.raises(E.UnknownSegmentError):
            st.segment("v", 1)
        acks = append(st, chain, mine)
        assert set(acks) == {r.pg for r in mine}
        assert st.apply_ops([S.CreateVolumeOp("v", 4, 4, 1, pgs=(1,))]) == [True]
        assert st.apply_ops([S.CreateVolumeOp("v", 4, 4, 1, pgs=(1,))]) == [False]
        assert sorted(st.segment_keys()) == [("v", 0), ("v", 1), ("v", 2)]
        [refused] = st.apply_ops([S.CreateVolumeOp("v", 4, 4, 1, pgs=(7,))])
        assert isinstance(refused, E.MalformedError)
    finally:
        st.close()


def test_growth_layout_maps_pages_to_extents_of_pgs():
    """pg_of with growth: the first extent is the old striping; the next extent starts new
    PGs; the limit is max PGs x PG pages; bad combinations are refused; the storage
    volumes row keeps the growth fields (and a clone's fork tails) across a round trip."""
    from engine.format.volume import VolumeLayout
    from storage_node.layout import VolumeInfo

    grow = VolumeLayout(pg_count=8, stripe_pages=4, pg_pages=8, stripe_width=2)
    assert [grow.pg_of(p) for p in range(0, 40, 4)] == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5]
    assert all(grow.pg_of(p) == VolumeLayout(2, 4).pg_of(p) for p in range(16))
    assert grow.page_limit == 64 and grow.pg_of(63) == 7 and grow.grows
    assert VolumeLayout(8, 4).page_limit is None and not VolumeLayout(8, 4).grows
    for bad in (dict(pg_pages=6, stripe_width=2), dict(pg_pages=8, stripe_width=3),
                dict(pg_pages=2, stripe_width=2)):
        with pytest.raises(ValueError):
            VolumeLayout(pg_count=8, stripe_pages=4, **bad)
    for info in (VolumeInfo("v", 3, grow, 1),
                 VolumeInfo("c", 4, grow, 1, parent_id=3, fork_lsn=99,
                            fork_tails=tuple(range(8))),
                 VolumeInfo("old", 5, VolumeLayout(8, 64), 2)):
        assert VolumeInfo.decode(info.name, info.encode()) == info


def test_the_port_plan_of_a_fleet_shares_no_port(tmp_path):
    """--base-port with 24 storage nodes: every process's port, HTTP port and PostgreSQL
    port is distinct; the fleet and growth settings land in cluster.json with every PG
    placed; a fleet does not shrink, and growth flags cannot change an existing volume."""
    from engine.cluster import launcher
    from engine.format.cluster_config import ClusterConfig

    dd = launcher.DataDir(str(tmp_path / "dd"))
    dd.make()
    # Any base whose whole plan is free: a process of another test may still listen on one
    # of the ~150 ports of a fixed base (plan_cluster refuses it: "ports in use").
    first = int(os.environ.get("AURORA_TEST_BASE_PORT", "31000"))
    for base in [first] + random.Random(first).sample(range(20000, 65535 - 200, 200), 20):
        try:
            plan = launcher.plan_cluster(dd, base_port=base, storage_nodes=24, pg_size_mb=0.5,
                                         max_pgs=6, stripe_width=2)
            break
        except ValueError as exc:
            if "ports in use" not in str(exc):
                raise
    else:
        pytest.fail("no --base-port with a free plan among 21 tried")
    ports = ([plan.control_port] + [int(n.address.rsplit(":", 1)[1]) for n in plan.config.storage_nodes]
             + list(plan.instance_ports.values()) + list(plan.metrics_ports.values())
             + list(plan.pg_ports.values()))
    assert len(ports) == len(set(ports)), sorted(ports)
    assert len(plan.config.storage_nodes) == 24
    plan.config.save(dd.cluster_json)
    config = ClusterConfig.load(dd.cluster_json)
    assert (config.pg_count, config.pg_pages, config.stripe_width) == (6, 64, 2)
    assert sorted(config.placement.pgs("main")) == list(range(6))
    with pytest.raises(ValueError, match="does not shrink"):
        launcher.plan_cluster(dd, storage_nodes=9)
    with pytest.raises(ValueError, match="chosen when a cluster is created"):
        launcher.plan_cluster(dd, pg_size_mb=1)
    with pytest.raises(ValueError, match="multiple of 3"):
        launcher.plan_cluster(launcher.DataDir(str(tmp_path / "other")), storage_nodes=10)
