"""Definitions load with no database reachable, from a manifest or without one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from supabase_migration import manifest as manifest_io
from supabase_migration.assets import (
    PLAN_KEY,
    SCHEMA_KEY,
    SEQUENCES_KEY,
    partitions_def_name,
    table_asset_key,
)
from supabase_migration.checks import REPORT_KEY
from supabase_migration.definitions import build_definitions, load_definitions
from supabase_migration.errors import ConfigError
from supabase_migration.manifest import Manifest, ManifestTable
from supabase_migration.report import REPORT_DIR_ENV
from supabase_migration.resources import SourceDatabase, TargetDatabase

REPO = Path(__file__).resolve().parents[1]

MANIFEST = Manifest(
    tables=(
        ManifestTable("public.providers", ("provider_id",), "primary_key", 10),
        ManifestTable(
            "public.appointments",
            ("appointment_id",),
            "primary_key",
            500,
            None,
            ("public.providers",),
        ),
        ManifestTable("public.vital_readings", (), "none", 100),
        ManifestTable("public.b\u0131g\u0131nt_table", ("id",), "primary_key", 1),
    ),
)


def test_definitions_from_manifest_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATABASE_URL", "postgresql://u:secret@db.invalid:5432/x")
    path = tmp_path / "migration.yaml"
    manifest_io.write(MANIFEST, path)
    defs = load_definitions(path)
    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    appointments = table_asset_key("public.appointments")
    assert {SCHEMA_KEY, PLAN_KEY, SEQUENCES_KEY, appointments} <= keys
    assert table_asset_key("public.providers") in graph.get(appointments).parent_keys
    assert PLAN_KEY in graph.get(appointments).parent_keys
    unicode_key = table_asset_key("public.b\u0131g\u0131nt_table")
    assert unicode_key in keys and all(p.isascii() for p in unicode_key.path)
    spec = defs.get_assets_def(appointments)
    assert spec.partitions_def is not None
    assert spec.backfill_policy is not None
    assert {"postgres", "supabase"} <= set(graph.get(appointments).kinds)
    assert graph.get(appointments).group_name == "tables"
    # Every asset that uses the target holds a pool slot while it runs, and all but the
    # verification report (which hashes every row) are retried after a transient failure.
    for key in keys:
        assets_def = defs.get_assets_def(key)
        node = assets_def.node_def
        assert assets_def.descriptions_by_key.get(key), key
        assert node.pool == "supabase_target", key
        retried = node.retry_policy is not None and node.retry_policy.max_retries >= 2
        assert retried is (key != REPORT_KEY), key
    dg.Definitions.validate_loadable(defs)


def test_tables_named_like_our_own_assets_or_each_other_load_apart(tmp_path: Path) -> None:
    """A schema `migration` holds tables named like our own assets (migration/plan is the
    plan asset's key); schema a__b's table c and schema a's table b__c would share a set of
    partitions. Each gets keys of its own, and ordinary names keep theirs."""
    tables = ("migration.plan", "migration.schema", "a__b.c", "a.b__c", "public.patients")
    manifest = Manifest(
        tables=tuple(ManifestTable(t, ("id",), "primary_key", 10) for t in tables),
        schemas=("migration", "a__b", "a", "public"),
    )
    path = tmp_path / "migration.yaml"
    manifest_io.write(manifest, path)
    defs = load_definitions(path)
    dg.Definitions.validate_loadable(defs)
    keys = {table_asset_key(t) for t in tables}
    assert len(keys) == len(tables) and not keys & {PLAN_KEY, SCHEMA_KEY}
    assert len({partitions_def_name(t) for t in tables}) == len(tables)
    assert table_asset_key("public.patients").path == ["public", "patients"]
    assert partitions_def_name("public.patients") == "ranges__public__patients"


def test_definitions_without_manifest_point_to_init() -> None:
    defs = build_definitions(None)
    plan = defs.get_assets_def(PLAN_KEY)
    assert "supabase-migrate init" in (plan.descriptions_by_key[PLAN_KEY] or "")


def test_without_a_manifest_materializing_everything_writes_nothing(
    source_db, target_db, tmp_path: Path, monkeypatch
) -> None:
    """`dagster dev` started where there is no migration.yaml: "Materialize all" used to
    dump the source's public schema into the target from the stand-in's defaults."""
    import psycopg

    monkeypatch.setenv(manifest_io.MANIFEST_ENV, str(tmp_path / "nowhere.yaml"))
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path / "report"))  # not the checkout's
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE patients (id int PRIMARY KEY)")
    defs = build_definitions(None)
    resources = {
        "source": SourceDatabase(url=source_db.url),
        "target": TargetDatabase(url=target_db.url),
    }
    sentence = (
        f"There is no manifest this release reads at {tmp_path / 'nowhere.yaml'}, so there is "
        "nothing to migrate; run `supabase-migrate init` to write it (or set "
        "SUPABASE_MIGRATION_MANIFEST to its path), then reload the code location."
    )
    # the setup run, and the migration_verify job (the report of no tables: no proof)
    for keys in ((SCHEMA_KEY, PLAN_KEY), (REPORT_KEY,)):
        result = dg.materialize(
            [defs.get_assets_def(key) for key in keys], resources=resources, raise_on_error=False
        )
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert failure.step_failure_data.user_failure_data.description == sentence  # type: ignore[union-attr]
    with psycopg.connect(target_db.admin_url) as conn:
        assert conn.execute(
            "SELECT to_regclass('public.patients'), to_regnamespace('supabase_migration')"
        ).fetchone() == (None, None)


def test_a_partition_materialized_before_the_plan_says_what_to_run_first(
    source_db, target_db
) -> None:
    """The UI lets a table's partition be materialized before migration/schema and
    migration/plan: the failure says to run those, not 'relation "…" does not exist'."""
    import psycopg

    from supabase_migration import checkpoints
    from supabase_migration.assets import partitions_def_name
    from supabase_migration.catalog import read_tables
    from supabase_migration.manifest import from_catalog

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE visits (id int PRIMARY KEY); INSERT INTO visits VALUES (1)")
        manifest = from_catalog(read_tables(conn, ["public"]), schemas=["public"])
    asset = build_definitions(manifest).get_assets_def(table_asset_key("public.visits"))
    resources = {
        "source": SourceDatabase(url=source_db.url),
        "target": TargetDatabase(url=target_db.url),
    }
    plan_first = (
        "materialize the migration/schema and migration/plan assets (the migration_setup job) "
        "first, or run `supabase-migrate run`."
    )
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(partitions_def_name("public.visits"), ["000000"])

        def failure() -> str:
            result = dg.materialize(
                [asset],
                instance=instance,
                resources=resources,
                partition_key="000000",
                raise_on_error=False,
            )
            (step,) = [e for e in result.all_events if e.is_step_failure]
            return step.step_failure_data.user_failure_data.description  # type: ignore[union-attr]

        assert failure() == f"No run has planned the target yet; {plan_first}"
        with psycopg.connect(target_db.url, autocommit=True) as conn:
            checkpoints.ensure_bookkeeping(conn)
        assert failure().endswith(
            f"Partition 000000 of public.visits is not in the plan; {plan_first}"
        )


def test_a_target_reset_is_told_and_its_stale_partitions_go(source_db, target_db) -> None:
    """The target's bookkeeping reset (a restore, a new project) under the same Dagster
    instance: the new plan's partition keys replace the old ones (an old key, not in the new
    plan, failed for ever), and ranges shown materialized that the target never got are
    named, since "materialize missing" does not select them."""
    import psycopg

    from supabase_migration.assets import partitions_def_name, plan_all
    from supabase_migration.catalog import read_tables
    from supabase_migration.manifest import from_catalog

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE visits (id int PRIMARY KEY); "
            "INSERT INTO visits SELECT generate_series(1, 400)"
        )
        manifest = from_catalog(read_tables(conn, ["public"]), schemas=["public"], batch_size=100)
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE visits (id int PRIMARY KEY)")
    source, target = SourceDatabase(url=source_db.url), TargetDatabase(url=target_db.url)
    name = partitions_def_name("public.visits")
    asset = build_definitions(manifest).get_assets_def(table_asset_key("public.visits"))
    told: list[str] = []
    with dg.DagsterInstance.ephemeral() as instance:
        plan_all(manifest, source, target, instance, log=told.append)
        keys = instance.get_dynamic_partitions(name)
        assert len(keys) == 4 and told == []
        for key in keys:
            dg.materialize(
                [asset],
                instance=instance,
                resources={"source": source, "target": target},
                partition_key=key,
            )
        with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA supabase_migration CASCADE; TRUNCATE visits")
        bigger = dataclasses.replace(manifest, batch_size=200)
        plan_all(bigger, source, target, instance, log=told.append)
        assert sorted(instance.get_dynamic_partitions(name)) == ["000000", "000001"]
        assert told == [
            "2 partition(s) of public.visits show as materialized, from runs against this "
            "target before its bookkeeping was reset (or against another target), but were "
            "never copied here: backfill every partition of the table (completed ranges are "
            "skipped), or run `supabase-migrate run`."
        ]


def test_a_table_materialized_before_its_parent_is_warned_of(source_db, target_db) -> None:
    """In the UI a child table can be materialized alone: its foreign keys then point at
    rows the target does not have yet. Said once its parent is fully copied no more."""
    import psycopg

    from supabase_migration.assets import plan_all
    from supabase_migration.catalog import read_tables
    from supabase_migration.manifest import from_catalog

    schema = (
        "CREATE TABLE patients (id int PRIMARY KEY); "
        "CREATE TABLE visits (id int PRIMARY KEY, patient_id int REFERENCES patients);"
    )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            schema + "INSERT INTO patients SELECT generate_series(1, 20);"
            "INSERT INTO visits SELECT g, g FROM generate_series(1, 20) g"
        )
        manifest = from_catalog(read_tables(conn, ["public"]), schemas=["public"])
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(schema)
    source, target = SourceDatabase(url=source_db.url), TargetDatabase(url=target_db.url)
    definitions = build_definitions(manifest)

    def warnings_of(instance: dg.DagsterInstance, table: str) -> list[str]:
        result = dg.materialize(
            [definitions.get_assets_def(table_asset_key(table))],
            instance=instance,
            resources={"source": source, "target": target},
            partition_key="000000",
            raise_on_error=False,
        )
        return [
            e.user_message
            for e in instance.all_logs(result.run_id)
            if e.level == logging.WARNING and "parent" in e.user_message
        ]

    with dg.DagsterInstance.ephemeral() as instance:
        plan_all(manifest, source, target, instance)
        assert warnings_of(instance, "public.visits") == [
            "public.visits is copied before its parent table(s) public.patients are: its "
            "foreign keys point at rows the target has only once they are copied too "
            "(materialize them; verification checks every foreign key)."
        ]
        assert warnings_of(instance, "public.patients") == []
        assert warnings_of(instance, "public.visits") == []


def test_a_ui_re_execution_of_a_cli_run_is_not_taken_for_a_dead_cli_run(tmp_path: Path) -> None:
    """Re-executed in the UI, a CLI run's tags (its PID among them) are inherited: a later
    `run` must not mark that live UI run failed because the old CLI process is gone."""
    import uuid

    from supabase_migration.assets import COMMAND_TAG, PID_TAG
    from supabase_migration.commands import release_dead_runs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tags = {PID_TAG: str(gone.pid), COMMAND_TAG: "run"}
    with dg.DagsterInstance.ephemeral(tempdir=str(tmp_path)) as instance:
        cli_run, ui_run = str(uuid.uuid4()), str(uuid.uuid4())
        for run_id, parent in ((cli_run, None), (ui_run, cli_run)):
            instance.add_run(
                dg.DagsterRun(
                    job_name="__ASSET_JOB",
                    run_id=run_id,
                    status=dg.DagsterRunStatus.STARTED,
                    tags=tags,
                    parent_run_id=parent,
                    root_run_id=parent,
                )
            )
        assert release_dead_runs(instance) == 1
        statuses = {r.run_id: r.status for r in instance.get_runs()}
    assert statuses == {
        cli_run: dg.DagsterRunStatus.FAILURE,
        ui_run: dg.DagsterRunStatus.STARTED,
    }


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"sample_size": 0}, "greater than or equal to 1"),
        ({"sample_size": -5}, "greater than or equal to 1"),
        ({"sample_size": 10**20}, "less than or equal to 2147483647"),
        ({"seed": 10**23}, "less than or equal to 9223372036854775807"),
    ],
)
def test_a_sample_the_checks_cannot_take_is_refused_by_their_config(config, said: str) -> None:
    """0 passed vacuously ("0 sampled rows are equal"), -5 ended in ZeroDivisionError, and a
    size or seed past what PostgreSQL takes failed the check as a database error."""
    from pydantic import ValidationError

    from supabase_migration.checks import VerifyConfig

    with pytest.raises(ValidationError, match=said):
        VerifyConfig(**config)


def test_manifest_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    manifest_io.write(MANIFEST, path)
    again = manifest_io.read(path)
    assert again.tables == MANIFEST.tables
    assert "://" not in path.read_text()  # no connection string, so no password


def test_tables_left_out_are_those_the_filters_take_and_the_manifest_lacks(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv(manifest_io.MANIFEST_ENV, raising=False)
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),),
        schemas=("public", "clinic ops"),
        exclude=("*.audit_*",),
        path=tmp_path / "m.yaml",
    )
    source = ["public.patients", "public.consents", "public.audit_2026", "clinic ops.rooms"]
    assert manifest.left_out(source) == ["public.consents", "clinic ops.rooms"]
    assert manifest.left_out_sentence(["public.consents", "clinic ops.rooms"]) == (
        f"The source has 2 tables that {tmp_path / 'm.yaml'} does not list (public.consents, "
        "clinic ops.rooms), so nothing migrates them; run `supabase-migrate init --schemas "
        f"'public,clinic ops' --manifest {tmp_path / 'm.yaml'}` again to add them, or edit the "
        "manifest's exclude filters to leave them out."
    )
    # Written for every schema of the source: `init` alone, which takes them all again.
    every = dataclasses.replace(manifest, every_schema=True)
    manifest_io.write(every, every.path)
    assert manifest_io.read(every.path) == every
    assert "`supabase-migrate init --manifest" in every.left_out_sentence(["public.consents"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tables:\n  patients: {key: [id]}\n", "schema.table"),
        ("tables: [a, b]\n", "no `tables` mapping"),
        ("tables: {public.x: {key: 3}}\n", "public.x's key must be a list of names"),
        # one string is not read as its letters: exposed_schemas p, u, b... would leave every
        # table of public without row level security
        ("exposed_schemas: public\ntables: {}\n", "exposed_schemas must be a list of names"),
        ("schemas: public\ntables: {}\n", "schemas must be a list of names"),
        ("include: public.*\ntables: {}\n", "include must be a list of names"),
        ("tables: {public.x: {parents: public.y}}\n", "public.x's parents must be a list"),
        ("tables: {public.x: {batch_size: abc}}\n", "public.x's batch_size must be a whole"),
        ("batch_size: -5\ntables: {}\n", "batch_size must be a whole number from 1 to 2,147"),
        ("batch_size: 0\ntables: {}\n", "batch_size must be a whole number from 1 to 2,147"),
        ("batch_size: 100000000000000000000000\ntables: {}\n", "from 1 to 2,147,483,647."),
        ("tables: {public.x: [id]}\n", "public.x's entry must be a mapping"),
        ("version: 2\ntables: {}\n", "is version 2, and this release reads version 1"),
        ("alembic_config: [a]\ntables: {}\n", "alembic_config must be a path"),
    ],
)
def test_a_manifest_the_definitions_cannot_use_is_one_sentence(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "migration.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        manifest_io.read(path)
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="cannot be read"):
        manifest_io.read(tmp_path)  # a directory


def test_resources_never_show_their_url_in_repr_or_in_a_run(monkeypatch) -> None:
    """Once Dagster resolves the EnvVar, pydantic's repr would print the URL, password and all."""
    secret = "s3cret-Pw"
    monkeypatch.setenv("LEAK_TEST_URL", f"postgresql://u:{secret}@db.example.com/clinic")
    lines: list[str] = []

    @dg.asset
    def shows_its_resources(context, source: SourceDatabase, target: TargetDatabase) -> None:
        lines.extend([repr(source), str(target), f"{source!r} {target}"])
        context.log.info(f"{source} {target!r}")

    resources = {
        "source": SourceDatabase(url=dg.EnvVar("LEAK_TEST_URL")),
        "target": TargetDatabase(url=f"postgresql://u:{secret}@nowhere.invalid/db?sslmode=x"),
    }
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([shows_its_resources], resources=resources, instance=instance)
    logged = [
        entry.user_message
        for entry in instance.all_logs(result.run_id)
        if "SourceDatabase" in entry.user_message
    ]
    assert result.success and logged
    assert lines[0] == "SourceDatabase(source db.example.com:5432 (self-hosted))"
    assert lines[1] == "TargetDatabase(a URL that does not parse)"
    assert not any(secret in text for text in lines + logged)


def test_dagster_cli_validates_workspace_with_no_database(tmp_path: Path) -> None:
    """What `dagster dev -w workspace.yaml` loads, checked by dagster's own validator."""
    manifest_io.write(MANIFEST, tmp_path / "migration.yaml")
    env = {
        **os.environ,
        "SUPABASE_MIGRATION_MANIFEST": str(tmp_path / "migration.yaml"),
        "DAGSTER_HOME": str(tmp_path),
        "SOURCE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-w",
            str(REPO / "workspace.yaml"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_worker_builds_its_own_definitions_when_not_forked(tmp_path: Path, monkeypatch) -> None:
    """Where workers are spawned (not Linux), each reads the manifest and opens the instance
    once, in its warm-up, and keeps them for every unit it runs."""
    from supabase_migration import commands

    path = tmp_path / "migration.yaml"
    manifest_io.write(MANIFEST, path)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setattr(commands, "_parent_definitions", None)
    monkeypatch.setattr(commands, "_worker_context", None)
    commands._worker_ready(str(path))
    assert commands._worker_context is not None
    defs, instance = commands._worker_context
    assert defs.get_assets_def(table_asset_key("public.appointments")) is not None
    commands._worker_ready(str(path))
    assert commands._worker_context == (defs, instance)
    instance.dispose()


def test_workers_are_forked_only_from_a_single_threaded_process() -> None:
    import sys
    import threading

    from supabase_migration import commands

    release = threading.Event()
    other = threading.Thread(target=release.wait, daemon=True)
    other.start()
    try:
        assert commands.start_method() == "spawn"
    finally:
        release.set()
        other.join()
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        assert commands.start_method() == "fork"


def test_units_run_biggest_table_first_each_in_partition_order() -> None:
    """Workers take units in list order: the longest table must not be left for the end."""
    from supabase_migration.commands import biggest_first, make_units

    keys = [f"{i:06d}" for i in range(120)]
    units = (
        make_units("public.small", keys[:3], None)
        + make_units("public.wide", keys, None)  # fewer rows than `many`, more bytes
        + make_units("public.many", keys, {k for k in keys if k != "000060"})
    )
    sizes = {"public.small": 10, "public.wide": 9_000, "public.many": 5_000}
    ordered = biggest_first(units, sizes)
    assert [u.table for u in ordered] == ["public.wide"] * 3 + ["public.many"] * 4 + [
        "public.small"
    ]
    assert [(u.first, u.last) for u in ordered if u.table == "public.many"] == [
        ("000000", "000049"),
        ("000050", "000059"),
        ("000061", "000110"),
        ("000111", "000119"),
    ]


def test_installed_wheel_writes_its_dagster_yaml_into_a_new_home(tmp_path: Path) -> None:
    """A pip-installed CLI has no repo checkout beside it: the wheel must carry dagster.yaml
    (one event log, pools, run monitoring) and the example app's Alembic files."""
    import shutil
    import zipfile

    from .testbed import require

    uv = shutil.which("uv")
    require(uv is not None, "uv is needed to build the wheel")
    repo = Path(__file__).resolve().parent.parent
    built = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(repo)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "supabase_migration/example_app/alembic.ini" in names
        packaged = archive.read("supabase_migration/dagster.yaml").decode()
        archive.extractall(tmp_path / "site")
    assert packaged == (repo / "dagster.yaml").read_text()

    home = tmp_path / "home"
    site = str(tmp_path / "site")
    code = (
        "import supabase_migration.commands as c; "
        f"assert c.__file__.startswith({site!r}), c.__file__; c.dagster_instance()"
    )
    env = {**os.environ, "PYTHONPATH": site, "DAGSTER_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    written = (home / "dagster.yaml").read_text()
    assert "supabase_migration.dagster_storage" in written
    assert "env: DAGSTER_HOME" not in written  # every storage's directory spelled out
    assert f"base_dir: {json.dumps(str(home.resolve()))}" in written


def test_ctrl_c_inside_a_step_is_ctrl_c_for_the_cli() -> None:
    """Dagster turns the signal into a step failure; the CLI must still say "Interrupted"."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    from supabase_migration.commands import _run_failure

    @dg.asset
    def interrupted() -> None:
        raise DagsterExecutionInterruptedError()

    result = dg.materialize([interrupted], raise_on_error=False)
    assert not result.success
    with pytest.raises(KeyboardInterrupt):
        _run_failure(result)


@pytest.mark.parametrize("redacted", [False, True], ids=["errors-shown", "errors-redacted"])
def test_ctrl_c_stops_a_step_that_has_a_retry_policy(redacted: bool, monkeypatch) -> None:
    """Dagster retries an interrupted step that has a retry policy (every asset of ours has
    one); the retried attempt finds the interrupt and stops for good. In the run's log, or,
    with DAGSTER_REDACT_USER_CODE_ERRORS masking the error there (a HIPAA-minded setting),
    in the run's tag that the interrupt left on its way out of the body."""
    import signal
    import time

    from supabase_migration.assets import interruptible
    from supabase_migration.commands import _run_failure

    if redacted:
        monkeypatch.setenv("DAGSTER_REDACT_USER_CODE_ERRORS", "1")
    attempts: list[int] = []
    flaky: list[int] = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2, delay=0.1))
    @interruptible
    def long_step(context) -> None:
        attempts.append(context.retry_number)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the terminal sends it
        time.sleep(30)

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2, delay=0.1))
    @interruptible
    def fails_once(context) -> None:  # retried for its own error
        flaky.append(context.retry_number)
        if len(flaky) == 1:
            raise RuntimeError("transient")

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([long_step], raise_on_error=False, instance=instance)
    assert not result.success and attempts == [0]
    with pytest.raises(KeyboardInterrupt):
        _run_failure(result)
    # A re-execution copies its parent run's tags, an interrupt's too: not this run's.
    inherited = {"supabase_migration/interrupted.fails_once": "an-earlier-run"}
    assert dg.materialize([fails_once], instance=instance, tags=inherited).success
    assert flaky == [0, 1]


def test_an_idle_worker_ignores_ctrl_c_and_the_cli_stops_it(tmp_path: Path) -> None:
    """Ctrl-C reaches the terminal's whole process group; the CLI says what happened, once.
    An idle worker stays (leaving then could take the pool's queue lock with it, on which a
    busy sibling would wait for ever once done), without a traceback, and starts no unit
    queued after the interrupt; the CLI's stop ends it, without killing it."""
    code = """
import multiprocessing, os, signal, time
from supabase_migration import commands
workers = commands.Workers(2, None, None)  # warming up fails: no manifest, nothing read
pool = workers.start()
pool.submit(os.getpid).result()
pids = [p.pid for p in multiprocessing.active_children()]
for pid in pids:
    os.kill(pid, signal.SIGINT)
time.sleep(0.3)
alive = len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
unit = commands.Unit("public.t", "000000", "000000", 1)
try:
    pool.submit(commands._worker_execute, "unused", unit).result()
    started = True
except KeyboardInterrupt:
    started = False
print(alive, started, workers.stop(), flush=True)  # 0: none killed, both left
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "True False 0", done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("signal_name", "body"), [("SIGINT", "asset"), ("SIGTERM", "asset"), ("SIGINT", "check")]
)
def test_an_interrupt_cancels_the_query_a_step_waits_on(
    source_db, tmp_path: Path, signal_name: str, body: str
) -> None:
    """Ctrl-C, or SIGTERM (a container's stop, `kill`), which Dagster takes for the same
    interrupt, or a UI terminate: psycopg cancels the query a step waits on only for a
    KeyboardInterrupt, so one raised as Dagster's own error left the query running on the
    server after the step (an asset's, or a check's, as the verification's)."""
    code = """
import os, signal, sys, threading, time
import dagster as dg
import psycopg
from supabase_migration.assets import cancelling_queries, interruptible

url, number, body = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3]
started = threading.Event()

def sleep() -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        started.set()
        conn.execute("SELECT pg_sleep(60) /* held by the step */")

@dg.asset
@interruptible
def sleeper(context: dg.AssetExecutionContext) -> None:
    if body == "asset":
        sleep()

@dg.asset_check(asset=sleeper)
@cancelling_queries
def sleeping_check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    sleep()
    return dg.AssetCheckResult(passed=True)

def interrupt() -> None:
    started.wait()
    time.sleep(0.5)
    os.kill(os.getpid(), number)

threading.Thread(target=interrupt, daemon=True).start()
result = dg.materialize([sleeper, sleeping_check], raise_on_error=False)
print([e.step_failure_data.error.cls_name for e in result.get_step_failure_events()], flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", code, source_db.url, signal_name, body],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip().splitlines()[-1] == "['KeyboardInterrupt']", (
        done.stdout + done.stderr
    )
    import psycopg

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            ["%held by the step%"],
        ).fetchone()
    assert left == (0,)


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("run", "Interrupted before this run copied anything. Run `supabase-migrate run` again."),
        # resume has checked that a run planned the target; the demo's servers are gone
        ("resume", "Interrupted; completed ranges are kept. Run `supabase-migrate resume`."),
        ("demo", "Interrupted."),
    ],
)
def test_ctrl_c_before_the_plan_says_what_goes_on(
    monkeypatch, capsys, tmp_path: Path, command, said
) -> None:
    """`run` interrupted before it planned says to run again; `resume`, which checked that a
    run planned the target, to resume; the demo, whose servers are gone, nothing more."""
    from supabase_migration import cli, commands
    from supabase_migration.inputs import Settings

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def dispatch(args) -> int:
        settings = Settings(manifest_path=tmp_path / "migration.yaml")
        commands.run(settings, resume=args.command == "resume")
        return 0

    monkeypatch.setattr(commands, "_run", interrupted)
    monkeypatch.setattr(cli, "dispatch", dispatch)
    assert cli.main([command]) == 1
    assert capsys.readouterr().err.strip() == said


def test_a_worker_ends_on_sigterm_after_a_dagster_run(tmp_path: Path) -> None:
    """Dagster gives SIGTERM the SIGINT handler as a run ends; a worker's notes Ctrl-C and
    stays, so the pool, which stops its workers with SIGTERM once one has died, could not
    stop the others (the CLI then waited for ever). A worker puts SIGTERM back after each
    unit."""
    code = """
import multiprocessing, signal
import dagster as dg
from supabase_migration import commands

@dg.asset
def trivial() -> None:
    pass

def run_one(defs, instance, unit):
    dg.materialize([trivial])

commands._worker_init(multiprocessing.get_context("fork").Event())
dg.materialize([trivial])
dagster_moved_it = signal.getsignal(signal.SIGTERM) is commands._note_interrupt
signal.signal(signal.SIGTERM, signal.SIG_DFL)
commands._worker_ready = lambda path: None
commands._worker_context = (None, None)
commands.execute_unit = run_one
commands._worker_execute("unused", commands.Unit("public.t", "000000", "000000", 1))
print(dagster_moved_it, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "True True", done.stdout + done.stderr


def test_a_worker_that_the_system_kills_is_one_sentence(tmp_path: Path) -> None:
    """A run that hands units to a pool one of whose workers the system killed (out of memory
    perhaps) says so in one sentence rather than BrokenProcessPool's trace."""
    import multiprocessing
    import signal
    import time
    from concurrent.futures import ProcessPoolExecutor

    from supabase_migration import commands
    from supabase_migration.errors import MigrationError

    context = multiprocessing.get_context("fork")
    stopping = context.Event()
    with ProcessPoolExecutor(
        1, mp_context=context, initializer=commands._worker_init, initargs=(stopping,)
    ) as pool:
        pid = pool.submit(os.getpid).result()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        manifest = dataclasses.replace(MANIFEST, path=tmp_path / "migration.yaml")
        unit = commands.Unit("public.providers", "000000", "000000", 1)
        with pytest.raises(MigrationError, match="A copy worker process ended"):
            commands._execute_all(None, None, manifest, [unit], pool)  # type: ignore[arg-type]


def test_workers_are_gone_when_a_run_stops_on_an_error(tmp_path: Path, monkeypatch) -> None:
    """A run that fails after starting its workers (the setup run failed) leaves no worker or
    executor thread behind for interpreter exit to trip over."""
    import multiprocessing

    import pytest

    from supabase_migration import commands

    path = tmp_path / "migration.yaml"
    manifest_io.write(MANIFEST, path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    with pytest.raises(RuntimeError), commands.Workers(2, build_definitions(MANIFEST), path) as w:
        w.start()
        raise RuntimeError("the setup run failed")
    assert multiprocessing.active_children() == []


def _frozen_objects() -> int:
    import gc

    return gc.get_freeze_count()


def test_forked_workers_leave_inherited_objects_to_the_permanent_generation(
    tmp_path: Path, monkeypatch
) -> None:
    """Each worker's garbage collections skip what it inherited (Dagster, the definitions)
    instead of walking and copying it again; the CLI itself collects as before."""
    import gc

    import pytest

    from supabase_migration import commands

    if commands.start_method() != "fork":
        reason = "workers are spawned here, not forked: they inherit no objects"
        if sys.platform.startswith("linux") and os.environ.get("CI") == "true":
            pytest.fail(reason + " (on Linux another thread is running in the test process)")
        pytest.skip(reason)
    path = tmp_path / "migration.yaml"
    manifest_io.write(MANIFEST, path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert gc.get_freeze_count() == 0
    with commands.Workers(2, build_definitions(MANIFEST), path) as workers:
        pool = workers.start()
        assert pool is not None
        inherited = pool.submit(_frozen_objects).result(timeout=60)
    assert inherited > 10_000
    assert gc.get_freeze_count() == 0


def test_ctrl_c_while_the_program_imports_the_tool_is_one_sentence(monkeypatch, capsys) -> None:
    """The executable's entry point imports the CLI inside its own try: Ctrl-C during those
    imports (about a second) ends with a sentence, not a traceback through an import."""
    import importlib.abc

    from supabase_migration import program

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, *args: object) -> None:
            if name == "supabase_migration.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "supabase_migration.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert program.main() == 1
    assert capsys.readouterr().err == "Interrupted before the command started; nothing was done.\n"


def test_the_program_exits_with_its_objects_frozen(monkeypatch) -> None:
    """`supabase-migrate` returns main's exit code, with every object frozen so that the
    interpreter's teardown does not walk them (main itself, called by tests, freezes nothing)."""
    import gc

    from supabase_migration import cli

    monkeypatch.setattr(cli, "main", lambda: 2)
    try:
        assert cli.console_main() == 2
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_long_lived_objects_load_without_collection_and_stay_frozen_until_released() -> None:
    import gc

    from supabase_migration import memory

    collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        with memory.loading_long_lived():
            assert not gc.isenabled()
            loaded = [[i] for i in range(100_000)]  # enough allocations to trigger collections
        assert collections == []
        assert gc.isenabled() and gc.get_freeze_count() >= len(loaded)
        with memory.frozen_while_forking():
            assert gc.get_freeze_count() >= len(loaded)
        assert gc.get_freeze_count() >= len(loaded)  # what was frozen before stays frozen
        memory.release()
        assert gc.get_freeze_count() == 0
        with memory.frozen_while_forking():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0  # the parent collects as before once forked
        gc.disable()
        with memory.loading_long_lived():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
        gc.callbacks.remove(count)
        memory.release()


_IMPORTS_AS_A_COMMAND = """
import gc, sys
from supabase_migration import cli
assert "dagster" not in sys.modules
before = gc.get_stats()[2]["collections"]
code = cli.main(["plan"])
print(code, "dagster" in sys.modules, gc.get_stats()[2]["collections"] - before,
      gc.get_freeze_count(), gc.isenabled())
"""


def test_a_command_imports_dagster_without_full_collections_and_leaves_nothing_frozen(
    tmp_path: Path,
) -> None:
    """Every copy waits for the CLI's import of Dagster: no full collection walks what it
    loads again and again meanwhile (two of them before, 0.2 s of the start-up), and the
    command, here one that stops at once for want of a source, unfreezes it when it ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("SUPABASE_DB_URL", "DAGSTER_HOME")}
    env["SOURCE_DATABASE_URL"] = ""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AS_A_COMMAND],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert "No source database given" in done.stderr
    assert done.stdout.split() == ["2", "True", "0", "0", "True"]


def test_a_relative_dagster_home_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """Dagster needs an absolute DAGSTER_HOME; a relative one (or ~) is resolved before
    anything else, instead of failing when the instance opens."""
    from supabase_migration import commands

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", "relative-home")
    instance = commands.dagster_instance()
    assert os.environ["DAGSTER_HOME"] == str(tmp_path / "relative-home")
    assert (tmp_path / "relative-home" / "history" / "runs.db").exists()
    instance.dispose()


@pytest.mark.parametrize("reader", ["manifest", "policy file", "verification report"])
def test_every_file_a_user_gives_fails_alike_and_never_shows_its_content(
    tmp_path: Path, reader: str
) -> None:
    """The manifest, the policy SQL and the verification report to repair from: missing, not
    UTF-8, or not a file, each is one sentence naming the file (exit code 2), not its bytes."""
    from supabase_migration.report import REPORT_BASENAME, read_repair
    from supabase_migration.security import read_policy_file

    def read(path: Path) -> object:
        if reader == "manifest":
            return manifest_io.read(path)
        if reader == "policy file":
            return read_policy_file(path)
        return read_repair(path.parent, "postgres@db.example:5432/postgres")

    name = f"{REPORT_BASENAME}.json" if reader == "verification report" else "input"
    missing, binary, folder = (tmp_path / d / name for d in ("missing", "binary", "folder"))
    binary.parent.mkdir()
    binary.write_bytes(b"\xff\xfe SSN 123-45-6789")
    folder.mkdir(parents=True)
    for path, needle in (
        (missing, "does not exist" if reader == "policy file" else "No "),
        (binary, "cannot be read (not UTF-8 text)"),
        (folder, "cannot be read (Is a directory)"),
    ):
        with pytest.raises(ConfigError) as info:
            read(path)
        message = info.value.message
        assert needle in message and str(path) in message, message
        assert "123-45-6789" not in message and message.count(". ") == 0, message
        assert info.value.exit_code == 2
