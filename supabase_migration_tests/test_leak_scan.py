"""No patient value and no password in anything the tool leaves behind (issue 7, item 4).

The source holds recognisable PHI-like values; the target rejects the rows that carry them (a
UNIQUE index the source lacks, which fails when it is built after the load, and a CHECK
constraint, which fails the COPY), so PostgreSQL's errors would echo those values in their
DETAIL and CONTEXT. Then `run`, `verify`, `status` and a plain Dagster
materialization of the failing partition go through, and every output is scanned: their
stdout/stderr, every file under DAGSTER_HOME (raw bytes, and SQLite databases decoded row by
row), the bookkeeping tables on the target, the report files and the manifest.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote, quote_plus

import psycopg

from . import test_faults
from .test_faults import cli, explain, migration_env

# The same fixtures as the fault tests: a DAGSTER_HOME of its own, the shared bytecode cache.
dagster_home = test_faults.dagster_home
pycache_prefix = test_faults.pycache_prefix

PATIENT_NAME = "Zebediah Quackenbush-PHI"
TWIN_NAME = "Zebulon Quackenbush-PHI"
SSN = "987-65-4321"
PHONE = "202-555-0173"
EMAIL = "zebediah.quackenbush@phi-example.test"
DIAGNOSIS = "Quackenbush-PHI syndrome, stage 2"
# Case-insensitive needles: the full values, and the distinctive parts of them.
PHI_NEEDLES = [PATIENT_NAME, TWIN_NAME, SSN, PHONE, EMAIL, DIAGNOSIS, "Quackenbush", "Zebediah"]

SCHEMA = """
CREATE TABLE patients (
    id        bigint PRIMARY KEY,
    full_name text NOT NULL,
    ssn       text NOT NULL,
    phone     text,
    email     text
);
CREATE TABLE visits (
    id         integer PRIMARY KEY,
    patient_id bigint NOT NULL REFERENCES patients (id),
    reason     text NOT NULL
);
"""
# What the target's own schema adds, and the source's data breaks: one SSN per patient, and
# no free-text diagnosis in `reason`.
TARGET_ONLY = """
CREATE UNIQUE INDEX patients_ssn_unique ON patients (ssn);
ALTER TABLE visits ADD CONSTRAINT visits_reason_is_a_code CHECK (reason NOT LIKE '%PHI%');
"""


def seed(source_url: str, target_url: str) -> None:
    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO patients SELECT g, 'Patient ' || g, lpad(g::text, 9, '0'), "
            "'555-01' || lpad((g % 100)::text, 2, '0'), 'p' || g || '@example.test' "
            "FROM generate_series(1, 3000) g"
        )
        # Twins entered with the same SSN: both rows sit in the first key range.
        conn.execute(
            "UPDATE patients SET full_name = %s, ssn = %s, phone = %s, email = %s WHERE id = 42",
            [PATIENT_NAME, SSN, PHONE, EMAIL],
        )
        conn.execute(
            "UPDATE patients SET full_name = %s, ssn = %s, phone = %s WHERE id = 43",
            [TWIN_NAME, SSN, PHONE],
        )
        conn.execute(
            "INSERT INTO visits SELECT g, 1 + g % 3000, 'code-' || (g % 17) "
            "FROM generate_series(1, 1000) g"
        )
        conn.execute("UPDATE visits SET reason = %s, patient_id = 42 WHERE id = 700", [DIAGNOSIS])
        conn.execute("ANALYZE")
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(TARGET_ONLY)


# -- the scanner ---------------------------------------------------------------------------------


def secret_needles(password: str) -> list[str]:
    return sorted({password, quote(password, safe=""), quote(password), quote_plus(password)})


def sqlite_text(path: Path) -> str:
    """Every row of every table of a SQLite file (WAL included), as SQL text."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                shutil.copyfile(side, copy.with_name(copy.name + suffix))
        conn = sqlite3.connect(copy)
        try:
            return "\n".join(conn.iterdump())
        finally:
            conn.close()


def directory_texts(root: Path) -> dict[str, str]:
    """Each file under `root` as text: decoded raw bytes, plus decoded rows for SQLite files."""
    texts: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        name = str(path.relative_to(root))
        texts[name] = raw.decode("utf-8", errors="replace") + "\n" + raw.decode("latin-1")
        if raw.startswith(b"SQLite format 3\x00"):
            texts[name + " (rows)"] = sqlite_text(path)
    return texts


def bookkeeping_texts(admin_url: str) -> dict[str, str]:
    """Every row of every table in the target's bookkeeping schema, all columns as JSON."""
    texts = {}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'supabase_migration'"
            )
        ]
        assert "migration_checkpoints" in tables
        for table in tables:
            rows = conn.execute(
                psycopg.sql.SQL("SELECT row_to_json(t)::text FROM {} AS t").format(
                    psycopg.sql.Identifier("supabase_migration", table)
                )
            ).fetchall()
            texts[f"supabase_migration.{table}"] = "\n".join(r[0] for r in rows)
    return texts


def find_leaks(texts: dict[str, str], needles: list[str]) -> list[str]:
    return [
        f"{needle!r} in {where}"
        for where, text in texts.items()
        for needle in needles
        if needle.lower() in text.lower()
    ]


# -- the test ------------------------------------------------------------------------------------


def dagster_materialize(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """The Dagster CLI, as the UI would launch it: default config re-syncs the partition."""
    return subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_no_phi_or_password_in_any_output_of_a_failed_migration(
    source_db, target_db, tmp_path, dagster_home, pycache_prefix
):
    seed(source_db.url, target_db.url)
    env = migration_env(source_db.url, target_db.url, tmp_path, dagster_home, pycache_prefix)
    outputs: dict[str, str] = {}

    def record(name: str, done: subprocess.CompletedProcess[str]) -> None:
        outputs[f"{name} stdout"] = done.stdout
        outputs[f"{name} stderr"] = done.stderr
        assert "Traceback (most recent call last)" not in done.stderr, explain(done)

    run = cli(
        ["run", "--schema-mode", "none", "--batch-size", "500", "--no-progress"], env, tmp_path
    )
    record("run", run)
    assert run.returncode == 1, explain(run)

    # Not vacuous: the copy did hit the values' rows, and says where, by name only.
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        failed = conn.execute(
            "SELECT table_name, partition_key, error_message FROM "
            "supabase_migration.migration_checkpoints WHERE status = 'failed' ORDER BY 1"
        ).fetchall()
        completed = conn.execute(
            "SELECT count(*) FROM supabase_migration.migration_checkpoints "
            "WHERE status = 'completed'"
        ).fetchone()[0]
    assert [(t, k) for t, k, _ in failed] == [("public.visits", "000001")], failed
    assert completed > 0
    visits_error = failed[0][2]
    assert "check_violation" in visits_error and "visits_reason_is_a_code" in visits_error
    assert "public.visits partition 000001" in run.stderr, explain(run)
    # The unique index was dropped for the load; building it afterwards fails, by name.
    assert "patients_ssn_unique" in run.stderr and "unique_violation" in run.stderr, explain(run)

    verify = cli(["verify"], env, tmp_path)
    record("verify", verify)
    assert verify.returncode == 1, explain(verify)
    assert "FAIL" in verify.stdout and "public.patients" in verify.stdout, explain(verify)
    assert (tmp_path / "migration-report" / "verification_report.json").is_file()

    for args in (["status"], ["status", "--json"]):
        done = cli(args, env, tmp_path)
        record(" ".join(args), done)
        assert done.returncode == 0, explain(done)
    assert "public.patients" in outputs["status stdout"]

    # The Dagster path (what the UI launches): one partition, resync on, its own logging; the
    # range re-syncs through staging + upsert, then the index build fails again.
    dagster = dagster_materialize(
        [
            "-m",
            "supabase_migration.definitions",
            "--select",
            "public/patients",
            "--partition",
            "000000",
        ],
        env,
        tmp_path,
    )
    record("dagster asset materialize", dagster)
    assert dagster.returncode != 0, explain(dagster)
    assert "patients_ssn_unique of public.patients" in dagster.stdout + dagster.stderr, explain(
        dagster
    )
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        waiting = conn.execute(
            "SELECT index_name FROM supabase_migration.deferred_indexes "
            "WHERE table_name = 'public.patients'"
        ).fetchall()
    assert waiting == [("patients_ssn_unique",)]

    texts = dict(outputs)
    home_texts = directory_texts(dagster_home)
    # Not vacuous: the scan reads the event log, where the failure is recorded by name.
    assert any("unique_violation" in text for text in home_texts.values())
    texts.update({f"DAGSTER_HOME/{k}": v for k, v in home_texts.items()})
    texts.update(bookkeeping_texts(target_db.admin_url))
    report_texts = directory_texts(tmp_path / "migration-report")
    assert any(name.endswith(".html") for name in report_texts)
    texts.update({f"migration-report/{k}": v for k, v in report_texts.items()})
    texts["migration.yaml"] = (tmp_path / "migration.yaml").read_text()

    leaks = find_leaks(texts, PHI_NEEDLES + secret_needles(target_db.password))
    assert not leaks, "\n".join(leaks)
