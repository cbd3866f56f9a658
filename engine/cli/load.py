"""`aurora-lite bench load`: a pgbench-style load generator against the data dir's cluster.

Registered under `aurora-lite bench` by engine/cli/bench.py. The workload, the worker
processes and the counting live in engine/baseline/load.py; this module is the composition
root: it finds the cluster (control.json of the data dir), picks the gRPC transport for
the workers, and prints.

    aurora-lite bench load --init --rows N                      load N rows (180-byte values)
    aurora-lite bench load --clients C --duration S [--workload write-only|read-only|mixed]
        [--workers W] [--warmup S] [--json]

Progress goes to stderr, the result (text, or JSON with --json) to stdout. docs/cli.md
describes the output; exit codes as the other cluster verbs (engine/cli/cluster.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.cli.common import (
    EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, data_dir_arg, data_dir_of, guarded,
    require_cluster)
from engine.cluster.launcher import cluster_pids, pid_belongs

INIT_CLIENT_TIMEOUT_S = 60.0


def grpc_transport():
    """The transport of a load worker process (called in the worker, after spawn)."""
    from engine.transport.grpc_transport import GrpcTransport

    return GrpcTransport("bench-load")


def _client_factory(control_address: str):
    from engine.client import ClusterClient

    transport = grpc_transport()
    return lambda: ClusterClient(control_address, "cluster", timeout_s=INIT_CLIENT_TIMEOUT_S,
                                 transport=transport)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@guarded
def cmd_load(args: argparse.Namespace) -> int:
    from engine import errors
    from engine.baseline import load

    dd = data_dir_of(args)
    info = require_cluster(dd)
    control_address = info["control"]["address"]
    make_client = _client_factory(control_address)
    quiet = args.no_progress

    if args.init:
        if args.rows is None:
            raise CliError("--init needs --rows N", EXIT_USAGE)
        last = [0.0]

        def loaded(done: int, total: int) -> None:
            now = time.monotonic()
            if not quiet and (now - last[0] >= 1.0 or done == total):
                last[0] = now
                _say(f"bench load --init: {done}/{total} rows")

        try:
            seconds = load.init_table(make_client, args.rows, loaded)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        print(f"loaded {args.rows} rows of {load.VALUE_BYTES} bytes into table "
              f"{load.LOAD_TABLE} in {seconds:.1f} s")
        return EXIT_OK

    with make_client() as client:
        try:
            rows = load.table_rows(client)
        except (errors.KeyNotFound, errors.TableNotFound):
            raise CliError(f"no load table in this cluster: run `aurora-lite bench load --init "
                           f"--rows N` first", EXIT_FAILED) from None
    if args.rows is not None:
        rows = max(1, min(rows, args.rows))   # a run may use fewer rows than were loaded
    cfg = load.LoadConfig(clients=args.clients, duration_s=args.duration, workload=args.workload,
                          workers=args.workers, warmup_s=args.warmup, seed=args.seed,
                          endpoint=args.endpoint)
    try:
        cfg.check()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    pids = {name: pid for name, pid in cluster_pids(info).items() if pid_belongs(pid, dd.root)}
    if not quiet:
        _say(f"bench load: {cfg.workload}, {cfg.clients} clients in {cfg.worker_count()} worker "
             f"processes, {rows} rows, {cfg.warmup_s:.0f} s warm-up + {cfg.duration_s:.0f} s")

    def report(elapsed_s: float, committed: int) -> None:
        if not quiet:
            rate = committed / elapsed_s if elapsed_s > 0 else 0.0
            _say(f"bench load: {elapsed_s:5.1f}/{cfg.duration_s:.0f} s  {committed} committed  "
                 f"{rate:.0f} tps")

    writer = (info.get("processes") or {}).get(info.get("writer") or "", {})
    result = load.run_load(cfg, grpc_transport, control_address, pids, rows, report,
                           writer_metrics_url=writer.get("metrics"))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(load.render(result))
    return EXIT_OK if result["committed"] > 0 else EXIT_FAILED


def register(verbs) -> None:
    """Add `load` to the `aurora-lite bench` verbs."""

    p = verbs.add_parser(
        "load", help="load generator (pgbench-like) against the running cluster",
        description="Drive the running cluster of the data dir with C concurrent clients "
                    "(in several worker processes) and print transactions/s, latency "
                    "percentiles, aborts and CPU per committed transaction of every process. "
                    "First load a table with --init --rows N. See docs/cli.md.")
    data_dir_arg(p)
    p.add_argument("--init", action="store_true", help="load the table (with --rows N) and exit")
    p.add_argument("--rows", type=int, default=None,
                   help="rows to load with --init; on a run, use only ids 1..N of the loaded rows")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--workload", default="write-only", choices=["write-only", "read-only", "mixed"],
                   help="write-only (default): update two rows, delete one, insert it again; "
                        "read-only: ten point reads; mixed: two reads then the write-only writes")
    p.add_argument("--workers", type=int, default=0,
                   help="load worker processes (default: one per core, at most --clients)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of load before the measured window (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--endpoint", default="cluster", choices=["cluster", "reader"],
                   help="where the clients connect (default cluster; reader: with --workload "
                        "read-only, reads spread over the replicas)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_load)
