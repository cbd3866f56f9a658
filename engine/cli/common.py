"""What every `aurora-lite` verb module shares: exit codes, one-line errors, finding the
cluster, the one client of the control plane, the common flags, and plain-text tables.

The verb modules (engine/cli/lifecycle.py, data.py, faults.py, replicas.py, clones.py)
import this module and never each other's helpers, so there is no import cycle among them.
Every verb finds its cluster through the data dir (``--data-dir``, else
$AURORA_LITE_DATA_DIR, else ./.aurora-lite): control.json names the control plane, which
resolves endpoints (cluster, reader, instance:NAME, custom:NAME; ``--endpoint`` on the
client verbs), so nobody types an address. See docs/cli.md for the user's view.

Exit codes (for scripts and tests)::

    0  done
    1  not found (get/delete of a missing key), or an action that did not happen
    2  usage error (argparse)
    3  no cluster running in the data dir, or the writer/control plane is unreachable, or
       the writer failed while a commit was in flight (its outcome is unknown)
    4  write quorum unavailable: the commit was not durable before --timeout
    5  conflict: another transaction wrote the same key first; retry
    130 interrupted (Ctrl-C)

Errors are one line on stderr, "aurora-lite: ...", never a traceback.

The cluster verbs call the control plane only through ``control_call``, the one gRPC
client of the Control service among them (engine/cli/chaos.py's nemesis target keeps a
channel of its own for a whole run; engine/cli/clones.py calls the writer's InstanceAdmin).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from engine.cluster.launcher import DEFAULT_DATA_DIR, DataDir, resolve_data_dir, running_control

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_CLUSTER = 3
EXIT_QUORUM = 4
EXIT_CONFLICT = 5
EXIT_INTERRUPTED = 130

READ_TIMEOUT_S = 10.0
FAILOVER_WAIT_S = 30.0          # a write waits this long for a new writer after a failure


class CliError(Exception):
    """A one-line error for the user, with the process exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(f"aurora-lite: {message}", file=sys.stderr, flush=True)
    return code


def guarded(func):
    """Run a verb: CliError, Ctrl-C and engine errors become one line and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as exc:
            return fail(str(exc), exc.code)
        except KeyboardInterrupt:
            return fail("interrupted", EXIT_INTERRUPTED)
        except Exception as exc:  # engine errors and gRPC errors: never a traceback
            message, code = describe_error(exc, endpoint_text(args))
            return fail(message, code)

    run.__name__ = func.__name__
    return run


def describe_error(exc: Exception, endpoint: str | None = None) -> tuple[str, int]:
    """(one-line message, exit code) for an error from the client library or gRPC."""
    from engine import errors

    detail = " ".join(str(exc).split())
    if isinstance(exc, errors.KeyNotFound):
        return f"not found: {detail}", EXIT_NOT_FOUND
    if isinstance(exc, errors.CommitOutcomeUnknown):
        return f"outcome unknown: {detail}", EXIT_NO_CLUSTER
    if isinstance(exc, errors.WriteQuorumUnavailable):
        return detail if detail.startswith("write quorum") else f"write quorum unavailable: {detail}", EXIT_QUORUM
    if isinstance(exc, errors.ConflictError):
        return f"conflict: {detail} (retry the transaction)", EXIT_CONFLICT
    if isinstance(exc, errors.UnavailableError):
        if "deadline" in detail.lower():
            where = f" from the writer at {endpoint}" if endpoint else ""
            return (f"unavailable: no answer{where} before the deadline: the writer is down or "
                    f"paused, or the request waits for a write that is not durable yet (write "
                    f"quorum unavailable); `aurora-lite status` shows which"), EXIT_NO_CLUSTER
        if _is_connection_failure(detail):
            where = f" at {endpoint}" if endpoint else ""
            who = "the writer" if not endpoint or "cluster endpoint" in endpoint else "the instance"
            return (f"unavailable: {who}{where} does not answer (is it down or paused? "
                    f"`aurora-lite status` shows the cluster)"), EXIT_NO_CLUSTER
        return f"unavailable: {detail}", EXIT_NO_CLUSTER
    if isinstance(exc, errors.DatabaseError):
        return f"{type(exc).__name__}: {detail}", EXIT_FAILED
    if isinstance(exc, errors.RpcError):
        return f"{exc.status}: {exc.detail}", EXIT_NO_CLUSTER
    return f"unexpected error: {type(exc).__name__}: {detail}", EXIT_FAILED


def _is_connection_failure(detail: str) -> bool:
    d = detail.lower()
    return any(s in d for s in ("failed to connect", "connection refused", "socket closed",
                                "connect failed", "unavailable: ipv4"))


# --- Finding the cluster ----------------------------------------------------------------


def data_dir_of(args) -> DataDir:
    return DataDir(resolve_data_dir(getattr(args, "data_dir", None)))


def shown_data_dir_flag(args) -> str:
    """' --data-dir X' when the user did not use the default, for printed commands."""
    given = getattr(args, "data_dir", None)
    if given and os.path.abspath(given) != os.path.abspath(DEFAULT_DATA_DIR):
        return f" --data-dir {shlex.quote(given)}"
    return ""


def require_cluster(dd: DataDir) -> dict:
    info = running_control(dd)
    if info is None:
        raise CliError(f"no cluster running in {dd.root} (start one with `aurora-lite up`)",
                       EXIT_NO_CLUSTER)
    return info


def cli_transport():
    """The transport of the CLI's own process: gRPC. The CLI is a composition root (it
    starts every kind of process), so it picks the implementation."""
    from engine.transport.grpc_transport import GrpcTransport

    return GrpcTransport("cli")


def blocking_stub(address: str, pb_module, service: str):
    """(channel, stub) of ``service`` at ``address`` for a blocking CLI call; close the
    channel when done."""
    from engine.transport import service_of

    channel = cli_transport().blocking_channel(address)
    return channel, channel.stub(service_of(pb_module, service))


def control_stub(info: dict):
    from aurora_pb import control_pb2

    return blocking_stub(info["control"]["address"], control_pb2, "Control")


def control_call(info: dict, method: str, request, timeout_s: float = 30.0):
    from engine.errors import RpcError

    channel, stub = control_stub(info)
    try:
        return getattr(stub, method)(request, timeout_s=timeout_s)
    except RpcError as exc:
        if exc.status == "INVALID_ARGUMENT":
            raise CliError(exc.detail, EXIT_USAGE) from None
        if exc.status in ("NOT_FOUND", "FAILED_PRECONDITION"):
            raise CliError(exc.detail, EXIT_FAILED) from None
        raise CliError(f"the control plane at {info['control']['address']} did not answer "
                       f"({exc.status}: {exc.detail})", EXIT_NO_CLUSTER) from None
    finally:
        channel.close()


def get_state(info: dict, probes: bool = True, timeout_s: float = 10.0):
    from aurora_pb import control_pb2 as pb

    return control_call(info, "GetState", pb.GetStateRequest(skip_probes=not probes), timeout_s)


def open_client(args, timeout_s: float = READ_TIMEOUT_S, failover_wait_s: float = FAILOVER_WAIT_S):
    """A ClusterClient of --endpoint (default cluster), resolved by the control plane."""
    from engine import errors
    from engine.client import ClusterClient

    info = require_cluster(data_dir_of(args))
    endpoint = getattr(args, "endpoint", None) or "cluster"
    try:
        client = ClusterClient(info["control"]["address"], endpoint, timeout_s=timeout_s,
                               failover_wait_s=failover_wait_s)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except errors.UnavailableError as exc:
        raise CliError(str(exc), EXIT_NO_CLUSTER) from None
    except errors.DatabaseError as exc:   # unknown custom endpoint or instance
        raise CliError(str(exc), EXIT_USAGE) from None
    args._client = client
    return client


def endpoint_text(args) -> str | None:
    """'ADDRESS (NAME, ENDPOINT endpoint)' of the client's current target, for messages."""
    client = getattr(args, "_client", None)
    if client is None:
        return None
    kind = client.endpoint if client.kind != "cluster" else "cluster"
    return f"{client.address} ({client.instance}, {kind} endpoint)"


# --- Flags and formatting ------------------------------------------------------------------


def data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help=f"the cluster's data dir (default: ${'AURORA_LITE_DATA_DIR'} or ./{DEFAULT_DATA_DIR})")


def endpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="cluster",
                   help="cluster (the writer, default) | reader (replicas in turn) | "
                        "instance:NAME | custom:NAME")


def table(rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def latency_line(lat) -> str:
    text = f"{lat.intra_az_ms:g} ms within an AZ, {lat.cross_az_ms:g} ms across AZs (one way)"
    extra = dict(lat.extra_az_ms)
    extra.update(getattr(lat, "extra_node_ms", {}))   # slow nodes: sn3 +50 ms
    if extra:
        text += "; extra delay into " + ", ".join(f"{az} +{ms:g} ms" for az, ms in sorted(extra.items()))
    return text
