"""What users do between runs (edit migration.yaml, point the CLI at another database), and
what the commands make of it.

Real servers: the test bed's source and Supabase-like target, the CLI as a user runs it.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import yaml

from .test_cli import cli
from .testbed import cli_env

PHI = "PHIMARK"  # in every value that is not a key: never printed

SCHEMA = f"""
CREATE TABLE owners (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE pets (id bigint PRIMARY KEY, owner_id bigint REFERENCES owners, name text);
CREATE TABLE notes (id bigint PRIMARY KEY, body text);
INSERT INTO owners SELECT g, '{PHI} owner ' || g FROM generate_series(1, 1000) g;
INSERT INTO pets SELECT g, 1 + g % 1000, '{PHI} pet ' || g FROM generate_series(1, 2000) g;
INSERT INTO notes SELECT g, '{PHI} note ' || g FROM generate_series(1, 500) g;
"""


# A first migration, its verification left out where a test does not look at it (seconds each).
FIRST_RUN = ("run", "--no-progress", "--no-verify", "--batch-size", "300")


@pytest.fixture
def bed(source_db, target_db, tmp_path: Path):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    env = cli_env(source_db.url, target_db.url, tmp_path)
    return source_db, target_db, env, tmp_path


def _said_cleanly(done) -> str:
    text = done.stdout + done.stderr
    assert "Traceback" not in text and PHI not in text, text
    return text


def _edit(tmp_path: Path, old: str, new: str) -> None:
    path = tmp_path / "migration.yaml"
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new, 1))


def _readable_by_anon(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [
            name
            for (name,) in conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind = 'r' AND NOT relrowsecurity "
                "AND has_table_privilege('anon', oid, 'SELECT') ORDER BY 1"
            )
        ]


def test_a_misspelt_exposed_schema_is_refused_before_anything_is_written(bed):
    """`exposed_schemas: [pubic]` left public's tables without row level security, readable
    by the API roles (the REST API), and plan, run and verify all passed."""
    _, target_db, env, tmp_path = bed
    assert cli(["init"], env, tmp_path).returncode == 0
    _edit(tmp_path, "exposed_schemas:\n- public", "exposed_schemas:\n- pubic")
    sentence = (
        "exposed_schemas in migration.yaml lists pubic, which is neither a migrated schema "
        "nor a schema of the target"
    )
    plan = cli(["plan"], env, tmp_path)
    assert plan.returncode == 2 and sentence in _said_cleanly(plan), plan.stdout
    run = cli(["run", "--no-progress"], env, tmp_path)
    assert run.returncode == 2 and sentence in _said_cleanly(run), run.stderr
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.notes')").fetchone() == (None,)


def test_public_left_out_of_exposed_schemas_fails_verification_while_the_api_can_read_it(bed):
    """A schema that exists, but not public: the tables keep Supabase's default grants and no
    row level security. plan warns; the run's verification fails, naming them."""
    _, target_db, env, tmp_path = bed
    assert cli(["init"], env, tmp_path).returncode == 0
    _edit(tmp_path, "exposed_schemas:\n- public", "exposed_schemas:\n- extensions")
    plan = cli(["plan"], env, tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "exposed_schemas in migration.yaml leaves out public" in _said_cleanly(plan)
    run = cli(["run", "--no-progress"], env, tmp_path)
    assert run.returncode == 1, run.stderr
    assert _readable_by_anon(target_db.admin_url) == ["notes", "owners", "pets"]
    report = (tmp_path / "migration-report" / "verification_report.md").read_text()
    assert (
        "Table public.notes has no row level security and anon, authenticated can read it" in report
    ), report


@pytest.fixture
def other_source(source_server, request):
    """A second database on the source's server with the same tables (staging beside
    production)."""
    name = "src_other_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:30]
    source_server.create_database(name)
    yield source_server.url(dbname=name)
    source_server.drop_database(name)


def _counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("owners", "pets", "notes")
        }


def test_another_source_database_is_refused_until_the_user_says_the_source_moved(bed, other_source):
    """SOURCE_DATABASE_URL naming staging instead of production (the same tables): `run`
    took it for a catch-up, deleted every target row staging lacks, and verified. A
    partition materialized in the UI is refused alike."""
    _, target_db, env, tmp_path = bed
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    with psycopg.connect(other_source, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("DELETE FROM pets WHERE id > 100; DELETE FROM notes WHERE id > 10")
    before = _counts(target_db.url)
    elsewhere = {**env, "SOURCE_DATABASE_URL": other_source}
    for command in ("run", "resume"):
        refused = cli([command, "--no-progress"], elsewhere, tmp_path)
        assert refused.returncode == 2, refused.stderr
        (line,) = _said_cleanly(refused).strip().splitlines()
        assert line.startswith("error: This target was migrated from database src_"), line
        assert "run `supabase-migrate run --new-source`" in line, line
    ui = _ui_partition_failure(tmp_path, other_source, target_db.url, "public.pets")
    assert ui.startswith("This target was migrated from database src_"), ui
    assert _counts(target_db.url) == before
    moved = cli(["run", "--no-progress", "--new-source"], elsewhere, tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert "Migrating from database src_other_" in _said_cleanly(moved)
    assert _counts(target_db.url) == {"owners": 1000, "pets": 100, "notes": 10}
    again = cli(["run", "--no-progress"], elsewhere, tmp_path)  # recorded now
    assert again.returncode == 0, again.stderr


def _ui_partition_failure(tmp_path: Path, source_url: str, target_url: str, table: str) -> str:
    """The failure shown in the UI when one partition of `table` is materialized with these
    databases (the migration.yaml in `tmp_path`)."""
    from supabase_migration.assets import table_asset_key

    result = _materialized_in_ui(
        tmp_path, source_url, target_url, table_asset_key(table), partition_of=table
    )
    (step,) = [e for e in result.all_events if e.is_step_failure]
    return step.step_failure_data.user_failure_data.description  # type: ignore[union-attr]


def _materialized_in_ui(
    tmp_path: Path, source_url: str, target_url: str, key, *, partition_of: str | None = None
):
    """The result of materializing the asset `key` alone, as from the UI, with these databases
    (the migration.yaml in `tmp_path`); partition 000000 of the table `partition_of`."""
    import dagster as dg

    from supabase_migration.assets import partitions_def_name
    from supabase_migration.definitions import load_definitions
    from supabase_migration.resources import SourceDatabase, TargetDatabase

    asset = load_definitions(tmp_path / "migration.yaml").get_assets_def(key)
    with dg.DagsterInstance.ephemeral() as instance:
        if partition_of:
            instance.add_dynamic_partitions(partitions_def_name(partition_of), ["000000"])
        return dg.materialize(
            [asset],
            instance=instance,
            resources={
                "source": SourceDatabase(url=source_url),
                "target": TargetDatabase(url=target_url),
            },
            partition_key="000000" if partition_of else None,
            raise_on_error=False,
        )


def _manifest_refused(tmp_path: Path, text: str) -> str:
    from supabase_migration import manifest
    from supabase_migration.errors import ConfigError

    path = tmp_path / "migration.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        manifest.read(path)
    return caught.value.message


GOOD = """\
version: 1
schemas: [public]
exclude: []
tables:
  public.notes: {key: [id], key_source: primary_key}
  public.pets: {key: [id], key_source: primary_key, batch_size: 50}
"""


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (("exclude: []", "exlude: []"), "a key this release does not know (exlude)"),
        (("batch_size: 50", "btach_size: 50"), "(public.pets: btach_size)"),
        (("exclude: []", "exclude: []\ntables:\n  public.x: {key: [id]}"), "names tables twice"),
        (("  public.pets:", "  public.notes: {key: [id]}\n  public.pets:"), "names public.notes"),
        (("schemas: [public]", "schemas: [billing]"), "outside its schemas (billing)"),
        (("version: 1", "version: '1'"), "version must be the number 1"),
        (("tables:", "tables: ["), "not valid YAML (ParserError at line"),
    ],
)
def test_a_hand_edit_the_manifest_cannot_mean_is_refused_naming_it(tmp_path, edit, said):
    """Misspelt keys were ignored, a key given twice lost the first, a table of a schema not
    listed failed its copy late ("materialize migration/schema first", which would not make
    it), `version: '1'` read "is version 1, and this release reads version 1", and a syntax
    error said no line."""
    from supabase_migration import manifest

    (tmp_path / "ok.yaml").write_text(GOOD)
    assert len(manifest.read(tmp_path / "ok.yaml").tables) == 2
    message = _manifest_refused(tmp_path, GOOD.replace(*edit, 1))
    assert said in message, message


def test_a_key_edited_in_the_manifest_is_refused_not_ignored(bed):
    """The ranges are keyed by the source's primary key (or a unique index): a key changed
    in the manifest by hand was ignored without a word."""
    _, _, env, tmp_path = bed
    assert cli(["init"], env, tmp_path).returncode == 0
    _edit(
        tmp_path, "  public.notes:\n    key:\n    - id\n", "  public.notes:\n    key:\n    - body\n"
    )
    for command in (["plan"], ["run", "--no-progress"]):
        done = cli(command, env, tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        said = _said_cleanly(done)
        assert "The manifest gives public.notes the key (body), but its ranges are keyed" in said


def test_a_table_taken_out_of_the_manifest_after_its_copy_is_a_warning_not_a_failure(bed):
    """It was taken for a table the source gained since `init`: verify, run and resume
    failed on it for ever (exit 1, "run init again to add it")."""
    _, _, env, tmp_path = bed
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    path = tmp_path / "migration.yaml"
    doc = yaml.safe_load(path.read_text())
    del doc["tables"]["public.notes"]
    path.write_text(yaml.safe_dump(doc))
    said = "public.notes is no longer in"
    for args in (["plan"], ["verify"], ["run", "--no-progress"]):
        done = cli(args, env, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert said in _said_cleanly(done), done.stdout + done.stderr
    with psycopg.connect(bed[0].url) as conn:  # the source gains a table: still a failure
        conn.execute("CREATE TABLE visits (id int PRIMARY KEY)")
    gained = cli(["verify"], env, tmp_path)
    assert gained.returncode == 1 and "(public.visits), so nothing migrates it" in gained.stdout


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (
            ("exposed_schemas:\n- public", "exposed_schemas:\n- public\n- supabase_migration"),
            "lists supabase_migration, the migration's bookkeeping schema",
        ),
        (
            (
                "schema_mode: dump\nalembic_config: null",
                "schema_mode: alembic\nalembic_config: nowhere/alembic.ini",
            ),
            "The Alembic configuration",
        ),
    ],
    ids=["bookkeeping_exposed", "alembic_config_missing"],
)
def test_plan_refuses_what_run_would_refuse_in_the_manifest(bed, edit, said):
    """plan passed both (exit 0); run refused them, one with a garbled "..., so the schema was
    rolled back with it"."""
    _, _, env, tmp_path = bed
    assert cli(["init"], env, tmp_path).returncode == 0
    _edit(tmp_path, *edit)
    for command in ("plan", "run"):
        done = cli([command, "--no-progress"] if command == "run" else [command], env, tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert said in _said_cleanly(done)
        assert "with it" not in done.stdout + done.stderr


def test_a_target_table_dropped_after_its_copy_is_named_with_the_way_out(bed):
    """run and resume skipped its completed ranges and failed verification run after run,
    `run --repair` repaired nothing, and `verify --tables` said to run first; status showed
    its ranges completed."""
    _, target_db, env, tmp_path = bed
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("DROP TABLE notes")
    said = "public.notes was copied but no longer exists on the target (dropped by hand?)"
    status = cli(["status"], env, tmp_path)
    assert status.returncode == 0 and said in _said_cleanly(status), status.stdout
    for args in (["run", "--no-progress"], ["resume", "--no-progress"], ["verify"]):
        done = cli(args, env, tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert said in _said_cleanly(done), done.stderr
    with psycopg.connect(target_db.url, autocommit=True) as conn:  # the way out it says
        conn.execute(
            "CREATE TABLE notes (id bigint PRIMARY KEY, body text); "
            "ALTER TABLE notes ENABLE ROW LEVEL SECURITY; "
            "DELETE FROM supabase_migration.migration_checkpoints WHERE table_name = 'public.notes'"
        )
    done = cli(["run", "--no-progress"], env, tmp_path)
    assert done.returncode == 0, done.stderr


def test_a_refused_run_leaves_the_reviewed_manifest_as_it_was(bed):
    """`run --schema-mode none` on a fresh target wrote schema_mode none into the manifest,
    then preflight refused it (the target has no tables): the file users review and commit
    kept a setting nothing had run with."""
    _, _, env, tmp_path = bed
    assert cli(["init"], env, tmp_path).returncode == 0
    reviewed = (tmp_path / "migration.yaml").read_text()
    refused = cli(["run", "--no-progress", "--schema-mode", "none"], env, tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "Put " in refused.stderr and "back as it was before this run." in refused.stderr
    assert (tmp_path / "migration.yaml").read_text() == reviewed
    done = cli(["run", "--no-progress", "--batch-size", "500"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "batch_size: 500" in (tmp_path / "migration.yaml").read_text()  # kept once planned


def test_a_target_whose_bookkeeping_was_dropped_is_described_with_the_way_out(bed):
    """status said "Nothing planned on the target yet" beside the copied rows, and resume
    that no run had planned the target. (run says the schema has objects this tool did not
    make, and to rerun with --schema-mode none, as for a schema the user made.)"""
    _, target_db, env, tmp_path = bed
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA supabase_migration CASCADE")
    said = "The target has 3 of the manifest's 3 tables (public.notes, public.owners, public"
    # Named by --manifest (resume read the default manifest for this sentence).
    (tmp_path / "migration.yaml").rename(tmp_path / "clinic.yaml")
    named = ["--manifest", str(tmp_path / "clinic.yaml")]
    status = cli(["status", *named], env, tmp_path)
    assert status.returncode == 0 and said in _said_cleanly(status), status.stdout
    done = cli(["resume", "--no-progress", *named], env, tmp_path)
    assert done.returncode == 2 and said in _said_cleanly(done), done.stderr
    (tmp_path / "clinic.yaml").rename(tmp_path / "migration.yaml")
    done = cli(["run", "--no-progress"], env, tmp_path)
    assert done.returncode == 2 and "rerun with --schema-mode none" in _said_cleanly(done)
    done = cli(["run", "--no-progress", "--schema-mode", "none"], env, tmp_path)  # the way out
    assert done.returncode == 0, done.stderr


def test_plan_after_a_batch_size_edit_shows_the_ranges_kept(bed):
    """plan replanned every table at the new batch size (pets: 40 ranges at 50 rows) while
    run keeps the ranges planned before (pets: 7 at 300) and splits only the last one."""
    _, target_db, env, tmp_path = bed
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    _edit(tmp_path, "batch_size: 300", "batch_size: 50")
    plan = cli(["plan"], env, tmp_path)
    assert plan.returncode == 0, plan.stderr
    with psycopg.connect(target_db.url) as conn:
        kept = dict(
            conn.execute(
                "SELECT table_name, count(*) FROM supabase_migration.migration_checkpoints "
                "GROUP BY 1"
            ).fetchall()
        )
    for name, count in kept.items():
        assert f"| {name} | integer | {count} | id; planned by an earlier run" in plan.stdout


def test_a_misspelt_table_name_is_what_run_names_first(bed):
    """run named what followed from it instead: public.pets's foreign key to public.owners,
    "which is not migrated"."""
    _, _, env, tmp_path = bed
    assert cli(["init"], env, tmp_path).returncode == 0
    _edit(tmp_path, "  public.owners:", "  public.Owners:")
    done = cli(["run", "--no-progress"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    last = _said_cleanly(done).strip().splitlines()[-1]
    assert last.startswith(
        "error: Preflight stopped the migration before anything was written: Table "
        "public.Owners is in the manifest but not in the source"
    ), last


EMAILS = (
    "CREATE TABLE u (id int PRIMARY KEY, email text NOT NULL); "
    "CREATE UNIQUE INDEX u_email_lower ON u (lower(email)); "
    "INSERT INTO u SELECT g, 'User' || g || '@x.org' FROM generate_series(1, 500) g"
)


def test_a_value_moved_under_an_expression_index_says_how_to_get_past_it(
    source_db, target_db, tmp_path
):
    """Two users swap emails under a unique index on lower(email): a re-sync updating row by
    row collides with the row still holding the other's, and the copy cannot follow such an
    index's values between rows. It failed run after run, advising to "fix the cause and
    resume"; it says how to copy the table anew, which converges. A value reused after a
    delete converges by itself, whichever range goes first: the deleting range's unit ran
    after the colliding one's, whose failure stood (ranges far apart are two units)."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(EMAILS)
    env = cli_env(source_db.url, target_db.url, tmp_path)
    # One worker: the units of the changed ranges are copied in key order.
    run = ["run", "--no-progress", "--no-verify", "--batch-size", "100", "--workers", "1"]
    assert cli(run, env, tmp_path).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("DELETE FROM u WHERE id = 5; INSERT INTO u VALUES (100000, 'user5@X.org')")
    assert cli(run, env, tmp_path).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:  # the taker's range first
        conn.execute(
            "DELETE FROM u WHERE id = 400; UPDATE u SET email = 'USER400@x.org' WHERE id = 7"
        )
    again = cli(run, env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Copying again 1 range(s) whose unique values other units held." in again.stderr
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE u SET email = 'tmp' WHERE id = 6; "
            "UPDATE u SET email = 'User6@x.org' WHERE id = 450; "
            "UPDATE u SET email = 'User450@x.org' WHERE id = 6"
        )
    failed = cli(run, env, tmp_path)
    assert failed.returncode == 1, failed.stderr
    said = _said_cleanly(failed)
    assert "a value under u_email_lower (an expression or partial unique index" in said, said
    assert "User6" not in said and "User450" not in said
    with psycopg.connect(target_db.url, autocommit=True) as conn:  # the way it gives
        conn.execute(
            "TRUNCATE u; DELETE FROM supabase_migration.migration_checkpoints "
            "WHERE table_name = 'public.u'"
        )
    assert cli(run, env, tmp_path).returncode == 0


@pytest.fixture
def no_replica_mode(target_db):
    """A target whose postgres may not set session_replication_role (a self-hosted or
    managed PostgreSQL other than Supabase)."""
    revoke = "REVOKE SET ON PARAMETER session_replication_role FROM postgres"
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(revoke)
    try:
        yield
    finally:
        with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
            conn.execute(revoke.replace("REVOKE", "GRANT").replace("FROM", "TO"))


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        (
            "CREATE TABLE t (id int PRIMARY KEY, v text); "
            "CREATE FUNCTION bang() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "NEW.v := NEW.v || '!'; RETURN NEW; END $$; "
            "CREATE TRIGGER t_bang BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION bang(); "
            "ALTER TABLE t DISABLE TRIGGER t_bang; "
            "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 300) g; "
            "ALTER TABLE t ENABLE TRIGGER t_bang",
            "so the triggers of public.t would fire on every row the copy writes",
        ),
        (
            "CREATE TABLE t (id int PRIMARY KEY, parent int REFERENCES t); "
            "INSERT INTO t SELECT g, NULL FROM generate_series(1, 300) g; "
            "UPDATE t SET parent = 300 WHERE id < 300",
            "the foreign keys of public.t (referencing itself) would be checked as each range",
        ),
        (
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE t_log (id int); "
            "CREATE RULE t_logged AS ON UPDATE TO t DO ALSO INSERT INTO t_log VALUES (NEW.id); "
            "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 300) g",
            "so the rules of public.t would act on the rows a re-sync inserts, updates or",
        ),
    ],
    ids=["trigger", "self_reference", "rule"],
)
def test_without_replica_mode_what_would_go_wrong_is_refused_first(
    source_db, target_db, tmp_path, no_replica_mode, schema, said
):
    """The copy then runs with triggers and foreign keys live: a trigger changed every copied
    value (verification failed after the copy), a self-reference failed the ranges whose
    parents come later, run after run; nothing said so before."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(schema)
    env = cli_env(source_db.url, target_db.url, tmp_path)
    for args in (["plan"], ["run", "--no-progress", "--batch-size", "100"]):
        done = cli(args, env, tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert said in _said_cleanly(done)
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)


def test_a_table_with_rules_is_caught_up_without_its_rules_acting(source_db, target_db, tmp_path):
    """INSERT ... ON CONFLICT refuses a table with an UPDATE or INSERT rule: every range of a
    catch-up failed. Its rules, copied by the schema step, must not act on the catch-up's
    writes either (an audit row for each update, a delete turned into nothing)."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE t_log (id int, v text); "
            "CREATE RULE t_logged AS ON UPDATE TO t DO ALSO INSERT INTO t_log VALUES (NEW.id); "
            "CREATE RULE t_kept AS ON DELETE TO t DO INSTEAD NOTHING; "
            f"INSERT INTO t SELECT g, '{PHI} ' || g FROM generate_series(1, 300) g"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    assert cli(FIRST_RUN, env, tmp_path).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "SET session_replication_role = replica; "  # the application's writes, unruled
            "UPDATE t SET v = 'w' WHERE id IN (5, 150); INSERT INTO t VALUES (301, 'x'); "
            "DELETE FROM t WHERE id = 7"
        )
    done = cli(["run", "--no-progress"], env, tmp_path)
    assert done.returncode == 0, _said_cleanly(done)
    assert "Migration complete and verified" in done.stdout
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM t").fetchone() == (300, 45444)
        assert conn.execute("SELECT count(*) FROM t_log").fetchone() == (0,)


def test_status_says_when_the_steps_after_the_copy_have_not_run_since(bed):
    """A run whose sequences step failed after it copied new rows left every range completed:
    status showed the migration done, and the application's first insert would have failed
    on a duplicate key."""
    source_db, target_db, env, tmp_path = bed
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE visits (id serial PRIMARY KEY); INSERT INTO visits DEFAULT VALUES"
        )
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    behind = "not run since the last range was copied: `supabase-migrate run` finishes"
    status = cli(["status"], env, tmp_path)
    assert "public.visits" in status.stdout and behind not in status.stdout, status.stdout
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(
            "REVOKE ALL ON SEQUENCE public.visits_id_seq "
            "FROM postgres, anon, authenticated, service_role, PUBLIC"
        )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("INSERT INTO visits DEFAULT VALUES")
    failed = cli(["run", "--no-progress", "--no-verify"], env, tmp_path)
    assert failed.returncode != 0, failed.stderr
    status = cli(["status"], env, tmp_path)
    assert status.returncode == 0 and behind in _said_cleanly(status), status.stdout
    assert "The sequences step (each set past the copied rows), the security" in status.stdout
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("GRANT ALL ON SEQUENCE public.visits_id_seq TO postgres")
    assert cli(["run", "--no-progress", "--no-verify"], env, tmp_path).returncode == 0
    assert behind not in cli(["status"], env, tmp_path).stdout


def test_a_range_committed_after_the_sequences_step_read_leaves_the_step_behind(bed):
    """A range's checkpoint was dated by its transaction's start. A range run in the UI that
    began before a sequences step and committed after it (its write waited on a lock) then
    read as copied before that step: status said nothing, while the sequence stood below the
    copied key and the application's next insert would have collided with it."""
    from supabase_migration.assets import SEQUENCES_KEY, table_asset_key

    source_db, target_db, env, tmp_path = bed
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE visits (id serial PRIMARY KEY); INSERT INTO visits DEFAULT VALUES"
        )
    assert cli([*FIRST_RUN, "--include", "public.visits"], env, tmp_path).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("INSERT INTO visits (id) VALUES (2)")  # a key its sequence did not give
    with psycopg.connect(target_db.admin_url) as holder, ThreadPoolExecutor(1) as ui:
        holder.execute("LOCK TABLE public.visits IN SHARE MODE")  # reads pass, writes wait
        ranged = ui.submit(
            _materialized_in_ui,
            tmp_path,
            source_db.url,
            target_db.url,
            table_asset_key("public.visits"),
            partition_of="public.visits",
        )
        _wait_for_a_lock_wait(target_db.admin_url, ranged)
        step = _materialized_in_ui(tmp_path, source_db.url, target_db.url, SEQUENCES_KEY)
        assert step.success
        holder.rollback()
        assert ranged.result(timeout=60).success
    with psycopg.connect(target_db.admin_url) as conn:  # what the test stands for
        assert conn.execute(
            "SELECT max(id), (SELECT last_value + is_called::int FROM visits_id_seq) FROM visits"
        ).fetchone() == (2, 2)
    status = cli(["status"], env, tmp_path)
    assert "the sequences step (each set past the copied rows)" in _said_cleanly(status).lower(), (
        status.stdout
    )
    assert cli(["run", "--no-progress", "--no-verify"], env, tmp_path).returncode == 0
    assert "not run since the last range was copied" not in cli(["status"], env, tmp_path).stdout


def _wait_for_a_lock_wait(admin_url: str, running) -> None:
    deadline = time.monotonic() + 60
    with psycopg.connect(admin_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            assert not running.done(), running.result()
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND usename = 'postgres'"
            ).fetchone()
            if waiting[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the range never waited on the lock")


def test_status_on_a_target_whose_bookkeeping_predates_the_steps_record(bed):
    """A target migrated by a release before `migration_steps`: nothing says its steps did not
    run there, so status says nothing of them (and does not fail); the next run records them."""
    _, target_db, env, tmp_path = bed
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("DROP TABLE supabase_migration.migration_steps")
    status = cli(["status"], env, tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "public.pets" in status.stdout
    assert "not run since" not in _said_cleanly(status)
    assert cli(["run", "--no-progress", "--no-verify"], env, tmp_path).returncode == 0
    with psycopg.connect(target_db.admin_url) as conn:
        steps = conn.execute("SELECT step FROM supabase_migration.migration_steps ORDER BY 1")
        assert [s for (s,) in steps] == ["materialized_views", "security", "sequences"]


def test_a_float_changed_on_the_source_is_written_to_a_target_that_rounds_floats(bed):
    """A target database set to `extra_float_digits = 0` prints floats rounded, and a re-sync
    writes only the rows whose text differs from the target's: a float changed in its last
    digits read as unchanged. The range was marked completed with the source's new checksum,
    so no run, `--repair` included, ever wrote it; verification failed every time."""
    source_db, target_db, env, tmp_path = bed
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE readings (id int PRIMARY KEY, x float8, r real); "
            "INSERT INTO readings SELECT g, 0.1, 0.1 FROM generate_series(1, 100) g"
        )
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{target_db.name}" SET extra_float_digits = 0')
    assert cli([*FIRST_RUN], env, tmp_path).returncode == 0
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE readings SET x = 0.1 + 2e-17 WHERE id = 5; "
            "UPDATE readings SET r = 0.10000001 WHERE id = 7"
        )
    again = cli(["run", "--no-progress"], env, tmp_path)
    assert again.returncode == 0, _said_cleanly(again)
    exact = "SELECT id, x::text, r::text FROM readings WHERE id IN (5, 7) ORDER BY id"
    rows = []
    for url in (source_db.url, target_db.url):
        with psycopg.connect(url) as conn:
            conn.execute("SET extra_float_digits = 1")
            rows.append(conn.execute(exact).fetchall())
    assert rows[0] == rows[1] == [(5, "0.10000000000000002", "0.1"), (7, "0.1", "0.10000001")]


def test_a_target_showing_dates_otherwise_than_iso_is_refused_with_what_to_set(bed):
    """A target database set to `DateStyle = 'SQL, DMY'`: psycopg reads dates as text only
    in the ISO style, so every step failed 'unexpectedly (NotImplementedError)', run after
    run. Preflight says what to set; 'ISO, DMY' (how dates are read kept) then migrates."""
    _, target_db, env, tmp_path = bed
    alter = f'ALTER DATABASE "{target_db.name}" SET DateStyle = '
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(alter + "'SQL, DMY'")
    refused = cli([*FIRST_RUN], env, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        "The target database shows dates in the SQL, DMY style, and this tool reads them only "
        "in ISO; set it for the migration (ALTER DATABASE ... SET DateStyle = 'ISO, DMY'"
    ) in _said_cleanly(refused)
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(alter + "'ISO, DMY'")
    done = cli(["run", "--no-progress", "--batch-size", "300"], env, tmp_path)
    assert done.returncode == 0, _said_cleanly(done)


def test_filters_given_to_a_first_run_are_said_to_stay(bed):
    """`run --include public.owners` wrote the filter into the new migration.yaml, and a later
    plain `run` and `verify` passed with the other tables empty on the target, nothing said."""
    _, _, env, tmp_path = bed
    done = cli([*FIRST_RUN, "--include", "public.owners"], env, tmp_path)
    assert done.returncode == 0, _said_cleanly(done)
    assert (
        "with the filters given: 1 table. Later commands keep to them (its include and "
        "exclude lists) until they are changed there or given again."
    ) in _said_cleanly(done)
    again = cli(["run", "--no-progress", "--no-verify"], env, tmp_path)
    assert "filters given" not in _said_cleanly(again)
