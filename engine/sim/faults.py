"""The simulation's nemesis: seeded fault episodes on the simulated cluster.

One episode at a time: a pause, then a fault drawn from the schedule's random generator,
held for a drawn duration, then healed. The kinds (``FAULT_KINDS``)::

    delay               20-150 ms more on every link to and from one node
    drop                one node's links lose messages with p 0.1-0.3 (a unary request
                        or its reply; a stream message breaks the stream)
    duplicate           every request is delivered twice with p 0.3
    reorder             every unary request waits a random 0-30 ms more
    node-partition      one storage node cut from every other process
    az-partition        one AZ (two nodes and what runs there) cut from the others
    one-way-partition   the writer cannot reach one node (the node can reach it)
    node-crash          one storage node crashes (queued work lost), restarts later
    az-down             both nodes of one AZ crash, restart later
    az-plus-one         an AZ and one more node crash: writes stop (3 of 6) until healed
    slow-disk           one node's commits wait 50-300 ms each
    corrupt             a node stops; bytes of up to 4 stored register values flip in its
                        data.mdb; it restarts (scrub and reads must never serve them)
    writer-crash        the writer crashes; after 1 s the replica is promoted (Promote,
                        recovery under a new epoch) and the old writer returns as its replica
    replica-crash       the replica crashes and restarts

Every fault and heal is a trace event. Backtrack and clone episodes
(``TIMELINE_KINDS``, engine/sim/episodes.py) are drawn, with p TIMELINE_P, only when the
kinds name them (`aurora-lite sim --timelines`); their schedules are judged on timelines
(engine/sim/timelines.py).
"""

from __future__ import annotations

import asyncio
import logging
import os

from engine import hooks
from engine.errors import RpcError
from engine.sim.episodes import TIMELINE_KINDS, TIMELINE_P  # noqa: F401 - TIMELINE_KINDS re-exported

log = logging.getLogger(__name__)

FAULT_KINDS = ("delay", "drop", "duplicate", "reorder", "node-partition", "az-partition",
               "one-way-partition", "node-crash", "az-down", "az-plus-one", "slow-disk",
               "corrupt", "writer-crash", "replica-crash")
#: Virtual seconds of faults in one schedule, unless told otherwise.
VIRTUAL_S_DEFAULT = 30.0
#: The planted bugs a schedule can run with (engine/hooks.py) and their switch values.
BUGS = {"ack-before-commit": (hooks.ACK_BEFORE_COMMIT_ENV, "0.5"),
        "vdl-short-quorum": (hooks.VDL_SHORT_QUORUM_ENV, "1"),
        "scl-overclaim": (hooks.SCL_OVERCLAIM_ENV, "1"),
        "replica-above-vdl": (hooks.REPLICA_ABOVE_VDL_ENV, "1"),
        "backtrack-cut-short": (hooks.BACKTRACK_CUT_SHORT_ENV, "1")}
#: Every kind a schedule may draw: the faults, then the timeline episodes
#: (engine/sim/episodes.py), which run only when named (`--timelines`).
ALL_KINDS = FAULT_KINDS + TIMELINE_KINDS
GAP_S = (0.3, 1.0)
HOLD_S = (0.8, 2.0)
FAILOVER_AFTER_S = 1.0


class SimNemesis:
    def __init__(self, cluster, net, rng, trace, kinds=FAULT_KINDS, ctl=None,
                 corrupt_pattern: bytes = b"v-") -> None:
        self.cluster = cluster
        self.net = net
        self.rng = rng
        self.trace = trace
        self.kinds = tuple(kinds)
        self.ctl = ctl                       # the control plane's transport (Promote)
        self.corrupt_pattern = corrupt_pattern
        self.disk_delays: dict[str, float] = {}
        self.episodes: list[tuple[float, str, str]] = []
        self._down: list = []                # crashed storage nodes to restart at heal
        self.timelines = None                # TimelineEpisodes, when kinds has backtrack/clone

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def note(self, text: str) -> None:
        self.trace.note(self.now, text)

    async def run(self, until_s: float, episodes_min: int) -> None:
        while self.now < until_s or len(self.episodes) < episodes_min:
            await asyncio.sleep(self.rng.uniform(*GAP_S))
            kind = self._draw_kind()
            hold = self.rng.uniform(*HOLD_S)
            what = await self.inject(kind)
            self.episodes.append((self.now, kind, what))
            await asyncio.sleep(hold)
            await self.heal()

    def _draw_kind(self) -> str:
        """A fault kind; with timeline episodes (engine/sim/episodes.py) one of those with
        p TIMELINE_P (no extra draw without them: schedules without stay as they were)."""
        if self.timelines is None:
            return self.rng.choice(self.kinds)
        faults = [k for k in self.kinds if k not in TIMELINE_KINDS]
        ours = [k for k in self.kinds if k in TIMELINE_KINDS]
        if not faults or self.rng.random() < TIMELINE_P:
            return self.rng.choice(ours)
        return self.rng.choice(faults)

    def _all_names(self) -> list[str]:
        c = self.cluster
        return [n.name for n in c.nodes] + [i.name for i in c.instances + c.clones] + \
            ["client", "ctl"]

    def _block(self, group: set[str]) -> None:
        for a in group:
            for b in self._all_names():
                if b not in group:
                    self.net.rules.blocked.add((a, b))
                    self.net.rules.blocked.add((b, a))

    async def inject(self, kind: str) -> str:
        if kind in TIMELINE_KINDS:
            return await self.timelines.run(kind)
        c, rules, rng = self.cluster, self.net.rules, self.rng
        node = rng.choice(c.nodes)
        az = rng.choice(["az-a", "az-b", "az-c"])
        what = node.name
        if kind == "delay":
            ms = rng.uniform(20, 150)
            rules.delay_ms[("*", node.name)] = rules.delay_ms[(node.name, "*")] = ms
            what = f"{node.name} +{ms:.0f}ms"
        elif kind == "drop":
            p = rng.uniform(0.1, 0.3)
            rules.drop_p[("*", node.name)] = rules.drop_p[(node.name, "*")] = p
            what = f"{node.name} p={p:.2f}"
        elif kind == "duplicate":
            rules.dup_p[("*", "*")] = 0.3
            what = "all p=0.30"
        elif kind == "reorder":
            rules.reorder_ms[("*", "*")] = 30.0
            what = "all 0-30ms"
        elif kind == "node-partition":
            self._block({node.name})
        elif kind == "az-partition":
            group = {n for n, a in self.net.azs.items() if a == az}
            self._block(group)
            what = az
        elif kind == "one-way-partition":
            rules.blocked.add((c.writer_name, node.name))
            what = f"{c.writer_name} -/-> {node.name}"
        elif kind in ("node-crash", "corrupt"):
            node.crash()
            self._down.append(node)
            if kind == "corrupt":
                what = f"{node.name} {self._corrupt(node)} bytes"
        elif kind in ("az-down", "az-plus-one"):
            down = [n for n in c.nodes if n.az == az]
            if kind == "az-plus-one":
                down.append(rng.choice([n for n in c.nodes if n.az != az]))
            for n in down:
                n.crash()
                self._down.append(n)
            what = " ".join(n.name for n in down)
        elif kind == "slow-disk":
            self.disk_delays[node.name] = rng.uniform(0.05, 0.3)
            hooks.install_state(disk_delays=self.disk_delays,
                                scl_log_factory=hooks._installed_scl_log_factory)
            what = f"{node.name} {self.disk_delays[node.name] * 1000:.0f}ms"
        elif kind == "writer-crash":
            what = c.writer_name
            c.writer.crash()
            await asyncio.sleep(FAILOVER_AFTER_S)
            await self._fail_over()
        elif kind == "replica-crash":
            rep = c.replicas[0]
            what = rep.name
            rep.crash()
            self._down.append(rep)
        self.note(f"fault {kind} {what}")
        self.net.cut_blocked()
        return what

    def _corrupt(self, node) -> int:
        path = os.path.join(node.data_dir, "data.mdb")
        with open(path, "rb") as f:
            data = bytearray(f.read())
        flips, start = 0, 0
        while flips < 4:
            i = data.find(self.corrupt_pattern, start)
            if i < 0:
                break
            data[i + self.rng.randrange(len(self.corrupt_pattern))] ^= 0xFF
            flips += 1
            start = i + len(self.corrupt_pattern) + self.rng.randrange(4096)
        with open(path, "r+b") as f:
            f.write(data)
        return flips

    async def _fail_over(self) -> None:
        for attempt in range(10):
            try:
                if await self.cluster.fail_over(self.ctl):
                    self.note(f"failover: {self.cluster.writer_name} is the writer")
                    return
                break
            except RpcError as exc:
                self.note(f"failover attempt {attempt} failed: {exc.status}")
                await asyncio.sleep(1.0)
        # No replica could take over: the writer restarts (recovery on start).
        self.note(f"writer {self.cluster.writer_name} restarts")
        await self.cluster.writer.start(None)

    async def heal(self) -> None:
        rules = self.net.rules
        rules.blocked.clear()
        rules.drop_p.clear()
        rules.dup_p.clear()
        rules.delay_ms.clear()
        rules.reorder_ms.clear()
        self.disk_delays.clear()
        down, self._down = self._down, []
        for proc in down:
            if proc.up:
                continue
            if hasattr(proc, "restarts"):
                await proc.restart()
            else:
                await proc.start(self.cluster.writer.address)
        c = self.cluster
        if not c.writer.up:
            await self._fail_over()
        self.note("heal")
