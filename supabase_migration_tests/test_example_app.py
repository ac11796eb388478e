"""The example clinic app: its Alembic history builds the intended schema, and its data
generator is deterministic, proportional and leaves the app insertable."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from supabase_migration import example_app
from supabase_migration.example_app import HEAD, TABLES, alembic_config, upgrade_head
from supabase_migration.example_app.generate import SHARES, generate, main, plan_counts
from supabase_migration.localpg import LocalServer

# -- helpers -----------------------------------------------------------------------------------


def _fetch(url: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params or None).fetchall()


def _catalog_snapshot(url: str) -> list[tuple]:
    """Everything upgrade head creates in public: relations, columns, constraints, types."""
    return _fetch(
        url,
        """
        SELECT 'rel', c.relname, c.relkind::text, '' FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'col', c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod),
               a.attidentity::text || a.attgenerated::text || a.attnotnull::text
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0
           AND NOT a.attisdropped
        UNION ALL
        SELECT 'con', conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE connamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'enum', t.typname, e.enumlabel, e.enumsortorder::text
          FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
         WHERE t.typnamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'ver', version_num, '', '' FROM public.alembic_version
        ORDER BY 1, 2, 3, 4
        """,
    )


def _content_hashes(url: str) -> dict[str, tuple[int, str]]:
    """Row count and an order-independent md5 of every table's rows, as text."""
    result = {}
    for table in TABLES:
        rows = _fetch(
            url,
            f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
            f" FROM {table} t",
        )
        result[table] = (rows[0][0], rows[0][1])
    return result


@pytest.fixture
def second_db(source_server: LocalServer) -> Iterator[str]:
    """Another fresh database on the source server, for comparing two generated copies."""
    name = f"src_example_twin_{uuid.uuid4().hex[:8]}"
    source_server.create_database(name)
    try:
        yield source_server.url(dbname=name)
    finally:
        source_server.drop_database(name)


# -- Alembic project -----------------------------------------------------------------------------


def test_upgrade_head_walks_the_history_and_is_idempotent(source_db):
    upgrade_head(source_db.url)  # a bare postgresql:// URL is given the psycopg 3 driver
    first = _catalog_snapshot(source_db.url)

    upgrade_head(source_db.url)

    assert _catalog_snapshot(source_db.url) == first
    assert _fetch(source_db.url, "SELECT version_num FROM public.alembic_version") == [(HEAD,)]
    found = {
        row[0] for row in _fetch(source_db.url, "SELECT 'public.' || tablename FROM pg_tables")
    }
    assert found >= set(TABLES)
    assert "public.alembic_version" in found


def test_schema_has_the_features_a_migrator_must_handle(source_db):
    upgrade_head(source_db.url)
    url = source_db.url

    enums = _fetch(
        url,
        "SELECT typname FROM pg_type WHERE typtype = 'e'"
        " AND typnamespace = 'public'::regnamespace ORDER BY 1",
    )
    assert [e[0] for e in enums] == ["appointment_status", "sex", "specialty"]

    def column(table: str, name: str) -> tuple[str, str, str]:
        rows = _fetch(
            url,
            "SELECT format_type(atttypid, atttypmod), attidentity::text, attgenerated::text"
            " FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            table,
            name,
        )
        assert rows, f"{table}.{name} missing"
        return rows[0]

    assert column("public.providers", "provider_id") == ("integer", "a", "")
    assert column("public.appointments", "appointment_id") == ("bigint", "d", "")
    assert column("public.patients", "full_name") == ("text", "", "s")
    assert column("public.patients", "patient_id")[0] == "uuid"
    assert column("public.patients", "address")[0] == "jsonb"
    assert column("public.patients", "allergies")[0] == "text[]"
    assert column("public.appointments", "duration")[0] == "interval"
    assert column("public.appointments", "notes")[0] == "text"  # added by revision 0003
    assert column("public.prescriptions", "dose")[0] == "numeric(10,3)"
    assert column("public.lab_results", "reference_range")[0] == "numrange"
    assert column("public.lab_results", "raw")[0] == "bytea"
    assert column("public.vital_readings", "value")[0] == "double precision"

    # bigserial: a plain column owning a sequence, not an identity.
    assert column("public.prescriptions", "prescription_id") == ("bigint", "", "")
    owned = _fetch(url, "SELECT pg_get_serial_sequence('public.prescriptions', 'prescription_id')")
    assert owned == [("public.prescriptions_prescription_id_seq",)]

    pk_columns = _fetch(
        url,
        "SELECT array_length(conkey, 1) FROM pg_constraint"
        " WHERE conrelid = 'public.lab_results'::regclass AND contype = 'p'",
    )
    assert pk_columns == [(3,)]

    no_key = _fetch(
        url,
        "SELECT count(*) FROM pg_index WHERE indrelid = 'public.vital_readings'::regclass"
        " AND (indisprimary OR indisunique)",
    )
    assert no_key == [(0,)]

    indexes = {
        row[0]
        for row in _fetch(
            url, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        )
    }
    assert {
        "ix_patients_name",
        "ux_patients_email_lower",
        "ix_appointments_patient_id",
        "ix_appointments_provider_scheduled",
        "ix_lab_results_test_code",
    } <= indexes

    cascade = _fetch(
        url,
        "SELECT confdeltype::text FROM pg_constraint"
        " WHERE conrelid = 'public.prescriptions'::regclass AND contype = 'f'",
    )
    assert cascade == [("c",)]

    # Built-in gen_random_uuid(): no extension may be needed (the demo's PostgreSQL has none).
    assert _fetch(url, "SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'") == []


def test_env_py_uses_a_shared_connection_and_its_transaction(source_db):
    engine = sa.create_engine(
        source_db.url.replace("postgresql://", "postgresql+psycopg://", 1),
        poolclass=sa.pool.NullPool,
    )
    try:
        with engine.connect() as connection:
            transaction = connection.begin()
            upgrade_head(connection)
            transaction.rollback()  # the caller owns the transaction: nothing is left behind
        assert _fetch(source_db.url, "SELECT to_regclass('public.alembic_version')") == [(None,)]

        with engine.begin() as connection:
            upgrade_head(connection)
        assert _fetch(source_db.url, "SELECT version_num FROM public.alembic_version") == [(HEAD,)]
    finally:
        engine.dispose()


def test_env_py_falls_back_to_database_url(source_db, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the ini and its script_location work from any directory
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(RuntimeError, match="DATABASE_URL"):
        upgrade_head_from_environment()

    monkeypatch.setenv("DATABASE_URL", source_db.url)
    upgrade_head_from_environment()

    assert _fetch(source_db.url, "SELECT version_num FROM public.alembic_version") == [(HEAD,)]
    assert example_app.ALEMBIC_INI.is_file()


def upgrade_head_from_environment() -> None:
    from alembic import command
    from alembic.config import Config

    # Exactly what `alembic -c .../alembic.ini upgrade head` does, minus the subprocess.
    config = Config(str(example_app.ALEMBIC_INI))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def test_alembic_config_escapes_percent_in_urls():
    config = alembic_config("postgresql://app:p%40ss@db.example.test/clinic")
    assert config.get_main_option("sqlalchemy.url") == (
        "postgresql+psycopg://app:p%40ss@db.example.test/clinic"
    )
    assert config.get_main_option("script_location") == str(example_app.MIGRATIONS_DIR)


# -- data generator ------------------------------------------------------------------------------


def test_plan_counts_are_proportional_and_total_the_request():
    assert plan_counts(0) == {
        "providers": 1,
        "patients": 1,
        "appointments": 0,
        "prescriptions": 0,
        "lab_results": 0,
        "vital_readings": 0,
    }
    for rows in (2, 10, 2_000, 12_345, 3_000_000):
        counts = plan_counts(rows)
        assert list(counts) == [t.split(".")[1] for t in TABLES]
        assert sum(counts.values()) == rows
        assert counts["providers"] >= 1 and counts["patients"] >= 1
    big = plan_counts(1_000_000)
    for table, share in SHARES.items():
        assert big[table] == pytest.approx(share * 1_000_000, rel=0.01)


def test_generate_is_deterministic_and_leaves_the_app_usable(source_db, second_db):
    upgrade_head(source_db.url)
    upgrade_head(second_db)

    counts = generate(source_db.url, 2_000, seed=11)
    # A different commit interval must not change a single byte.
    again = generate(second_db, 2_000, seed=11, batch=97)

    assert counts == again == plan_counts(2_000)
    first = _content_hashes(source_db.url)
    assert first == _content_hashes(second_db)
    assert {t: n for t, (n, _) in first.items()} == {f"public.{t}": n for t, n in counts.items()}
    for table, share in SHARES.items():
        assert counts[table] == pytest.approx(2_000 * share, abs=2)

    url = source_db.url
    # PHI-shaped values: non-ASCII names, NULLs, arrays, jsonb, the generated column filled.
    assert _fetch(url, "SELECT count(*) FROM public.patients WHERE first_name ~ '[^ -~]'")[0][0]
    assert _fetch(url, "SELECT count(*) FROM public.patients WHERE email IS NULL")[0][0]
    assert _fetch(url, "SELECT count(*) FROM public.patients WHERE allergies <> '{}'")[0][0]
    assert _fetch(
        url,
        "SELECT count(*) FROM public.patients WHERE full_name <> first_name || ' ' || last_name",
    ) == [(0,)]
    assert _fetch(url, "SELECT count(*) FROM public.patients WHERE address ? 'city'")[0][0]
    # Every foreign key holds (the load may have skipped the FK triggers).
    orphans = _fetch(
        url,
        """
        SELECT (SELECT count(*) FROM public.appointments a
                 WHERE NOT EXISTS (SELECT FROM public.patients p WHERE p.patient_id = a.patient_id)
                    OR NOT EXISTS (SELECT FROM public.providers r
                                    WHERE r.provider_id = a.provider_id))
             + (SELECT count(*) FROM public.prescriptions x
                 WHERE NOT EXISTS (SELECT FROM public.appointments a
                                    WHERE a.appointment_id = x.appointment_id))
             + (SELECT count(*) FROM public.lab_results l
                 WHERE NOT EXISTS (SELECT FROM public.patients p WHERE p.patient_id = l.patient_id))
        """,
    )
    assert orphans == [(0,)]

    # Sequences were moved past the generated ids: the app's own inserts do not collide.
    with psycopg.connect(url) as conn:
        provider = conn.execute(
            "INSERT INTO public.providers (npi, full_name, specialty)"
            " VALUES ('2000000001', 'Dr. New', 'oncology') RETURNING provider_id"
        ).fetchone()
        patient = conn.execute(
            "INSERT INTO public.patients (mrn, first_name, last_name, date_of_birth)"
            " VALUES ('MRN-NEW', 'New', 'Patient', '2000-01-01') RETURNING patient_id"
        ).fetchone()
        assert provider is not None and patient is not None
        appointment = conn.execute(
            "INSERT INTO public.appointments (patient_id, provider_id, scheduled_at)"
            " VALUES (%s, %s, now()) RETURNING appointment_id",
            (patient[0], provider[0]),
        ).fetchone()
        prescription = conn.execute(
            "INSERT INTO public.prescriptions (appointment_id, drug_code, dose, prescribed_on)"
            " VALUES (%s, 'RX1', 1.5, current_date) RETURNING prescription_id",
            (appointment[0] if appointment else None,),
        ).fetchone()
    assert provider[0] == counts["providers"] + 1
    assert appointment == (counts["appointments"] + 1,)
    assert prescription == (counts["prescriptions"] + 1,)


def test_generate_seed_changes_the_data_and_refuses_to_add_to_existing_rows(
    source_db, second_db, capsys
):
    upgrade_head(source_db.url)
    upgrade_head(second_db)
    assert main([source_db.url, "--rows", "300", "--seed", "1"]) == 0
    assert "300 rows" in capsys.readouterr().out
    generate(second_db, 300, seed=2, check_foreign_keys=True)

    first, second = _content_hashes(source_db.url), _content_hashes(second_db)
    assert [n for n, _ in first.values()] == [n for n, _ in second.values()]
    assert first["public.patients"][1] != second["public.patients"][1]

    with pytest.raises(ValueError, match="already has rows"):
        generate(source_db.url, 300, seed=1)
    assert _content_hashes(source_db.url) == first
