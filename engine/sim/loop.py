"""The simulation's event loop: one asyncio loop whose clock is virtual.

``SimLoop`` is an ``asyncio.BaseEventLoop`` with no I/O at all. Its ``time()`` is a
number the loop moves itself: when no callback is ready, the "selector" (``_Jump``)
does not block but jumps the clock straight to the next scheduled timer, so a schedule
of 30 s of timeouts, gossip rounds and link delays runs as fast as the CPU executes the
callbacks between them. Ready callbacks run in FIFO order and timers in (time,
insertion) order, on one thread: the same program gives the same interleaving.

What else is routed through it (``virtual_time``, a context manager around a run):

- ``time.monotonic``, ``time.time``, ``time.time_ns`` and ``time.perf_counter`` return
  virtual time for the duration of a run (the production code stamps commits, timeouts,
  ack latencies and the group commit's background lane with them);
- ``run_in_executor`` runs the function inline on the loop thread and returns a finished
  future: the storage node's LMDB reads and group-commit transactions, which run in
  thread pools in a real process, happen at one deterministic point of the schedule;
- the task factory tags every task with the simulated process (``SimProcess``) that
  created it (a context variable), so crashing a process cancels exactly its tasks.

A run where every task waits and no timer is pending is a deadlock: ``Deadlock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time

#: The simulated process whose code is running (inherited by the tasks it creates).
CURRENT_PROCESS: contextvars.ContextVar = contextvars.ContextVar("sim_process", default=None)

#: Virtual wall clock at virtual time 0 (2026-01-01T00:00:00Z): fixed, so COMMIT
#: timestamps (time.time_ns) are the same in every run of a seed.
WALL_EPOCH_S = 1_767_225_600.0


class Deadlock(RuntimeError):
    """Every task waits and no timer is pending: the simulated cluster can never move."""


class SimProcess:
    """One simulated process (a storage node, an instance, the client): the tasks it
    owns, and whether it is dead (a crashed process's new tasks are cancelled at birth)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: dict[asyncio.Task, None] = {}   # ordered: kill cancels in a fixed order
        self.dead = False

    def context(self) -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(CURRENT_PROCESS.set, self)
        return ctx

    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        """Start ``coro`` as a task of this process."""
        return asyncio.get_running_loop().create_task(coro, name=name, context=self.context())

    def kill(self) -> int:
        """Cancel every task of this process; return how many were running."""
        self.dead = True
        live = [t for t in self.tasks if not t.done()]
        for t in live:
            t.cancel()
        self.tasks.clear()
        return len(live)


class _Jump:
    """The selector of SimLoop: never blocks; moves the clock to the next timer."""

    def __init__(self, loop: "SimLoop") -> None:
        self._loop = loop

    def select(self, timeout):
        loop = self._loop
        if timeout is None:
            raise Deadlock(f"every task waits and no timer is pending at t={loop._now:.6f}")
        if timeout > 0 and loop._scheduled:
            when = loop._scheduled[0]._when
            if when > loop._now:
                loop._now = when
                loop.on_jump(when)
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    """An event loop with a virtual clock and no I/O (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _Jump(self)
        self._clock_resolution = 1e-9
        self.set_task_factory(_task_factory)
        #: Called with the new virtual time at every clock jump (the trace's timer firings).
        self.on_jump = lambda _when: None

    def time(self) -> float:
        return self._now

    def _process_events(self, event_list) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def run_in_executor(self, executor, func, *args):
        fut = self.create_future()
        try:
            fut.set_result(func(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            fut.set_exception(exc)
        return fut


def _task_factory(loop, coro, context=None):
    proc = (context.get(CURRENT_PROCESS) if context is not None else CURRENT_PROCESS.get())
    task = asyncio.Task(coro, loop=loop, context=context) if context is not None else \
        asyncio.Task(coro, loop=loop)
    if proc is not None:
        if proc.dead:
            task.cancel()
        else:
            proc.tasks[task] = None
            task.add_done_callback(lambda t: proc.tasks.pop(t, None))
    return task


@contextlib.contextmanager
def virtual_time(loop: SimLoop):
    """Make the ``time`` module answer with ``loop``'s virtual clock while inside."""
    saved = (time.monotonic, time.time, time.time_ns, time.perf_counter)
    time.monotonic = loop.time
    time.perf_counter = loop.time
    time.time = lambda: WALL_EPOCH_S + loop._now
    time.time_ns = lambda: int(round((WALL_EPOCH_S + loop._now) * 1e9))
    try:
        yield
    finally:
        time.monotonic, time.time, time.time_ns, time.perf_counter = saved
