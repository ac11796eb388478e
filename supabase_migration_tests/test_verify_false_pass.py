"""Verification passing while the target differs from the source: each case migrates a small
table with the product's own copy path (plan and copy_range), changes one thing on the target
behind the tool's back, and runs the product's verification (`run_verification`, what
`supabase-migrate verify` runs), which must fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from supabase_migration import checkpoints
from supabase_migration import verify as verify_module
from supabase_migration.catalog import read_tables
from supabase_migration.conninfo import DatabaseUrl, parse_database_url
from supabase_migration.copy import CopyOptions, copy_range, replica_mode_allowed
from supabase_migration.manifest import from_catalog
from supabase_migration.planning import refresh_plan
from supabase_migration.report import Report
from supabase_migration.sequences import sync_sequences
from supabase_migration.verify import CHECKSUMS, CONSTRAINTS, SEQUENCES, run_verification

from .test_verify import _connected


@dataclass
class Migrated:
    source_url: DatabaseUrl
    target_url: DatabaseUrl
    source_raw: str
    target_raw: str
    target_admin: str
    manifest: object


def _exec(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


def _migrate(
    source_db,
    target_db,
    schema: str,
    seed: str,
    *,
    target_schema: str | None = None,
    batch_size: int = 500,
) -> Migrated:
    """Schema on both sides (target's own if given), rows on the source, copied with the
    product's copy path, sequences synced."""
    _exec(source_db.url, schema)
    if seed:
        _exec(source_db.url, seed)
    _exec(target_db.url, target_schema if target_schema is not None else schema)
    with _connected(source_db, target_db) as (s, t):
        checkpoints.ensure_bookkeeping(t)
        options = CopyOptions(replica_mode=replica_mode_allowed(t))
        infos = read_tables(s, ["public"])
        for info in infos:
            refresh_plan(s, t, info, batch_size=batch_size)
            for cp in checkpoints.load(t, info.qualified_name):
                copy_range(s, t, info, cp.partition_key, options)
        sync_sequences(s, t, ["public"])
    manifest = from_catalog(infos, schemas=["public"])
    return Migrated(
        parse_database_url(source_db.url, label="source"),
        parse_database_url(target_db.url, label="target"),
        source_db.url,
        target_db.url,
        target_db.admin_url,
        manifest,
    )


def _verify(m: Migrated, sample_size: int = 100) -> Report:
    return run_verification(m.manifest, m.source_url, m.target_url, sample_size=sample_size, seed=7)


def _failed(report: Report) -> dict[tuple[str, str], str]:
    return {(o.table, o.name): o.description for o in report.outcomes if not o.passed}


def _failed_names(report: Report, table: str = "public.t") -> set[str]:
    return {name for (t, name) in _failed(report) if t == table}


def _three_ranges(source_db, target_db) -> Migrated:
    return _migrate(
        source_db,
        target_db,
        "CREATE TABLE t (id int PRIMARY KEY, v text);",
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g;",
        batch_size=1000,
    )


def test_a_row_changed_outside_every_planned_range_fails(source_db, target_db):
    """The checkpoints no longer reach the end of the key space (the last one deleted by
    hand, or an older release's half-written plan). The whole table's checksums differed,
    no range's did, and the check passed."""
    m = _three_ranges(source_db, target_db)
    _exec(
        m.target_admin,
        "DELETE FROM supabase_migration.migration_checkpoints WHERE table_name = 'public.t' "
        "AND batch_number = (SELECT max(batch_number) FROM "
        "supabase_migration.migration_checkpoints WHERE table_name = 'public.t')",
    )
    _exec(m.target_admin, "UPDATE t SET v = 'tampered' WHERE id = 2999")
    failed = _failed(_verify(m, sample_size=5))
    assert list(failed) == [("public.t", CHECKSUMS)], failed
    assert "rows outside every range differ" in failed[("public.t", CHECKSUMS)]


@pytest.mark.parametrize("goes_on", [False, True])
def test_rows_changing_between_the_whole_and_the_ranges_pass_are_not_called_outside(
    source_db, target_db, monkeypatch, goes_on
):
    """A plan covering the key space, and a source row there during the whole table's pass
    and deleted right after it (a queue's row, an app's two writes): every range then
    matched, and the check sent the user to delete the checkpoints and copy the table anew.
    Both passes are read again: a change that stopped passes, one that goes on is named as
    rows changing while read."""
    m = _three_ranges(source_db, target_db)
    real_on_both = verify_module.on_both
    passes: list[str] = []

    def on_both(read, source, target):  # the writer's next statement lands after each pass
        out = real_on_both(read, source, target)
        passes.append(getattr(read, "__name__", ""))
        if passes[-1] == "whole" and passes.count("whole") <= (2 if goes_on else 1):
            _exec(m.source_raw, "DELETE FROM t WHERE id = 9000")
        elif goes_on and passes[-1] == "sums" and passes.count("sums") == 1:
            _exec(m.source_raw, "INSERT INTO t VALUES (9000, 'transient')")
        return out

    _exec(m.source_raw, "INSERT INTO t VALUES (9000, 'transient')")
    monkeypatch.setattr(verify_module, "on_both", on_both)
    failed = _failed(_verify(m, sample_size=5))
    read = [p for p in passes if p in ("whole", "sums")]
    assert read == (["whole", "sums", "whole", "sums"] if goes_on else ["whole", "sums", "whole"])
    if not goes_on:
        assert failed == {}, failed
    else:
        assert list(failed) == [("public.t", CHECKSUMS)], failed
        assert "its rows changed while they were read" in failed[("public.t", CHECKSUMS)]
        assert "outside" not in failed[("public.t", CHECKSUMS)]


GENERATED = (
    "CREATE FUNCTION tax_rate() RETURNS numeric LANGUAGE sql IMMUTABLE AS 'SELECT 0.20'; "
    "CREATE TABLE t (id int PRIMARY KEY, amount numeric, "
    "total numeric GENERATED ALWAYS AS (amount * (1 + tax_rate())) STORED);"
)


def test_a_generated_column_computed_otherwise_on_the_target_fails(source_db, target_db):
    """The copy leaves generated columns to the target, and checksums covered the copied
    columns only: a function the expression calls, defined otherwise on the target, left
    other totals there while every check passed (the expression's text is the same)."""
    m = _migrate(
        source_db,
        target_db,
        GENERATED,
        "INSERT INTO t (id, amount) SELECT g, g FROM generate_series(1, 5000) g;",
    )
    assert _failed(_verify(m)) == {}
    _exec(
        m.target_admin,
        "CREATE OR REPLACE FUNCTION tax_rate() RETURNS numeric LANGUAGE sql IMMUTABLE "
        "AS 'SELECT 0.25'; UPDATE t SET amount = amount WHERE id = 4321;",
    )
    failed = _failed(_verify(m, sample_size=5))
    assert ("public.t", CHECKSUMS) in failed, failed
    assert "rows differ at id=4321" in failed[("public.t", CHECKSUMS)]


@pytest.mark.parametrize(
    ("column", "altered"),
    [
        ("v text", "ALTER TABLE t ALTER v TYPE char(8)"),  # padded on the target, hash drops it
        ("v text", "CREATE EXTENSION IF NOT EXISTS citext; ALTER TABLE t ALTER v TYPE citext"),
        ("v timestamp", "ALTER TABLE t ALTER v TYPE timestamptz"),
        ("v int", "ALTER TABLE t ALTER v TYPE bigint"),
        ("v text", 'ALTER TABLE t ALTER v TYPE text COLLATE "C"'),
        (
            "v level",
            "ALTER TYPE level RENAME TO level_old; CREATE TYPE level AS ENUM ('high', 'low'); "
            "ALTER TABLE t ALTER v TYPE level USING v::text::level",
        ),
    ],
    ids=["char", "citext", "timestamptz", "bigint", "collation", "enum_order"],
)
def test_a_column_type_changed_on_the_target_fails(source_db, target_db, column, altered):
    """These types' hash functions coincide with the source's (int4 and int8, timestamp and
    timestamptz, text and char(n) or citext; an enum's labels whatever their order), so the
    checksums matched while the app reads otherwise: padded text, case-blind comparisons,
    times in the session's zone, another sort order. A collation of the column's own: the
    hashes of deterministic ones are alike, ORDER BY and uniqueness are not."""
    values = {
        "v text": "'user' || g",
        "v timestamp": "timestamp '2024-01-01' + g * interval '1 hour'",
        "v int": "g",
        "v level": "(CASE WHEN g % 2 = 0 THEN 'low' ELSE 'high' END)::level",
    }[column]
    m = _migrate(
        source_db,
        target_db,
        "CREATE TYPE level AS ENUM ('low', 'high'); "
        f"CREATE TABLE t (id int PRIMARY KEY, {column});",
        f"INSERT INTO t SELECT g, {values} FROM generate_series(1, 50) g;",
    )
    assert _failed(_verify(m)) == {}
    _exec(m.target_admin, altered)
    failed = _failed(_verify(m))
    assert ("public.t", CONSTRAINTS) in failed, failed
    assert "v (type)" in failed[("public.t", CONSTRAINTS)], failed


def test_a_sequence_a_default_draws_from_without_owning_it_is_checked(source_db, target_db):
    """`DEFAULT nextval('order_no')` with no OWNED BY: the check followed ownership only, so a
    sequence set back on the target passed while the app's next insert would collide."""
    m = _migrate(
        source_db,
        target_db,
        "CREATE SEQUENCE order_no; "
        "CREATE TABLE t (id bigint PRIMARY KEY DEFAULT nextval('order_no'), v text);",
        "INSERT INTO t (v) SELECT 'v' || g FROM generate_series(1, 100) g;",
    )
    assert _failed(_verify(m)) == {}
    _exec(m.target_admin, "SELECT setval('order_no', 5)")
    failed = _failed(_verify(m))
    assert list(failed) == [("public.t", SEQUENCES)], failed
    assert (
        "public.order_no would hand out 6 but id already reaches 100"
        in failed[("public.t", SEQUENCES)]
    )


def test_an_unlogged_table_or_other_inheritance_on_the_target_fails(source_db, target_db):
    """Every row matches, yet an UNLOGGED table is emptied by the target's next crash and
    missing from its replicas and backups, and a parent read without ONLY (as the app reads
    it) returns its children's rows: a child cut loose, or one only the target has, changes
    what the app sees."""
    m = _migrate(
        source_db,
        target_db,
        "CREATE TABLE parent (id int PRIMARY KEY, v text); "
        "CREATE TABLE child (w text) INHERITS (parent); ALTER TABLE child ADD PRIMARY KEY (id)",
        "INSERT INTO parent SELECT g, 'p' FROM generate_series(1, 50) g; "
        "INSERT INTO child SELECT g, 'c', 'w' FROM generate_series(51, 100) g",
    )
    assert _failed(_verify(m)) == {}
    for change, undo, tables in (
        ("ALTER TABLE child SET UNLOGGED", "ALTER TABLE child SET LOGGED", ["public.child"]),
        (
            "ALTER TABLE child NO INHERIT parent",
            "ALTER TABLE child INHERIT parent",
            ["public.child", "public.parent"],
        ),
        (
            "CREATE TABLE extra () INHERITS (parent); INSERT INTO extra VALUES (999, 'x')",
            "DROP TABLE extra",
            ["public.parent"],
        ),
    ):
        _exec(m.target_raw, change)
        report = _verify(m)
        assert {(t, n) for (t, n) in _failed(report) if n == CONSTRAINTS} == {
            (t, CONSTRAINTS) for t in tables
        }, (change, _failed(report))
        assert not report.passed, change
        _exec(m.target_raw, undo)
    assert _failed(_verify(m)) == {}
