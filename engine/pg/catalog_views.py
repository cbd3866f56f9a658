"""The few catalog views a one-table SELECT can read: pg_tables, information_schema.tables
and information_schema.columns, built from the SQL catalog (engine/pg/rows.py).

psql's \\dt and \\d and pgbench's partition probe join pg_class with other catalogs; joins
are not supported (0A000), so those commands get a clear error (pgbench ignores it).
"""

from __future__ import annotations

from engine.pg.rows import Column, TableSchema
from engine.pg.sqlstate import PgError, not_supported


def _schema(name: str, cols: list[str]) -> TableSchema:
    return TableSchema(name, 0, [Column(c, "text") for c in cols], [])


async def view(session, rv, list_schemas):
    """(schema, rows) of catalog view ``rv`` (a RangeVar)."""
    name = rv.relname
    schemas = await list_schemas(session)
    if name == "pg_tables":
        s = _schema(name, ["schemaname", "tablename", "tableowner"])
        return s, [["public", t.name, "aurora"] for t in schemas]
    if name == "tables" and rv.schemaname == "information_schema":
        s = _schema(name, ["table_catalog", "table_schema", "table_name", "table_type"])
        return s, [["aurora", "public", t.name, "BASE TABLE"] for t in schemas]
    if name == "columns" and rv.schemaname == "information_schema":
        s = _schema(name, ["table_schema", "table_name", "column_name", "data_type", "is_nullable",
                           "ordinal_position"])
        return s, [["public", t.name, c.name, c.type, "NO" if c.not_null else "YES", str(i + 1)]
                   for t in schemas for i, c in enumerate(t.columns)]
    if rv.schemaname in ("pg_catalog", "information_schema"):
        raise not_supported(f"catalog {rv.schemaname}.{name}")
    raise PgError("42P01", f'relation "{name}" does not exist')
