"""Capacity units (ACU): what one aurora-lite capacity unit gives an instance, and the
admission limit that enforces its CPU share (docs/serverless.md).

One ACU is, in resources the instance honours itself:

    resource                  per ACU            at 0.5 ACU     at 8 ACU     enforced by
    buffer pool               PAGES_PER_ACU      512 pages      8192 pages   BufferPool.resize
                              = 1024 pages of    (4 MiB)        (64 MiB)     (engine/db/buffer_pool.py)
                              8 KiB (8 MiB)
    CPU share                 CORES_PER_ACU      0.125 core     2 cores      the admission limit
                              = 0.25 core                                    (below), or cgroup v2
                                                                             cpu.max where writable
    concurrent requests       SLOTS_PER_ACU      2              32           Admission (below)
                              = 4

Aurora's ACU is about 2 GiB of memory with its CPU and network; aurora-lite's is scaled
down so that a 2-core machine can run several instances between 0.5 and 8 ACUs.

How the CPU share is enforced: cgroup v2 ``cpu.max`` caps a process's CPU time exactly,
but needs a writable cgroup v2 hierarchy with the ``cpu`` controller.
``cpu_enforcement()`` checks for one at start-up and says which mechanism is active; where
there is none (a container whose unified hierarchy has no cpu controller, like the one
this was built in), the instance enforces its share with an ADMISSION LIMIT: at most
``admission_slots(acu)`` Database requests run at once, the rest wait in FIFO order
(``Admission``). Both the buffer pool and the limit change in place, on
InstanceAdmin.SetCapacity, without a restart and without dropping a connection.

``cpu_seconds()`` is the process's own CPU time (user + system), which the control plane
turns into "CPU used against the share" per interval (engine/cluster/scaling.py).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from contextlib import asynccontextmanager

PAGES_PER_ACU = 1024        # buffer pool pages (8 KiB) per ACU: 8 MiB
CORES_PER_ACU = 0.25        # CPU share per ACU, in cores
SLOTS_PER_ACU = 4           # concurrent Database requests per ACU (the admission limit)
ACU_STEP = 0.5              # capacity changes in steps of this many ACUs
ACU_MIN = 0.5               # smallest running capacity (0 means paused, docs/serverless.md)
ACU_MAX = 128.0             # Aurora Serverless v2's maximum

CGROUP_ROOT = "/sys/fs/cgroup"


def check_acu(acu: float, what: str = "ACU", allow_zero: bool = False) -> float:
    """``acu`` if it is a multiple of 0.5 within range, else ValueError with the reason."""
    low = 0.0 if allow_zero else ACU_MIN
    if not low <= acu <= ACU_MAX:
        raise ValueError(f"{what} {acu:g} is out of range ({low:g}..{ACU_MAX:g})")
    if abs(acu / ACU_STEP - round(acu / ACU_STEP)) > 1e-9:
        raise ValueError(f"{what} {acu:g} is not a multiple of {ACU_STEP:g}")
    return float(acu)


def buffer_pool_pages(acu: float) -> int:
    """Buffer pool capacity at ``acu`` ACUs (8 KiB pages)."""
    return max(int(PAGES_PER_ACU * acu), PAGES_PER_ACU // 2)


def admission_slots(acu: float) -> int:
    """Concurrent Database requests allowed at ``acu`` ACUs (at least 1)."""
    return max(1, int(round(SLOTS_PER_ACU * acu)))


def cpu_share_cores(acu: float) -> float:
    return CORES_PER_ACU * acu


def acu_of_pages(pages: int) -> float:
    """The ACU a provisioned instance with a fixed pool of ``pages`` corresponds to (for
    status: provisioned instances show a fixed ACU), rounded down to a step, at least 0.5."""
    return max(ACU_MIN, ACU_STEP * int(pages / PAGES_PER_ACU / ACU_STEP))


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system, all threads), seconds."""
    t = os.times()
    return t.user + t.system


def cpu_enforcement(root: str = CGROUP_ROOT) -> tuple[str, str]:
    """Which CPU-share mechanism is active here: ("cgroup", path) if this process's cgroup
    v2 has a writable ``cpu.max``, else ("admission", why not cgroup)."""
    unified = root
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        unified = os.path.join(root, "unified")   # hybrid layout: v2 mounted beside v1
    controllers_path = os.path.join(unified, "cgroup.controllers")
    try:
        with open(controllers_path) as f:
            controllers = f.read().split()
    except OSError:
        return "admission", "no cgroup v2 hierarchy"
    if "cpu" not in controllers:
        return "admission", (f"the cgroup v2 hierarchy at {unified} has no cpu controller "
                             f"(controllers: {' '.join(controllers) or 'none'})")
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "")
    except OSError:
        rel = ""
    cpu_max = os.path.join(unified, rel.lstrip("/"), "cpu.max")
    if os.path.exists(cpu_max) and os.access(cpu_max, os.W_OK):
        return "cgroup", cpu_max
    return "admission", f"{cpu_max} is not writable"


class Admission:
    """At most ``limit`` requests at once, the rest wait in FIFO order; the limit changes
    in place (``set_limit``): raising it admits waiters at once, lowering it lets the
    requests already running finish (nothing is cancelled or refused)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit                  # None: unlimited (a provisioned instance)
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.admitted = 0                   # requests that ran
        self.waited = 0                     # of them, those that queued first
        self.wait_s_total = 0.0             # time spent queued, summed

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        self._wake()

    def _has_room(self) -> bool:
        return self.limit is None or self.running < self.limit

    def _wake(self) -> None:
        while self._waiters and self._has_room():
            fut = self._waiters.popleft()
            if not fut.done():
                self.running += 1       # handed over: the waiter owns a slot now
                fut.set_result(None)

    @asynccontextmanager
    async def slot(self):
        if self._has_room() and not self._waiters:
            self.running += 1
        else:
            started = time.monotonic()
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self.running -= 1   # it was handed a slot just as it was cancelled
                    self._wake()
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                raise
            self.waited += 1
            self.wait_s_total += time.monotonic() - started
        self.admitted += 1
        try:
            yield
        finally:
            self.running -= 1
            self._wake()

    def stats(self) -> dict:
        return {"limit": self.limit, "running": self.running, "queued": self.queued,
                "admitted": self.admitted, "waited": self.waited,
                "wait_s_total": round(self.wait_s_total, 6)}
