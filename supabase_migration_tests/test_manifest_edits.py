"""What users do to migration.yaml between runs, and what the commands make of it.

Real servers: the test bed's source and Supabase-like target, the CLI as a user runs it.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

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
