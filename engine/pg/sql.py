"""SQL statements on aurora-lite's engine, parsed by pglast (PostgreSQL's own parser).

``Backend`` is the per-instance part (the Database, the row locks, sequences);
``execute(session, stmt, params)`` runs one parsed statement in a Session
(engine/pg/session.py) and returns a Result (command tag, columns, rows).

Supported: CREATE TABLE (types of engine/pg/rows.py; PRIMARY KEY, NOT NULL, DEFAULT; WITH
(...) options accepted and ignored), DROP TABLE [IF EXISTS] a, b, TRUNCATE a, b, ALTER
TABLE ... ADD PRIMARY KEY, INSERT (multi-row, DEFAULT, serial), UPDATE and DELETE (WHERE on
the primary key: a point or range read; else a scan), SELECT (one table or none; WHERE,
ORDER BY, LIMIT/OFFSET, DISTINCT, count/sum/min/max/avg without GROUP BY), COPY FROM
STDIN (text format: engine/pg/protocol.py feeds copy_rows), BEGIN/START/COMMIT/END/
ROLLBACK, SET/SHOW/RESET, VACUUM/ANALYZE (accepted, logged), DISCARD. The rest: 0A000.
Table rows and keys: engine/pg/rows.py. SQL tables live in engine table ``pg``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from dataclasses import dataclass, field

from pglast import ast, enums

from engine.errors import TableExistsError
from engine.pg import catalog_query
from engine.pg.expr import (AGGREGATES, Context, compare, evaluate, func_name, output_name,
                            type_name, walk_aggregates)
from engine.pg.rows import (ENGINE_TABLE, SERIAL_TYPES, Column, TableSchema, catalog_key, coerce,
                            decode_row, encode_row, prefix_end, table_key_name, type_of_value)
from engine.pg.session import Session
from engine.pg.sqlstate import PgError, not_supported

log = logging.getLogger("aurora.pg")

SCAN_PAGE_ROWS = 2000
EARLY_LOCK_RELEASE_ENV = "AURORA_PG_EARLY_LOCK_RELEASE"
SEQUENCE_CACHE = 100          # serial values reserved per catalog write (like a sequence's CACHE)
DEFAULT_SETTINGS = {"server_version": "15.0 (aurora-lite)", "server_encoding": "UTF8",
                    "client_encoding": "UTF8", "datestyle": "ISO, MDY", "timezone": "UTC",
                    "integer_datetimes": "on", "standard_conforming_strings": "on",
                    "transaction_isolation": "read committed", "search_path": '"$user", public',
                    "max_identifier_length": "63", "application_name": "",
                    "default_transaction_read_only": "off", "is_superuser": "on",
                    "intervalstyle": "postgres", "server_version_num": "150000"}


@dataclass
class Result:
    tag: str
    columns: list[tuple[str, int]] | None = None   # (name, type oid); None: no rows
    rows: list[list] = field(default_factory=list)


class Backend:
    """The instance's side of the SQL front end: its Database, row locks, sequences."""

    def __init__(self, database, read_only) -> None:
        from engine.pg.session import LockManager
        self.db = database                  # callable -> engine Database (the current one)
        self.read_only = read_only          # callable -> True on a replica
        self.locks = LockManager()
        self._seq: dict[bytes, tuple[int, int]] = {}   # sequence key -> (next, limit)
        self._last_rowid = 0
        self.counters = {"statements": 0, "errors": 0, "index_lookups": 0}
        # Early lock release (invariant 20); AURORA_PG_EARLY_LOCK_RELEASE=0 turns it off, to
        # measure what it brings (bench/bench_pg_compare.py, docs/postgres.md).
        self.early_lock_release = os.environ.get(EARLY_LOCK_RELEASE_ENV, "1") != "0"
        self.errors_by_sqlstate: dict[str, int] = {}

    async def ensure_table(self) -> None:
        """Create engine table ``pg`` (its own committed MTR) if it does not exist yet."""
        db = self.db()
        if not self.read_only() and not db.has_table(ENGINE_TABLE):
            try:
                await db.create_table(ENGINE_TABLE)
            except TableExistsError:
                pass

    def rowid(self) -> int:
        """A new hidden row id: rising, unique per writer, and above any earlier writer's
        (nanoseconds of the wall clock; a later writer starts later)."""
        self._last_rowid = max(self._last_rowid + 1, time.time_ns())
        return self._last_rowid

    async def nextval(self, schema: TableSchema, column: str) -> int:
        """The next serial value: non-transactional like PostgreSQL's sequences (values of a
        rolled-back insert are not reused; a new writer skips the unused cached ones)."""
        key = catalog_key(b"S", struct.pack(">I", schema.table_id) + column.encode())
        nxt, limit = self._seq.get(key, (0, 0))
        if nxt >= limit:
            db = self.db()
            raw = await db.get(ENGINE_TABLE, key)
            nxt = int(raw) if raw else 1
            limit = nxt + SEQUENCE_CACHE
            await db.put(ENGINE_TABLE, key, str(limit).encode())
        self._seq[key] = (nxt + 1, limit)
        return nxt


# --- Catalog ------------------------------------------------------------------------------------

async def get_schema(session: Session, name: str, missing_ok: bool = False,
                     latest: bool = False) -> TableSchema | None:
    """The table's schema; ``latest`` (under the table's lock): as the last DDL left it,
    durable or not (its lock may have been released early: invariant 20)."""
    db = session.backend.db()
    if not db.has_table(ENGINE_TABLE):
        raw = None
    else:
        raw = await session.transaction().get(ENGINE_TABLE, table_key_name(name), latest)
    if raw is None:
        if missing_ok:
            return None
        raise PgError("42P01", f'relation "{name}" does not exist')
    return TableSchema.from_json(raw)


async def list_schemas(session: Session) -> list[TableSchema]:
    if not session.backend.db().has_table(ENGINE_TABLE):
        return []
    start = table_key_name("")
    end = catalog_key(b"U")
    rows = await session.transaction().scan(ENGINE_TABLE, start, end, 100_000)
    return [TableSchema.from_json(v) for _, v in rows]


async def _new_table_id(session: Session) -> int:
    # The engine table is created by the first DDL, not at start: a writer that never
    # serves SQL keeps the volume exactly as before (an extra table's root page would sit
    # in a PG that then stays idle).
    if session.read_only:
        raise PgError("25006", "cannot execute DDL in a read-only transaction (this is a read replica)")
    await session.backend.ensure_table()
    key = catalog_key(b"N")
    await session.lock(key)
    txn = session.transaction()
    raw = await txn.get(ENGINE_TABLE, key, latest=True)   # under its lock: invariant 20
    table_id = int(raw) if raw else 1
    txn.put(ENGINE_TABLE, key, str(table_id + 1).encode())
    return table_id


async def _put_schema(session: Session, schema: TableSchema) -> None:
    session.transaction().put(ENGINE_TABLE, table_key_name(schema.name), schema.to_json())
    await session.wrote()


def _relname(rv: ast.RangeVar) -> str:
    if rv.schemaname not in (None, "public"):
        raise not_supported(f"schema {rv.schemaname}")
    return rv.relname


# --- Reading rows --------------------------------------------------------------------------------

def _conjuncts(node) -> list:
    if isinstance(node, ast.BoolExpr) and node.boolop == enums.BoolExprType.AND_EXPR:
        out = []
        for a in node.args:
            out.extend(_conjuncts(a))
        return out
    return [] if node is None else [node]


def _is_const(node) -> bool:
    return isinstance(node, (ast.A_Const, ast.ParamRef)) or (
        isinstance(node, ast.TypeCast) and _is_const(node.arg))


def _col(node) -> str | None:
    if isinstance(node, ast.ColumnRef) and isinstance(node.fields[-1], ast.String):
        return node.fields[-1].sval
    return None


def key_range(schema: TableSchema, where, params) -> tuple[bytes, bytes, bool]:
    """(start, end, exact) of the keys WHERE can match: the whole table, one primary key
    (exact), or a range of a one-column integer primary key."""
    prefix = schema.prefix()
    start, end = prefix, prefix_end(prefix)
    if not schema.pk:
        return start, end, False
    eq: dict[str, object] = {}
    low = high = None
    pk0 = schema.columns[schema.index(schema.pk[0])]
    ctx = Context(params)
    for c in _conjuncts(where):
        if not isinstance(c, ast.A_Expr):
            continue
        K = enums.A_Expr_Kind
        if c.kind == K.AEXPR_OP and c.name[-1].sval in ("=", "<", "<=", ">", ">="):
            op, lhs, rhs = c.name[-1].sval, c.lexpr, c.rexpr
            if _col(rhs) and _is_const(lhs):
                lhs, rhs = rhs, lhs
                op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
            name = _col(lhs)
            if name is None or name not in schema.pk or not _is_const(rhs):
                continue
            col = schema.columns[schema.index(name)]
            value = coerce(evaluate(rhs, ctx), col.type, col.typmod)
            if value is None:
                return start, start, True  # key = NULL matches nothing
            if op == "=":
                eq[name] = value
            elif name == schema.pk[0] and len(schema.pk) == 1 and pk0.kind == "int":
                if op in (">", ">="):
                    v = value + (op == ">")
                    low = v if low is None else max(low, v)
                else:
                    v = value - (op == "<")
                    high = v if high is None else min(high, v)
        elif c.kind == K.AEXPR_BETWEEN and _col(c.lexpr) == schema.pk[0] and len(schema.pk) == 1 \
                and pk0.kind == "int" and all(_is_const(x) for x in c.rexpr):
            lo, hi = (coerce(evaluate(x, ctx), pk0.type) for x in c.rexpr)
            if lo is None or hi is None:
                return start, start, True
            low = lo if low is None else max(low, lo)
            high = hi if high is None else min(high, hi)
    if all(n in eq for n in schema.pk):
        row = [None] * len(schema.columns)
        for n in schema.pk:
            row[schema.index(n)] = eq[n]
        key = schema.key_of(row)
        return key, key + b"\x00", True
    if low is not None or high is not None:
        row = [None] * len(schema.columns)
        i = schema.index(schema.pk[0])
        if low is not None:
            row[i] = max(low, -(1 << 63))
            start = schema.key_of(row)
        if high is not None:
            if high < low if low is not None else False:
                return start, start, True
            row[i] = min(high, (1 << 63) - 2) + 1
            end = schema.key_of(row)
    return start, end, False


async def scan_rows(session: Session, schema: TableSchema, where, params, latest: bool = False):
    """(key, row) of every row of the table WHERE may match (not yet filtered by WHERE).
    ``latest``: the candidates of an UPDATE or DELETE, which locks and re-reads each one:
    newest committed values, durable or not (invariant 20), so it never waits for VDL."""
    start, end, exact = key_range(schema, where, params)
    if not exact and schema.indexes:
        found = await _index_lookup(session, schema, where, params, latest)
        if found is not None:
            return found
    txn = session.transaction()
    if exact:
        if start == end:
            return []
        raw = await txn.get(ENGINE_TABLE, start, latest)
        return [] if raw is None else [(start, decode_row(schema, raw))]
    out = []
    while start < end:
        page = await txn.scan(ENGINE_TABLE, start, end, SCAN_PAGE_ROWS, latest)
        out.extend((k, decode_row(schema, v)) for k, v in page)
        if len(page) < SCAN_PAGE_ROWS:
            break
        await asyncio.sleep(0)
        start = page[-1][0] + b"\x00"
    return out


def put_row(session: Session, schema: TableSchema, key: bytes, row: list, old: list | None = None) -> int:
    """Buffer the row and its secondary index entries (replacing ``old``'s, if given);
    returns the number of keys written."""
    txn = session.transaction()
    txn.put(ENGINE_TABLE, key, encode_row(schema, row))
    n = 1
    for index in schema.indexes:
        entry = schema.index_key(index, row, key)
        if old is not None:
            old_entry = schema.index_key(index, old, key)
            if old_entry == entry:
                continue
            txn.delete(ENGINE_TABLE, old_entry)
            n += 1
        txn.put(ENGINE_TABLE, entry, b"")
        n += 1
    return n


def remove_row(session: Session, schema: TableSchema, key: bytes, row: list) -> int:
    """Buffer the removal of the row and its index entries; returns the keys written."""
    txn = session.transaction()
    txn.delete(ENGINE_TABLE, key)
    for index in schema.indexes:
        txn.delete(ENGINE_TABLE, schema.index_key(index, row, key))
    return 1 + len(schema.indexes)


async def _index_lookup(session: Session, schema: TableSchema, where, params, latest: bool = False):
    """(key, row) of the rows an equality on every column of a secondary index selects, or
    None if no index fits WHERE."""
    eq = {}
    ctx = Context(params)
    for c in _conjuncts(where):
        if isinstance(c, ast.A_Expr) and c.kind == enums.A_Expr_Kind.AEXPR_OP and c.name[-1].sval == "=":
            lhs, rhs = c.lexpr, c.rexpr
            if _col(rhs) and _is_const(lhs):
                lhs, rhs = rhs, lhs
            name = _col(lhs)
            if name is not None and _is_const(rhs):
                eq[name] = rhs
    for index in schema.indexes:
        if all(n in eq for n in index["columns"]):
            values = []
            for n in index["columns"]:
                col = schema.columns[schema.index(n)]
                values.append(coerce(evaluate(eq[n], ctx), col.type, col.typmod))
            if any(v is None for v in values):
                return []
            prefix = schema.index_prefix(index, values)
            session.backend.counters["index_lookups"] += 1
            txn = session.transaction()
            entries = await txn.scan(ENGINE_TABLE, prefix, prefix_end_bytes(prefix), 100_000, latest)
            out = []
            for entry, _ in entries:
                key = schema.prefix() + entry[len(prefix):]
                raw = await txn.get(ENGINE_TABLE, key, latest)
                if raw is not None:
                    out.append((key, decode_row(schema, raw)))
            return out
    return None


def prefix_end_bytes(prefix: bytes) -> bytes:
    """The smallest key above every key that starts with ``prefix``."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    b[-1] += 1
    return bytes(b)


def _row_ctx(schema: TableSchema, row: list, params) -> Context:
    return Context(params, {c.name: v for c, v in zip(schema.columns, row)})


def _matches(where, ctx: Context) -> bool:
    return where is None or evaluate(where, ctx) is True


# --- Statements ----------------------------------------------------------------------------------

async def execute(session: Session, stmt, params: list) -> Result:
    """Run one statement; the caller handles transaction blocks and errors."""
    handler = HANDLERS.get(type(stmt))
    if handler is None:
        raise not_supported(f"statement {type(stmt).__name__}")
    session.backend.counters["statements"] += 1
    return await handler(session, stmt, params)


async def create_table(session: Session, stmt: ast.CreateStmt, params) -> Result:
    if stmt.inhRelations or stmt.partspec or stmt.ofTypename:
        raise not_supported("inheritance, partitions and typed tables")
    if stmt.relation.relpersistence == "t":
        raise not_supported("temporary tables")
    name = _relname(stmt.relation)
    await session.lock(table_key_name(name))
    if await get_schema(session, name, missing_ok=True, latest=True) is not None:
        if stmt.if_not_exists:
            return Result("CREATE TABLE")
        raise PgError("42P07", f'relation "{name}" already exists')
    columns, pk = [], []
    for elt in stmt.tableElts or ():
        if isinstance(elt, ast.Constraint):
            pk = _table_constraint(elt, pk)
            continue
        if not isinstance(elt, ast.ColumnDef):
            raise not_supported(f"table element {type(elt).__name__}")
        raw_type = " ".join(n.sval for n in elt.typeName.names if n.sval != "pg_catalog").lower()
        typ, typmod = type_name(elt.typeName)
        col = Column(elt.colname, typ, typmod, not_null=bool(elt.is_not_null))
        if raw_type in SERIAL_TYPES:
            col.serial, col.not_null = True, True
        for con in elt.constraints or ():
            t = enums.ConstrType
            if con.contype == t.CONSTR_PRIMARY:
                pk = [elt.colname]
                col.not_null = True
            elif con.contype == t.CONSTR_NOTNULL:
                col.not_null = True
            elif con.contype == t.CONSTR_NULL:
                col.not_null = False
            elif con.contype == t.CONSTR_DEFAULT:
                from pglast.stream import RawStream
                col.default = RawStream()(con.raw_expr)
            else:
                raise not_supported(f"column constraint {con.contype.name}")
        if any(c.name == col.name for c in columns):
            raise PgError("42701", f'column "{col.name}" specified more than once')
        columns.append(col)
    schema = TableSchema(name, 0, columns, [])
    for n in pk:
        schema.columns[schema.index(n)].not_null = True
    schema.pk = pk
    schema.table_id = await _new_table_id(session)
    await _put_schema(session, schema)
    return Result("CREATE TABLE")


async def _drop_index(session: Session, stmt: ast.DropStmt) -> Result:
    for obj in stmt.objects:
        index_name = obj[-1].sval
        for schema in await list_schemas(session):
            if any(ix["name"] == index_name for ix in schema.indexes):
                await session.lock(table_key_name(schema.name))
                schema = await get_schema(session, schema.name, latest=True)
                schema.indexes = [ix for ix in schema.indexes if ix["name"] != index_name]
                await _put_schema(session, schema)   # its entries become unreachable
                break
        else:
            if not stmt.missing_ok:
                raise PgError("42704", f'index "{index_name}" does not exist')
    return Result("DROP INDEX")


def _table_constraint(con: ast.Constraint, pk: list) -> list:
    if con.contype != enums.ConstrType.CONSTR_PRIMARY:
        raise not_supported(f"table constraint {con.contype.name}")
    return [k.sval for k in con.keys]


async def drop(session: Session, stmt: ast.DropStmt, params) -> Result:
    if stmt.removeType == enums.ObjectType.OBJECT_INDEX:
        return await _drop_index(session, stmt)
    if stmt.removeType != enums.ObjectType.OBJECT_TABLE:
        raise not_supported(f"DROP {stmt.removeType.name[7:]}")
    for obj in stmt.objects:
        names = [n.sval for n in obj]
        if len(names) > 1 and names[0] != "public":
            raise not_supported(f"schema {names[0]}")
        name = names[-1]
        await session.lock(table_key_name(name))
        if await get_schema(session, name, missing_ok=True, latest=True) is None:
            if stmt.missing_ok:
                continue
            raise PgError("42P01", f'table "{name}" does not exist')
        session.transaction().delete(ENGINE_TABLE, table_key_name(name))
        await session.wrote()
    return Result("DROP TABLE")


async def truncate(session: Session, stmt: ast.TruncateStmt, params) -> Result:
    for rv in stmt.relations:
        name = _relname(rv)
        await session.lock(table_key_name(name))
        schema = await get_schema(session, name, latest=True)
        schema.table_id = await _new_table_id(session)   # old rows become unreachable
        for index in schema.indexes:
            index["id"] = await _new_table_id(session)
        await _put_schema(session, schema)
    return Result("TRUNCATE TABLE")


async def alter_table(session: Session, stmt: ast.AlterTableStmt, params) -> Result:
    name = _relname(stmt.relation)
    await session.lock(table_key_name(name))
    schema = await get_schema(session, name, latest=True)
    for cmd in stmt.cmds:
        con = cmd.def_
        if cmd.subtype != enums.AlterTableType.AT_AddConstraint or \
                con.contype != enums.ConstrType.CONSTR_PRIMARY:
            raise not_supported(f"ALTER TABLE {cmd.subtype.name}")
        if schema.pk:
            raise PgError("42P16", f'multiple primary keys for table "{name}" are not allowed')
        pk = [k.sval for k in con.keys]
        indexes = [{**ix, "id": await _new_table_id(session)} for ix in schema.indexes]
        new = TableSchema(name, await _new_table_id(session), schema.columns, pk, indexes)
        for n in pk:
            new.columns[new.index(n)].not_null = True
        seen = set()
        txn = session.transaction()
        for n, (_, row) in enumerate(await scan_rows(session, schema, None, [])):
            await session.yield_if_due()   # a big rewrite lets the instance's other work run
            key = new.key_of(row)
            if key in seen:
                raise PgError("23505", f'could not create unique index "{name}_pkey": key is duplicated')
            seen.add(key)
            await session.wrote(put_row(session, new, key, row))
        schema = new
        await _put_schema(session, schema)
    return Result("ALTER TABLE")


async def create_index(session: Session, stmt: ast.IndexStmt, params) -> Result:
    """CREATE INDEX name ON table (col, ...): a secondary index, built and kept in the
    same transactions as the table's rows."""
    if stmt.unique or stmt.whereClause or stmt.indexIncludingParams or stmt.concurrent:
        raise not_supported("UNIQUE, partial, INCLUDE and CONCURRENTLY indexes")
    if stmt.accessMethod not in (None, "btree"):
        raise not_supported(f"index method {stmt.accessMethod}")
    name = _relname(stmt.relation)
    await session.lock(table_key_name(name))
    schema = await get_schema(session, name, latest=True)
    columns = []
    for elem in stmt.indexParams:
        if elem.name is None:
            raise not_supported("indexes on expressions")
        schema.index(elem.name)
        columns.append(elem.name)
    index_name = stmt.idxname or f"{name}_{'_'.join(columns)}_idx"
    if any(ix["name"] == index_name for ix in schema.indexes):
        if stmt.if_not_exists:
            return Result("CREATE INDEX")
        raise PgError("42P07", f'relation "{index_name}" already exists')
    index = {"name": index_name, "id": await _new_table_id(session), "columns": columns}
    for key, row in await scan_rows(session, schema, None, []):
        session.transaction().put(ENGINE_TABLE, schema.index_key(index, row, key), b"")
        await session.wrote()
    schema.indexes.append(index)
    await _put_schema(session, schema)
    return Result("CREATE INDEX")


async def _default(session: Session, schema: TableSchema, col: Column):
    if col.serial:
        return await session.backend.nextval(schema, col.name)
    if col.default is None:
        return None
    import pglast
    expr = pglast.parse_sql(f"SELECT {col.default}")[0].stmt.targetList[0].val
    return coerce(evaluate(expr, Context()), col.type, col.typmod, f'column "{col.name}"')


async def insert_row(session: Session, schema: TableSchema, given: dict) -> None:
    """Insert one row (column name -> value; missing columns get their default)."""
    row = []
    for col in schema.columns:
        if col.name in given and given[col.name] is not _DEFAULT:
            value = coerce(given[col.name], col.type, col.typmod, f'column "{col.name}"')
        else:
            value = await _default(session, schema, col)
        if value is None and col.not_null:
            raise PgError("23502", f'null value in column "{col.name}" of relation "{schema.name}" '
                                   f'violates not-null constraint')
        row.append(value)
    encode_row(schema, row)   # too large: 54000 before anything is locked
    if schema.pk:
        key = schema.key_of(row)
        await session.lock(key)
        if await session.transaction().get(ENGINE_TABLE, key, latest=True) is not None:
            raise PgError("23505", f'duplicate key value violates unique constraint "{schema.name}_pkey"')
    else:
        if session.read_only:
            raise PgError("25006", "cannot execute INSERT in a read-only transaction")
        key = schema.prefix() + struct.pack(">Q", session.backend.rowid())
    await session.wrote(put_row(session, schema, key, row))


_DEFAULT = object()


def _returning(stmt) -> bool:
    return bool(getattr(stmt, "returningList", None) or getattr(stmt, "returningClause", None))


async def insert(session: Session, stmt: ast.InsertStmt, params) -> Result:
    if stmt.onConflictClause or _returning(stmt) or stmt.withClause:
        raise not_supported("INSERT ... ON CONFLICT / RETURNING / WITH")
    schema = await get_schema(session, _relname(stmt.relation))
    names = [c.name for c in stmt.cols] if stmt.cols else [c.name for c in schema.columns]
    for n in names:
        schema.index(n)
    select = stmt.selectStmt
    if select is None:
        rows = [[]]
        names = []
    elif select.valuesLists:
        rows = []
        ctx = Context(params)
        for values in select.valuesLists:
            if len(values) > len(names):
                raise PgError("42601", "INSERT has more expressions than target columns")
            rows.append([_DEFAULT if isinstance(v, ast.SetToDefault) else evaluate(v, ctx) for v in values])
    else:
        rows = (await select_stmt(session, select, params)).rows
    for n, values in enumerate(rows):
        await session.yield_if_due()   # a big multi-row INSERT lets the instance's other work run
        await insert_row(session, schema, dict(zip(names, values)))
    return Result(f"INSERT 0 {len(rows)}")


async def update(session: Session, stmt: ast.UpdateStmt, params) -> Result:
    if stmt.fromClause or _returning(stmt) or stmt.withClause:
        raise not_supported("UPDATE ... FROM / RETURNING / WITH")
    schema = await get_schema(session, _relname(stmt.relation))
    targets = []
    for t in stmt.targetList:
        col = schema.columns[schema.index(t.name)]
        if t.indirection:
            raise not_supported("UPDATE of a part of a column")
        targets.append((schema.index(t.name), col, t.val))
    n = 0
    for i, (key, _) in enumerate(await scan_rows(session, schema, stmt.whereClause, params, latest=True)):
        await session.yield_if_due()   # a big UPDATE lets the instance's other work run
        await session.lock(key)
        raw = await session.transaction().get(ENGINE_TABLE, key, latest=True)   # under the lock: invariant 20
        if raw is None:
            continue
        row = decode_row(schema, raw)
        ctx = _row_ctx(schema, row, params)
        if not _matches(stmt.whereClause, ctx):
            continue
        new = list(row)
        for i, col, expr in targets:
            value = await _default(session, schema, col) if isinstance(expr, ast.SetToDefault) \
                else evaluate(expr, ctx)
            new[i] = coerce(value, col.type, col.typmod, f'column "{col.name}"')
            if new[i] is None and col.not_null:
                raise PgError("23502", f'null value in column "{col.name}" violates not-null constraint')
        new_key = schema.key_of(new) if schema.pk else key
        encode_row(schema, new)   # too large: 54000 before anything changes
        written = 0
        if new_key != key:
            await session.lock(new_key)
            if await session.transaction().get(ENGINE_TABLE, new_key, latest=True) is not None:
                raise PgError("23505", f'duplicate key value violates unique constraint "{schema.name}_pkey"')
            written += remove_row(session, schema, key, row)
            written += put_row(session, schema, new_key, new)
        else:
            written += put_row(session, schema, key, new, old=row)
        await session.wrote(written)
        n += 1
    return Result(f"UPDATE {n}")


async def delete(session: Session, stmt: ast.DeleteStmt, params) -> Result:
    if stmt.usingClause or _returning(stmt) or stmt.withClause:
        raise not_supported("DELETE ... USING / RETURNING / WITH")
    schema = await get_schema(session, _relname(stmt.relation))
    n = 0
    for i, (key, _) in enumerate(await scan_rows(session, schema, stmt.whereClause, params, latest=True)):
        await session.yield_if_due()   # a big DELETE lets the instance's other work run
        await session.lock(key)
        raw = await session.transaction().get(ENGINE_TABLE, key, latest=True)
        if raw is None:
            continue
        row = decode_row(schema, raw)
        if not _matches(stmt.whereClause, _row_ctx(schema, row, params)):
            continue
        await session.wrote(remove_row(session, schema, key, row))
        n += 1
    return Result(f"DELETE {n}")


async def copy_rows(session: Session, schema: TableSchema, names: list[str], lines: list[str]) -> int:
    """Insert COPY text-format lines (tab-separated, \\N = NULL, backslash escapes)."""
    for n, line in enumerate(lines):
        await session.yield_if_due()   # let the instance's other work run during a big COPY
        fields = [None if f == "\\N" else _unescape(f) for f in line.split("\t")]
        if len(fields) != len(names):
            raise PgError("22P04", f"COPY row has {len(fields)} columns, expected {len(names)}")
        await insert_row(session, schema, dict(zip(names, fields)))
    return len(lines)


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\", "b": "\b", "f": "\f", "v": "\v"}


def _unescape(field_text: str) -> str:
    if "\\" not in field_text:
        return field_text
    out, i = [], 0
    while i < len(field_text):
        ch = field_text[i]
        if ch == "\\" and i + 1 < len(field_text):
            out.append(_ESCAPES.get(field_text[i + 1], field_text[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


async def copy_target(session: Session, stmt: ast.CopyStmt) -> tuple[TableSchema, list[str]]:
    """Check a COPY statement and return (schema, column names) for copy_rows."""
    if not stmt.is_from or stmt.filename is not None or stmt.is_program or stmt.query is not None:
        raise not_supported("COPY other than COPY table FROM STDIN")
    for opt in stmt.options or ():
        value = getattr(opt.arg, "sval", None)
        if opt.defname == "format" and value != "text":
            raise not_supported(f"COPY format {value}")
        if opt.defname not in ("format", "freeze"):
            raise not_supported(f"COPY option {opt.defname}")
    schema = await get_schema(session, _relname(stmt.relation))
    names = [a.sval for a in stmt.attlist] if stmt.attlist else [c.name for c in schema.columns]
    for n in names:
        schema.index(n)
    if session.read_only:
        raise PgError("25006", "cannot execute COPY FROM in a read-only transaction")
    return schema, names


async def select_stmt(session: Session, stmt: ast.SelectStmt, params) -> Result:
    catalog = catalog_query.uses_catalog(stmt)
    if catalog and stmt.op == enums.SetOperation.SETOP_UNION:
        cat = catalog_query.Catalog(await list_schemas(session))
        targets, rows = catalog_query.set_operation(cat, stmt, params)
        columns = [(name, _type_of(expr, None, rows, i)) for i, (name, expr) in enumerate(targets)]
        return Result(f"SELECT {len(rows)}", columns, rows)
    if stmt.op != enums.SetOperation.SETOP_NONE or stmt.withClause or stmt.groupClause \
            or stmt.havingClause or stmt.windowClause or stmt.lockingClause or stmt.intoClause:
        raise not_supported("set operations, WITH, GROUP BY, HAVING, windows, FOR UPDATE, INTO")
    if stmt.valuesLists:
        ctx = Context(params)
        rows = [[evaluate(v, ctx) for v in values] for values in stmt.valuesLists]
        cols = [(f"column{i + 1}", type_of_value(v)) for i, v in enumerate(rows[0])]
        return Result(f"SELECT {len(rows)}", cols, rows)
    from_ = stmt.fromClause or ()
    if not catalog and (len(from_) > 1 or (from_ and not isinstance(from_[0], ast.RangeVar))):
        raise not_supported("joins and subqueries in FROM (only over the system catalogs)")
    schema = None
    star: list[tuple[str, object]] = []
    if catalog:
        # pg_catalog / information_schema: joins, subqueries (engine/pg/catalog_query.py).
        cat = catalog_query.Catalog(await list_schemas(session))
        contexts = catalog_query.scopes(cat, stmt, params)
        star = [(c, ast.ColumnRef(fields=(ast.String(sval=alias), ast.String(sval=c))))
                for alias, c in catalog_query.from_columns(stmt)]
    elif from_:
        rv = from_[0]
        schema = await get_schema(session, _relname(rv))
        star = [(c.name, ast.ColumnRef(fields=(ast.String(sval=c.name),))) for c in schema.columns]
        source = [r for _, r in await scan_rows(session, schema, stmt.whereClause, params)]
        contexts = []
        for n, r in enumerate(source):
            await session.yield_if_due()   # a big scan lets the instance's other work run
            c = _row_ctx(schema, r, params)
            if _matches(stmt.whereClause, c):
                contexts.append(c)
    else:
        contexts = [Context(params)]
        if stmt.whereClause is not None and not _matches(stmt.whereClause, contexts[0]):
            contexts = []
    # The select list: * expands to the table's columns.
    targets: list[tuple[str, object]] = []
    for t in stmt.targetList:
        if isinstance(t.val, ast.ColumnRef) and isinstance(t.val.fields[-1], ast.A_Star):
            if not from_:
                raise PgError("42601", "SELECT * with no tables specified is not valid")
            targets += star
        else:
            targets.append((t.name or output_name(t.val), t.val))
    aggs: list = []
    for _, expr in targets:
        walk_aggregates(expr, aggs)
    if aggs:
        values = {id(a): _aggregate(a, contexts) for a in aggs}
        ctx = Context(params)
        ctx.aggregates = values
        contexts = [ctx]
    if stmt.sortClause:
        for sort in reversed(stmt.sortClause):
            expr = sort.node
            if isinstance(expr, ast.A_Const) and isinstance(expr.val, ast.Integer):
                expr = targets[expr.val.ival - 1][1]
            desc = sort.sortby_dir == enums.SortByDir.SORTBY_DESC
            keyed = [(evaluate(expr, c), c) for c in contexts]
            nulls = [c for v, c in keyed if v is None]
            rest = [(v, c) for v, c in keyed if v is not None]
            rest.sort(key=lambda vc: vc[0], reverse=desc)
            contexts = ([*nulls] if desc else []) + [c for _, c in rest] + ([] if desc else nulls)
    rows = [[evaluate(expr, c) for _, expr in targets] for c in contexts]
    if stmt.distinctClause is not None:
        seen, unique = set(), []
        for r in rows:
            k = tuple(r)
            if k not in seen:
                seen.add(k)
                unique.append(r)
        rows = unique
    offset = evaluate(stmt.limitOffset, Context(params)) if stmt.limitOffset is not None else 0
    rows = rows[int(offset or 0):]
    if stmt.limitCount is not None:
        limit = evaluate(stmt.limitCount, Context(params))
        if limit is not None:
            rows = rows[:int(limit)]
    columns = [(name, _type_of(expr, schema, rows, i)) for i, (name, expr) in enumerate(targets)]
    return Result(f"SELECT {len(rows)}", columns, rows)


def _type_of(expr, schema, rows, i) -> int:
    name = _col(expr)
    if schema is not None and name is not None:
        return schema.columns[schema.index(name)].oid
    if isinstance(expr, ast.FuncCall) and func_name(expr) == "count":
        return 20
    if isinstance(expr, ast.TypeCast):
        from engine.pg.rows import TYPES
        try:
            return TYPES[type_name(expr.typeName)[0]][0]
        except PgError:
            pass   # a catalog type (regclass, oid, ...): typed by its values below
    if isinstance(expr, ast.FuncCall) and func_name(expr) in ("sum", "min", "max") and expr.args:
        inner = _col(expr.args[0])
        if schema is not None and inner is not None:
            oid = schema.columns[schema.index(inner)].oid
            return 20 if func_name(expr) == "sum" and oid in (21, 23) else oid
    for r in rows:
        if r[i] is not None:
            return type_of_value(r[i])
    return 25


def _aggregate(node: ast.FuncCall, contexts: list[Context]):
    name = func_name(node)
    if node.agg_star:
        if name != "count":
            raise PgError("42601", f"{name}(*) is not valid")
        return len(contexts)
    if node.agg_distinct or node.agg_order or node.agg_filter or len(node.args or ()) != 1:
        raise not_supported("DISTINCT, ORDER BY or FILTER in an aggregate")
    values = [v for v in (evaluate(node.args[0], c) for c in contexts) if v is not None]
    if name == "count":
        return len(values)
    if not values:
        return None
    if name == "sum":
        return sum(values)
    if name == "avg":
        return sum(values) / len(values)
    return min(values) if name == "min" else max(values)


async def accept(session: Session, stmt, params) -> Result:
    """VACUUM, ANALYZE: nothing to do in aurora-lite (no dead tuples, no planner stats)."""
    log.info("%s accepted (nothing to do)", "VACUUM" if getattr(stmt, "is_vacuumcmd", False) else "ANALYZE")
    return Result("VACUUM" if getattr(stmt, "is_vacuumcmd", False) else "ANALYZE")


async def set_stmt(session: Session, stmt: ast.VariableSetStmt, params) -> Result:
    K = enums.VariableSetKind
    name = (stmt.name or "").lower()
    if stmt.kind in (K.VAR_RESET, K.VAR_RESET_ALL, K.VAR_SET_DEFAULT):
        session.settings.pop(name, None)
        return Result("RESET" if stmt.kind != K.VAR_SET_DEFAULT else "SET")
    if stmt.kind == K.VAR_SET_MULTI:   # SET TRANSACTION ..., SET SESSION CHARACTERISTICS
        return Result("SET")
    if stmt.kind != K.VAR_SET_VALUE:
        raise not_supported(f"SET {stmt.kind.name}")
    values = []
    for a in stmt.args or ():
        v = evaluate(a, Context(params)) if not isinstance(a, ast.TypeCast) else evaluate(a.arg, Context())
        values.append(str(v))
    session.settings[name] = ", ".join(values)
    return Result("SET")


def setting(session: Session, name: str) -> str:
    name = name.lower()
    if name in session.settings:
        return session.settings[name]
    if name in DEFAULT_SETTINGS:
        return DEFAULT_SETTINGS[name]
    if name == "transaction_read_only":
        return "on" if session.read_only else "off"
    raise PgError("42704", f'unrecognized configuration parameter "{name}"')


async def show(session: Session, stmt: ast.VariableShowStmt, params) -> Result:
    if stmt.name == "all":
        rows = [[k, setting(session, k)] for k in sorted({*DEFAULT_SETTINGS, *session.settings})]
        return Result("SHOW", [("name", 25), ("setting", 25)], rows)
    return Result("SHOW", [(stmt.name, 25)], [[setting(session, stmt.name)]])


async def discard(session: Session, stmt, params) -> Result:
    session.settings.clear()
    return Result("DISCARD ALL")


HANDLERS = {
    ast.CreateStmt: create_table, ast.DropStmt: drop, ast.TruncateStmt: truncate,
    ast.AlterTableStmt: alter_table, ast.InsertStmt: insert, ast.UpdateStmt: update,
    ast.DeleteStmt: delete, ast.SelectStmt: select_stmt, ast.VacuumStmt: accept,
    ast.VariableSetStmt: set_stmt, ast.VariableShowStmt: show, ast.DiscardStmt: discard,
    ast.IndexStmt: create_index,
}
WRITES = (ast.CreateStmt, ast.IndexStmt, ast.DropStmt, ast.TruncateStmt, ast.AlterTableStmt, ast.InsertStmt,
          ast.UpdateStmt, ast.DeleteStmt, ast.CopyStmt)
AGGREGATE_NAMES = AGGREGATES
