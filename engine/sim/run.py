"""One simulated schedule from a seed, and many of them over worker processes.

``run_schedule(seed)`` builds a SimLoop (engine/sim/loop.py), a SimNetwork
(engine/sim/network.py), the cluster (engine/sim/cluster.py) on a fresh directory on
tmpfs, starts the workload (engine/sim/workload.py) and the nemesis
(engine/sim/faults.py), runs ``virtual_s`` seconds of virtual time with at least
``EPISODES_MIN`` fault episodes, heals, reads the final state and judges it with the
chaos checkers (with backtrack or clone episodes in ``kinds``: with their timeline
counterparts, engine/sim/timelines.py, and durability at ack). Everything random comes from ``random.Random`` instances derived from the
seed; every event goes into the trace (engine/sim/trace.py), whose hash the result
carries. A schedule is green when no checker reports a violation, at least
``ACKED_MIN`` transactions were acknowledged and no production code logged an ERROR.

``run_many`` spreads seeds over worker processes (spawned with PYTHONHASHSEED=0, so set
iteration order is the same in every worker) and yields each result as it finishes.

Planted bugs (engine/hooks.py) are switched on for one schedule with ``bug=NAME``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from engine import hooks
from engine.format.cluster_config import Latency
from engine.chaos.checkers import judge_acks_held
from engine.sim import timelines
from engine.sim.cluster import SimCluster
from engine.sim.episodes import TIMELINE_KINDS, TimelineEpisodes
from engine.sim.faults import BUGS, FAULT_KINDS, VIRTUAL_S_DEFAULT, SimNemesis
from engine.sim.loop import SimLoop, SimProcess, virtual_time
from engine.sim.network import SimNetwork, SimTransport
from engine.sim.trace import Trace
from engine.sim.workload import SclRecords, SimWorkload, acked, judge

log = logging.getLogger(__name__)

EPISODES_MIN = 8
ACKED_MIN = 300
SETTLE_S = 3.0
#: ERROR lines a schedule with a corrupt episode expects (scrub finding the flipped bytes).
EXPECTED_ERRORS = re.compile(r"checksum|quarantin|corrupt")
FINAL_READ_S = 30.0


@dataclass
class Result:
    seed: int
    green: bool
    violations: list[str]
    trace_hash: str
    virtual_s: float
    episodes: int
    acked: int
    events: int
    wall_s: float
    cpu_s: float = 0.0
    faults: list[str] = field(default_factory=list)
    backtracks: int = 0          # backtracks that happened (timeline episodes)
    forward: int = 0             # of which forward again
    clones: int = 0
    errors_logged: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("trace")
        return d


class _ErrorLines(logging.Handler):
    """Collects ERROR lines the production code logs during a schedule (a violation),
    without wall times or paths."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}"[:500])


def _tmp_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_schedule(seed: int, virtual_s: float = VIRTUAL_S_DEFAULT, kinds=FAULT_KINDS,
                 keep_trace: bool = False, bug: str | None = None) -> Result:
    """Run one schedule (see the module doc)."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    loop = SimLoop()
    trace = Trace(keep=keep_trace)
    loop.on_jump = trace.jump
    net = SimNetwork(random.Random(seed * 3 + 1), trace, Latency(), SimCluster.azs())
    base_dir = tempfile.mkdtemp(prefix="aurora-sim-", dir=_tmp_root())
    scl = SclRecords(loop)
    errors = _ErrorLines()
    root = logging.getLogger()
    saved_env = {name: os.environ.get(name) for name, _ in BUGS.values()}
    from engine.writer import quorum
    saved_rank = quorum._PGCL_RANK
    if bug is not None:
        name, value = BUGS[bug]
        os.environ[name] = value
        if bug == "vdl-short-quorum":
            quorum._PGCL_RANK = quorum.VW - 1   # read at import in a real process
    hooks.install_state(disk_delays={}, scl_log_factory=scl.factory)
    root.addHandler(errors)
    out: dict = {}
    try:
        with virtual_time(loop):
            loop.run_until_complete(_schedule(seed, virtual_s, kinds, loop, net, trace, base_dir,
                                              scl, out))
            _cancel_all(loop)
    finally:
        root.removeHandler(errors)
        hooks.install_state()
        quorum._PGCL_RANK = saved_rank
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        loop.close()
        shutil.rmtree(base_dir, ignore_errors=True)
    violations = list(out["violations"])
    if out["acked"] < ACKED_MIN:
        violations.append(f"workload: only {out['acked']} acknowledged transactions "
                          f"(at least {ACKED_MIN} needed)")
    if out["episodes"] < EPISODES_MIN:
        violations.append(f"nemesis: only {out['episodes']} fault episodes")
    violations += [f"ERROR logged: {line}" for line in errors.lines
                   if not (out["corrupted"] and EXPECTED_ERRORS.search(line))]
    return Result(seed=seed, green=not violations, violations=violations,
                  trace_hash=trace.hexdigest(), virtual_s=round(out["virtual_s"], 3),
                  episodes=out["episodes"], acked=out["acked"], events=trace.events,
                  wall_s=round(time.perf_counter() - started, 3),
                  cpu_s=round(time.process_time() - cpu_started, 3), faults=out["faults"],
                  backtracks=out.get("backtracks", 0), forward=out.get("forward", 0),
                  clones=out.get("clones", 0),
                  errors_logged=errors.lines, trace=trace.lines)


async def _schedule(seed, virtual_s, kinds, loop, net, trace, base_dir, scl, out) -> None:
    cluster = SimCluster(seed, base_dir, net)
    await cluster.start()
    trace.note(loop.time(), "cluster started")
    client = SimProcess("client")
    ctl = SimTransport(net, SimProcess("ctl"))
    workload = SimWorkload(cluster, SimTransport(net, client), seed, random.Random(seed * 3 + 2),
                           trace)
    await client.spawn(workload.setup())
    tasks = workload.start(client)
    nemesis = SimNemesis(cluster, net, random.Random(seed * 3 + 3), trace, kinds, ctl,
                         corrupt_pattern=b"v-%d-0-" % seed)
    if any(k in TIMELINE_KINDS for k in kinds):
        nemesis.timelines = TimelineEpisodes(cluster, nemesis, workload, client)
    await nemesis.run(virtual_s, EPISODES_MIN)
    await nemesis.heal()
    await asyncio.sleep(SETTLE_S)
    workload.stopping = True
    for t in tasks:
        t.cancel()
    trace.note(loop.time(), "workload stopped")
    final = await client.spawn(workload.final_state(loop.time() + FINAL_READ_S))
    workload.sample()
    if nemesis.timelines is None:
        out["violations"] = judge(workload, final, scl, cluster.config.volume)
    else:
        episodes = nemesis.timelines
        leaks = await client.spawn(episodes.final_reads(loop.time() + FINAL_READ_S))
        out["violations"] = timelines.judge(episodes.tls, final, workload.sampler) + leaks + \
            judge_acks_held(workload.w, scl.logs, cluster.config.volume)
        out["backtracks"] = sum(b.happened for b in episodes.tls.backtracks)
        out["forward"] = sum(b.happened and b.forward for b in episodes.tls.backtracks)
        out["clones"] = len(episodes.tls.clones)
    out["acked"] = acked(workload)
    out["episodes"] = len(nemesis.episodes)
    out["faults"] = [f"{t:.3f} {k} {w}" for t, k, w in nemesis.episodes]
    out["virtual_s"] = loop.time()
    out["corrupted"] = any(k == "corrupt" for _t, k, _w in nemesis.episodes)
    trace.note(loop.time(), f"verdict {len(out['violations'])} violations")
    trace.closed = True
    cluster.close()


def _cancel_all(loop: SimLoop) -> None:
    """Cancel every task left (gossip, background, streams) and let them finish."""
    for _ in range(10):
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not pending:
            return
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.wait(pending, timeout=5.0))


# --- many schedules over worker processes ------------------------------------------------


def _worker_init() -> None:
    # Quiet workers: a schedule's ERROR lines travel in its result (errors_logged).
    logging.getLogger().setLevel(logging.CRITICAL + 1)


def _run_one(args) -> dict:
    seed, virtual_s, kinds, bug, keep_trace = args
    r = run_schedule(seed, virtual_s, kinds, keep_trace=keep_trace, bug=bug)
    d = r.to_json()
    d["grpc_imported"] = any(m.split(".")[0] in ("grpc", "grpc_health") for m in sys.modules)
    if keep_trace:
        d["trace"] = r.trace
    return d


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    os.environ["PYTHONHASHSEED"] = "0"     # inherited by the spawned workers
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)


def run_in_worker(seed: int, virtual_s: float = VIRTUAL_S_DEFAULT, kinds=FAULT_KINDS,
                  bug: str | None = None, keep_trace: bool = False) -> dict:
    """One schedule in a fresh spawned worker (PYTHONHASHSEED=0): what a replay prints."""
    with _pool(1) as pool:
        return pool.submit(_run_one, (seed, virtual_s, tuple(kinds), bug, keep_trace)).result()


def run_many(seeds, workers: int, virtual_s: float = VIRTUAL_S_DEFAULT, kinds=FAULT_KINDS,
             bug: str | None = None):
    """Yield each seed's result (as a dict) as it finishes, over ``workers`` processes."""
    with _pool(workers) as pool:
        futures = [pool.submit(_run_one, (s, virtual_s, tuple(kinds), bug, False)) for s in seeds]
        for fut in concurrent.futures.as_completed(futures):
            yield fut.result()
