"""Which addresses an aurora-lite process may listen on: loopback, unless told otherwise.

Every process that listens (storage node, writer and replica instances, control plane,
block server) serves verbs with no authentication: Truncate, DropVolume and SetGcHorizon
on a storage node, the control plane's kill and failover verbs, any write on an
instance. Until multi-host work adds TLS and credentials, a non-loopback ``--host`` is
refused unless ``--insecure-listen`` is given, and then every such process logs a
WARNING. ``engine/cli`` checks every listening subcommand with ``check_listen_host``;
the control plane passes the flag on to the processes it launches (``listen_argv``).
"""

from __future__ import annotations

import ipaddress
import logging

LOOPBACK_HOST = "127.0.0.1"
INSECURE_LISTEN_FLAG = "--insecure-listen"

log = logging.getLogger("aurora_lite.listen")


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def add_listen_args(parser) -> None:
    """``--host`` and ``--insecure-listen`` on a subcommand that starts a server."""
    parser.add_argument("--host", default=LOOPBACK_HOST,
                        help=f"address to listen on (default {LOOPBACK_HOST}); a non-loopback "
                             f"address needs {INSECURE_LISTEN_FLAG}")
    parser.add_argument(INSECURE_LISTEN_FLAG, dest="insecure_listen", action="store_true",
                        help="allow a non-loopback --host: the process then serves unauthenticated "
                             "verbs (Truncate, DropVolume, kill, ...) to anyone who reaches the port")


def check_listen_host(host: str, insecure_listen: bool, what: str) -> str | None:
    """None if ``what`` may listen on ``host``, else the refusal to print. Logs a WARNING
    when a non-loopback address is allowed by ``insecure_listen``."""
    if is_loopback(host):
        return None
    if not insecure_listen:
        return (f"refusing to listen on {host!r}: {what} serves unauthenticated verbs "
                f"(Truncate, DropVolume, SetGcHorizon, kill, writes) with no TLS; listen on "
                f"{LOOPBACK_HOST} or pass {INSECURE_LISTEN_FLAG} to expose them anyway")
    log.warning("%s listens on %s (%s): its unauthenticated verbs (Truncate, DropVolume, "
                "SetGcHorizon, kill, writes) are open to anyone who can reach the port",
                what, host, INSECURE_LISTEN_FLAG)
    return None


def listen_argv(host: str) -> list[str]:
    """The ``--host`` arguments for a child process: a process launched on a non-loopback
    host by a parent that was allowed to listen there is allowed too."""
    return ["--host", host] + ([] if is_loopback(host) else [INSECURE_LISTEN_FLAG])
