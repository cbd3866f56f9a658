"""engine/pg/rows.py: the row format round-trips, and the key encoding sorts like the values
(the B+tree's byte order is the primary key's order: range scans and ORDER BY rely on it)."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings, strategies as st

from engine.pg.rows import Column, TableSchema, decode_row, encode_key_part, encode_row

INT8 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
TEXT = st.text(max_size=40)


@settings(max_examples=150, deadline=None)
@given(INT8, INT8)
def test_integer_keys_sort_like_integers(a, b):
    col = Column("k", "int8")
    assert (encode_key_part(col, a) < encode_key_part(col, b)) == (a < b)


@settings(max_examples=150, deadline=None)
@given(st.tuples(TEXT, INT8), st.tuples(TEXT, INT8))
def test_composite_text_int_keys_sort_like_tuples(a, b):
    """Text then integer: the text's terminator keeps 'ab' + int below 'abc' + int, and an
    embedded NUL (0x00 written 0x00 0xFF) still sorts correctly."""
    schema = TableSchema("t", 7, [Column("s", "text"), Column("n", "int8")], ["s", "n"])
    ka, kb = schema.key_of(list(a)), schema.key_of(list(b))
    a_utf8, b_utf8 = (a[0].encode(), a[1]), (b[0].encode(), b[1])
    assert (ka < kb) == (a_utf8 < b_utf8)
    assert ka[:4] == kb[:4] == b"\x00\x00\x00\x07"


ROW = st.tuples(st.none() | INT8, st.none() | st.booleans(), st.none() | TEXT,
                st.none() | st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1)),
                st.none() | st.text(max_size=4))


@settings(max_examples=150, deadline=None)
@given(ROW)
def test_rows_round_trip(row):
    schema = TableSchema("t", 1, [Column("a", "int8"), Column("b", "bool"), Column("c", "text"),
                                  Column("d", "timestamp"), Column("e", "varchar", 4)])
    assert decode_row(schema, encode_row(schema, list(row))) == list(row)


def test_row_layout_matches_the_documented_table():
    """OFFSET 0 version 1, OFFSET 1 u16 column count, then the NULL bitmap, then values."""
    schema = TableSchema("t", 1, [Column("a", "int4"), Column("b", "text"), Column("c", "bool")])
    raw = encode_row(schema, [5, None, True])
    assert raw == b"\x01" + b"\x00\x03" + b"\x02" + (5).to_bytes(8, "big", signed=True) + b"\x01"
