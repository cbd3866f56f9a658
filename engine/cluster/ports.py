"""Free-port search: the one place that picks listening ports for local processes.

Used by the cluster's port plan (engine/cluster/launcher.py), the control plane's
`replica add`, the write-amplification benchmark's processes (engine/baseline/procs.py)
and the test harnesses (tests/harness.py). Imports nothing but the standard library.

Listening ports are chosen below the kernel's ephemeral range, where the source ports of
outgoing connections (every gRPC client here) come from: a port chosen inside it can be
taken by a client connection before the server binds it, or before a restart rebinds it.
"""

from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"

#: Lowest port free_ports tries; everything from here up to the ephemeral range is fair game.
LISTEN_PORT_LOW = 20000


def ephemeral_port_low() -> int:
    """Lowest port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct ports that are free right now, below the ephemeral range if it leaves
    room (all bound at once, then released), else chosen by the kernel."""
    socks = []
    try:
        high = ephemeral_port_low()
        candidates = list(range(LISTEN_PORT_LOW, high))
        random.shuffle(candidates)
        for port in candidates:
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int, host: str = HOST) -> bool:
    """True if a server could listen on ``port`` now. SO_REUSEADDR, as gRPC's own bind
    uses: connections of a stopped server linger in TIME_WAIT on its port for a minute,
    and they do not stop a new server from listening there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
