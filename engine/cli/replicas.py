"""The replica verbs of `aurora-lite`: planned failover, adding and removing replicas, and
custom endpoints.

    aurora-lite failover [--target NAME]                  promote a replica now
    aurora-lite replica add [--tier N] [--az AZ]          a new replica of the writer
                [--serverless --min-acu A --max-acu B]    (serverless, docs/serverless.md)
    aurora-lite replica remove NAME                       stop a replica and forget it
    aurora-lite replica autoscale --min 1 --max 15 --target-cpu 70
                [--scale-out-cooldown S] [--scale-in-cooldown S] | --off
    aurora-lite capacity NAME --min-acu A --max-acu B     a serverless instance's range
    aurora-lite capacity --chart FILE.png                 the capacity timeline as a PNG
    aurora-lite endpoint create NAME --members a,b | list [--json] | delete NAME

Each is one call of the control plane (engine/cluster/failover.py, supervision.py,
endpoints.py, serverless.py). `replica` is also the subcommand that runs a replica process
(engine/cli/__init__.py); add and remove hang below it. Registered by
engine/cli/__init__.py (``register``); docs/cli.md is the user's view.
"""

from __future__ import annotations

import json

from engine.cli.common import (
    EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, control_call, data_dir_arg, data_dir_of, guarded, require_cluster,
    shown_data_dir_flag, table)
from engine.cluster.launcher import MAX_REPLICAS, TIER_MAX

FAILOVER_RPC_TIMEOUT_S = 120.0


@guarded
def cmd_failover(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    reply = control_call(info, "Failover", pb.FailoverRequest(target=args.target or ""),
                         timeout_s=FAILOVER_RPC_TIMEOUT_S)
    print(reply.message)
    return EXIT_OK


@guarded
def cmd_replica(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    if args.action == "autoscale":
        return _autoscale(info, args)
    if args.action == "add":
        request = pb.AddReplicaRequest(az=args.az or "", wait_s=args.wait)
        if args.tier is not None:
            request.tier = args.tier
        if args.serverless:
            request.serverless = True
            request.min_acu, request.max_acu = args.min_acu, args.max_acu
        reply = control_call(info, "AddReplica", request, timeout_s=args.wait + 30)
        print(reply.message)
        return EXIT_OK if all(p.state == "up" for p in reply.processes) else EXIT_FAILED
    reply = control_call(info, "RemoveReplica", pb.RemoveReplicaRequest(name=args.name),
                         timeout_s=60)
    print(reply.message)
    return EXIT_OK


def _autoscale(info, args) -> int:
    from aurora_pb import control_pb2 as pb

    if args.off:
        request = pb.ReplicaAutoscaleRequest(off=True)
    else:
        request = pb.ReplicaAutoscaleRequest(
            min_replicas=args.min, max_replicas=args.max, target_cpu_pct=args.target_cpu,
            scale_out_cooldown_s=args.scale_out_cooldown, scale_in_cooldown_s=args.scale_in_cooldown)
    print(control_call(info, "ReplicaAutoscale", request).message)
    return EXIT_OK


def write_capacity_chart(csv_path: str, png_path: str) -> int:
    """The capacity timeline (DATA_DIR/capacity.csv, engine/cluster/serverless.py) as a PNG:
    each instance's ACU over time, as steps. Returns the number of rows drawn; raises
    CliError when there is no timeline or matplotlib (the ``plot`` extra) is missing."""
    import csv

    try:
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise CliError(f"no capacity timeline at {csv_path}: no serverless capacity change "
                       f"happened in this data dir yet") from None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("drawing the chart needs matplotlib: pip install 'aurora-lite[plot]'") from None
    t0 = min(float(r["unix_time"]) for r in rows) if rows else 0.0
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in sorted({r["instance"] for r in rows}):
        pts = [(float(r["unix_time"]) - t0, float(r["acu"])) for r in rows if r["instance"] == name]
        ax.step([t for t, _ in pts], [a for _, a in pts], where="post", marker="o", label=name)
    ax.set_xlabel("seconds since the first change")
    ax.set_ylabel("capacity (ACU)")
    ax.set_title("serverless capacity timeline (capacity.csv)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return len(rows)


@guarded
def cmd_capacity(args) -> int:
    from aurora_pb import control_pb2 as pb

    dd = data_dir_of(args)
    if args.chart:
        import os
        n = write_capacity_chart(os.path.join(dd.root, "capacity.csv"), args.chart)
        print(f"capacity timeline: {n} changes drawn to {args.chart}")
        return EXIT_OK
    if not args.name or args.min_acu is None or args.max_acu is None:
        raise CliError("capacity: NAME --min-acu A --max-acu B (or --chart FILE.png)", EXIT_USAGE)
    info = require_cluster(dd)
    reply = control_call(info, "SetCapacityRange", pb.SetCapacityRangeRequest(
        name=args.name, min_acu=args.min_acu, max_acu=args.max_acu))
    print(reply.message)
    return EXIT_OK


def _targets_text(targets) -> str:
    return ", ".join(f"{t.instance} ({t.role}{'' if t.up else ', down'}) {t.address}"
                     for t in targets) or "-"


@guarded
def cmd_endpoint(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    if args.action == "create":
        members = [m for m in args.members.split(",") if m.strip()]
        reply = control_call(info, "CreateEndpoint", pb.CreateEndpointRequest(name=args.name, members=members))
        print(f"custom endpoint {args.name} created: members {', '.join(reply.members)}; "
              f"leads to {_targets_text(reply.targets)}")
        print(f"use it: aurora-lite get KEY --endpoint custom:{args.name}{shown_data_dir_flag(args)}")
        return EXIT_OK
    if args.action == "delete":
        reply = control_call(info, "DeleteEndpoint", pb.DeleteEndpointRequest(name=args.name))
        print(f"custom endpoint {args.name} deleted (members were {', '.join(reply.members)})")
        return EXIT_OK
    reply = control_call(info, "ListEndpoints", pb.ListEndpointsRequest())
    if args.json:
        print(json.dumps([{"endpoint": e.name, "kind": e.kind, "members": list(e.members) or None,
                           "targets": [{"instance": t.instance, "address": t.address,
                                        "role": t.role, "up": t.up} for t in e.targets]}
                          for e in reply.endpoints], indent=2))
        return EXIT_OK
    rows = [["ENDPOINT", "MEMBERS", "LEADS TO"]]
    for e in reply.endpoints:
        rows.append([e.name, ",".join(e.members) or "-", _targets_text(e.targets)])
    print(table(rows))
    return EXIT_OK


# --- Registration -------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add failover, replica add|remove and endpoint to `aurora-lite`'s subcommands."""
    p = subparsers.add_parser("failover", help="promote a replica to writer now (planned failover)")
    data_dir_arg(p)
    p.add_argument("--target", default=None,
                   help="the replica to promote (default: the live replica with the best tier)")
    p.set_defaults(func=cmd_failover)

    # `replica` also runs a replica process (engine/cli/__init__.py); add/remove hang below it.
    p = subparsers.choices["replica"]
    rep = p.add_subparsers(dest="action", metavar="ACTION", required=False)
    q = rep.add_parser("add", help="start a new replica of the writer (next free name dbN)")
    q.add_argument("--tier", type=int, default=None,
                   help=f"promotion tier 0..{TIER_MAX}, lower promoted first (default: after every other)")
    q.add_argument("--az", default=None, help="az-a, az-b or az-c (default: round robin by name)")
    q.add_argument("--wait", type=float, default=60.0, help="wait this long for SERVING (default 60)")
    q.add_argument("--serverless", action="store_true",
                   help="a serverless replica: capacity scales between --min-acu and --max-acu")
    q.add_argument("--min-acu", type=float, default=0.5, help="serverless: lowest ACU (default 0.5)")
    q.add_argument("--max-acu", type=float, default=8.0, help="serverless: highest ACU (default 8)")
    data_dir_arg(q)
    q.set_defaults(func=cmd_replica)
    q = rep.add_parser("autoscale", help="replica auto scaling: target tracking on the replicas' "
                                         "average CPU (or --off)")
    q.add_argument("--off", action="store_true", help="stop auto scaling (replicas stay)")
    q.add_argument("--min", type=int, default=1, help="fewest replicas (default 1)")
    q.add_argument("--max", type=int, default=MAX_REPLICAS,
                   help=f"most replicas (default and at most {MAX_REPLICAS})")
    q.add_argument("--target-cpu", type=float, default=70.0,
                   help="keep the replicas' average CPU near this %% of their share (default 70)")
    q.add_argument("--scale-out-cooldown", type=float, default=60.0, metavar="S",
                   help="seconds between scale-outs (default 60)")
    q.add_argument("--scale-in-cooldown", type=float, default=300.0, metavar="S",
                   help="seconds after any scaling before a scale-in (default 300)")
    data_dir_arg(q)
    q.set_defaults(func=cmd_replica)
    q = rep.add_parser("remove", help="stop a replica and forget it (not the writer)")
    q.add_argument("name")
    data_dir_arg(q)
    q.set_defaults(func=cmd_replica)

    p = subparsers.add_parser("capacity", help="set a serverless instance's capacity range "
                                               "(NAME --min-acu A --max-acu B)")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--min-acu", type=float, default=None, help="lowest capacity, ACUs (0.5..128)")
    p.add_argument("--max-acu", type=float, default=None, help="highest capacity, ACUs")
    p.add_argument("--chart", default=None, metavar="FILE.png",
                   help="instead: draw the capacity timeline (DATA_DIR/capacity.csv) as a PNG")
    data_dir_arg(p)
    p.set_defaults(func=cmd_capacity)

    p = subparsers.add_parser("endpoint", help="create NAME --members a,b | list | delete NAME: custom endpoints")
    ep = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = ep.add_parser("create", help="a custom endpoint over some instances (reads go to its replicas)")
    q.add_argument("name")
    q.add_argument("--members", required=True, help="comma-separated instance names, e.g. db2,db3")
    data_dir_arg(q)
    q.set_defaults(func=cmd_endpoint)
    q = ep.add_parser("list", help="every endpoint and where it leads now")
    q.add_argument("--json", action="store_true")
    data_dir_arg(q)
    q.set_defaults(func=cmd_endpoint)
    q = ep.add_parser("delete", help="delete a custom endpoint")
    q.add_argument("name")
    data_dir_arg(q)
    q.set_defaults(func=cmd_endpoint)
