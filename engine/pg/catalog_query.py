"""SELECTs over the system catalogs: pg_catalog relations built from the SQL catalog, with
joins, subqueries and UNION, enough for psql's \\dt, \\d and \\d TABLE (describe.c of psql 15).

The catalog is small (a few rows per table), so every catalog relation a query names is
built in memory from the table schemas (engine/pg/rows.py) when the query runs, and joins
are nested loops. Nothing here reads user tables: a query that mixes a user table with a
catalog relation gets 0A000.

Relations: pg_class (tables 'r', primary-key and secondary indexes 'i', the sequences of
serial columns 'S'), pg_namespace, pg_am, pg_attribute, pg_attrdef, pg_index,
pg_constraint (primary keys), pg_type, pg_roles, pg_tables, information_schema.tables and
.columns; empty ones (no policies, statistics objects, publications, inheritance, triggers,
rules, collations other than the default): pg_policy, pg_statistic_ext, pg_publication,
pg_publication_namespace, pg_publication_rel, pg_inherits, pg_trigger, pg_rewrite,
pg_collation, pg_description.

OIDs (stable while a table keeps its table id; TRUNCATE gives it a new one):

    object                          oid
    table with table id t           16384 + 64 t
    its primary-key index           16384 + 64 t + 1
    its primary-key constraint      16384 + 64 t + 2
    sequence of serial column i     16384 + 64 t + 3 + i   (i < 61)
    secondary index with id x       16384 + 64 x           (ids come from the same counter)

Supported beyond engine/pg/expr.py (through its evaluation hook): qualified column names,
FROM lists, [INNER|LEFT|RIGHT|FULL|CROSS] JOIN ... ON, scalar, EXISTS, ARRAY and IN
subqueries, UNION [ALL], the regex operators ~ !~ ~* !~* (also as OPERATOR(pg_catalog.~)),
= ANY (array), COLLATE (ignored), casts to oid, regclass, regtype, regnamespace and text, and
the functions of CATALOG_FUNCTIONS (format_type, pg_get_expr, pg_get_indexdef,
pg_get_constraintdef, pg_table_is_visible, pg_get_userbyid, array_to_string, ...).
"""

from __future__ import annotations

import re

from pglast import ast, enums

from engine.pg.expr import Context, NOT_HANDLED, compare, evaluate, func_name, output_name
from engine.pg.rows import TYPES, TableSchema
from engine.pg.sqlstate import PgError, not_supported

OID_BASE = 16384
PUBLIC_NS, CATALOG_NS, TOAST_NS, INFO_NS = 2200, 11, 99, 13000
OWNER_OID, OWNER = 10, "aurora"
HEAP_AM, BTREE_AM = 2, 403
DEFAULT_COLLATION = 100
CATALOG_SCHEMAS = ("pg_catalog", "information_schema")

TYPE_NAMES = {23: "integer", 20: "bigint", 21: "smallint", 16: "boolean", 25: "text",
              1043: "character varying", 1042: "character", 1114: "timestamp without time zone",
              1184: "timestamp with time zone", 26: "oid", 19: "name", 18: '"char"'}
TYPNAMES = {23: "int4", 20: "int8", 21: "int2", 16: "bool", 25: "text", 1043: "varchar",
            1042: "bpchar", 1114: "timestamp", 1184: "timestamptz", 26: "oid", 19: "name", 18: "char"}

# relation -> its columns; the rows of the non-empty ones are built by _build.
COLUMNS = {
    "pg_class": ["oid", "relname", "relnamespace", "reltype", "relowner", "relam", "relkind",
                 "relnatts", "relchecks", "relhasindex", "relhasrules", "relhastriggers",
                 "relrowsecurity", "relforcerowsecurity", "relispartition", "reltablespace",
                 "reloftype", "relpersistence", "relreplident", "reltoastrelid", "reloptions",
                 "relpartbound", "relfilenode", "reltuples", "relpages", "relisshared"],
    "pg_namespace": ["oid", "nspname", "nspowner", "nspacl"],
    "pg_am": ["oid", "amname", "amtype"],
    "pg_attribute": ["attrelid", "attname", "atttypid", "atttypmod", "attnum", "attnotnull",
                     "atthasdef", "attisdropped", "attidentity", "attgenerated", "attcollation",
                     "attlen", "attstattarget", "attislocal", "attinhcount", "attstorage",
                     "attcompression", "attoptions", "attfdwoptions"],
    "pg_attrdef": ["oid", "adrelid", "adnum", "adbin"],
    "pg_index": ["indexrelid", "indrelid", "indnatts", "indisunique", "indisprimary",
                 "indisexclusion", "indimmediate", "indisclustered", "indisvalid",
                 "indisready", "indislive", "indisreplident", "indnullsnotdistinct", "indkey", "indpred",
                 "indexprs", "indnkeyatts"],
    "pg_constraint": ["oid", "conname", "connamespace", "contype", "condeferrable",
                      "condeferred", "convalidated", "conrelid", "conindid", "confrelid",
                      "conkey", "conislocal", "coninhcount", "conparentid"],
    "pg_type": ["oid", "typname", "typnamespace", "typlen", "typtype", "typcollation",
                "typrelid", "typelem", "typarray"],
    "pg_roles": ["oid", "rolname", "rolsuper"],
    "pg_user": ["usesysid", "usename", "usesuper"],
    "pg_database": ["oid", "datname", "datdba", "encoding", "datcollate", "datctype"],
    "pg_tables": ["schemaname", "tablename", "tableowner", "tablespace", "hasindexes",
                  "hasrules", "hastriggers", "rowsecurity"],
    "tables": ["table_catalog", "table_schema", "table_name", "table_type"],
    "columns": ["table_catalog", "table_schema", "table_name", "column_name", "ordinal_position",
                "column_default", "is_nullable", "data_type", "character_maximum_length"],
    "pg_sequence": ["seqrelid", "seqtypid", "seqstart", "seqincrement", "seqmax", "seqmin",
                    "seqcache", "seqcycle"],
    "pg_depend": ["classid", "objid", "objsubid", "refclassid", "refobjid", "refobjsubid", "deptype"],
    "pg_policy": ["oid", "polname", "polrelid", "polcmd", "polpermissive", "polroles", "polqual",
                  "polwithcheck"],
    "pg_statistic_ext": ["oid", "stxrelid", "stxname", "stxnamespace", "stxowner", "stxstattarget",
                         "stxkeys", "stxkind"],
    "pg_publication": ["oid", "pubname", "pubowner", "puballtables", "pubinsert", "pubupdate",
                       "pubdelete", "pubtruncate", "pubviaroot"],
    "pg_publication_namespace": ["oid", "pnpubid", "pnnspid"],
    "pg_publication_rel": ["oid", "prpubid", "prrelid", "prqual", "prattrs"],
    "pg_inherits": ["inhrelid", "inhparent", "inhseqno", "inhdetachpending"],
    "pg_trigger": ["oid", "tgrelid", "tgparentid", "tgname", "tgfoid", "tgtype", "tgenabled",
                   "tgisinternal", "tgconstraint"],
    "pg_rewrite": ["oid", "rulename", "ev_class", "ev_type", "ev_enabled", "is_instead"],
    "pg_collation": ["oid", "collname", "collnamespace", "collprovider"],
    "pg_description": ["objoid", "classoid", "objsubid", "description"],
}
INFO_RELATIONS = {"tables", "columns"}


def table_oid(table_id: int) -> int:
    return OID_BASE + 64 * table_id


def is_catalog(rv: ast.RangeVar) -> bool:
    return rv.schemaname in CATALOG_SCHEMAS or (rv.schemaname is None and rv.relname in COLUMNS
                                                 and rv.relname not in INFO_RELATIONS)


def uses_catalog(node) -> bool:
    """Whether a FROM clause (or a set operation's arms) names a catalog relation."""
    if isinstance(node, ast.SelectStmt):
        if node.op != enums.SetOperation.SETOP_NONE:
            return uses_catalog(node.larg) or uses_catalog(node.rarg)
        return any(uses_catalog(f) for f in node.fromClause or ())
    if isinstance(node, ast.RangeVar):
        return is_catalog(node)
    if isinstance(node, ast.JoinExpr):
        return uses_catalog(node.larg) or uses_catalog(node.rarg)
    return False


class Catalog:
    """The catalog relations (name -> list of row dicts) of one query, built on demand."""

    def __init__(self, schemas: list[TableSchema]) -> None:
        self.schemas = schemas
        self.relations: dict[str, list[dict]] = {}
        self.relnames: dict[int, str] = {}     # pg_class oid -> relname (regclass output)
        self.indexdefs: dict[int, str] = {}    # index oid -> pg_get_indexdef
        self.condefs: dict[int, str] = {}      # constraint oid -> pg_get_constraintdef
        self.indexcols: dict[tuple[int, int], str] = {}   # (index oid, n) -> its column
        self._build()

    def rows(self, name: str) -> list[dict]:
        if name not in COLUMNS:
            raise PgError("42P01", f'relation "{name}" does not exist')
        return self.relations.get(name, [])

    def _build(self) -> None:
        R = self.relations
        R["pg_namespace"] = [
            {"oid": oid, "nspname": name, "nspowner": OWNER_OID, "nspacl": None}
            for oid, name in ((CATALOG_NS, "pg_catalog"), (TOAST_NS, "pg_toast"),
                              (PUBLIC_NS, "public"), (INFO_NS, "information_schema"))]
        R["pg_am"] = [{"oid": HEAP_AM, "amname": "heap", "amtype": "t"},
                      {"oid": BTREE_AM, "amname": "btree", "amtype": "i"}]
        R["pg_roles"] = [{"oid": OWNER_OID, "rolname": OWNER, "rolsuper": True}]
        R["pg_user"] = [{"usesysid": OWNER_OID, "usename": OWNER, "usesuper": True}]
        R["pg_database"] = [{"oid": 5, "datname": "aurora", "datdba": OWNER_OID, "encoding": 6,
                             "datcollate": "C", "datctype": "C"}]
        R["pg_type"] = [{"oid": oid, "typname": TYPNAMES[oid], "typnamespace": CATALOG_NS,
                         "typlen": -1, "typtype": "b",
                         "typcollation": DEFAULT_COLLATION if oid in (25, 1043, 1042) else 0,
                         "typrelid": 0, "typelem": 0, "typarray": 0} for oid in TYPNAMES]
        for key in ("pg_class", "pg_attribute", "pg_attrdef", "pg_index", "pg_constraint",
                    "pg_tables", "tables", "columns", "pg_sequence"):
            R[key] = []
        for t in self.schemas:
            self._add_table(t)

    def _rel(self, oid: int, name: str, kind: str, **extra) -> None:
        row = {c: None for c in COLUMNS["pg_class"]}
        row.update(oid=oid, relname=name, relnamespace=PUBLIC_NS, reltype=0, relowner=OWNER_OID,
                   relam={"r": HEAP_AM, "i": BTREE_AM}.get(kind, 0), relkind=kind, relnatts=0,
                   relchecks=0, relhasindex=False, relhasrules=False, relhastriggers=False,
                   relrowsecurity=False, relforcerowsecurity=False, relispartition=False,
                   reltablespace=0, reloftype=0, relpersistence="p", relreplident="d",
                   reltoastrelid=0, relfilenode=oid, reltuples=-1, relpages=0, relisshared=False)
        row.update(extra)
        self.relations["pg_class"].append(row)
        self.relnames[oid] = name

    def _add_table(self, t: TableSchema) -> None:
        R = self.relations
        oid = table_oid(t.table_id)
        self._rel(oid, t.name, "r", relnatts=len(t.columns), relhasindex=bool(t.pk or t.indexes))
        R["pg_tables"].append({"schemaname": "public", "tablename": t.name, "tableowner": OWNER,
                               "tablespace": None, "hasindexes": bool(t.pk or t.indexes),
                               "hasrules": False, "hastriggers": False, "rowsecurity": False})
        R["tables"].append({"table_catalog": "aurora", "table_schema": "public",
                            "table_name": t.name, "table_type": "BASE TABLE"})
        for i, c in enumerate(t.columns):
            typmod = c.typmod + 4 if c.typmod >= 0 else -1
            default = None
            if c.serial:
                seq = f"{t.name}_{c.name}_seq"
                self._rel(oid + 3 + min(i, 60), seq, "S")
                R["pg_sequence"].append({
                    "seqrelid": oid + 3 + min(i, 60), "seqtypid": 20 if c.type == "int8" else 23,
                    "seqstart": 1, "seqincrement": 1, "seqmin": 1, "seqcache": 1, "seqcycle": False,
                    "seqmax": (1 << 63) - 1 if c.type == "int8" else (1 << 31) - 1})
                default = f"nextval('{seq}'::regclass)"
            elif c.default is not None:
                default = c.default
            R["pg_attribute"].append({
                "attrelid": oid, "attname": c.name, "atttypid": c.oid, "atttypmod": typmod,
                "attnum": i + 1, "attnotnull": c.not_null, "atthasdef": default is not None,
                "attisdropped": False, "attidentity": "", "attgenerated": "",
                "attcollation": DEFAULT_COLLATION if c.kind == "text" else 0, "attlen": -1,
                "attstattarget": -1, "attislocal": True, "attinhcount": 0,
                "attstorage": "x" if c.kind == "text" else "p", "attcompression": "",
                "attoptions": None, "attfdwoptions": None})
            if default is not None:
                R["pg_attrdef"].append({"oid": oid + 32 + i, "adrelid": oid, "adnum": i + 1,
                                        "adbin": default})
            R["columns"].append({
                "table_catalog": "aurora", "table_schema": "public", "table_name": t.name,
                "column_name": c.name, "ordinal_position": i + 1, "column_default": default,
                "is_nullable": "NO" if c.not_null else "YES", "data_type": TYPE_NAMES[c.oid],
                "character_maximum_length": c.typmod if c.kind == "text" and c.typmod >= 0 else None})
        if t.pk:
            self._index(t, oid + 1, f"{t.name}_pkey", t.pk, primary=True)
            con = oid + 2
            R["pg_constraint"].append({
                "oid": con, "conname": f"{t.name}_pkey", "connamespace": PUBLIC_NS, "contype": "p",
                "condeferrable": False, "condeferred": False, "convalidated": True,
                "conrelid": oid, "conindid": oid + 1, "confrelid": 0,
                "conkey": [t.index(n) + 1 for n in t.pk], "conislocal": True, "coninhcount": 0,
                "conparentid": 0})
            self.condefs[con] = f"PRIMARY KEY ({', '.join(t.pk)})"
        for ix in t.indexes:
            self._index(t, table_oid(ix["id"]), ix["name"], ix["columns"], primary=False)

    def _index(self, t: TableSchema, oid: int, name: str, columns: list[str], primary: bool) -> None:
        self._rel(oid, name, "i", relnatts=len(columns))
        self.relations["pg_index"].append({
            "indexrelid": oid, "indrelid": table_oid(t.table_id), "indnatts": len(columns),
            "indisunique": primary, "indisprimary": primary, "indisexclusion": False,
            "indimmediate": True, "indisclustered": False, "indisvalid": True, "indisready": True,
            "indislive": True, "indisreplident": False, "indnullsnotdistinct": False,
            "indpred": None, "indexprs": None, "indnkeyatts": len(columns),
            "indkey": " ".join(str(t.index(n) + 1) for n in columns)})
        for n, name_ in enumerate(columns):
            c = t.columns[t.index(name_)]
            self.relations["pg_attribute"].append({
                "attrelid": oid, "attname": c.name, "atttypid": c.oid,
                "atttypmod": c.typmod + 4 if c.typmod >= 0 else -1, "attnum": n + 1,
                "attnotnull": False, "atthasdef": False, "attisdropped": False, "attidentity": "",
                "attgenerated": "", "attcollation": DEFAULT_COLLATION if c.kind == "text" else 0,
                "attlen": -1, "attstattarget": -1, "attislocal": True, "attinhcount": 0,
                "attstorage": "x" if c.kind == "text" else "p", "attcompression": "",
                "attoptions": None, "attfdwoptions": None})
            self.indexcols[(oid, n + 1)] = c.name
        unique = "UNIQUE " if primary else ""
        self.indexdefs[oid] = (f"CREATE {unique}INDEX {name} ON public.{t.name} USING btree "
                               f"({', '.join(columns)})")


# --- Evaluation -----------------------------------------------------------------------------------

class Scope(Context):
    """A row of a catalog query: alias -> row dict (None: the NULL side of an outer join),
    with the enclosing query's row for correlated subqueries."""

    def __init__(self, cat: Catalog, params, bindings: dict, columns: dict[str, list[str]],
                 outer: "Scope | None" = None) -> None:
        super().__init__(params)
        self.cat = cat
        self.bindings = bindings        # alias -> row dict or None
        self.relcolumns = columns       # alias -> its column names
        self.outer = outer
        self.hook = _hook

    def lookup(self, fields: list[str]):
        scope = self
        while scope is not None:
            if len(fields) >= 2:
                alias = fields[-2]
                if alias in scope.relcolumns:
                    if fields[-1] not in scope.relcolumns[alias]:
                        raise PgError("42703", f'column {alias}.{fields[-1]} does not exist')
                    row = scope.bindings.get(alias)
                    return None if row is None else row.get(fields[-1])
            else:
                for alias, cols in scope.relcolumns.items():
                    if fields[0] in cols:
                        row = scope.bindings.get(alias)
                        return None if row is None else row.get(fields[0])
            scope = scope.outer
        raise PgError("42703", f'column "{".".join(fields)}" does not exist')


def _regex(op: str, value, pattern):
    if value is None or pattern is None:
        return None
    flags = re.I if "*" in op else 0
    try:
        hit = re.search(pattern, str(value), flags) is not None
    except re.error as exc:
        raise PgError("2201B", f"invalid regular expression: {exc}") from None
    return not hit if op.startswith("!") else hit


def _format_type(oid, typmod):
    if oid is None:
        return None
    name = TYPE_NAMES.get(oid, "???")
    if oid in (1043, 1042) and typmod is not None and typmod >= 4:
        return f"{name}({typmod - 4})"
    return name


def _array_to_string(arr, sep, null=None):
    if arr is None:
        return None
    return sep.join(str(v) if v is not None else null for v in arr if v is not None or null is not None)


def _catalog_functions(cat: Catalog) -> dict:
    return {
        "pg_table_is_visible": lambda oid: None if oid is None else True,
        "pg_type_is_visible": lambda oid: None if oid is None else True,
        "pg_get_userbyid": lambda oid: None if oid is None else OWNER,
        "format_type": _format_type,
        "pg_get_expr": lambda expr, rel, pretty=False: expr,
        "pg_get_indexdef": lambda oid, col=0, pretty=False:
            cat.indexcols.get((oid, col)) if col else cat.indexdefs.get(oid),
        "pg_get_constraintdef": lambda oid, pretty=False: cat.condefs.get(oid),
        "pg_relation_is_publishable": lambda oid: False,
        "obj_description": lambda oid, catalog=None: None,
        "col_description": lambda oid, n: None,
        "shobj_description": lambda oid, catalog=None: None,
        "array_to_string": _array_to_string,
        "pg_encoding_to_char": lambda n: "UTF8",
        "has_table_privilege": lambda *a: True,
        "has_schema_privilege": lambda *a: True,
        "pg_get_statisticsobjdef_columns": lambda oid: None,
        "pg_relation_size": lambda *a: 0,
        "pg_table_size": lambda *a: 0,
        "pg_total_relation_size": lambda *a: 0,
        "pg_size_pretty": lambda n: None if n is None else f"{n} bytes",
        "array_upper": lambda arr, dim: None if not arr else len(arr),
        "unnest": None,
    }


def _cast(value, type_names: list[str], cat: Catalog):
    name = type_names[-1].lower()
    if value is None:
        return None
    if name == "regclass":
        if isinstance(value, str) and not value.isdigit():
            for oid, rel in cat.relnames.items():
                if rel == value:
                    return oid
            raise PgError("42P01", f'relation "{value}" does not exist')
        return cat.relnames.get(int(value), str(value))
    if name == "regtype":
        return TYPE_NAMES.get(int(value), str(value))
    if name == "regnamespace":
        return {PUBLIC_NS: "public", CATALOG_NS: "pg_catalog"}.get(int(value), str(value))
    if name in ("oid", "regproc", "xid"):
        return int(value)
    if name in ("text", "name", "varchar", "char"):
        from engine.pg.rows import to_text
        return to_text(value)
    if name.endswith("[]") or name in ("_int2", "int2vector", "oidvector"):
        return value
    return NOT_HANDLED


def _hook(node, ctx: Scope):
    """engine/pg/expr.py's evaluation hook: the catalog-only expressions."""
    if isinstance(node, ast.ColumnRef):
        if isinstance(node.fields[-1], ast.A_Star):
            raise not_supported("* in an expression")
        return ctx.lookup([f.sval for f in node.fields])
    if isinstance(node, ast.CollateClause):
        return evaluate(node.arg, ctx)
    if isinstance(node, ast.SubLink):
        return _sublink(node, ctx)
    if isinstance(node, ast.TypeCast):
        names = [n.sval for n in node.typeName.names]
        if node.typeName.arrayBounds:
            names = [names[-1] + "[]"]
        if names[-1].lower() in TYPES or names[-1].lower() in ("integer", "int", "bigint", "boolean"):
            return NOT_HANDLED
        return _cast(evaluate(node.arg, ctx), names, ctx.cat)
    if isinstance(node, ast.A_Expr):
        op = node.name[-1].sval if node.name else ""
        K = enums.A_Expr_Kind
        if node.kind == K.AEXPR_OP and op in ("~", "!~", "~*", "!~*"):
            return _regex(op, evaluate(node.lexpr, ctx), evaluate(node.rexpr, ctx))
        if node.kind in (K.AEXPR_OP_ANY, K.AEXPR_OP_ALL):
            value, arr = evaluate(node.lexpr, ctx), evaluate(node.rexpr, ctx)
            if arr is None:
                return None
            results = [compare(op, value, v) for v in arr]
            if node.kind == K.AEXPR_OP_ANY:
                return True if any(r is True for r in results) else None if None in results else False
            return False if any(r is False for r in results) else None if None in results else True
        return NOT_HANDLED
    if isinstance(node, ast.A_ArrayExpr):
        return [evaluate(e, ctx) for e in node.elements or ()]
    if isinstance(node, ast.FuncCall):
        fn = _catalog_functions(ctx.cat).get(func_name(node), NOT_HANDLED)
        if fn is NOT_HANDLED:
            return NOT_HANDLED
        if fn is None:
            raise not_supported(f"function {func_name(node)}() in an expression")
        return fn(*[evaluate(a, ctx) for a in node.args or ()])
    return NOT_HANDLED


def _sublink(node: ast.SubLink, ctx: Scope):
    T = enums.SubLinkType
    rows = select_rows(ctx.cat, node.subselect, ctx.params, ctx)
    kind = node.subLinkType
    if kind == T.EXISTS_SUBLINK:
        return bool(rows)
    if kind == T.EXPR_SUBLINK:
        if len(rows) > 1:
            raise PgError("21000", "more than one row returned by a subquery used as an expression")
        return rows[0][0] if rows else None
    if kind == T.ARRAY_SUBLINK:
        return [r[0] for r in rows]
    if kind == T.ANY_SUBLINK:
        value = evaluate(node.testexpr, ctx)
        op = node.operName[-1].sval if node.operName else "="
        results = [compare(op, value, r[0]) for r in rows]
        return True if any(r is True for r in results) else None if None in results else False
    raise not_supported(f"subquery kind {kind.name}")


# --- FROM -------------------------------------------------------------------------------------------

def _from_item(cat: Catalog, item, params, outer) -> tuple[dict[str, list[str]], list[dict]]:
    """(alias -> columns, list of bindings alias -> row) of one FROM item."""
    if isinstance(item, ast.RangeVar):
        if not is_catalog(item):
            raise not_supported("joins of a table with the system catalogs")
        alias = item.alias.aliasname if item.alias else item.relname
        return {alias: COLUMNS.get(item.relname, [])}, [{alias: r} for r in cat.rows(item.relname)]
    if isinstance(item, ast.JoinExpr):
        lcols, lrows = _from_item(cat, item.larg, params, outer)
        rcols, rrows = _from_item(cat, item.rarg, params, outer)
        cols = {**lcols, **rcols}
        J = enums.JoinType
        if item.usingClause or item.isNatural:
            raise not_supported("JOIN ... USING and NATURAL JOIN")
        out, matched_right = [], set()
        for lb in lrows:
            hit = False
            for j, rb in enumerate(rrows):
                b = {**lb, **rb}
                if item.quals is None or evaluate(item.quals, Scope(cat, params, b, cols, outer)) is True:
                    out.append(b)
                    hit = True
                    matched_right.add(j)
            if not hit and item.jointype in (J.JOIN_LEFT, J.JOIN_FULL):
                out.append({**lb, **{a: None for a in rcols}})
        if item.jointype in (J.JOIN_RIGHT, J.JOIN_FULL):
            out += [{**{a: None for a in lcols}, **rb} for j, rb in enumerate(rrows) if j not in matched_right]
        return cols, out
    if isinstance(item, ast.RangeFunction):
        call = item.functions[0][0]
        if not isinstance(call, ast.FuncCall) or func_name(call) not in ("unnest", "generate_series"):
            raise not_supported("functions in FROM other than unnest and generate_series")
        args = [evaluate(a, Scope(cat, params, {}, {}, outer)) for a in call.args or ()]
        if func_name(call) == "unnest":
            values = list(args[0] or [])
        else:
            values = [] if None in args[:2] else list(range(args[0], args[1] + 1))
        alias = item.alias.aliasname if item.alias else func_name(call)
        col = item.alias.colnames[0].sval if item.alias and item.alias.colnames else alias
        return {alias: [col]}, [{alias: {col: v}} for v in values]
    raise not_supported(f"{type(item).__name__} in FROM")


def scopes(cat: Catalog, stmt: ast.SelectStmt, params, outer: Scope | None = None) -> list[Scope]:
    """The rows of ``stmt``'s FROM (a cross product of its items) that pass its WHERE."""
    columns: dict[str, list[str]] = {}
    rows: list[dict] = [{}]
    for item in stmt.fromClause or ():
        cols, item_rows = _from_item(cat, item, params, outer)
        columns.update(cols)
        rows = [{**a, **b} for a in rows for b in item_rows]
    out = []
    for b in rows:
        s = Scope(cat, params, b, columns, outer)
        if stmt.whereClause is None or evaluate(stmt.whereClause, s) is True:
            out.append(s)
    return out


def select_rows(cat: Catalog, stmt: ast.SelectStmt, params, outer: Scope | None) -> list[list]:
    """A subquery's rows (no aggregates but count(*)): select list, DISTINCT, ORDER BY, LIMIT."""
    S = enums.SetOperation
    if stmt.op != S.SETOP_NONE:
        if stmt.op != S.SETOP_UNION:
            raise not_supported("INTERSECT and EXCEPT")
        rows = select_rows(cat, stmt.larg, params, outer) + select_rows(cat, stmt.rarg, params, outer)
        return rows if stmt.all else _distinct(rows)
    found = scopes(cat, stmt, params, outer)
    targets = [t.val for t in stmt.targetList]
    if any(isinstance(t, ast.FuncCall) and func_name(t) == "count" and t.agg_star for t in targets):
        return [[len(found)]]
    if stmt.sortClause:
        found = sort_scopes(found, stmt.sortClause, targets)
    rows = [[evaluate(t, s) for t in targets] for s in found]
    if stmt.distinctClause is not None:
        rows = _distinct(rows)
    if stmt.limitCount is not None:
        rows = rows[:int(evaluate(stmt.limitCount, Context(params)))]
    return rows


def _distinct(rows: list[list]) -> list[list]:
    seen, out = set(), []
    for r in rows:
        k = tuple(tuple(v) if isinstance(v, list) else v for v in r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _sort_key(value):
    # NULLs sort last ascending (PostgreSQL's default); values of one column share a type.
    return (value is None, 0 if value is None else value)


def sort_scopes(found: list, sort_clause, targets: list) -> list:
    for sort in reversed(sort_clause):
        expr = sort.node
        if isinstance(expr, ast.A_Const) and isinstance(expr.val, ast.Integer):
            expr = targets[expr.val.ival - 1]
        desc = sort.sortby_dir == enums.SortByDir.SORTBY_DESC
        keyed = [(evaluate(expr, s), s) for s in found]
        keyed.sort(key=lambda vs: _sort_key(vs[0]), reverse=desc)
        found = [s for _, s in keyed]
    return found


def set_operation(cat: Catalog, stmt: ast.SelectStmt, params) -> tuple[list[tuple[str, object]], list[list]]:
    """(columns as (name, first arm's expression), rows) of a UNION over catalog relations,
    sorted by its ORDER BY positions."""
    rows = select_rows(cat, stmt, params, None)
    first = stmt
    while first.op != enums.SetOperation.SETOP_NONE:
        first = first.larg
    names = [(t.name or output_name(t.val), t.val) for t in first.targetList]
    for sort in reversed(stmt.sortClause or ()):
        node = sort.node
        if not (isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer)):
            raise not_supported("ORDER BY of a UNION other than by position")
        i = node.val.ival - 1
        rows.sort(key=lambda r: _sort_key(r[i]), reverse=sort.sortby_dir == enums.SortByDir.SORTBY_DESC)
    return names, rows


def from_columns(stmt: ast.SelectStmt) -> list[tuple[str, str]]:
    """(alias, column) of every column of the FROM items, in order: what * expands to."""
    out: list[tuple[str, str]] = []

    def walk(item) -> None:
        if isinstance(item, ast.RangeVar):
            alias = item.alias.aliasname if item.alias else item.relname
            out.extend((alias, c) for c in COLUMNS.get(item.relname, []))
        elif isinstance(item, ast.JoinExpr):
            walk(item.larg)
            walk(item.rarg)
        else:
            raise not_supported(f"* over {type(item).__name__}")
    for item in stmt.fromClause or ():
        walk(item)
    return out
