"""Read what the copy path needs to know about source tables from the system catalogs.

The records are frozen and plain so they can be written into the manifest and rebuilt from it
without a live database (Dagster must load definitions with the source offline).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import psycopg
from psycopg import sql

from .connections import remembered

# Schemas that belong to PostgreSQL or to Supabase and are never migrated as user data.
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")
BOOKKEEPING_SCHEMA = "supabase_migration"
# Its table recording each schema step that completed (mode, dump hash or revision, when).
SCHEMA_APPLIED = "schema_applied"
# Where Supabase keeps extensions, and dump mode moves the source's.
EXTENSIONS_SCHEMA = "extensions"


# A search_path setting as PostgreSQL stores it: `"$user", public`, `"a, b"` (one name).
_PATH_ELEMENT = re.compile(r'\s*("(?:[^"]|"")*"|[^,]*?)\s*(?:,|$)')


def search_path_elements(setting: str) -> list[str]:
    """The schema names of a stored search_path setting, unquoted."""
    return [
        e[1:-1].replace('""', '"') if e.startswith('"') else e
        for e in (m.group(1) for m in _PATH_ELEMENT.finditer(setting) if m.group(0))
    ]


def reaching_moved_extensions(path: Sequence[str], homes: Iterable[tuple[str, str]]) -> list[str]:
    """A routine's own search_path with each moved extension's new schema right after its old
    one (`homes`: (old, new) pairs), once: `SET search_path = public` found pgcrypto's
    digest() in public, and finds it in `extensions` on the target so."""
    reaching = list(path)
    for old, new in sorted(set(homes)):
        if old in reaching and new not in reaching:
            reaching.insert(reaching.index(old) + 1, new)
    return reaching


def enum_labels_sql(type_alias: str) -> str:
    """SQL: the labels, in their order, of the enum `type_alias` is (or is an array of);
    NULL for any other type. Comparisons and key order follow that order."""
    return (
        "(SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) "
        "FROM pg_enum e WHERE e.enumtypid = "
        f"CASE WHEN {type_alias}.typcategory = 'A' THEN {type_alias}.typelem "
        f"ELSE {type_alias}.oid END)"
    )


def own_collation_sql(column_alias: str, type_alias: str, collation_alias: str) -> str:
    """SQL: the name of the column's collation where it is its own, not its type's; else
    NULL (uniqueness, ORDER BY and range scans follow it)."""
    return (
        f"CASE WHEN {column_alias}.attcollation <> {type_alias}.typcollation "
        f"THEN {collation_alias}.collname END"
    )


# The oldest source whose catalogs we read (generated columns came in 12) and whose floats
# print as the shortest exact text, as the target's do (11 printed 15 digits and rounded).
OLDEST_SOURCE = 12
# The advisory lock (hashtext of this key) that schema steps and the bookkeeping set-up take on
# the target, so that two runs starting at once take turns: concurrent CREATE ... IF NOT EXISTS
# of one object fails with a unique violation on the catalog instead of waiting.
SCHEMA_LOCK_KEY = "supabase_migration.schema"


def take_turn(key: str) -> sql.Composed:
    """Wait for the transaction's advisory lock of `key`: runs doing the same thing on one
    target (the schema, a table's plan or index build, the sequences) take turns."""
    return sql.SQL("SELECT pg_advisory_xact_lock(hashtext({}))").format(sql.Literal(key))


# Supabase's roles for the REST API's callers; on plain PostgreSQL they may not exist.
API_ROLES = ("anon", "authenticated")

INTEGER_TYPES = {"smallint", "integer", "bigint"}


class KeyKind(StrEnum):
    """How a table is split into key ranges."""

    INTEGER = "integer"  # one integer column: arithmetic ranges
    KEYSET = "keyset"  # uuid / text / composite: boundaries read from the source
    NONE = "none"  # no usable key: one whole-table partition, replaced atomically


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # format_type() output, safe to splice as a type name
    not_null: bool = False
    generated: bool = False  # GENERATED ALWAYS AS (...) STORED: never copied
    identity: str = ""  # "a" (ALWAYS), "d" (BY DEFAULT) or ""
    binary_ok: bool = True  # the type (or its domain base) has binary send/receive
    collatable: bool = False
    hash_native: bool = False  # checksums may hash the value itself, not its text (see sqlbuild)
    hash_sent: str = ""  # else its binary form: the name of its base type's send function
    # A collation of its own (not the database's, nor one of bytes): each server orders it by
    # its own copy of that collation's rules, which may differ (glibc, ICU versions).
    own_collation: bool = False
    # A collation of bytes (C, POSIX, ucs_basic, the builtin pg_c_utf8): ordered alike by every
    # server whatever its database's collation, in UTF8.
    bytes_collation: bool = False
    # "xml" or "xml[]" (also through a domain): copied as its stored text, in text COPY. Its
    # output functions, text and binary alike, drop an XML declaration (<?xml version="1.0"?>)
    # the value keeps.
    xml_text: str = ""
    # An array hashed natively (`hash_native`): by its elements alone, which `{1,2,3,4}`,
    # `{{1,2},{3,4}}` and `[0:3]={1,2,3,4}` share; its shape is hashed beside (sqlbuild.row_hash).
    native_array: bool = False
    # character(n) / bpchar (also through a domain): its cast to text drops trailing blanks,
    # which an unbounded bpchar keeps; its output function shows them.
    blank_padded: bool = False


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    key_source: str = "none"  # "primary_key", "unique_index" or "none"
    estimated_rows: int | None = None
    size_bytes: int = 0  # heap and TOAST on the source: how long copying and hashing take
    parents: tuple[str, ...] = field(default=())  # qualified names of FK parent tables
    partitioned: bool = False  # native partitioned parent (children are copied through it)
    inherited: bool = False  # a parent by INHERITS: its children are tables of their own
    # CHECK constraints the source added NOT VALID: its rows need not pass them (deferred.py)
    not_valid_checks: tuple[str, ...] = ()
    hash_records: bool = False  # the source has hash_record_extended (PostgreSQL 14+)
    # Each row's hash mixed before the sum (sqlbuild.row_hash_sum); False only to measure a
    # range as a release before the mix recorded it (sqlbuild.hashed_like).
    mixed_rows: bool = True
    # The source database's text is neither UTF8 nor SQL_ASCII (LATIN1, WIN1252 ...): text is
    # hashed as its UTF8 bytes on both sides, the target's (UTF8) and the source's converted.
    transcode: bool = False
    # ... and its text keys compared as their UTF8 bytes (sqlbuild.key_order). Set with
    # `transcode`, but kept when a checksum is measured as an older release hashed it
    # (sqlbuild.hashed_like): which range a row is in must not change with how it is hashed.
    utf8_keys: bool = False

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def key_kind(self) -> KeyKind:
        if not self.key:
            return KeyKind.NONE
        if len(self.key) == 1 and self.column(self.key[0]).type_sql in INTEGER_TYPES:
            return KeyKind.INTEGER
        return KeyKind.KEYSET

    @property
    def rows_named(self) -> bool:
        """Results name rows by their primary key only. A unique index standing in for a
        missing one is usually a value of the patient's (an SSN, an MRN, an email)."""
        return self.key_source == "primary_key"

    def shown_bounds(self, bounds: str) -> str:
        """A range's bounds as metadata and reports may show them: integer primary keys only,
        since other keys (an email, an MRN) may be PHI; a differing row is still named by its
        primary key."""
        if self.key_kind is KeyKind.INTEGER and self.rows_named:
            return bounds
        return "(key values not shown)"

    @property
    def copy_columns(self) -> tuple[Column, ...]:
        """Columns COPY writes: generated columns are computed by the target itself."""
        return tuple(c for c in self.columns if not c.generated)

    @property
    def verified(self) -> TableInfo:
        """The table as verification hashes it: its generated columns too, as each side
        computed them (the copy leaves them to the target, whose expression, or a function
        or locale it calls, may compute otherwise)."""
        if not any(c.generated for c in self.columns):
            return self
        return replace(self, columns=tuple(replace(c, generated=False) for c in self.columns))

    @property
    def has_identity_always(self) -> bool:
        return any(c.identity == "a" for c in self.columns)

    @property
    def binary_ok(self) -> bool:
        return all(c.binary_ok for c in self.copy_columns)

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


def ext_member(catalog: str, oid: str) -> str:
    """SQL predicate: the object belongs to an extension. pg_dump leaves those out, and on
    Supabase the extension's own role may own them (PostGIS's spatial_ref_sys)."""
    return (
        f"EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass "
        f"AND d.objid = {oid} AND d.deptype = 'e')"
    )


# Names read so come qualified (a routine with its arguments: overloads share a name).
IN_PG_CATALOG = sql.SQL("SET LOCAL search_path = pg_catalog")


def takes_callers_search_path(major: int) -> str:
    """SQL predicate on `p` (pg_proc, joined to pg_language as `l`): a user's SQL or PL/pgSQL
    routine that looks a name up in the search_path it is called with: none of its own, and
    no body bound at creation (BEGIN ATOMIC, PostgreSQL 14+; `major` is the server's)."""
    bound = " AND p.prosqlbody IS NULL" if major >= 14 else ""
    return (
        f"l.lanname IN ('sql', 'plpgsql'){bound} "
        "AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%%') "
        f"AND NOT {ext_member('pg_proc', 'p.oid')}"
    )


_TABLES_FROM = f"""
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND NOT c.relispartition
  AND n.nspname = ANY(%(schemas)s)
  AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY n.nspname, c.relname
"""

_TABLES_SQL = f"""
SELECT c.oid, n.nspname, c.relname, c.relkind = 'p' AS partitioned,
       c.relkind = 'r' AND c.relhassubclass AS inherited,
       CASE WHEN c.relkind = 'p' THEN
            (SELECT sum(greatest(ch.reltuples, 0))::bigint FROM pg_inherits i
               JOIN pg_class ch ON ch.oid = i.inhrelid WHERE i.inhparent = c.oid)
            WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS estimated_rows,
       CASE WHEN c.relkind = 'p' THEN
            (SELECT coalesce(sum(pg_table_size(i.inhrelid)), 0)::bigint FROM pg_inherits i
              WHERE i.inhparent = c.oid)
            ELSE pg_table_size(c.oid) END AS size_bytes,
       ARRAY(SELECT k.conname::text FROM pg_constraint k WHERE k.conrelid = c.oid
             AND k.contype = 'c' AND NOT k.convalidated ORDER BY 1) AS not_valid_checks
{_TABLES_FROM}"""

_COLUMNS_SQL = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.attgenerated <> '' AS generated, a.attidentity::text,
       (b.typsend <> 0 AND b.typreceive <> 0
        AND 'pg_catalog.xml'::regtype NOT IN (b.oid, b.typelem)) AS binary_ok,
       b.typcollation <> 0 AS collatable,
       (b.oid = ANY(n.types) OR (b.typcategory = 'A' AND b.typelem = ANY(n.types))) AS hash_native,
       CASE WHEN b.oid = ANY(n.sent) THEN s.proname::text ELSE '' END AS hash_sent,
       coalesce(NOT (co.collnamespace = 'pg_catalog'::regnamespace
                     AND co.collname IN ('default', 'C', 'POSIX', 'ucs_basic', 'pg_c_utf8')),
                false) AS own_collation,
       coalesce(co.collnamespace = 'pg_catalog'::regnamespace
                AND co.collname IN ('C', 'POSIX', 'ucs_basic', 'pg_c_utf8'), false)
         AS bytes_collation,
       CASE 'pg_catalog.xml'::regtype WHEN b.oid THEN 'xml' WHEN b.typelem THEN 'xml[]'
            ELSE '' END AS xml_text,
       b.typcategory = 'A' AND b.typelem = ANY(n.types) AS native_array,
       b.oid = 'pg_catalog.bpchar'::regtype AS blank_padded
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_proc s ON s.oid = b.typsend  -- the send function: interval_send, range_send ...
LEFT JOIN pg_collation co ON co.oid = a.attcollation
-- Types whose hash is a function of exactly what their text shows: equal hash input means
-- equal text (unlike numeric 1.5/1.50, interval 1 day/24 hours, jsonb, floats' -0, or enums
-- and OIDs, which hash by an OID that differs between databases).
-- The built-in types by their pg_catalog names: a user's type of the same name is not one.
CROSS JOIN (SELECT ARRAY['pg_catalog.int2', 'pg_catalog.int4', 'pg_catalog.int8',
                         'pg_catalog.bool', 'pg_catalog.text', 'pg_catalog.varchar',
                         'pg_catalog.uuid', 'pg_catalog.date', 'pg_catalog.timestamp',
                         'pg_catalog.timestamptz', 'pg_catalog.bytea']::regtype[]::oid[] AS types,
-- Types whose binary form is exactly what their text shows, and cheaper to make: the stored
-- fields of an interval, a numeric's digits and display scale, a range's flags and bounds.
                    ARRAY['pg_catalog.interval', 'pg_catalog.numeric', 'pg_catalog.int4range',
                          'pg_catalog.int8range', 'pg_catalog.numrange', 'pg_catalog.daterange',
                          'pg_catalog.tsrange', 'pg_catalog.tstzrange']::regtype[]::oid[] AS sent) n
WHERE a.attrelid = ANY(%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

# A unique index's key columns (a), in index order: not its INCLUDE columns, which it stores
# but does not compare (ON CONFLICT names the key columns only). Only plain columns: the
# queries take indexes with no expressions and no predicate.
_UNIQUE_INDEX_COLUMNS = """
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
"""

# The unique indexes that can key ranges: valid, not DEFERRABLE (ON CONFLICT, which upserts
# a range's rows, cannot use one as its arbiter), and on no generated column (rows are staged
# without them: the target computes them, and computing them for every staged row of every
# catch-up could cost more than the copy).
_KEYS_SQL = f"""
SELECT i.indrelid, i.indisprimary, ci.relname,
       array_agg(a.attname ORDER BY k.ord) AS columns,
       bool_and(a.attnotnull) AS all_not_null
{_UNIQUE_INDEX_COLUMNS}
  AND i.indrelid = ANY(%(oids)s) AND i.indisvalid AND i.indimmediate
GROUP BY i.indrelid, i.indexrelid, i.indisprimary, ci.relname
HAVING bool_and(a.attgenerated = '')
"""

# One unique index, by the name a unique violation gives (a constraint's is its index's).
_UNIQUE_INDEX_SQL = f"""
SELECT array_agg(a.attname ORDER BY k.ord), {{nulls_not_distinct}}
{_UNIQUE_INDEX_COLUMNS}
  AND ci.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s)
  AND ci.relname = %(name)s
GROUP BY i.indexrelid
"""

# Foreign keys declared on the table itself (clones on partitions have conparentid <> 0);
# a parent that is a partition is reported as its root partitioned table.
_PARENTS_SQL = """
SELECT c.conrelid, pn.nspname, pc.relname
FROM pg_constraint c
JOIN pg_class pc ON pc.oid = coalesce(pg_partition_root(c.confrelid), c.confrelid)
JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND c.conrelid = ANY(%(oids)s)
"""


def user_schemas(conn: psycopg.Connection) -> list[str]:
    """Every schema that holds user tables, minus PostgreSQL's, Supabase's and our own."""
    rows = conn.execute(
        """
        SELECT nspname FROM pg_namespace
        WHERE nspname <> ALL(%(skip)s) AND nspname NOT LIKE 'pg\\_%%'
        ORDER BY nspname
        """,
        {"skip": [*SYSTEM_SCHEMAS, BOOKKEEPING_SCHEMA]},
    ).fetchall()
    return [r[0] for r in rows]


def server_major(conn: psycopg.Connection) -> int:
    return conn.info.server_version // 10000


def too_old_a_source(conn: psycopg.Connection) -> str | None:
    """The sentence refusing a source older than OLDEST_SOURCE, or None."""
    major = server_major(conn)
    if major >= OLDEST_SOURCE:
        return None
    return (
        f"The source runs PostgreSQL {major}, and this tool reads sources of PostgreSQL "
        f"{OLDEST_SOURCE} or newer; upgrade it first (pg_upgrade, or pg_dump into a newer "
        "server), then migrate from that."
    )


def missing_schemas(conn: psycopg.Connection, schemas: Sequence[str]) -> list[str]:
    """Those of `schemas` the connected database does not have, in the order given."""
    if not schemas:
        return []
    existing = {
        r[0]
        for r in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (list(schemas),)
        )
    }
    return [s for s in schemas if s not in existing]


def table_names(conn: psycopg.Connection, schemas: Sequence[str]) -> list[str]:
    """schema.table of each table `read_tables` would describe, without describing them."""
    query = f"SELECT n.nspname, c.relname {_TABLES_FROM}"
    return [f"{s}.{t}" for s, t in conn.execute(query, {"schemas": list(schemas)})]


def read_tables(conn: psycopg.Connection, schemas: Sequence[str]) -> list[TableInfo]:
    """Describe every ordinary and partitioned (root) table in `schemas`."""
    tables = conn.execute(_TABLES_SQL, {"schemas": list(schemas)}).fetchall()
    oids = [t[0] for t in tables]
    columns: dict[int, list[Column]] = {oid: [] for oid in oids}
    for row in conn.execute(_COLUMNS_SQL, {"oids": oids}):
        columns[row[0]].append(Column(*row[1:]))
    keys: dict[int, tuple[str, tuple[str, ...]]] = {}
    candidates: dict[int, list[tuple[int, str, tuple[str, ...]]]] = {}
    for oid, is_primary, index_name, cols, all_not_null in conn.execute(_KEYS_SQL, {"oids": oids}):
        if is_primary:
            keys[oid] = ("primary_key", tuple(cols))
        elif all_not_null:
            candidates.setdefault(oid, []).append((len(cols), index_name, tuple(cols)))
    for oid, options in candidates.items():
        if oid not in keys:
            keys[oid] = ("unique_index", min(options)[2])
    parents: dict[int, set[str]] = {}
    for oid, parent_schema, parent_name in conn.execute(_PARENTS_SQL, {"oids": oids}):
        parents.setdefault(oid, set()).add(f"{parent_schema}.{parent_name}")

    row = conn.execute(
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()"
    ).fetchone()
    transcode = row is not None and row[0] not in ("UTF8", "SQL_ASCII")
    result = []
    for oid, schema, name, partitioned, inherited, estimated, size_bytes, unchecked in tables:
        key_source, key = keys.get(oid, ("none", ()))
        own = f"{schema}.{name}"
        result.append(
            TableInfo(
                schema=schema,
                name=name,
                columns=tuple(columns[oid]),
                key=key,
                key_source=key_source,
                estimated_rows=estimated,
                size_bytes=size_bytes or 0,
                parents=tuple(sorted(parents.get(oid, set()) - {own})),
                partitioned=partitioned,
                inherited=inherited,
                not_valid_checks=tuple(unchecked),
                hash_records=conn.info.server_version >= 140000,
                transcode=transcode,
                utf8_keys=transcode,
            )
        )
    return result


@dataclass(frozen=True)
class UniqueIndex:
    columns: tuple[str, ...]
    nulls_not_distinct: bool = False  # PostgreSQL 15+: NULLs collide with each other too


def unique_index(conn: psycopg.Connection, schema: str, name: str) -> UniqueIndex | None:
    """The unique index `schema.name` on plain columns; None for one on expressions or with a
    predicate (which rows collide is then not a match of columns), or none of that name."""
    nulls = "i.indnullsnotdistinct" if conn.info.server_version >= 150000 else "false"
    row = conn.execute(
        _UNIQUE_INDEX_SQL.format(nulls_not_distinct=nulls), {"schema": schema, "name": name}
    ).fetchone()
    return None if row is None else UniqueIndex(tuple(row[0]), bool(row[1]))


_REFERENCED_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f'
               AND (confrelid = to_regclass(%(t)s)
                    OR confrelid IN (SELECT relid FROM pg_partition_tree(to_regclass(%(t)s)))))
"""


def columns_the_target_lacks(conn: psycopg.Connection, table: TableInfo) -> list[str]:
    """The source's copied columns of `table` the connected (target) table does not have:
    names only, where PostgreSQL's own sentence for one is scrubbed (it may quote values).
    None of them when the table itself is missing, which is said otherwise."""
    row = conn.execute(
        "SELECT to_regclass(%(t)s) IS NOT NULL, ARRAY(SELECT attname::text FROM pg_attribute "
        "WHERE attrelid = to_regclass(%(t)s) AND attnum > 0 AND NOT attisdropped)",
        {"t": sql.Identifier(table.schema, table.name).as_string(conn)},
    ).fetchone()
    if row is None or not row[0]:
        return []
    return [c.name for c in table.copy_columns if c.name not in set(row[1])]


_WRITE_RULES_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = to_regclass(%(t)s)
               AND ev_type IN ('2', '3'))
"""


def has_write_rules(conn: psycopg.Connection, table: TableInfo) -> bool:
    """The table has an UPDATE or INSERT rule, enabled or not: INSERT ... ON CONFLICT into
    it fails (feature_not_supported)."""
    name = sql.Identifier(table.schema, table.name).as_string(conn)
    return conn.execute(_WRITE_RULES_SQL, {"t": name}).fetchone() == (True,)


def referenced(conn: psycopg.Connection, table: TableInfo) -> bool:
    """A foreign key references the table (or a partition of it): deleting its rows may fire
    an action (a cascade) where FK triggers run."""
    name = sql.Identifier(table.schema, table.name).as_string(conn)
    row = conn.execute(_REFERENCED_SQL, {"t": name}).fetchone()
    return row != (False,)


@dataclass(frozen=True)
class Collation:
    """A database's default collation: who orders its text (`provider`: c libc, i ICU, b
    builtin), under which locale (with ICU's own rules, if any), the version of those rules
    where the server knows it (ICU's; glibc's for a libc locale other than C.*), and the
    server's glibc version, read from any libc locale it knows (None if it knows none)."""

    provider: str
    locale: str
    version: str | None
    libc_version: str | None = None

    def orders_alike(self, other: Collation) -> bool:
        """Whether both order text alike: the same rules, in the same version.

        C and POSIX order by bytes, in every release. C.* (C.UTF-8) orders by code point, but
        glibc's older ones ordered characters beyond U+FFFF otherwise: alike unless the two
        glibc versions are known and differ. Any other locale needs a known, equal version.
        """
        if (self.provider, self.locale) != (other.provider, other.locale):
            return False
        if self.provider == "c" and self.locale in ("C", "POSIX"):
            return True
        if self.provider == "c" and self.locale.startswith("C."):
            mine, theirs = self.libc_version, other.libc_version
            return mine is None or theirs is None or mine == theirs
        return self.version is not None and self.version == other.version


# The server's glibc version, as one of its libc locales reports it (all share glibc's; on
# other C libraries the database's own locale is preferred).
_LIBC_VERSION = """(SELECT pg_collation_actual_version(c.oid) FROM pg_collation c
  WHERE c.collprovider = 'c' AND c.collcollate NOT IN ('C', 'POSIX')
    AND c.collcollate NOT LIKE 'C.%' ORDER BY c.collcollate = d.datcollate DESC LIMIT 1)"""


def _collation_query(server_version: int) -> str:
    """(provider, locale, version of its rules, glibc's version) of the current database."""
    if server_version >= 150000:  # ICU (or builtin) defaults; versions per database
        return (
            "SELECT d.datlocprovider::text, CASE WHEN d.datlocprovider = 'c' THEN "
            "d.datcollate ELSE concat_ws(' ', coalesce(to_jsonb(d) ->> 'daticulocale', "
            "to_jsonb(d) ->> 'datlocale', ''), md5(to_jsonb(d) ->> 'daticurules')) END, "
            f"pg_database_collation_actual_version(d.oid), {_LIBC_VERSION} "
            "FROM pg_database d WHERE d.datname = current_database()"
        )
    return (  # libc only: its rules' version is glibc's
        "SELECT 'c', d.datcollate, libc.version, libc.version FROM pg_database d, "
        f"LATERAL (SELECT {_LIBC_VERSION} AS version) libc "
        "WHERE d.datname = current_database()"
    )


def default_collation(conn: psycopg.Connection) -> Collation:
    """The database's collation (fixed when it was created) and the versions of its rules
    now, asked once per connection."""

    def ask(conn: psycopg.Connection) -> Collation:
        row = conn.execute(_collation_query(conn.info.server_version)).fetchone()
        if row is None:
            return Collation("", "", None)
        return Collation(str(row[0]), str(row[1]), row[2], row[3])

    return remembered(conn, "default_collation", ask)


def needs_bytewise_keys(source: psycopg.Connection, target: psycopg.Connection) -> bool:
    """Whether ranges must compare text keys bytewise (COLLATE "C"), since the two databases
    may order text otherwise: different collations, or the same one by other rules (glibc
    2.28 reordered en_US.UTF-8; an old source's glibc against Supabase's), or rules whose
    version neither server knows.

    Otherwise a row could fall in one range on the source and another on the target, and a
    range's copy would delete rows that belong to its neighbour.
    """
    return not default_collation(source).orders_alike(default_collation(target))
