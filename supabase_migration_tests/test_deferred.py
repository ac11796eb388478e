"""Indexes built after the first load: what is deferred, what is kept, and the exact rebuild."""

from __future__ import annotations

import psycopg
import pytest

from supabase_migration import checkpoints, deferred, verify
from supabase_migration.catalog import read_tables
from supabase_migration.connections import connect
from supabase_migration.conninfo import parse_database_url
from supabase_migration.copy import CopyOptions, copy_range, replica_mode_allowed
from supabase_migration.planning import refresh_plan

from .compare import assert_tables_equal
from .testbed import round_trips

SCHEMA = """
CREATE TABLE parent (
    id bigint PRIMARY KEY, code text NOT NULL, email text, name text,
    CONSTRAINT parent_code_key UNIQUE (code)
);
COMMENT ON CONSTRAINT parent_code_key ON parent IS 'codes are unique';
CREATE UNIQUE INDEX parent_email_lower ON parent (lower(email));
ALTER INDEX parent_email_lower ALTER COLUMN 1 SET STATISTICS 500;
CREATE INDEX parent_name_idx ON parent (name) WHERE name IS NOT NULL;
COMMENT ON INDEX parent_name_idx IS 'lookup by name';
CREATE TABLE referenced (id integer PRIMARY KEY, tag text NOT NULL UNIQUE);
CREATE TABLE child (
    id bigint PRIMARY KEY,
    tag text REFERENCES referenced (tag),
    parent_id bigint REFERENCES parent (id)
);
CREATE INDEX child_parent_idx ON child (parent_id);
ALTER TABLE child CLUSTER ON child_parent_idx;
CREATE TABLE keyed_by_unique (code text NOT NULL, v integer);
CREATE UNIQUE INDEX keyed_code ON keyed_by_unique (code);
CREATE INDEX keyed_v ON keyed_by_unique (v);
CREATE TABLE partly_loaded (id integer PRIMARY KEY, v integer);
CREATE INDEX partly_v ON partly_loaded (v);
CREATE TABLE keyed_covering (code text NOT NULL, v integer);
CREATE UNIQUE INDEX keyed_cover ON keyed_covering (code) INCLUDE (v);
"""

SEED = """
INSERT INTO parent SELECT g, 'c' || g, 'P' || g || '@example.org', 'name ' || (g % 50)
FROM generate_series(1, 3000) g;
INSERT INTO referenced SELECT g, 't' || g FROM generate_series(1, 10) g;
INSERT INTO child SELECT g, 't' || (1 + g % 10), 1 + g % 3000 FROM generate_series(1, 4000) g;
INSERT INTO keyed_by_unique SELECT 'k' || g, g % 7 FROM generate_series(1, 1500) g;
INSERT INTO partly_loaded SELECT g, g FROM generate_series(1, 100) g;
INSERT INTO keyed_covering SELECT 'k' || g, g FROM generate_series(1, 300) g;
"""

TABLES = [
    "public.parent",
    "public.referenced",
    "public.child",
    "public.keyed_by_unique",
    "public.partly_loaded",
    "public.keyed_covering",
]

# Everything that must come back exactly: definition, comment, clustering, constraint text,
# an expression column's statistics target.
INDEX_STATE = """
SELECT c.relname, pg_get_indexdef(i.indexrelid), obj_description(i.indexrelid, 'pg_class'),
       i.indisclustered, con.conname, pg_get_constraintdef(con.oid),
       obj_description(con.oid, 'pg_constraint'),
       (SELECT array_agg(a.attstattarget ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = i.indexrelid AND a.attstattarget >= 0)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE n.nspname = 'public'
ORDER BY 1, 5
"""


def _index_state(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(INDEX_STATE).fetchall()


def _index_names(url: str, table: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s",
            (table,),
        )
        return {r[0] for r in rows}


@pytest.fixture
def pair(source_db, target_db):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(SEED)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO partly_loaded VALUES (1, 1)")  # not empty: keeps its index
    return source_db, target_db


def _connections(source_db, target_url: str):
    return (
        connect(parse_database_url(source_db.url, label="source"), autocommit=True),
        connect(parse_database_url(target_url, label="target"), autocommit=True),
    )


def _plan_and_defer(s, t, batch_size: int = 700) -> dict[str, list[str]]:
    checkpoints.ensure_bookkeeping(t)
    out = {}
    for info in read_tables(s, ["public"]):
        refresh_plan(s, t, info, batch_size=batch_size)
        out[info.qualified_name] = sorted(deferred.defer_for_load(t, info))
    return out


def _copy_everything(s, t, *, force: bool = False) -> None:
    options = CopyOptions(force=force, replica_mode=replica_mode_allowed(t))
    for info in read_tables(s, ["public"]):
        for cp in checkpoints.load(t, info.qualified_name):
            copy_range(s, t, info, cp.partition_key, options)


def test_indexes_are_dropped_for_the_load_and_rebuilt_exactly(pair):
    source_db, target_db = pair
    before = _index_state(target_db.url)
    s, t = _connections(source_db, target_db.url)
    with s, t:
        chosen = _plan_and_defer(s, t)
        assert chosen == {
            "public.parent": ["parent_code_key", "parent_email_lower", "parent_name_idx"],
            # its unique constraint backs a foreign key: kept
            "public.referenced": [],
            "public.child": ["child_parent_idx"],
            # the unique index is the table's copy key: kept
            "public.keyed_by_unique": ["keyed_v"],
            # the target table already has rows
            "public.partly_loaded": [],
            # keyed by its unique index's key column; the INCLUDE column is no part of it
            "public.keyed_covering": [],
        }
        assert _index_names(target_db.url, "parent") == {"parent_pkey"}
        assert _index_names(target_db.url, "keyed_by_unique") == {"keyed_code"}
        # Planning again (a resumed run) neither drops more nor forgets what it dropped.
        assert _plan_and_defer(s, t) == chosen
        assert {d.table_name for d in deferred.pending(t)} == {
            "public.parent",
            "public.child",
            "public.keyed_by_unique",
        }
        # Nothing is built while ranges are pending.
        assert deferred.rebuild_if_complete(t, "public.parent") == []

        with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
            admin.execute("DELETE FROM partly_loaded")
        _copy_everything(s, t)
        # Verification does not pass a table whose indexes are still waiting.
        parent = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.parent"]
        outcome = verify.indexes(s, t, parent)
        assert not outcome.passed and outcome.severity == verify.ERROR
        assert outcome.details["waiting_to_build"] == chosen["public.parent"]
        built = {name: deferred.rebuild_if_complete(t, name) for name in TABLES}
        assert verify.indexes(s, t, parent).passed
        assert sorted(built["public.parent"]) == chosen["public.parent"]
        assert built["public.child"] == ["child_parent_idx"]
        assert deferred.pending(t) == []

    assert _index_state(target_db.url) == before
    assert_tables_equal(source_db.url, target_db.url, TABLES)


def test_a_unique_index_that_cannot_be_built_names_the_index_not_the_value(pair):
    source_db, target_db = pair
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        # The source lacks the target's unique index and holds a duplicate the target rejects.
        conn.execute("DROP INDEX parent_email_lower")
        conn.execute("UPDATE parent SET email = 'Secret.Person@example.org' WHERE id IN (7, 9)")
    s, t = _connections(source_db, target_db.url)
    with s, t:
        _plan_and_defer(s, t)
        _copy_everything(s, t)  # the load itself succeeds: the unique index is not there yet
        with pytest.raises(deferred.IndexBuildError) as caught:
            deferred.rebuild_if_complete(t, "public.parent")
        message = caught.value.message
        assert "parent_email_lower" in message and "public.parent" in message
        assert "Secret" not in message and "secret" not in message
        # Nothing was built (one transaction) and the record stays for the next attempt.
        assert {d.index_name for d in deferred.pending(t, ["public.parent"])} == {
            "parent_code_key",
            "parent_email_lower",
            "parent_name_idx",
        }
        assert _index_names(target_db.url, "parent") == {"parent_pkey"}

        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute("UPDATE parent SET email = 'other@example.org' WHERE id = 9")
        _copy_everything(s, t)  # catch-up: only the changed range is re-synced
        assert len(deferred.rebuild_if_complete(t, "public.parent")) == 3
        assert "parent_email_lower" in _index_names(target_db.url, "parent")


def test_a_target_bookkept_before_deferral_existed_reads_as_nothing_waiting(pair):
    """`status`, verification and a table's last range on a target whose bookkeeping an
    earlier version made (no deferred_indexes table) see nothing to build, and fail nothing."""
    source_db, target_db = pair
    s, t = _connections(source_db, target_db.url)
    with s, t:
        checkpoints.ensure_bookkeeping(t)
        with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
            admin.execute("DROP TABLE supabase_migration.deferred_indexes")
        info = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.parent"]
        refresh_plan(s, t, info, batch_size=5000)
        _copy_everything(s, t)
        assert deferred.pending(t) == []
        assert deferred.rebuild_if_complete(t, "public.parent") == []
        assert verify.indexes(s, t, info).passed


def test_deferring_takes_the_same_round_trips_however_many_indexes(pair, tmp_path):
    """BEGIN with the lock, what was recorded, LOCK with the emptiness probe, the candidates,
    one INSERT recording them all, one round trip of DROPs, COMMIT: three indexes cost what
    one does, to a target tens of milliseconds away."""
    source_db, target_db = pair
    s, t = _connections(source_db, target_db.url)
    with s, t:
        checkpoints.ensure_bookkeeping(t)
        infos = {i.qualified_name: i for i in read_tables(s, ["public"])}
        waits = {}
        for name in ("public.parent", "public.child"):
            with round_trips(t, tmp_path) as waits[name]:
                dropped = deferred.defer_for_load(t, infos[name])
            assert dropped
        assert len(deferred.pending(t, ["public.parent"])) == 3
        assert waits["public.parent"] == waits["public.child"]
        assert waits["public.parent"] == [
            "Query",
            "Sync",
            "Query",
            "Sync",
            "Sync",
            "Query",
            "Query",
        ]
    assert _index_names(target_db.url, "parent") == {"parent_pkey"}


def test_the_indexes_step_builds_the_other_tables_past_one_that_fails(pair):
    """The migration/indexes step stopped at the first table whose index could not be built
    (its duplicates sort first): every later table's indexes and unique constraints stayed
    missing until that one was fixed. It builds them, and fails naming that one."""
    import dagster as dg

    from supabase_migration.assets import INDEXES_KEY
    from supabase_migration.definitions import build_definitions
    from supabase_migration.manifest import from_catalog
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    source_db, target_db = pair
    made = "CREATE TABLE a_dup (id int PRIMARY KEY, code text CONSTRAINT a_dup_code_key UNIQUE)"
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(made)
    with psycopg.connect(source_db.url, autocommit=True) as conn:  # the source's lacks it
        conn.execute(made.replace(" CONSTRAINT a_dup_code_key UNIQUE", ""))
        conn.execute("INSERT INTO a_dup SELECT g, 'same' FROM generate_series(1, 10) g")
    s, t = _connections(source_db, target_db.url)
    with s, t:
        _plan_and_defer(s, t)
        _copy_everything(s, t)
        manifest = from_catalog(read_tables(s, ["public"]), schemas=["public"])
    step = build_definitions(manifest).get_assets_def(INDEXES_KEY)
    result = dg.materialize(
        [step],
        resources={
            "source": SourceDatabase(url=source_db.url),
            "target": TargetDatabase(url=target_db.url),
        },
        raise_on_error=False,
    )
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    said = failure.step_failure_data.user_failure_data.description  # type: ignore[union-attr]
    assert "a_dup_code_key" in said and "same" not in said, said
    with psycopg.connect(target_db.url) as conn:
        assert [d.index_name for d in deferred.pending(conn, None)] == ["a_dup_code_key"]
    assert "parent_email_lower" in _index_names(target_db.url, "parent")
