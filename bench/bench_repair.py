"""Time to repair a wiped storage node against the size of its segments (docs/membership.md).

    pytest bench/bench_repair.py --benchmark-only -s     (not part of the default `pytest`)

Issue 18's goal: the mean time to repair one segment (from the node's death to six
healthy segments again) grows at most linearly with the segment's size; report MB/s of
hydration; while a repair runs, commit throughput stays within 20% of before and no write
stalls longer than 1 s.

Per size (AURORA_REPAIR_ROWS, default "2000,16000": 8x apart; VALUE_BYTES 1000 per row),
a fresh cluster (`aurora-lite up --detach`, no backtrack window so the peers collect the
log and the node must hydrate) is loaded with that many rows (transactions of 100 puts),
then a client commits single puts for BEFORE_S seconds (throughput before), sn4 is wiped
(`aurora-lite node wipe sn4`) while it keeps committing, and the run waits until status
reports the repair done and every PG stable. Recorded in extra_info: the repair's seconds
(from the node's death), hydrated bytes and MB/s, the commit rate before and during the
repair, and the longest gap between two acknowledged commits during it. Numbers from a
shared machine are noisy; the sizes run side by side in one session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [int(x) for x in os.environ.get("AURORA_REPAIR_ROWS", "2000,16000").split(",")]
VALUE_BYTES = 1000
BEFORE_S = 5.0
ENV = dict(os.environ, AURORA_BACKTRACK_WINDOW_S="0", AURORA_GC_HORIZON_INTERVAL_S="0.2")
ENV.pop("AURORA_LITE_EXEC", None)
ENV.pop("AURORA_LITE_DATA_DIR", None)


def cli(data_dir: str, *argv, timeout: float = 120) -> str:
    out = subprocess.run([sys.executable, "-m", "engine.cli", *argv, "--data-dir", data_dir],
                         capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"aurora-lite {' '.join(argv)}: {out.stderr}")
    return out.stdout


class Committer:
    def __init__(self, client) -> None:
        self.client = client
        self.acks: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.client.put(b"c-%08d" % i, b"x" * 100)
                self.acks.append(time.monotonic())
            except Exception:
                time.sleep(0.01)
            i += 1

    def rate(self, t0: float, t1: float) -> float:
        return sum(1 for t in self.acks if t0 <= t < t1) / max(t1 - t0, 1e-9)

    def max_gap(self, t0: float, t1: float) -> float:
        ts = [t0] + [t for t in self.acks if t0 <= t < t1] + [t1]
        return max(b - a for a, b in zip(ts, ts[1:]))


def one_size(rows: int) -> dict:
    from engine.client import ClusterClient

    data_dir = tempfile.mkdtemp(prefix="member-bench-")
    try:
        cli(data_dir, "up", "--detach", "--segment-failed-after-s", "2")
        control = json.load(open(os.path.join(data_dir, "control.json")))["control"]["address"]
        client = ClusterClient(control, timeout_s=60)
        value = b"v" * VALUE_BYTES
        for start in range(0, rows, 100):
            with client.transaction() as txn:
                for i in range(start, min(rows, start + 100)):
                    txn.put(b"row-%08d" % i, value)
        committer = Committer(client)
        committer.thread.start()
        t0 = time.monotonic()
        time.sleep(BEFORE_S)
        t_wipe = time.monotonic()
        cli(data_dir, "node", "wipe", "sn4")
        deadline = time.monotonic() + 600
        while True:
            state = json.loads(cli(data_dir, "status", "--json"))
            repair = next((r for r in state["repairs"] if r["node"] == "sn4" and r["done"]), None)
            if repair and all(not g["transitional"] for g in state["pgs"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no repair after 600 s: {state['repairs']}")
            time.sleep(0.5)
        t_done = time.monotonic()
        committer.stop.set()
        committer.thread.join(30)
        client.close()
        return {"rows": rows, "data_mb": rows * VALUE_BYTES / 1e6,
                "repair_s": repair["seconds"], "hydrated_mb": repair["hydrated_bytes"] / 1e6,
                "hydration_mb_s": repair["hydration_mb_s"],
                "commits_per_s_before": round(committer.rate(t0, t_wipe), 1),
                "commits_per_s_during": round(committer.rate(t_wipe, t_done), 1),
                "max_commit_gap_s_during": round(committer.max_gap(t_wipe, t_done), 3)}
    finally:
        try:
            cli(data_dir, "down", timeout=60)
        except Exception:
            pass


def test_repair_time_against_segment_size(benchmark):
    results = []

    def run():
        results.clear()
        for rows in ROWS:
            results.append(one_size(rows))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["sizes"] = results
    for r in results:
        print(json.dumps(r))
    small, large = results[0], results[-1]
    ratio_size = large["hydrated_mb"] / max(small["hydrated_mb"], 1e-9)
    ratio_time = large["repair_s"] / max(small["repair_s"], 1e-9)
    benchmark.extra_info["size_ratio"] = round(ratio_size, 2)
    benchmark.extra_info["time_ratio"] = round(ratio_time, 2)
    print(f"hydrated bytes x{ratio_size:.1f}, repair time x{ratio_time:.1f}")
