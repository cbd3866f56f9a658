"""`aurora-lite chaos`: a long, seeded chaos run against a real local cluster.

    aurora-lite chaos --duration 600 --seed 7 [--faults kill,pause,az,...] [--replicas 1]
                      [--data-dir DIR] [--keep]

It starts its own cluster (`aurora-lite up --detach`) in a fresh data dir (a temporary one
unless --data-dir names a new one) with $AURORA_FAULTS_FILE set, so every process obeys
the nemesis' fault file; runs the bank + register + reads workload through the client
library (engine/chaos/checkers.py) while the nemesis (engine/chaos/nemesis.py) plays a schedule
drawn from the seed (printed first, so a failure replays with the same --seed); heals;
runs every checker; prints the verdict; and stops the cluster (`down`; --keep leaves it
and the data dir for inspection). Exit code 0 when every checker is green, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.chaos import checkers as cc
from engine.cli.common import blocking_stub
from engine.hooks import FAULTS_FILE_ENV, FAULTS_SEED_ENV
from engine.cluster.launcher import DataDir, read_control
from engine.chaos.nemesis import DEFAULT_FAULTS, FAULT_KINDS, Nemesis, seed_from_env

log = logging.getLogger("aurora_lite.chaos")

#: Log lines a chaos run expects (faults it caused on purpose), not failures.
EXPECTED_LOG = [
    r"checksum", r"quarantin", r"corrupt",
]


class ControlTarget:
    """engine.chaos.nemesis Target over a control-plane cluster (Control gRPC service)."""

    corrupt_pattern = b"acct-"

    def __init__(self, data_dir: str) -> None:
        self.dd = DataDir(data_dir)
        self.fault_file = Path(data_dir) / "faults.json"
        info = read_control(self.dd)
        procs = info["processes"]
        self.storage = [n for n, p in procs.items() if p["role"] == "storage"]
        self.instances = [n for n, p in procs.items() if p["role"] in ("writer", "replica")]
        self._az = {n: p["az"] for n, p in procs.items()}
        self._addr = {n: p["address"] for n, p in procs.items()}
        self.control_address = info["control"]["address"]
        from aurora_pb import control_pb2
        self._channel, self._stub = blocking_stub(self.control_address, control_pb2, "Control")
        self._paused: set[str] = set()

    def _info(self) -> dict:
        return read_control(self.dd)

    def _proc(self, name: str) -> dict:
        return self._info()["processes"][name]

    def _action(self, name: str, action: str, wait_s: float = 0.0) -> str:
        from aurora_pb import control_pb2 as pb
        reply = self._stub.ProcessAction(pb.ProcessActionRequest(name=name, action=action, wait_s=wait_s),
                                         timeout_s=wait_s + 30)
        return reply.message if hasattr(reply, "message") else str(reply)

    def writer(self) -> str:
        return self._info()["writer"]

    def replicas(self) -> list[str]:
        w = self.writer()
        return [n for n in self.instances if n != w]

    def az(self, name: str) -> str:
        return self._az[name]

    def address(self, name: str) -> str:
        return self._addr[name]

    def running(self, name: str) -> bool:
        p = self._proc(name)
        return p["state"] != "down"

    def paused(self, name: str) -> bool:
        return self._proc(name)["state"] == "paused"

    def kill(self, name: str) -> None:
        self._action(name, "kill")

    def start(self, name: str) -> None:
        self._action(name, "start", 90)

    def pause(self, name: str) -> None:
        self._action(name, "pause")

    def resume(self, name: str) -> None:
        self._action(name, "resume")

    def data_dir(self, name: str) -> Path:
        return Path(self.dd.node_dir(name))

    def log_paths(self) -> dict[str, Path]:
        return {n: Path(self.dd.log(n)) for n in [*self.storage, *self.instances, "control"]}

    def close(self) -> None:
        self._channel.close()


def register(sub) -> None:
    p = sub.add_parser("chaos", help="run a seeded chaos test (nemesis + workload + checkers) on a "
                       "fresh local cluster")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    p.add_argument("--seed", type=int, default=None, help="schedule seed (default $AURORA_SEED or random)")
    p.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                   help=f"comma-separated fault kinds, of: {', '.join(FAULT_KINDS)}")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="a NEW directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running and the data dir")
    p.add_argument("--json", default=None, help="also write the verdict as JSON to this file")
    p.set_defaults(func=cmd_chaos)


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_chaos(args: argparse.Namespace) -> int:
    from engine.client import Client, ClusterClient

    seed = args.seed if args.seed is not None else seed_from_env()
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad:
        print(f"aurora-lite: unknown fault kinds {bad} (of {', '.join(FAULT_KINDS)})", file=sys.stderr)
        return 2
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else tempfile.mkdtemp(prefix="aurora-chaos-")
    if args.data_dir and os.path.exists(data_dir) and os.listdir(data_dir):
        print(f"aurora-lite: {data_dir} is not empty; chaos needs a new data dir", file=sys.stderr)
        return 2
    os.makedirs(data_dir, exist_ok=True)
    fault_file = Path(data_dir) / "faults.json"
    fault_file.write_text("{}")
    env = dict(os.environ)
    env.update({FAULTS_FILE_ENV: str(fault_file), FAULTS_SEED_ENV: str(seed),
                "AURORA_SN_SCRUB_INTERVAL_S": "2", "AURORA_SN_REPAIR_INTERVAL_S": "0.3"})
    cli = [sys.executable, "-m", "engine.cli"]
    _say(f"chaos: seed {seed} (replay: aurora-lite chaos --seed {seed} --duration {args.duration:g} "
         f"--faults {','.join(kinds)}); data dir {data_dir}")
    up = subprocess.run([*cli, "up", "--detach", "--replicas", str(args.replicas), "--data-dir", data_dir],
                        env=env, capture_output=True, text=True, timeout=180)
    if up.returncode != 0:
        print(up.stdout + up.stderr, file=sys.stderr)
        return 1
    target = ControlTarget(data_dir)
    writer_cc = ClusterClient(target.control_address, "cluster", timeout_s=20.0)
    clients: dict[str, Client] = {}

    def reader_clients() -> dict:
        out = {"writer": writer_cc}
        for n in target.replicas():
            c = clients.get(n) or clients.setdefault(n, Client(target.address(n), timeout_s=5.0))
            out[n] = c
        return out

    def node_status() -> dict:
        from aurora_pb import storage_pb2 as spb
        from engine.errors import RpcError
        out = {}
        for n in target.storage:
            channel, stub = blocking_stub(target.address(n), spb, "Storage")
            try:
                out[n] = (0, stub.NodeStatus(spb.NodeStatusRequest(), timeout_s=2.0))
            except RpcError:
                pass
            finally:
                channel.close()
        return out

    logging.getLogger("aurora_lite.nemesis").setLevel(logging.WARNING)   # printed by _say
    nemesis = Nemesis(target, seed, out=_say)
    schedule = nemesis.random_schedule(args.duration, kinds)
    _say(f"chaos: schedule of {len(schedule)} episodes over {args.duration:g}s:")
    for step in schedule:
        _say("  " + step.describe())
    workload = cc.Workload(lambda: writer_cc, reader_clients, seed=seed, commit_timeout_s=30.0)
    verdict: list[str] = []
    started = time.monotonic()
    try:
        workload.setup()
        sampler = cc.StateSampler(lambda: writer_cc.status(), node_status, interval_s=1.0).start()
        workload.start()
        nemesis.run_schedule(schedule)
        nemesis.heal()
        time.sleep(3.0)   # writes that waited for a quorum complete
        workload.stop()
        sampler.sample()
        sampler.stop()
        verdict += cc.check_bank_reads(workload)
        verdict += cc.check_lost_writes(workload, lambda: writer_cc)
        verdict += cc.check_monotonic(sampler)
        verdict += cc.check_acks_held_by_storage(workload, data_dir)   # the nodes' SCL logs
        verdict += cc.scan_logs(target.log_paths(), EXPECTED_LOG)
        acked = sum(1 for o in [*workload.transfers, *workload.puts] if o.outcome == "ok")
        if acked < cc.ACKED_OPS_MIN:
            verdict.append(f"workload: only {acked} ops acknowledged (at least "
                           f"{cc.ACKED_OPS_MIN} needed): the run tested nothing")
    except Exception as exc:   # the run itself broke: that is a red verdict, with the seed
        log.exception("chaos run failed")
        verdict.append(f"chaos run aborted: {exc!r}")
    finally:
        workload.stop(join_s=5)
    counts = workload.counts()
    _say(f"chaos: seed {seed}: {time.monotonic() - started:.0f}s, workload {json.dumps(counts)}")
    if verdict:
        dump = Path(data_dir) / "history.json"
        workload.dump(dump)
        _say(f"chaos: RED: {len(verdict)} violation(s) (history in {dump}):")
        for v in verdict[:40]:
            _say("  " + v)
    else:
        _say("chaos: GREEN: bank reads, lost writes, monotonic VDL/SCL, durability at ack, logs")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": seed, "duration_s": args.duration, "faults": kinds,
                                               "episodes": len(schedule), "counts": counts,
                                               "violations": verdict, "history": nemesis.history}, indent=1))
    writer_cc.close()
    for c in clients.values():
        c.close()
    target.close()
    if not args.keep:
        subprocess.run([*cli, "down", "--data-dir", data_dir], env=env, capture_output=True, timeout=120)
        if not verdict and not args.data_dir:
            import shutil
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if not verdict else 1
