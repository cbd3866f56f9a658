"""Fast clones and backtrack: what they cost as the volume and the rewound history grow.

    pytest bench/bench_clone.py --benchmark-only        (not part of the default `pytest`)

Everything is a REAL process on 127.0.0.1: six storage nodes (tests/harness.py) with the
node's own background tuning (as `aurora-lite up` starts them, like bench/bench_writer.py),
and writers (tests/writer_harness.py) with the production layout and LAL of
engine/format/cluster_config.py and a 4096-page buffer pool, backtrack window 3600 s.

Two volumes are loaded first (not timed): ``small`` with CLONE_SMALL_TXNS and ``big`` with
CLONE_BIG_TXNS autocommit transactions, each one put of a VALUE_BYTES random value under a
new key, by LOAD_CLIENTS client threads (about 10 MB and 100 MB of keys and values). The big
load stops at LOAD_BUDGET_S if it has not reached its target; the results then say what it
reached (``data_mb``, ``committed``). Every acknowledged (commit LSN, key) is kept.

test_clone_creation  CLONE_ROUNDS clones of each volume, alternating small and big (so the
    load of a shared machine falls on both alike), each "as of now" through CreateClone on
    the volume's writer. Timed: the RPC as the client sees it (``wall_s``) and the writer's
    own ``seconds``. Storage bytes added by the creation, from every node before and after:
    the clone's own bytes (VolumeBytes owned: log and page versions in its segments), the
    page versions and records its segments hold (0 = no page copied), the parent's owned
    bytes (must not change), and the bytes the six node processes wrote to disk
    (/proc/PID/io write_bytes; includes background work, so it is only an upper bound).
    One clone of each size is then opened by a writer and a sample of keys read back.
    Goal (docs/clones.md): creation time of big within 1.5x of small; zero pages copied.

test_backtrack_time  on ``big``: BACKTRACK_ROUNDS rounds, each rewinding the last N
    transactions for every N in BACKTRACK_TXNS (Backtrack to_lsn = the commit N from the
    end), then moving forward again to the newest commit of the loaded history (a backtrack
    by LSN to a point of the earlier timeline). Timed: the RPC (``wall_s``) and the
    writer's ``seconds``; median per N. After each, the key of the target commit is there
    and the key of the next one is not (or, forward, the newest key is there).
    Goal: rewinding 100,000 within 1.5x of rewinding 1,000. The ratio is given both for the
    medians of all rounds and for round 1 alone (later rounds come after a deep rewind and
    a move forward, so they also show what an accumulated history costs).

A table is printed at the end; ratios are in extra_info. Knobs (environment):
AURORA_BENCH_CLONE_TXNS ("10000,100000": small, big), AURORA_BENCH_BACKTRACK_TXNS
("1000,100000"), AURORA_BENCH_CLONE_LOAD_BUDGET_S (240, for the big load),
AURORA_BENCH_CLONE_ROUNDS (5), AURORA_BENCH_BACKTRACK_ROUNDS (3).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aurora_pb import database_pb2 as pb  # noqa: E402
from aurora_pb import storage_pb2 as spb  # noqa: E402
from engine.format.cluster_config import DEFAULT_LAL, Latency  # noqa: E402
from engine.errors import KeyNotFound  # noqa: E402
from engine.format.volume import DEFAULT_PG_COUNT, DEFAULT_STRIPE_PAGES  # noqa: E402
from tests.harness import FAST_TUNING, StorageCluster  # noqa: E402
from tests.storage_client import StorageClient  # noqa: E402
from tests.writer_harness import WriterProcess  # noqa: E402


def _env_ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


CLONE_SMALL_TXNS, CLONE_BIG_TXNS = _env_ints("AURORA_BENCH_CLONE_TXNS", "10000,100000")
BACKTRACK_TXNS = _env_ints("AURORA_BENCH_BACKTRACK_TXNS", "1000,100000")
LOAD_BUDGET_S = float(os.environ.get("AURORA_BENCH_CLONE_LOAD_BUDGET_S", "240"))
CLONE_ROUNDS = int(os.environ.get("AURORA_BENCH_CLONE_ROUNDS", "5"))
BACKTRACK_ROUNDS = int(os.environ.get("AURORA_BENCH_BACKTRACK_ROUNDS", "3"))
VALUE_BYTES = 1000
LOAD_CLIENTS = 64
BUFFER_POOL_PAGES = 4096
WINDOW_ARGS = ["--backtrack-window", "3600"]
GOAL_RATIO = 1.5

#: The nodes' own default tuning (an empty AURORA_SN_* variable means "default").
NODE_ENV = {name: "" for name in FAST_TUNING}

CLONES: list[dict] = []        # one row per size, for the summary
BACKTRACKS: list[dict] = []    # one row per N (and forward)
NOTES: list[str] = []


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if CLONES:
            tr.section("clone creation (as of now), median of rounds, real processes")
            tr.write_line(f"{'volume':<7}{'committed':>10}{'data MB':>9}{'sn1 MB':>8}{'wall ms':>9}"
                          f"{'writer ms':>11}{'clone owned B':>15}{'pages copied':>14}"
                          f"{'parent +B':>11}{'disk writes KB':>16}")
            for r in CLONES:
                tr.write_line(f"{r['volume']:<7}{r['committed']:>10}{r['data_mb']:>9.1f}"
                              f"{r['sn1_owned_mb']:>8.1f}{r['wall_ms']:>9.1f}{r['writer_ms']:>11.1f}"
                              f"{r['clone_owned_bytes_max']:>15}{r['page_versions_copied_max']:>14}"
                              f"{r['parent_owned_delta_max']:>11}{r['node_write_kb']:>16.0f}")
            if len(CLONES) == 2:
                tr.write_line(f"ratio big/small: wall {CLONES[1]['wall_ms'] / CLONES[0]['wall_ms']:.2f}x, "
                              f"writer {CLONES[1]['writer_ms'] / CLONES[0]['writer_ms']:.2f}x "
                              f"(goal <= {GOAL_RATIO}x, zero pages copied)")
        if BACKTRACKS:
            tr.section("backtrack on the big volume, median of rounds")
            tr.write_line(f"{'txns':>13}{'wall s':>9}{'writer s':>10}{'all wall s':>40}")
            for r in BACKTRACKS:
                tr.write_line(f"{r['label']:>13}{r['wall_s']:>9.3f}{r['writer_s']:>10.3f}"
                              f"{str(r['wall_s_all']):>40}")
            back = [r for r in BACKTRACKS if r["label"].startswith("back")]
            if len(back) >= 2:
                tr.write_line(f"ratio {back[-1]['label']}/{back[0]['label']}: wall "
                              f"{back[-1]['wall_s'] / back[0]['wall_s']:.2f}x, writer "
                              f"{back[-1]['writer_s'] / back[0]['writer_s']:.2f}x (goal <= {GOAL_RATIO}x)")
        for note in NOTES:
            tr.write_line(f"note: {note}")
        if CLONES or BACKTRACKS:
            tr.write_line(f"1-minute load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


@pytest.fixture(scope="session", autouse=True)
def _summary(request):
    request.config.pluginmanager.register(_Summary(), "bench_clone_summary")


# --- Load --------------------------------------------------------------------------------

class Loaded:
    """A volume, its writer and every acknowledged (commit LSN, key) of its load."""

    def __init__(self, name: str, writer: WriterProcess) -> None:
        self.name = name
        self.writer = writer
        self.acked: list[tuple[int, bytes]] = []
        self.load_s = 0.0
        self.reached = False
        self.target = 0

    @property
    def data_bytes(self) -> int:
        return sum(len(k) for _l, k in self.acked) + VALUE_BYTES * len(self.acked)


def load(vol: Loaded, target: int, budget_s: float) -> None:
    """LOAD_CLIENTS threads of autocommit puts until ``target`` are acknowledged or the
    budget is spent; any error fails the benchmark."""
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    vol.target = target

    def run(c: int) -> None:
        rng = random.Random(c)
        try:
            with vol.writer.client() as db:
                j = 0
                while not stop.is_set():
                    key = b"%s-c%02d-%08d" % (vol.name.encode(), c, j)
                    lsn = db.put(key, rng.randbytes(VALUE_BYTES))
                    j += 1
                    with lock:
                        vol.acked.append((lsn, key))
                        if len(vol.acked) >= target:
                            stop.set()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            stop.set()

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    stop.wait(budget_s)
    stop.set()
    for t in threads:
        t.join(60)
    vol.load_s = time.monotonic() - t0
    assert not errors, f"load of {vol.name} failed: {errors[:3]}"
    vol.acked.sort()
    vol.reached = len(vol.acked) >= target
    print(f"\nloaded {vol.name}: {len(vol.acked)} commits ({vol.data_bytes / 1e6:.1f} MB of keys and "
          f"values) in {vol.load_s:.0f}s ({len(vol.acked) / vol.load_s:.0f} tx/s)")
    if not vol.reached:
        NOTES.append(f"{vol.name}: the load reached {len(vol.acked)} of {target} commits "
                     f"({vol.data_bytes / 1e6:.1f} MB) within the {budget_s:.0f}s budget; results "
                     f"are for that size")


def _writer(cluster: StorageCluster, base: Path, volume: str, instance: str = "db1") -> WriterProcess:
    return WriterProcess(cluster, base / f"writer-{volume}", volume=volume, pg_count=DEFAULT_PG_COUNT,
                         stripe_pages=DEFAULT_STRIPE_PAGES, lal=DEFAULT_LAL,
                         buffer_pool_pages=BUFFER_POOL_PAGES, latency=Latency(0.0, 0.0),
                         instance=instance, extra_args=WINDOW_ARGS)


@pytest.fixture(scope="module")
def loaded():
    base = Path(tempfile.mkdtemp(prefix="bench-clone-"))
    cluster = StorageCluster(base / "nodes", env=NODE_ENV, log_level="WARNING")
    writers: list[WriterProcess] = []
    try:
        cluster.start()
        vols = {}
        for name, target, budget in (("small", CLONE_SMALL_TXNS, LOAD_BUDGET_S),
                                     ("big", CLONE_BIG_TXNS, LOAD_BUDGET_S)):
            w = _writer(cluster, base, name)
            writers.append(w)
            w.start()
            vols[name] = Loaded(name, w)
            load(vols[name], target, budget)
        yield cluster, base, vols, writers
        for w in writers:
            errors = w.error_lines()
            assert not errors, (f"{w.instance} of {w.base.name} logged errors: {errors[:5]}\n"
                                f"{_log_excerpt(w)}")
    finally:
        for w in writers:
            w.close()
        cluster.close()
        if os.environ.get("AURORA_BENCH_KEEP"):
            print(f"\nkept {base} (AURORA_BENCH_KEEP)")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _log_excerpt(w: WriterProcess, lines: int = 40) -> str:
    """The lines from the first ERROR of a writer's log on (its traceback)."""
    text = w.log_path.read_text(errors="replace").splitlines() if w.log_path.exists() else []
    first = next((i for i, line in enumerate(text) if " ERROR " in line), None)
    return "" if first is None else "\n".join(text[first:first + lines])


# --- Storage accounting ----------------------------------------------------------------------

def _write_bytes(cluster: StorageCluster) -> int:
    """Bytes the six node processes have written to disk so far (/proc/PID/io)."""
    total = 0
    for node in cluster.nodes.values():
        with open(f"/proc/{node.proc.pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
    return total


def _volume_bytes(sc: StorageClient, cluster: StorageCluster, volume: str) -> dict[str, tuple[int, int]]:
    """{node: (owned, shared)} of a volume on every node (missing: (0, 0))."""
    out = {}
    for name in cluster.nodes:
        try:
            r = sc.stub(name).VolumeBytes(spb.VolumeBytesRequest(volume=volume), timeout=30)
            out[name] = (r.owned_bytes, r.shared_bytes)
        except Exception:  # noqa: BLE001 - the volume is not on that node (yet)
            out[name] = (0, 0)
    return out


def _segments(sc: StorageClient, cluster: StorageCluster, volume: str) -> tuple[int, int]:
    """(page versions, records) the volume's own segments hold, over every node."""
    versions = records = 0
    for name in cluster.nodes:
        for s in sc.status(name).segments:
            if s.volume == volume:
                versions += s.page_versions
                records += s.records
    return versions, records


# --- (a) Clone creation -------------------------------------------------------------------

@pytest.mark.timeout(LOAD_BUDGET_S * 2 + 600)
def test_clone_creation(benchmark, loaded):
    cluster, base, vols, writers = loaded
    sc = StorageClient(cluster.addresses())
    admins = {name: vol.writer.admin() for name, vol in vols.items()}
    order = [name for _ in range(CLONE_ROUNDS) for name in ("small", "big")]
    rounds: dict[str, list[dict]] = {"small": [], "big": []}
    state = {"i": 0}

    def setup():
        name = order[state["i"]]
        state.update(name=name, clone=f"{name}-clone{state['i']}",
                     parent_before=_volume_bytes(sc, cluster, name), writes_before=_write_bytes(cluster))
        return (), {}

    def create():
        stub, _channel = admins[state["name"]]
        t0 = time.perf_counter()
        reply = stub.CreateClone(pb.CreateCloneRequest(name=state["clone"]), timeout=120)
        state.update(wall_s=time.perf_counter() - t0, reply=reply)

    def measure():
        name, clone = state["name"], state["clone"]
        writes = _write_bytes(cluster) - state["writes_before"]
        owned = _volume_bytes(sc, cluster, clone)
        parent_after = _volume_bytes(sc, cluster, name)
        versions, records = _segments(sc, cluster, clone)
        rounds[name].append({
            "clone": clone, "wall_s": state["wall_s"], "writer_s": state["reply"].seconds,
            "fork_lsn": state["reply"].fork_lsn,
            "clone_owned_bytes": sum(o for o, _s in owned.values()),
            "clone_shared_bytes_sn1": owned["sn1"][1],
            "page_versions_copied": versions, "records_copied": records,
            "parent_owned_delta": sum(parent_after[n][0] - state["parent_before"][n][0] for n in cluster.nodes),
            "node_write_bytes": writes})
        state["i"] += 1

    # pedantic has no per-round teardown: each setup measures the previous round first.
    def setup_and_measure_previous():
        if "reply" in state:
            measure()
            del state["reply"]
        return setup()

    benchmark.pedantic(create, setup=setup_and_measure_previous, rounds=len(order), iterations=1)
    measure()
    for _stub, channel in admins.values():
        channel.close()

    # One clone of each size opened by a writer: its keys are the parent's as of the fork.
    for name, vol in vols.items():
        first = rounds[name][0]
        cw = _writer(cluster, base, first["clone"], instance=f"dbc-{name}")
        writers.append(cw)
        cw.start(timeout_s=120)
        sample = random.Random(1).sample([k for lsn, k in vol.acked if lsn <= first["fork_lsn"]], 20)
        with cw.client() as cdb, vol.writer.client() as pdb:
            for key in sample:
                assert cdb.get(key) == pdb.get(key), f"clone {first['clone']}: {key!r} differs"
            cdb.put(b"clone-own", b"1")
            with pytest.raises(KeyNotFound):
                pdb.get(b"clone-own")
        assert cw.stop() == 0
    sc.close()

    for name in ("small", "big"):
        vol, rs = vols[name], rounds[name]
        sn1_owned = _volume_bytes(StorageClient(cluster.addresses()), cluster, name)["sn1"][0]
        row = {
            "volume": name, "committed": len(vol.acked), "data_mb": vol.data_bytes / 1e6,
            "sn1_owned_mb": sn1_owned / 1e6, "load_s": round(vol.load_s, 1),
            "wall_ms": statistics.median(r["wall_s"] for r in rs) * 1000,
            "writer_ms": statistics.median(r["writer_s"] for r in rs) * 1000,
            "wall_ms_all": [round(r["wall_s"] * 1000, 1) for r in rs],
            "writer_ms_all": [round(r["writer_s"] * 1000, 1) for r in rs],
            "clone_owned_bytes_max": max(r["clone_owned_bytes"] for r in rs),
            "clone_shared_bytes_sn1": rs[0]["clone_shared_bytes_sn1"],
            "page_versions_copied_max": max(r["page_versions_copied"] for r in rs),
            "records_copied_max": max(r["records_copied"] for r in rs),
            "parent_owned_delta_max": max(r["parent_owned_delta"] for r in rs),
            "node_write_kb": statistics.median(r["node_write_bytes"] for r in rs) / 1024,
        }
        CLONES.append(row)
        benchmark.extra_info[name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
    small, big = CLONES[-2], CLONES[-1]
    ratio = big["wall_ms"] / small["wall_ms"]
    benchmark.extra_info.update({
        "wall_ratio_big_small": round(ratio, 2),
        "writer_ratio_big_small": round(big["writer_ms"] / small["writer_ms"], 2),
        "size_ratio_big_small": round(big["data_mb"] / small["data_mb"], 1),
        "goal": f"creation time ratio <= {GOAL_RATIO}; zero pages copied",
        "big_reached_target": vols["big"].reached,
        "value_bytes": VALUE_BYTES, "loadavg_1min": round(os.getloadavg()[0], 1)})
    print(f"\nclone creation: small ({small['data_mb']:.1f} MB) {small['wall_ms']:.1f} ms, big "
          f"({big['data_mb']:.1f} MB) {big['wall_ms']:.1f} ms: ratio {ratio:.2f}x; pages copied "
          f"{small['page_versions_copied_max']} / {big['page_versions_copied_max']}; clone owned bytes "
          f"{small['clone_owned_bytes_max']} / {big['clone_owned_bytes_max']}")
    # No page copied: the clone's own segments hold nothing right after creation. (The
    # parent's owned bytes are reported, not asserted: its own background coalescing of
    # the just-loaded data may add page versions meanwhile.)
    for row in (small, big):
        assert row["page_versions_copied_max"] == 0 and row["records_copied_max"] == 0, row
        assert row["clone_owned_bytes_max"] == 0, row


# --- (b) Backtrack time vs transactions rewound ----------------------------------------------

@pytest.mark.timeout(LOAD_BUDGET_S * 2 + 900)
def test_backtrack_time(benchmark, loaded):
    cluster, base, vols, writers = loaded
    vol = vols["big"]
    committed = len(vol.acked)
    counts = [n for n in BACKTRACK_TXNS if n < committed]
    if len(counts) < len(BACKTRACK_TXNS):
        counts.append(committed - 1)
        NOTES.append(f"backtrack: the big volume has {committed} commits, so the largest rewind "
                     f"is {committed - 1} transactions instead of {max(BACKTRACK_TXNS)}")
    counts = sorted(set(counts))
    newest_lsn, newest_key = vol.acked[-1]
    stub, channel = vol.writer.admin()
    plan = [(n, direction) for _ in range(BACKTRACK_ROUNDS) for n in counts
            for direction in ("back", "forward")]
    times: dict[str, list[tuple[float, float]]] = {}
    state = {"i": 0}

    def one():
        n, direction = plan[state["i"]]
        target_lsn = vol.acked[-(n + 1)][0] if direction == "back" else newest_lsn
        t0 = time.perf_counter()
        try:
            reply = stub.Backtrack(pb.BacktrackRequest(to_lsn=target_lsn), timeout=300)
        except grpc.RpcError as exc:
            raise AssertionError(f"backtrack {direction} (rewind {n}) to lsn {target_lsn} failed: "
                                 f"{exc.code()} {exc.details()}\n{_log_excerpt(vol.writer)}") from None
        wall = time.perf_counter() - t0
        assert reply.target_lsn == target_lsn, (reply, target_lsn)
        state.update(check=(n, direction), reply=reply)
        times.setdefault(f"{direction} {n}", []).append((wall, reply.seconds))

    def check_previous():
        if "check" in state:
            n, direction = state.pop("check")
            with vol.writer.client() as db:
                if direction == "back":
                    assert db.get(vol.acked[-(n + 1)][1])
                    with pytest.raises(KeyNotFound):
                        db.get(vol.acked[-n][1])
                else:
                    assert db.get(newest_key)
            state["i"] += 1
        return (), {}

    failure = None
    try:
        benchmark.pedantic(one, setup=check_previous, rounds=len(plan), iterations=1)
        check_previous()
    except AssertionError as exc:   # report what was measured, then fail
        failure = exc
        n, direction = plan[state["i"]]
        NOTES.append(f"backtrack FAILED at step {state['i']} ({direction}, rewind {n}): "
                     f"{str(exc).splitlines()[0]}")
        benchmark.extra_info["failure"] = str(exc)[:2000]
    finally:
        channel.close()
    for label in [f"back {n}" for n in counts] + [f"forward {n}" for n in counts]:
        if label not in times:
            continue
        walls = [w for w, _s in times[label]]
        row = {"label": label, "wall_s": statistics.median(walls),
               "writer_s": statistics.median(s for _w, s in times[label]),
               "wall_s_all": [round(w, 3) for w in walls]}
        BACKTRACKS.append(row)
        benchmark.extra_info[label.replace(" ", "_")] = {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    benchmark.extra_info.update({"rewound": counts, "committed": committed, "rounds": BACKTRACK_ROUNDS,
                                 "goal": f"back ratio <= {GOAL_RATIO}",
                                 "loadavg_1min": round(os.getloadavg()[0], 1)})
    rows = {r["label"]: r for r in BACKTRACKS}
    small, big = rows.get(f"back {counts[0]}"), rows.get(f"back {counts[-1]}")
    if small and big:
        benchmark.extra_info["wall_ratio"] = round(big["wall_s"] / small["wall_s"], 2)
        benchmark.extra_info["writer_ratio"] = round(big["writer_s"] / small["writer_s"], 2)
        # Round 1 alone too: later rounds run after a deep rewind and a move forward, so
        # they also measure what the accumulated history costs (see the per-round lists).
        first = big["wall_s_all"][0] / small["wall_s_all"][0]
        benchmark.extra_info["wall_ratio_round1"] = round(first, 2)
        NOTES.append(f"backtrack round 1 only: rewind {counts[0]} {small['wall_s_all'][0]:.3f}s, "
                     f"rewind {counts[-1]} {big['wall_s_all'][0]:.3f}s: ratio {first:.2f}x")
        print(f"\nbacktrack: rewind {counts[0]} {small['wall_s']:.3f}s, rewind {counts[-1]} "
              f"{big['wall_s']:.3f}s: ratio {big['wall_s'] / small['wall_s']:.2f}x (median of rounds); "
              f"round 1 only {first:.2f}x")
    if failure is not None:
        raise failure
