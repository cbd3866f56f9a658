"""Throughput: aurora-lite's write path beside its own ceiling, in one run (issue 16, part 2).

Run:  pytest bench/bench_throughput.py --benchmark-only -s
      (--benchmark-json out.json keeps every figure in extra_info)

Two configurations, on the same machine, in one sitting:

- aurora-lite: a fresh cluster (`aurora-lite up --detach`), ROWS rows loaded with
  `aurora-lite bench load --init`, then `aurora-lite bench load --workload write-only`
  (SysBench write-only-like transactions through engine.client; engine/baseline/load.py);
- the ceiling: bench/ceiling.py, a bare six-way quorum append loop with its own storage
  processes (5 records of 120 bytes per transaction, one stream per node, LMDB with sync,
  release at 4 of 6).

Each is measured at 8 and at 64 clients, DURATION seconds each, with the other one
stopped (the cluster is brought down while the ceiling runs; the ceiling's processes exist
only during its own measurement), and the order alternates: aurora-lite then ceiling at 8
clients, ceiling then aurora-lite at 64, so neither always gets the quieter minute.
It prints one table (tps, p50, p99, total CPU ms per committed transaction, and
aurora-lite / ceiling) and stores every figure in benchmark.extra_info. One run takes about
80 seconds with the defaults (two cluster starts, loading the rows, four measurements).

Settings (environment): AURORA_THROUGHPUT_ROWS=10000  AURORA_THROUGHPUT_DURATION=15
AURORA_THROUGHPUT_CLIENTS=8,64

Before and after: AURORA_THROUGHPUT_BEFORE=/path/to/an/older/checkout (with its own
``.venv``, e.g. a `git worktree` of the commit before the write-path work) adds a third
configuration, "before": the same CLI verbs run from that tree's venv, so its cluster AND
its client library are the old code. It joins the alternating order, and the table adds
the after/before ratios (CPU per transaction, tps) measured in the same sitting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ceiling   # bench/ceiling.py (bench/ is on sys.path: pytest's rootdir-relative import)

from engine.cluster import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = int(os.environ.get("AURORA_THROUGHPUT_ROWS", "10000"))
DURATION_S = float(os.environ.get("AURORA_THROUGHPUT_DURATION", "15"))
CLIENTS = tuple(int(c) for c in os.environ.get("AURORA_THROUGHPUT_CLIENTS", "8,64").split(","))
WARMUP_S = 1.0
BEFORE_TREE = os.environ.get("AURORA_THROUGHPUT_BEFORE") or None


def _env() -> dict:
    env = dict(os.environ)
    env.pop(launcher.EXEC_ENV, None)
    env.pop(launcher.DATA_DIR_ENV, None)
    return env


class AuroraCluster:
    """The aurora-lite side, driven through the CLI only, as a user would."""

    def __init__(self, data_dir: str, tree: str = ROOT) -> None:
        self.data_dir = data_dir
        self.tree = tree        # the checkout whose code runs: this one, or BEFORE_TREE
        self.python = (sys.executable if tree == ROOT
                       else os.path.join(tree, ".venv", "bin", "python"))
        self.loaded = False

    def cli(self, *argv: str, timeout_s: float = 180.0) -> str:
        cmd = [self.python, "-m", "engine.cli", *argv, "--data-dir", self.data_dir]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout_s,
                             env=_env(), cwd=self.tree)   # progress (stderr) goes to the terminal
        assert out.returncode == 0, f"`aurora-lite {' '.join(argv)}` exited {out.returncode}"
        return out.stdout

    def up(self) -> None:
        self.cli("up", "--detach")
        if not self.loaded:
            self.cli("bench", "load", "--init", "--rows", str(ROWS))
            self.loaded = True

    def down(self) -> None:
        self.cli("down")

    def measure(self, clients: int) -> dict:
        return json.loads(self.cli(
            "bench", "load", "--workload", "write-only", "--clients", str(clients),
            "--duration", str(DURATION_S), "--warmup", str(WARMUP_S), "--json",
            timeout_s=DURATION_S + 180))


def _configs() -> list[str]:
    return ["before", "aurora-lite", "ceiling"] if BEFORE_TREE else ["aurora-lite", "ceiling"]


def _schedule() -> list[tuple[str, int]]:
    """(configuration, clients) in run order: the order alternates per client count."""
    order = []
    for i, clients in enumerate(CLIENTS):
        configs = _configs() if i % 2 == 0 else list(reversed(_configs()))
        order += [(config, clients) for config in configs]
    return order


def run_side_by_side(base_dir: str, say=print) -> dict:
    """Every measurement of the schedule, each with the other configuration stopped."""
    clusters = {"aurora-lite": AuroraCluster(os.path.join(base_dir, "aurora"))}
    if BEFORE_TREE:
        clusters["before"] = AuroraCluster(os.path.join(base_dir, "before"), BEFORE_TREE)
    results: dict[tuple[str, int], dict] = {}
    running: AuroraCluster | None = None
    try:
        for config, clients in _schedule():
            say(f"--- {config}, {clients} clients ({DURATION_S:.0f} s)")
            wanted = clusters.get(config)
            if running is not None and running is not wanted:
                running.down()      # each configuration runs with the others stopped
                running = None
            if wanted is not None:
                if running is None:
                    wanted.up()
                    running = wanted
                results[(config, clients)] = wanted.measure(clients)
            else:
                results[(config, clients)] = ceiling.run_ceiling(clients, DURATION_S, WARMUP_S,
                                                                 base_dir=base_dir)
    finally:
        if running is not None:
            running.down()
    return {"order": [f"{c}@{n}" for c, n in _schedule()], "rows": ROWS,
            "duration_s": DURATION_S, "runs": results}


def render(results: dict) -> str:
    runs = results["runs"]
    head = (f"{'clients':>7}  {'configuration':<13}{'tps':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'CPU ms/txn':>12}")
    lines = [f"write-only throughput, {results['duration_s']:.0f} s per measurement, "
             f"aurora-lite on {results['rows']} rows; order: {', '.join(results['order'])}",
             head, "-" * len(head)]
    for clients in CLIENTS:
        a, c = runs[("aurora-lite", clients)], runs[("ceiling", clients)]
        for name, r in (("aurora-lite", a), ("ceiling", c)):
            lines.append(f"{clients:>7}  {name:<13}{r['tps']:>9.0f}{r['p50_ms']:>9.1f}"
                         f"{r['p99_ms']:>9.1f}{r['cpu_ms_per_txn']['total']:>12.3f}")
        lines.append(f"{clients:>7}  {'aurora/ceil':<13}{_ratio(a['tps'], c['tps']):>9}"
                     f"{_ratio(a['p50_ms'], c['p50_ms']):>9}{_ratio(a['p99_ms'], c['p99_ms']):>9}"
                     f"{_ratio(a['cpu_ms_per_txn']['total'], c['cpu_ms_per_txn']['total']):>12}")
        if ("before", clients) in runs:
            b = runs[("before", clients)]
            lines.append(f"{clients:>7}  {'before':<13}{b['tps']:>9.0f}{b['p50_ms']:>9.1f}"
                         f"{b['p99_ms']:>9.1f}{b['cpu_ms_per_txn']['total']:>12.3f}")
            lines.append(f"{clients:>7}  {'after/before':<13}{_ratio(a['tps'], b['tps']):>9}"
                         f"{_ratio(a['p50_ms'], b['p50_ms']):>9}{_ratio(a['p99_ms'], b['p99_ms']):>9}"
                         f"{_ratio(a['cpu_ms_per_txn']['total'], b['cpu_ms_per_txn']['total']):>12}")
    cores = ", ".join(f"{runs[('aurora-lite', n)]['load_generator_cores']:.2f} at {n} clients"
                      for n in CLIENTS)
    lines.append(f"aurora-lite's load generator used {cores} cores "
                 f"(of {runs[('aurora-lite', CLIENTS[0])]['machine_cores']})")
    lines.append("CPU ms/txn: every process of the configuration (aurora-lite: writer, replica, "
                 "six storage nodes, control plane; ceiling: writer and six storage), per "
                 "committed transaction; aurora-lite's load generator is not in it")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "-"


def test_throughput_side_by_side(benchmark, tmp_path):
    results: dict = {}

    def run() -> None:
        results.clear()
        results.update(run_side_by_side(str(tmp_path)))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info["order"] = results["order"]
    info["rows"] = ROWS
    info["duration_s"] = DURATION_S
    for (config, clients), r in results["runs"].items():
        prefix = f"{config}.c{clients}."
        for key in ("tps", "p50_ms", "p95_ms", "p99_ms", "committed"):
            info[prefix + key] = round(r[key], 3)
        info[prefix + "cpu_ms_per_txn"] = {k: (round(v, 4) if v is not None else None)
                                           for k, v in r["cpu_ms_per_txn"].items()}
        if config in ("aurora-lite", "before"):
            info[prefix + "aborted"] = r["aborted"]
            info[prefix + "load_generator_cores"] = round(r["load_generator_cores"], 3)
        else:
            info[prefix + "txns_per_fsync"] = round(r["txns_per_fsync"], 2)
    for clients in CLIENTS:
        a, c = results["runs"][("aurora-lite", clients)], results["runs"][("ceiling", clients)]
        info[f"ratio.c{clients}.tps"] = round(a["tps"] / c["tps"], 4) if c["tps"] else None
        info[f"ratio.c{clients}.cpu_ms_per_txn"] = round(
            a["cpu_ms_per_txn"]["total"] / c["cpu_ms_per_txn"]["total"], 2)
        if ("before", clients) in results["runs"]:
            b = results["runs"][("before", clients)]
            info[f"after_over_before.c{clients}.cpu_ms_per_txn"] = round(
                a["cpu_ms_per_txn"]["total"] / b["cpu_ms_per_txn"]["total"], 4)
            info[f"after_over_before.c{clients}.tps"] = round(a["tps"] / b["tps"], 3) if b["tps"] else None
    print()
    print(render(results))
    assert all(r["committed"] > 0 for r in results["runs"].values())
