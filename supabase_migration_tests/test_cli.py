"""`supabase-migrate` end to end against the test bed, as a user would run it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from supabase_migration import example_app
from supabase_migration.assets import (
    INTERRUPTED_METADATA,
    SCHEMA_KEY,
    is_interruption,
    table_asset_key,
)
from supabase_migration.catalog import SCHEMA_LOCK_KEY
from supabase_migration.example_app.generate import generate
from supabase_migration.verify import CHECK_NAMES

from .compare import assert_tables_equal
from .testbed import cli_env, require

APP_TABLES = list(example_app.TABLES)


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "supabase_migration.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_from_a_terminal(
    args: list[str], env: dict[str, str], cwd: Path, *, own_group: bool = False
) -> subprocess.Popen[str]:
    """The CLI started as a terminal starts it: SIGINT at its default (a suite started in the
    background by a non-interactive shell, `.ci/run &`, has it ignored, which the CLI would
    inherit), and with `own_group` a process group of its own, as a terminal's job has."""
    return subprocess.Popen(
        [sys.executable, "-m", "supabase_migration.cli", *args],
        env=env,
        cwd=cwd,
        start_new_session=own_group,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def clinic(source_db, target_db, tmp_path: Path):
    """The example app with data on the source; an empty Supabase-like target."""
    example_app.upgrade_head(source_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    generate(source_db.url, 6_000)
    env = cli_env(source_db.url, target_db.url, tmp_path)
    return source_db, target_db, env, tmp_path


def test_run_in_alembic_mode_then_rerun_is_a_no_op(clinic):
    source_db, target_db, env, tmp_path = clinic
    done = cli(
        [
            "run",
            "--schema-mode",
            "alembic",
            "--alembic-config",
            str(example_app.ALEMBIC_INI),
            "--batch-size",
            "500",
            "--workers",
            "2",
        ],
        env,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)
    with psycopg.connect(target_db.url) as conn:
        before = conn.execute(
            "SELECT table_name, partition_key, updated_at FROM "
            "supabase_migration.migration_checkpoints ORDER BY 1, 2"
        ).fetchall()
        assert all(
            r[0] == "completed"
            for r in conn.execute("SELECT status FROM supabase_migration.migration_checkpoints")
        )
    again = cli(["run"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    with psycopg.connect(target_db.url) as conn:
        after = conn.execute(
            "SELECT table_name, partition_key, updated_at FROM "
            "supabase_migration.migration_checkpoints ORDER BY 1, 2"
        ).fetchall()
    assert before == after  # unchanged ranges cost no write on the target

    status = cli(["status", "--json"], env, tmp_path)
    assert status.returncode == 0, status.stderr
    tables = json.loads(status.stdout)["tables"]
    # alembic_version is data too: its row must reach the target and match.
    assert set(tables) == {*APP_TABLES, "public.alembic_version"}
    assert all(t["pending"] == 0 and t["failed"] == 0 for t in tables.values())
    password = target_db.password
    for output in (done.stdout, done.stderr, again.stdout, again.stderr, status.stdout):
        assert password not in output

    # Each range is a materialization in the instance the UI reads; integer bounds are shown,
    # uuid bounds (key values, possibly PHI) are not, nor the range's checksum (a hash of its
    # rows: a range of one row of a narrow table could be found by trying every SSN).
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for table, shown in (("public.providers", True), ("public.patients", False)):
            records = instance.fetch_materializations(table_asset_key(table), limit=100).records
            assert records, f"no materialization of {table}"
            for record in records:
                metadata = record.asset_materialization.metadata
                key_range = str(metadata["key_range"].value)
                assert ("not shown" not in key_range) == shown, (table, key_range)
                assert "checksum" not in metadata, (table, sorted(metadata))
    # No step's raw stdout/stderr is kept in files (dagster.yaml: no compute log capture).
    home = Path(env["DAGSTER_HOME"])
    assert not [p for p in home.rglob("*") if p.suffix in (".out", ".err", ".complete")]

    # `run` ends with the verification report; it passed and says so in every format.
    report = json.loads((tmp_path / "migration-report" / "verification_report.json").read_text())
    assert report["status"] == "PASS"
    assert "verification_report.html" in done.stdout
    assert (tmp_path / "migration-report" / "verification_report.md").exists()


def test_a_run_holds_one_target_connection_per_worker_and_one_more(clinic):
    """What the session pooler's warning counts on (`warn_if_workers_exceed_pool`): Supavisor
    admits at most its pool size of clients per user and database, so a run with --workers N
    must never hold more than N + 1 target connections, through every step and `verify`."""
    _, target_db, env, tmp_path = clinic
    counts: set[int] = set()
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'postgres'"
                ).fetchone()
                counts.add(row[0] if row else 0)
                time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        args = ["run", "--schema-mode", "dump", "--batch-size", "500", "--workers", "3"]
        done = cli(args, env, tmp_path)
    finally:
        stop.set()
        sampler.join()
    assert done.returncode == 0, done.stderr
    assert max(counts) == 4, sorted(counts)  # the workers did run side by side


def test_verify_passes_then_names_the_damage_by_key_only(clinic):
    source_db, target_db, env, tmp_path = clinic
    done = cli(
        ["run", "--no-verify", "--schema-mode", "dump", "--batch-size", "700"], env, tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "migration-report").exists()
    # `run` applied the schema while it opened Dagster, and its schema asset reported that
    # step, once (had the asset applied it again, it would say nothing changed).
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (schema,) = instance.fetch_materializations(SCHEMA_KEY, limit=10).records
        metadata = schema.asset_materialization.metadata
        assert metadata["started_before_run"].value is True
        assert metadata["changed"].value is True and metadata["objects_created"].value > 0

    ok = cli(["verify", "--json", "--seed", "11", "--report", "out"], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "PASS"
    assert (tmp_path / "out" / "verification_report.html").exists()
    # Dagster, loaded beside the checks, put every table's results on its asset's checks.
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        keys = [
            dg.AssetCheckKey(table_asset_key(table), check)
            for table in APP_TABLES
            for check in CHECK_NAMES
        ]
        summary = instance.event_log_storage.get_asset_check_summary_records(keys)
        for key in keys:
            record = summary[key].last_check_execution_record
            assert record is not None and record.evaluation is not None, key
            assert record.evaluation.passed, key

    with psycopg.connect(source_db.url) as conn:
        phone, patient_id = conn.execute(
            "SELECT phone, patient_id FROM patients ORDER BY patient_id OFFSET 12 LIMIT 1"
        ).fetchone()
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("UPDATE patients SET phone = '555-1212' WHERE patient_id = %s", [patient_id])
        conn.execute(
            "DELETE FROM prescriptions WHERE prescription_id = "
            "(SELECT min(prescription_id) FROM prescriptions)"
        )
    bad = cli(["verify", "--seed", "11"], env, tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.startswith("Verification FAILED: ") and bad.stderr.endswith(
        "ERROR check(s) failed; `supabase-migrate run --repair` re-syncs the ranges that "
        "differ; see migration-report/verification_report.html.\n"
    ), bad.stderr
    failed = json.loads((tmp_path / "migration-report" / "verification_report.json").read_text())
    assert failed["status"] == "FAIL"
    text = bad.stdout + (tmp_path / "migration-report" / "verification_report.html").read_text()
    assert "public.patients" in text and "public.prescriptions" in text
    assert str(patient_id) in text  # the row is named by its key...
    assert phone not in text and "555-1212" not in text  # ...never by its values
    assert target_db.password not in bad.stdout + bad.stderr

    # The source did not change, so a plain `run` has nothing to copy; --repair re-syncs the
    # ranges the report names, and the run's own verification then passes.
    repaired = cli(["run", "--repair", "--seed", "11"], env, tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)

    only = cli(["verify", "--tables", "public.providers"], env, tmp_path)
    assert only.returncode == 0, only.stderr
    # a report of some tables repairs only those: --repair says so
    narrowed = cli(["run", "--repair", "--no-verify"], env, tmp_path)
    assert narrowed.returncode == 0, narrowed.stderr
    assert "That report checked 1 of " in narrowed.stdout + narrowed.stderr
    unknown = cli(["verify", "--tables", "public.nope"], env, tmp_path)
    assert unknown.returncode == 2 and "public.nope" in unknown.stderr


def test_unusable_dagster_home_is_one_sentence(clinic):
    """DAGSTER_HOME naming a file, or holding a broken dagster.yaml: exit 2 and one sentence,
    from `run` before anything is copied and from `verify` (which opens it in the background)."""
    _, target_db, env, tmp_path = clinic
    not_a_dir = tmp_path / "home-is-a-file"
    not_a_dir.write_text("")
    broken = tmp_path / "broken-home"
    broken.mkdir()
    (broken / "dagster.yaml").write_text("event_log_storage: [\n")
    unusable = ((not_a_dir, "not a usable directory"), (broken, "dagster.yaml"))

    def refused(command: list[str]) -> None:
        for home, expected in unusable:
            done = cli(command, {**env, "DAGSTER_HOME": str(home)}, tmp_path)
            assert done.returncode == 2, done.stderr
            assert expected in done.stderr and str(home) in done.stderr
            assert "Traceback" not in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    refused(["run", "--schema-mode", "dump"])
    with psycopg.connect(target_db.url) as conn:
        exists = conn.execute("SELECT to_regclass('public.patients')").fetchone()[0]
    assert exists is None  # `run` stopped before its schema step

    # A storage module that is not installed stops `run` before its schema step too.
    unloadable = tmp_path / "unloadable-home"
    unloadable.mkdir()
    (unloadable / "dagster.yaml").write_text(
        "run_storage:\n  module: no_such_module\n  class: RunStorage\n  config: {}\n"
    )
    done = cli(["run", "--schema-mode", "dump"], {**env, "DAGSTER_HOME": str(unloadable)}, tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "dagster.yaml" in line and str(unloadable) in line
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.patients')").fetchone()[0] is None

    # `verify` opens the home in the background, on a target that has the tables
    assert cli(["run", "--no-verify"], env, tmp_path).returncode == 0
    refused(["verify"])
    # and a report directory that cannot be written is one sentence too
    done = cli(["verify", "--report", "/proc/no-report-here"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "could not be written" in done.stderr and done.stderr.count("\n") == 1


def test_source_role_without_select_on_a_table_is_one_sentence(clinic):
    """`plan` reads every table's key ranges on its own connections: a table the source role
    may not read is named in one sentence (exit 2), with neither password nor traceback."""
    source_db, _, env, tmp_path = clinic
    password = "Rd-pw-8471"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE reader LOGIN PASSWORD '{password}'")
        conn.execute("GRANT USAGE ON SCHEMA public TO reader")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
        conn.execute("REVOKE SELECT ON patients FROM reader")
    assert "://postgres@" in source_db.url
    reader_url = source_db.url.replace("://postgres@", f"://reader:{password}@", 1)
    done = cli(["plan"], {**env, "SOURCE_DATABASE_URL": reader_url}, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and password not in done.stderr + done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error:") and "public.patients" in line
    assert "insufficient_privilege" in line


def test_verify_and_status_start_without_importing_dagster_or_sqlalchemy():
    """`verify` hashes rows while Dagster loads in the background: nothing on its path may
    import Dagster up front (about two seconds of start-up), nor SQLAlchemy (0.3-0.4 s), which
    only engines need. `status` reads the bookkeeping alone: it never needs them."""
    code = (
        "import sys, supabase_migration.cli, supabase_migration.verify_command, "
        "supabase_migration.status_command; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'sqlalchemy')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_catch_up_sync_brings_updates_inserts_and_deletes(clinic):
    source_db, target_db, env, tmp_path = clinic
    first = cli(["run", "--schema-mode", "dump", "--batch-size", "1000"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE patients SET phone = '555-0000' WHERE patient_id IN "
            "(SELECT patient_id FROM patients ORDER BY patient_id LIMIT 3)"
        )
        conn.execute(
            "DELETE FROM vital_readings WHERE ctid IN (SELECT ctid FROM vital_readings LIMIT 5)"
        )
        conn.execute("DELETE FROM prescriptions WHERE prescription_id % 50 = 0")
        conn.execute(
            "INSERT INTO providers (npi, full_name, specialty) "
            "VALUES ('9999999999', 'New Provider', 'cardiology')"
        )
    second = cli(["run"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        # the application's next insert must not collide with copied ids
        conn.execute(
            "INSERT INTO providers (npi, full_name, specialty) "
            "VALUES ('8888888888', 'After Cutover', 'cardiology')"
        )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--target", "postgresql://postgres:pw@127.0.0.1:1/postgres"], "target"),
        (["run", "--source", "not a url at all"], "source"),
        (["run", "--batch-size", "0"], "batch-size"),
        (["run", "--target", "postgresql://postgres:wrong@localhost:{port}/{db}"], "password"),
        (
            ["verify", "--target", "postgresql://postgres@localhost:{port}/{db}?sslmode=disable"],
            "ssl",
        ),
        (["run", "--source", "postgresql://nobody@db.invalid.example:5432/app"], "source"),
        (["frobnicate"], "invalid choice"),
        (["plan", "--manifest", "{tmp}"], "directory"),
        (["plan", "--include", "public.nomatch*"], "public.nomatch*"),
        # a misspelt exclusion would migrate the table meant to stay behind
        (["plan", "--exclude", "public.patient"], "--exclude public.patient matches none"),
        (["run", "--repair", "--report", "{tmp}/none"], "no verification report"),
        (["plan", "--schema-mode", "alembic", "--alembic-config", "{tmp}/no.ini"], "alembic"),
        (["run", "--worker", "2"], "unrecognized arguments: --worker"),  # not --workers
        (["verify", "--tables", "public.nope"], "public.nope is not in"),
        # past what PostgreSQL takes: they failed as a migration (exit 1), or were written
        (["run", "--batch-size", "99999999999999999999999"], "from 1 to 2,147,483,647"),
        (["verify", "--sample-size", "99999999999999999999"], "--sample-size"),
        (["verify", "--seed", "99999999999999999999999"], "--seed"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(clinic, args, needle):
    _, target_db, env, tmp_path = clinic
    where = psycopg.conninfo.conninfo_to_dict(target_db.url)
    args = [a.format(port=where["port"], db=where["dbname"], tmp=tmp_path) for a in args]
    done = cli(args, env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1, done.stderr
    assert needle in lines[0].lower()
    assert "Traceback" not in done.stderr
    assert target_db.password not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("variable", "value", "sentence"),
    [
        # a URL pasted where the endpoint goes: not echoed
        ("SUPABASE_DB_ENDPOINT", "{url}", "An endpoint setting (SUPABASE_DB_ENDPOINT, or a"),
        ("SUPABASE_MIGRATION_POLICY_FILE", "{tmp}/nope.sql", "The policy file"),
    ],
)
def test_a_bad_setting_stops_the_run_before_it_writes(clinic, variable, value, sentence):
    _, target_db, env, tmp_path = clinic
    env = {**env, variable: value.format(url=target_db.url, tmp=tmp_path)}
    done = cli(["run"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {sentence}"), done.stderr
    assert done.stderr.count("\n") == 1 and target_db.password not in done.stderr
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('supabase_migration')").fetchone() == (None,)


def test_schema_mode_none_names_a_column_of_another_type_before_copying(clinic):
    _, target_db, env, tmp_path = clinic
    example_app.upgrade_head(target_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE patients ALTER COLUMN phone TYPE bigint USING NULL")
    done = cli(["run", "--schema-mode", "none"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        "error: Preflight stopped the migration before anything was written: Column "
        "public.patients.phone is bigint on the target but text on the source"
    ), done.stderr
    assert done.stderr.count("\n") == 1
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)
        assert conn.execute("SELECT to_regnamespace('supabase_migration')").fetchone() == (None,)


@pytest.mark.parametrize(
    ("content", "sentence"),
    [
        ('{"target_identity": "postgres@db.elsewhere.example:5432/postgres"}', "another target"),
        ("[1, 2]", "is not a verification report"),
        ("{not json", "is not JSON"),
    ],
)
def test_repair_needs_a_report_on_this_target(clinic, content, sentence):
    *_, env, tmp_path = clinic
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "verification_report.json").write_text(content)
    done = cli(["run", "--repair", "--report", "old"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert sentence in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_alembic_mode_names_a_source_column_the_migrations_do_not_have(clinic):
    """A source changed by hand (or off head): the upgraded tables would not take its rows, so
    the upgrade is rolled back before it commits; on a target already at head, the same
    sentence stops the run before any row is copied."""
    source_db, target_db, env, tmp_path = clinic
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE patients ALTER COLUMN phone TYPE bigint USING NULL")
        conn.execute("ALTER TABLE patients ALTER COLUMN allergies TYPE bigint[] USING NULL")
    argv = ["run", "--schema-mode", "alembic", "--alembic-config", str(example_app.ALEMBIC_INI)]
    misfits = (
        "Column public.patients.phone is text on the target but bigint on the source; make "
        "them the same (the copy moves rows as they are) (and 1 more error: "
        "public.patients.allergies).\n"
    )
    done = cli(argv, env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: The Alembic upgrade would leave tables the source's rows do not fit, so it was "
        f"rolled back: {misfits}"
    ), done.stderr
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT to_regclass('public.patients'), to_regclass('public.alembic_version')"
        ).fetchone() == (None, None)

    example_app.upgrade_head(target_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    done = cli(argv, env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: The target's tables, at the source's Alembic revision, do not fit its rows: "
        f"{misfits}"
    ), done.stderr
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)


def test_a_migration_that_fails_is_one_sentence_and_exit_2(source_db, target_db, tmp_path):
    """The project's migration is the user's to fix, as any bad input: exit code 2, the
    revision named, nothing left on the target."""
    from .test_schema_apply import COOKBOOK_ENV, _alembic_project

    ini = _alembic_project(
        tmp_path / "app",
        COOKBOOK_ENV,
        [("h1", "CREATE TABLE notes (id int PRIMARY KEY)"), ("h2", "SELECT no_such_function()")],
    )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY)")
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli(["run", "--schema-mode", "alembic", "--alembic-config", str(ini)], env, tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: Alembic's upgrade failed at revision h2 on the target"), line
    assert "undefined_function" in line and "Traceback" not in done.stderr
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.notes')").fetchone() == (None,)


def test_a_missing_alembic_config_is_refused_before_it_changes_the_manifest(clinic):
    *_, env, tmp_path = clinic
    assert cli(["init"], env, tmp_path).returncode == 0
    written = (tmp_path / "migration.yaml").read_text()
    done = cli(["plan", "--schema-mode", "alembic", "--alembic-config", "no.ini"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "error: The Alembic configuration no.ini does not exist.\n"
    assert (tmp_path / "migration.yaml").read_text() == written
    # Without one at all: refused before schema_mode alembic sticks in the manifest, where
    # every later plain `run` failed on it.
    done = cli(["plan", "--schema-mode", "alembic"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: Schema mode alembic needs --alembic-config PATH to the alembic.ini.\n"
    )
    assert (tmp_path / "migration.yaml").read_text() == written


def test_filters_rewrite_the_manifest_keeping_its_exposed_schemas_and_batch_sizes(clinic):
    """--include/--exclude/--schemas write the manifest again from the catalog; what only the
    manifest holds stays: an extra exposed schema (else its tables would get no row level
    security) and a table's own batch size. A schema name the source lacks is refused before
    the reviewed manifest is replaced by an empty one."""
    source_db, target_db, env, tmp_path = clinic
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA api; CREATE TABLE api.contacts (id int PRIMARY KEY, label text); "
            "INSERT INTO api.contacts SELECT g, 'c' || g FROM generate_series(1, 50) g; "
            "CREATE SCHEMA scratch; CREATE TABLE scratch.notes (id int PRIMARY KEY)"
        )
    assert cli(["init", "--schemas", "public,api"], env, tmp_path).returncode == 0
    path = tmp_path / "migration.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["exposed_schemas"] = ["public", "api"]
    doc["tables"]["public.appointments"]["batch_size"] = 250
    path.write_text(yaml.safe_dump(doc, sort_keys=False))

    done = cli(["plan", "--schemas", "public,nosuchschema"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: The source has no schema nosuchschema; check the names given to --schemas (its "
        "schemas with tables: api, public, scratch).\n"
    )
    assert yaml.safe_load(path.read_text()) == doc

    done = cli(["run", "--exclude", "public.alembic_version"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    rewritten = yaml.safe_load(path.read_text())
    assert rewritten["schemas"] == ["public", "api"]  # not scratch, which was not chosen
    assert rewritten["exposed_schemas"] == ["public", "api"]
    assert rewritten["tables"]["public.appointments"]["batch_size"] == 250
    assert "public.alembic_version" not in rewritten["tables"]
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'api.contacts'::regclass"
        ).fetchone() == (True,)
        ranges = conn.execute(
            "SELECT count(*) FROM supabase_migration.migration_checkpoints "
            "WHERE table_name = 'public.appointments'"
        ).fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM public.appointments").fetchone()[0]
    assert ranges >= rows // 250, (ranges, rows)
    # `init` itself writes the manifest from every schema of the source again
    assert cli(["init"], env, tmp_path).returncode == 0
    assert yaml.safe_load(path.read_text())["schemas"] == ["api", "public", "scratch"]
    # a schema whose name has a dot cannot be told from schema.table: refused by name, and
    # left out with --schemas
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "app.v2"; CREATE TABLE "app.v2".t (id int PRIMARY KEY)')
    done = cli(["init"], env, tmp_path)
    assert done.returncode == 2 and "'app.v2' has a dot in its name" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
    assert cli(["init", "--schemas", "public,api"], env, tmp_path).returncode == 0


def test_a_malformed_alembic_config_is_one_sentence_that_never_quotes_it(clinic):
    """configparser's errors quote the line, and an alembic.ini's first line is often a URL
    with its password: named by line number only, in the output and in Dagster's records."""
    *_, env, tmp_path = clinic
    secret = "TopSecretPw123"
    ini = tmp_path / "bad.ini"
    ini.write_text(
        f"sqlalchemy.url = postgresql://app:{secret}@db.example/clinic\n"
        f"[alembic]\nscript_location = {example_app.ALEMBIC_INI.parent / 'migrations'}\n"
    )
    sentence = (
        f"error: The Alembic configuration {ini} is not a valid ini file (a line before any "
        "[section] header, line 1); fix it as `alembic` itself would need.\n"
    )
    for command in ("plan", "run"):
        argv = [command, "--schema-mode", "alembic", "--alembic-config", str(ini)]
        done = cli(argv, env, tmp_path, timeout=120)
        assert (done.returncode, done.stderr) == (2, sentence), done.stderr
        assert secret not in done.stdout
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == [ini], leaked

    # a '%' configparser cannot interpolate: found before the run, not by Alembic mid-step
    ini.write_text(ini.read_text().replace("sqlalchemy.url", "# sqlalchemy.url", 1))
    ini.write_text(ini.read_text() + "file_template = %%(rev)s_%slug\n")
    done = cli(["run", "--schema-mode", "alembic", "--alembic-config", str(ini)], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "(a '%' it cannot interpolate in [alembic] file_template;" in done.stderr


def test_a_target_schema_this_tool_did_not_make_stops_with_exit_code_2(clinic):
    """Both ask the user to choose (the wrong target, the wrong mode, or a schema change to
    apply by hand): bad input, exit code 2, and nothing written."""
    source_db, target_db, env, tmp_path = clinic
    example_app.upgrade_head(target_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    plan = cli(["plan", "--schema-mode", "dump"], env, tmp_path, timeout=120)
    assert plan.returncode == 2 and "| target-objects | public |" in plan.stdout, plan.stdout
    done = cli(["run", "--schema-mode", "dump"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        "error: Preflight stopped the migration before anything was written: The target "
        "already has 1"
    ), done.stderr
    assert "rerun with --schema-mode none" in done.stderr and done.stderr.count("\n") == 1
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM patients").fetchone() == (0,)
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        conn.execute("GRANT ALL ON SCHEMA public TO postgres")

    assert cli(["run", "--schema-mode", "dump"], env, tmp_path, timeout=300).returncode == 0
    changes = [
        "CREATE FUNCTION public.greeting() RETURNS text LANGUAGE sql AS 'SELECT 1::text'",
        "ALTER TABLE patients ADD COLUMN nickname text",
    ]
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(changes[0])
    done = cli(["run"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: The source schema changed since dump mode"), done.stderr
    # A table or column the source gained is found before the run (`plan` says it), not by
    # the step once the run has started.
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(changes[1])
    plan = cli(["plan"], env, tmp_path, timeout=120)
    assert plan.returncode == 2 and "| schema-changed | tables |" in plan.stdout, plan.stdout
    done = cli(["run"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        "error: Preflight stopped the migration before anything was written: The target lacks "
        "public.patients.nickname, which the source has, and dump mode, which set up the "
        "target's schema on "
    ), done.stderr
    assert "rerun with --schema-mode none" in done.stderr and done.stderr.count("\n") == 1
    with psycopg.connect(target_db.url, autocommit=True) as conn:  # as the sentence says
        for change in changes:
            conn.execute(change)
    done = cli(["run", "--schema-mode", "none"], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr

    # The sentences' other way: start over, which dropping the tables alone does not do.
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE patients ADD COLUMN pronouns text")
    done = cli(["run", "--schema-mode", "dump"], env, tmp_path, timeout=120)
    assert done.returncode == 2 and "or, to start over, drop what it created" in done.stderr
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        conn.execute("GRANT ALL ON SCHEMA public TO postgres")
    done = cli(["run", "--schema-mode", "dump"], env, tmp_path, timeout=120)
    assert done.returncode == 2, "the bookkeeping still records the earlier dump"
    with psycopg.connect(target_db.url, autocommit=True) as conn:  # the login made it
        conn.execute("DROP SCHEMA supabase_migration CASCADE")
    done = cli(["run", "--schema-mode", "dump"], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_tables_equal(source_db.url, target_db.url, ["public.patients"])


def test_verify_and_resume_before_any_run_say_so_in_one_sentence(clinic):
    """Not a report of every check failing, nor a first run started by `resume` (perhaps
    into the wrong project): one sentence each, exit code 2, nothing written on the target."""
    _, target_db, env, tmp_path = clinic
    done = cli(["verify"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: The target has none of the 7 tables to verify (public.alembic_version, "
        "public.appointments, public.lab_results and 4 more); run `supabase-migrate run` first, or "
        "check that SUPABASE_DB_URL names its database.\n"
    )
    assert not (tmp_path / "migration-report").exists()
    done = cli(["resume"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: Nothing to resume: no run has planned this target yet; start with "
        "`supabase-migrate run`, or check that SUPABASE_DB_URL names the right database.\n"
    )
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT to_regclass('public.patients'), "
            "to_regnamespace('supabase_migration') IS NOT NULL"
        ).fetchone() == (None, False)


# A provider the source does not have: the target's own row.
NOT_THE_SOURCES = (
    "INSERT INTO providers (provider_id, npi, full_name, specialty) OVERRIDING SYSTEM VALUE "
    "VALUES (999999, '9999999999', 'Kept Here', 'pediatrics')"
)


def test_rows_on_the_target_this_tool_did_not_copy_are_refused_not_deleted(clinic):
    """Schema mode none into tables someone made and filled: a table's first copy would
    delete the rows the source lacks, so they stop the run (exit 2) before anything is
    written, until the user empties the table. Rows whose keys the source has too (lookup rows
    the same migrations seeded, Alembic's version) are not refused: nothing would be lost."""
    source_db, target_db, env, tmp_path = clinic
    example_app.upgrade_head(target_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        seeded = conn.execute("SELECT * FROM providers ORDER BY provider_id LIMIT 2").fetchall()
    # the source's own rows, as its migrations could seed them
    with psycopg.connect(target_db.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO providers OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s, %s, %s)",
            seeded,
        )
    plan = cli(["plan", "--schema-mode", "none"], env, tmp_path, timeout=120)
    assert plan.returncode == 0 and "target-rows" not in plan.stdout, plan.stdout
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(NOT_THE_SOURCES)
    done = cli(["run", "--schema-mode", "none"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: Preflight stopped the migration before anything was written: public.providers "
        "on the target already holds rows this tool did not copy, and its first copy would "
        "delete those the source lacks; empty it on the target if that is what you want, or "
        "check that SUPABASE_DB_URL names the right project.\n"
    ), done.stderr
    plan = cli(["plan"], env, tmp_path, timeout=120)
    assert "| target-rows | public.providers |" in plan.stdout
    assert "| target-rows | public.alembic_version |" not in plan.stdout
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM providers").fetchone() == (3,)
        assert conn.execute("SELECT to_regnamespace('supabase_migration')").fetchone() == (None,)
        conn.execute("DELETE FROM providers WHERE npi = '9999999999'")
    done = cli(["run"], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)
    # once a run has planned the target its tables are trusted (their rows are ours)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(NOT_THE_SOURCES)
    plan = cli(["plan"], env, tmp_path, timeout=120)
    assert plan.returncode == 0 and "target-rows" not in plan.stdout, plan.stdout


def test_a_target_key_the_source_type_cannot_hold_is_refused_unquoted(
    source_db, target_db, tmp_path
):
    """A key on the target that the source's type cannot even read (an enum label only the
    target has): its rows would be deleted, and the source's error would quote the value."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TYPE ward AS ENUM ('north'); CREATE TABLE bed (w ward PRIMARY KEY)")
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TYPE ward AS ENUM ('north', 'secret-ward'); "
            "CREATE TABLE bed (w ward PRIMARY KEY); INSERT INTO bed VALUES ('secret-ward')"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli(["plan", "--schema-mode", "none"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "| target-rows | public.bed |" in done.stdout
    assert "secret-ward" not in done.stdout + done.stderr


def test_a_foreign_key_parent_left_out_stops_the_run_before_any_row(clinic):
    """Its children's rows would break their foreign keys on the target and verification
    could never pass: an error of preflight, not orphans found after the copy."""
    source_db, target_db, env, tmp_path = clinic
    done = cli(["run", "--exclude", "public.patients"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    error = done.stderr[done.stderr.index("error: ") :]  # after the note on the filters given
    assert error.startswith(
        "error: Preflight stopped the migration before anything was written: "
        "public.appointments has a foreign key to public.patients, which is not migrated, so "
        "its copied rows would break it on the target; migrate public.patients too, or leave "
        "public.appointments out as well (and "
    ), done.stderr
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.appointments')").fetchone() == (None,)
    left_out = "public.patients,public.appointments,public.prescriptions,public.lab_results"
    # a glob matching no table now is kept for tables that come and go (a name is refused)
    done = cli(["plan", "--exclude", left_out + ",public.tmp_*"], env, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parent-left-out" not in done.stdout, done.stdout

    # a parent in a schema not migrated is the target's to have: not this check's
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA ref; CREATE TABLE ref.codes (code text PRIMARY KEY); "
            "CREATE TABLE public.coded (id int PRIMARY KEY, code text REFERENCES ref.codes)"
        )
    done = cli(["plan", "--schemas", "public"], env, tmp_path, timeout=120)
    assert "parent-left-out" not in done.stdout, done.stdout


def _run_in_ranges(env: dict[str, str], tmp_path: Path) -> None:
    """`run` in ranges of 100 rows, which must succeed."""
    done = cli(["run", "--batch-size", "100"], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def _copied_then_caught_up(source_db, target_db, tmp_path: Path, tables: str, change: str):
    """`tables` made on the source and run, then `change` made there and run again."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(tables)
    env = cli_env(source_db.url, target_db.url, tmp_path)
    _run_in_ranges(env, tmp_path)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(change)
    _run_in_ranges(env, tmp_path)
    return env


def test_a_parents_row_equal_to_a_childs_is_still_copied(source_db, target_db, tmp_path):
    """A parent by inheritance and a child holding an equal row (a history child): the
    catch-up's lookup of unchanged rows must read the parent's own rows only, or the parent's
    new row is taken as there already and never copied."""
    _copied_then_caught_up(
        source_db,
        target_db,
        tmp_path,
        "CREATE TABLE par (id int PRIMARY KEY, v text); CREATE TABLE chi () INHERITS (par); "
        "INSERT INTO par SELECT g, 'v' || g FROM generate_series(1, 300) g WHERE g <> 7; "
        "INSERT INTO chi VALUES (7, 'v7')",
        "INSERT INTO par VALUES (7, 'v7')",
    )
    assert_tables_equal(source_db.url, target_db.url, ["public.par", "public.chi"])


def test_rows_an_update_could_not_write_are_caught_up(source_db, target_db, tmp_path):
    """A changed row is replaced, not updated, where an UPDATE could not write it: an identity
    column GENERATED ALWAYS beside a text key (an UPDATE may set it only to DEFAULT); a key
    changed to a value its type calls equal (citext, numeric 7.0 -> 7.00: ON CONFLICT found the
    old key and kept it); an xml value that only gained its declaration (the row's output text
    hid it); a key on a stored generated column (now no key of ranges); a table of a hundred
    arrays (one argument each to a function taking a hundred at most); a table with no columns.
    Each was a run that failed or could never verify, --repair included. And trailing blanks
    added to an unbounded bpchar, which its cast to text (hashed before) drops: the run and
    verify passed with the target different."""
    arrays = ", ".join(f"a{i} int[]" for i in range(100))
    _copied_then_caught_up(
        source_db,
        target_db,
        tmp_path,
        "CREATE EXTENSION citext; "
        "CREATE TABLE ev (code text PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v text); "
        "INSERT INTO ev (code, v) SELECT 'c' || g, 'v' FROM generate_series(1, 300) g; "
        "CREATE TABLE users (email citext PRIMARY KEY, v int); "
        "INSERT INTO users SELECT 'User' || g || '@x.org', g FROM generate_series(1, 300) g; "
        "CREATE TABLE amounts (amount numeric PRIMARY KEY); "
        "INSERT INTO amounts SELECT (g || '.0')::numeric FROM generate_series(1, 300) g; "
        "CREATE TABLE doc (id int PRIMARY KEY, x xml); "
        "INSERT INTO doc SELECT g, ('<a>' || g || '</a>')::xml FROM generate_series(1, 300) g; "
        "CREATE TABLE gk (email text NOT NULL, norm text GENERATED ALWAYS AS (lower(email)) "
        "STORED PRIMARY KEY, v text); "
        "INSERT INTO gk (email, v) SELECT 'U' || g || '@x', 'v' FROM generate_series(1, 300) g; "
        f"CREATE TABLE wide (id int PRIMARY KEY, {arrays}); "
        "INSERT INTO wide (id, a0, a99) "
        "SELECT g, '{{1}}', '[0:0]={2}' FROM generate_series(1, 3) g; "
        "CREATE TABLE nocols (); INSERT INTO nocols SELECT FROM generate_series(1, 5); "
        "CREATE TABLE bp (id int PRIMARY KEY, c bpchar, f char(4)); "
        "INSERT INTO bp SELECT g, 'ab', 'cd' FROM generate_series(1, 300) g",
        "UPDATE ev SET v = 'changed' WHERE code = 'c7'; "
        "UPDATE users SET email = 'user7@x.org' WHERE email = 'User7@x.org'; "
        "UPDATE amounts SET amount = 7.00 WHERE amount = 7; "
        'UPDATE doc SET x = \'<?xml version="1.0" encoding="UTF-8"?><a>7</a>\' WHERE id = 7; '
        "UPDATE gk SET v = 'changed' WHERE norm = 'u7@x'; "
        "UPDATE wide SET a50 = '{{3,4}}' WHERE id = 2; "
        "INSERT INTO nocols SELECT FROM generate_series(1, 2); "
        "UPDATE bp SET c = 'ab   ' WHERE id = 7",
    )
    tables = ["ev", "users", "amounts", "doc", "gk", "wide", "nocols", "bp"]
    assert_tables_equal(source_db.url, target_db.url, [f"public.{t}" for t in tables])
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert (
            conn.execute("SELECT x::text FROM doc WHERE id = 7").fetchone()[0].startswith("<?xml")
        )


def test_unique_values_swapped_across_ranges_are_caught_up(source_db, target_db, tmp_path):
    """Two patients' MRNs swapped, in different ranges of 100: the first range's upsert would
    collide with the other range's row; it takes that row aside and re-syncs it, and `run`
    verifies the result."""
    env = _copied_then_caught_up(
        source_db,
        target_db,
        tmp_path,
        "CREATE TABLE pat (id int PRIMARY KEY, mrn text NOT NULL UNIQUE); "
        "INSERT INTO pat SELECT g, 'M' || g FROM generate_series(1, 500) g",
        "UPDATE pat SET mrn = 'free' WHERE id = 5; UPDATE pat SET mrn = 'M5' WHERE id = 450; "
        "UPDATE pat SET mrn = 'M450' WHERE id = 5",
    )
    assert_tables_equal(source_db.url, target_db.url, ["public.pat"])
    # The run's log tells the take-aside by count and partitions, never by a key or value.
    messages = _logged(env)
    told = [m for m in messages if "holding a unique value" in m]
    note = (
        "Partition {} of public.pat: 1 row holding a unique value this range's rows now have "
        "was re-synced from the same snapshot in this range's transaction; partition {} is "
        "copied again."
    )
    # Whichever of the two ranges is copied first takes the other's row aside.
    assert told in ([note.format("000000", "000004")], [note.format("000004", "000000")])
    assert not [m for m in messages if "M5" in m or "M450" in m or "450" in m]


def _logged(env: dict[str, str]) -> list[str]:
    """Every message of every run in the CLI's Dagster instance."""
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        return [
            entry.message
            for record in instance.get_run_records()
            for entry in instance.all_logs(record.dagster_run.run_id)
        ]


def test_a_unique_position_shifted_up_is_caught_up_in_one_run(source_db, target_db, tmp_path):
    """Every row's unique position + 1 (an item inserted at the top of an ordered list): each
    range's last row wants the value the next range's first row still holds, a chain through
    every later row. The ranges that collide are tried again once the others are copied, last
    first, so one run converges (each run completed one more range)."""
    _copied_then_caught_up(
        source_db,
        target_db,
        tmp_path,
        "CREATE TABLE item (id int PRIMARY KEY, pos int NOT NULL UNIQUE); "
        "INSERT INTO item SELECT g, g FROM generate_series(1, 500) g",
        "UPDATE item SET pos = -pos - 1; UPDATE item SET pos = -pos",
    )
    assert_tables_equal(source_db.url, target_db.url, ["public.item"])


def test_a_range_whose_row_was_taken_aside_is_copied_in_the_same_run(
    source_db, target_db, tmp_path
):
    """A value the source now gives row 5 is held on the target by row 450 (changed there by
    hand), whose range the source did not change: the first range takes row 450 aside and
    marks its range to be copied again, which the same run does; it ends verified."""
    env = _patients_with_mrns(source_db, target_db, tmp_path, 500)
    _run_in_ranges(env, tmp_path)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE pat SET mrn = 'X' WHERE id = 5")
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("UPDATE pat SET mrn = 'X' WHERE id = 450")
    _run_in_ranges(env, tmp_path)
    assert_tables_equal(source_db.url, target_db.url, ["public.pat"])


def test_a_ui_run_copies_the_ranges_its_take_aside_marked_outside_its_partitions(
    source_db, target_db, tmp_path, monkeypatch
):
    """A partition materialized in the UI (a backfill of some ranges) whose range takes aside
    a row of a range outside the run: that range is marked to be copied again, so the same
    step copies it and materializes it too (it stayed pending while the UI showed it
    materialized). Unless another run holds it: that one copies it, and this run succeeds."""
    from supabase_migration import assets
    from supabase_migration import manifest as manifest_io
    from supabase_migration.definitions import build_definitions
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    env = _patients_with_mrns(source_db, target_db, tmp_path, 500)
    _run_in_ranges(env, tmp_path)
    asset = build_definitions(manifest_io.read(tmp_path / "migration.yaml")).get_assets_def(
        table_asset_key("public.pat")
    )
    resources = {
        "source": SourceDatabase(url=source_db.url),
        "target": TargetDatabase(url=target_db.url),
    }

    def swapped_then_first_range_materialized(a: int, b: int) -> tuple[list[str], list[str]]:
        """MRNs of rows a (first range) and b (last) swapped on the source, then partition
        000000 materialized as the UI does; the partitions materialized, and those pending."""
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute(
                f"UPDATE pat SET mrn = 'free' WHERE id = {a}; "
                f"UPDATE pat SET mrn = 'M{a}' WHERE id = {b}; "
                f"UPDATE pat SET mrn = 'M{b}' WHERE id = {a}"
            )
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            result = dg.materialize(
                [asset], instance=instance, resources=resources, partition_key="000000"
            )
            assert result.success
            logs = [e.message for e in instance.all_logs(result.run_id)]
        assert not [m for m in logs if "M450" in m or "M460" in m]
        # a range another run holds is that run's to copy: said so, not "stays pending"
        assert not [m for m in logs if "stays pending" in m]
        held_by_other.extend(m for m in logs if "being copied by another run" in m)
        with psycopg.connect(target_db.url) as conn:
            pending = conn.execute(
                "SELECT partition_key FROM supabase_migration.migration_checkpoints "
                "WHERE table_name = 'public.pat' AND status <> 'completed'"
            ).fetchall()
        materialized = [m.partition for m in result.asset_materializations_for_node(asset.op.name)]
        return materialized, [p for (p,) in pending]

    # Another run takes partition 000004 once this one has marked it: left to that run.
    held_by_other: list[str] = []
    original = assets._taken_aside_note
    with psycopg.connect(target_db.url) as other_run:

        def noted_then_taken(*args):
            other_run.execute(
                "SELECT 1 FROM supabase_migration.migration_checkpoints WHERE table_name = "
                "'public.pat' AND partition_key = '000004' FOR UPDATE"
            )
            return original(*args)

        monkeypatch.setattr(assets, "_taken_aside_note", noted_then_taken)
        assert swapped_then_first_range_materialized(5, 450) == (["000000"], ["000004"])
        assert len(held_by_other) == 1, held_by_other
        other_run.rollback()
    monkeypatch.setattr(assets, "_taken_aside_note", original)
    assert swapped_then_first_range_materialized(6, 460) == (["000000", "000004"], [])
    assert_tables_equal(source_db.url, target_db.url, ["public.pat"])
    # A range another run marked (and left so: it stopped, or its retry forgot it) is copied
    # by the next UI run of the table too.
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE supabase_migration.migration_checkpoints SET status = 'pending', "
            "row_checksum = NULL WHERE table_name = 'public.pat' AND partition_key = '000002'"
        )
    assert swapped_then_first_range_materialized(7, 470) == (
        ["000000", "000002", "000004"],
        [],
    )


def test_a_ui_run_tries_a_range_another_run_held_once_more_at_the_end(
    source_db, target_db, tmp_path, monkeypatch
):
    """Sibling runs of one UI backfill may copy a range of the other's (one its take-aside
    marked): a range of this run's held so is tried again after its others, by then done."""
    from supabase_migration import manifest as manifest_io
    from supabase_migration.copy import CopySession
    from supabase_migration.definitions import build_definitions
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    env = _patients_with_mrns(source_db, target_db, tmp_path, 300)
    _run_in_ranges(env, tmp_path)
    asset = build_definitions(manifest_io.read(tmp_path / "migration.yaml")).get_assets_def(
        table_asset_key("public.pat")
    )
    with psycopg.connect(target_db.url) as sibling:  # holds the row until it commits
        sibling.execute(
            "UPDATE supabase_migration.migration_checkpoints SET status = 'pending', "
            "row_checksum = NULL WHERE table_name = 'public.pat' AND partition_key = '000001'"
        )
        tried: list[str] = []
        real_copy = CopySession.copy

        def copy_as_the_sibling_ends(self, table, key, *args, **kwargs):
            tried.append(key)
            try:
                return real_copy(self, table, key, *args, **kwargs)
            finally:
                sibling.commit()  # the sibling's copy of it ends meanwhile

        monkeypatch.setattr(CopySession, "copy", copy_as_the_sibling_ends)
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            result = dg.materialize(
                [asset],
                instance=instance,
                resources={
                    "source": SourceDatabase(url=source_db.url),
                    "target": TargetDatabase(url=target_db.url),
                },
                partition_key="000001",
                # Re-synced whatever its checkpoint says: off, the range reads as completed
                # (the sibling's mark is not committed yet) and is skipped unheld.
                run_config={"ops": {asset.op.name: {"config": {"resync": True}}}},
            )
    assert result.success
    assert tried == ["000001", "000001"]
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute(
            "SELECT status FROM supabase_migration.migration_checkpoints "
            "WHERE table_name = 'public.pat' AND partition_key = '000001'"
        ).fetchone() == ("completed",)


def _patients_with_mrns(source_db, target_db, tmp_path: Path, rows: int) -> dict[str, str]:
    """public.pat: `rows` patients, each with a unique MRN; the CLI's environment."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pat (id int PRIMARY KEY, mrn text NOT NULL UNIQUE); "
            f"INSERT INTO pat SELECT g, 'M' || g FROM generate_series(1, {rows}) g"
        )
    return cli_env(source_db.url, target_db.url, tmp_path)


def test_a_range_failed_then_copied_again_by_the_run_is_no_failure(source_db, target_db, tmp_path):
    """MRNs moved in a cycle of eleven rows, from the first range into the last unit's: the
    first range follows the chain for its eight rounds and fails; the last unit's range takes
    its row aside and marks it to be copied again, which the run does after its units. Every
    range ends completed, and the run says no failure and verifies."""
    env = _patients_with_mrns(source_db, target_db, tmp_path, 600)
    args = ["run", "--batch-size", "10", "--workers", "1"]  # 60 ranges: two units
    assert cli(args, env, tmp_path, timeout=600).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE pat SET mrn = 'tmp' || id WHERE id = 5 OR id BETWEEN 551 AND 560; "
            "UPDATE pat SET mrn = 'M551' WHERE id = 5; "
            "UPDATE pat SET mrn = 'M' || (id + 1) WHERE id BETWEEN 551 AND 559; "
            "UPDATE pat SET mrn = 'M5' WHERE id = 560"
        )
    done = cli(args, env, tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert "Copying again 1 range(s)" in done.stdout + done.stderr
    assert_tables_equal(source_db.url, target_db.url, ["public.pat"])


def test_a_range_another_run_holds_is_not_copied_again_nor_reported_twice(
    source_db, target_db, tmp_path
):
    """A range pending since another run's take-aside, which that run is copying right now:
    this run steps aside once, says so once, and does not take it for one of its own marks."""
    env = _patients_with_mrns(source_db, target_db, tmp_path, 300)
    _run_in_ranges(env, tmp_path)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE supabase_migration.migration_checkpoints SET status = 'pending', "
            "row_checksum = NULL WHERE table_name = 'public.pat' AND partition_key = '000001'"
        )
    with psycopg.connect(target_db.url) as holder:
        holder.execute(
            "SELECT 1 FROM supabase_migration.migration_checkpoints WHERE table_name = "
            "'public.pat' AND partition_key = '000001' FOR UPDATE"
        )
        done = cli(["run", "--batch-size", "100", "--workers", "1"], env, tmp_path)
        holder.rollback()
    assert done.returncode != 0
    assert "Copying again" not in done.stdout + done.stderr
    held = [line for line in done.stderr.splitlines() if "being copied by another run" in line]
    assert len(held) == 1, done.stderr


def test_a_deferrable_primary_key_is_not_the_key_of_ranges(source_db, target_db, tmp_path):
    """ON CONFLICT cannot use a deferrable unique index as its arbiter: a table keyed by one
    copied once, then every catch-up of a change failed. Such a table is keyed by an immediate
    unique index when it has one, else copied whole."""
    env = _copied_then_caught_up(
        source_db,
        target_db,
        tmp_path,
        "CREATE TABLE slot (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text); "
        "CREATE TABLE bed (id int PRIMARY KEY DEFERRABLE, code text NOT NULL UNIQUE); "
        "INSERT INTO slot SELECT g, 's' || g FROM generate_series(1, 500) g; "
        "INSERT INTO bed SELECT g, 'b' || g FROM generate_series(1, 500) g",
        "UPDATE slot SET v = 'changed' WHERE id = 7; UPDATE bed SET id = id + 1000 WHERE id = 9",
    )
    assert_tables_equal(source_db.url, target_db.url, ["public.slot", "public.bed"])
    status = json.loads(cli(["status", "--json"], env, tmp_path).stdout)["tables"]
    assert status["public.bed"]["completed"] > 1  # ranges of its unique code


def test_xml_keeps_its_declaration_and_verifies(source_db, target_db, tmp_path):
    """xml's output functions, text and binary, drop a declaration the value keeps (HL7 CDA
    documents carry one): the copy lost it, and verification, which hashes the stored text,
    failed for good, `--repair` included. xml now travels as its stored text."""
    declared = '<?xml version="1.0" encoding="UTF-8"?><ClinicalDocument>é</ClinicalDocument>'
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE DOMAIN cda AS xml; CREATE DOMAIN cdas AS xml[]; "
            "CREATE TABLE doc (id int PRIMARY KEY, x xml, d cda, xs xml[], ds cdas, note text)"
        )
        conn.execute(
            "INSERT INTO doc SELECT g, %s::xml, %s::xml, ARRAY[%s::xml, '<a/>'], "
            "ARRAY[%s::xml], 'n' FROM generate_series(1, 300) g",
            (declared, declared, declared, declared),
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    _run_in_ranges(env, tmp_path)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT DISTINCT x::text, d::text, (xs[1])::text, (ds[1])::text FROM doc"
        ).fetchall() == [(declared, declared, declared, declared)]


def test_a_not_valid_check_the_source_rows_break_is_added_after_the_load(
    source_db, target_db, tmp_path
):
    """A CHECK added NOT VALID over old rows that break it: the schema came before the data,
    so the copy's inserts were checked and the table stayed empty. It is dropped for the load
    and added back, NOT VALID, after it, as pg_dump does; it still refuses new bad rows."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE legacy (id int PRIMARY KEY, age int); "
            "INSERT INTO legacy SELECT g, g - 5 FROM generate_series(1, 500) g; "
            "ALTER TABLE legacy ADD CONSTRAINT age_pos CHECK (age >= 0) NOT VALID; "
            "COMMENT ON CONSTRAINT age_pos ON legacy IS 'from 2019 on'"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    _run_in_ranges(env, tmp_path)
    assert_tables_equal(source_db.url, target_db.url, ["public.legacy"])
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT convalidated, obj_description(oid, 'pg_constraint') FROM pg_constraint "
            "WHERE conname = 'age_pos'"
        ).fetchall() == [(False, "from 2019 on")]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO legacy VALUES (1000, -1)")

    # a catch-up copies the changed range again: its unchanged old rows, which the check would
    # refuse, are not proposed again, only the changed row (which passed it on the source)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE legacy SET age = 99 WHERE id = 2")
    _run_in_ranges(env, tmp_path)
    assert_tables_equal(source_db.url, target_db.url, ["public.legacy"])


def test_a_manifest_of_another_version_is_written_anew_by_init(clinic):
    """Other commands refuse it and say to run init, which must then not refuse it too."""
    *_, env, tmp_path = clinic
    (tmp_path / "migration.yaml").write_text("version: 2\ntables: {}\n")
    done = cli(["plan"], env, tmp_path)
    assert done.returncode == 2 and "run `supabase-migrate init`" in done.stderr, done.stderr
    assert cli(["init"], env, tmp_path).returncode == 0
    assert yaml.safe_load((tmp_path / "migration.yaml").read_text())["version"] == 1


def test_a_reader_that_stops_early_gets_no_traceback(clinic):
    """`supabase-migrate status --json | head -c0`: the pipe closes before the output."""
    *_, env, tmp_path = clinic
    run = cli_from_a_terminal(["status", "--json"], env, tmp_path)
    assert run.stdout is not None and run.stderr is not None
    run.stdout.close()
    stderr = run.stderr.read()
    assert run.wait(timeout=120) == 1, stderr
    assert stderr == "", stderr


def test_a_full_disk_for_the_output_is_one_sentence(clinic):
    """`supabase-migrate status --json > /dev/full`: the write fails with no file name to
    give (the disk is full, not a file the user named): one sentence, exit code 1."""
    require(Path("/dev/full").exists(), "/dev/full is Linux's always-full device")
    *_, env, tmp_path = clinic
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "supabase_migration.cli", "status", "--json"],
            env=env,
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr == "error: No space left on device.\n", done.stderr


def test_a_database_error_no_step_translated_is_still_one_sentence(clinic):
    """The CLI's last boundary: a refused read it meets untranslated ends as one sentence."""
    _, target_db, env, tmp_path = clinic
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA supabase_migration; "
            "CREATE TABLE supabase_migration.migration_checkpoints (table_name text); "
            "REVOKE ALL ON SCHEMA supabase_migration FROM PUBLIC"
        )
    done = cli(["status"], env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "permission denied" in done.stderr and "42501" in done.stderr
    assert target_db.password not in done.stderr + done.stdout


def test_init_then_plan_writes_nothing_on_the_target(clinic):
    source_db, target_db, env, tmp_path = clinic
    init = cli(
        ["init", "--schema-mode", "dump", "--exclude", "public.lab_*", "--batch-size", "800"],
        env,
        tmp_path,
    )
    assert init.returncode == 0, init.stderr
    manifest = (tmp_path / "migration.yaml").read_text()
    assert "public.patients" in manifest and "public.lab_results" not in manifest
    assert "://" not in manifest and target_db.password not in manifest

    plan = cli(["plan"], env, tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "## Ranges" in plan.stdout and "public.patients" in plan.stdout
    assert plan.stderr == ""  # the manifest as it was: nothing to say
    # A flag that changes the reviewed manifest says so.
    again = cli(["plan", "--batch-size", "900", "--schema-mode", "dump"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr == f"Updated {tmp_path / 'migration.yaml'}: batch_size 900.\n"
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regnamespace('supabase_migration')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('public.patients')").fetchone() == (None,)

    # A source table that vanished after init is one clear sentence, not a traceback.
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("DROP TABLE vital_readings")
    gone = cli(["run"], env, tmp_path)
    assert gone.returncode == 2, gone.stderr
    assert "public.vital_readings" in gone.stderr and "Traceback" not in gone.stderr


def test_a_table_made_after_init_is_named_until_init_adds_it(clinic):
    """A table the app gained after `init` is data nothing migrates: plan and run say so, and
    verify fails on it, until `init` of the same schemas adds it."""
    source_db, target_db, env, tmp_path = clinic
    init = cli(["init", "--schema-mode", "dump", "--schemas", "public"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE consents (id bigint PRIMARY KEY, signed_by text NOT NULL)")
        conn.execute(
            "INSERT INTO consents SELECT g, 'Patient ' || g FROM generate_series(1, 300) g"
        )
    sentence = (
        f"The source has a table that {tmp_path / 'migration.yaml'} does not list "
        "(public.consents), so nothing migrates it; run `supabase-migrate init --schemas "
        "public` again to add it, or edit the manifest's exclude filters to leave it out."
    )
    plan = cli(["plan"], env, tmp_path)
    assert plan.returncode == 0, plan.stderr  # a warning: the listed tables can go
    assert "tables-left-out" in plan.stdout and sentence in plan.stdout

    run = cli(["run"], env, tmp_path)
    assert sentence in run.stderr, run.stderr
    assert run.returncode == 1, run.stderr  # its verification fails on the table
    verify = cli(["verify", "--json"], env, tmp_path)
    assert verify.returncode == 1, verify.stderr
    report = json.loads(verify.stdout)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [(c["table"], c["details"]) for c in failed] == [
        ("public.consents", {"missing_on": "manifest"})
    ]
    assert sentence in failed[0]["description"]
    assert "Patient" not in verify.stdout + verify.stderr + run.stderr

    init = cli(["init", "--schemas", "public"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    run = cli(["run"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "does not list" not in run.stderr
    assert_tables_equal(source_db.url, target_db.url, ["public.consents", *APP_TABLES])

    # The other way round: a listed table the source dropped fails verify by name.
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("DROP TABLE consents")
    verify = cli(["verify"], env, tmp_path)
    assert verify.returncode == 1, verify.stderr
    assert "public.consents is in the manifest but not in the source" in verify.stdout
    # Once init drops it from the manifest, run's summary no longer lists its old ranges.
    init = cli(["init", "--schemas", "public", "--schema-mode", "none"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    run = cli(["run"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "public.patients" in run.stdout and "public.consents" not in run.stdout


def test_a_schema_made_after_an_init_of_every_schema_is_named(clinic):
    """An `init` given no schemas takes every schema of the source, so a schema the source
    gains later is watched too, and `init` again takes it."""
    source_db, _, env, tmp_path = clinic
    assert cli(["init"], env, tmp_path).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA billing; CREATE TABLE billing.invoices (id int PRIMARY KEY)")
    plan = cli(["plan"], env, tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert (
        f"The source has a table that {tmp_path / 'migration.yaml'} does not list "
        "(billing.invoices), so nothing migrates it; run `supabase-migrate init` again"
    ) in plan.stdout
    assert cli(["init"], env, tmp_path).returncode == 0
    manifest = yaml.safe_load((tmp_path / "migration.yaml").read_text())
    assert "billing" in manifest["schemas"] and "billing.invoices" in manifest["tables"]
    assert manifest["every_schema"] is True
    assert "does not list" not in cli(["plan"], env, tmp_path).stdout


def test_tables_left_out_still_get_row_level_security(clinic):
    source_db, target_db, env, tmp_path = clinic
    included = "public.providers,public.patients"
    done = cli(["run", "--schema-mode", "dump", "--include", included], env, tmp_path)
    assert done.returncode == 0, done.stderr  # the report has no rls_disabled finding
    assert_tables_equal(source_db.url, target_db.url, ["public.providers", "public.patients"])
    with psycopg.connect(target_db.url) as conn:
        unprotected = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind IN ('r', 'p') AND NOT relrowsecurity"
        ).fetchall()
        assert unprotected == []  # lab_results etc. were created by the dump, empty, with RLS
        assert conn.execute("SELECT count(*) FROM lab_results").fetchone() == (0,)


def _waiting_for_a_lock(conn: psycopg.Connection) -> int:
    """Sessions of this database waiting for an advisory lock (the schema step's)."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
        "AND datname = current_database()"
    ).fetchone()[0]


RUN_IN_SMALL_RANGES = ["--batch-size", "50", "--workers", "2", "--no-progress"]


def test_ctrl_c_during_the_copy_is_one_sentence_and_resume_finishes(clinic):
    """Ctrl-C as a terminal sends it, to the CLI and its copy workers at once, while ranges
    are being copied: one sentence, no worker's traceback, and `resume` finishes the job."""

    source_db, target_db, env, tmp_path = clinic
    run = cli_from_a_terminal(["run", *RUN_IN_SMALL_RANGES], env, tmp_path, own_group=True)
    try:
        deadline = time.monotonic() + 120
        while _completed_ranges(target_db.url) < 3:
            assert time.monotonic() < deadline and run.poll() is None, _output_if_ended(run)
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    _interrupted_then_resumed(run, stderr, target_db.url, env, tmp_path)
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)


@pytest.mark.parametrize(
    ("to", "held", "signum"),
    [
        ("group", False, signal.SIGINT),
        ("group", True, signal.SIGINT),
        ("cli alone", True, signal.SIGINT),
        ("cli alone", False, signal.SIGTERM),
    ],
)
def test_ctrl_c_while_one_worker_copies_and_the_other_is_idle_ends_the_cli(
    source_db, target_db, tmp_path: Path, to: str, held: bool, signum: int
):
    """One table left (one unit, so one worker idle), as at the end of most migrations.
    Ctrl-C to the terminal's process group: the idle worker used to leave holding the pool's
    queue lock, and its busy sibling, done with its interrupted run, waited on it for ever, and
    the CLI on the sibling. Sent to the CLI alone (a supervisor's `kill -INT`), the busy worker
    never hears it: the CLI stops it. `held`: the busy worker waits on a lock on the source
    table meanwhile. Either way the CLI ends, with its sentence, no worker is left, and
    `resume` finishes. A supervisor's SIGTERM to the CLI alone ends it the same way."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE big (id int PRIMARY KEY, v text); "
            "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    args = ["run", "--batch-size", "4000", "--workers", "2", "--no-progress", "--no-verify"]
    run = cli_from_a_terminal(args, env, tmp_path, own_group=True)
    holder = psycopg.connect(source_db.url)
    try:
        deadline = time.monotonic() + 120
        while _completed_ranges(target_db.url) < 2:
            assert time.monotonic() < deadline and run.poll() is None, _output_if_ended(run)
            time.sleep(0.05)
        if held:
            _hold_between_ranges(holder, "big")
            _wait_for_a_lock_wait(source_db.url, run, deadline)
        if to == "group":
            os.killpg(run.pid, signum)
        else:
            os.kill(run.pid, signum)
        _, stderr = run.communicate(timeout=60)
        left = subprocess.run(
            ["pgrep", "-g", str(run.pid)], capture_output=True, text=True
        ).stdout.split()
    finally:
        holder.close()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert left == []  # no worker outlives the CLI
    _interrupted_then_resumed(run, stderr, target_db.url, env, tmp_path)
    assert_tables_equal(source_db.url, target_db.url, ["public.big"])


def test_ctrl_c_while_a_deferred_index_is_built_stops_it_for_good(
    source_db, target_db, tmp_path: Path
):
    """Ctrl-C while a table's deferred index is built after its load: the build is cancelled
    on the server and not tried again (psycopg cancels a query only on KeyboardInterrupt;
    with Dagster's own interrupt the rollback failed, the step read that as its own failure,
    and its retry built the index again while the CLI waited for it), the CLI ends with its
    sentence, and the next run builds the index."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION slow_key(i integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE "
            "AS $$ BEGIN PERFORM pg_catalog.pg_sleep(0.001); RETURN i; END $$;"
            "CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL);"
            "INSERT INTO items SELECT g, g % 100 FROM generate_series(1, 6000) g;"
            "CREATE INDEX items_slow_idx ON items (slow_key(grp))"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    args = ["run", "--workers", "2", "--no-progress", "--no-verify"]
    run = cli_from_a_terminal(args, env, tmp_path, own_group=True)
    building = (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        "AND query ILIKE 'CREATE INDEX%slow_key%'"
    )
    try:
        with psycopg.connect(target_db.admin_url, autocommit=True) as watcher:
            deadline = time.monotonic() + 120
            while watcher.execute(building).fetchone() == (0,):
                assert time.monotonic() < deadline and run.poll() is None, _output_if_ended(run)
                time.sleep(0.05)
            os.killpg(run.pid, signal.SIGINT)
            _, stderr = run.communicate(timeout=60)
            assert watcher.execute(building).fetchone() == (0,)  # cancelled, not left running
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        "Interrupted; completed ranges are kept. Run `supabase-migrate resume`."
    ), stderr
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        failures = [
            entry.dagster_event.step_failure_data
            for record in instance.get_run_records()
            for entry in instance.all_logs(
                record.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
            )
        ]
    # Interrupted, and stopped for good on a retried attempt: never a failed index build.
    assert failures and all(
        is_interruption(f.error)
        or (f.user_failure_data and f.user_failure_data.metadata.get(INTERRUPTED_METADATA))
        for f in failures
    ), failures
    done = cli(["run", "--no-progress"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.items_slow_idx')").fetchone() != (None,)


def test_ctrl_c_during_the_runs_verification_stops_at_once_and_verify_finishes(clinic):
    """Ctrl-C while `run` verifies, with a verification query held up on the source: the CLI
    ends at once (it does not wait for the query), says that every range is copied and that
    `verify` finishes the job, and `verify` then passes."""
    source_db, target_db, env, tmp_path = clinic
    run = cli_from_a_terminal(["run", "--no-progress"], env, tmp_path, own_group=True)
    holder = psycopg.connect(source_db.url)  # holds alembic_version once every range is copied
    with _cleaned_up(run, holder):
        deadline = time.monotonic() + 120
        # Not sooner: a table run starting would wait for the lock (reading the catalog).
        while not _all_ranges_completed(target_db.url):
            assert time.monotonic() < deadline and run.poll() is None, _output_if_ended(run)
            time.sleep(0.02)
        holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        said = _ctrl_c_once_held(run, source_db.url, deadline)
    assert said == (
        "Interrupted while verifying; every range is copied. Run `supabase-migrate verify`."
    )
    done = cli(["verify"], env, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)


def test_ctrl_c_stops_verify_while_its_queries_run(clinic):
    """Ctrl-C while `verify` waits on a query in one of its worker threads (held up on the
    target): the CLI ends at once, with its sentence, instead of waiting for the query."""
    _, target_db, env, tmp_path = clinic
    assert cli(["run", "--no-verify", "--no-progress"], env, tmp_path).returncode == 0
    holder = psycopg.connect(target_db.url)
    holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    run = cli_from_a_terminal(["verify"], env, tmp_path, own_group=True)
    with _cleaned_up(run, holder):
        said = _ctrl_c_once_held(run, target_db.url, time.monotonic() + 120)
    assert said == "Interrupted; nothing this command writes was left half done."


@contextlib.contextmanager
def _cleaned_up(run: subprocess.Popen[str], holder: psycopg.Connection) -> Iterator[None]:
    """The lock's holder closed and the CLI's process group gone, however the test ends."""
    try:
        yield
    finally:
        holder.close()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def _interrupted_then_resumed(
    run: subprocess.Popen[str], stderr: str, url: str, env: dict[str, str], cwd: Path
) -> None:
    """The CLI ended on Ctrl-C with its one sentence, ranges left to copy; `resume` ends."""
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "Interrupted; completed ranges are kept. Run `supabase-migrate resume`."
    ), stderr
    assert _completed_ranges(url) < _planned_ranges(url)
    done = cli(["resume", "--no-progress"], env, cwd)
    assert done.returncode == 0, done.stderr


def _hold_between_ranges(holder: psycopg.Connection, table: str) -> None:
    """Lock `table` as soon as no range's transaction reads it (a waiting LOCK would count as
    the CLI's wait); held until `holder` is closed."""
    holder.execute("SET lock_timeout = '20ms'")
    while True:
        try:
            holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            return
        except psycopg.errors.LockNotAvailable:
            holder.rollback()


def _ctrl_c_once_held(run: subprocess.Popen[str], url: str, deadline: float) -> str:
    """Ctrl-C to the CLI's process group once one of its sessions waits for a lock at `url`;
    it must end while the lock is still held, with one sentence and no traceback, returned."""
    _wait_for_a_lock_wait(url, run, deadline)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def _wait_for_a_lock_wait(url: str, run: subprocess.Popen[str], deadline: float) -> None:
    """Until a session of `run` waits for a lock on the database at `url`."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND pid <> pg_backend_pid() AND datname = current_database()"
    )
    with psycopg.connect(url, autocommit=True) as watcher:
        while watcher.execute(waiting).fetchone() == (0,):
            assert time.monotonic() < deadline and run.poll() is None, _output_if_ended(run)
            time.sleep(0.02)


def _output_if_ended(run: subprocess.Popen[str]) -> object:
    """What an ended CLI printed; never waits for one still running (a stalled run would
    hang the suite instead of failing its test)."""
    return run.communicate() if run.poll() is not None else "still running"


def _all_ranges_completed(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        name = "supabase_migration.migration_checkpoints"
        if conn.execute("SELECT to_regclass(%s)", [name]).fetchone() == (None,):
            return False
        return conn.execute(f"SELECT bool_and(status = 'completed') FROM {name}").fetchone() == (
            True,
        )


def _completed_ranges(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        table = "supabase_migration.migration_checkpoints"
        if conn.execute("SELECT to_regclass(%s)", [table]).fetchone() == (None,):
            return 0
        return conn.execute(f"SELECT count(*) FROM {table} WHERE status = 'completed'").fetchone()[
            0
        ]


def _planned_ranges(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM supabase_migration.migration_checkpoints"
        ).fetchone()[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_at_start_up_does_not_wait_for_the_schema_step_ahead(clinic, signum):
    """Ctrl-C while Dagster opens, with the schema step started ahead held up on the target
    (another session holds the lock schema steps take): the CLI ends at once with its one
    line, and the schema step's transaction is rolled back. A supervisor's SIGTERM the same
    (it killed the CLI without a word until the first Dagster run gave SIGTERM a handler)."""

    _, target_db, env, tmp_path = clinic
    with psycopg.connect(target_db.url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", [SCHEMA_LOCK_KEY])
        run = cli_from_a_terminal(
            ["run", "--schema-mode", "dump"],
            {**env, "PYTHONFAULTHANDLER": "1"},  # SIGABRT prints every thread's stack
            tmp_path,
        )
        try:
            deadline = time.monotonic() + 60
            while not _waiting_for_a_lock(holder):
                assert time.monotonic() < deadline and run.poll() is None, "never held up"
                time.sleep(0.05)
            os.kill(run.pid, signum)
            interrupted = time.monotonic()
            try:
                _, stderr = run.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                masks = [  # the process's and each thread's pending, blocked and caught signals
                    line
                    for status in Path(f"/proc/{run.pid}").glob("task/*/status")
                    for line in status.read_text().splitlines()
                    if line.startswith(("Name", "Sig", "ShdPnd"))
                ]
                run.send_signal(signal.SIGABRT)
                _, stacks = run.communicate(timeout=30)
                pytest.fail(
                    "the CLI did not end after Ctrl-C; its signals:\n"
                    + "\n".join(masks)
                    + f"\nits threads:\n{stacks}"
                )
            took = time.monotonic() - interrupted
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()
    # Not `resume`, which refuses a target no run has planned.
    assert line == "Interrupted before this run copied anything. Run `supabase-migrate run` again."
    assert "Traceback" not in stderr
    assert took < 15, f"the CLI waited {took:.1f} s for the schema step"
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.patients')").fetchone()[0] is None


def _cli_patched(tmp_path: Path, args: list[str], patch: str) -> subprocess.CompletedProcess:
    """The CLI in a process that first runs `patch` (a sitecustomize module): a Ctrl-C made
    to land at one chosen place, deterministically."""
    (tmp_path / "sitecustomize.py").write_text(patch)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), DAGSTER_HOME=str(tmp_path / "home"))
    return cli(args, env, tmp_path, timeout=60)


def _first_run_patched(env: dict[str, str], tmp_path: Path, patch: str):
    """A first `run` in dump mode, in a process that first runs `patch` (sitecustomize);
    the commands after it run without."""
    (tmp_path / "sitecustomize.py").write_text(patch)
    return cli(["run", "--schema-mode", "dump"], dict(env, PYTHONPATH=str(tmp_path)), tmp_path)


def test_ranges_pending_after_a_run_without_failures_say_what_may_have_happened(clinic):
    """A target that lost commits it had confirmed (a crash without synchronous commit, a
    failover) leaves a range pending that this run copied; the closing sentence blamed
    "another run" alone. Deterministic: sitecustomize sets a completed range back to pending
    just before the run reads the checkpoints for its summary. `resume` copies it."""
    source_db, target_db, env, tmp_path = clinic
    done = _first_run_patched(
        env,
        tmp_path,
        "import os, psycopg\n"
        "import supabase_migration.commands as commands\n"
        "real = commands._checkpoints_now\n"
        "def lost(tables):\n"
        "    with psycopg.connect(os.environ['SUPABASE_DB_URL'], autocommit=True) as conn:\n"
        '        conn.execute("UPDATE supabase_migration.migration_checkpoints SET status = "\n'
        "                     \"'pending' WHERE table_name = 'public.patients' AND \"\n"
        "                     \"partition_key = '000000'\")\n"
        "    return real(tables)\n"
        "commands._checkpoints_now = lost\n",
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.endswith(
        "1 range(s) are still pending though no copy of this run failed: another run may hold "
        "them, or the target lost commits (a crash or a failover); run `supabase-migrate "
        "resume` (once any other run has finished) to copy them.\n"
    ), done.stderr
    done = cli(["resume"], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)


def test_a_run_stopped_between_its_schema_step_and_its_plan_is_said_so(clinic):
    """The schema step commits the schema with its record, then the checkpoints' tables are
    made: a Ctrl-C or crash in between left `status` and `resume` saying the bookkeeping had
    been dropped by hand, and advising --schema-mode none (which the manifest then keeps).
    Deterministic: sitecustomize raises the interrupt where the checkpoints' tables are made."""
    source_db, target_db, env, tmp_path = clinic
    done = _first_run_patched(
        env,
        tmp_path,
        "import supabase_migration.schema_step as schema_step\n"
        "def interrupted(conn):\n"
        "    raise KeyboardInterrupt\n"
        "schema_step.ensure_bookkeeping = interrupted\n",
    )
    assert done.returncode == 1, done.stderr
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.patients') IS NOT NULL").fetchone()[0]
    said = (
        "A run stopped after its schema step had set up the target and before it planned the "
        "copy, so nothing is copied yet; `supabase-migrate run` goes on from there."
    )
    status = cli(["status"], env, tmp_path)
    assert status.returncode == 0 and said in status.stdout + status.stderr, status
    done = cli(["resume"], env, tmp_path)
    assert (done.returncode, done.stderr) == (2, f"error: {said}\n")
    done = cli(["run"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert_tables_equal(source_db.url, target_db.url, APP_TABLES)
    assert "schema_mode: dump" in (tmp_path / "migration.yaml").read_text()


def test_ctrl_c_inside_a_string_exec_still_ends_with_exit_code_1(tmp_path):
    """Ctrl-C landing while a dataclass is built (`exec` of a string, as Dagster's imports do
    hundreds of times) made `python -m supabase_migration.cli` end by SIGINT after printing
    its line: CPython had noted the interrupt as unhandled. Deterministic: `status` is
    replaced, through sitecustomize, by an interrupt raised in an `exec`."""

    done = _cli_patched(
        tmp_path,
        ["status"],
        "import supabase_migration.status_command as status_command\n"
        "def interrupted():\n"
        "    exec('raise KeyboardInterrupt')\n"
        "status_command.status = interrupted\n",
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Interrupted") and "Traceback" not in done.stderr


def test_ctrl_c_while_run_imports_dagster_says_to_run_again(tmp_path):
    """Ctrl-C in the seconds `run` imports Dagster said "Run `supabase-migrate resume`",
    which then refused: no run had planned the target. Deterministic: the import is replaced,
    through sitecustomize, by an interrupt."""
    done = _cli_patched(
        tmp_path,
        ["run"],
        "import contextlib\n"
        "import supabase_migration.memory as memory\n"
        "@contextlib.contextmanager\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt\n"
        "    yield\n"
        "memory.loading_long_lived = interrupted\n",
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        "Interrupted before this run copied anything. Run `supabase-migrate run` again.\n"
    )


def test_a_start_up_error_does_not_wait_for_the_schema_step_ahead(clinic, monkeypatch):
    """The error path itself, in-process and deterministic: opening Dagster fails while the
    schema step started ahead is held up on the target's schema lock; `run` raises at once."""
    import threading

    from supabase_migration import commands
    from supabase_migration.errors import ConfigError
    from supabase_migration.inputs import Settings

    _, target_db, env, tmp_path = clinic
    for name in ("SOURCE_DATABASE_URL", "SUPABASE_DB_URL", "DAGSTER_HOME"):
        monkeypatch.setenv(name, env[name])
    started: list = []

    def start(*args):
        started.append(commands.start_schema_ahead.__wrapped__(*args))
        return started[-1]

    start.__wrapped__ = commands.start_schema_ahead  # type: ignore[attr-defined]
    monkeypatch.setattr(commands, "start_schema_ahead", start)

    def unusable(home):
        raise ConfigError("The Dagster instance could not be opened.")

    monkeypatch.setattr(commands, "dagster_instance", unusable)
    settings = Settings(manifest_path=tmp_path / "migration.yaml", schema_mode="dump")
    raised: list[BaseException] = []

    def run() -> None:
        try:
            commands.run(settings)
        except BaseException as exc:
            raised.append(exc)

    with psycopg.connect(target_db.url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", [SCHEMA_LOCK_KEY])
        runner = threading.Thread(target=run)
        runner.start()
        runner.join(15)  # a run that waited would still be waiting: the lock is held
        ended_in_time = not runner.is_alive()
        (ahead,) = started
        deadline = time.monotonic() + 30  # the step goes on after run ended, up to the lock
        while not (held_up := _waiting_for_a_lock(holder)) and time.monotonic() < deadline:
            time.sleep(0.05)
    runner.join()  # the lock went with its session: whatever waited goes on now
    ahead.wait()
    assert ended_in_time, "run waited for the schema step after its start-up failed"
    assert held_up  # the step went on after run ended, and reached the lock
    assert len(raised) == 1 and isinstance(raised[0], ConfigError), raised
