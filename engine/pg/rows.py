"""SQL tables on the key-value engine: types, the table catalog, row and key encodings.

Every SQL table lives in ONE engine table, ``pg`` (engine/db/database.py), so a SQL
transaction of any shape (DDL included) is one engine transaction (one MTR at commit, or MTR pieces with one COMMIT record).
Keys start with a 4-byte table id; table id 0 holds the catalog.

Keys (all integers big-endian)

    OFFSET  SIZE  FIELD
    0       4     table id (u32); 0 = catalog
    4       ...   catalog: b"T" + table name (UTF-8)   -> table schema (JSON)
                           b"N"                        -> next table id (decimal text)
                           b"S" + u32 table id + column -> sequence high-water mark (text)
                  data rows: the primary key columns, each encoded order-preserving:
                    integer types, timestamp: 8 bytes, value + 2**63 (so bytes sort like numbers)
                    boolean: 1 byte (0 or 1)
                    text types: UTF-8 with 0x00 written 0x00 0xFF, then 0x00 0x00
                  a table without a primary key: an 8-byte hidden row id (u64)

A NULL can never be part of a key (primary key columns are NOT NULL).

Row values (format 1)

    OFFSET  SIZE          FIELD
    0       1             format version, 1
    1       2             n, the number of columns stored (u16)
    3       ceil(n/8)     NULL bitmap: bit (i % 8) of byte (i // 8) set = column i is NULL
    ...     per non-NULL column, in column order:
                          int4/int8 (integer, bigint, serial): 8 bytes, signed
                          boolean: 1 byte
                          timestamp: 8 bytes, signed microseconds since 1970-01-01 00:00
                          text, varchar(n), char(n): u16 length + UTF-8 bytes

A value is at most VALUE_MAX = 1500 bytes (engine/db/btree.py), so a row is too; a key at
most KEY_MAX = 512. Dropped and truncated tables get a new table id: their old rows stay
in the engine table, unreachable (space is not reclaimed; docs/postgres.md).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from dataclasses import dataclass, field

from engine.pg.sqlstate import PgError

ENGINE_TABLE = "pg"
CATALOG_ID = 0
FORMAT_VERSION = 1

# type name -> (type oid, storage kind)
TYPES = {
    "int4": (23, "int"), "int8": (20, "int"), "int2": (21, "int"),
    "bool": (16, "bool"), "text": (25, "text"), "varchar": (1043, "text"),
    "bpchar": (1042, "text"), "timestamp": (1114, "ts"), "timestamptz": (1184, "ts"),
}
TYPE_ALIASES = {"integer": "int4", "int": "int4", "smallint": "int2", "bigint": "int8",
                "boolean": "bool", "character varying": "varchar", "character": "bpchar",
                "char": "bpchar", "serial": "int4", "serial4": "int4", "bigserial": "int8",
                "serial8": "int8", "smallserial": "int2"}
SERIAL_TYPES = {"serial", "serial4", "bigserial", "serial8", "smallserial"}
INT_RANGE = {"int2": 1 << 15, "int4": 1 << 31, "int8": 1 << 63}
EPOCH = dt.datetime(1970, 1, 1)


def catalog_key(kind: bytes, rest: bytes = b"") -> bytes:
    return struct.pack(">I", CATALOG_ID) + kind + rest


def table_key_name(name: str) -> bytes:
    return catalog_key(b"T", name.encode())


@dataclass
class Column:
    name: str
    type: str                 # a key of TYPES
    typmod: int = -1          # varchar(n)/char(n): n; else -1
    not_null: bool = False
    default: str | None = None  # SQL text of the default expression, or None
    serial: bool = False

    @property
    def oid(self) -> int:
        return TYPES[self.type][0]

    @property
    def kind(self) -> str:
        return TYPES[self.type][1]


@dataclass
class TableSchema:
    name: str
    table_id: int
    columns: list[Column]
    pk: list[str] = field(default_factory=list)   # primary key column names; [] = hidden row id
    indexes: list[dict] = field(default_factory=list)  # {"name", "id", "columns"}: secondary indexes

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "id": self.table_id, "pk": self.pk,
                           "columns": [c.__dict__ for c in self.columns],
                           "indexes": self.indexes}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "TableSchema":
        d = json.loads(raw)
        return cls(d["name"], d["id"], [Column(**c) for c in d["columns"]], d["pk"],
                   d.get("indexes", []))

    def index_key(self, index: dict, row: list, row_key: bytes) -> bytes:
        """A secondary index entry's key: index id, the indexed columns (each 0x00 for NULL
        or 0x01 + its key encoding), then the row's key without its table id."""
        parts = [struct.pack(">I", index["id"])]
        for name in index["columns"]:
            i = self.index(name)
            value = row[i]
            parts.append(b"\x00" if value is None else b"\x01" + encode_key_part(self.columns[i], value))
        parts.append(row_key[4:])
        return b"".join(parts)

    def index_prefix(self, index: dict, values: list) -> bytes:
        """The key prefix of the entries whose indexed columns equal ``values``."""
        parts = [struct.pack(">I", index["id"])]
        for name, value in zip(index["columns"], values):
            parts.append(b"\x01" + encode_key_part(self.columns[self.index(name)], value))
        return b"".join(parts)

    def index(self, name: str) -> int:
        for i, c in enumerate(self.columns):
            if c.name == name:
                return i
        raise PgError("42703", f'column "{name}" of relation "{self.name}" does not exist')

    def prefix(self) -> bytes:
        return struct.pack(">I", self.table_id)

    def key_of(self, row: list) -> bytes:
        parts = [self.prefix()]
        for name in self.pk:
            i = self.index(name)
            parts.append(encode_key_part(self.columns[i], row[i]))
        return b"".join(parts)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with ``prefix`` (a 4-byte table id)."""
    (n,) = struct.unpack(">I", prefix[:4])
    return struct.pack(">I", n + 1)


def encode_key_part(col: Column, value) -> bytes:
    if value is None:
        raise PgError("23502", f'null value in column "{col.name}" violates not-null constraint')
    if col.kind in ("int", "ts"):
        return struct.pack(">Q", int(value if col.kind == "int" else ts_to_us(value)) + (1 << 63))
    if col.kind == "bool":
        return b"\x01" if value else b"\x00"
    return str(value).encode().replace(b"\x00", b"\x00\xff") + b"\x00\x00"


def encode_row(schema: TableSchema, row: list) -> bytes:
    n = len(schema.columns)
    bitmap = bytearray((n + 7) // 8)
    body = []
    for i, (col, value) in enumerate(zip(schema.columns, row)):
        if value is None:
            bitmap[i // 8] |= 1 << (i % 8)
            continue
        kind = col.kind
        if kind == "int":
            body.append(struct.pack(">q", value))
        elif kind == "bool":
            body.append(b"\x01" if value else b"\x00")
        elif kind == "ts":
            body.append(struct.pack(">q", ts_to_us(value)))
        else:
            raw = value.encode()
            body.append(struct.pack(">H", len(raw)) + raw)
    value = struct.pack(">BH", FORMAT_VERSION, n) + bytes(bitmap) + b"".join(body)
    if len(value) > 1500:
        raise PgError("54000", f"row of {len(value)} bytes is too big (aurora-lite rows are at most 1500 bytes)")
    return value


def decode_row(schema: TableSchema, raw: bytes) -> list:
    version, n = struct.unpack_from(">BH", raw, 0)
    if version != FORMAT_VERSION:
        raise PgError("XX001", f"row format {version} unknown")
    pos = 3 + (n + 7) // 8
    bitmap = raw[3:pos]
    row = []
    for i, col in enumerate(schema.columns):
        if i >= n or bitmap[i // 8] & (1 << (i % 8)):
            row.append(None)
            continue
        kind = col.kind
        if kind == "int":
            row.append(struct.unpack_from(">q", raw, pos)[0])
            pos += 8
        elif kind == "bool":
            row.append(raw[pos] == 1)
            pos += 1
        elif kind == "ts":
            row.append(us_to_ts(struct.unpack_from(">q", raw, pos)[0]))
            pos += 8
        else:
            (size,) = struct.unpack_from(">H", raw, pos)
            row.append(raw[pos + 2:pos + 2 + size].decode())
            pos += 2 + size
    return row


def ts_to_us(value: dt.datetime) -> int:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    delta = value - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def us_to_ts(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


# --- Values: coercion to a column's type and text output ---------------------------------------

def parse_timestamp(text: str) -> dt.datetime:
    s = text.strip()
    for suffix in ("+00", "+00:00", "Z", " UTC"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    try:
        return dt.datetime.fromisoformat(s)
    except ValueError:
        raise PgError("22007", f'invalid input syntax for type timestamp: "{text}"') from None


def coerce(value, typ: str, typmod: int = -1, what: str = "value"):
    """``value`` (a Python value or text) as a value of SQL type ``typ``, or PgError."""
    if value is None:
        return None
    kind = TYPES[typ][1]
    if kind == "int":
        if isinstance(value, bool):
            raise PgError("42804", f"{what} is of type boolean but expression is of type integer")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise PgError("22P02", f'invalid input syntax for type integer: "{value}"') from None
        elif isinstance(value, float):
            value = int(round(value))
        elif not isinstance(value, int):
            raise PgError("42804", f"{what} cannot be converted to {typ}")
        if not -INT_RANGE[typ] <= value < INT_RANGE[typ]:
            raise PgError("22003", f"value {value} is out of range for type {typ}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("t", "true", "yes", "y", "on", "1"):
            return True
        if text in ("f", "false", "no", "n", "off", "0"):
            return False
        raise PgError("22P02", f'invalid input syntax for type boolean: "{value}"')
    if kind == "ts":
        if isinstance(value, dt.datetime):
            return value.astimezone(dt.timezone.utc).replace(tzinfo=None) if value.tzinfo else value
        return parse_timestamp(str(value))
    text = value if isinstance(value, str) else to_text(value)
    if typ == "bpchar":
        stripped = text.rstrip(" ")
        n = typmod if typmod > 0 else 1
        if len(stripped) > n:
            raise PgError("22001", f"value too long for type character({n})")
        return stripped.ljust(n)
    if typ == "varchar" and typmod > 0 and len(text) > typmod:
        raise PgError("22001", f"value too long for type character varying({typmod})")
    return text


def to_text(value) -> str | None:
    """The text output format of a value (PostgreSQL's for these types)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, dt.datetime):
        text = value.isoformat(sep=" ")
        return text.rstrip("0") if "." in text else text   # PostgreSQL drops trailing zeros
    return str(value)


def type_of_value(value) -> int:
    """The type oid of a computed value (no column behind it)."""
    if isinstance(value, bool):
        return 16
    if isinstance(value, int):
        return 23 if -(1 << 31) <= value < (1 << 31) else 20
    if isinstance(value, dt.datetime):
        return 1184
    return 25
