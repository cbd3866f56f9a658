"""The trace of one simulated schedule: every event, hashed as it happens.

Events are message deliveries (engine/sim/network.py: who sent what to whom, requests,
replies, stream messages, breaks, deadlines), clock jumps (every timer firing moves the
virtual clock), faults and their healing, acknowledged commits and VDL moves
(engine/sim/run.py). Each is one line of text with its virtual time in microseconds::

    12.345678 db1 > sn3 aurora_pb.Storage/AppendStream c2s msg 2048

The running blake2b hash of those lines is the schedule's trace hash: the same seed
gives the same hash, event for event (tests/test_sim.py). ``keep=True`` also keeps the
lines for ``aurora-lite sim --seed S --trace``. Nothing in a line varies between runs
(no wall time, no path, no process id).
"""

from __future__ import annotations

import hashlib


class Trace:
    def __init__(self, keep: bool = False) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.keep = keep
        self.lines: list[str] = []
        self.events = 0
        self.closed = False     # after the verdict: the teardown is not part of the trace

    def event(self, t: float, src: str, dst: str, what: str, kind: str, size: int) -> None:
        line = f"{t:.6f} {src} > {dst} {what} {kind} {size}"
        self._add(line)

    def note(self, t: float, text: str) -> None:
        """A fault, a heal, an ack, a VDL move: anything that is not a message."""
        self._add(f"{t:.6f} * {text}")

    def jump(self, t: float) -> None:
        if self.closed:
            return
        self._hash.update(b"J%.6f" % t)
        self.events += 1

    def _add(self, line: str) -> None:
        if self.closed:
            return
        self.events += 1
        self._hash.update(line.encode())
        if self.keep:
            self.lines.append(line)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
