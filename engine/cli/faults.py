"""The fault verbs of `aurora-lite`: break and mend processes, AZs and links on purpose.

    aurora-lite node kill|stop|start|pause|resume NAME   one storage node or instance
    aurora-lite node wipe NAME                           kill a storage node, delete its data,
                                                         start it empty (it is repaired)
    aurora-lite az down|up AZ                            both storage nodes of an AZ
    aurora-lite net delay (--az AZ | --node SN) --ms N   extra one-way delay into an AZ or node
    aurora-lite net clear                                remove every extra delay

Each is one call of the control plane (engine/cluster/supervision.py does the work), which
prints what happened; the exit code says whether the process reached the state asked for.
Registered by engine/cli/__init__.py (``register``); docs/cli.md is the user's view.
"""

from __future__ import annotations

from engine.cli.common import (
    EXIT_FAILED, EXIT_OK, control_call, data_dir_arg, data_dir_of, guarded, latency_line,
    require_cluster)


EXPECTED_STATE = {"kill": ("down",), "stop": ("down",), "start": ("up",),
                  "pause": ("paused",), "resume": ("up", "starting"), "wipe": ("up",)}


@guarded
def cmd_node(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    reply = control_call(info, "ProcessAction",
                         pb.ProcessActionRequest(name=args.name, action=args.action, wait_s=args.wait),
                         timeout_s=args.wait + 30)
    print(reply.message)
    ok = all(p.state in EXPECTED_STATE[args.action] for p in reply.processes)
    return EXIT_OK if ok else EXIT_FAILED


@guarded
def cmd_az(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    reply = control_call(info, "AzAction",
                         pb.AzActionRequest(az=args.az, action=args.action, wait_s=args.wait),
                         timeout_s=args.wait + 30)
    print(reply.message)
    expected = ("down",) if args.action == "down" else ("up",)
    return EXIT_OK if all(p.state in expected for p in reply.processes) else EXIT_FAILED


@guarded
def cmd_net(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    if args.action == "delay":
        request = pb.SetNetworkDelayRequest(az=args.az or "", node=args.node or "", ms=args.ms)
    else:
        request = pb.SetNetworkDelayRequest(clear=True)
    reply = control_call(info, "SetNetworkDelay", request)
    print(reply.message)
    print(f"network: {latency_line(reply.latency)}")
    return EXIT_OK


# --- Registration -------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add node, az and net to `aurora-lite`'s subcommands."""
    p = subparsers.add_parser("node", help="kill|stop|start|pause|resume|wipe NAME (storage node or instance)")
    data_dir_arg(p)
    p.add_argument("action", choices=["kill", "stop", "start", "pause", "resume", "wipe"],
                   help="kill=SIGKILL, stop=SIGTERM then SIGKILL, start=launch again, pause=SIGSTOP, "
                        "resume=SIGCONT, wipe=SIGKILL a storage node, delete its data dir, start it "
                        "empty (its segments are rebuilt from its peers: docs/membership.md)")
    p.add_argument("name", help="sn1..sn6, db1, db2, ...")
    p.add_argument("--wait", type=float, default=60.0, help="start, wipe: wait this long for SERVING (default 60)")
    p.set_defaults(func=cmd_node)

    p = subparsers.add_parser("az", help="down|up AZ: kill or start both storage nodes of an AZ")
    data_dir_arg(p)
    p.add_argument("action", choices=["down", "up"])
    p.add_argument("az", help="az-a, az-b or az-c")
    p.add_argument("--wait", type=float, default=60.0, help="up: wait this long for SERVING (default 60)")
    p.set_defaults(func=cmd_az)

    p = subparsers.add_parser("net", help="delay (--az AZ | --node SN) --ms N | clear: extra one-way "
                                          "delay into an AZ or one storage node")
    net = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = net.add_parser("delay", help="add N ms of one-way delay on every link into AZ (or storage node SN)")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--az")
    where.add_argument("--node", help="one storage node, e.g. sn3: a slow outlier")
    q.add_argument("--ms", type=float, required=True)
    data_dir_arg(q)
    q.set_defaults(func=cmd_net)
    q = net.add_parser("clear", help="remove every extra delay")
    data_dir_arg(q)
    q.set_defaults(func=cmd_net)
