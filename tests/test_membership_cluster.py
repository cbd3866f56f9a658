"""Membership changes on real processes (docs/membership.md): a wiped storage node rebuilt
in place while a workload runs, a second failure during a repair, and a stale membership
epoch refused.

Scenario base: one cluster for the module (`aurora-lite up --detach`, six storage nodes,
writer db1, replica db2) with no backtrack window and a fast GC horizon, so the peers
collect the log below the VDL and a wiped node can only come back through hydration, and
segments declared failed after 2 s. A client thread puts unique keys through the cluster
endpoint the whole time and records which were acknowledged; every one must be readable
with its value at the end (nothing a client was told is committed may be lost).
"""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest

from engine.cluster.launcher import DataDir, read_control
from tests.test_cli_tour import Cli, readme_tour_commands, up

ENV = {"AURORA_BACKTRACK_WINDOW_S": "0", "AURORA_GC_HORIZON_INTERVAL_S": "0.2"}
REPAIR_TIMEOUT_S = 90.0


class Workload:
    """Puts unique keys in a thread; remembers the acknowledged ones."""

    def __init__(self, control_address: str, tag: str) -> None:
        from engine.client import ClusterClient

        self.client = ClusterClient(control_address, timeout_s=30, failover_wait_s=10)
        self.tag = tag
        self.acked: dict[bytes, bytes] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = b"m-%s-%06d" % (self.tag.encode(), i)
            value = b"v%d-" % i + b"x" * 200
            try:
                self.client.put(key, value)
                self.acked[key] = value
            except Exception as exc:   # an unacknowledged put may or may not be there
                self.errors.append(repr(exc))
                time.sleep(0.05)
            i += 1

    def start(self) -> "Workload":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_acked(self, n: int, timeout_s: float = 60) -> None:
        target = len(self.acked) + n
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < target:
            assert time.monotonic() < deadline, f"no progress: {len(self.acked)} acked, {self.errors[-3:]}"
            time.sleep(0.1)

    def check_all_present(self) -> None:
        missing = [k for k, v in self.acked.items() if self.client.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged puts lost or wrong, e.g. {missing[:3]}"
        self.client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("member")
    for key, value in ENV.items():
        monkeypatch_module.setenv(key, value)
    # Every process obeys this fault file (engine/hooks.py); absent = no faults.
    monkeypatch_module.setenv("AURORA_FAULTS_FILE", str(root / "faults.json"))
    cli = Cli(root / "aurora")
    cli.fault_file = str(root / "faults.json")
    pids: list[int] = []
    try:
        up(cli, "--segment-failed-after-s", "2")
        yield cli
        pids = cli.pids()
    finally:
        pids = pids or cli.pids()
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def control_address(cli: Cli) -> str:
    return read_control(DataDir(cli.data_dir))["control"]["address"]


def epochs(state: dict) -> dict[int, int]:
    return {g["pg"]: g["membership_epoch"] for g in state["pgs"]}


def wait_healthy(cli: Cli, nodes: set[str], before: dict[int, int]) -> dict:
    """Until every repair of ``nodes`` is done and every PG is stable with six healthy
    members, each at an epoch above ``before``."""
    deadline = time.monotonic() + REPAIR_TIMEOUT_S
    while True:
        state = cli.status()
        done = {r["node"] for r in state["repairs"] if r["done"]}
        stable = state["pgs"] and all(
            not g["transitional"] and all(m["state"] == "healthy" for m in g["members"])
            and (g["membership_epoch"] > before[g["pg"]] if g["pg"] in before else True)
            for g in state["pgs"])
        if nodes <= done and stable:
            return state
        assert time.monotonic() < deadline, (
            f"not repaired after {REPAIR_TIMEOUT_S:.0f} s: repairs {state['repairs']}, pgs "
            f"{[(g['pg'], g['membership_epoch'], [(m['node'], m['state'], m['scl']) for m in g['members'] if m['state'] != 'healthy']) for g in state['pgs']]}")
        time.sleep(0.5)


def wait_pgs_known(cli: Cli) -> dict:
    deadline = time.monotonic() + 30
    while True:
        state = cli.status()
        if state["pgs"]:
            return state
        assert time.monotonic() < deadline, "the control plane never learned the PGs"
        time.sleep(0.3)


def test_wiped_node_rebuilt_in_place_under_load(cluster):
    """`node wipe sn4` while puts go on: the control plane sees the new incarnation, every
    PG moves to a transitional epoch and back to a stable one (two epochs up), sn4
    hydrates (its peers collected the log, so gossip alone could not rebuild it), status
    shows six healthy segments per PG again, and every acknowledged put is there."""
    cli = cluster
    assert readme_tour_commands("Self-healing") == ["node wipe sn4", "status"], (
        "README's self-healing tour must run what this test runs")
    before = epochs(wait_pgs_known(cli))
    work = Workload(control_address(cli), "wipe").start()
    try:
        work.wait_acked(300)
        time.sleep(1.0)   # GC: the peers collect what is below the VDL
        out = cli("node", "wipe", "sn4").stdout
        assert "deleted" in out and "started" in out, out
        work.wait_acked(100)
        state = wait_healthy(cli, {"sn4"}, before)
        work.wait_acked(50)
    finally:
        work.stop()
    after = epochs(state)
    assert all(after[pg] >= before[pg] + 2 for pg in before), (before, after)
    repair = next(r for r in state["repairs"] if r["node"] == "sn4")
    assert repair["hydrated_bytes"] > 0, f"sn4 was rebuilt without hydration: {repair}"
    text = cli("status").stdout
    assert "repair of sn4 (wiped): done" in text, text
    work.check_all_present()


def write_faults(cli: Cli, state: dict, links: list[dict]) -> None:
    names = {p["address"]: p["name"] for p in state["processes"]}
    tmp = cli.fault_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"names": names, "links": links}, f)
    os.replace(tmp, cli.fault_file)


def test_second_failure_during_a_repair(cluster):
    """sn5 is wiped while cut off from its peers (a fault-file partition: it cannot
    hydrate, so its repair stays open); then sn2 is wiped too: a further transition of
    every PG (epoch + 2) while sn5 is still hydrating, and writes go on. The partition heals: both hydrate, every PG ends stable with six healthy segments at
    epoch + 3, and nothing acknowledged is lost."""
    cli = cluster
    state = wait_pgs_known(cli)
    before = epochs(state)
    peers = [n for n in ("sn1", "sn2", "sn3", "sn4", "sn6")]
    cut = [{"src": a, "dst": b, "kind": "partition"} for n in peers
           for a, b in (("sn5", n), (n, "sn5"))]
    work = Workload(control_address(cli), "second").start()
    try:
        work.wait_acked(200)
        write_faults(cli, cli.status(), cut)
        time.sleep(1.5)   # every process re-reads the fault file
        cli("node", "wipe", "sn5")
        deadline = time.monotonic() + 30
        while True:   # sn5's repair is open: every PG is transitional with sn5 hydrating
            st = cli.status()
            if st["pgs"] and all(g["transitional"] and any(
                    m["node"] == "sn5" and m["state"] == "hydrating" for m in g["members"])
                    for g in st["pgs"] if g["pg"] in before):
                break
            assert time.monotonic() < deadline, st["pgs"]
            time.sleep(0.3)
        cli("node", "wipe", "sn2")
        work.wait_acked(100)   # writes go on with two members rebuilding
        deadline = time.monotonic() + 30
        while True:
            st = cli.status()
            if any(r["node"] == "sn2" for r in st["repairs"]) and all(
                    g["membership_epoch"] == before[g["pg"]] + 2 for g in st["pgs"]
                    if g["pg"] in before):   # (a PG the volume grew into since: no change)
                break   # sn2's repair began: a further transition (sn2 may be done already)
            assert time.monotonic() < deadline, st["pgs"]
            time.sleep(0.3)
        assert all(g["transitional"] and any(m["node"] == "sn5" and m["state"] == "hydrating"
                                             for m in g["members"])
                   for g in st["pgs"] if g["pg"] in before), st["pgs"]
        write_faults(cli, st, [])
        state = wait_healthy(cli, {"sn2", "sn5"}, before)
        work.wait_acked(50)
    finally:
        write_faults(cli, cli.status(), [])
        work.stop()
    after = epochs(state)
    assert all(after[pg] == before[pg] + 3 for pg in before), (before, after)
    work.check_all_present()


def test_stale_membership_epoch_is_refused(cluster):
    """After the repairs above (every PG is past epoch 1), a request that carries a
    membership epoch below the segment's is refused with STALE_MEMBERSHIP (invariant 16)
    and the current epoch in the metadata; 0 (no view) and the current epoch are served.
    (An Append with a stale epoch: tests/test_membership_storage.py.)"""
    from aurora_pb import storage_pb2 as spb
    from aurora_pb import storage_pb2_grpc as spb_grpc

    cli = cluster
    state = wait_pgs_known(cli)
    epoch = epochs(state)[0]
    volume = state["volume"]["name"]
    address = state["by_name"]["sn1"]["address"]
    with grpc.insecure_channel(address) as ch:
        stub = spb_grpc.StorageStub(ch)
        seg = stub.SegmentState(spb.SegmentStateRequest(volume=volume, pg=0))
        current, vepoch = seg.membership_epoch, seg.volume_epoch
        assert current >= 2 and current >= epoch - 1, (current, epoch)
        stub.SegmentState(spb.SegmentStateRequest(volume=volume, pg=0, membership_epoch=current))
        stub.SegmentState(spb.SegmentStateRequest(volume=volume, pg=0, membership_epoch=0))
        stub.FetchRecords(spb.FetchRecordsRequest(volume=volume, pg=0, after_lsn=seg.scl,
                                                  membership_epoch=current))
        for call in (
                lambda: stub.SegmentState(spb.SegmentStateRequest(
                    volume=volume, pg=0, membership_epoch=current - 1)),
                lambda: stub.ReadPage(spb.ReadPageRequest(
                    volume=volume, pg=0, page_id=0, read_point=seg.scl, volume_epoch=vepoch,
                    membership_epoch=current - 1)),
                lambda: stub.FetchRecords(spb.FetchRecordsRequest(
                    volume=volume, pg=0, after_lsn=seg.scl, volume_epoch=vepoch,
                    membership_epoch=current - 1))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            err = info.value
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            meta = dict(err.trailing_metadata() or ())
            assert meta.get("aurora-error") == "STALE_MEMBERSHIP", meta
            assert int(meta["aurora-current-membership-epoch"]) == current
