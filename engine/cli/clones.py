"""The `aurora-lite` verbs of versioned storage: clone, backtrack, and time-travel options.

    aurora-lite clone create NAME [--at-lsn N | --at-time T]   fast clone of the volume
    aurora-lite clone list                                      volumes, parents, bytes
    aurora-lite clone start NAME | stop NAME                    a writer for a clone
    aurora-lite clone drop NAME                                 drop a clone (stop it first)
    aurora-lite backtrack --to-lsn N | --to-time T              rewind the volume in place
    aurora-lite backtrack info                                  the reachable window
    aurora-lite get KEY --as-of-lsn N | --as-of-time T          time-travel read (also scan)
    aurora-lite put/get/delete/scan ... --volume NAME           talk to a clone's writer

A clone's writer is a plain `aurora-lite writer --volume NAME` process started beside the
cluster's (its address and pid in DATA_DIR/clones/NAME.json, its log in
DATA_DIR/logs/NAME.log); `down` stops it. It is not supervised: no replicas, no failover
(deliberately absent, ARCHITECTURE.md). Times T are ISO-8601 local times
("2026-11-26T18:05:00"), unix seconds ("1795713171.5"), or relative ("-30s", "-5m", "-2h").
Server side: engine/writer/backtrack.py. This module imports only engine/cli/common.py of
the CLI: the data verbs (engine/cli/data.py) and `down` (engine/cli/lifecycle.py) import
its helpers, never the other way round.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import datetime

from engine.cli.common import (
    EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, blocking_stub, data_dir_arg, data_dir_of,
    guarded, require_cluster, table)
from engine.cluster.launcher import base_command, pid_running, spawn

CLONE_START_TIMEOUT_S = 90.0
ADMIN_TIMEOUT_S = 120.0
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(s|m|h)$")


def parse_time_us(text: str) -> int:
    """Unix microseconds of an ISO-8601 local time, unix seconds, or '-30s'/'-5m'/'-2h'."""
    text = text.strip()
    rel = _RELATIVE.match(text)
    if rel:
        seconds = float(rel.group(1)) * {"s": 1, "m": 60, "h": 3600}[rel.group(2)]
        return int((time.time() - seconds) * 1e6)
    try:
        return int(float(text) * 1e6)
    except ValueError:
        pass
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1e6)
    except ValueError:
        raise CliError(f"bad time {text!r}: use ISO-8601 (2026-11-26T18:05:00), unix seconds, "
                       f"or -30s / -5m / -2h", EXIT_USAGE) from None


def _fmt(time_us: int) -> str:
    from engine.writer.backtrack import fmt_time
    return fmt_time(time_us)


def clones_dir(dd) -> str:
    return os.path.join(dd.root, "clones")


def clone_record(dd, name: str) -> dict | None:
    path = os.path.join(clones_dir(dd), f"{name}.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if pid_running(record.get("pid", 0)) else None


def stop_clone_writers(dd) -> list[str]:
    """SIGTERM every clone writer of a data dir (used by `down`); returns what it did."""
    done = []
    folder = clones_dir(dd)
    if not os.path.isdir(folder):
        return done
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".json"):
            name = entry[:-5]
            record = clone_record(dd, name)
            if record is not None:
                _terminate(record["pid"])
                done.append(f"clone writer {name} (pid {record['pid']}) stopped")
    return done


def _terminate(pid: int, grace_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_running(pid):
        os.kill(pid, signal.SIGKILL)


def writer_admin(args):
    """(InstanceAdmin stub, channel) of the writer of the cluster's volume, or of the
    clone named by --volume."""
    from aurora_pb import database_pb2
    from engine.client import ClusterClient

    dd = data_dir_of(args)
    info = require_cluster(dd)
    volume = getattr(args, "volume", None)
    if volume and volume != _main_volume(dd):
        record = clone_record(dd, volume)
        if record is None:
            raise CliError(f"no writer runs for volume {volume!r}: `aurora-lite clone start "
                           f"{volume}` first", EXIT_FAILED)
        address = record["address"]
    else:
        client = ClusterClient(info["control"]["address"], "cluster", timeout_s=10.0)
        address = client.address
        client.close()
    channel, stub = blocking_stub(address, database_pb2, "InstanceAdmin")
    return stub, channel


def _main_volume(dd) -> str:
    with open(dd.cluster_json) as f:
        return json.load(f).get("volume", "main")


def _call(args, method: str, request):
    from engine.client import translate
    from engine.errors import RpcError

    stub, channel = writer_admin(args)
    try:
        return getattr(stub, method)(request, timeout_s=ADMIN_TIMEOUT_S)
    except RpcError as exc:
        raise translate(exc) from None
    finally:
        channel.close()


@guarded
def cmd_clone(args) -> int:
    from aurora_pb import database_pb2 as pb

    dd = data_dir_of(args)
    if args.action == "create":
        if args.at_lsn and args.at_time:
            raise CliError("give --at-lsn or --at-time, not both", EXIT_USAGE)
        request = pb.CreateCloneRequest(name=args.name, at_lsn=args.at_lsn or 0,
                                        at_time_us=parse_time_us(args.at_time) if args.at_time else 0)
        reply = _call(args, "CreateClone", request)
        print(f"clone {args.name} created as of commit LSN {reply.fork_lsn} "
              f"({_fmt(reply.fork_time_us)}) in {reply.seconds * 1000:.1f} ms; no data copied. "
              f"Start its writer: aurora-lite clone start {args.name}")
        return EXIT_OK
    if args.action == "list":
        reply = _call(args, "ListVolumes", pb.ListVolumesRequest())
        rows = [["VOLUME", "PARENT", "FORK LSN", "OWNED", "SHARED", "STATE"]]
        for v in reply.volumes:
            running = "writer up" if (v.name == _main_volume(dd) or clone_record(dd, v.name)) else "-"
            rows.append([v.name, v.parent or "-", str(v.fork_lsn) if v.parent else "-",
                         f"{v.owned_bytes:,} B", f"{v.shared_bytes:,} B",
                         "dropped" if v.dropped else running])
        print(table(rows))
        print("(bytes on one storage node: each of the six holds a copy)")
        return EXIT_OK
    if args.action == "drop":
        if clone_record(dd, args.name):
            raise CliError(f"{args.name} has a running writer: `aurora-lite clone stop "
                           f"{args.name}` first", EXIT_FAILED)
        _call(args, "DropVolume", pb.DropVolumeRequest(name=args.name))
        print(f"volume {args.name} dropped; its clones keep reading what they share with it")
        return EXIT_OK
    if args.action == "stop":
        record = clone_record(dd, args.name)
        if record is None:
            print(f"no writer runs for {args.name}")
            return EXIT_OK
        _terminate(record["pid"])
        print(f"clone writer {args.name} stopped")
        return EXIT_OK
    return _clone_start(args, dd)


def _clone_start(args, dd) -> int:
    require_cluster(dd)
    if clone_record(dd, args.name):
        print(f"a writer for {args.name} already runs: {clone_record(dd, args.name)['address']}")
        return EXIT_OK
    os.makedirs(clones_dir(dd), exist_ok=True)
    port_file = os.path.join(clones_dir(dd), f"{args.name}.port")
    if os.path.exists(port_file):
        os.remove(port_file)
    argv = base_command() + ["writer", "--cluster", dd.cluster_json, "--volume", args.name,
                             "--instance", args.name, "--port", "0", "--port-file", port_file]
    log_path = dd.log(args.name)
    proc = spawn(argv, log_path, new_session=True)
    deadline = time.monotonic() + CLONE_START_TIMEOUT_S
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            raise CliError(f"the writer of {args.name} did not start; see {log_path}", EXIT_FAILED)
        time.sleep(0.2)
    with open(port_file) as f:
        address = f"127.0.0.1:{int(f.read().strip())}"
    with open(os.path.join(clones_dir(dd), f"{args.name}.json"), "w") as f:
        json.dump({"name": args.name, "pid": proc.pid, "address": address}, f)
    print(f"writer of volume {args.name} serving on {address} (log {log_path}); "
          f"use --volume {args.name} with put/get/delete/scan")
    return EXIT_OK


@guarded
def cmd_backtrack(args) -> int:
    from aurora_pb import database_pb2 as pb

    if args.action == "info":
        r = _call(args, "BacktrackInfo", pb.BacktrackInfoRequest())
        print(f"earliest reachable: LSN {r.earliest_lsn} ({_fmt(r.earliest_time_us)})")
        print(f"latest reachable:   LSN {r.latest_lsn} ({_fmt(r.latest_time_us)})")
        print(f"backtrack window:   {r.window_s:g} s; {r.timelines} timelines recorded")
        return EXIT_OK
    if bool(args.to_lsn) == bool(args.to_time):
        raise CliError("give exactly one of --to-lsn N or --to-time T", EXIT_USAGE)
    request = pb.BacktrackRequest(to_lsn=args.to_lsn or 0,
                                  to_time_us=parse_time_us(args.to_time) if args.to_time else 0)
    r = _call(args, "Backtrack", request)
    print(f"backtracked to commit LSN {r.target_lsn} ({_fmt(r.target_time_us)}) in "
          f"{r.seconds:.2f} s: volume epoch {r.volume_epoch}, VDL {r.vdl}. Later records are "
          f"hidden, not deleted: a backtrack can move forward again inside the window.")
    return EXIT_OK


def as_of_kwargs(args) -> dict:
    """{'as_of_lsn': N} / {'as_of_time_us': T} from --as-of-lsn / --as-of-time."""
    lsn, when = getattr(args, "as_of_lsn", None), getattr(args, "as_of_time", None)
    if lsn and when:
        raise CliError("give --as-of-lsn or --as-of-time, not both", EXIT_USAGE)
    if lsn:
        return {"as_of_lsn": lsn}
    if when:
        return {"as_of_time_us": parse_time_us(when)}
    return {}


def open_volume_client(args):
    """A Client of the clone writer named by --volume, or None for the cluster's volume."""
    from engine.client import Client

    volume = getattr(args, "volume", None)
    if not volume:
        return None
    dd = data_dir_of(args)
    require_cluster(dd)
    if volume == _main_volume(dd):
        return None
    record = clone_record(dd, volume)
    if record is None:
        raise CliError(f"no writer runs for volume {volume!r}: `aurora-lite clone start "
                       f"{volume}` first", EXIT_FAILED)
    return Client(record["address"], timeout_s=30.0)


def add_volume_args(p, as_of: bool) -> None:
    p.add_argument("--volume", default=None, help="a clone's volume (its writer: `clone start`)")
    if as_of:
        p.add_argument("--as-of-lsn", type=int, default=None, metavar="N",
                       help="read the volume as of the last commit at or before LSN N")
        p.add_argument("--as-of-time", default=None, metavar="T",
                       help="read it as of time T (ISO-8601, unix seconds, or -30s/-5m/-2h)")


def register(subparsers) -> None:
    p = subparsers.add_parser("clone", help="create NAME [--at-lsn N | --at-time T] | list | "
                                            "start NAME | stop NAME | drop NAME: fast clones")
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("create", help="a copy-on-write clone of the volume, copying no data")
    data_dir_arg(q)
    q.add_argument("name")
    q.add_argument("--at-lsn", type=int, default=None, help="as of the last commit at or before LSN N")
    q.add_argument("--at-time", default=None, help="as of time T (ISO-8601, unix s, -30s/-5m/-2h)")
    q.add_argument("--volume", default=None, help="clone this volume (default: the cluster's)")
    q.set_defaults(func=cmd_clone)
    q = sub.add_parser("list", help="every volume: parent, fork LSN, bytes owned and shared")
    data_dir_arg(q)
    q.set_defaults(func=cmd_clone, volume=None)
    for verb, text in (("start", "run a writer for the clone beside the cluster's"),
                       ("stop", "stop the clone's writer"),
                       ("drop", "drop the volume (its own clones keep working)")):
        q = sub.add_parser(verb, help=text)
        data_dir_arg(q)
        q.add_argument("name")
        q.set_defaults(func=cmd_clone, volume=None)

    p = subparsers.add_parser("backtrack", help="--to-lsn N | --to-time T | info: rewind the "
                                                "volume in place, non-destructively")
    data_dir_arg(p)
    p.add_argument("action", nargs="?", choices=["info"], default=None)
    p.add_argument("--to-lsn", type=int, default=None)
    p.add_argument("--to-time", default=None, help="ISO-8601, unix seconds, or -30s/-5m/-2h")
    p.add_argument("--volume", default=None, help="a clone's volume instead of the cluster's")
    p.set_defaults(func=cmd_backtrack)
