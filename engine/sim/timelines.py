"""The checkers' model of timelines: what a backtrack or a clone must keep, hide and show.

A backtrack (docs/clones.md) legitimately removes acknowledged commits, so the chaos
checkers (engine/chaos/checkers.py), which assume one timeline, cannot judge a schedule
with backtrack episodes. This module follows timelines from what the CLIENT knows (the
ops it was acknowledged, with their commit LSNs and virtual times, and the backtracks the
control plane asked for and was answered), never from the writer's or storage's state,
and judges the same records against them. No I/O.

A timeline is what a commit LSN must satisfy to be visible on it, in the same terms as
storage's truncation sets (invariants 5, 10), but with bounds the client can know::

    Timeline.hidden   ranges (start, end]: hidden on it
    Timeline.bound    the highest LSN it may show (None: the current one, no bound yet)

A backtrack to L (always the commit LSN of an acknowledged op) that the writer answered
with target T:

- picks, as the writer does, the newest timeline on which L is visible (the current one
  first): "forward again" when L is hidden on the current one;
- must land on L itself (T == L: L is a commit on that timeline) and reopen at VDL >= T;
- ends the current timeline at bound ``end_lo`` and starts a new one: the chosen
  timeline's ranges that end below T, plus (T, end_lo], where ``end_lo`` is the highest
  LSN the client had seen before the backtrack began (acknowledged LSNs, every range end
  and bound so far): every LSN allocated before the backtrack is at or below the real
  end the writer picked, and every LSN allocated after it is above that, so the client's
  (T, end_lo] hides a subset of what storage hides and nothing it shows.

An op whose run overlaps the backtrack's (it began before the answer and was acknowledged
after the request) may have been committed on either timeline: it is ``ambiguous`` for
good, and judged like an op of unknown outcome (may or may not show). An op that began
after the answer is on the new timeline: it must show until a later backtrack hides it.

Checks (each returns violation strings; empty: green):

    check_backtracks      each answered backtrack landed on its target, reopened at or
                          above it
    check_reads           every bank read (writer or replica) is the history at its read
                          point on some timeline it may have read: for the writer one
                          current at some moment of the read, for a replica any timeline
                          begun before the read (a replica may lag behind a backtrack)
    judge_final           after heal, on the final timeline: every acknowledged register
                          visible there is present with its value, every acknowledged
                          register it hides is absent, the bank is that timeline's
                          history plus some subset of the unknown transfers
    check_monotonic       VDL / epoch never move back, except that a new epoch opens at
                          the target of a backtrack that happened in between (SCL as in
                          engine/chaos/checkers.check_monotonic)
    judge_clone           a clone at fork F shows exactly the acknowledged state of the
                          timeline it was made on as of F, plus its own acknowledged
                          writes, and none of the parent's later writes; the parent shows
                          none of the clone's writes
"""

from __future__ import annotations

import types
import bisect
from dataclasses import dataclass, field

from engine.chaos import checkers
from engine.chaos.checkers import INITIAL, _possible


@dataclass
class Timeline:
    hidden: tuple = ()                 # ((start, end, asked_s), ...): (start, end] hidden by
                                       # the backtrack asked at virtual time asked_s
    bound: int | None = None           # highest LSN it may show; None: current, open
    began_s: float = 0.0               # virtual time the backtrack that made it was asked
    ended_s: float | None = None       # virtual time the next one was answered

    def shows(self, lsn: int) -> bool:
        if self.bound is not None and lsn > self.bound:
            return False
        return not any(s < lsn <= e for s, e, _t in self.hidden)


@dataclass
class Backtrack:
    """One backtrack episode as the control plane saw it."""
    lsn: int                           # the requested LSN (an acknowledged commit)
    t0: float                          # asked
    t1: float = 0.0                    # answered (or its outcome found out)
    happened: bool = False
    target: int = 0                    # the commit the volume ends at (the answer)
    vdl: int = 0                       # VDL after reopening (the answer; 0: not answered)
    forward: bool = False              # L hidden on the current timeline: forward again
    error: str = ""


@dataclass
class Clone:
    """One clone episode: the fork, the timeline it was made on, what the client saw."""
    name: str
    fork_lsn: int
    t0: float
    t1: float
    timeline: Timeline
    puts: list = field(default_factory=list)          # checkers.Put on the clone
    transfers: list = field(default_factory=list)     # checkers.Transfer on the clone
    reads: list = field(default_factory=list)         # (when, registers dict, accounts dict)
    error: str = ""


class Timelines:
    """The timelines of one schedule (see the module doc), built as backtracks happen."""

    def __init__(self, workload: checkers.Workload) -> None:
        self.w = workload
        self.lines: list[Timeline] = [Timeline()]
        self.backtracks: list[Backtrack] = []
        self.clones: list[Clone] = []
        self.ambiguous: set[int] = set()      # id() of ops that may be on either side
        self._acked_by_t1 = None              # (t1s, running max LSN): _lsn_floor, at judging
        self.violations: list[str] = []

    @property
    def current(self) -> Timeline:
        return self.lines[-1]

    def _ops(self):
        return list(self.w.transfers) + list(self.w.puts)

    def acked(self, op) -> bool:
        """Acknowledged and certainly on one side of every backtrack."""
        return op.outcome == "ok" and id(op) not in self.ambiguous

    def maybe(self, op) -> bool:
        """May have committed (unknown outcome, or acknowledged around a backtrack)."""
        return op.outcome in ("unknown", "pending") or (op.outcome == "ok" and id(op) in self.ambiguous)

    # -- choosing targets (the nemesis asks; the answer decides nothing) --------------------

    def targets(self, now_s: float, forward: bool) -> list[int]:
        """LSNs a backtrack may name: acknowledged commits shown on the current timeline
        (forward=False), or shown on an older one and hidden on the current (True)."""
        cur = self.current
        ops = [o for o in self._ops() if self.acked(o) and o.t1 <= now_s]
        if not forward:
            return sorted({o.lsn for o in ops if cur.shows(o.lsn)})
        return sorted({o.lsn for o in ops if not cur.shows(o.lsn)
                       and any(tl.shows(o.lsn) for tl in self.lines[:-1])})

    def timeline_of(self, lsn: int) -> Timeline | None:
        """The newest timeline on which lsn shows (the writer's choice, resolve_backtrack)."""
        for tl in reversed(self.lines):
            if tl.shows(lsn):
                return tl
        return None

    # -- recording ----------------------------------------------------------------------

    def record_backtrack(self, bt: Backtrack) -> None:
        """A backtrack was answered (or found to have happened, or not): update the model."""
        self.backtracks.append(bt)
        overlapping = [o for o in self._ops()
                       if o.outcome == "ok" and o.t0 < bt.t1 and o.t1 > bt.t0]
        if not bt.happened:
            return
        self.ambiguous.update(id(o) for o in overlapping)
        chosen = self.timeline_of(bt.lsn)
        if chosen is None:
            self.violations.append(f"timelines: backtrack to LSN {bt.lsn} at {bt.t0:.3f}s "
                                   f"happened, but no timeline the client knows shows it")
            chosen = self.current
        if bt.target != bt.lsn:
            self.violations.append(f"timelines: backtrack to LSN {bt.lsn} (an acknowledged "
                                   f"commit) landed at LSN {bt.target}")
        if bt.vdl and bt.vdl < bt.target:
            self.violations.append(f"timelines: backtrack to LSN {bt.target} reopened at VDL "
                                   f"{bt.vdl}, below its target: commits at or before the "
                                   f"point are gone")
        end_lo = max([bt.target] + [o.lsn for o in self._ops()
                                    if o.outcome == "ok" and o.t1 <= bt.t0]
                     + [e for tl in self.lines for _s, e, _t in tl.hidden]
                     + [tl.bound for tl in self.lines if tl.bound is not None])
        cur = self.current
        cur.bound, cur.ended_s = end_lo, bt.t1
        hidden = tuple(r for r in chosen.hidden if r[1] < bt.target) + ((bt.target, end_lo, bt.t0),)
        self.lines.append(Timeline(hidden=hidden, began_s=bt.t0))

    # -- judging ------------------------------------------------------------------------

    def _lsn_floor(self, op) -> int:
        """A lower bound on the LSN of an op of unknown outcome, had it committed: every op
        acknowledged before it began was allocated before it (LSNs only grow within a
        timeline, and a backtrack's new ones start above all earlier ones)."""
        if op.outcome == "ok":
            return op.lsn
        if self._acked_by_t1 is None:
            acked = sorted((o.t1, o.lsn) for o in self._ops() if o.outcome == "ok")
            self._acked_by_t1 = ([t for t, _ in acked], [])
            best = 0
            for _t, lsn in acked:
                best = max(best, lsn)
                self._acked_by_t1[1].append(best)
        times, best = self._acked_by_t1
        i = bisect.bisect_left(times, op.t0)
        return best[i - 1] if i else 0

    def may_show(self, op, tl: Timeline) -> bool:
        """May an op of unknown outcome (or an ambiguous acknowledged one) be on tl? Not if
        it began after tl ended, nor if it ended before a backtrack that hid everything
        above an LSN its own LSN is certainly above (it was allocated before that backtrack
        and above the range's start)."""
        if tl.ended_s is not None and op.t0 >= tl.ended_s:
            return False
        if op.outcome == "ok":   # ambiguous: its LSN may be above tl's bound (end_lo)
            return not any(s < op.lsn <= e for s, e, _t in tl.hidden)
        floor = self._lsn_floor(op)
        return not any(op.t1 <= asked_s and floor >= s for s, _e, asked_s in tl.hidden)

    def bank_on(self, tl: Timeline, read_point: int, at_s: float) -> tuple[dict, list]:
        """(balances after the acknowledged transfers shown on tl at or below read_point,
        the transfers that may or may not be in it)."""
        bal = dict.fromkeys(range(self.w.accounts), INITIAL)
        maybe = []
        for t in self.w.transfers:
            if self.acked(t) and t.lsn <= read_point and tl.shows(t.lsn):
                bal[t.src] -= t.amount
                bal[t.dst] += t.amount
            elif self.maybe(t) and t.t0 <= at_s and not (t.outcome == "ok" and t.lsn > read_point) \
                    and self.may_show(t, tl):
                maybe.append(t)
        return bal, maybe

    def check_reads(self) -> list[str]:
        out = []
        total = INITIAL * self.w.accounts
        if not self.w.reads:
            out.append("bank: no reads to judge: the read workload made no progress")
        for r in self.w.reads:
            if len(r.balances) != self.w.accounts or sum(r.balances.values()) != total:
                out.append(f"bank: read on {r.where} at read point {r.read_point} sums to "
                           f"{sum(r.balances.values())}, not {total}: {r.balances}")
                continue
            t0 = getattr(r, "t0", r.t)
            if r.where == "writer":
                lines = [tl for tl in self.lines
                         if tl.began_s <= r.t and (tl.ended_s is None or tl.ended_s >= t0)]
            else:
                lines = [tl for tl in self.lines if tl.began_s <= r.t]
            if not any(self._fits(tl, r) for tl in lines):
                out.append(f"bank: read on {r.where} at read point {r.read_point} at "
                           f"{r.t:.3f}s = {r.balances} is not the history at that point on "
                           f"any of the {len(lines)} timelines it may have read")
        return out

    def _fits(self, tl: Timeline, r) -> bool:
        expected, maybe = self.bank_on(tl, r.read_point, r.t)
        return _possible(expected, r.balances, maybe)

    def judge_final(self, got: dict, read_point: int, acc) -> list[str]:
        out = []
        final_tl = self.current
        for p in self.w.puts:
            if self.acked(p) and final_tl.shows(p.lsn) and got.get(p.key) != p.value:
                out.append(f"lost write: {p.key!r} = {p.value!r} acknowledged at commit LSN "
                           f"{p.lsn}, shown on the final timeline, reads {got.get(p.key)!r} "
                           f"after heal (read point {read_point})")
            if p.outcome == "ok" and not final_tl.shows(p.lsn) and p.key in got:
                out.append(f"resurrected write: {p.key!r} acknowledged at commit LSN {p.lsn} "
                           f"was hidden by a backtrack but reads {got[p.key]!r} after heal")
            if p.outcome == "fail" and p.key in got:
                out.append(f"phantom write: {p.key!r} was reported as not done but is present")
        missing = [t for t in self.w.transfers
                   if self.acked(t) and final_tl.shows(t.lsn) and t.lsn > read_point]
        if missing:
            out.append(f"lost write: {len(missing)} acknowledged transfers on the final "
                       f"timeline have commit LSNs above the final read point {read_point}")
        final = {int(k[5:]): int(v) for k, v in acc}
        expected, maybe = self.bank_on(final_tl, read_point, float("inf"))
        if sum(final.values()) != INITIAL * self.w.accounts:
            out.append(f"bank: final total {sum(final.values())} != {INITIAL * self.w.accounts}")
        elif not _possible(expected, final, maybe):
            out.append(f"lost write: final bank {final} at read point {read_point} is not the "
                       f"final timeline's history {expected} plus any subset of {len(maybe)} "
                       f"transfers of unknown outcome")
        return out

    def finalize(self) -> None:
        """Before judging: an op still running when a backtrack was recorded and
        acknowledged after it was asked is ambiguous too."""
        for bt in self.backtracks:
            if bt.happened:
                self.ambiguous.update(id(o) for o in self._ops()
                                      if o.outcome == "ok" and o.t0 < bt.t1 and o.t1 > bt.t0)
        self._acked_by_t1 = None

    def check_backtracks(self) -> list[str]:
        return list(self.violations)

    def check_monotonic(self, sampler) -> list[str]:
        """VDL and epoch (see the module doc); SCL exactly as the chaos checker does."""
        out = []
        done = sorted((b for b in self.backtracks if b.happened), key=lambda b: b.t0)
        best_epoch, best_vdl, max_vdl_seen = 0, 0, 0
        for t, epoch, vdl in sampler.vdl_samples:
            if epoch > best_epoch and done and done[0].t0 <= t:
                while done and done[0].t0 <= t:
                    max_vdl_seen = done.pop(0).target
            if epoch < best_epoch:
                out.append(f"monotonic: volume epoch went back from {best_epoch} to {epoch}")
            elif epoch == best_epoch and vdl < best_vdl:
                out.append(f"monotonic: VDL went back from {best_vdl} to {vdl} in epoch {epoch}")
            elif epoch > best_epoch and vdl < max_vdl_seen:
                out.append(f"monotonic: epoch {epoch} opened at VDL {vdl}, below VDL "
                           f"{max_vdl_seen} of the timeline it continues (acknowledged "
                           f"commits lost)")
            if epoch >= best_epoch:
                best_epoch, best_vdl = epoch, max(vdl, best_vdl if epoch == best_epoch else 0)
            max_vdl_seen = max(max_vdl_seen, vdl)
        scl_only = types.SimpleNamespace(vdl_samples=[], scl_samples=sampler.scl_samples)
        return out + checkers.check_monotonic(scl_only)

    def judge_clone(self, clone: Clone, registers: dict, accounts: dict, when: str,
                    with_own: bool) -> list[str]:
        """A read of the clone (see the module doc); ``with_own``: its own writes count."""
        out = []
        tl, fork = clone.timeline, clone.fork_lsn
        where = f"clone {clone.name} (fork LSN {fork}) {when}"
        for p in self.w.puts:
            on_fork = p.lsn <= fork and tl.shows(p.lsn)
            if self.acked(p) and on_fork and registers.get(p.key) != p.value:
                out.append(f"{where}: {p.key!r} acknowledged at LSN {p.lsn} before the fork "
                           f"reads {registers.get(p.key)!r}")
            if p.key in registers and not (on_fork and (self.acked(p) or self.maybe(p))):
                out.append(f"{where}: {p.key!r} (LSN {p.lsn or '?'}, {p.outcome}) is not in "
                           f"the parent's state at the fork but shows in the clone")
        own = {p.key: p for p in clone.puts}
        for key, value in registers.items():
            if key.startswith(b"x-"):
                p = own.get(key) if with_own else None
                if p is None or p.outcome == "fail":
                    out.append(f"{where}: {key!r} shows but the clone never wrote it then")
        if with_own:
            for p in clone.puts:
                if p.outcome == "ok" and registers.get(p.key) != p.value:
                    out.append(f"{where}: its own write {p.key!r} acknowledged at LSN {p.lsn} "
                               f"reads {registers.get(p.key)!r}")
        total = INITIAL * self.w.accounts
        if sum(accounts.values()) != total or len(accounts) != self.w.accounts:
            out.append(f"{where}: the bank sums to {sum(accounts.values())}, not {total}")
            return out
        own_transfers = [t for t in clone.transfers if with_own]
        expected, maybe = self.bank_on(tl, fork, clone.t0)
        for t in own_transfers:
            if t.outcome == "ok":
                expected[t.src] -= t.amount
                expected[t.dst] += t.amount
            elif t.outcome != "fail":
                maybe.append(t)
        if not _possible(expected, accounts, maybe):
            out.append(f"{where}: the bank {accounts} is not the parent's acknowledged "
                       f"history at the fork {expected} (plus the clone's own transfers) with "
                       f"any subset of {len(maybe)} transfers of unknown outcome")
        return out


def judge(tls: Timelines, final, sampler) -> list[str]:
    """Every timeline-aware check (the chaos checkers' counterparts, see the module doc),
    for a schedule with backtrack or clone episodes; durability at ack is judged apart
    (engine/chaos/checkers.judge_acks_held holds across timelines as it is)."""
    tls.finalize()
    out = tls.check_backtracks()
    out += tls.check_reads()
    out += [final] if isinstance(final, str) else tls.judge_final(*final)
    out += tls.check_monotonic(sampler)
    for clone in tls.clones:
        if clone.error:
            out.append(f"clone {clone.name}: {clone.error}")
        for when, registers, accounts, with_own in clone.reads:
            out += tls.judge_clone(clone, registers, accounts, when, with_own)
    return out
