"""The scaling policies, pure: serverless capacity and replica auto scaling (docs/serverless.md).

No I/O, no clock, no asyncio: each decision is a function of a policy, a state and a load
sample (times are passed in), so it is unit-tested on recorded load traces
(tests/test_serverless.py). The control plane's loop (engine/cluster/serverless.py)
measures, calls these, and acts.

Serverless capacity (``decide_capacity``), per instance, every tick:

- the load: CPU used over the last interval against the instance's CPU share
  (``cpu_pct``: 100 = its whole share, engine/instance/capacity.py), the fraction of
  requests that queued for an admission slot, and buffer pool misses per second while
  the pool is full;
- UP FAST: when CPU is above ``target_cpu_pct``, or requests queue, or the full pool
  misses more than ``miss_up_per_s``: jump at once to the capacity that brings CPU back
  to the target (``acu * cpu_pct / target``), at least one step, rounded up to a 0.5 ACU
  step, at most ``max_acu``;
- DOWN SLOWLY: when CPU is below ``down_cpu_pct`` with no queueing and few misses for
  ``scale_down_delay_s``, one 0.5 ACU step down, then one more every
  ``scale_down_interval_s`` while it stays low, never below ``min_acu`` (so from max to
  min takes delay + (max - min) / 0.5 * interval: 15 s + 15 steps * 5 s = 90 s for 8 -> 0.5
  with the defaults, inside Aurora's "within three minutes");
- anything else holds the capacity (and restarts the down timer);
- AUTO-PAUSE (``min_acu`` 0 only): at 0.5 ACU with no request admitted for
  ``pause_after_s``, capacity 0: the control plane stops the instance until the next
  connection resumes it (engine/cluster/serverless.py).

Replica auto scaling (``decide_replicas``), target tracking on the replicas' average CPU
against their share:

- desired = ceil(replicas * avg_cpu_pct / target_cpu_pct), within min..max;
- below ``min_replicas``: add at once (no cooldown);
- scale OUT to desired when it is above the count and ``scale_out_cooldown_s`` passed
  since the last scale-out;
- scale IN by one replica when desired is below the count and ``scale_in_cooldown_s``
  passed since the last scaling action of either kind (a scale-in right after a scale-out
  would undo it before the new replica had any effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

ACU_STEP = 0.5


def round_up_step(acu: float) -> float:
    return math.ceil(acu / ACU_STEP - 1e-9) * ACU_STEP


# --- Serverless capacity ---------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityPolicy:
    min_acu: float
    max_acu: float
    target_cpu_pct: float = 70.0        # scale up above this, to bring CPU back to it
    down_cpu_pct: float = 30.0          # scale down only below this
    queued_up_fraction: float = 0.05    # more queued requests than this: scale up
    miss_up_per_s: float = 200.0        # misses/s of a full pool: one step up (memory)
    scale_down_delay_s: float = 15.0    # load low this long before the first step down
    scale_down_interval_s: float = 5.0  # then one step per interval
    pause_after_s: float = 300.0        # min_acu 0: idle this long at 0.5 ACU, then pause

    def check(self) -> None:
        if self.min_acu > self.max_acu:
            raise ValueError(f"--min-acu {self.min_acu:g} is above --max-acu {self.max_acu:g}")
        if self.scale_down_delay_s < 0 or self.scale_down_interval_s <= 0:
            raise ValueError("scale-down delay must be >= 0 s and its interval > 0 s")
        if not 0 < self.down_cpu_pct < self.target_cpu_pct <= 1000:
            raise ValueError("need 0 < down CPU % < target CPU %")
        if self.pause_after_s <= 0:
            raise ValueError("the auto-pause idle time must be > 0 s")

    @property
    def running_min_acu(self) -> float:
        """The lowest capacity while running (0 means paused, which this policy never picks)."""
        return max(self.min_acu, ACU_STEP)


@dataclass(frozen=True)
class LoadSample:
    """One interval of an instance's load, as the control plane measured it."""

    t_s: float                 # when (the control plane's clock)
    cpu_pct: float             # CPU used over the interval against the share (100 = all of it)
    queued_fraction: float = 0.0   # of the requests admitted in the interval, those that queued
    miss_per_s: float = 0.0    # buffer pool misses per second
    pool_full: bool = False    # resident pages >= capacity (misses mean too small a pool)
    requests: int = 1          # Database requests admitted in the interval (0: idle)


@dataclass(frozen=True)
class CapacityState:
    acu: float
    low_since_s: float | None = None     # load low since then (None: not low)
    last_down_s: float | None = None     # last step down
    idle_since_s: float | None = None    # no request admitted since then (auto-pause)


@dataclass(frozen=True)
class CapacityDecision:
    acu: float                 # the capacity to have now (== state's if unchanged)
    reason: str
    state: CapacityState


def decide_capacity(policy: CapacityPolicy, state: CapacityState, sample: LoadSample) -> CapacityDecision:
    acu = state.acu
    lo, hi = policy.running_min_acu, policy.max_acu
    if acu < lo or acu > hi:   # the range changed under it
        new = min(max(acu, lo), hi)
        return CapacityDecision(new, f"range now {policy.min_acu:g}..{hi:g} ACU",
                                CapacityState(new))
    memory_bound = sample.pool_full and sample.miss_per_s > policy.miss_up_per_s
    queued = sample.queued_fraction > policy.queued_up_fraction
    if sample.cpu_pct > policy.target_cpu_pct or queued or memory_bound:
        wanted = acu + ACU_STEP
        why = []
        if sample.cpu_pct > policy.target_cpu_pct:
            wanted = max(wanted, acu * sample.cpu_pct / policy.target_cpu_pct)
            why.append(f"CPU {sample.cpu_pct:.0f}% of its share > {policy.target_cpu_pct:.0f}%")
        if queued:
            wanted = max(wanted, acu * (1.0 + sample.queued_fraction))
            why.append(f"{sample.queued_fraction:.0%} of requests queued")
        if memory_bound:
            why.append(f"full buffer pool misses {sample.miss_per_s:.0f}/s")
        new = min(hi, round_up_step(wanted))
        if new == acu:
            return CapacityDecision(acu, "at max_acu; " + ", ".join(why), CapacityState(acu))
        return CapacityDecision(new, "up: " + ", ".join(why), CapacityState(new))
    low = (sample.cpu_pct < policy.down_cpu_pct and sample.queued_fraction == 0.0
           and not memory_bound)
    if not low:
        return CapacityDecision(acu, "hold", CapacityState(acu))
    low_since = state.low_since_s if state.low_since_s is not None else sample.t_s
    if acu <= lo:
        if policy.min_acu == 0 and sample.requests == 0:
            idle_since = state.idle_since_s if state.idle_since_s is not None else sample.t_s
            if sample.t_s - idle_since >= policy.pause_after_s:
                return CapacityDecision(0.0, f"pause: no request for {sample.t_s - idle_since:.0f}s",
                                        CapacityState(0.0))
            return CapacityDecision(acu, "at min_acu, idle",
                                    CapacityState(acu, low_since, state.last_down_s, idle_since))
        return CapacityDecision(acu, "at min_acu", CapacityState(acu, low_since, state.last_down_s))
    waited = sample.t_s - low_since >= policy.scale_down_delay_s
    spaced = state.last_down_s is None or sample.t_s - state.last_down_s >= policy.scale_down_interval_s
    if waited and spaced:
        new = max(lo, acu - ACU_STEP)
        return CapacityDecision(new, f"down: CPU {sample.cpu_pct:.0f}% < {policy.down_cpu_pct:.0f}% "
                                     f"for {sample.t_s - low_since:.0f}s",
                                CapacityState(new, low_since, sample.t_s))
    return CapacityDecision(acu, "low, waiting to step down",
                            CapacityState(acu, low_since, state.last_down_s))


# --- Replica auto scaling ----------------------------------------------------------------------


@dataclass(frozen=True)
class AutoscalePolicy:
    min_replicas: int = 1
    max_replicas: int = 15
    target_cpu_pct: float = 70.0
    scale_out_cooldown_s: float = 60.0
    scale_in_cooldown_s: float = 300.0

    def check(self, max_allowed: int) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas <= max_allowed:
            raise ValueError(f"need 0 <= --min {self.min_replicas} <= --max {self.max_replicas} "
                             f"<= {max_allowed}")
        if not 0 < self.target_cpu_pct <= 100:
            raise ValueError(f"--target-cpu {self.target_cpu_pct:g} is out of range (0..100]")
        if self.scale_out_cooldown_s < 0 or self.scale_in_cooldown_s < 0:
            raise ValueError("cooldowns must be >= 0 s")

    def to_dict(self) -> dict:
        return {"min": self.min_replicas, "max": self.max_replicas,
                "target_cpu_pct": self.target_cpu_pct,
                "scale_out_cooldown_s": self.scale_out_cooldown_s,
                "scale_in_cooldown_s": self.scale_in_cooldown_s}

    @classmethod
    def from_dict(cls, d: dict) -> "AutoscalePolicy":
        return cls(int(d["min"]), int(d["max"]), float(d["target_cpu_pct"]),
                   float(d["scale_out_cooldown_s"]), float(d["scale_in_cooldown_s"]))


@dataclass(frozen=True)
class AutoscaleState:
    last_out_s: float | None = None
    last_in_s: float | None = None


@dataclass(frozen=True)
class ReplicaDecision:
    replicas: int              # the count to have (== the current count: no action)
    reason: str
    state: AutoscaleState = field(default_factory=AutoscaleState)


def decide_replicas(policy: AutoscalePolicy, state: AutoscaleState, t_s: float,
                    replicas: int, avg_cpu_pct: float) -> ReplicaDecision:
    if replicas < policy.min_replicas:
        return ReplicaDecision(policy.min_replicas, f"below min {policy.min_replicas}",
                               replace(state, last_out_s=t_s))
    if replicas > policy.max_replicas:
        return ReplicaDecision(replicas - 1, f"above max {policy.max_replicas}",
                               replace(state, last_in_s=t_s))
    if replicas == 0:
        return ReplicaDecision(0, "no replicas to measure", state)
    desired = math.ceil(replicas * avg_cpu_pct / policy.target_cpu_pct - 1e-9)
    desired = min(policy.max_replicas, max(policy.min_replicas, desired))
    load = f"average CPU {avg_cpu_pct:.0f}% (target {policy.target_cpu_pct:.0f}%) over {replicas}"
    if desired > replicas:
        if state.last_out_s is not None and t_s - state.last_out_s < policy.scale_out_cooldown_s:
            return ReplicaDecision(replicas, f"{load}: wants {desired}, scale-out cooldown", state)
        return ReplicaDecision(desired, f"out: {load}", replace(state, last_out_s=t_s))
    if desired < replicas:
        last = max((x for x in (state.last_out_s, state.last_in_s) if x is not None), default=None)
        if last is not None and t_s - last < policy.scale_in_cooldown_s:
            return ReplicaDecision(replicas, f"{load}: wants {desired}, scale-in cooldown", state)
        return ReplicaDecision(replicas - 1, f"in: {load}", replace(state, last_in_s=t_s))
    return ReplicaDecision(replicas, f"hold: {load}", state)
