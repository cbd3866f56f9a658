"""Memory and idle CPU of each process of a running cluster (README "Measured": 15 replicas).

    python bench/idle_instances.py --data-dir DIR [--seconds 30]

Reads control.json for the pids, then for each process: RSS and PSS (/proc/PID/smaps_rollup;
PSS shares the pages common to many Python processes fairly) and the CPU it used over the
window (utime + stime from /proc/PID/stat), with no load on the cluster. Prints a table and
the per-replica averages. Run it on an otherwise idle machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import time

TICKS_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_S


def memory_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    with open(os.path.join(args.data_dir, "control.json")) as f:
        info = json.load(f)
    procs = {name: (p["role"], int(p["pid"])) for name, p in info["processes"].items() if p.get("pid")}
    procs["control-plane"] = ("control", int(info["control"]["pid"]))
    before = {name: cpu_s(pid) for name, (_, pid) in procs.items()}
    started = time.monotonic()
    time.sleep(args.seconds)
    elapsed = time.monotonic() - started
    rows = []
    for name, (role, pid) in sorted(procs.items()):
        rss, pss = memory_kib(pid)
        rows.append((name, role, rss / 1024, pss / 1024, 100.0 * (cpu_s(pid) - before[name]) / elapsed))
    print(f"{'NAME':14} {'ROLE':8} {'RSS MiB':>8} {'PSS MiB':>8} {'CPU %':>6}   (idle, {elapsed:.0f} s)")
    for name, role, rss, pss, cpu in rows:
        print(f"{name:14} {role:8} {rss:8.1f} {pss:8.1f} {cpu:6.2f}")
    for role in ("replica", "writer", "storage"):
        sel = [r for r in rows if r[1] == role]
        if sel:
            n = len(sel)
            print(f"{role}: {n} processes, mean RSS {sum(r[2] for r in sel) / n:.1f} MiB, mean PSS "
                  f"{sum(r[3] for r in sel) / n:.1f} MiB, mean idle CPU {sum(r[4] for r in sel) / n:.2f}% "
                  f"of a core (total {sum(r[4] for r in sel):.2f}%)")


if __name__ == "__main__":
    main()
