"""Test hooks that reach into every process: injected faults and planted bugs.

Two kinds of switch, both OFF unless an environment variable turns them on, both read by
processes of every layer (storage nodes, the writer, replicas), so this module imports no
grpc and nothing of engine/ above engine/format: storage_node/ may import it.

**The fault file** ($AURORA_FAULTS_FILE). The nemesis (engine/chaos/nemesis.py) rewrites
ONE JSON file that every process of the cluster re-reads when it changes (at most every
``CHECK_INTERVAL_S``, through engine/format/watched_json.py). A process obeys it only if
``$AURORA_FAULTS_FILE`` names it when the process starts. All keys are optional::

    {
      "names": {"127.0.0.1:40011": "sn1", ...},      address -> process name
      "links": [                                       per directed link, src -> dst
        {"src": "db1", "dst": "sn5", "kind": "partition"},
        {"src": "sn1", "dst": "*",   "kind": "drop", "p": 0.2},
        {"src": "*",   "dst": "sn3", "kind": "delay", "ms": 30},
        {"src": "db1", "dst": "sn2", "kind": "duplicate", "p": 0.5},
        {"src": "db1", "dst": "sn4", "kind": "reorder", "ms": 20}
      ],
      "disk": {"sn3": {"delay_ms": 50}},               slow fsync of one storage node
      "commit": {"db1": {"piece_pause_ms": 500}}       a writer pauses between the pieces of
                                                       a commit in pieces (engine/db/mtr.py),
                                                       so a test can kill it mid-commit
    }

``FaultState`` is that file as one process sees it. The link rules are applied on every
call a process makes, by the transport seam (engine/transport/links.py documents what
each kind does), so the gRPC transport and a simulated one obey them alike; the disk rule by ``disk_delay_s``, which a storage node's group commit sleeps
before each LMDB commit. Randomness comes from ``random.Random`` seeded with
$AURORA_FAULTS_SEED and the process name, so one seed gives one schedule.

**Planted bugs**: test-only switches that break a guarantee ON PURPOSE, so the
reliability suite can prove its checkers catch real bugs (tests/test_chaos_planted.py):
each test plants one bug, runs a scenario and expects a checker to REPORT the violation;
the same scenario without the bug must pass. Never set them outside such a test. They are
read from the environment of the process that has the code::

    variable                        where              what breaks
    AURORA_BUG_ACK_BEFORE_COMMIT=S  storage_node/node  a storage node acks an Append from
                                                       memory and commits it to LMDB only S
                                                       seconds later (invariant 3)
    AURORA_BUG_VDL_SHORT_QUORUM=1   engine/writer/     PGCL is the (Vw-1)-th highest SCL, so
                                    quorum             VDL passes records that only 3 of 6
                                                       segments hold (invariant 5); read
                                                       once, at import
    AURORA_BUG_SCL_OVERCLAIM=1      storage_node/node  a storage node acks each batch's
                                                       highest LSN as its SCL, even when a
                                                       gap in the chain keeps its real SCL
                                                       lower (invariant 4)
    AURORA_BUG_REPLICA_ABOVE_VDL=1  engine/instance/   a replica applies every whole MTR as
                                    replica            it arrives, also above the VDL it was
                                                       told (invariant 11)
    AURORA_BUG_BACKTRACK_CUT_SHORT=1 engine/writer/    a backtrack's new truncation range
                                    backtrack          starts at the commit before its target,
                                                       so the target's transaction,
                                                       acknowledged at the point, is hidden

**In-process state** (``install_state``): the deterministic simulator (engine/sim/) runs
every process in one Python process, so it hands the slow-disk rules and the SCL log
sink to this module directly instead of through a fault file.
"""

from __future__ import annotations

import logging
import os
import random
import time
import zlib

from engine.format.watched_json import CHECK_INTERVAL_S, WatchedJson

FAULTS_FILE_ENV = "AURORA_FAULTS_FILE"
FAULTS_SEED_ENV = "AURORA_FAULTS_SEED"
LINK_KINDS = ("partition", "drop", "delay", "duplicate", "reorder")

ACK_BEFORE_COMMIT_ENV = "AURORA_BUG_ACK_BEFORE_COMMIT"
VDL_SHORT_QUORUM_ENV = "AURORA_BUG_VDL_SHORT_QUORUM"
SCL_OVERCLAIM_ENV = "AURORA_BUG_SCL_OVERCLAIM"
REPLICA_ABOVE_VDL_ENV = "AURORA_BUG_REPLICA_ABOVE_VDL"
BACKTRACK_CUT_SHORT_ENV = "AURORA_BUG_BACKTRACK_CUT_SHORT"
PLANTED_BUG_ENVS = (ACK_BEFORE_COMMIT_ENV, VDL_SHORT_QUORUM_ENV, SCL_OVERCLAIM_ENV,
                    REPLICA_ABOVE_VDL_ENV, BACKTRACK_CUT_SHORT_ENV)

#: Set by install_state (the simulator): {node: delay_s} and a factory of SCL logs.
_installed_disk_delays: dict[str, float] | None = None
_installed_scl_log_factory = None

log = logging.getLogger("aurora_lite.faults")
_bug_log = logging.getLogger("aurora_lite.planted_bugs")

#: What WatchedJson.poll gives once when the fault file disappears.
_FILE_GONE = object()


# --- the fault file ---------------------------------------------------------------------------


class FaultState:
    """The fault file as seen by one process (``me``), re-read when it changes."""

    def __init__(self, path: str, me: str, interval_s: float = CHECK_INTERVAL_S) -> None:
        self.path = path
        self.me = me
        seed = int(os.environ.get(FAULTS_SEED_ENV, "0") or 0)
        self.rng = random.Random(seed * 1_000_003 + zlib.crc32(me.encode()))
        self._file = WatchedJson(path, interval_s, missing=_FILE_GONE)
        self.names: dict[str, str] = {}
        self.links: list[dict] = []
        self.disk: dict[str, dict] = {}
        self.commit: dict[str, dict] = {}
        self.check(force=True)

    def check(self, force: bool = False) -> None:
        """Take the file's new content if it changed (stats it at most every interval)."""
        data = self._file.poll(force)
        if data is None:
            return
        if data is _FILE_GONE:  # no file: no faults
            if self.links or self.disk:
                log.info("fault file %s is gone: no faults", self.path)
            self.links, self.disk, self.commit = [], {}, {}
            return
        try:
            commit = {k: dict(v) for k, v in data.get("commit", {}).items()}
            names = dict(data.get("names", {}))
            links = [dict(r) for r in data.get("links", [])]
            disk = {k: dict(v) for k, v in data.get("disk", {}).items()}
            bad = [r for r in links if r.get("kind") not in LINK_KINDS]
            if bad:
                raise ValueError(f"unknown link kind in {bad[0]}")
        except (AttributeError, ValueError, TypeError) as exc:
            log.warning("cannot read the fault file %s: %s", self.path, exc)
            return
        mine = [r for r in links if r.get("src") in (self.me, "*")]
        if mine != [r for r in self.links if r.get("src") in (self.me, "*")] or disk != self.disk:
            log.info("injected faults now: links %s, disk %s", mine or "none",
                     disk.get(self.me, "none"))
        if commit != self.commit:
            log.info("injected commit pause now: %s", commit.get(self.me) or commit.get("*") or "none")
        self.names, self.links, self.disk, self.commit = names, links, disk, commit

    def rules_to(self, address: str) -> list[dict]:
        """Link rules for a call from this process to ``address`` (re-reads when due)."""
        self.check()
        if not self.links:
            return []
        dst = self.names.get(address, address)
        return [r for r in self.links
                if r.get("src") in (self.me, "*") and r.get("dst") in (dst, "*")]

    def disk_delay_s(self) -> float:
        self.check()
        spec = self.disk.get(self.me) or self.disk.get("*")
        return float(spec.get("delay_ms", 0.0)) / 1000.0 if spec else 0.0


    def piece_pause_s(self) -> float:
        self.check()
        spec = self.commit.get(self.me) or self.commit.get("*")
        return float(spec.get("piece_pause_ms", 0.0)) / 1000.0 if spec else 0.0


_STATES: dict[str, FaultState] = {}


def state_for(me: str) -> FaultState | None:
    """This process's FaultState, or None when $AURORA_FAULTS_FILE is not set."""
    path = os.environ.get(FAULTS_FILE_ENV)
    if not path:
        return None
    st = _STATES.get(me)
    if st is None:
        st = _STATES[me] = FaultState(path, me)
        log.info("%s obeys the fault file %s", me, path)
    return st


def install_state(*, disk_delays: dict[str, float] | None = None, scl_log_factory=None) -> None:
    """In-process fault state (the simulator, engine/sim/): ``disk_delays`` {node: seconds
    before each LMDB commit} replaces the fault file's disk rules; ``scl_log_factory(me)``
    returns the object whose ``record(segments)`` storage node ``me`` calls after each
    durable write (as SclLog). None for both: back to the environment."""
    global _installed_disk_delays, _installed_scl_log_factory
    _installed_disk_delays = disk_delays
    _installed_scl_log_factory = scl_log_factory


def disk_delay_s(me: str) -> float:
    """Extra seconds before each LMDB commit of storage node ``me`` (0 without faults)."""
    if _installed_disk_delays is not None:
        return _installed_disk_delays.get(me, 0.0)
    state = state_for(me)
    return 0.0 if state is None else state.disk_delay_s()


def commit_piece_pause_s(me: str) -> float:
    """Seconds writer ``me`` sleeps between the pieces of a commit in pieces (0 without
    faults): the fault file's "commit" rule, for tests that kill a writer mid-commit."""
    state = state_for(me)
    return 0.0 if state is None else state.piece_pause_s()


# --- planted bugs -----------------------------------------------------------------------------


def ack_before_commit_s() -> float:
    """Seconds a storage node defers its LMDB commit after acking (0: bug not planted)."""
    raw = os.environ.get(ACK_BEFORE_COMMIT_ENV, "")
    return float(raw) if raw else 0.0


def vdl_short_quorum() -> bool:
    """True when the writer's PGCL needs one segment fewer than the write quorum."""
    return os.environ.get(VDL_SHORT_QUORUM_ENV, "") not in ("", "0")


def scl_overclaim() -> bool:
    """True when a storage node acks each batch's highest LSN whatever its SCL is."""
    return os.environ.get(SCL_OVERCLAIM_ENV, "") not in ("", "0")


def replica_above_vdl() -> bool:
    """True when a replica applies whole MTRs above the VDL it was told."""
    return os.environ.get(REPLICA_ABOVE_VDL_ENV, "") not in ("", "0")


def backtrack_cut_short() -> bool:
    """PLANTED BUG switch (test only): a backtrack hides its own target's transaction."""
    return os.environ.get(BACKTRACK_CUT_SHORT_ENV, "") not in ("", "0")


def warn_if_planted(where: str) -> None:
    """One WARNING line per process with a planted bug, so a log shows it was on purpose."""
    planted = [f"{name}={os.environ[name]}" for name in PLANTED_BUG_ENVS
               if os.environ.get(name, "") not in ("", "0")]
    if planted:
        _bug_log.warning("%s runs with a PLANTED BUG (%s): test only", where, ", ".join(planted))


# --- The storage nodes' own record of their SCLs (chaos mode only) -------------------------
#
# In chaos mode every storage node appends one line per durable write transaction that
# changed the SCL of any of its segments, to ``scl-<node>.log`` next to the fault file
# (not in the node's data dir: a wiped node keeps its record). The durability checker
# (engine/chaos/checkers.py, check_acks_held_by_storage) reads them. One line per segment
# whose SCL changed, written after the LMDB commit returned and before any ack of that
# transaction is sent::
#
#     <monotonic_s> <wall_s> <volume> <pg> <scl>
#
# monotonic_s is time.monotonic() (CLOCK_MONOTONIC, shared by every process of the host,
# the clock the workload stamps its acks with); wall_s is for people reading the file.

SCL_LOG_PREFIX = "scl-"


def scl_log_path(me: str, faults_file: str | None = None) -> str | None:
    """Where storage node ``me`` records its SCLs; None outside chaos mode."""
    faults_file = faults_file or os.environ.get(FAULTS_FILE_ENV)
    if not faults_file:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(faults_file)), f"{SCL_LOG_PREFIX}{me}.log")


class SclLog:
    """Appends the SCL changes of one storage node's write transactions (see above)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last: dict[tuple, int] = {}
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, segments) -> None:
        """``segments``: [((volume, pg), meta with .scl)] after a commit; one write()."""
        now_mono, now_wall = time.monotonic(), time.time()
        lines = []
        for key, meta in segments:
            if self._last.get(key) != meta.scl:
                self._last[key] = meta.scl
                lines.append(f"{now_mono:.6f} {now_wall:.6f} {key[0]} {key[1]} {meta.scl}\n")
        if lines:
            os.write(self._fd, "".join(lines).encode())

    def close(self) -> None:
        os.close(self._fd)


def scl_log_for(me: str) -> SclLog | None:
    if _installed_scl_log_factory is not None:
        return _installed_scl_log_factory(me)
    path = scl_log_path(me)
    return None if path is None else SclLog(path)
