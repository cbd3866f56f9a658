"""`aurora-lite psql`: psql on the cluster's PostgreSQL endpoint (docs/postgres.md).

    aurora-lite psql [--endpoint cluster|reader|dbN] [-c SQL]... [-f FILE] [-- PSQL ARGS...]

runs the psql of the postgresql-client package with -h/-p of the chosen endpoint (the
cluster endpoint by default: the writer, stable across failovers), the -c/-f given, and
any further psql arguments after --, e.g. `aurora-lite psql -c 'select 1' -- -At`.
"""

from __future__ import annotations

import os
import shutil

from engine.cli.common import EXIT_NOT_FOUND, CliError, data_dir_arg, data_dir_of, guarded, require_cluster


@guarded
def cmd_psql(args) -> int:
    info = require_cluster(data_dir_of(args))
    pg = info.get("postgres") or {}
    if args.endpoint in ("cluster", "reader"):
        address = pg.get(args.endpoint)
    else:
        address = pg.get("instances", {}).get(args.endpoint)
    if not address:
        raise CliError(f"no PostgreSQL endpoint {args.endpoint!r} (cluster, reader or an instance name)",
                       EXIT_NOT_FOUND)
    psql = shutil.which("psql")
    if psql is None:
        raise CliError("psql is not installed (apt-get install postgresql-client)", EXIT_NOT_FOUND)
    host, port = address.rsplit(":", 1)
    extra = [a for a in args.psql_args if a != "--"]
    for command in args.command or ():
        extra += ["-c", command]
    if args.file:
        extra += ["-f", args.file]
    argv = [psql, "-X", "-h", host, "-p", port, "-U", args.user, "-d", "aurora", *extra]
    os.execv(psql, argv)
    return 0  # not reached


def register(sub) -> None:
    p = sub.add_parser("psql", help="open psql on the cluster's PostgreSQL endpoint")
    data_dir_arg(p)
    p.add_argument("--endpoint", default="cluster",
                   help="cluster (the writer, default), reader, or an instance name such as db2")
    p.add_argument("--user", default="aurora", help="user name to send (any is accepted; default aurora)")
    p.add_argument("-c", "--command", action="append", help="run this SQL (repeatable), like psql -c")
    p.add_argument("-f", "--file", default=None, help="run the SQL in FILE (- for stdin), like psql -f")
    p.add_argument("psql_args", nargs="*", help="more psql arguments after --, e.g. -- -At")
    p.set_defaults(func=cmd_psql)
