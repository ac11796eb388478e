"""Schema mode alembic against what users' Alembic projects do: print or raise with their URL,
exit, fail to import, raise with a row's values, commit revision by revision, stand at base.

Real servers: the source and the Supabase-like target of the test bed, the CLI as a user runs
it where the claim is about its output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote, quote_plus

import psycopg
import pytest

from supabase_migration.errors import ConfigError, MigrationError
from supabase_migration.schema_apply import apply_schema

from .test_cli import cli
from .test_schema_apply import (
    COOKBOOK_ENV,
    GENERATED_ENV,
    _add_revision,
    _alembic_project,
    _urls,
    execute,
    public_tables,
)
from .testbed import TARGET_PASSWORD, cli_env

# Every form the target's password takes in text: as is, and encoded as in a URL.
PASSWORD_FORMS = sorted(
    {TARGET_PASSWORD, quote(TARGET_PASSWORD, safe=""), quote_plus(TARGET_PASSWORD)}
)


def leaked(text: str) -> list[str]:
    return [form for form in PASSWORD_FORMS if form in text]


def leaked_in_files(root: Path) -> list[str]:
    """Password forms found in any file under root (Dagster's SQLite event log included)."""
    return [
        f"{path}: {form}"
        for path in root.rglob("*")
        if path.is_file()
        for form in PASSWORD_FORMS
        if form.encode() in path.read_bytes()
    ]


def _one_table_project(root: Path, env_py: str) -> Path:
    return _alembic_project(root, env_py, [("p1", "CREATE TABLE notes (id int PRIMARY KEY)")])


def _run(source_db, target_db, tmp_path: Path, ini: Path):
    env = cli_env(source_db.url, target_db.url, tmp_path)
    args = ["run", "--schema-mode", "alembic", "--alembic-config", str(ini), "--no-verify"]
    return cli(args, env, tmp_path)


def _one_sentence(done) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: "), line
    return line


PRINTING_ENV = GENERATED_ENV.replace(
    "def run_migrations_online():",
    "print('alembic url:', config.get_main_option('sqlalchemy.url'))\n\n"
    "def run_migrations_online():",
)


def test_an_env_py_printing_its_url_does_not_show_the_password(source_db, target_db, tmp_path):
    """A common debugging line in env.py. The URL it prints is ours, with the target's
    password in it: what env.py writes is masked on its way out."""
    execute(source_db.url, "CREATE TABLE notes (id int PRIMARY KEY)")
    ini = _one_table_project(tmp_path / "app", PRINTING_ENV)
    done = _run(source_db, target_db, tmp_path, ini)
    assert done.returncode == 0, done.stderr
    assert "alembic url: postgresql+psycopg://postgres:" in done.stdout + done.stderr
    assert leaked(done.stdout + done.stderr) == []
    assert leaked_in_files(tmp_path / "dagster_home") == []


RAISING_ENV = GENERATED_ENV.replace(
    "run_migrations_online()\n",
    "raise RuntimeError('cannot migrate ' + config.get_main_option('sqlalchemy.url'))\n",
)
EXITING_ENV = GENERATED_ENV.replace(
    "run_migrations_online()\n",
    "import sys\nsys.exit('refusing to migrate ' + config.get_main_option('sqlalchemy.url'))\n",
)


@pytest.mark.parametrize("env_py", [RAISING_ENV, EXITING_ENV], ids=["raise", "sys_exit"])
def test_an_env_py_failing_with_its_url_is_one_sentence_without_it(
    source_db, target_db, tmp_path, env_py
):
    """`sys.exit(...)` escaped every handler: the step failed "unexpectedly" (exit 1), was
    retried, and Dagster's event log kept the message, password and all."""
    execute(source_db.url, "CREATE TABLE notes (id int PRIMARY KEY)")
    ini = _one_table_project(tmp_path / "app", env_py)
    done = _run(source_db, target_db, tmp_path, ini)
    line = _one_sentence(done)
    assert "migrations/env.py, line" in line, line
    assert leaked(done.stdout + done.stderr) == []
    assert leaked_in_files(tmp_path / "dagster_home") == []


@pytest.mark.parametrize(
    ("revision_text", "named"),
    [
        ("revision = 'q2'\ndown_revision = 'q1'\ndef upgrade(:\n    pass\n", "q2_broken.py"),
        (
            "import clinic_helpers_missing\nrevision = 'q2'\ndown_revision = 'q1'\n"
            "def upgrade():\n    pass\n",
            "module clinic_helpers_missing",
        ),
    ],
    ids=["syntax_error", "import_error"],
)
def test_a_revision_file_that_does_not_load_is_one_sentence_naming_it(
    source_db, target_db, tmp_path, revision_text, named
):
    """It failed "unexpectedly", exit 1, retried, naming nothing."""
    execute(source_db.url, "CREATE TABLE notes (id int PRIMARY KEY)")
    ini = _one_table_project(tmp_path / "app", COOKBOOK_ENV)
    (ini.parent / "migrations" / "versions" / "q2_broken.py").write_text(revision_text)
    line = _one_sentence(_run(source_db, target_db, tmp_path, ini))
    assert named in line and "unexpectedly" not in line, line


@pytest.mark.parametrize(
    ("env_py", "said"),
    [
        (
            "import os\nAPP = os.environ['CLINIC_SETTINGS']\n" + COOKBOOK_ENV,
            "KeyError raised at migrations/env.py, line 2",
        ),
        (
            "import clinic_models_not_installed\n" + COOKBOOK_ENV,
            "ModuleNotFoundError (module clinic_models_not_installed) raised at "
            "migrations/env.py, line 1",
        ),
    ],
    ids=["key_error", "import_error"],
)
def test_an_env_py_error_says_where_it_was_raised(source_db, target_db, tmp_path, env_py, said):
    """The exception's text was scrubbed of quoted words, so `KeyError: "…"` named nothing;
    now the file and line do (a module's name is code's, and shown)."""
    ini = _one_table_project(tmp_path / "app", env_py)
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(ConfigError) as caught:
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert said in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    "raise_line",
    [
        "raise KeyError(123456789)",
        "import datetime\n"
        "raise ValueError(f'mrn 123456789 born {datetime.date(1980, 1, 2)} needs review')",
    ],
    ids=["key_error", "value_error"],
)
def test_a_data_migrations_exception_shows_no_row_values(
    source_db, target_db, tmp_path, raise_line
):
    """A data migration raising with a row's values (unquoted numbers and dates survived the
    scrubbing of quoted words): the sentence says where, not what."""
    ini = _alembic_project(tmp_path / "app", COOKBOOK_ENV, [("d1", "CREATE TABLE notes (id int)")])
    _add_revision(ini, "d2", "d1", raise_line)
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(ConfigError) as caught:
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    message = caught.value.message
    assert "123456789" not in message and "1980" not in message, message
    assert "raised at migrations/versions/d2.py, line" in message, message
    assert public_tables(target_db.admin_url) == []  # rolled back, d1 with it


# The generated env.py with each revision committed on its own (a common setting).
PER_REVISION_ENV = GENERATED_ENV.replace(
    "context.configure(connection=connection, target_metadata=None)",
    "context.configure(connection=connection, target_metadata=None, "
    "transaction_per_migration=True)",
)
PATIENTS = (
    "CREATE TABLE patients (id int PRIMARY KEY, name text); "
    "CREATE VIEW patient_names AS SELECT id, name FROM patients"
)


def _anon_reads(admin_url: str, relation: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT has_table_privilege('anon', %s, 'SELECT')", (relation,)
        ).fetchone()[0]


def test_a_view_committed_before_a_failed_revision_is_closed_to_the_api(
    source_db, target_db, tmp_path
):
    """Run 1 fails at m2 after env.py committed m1 (a table and a view over it); the user fixes
    m2 and runs again. The view existed before run 2, so the schema step took it for the
    user's and left it open: the copy then served every patient's name to `anon` (the REST
    API) through it."""
    execute(
        source_db.url,
        f"{PATIENTS}; INSERT INTO patients SELECT g, 'patient ' || g FROM generate_series(1, 5) g;"
        " CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        " INSERT INTO alembic_version VALUES ('m2')",
    )
    ini = _alembic_project(tmp_path / "app", PER_REVISION_ENV, [("m1", PATIENTS)])
    _add_revision(ini, "m2", "m1", "op.execute('SELECT no_such_function()')")
    assert _run(source_db, target_db, tmp_path, ini).returncode == 2
    assert "patients" in public_tables(target_db.admin_url)  # m1 was committed
    _add_revision(ini, "m2", "m1", "op.execute('CREATE INDEX patients_name ON patients (name)')")
    done = _run(source_db, target_db, tmp_path, ini)
    assert done.returncode == 0, done.stderr
    assert not _anon_reads(target_db.admin_url, "public.patient_names")


def test_a_source_at_base_migrates_and_runs_again(source_db, target_db, tmp_path):
    """An empty alembic_version (`alembic downgrade base`) was taken for none: the target went
    to head, the copy then emptied its version table, and the second run upgraded again into
    tables that existed ("already exists", exit 2)."""
    ini = _alembic_project(tmp_path / "app", COOKBOOK_ENV, [("b1", "CREATE TABLE visits (id int)")])
    execute(source_db.url, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    first = _run(source_db, target_db, tmp_path, ini)
    assert first.returncode == 0, first.stderr
    assert public_tables(target_db.admin_url) == ["alembic_version"]  # at base, as the source
    again = _run(source_db, target_db, tmp_path, ini)
    assert again.returncode == 0, again.stderr


def test_a_failure_after_a_committed_revision_does_not_claim_a_rollback(
    source_db, target_db, tmp_path
):
    """env.py on a connection of its own commits revision by revision: the sentence said the
    upgrade "was rolled back" while n1 stayed on the target."""
    ini = _alembic_project(
        tmp_path / "app", PER_REVISION_ENV, [("n1", "CREATE TABLE notes (id int PRIMARY KEY)")]
    )
    _add_revision(ini, "n2", "n1", "op.execute('SELECT no_such_function()')")
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(MigrationError) as caught:
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert "notes" in public_tables(target_db.admin_url)
    message = caught.value.message
    assert "rolled back" not in message, message
    assert message.startswith("Alembic's upgrade failed at revision n2 on the target"), message
    assert "stays there, and the next run goes on from it" in message, message


@pytest.mark.parametrize("env_py", [COOKBOOK_ENV, GENERATED_ENV], ids=["cookbook", "generated"])
def test_a_long_migration_outlives_the_targets_statement_timeout(
    source_db, target_db, tmp_path, env_py
):
    """Supabase caps statements per database (2 minutes; 1 s here): the tool lifted the cap on
    its own connection only, and the generated env.py migrates on one of its own."""
    capped = f"ALTER DATABASE \"{target_db.name}\" SET statement_timeout = '1s'"
    execute(target_db.admin_url, capped)
    ini = _alembic_project(
        tmp_path / "app",
        env_py,
        [("w1", "CREATE TABLE visits (id int)"), ("w2", "SELECT pg_sleep(1.5)")],
    )
    source, target = _urls(source_db, target_db.url)
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert result.revision == "w2"


@pytest.mark.parametrize("first", ["pg_catalog", "audit, public"], ids=["hardened", "audit_first"])
def test_the_sources_version_table_is_read_where_the_target_keeps_it(
    source_db, target_db, tmp_path, first
):
    """Unqualified, alembic_version was read through the source login's search_path: a
    hardened one (no public) found none and took the target to head, past the source's s1;
    one starting with another project's schema read that project's revision."""
    ini = _alembic_project(
        tmp_path / "app",
        COOKBOOK_ENV,
        [("s1", "CREATE TABLE visits (id int)"), ("s2", "ALTER TABLE visits ADD note text")],
    )
    execute(
        source_db.url,
        "CREATE TABLE visits (id int); CREATE TABLE alembic_version (version_num text "
        "PRIMARY KEY); INSERT INTO alembic_version VALUES ('s1'); "
        "CREATE SCHEMA audit; CREATE TABLE audit.alembic_version (version_num text PRIMARY KEY);"
        "INSERT INTO audit.alembic_version VALUES ('zz_audit_9'); "
        f'ALTER DATABASE "{source_db.name}" SET search_path = {first}',
    )
    source, target = _urls(source_db, target_db.url)
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert result.revision == "s1", result


def test_a_relative_alembic_config_is_found_from_another_directory(source_db, target_db, tmp_path):
    """`init --alembic-config alembic.ini` in the project's directory kept the path as given;
    `run` from elsewhere (cron, CI, the Dagster UI's code server) with the manifest named by
    SUPABASE_MIGRATION_MANIFEST looked for it in its own working directory."""
    project = tmp_path / "project"
    ini = _alembic_project(project, COOKBOOK_ENV, [("r1", "CREATE TABLE notes (id int)")])
    execute(source_db.url, "CREATE TABLE notes (id int)")
    env = cli_env(source_db.url, target_db.url, tmp_path)
    env["SUPABASE_MIGRATION_MANIFEST"] = str(tmp_path / "config" / "migration.yaml")
    (tmp_path / "config").mkdir()
    done = cli(["init", "--schema-mode", "alembic", "--alembic-config", ini.name], env, project)
    assert done.returncode == 0, done.stderr
    assert (
        "alembic_config: ../project/alembic.ini"
        in (tmp_path / "config" / "migration.yaml").read_text()
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = cli(["run", "--no-verify"], env, elsewhere)
    assert again.returncode == 0, again.stderr


def test_a_target_at_a_revision_the_checkout_lacks_is_named(source_db, target_db, tmp_path):
    """A newer checkout upgraded the target: Alembic's "Can't locate revision identified by
    'zz_newer'" did not say whose revision it was."""
    ini = _alembic_project(tmp_path / "app", COOKBOOK_ENV, [("a1", "CREATE TABLE notes (id int)")])
    versioned = (
        "CREATE TABLE notes (id int); CREATE TABLE alembic_version (version_num varchar(32) "
        "PRIMARY KEY); INSERT INTO alembic_version VALUES ('{}')"
    )
    execute(source_db.url, versioned.format("a1"))
    execute(target_db.url, versioned.format("zz_newer"))
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(ConfigError) as caught:
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert caught.value.message.startswith(
        "The target is at Alembic revision zz_newer, which the project at"
    ), caught.value.message


def test_a_project_keeping_its_options_in_pyproject_toml_is_read(source_db, target_db, tmp_path):
    """`alembic init -t pyproject`: alembic.ini keeps the URL and logging, pyproject.toml's
    [tool.alembic] the rest; "No 'script_location' key found in configuration"."""
    ini = _alembic_project(tmp_path / "app", COOKBOOK_ENV, [("y1", "CREATE TABLE notes (id int)")])
    ini.write_text("[alembic]\nsqlalchemy.url = driver://user:pass@localhost/dbname\n")
    (ini.parent / "pyproject.toml").write_text(
        '[tool.alembic]\nscript_location = "%(here)s/migrations"\n'
    )
    source, target = _urls(source_db, target_db.url)
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert result.revision == "y1"


def test_prepend_sys_path_is_taken_from_the_projects_directory(
    source_db, target_db, tmp_path, monkeypatch
):
    """`prepend_sys_path = .` lets env.py import the app's models; from another working
    directory the import failed ("No module named ...")."""
    ini = _alembic_project(
        tmp_path / "app",
        "import clinic_models_beside_the_ini\n" + COOKBOOK_ENV,
        [("x1", "CREATE TABLE notes (id int)")],
    )
    ini.write_text(ini.read_text().replace("[alembic]\n", "[alembic]\nprepend_sys_path = .\n", 1))
    (ini.parent / "clinic_models_beside_the_ini.py").write_text("MODELS = []\n")
    monkeypatch.chdir("/")
    monkeypatch.setattr("sys.path", list(sys.path))
    source, target = _urls(source_db, target_db.url)
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert result.revision == "x1"


def test_env_py_own_engine_prepares_no_statement_on_the_server(source_db, target_db, tmp_path):
    """psycopg prepares a statement run five times on the server, which behind a transaction
    pooler the next transaction may not find; the tool's own connections never do."""
    repeated = (
        "for _ in range(8):\n"
        "    op.get_bind().exec_driver_sql('SELECT 1')\n"
        "prepared = op.get_bind().exec_driver_sql("
        "'SELECT count(*) FROM pg_prepared_statements').scalar()\n"
        "assert prepared == 0, prepared\n"
    )
    ini = _alembic_project(tmp_path / "app", GENERATED_ENV, [("e1", "CREATE TABLE notes (id int)")])
    _add_revision(ini, "e2", "e1", repeated)
    source, target = _urls(source_db, target_db.url)
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert result.revision == "e2"
