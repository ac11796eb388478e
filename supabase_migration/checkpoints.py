"""The checkpoint table on the target: one row per (table, partition), doubling as its status.

It lives in schema `supabase_migration`, never in `public`, which Supabase exposes over its REST
API; no grants go to anon/authenticated. A partition's row is locked (FOR UPDATE NOWAIT) by the
transaction that copies it, so two runs can never interleave on one range: the loser fails fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from .catalog import API_ROLES, BOOKKEEPING_SCHEMA, SCHEMA_APPLIED, SCHEMA_LOCK_KEY, take_turn
from .connections import KeyValue, transaction_with
from .errors import ConfigError, listed
from .ranges import KeyRange

CHECKPOINTS = sql.Identifier(BOOKKEEPING_SCHEMA, "migration_checkpoints")

BOOKKEEPING_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {BOOKKEEPING_SCHEMA};
REVOKE ALL ON SCHEMA {BOOKKEEPING_SCHEMA} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.migration_checkpoints (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name       text        NOT NULL,
    partition_key    text        NOT NULL,
    batch_number     integer     NOT NULL,
    lower_bound      jsonb,
    upper_bound      jsonb,
    last_record_id   text,
    records_migrated bigint      NOT NULL DEFAULT 0,
    rows_deleted     bigint      NOT NULL DEFAULT 0,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'completed', 'failed')),
    error_message    text,
    attempts         integer     NOT NULL DEFAULT 0,
    run_id           text,
    row_checksum     text,
    copy_path        text,
    duration_ms      bigint,
    completed_by     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    UNIQUE (table_name, partition_key)
);
REVOKE ALL ON ALL TABLES IN SCHEMA {BOOKKEEPING_SCHEMA} FROM PUBLIC;
"""

# Indexes dropped for a table's first load and built after it (see deferred.py); a separate
# statement so targets bookkept by an earlier version get the table too.
DEFERRED_DDL = f"""
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.deferred_indexes (
    table_name  text        NOT NULL,
    index_name  text        NOT NULL,
    kind        text        NOT NULL,
    statements  text[]      NOT NULL,
    deferred_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, index_name)
);
REVOKE ALL ON {BOOKKEEPING_SCHEMA}.deferred_indexes FROM PUBLIC;
"""


# Which source the target was migrated from (one row, written by the first plan): a catch-up
# run from another database (staging's URL for production's, with the same tables) would
# delete every target row that database lacks, and verify would then pass.
SOURCE_DDL = f"""
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.migration_source (
    only_row          boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    system_identifier text,
    database          text        NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON {BOOKKEEPING_SCHEMA}.migration_source FROM PUBLIC;
"""
NEW_SOURCE_FLAG = "--new-source"

# When each step after the copy last finished: a copy since (a resumed run whose end failed, a
# table run in the UI) leaves the sequences behind the new rows (the application's first
# insert fails on a duplicate key) and new tables out of the audit grants; `status` says so.
STEPS = sql.Identifier(BOOKKEEPING_SCHEMA, "migration_steps")
STEPS_DDL = f"""
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.migration_steps (
    step         text        PRIMARY KEY,
    completed_at timestamptz NOT NULL,
    run_id       text
);
REVOKE ALL ON {BOOKKEEPING_SCHEMA}.migration_steps FROM PUBLIC;
"""
SEQUENCES_STEP = "sequences"
SECURITY_STEP = "security"
MATVIEWS_STEP = "materialized_views"
_STEPS_SAID = {  # in the order they run
    SEQUENCES_STEP: "the sequences step (each set past the copied rows)",
    SECURITY_STEP: "the security step (row level security, policies, audit grants)",
    MATVIEWS_STEP: "the materialized views step (each refreshed from the copied rows)",
}


@dataclass(frozen=True)
class SourceIdentity:
    """A source database: its name and its server's system identifier (the same on a
    replica of it; another for a copy restored elsewhere), None where it may not be read."""

    database: str
    system_identifier: str | None

    def same_as(self, other: SourceIdentity) -> bool:
        ids = (self.system_identifier, other.system_identifier)
        return self.database == other.database and (None in ids or ids[0] == ids[1])

    def describe(self) -> str:
        server = f"server {self.system_identifier}" if self.system_identifier else "its server"
        return f"database {self.database} of {server}"


def source_identity(source: psycopg.Connection) -> SourceIdentity:
    (database,) = source.execute("SELECT current_database()").fetchone() or ("",)
    try:
        with source.transaction():
            row = source.execute("SELECT system_identifier::text FROM pg_control_system()")
            (system_identifier,) = row.fetchone() or (None,)
    except psycopg.errors.InsufficientPrivilege:
        system_identifier = None
    return SourceIdentity(database, system_identifier)


def recorded_source(target: psycopg.Connection) -> SourceIdentity | None:
    if not bookkeeping_exists(target, "migration_source"):
        return None
    row = target.execute(
        f"SELECT database, system_identifier FROM {BOOKKEEPING_SCHEMA}.migration_source"
    ).fetchone()
    return SourceIdentity(row[0], row[1]) if row else None


def refuse_another_source(source: psycopg.Connection, target: psycopg.Connection) -> None:
    recorded = recorded_source(target)
    current = source_identity(source)
    if recorded is not None and not current.same_as(recorded):
        raise ConfigError(
            f"This target was migrated from {recorded.describe()}, and SOURCE_DATABASE_URL "
            f"names {current.describe()}, whose rows a catch-up would make the target's "
            "(deleting the others); check the URL, or, if the source really moved (restored "
            f"elsewhere), run `supabase-migrate run {NEW_SOURCE_FLAG}`."
        )


def record_source(
    source: psycopg.Connection, target: psycopg.Connection, *, replace: bool = False
) -> SourceIdentity:
    """The first plan's source (or, `replace`, this one: the user said the source moved);
    returns this one."""
    identity = source_identity(source)
    target.execute(
        sql.SQL(
            "INSERT INTO {} (database, system_identifier) VALUES (%s, %s) ON CONFLICT (only_row) "
            + (
                "DO UPDATE SET database = excluded.database, system_identifier = "
                "excluded.system_identifier, recorded_at = now()"
                if replace
                else "DO NOTHING"
            )
        ).format(sql.Identifier(BOOKKEEPING_SCHEMA, "migration_source")),
        (identity.database, identity.system_identifier),
    )
    return identity


class Status(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Checkpoint:
    table_name: str
    partition_key: str
    batch_number: int
    lower_bound: list[str] | None
    upper_bound: list[str] | None
    status: str
    records_migrated: int
    rows_deleted: int
    attempts: int
    row_checksum: str | None
    error_message: str | None
    run_id: str | None
    copy_path: str | None
    duration_ms: int | None
    last_record_id: str | None
    updated_at: datetime | None
    completed_at: datetime | None

    def key_range(self) -> KeyRange:
        lower = tuple(self.lower_bound) if self.lower_bound is not None else None
        upper = tuple(self.upper_bound) if self.upper_bound is not None else None
        return KeyRange(self.table_name, self.batch_number, lower, upper)


_FIELDS = sql.SQL(
    "table_name, partition_key, batch_number, lower_bound, upper_bound, status, records_migrated, "
    "rows_deleted, attempts, row_checksum, error_message, run_id, copy_path, duration_ms, "
    "last_record_id, updated_at, completed_at"
)


# The schema step's lock (see catalog.SCHEMA_LOCK_KEY; concurrent REVOKEs would also fail, with
# "tuple concurrently updated").
_BOOKKEEPING_LOCK = take_turn(SCHEMA_LOCK_KEY)


# PUBLIC and the API roles may not even look up names in the bookkeeping schema: its rows name
# tables, ranges and errors, and Supabase's default privileges would give anon and
# authenticated every new table. Only what grants them something is revoked (so a run that
# finds nothing to do rewrites no catalog row), and only what this login owns (another login
# with rights on the tables may run too; REVOKE would refuse it). One statement, so it can
# travel with others; run it under the schema lock (concurrent REVOKEs of one object fail with
# "tuple concurrently updated").
REVOKE_BOOKKEEPING = sql.SQL(
    """DO $$
DECLARE
  api oid[] := ARRAY(SELECT oid FROM pg_roles WHERE rolname = ANY({roles}));
  grantees text := concat_ws(', ', VARIADIC ARRAY['PUBLIC'] || ARRAY(
    SELECT quote_ident(rolname::text) FROM pg_roles WHERE oid = ANY(api) ORDER BY rolname));
  granted record;
BEGIN
  FOR granted IN
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind,
           c.oid::regclass::text AS name
    FROM pg_class c
    WHERE c.relnamespace = to_regnamespace({schema}) AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
      AND pg_has_role(c.relowner, 'USAGE')
      AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0 OR a.grantee = ANY(api))
    UNION ALL
    SELECT 'FUNCTION', p.oid::regprocedure::text
    FROM pg_proc p
    WHERE p.pronamespace = to_regnamespace({schema}) AND pg_has_role(p.proowner, 'USAGE')
      AND EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                  WHERE a.grantee = 0 OR a.grantee = ANY(api))
    UNION ALL
    SELECT 'SCHEMA', quote_ident(n.nspname::text)
    FROM pg_namespace n
    WHERE n.nspname = {schema} AND pg_has_role(n.nspowner, 'USAGE')
      AND EXISTS (SELECT 1 FROM aclexplode(n.nspacl) a WHERE a.grantee = 0 OR a.grantee = ANY(api))
  LOOP
    EXECUTE format('REVOKE ALL ON %s %s FROM %s', granted.kind, granted.name, grantees);
  END LOOP;
END $$"""
).format(roles=sql.Literal(list(API_ROLES)), schema=sql.Literal(BOOKKEEPING_SCHEMA))


# Each bookkeeping table and what makes it: separate statements, so that targets bookkept by
# an earlier version get the newer tables too.
BOOKKEEPING_DDLS = {
    "migration_checkpoints": BOOKKEEPING_DDL,
    "deferred_indexes": DEFERRED_DDL,
    "migration_source": SOURCE_DDL,
    "migration_steps": STEPS_DDL,
}


def ensure_bookkeeping(conn: psycopg.Connection) -> None:
    """Create the bookkeeping schema and table if missing (idempotent, one transaction): two
    round trips when they exist, as on every run but the first."""
    tables = [
        sql.SQL("SELECT to_regclass({}) IS NOT NULL").format(
            sql.Literal(f"{BOOKKEEPING_SCHEMA}.{table}")
        )
        for table in BOOKKEEPING_DDLS
    ]
    with transaction_with(conn, [_BOOKKEEPING_LOCK, *tables, REVOKE_BOOKKEEPING]) as found:
        missing = [
            ddl
            for ddl, (exists,) in zip(BOOKKEEPING_DDLS.values(), found[1:], strict=True)
            if not exists
        ]
        for ddl in missing:
            conn.execute(ddl)
        if missing:
            conn.execute(REVOKE_BOOKKEEPING)  # default privileges may grant new ones


def bookkeeping_exists(conn: psycopg.Connection, table: str = "migration_checkpoints") -> bool:
    """Whether a bookkeeping table exists (an earlier version may not have made every one)."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{BOOKKEEPING_SCHEMA}.{table}",)
    ).fetchone()
    return bool(row and row[0])


def planned_anything(conn: psycopg.Connection) -> bool:
    """Whether any run has planned this target (it has checkpoint rows)."""
    if not bookkeeping_exists(conn):
        return False
    return conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(CHECKPOINTS)).fetchone()[
        0
    ]


def _bound_json(bound: tuple[str, ...] | None) -> str | None:
    return None if bound is None else json.dumps(list(bound))


def load(
    conn: psycopg.Connection, table: str | None = None, keys: Sequence[str] | None = None
) -> list[Checkpoint]:
    """Checkpoint rows (of one table, and of some of its partitions), ordered by table and
    batch number."""
    where, params = sql.SQL(""), []
    if table:
        where, params = sql.SQL("WHERE table_name = %s"), [table]
        if keys is not None:
            where += sql.SQL(" AND partition_key = ANY(%s)")
            params.append(list(keys))
    query = sql.SQL("SELECT {} FROM {} {} ORDER BY table_name, batch_number").format(
        _FIELDS, CHECKPOINTS, where
    )
    with conn.cursor(row_factory=class_row(Checkpoint)) as cur:
        cur.execute(query, params or None)
        return cur.fetchall()


def load_by_table(conn: psycopg.Connection, tables: Iterable[str]) -> dict[str, list[Checkpoint]]:
    """Each table's checkpoint rows (`load`), read in one round trip for all of them."""
    found: dict[str, list[Checkpoint]] = {name: [] for name in tables}
    for cp in load(conn):
        if cp.table_name in found:
            found[cp.table_name].append(cp)
    return found


def seed_pending(conn: psycopg.Connection, ranges: Iterable[KeyRange]) -> int:
    """Insert `pending` rows for new ranges; existing rows (completed or not) are kept."""
    rows = [
        (r.table, r.partition_key, r.index, _bound_json(r.lower), _bound_json(r.upper))
        for r in ranges
    ]
    if not rows:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (table_name, partition_key, batch_number, lower_bound, upper_bound)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (table_name, partition_key) DO NOTHING"
            ).format(CHECKPOINTS),
            rows,
        )
    return len(rows)


def close_open_range(conn: psycopg.Connection, table: str, key: str, upper: Sequence[str]) -> None:
    """Give the open-ended last range an upper bound when the plan grows past it.

    Its content shrinks, so it is marked pending again: the next run re-syncs it.
    """
    conn.execute(
        sql.SQL(
            "UPDATE {} SET upper_bound = %s, status = 'pending', updated_at = now() "
            "WHERE table_name = %s AND partition_key = %s"
        ).format(CHECKPOINTS),
        (json.dumps(list(upper)), table, key),
    )


def lock_statement(table: str, key: str) -> sql.Composed:
    """Lock one partition's row for this transaction (LockNotAvailable if held), its values
    inline so that it can travel with other statements; `Checkpoint(*row)` reads its row."""
    return sql.SQL(
        "SELECT {} FROM {} WHERE table_name = {} AND partition_key = {} FOR UPDATE NOWAIT"
    ).format(_FIELDS, CHECKPOINTS, sql.Literal(table), sql.Literal(key))


def get(conn: psycopg.Connection, table: str, key: str) -> Checkpoint | None:
    with conn.cursor(row_factory=class_row(Checkpoint)) as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM {} WHERE table_name = %s AND partition_key = %s").format(
                _FIELDS, CHECKPOINTS
            ),
            (table, key),
        )
        return cur.fetchone()


@dataclass(frozen=True)
class Completion:
    rows: int
    rows_deleted: int
    checksum: str
    last_record_id: str | None
    copy_path: str
    duration_ms: int
    run_id: str | None


def completed_statement(
    table: str, key: str, done: Completion, *, last_key_bound: bool = False
) -> sql.Composed:
    """Inside the copy transaction, so that it commits together with the data; its values
    inline so that it can travel with the COMMIT. `last_key_bound`: the last key goes as a
    bound parameter (a unique key that may be PHI, which pgaudit's WRITE class would log)."""
    values = (
        done.rows,
        done.rows_deleted,
        done.checksum,
        KeyValue(done.last_record_id) if last_key_bound else done.last_record_id,
        done.copy_path,
        done.duration_ms,
        done.run_id,
        table,
        key,
    )
    return sql.SQL(
        "UPDATE {} SET status = 'completed', records_migrated = {}, rows_deleted = {}, "
        "row_checksum = {}, last_record_id = {}, copy_path = {}, duration_ms = {}, "
        "run_id = {}, attempts = attempts + 1, error_message = NULL, "
        "completed_by = current_user, completed_at = clock_timestamp(), updated_at = now() "
        "WHERE table_name = {} AND partition_key = {}"
    ).format(CHECKPOINTS, *(v if isinstance(v, KeyValue) else sql.Literal(v) for v in values))


def copy_again_statements(table: str, keys: Sequence[str]) -> list[sql.Composable]:
    """For the copying range's transaction: these partitions' rows on the target changed
    without them, so their recorded checksums no longer vouch for them; the next run copies
    them. Values inline, to travel with the range's COMMIT."""
    if not keys:
        return []
    return [
        sql.SQL(
            "UPDATE {} SET status = 'pending', row_checksum = NULL, updated_at = now() "
            "WHERE table_name = {} AND partition_key = ANY({})"
        ).format(CHECKPOINTS, sql.Literal(table), sql.Literal(list(keys)))
    ]


# Completed once and pending again, not copied since: marked by `copy_again_statements`, or a
# last range the plan reopened when the source grew past it.
_MARKED_TO_COPY_AGAIN = sql.SQL("status = 'pending' AND completed_at IS NOT NULL")


def marked_to_copy_again(conn: psycopg.Connection, table: str, but: Sequence[str]) -> list[str]:
    """The partitions of `table`, other than `but`, marked to be copied again."""
    rows = conn.execute(
        sql.SQL(
            "SELECT partition_key FROM {} WHERE table_name = %s AND {} "
            "AND partition_key <> ALL(%s) ORDER BY batch_number"
        ).format(CHECKPOINTS, _MARKED_TO_COPY_AGAIN),
        (table, list(but)),
    ).fetchall()
    return [key for (key,) in rows]


def marked_to_copy_again_by_table(
    conn: psycopg.Connection, tables: Iterable[str]
) -> dict[str, set[str]]:
    """Per table of `tables` that has any, its partitions marked to be copied again."""
    marked: dict[str, set[str]] = {}
    for table, key in conn.execute(
        sql.SQL(
            "SELECT table_name, partition_key FROM {} WHERE table_name = ANY(%s) AND {}"
        ).format(CHECKPOINTS, _MARKED_TO_COPY_AGAIN),
        (list(tables),),
    ):
        marked.setdefault(table, set()).add(key)
    return marked


def planned_among(conn: psycopg.Connection, tables: Sequence[str]) -> list[str]:
    """Those of `tables` with ranges planned on this target (the manifest listed them once)."""
    if not tables or not bookkeeping_exists(conn):
        return []
    return _tables_where(conn, tables, "EXISTS (SELECT FROM {} WHERE table_name = name)")


def unrecorded_tables(conn: psycopg.Connection, tables: Sequence[str]) -> list[str]:
    """Those of `tables` the target has while it has no bookkeeping at all: dropped by hand
    (`DROP SCHEMA supabase_migration`), or tables made outside this tool."""
    if not tables or bookkeeping_exists(conn) or stopped_after_schema_step(conn):
        return []
    return [name for name, found in zip(tables, _on_target(conn, tables), strict=True) if found]


def _on_target(conn: psycopg.Connection, tables: Sequence[str]) -> list[bool]:
    """Whether each of `tables` (schema.table) exists."""
    idents = [sql.Identifier(*name.split(".", 1)).as_string(conn) for name in tables]
    rows = conn.execute(
        "SELECT to_regclass(ident) IS NOT NULL FROM unnest(%s::text[]) AS ident", (idents,)
    ).fetchall()
    return [found for (found,) in rows]


def stopped_after_schema_step(conn: psycopg.Connection) -> bool:
    """Our schema step committed (its record is there) and no run set up the checkpoints
    since: a crash or Ctrl-C between the two, which the next `run` goes on from."""
    if bookkeeping_exists(conn) or not bookkeeping_exists(conn, SCHEMA_APPLIED):
        return False
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})")
    row = conn.execute(query.format(sql.Identifier(BOOKKEEPING_SCHEMA, SCHEMA_APPLIED))).fetchone()
    return bool(row and row[0])


STOPPED_AFTER_SCHEMA_STEP = (
    "A run stopped after its schema step had set up the target and before it planned the "
    "copy, so nothing is copied yet; `supabase-migrate run` goes on from there."
)


def unrecorded_sentence(found: Sequence[str], total: int) -> str:
    return (
        f"The target has {len(found)} of the manifest's {total} tables ({listed(found, 3)}) but "
        f"no {BOOKKEEPING_SCHEMA} schema recording what was copied (dropped by hand?); "
        "`supabase-migrate run --schema-mode none` checks them against the source, copies "
        "what differs and verifies them."
    )


def dropped_since_copied(conn: psycopg.Connection, tables: Sequence[str]) -> list[str]:
    """Those of `tables` with planned ranges that the target no longer has (dropped by hand):
    their completed ranges would be skipped, and verification fail, run after run."""
    planned = planned_among(conn, tables)
    if not planned:
        return []
    return [
        name for name, found in zip(planned, _on_target(conn, planned), strict=True) if not found
    ]


def dropped_sentence(names: Sequence[str]) -> str:
    one = len(names) == 1
    return (
        f"{listed(names, 3)} {'was' if one else 'were'} copied but no longer exist"
        f"{'s' if one else ''} on the target (dropped by hand?); create "
        f"{'it' if one else 'them'} again as on the source (pg_dump --schema-only -t ...), "
        f"delete {'its' if one else 'their'} rows from {BOOKKEEPING_SCHEMA}.migration_checkpoints, "
        "and run again to copy them anew."
    )


def not_fully_copied(conn: psycopg.Connection, tables: Sequence[str]) -> list[str]:
    """Those of `tables` with a range not completed, or none planned."""
    return _tables_where(
        conn,
        tables,
        "NOT coalesce((SELECT bool_and(status = 'completed') FROM {} WHERE table_name = name), "
        "false)",
    )


def _tables_where(conn: psycopg.Connection, tables: Sequence[str], condition: str) -> list[str]:
    """Those of `tables` (in name order) for which `condition` holds: SQL on `name`, with {}
    for the checkpoints table."""
    query = sql.SQL("SELECT name FROM unnest(%s::text[]) AS name WHERE ") + sql.SQL(
        condition
    ).format(CHECKPOINTS)
    rows = conn.execute(query + sql.SQL(" ORDER BY name"), (list(tables),)).fetchall()
    return [name for (name,) in rows]


def mark_failed(
    conn: psycopg.Connection, table: str, key: str, message: str, run_id: str | None
) -> None:
    """In its own transaction after the copy rolled back; the message must be PHI-free."""
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "UPDATE {} SET status = 'failed', error_message = %s, run_id = %s, "
                "attempts = attempts + 1, updated_at = now() "
                "WHERE table_name = %s AND partition_key = %s"
            ).format(CHECKPOINTS),
            (message, run_id, table, key),
        )


def record_step(
    conn: psycopg.Connection, step: str, run_id: str | None, at: datetime | None = None
) -> None:
    """`step` (one of _STEPS_SAID) finished now, or saw every copy before `at` (when it
    began its reads), after every copy before it."""
    ensure_bookkeeping(conn)  # the step may run alone, in the UI, on an older bookkeeping
    conn.execute(step_finished(step, run_id, at))


def step_finished(step: str, run_id: str | None, at: datetime | None = None) -> sql.Composed:
    """The record that `step` finished, dated by its transaction's start: sent in the
    transaction that reads the copied rows (the sequences'), the date precedes those reads.
    A range's checkpoint is dated when it is written, just before its COMMIT, so a range
    committed after the step's reads is always later (`steps_behind`), even one whose
    transaction began before the step did."""
    return sql.SQL(
        "INSERT INTO {} (step, completed_at, run_id) VALUES ({}, {}, {}) "
        "ON CONFLICT (step) DO UPDATE SET completed_at = EXCLUDED.completed_at, "
        "run_id = EXCLUDED.run_id"
    ).format(
        STEPS,
        sql.Literal(step),
        sql.SQL("now()") if at is None else sql.Literal(at),
        sql.Literal(run_id),
    )


def steps_behind(conn: psycopg.Connection) -> list[str]:
    """The steps after the copy not finished since the last range was copied. None on a
    target whose bookkeeping predates their record: nothing says they did not run there."""
    if not bookkeeping_exists(conn, "migration_steps"):
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT s.step FROM unnest(%s::text[]) WITH ORDINALITY AS s (step, i) "
            "LEFT JOIN {} AS m USING (step) "
            "WHERE (SELECT max(completed_at) FROM {}) > coalesce(m.completed_at, '-infinity') "
            "ORDER BY s.i"
        ).format(STEPS, CHECKPOINTS),
        (list(_STEPS_SAID),),
    ).fetchall()
    return [step for (step,) in rows]


def steps_since_last_copy(conn: psycopg.Connection, prefix: str) -> set[str]:
    """The names after `prefix` of the steps `prefix<name>` finished since the last range was
    copied (the materialized views, each recorded with its own refresh)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT substr(step, length(%s) + 1) FROM {} WHERE starts_with(step, %s) "
            "AND completed_at >= coalesce((SELECT max(completed_at) FROM {}), '-infinity')"
        ).format(STEPS, CHECKPOINTS),
        (prefix, prefix),
    ).fetchall()
    return {name for (name,) in rows}


def steps_behind_sentence(steps: Sequence[str]) -> str:
    one = len(steps) == 1
    said = [_STEPS_SAID[s] for s in steps]
    named = " and ".join([", ".join(said[:-1]), said[-1]] if len(said) > 1 else said)
    return (
        f"{named[0].upper()}{named[1:]} "
        f"{'has' if one else 'have'} not run since the last range was copied: "
        f"`supabase-migrate run` finishes {'it' if one else 'them'} (copied ranges are skipped)."
    )


def summary_if_planned(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """`summary`, or nothing on a target without bookkeeping (no run has planned it)."""
    return summary(conn) if bookkeeping_exists(conn) else {}


def summary(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """Per table: partitions by status, and rows migrated."""
    result: dict[str, dict[str, int]] = {}
    for table, status, partitions, rows in conn.execute(
        sql.SQL(
            "SELECT table_name, status, count(*), coalesce(sum(records_migrated), 0) "
            "FROM {} GROUP BY table_name, status ORDER BY table_name"
        ).format(CHECKPOINTS)
    ):
        entry = result.setdefault(table, {"pending": 0, "completed": 0, "failed": 0, "rows": 0})
        entry[status] = partitions
        entry["rows"] += int(rows)
    return result
