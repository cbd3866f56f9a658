"""`aurora-lite bench write-amplification`, `aurora-lite bench load` and `aurora-lite block-server`.

Registered by engine/cli/__init__.py's build_parser (``register(sub)``). Heavy modules (grpc,
lmdb, the engine) are imported only when a command runs.

    aurora-lite bench write-amplification [--rows N] [--clients C] [--duration S]
        [--transactions T] [--buffer-pool-pages P] [--redo-log-mb MB] [--slow-ms MS]
        [--no-slow] [--configs aurora-lite,baseline] [--json] [--chart PATH | --no-chart]
        [--keep-dir]

prints the results table ([P17] Table 1 figures beside ours) on stdout, or the whole
result as JSON with --json; a progress bar goes to stderr (rich's live display on a
terminal, plain lines on a pipe); a PNG chart is written when
matplotlib (the ``plot`` extra: pip install 'aurora-lite[plot]') is installed.
Method and counting rules: docs/benchmarks.md. `bench load` (a load generator against a
running cluster) lives in engine/cli/load.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from engine.cli import load

DEFAULT_CHART = "write-amplification.png"
DEFAULT_SENSITIVITY_CHART = "write-amplification-sensitivity.png"


class ProgressBar:
    """Progress of the benchmark's phases on stderr. On a terminal: rich's live progress
    display, one bar per phase (label, bar, percent, detail, time in the phase), redrawn
    in place. On a pipe or a file (CI logs): one plain line per phase and every 25%,
    since a live display there would print only its final state."""

    WIDTH = 30

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._label = None
        self._last_quarter = -1
        self._started = time.monotonic()
        self._live = None       # rich.progress.Progress on a terminal
        self._tasks: dict[str, int] = {}
        self._handlers: list = []   # (log handler, its stream before the live display)
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn)

            self._live = Progress(
                TextColumn("{task.description:<20}"), BarColumn(bar_width=self.WIDTH),
                TaskProgressColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=Console(file=self.stream), redirect_stdout=False, redirect_stderr=True)
            self._live.start()
            # Log lines (WARNING and up during the bench) print above the bars, not through them.
            self._handlers = [(h, h.setStream(sys.stderr)) for h in logging.getLogger().handlers
                              if type(h) is logging.StreamHandler and h.stream is self.stream]

    def __call__(self, label: str, fraction: float, detail: str) -> None:
        fraction = max(0.0, min(1.0, fraction))
        if self._live is not None:
            task = self._tasks.get(label)
            if task is None:
                task = self._tasks[label] = self._live.add_task(label, total=1.0, detail=detail)
            self._live.update(task, completed=fraction, detail=detail)
            return
        quarter = int(fraction * 4)
        if label == self._label and quarter == self._last_quarter:
            return
        self._label, self._last_quarter = label, quarter
        filled = int(round(fraction * self.WIDTH))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.monotonic() - self._started
        self.stream.write(f"[{bar}] {fraction * 100:3.0f}% {label:<20} {detail}  ({elapsed:4.0f}s)\n")
        self.stream.flush()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers = []


def cmd_block_server(args: argparse.Namespace) -> int:
    from engine.baseline.block_server import main as block_main

    return block_main(args)


def cmd_bench_help(args: argparse.Namespace) -> int:
    args.bench_parser.print_help()
    return 2


def cmd_write_amplification(args: argparse.Namespace) -> int:
    import asyncio

    from engine.baseline import wa_bench

    if args.duration is None and args.transactions is None:
        args.duration = 20.0
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    cfg = wa_bench.BenchConfig(
        rows=args.rows, clients=args.clients, duration_s=args.duration,
        transactions=args.transactions, buffer_pool_pages=args.buffer_pool_pages,
        redo_log_bytes=None if args.redo_log_mb is None else int(args.redo_log_mb * 2**20),
        slow_ms=args.slow_ms, slow_phase=not args.no_slow, configs=configs, seed=args.seed,
        intra_az_ms=args.intra_az_ms, cross_az_ms=args.cross_az_ms,
        base_dir=args.base_dir, keep_dir=args.keep_dir)
    if args.log_level.upper() == "INFO":
        # The engine's INFO lines (recovery, volume creation) would break the progress bar.
        logging.getLogger().setLevel(logging.WARNING)
    if args.sensitivity:
        return _sensitivity(args, cfg)
    bar = None if args.no_progress else ProgressBar()
    try:
        results = asyncio.run(wa_bench.run_bench(cfg, bar))
    except KeyboardInterrupt:
        if bar:
            bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if bar:
            bar.close()
    return _report(args, results, wa_bench.write_chart, wa_bench.render, DEFAULT_CHART)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _sensitivity(args: argparse.Namespace, cfg) -> int:
    """`--sensitivity`: the I/O ratio against redo capacity and data size / pool
    (engine/baseline/wa_sweep.py): a table, and a PNG chart when matplotlib is there."""
    import asyncio

    from engine.baseline import wa_sweep

    bar = None if args.no_progress else ProgressBar()
    try:
        sweep = asyncio.run(wa_sweep.run_sweep(
            cfg, redo_mib=_floats(args.sweep_redo_mb),
            rows=tuple(int(x) for x in _floats(args.sweep_rows)), progress=bar))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if bar:
            bar.close()
    return _report(args, sweep, wa_sweep.write_chart, wa_sweep.render, DEFAULT_SENSITIVITY_CHART)


def _report(args: argparse.Namespace, results: dict, write_chart, render, default_chart: str) -> int:
    """Print a run's results (a table, or JSON with --json) and write its chart unless
    --no-chart; a chart asked for by --chart without matplotlib is said, not an error."""
    from engine.baseline import wa_bench

    chart = None
    if not args.no_chart:
        path = args.chart or default_chart
        if write_chart(results, path):
            chart = results["chart"] = path
        elif args.chart:
            print("no chart: matplotlib is not installed (pip install 'aurora-lite[plot]')",
                  file=sys.stderr)
    if args.json:
        print(wa_bench.dumps(results))
    else:
        print(render(results))
        if chart:
            print(f"\nchart: {chart}")
    return 0


def register(sub) -> None:
    """Add `block-server` and `bench` to the `aurora-lite` subcommands."""
    from engine.cluster.listen import add_listen_args

    p = sub.add_parser("block-server", help="run one block server of the mirrored baseline")
    p.add_argument("--name", dest="node_id", required=True, help="server name, e.g. bs1")
    p.add_argument("--az", required=True, help="availability zone, e.g. az-a")
    add_listen_args(p)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port and reports it")
    p.add_argument("--data-dir", required=True, help="directory for the LMDB environment")
    p.add_argument("--mirror", default=None, help="address host:port of the mirror (same AZ)")
    p.add_argument("--mirror-delay-ms", type=float, default=0.0,
                   help="simulated one-way delay to the mirror (default 0)")
    p.add_argument("--map-size", type=int, default=4 << 30, help="LMDB map size in bytes")
    p.add_argument("--port-file", default=None, help="write the bound port here once serving")
    p.set_defaults(func=cmd_block_server)

    bench = sub.add_parser("bench", help="benchmarks (write-amplification, load)")
    bench.set_defaults(func=cmd_bench_help, bench_parser=bench)
    verbs = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    w = verbs.add_parser(
        "write-amplification",
        help="aurora-lite vs a mirrored page-writing baseline ([P17] Table 1)",
        description="Run a SysBench oltp_write_only-like workload against aurora-lite (six "
                    "storage-node processes, 4/6 quorum) and against mirrored MySQL's storage "
                    "path (four block-server processes), healthy and with one slow node, and "
                    "print I/Os, bytes, throughput and latency per transaction side by side. "
                    "See docs/benchmarks.md.")
    w.add_argument("--rows", type=int, default=1000, help="table rows (default 1000)")
    w.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    w.add_argument("--duration", type=float, default=None,
                   help="seconds per measured phase (default 20 unless --transactions)")
    w.add_argument("--transactions", type=int, default=None,
                   help="committed transactions per measured phase (instead of a duration)")
    w.add_argument("--buffer-pool-pages", type=int, default=256,
                   help="buffer pool of both configurations, 8 KiB pages (default 256)")
    w.add_argument("--redo-log-mb", type=float, default=None,
                   help="the baseline's redo log capacity in MiB (default: MySQL's 96 MiB "
                        "scaled to the phase as [P17]'s 30-minute run: 96 x duration / 1800 s)")
    w.add_argument("--slow-ms", type=float, default=10.0,
                   help="extra one-way delay into the slow node (default 10 ms)")
    w.add_argument("--no-slow", action="store_true", help="skip the slow-node phase")
    w.add_argument("--configs", default="aurora-lite,baseline",
                   help="which configurations to run, in this order, one at a time with the "
                        "other's processes stopped (default aurora-lite,baseline; alternate "
                        "the order across runs)")
    w.add_argument("--intra-az-ms", type=float, default=0.25, help="one-way delay inside an AZ")
    w.add_argument("--cross-az-ms", type=float, default=1.0, help="one-way delay between AZs")
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--json", action="store_true", help="print the full result as JSON")
    w.add_argument("--chart", default=None, help=f"PNG path (default ./{DEFAULT_CHART})")
    w.add_argument("--no-chart", action="store_true", help="write no chart")
    w.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    w.add_argument("--base-dir", default=None, help="where the processes' data and logs go "
                   "(default: a temporary dir, removed afterwards)")
    w.add_argument("--keep-dir", action="store_true", help="keep the temporary dir")
    w.add_argument("--sensitivity", action="store_true",
                   help="instead: the I/O ratio against the baseline's redo log capacity and "
                        "against data size / buffer pool, one healthy phase per point "
                        f"(table, and a chart, default ./{DEFAULT_SENSITIVITY_CHART})")
    w.add_argument("--sweep-redo-mb", default="0.25,0.5,1,4,16,96",
                   help="redo log capacities of --sensitivity, MiB (at --rows)")
    w.add_argument("--sweep-rows", default="1000,5000,10000,20000",
                   help="row counts of --sensitivity (at the scaled or given redo log)")
    w.set_defaults(func=cmd_write_amplification)
    load.register(verbs)   # bench load (engine/cli/load.py)
    g = verbs.add_parser(
        "pgbench", help="pgbench and sysbench: aurora-lite vs PostgreSQL with a synchronous standby",
        description="Run pgbench (TPC-B-like, simple and prepared) and sysbench oltp_write_only "
                    "against a throwaway aurora-lite cluster and, when the PostgreSQL server "
                    "binaries are installed, a local PostgreSQL primary with a synchronous "
                    "standby; print tps, latency and log bytes per transaction side by side. "
                    "See docs/postgres.md.")
    g.add_argument("--scale", type=int, default=1, help="pgbench -s (default 1)")
    g.add_argument("--clients", type=int, default=8, help="pgbench -c / sysbench --threads (default 8)")
    g.add_argument("--duration", type=int, default=30, help="seconds per measured run (default 30)")
    g.add_argument("--table-size", type=int, default=10_000, help="sysbench rows per table (4 tables)")
    g.add_argument("--workloads", default="pgbench,pgbench-prepared,oltp_write_only",
                   help="comma-separated: pgbench, pgbench-prepared, oltp_write_only, oltp_read_write")
    g.add_argument("--pg-port", type=int, default=55432, help="the PostgreSQL primary's port (standby: +1)")
    g.add_argument("--no-postgres", action="store_true", help="aurora-lite only")
    g.add_argument("--json", action="store_true", help="print the full result as JSON")
    g.set_defaults(func=cmd_pgbench)


def cmd_pgbench(args) -> int:
    import json

    from engine.baseline import pg_compare

    missing = [tool for tool in ("pgbench", "psql", "sysbench") if not shutil_which(tool)]
    if missing:
        print(f"aurora-lite: {', '.join(missing)} not installed (apt-get install postgresql-client "
              f"sysbench)", file=sys.stderr)
        return 4
    report = pg_compare.compare(scale=args.scale, clients=args.clients, duration_s=args.duration,
                                sysbench_table_size=args.table_size,
                                workloads=[w.strip() for w in args.workloads.split(",") if w.strip()],
                                pg_port=args.pg_port, with_postgres=not args.no_postgres)
    print(json.dumps(report, indent=2) if args.json else pg_compare.format_report(report))
    return 0


def shutil_which(tool: str) -> str | None:
    import shutil
    return shutil.which(tool)
