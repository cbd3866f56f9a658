"""The replica verbs of `aurora-lite`: planned failover, adding and removing replicas, and
custom endpoints.

    aurora-lite failover [--target NAME]                  promote a replica now
    aurora-lite replica add [--tier N] [--az AZ]          a new replica of the writer
    aurora-lite replica remove NAME                       stop a replica and forget it
    aurora-lite endpoint create NAME --members a,b | list [--json] | delete NAME

Each is one call of the control plane (engine/cluster/failover.py, supervision.py,
endpoints.py). `replica` is also the subcommand that runs a replica process
(engine/cli/__init__.py); add and remove hang below it. Registered by
engine/cli/__init__.py (``register``); docs/cli.md is the user's view.
"""

from __future__ import annotations

import json

from engine.cli.common import (
    EXIT_FAILED, EXIT_OK, control_call, data_dir_arg, data_dir_of, guarded, require_cluster,
    shown_data_dir_flag, table)
from engine.cluster.launcher import TIER_MAX

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
    if args.action == "add":
        request = pb.AddReplicaRequest(az=args.az or "", wait_s=args.wait)
        if args.tier is not None:
            request.tier = args.tier
        reply = control_call(info, "AddReplica", request, timeout_s=args.wait + 30)
        print(reply.message)
        return EXIT_OK if all(p.state == "up" for p in reply.processes) else EXIT_FAILED
    reply = control_call(info, "RemoveReplica", pb.RemoveReplicaRequest(name=args.name),
                         timeout_s=60)
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
    data_dir_arg(q)
    q.set_defaults(func=cmd_replica)
    q = rep.add_parser("remove", help="stop a replica and forget it (not the writer)")
    q.add_argument("name")
    data_dir_arg(q)
    q.set_defaults(func=cmd_replica)

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
