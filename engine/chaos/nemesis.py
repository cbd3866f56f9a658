"""The nemesis: breaks a running cluster on purpose, from a seed, and says what it did.

Like Jepsen's nemesis: the faults are real (signals to real processes, a fault file that
real gRPC interceptors obey, bytes flipped in a real LMDB file), and every schedule comes
from ``random.Random(seed)`` and is printed (and logged) before it runs, so a failure can
be replayed with the same seed (``AURORA_SEED`` or ``--seed``).

A ``Target`` is whatever runs the processes: tests/chaos_harness.py (harness processes)
or engine/cli/chaos.py (a control-plane cluster). The nemesis needs only::

    target.storage -> [names]          target.instances -> [names]  (writer first)
    target.az(name) -> "az-a"          target.address(name) -> "127.0.0.1:P"
    target.kill(name)  SIGKILL + reap  target.start(name)  start, wait until serving
    target.pause(name) SIGSTOP         target.resume(name) SIGCONT
    target.running(name) -> bool       target.data_dir(name) -> Path (storage nodes)
    target.writer() -> name            target.fault_file -> Path (what processes obey)

Faults (each ``Nemesis`` method logs one line ``nemesis +12.3s: <what>``)::

    kill(n) / start(n) / restart(n)     SIGKILL, start again (recovery for an instance)
    pause(n) / resume(n)                SIGSTOP / SIGCONT
    az_down(az) / az_up(az)             SIGKILL / start both storage nodes of an AZ
    partition(a_names, b_names)         every link between the two groups, both ways
    link(src, dst, kind, **params)      one directed link fault: drop, delay, duplicate,
                                        reorder, partition (engine/hooks.py, obeyed by engine/transport/links.py)
    slow_disk(node, ms)                 a delay before each LMDB commit of one node
    corrupt(node, pattern, n)           flip bytes of ``pattern`` occurrences in a STOPPED
                                        node's data.mdb
    wipe(node)                          delete a STOPPED node's data dir
    heal()                              clear the fault file, resume, start what is down

``Nemesis.down_intervals`` records, for every storage node, when it could not have acked
the writer (killed, paused, partitioned from the writer), for the durability checker
(engine/chaos/checkers.py). The intervals are conservative in the checker's favour of
NOT reporting: a node counts as down only from after the kill / SIGSTOP returned (a
partition: from FAULT_PROPAGATION_S after the rewrite) and as up again from BEFORE the
start / SIGCONT / rewrite that heals it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.hooks import CHECK_INTERVAL_S

log = logging.getLogger("aurora_lite.nemesis")

SEED_ENV = "AURORA_SEED"
#: Fault kinds of a random schedule (``--faults``); see random_schedule.
FAULT_KINDS = ("kill", "pause", "restart", "az", "az1", "partition", "drop", "delay",
               "duplicate", "reorder", "slow-disk", "writer-kill", "writer-pause",
               "replica-partition", "corrupt")
DEFAULT_FAULTS = tuple(k for k in FAULT_KINDS if k not in ("writer-pause",))
#: A fault file rewrite reaches every process within this (interceptors re-read it).
FAULT_PROPAGATION_S = CHECK_INTERVAL_S + 0.2


def seed_from_env(default: int | None = None) -> int:
    """$AURORA_SEED, else ``default``, else a fresh random seed (printed by the caller)."""
    raw = os.environ.get(SEED_ENV)
    if raw:
        return int(raw)
    return default if default is not None else random.SystemRandom().randrange(1, 10**6)


@dataclass
class Step:
    """One scheduled fault episode: ``kind`` with ``args`` at ``at_s``, healed ``hold_s`` later."""

    at_s: float
    kind: str
    args: dict = field(default_factory=dict)
    hold_s: float = 2.0

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"t={self.at_s:6.1f}s {self.kind:<17} {args} (for {self.hold_s:.1f}s)"


class Nemesis:
    """Faults on one target (see module doc). Not thread-safe: one driver thread."""

    def __init__(self, target, seed: int, out=None) -> None:
        self.target = target
        self.seed = seed
        self.rng = random.Random(seed)
        self.out = out                  # a callable(str) that also prints (CLI), or None
        self.t0 = time.monotonic()
        self.links: list[dict] = []
        self.disk: dict[str, dict] = {}
        self.history: list[str] = []
        self.down_intervals: dict[str, list[list[float]]] = {n: [] for n in target.storage}
        self._write_faults()

    # --- bookkeeping --------------------------------------------------------------------

    def note(self, what: str) -> None:
        line = f"nemesis +{time.monotonic() - self.t0:6.1f}s: {what}"
        self.history.append(line)
        log.info("%s", line)
        if self.out is not None:
            self.out(line)

    def _down(self, node: str, at: float | None = None) -> None:
        if node in self.down_intervals:
            iv = self.down_intervals[node]
            if not iv or iv[-1][1] is not None:
                iv.append([at if at is not None else time.monotonic(), None])

    def _up(self, node: str, at: float | None = None) -> None:
        if node in self.down_intervals:
            iv = self.down_intervals[node]
            if iv and iv[-1][1] is None:
                iv[-1][1] = at if at is not None else time.monotonic()

    def _write_faults(self) -> None:
        names = {self.target.address(n): n for n in [*self.target.storage, *self.target.instances]}
        data = {"names": names, "links": self.links, "disk": self.disk, "seed": self.seed}
        path = Path(self.target.fault_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def _writer_cut_from(self) -> set[str]:
        w = self.target.writer()
        return {r["dst"] for r in self.links
                if r["kind"] == "partition" and r["src"] in (w, "*")} | \
               {r["src"] for r in self.links
                if r["kind"] == "partition" and r["dst"] in (w, "*")}

    # --- process faults -----------------------------------------------------------------

    def kill(self, name: str) -> None:
        self.target.kill(name)
        self._down(name)
        self.note(f"SIGKILL {name}")

    def start(self, name: str) -> None:
        if self.target.running(name):
            return
        # Counted up from BEFORE the start: it may serve (and ack) before start() returns.
        if name not in self._writer_cut_from():
            self._up(name)
        self.target.start(name)
        self.note(f"started {name}")

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start(name)

    def pause(self, name: str) -> None:
        self.target.pause(name)
        self._down(name)
        self.note(f"SIGSTOP {name}")

    def resume(self, name: str) -> None:
        if name not in self._writer_cut_from():
            self._up(name)   # before SIGCONT: it may ack at once
        self.target.resume(name)
        self.note(f"SIGCONT {name}")

    def az_nodes(self, az: str) -> list[str]:
        return [n for n in self.target.storage if self.target.az(n) == az]

    def az_down(self, az: str) -> None:
        for n in self.az_nodes(az):
            self.target.kill(n)
            self._down(n)
        self.note(f"AZ {az} down (SIGKILL {', '.join(self.az_nodes(az))})")

    def az_up(self, az: str) -> None:
        for n in self.az_nodes(az):
            if not self.target.running(n):
                self._up(n)   # before the start: it may ack before start() returns
                self.target.start(n)
        self.note(f"AZ {az} up")

    # --- network and disk faults --------------------------------------------------------

    def link(self, src: str, dst: str, kind: str, **params) -> None:
        rule = {"src": src, "dst": dst, "kind": kind, **params}
        self.links.append(rule)
        self._write_faults()
        if kind == "partition" and src == self.target.writer() and dst in self.down_intervals:
            # The processes re-read the file within FAULT_PROPAGATION_S: count the node
            # down only from then (conservative for the durability checker).
            self._down(dst, time.monotonic() + FAULT_PROPAGATION_S)
        self.note(f"link {src} -> {dst}: {kind} {params or ''}".rstrip())

    def partition(self, group_a: list[str], group_b: list[str]) -> None:
        for a in group_a:
            for b in group_b:
                for src, dst in ((a, b), (b, a)):
                    self.links.append({"src": src, "dst": dst, "kind": "partition"})
        self._write_faults()
        w = self.target.writer()
        for side, other in ((group_a, group_b), (group_b, group_a)):
            if w in side:
                for n in other:
                    self._down(n, time.monotonic() + FAULT_PROPAGATION_S)
        self.note(f"partition {sorted(group_a)} | {sorted(group_b)}")

    def clear_links(self) -> None:
        cut = self._writer_cut_from()
        now = time.monotonic()   # before the rewrite: processes may see it at once
        self.links = []
        self._write_faults()
        for n in cut:
            if self.target.running(n) and not self.target.paused(n) and n in self.down_intervals:
                self._up(n, now)
        self.note("network healed (all link faults cleared)")

    def slow_disk(self, node: str, ms: float) -> None:
        self.disk[node] = {"delay_ms": ms}
        self._write_faults()
        self.note(f"slow disk on {node}: +{ms:g} ms before each LMDB commit")

    def clear_disk(self) -> None:
        self.disk = {}
        self._write_faults()
        self.note("disk faults cleared")

    # --- data faults (the node must be stopped) ------------------------------------------

    def corrupt(self, node: str, pattern: bytes, max_flips: int = 64) -> int:
        """Flip one byte inside up to ``max_flips`` occurrences of ``pattern`` in the stopped
        node's data.mdb (records and page versions that hold it). Returns the flips made."""
        assert not self.target.running(node), f"{node} must be stopped before corrupting it"
        path = Path(self.target.data_dir(node)) / "data.mdb"
        data = bytearray(path.read_bytes())
        flips = 0
        start = 0
        while flips < max_flips:
            i = data.find(pattern, start)
            if i < 0:
                break
            j = i + self.rng.randrange(len(pattern))
            data[j] ^= 0xFF
            flips += 1
            start = i + len(pattern)
        path.write_bytes(bytes(data))
        self.note(f"corrupted {flips} occurrence(s) of {pattern!r} in {path}")
        return flips

    def wipe(self, node: str) -> None:
        assert not self.target.running(node), f"{node} must be stopped before wiping it"
        shutil.rmtree(self.target.data_dir(node), ignore_errors=True)
        self.note(f"wiped the data dir of {node}")

    # --- everything back ----------------------------------------------------------------

    def heal(self) -> None:
        """Clear every network and disk fault, resume paused and start stopped processes."""
        cut = self._writer_cut_from()
        now = time.monotonic()
        self.links, self.disk = [], {}
        self._write_faults()
        for n in cut:
            if self.target.running(n) and not self.target.paused(n):
                self._up(n, now)
        for name in [*self.target.storage, *self.target.instances]:
            if self.target.paused(name):
                self.resume(name)
        for name in self.target.storage:
            if not self.target.running(name):
                self.start(name)
        for name in self.target.instances:
            if not self.target.running(name):
                self.start(name)
        now = time.monotonic()
        for n in self.down_intervals:
            self._up(n, now)
        self.note("healed: no faults, every process running")

    # --- random schedules ---------------------------------------------------------------

    def random_schedule(self, duration_s: float, kinds=DEFAULT_FAULTS) -> list[Step]:
        """Fault episodes one after another for ``duration_s``, all drawn from the seed."""
        rng = random.Random(self.seed)
        kinds = [k for k in kinds if k in FAULT_KINDS]
        if not self.target.replicas():
            kinds = [k for k in kinds if k != "replica-partition"]
        assert kinds, "no fault kinds to schedule"
        storage, azs = list(self.target.storage), sorted({self.target.az(n) for n in self.target.storage})
        steps: list[Step] = []
        t = 1.0 + rng.random()
        while t < duration_s - 2.0:
            kind = rng.choice(kinds)
            node = rng.choice(storage)
            hold = round(1.0 + rng.random() * 4.0, 1)
            args: dict = {}
            if kind in ("kill", "pause", "restart", "slow-disk", "corrupt"):
                args = {"node": node}
                if kind == "slow-disk":
                    args["ms"] = rng.choice([20, 50, 100])
            elif kind == "az":
                args = {"az": rng.choice(azs)}
            elif kind == "az1":
                az = rng.choice(azs)
                args = {"az": az, "node": rng.choice([n for n in storage if self.target.az(n) != az])}
            elif kind == "partition":
                side = rng.sample(storage, rng.choice([1, 2]))
                args = {"nodes": ",".join(side), "from_writer": rng.random() < 0.5}
            elif kind in ("drop", "duplicate"):
                args = {"node": node, "p": rng.choice([0.1, 0.3, 0.5])}
            elif kind in ("delay", "reorder"):
                args = {"node": node, "ms": rng.choice([5, 20, 50])}
            elif kind == "replica-partition":
                args = {"replica": rng.choice(self.target.replicas())}
            steps.append(Step(round(t, 1), kind, args, hold))
            t += hold + 0.5 + rng.random() * 1.5
        return steps

    def run_step(self, step: Step, sleep=time.sleep) -> None:
        """Apply one episode, hold it, heal it."""
        a = step.args
        w = self.target.writer()
        k = step.kind
        if k == "kill":
            self.kill(a["node"])
            sleep(step.hold_s)
            self.start(a["node"])
        elif k == "pause":
            self.pause(a["node"])
            sleep(step.hold_s)
            self.resume(a["node"])
        elif k == "restart":
            self.restart(a["node"])
            sleep(step.hold_s)
        elif k == "az":
            self.az_down(a["az"])
            sleep(step.hold_s)
            self.az_up(a["az"])
        elif k == "az1":
            self.az_down(a["az"])
            self.kill(a["node"])
            sleep(step.hold_s)
            self.start(a["node"])
            self.az_up(a["az"])
        elif k == "partition":
            side = a["nodes"].split(",")
            rest = [n for n in self.target.storage if n not in side]
            self.partition(side, rest + ([w] if a["from_writer"] else []))
            sleep(step.hold_s)
            self.clear_links()
        elif k in ("drop", "duplicate", "delay", "reorder"):
            params = {"p": a["p"]} if "p" in a else {"ms": a["ms"]}
            self.link(w, a["node"], k, **params)
            self.link(a["node"], "*", k, **params)
            sleep(step.hold_s)
            self.clear_links()
        elif k == "slow-disk":
            self.slow_disk(a["node"], a["ms"])
            sleep(step.hold_s)
            self.clear_disk()
        elif k == "writer-kill":
            self.kill(w)
            sleep(min(step.hold_s, 1.0))
            self.start(w)
        elif k == "writer-pause":
            self.pause(w)
            sleep(min(step.hold_s, 1.0))
            self.resume(w)
        elif k == "replica-partition":
            replica = a["replica"]
            if replica == w:   # a failover made it the writer since the schedule was drawn
                others = self.target.replicas()
                if not others:
                    self.note(f"skipped: {replica} is the writer now and no replica is left")
                    return
                replica = others[0]
            self.partition([replica], [w])
            sleep(step.hold_s)
            self.clear_links()
        elif k == "corrupt":
            self.kill(a["node"])
            self.corrupt(a["node"], self.target.corrupt_pattern)
            self.start(a["node"])
            sleep(step.hold_s)
        else:
            raise ValueError(f"unknown fault kind {k!r}")

    def run_schedule(self, steps: list[Step], stop=None) -> None:
        """Run the episodes at their times (relative to now); ``stop()`` True ends early."""
        started = time.monotonic()
        for step in steps:
            wait_s = started + step.at_s - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)
            if stop is not None and stop():
                break
            self.note(f"episode: {step.describe()}")
            self.run_step(step)
