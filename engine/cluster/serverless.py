"""The control plane's scaling loop: serverless capacity and replica auto scaling
(docs/serverless.md). The decisions are engine/cluster/scaling.py's pure functions; this
module measures, calls them and acts.

Every SCALE_TICK_S, ``scale_tick``:

1. asks every live instance for its status (engine/cluster/rpc.py) and turns the
   difference between two of its capacity reports (engine/instance/capacity.py: CPU
   seconds, admission counters, buffer pool misses, on the instance's own clock) into a
   ``LoadSample``: CPU used against its share, the fraction of requests that queued, pool
   misses per second;
2. for each serverless instance (an ``InstanceSpec`` with min_acu/max_acu,
   topology.json), calls ``decide_capacity`` and, when it changes, InstanceAdmin
   .SetCapacity (the instance resizes its buffer pool and admission limit in place);
   A decision of 0 ACU (``min_acu`` 0, idle for ``pause_after_s``) AUTO-PAUSES the
   instance: it is stopped (SIGTERM), marked ``autopaused`` (no failover for a paused
   writer), and the next ResolveEndpoint that names it (the cluster endpoint for the
   writer, ``instance:NAME``) launches it again and waits until it serves before
   answering: the resume time is recorded (``last_resume_s``, a decision, an event);
3. with a replica autoscaling policy (`aurora-lite replica autoscale`), calls
   ``decide_replicas`` on the replicas' average CPU and adds replicas (`replica add`'s
   path: they join the reader endpoint once they serve, i.e. once they applied the
   writer's snapshot) or removes one that the policy added: drained first (out of the
   reader endpoint and its PostgreSQL forwarder at once, stopped DRAIN_S later, with
   SIGTERM, which lets running requests finish; clients re-resolve), then forgotten.

Decisions (capacity changes and replica actions, with their reasons) are kept for
`status` (``scaling_report``) and written as a capacity timeline, DIR/capacity.csv.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import json
import os
import time

from engine.cluster.scaling import (
    AutoscalePolicy, AutoscaleState, CapacityPolicy, CapacityState, LoadSample,
    decide_capacity, decide_replicas)
from engine.cluster.state import (
    PROBE_TIMEOUT_S, ActionError, ClusterState, Managed, PreconditionError, log)
from engine.errors import RpcError
from engine.instance.capacity import check_acu

SCALE_TICK_S = 1.0           # one measurement and decision per instance per tick
DRAIN_S = 3.0                # a replica chosen for scale-in leaves the endpoints this long first
                             # (longer than the client's REFRESH_S, engine/client.py)
DECISIONS_MAX = 50           # decisions kept for `status`
SET_CAPACITY_TIMEOUT_S = 5.0
RESUME_WAIT_S = 50.0         # a resume waits this long for SERVING (clients wait 60 s)
CSV_FIELDS = ("unix_time", "instance", "acu", "min_acu", "max_acu", "cpu_pct", "queued_fraction",
              "miss_per_s", "buffer_pool_pages", "admission_limit", "reason")


class Scaling(ClusterState):
    """The scaling loop and its verbs (see the module doc); part of ControlPlane."""

    def init_scaling(self, *, scale_down_delay_s: float | None = None,
                     scale_down_interval_s: float | None = None,
                     pause_after_s: float | None = None) -> None:
        defaults = CapacityPolicy(0.5, 0.5)
        self.pause_after_s = defaults.pause_after_s if pause_after_s is None else pause_after_s
        self.scale_down_delay_s = (defaults.scale_down_delay_s if scale_down_delay_s is None
                                   else scale_down_delay_s)
        self.scale_down_interval_s = (defaults.scale_down_interval_s if scale_down_interval_s is None
                                      else scale_down_interval_s)
        self.capacity_states: dict[str, CapacityState] = {}
        self.last_report: dict[str, dict] = {}       # instance -> previous capacity report
        self.load: dict[str, LoadSample] = {}        # instance -> last measured interval
        self.decisions: collections.deque[dict] = collections.deque(maxlen=DECISIONS_MAX)
        data = self.topology.autoscale
        self.autoscale: AutoscalePolicy | None = AutoscalePolicy.from_dict(data) if data else None
        self.autoscale_state = AutoscaleState()
        self.autoscale_busy = False
        self.autoscale_last = ""

    # --- Policies --------------------------------------------------------------------------

    def capacity_policy(self, name: str) -> CapacityPolicy | None:
        spec = self.topology.get(name)
        if spec is None or spec.min_acu is None:
            return None
        return CapacityPolicy(spec.min_acu, spec.max_acu, scale_down_delay_s=self.scale_down_delay_s,
                              scale_down_interval_s=self.scale_down_interval_s,
                              pause_after_s=self.pause_after_s)

    def set_capacity_range(self, name: str, min_acu: float, max_acu: float) -> str:
        """`aurora-lite capacity NAME --min-acu A --max-acu B`: a serverless instance's range
        (the loop moves it into the range within a tick)."""
        self._check_running()
        p = self.get_instance(name)
        spec = self.topology.get(p.name)
        if spec.min_acu is None:
            raise PreconditionError(f"{name} is provisioned; a serverless instance starts with "
                                    f"`up --serverless` or `replica add --serverless`")
        try:
            min_acu = check_acu(min_acu, "--min-acu", allow_zero=True)
            max_acu = check_acu(max_acu, "--max-acu")
            CapacityPolicy(min_acu, max_acu).check()
        except ValueError as exc:
            raise ActionError(str(exc)) from None
        spec.min_acu, spec.max_acu = min_acu, max_acu
        self.save_topology()
        self.event("capacity", f"{name}: range {min_acu:g}..{max_acu:g} ACU")
        return f"{name}: capacity range {min_acu:g}..{max_acu:g} ACU (applied within {SCALE_TICK_S:g}s)"

    def set_autoscale(self, policy: AutoscalePolicy | None) -> str:
        """`aurora-lite replica autoscale ...` (None: --off)."""
        self._check_running()
        from engine.cluster.launcher import MAX_REPLICAS
        if policy is not None:
            try:
                policy.check(MAX_REPLICAS)
            except ValueError as exc:
                raise ActionError(str(exc)) from None
        self.autoscale = policy
        self.autoscale_state = AutoscaleState()
        self.topology.autoscale = policy.to_dict() if policy else None
        self.save_topology()
        if policy is None:
            self.event("autoscale", "replica auto scaling off")
            return "replica auto scaling is off (the replicas stay as they are)"
        text = (f"replica auto scaling: {policy.min_replicas}..{policy.max_replicas} replicas, "
                f"target CPU {policy.target_cpu_pct:g}% of their share, cooldowns "
                f"{policy.scale_out_cooldown_s:g}s out / {policy.scale_in_cooldown_s:g}s in")
        self.event("autoscale", text)
        return text

    # --- The loop ----------------------------------------------------------------------------

    async def scale(self) -> None:
        while not self.stopped.is_set():
            await asyncio.sleep(SCALE_TICK_S)
            if self.stopping:
                continue
            try:
                await self.scale_tick()
            except Exception:
                log.exception("scaling tick failed")

    async def scale_tick(self) -> None:
        live = [p for p in self.instances if p.state == "up" and p.alive]
        await asyncio.gather(*(self._measure_and_scale(p) for p in live))
        if self.autoscale is not None and not self.autoscale_busy and not self.failing_over:
            self._autoscale_step()

    async def _measure_and_scale(self, p: Managed) -> None:
        try:
            reply = await self.rpc.instance_status(p.name, p.address, PROBE_TIMEOUT_S)
            report = json.loads(reply.json).get("capacity")
        except (RpcError, ValueError, AttributeError):
            return
        if not report:
            return
        sample = self._sample(p.name, report)
        if sample is None:
            return
        policy = self.capacity_policy(p.name)
        if policy is None or not report.get("serverless"):
            return
        state = self.capacity_states.get(p.name)
        if state is None or state.acu != report["acu"]:
            state = CapacityState(float(report["acu"]))
        decision = decide_capacity(policy, state, sample)
        self.capacity_states[p.name] = decision.state
        if decision.acu == state.acu:
            return
        if decision.acu == 0:
            await self._autopause(p, policy, sample, decision.reason, state.acu)
            return
        try:
            result = await self.rpc.set_capacity(p.name, p.address, decision.acu, SET_CAPACITY_TIMEOUT_S)
        except RpcError as exc:
            log.warning("capacity of %s: SetCapacity %g failed: %s", p.name, decision.acu, exc)
            self.capacity_states[p.name] = state
            return
        self._record(p.name, state.acu, decision.acu, policy, sample, decision.reason,
                     buffer_pool_pages=result.buffer_pool_pages,
                     admission_limit=result.admission_limit)

    def _sample(self, name: str, report: dict) -> LoadSample | None:
        """The load over the interval between the previous report and this one."""
        previous = self.last_report.get(name)
        self.last_report[name] = report
        if previous is None:
            return None
        dt = float(report["monotonic_s"]) - float(previous["monotonic_s"])
        if dt <= 0.05:
            return None
        share = float(report.get("cpu_share_cores") or 0.0) or 1.0
        cpu_pct = 100.0 * (float(report["cpu_seconds"]) - float(previous["cpu_seconds"])) / dt / share
        adm, adm0 = report.get("admission", {}), previous.get("admission", {})
        admitted = int(adm.get("admitted", 0)) - int(adm0.get("admitted", 0))
        waited = int(adm.get("waited", 0)) - int(adm0.get("waited", 0))
        queued_fraction = waited / admitted if admitted > 0 else (1.0 if adm.get("queued") else 0.0)
        misses = int(report.get("pool_misses", 0)) - int(previous.get("pool_misses", 0))
        requests = max(0, admitted) + int(adm.get("running", 0))
        sample = LoadSample(t_s=time.monotonic(), cpu_pct=max(0.0, cpu_pct),
                            queued_fraction=max(0.0, queued_fraction),
                            miss_per_s=max(0, misses) / dt,
                            pool_full=int(report.get("resident_pages", 0)) >= int(report.get("buffer_pool_pages", 1)),
                            requests=requests)
        self.load[name] = sample
        return sample

    def _record(self, name: str, before: float, after: float, policy: CapacityPolicy,
                sample: LoadSample, reason: str, **extra) -> None:
        entry = {"unix_time": round(time.time(), 3), "instance": name, "from_acu": before,
                 "acu": after, "min_acu": policy.min_acu, "max_acu": policy.max_acu,
                 "cpu_pct": round(sample.cpu_pct, 1),
                 "queued_fraction": round(sample.queued_fraction, 3),
                 "miss_per_s": round(sample.miss_per_s, 1), "reason": reason, **extra}
        self.decisions.append(entry)
        self.event("capacity", f"{name}: {before:g} -> {after:g} ACU ({reason})")
        log.info("capacity of %s: %g -> %g ACU (%s)", name, before, after, reason)
        self._append_csv(entry)

    def _append_csv(self, entry: dict) -> None:
        path = os.path.join(self.dd.root, "capacity.csv")
        new = not os.path.exists(path)
        try:
            with open(path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(entry)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    # --- Auto-pause and resume (min_acu 0) ------------------------------------------------------

    async def _autopause(self, p: Managed, policy: CapacityPolicy, sample: LoadSample,
                         reason: str, before: float) -> None:
        from engine.cluster.launcher import STOP_GRACE_S
        async with p.lock:
            if not p.alive or self.stopping:
                return
            p.autopaused = True
            how = await self._stop(p, STOP_GRACE_S)
            p.exit_reason = "auto-paused"
        self.last_report.pop(p.name, None)
        self.capacity_states.pop(p.name, None)
        self.load.pop(p.name, None)
        self.write_control()
        self._record(p.name, before, 0.0, policy, sample, f"{reason} ({how})")

    async def resume_for(self, endpoint: str) -> None:
        """Before resolving ``endpoint``: resume the auto-paused instance it names (the
        writer for "cluster", NAME for "instance:NAME") and wait until it serves."""
        kind, _, name = endpoint.partition(":")
        if kind == "cluster" and not name:
            p = self.procs.get(self.writer)
        elif kind == "instance" and name:
            p = self.procs.get(name)
        else:
            return
        if p is None or not p.autopaused or self.stopping:
            return
        async with p.lock:
            if not p.autopaused or p.alive:
                return
            started = time.monotonic()
            message = await self._start(p, RESUME_WAIT_S)
            p.last_resume_s = round(time.monotonic() - started, 3)
        self.event("capacity", f"{p.name} resumed for a connection to {endpoint} in {p.last_resume_s:.2f}s")
        log.info("%s resumed (auto-pause) for %s: %s", p.name, endpoint, message)
        policy = self.capacity_policy(p.name)
        if policy is not None:
            self._record(p.name, 0.0, max(policy.min_acu, 0.5), policy,
                         LoadSample(time.monotonic(), 0.0),
                         f"resume: a connection to {endpoint}, serving after {p.last_resume_s:.2f}s")

    # --- Replica auto scaling ------------------------------------------------------------------

    def _serving_replicas(self) -> list[Managed]:
        return [p for p in self.replicas if p.state == "up" and p.alive and not p.draining]

    def _autoscale_step(self) -> None:
        policy = self.autoscale
        replicas = self._serving_replicas()
        loads = [self.load[p.name].cpu_pct for p in replicas if p.name in self.load]
        if replicas and len(loads) < len(replicas):
            return   # a new replica has no measured interval yet
        avg = sum(loads) / len(loads) if loads else 0.0
        now = time.monotonic()
        decision = decide_replicas(policy, self.autoscale_state, now, len(replicas), avg)
        self.autoscale_state = decision.state
        self.autoscale_last = decision.reason
        if decision.replicas == len(replicas):
            return
        entry = {"unix_time": round(time.time(), 3), "instance": "replicas",
                 "from_replicas": len(replicas), "replicas": decision.replicas,
                 "avg_cpu_pct": round(avg, 1), "reason": decision.reason}
        self.decisions.append(entry)
        self.event("autoscale", f"replicas {len(replicas)} -> {decision.replicas} ({decision.reason})")
        log.info("replica auto scaling: %d -> %d (%s)", len(replicas), decision.replicas, decision.reason)
        self.autoscale_busy = True
        if decision.replicas > len(replicas):
            self._spawn_task(self._scale_out(decision.replicas - len(replicas)))
        else:
            victims = [p for p in replicas if p.name in set(self.topology.autoscaled)]
            if not victims:
                self.autoscale_busy = False
                self.autoscale_last = decision.reason + " (no replica it added is left to remove)"
                return
            victim = max(victims, key=lambda p: (p.tier, p.name))   # the newest, promoted last
            self._spawn_task(self._scale_in(victim))

    async def _scale_out(self, count: int) -> None:
        try:
            for _ in range(count):
                spec = self._autoscaled_spec()
                name, message = await self.add_replica(None, "", 0.0, **spec)
                self.topology.autoscaled.append(name)
                self.save_topology()
                log.info("replica auto scaling added %s: %s", name, message)
        except Exception as exc:
            log.warning("replica auto scaling could not add a replica: %s", exc)
            self.autoscale_last = f"scale-out failed: {exc}"
        finally:
            self.autoscale_busy = False

    def _autoscaled_spec(self) -> dict:
        """A new replica like the serverless ones already there (else provisioned)."""
        for p in self.replicas:
            spec = self.topology.get(p.name)
            if spec is not None and spec.min_acu is not None:
                return {"min_acu": spec.min_acu, "max_acu": spec.max_acu}
        return {}

    async def _scale_in(self, p: Managed) -> None:
        try:
            p.draining = True
            self.write_control()
            self.event("autoscale", f"{p.name} draining: out of the reader endpoint")
            await asyncio.sleep(DRAIN_S)
            message = await self.remove_replica(p.name)
            self.topology.autoscaled = [n for n in self.topology.autoscaled if n != p.name]
            self.save_topology()
            log.info("replica auto scaling removed %s: %s", p.name, message)
        except Exception as exc:
            p.draining = False
            log.warning("replica auto scaling could not remove %s: %s", p.name, exc)
            self.autoscale_last = f"scale-in failed: {exc}"
        finally:
            self.autoscale_busy = False

    # --- What `status` shows --------------------------------------------------------------------

    def capacity_view(self, name: str, report: dict | None) -> dict:
        """acu, min_acu, max_acu, cpu_pct ... of one instance for `status`: serverless ones
        their range; provisioned ones a fixed ACU (their pool's), min = max = acu."""
        spec = self.topology.get(name)
        view = {}
        if report:
            view = {"acu": float(report.get("acu", 0.0)),
                    "buffer_pool_pages": int(report.get("buffer_pool_pages", 0)),
                    "resident_pages": int(report.get("resident_pages", 0)),
                    "admission_limit": int(report.get("admission", {}).get("limit") or 0),
                    "admission_queued": int(report.get("admission", {}).get("queued") or 0),
                    "cpu_share_cores": float(report.get("cpu_share_cores", 0.0)),
                    "serverless": bool(report.get("serverless")),
                    "cpu_enforcement": str(report.get("cpu_enforcement", ""))}
        if spec is not None and spec.min_acu is not None:
            view.update(min_acu=spec.min_acu, max_acu=spec.max_acu)
        elif "acu" in view:
            view.update(min_acu=view["acu"], max_acu=view["acu"])
        sample = self.load.get(name)
        if sample is not None:
            view["cpu_pct"] = round(sample.cpu_pct, 1)
        p = self.procs.get(name)
        if p is not None and p.autopaused and "acu" not in view:
            view = {"acu": 0.0, "serverless": True, "min_acu": spec.min_acu, "max_acu": spec.max_acu}
        return view

    def scaling_report(self) -> dict:
        return {
            "autoscale": self.autoscale.to_dict() if self.autoscale else None,
            "autoscale_last": self.autoscale_last,
            "autoscaled": list(self.topology.autoscaled),
            "scale_down_delay_s": self.scale_down_delay_s,
            "scale_down_interval_s": self.scale_down_interval_s,
            "decisions": list(self.decisions)[-10:],
        }
