"""Build secondary indexes and unique constraints after a table's first load, not during it,
and add NOT VALID check constraints back after it (they would refuse the source's old rows).

Keeping every B-tree up to date row by row while COPY inserts costs more than building it once
over the loaded table: at 3M rows of the example app, loading with only the primary keys in place
cut COPY plus index time by 22% (docs/benchmark.md). So when the plan finds a target table empty,
the indexes the copy does not need are dropped and their definitions recorded on the target, in
`supabase_migration.deferred_indexes`. The record lives in the database it describes, so a run
that is killed loses nothing: the next run finishes the ranges, then builds what is recorded.

Kept in place: the primary key (re-syncs upsert on it), a unique index the plan uses as the key,
indexes a foreign key or partitioning depends on, replica identity, and everything on
partitioned tables and partitions (their indexes are attached to each other).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import checkpoints, sqlbuild
from .catalog import BOOKKEEPING_SCHEMA, TableInfo, take_turn
from .connections import in_one_round_trip, is_transient, transaction_with
from .errors import MigrationError, TransientError
from .redaction import describe_pg_error

DEFERRED = sql.Identifier(BOOKKEEPING_SCHEMA, "deferred_indexes")

# One row per dropped index or unique constraint: the statements that recreate it exactly
# (definition, comment, CLUSTER ON), rendered by the target itself with every name qualified.
# And each NOT VALID check constraint the source has too: the source kept rows it was added over
# without checking them, which the copy's inserts would be checked against; added again after
# the load, NOT VALID, it checks new rows only, as on the source (pg_dump adds it after the
# data too). One the target has alone is the user's, and checks the copied rows.
_CANDIDATES = """
SELECT ci.relname,
       CASE WHEN con.oid IS NULL THEN 'index' ELSE 'unique constraint' END,
       array_remove(ARRAY[
         CASE WHEN con.oid IS NULL THEN pg_get_indexdef(i.indexrelid)
              ELSE format('ALTER TABLE %%I.%%I ADD CONSTRAINT %%I %%s', n.nspname, t.relname,
                          con.conname, pg_get_constraintdef(con.oid)) END,
         CASE WHEN con.oid IS NULL AND obj_description(i.indexrelid, 'pg_class') IS NOT NULL
              THEN format('COMMENT ON INDEX %%I.%%I IS %%L', n.nspname, ci.relname,
                          obj_description(i.indexrelid, 'pg_class'))
              WHEN obj_description(con.oid, 'pg_constraint') IS NOT NULL
              THEN format('COMMENT ON CONSTRAINT %%I ON %%I.%%I IS %%L', con.conname,
                          n.nspname, t.relname, obj_description(con.oid, 'pg_constraint')) END,
         CASE WHEN i.indisclustered THEN
                format('ALTER TABLE %%I.%%I CLUSTER ON %%I', n.nspname, t.relname, ci.relname) END
       ], NULL) || ARRAY(  -- an expression column's statistics target
         SELECT format('ALTER INDEX %%I.%%I ALTER COLUMN %%s SET STATISTICS %%s', n.nspname,
                       ci.relname, a.attnum, a.attstattarget)
         FROM pg_attribute a WHERE a.attrelid = i.indexrelid AND a.attstattarget >= 0
         ORDER BY a.attnum),
       CASE WHEN con.oid IS NULL THEN format('DROP INDEX %%I.%%I', n.nspname, ci.relname)
            ELSE format('ALTER TABLE %%I.%%I DROP CONSTRAINT %%I', n.nspname, t.relname,
                        con.conname) END
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                           AND con.contype IN ('p', 'u', 'x')
WHERE i.indrelid = to_regclass(%(table)s)
  AND t.relkind = 'r' AND NOT t.relispartition
  AND NOT i.indisprimary AND NOT i.indisreplident AND i.indisvalid AND i.indisready
  AND (con.oid IS NULL OR con.contype = 'u')
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indexrelid AND d.deptype = 'n')
  AND NOT EXISTS (
    SELECT 1 FROM pg_constraint f
    WHERE f.contype = 'f' AND (f.conindid = i.indexrelid OR f.conindid = con.conindid))
  AND NOT (i.indisunique AND i.indexprs IS NULL AND i.indpred IS NULL AND %(key)s::text[] = (
    SELECT array_agg(a.attname::text ORDER BY a.attname::text)
    FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE k.ord <= i.indnkeyatts))  -- its key columns, not its INCLUDE ones
UNION ALL
SELECT con.conname, 'NOT VALID check constraint',
       array_remove(ARRAY[
         format('ALTER TABLE %%I.%%I ADD CONSTRAINT %%I %%s', n.nspname, t.relname,
                con.conname, pg_get_constraintdef(con.oid)),
         CASE WHEN obj_description(con.oid, 'pg_constraint') IS NOT NULL
              THEN format('COMMENT ON CONSTRAINT %%I ON %%I.%%I IS %%L', con.conname,
                          n.nspname, t.relname, obj_description(con.oid, 'pg_constraint')) END
       ], NULL),
       format('ALTER TABLE %%I.%%I DROP CONSTRAINT %%I', n.nspname, t.relname, con.conname)
FROM pg_constraint con
JOIN pg_class t ON t.oid = con.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE con.conrelid = to_regclass(%(table)s) AND con.contype = 'c' AND NOT con.convalidated
  AND con.conname = ANY(%(not_valid)s::text[])  -- the source's: a target's own stays
  AND con.conislocal AND con.coninhcount = 0 AND t.relkind = 'r' AND NOT t.relispartition
  AND NOT t.relhassubclass  -- dropped and added on a parent, it is its children's too
ORDER BY 1
"""


@contextmanager
def _table_transaction(
    conn: psycopg.Connection, table_name: str, *, lock_timeout: str
) -> Iterator[None]:
    """One transaction per table, taken in turns by workers and concurrent runs, with names
    rendered and resolved fully qualified (search_path pg_catalog) and no statement timeout."""
    first = [
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)),
        sql.SQL("SET LOCAL search_path = pg_catalog; SET LOCAL statement_timeout = 0"),
        sqlbuild.EVERY_ROW,  # "is it empty?" must not be answered by a policy
        take_turn(_build_key(table_name)),
    ]
    with transaction_with(conn, first):  # one round trip for BEGIN, settings and lock
        yield


@dataclass(frozen=True)
class Deferred:
    table_name: str
    index_name: str
    kind: str  # "index" | "unique constraint"
    statements: list[str]


class IndexBuildError(MigrationError):
    """Building a deferred index failed (e.g. duplicate keys for a unique index)."""


def defer_for_load(
    conn: psycopg.Connection, table: TableInfo, log: Callable[[str], None] | None = None
) -> list[str]:
    """Drop the table's deferrable indexes if the target table is empty; returns their names.

    An optimization only: a table that has rows, is busy, or may not be altered by this role
    keeps its indexes and is loaded with them, as before.
    """
    name = table.qualified_name
    target = sql.Identifier(table.schema, table.name)
    try:
        with _table_transaction(conn, name, lock_timeout="10s"):
            already = _recorded(conn, name)
            if already:
                return [d.index_name for d in already]
            (occupied,) = in_one_round_trip(
                conn,
                [
                    sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target),
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sqlbuild.rows_of(table)),
                ],
            )
            if occupied[0]:
                return []
            candidates = conn.execute(
                _CANDIDATES,
                {
                    "table": target.as_string(conn),
                    "key": sorted(table.key),
                    "not_valid": list(table.not_valid_checks),
                },
            ).fetchall()
            if candidates:  # recorded, then dropped: two round trips however many there are
                rows = sql.SQL(", ").join(sql.SQL("(%s, %s, %s, %s)") for _ in candidates)
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (table_name, index_name, kind, statements) VALUES {}"
                    ).format(DEFERRED, rows),
                    [
                        v
                        for index_name, kind, statements, _ in candidates
                        for v in (name, index_name, kind, statements)
                    ],
                )
                conn.execute(sql.SQL("; ").join(sql.SQL(drop) for *_, drop in candidates))
            return [c[0] for c in candidates]
    except psycopg.Error as exc:
        if log is not None:
            log(f"{name} keeps its indexes during the load ({describe_pg_error(exc)}).")
        return []


def _recorded(conn: psycopg.Connection, table_name: str) -> list[Deferred]:
    rows = conn.execute(
        sql.SQL(
            "SELECT table_name, index_name, kind, statements FROM {} WHERE table_name = %s "
            "ORDER BY kind DESC, index_name"
        ).format(DEFERRED),
        (table_name,),
    ).fetchall()
    return [Deferred(*row) for row in rows]


def pending(conn: psycopg.Connection, tables: Sequence[str] | None = None) -> list[Deferred]:
    """Every index still waiting to be built (all tables, or the given ones)."""
    if not checkpoints.bookkeeping_exists(conn, "deferred_indexes"):
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT table_name, index_name, kind, statements FROM {} "
            "WHERE %(tables)s::text[] IS NULL OR table_name = ANY(%(tables)s) "
            "ORDER BY table_name, kind DESC, index_name"
        ).format(DEFERRED),
        {"tables": list(tables) if tables is not None else None},
    ).fetchall()
    return [Deferred(*row) for row in rows]


def table_complete(conn: psycopg.Connection, table_name: str) -> bool:
    """Every planned range of the table is completed (and there is at least one)."""
    return not checkpoints.not_fully_copied(conn, [table_name])


# A build sends its statements back to back: one of ours idle in its transaction this long
# has lost its client (killed, or its connection cut off on the way) and can never commit.
LOST_BUILD_IDLE_S = 10

_LOST_BUILDS = sql.SQL(
    """SELECT a.pid, pg_terminate_backend(a.pid)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::int8 << 32) | l.objid::int8) = hashtext({lock})::int8
  AND a.state LIKE 'idle in transaction%' AND a.usename = current_user
  AND a.state_change < now() - make_interval(secs => {idle})"""
)


def _build_key(table_name: str) -> str:
    return f"supabase_migration.deferred:{table_name}"


def rebuild(
    conn: psycopg.Connection, table_name: str, log: Callable[[str], None] | None = None
) -> list[str]:
    """Create the table's deferred indexes, all or none, and forget them; returns their names.

    Raises IndexBuildError naming the index (never a key value) when one cannot be built, for
    example a unique index over rows that are not unique; the record stays for the next run.
    A transient failure (the connection ended) is a TransientError, which steps retry. It
    waits for another run's build of the table, and for the application's locks on it, but
    ends a build whose client is gone: its session idles in its transaction at the target,
    holding the table, for as long as the server keeps it (hours).
    """
    while True:
        current = ""
        try:
            with _table_transaction(conn, table_name, lock_timeout=f"{LOST_BUILD_IDLE_S}s"):
                conn.execute("SET LOCAL lock_timeout = 0")  # the statements wait for the app's
                recorded = _recorded(conn, table_name)
                for item in recorded:
                    current = f"{item.kind} {item.index_name}"
                    for statement in item.statements:
                        conn.execute(statement)
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE table_name = %s").format(DEFERRED), (table_name,)
                )
                return [d.index_name for d in recorded]
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.LockNotAvailable) and not current:
                _end_lost_builds(conn, table_name, log)  # the build lock: then wait again
                continue
            sentence = (
                f"Building the {current or 'deferred indexes'} of {table_name} after its load "
                f"failed ({describe_pg_error(exc)}); the data is in place, and the next run "
                "builds it again once the cause is fixed."
            )
            if is_transient(exc):
                raise TransientError(sentence) from None
            raise IndexBuildError(sentence) from None


def _end_lost_builds(
    conn: psycopg.Connection, table_name: str, log: Callable[[str], None] | None
) -> None:
    query = _LOST_BUILDS.format(lock=sql.Literal(_build_key(table_name)), idle=LOST_BUILD_IDLE_S)
    for pid, ended in conn.execute(query).fetchall():
        if ended and log is not None:
            log(
                f"Ended backend {pid}, an earlier build of {table_name}'s indexes whose client "
                "is gone (it held the table, idle in its transaction)."
            )


def rebuild_if_complete(
    conn: psycopg.Connection, table_name: str, log: Callable[[str], None] | None = None
) -> list[str]:
    """After a table's ranges all completed: build what was deferred for it."""
    if not checkpoints.bookkeeping_exists(conn, "deferred_indexes"):
        return []
    if not table_complete(conn, table_name):
        return []
    if not _recorded(conn, table_name):
        return []
    return rebuild(conn, table_name, log)
