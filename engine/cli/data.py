"""The data verbs of `aurora-lite`: put, get, delete, scan and the interactive shell.

    aurora-lite put KEY VALUE [--timeout S]           autocommit
    aurora-lite get KEY [--as-of-lsn N | --as-of-time T]
    aurora-lite delete KEY [--timeout S]
    aurora-lite scan [--start K] [--end K] [--limit N]
    aurora-lite shell                                 put/get/delete/scan, begin/commit/abort

Each talks to the endpoint named by ``--endpoint`` (default cluster: the writer) through
engine/client.py's ClusterClient, or to a clone's writer with ``--volume NAME``
(engine/cli/clones.py). A write that lost its writer waits up to FAILOVER_WAIT_S for the
new one and is resent only when it certainly did nothing. Registered by
engine/cli/__init__.py (``register``); docs/cli.md is the user's view.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from engine.cli.clones import add_volume_args, as_of_kwargs, open_volume_client
from engine.cli.common import (
    EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, READ_TIMEOUT_S, CliError, data_dir_arg, data_dir_of,
    describe_error, endpoint_arg, endpoint_text, get_state, guarded, open_client,
    require_cluster)
from engine.cli.lifecycle import format_status, state_dict


def _client_for(args, **kwargs):
    """The clone writer's Client for --volume NAME (engine/cli/clones.py), else the
    cluster's ClusterClient."""
    client = open_volume_client(args)
    return client if client is not None else open_client(args, **kwargs)


# --- Client verbs ---------------------------------------------------------------------------


def _b(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.flush()


@guarded
def cmd_put(args) -> int:
    with _client_for(args) as db:
        lsn = db.put(_b(args.key), _b(args.value), timeout_s=args.timeout)
    print(f"OK (commit LSN {lsn})")
    return EXIT_OK


@guarded
def cmd_get(args) -> int:
    from engine import errors

    as_of = as_of_kwargs(args)
    with _client_for(args, timeout_s=args.timeout or READ_TIMEOUT_S,
                     failover_wait_s=args.timeout or READ_TIMEOUT_S) as db:
        try:
            value = db.get(_b(args.key), **as_of)
        except errors.KeyNotFound:
            raise CliError(f"not found: key {args.key!r}", EXIT_NOT_FOUND) from None
    _out(value)
    return EXIT_OK


@guarded
def cmd_delete(args) -> int:
    from engine import errors

    with _client_for(args) as db:
        try:
            lsn = db.delete(_b(args.key), timeout_s=args.timeout)
        except errors.KeyNotFound:
            raise CliError(f"not found: key {args.key!r}", EXIT_NOT_FOUND) from None
    print(f"deleted (commit LSN {lsn})")
    return EXIT_OK


@guarded
def cmd_scan(args) -> int:
    as_of = as_of_kwargs(args)
    with _client_for(args, timeout_s=args.timeout or READ_TIMEOUT_S,
                     failover_wait_s=args.timeout or READ_TIMEOUT_S) as db:
        items = db.scan(_b(args.start or ""), _b(args.end or ""), args.limit or 0, **as_of)
    for key, value in items:
        _out(key + b"\t" + value)
    return EXIT_OK


# --- shell ------------------------------------------------------------------------------------


SHELL_HELP = """commands:
  put KEY VALUE [--timeout S]    insert or replace (inside a transaction: buffered)
  get KEY                        print the value
  delete KEY [--timeout S]       delete the key
  scan [--start K] [--end K] [--limit N]
  begin | commit [--timeout S] | abort     transactions
  status [--json]                the cluster's status
  help | quit"""


class _ShellUsage(Exception):
    pass


class _ShellParser(argparse.ArgumentParser):
    def error(self, message):
        raise _ShellUsage(message)

    def exit(self, status=0, message=None):
        raise _ShellUsage(message or "")


def _shell_parser() -> argparse.ArgumentParser:
    parser = _ShellParser(prog="", add_help=False)
    sub = parser.add_subparsers(dest="verb", parser_class=_ShellParser)
    p = sub.add_parser("put", add_help=False)
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--timeout", type=float)
    p = sub.add_parser("get", add_help=False)
    p.add_argument("key")
    for verb in ("delete", "del"):
        p = sub.add_parser(verb, add_help=False)
        p.add_argument("key")
        p.add_argument("--timeout", type=float)
    p = sub.add_parser("scan", add_help=False)
    p.add_argument("--start")
    p.add_argument("--end")
    p.add_argument("--limit", type=int, default=0)
    sub.add_parser("begin", add_help=False)
    p = sub.add_parser("commit", add_help=False)
    p.add_argument("--timeout", type=float)
    for verb in ("abort", "rollback", "help", "quit", "exit"):
        sub.add_parser(verb, add_help=False)
    p = sub.add_parser("status", add_help=False)
    p.add_argument("--json", action="store_true")
    return parser


@guarded
def cmd_shell(args) -> int:
    """Read commands from stdin; a prompt only when stdin is a terminal."""
    from engine import errors

    db = open_client(args, timeout_s=READ_TIMEOUT_S)
    parser = _shell_parser()
    interactive = sys.stdin.isatty()
    txn = None
    last_error = EXIT_OK
    if interactive:
        print(f"connected to {endpoint_text(args)}; `help` lists the commands")
    try:
        while True:
            prompt = "aurora-lite (txn)> " if txn else "aurora-lite> "
            try:
                line = input(prompt) if interactive else sys.stdin.readline()
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if not interactive and line == "":
                break   # end of piped input
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                cmd = parser.parse_args(shlex.split(line))
            except (_ShellUsage, ValueError) as exc:
                print(f"error: {exc or 'bad command'} (try `help`)", file=sys.stderr, flush=True)
                last_error = EXIT_USAGE
                continue
            if cmd.verb in ("quit", "exit"):
                break
            try:
                txn = _shell_command(cmd, db, txn, args)
            except CliError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                last_error = exc.code
            except errors.DatabaseError as exc:
                message, code = describe_error(exc, endpoint_text(args))
                if isinstance(exc, errors.KeyNotFound):
                    message = f"not found: key {cmd.key!r}"
                print(f"error: {message}", file=sys.stderr, flush=True)
                last_error = code
                if txn is not None and isinstance(exc, (errors.ConflictError, errors.TransactionClosedError)):
                    txn = None
            sys.stdout.flush()
        if txn is not None and not txn.closed:
            try:
                txn.abort()
            except errors.DatabaseError:
                pass
            print("transaction aborted (end of input)")
    finally:
        db.close()
    return EXIT_OK if interactive else last_error   # scripts learn that something failed


def _shell_command(cmd, db, txn, args):
    """Run one parsed shell command; returns the open transaction (or None)."""
    target = txn if txn is not None else db
    verb = cmd.verb
    if verb == "help":
        print(SHELL_HELP)
    elif verb == "put":
        if txn is not None:
            txn.put(_b(cmd.key), _b(cmd.value))
            print("OK (in transaction)")
        else:
            print(f"OK (commit LSN {db.put(_b(cmd.key), _b(cmd.value), timeout_s=cmd.timeout)})")
    elif verb == "get":
        _out(target.get(_b(cmd.key)))
    elif verb in ("delete", "del"):
        if txn is not None:
            txn.delete(_b(cmd.key))
            print("deleted (in transaction)")
        else:
            print(f"deleted (commit LSN {db.delete(_b(cmd.key), timeout_s=cmd.timeout)})")
    elif verb == "scan":
        for key, value in target.scan(_b(cmd.start or ""), _b(cmd.end or ""), cmd.limit or 0):
            _out(key + b"\t" + value)
    elif verb == "begin":
        if txn is not None:
            raise CliError("a transaction is already open (commit or abort it first)")
        txn = db.begin()
        print("BEGIN (writes are sent with COMMIT)")
    elif verb == "commit":
        if txn is None:
            raise CliError("no open transaction (begin first)")
        open_txn, txn = txn, None
        lsn = open_txn.commit(timeout_s=cmd.timeout)
        print(f"COMMIT (commit LSN {lsn})" if lsn else "COMMIT (nothing to write)")
    elif verb in ("abort", "rollback"):
        if txn is None:
            raise CliError("no open transaction")
        txn.abort()
        print("ABORT")
        txn = None
    elif verb == "status":
        state = get_state(require_cluster(data_dir_of(args)))
        print(json.dumps(state_dict(state), indent=2) if cmd.json else format_status(state))
    return txn


# --- Registration -------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add put, get, delete, scan and shell to `aurora-lite`'s subcommands."""
    p = subparsers.add_parser("put", help="put KEY VALUE (autocommit)")
    data_dir_arg(p)
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up waiting for durability after S seconds (exit code 4); default: wait")
    endpoint_arg(p)
    add_volume_args(p, as_of=False)
    p.set_defaults(func=cmd_put)

    p = subparsers.add_parser("get", help="get KEY (exit code 1 if not found)")
    data_dir_arg(p)
    p.add_argument("key")
    p.add_argument("--timeout", type=float, default=None, help=f"RPC deadline (default {READ_TIMEOUT_S:.0f}s)")
    endpoint_arg(p)
    add_volume_args(p, as_of=True)
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("delete", help="delete KEY (exit code 1 if not found)")
    data_dir_arg(p)
    p.add_argument("key")
    p.add_argument("--timeout", type=float, default=None, help="commit deadline, as for put")
    endpoint_arg(p)
    add_volume_args(p, as_of=False)
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("scan", help="keys in order: KEY<TAB>VALUE per line")
    data_dir_arg(p)
    p.add_argument("--start", default=None, help="first key (inclusive)")
    p.add_argument("--end", default=None, help="stop before this key (exclusive)")
    p.add_argument("--limit", type=int, default=0, help="at most N keys (default: server's, 1000)")
    p.add_argument("--timeout", type=float, default=None, help=f"RPC deadline (default {READ_TIMEOUT_S:.0f}s)")
    endpoint_arg(p)
    add_volume_args(p, as_of=True)
    p.set_defaults(func=cmd_scan)

    p = subparsers.add_parser("shell", help="interactive prompt: put/get/delete/scan, begin/commit/abort, status")
    data_dir_arg(p)
    endpoint_arg(p)
    p.set_defaults(func=cmd_shell)
