"""Fast clones, backtrack and time-travel reads over real processes (issue 7).

Six storage-node processes (tests/harness.py), writers, clone writers and a replica
(tests/writer_harness.py), real gRPC. Each test uses its own volume names, so the module
shares one storage cluster.

The oracle is a ``History``: every commit the client saw acknowledged, with its commit LSN,
the client's clock just before the request was sent and just after the reply came, the
commit before it on its timeline, and the full state of the volume after it. Backtracks are
events in it too. From it:

* the state "as of LSN N" for a commit LSN N is that commit's recorded state; for an LSN
  between two commits of the current timeline, the earlier commit's state;
* the state "as of time T" is unambiguous only when T falls in a *gap*: after one event's
  reply and before the next event's request (commit timestamps are taken by the writer
  between the two, on the same machine's clock). ``time_points`` gives the middle of every
  gap of at least MIN_GAP_US that follows a commit, with that commit as the answer: the
  volume as it was at T (for a backtrack by time, the timeline that was current at T).

Every random choice comes from one seed, printed at the start; AURORA_SEED=<seed> replays.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import grpc
import pytest

from aurora_pb import database_pb2 as pb
from engine.errors import DatabaseError, KeyNotFound, OutOfWindowError
from tests.writer_harness import WriterProcess

WINDOW_ARGS = ["--backtrack-window", "600"]
KEYS = [b"k%02d" % i for i in range(30)]
SCAN_LIMIT = 10_000
MIN_GAP_US = 3_000           # a time point needs this much quiet time around it
PG_COUNT, STRIPE_PAGES = 8, 2
CONVERGE_S = 30.0            # how long a replica may take to follow


def _seed() -> int:
    seed = int(os.environ.get("AURORA_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (AURORA_SEED={seed} replays)")
    return seed


def _now_us() -> int:
    return time.time_ns() // 1000


# --- The oracle --------------------------------------------------------------------------

@dataclass(eq=False)
class Commit:
    """One acknowledged commit: LSN, client clock around it, state after it."""

    lsn: int
    send_us: int
    ack_us: int
    state: dict
    parent: "Commit | None"          # previous commit on its timeline (None: the first)
    timeline: int

    def __repr__(self) -> str:
        return f"Commit(lsn={self.lsn}, timeline={self.timeline}, keys={len(self.state)})"


@dataclass
class History:
    """Acknowledged commits and backtracks in the order they happened (module doc)."""

    commits: list[Commit] = field(default_factory=list)
    events: list[tuple[int, int, Commit | None]] = field(default_factory=list)  # (send, ack, commit|None)
    head: Commit | None = None       # the commit the volume ends at now
    timeline: int = 0

    @property
    def state(self) -> dict:
        return dict(self.head.state) if self.head else {}

    def committed(self, lsn: int, send_us: int, ack_us: int, writes: dict) -> Commit:
        state = self.state
        for k, v in writes.items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        c = Commit(lsn, send_us, ack_us, state, self.head, self.timeline)
        self.commits.append(c)
        self.events.append((send_us, ack_us, c))
        self.head = c
        return c

    def backtracked(self, send_us: int, ack_us: int, target: Commit) -> None:
        """After a backtrack to ``target``: new commits start a new timeline after it."""
        self.events.append((send_us, ack_us, None))
        self.head = target
        self.timeline += 1

    def lineage(self) -> list[Commit]:
        """The commits visible now (the current timeline back to the first), oldest first."""
        out, c = [], self.head
        while c is not None:
            out.append(c)
            c = c.parent
        return out[::-1]

    def current_at(self, lsn: int = 0, time_us: int = 0) -> Commit:
        """The last commit of the current timeline at or before an LSN, or acknowledged
        before a time (a time point: no commit of it straddles the time)."""
        lineage = self.lineage()
        if lsn:
            return [c for c in lineage if c.lsn <= lsn][-1]
        return [c for c in lineage if c.ack_us < time_us][-1]

    def time_points(self) -> list[tuple[int, Commit]]:
        """(T, commit): T in the middle of a quiet gap right after ``commit``'s reply."""
        out = []
        for (_s, ack, c), (nxt_send, _a, _c) in zip(self.events, self.events[1:]):
            if c is not None and nxt_send - ack >= MIN_GAP_US:
                out.append((ack + (nxt_send - ack) // 2, c))
        return out

    def by_lsn(self, lsn: int) -> Commit:
        return next(c for c in self.commits if c.lsn == lsn)


def random_commits(db, h: History, rng: random.Random, n: int, gap_p: float = 0.35) -> None:
    """``n`` acknowledged commits of random puts and deletes over KEYS (autocommit put,
    autocommit delete of a present key, or a transaction of 2-4 of those), recorded in
    ``h``; with probability ``gap_p`` a 4-12 ms pause after a commit makes a time point."""
    for _ in range(n):
        state = h.state
        op = rng.random()
        writes: dict = {}
        send = _now_us()
        if op < 0.5 or not state:
            key = rng.choice(KEYS)
            value = b"v%d-" % rng.randrange(1 << 30) + bytes(rng.randrange(40))
            lsn = db.put(key, value)
            writes[key] = value
        elif op < 0.7:
            key = rng.choice(sorted(state))
            lsn = db.delete(key)
            writes[key] = None
        else:
            txn = db.begin()
            local = dict(state)
            for _ in range(rng.randint(2, 4)):
                if local and rng.random() < 0.3:
                    key = rng.choice(sorted(local))
                    txn.delete(key)
                    del local[key]
                    writes[key] = None
                else:
                    key = rng.choice(KEYS)
                    value = b"t%d-" % rng.randrange(1 << 30)
                    txn.put(key, value)
                    local[key] = value
                    writes[key] = value
            lsn = txn.commit()
        ack = _now_us()
        assert lsn > 0, "a commit must return its commit LSN"
        h.committed(lsn, send, ack, writes)
        if rng.random() < gap_p:
            time.sleep(rng.uniform(0.004, 0.012))


# --- Access helpers ----------------------------------------------------------------------

def scan(db, **as_of) -> dict:
    """The whole default table (optionally as of an LSN or time) as a dict."""
    return dict(db.scan(limit=SCAN_LIMIT, **as_of))


class Admin:
    """The InstanceAdmin stub of an instance, with a deadline on every call."""

    def __init__(self, w: WriterProcess, timeout_s: float = 60.0) -> None:
        self.stub, self.channel = w.admin()
        self.timeout_s = timeout_s

    def backtrack(self, to_lsn: int = 0, to_time_us: int = 0):
        return self.stub.Backtrack(pb.BacktrackRequest(to_lsn=to_lsn, to_time_us=to_time_us),
                                   timeout=self.timeout_s)

    def info(self):
        return self.stub.BacktrackInfo(pb.BacktrackInfoRequest(), timeout=self.timeout_s)

    def clone(self, name: str, at_lsn: int = 0, at_time_us: int = 0):
        return self.stub.CreateClone(pb.CreateCloneRequest(name=name, at_lsn=at_lsn,
                                                           at_time_us=at_time_us),
                                     timeout=self.timeout_s)

    def volumes(self) -> dict:
        reply = self.stub.ListVolumes(pb.ListVolumesRequest(), timeout=self.timeout_s)
        return {v.name: v for v in reply.volumes}

    def drop(self, name: str):
        return self.stub.DropVolume(pb.DropVolumeRequest(name=name), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def aurora_code(exc: grpc.RpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == "aurora-error":
            return value
    return ""


def refused(call, *args, **kwargs) -> grpc.RpcError:
    """Run an admin call that must fail; return its gRPC error."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def assert_out_of_window(exc: grpc.RpcError, what: str, limit: str = "window") -> None:
    """OUT_OF_WINDOW, and the message names the limit: the window, or for a clone its fork."""
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE, f"{what}: {exc.code()} {exc.details()}"
    assert aurora_code(exc) == "OUT_OF_WINDOW", f"{what}: aurora-error {aurora_code(exc)!r}"
    assert limit in exc.details().lower(), f"{what}: the message must state the {limit}: {exc.details()}"


def wait_for(what: str, probe, expected, deadline_s: float = CONVERGE_S, seed: int = 0):
    """Poll ``probe()`` until it returns ``expected``; errors count as "not yet"."""
    deadline = time.monotonic() + deadline_s
    last = None
    while True:
        try:
            last = probe()
            if last == expected:
                return
        except DatabaseError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"seed {seed}: {what}: not converged after {deadline_s}s; "
                                 f"expected {_short(expected)}, last seen {_short(last)}")
        time.sleep(0.1)


def _short(x) -> str:
    if isinstance(x, dict):
        return f"{len(x)} keys {sorted(x)[:8]}..."
    return repr(x)[:300]


def diff(got: dict, want: dict) -> str:
    keys = sorted(set(got) | set(want))
    bad = [(k, got.get(k), want.get(k)) for k in keys if got.get(k) != want.get(k)]
    return f"{len(bad)} keys differ (key, got, want): {bad[:6]}"


def check_scan(db, want: dict, what: str, seed: int, **as_of) -> None:
    got = scan(db, **as_of)
    assert got == want, f"seed {seed}: {what}: {diff(got, want)}"


# --- Fixtures ----------------------------------------------------------------------------

@pytest.fixture
def procs(storage_cluster, tmp_path):
    """make(volume, instance=..., **kw) starts a writer for a volume (a new one, or a clone
    made by CreateClone); every process's log is checked for ERROR lines at the end."""
    started: list[WriterProcess] = []

    def make(volume: str, instance: str = "db1", start: bool = True, **kw) -> WriterProcess:
        kw.setdefault("extra_args", WINDOW_ARGS)
        w = WriterProcess(storage_cluster, tmp_path / f"{volume}-{instance}", volume=volume,
                          pg_count=PG_COUNT, stripe_pages=STRIPE_PAGES, instance=instance, **kw)
        started.append(w)
        if start:
            w.start()
        return w

    def replica(w: WriterProcess, instance: str = "db2") -> WriterProcess:
        r = w.replica(tmp_path / f"replica-{instance}", instance=instance)
        started.append(r)
        r.start()
        return r

    make.replica = replica
    yield make
    for p in started:
        errors = p.error_lines()
        p.close()
        assert not errors, f"{p.instance} ({p.log_path}) logged errors: {errors[:5]}"


# --- (a) Model-based: as-of reads, clones and backtracks equal the history ----------------

@pytest.mark.timeout(240)
def test_model_as_of_clone_and_backtrack_back_and_forth(procs):
    """Scenario: a seeded random history of ~60 commits over 30 keys. At random points:
    as-of-LSN and as-of-time scans, and gets, equal the model's state there; a clone made at
    an LSN and one made at a time equal it; a backtrack to a point equals it; then writes on
    the new timeline and backtracks back and forth (by LSN and by time, to points of every
    timeline) each equal the model's state at the target; as-of reads after that still
    answer from the history; a SIGKILLed and restarted writer keeps the last backtrack."""
    seed = _seed()
    rng = random.Random(seed)
    w = procs("mb")
    h = History()
    db = w.client()
    admin = Admin(w)
    try:
        random_commits(db, h, rng, 60)
        check_scan(db, h.state, "the present", seed)

        info = admin.info()
        assert info.window_s == pytest.approx(600), info
        assert info.earliest_lsn <= h.commits[0].lsn, f"seed {seed}: first commit not reachable: {info}"
        assert info.latest_lsn >= h.commits[-1].lsn, f"seed {seed}: last commit not reachable: {info}"
        assert info.earliest_time_us <= h.commits[0].ack_us and info.latest_time_us >= h.commits[-1].send_us, info

        # As-of reads by LSN: at a commit, and just below the next commit.
        points = rng.sample(range(len(h.commits) - 1), 6)
        for i in points:
            c, nxt = h.commits[i], h.commits[i + 1]
            check_scan(db, c.state, f"as of commit lsn {c.lsn} (#{i})", seed, as_of_lsn=c.lsn)
            if nxt.lsn - 1 > c.lsn:
                check_scan(db, c.state, f"as of lsn {nxt.lsn - 1} (#{i}, below the next commit)",
                           seed, as_of_lsn=nxt.lsn - 1)
            for key in rng.sample(KEYS, 4):
                if key in c.state:
                    assert db.get(key, as_of_lsn=c.lsn) == c.state[key], f"seed {seed}: get {key!r} @{c.lsn}"
                else:
                    with pytest.raises(KeyNotFound):
                        db.get(key, as_of_lsn=c.lsn)

        # As-of reads by time (in quiet gaps).
        tps = h.time_points()
        assert len(tps) >= 6, f"seed {seed}: only {len(tps)} time points in the history"
        for t_us, c in rng.sample(tps, 6):
            check_scan(db, c.state, f"as of time {t_us} (after commit {c.lsn})", seed, as_of_time_us=t_us)
            key = rng.choice(sorted(c.state)) if c.state else KEYS[0]
            if key in c.state:
                assert db.get(key, as_of_time_us=t_us) == c.state[key], f"seed {seed}: get {key!r} @t{t_us}"

        # Clones: one named by an LSN between two commits, one named by a time.
        i = rng.choice(points)
        c, nxt = h.commits[i], h.commits[i + 1]
        reply = admin.clone("mb-c1", at_lsn=nxt.lsn - 1)
        assert c.lsn <= reply.fork_lsn < nxt.lsn, f"seed {seed}: fork {reply.fork_lsn} for commit {c.lsn}"
        t_us, tc = rng.choice(tps)
        reply2 = admin.clone("mb-c2", at_time_us=t_us)
        later = [x.lsn for x in h.commits if x.lsn > tc.lsn]
        assert tc.lsn <= reply2.fork_lsn < min(later, default=1 << 63), (
            f"seed {seed}: fork {reply2.fork_lsn} for time {t_us} (commit {tc.lsn})")
        assert reply2.fork_time_us <= t_us, reply2
        for name, want, fork in (("mb-c1", c, reply.fork_lsn), ("mb-c2", tc, reply2.fork_lsn)):
            cw = procs(name, instance="dbc")
            with cw.client() as cdb, Admin(cw) as cadmin:
                check_scan(cdb, want.state, f"clone {name} (commit {want.lsn})", seed)
                check_scan(cdb, want.state, f"clone {name} as of its fork {fork}", seed, as_of_lsn=fork)
                if want.parent is not None:   # inside the parent's window, but before the fork
                    with pytest.raises(OutOfWindowError, match="(?i)window|fork"):
                        scan(cdb, as_of_lsn=want.parent.lsn)
                    assert_out_of_window(refused(cadmin.backtrack, to_lsn=want.parent.lsn),
                                         f"backtrack of clone {name} before its fork", "fork")
                check_scan(cdb, want.state, f"clone {name} after the refusals", seed)
            assert cw.stop() == 0
        check_scan(db, h.state, "the parent after cloning", seed)

        # Backtrack to one of the points, by LSN.
        target = h.commits[rng.choice(points)]
        _backtrack_and_check(db, admin, h, target, seed, by_time=None)
        random_commits(db, h, rng, 5)
        check_scan(db, h.state, "new timeline after the first backtrack", seed)

        # Back and forth: targets on any timeline, by LSN or by time; writes in between.
        for step in range(7):
            if rng.random() < 0.5:
                target, t_us = rng.choice(h.commits), None
            else:
                t_us, target = rng.choice(h.time_points())
            _backtrack_and_check(db, admin, h, target, seed, by_time=t_us, step=step)
            if rng.random() < 0.6:
                random_commits(db, h, rng, rng.randint(1, 4))
                check_scan(db, h.state, f"writes after backtrack step {step}", seed)

        # As-of reads after the backtracks. They read the CURRENT timeline (engine/writer/backtrack.py:
        # "map a time or LSN to the last commit at or before it on the current timeline"),
        # unlike a backtrack, which goes to the timeline the target belongs to. Points of
        # abandoned timelines, by LSN or by time, so answer with the current timeline's last
        # commit at or before them.
        lineage = h.lineage()
        for c in rng.sample(lineage, min(4, len(lineage))):
            check_scan(db, c.state, f"after backtracks: as of lsn {c.lsn} (current timeline)",
                       seed, as_of_lsn=c.lsn)
        vdl = db.status().vdl
        for c in rng.sample(h.commits, 6):
            if c.lsn > vdl:   # above the current timeline's end: not a point of it
                with pytest.raises(OutOfWindowError, match="VDL"):
                    scan(db, as_of_lsn=c.lsn)
                continue
            want = h.current_at(lsn=c.lsn)
            check_scan(db, want.state, f"after backtracks: as of lsn {c.lsn} (timeline {c.timeline}): "
                                       f"current timeline's commit {want.lsn}", seed, as_of_lsn=c.lsn)
        for t_us, c in rng.sample(h.time_points(), 6):
            want = h.current_at(time_us=t_us)
            check_scan(db, want.state, f"after backtracks: as of time {t_us} (after commit {c.lsn}, "
                                       f"timeline {c.timeline}): current timeline's commit "
                                       f"{want.lsn}", seed, as_of_time_us=t_us)

        # A crash keeps the rewound state (recovery opens the newest timeline).
        db.close()
        admin.close()
        w.kill()
        w.start()
        db, admin = w.client(), Admin(w)
        check_scan(db, h.state, "after SIGKILL and restart", seed)
        random_commits(db, h, rng, 3)
        check_scan(db, h.state, "writes after restart", seed)
    finally:
        db.close()
        admin.close()


def _backtrack_and_check(db, admin: Admin, h: History, target: Commit, seed: int,
                         by_time: int | None, step: int = -1) -> None:
    what = (f"backtrack step {step} to " + (f"time {by_time}" if by_time else f"lsn {target.lsn}")
            + f" (commit {target.lsn}, timeline {target.timeline})")
    send = _now_us()
    reply = admin.backtrack(to_time_us=by_time) if by_time else admin.backtrack(to_lsn=target.lsn)
    ack = _now_us()
    assert reply.target_lsn == target.lsn, f"seed {seed}: {what}: reply {reply}"
    assert reply.vdl >= reply.target_lsn, f"seed {seed}: {what}: reply {reply}"
    h.backtracked(send, ack, target)
    check_scan(db, target.state, what, seed)
    key = KEYS[step % len(KEYS)]
    if key in target.state:
        assert db.get(key) == target.state[key], f"seed {seed}: {what}: get {key!r}"
    else:
        with pytest.raises(KeyNotFound):
            db.get(key)


# --- (b) Clone isolation, clones of clones, dropping a parent -----------------------------

@pytest.mark.timeout(240)
def test_clone_isolation_chain_and_drop_parent(procs, storage_cluster):
    """Scenario: volume iso, clone iso-c1 of it, clone iso-c2 of iso-c1 (tiny buffer pools,
    so reads go to storage). Writes to any of the three never show in the others; ListVolumes
    names each parent and fork LSN, with shared bytes for the clones. iso-c1 is stopped and
    dropped: iso-c2, restarted, still reads everything it shared and takes writes."""
    seed = _seed()
    rng = random.Random(seed)
    small = {"buffer_pool_pages": 8}

    def fill(db, model, prefix: bytes, n: int) -> None:
        for i in range(n):
            key, value = prefix + b"%03d" % i, rng.randbytes(rng.randrange(1, 200))
            db.put(key, value)
            model[key] = value

    p = procs("iso", **small)
    m_p: dict = {}
    with p.client() as db, Admin(p) as admin:
        fill(db, m_p, b"base-", 80)
        reply1 = admin.clone("iso-c1")
        assert reply1.fork_lsn > 0
    m_c1 = dict(m_p)

    c1 = procs("iso-c1", instance="dbc1", **small)
    with p.client() as pdb, c1.client() as cdb:
        check_scan(cdb, m_c1, "iso-c1 right after its creation", seed)
        fill(pdb, m_p, b"parent-", 30)
        fill(cdb, m_c1, b"clone1-", 30)
        for db, model, tag in ((pdb, m_p, b"P"), (cdb, m_c1, b"C1")):
            db.put(b"base-001", tag)
            model[b"base-001"] = tag
        pdb.delete(b"base-002")
        del m_p[b"base-002"]
        cdb.delete(b"base-003")
        del m_c1[b"base-003"]
        check_scan(pdb, m_p, "parent after both wrote", seed)
        check_scan(cdb, m_c1, "iso-c1 after both wrote", seed)

    with Admin(c1) as admin_c1:
        reply2 = admin_c1.clone("iso-c2")
    m_c2 = dict(m_c1)
    c2 = procs("iso-c2", instance="dbc2", **small)
    with p.client() as pdb, c1.client() as c1db, c2.client() as c2db:
        check_scan(c2db, m_c2, "iso-c2 right after its creation", seed)
        fill(c2db, m_c2, b"clone2-", 20)
        fill(c1db, m_c1, b"clone1-late-", 10)
        c2db.put(b"base-004", b"C2")
        m_c2[b"base-004"] = b"C2"
        check_scan(pdb, m_p, "parent after the grandchild wrote", seed)
        check_scan(c1db, m_c1, "iso-c1 after its clone wrote", seed)
        check_scan(c2db, m_c2, "iso-c2 after its parent wrote", seed)

    with Admin(p) as admin:
        vols = admin.volumes()
        assert {"iso", "iso-c1", "iso-c2"} <= set(vols), sorted(vols)
        assert vols["iso"].parent == "" and not vols["iso"].dropped, vols["iso"]
        assert vols["iso-c1"].parent == "iso" and vols["iso-c1"].fork_lsn == reply1.fork_lsn, vols["iso-c1"]
        assert vols["iso-c2"].parent == "iso-c1" and vols["iso-c2"].fork_lsn == reply2.fork_lsn, vols["iso-c2"]
        for name in ("iso-c1", "iso-c2"):
            assert vols[name].shared_bytes > 0, f"{name} shares nothing? {vols[name]}"
            assert vols[name].owned_bytes > 0, f"{name} wrote its own records: {vols[name]}"

        # Drop the middle volume (its writer stopped first).
        assert c1.stop() == 0
        admin.drop("iso-c1")
        vols = admin.volumes()
        assert "iso-c1" not in vols or vols["iso-c1"].dropped, vols.get("iso-c1")
        assert not vols["iso-c2"].dropped
    time.sleep(2.0)   # let storage GC run (FAST_TUNING: every 0.3 s) after the drop

    assert c2.stop() == 0
    c2.start()
    with c2.client() as c2db, p.client() as pdb:
        check_scan(c2db, m_c2, "iso-c2 after its parent was dropped (restarted)", seed)
        fill(c2db, m_c2, b"clone2-after-drop-", 10)
        check_scan(c2db, m_c2, "iso-c2 writes after the drop", seed)
        check_scan(pdb, m_p, "iso after the drop of its clone", seed)


# --- (c) Refusals: clear errors, and the writer serves on ---------------------------------

@pytest.mark.timeout(240)
def test_out_of_window_unknown_lsn_and_existing_name_are_refused(procs):
    """Scenario: a writer with a 2 s backtrack window: commits A, 3 s of quiet, commits B.
    As-of reads (client and raw), a backtrack and a clone naming an A point are refused with
    OUT_OF_WINDOW stating the window; so are a backtrack to an LSN never written, and on a
    clone, as-of reads, a backtrack and a clone before its fork. A clone under an existing
    name and dropping one's own volume are refused. After every refusal the writer serves
    on with its state unchanged."""
    seed = _seed()
    rng = random.Random(seed)
    w = procs("err", extra_args=["--backtrack-window", "2"])
    h = History()
    with w.client() as db, Admin(w) as admin:
        random_commits(db, h, rng, 6, gap_p=0.0)
        a = list(h.commits)
        time.sleep(3.0)
        random_commits(db, h, rng, 10)
        b = h.commits[len(a):]

        def serves_on(what: str) -> None:
            assert w.running(), f"seed {seed}: writer died after {what}"
            check_scan(db, h.state, f"state after {what}", seed)
            random_commits(db, h, rng, 1, gap_p=0.0)

        info = admin.info()
        assert info.window_s == pytest.approx(2), info
        assert info.earliest_lsn > a[0].lsn, f"seed {seed}: A[0] should be out of the 2 s window: {info}"
        assert info.latest_lsn >= h.commits[-1].lsn, info

        # Inside the window: B points answer.
        check_scan(db, b[3].state, "as of B[3]", seed, as_of_lsn=b[3].lsn)

        with pytest.raises(OutOfWindowError, match="(?i)window"):
            scan(db, as_of_lsn=a[0].lsn)
        serves_on("as-of lsn before the window")
        with pytest.raises(OutOfWindowError, match="(?i)window"):
            db.get(KEYS[0], as_of_time_us=a[0].ack_us)
        serves_on("as-of time before the window")
        with pytest.raises(OutOfWindowError, match="(?i)window"):
            scan(db, as_of_time_us=a[1].ack_us)
        serves_on("as-of scan by time before the window")

        assert_out_of_window(refused(admin.backtrack, to_lsn=a[1].lsn), "backtrack to lsn before the window")
        serves_on("backtrack to lsn before the window")
        assert_out_of_window(refused(admin.backtrack, to_time_us=a[0].ack_us), "backtrack to time before the window")
        serves_on("backtrack to time before the window")
        assert_out_of_window(refused(admin.clone, "err-old", at_lsn=a[1].lsn), "clone before the window")
        serves_on("clone before the window")
        assert "err-old" not in admin.volumes(), "a refused clone must not leave a volume behind"

        never = admin.info().latest_lsn + 1_000_000
        exc = refused(admin.backtrack, to_lsn=never)
        assert_out_of_window(exc, f"backtrack to lsn {never}, never written")
        serves_on("backtrack to an LSN never written")
        with pytest.raises(OutOfWindowError):
            scan(db, as_of_lsn=never)
        serves_on("as-of an LSN never written")

        reply = admin.clone("err-c")
        exc = refused(admin.clone, "err-c")
        assert exc.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.INVALID_ARGUMENT), f"{exc.code()} {exc.details()}"
        assert "err-c" in exc.details(), exc.details()
        serves_on("clone with an existing name")
        exc = refused(admin.clone, "err")
        assert "err" in exc.details() and exc.code() != grpc.StatusCode.UNKNOWN, f"{exc.code()} {exc.details()}"
        serves_on("clone named like its own volume")
        exc = refused(admin.drop, "err")
        assert exc.code() != grpc.StatusCode.UNKNOWN and exc.details(), f"{exc.code()} {exc.details()}"
        serves_on("drop of its own volume")
        fork_state = next(c for c in reversed(h.commits) if c.lsn <= reply.fork_lsn).state

    # On the clone: nothing before its fork (even inside the parent's window).
    cw = procs("err-c", instance="dbc")
    with cw.client() as cdb, Admin(cw) as cadmin:
        check_scan(cdb, fork_state, "clone err-c", seed)
        before_fork = b[0].lsn
        assert before_fork < reply.fork_lsn
        with pytest.raises(OutOfWindowError, match="(?i)window|fork"):
            scan(cdb, as_of_lsn=before_fork)
        with pytest.raises(OutOfWindowError, match="(?i)window|fork"):
            scan(cdb, as_of_time_us=b[0].send_us)
        assert_out_of_window(refused(cadmin.backtrack, to_lsn=before_fork),
                             "backtrack of a clone before its fork", "fork")
        assert_out_of_window(refused(cadmin.clone, "err-cc", at_lsn=before_fork),
                             "clone of a clone before its fork", "fork")
        check_scan(cdb, fork_state, "clone err-c after the refusals", seed)
        cdb.put(b"clone-alive", b"1")
        assert cdb.get(b"clone-alive") == b"1"
    with w.client() as db:
        check_scan(db, h.state, "parent at the end", seed)


# --- (d) A replica follows a backtrack -------------------------------------------------------

@pytest.mark.timeout(240)
def test_replica_follows_backtrack(procs):
    """Scenario: a writer and a replica; 40 random commits. Backtrack to a random point: the
    replica's scans converge to the state there; new writes on the new timeline reach it;
    a backtrack forward to a commit of the first timeline (by LSN) does too."""
    seed = _seed()
    rng = random.Random(seed)
    w = procs("rep")
    r = procs.replica(w, instance="db2")
    h = History()
    with w.client() as db, r.client() as rdb, Admin(w) as admin:
        random_commits(db, h, rng, 40, gap_p=0.1)
        wait_for("replica catches up", lambda: scan(rdb), h.state, seed=seed)

        target = h.commits[rng.randrange(5, 30)]
        _backtrack_and_check(db, admin, h, target, seed, by_time=None)
        wait_for(f"replica after backtrack to {target.lsn}", lambda: scan(rdb), target.state, seed=seed)

        random_commits(db, h, rng, 5, gap_p=0.0)
        wait_for("replica after writes on the new timeline", lambda: scan(rdb), h.state, seed=seed)

        forward = h.commits[rng.randrange(h.commits.index(target) + 1, 40)]
        _backtrack_and_check(db, admin, h, forward, seed, by_time=None)
        wait_for(f"replica after backtrack forward to {forward.lsn}", lambda: scan(rdb),
                 forward.state, seed=seed)
        check_scan(db, forward.state, "writer after the forward backtrack", seed)


# --- (b2) A parent's backtrack leaves its clones alone -------------------------------------

@pytest.mark.timeout(240)
def test_parent_backtrack_does_not_change_its_clone(procs):
    """Scenario: volume pb gets 60 commits, clone pb-c is made as of now, then pb backtracks
    to its 10th commit and writes on. The clone (tiny buffer pool, restarted so that every
    read goes to storage) still reads exactly its fork state plus its own writes: a clone
    reads its parent "as of the fork", which a later backtrack of the parent must not hide."""
    seed = _seed()
    rng = random.Random(seed)
    w = procs("pb", buffer_pool_pages=8)
    h = History()
    with w.client() as db, Admin(w) as admin:
        random_commits(db, h, rng, 60, gap_p=0.0)
        reply = admin.clone("pb-c")
        fork_state = h.state
        assert reply.fork_lsn >= h.commits[-1].lsn, reply
        c = procs("pb-c", instance="dbc", buffer_pool_pages=8)
        with c.client() as cdb:
            check_scan(cdb, fork_state, "clone before the parent's backtrack", seed)
        target = h.commits[10]
        _backtrack_and_check(db, admin, h, target, seed, by_time=None)
        random_commits(db, h, rng, 5, gap_p=0.0)
        check_scan(db, h.state, "parent after its backtrack and new writes", seed)
    time.sleep(2.0)   # storage GC and coalescing run meanwhile (FAST_TUNING)
    assert c.stop() == 0
    c.start()
    with c.client() as cdb:
        check_scan(cdb, fork_state, "clone after its parent backtracked (restarted clone)", seed)
        cdb.put(b"clone-own", b"1")
        fork_state[b"clone-own"] = b"1"
        check_scan(cdb, fork_state, "clone writes after its parent backtracked", seed)
