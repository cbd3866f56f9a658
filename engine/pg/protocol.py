"""The PostgreSQL v3 wire protocol on asyncio: one server per instance (writer or replica).

``PgServer(backend).start(host, port)`` serves clients (psql, pgbench, psycopg, sysbench)
over the instance's own Database (engine/pg/sql.py's Backend); no second engine.

Messages (https://www.postgresql.org/docs/15/protocol-message-formats.html):
    startup: SSLRequest and GSSENCRequest -> "N"; StartupMessage (protocol 3.0) ->
        AuthenticationOk (trust: any user and database), ParameterStatus (server_version
        "15.0 (aurora-lite)", client_encoding UTF8, DateStyle, integer_datetimes,
        standard_conforming_strings, ...), BackendKeyData, ReadyForQuery.
        CancelRequest: accepted and ignored (the connection is closed; nothing is cancelled).
    simple query: Q -> per statement RowDescription/DataRow*/CommandComplete, or
        EmptyQueryResponse, or CopyInResponse (COPY FROM STDIN: d* then c or f);
        ErrorResponse ends the string; then ReadyForQuery with I/T/E.
    extended query: P(arse) B(ind) D(escribe) E(xecute) C(lose) H (flush) S(ync); after an
        error every message up to Sync is skipped. Parameters and results: text format,
        and binary for int2/int4/int8/bool/text.
    X: Terminate.
A write on a replica gets 25006; an error inside BEGIN ... makes the block failed (E) until
ROLLBACK, as in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import pglast
from pglast import ast, enums

from engine.pg import sql
from engine.pg.rows import to_text
from engine.pg.session import Session
from engine.pg.sqlstate import PgError, from_engine, not_supported

log = logging.getLogger("aurora.pg")

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
MESSAGE_MAX = 64 << 20
PARAMETER_STATUS = ["server_version", "server_encoding", "client_encoding", "datestyle",
                    "integer_datetimes", "standard_conforming_strings", "timezone",
                    "intervalstyle", "is_superuser", "application_name",
                    "default_transaction_read_only"]
REPORTED_NAMES = {"datestyle": "DateStyle", "timezone": "TimeZone", "intervalstyle": "IntervalStyle"}


def _msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def _error(err: PgError) -> bytes:
    fields = (b"S" + _cstr(err.severity) + b"V" + _cstr(err.severity) + b"C" + _cstr(err.code)
              + b"M" + _cstr(err.message) + b"\x00")
    return _msg(b"E", fields)


def _row_description(columns) -> bytes:
    out = [struct.pack(">H", len(columns))]
    for name, oid, fmt in columns:
        size = {16: 1, 21: 2, 23: 4, 20: 8, 1114: 8, 1184: 8}.get(oid, -1)
        out.append(_cstr(name) + struct.pack(">IhIhih", 0, 0, oid, size, -1, fmt))
    return _msg(b"T", b"".join(out))


def _encode_value(value, oid: int, fmt: int) -> bytes | None:
    if value is None:
        return None
    if fmt == 1:
        if oid == 16:
            return b"\x01" if value else b"\x00"
        if oid in (20, 21, 23):
            return struct.pack({20: ">q", 21: ">h", 23: ">i"}[oid], int(value))
        if oid in (25, 1043, 1042):
            return to_text(value).encode()
        raise not_supported(f"binary output of type {oid}")
    return to_text(value).encode()


def _decode_param(raw: bytes | None, oid: int, fmt: int):
    if raw is None:
        return None
    if fmt == 0:
        text = raw.decode()
        if oid in (20, 21, 23):
            return int(text)
        if oid == 16:
            return text.lower() in ("t", "true", "1", "on", "yes")
        return text
    if oid == 16:
        return raw != b"\x00"
    if oid in (20, 21, 23):
        return int.from_bytes(raw, "big", signed=True)
    if oid in (0, 25, 1043, 1042, 705):
        return raw.decode()
    raise not_supported(f"binary parameter of type {oid}")


class Prepared:
    def __init__(self, text: str, stmts: list, param_oids: list[int]) -> None:
        self.text = text
        self.stmt = stmts[0] if stmts else None
        self.param_oids = param_oids


class Portal:
    def __init__(self, prepared: Prepared, params: list, result_formats: list[int]) -> None:
        self.prepared = prepared
        self.params = params
        self.result_formats = result_formats
        self.result: sql.Result | None = None   # run at Describe when it needs the columns
        self.sent = 0


def _parse(text: str) -> list:
    try:
        return [raw.stmt for raw in pglast.parse_sql(text)]
    except pglast.parser.ParseError as exc:
        raise PgError("42601", str(exc)) from None


def _count_params(text: str) -> int:
    import re
    return max((int(m) for m in re.findall(r"\$(\d+)", text)), default=0)


class Connection:
    """One client: reads messages, runs statements in its Session, writes replies."""

    def __init__(self, server: "PgServer", reader, writer) -> None:
        self.server = server
        self.reader, self.writer = reader, writer
        self.session = Session(server.backend)
        self.prepared: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.skip_to_sync = False

    async def _read_exact(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def startup(self) -> bool:
        while True:
            (length,) = struct.unpack(">I", await self._read_exact(4))
            if not 8 <= length <= 10_000:
                return False
            body = await self._read_exact(length - 4)
            (code,) = struct.unpack(">I", body[:4])
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                self.writer.write(b"N")
                continue
            if code == CANCEL_REQUEST:
                log.info("cancel request accepted and ignored (aurora-lite cancels nothing)")
                return False
            if code != PROTOCOL_3:
                self.writer.write(_error(PgError("08P01", f"unsupported protocol {code >> 16}.{code & 0xffff}", "FATAL")))
                return False
            parts = body[4:].split(b"\x00")
            params = dict(zip(parts[0::2], parts[1::2]))
            app = params.get(b"application_name", b"").decode()
            self.session.settings["application_name"] = app
            self.session.read_only = self.server.backend.read_only()
            out = [_msg(b"R", struct.pack(">I", 0))]
            for name in PARAMETER_STATUS:
                value = sql.setting(self.session, name)
                out.append(_msg(b"S", _cstr(REPORTED_NAMES.get(name, name)) + _cstr(value)))
            out.append(_msg(b"K", struct.pack(">II", id(self) & 0x7FFFFFFF, 0)))
            out.append(_msg(b"Z", self.session.status))
            self.writer.write(b"".join(out))
            return True

    async def run(self) -> None:
        try:
            if not await self.startup():
                return
            while True:
                kind = await self._read_exact(1)
                (length,) = struct.unpack(">I", await self._read_exact(4))
                if not 4 <= length <= MESSAGE_MAX:
                    raise PgError("08P01", f"message length {length} out of range", "FATAL")
                body = await self._read_exact(length - 4)
                if kind == b"X":
                    return
                await self.dispatch(kind, body)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except PgError as err:
            self.writer.write(_error(err))
        finally:
            await self.session.close()
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 (the socket is gone already)
                pass

    async def dispatch(self, kind: bytes, body: bytes) -> None:
        if kind == b"Q":
            await self.simple_query(body[:-1].decode())
            return
        if kind == b"S":
            self.skip_to_sync = False
            if not self.session.in_block and self.session.txn is not None:
                await self._end_implicit(commit=True)
            self.writer.write(_msg(b"Z", self.session.status))
            return
        if kind == b"H":
            return
        if self.skip_to_sync:
            return
        try:
            if kind == b"P":
                self.parse(body)
            elif kind == b"B":
                self.bind(body)
            elif kind == b"D":
                await self.describe(body)
            elif kind == b"E":
                await self.execute_portal(body)
            elif kind == b"C":
                what, name = body[:1], body[1:-1].decode()
                (self.prepared if what == b"S" else self.portals).pop(name, None)
                self.writer.write(_msg(b"3"))
            elif kind in (b"d", b"c", b"f"):
                pass  # COPY data outside COPY: ignored, as PostgreSQL does
            else:
                raise PgError("08P01", f"unknown message type {kind!r}")
        except Exception as exc:  # noqa: BLE001 (every error goes to the client)
            await self._fail(exc)
            self.skip_to_sync = True

    async def _fail(self, exc: Exception) -> None:
        err = from_engine(exc)
        if err.code == "XX000":
            log.exception("internal error in a SQL statement")
        if err.severity == "FATAL":
            self.writer.write(_error(err))
            raise ConnectionAbortedError(err.message)
        self.server.backend.counters["errors"] += 1
        by_code = self.server.backend.errors_by_sqlstate
        by_code[err.code] = by_code.get(err.code, 0) + 1
        self.writer.write(_error(err))
        if self.session.in_block:
            self.session.failed = True
            await self.session.finish(commit=False)
        else:
            await self.session.finish(commit=False)

    async def _end_implicit(self, commit: bool) -> None:
        await self.session.finish(commit=commit)

    # --- Simple query --------------------------------------------------------------------------

    async def simple_query(self, text: str) -> None:
        log.debug("query: %s", text)
        try:
            stmts = _parse(text)
        except PgError as err:
            await self._fail(err)
            self.writer.write(_msg(b"Z", self.session.status))
            return
        if not stmts:
            self.writer.write(_msg(b"I"))
        for stmt in stmts:
            try:
                if isinstance(stmt, ast.CopyStmt):
                    result = sql.Result(await self.copy_in(stmt))
                else:
                    result = await self.run_statement(stmt, [])
                if not self.session.in_block:
                    # The implicit transaction ends BEFORE its result is sent: the client
                    # hears of a write (or of what a write statement read) only when it
                    # is durable (invariants 2 and 16).
                    await self._end_implicit(commit=True)
                if result.columns is not None:
                    cols = [(n, oid, 0) for n, oid in result.columns]
                    self.writer.write(_row_description(cols))
                    self._data_rows(result.rows, cols)
                self._send_notices()
                self.writer.write(_msg(b"C", _cstr(result.tag)))
            except Exception as exc:  # noqa: BLE001
                await self._fail(exc)
                break
        self.writer.write(_msg(b"Z", self.session.status))

    def _data_rows(self, rows, cols) -> None:
        out = []
        for row in rows:
            parts = [struct.pack(">H", len(row))]
            for value, (_, oid, fmt) in zip(row, cols):
                raw = _encode_value(value, oid, fmt)
                parts.append(struct.pack(">i", -1) if raw is None else struct.pack(">i", len(raw)) + raw)
            out.append(_msg(b"D", b"".join(parts)))
        self.writer.write(b"".join(out))

    def _send_notices(self) -> None:
        """The session's pending WARNINGs as NoticeResponses (SQLSTATE 01000)."""
        for text in self.session.notices:
            self.writer.write(_msg(b"N", b"SWARNING\x00VWARNING\x00C01000\x00M" + _cstr(text) + b"\x00"))
        self.session.notices.clear()

    async def run_statement(self, stmt, params: list) -> sql.Result:
        """Run one statement with PostgreSQL's transaction-block rules."""
        session = self.session
        if isinstance(stmt, ast.TransactionStmt):
            return await self.transaction_stmt(stmt)
        if isinstance(stmt, ast.DeallocateStmt):
            if stmt.name is None:
                self.prepared.clear()
                return sql.Result("DEALLOCATE ALL")
            self.prepared.pop(stmt.name, None)
            return sql.Result("DEALLOCATE")
        if session.failed:
            raise PgError("25P02", "current transaction is aborted, commands ignored until end of transaction block")
        if session.read_only and isinstance(stmt, sql.WRITES):
            raise PgError("25006", f"cannot execute {type(stmt).__name__[:-4].upper()} in a read-only "
                                   f"transaction (this is a read replica)")
        return await sql.execute(session, stmt, params)

    async def transaction_stmt(self, stmt: ast.TransactionStmt) -> sql.Result:
        K = enums.TransactionStmtKind
        session = self.session
        if stmt.kind in (K.TRANS_STMT_BEGIN, K.TRANS_STMT_START):
            if session.in_block:
                self.writer.write(_msg(b"N", b"SWARNING\x00C25001\x00Mthere is already a transaction in progress\x00\x00"))
            session.in_block = True
            return sql.Result("BEGIN")
        if stmt.kind == K.TRANS_STMT_COMMIT:
            failed = session.failed
            session.in_block = session.failed = False
            await session.finish(commit=not failed)
            return sql.Result("ROLLBACK" if failed else "COMMIT")
        if stmt.kind == K.TRANS_STMT_ROLLBACK:
            session.in_block = session.failed = False
            await session.finish(commit=False)
            return sql.Result("ROLLBACK")
        raise not_supported(f"transaction statement {stmt.kind.name}")

    async def copy_in(self, stmt: ast.CopyStmt) -> str:
        """Run COPY FROM STDIN (CopyInResponse, then the client's CopyData); returns the
        command tag, which the caller sends once the implicit transaction (if any) ends."""
        if self.session.failed:
            raise PgError("25P02", "current transaction is aborted, commands ignored until end of transaction block")
        schema, names = await sql.copy_target(self.session, stmt)
        self.writer.write(_msg(b"G", struct.pack(">bH", 0, len(names)) + b"\x00\x00" * len(names)))
        await self.writer.drain()
        buffered, count, error = b"", 0, None
        while True:
            kind = await self._read_exact(1)
            (length,) = struct.unpack(">I", await self._read_exact(4))
            body = await self._read_exact(length - 4)
            if kind == b"d":
                if error is not None:
                    continue
                buffered += body
                *lines, buffered = buffered.split(b"\n")
                lines = [ln.decode() for ln in lines if ln != b"\\."]
                try:
                    count += await sql.copy_rows(self.session, schema, names, lines)
                except Exception as exc:  # noqa: BLE001 (reported after CopyDone)
                    error = exc
                # Clients send a row per message, already buffered: nothing here would
                # suspend, and a big COPY would hold the instance's event loop (and its
                # health checks) until COMMIT.
                await self.session.yield_if_due()
            elif kind == b"c":
                if error is None and buffered.strip() and buffered.strip() != b"\\.":
                    count += await sql.copy_rows(self.session, schema, names, [buffered.decode()])
                break
            elif kind == b"f":
                raise PgError("57014", f"COPY from stdin failed: {body[:-1].decode()}")
            elif kind in (b"H", b"S"):
                continue
            else:
                raise PgError("08P01", f"unexpected message {kind!r} during COPY")
        if error is not None:
            raise error
        return f"COPY {count}"

    # --- Extended query ----------------------------------------------------------------------------

    def parse(self, body: bytes) -> None:
        name, rest = body.split(b"\x00", 1)
        text, rest = rest.split(b"\x00", 1)
        (n,) = struct.unpack(">H", rest[:2])
        oids = list(struct.unpack(f">{n}I", rest[2:2 + 4 * n]))
        text_s = text.decode()
        log.debug("parse %r: %s", name, text_s)
        stmts = _parse(text_s)
        if len(stmts) > 1:
            raise PgError("42601", "cannot insert multiple commands into a prepared statement")
        nparams = max(len(oids), _count_params(text_s))
        oids += [0] * (nparams - len(oids))
        self.prepared[name.decode()] = Prepared(text_s, stmts, oids)
        self.writer.write(_msg(b"1"))

    def bind(self, body: bytes) -> None:
        portal, rest = body.split(b"\x00", 1)
        stmt_name, rest = rest.split(b"\x00", 1)
        prepared = self.prepared.get(stmt_name.decode())
        if prepared is None:
            raise PgError("26000", f'prepared statement "{stmt_name.decode()}" does not exist')
        pos = 0
        (nf,) = struct.unpack_from(">H", rest, pos)
        formats = list(struct.unpack_from(f">{nf}h", rest, pos + 2))
        pos += 2 + 2 * nf
        (np_,) = struct.unpack_from(">H", rest, pos)
        pos += 2
        params = []
        for i in range(np_):
            (size,) = struct.unpack_from(">i", rest, pos)
            pos += 4
            raw = None if size < 0 else rest[pos:pos + size]
            pos += max(size, 0)
            fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
            oid = prepared.param_oids[i] if i < len(prepared.param_oids) else 0
            params.append(_decode_param(raw, oid, fmt))
        (nr,) = struct.unpack_from(">H", rest, pos)
        result_formats = list(struct.unpack_from(f">{nr}h", rest, pos + 2))
        self.portals[portal.decode()] = Portal(prepared, params, result_formats)
        self.writer.write(_msg(b"2"))

    def _formats(self, portal: Portal, n: int) -> list[int]:
        f = portal.result_formats
        return f * n if len(f) == 1 else (f if f else [0] * n)

    async def describe(self, body: bytes) -> None:
        what, name = body[:1], body[1:-1].decode()
        if what == b"S":
            prepared = self.prepared.get(name)
            if prepared is None:
                raise PgError("26000", f'prepared statement "{name}" does not exist')
            oids = [oid or 25 for oid in prepared.param_oids]
            self.writer.write(_msg(b"t", struct.pack(f">H{len(oids)}I", len(oids), *oids)))
            if isinstance(prepared.stmt, ast.SelectStmt) or isinstance(prepared.stmt, ast.VariableShowStmt):
                # Columns are known by running it: with NULL parameters, in a throwaway way.
                cols = await self._columns_of(prepared)
                self.writer.write(_row_description([(n, oid, 0) for n, oid in cols]))
            else:
                self.writer.write(_msg(b"n"))
            return
        portal = self.portals.get(name)
        if portal is None:
            raise PgError("34000", f'portal "{name}" does not exist')
        if isinstance(portal.prepared.stmt, (ast.SelectStmt, ast.VariableShowStmt)):
            portal.result = await self.run_statement(portal.prepared.stmt, portal.params)
            cols = portal.result.columns
            fmts = self._formats(portal, len(cols))
            self.writer.write(_row_description([(n, oid, f) for (n, oid), f in zip(cols, fmts)]))
        else:
            self.writer.write(_msg(b"n"))

    async def _columns_of(self, prepared: Prepared) -> list:
        params = [None] * len(prepared.param_oids)
        result = await self.run_statement(prepared.stmt, params)
        return result.columns or []

    async def execute_portal(self, body: bytes) -> None:
        name, rest = body.split(b"\x00", 1)
        (max_rows,) = struct.unpack(">i", rest[:4])
        portal = self.portals.get(name.decode())
        if portal is None:
            raise PgError("34000", f'portal "{name.decode()}" does not exist')
        stmt = portal.prepared.stmt
        if stmt is None:
            self.writer.write(_msg(b"I"))
            return
        if isinstance(stmt, ast.CopyStmt):
            result = sql.Result(await self.copy_in(stmt))
        else:
            result = portal.result
            if result is None:
                result = portal.result = await self.run_statement(stmt, portal.params)
        if not self.session.in_block and not isinstance(stmt, ast.TransactionStmt):
            await self._end_implicit(commit=True)   # before anything is sent: invariants 2, 16
        if result.columns is not None:
            cols = [(n, oid, f) for (n, oid), f in zip(result.columns, self._formats(portal, len(result.columns)))]
            rows = result.rows[portal.sent:]
            if max_rows > 0 and len(rows) > max_rows:
                self._data_rows(rows[:max_rows], cols)
                portal.sent += max_rows
                self.writer.write(_msg(b"s"))
                return
            self._data_rows(rows, cols)
        self._send_notices()
        self.writer.write(_msg(b"C", _cstr(result.tag)))


class PgServer:
    """The asyncio server: one Connection per client."""

    def __init__(self, backend: sql.Backend) -> None:
        self.backend = backend
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            await Connection(self, reader, writer).run()
        finally:
            self._conns.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._conns):
            task.cancel()
