"""Evaluating SQL expressions (pglast AST nodes) over one row, with PostgreSQL's NULL rules.

Supported: constants, column references, $n parameters, casts to the types of
engine/pg/rows.py, arithmetic (+ - * / %), comparison (= <> != < <= > >=), AND/OR/NOT,
string concatenation (||), [NOT] BETWEEN, IN (list), IS [NOT] NULL, [NOT] LIKE,
CASE, CURRENT_TIMESTAMP/now()/LOCALTIMESTAMP, and the functions in FUNCTIONS
(md5, random, abs, lower, upper, length, coalesce, version, ...). Anything else raises
PgError 0A000. Aggregates are evaluated by engine/pg/sql.py, not here.

Text values (string literals and text-format parameters) meet typed values like
PostgreSQL's "unknown" literals: compared with an integer they are read as integers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import re

from pglast import ast, enums

from engine.pg.rows import TYPE_ALIASES, TYPES, coerce, to_text
from engine.pg.sqlstate import PgError, not_supported

SERVER_VERSION = "15.0 (aurora-lite)"
AGGREGATES = {"count", "sum", "min", "max", "avg"}


def type_name(tn: ast.TypeName) -> tuple[str, int]:
    """A TypeName as (key of TYPES, typmod), or PgError 0A000 for other types."""
    names = [n.sval for n in tn.names if n.sval != "pg_catalog"]
    name = " ".join(names).lower()
    typ = TYPE_ALIASES.get(name, name)
    if typ not in TYPES:
        raise not_supported(f"type {name}")
    typmod = -1
    if tn.typmods:
        try:
            typmod = int(tn.typmods[0].val.ival)
        except AttributeError:
            raise not_supported(f"type modifier of {name}") from None
    if typ == "bpchar" and typmod < 0:
        typmod = 1
    return typ, typmod


def const_value(node: ast.A_Const):
    if node.isnull:
        return None
    val = node.val
    if isinstance(val, ast.Integer):
        return val.ival
    if isinstance(val, ast.String):
        return val.sval
    if isinstance(val, ast.Boolean):
        return bool(val.boolval)
    if isinstance(val, ast.Float):
        text = val.fval
        return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    raise not_supported(f"constant {type(val).__name__}")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


#: What an evaluation hook returns for a node it leaves to ``evaluate``.
NOT_HANDLED = object()


class Context:
    """What an expression can see: the row's columns (name -> value), the parameters.
    ``hook(node, ctx)``, if set, sees every node first and returns its value or
    NOT_HANDLED (engine/pg/catalog_query.py: qualified names, subqueries, catalog casts)."""

    hook = None

    def __init__(self, params: list | None = None, columns: dict | None = None) -> None:
        self.params = params or []
        self.columns = columns or {}
        self.aggregates: dict[int, object] = {}   # id(FuncCall) -> its value (set by sql.py)


def _unify(a, b):
    """Bring a text operand to the type of the other operand (PostgreSQL's unknown literal)."""
    if isinstance(a, str) and not isinstance(b, str) and b is not None:
        return _from_text(a, b), b
    if isinstance(b, str) and not isinstance(a, str) and a is not None:
        return a, _from_text(b, a)
    return a, b


def _from_text(text: str, like):
    if isinstance(like, bool):
        return coerce(text, "bool")
    if isinstance(like, int):
        return coerce(text, "int8")
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise PgError("22P02", f'invalid input syntax for type double precision: "{text}"') from None
    if isinstance(like, dt.datetime):
        return coerce(text, "timestamp")
    return text


def _arith(op: str, a, b):
    if a is None or b is None:
        return None
    a, b = _unify(a, b)
    if isinstance(a, str) and isinstance(b, str):
        try:
            a, b = int(a), int(b)
        except ValueError:
            raise PgError("42883", f"operator does not exist: text {op} text") from None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op in ("/", "%"):
        if b == 0:
            raise PgError("22012", "division by zero")
        if isinstance(a, int) and isinstance(b, int):
            q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
            return q if op == "/" else a - q * b
        return a / b if op == "/" else a % b
    raise not_supported(f"operator {op}")


_COMPARE = {"=": lambda a, b: a == b, "<>": lambda a, b: a != b, "!=": lambda a, b: a != b,
            "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b}


def compare(op: str, a, b):
    if a is None or b is None:
        return None
    a, b = _unify(a, b)
    if isinstance(a, str) and isinstance(b, str):
        a, b = a.rstrip(" "), b.rstrip(" ")  # char(n) comparison ignores trailing blanks
    try:
        return _COMPARE[op](a, b)
    except TypeError:
        raise PgError("42883", f"operator does not exist: {type(a).__name__} {op} {type(b).__name__}") from None


def _like(value, pattern, negate: bool):
    if value is None or pattern is None:
        return None
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    hit = re.fullmatch(rx, value, re.S) is not None
    return not hit if negate else hit


def _md5(x):
    return None if x is None else hashlib.md5(to_text(x).encode()).hexdigest()


FUNCTIONS = {
    "md5": _md5,
    "random": lambda: random.random(),
    "now": now,
    "abs": lambda x: None if x is None else abs(x),
    "lower": lambda x: None if x is None else str(x).lower(),
    "upper": lambda x: None if x is None else str(x).upper(),
    "length": lambda x: None if x is None else len(str(x)),
    "char_length": lambda x: None if x is None else len(str(x)),
    "version": lambda: f"PostgreSQL {SERVER_VERSION}",
    "current_database": lambda: "aurora",
    "current_schema": lambda: "public",
    "current_user": lambda: "aurora",
    "pg_backend_pid": lambda: 1,
    "floor": lambda x: None if x is None else int(x // 1),
    "greatest": lambda *xs: max((x for x in xs if x is not None), default=None),
    "least": lambda *xs: min((x for x in xs if x is not None), default=None),
}


def func_name(node: ast.FuncCall) -> str:
    return node.funcname[-1].sval.lower()


def evaluate(node, ctx: Context):
    """The value of expression ``node`` for the row in ``ctx``."""
    if ctx.hook is not None:
        value = ctx.hook(node, ctx)
        if value is not NOT_HANDLED:
            return value
    if isinstance(node, ast.A_Const):
        return const_value(node)
    if isinstance(node, ast.ColumnRef):
        field = node.fields[-1]
        if isinstance(field, ast.A_Star):
            raise not_supported("* in an expression")
        name = field.sval
        if name not in ctx.columns:
            raise PgError("42703", f'column "{name}" does not exist')
        return ctx.columns[name]
    if isinstance(node, ast.ParamRef):
        if not 1 <= node.number <= len(ctx.params):
            raise PgError("08P01", f"there is no parameter ${node.number}")
        return ctx.params[node.number - 1]
    if isinstance(node, ast.TypeCast):
        value = evaluate(node.arg, ctx)
        typ, typmod = type_name(node.typeName)
        return coerce(value if not isinstance(value, float) or TYPES[typ][1] != "int" else round(value),
                      typ, typmod)
    if isinstance(node, ast.A_Expr):
        return _a_expr(node, ctx)
    if isinstance(node, ast.BoolExpr):
        values = [evaluate(a, ctx) for a in node.args]
        if node.boolop == enums.BoolExprType.NOT_EXPR:
            return None if values[0] is None else not values[0]
        if node.boolop == enums.BoolExprType.AND_EXPR:
            if any(v is False for v in values):
                return False
            return None if any(v is None for v in values) else True
        if any(v is True for v in values):
            return True
        return None if any(v is None for v in values) else False
    if isinstance(node, ast.NullTest):
        value = evaluate(node.arg, ctx)
        is_null = value is None
        return is_null if node.nulltesttype == enums.NullTestType.IS_NULL else not is_null
    if isinstance(node, ast.SQLValueFunction):
        op = node.op
        if op in (enums.SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP,
                  enums.SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP,
                  enums.SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N,
                  enums.SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N):
            return now()
        if op in (enums.SQLValueFunctionOp.SVFOP_CURRENT_USER, enums.SQLValueFunctionOp.SVFOP_SESSION_USER,
                  enums.SQLValueFunctionOp.SVFOP_USER):
            return "aurora"
        if op == enums.SQLValueFunctionOp.SVFOP_CURRENT_SCHEMA:
            return "public"
        raise not_supported(f"SQL value function {op.name}")
    if isinstance(node, ast.FuncCall):
        if id(node) in ctx.aggregates:
            return ctx.aggregates[id(node)]
        name = func_name(node)
        if name in AGGREGATES:
            raise PgError("42803", f"aggregate function {name} is not allowed here")
        if name == "coalesce":
            for a in node.args or ():
                v = evaluate(a, ctx)
                if v is not None:
                    return v
            return None
        fn = FUNCTIONS.get(name)
        if fn is None:
            raise not_supported(f"function {name}()")
        return fn(*[evaluate(a, ctx) for a in node.args or ()])
    if isinstance(node, ast.CoalesceExpr):
        for a in node.args:
            v = evaluate(a, ctx)
            if v is not None:
                return v
        return None
    if isinstance(node, ast.CaseExpr):
        base = evaluate(node.arg, ctx) if node.arg is not None else None
        for when in node.args:
            cond = evaluate(when.expr, ctx)
            hit = compare("=", base, cond) if node.arg is not None else cond
            if hit:
                return evaluate(when.result, ctx)
        return evaluate(node.defresult, ctx) if node.defresult is not None else None
    raise not_supported(f"expression {type(node).__name__}")


def _a_expr(node: ast.A_Expr, ctx: Context):
    kind = node.kind
    op = node.name[-1].sval if node.name else ""
    K = enums.A_Expr_Kind
    if kind == K.AEXPR_OP:
        if node.lexpr is None:  # unary
            value = evaluate(node.rexpr, ctx)
            if op == "-":
                return None if value is None else -_from_text(value, 0) if isinstance(value, str) else -value
            if op == "+":
                return value
            raise not_supported(f"prefix operator {op}")
        a, b = evaluate(node.lexpr, ctx), evaluate(node.rexpr, ctx)
        if op in _COMPARE:
            return compare(op, a, b)
        if op == "||":
            return None if a is None or b is None else to_text(a) + to_text(b)
        if op in ("+", "-", "*", "/", "%"):
            return _arith(op, a, b)
        if op in ("~~", "!~~"):
            return _like(a, b, op == "!~~")
        raise not_supported(f"operator {op}")
    if kind in (K.AEXPR_BETWEEN, K.AEXPR_NOT_BETWEEN):
        value = evaluate(node.lexpr, ctx)
        low, high = (evaluate(x, ctx) for x in node.rexpr)
        lo, hi = compare(">=", value, low), compare("<=", value, high)
        result = None if lo is None or hi is None else lo and hi
        return result if kind == K.AEXPR_BETWEEN or result is None else not result
    if kind == K.AEXPR_IN:
        value = evaluate(node.lexpr, ctx)
        results = [compare("=", value, evaluate(x, ctx)) for x in node.rexpr]
        found = True if any(r is True for r in results) else None if any(r is None for r in results) else False
        if op == "<>":
            return None if found is None else not found
        return found
    if kind == K.AEXPR_LIKE:
        return _like(evaluate(node.lexpr, ctx), evaluate(node.rexpr, ctx), op == "!~~")
    raise not_supported(f"expression kind {kind.name}")


def walk_aggregates(node, found: list) -> None:
    """Collect the aggregate FuncCalls inside ``node`` (not descending into them)."""
    if isinstance(node, ast.FuncCall) and func_name(node) in AGGREGATES:
        found.append(node)
        return
    if isinstance(node, ast.Node):
        for attr in node:
            walk_aggregates(getattr(node, attr), found)
    elif isinstance(node, tuple):
        for item in node:
            walk_aggregates(item, found)


def output_name(node) -> str:
    """The column name PostgreSQL gives an unnamed select-list expression."""
    if isinstance(node, ast.ColumnRef):
        field = node.fields[-1]
        return field.sval if isinstance(field, ast.String) else "?column?"
    if isinstance(node, ast.FuncCall):
        return func_name(node)
    if isinstance(node, ast.TypeCast):
        inner = output_name(node.arg)
        return inner if inner != "?column?" else type_name(node.typeName)[0]
    if isinstance(node, ast.SQLValueFunction):
        return {3: "current_timestamp", 4: "current_timestamp"}.get(int(node.op), "?column?")
    return "?column?"
