"""The `aurora-lite` command: argparse subcommands for every process and verb.

Subcommands are registered in ``build_parser``; the process subcommands (storage-node,
writer, replica, version) are here, every other verb in the module of its group:

- engine/cli/lifecycle.py: up, down, status, logs, control-plane;
- engine/cli/data.py: put, get, delete, scan, shell;
- engine/cli/faults.py: node, az, net;
- engine/cli/replicas.py: failover, replica add|remove, endpoint;
- engine/cli/clones.py: clone, backtrack, --as-of-*, --volume;
- engine/cli/bench.py: bench write-amplification, block-server;
- engine/cli/chaos.py: chaos;
- engine/cli/sim.py: sim;
- engine/cli/lab.py: lab list|make|grade (the coursework labs, labs/);
- engine/cli/common.py: what they share (exit codes, errors, finding the cluster, the
  control plane's client, flags, tables).

Heavy modules are imported only when a command runs, so `aurora-lite version` does not
pay for grpc or lmdb.
"""

from __future__ import annotations

import argparse
import logging
import sys

import engine


def cmd_version(args: argparse.Namespace) -> int:
    from engine import materialiser

    print(f"aurora-lite {engine.__version__}")
    print(f"materialiser: {materialiser.IMPLEMENTATION}")
    return 0


def cmd_storage_node(args: argparse.Namespace) -> int:
    from storage_node.server import main as storage_main

    return storage_main(args)


def cmd_writer(args: argparse.Namespace) -> int:
    from engine.instance.server import main as writer_main

    return writer_main(args)


def cmd_replica_process(args: argparse.Namespace) -> int:
    """`aurora-lite replica --cluster C --writer W ...`: run a replica process. (`replica
    add|remove` on a running cluster are verbs of engine/cli/replicas.py.)"""
    missing = [flag for flag, value in (("--cluster", args.cluster), ("--writer", args.writer)) if not value]
    if missing:
        print(f"aurora-lite replica: {' and '.join(missing)} required to run a replica process "
              f"(or: replica add | replica remove NAME on a running cluster)", file=sys.stderr)
        return 2
    return cmd_writer(args)


METRICS_PORT_HELP = "serve Prometheus metrics at http://HOST:PORT/metrics (default 0: none)"


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import (bench, chaos, clones, data, faults, lab, lifecycle, pgcli,
                            replicas, sim)
    from engine.cluster.listen import add_listen_args

    parser = argparse.ArgumentParser(
        prog="aurora-lite",
        description="A teaching reimplementation of Amazon Aurora's storage layer.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("version", help="print the version and the active materialiser")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("storage-node", help="run one storage node process")
    p.add_argument("--node-id", required=True, help="node name, e.g. sn1")
    p.add_argument("--az", required=True, help="availability zone, e.g. az-a")
    add_listen_args(p)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port and reports it")
    p.add_argument("--data-dir", required=True, help="directory for this node's LMDB environment")
    p.add_argument("--peers", default="", help="comma-separated peer addresses host:port for gossip")
    p.add_argument("--port-file", default=None, help="write the bound port here once serving")
    p.add_argument("--cluster-config", default=None,
                   help="cluster.json: peers' AZs and the simulated latency for gossip (reloaded live)")
    p.add_argument("--metrics-port", type=int, default=0, help=METRICS_PORT_HELP)
    p.set_defaults(func=cmd_storage_node)

    p = sub.add_parser("writer", help="run the writer instance (database service)")
    p.add_argument("--cluster", required=True, help="cluster config JSON (storage nodes, layout)")
    p.add_argument("--instance", default="db1", help="instance name (default db1)")
    p.add_argument("--az", default="az-a", help="the instance's availability zone")
    add_listen_args(p)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port and reports it")
    p.add_argument("--port-file", default=None, help="write the bound port here once serving")
    p.add_argument("--pg-port", type=int, default=0,
                   help="PostgreSQL protocol port (docs/postgres.md); 0 picks a free one, -1: none")
    p.add_argument("--buffer-pool-pages", type=int, default=4096,
                   help="buffer pool capacity in 8 KiB pages (default 4096 = 32 MiB)")
    p.add_argument("--acu", type=float, default=None,
                   help="serverless: start at this capacity (ACUs, 0.5..128 in steps of 0.5; "
                        "sizes the buffer pool and the admission limit, docs/serverless.md); "
                        "default: provisioned, sized by --buffer-pool-pages")
    p.add_argument("--metrics-port", type=int, default=0, help=METRICS_PORT_HELP)
    p.add_argument("--volume", default=None,
                   help="the volume to open (default: the cluster config's); e.g. a clone")
    p.add_argument("--backtrack-window", type=float, default=None, metavar="SECONDS",
                   help="how far back backtrack and as-of reads may go; storage keeps that "
                        "much history (default 3600, at most 259200 = 72 h)")
    p.set_defaults(func=cmd_writer)

    # One subcommand, two uses: with --cluster/--writer it runs a replica process; with
    # add/remove (registered by engine/cli/replicas.py) it changes a running cluster.
    p = sub.add_parser("replica", help="add|remove a replica of a running cluster, or run a replica "
                                       "process (--cluster C --writer W)")
    p.add_argument("--cluster", default=None, help="process: cluster config JSON (storage nodes, layout)")
    p.add_argument("--writer", default=None, help="process: address host:port of the writer to follow")
    p.add_argument("--instance", default="db2", help="instance name (default db2)")
    p.add_argument("--az", default="az-b", help="the instance's availability zone")
    add_listen_args(p)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port and reports it")
    p.add_argument("--port-file", default=None, help="write the bound port here once serving")
    p.add_argument("--pg-port", type=int, default=0,
                   help="PostgreSQL protocol port (docs/postgres.md); 0 picks a free one, -1: none")
    p.add_argument("--buffer-pool-pages", type=int, default=4096,
                   help="buffer pool capacity in 8 KiB pages (default 4096 = 32 MiB)")
    p.add_argument("--acu", type=float, default=None,
                   help="serverless: start at this capacity (ACUs, 0.5..128 in steps of 0.5; "
                        "sizes the buffer pool and the admission limit, docs/serverless.md); "
                        "default: provisioned, sized by --buffer-pool-pages")
    p.add_argument("--metrics-port", type=int, default=0, help=METRICS_PORT_HELP)
    p.set_defaults(func=cmd_replica_process)
    # The cluster verbs (docs/cli.md), in the order `aurora-lite --help` lists them.
    lifecycle.register(sub)  # up, down, control-plane, status
    data.register(sub)  # put, get, delete, scan, shell
    faults.register(sub)  # node, az, net
    replicas.register(sub)  # failover, replica add|remove, endpoint
    clones.register(sub)  # clone, backtrack
    pgcli.register(sub)  # psql
    lifecycle.register_logs(sub)  # logs
    bench.register(sub)  # bench write-amplification, block-server
    chaos.register(sub)  # chaos (docs/reliability.md)
    sim.register(sub)  # sim: the deterministic simulation (docs/reliability.md)
    lab.register(sub)  # lab list|make|grade (docs/labs.md)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Every line of a cluster process names it and its AZ, e.g. "[sn3 az-b]".
    tag = getattr(args, "log_tag", None) or " ".join(
        str(v) for v in (getattr(args, "node_id", None) or getattr(args, "instance", None),
                         getattr(args, "az", None)) if v)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s " + (f"[{tag}] " if tag else "") + "%(name)s: %(message)s")
    if hasattr(args, "insecure_listen"):  # a subcommand that starts a server
        from engine.cluster.listen import check_listen_host

        refusal = check_listen_host(args.host, args.insecure_listen, f"aurora-lite {args.command}")
        if refusal:
            print(f"aurora-lite {args.command}: {refusal}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
