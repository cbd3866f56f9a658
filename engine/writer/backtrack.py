"""Time travel on versioned storage: as-of reads, backtrack and fast clones (docs/clones.md).

Storage never overwrites: a page as of any LSN at or above the GC horizon can be built from
its versions and records (invariant 12 keeps them). This module is the writer's side of
three features built on that, plus the retention window that keeps GC back far enough:

    feature          what the writer does                                  storage RPCs
    time-travel read map a time or LSN to the last commit at or before it    FindCommit,
                     on the current timeline; read pages as of it           ReadPage
    backtrack        pause, pick the target commit on the timeline it        VolumeHistory,
                     belongs to, write a new whole truncation set under a    FindCommit,
                     new epoch (records past the point hidden, not deleted), Truncate(replace)
                     reopen through recovery
    fast clone       CreateVolume(parent, fork_lsn) at a write quorum:      CreateVolume
                     nothing copied; the clone's pages start as the
                     parent's as of the fork
    retention        GC horizon <= the LSN the volume had at now - window,   (SetGcHorizon,
                     and never inside a range some timeline in the window    engine/replication)
                     could make visible again

Timelines. Every truncation set a recovery or backtrack writes is kept on storage as a
history row (epoch, time it became current, VDL the previous timeline ended at, the set).
Timeline i is current from its time to the next row's; a commit c belongs to it if no
range of its set hides c and c <= the VDL it ended at (its successor's prev_vdl; the live
VDL for the current one). Backtracking to a target on timeline i writes the set
``{ranges of i below c} + {(c, end, new_epoch)}`` where ``end`` is past every LSN ever
allocated, so the new timeline is timeline i cut at c, and new LSNs start above ``end``.

Worked example (LAL 100; commits at LSNs 10, 20, 30; backtrack to 20; write 131; back to
30 again)::

    history            set                          visible
    epoch 2 (open)     {(30+... none)}              10 20 30
    epoch 3 backtrack  {(20, 130, 3)}               10 20           then 131 is written
    epoch 4 backtrack  {(30, 231, 4)}               10 20 30        (131 hidden, kept)

Time is mapped to LSNs through the timestamps in COMMIT records (engine/format/redo.py).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import os
import time

from aurora_pb import storage_pb2 as pb
from engine.errors import DatabaseError, OutOfWindowError, RpcError, UnavailableError
from engine.writer.recovery import gather_per_node, truncate_request
from engine.format.volume import VR, VW
from engine.format.page import META_PAGE_ID

log = logging.getLogger(__name__)

BACKTRACK_WINDOW_DEFAULT_S = float(os.environ.get("AURORA_BACKTRACK_WINDOW_S", "3600"))
BACKTRACK_WINDOW_MAX_S = 72 * 3600.0
RPC_TIMEOUT_S = 5.0
#: How long write_backtrack waits before asking silent nodes a second time: longer than a
#: channel's largest reconnect backoff (1 s) with gRPC's 20% jitter.
RECONNECT_WAIT_S = 1.5
CLOCK_SAMPLES_MAX = 100_000


class BacktrackNotStarted(Exception):
    """A backtrack refused before it wrote anything (wraps the error to report)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def fmt_time(time_us: int) -> str:
    if not time_us:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time_us / 1e6)) + f".{time_us % 1_000_000 // 1000:03d}"


def _tuples(ranges) -> tuple:
    return tuple((t.start_lsn, t.end_lsn, t.epoch) for t in ranges)


def _pb_ranges(truncs) -> list:
    return [pb.TruncationRange(start_lsn=s, end_lsn=e, epoch=ep) for s, e, ep in truncs]


def hidden(lsn: int, truncs) -> bool:
    # BEGIN LAB 6: is lsn inside a range (start, end] of the truncation set truncs?
    return any(start < lsn <= end for start, end, _ in truncs)
    # END LAB 6


class CommitClock:
    """(timestamp_us, commit LSN) of this writer's own commits, for the retention floor
    without a storage round trip; thinned to one sample per 10 ms."""

    def __init__(self) -> None:
        self.times: collections.deque = collections.deque()
        self.lsns: collections.deque = collections.deque()

    def add(self, time_us: int, lsn: int) -> None:
        if self.times and time_us - self.times[-1] < 10_000:
            self.lsns[-1] = lsn
            return
        self.times.append(time_us)
        self.lsns.append(lsn)
        if len(self.times) > CLOCK_SAMPLES_MAX:
            self.times.popleft()
            self.lsns.popleft()

    def at_or_before(self, time_us: int) -> int | None:
        """Highest sampled commit LSN with timestamp <= time_us (None: none sampled)."""
        # BEGIN LAB 6: time -> LSN: the newest sample at or before time_us (binary search)
        i = bisect.bisect_right(self.times, time_us)
        return self.lsns[i - 1] if i else None
        # END LAB 6

    def prune(self, before_us: int) -> None:
        """Forget samples older than the newest one at or before ``before_us``."""
        while len(self.times) > 1 and self.times[1] <= before_us:
            self.times.popleft()
            self.lsns.popleft()


class TimeTravel:
    """The writer's view of its volume's history (see the module docstring)."""

    def __init__(self, driver, window_s: float | None = None) -> None:
        window_s = BACKTRACK_WINDOW_DEFAULT_S if window_s is None else float(window_s)
        if not 0 <= window_s <= BACKTRACK_WINDOW_MAX_S:
            raise DatabaseError(f"backtrack window {window_s:g} s is outside 0..{BACKTRACK_WINDOW_MAX_S:g} s (72 h)")
        self.driver = driver
        self.window_s = window_s
        self.clock = CommitClock()
        self.opened_us = time.time_ns() // 1000
        self.open_floor = 0   # retention floor found at open (for times before it)
        self.history: list = []  # [(epoch, time_us, prev_vdl, truncs)] oldest first
        self.fork_lsn = 0        # a clone's creation point: nothing before it is reachable
        self._open_vdl = 0

    # -- storage queries ---------------------------------------------------------------

    async def _each_node(self, call, names=None) -> dict:
        """{node: reply or RpcError} of ``call(stub)`` on every node, or on ``names`` (one
        PG's members, invariant 15) (recovery's helper)."""
        return await gather_per_node(self.driver, lambda _name, stub: call(stub), RPC_TIMEOUT_S,
                                     names)

    def _meta_members(self) -> tuple[str, ...]:
        """The members of the PG that holds the META page, so every COMMIT record and
        every truncation set (each is written to every PG)."""
        return self.driver.members(self.driver.layout.pg_of(META_PAGE_ID))

    async def find_commit(self, *, upto_lsn: int, max_time_us: int = 0, after_lsn: int = 0,
                          truncs=None, forward: bool = False) -> tuple[int, int]:
        """(lsn, time_us) of the newest (or, forward, oldest) commit visible under
        ``truncs`` (None: the current timeline) in (after_lsn, upto_lsn]; (0, 0) if none.
        Asks every node; a commit at or below a VDL is on a write quorum, so the read
        quorum of answers sees it."""
        request = pb.FindCommitRequest(volume=self.driver.volume, upto_lsn=upto_lsn,
                                       after_lsn=after_lsn, max_time_us=max_time_us,
                                       forward=forward, use_set=truncs is not None,
                                       set=_pb_ranges(truncs or ()))
        answers = await self._each_node(lambda stub: stub.FindCommit(request, timeout_s=RPC_TIMEOUT_S),
                                        self._meta_members())
        good = [a for a in answers.values() if not isinstance(a, RpcError)]
        if len(good) < VR:
            raise UnavailableError(f"time-travel lookup reached {len(good)} of the {VR} nodes it needs")
        found = [(a.lsn, a.time_us) for a in good if a.lsn]
        if not found:
            return 0, 0
        return min(found) if forward else max(found)

    async def load_history(self) -> list:
        """Every timeline (truncation set) a read quorum of nodes recorded, oldest first."""
        request = pb.VolumeHistoryRequest(volume=self.driver.volume)
        answers = await self._each_node(lambda stub: stub.VolumeHistory(request, timeout_s=RPC_TIMEOUT_S),
                                        self._meta_members())
        good = [a for a in answers.values() if not isinstance(a, RpcError)]
        if len(good) < VR:
            raise UnavailableError(f"volume history reached {len(good)} of the {VR} nodes it needs")
        by_epoch = {}
        for a in good:
            for e in a.entries:
                by_epoch[e.epoch] = (e.epoch, e.time_us, e.prev_vdl, _tuples(e.set))
        self.history = [by_epoch[k] for k in sorted(by_epoch)]
        return self.history

    # -- the window ----------------------------------------------------------------------

    async def on_open(self) -> None:
        """At open: the history, and the retention floor for times before this writer."""
        self.opened_us = time.time_ns() // 1000
        self._open_vdl = self.driver.vdl
        await self.load_history()
        states = await self._each_node(lambda stub: stub.NodeStatus(pb.NodeStatusRequest(),
                                                                    timeout_s=RPC_TIMEOUT_S))
        # For times before this writer opened, the floor is the GC horizon the previous
        # writer left: it was at or below the floor of its time, and a floor only rises
        # (a backtrack target is at or above it too). No scan of the log at open, so
        # opening (failover) does not grow with the commits inside the window.
        horizon = 0
        for a in states.values():
            if not isinstance(a, RpcError):
                for v in a.volumes:
                    if v.volume == self.driver.volume and v.parent:
                        self.fork_lsn = max(self.fork_lsn, v.fork_lsn)
                for seg in a.segments:
                    if seg.volume == self.driver.volume:
                        horizon = max(horizon, seg.gc_horizon)
        self.open_floor = min(horizon, self.driver.vdl)

    def retention_floor(self) -> int:
        """Lowest LSN the window may still need (GC horizon cap, invariant 12): the
        volume's state at now - window, and never inside a truncation range of a timeline
        current within the window that reaches above that point."""
        start_us = time.time_ns() // 1000 - int(self.window_s * 1e6)
        if start_us < self.opened_us:
            floor = self.open_floor
        else:
            sampled = self.clock.at_or_before(start_us)
            floor = self.driver.vdl if sampled is None else sampled
            # (no own commit since open at or before start_us: the volume's state then is
            # that at open, which no later GC needs beyond the open VDL's pages.)
            if sampled is None:
                floor = min(floor, self._open_vdl)
            self.clock.prune(start_us)
        sets = [self.driver.truncations]
        sets += [h[3] for i, h in enumerate(self.history)
                 if i + 1 >= len(self.history) or self.history[i + 1][1] >= start_us]
        for _ in range(8):
            capped = min([floor] + [s for truncs in sets for s, e, _ in truncs if s < floor <= e])
            if capped == floor:
                break
            floor = capped
        return floor

    async def window(self) -> dict:
        """Earliest and latest reachable points (backtrack info)."""
        vdl = self.driver.vdl
        floor = self.retention_floor()
        start_us = time.time_ns() // 1000 - int(self.window_s * 1e6)
        latest = await self.find_commit(upto_lsn=vdl)
        earliest = (0, 0)
        if floor:
            at = await self.find_commit(upto_lsn=floor)
            if at[0]:
                earliest = (at[0], max(at[1], start_us))
        if not earliest[0]:
            earliest = await self.find_commit(upto_lsn=vdl, forward=True)
        if self.fork_lsn and earliest[0] < self.fork_lsn:   # a clone starts at its fork
            earliest = await self.find_commit(upto_lsn=self.fork_lsn)
        return {"earliest_lsn": earliest[0], "earliest_time_us": earliest[1],
                "latest_lsn": latest[0], "latest_time_us": latest[1], "window_s": self.window_s,
                "timelines": len(self.history)}

    def _window_text(self, info: dict) -> str:
        return (f"the window is LSN {info['earliest_lsn']} ({fmt_time(info['earliest_time_us'])}) "
                f"to LSN {info['latest_lsn']} ({fmt_time(info['latest_time_us'])}), "
                f"backtrack window {self.window_s:g} s")

    # -- resolving a target --------------------------------------------------------------

    async def resolve_current(self, *, lsn: int = 0, time_us: int = 0, what: str) -> tuple[int, int]:
        """The last commit at or before an LSN or time on the CURRENT timeline, checked
        against the window: (lsn, time_us). For as-of reads and clones."""
        vdl = self.driver.vdl
        if lsn and time_us:
            raise DatabaseError(f"{what}: give an LSN or a time, not both")
        if lsn > vdl:
            raise OutOfWindowError(f"{what}: LSN {lsn} is above the volume's VDL {vdl}; "
                                   f"{self._window_text(await self.window())}")
        now_us = time.time_ns() // 1000
        if time_us > now_us:
            raise OutOfWindowError(f"{what}: time {fmt_time(time_us)} is in the future")
        found = await self.find_commit(upto_lsn=lsn or vdl, max_time_us=time_us)
        await self._check_in_window(found, lsn=lsn, time_us=time_us, what=what)
        return found

    async def _check_in_window(self, found, *, lsn: int, time_us: int, what: str) -> None:
        floor = self.retention_floor()
        start_us = time.time_ns() // 1000 - int(self.window_s * 1e6)
        target = f"LSN {lsn}" if lsn else f"time {fmt_time(time_us)}"
        if self.fork_lsn and ((lsn and lsn < self.fork_lsn) or found[0] < self.fork_lsn):
            raise OutOfWindowError(f"{what}: {target} is before this clone's creation point "
                                   f"(fork LSN {self.fork_lsn})")
        if not found[0]:
            raise OutOfWindowError(f"{what}: no commit at or before {target} is kept; "
                                   f"{self._window_text(await self.window())}")
        if found[0] < floor or (time_us and time_us < start_us):
            raise OutOfWindowError(f"{what}: {target} is before the retention window; "
                                   f"{self._window_text(await self.window())}")
        if self.fork_lsn and found[0] < self.fork_lsn:
            raise OutOfWindowError(f"{what}: {target} is before this clone's creation point "
                                   f"(fork LSN {self.fork_lsn})")

    async def resolve_backtrack(self, *, lsn: int = 0, time_us: int = 0):
        """(commit lsn, time_us, truncation set of its timeline) for a backtrack target:
        the timeline current at that time, or the newest timeline on which that LSN was
        visible (the current one first)."""
        if bool(lsn) == bool(time_us):
            raise DatabaseError("backtrack: give exactly one of an LSN or a time")
        await self.load_history()
        vdl = self.driver.vdl
        current = tuple(self.driver.truncations)
        timelines = []   # (set, bound, start_us), newest first; bound: its last VDL
        bound = vdl
        timelines.append((current, vdl, self.history[-1][1] if self.history else 0))
        for i in range(len(self.history) - 1, 0, -1):
            bound = self.history[i][2]
            timelines.append((self.history[i - 1][3], bound, self.history[i - 1][1]))
        if self.history:
            timelines.append(((), self.history[0][2], 0))   # before the first set
        chosen = None
        if time_us:
            for truncs, bound, start_us in timelines:
                if start_us <= time_us:
                    chosen = (truncs, bound)
                    break
            if chosen is None:
                chosen = timelines[-1][:2]
        else:
            for truncs, bound, _start in timelines:
                if lsn <= bound and not hidden(lsn, truncs):
                    chosen = (truncs, bound)
                    break
            if chosen is None:
                raise OutOfWindowError(
                    f"backtrack: LSN {lsn} was never a durable point of this volume's history; "
                    f"{self._window_text(await self.window())}")
        truncs, bound = chosen
        found = await self.find_commit(upto_lsn=min(lsn, bound) if lsn else bound,
                                       max_time_us=time_us, truncs=truncs)
        await self._check_in_window(found, lsn=lsn, time_us=time_us, what="backtrack")
        return found[0], found[1], truncs

    async def write_backtrack(self, target: int, truncs) -> tuple[int, int]:
        """Make (target, end] hidden under a new epoch at a write quorum of every PG:
        the new set is the target's timeline cut at target. Returns (epoch, end)."""
        driver = self.driver
        volume, layout = driver.volume, driver.layout
        states = await self._each_node(lambda stub: stub.NodeStatus(pb.NodeStatusRequest(),
                                                                    timeout_s=RPC_TIMEOUT_S))
        if sum(not isinstance(a, RpcError) for a in states.values()) < VW:
            # A node restarted a moment ago may still sit in its channel's reconnect backoff
            # (at most 1 s, engine/transport/grpc_transport.py) and fail a call at once:
            # ask the silent ones again once that has passed before refusing.
            await asyncio.sleep(RECONNECT_WAIT_S)
            again = await gather_per_node(
                self.driver, lambda name, stub: (
                    stub.NodeStatus(pb.NodeStatusRequest(), timeout_s=RPC_TIMEOUT_S)
                    if isinstance(states[name], RpcError) else _answered(states[name])),
                RPC_TIMEOUT_S)
            states.update(again)
        answered = [a for a in states.values() if not isinstance(a, RpcError)]
        if len(answered) < VW:
            raise BacktrackNotStarted(UnavailableError(
                f"backtrack needs {VW} storage nodes to write its truncation set; "
                f"{len(answered)} answer. Nothing was changed"))
        epoch, max_lsn = driver.epoch, driver.vdl
        for a in states.values():
            if isinstance(a, RpcError):
                continue
            for s in a.segments:
                if s.volume == volume:
                    epoch = max(epoch, s.volume_epoch)
                    max_lsn = max(max_lsn, s.max_lsn)
        # BEGIN LAB 6: the new set: the target's timeline cut at target, plus (target, end, new_epoch) with end past every LSN ever allocated
        ends = [e for h in self.history for _s, e, _ep in h[3]] + [e for _s, e, _ep in driver.truncations]
        end = max([driver.vdl + driver.lal, max_lsn, driver.allocator.next_lsn]
                  + [e + driver.lal for e in ends])
        new_epoch = epoch + 1
        new_set = tuple(sorted({t for t in truncs if t[1] < target} | {(target, end, new_epoch)},
                               key=lambda t: (t[2], t[0])))
        # END LAB 6
        now_us = time.time_ns() // 1000
        async def one_pg(pg):
            return pg, await self._each_node(lambda stub: stub.Truncate(
                truncate_request(volume, pg, new_epoch, new_set, now_us, driver.vdl, target),
                timeout_s=RPC_TIMEOUT_S), driver.members(pg))

        done = dict(await asyncio.gather(*(one_pg(pg) for pg in sorted(driver.created_pgs))))
        for pg, answers in done.items():
            ok = [n for n, a in answers.items() if not isinstance(a, RpcError)]
            if len(ok) < VW:
                raise UnavailableError(f"backtrack: the truncation of PG {pg} reached {len(ok)} "
                                       f"of the {VW} segments it needs; the volume is unchanged "
                                       f"until a backtrack or recovery succeeds")
        log.info("backtrack of %s: set %s at epoch %d (hid (%d, %d])", volume,
                 [(s, e) for s, e, _ in new_set], new_epoch, target, end)
        return new_epoch, end

    async def fork_tails(self, fork_lsn: int) -> list[int]:
        """Per PG, the last record at or below fork_lsn: the highest tail any node reports
        (each is durable on a write quorum, so a read quorum of answers holds it)."""
        driver = self.driver

        async def one_pg(pg):
            if pg not in driver.created_pgs:
                return 0   # growth: a PG never created has no record (docs/fleet.md)
            request = pb.SegmentStateRequest(volume=driver.volume, pg=pg, tail_bound=fork_lsn)
            answers = await self._each_node(lambda stub: stub.SegmentState(request, timeout_s=RPC_TIMEOUT_S),
                                            driver.members(pg))
            good = [a for a in answers.values() if not isinstance(a, RpcError)]
            if len(good) < VR:
                raise UnavailableError(f"clone: PG {pg} answered from {len(good)} of the {VR} "
                                       f"nodes it needs")
            return max(a.tail_lsn for a in good)

        return list(await asyncio.gather(*(one_pg(pg) for pg in range(driver.layout.pg_count))))

    async def create_clone(self, name: str, fork_lsn: int) -> None:
        driver = self.driver
        states = await self._each_node(lambda stub: stub.NodeStatus(pb.NodeStatusRequest(),
                                                                    timeout_s=RPC_TIMEOUT_S))
        for a in states.values():
            if not isinstance(a, RpcError) and any(v.volume == name for v in a.volumes):
                raise DatabaseError(f"clone {name!r}: a volume of that name already exists")
        tails = await self.fork_tails(fork_lsn)

        def request(node: str) -> pb.CreateVolumeRequest:
            # A clone's segments sit with its parent's (they share their bytes): each
            # node gets the PGs placed on it (invariant 15).
            return pb.CreateVolumeRequest(volume=name, pg_count=driver.layout.pg_count,
                                          stripe_pages=driver.layout.stripe_pages,
                                          pg_pages=driver.layout.pg_pages,
                                          stripe_width=driver.layout.stripe_width,
                                          volume_epoch=1, parent=driver.volume, fork_lsn=fork_lsn,
                                          fork_tails=tails,
                                          pgs=driver.pgs_on(node)
                                          if driver.memberships or driver.layout.grows else ())
        hosts = [n for n in driver.node_names if driver.pgs_on(n)]
        answers = await gather_per_node(
            driver, lambda node, stub: stub.CreateVolume(request(node), timeout_s=RPC_TIMEOUT_S),
            RPC_TIMEOUT_S, hosts)
        ok = [n for n, a in answers.items() if not isinstance(a, RpcError)]
        errors = [a for a in answers.values() if isinstance(a, RpcError)]
        short = [pg for pg in sorted(driver.created_pgs)
                 if sum(n in ok for n in driver.members(pg)) < VW]
        if short:
            detail = errors[0].detail if errors else ""
            if errors and errors[0].status == "INVALID_ARGUMENT":
                raise DatabaseError(f"clone {name!r}: {detail}")
            raise UnavailableError(f"clone {name!r}: PGs {short} reached fewer than the {VW} "
                                   f"nodes each needs ({detail})")


async def _answered(reply):
    """An awaitable of a reply already in hand (write_backtrack's second asking)."""
    return reply
