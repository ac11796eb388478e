"""Security on real servers: RLS default deny, policies once, encryption, pgaudit, audit trail.

The shared target imitates Supabase (non-superuser `postgres` over SSL, API roles with default
grants on `public`). pgaudit needs shared_preload_libraries, so its tests start a dedicated
Supabase-like server with pgaudit preloaded and `GRANT SET ON PARAMETER pgaudit.log, pgaudit.role
TO postgres`, which is what supautils' privileged-role allow-list gives `postgres` on Supabase.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import psycopg
import pytest

from supabase_migration import checkpoints, security
from supabase_migration.assets import SEQUENCES_KEY, table_asset_key
from supabase_migration.connections import connect
from supabase_migration.conninfo import parse_database_url
from supabase_migration.errors import ConfigError, MigrationError, TransientError
from supabase_migration.localpg import (
    SUPABASE_ADMIN,
    LocalServer,
    PgBinaries,
    make_supabase_like,
    prepare_supabase_database,
)
from supabase_migration.manifest import Manifest, ManifestTable
from supabase_migration.ranges import KeyRange
from supabase_migration.resources import TargetDatabase
from supabase_migration.security import (
    AUDITOR_ROLE,
    compact_partitions,
    configure_pgaudit,
    enable_rls,
    migration_audit_trail,
    pgaudit_status,
    policy_digest,
    read_policy_file,
    rls_status,
    security_findings,
    session_encryption,
)
from supabase_migration.security_assets import (
    POLICY_FILE_ENV,
    SECURITY_KEY,
    build_security_asset,
    build_security_checks,
)
from supabase_migration_tests.testbed import (
    TARGET_PASSWORD,
    SourceDb,
    TargetDb,
    cli_env,
    require,
    round_trips,
)

from .compare import assert_tables_equal
from .test_cli import cli

# Values that look like PHI: none of them may appear in an error, metadata or the audit trail.
SSN = "987-65-4321"
PATIENT_NAME = "Zebulon Quixote-Marchetti"

PATIENTS_SQL = f"""
CREATE TABLE public.patients (
    id bigint PRIMARY KEY,
    owner_id text NOT NULL,
    full_name text NOT NULL,
    ssn text UNIQUE
);
INSERT INTO public.patients
SELECT g, (g % 3)::text, 'patient ' || g, 'ssn-' || g FROM generate_series(1, 30) g;
INSERT INTO public.patients VALUES (31, '1', '{PATIENT_NAME}', '{SSN}');
"""

OWN_ROWS_POLICY = """
-- Re-runnable: drop, then create.
DROP POLICY IF EXISTS patients_own_rows ON public.patients;
CREATE POLICY patients_own_rows ON public.patients FOR SELECT TO authenticated
    USING (owner_id = current_setting('request.jwt.claim.sub', true));
"""


def _connect(url: str) -> psycopg.Connection:
    """As the tool connects: through connections.connect, autocommit like the resources."""
    return connect(parse_database_url(url, label="target"), autocommit=True)


def _admin(target_db: TargetDb) -> psycopg.Connection:
    return psycopg.connect(target_db.admin_url, autocommit=True)


def _materialize_security(
    manifest: Manifest, config: dict[str, object] | None = None
) -> dg.ExecuteInProcessResult:
    """The security asset and its checks, on the target in SUPABASE_DB_URL (set it first)."""
    return dg.materialize(
        [build_security_asset(manifest), *build_security_checks(manifest)],
        resources={"target": TargetDatabase(url=dg.EnvVar("SUPABASE_DB_URL"))},
        run_config={"ops": {"migration__security": {"config": config or {}}}},
        raise_on_error=False,
    )


def _count_as(admin: psycopg.Connection, role: str, table: str, sub: str | None = None) -> int:
    with admin.transaction():
        admin.execute(f"SET LOCAL ROLE {role}")
        if sub is not None:
            admin.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", (sub,))
        row = admin.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def target(target_db: TargetDb) -> Iterator[psycopg.Connection]:
    """The target as `postgres` (non-superuser, SSL) with the patients table loaded."""
    with _connect(target_db.url) as conn:
        conn.execute(PATIENTS_SQL)
        yield conn


# --------------------------------------------------------------------------------------------
# Pure units


def test_policy_file_errors_name_the_file_not_its_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sql"
    with pytest.raises(ConfigError, match="does not exist"):
        read_policy_file(missing)
    empty = tmp_path / "empty.sql"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_policy_file(empty)
    binary = tmp_path / "binary.sql"
    binary.write_bytes(b"\xff\xfe" + SSN.encode())
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        read_policy_file(binary)
    assert SSN not in str(info.value)
    good = tmp_path / "policies.sql"
    good.write_text(OWN_ROWS_POLICY)
    assert read_policy_file(good) == OWN_ROWS_POLICY
    assert policy_digest(OWN_ROWS_POLICY) == policy_digest(read_policy_file(good))
    assert policy_digest(OWN_ROWS_POLICY) != policy_digest(OWN_ROWS_POLICY + " ")


@pytest.mark.parametrize(
    "text",
    [
        "COMMIT;",
        "create policy a on t using (true);\n  commit work;",
        "BEGIN;\nCREATE POLICY a ON t USING (true);",
        "begin transaction;",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE;",
        "rollback;",
        "END TRANSACTION;",
        "PREPARE TRANSACTION 'x';",
    ],
)
def test_policy_sql_with_transaction_control_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="transaction control"):
        security.check_policy_sql(text)


def test_policy_sql_checks_allow_plpgsql_and_ordinary_names() -> None:
    text = (
        OWN_ROWS_POLICY
        + "DO $$\nBEGIN\n  IF true THEN\n    NULL;\n  END IF;\nEND;\n$$;\n"
        + "CREATE POLICY p ON public.patients USING (\n  committee_id IS NULL\n);\n"
    )
    assert security.check_policy_sql(text) == policy_digest(text)
    with pytest.raises(ConfigError, match="empty"):
        security.check_policy_sql(" \n")


def test_compact_partitions() -> None:
    keys = ["000003", "000000", "000001", "000002", "000007", "000009", "000008"]
    assert compact_partitions(keys) == "000000-000003, 000007-000009"
    assert compact_partitions(["000005"]) == "000005"
    assert compact_partitions([]) == ""


def test_bookkeeping_schema_may_not_be_exposed() -> None:
    with pytest.raises(ConfigError, match="never be exposed"):
        security.check_exposed_schemas(("public", "supabase_migration"))
    assert security.check_exposed_schemas(["public", "api"]) == ("public", "api")


def test_pgaudit_log_classes_are_validated() -> None:
    assert security._check_log_classes("DDL,role") == "ddl, role"
    assert security._check_log_classes("all, -misc") == "all, -misc"
    for bad in ("", "ddl; DROP TABLE x", "rows", "log_rows"):
        with pytest.raises(ConfigError, match=r"pgaudit\.log"):
            security._check_log_classes(bad)


def test_security_definitions() -> None:
    manifest = Manifest(
        tables=(
            ManifestTable("public.patients", ("id",), "primary_key"),
            ManifestTable("clinic.visits", ("id",), "primary_key"),
        )
    )
    asset = build_security_asset(manifest)
    checks = build_security_checks(manifest)
    assert asset.key == SECURITY_KEY == dg.AssetKey(["migration", "security"])
    deps = set(asset.asset_deps[SECURITY_KEY])
    assert deps == {
        table_asset_key("public.patients"),
        table_asset_key("clinic.visits"),
        SEQUENCES_KEY,
    }
    spec = asset.specs_by_key[SECURITY_KEY]
    assert spec.group_name == "migration"
    assert {"postgres", "supabase"} <= set(spec.kinds)
    names = {key.name for c in checks for key in c.check_keys}
    assert names == {"rls_enabled", "connection_encrypted"}
    assert all(key.asset_key == SECURITY_KEY for c in checks for key in c.check_keys)
    # Nothing that could carry a credential is configurable on the asset.
    fields = set(asset.op.config_schema.as_field().config_type.fields)  # type: ignore[union-attr]
    assert fields == {"policy_file", "pgaudit"}
    dg.Definitions(assets=[asset], asset_checks=checks)  # resolves


# --------------------------------------------------------------------------------------------
# Row Level Security


def test_anon_reads_nothing_while_service_role_reads_everything(
    target: psycopg.Connection, target_db: TargetDb
) -> None:
    with _admin(target_db) as admin:
        # Before: Supabase's default grants let the API roles read the migrated PHI.
        assert _count_as(admin, "anon", "public.patients") == 31
        actions = enable_rls(target, ["public.patients"], exposed_schemas=("public",))
        assert ("enable_rls", "public.patients") in [(a.kind, a.subject) for a in actions]
        # Default deny: an empty result, not a permission error.
        assert _count_as(admin, "anon", "public.patients") == 0
        assert _count_as(admin, "authenticated", "public.patients", sub="1") == 0
        assert _count_as(admin, "service_role", "public.patients") == 31
        # The owner (`postgres`, as the tool and the dashboard connect) still sees everything.
        assert target.execute("SELECT count(*) FROM public.patients").fetchone() == (31,)
        forced = admin.execute(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = 'public.patients'::regclass"
        ).fetchone()
        assert forced == (False,)
    again = enable_rls(target, ["public.patients"], exposed_schemas=("public",))
    assert [a.kind for a in again if a.subject == "public.patients"] == ["rls_already_enabled"]
    assert not any(a.changed and a.kind == "enable_rls" for a in again)


def test_policy_sql_is_applied_once(target: psycopg.Connection, target_db: TargetDb) -> None:
    first = enable_rls(
        target,
        ["public.patients"],
        exposed_schemas=("public",),
        policy_sql=OWN_ROWS_POLICY,
        policy_source="policies.sql",
        run_id="run-1",
    )
    assert first[-1].kind == "apply_policies"
    with _admin(target_db) as admin:
        assert _count_as(admin, "authenticated", "public.patients", sub="1") == 11
        assert _count_as(admin, "authenticated", "public.patients", sub="nobody") == 0
        assert _count_as(admin, "anon", "public.patients") == 0
        assert _count_as(admin, "service_role", "public.patients") == 31
        # Prove "once" rather than "re-run": drop the policy behind the tool's back.
        admin.execute("DROP POLICY patients_own_rows ON public.patients")
        second = enable_rls(
            target, ["public.patients"], exposed_schemas=("public",), policy_sql=OWN_ROWS_POLICY
        )
        assert second[-1].kind == "policies_unchanged"
        assert second[-1].subject == "sha256:" + policy_digest(OWN_ROWS_POLICY)[:12]
        assert admin.execute("SELECT count(*) FROM pg_policies").fetchone() == (0,)
        recorded = admin.execute(
            "SELECT sha256, source, run_id, applied_by FROM supabase_migration.applied_policies"
        ).fetchall()
        assert recorded == [(policy_digest(OWN_ROWS_POLICY), "policies.sql", "run-1", "postgres")]
        # An edited file is a new policy set and is applied.
        edited = OWN_ROWS_POLICY + "\n-- v2\n"
        third = enable_rls(
            target, ["public.patients"], exposed_schemas=("public",), policy_sql=edited
        )
        assert third[-1].kind == "apply_policies"
        assert admin.execute("SELECT count(*) FROM pg_policies").fetchone() == (1,)
        assert not admin.execute(
            "SELECT has_table_privilege('anon', 'supabase_migration.applied_policies', 'SELECT')"
        ).fetchone()[0]  # type: ignore[index]


def test_failed_policy_keeps_rls_and_leaks_no_values(
    target: psycopg.Connection, target_db: TargetDb
) -> None:
    # The policy file's second statement violates the unique ssn: DETAIL would quote the value.
    bad = (
        "CREATE POLICY p_anon ON public.patients FOR SELECT TO anon USING (true);\n"
        f"INSERT INTO public.patients VALUES (99, '1', 'x', '{SSN}');\n"
    )
    with pytest.raises(ConfigError) as info:
        enable_rls(target, ["public.patients"], exposed_schemas=("public",), policy_sql=bad)
    message = str(info.value)
    assert "unique_violation" in message and "nothing of it was applied" in message
    assert SSN not in message and PATIENT_NAME not in message
    assert "\n" not in message
    with _admin(target_db) as admin:
        # RLS was committed before the policies; the broken file left nothing behind.
        assert admin.execute("SELECT count(*) FROM pg_policies").fetchone() == (0,)
        assert _count_as(admin, "anon", "public.patients") == 0
        assert admin.execute(
            "SELECT to_regclass('supabase_migration.applied_policies')"
        ).fetchone() == (None,)

    with pytest.raises(ConfigError, match="transaction control"):
        enable_rls(
            target,
            ["public.patients"],
            exposed_schemas=("public",),
            policy_sql="BEGIN;\nCREATE POLICY x ON public.patients USING (true);\nCOMMIT;\n",
        )


def test_rls_status_flags_exposed_tables_without_rls(
    target: psycopg.Connection, target_db: TargetDb
) -> None:
    target.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text)")
    target.execute("CREATE SCHEMA private; CREATE TABLE private.raw (id int)")
    enable_rls(target, ["public.patients", "private.raw"], exposed_schemas=("public",))
    status = {t.name: t for t in rls_status(target, ("public",))}
    assert set(status) == {"public.patients", "public.notes"}
    assert status["public.patients"].rls_enabled and status["public.patients"].policies == 0
    assert not status["public.notes"].rls_enabled
    assert status["public.notes"].api_access is True
    # Not exposed, so not touched.
    with _admin(target_db) as admin:
        assert admin.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'private.raw'::regclass"
        ).fetchone() == (False,)

    manifest = Manifest(tables=(ManifestTable("public.patients", ("id",), "primary_key"),))
    findings = security_findings(target, manifest)
    errors = [f for f in findings if f["severity"] == "ERROR"]
    assert [(f["code"], f["subject"]) for f in errors] == [
        ("rls_disabled_in_public", "public.notes")
    ]
    codes = {f["code"] for f in findings}
    assert {"rls_enabled_no_policy", "connection_encrypted", "pgaudit_unavailable"} <= codes
    assert all(set(f) == {"severity", "code", "subject", "message"} for f in findings)


def test_configurable_exposed_schemas_and_partitions(
    target: psycopg.Connection, target_db: TargetDb, tmp_path: Path
) -> None:
    """Partitions are protected too (each is reachable over the API), and however many
    tables there are, they are looked up in one round trip and altered in one more."""
    target.execute(
        """
        CREATE SCHEMA api;
        CREATE TABLE api.visits (id int, at date NOT NULL, PRIMARY KEY (id, at))
            PARTITION BY RANGE (at);
        CREATE TABLE api.visits_2024 PARTITION OF api.visits
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE api.visits_2025 PARTITION OF api.visits
            FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        """
    )
    with round_trips(target, tmp_path) as waits:
        actions = enable_rls(
            target, ["api.visits", "public.patients", "api.gone"], exposed_schemas=("api",)
        )
    with round_trips(target, tmp_path) as waits_again:  # one table, nothing left to alter
        enable_rls(target, ["api.visits"], exposed_schemas=("api",))
    assert len(waits) == len(waits_again) + 1, (waits, waits_again)
    by_subject = {a.subject: a.kind for a in actions}
    assert by_subject["api.visits"] == "enable_rls"
    assert by_subject["api.visits_2024"] == "enable_rls"  # reachable directly over the API
    assert by_subject["api.visits_2025"] == "enable_rls"
    assert by_subject["public.patients"] == "not_exposed"
    assert by_subject["api.gone"] == "missing"
    assert all(t.rls_enabled for t in rls_status(target, ("api",)))
    assert not any(t.rls_enabled for t in rls_status(target, ("public",)))
    with pytest.raises(ConfigError, match="never be exposed"):
        enable_rls(target, ["api.visits"], exposed_schemas=("api", "supabase_migration"))


def test_bookkeeping_schema_is_closed_to_the_api_roles(
    target: psycopg.Connection, target_db: TargetDb
) -> None:
    """Both the bookkeeping set-up (every run) and the security step close it again, with the
    one REVOKE statement they share."""
    checkpoints.ensure_bookkeeping(target)
    manifest = Manifest(tables=(ManifestTable("public.patients", ("id",), "primary_key"),))
    closers = {
        "bookkeeping set-up": lambda: checkpoints.ensure_bookkeeping(target),
        "security step": lambda: enable_rls(
            target, ["public.patients"], exposed_schemas=("public",)
        ),
    }
    with _admin(target_db) as admin:
        for closer, close in closers.items():
            # Someone (or a careless grant script) opens it up.
            admin.execute(
                "GRANT USAGE ON SCHEMA supabase_migration TO PUBLIC, anon, authenticated;"
                "GRANT SELECT ON ALL TABLES IN SCHEMA supabase_migration TO anon, authenticated;"
                "GRANT SELECT ON ALL SEQUENCES IN SCHEMA supabase_migration TO PUBLIC"
            )
            codes = {f["code"] for f in security_findings(target, manifest)}
            assert "bookkeeping_exposed" in codes, closer
            done = close()
            if closer == "security step":  # and says so, naming the roles
                assert [(a.subject, a.detail) for a in done if a.kind == "revoke_bookkeeping"] == [
                    ("supabase_migration", "no privileges for anon, authenticated")
                ]
            for role in ("anon", "authenticated"):
                row = admin.execute(
                    "SELECT has_schema_privilege(%s, 'supabase_migration', 'USAGE'), "
                    "has_table_privilege(%s, 'supabase_migration.migration_checkpoints', 'SELECT'),"
                    "has_sequence_privilege(%s, 'supabase_migration.migration_checkpoints_id_seq',"
                    " 'SELECT')",
                    (role, role, role),
                ).fetchone()
                assert row == (False, False, False), (closer, role)
            with pytest.raises(psycopg.errors.InsufficientPrivilege), admin.transaction():
                admin.execute("SET LOCAL ROLE anon")
                admin.execute("SELECT * FROM supabase_migration.migration_checkpoints")
            assert security.bookkeeping_exposed_to(target) == [], closer


def test_the_bookkeeping_revoke_touches_only_what_it_must_and_may(
    target: psycopg.Connection, target_db: TargetDb
) -> None:
    """Every run ensures the bookkeeping twice; with nothing granted to PUBLIC or the API
    roles it rewrites no catalog row. A second login with rights on the bookkeeping tables but
    owning none of them runs it too: REVOKE on what it does not own would refuse it ("permission
    denied for sequence")."""
    checkpoints.ensure_bookkeeping(target)
    rows = (
        "SELECT c.relname::text, c.xmin::text FROM pg_class c "
        "WHERE c.relnamespace = 'supabase_migration'::regnamespace UNION ALL "
        "SELECT n.nspname::text, n.xmin::text FROM pg_namespace n "
        "WHERE n.nspname = 'supabase_migration' ORDER BY 1"
    )
    before = target.execute(rows).fetchall()
    checkpoints.ensure_bookkeeping(target)
    assert target.execute(rows).fetchall() == before
    name = "sm_" + target_db.name[-8:] + "_colleague"
    with _admin(target_db) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'colleague-pw'")
        try:
            target.execute(
                f"GRANT USAGE ON SCHEMA supabase_migration TO {name}; "
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA supabase_migration "
                f"TO {name}"
            )
            info = psycopg.conninfo.conninfo_to_dict(target_db.url)
            colleague = {**info, "user": name, "password": "colleague-pw"}
            with psycopg.connect(**colleague, autocommit=True) as conn:  # type: ignore[arg-type]
                checkpoints.ensure_bookkeeping(conn)
                assert security.bookkeeping_exposed_to(conn) == []
        finally:
            admin.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")


def test_a_held_lock_is_a_retryable_one_sentence_error(
    target: psycopg.Connection, target_db: TargetDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The application still reading the table: ALTER TABLE waits lock_timeout, then retries."""
    monkeypatch.setattr(security, "LOCK_TIMEOUT", "200ms")
    with _admin(target_db) as admin, admin.transaction():
        admin.execute("LOCK TABLE public.patients IN ACCESS SHARE MODE")
        with pytest.raises(TransientError) as info:
            enable_rls(target, ["public.patients"], exposed_schemas=("public",))
    message = str(info.value)
    assert message.startswith("Enabling row level security failed: lock_not_available (55P03)")
    assert "\n" not in message and SSN not in message
    enable_rls(target, ["public.patients"], exposed_schemas=("public",))  # lock gone: works


def test_the_security_step_waits_for_a_schema_step(
    target: psycopg.Connection, target_db: TargetDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both revoke on the bookkeeping schema, and two REVOKEs of one object at once fail
    ("tuple concurrently updated", not retried): the security step takes the schema step's
    lock first, so it waits for another run's schema step (or its bookkeeping) to end."""
    from supabase_migration.catalog import SCHEMA_LOCK_KEY

    monkeypatch.setattr(security, "LOCK_TIMEOUT", "200ms")
    with _admin(target_db) as admin, admin.transaction():
        admin.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (SCHEMA_LOCK_KEY,))
        with pytest.raises(TransientError, match="lock_not_available"):
            enable_rls(target, ["public.patients"], exposed_schemas=("public",))
    enable_rls(target, ["public.patients"], exposed_schemas=("public",))  # released: works


# --------------------------------------------------------------------------------------------
# Encryption in transit


def test_encryption_status_from_the_server(target_db: TargetDb, source_db: SourceDb) -> None:
    with _connect(target_db.url) as conn:
        enc = session_encryption(conn)
        assert enc.client_tls and enc.server_ssl is True and enc.protocol
        assert session_encryption(conn).encrypted is True
        assert security.connection_is_loopback(conn)
        assert security.unencrypted_sessions(conn) == 0
    with _connect(source_db.url) as conn:  # plain loopback server, no SSL
        assert session_encryption(conn).encrypted is False
        findings = security_findings(conn, Manifest(tables=()))
        assert "connection_not_encrypted_loopback" in {f["code"] for f in findings}
        remote = security_findings(conn, Manifest(tables=()), is_loopback=False)
        assert any(
            f["code"] == "connection_not_encrypted" and f["severity"] == "ERROR" for f in remote
        )


# --------------------------------------------------------------------------------------------
# The migration's own audit trail


def test_migration_audit_trail_names_runs_and_ranges_never_bounds(
    target: psycopg.Connection,
) -> None:
    assert migration_audit_trail(target) == []
    checkpoints.ensure_bookkeeping(target)
    # Keyset bounds on a text key can be PHI themselves: they must not reach the trail.
    ranges = [
        KeyRange("public.patients", i, (f"{PATIENT_NAME}{i}",) if i else None, (f"{SSN}{i}",))
        for i in range(4)
    ]
    ranges.append(KeyRange("public.visits", 0, None, None))
    with target.transaction():
        checkpoints.seed_pending(target, ranges)
    for r, run_id in zip(ranges, ["run-a", "run-a", "run-b", "run-b", "run-b"], strict=True):
        if r.table == "public.patients" and r.index == 3:
            checkpoints.mark_failed(target, r.table, r.partition_key, "timeout", run_id)
            continue
        with target.transaction():
            target.execute(
                checkpoints.completed_statement(
                    r.table,
                    r.partition_key,
                    checkpoints.Completion(
                        rows=10, rows_deleted=0, checksum="c", last_record_id=None,
                        copy_path="binary", duration_ms=5, run_id=run_id,
                    ),
                )
            )  # fmt: skip
    trail = migration_audit_trail(target)
    assert [t["run_id"] for t in trail] == ["run-a", "run-b"]
    run_a, run_b = trail
    assert run_a["completed_by"] == "postgres"
    assert run_a["partitions"] == 2 and run_a["rows"] == 20
    assert run_a["tables"]["public.patients"]["ranges"] == "000000-000001"
    assert run_b["partitions"] == 2 and run_b["failed_partitions"] == 1
    assert run_b["tables"]["public.patients"]["failed"] == "000003"
    assert run_b["ranges"] == "public.patients 000002; public.visits 000000"
    assert run_a["first_completed_at"] and run_a["last_completed_at"]
    text = repr(trail) + security.audit_trail_markdown(trail)
    assert PATIENT_NAME not in text and SSN not in text


# --------------------------------------------------------------------------------------------
# pgaudit


def test_pgaudit_outcome_says_so_when_not_available(target: psycopg.Connection) -> None:
    """The shared target does not preload pgaudit (whether or not the package is installed)."""
    outcome = configure_pgaudit(target, ["public.patients"])
    assert not outcome.available and not outcome.configured
    assert "pgaudit" in outcome.message and "not configured" in outcome.message
    assert outcome.message in outcome.markdown()
    status = pgaudit_status(target)
    assert not status.loaded
    # Nothing was changed on the way.
    assert target.execute(
        "SELECT count(*) FROM pg_roles WHERE rolname = %s", (AUDITOR_ROLE,)
    ).fetchone() == (0,)


@pytest.fixture(scope="module")
def pgaudit_server(
    pg_binaries: PgBinaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """A Supabase-like server with pgaudit preloaded and postgres allowed its settings."""
    require(
        pg_binaries.has_extension("pgaudit"),
        f"pgaudit is not installed for PostgreSQL {pg_binaries.version} "
        f"(apt-get install postgresql-{pg_binaries.version}-pgaudit).",
    )
    require(pg_binaries.supports_ssl, "The PostgreSQL build has no SSL support.")
    server = LocalServer(
        pg_binaries, tmp_path_factory.mktemp("pgaudit") / "data", superuser=SUPABASE_ADMIN
    )
    try:
        server.init(extra_conf={"shared_preload_libraries": "pgaudit"})
        server.start()
        make_supabase_like(server, password=TARGET_PASSWORD, ssl=True)
        # What supautils' privileged_role_allowed_configs gives `postgres` on Supabase.
        server.execute("GRANT SET ON PARAMETER pgaudit.log, pgaudit.role TO postgres")
        yield server
    finally:
        server.cleanup()


def _pgaudit_database(server: LocalServer, *, extension: bool) -> str:
    name = f"audit_{uuid.uuid4().hex[:8]}"
    server.create_database(name, owner=SUPABASE_ADMIN)
    prepare_supabase_database(server, name)
    if extension:
        # Supabase lets postgres create it (supautils privileged_extensions); here the admin does.
        server.execute("CREATE EXTENSION pgaudit", dbname=name)
    return name


def _role_settings(server: LocalServer, role: str) -> list[str]:
    with server.admin_connection() as admin:
        row = admin.execute(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE r.rolname = %s AND s.setdatabase = 0",
            (role,),
        ).fetchone()
    return list(row[0]) if row else []


def test_pgaudit_object_auditing_at_role_level(pgaudit_server: LocalServer) -> None:
    server = pgaudit_server
    dbname = _pgaudit_database(server, extension=True)
    url = server.url(user="postgres", password=TARGET_PASSWORD, dbname=dbname, sslmode="require")
    with _connect(url) as conn:
        conn.execute(PATIENTS_SQL)
        conn.execute(
            "CREATE TABLE public.events (id int, at date NOT NULL) PARTITION BY RANGE (at);"
            "CREATE TABLE public.events_2024 PARTITION OF public.events "
            "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
        )
        outcome = configure_pgaudit(conn, ["public.patients", "public.events"])
        assert outcome.available and outcome.configured, outcome.message
        assert outcome.auditor_role == AUDITOR_ROLE and outcome.settings_role == "postgres"
        assert set(outcome.tables) == {"public.patients", "public.events", "public.events_2024"}
        again = configure_pgaudit(conn, ["public.patients", "public.events"])
        assert again.configured and not any(a.startswith("set ") for a in again.actions)

    settings = _role_settings(server, "postgres")
    assert f"pgaudit.role={AUDITOR_ROLE}" in settings
    assert "pgaudit.log=ddl, role" in settings
    assert not any(s.startswith(("pgaudit.log_rows", "pgaudit.log_parameter")) for s in settings)
    with server.admin_connection(dbname) as admin:
        role = admin.execute(
            "SELECT rolcanlogin, rolinherit FROM pg_roles WHERE rolname = %s", (AUDITOR_ROLE,)
        ).fetchone()
        assert role == (False, False)
        for table in ("public.patients", "public.events_2024"):
            assert admin.execute(
                "SELECT has_table_privilege(%s, %s, 'SELECT, INSERT, UPDATE, DELETE')",
                (AUDITOR_ROLE, table),
            ).fetchone() == (True,)

    # A new postgres session runs with the role-level settings; values never reach the log.
    with _connect(url) as conn:
        shown = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('pgaudit.log', 'pgaudit.role', 'pgaudit.log_rows', 'pgaudit.log_parameter')"
            ).fetchall()
        )
        assert shown == {
            "pgaudit.log": "ddl, role",
            "pgaudit.role": AUDITOR_ROLE,
            "pgaudit.log_rows": "off",
            "pgaudit.log_parameter": "off",
        }
        marker = uuid.uuid4().hex
        conn.execute(
            f"SELECT full_name FROM public.patients /* {marker} */ WHERE ssn = %s", (SSN,)
        ).fetchall()
        findings = security_findings(
            conn,
            Manifest(tables=(ManifestTable("public.patients", ("id",), "primary_key"),)),
        )
        assert "pgaudit_configured" in {f["code"] for f in findings}
        assert "pgaudit_logs_values" not in {f["code"] for f in findings}
    logged = [line for line in server.log_tail(400).splitlines() if marker in line]
    assert any("AUDIT: OBJECT" in line and "public.patients" in line for line in logged)
    assert all(SSN not in line and PATIENT_NAME not in line for line in logged)


def test_key_values_never_reach_the_audit_log(
    pgaudit_server: LocalServer, source_db: SourceDb, tmp_path: Path
) -> None:
    """A table keyed by a unique column standing in for a primary key (an SSN): the catch-up
    and the verification after the security step turned pgaudit on send their range bounds,
    and the checkpoints their last keys, as parameters, which pgaudit does not log (statement
    text only), never in the text. The user logs the WRITE class too (in this database)."""
    server = pgaudit_server
    dbname = _pgaudit_database(server, extension=True)
    server.execute(f"ALTER ROLE postgres IN DATABASE {dbname} SET pgaudit.log = 'write, ddl, role'")
    target_url = server.url(
        user="postgres", password=TARGET_PASSWORD, dbname=dbname, sslmode="require"
    )
    # SSNs held as numbers: an integer key's ranges are arithmetic, and each range's last key
    # is recorded in its checkpoint. A prefix no other number in the log has.
    marker = "7301914"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.patients (ssn bigint NOT NULL UNIQUE, full_name text NOT NULL);"
            f"INSERT INTO public.patients SELECT {marker}000000 + g, 'patient ' || g "
            "FROM generate_series(1, 300) g"
        )
    env = cli_env(source_db.url, target_url, tmp_path)
    first = cli(["run", "--batch-size", "100"], env, tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr
    assert f"pgaudit.role={AUDITOR_ROLE}" in _role_settings(server, "postgres")
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE public.patients SET full_name = 'moved' WHERE ssn % 1000 BETWEEN 150 AND 159;"
            "DELETE FROM public.patients WHERE ssn % 1000 BETWEEN 250 AND 259"
        )
    again = cli(["run", "--batch-size", "100"], env, tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr
    assert_tables_equal(source_db.url, target_url, ["public.patients"])

    logged = [line for line in server.log_tail(100_000).splitlines() if "AUDIT: " in line]
    assert any(
        "OBJECT" in line and "public.patients" in line and "DELETE" in line for line in logged
    )
    assert any("SESSION" in line and "migration_checkpoints" in line for line in logged)
    assert not [line for line in logged if marker in line]


def test_pgaudit_keeps_user_choices_and_flags_log_rows(pgaudit_server: LocalServer) -> None:
    server = pgaudit_server
    dbname = _pgaudit_database(server, extension=True)
    url = server.url(user="postgres", password=TARGET_PASSWORD, dbname=dbname, sslmode="require")
    server.execute(
        "CREATE ROLE their_auditor NOLOGIN NOINHERIT;"
        "ALTER ROLE postgres SET pgaudit.role = 'their_auditor';"
        "ALTER ROLE postgres SET pgaudit.log = 'write, ddl';"
        "ALTER ROLE postgres SET pgaudit.log_rows = on"
    )
    try:
        with _connect(url) as conn:
            conn.execute(PATIENTS_SQL)
            outcome = configure_pgaudit(conn, ["public.patients"])
            assert outcome.configured
            assert outcome.auditor_role == "their_auditor"
            assert outcome.log_classes == "write, ddl"
            assert outcome.unsafe_settings == ("pgaudit.log_rows=on (role postgres)",)
            assert "log_rows" in outcome.message
            findings = security_findings(conn, Manifest(tables=()))
            unsafe = [f for f in findings if f["code"] == "pgaudit_logs_values"]
            assert unsafe and all(f["severity"] == "ERROR" for f in unsafe)
        settings = _role_settings(server, "postgres")
        assert "pgaudit.role=their_auditor" in settings and "pgaudit.log=write, ddl" in settings
    finally:
        server.execute(
            "ALTER ROLE postgres RESET pgaudit.role; ALTER ROLE postgres RESET pgaudit.log;"
            "ALTER ROLE postgres RESET pgaudit.log_rows"
        )


def test_pgaudit_not_creatable_by_postgres_is_reported(pgaudit_server: LocalServer) -> None:
    """Loaded but not created, and postgres may not create it (no supautils here)."""
    dbname = _pgaudit_database(pgaudit_server, extension=False)
    url = pgaudit_server.url(
        user="postgres", password=TARGET_PASSWORD, dbname=dbname, sslmode="require"
    )
    with _connect(url) as conn:
        outcome = configure_pgaudit(conn, [])
    assert not outcome.available and "Database > Extensions" in outcome.message


# --------------------------------------------------------------------------------------------
# The Dagster layer, with credentials from the environment only


def _events_text(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(repr(e) for e in result.all_events)


def test_security_asset_and_checks_keep_credentials_and_phi_out(
    target: psycopg.Connection,
    target_db: TargetDb,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = tmp_path / "policies.sql"
    policy.write_text(OWN_ROWS_POLICY)
    monkeypatch.setenv("SUPABASE_DB_URL", target_db.url)
    monkeypatch.setenv(POLICY_FILE_ENV, str(policy))
    manifest = Manifest(tables=(ManifestTable("public.patients", ("id",), "primary_key"),))
    result = _materialize_security(manifest)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["rls_enabled"].passed
    assert checks["connection_encrypted"].passed
    metadata = result.asset_materializations_for_node("migration__security")[0].metadata
    assert metadata["rls_missing"].value == 0
    assert metadata["policy_sha256"].value == policy_digest(OWN_ROWS_POLICY)
    assert "public.patients" in metadata["rls"].value  # type: ignore[operator]
    assert "not configured" in metadata["pgaudit"].value  # type: ignore[operator]

    text = _events_text(result) + repr(result.dagster_run.run_config)
    for secret in (TARGET_PASSWORD, quote(TARGET_PASSWORD, safe=""), target_db.url):
        assert secret not in text
    assert SSN not in text and PATIENT_NAME not in text
    assert "request.jwt.claim.sub" not in text  # the policy text stays out; its digest is in
    with _admin(target_db) as admin:
        assert _count_as(admin, "anon", "public.patients") == 0


def test_rls_check_fails_naming_unprotected_tables(
    target: psycopg.Connection, target_db: TargetDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    target.execute("CREATE TABLE public.staff_notes (id int PRIMARY KEY, body text)")
    monkeypatch.setenv("SUPABASE_DB_URL", target_db.url)
    # Schema mode none: the tool made no table, so it changes none it does not migrate (in
    # alembic/dump mode every table of the schema is its own and gets RLS: test_cli covers it).
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),), schema_mode="none"
    )
    reported: list[bool] = []

    @dg.asset(deps=[SECURITY_KEY])  # as the verification report does
    def report_after_security() -> None:
        reported.append(True)

    result = dg.materialize(
        [build_security_asset(manifest), *build_security_checks(manifest), report_after_security],
        resources={"target": TargetDatabase(url=dg.EnvVar("SUPABASE_DB_URL"))},
        run_config={"ops": {"migration__security": {"config": {"pgaudit": False}}}},
        raise_on_error=False,
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    rls = checks["rls_enabled"]
    assert not rls.passed and rls.severity == dg.AssetCheckSeverity.ERROR
    assert reported == [True]  # the report still runs, and names the tables itself
    assert "public.staff_notes" in (rls.description or "")
    assert "public.patients" not in (rls.description or "")
    assert "rls_disabled_in_public" in (rls.description or "")


def test_an_extensions_table_in_public_is_named_not_altered(
    target: psycopg.Connection, target_db: TargetDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Alembic migration's CREATE EXTENSION postgis puts spatial_ref_sys in public, owned on
    Supabase by the extension's role. The security step made every other table of a schema it
    created RLS-protected, this one too, and failed: postgres does not own it (and RLS would
    hide PostGIS's reference data from its functions). Now it is left alone and named by a
    warning, while the migrated tables still get RLS."""
    with _admin(target_db) as admin:  # as the extension's script would leave it on Supabase
        admin.execute(
            "CREATE TABLE public.spatial_ref_sys (srid int PRIMARY KEY, auth_name text);"
            f"ALTER TABLE public.spatial_ref_sys OWNER TO {SUPABASE_ADMIN};"
            "GRANT ALL ON public.spatial_ref_sys TO anon, authenticated;"
            "ALTER EXTENSION plpgsql ADD TABLE public.spatial_ref_sys"
        )
    target.execute("CREATE TABLE public.notes (id int PRIMARY KEY)")  # made by the schema step
    monkeypatch.setenv("SUPABASE_DB_URL", target_db.url)
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),), schema_mode="alembic"
    )
    result = _materialize_security(manifest, {"pgaudit": False})
    assert result.success, _events_text(result)
    status = {t.name: t for t in rls_status(target, ("public",))}
    assert status["public.patients"].rls_enabled and status["public.notes"].rls_enabled
    assert not status["public.spatial_ref_sys"].rls_enabled
    assert status["public.spatial_ref_sys"].extension == "plpgsql"
    rls = {e.check_name: e for e in result.get_asset_check_evaluations()}["rls_enabled"]
    assert not rls.passed and rls.severity == dg.AssetCheckSeverity.WARN
    assert (rls.description or "").startswith("rls_disabled_extension_table: ")
    assert "public.spatial_ref_sys belongs to extension plpgsql" in (rls.description or "")
    findings = {(f["code"], f["subject"]): f for f in security_findings(target, manifest)}
    assert findings[("rls_disabled_extension_table", "public.spatial_ref_sys")]["severity"] == (
        "WARN"
    )
    assert not [f for f in findings.values() if f["code"] == "rls_disabled_in_public"]


def test_rows_are_never_served_by_the_api_before_the_security_step(
    source_db: SourceDb, target_db: TargetDb
) -> None:
    """Supabase's default privileges give anon and authenticated every new table in public, and
    RLS came only with the security step at the end: from its first range until then, the REST
    API served every copied row. The schema step now enables RLS (default deny) on every
    exposed table it made, so the first copied row is already out of the API's reach."""
    from supabase_migration import checkpoints
    from supabase_migration.catalog import read_tables
    from supabase_migration.copy import CopyOptions, copy_range
    from supabase_migration.planning import refresh_plan
    from supabase_migration.schema_step import migrate_schema

    with _connect(source_db.url) as conn:
        conn.execute(PATIENTS_SQL)
        conn.execute("CREATE TABLE public.visits (id int PRIMARY KEY)")  # left out: made empty
        conn.execute("CREATE SCHEMA private; CREATE TABLE private.raw (id int PRIMARY KEY)")
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),),
        schemas=("public", "private"),
        schema_mode="dump",
    )
    src, tgt = (
        parse_database_url(u, label=w)
        for u, w in ((source_db.url, "source"), (target_db.url, "target"))
    )
    outcome = migrate_schema(manifest, src, tgt)
    assert sorted(outcome.protected) == ["public.patients", "public.visits"]
    with _connect(target_db.url) as t, connect(src, autocommit=True) as s:
        status = {r.name: r.rls_enabled for r in rls_status(t, ("public", "private"))}
        assert status == {"public.patients": True, "public.visits": True, "private.raw": False}
        (info,) = [i for i in read_tables(s, ["public"]) if i.name == "patients"]
        refresh_plan(s, t, info, batch_size=1000)
        (cp,) = checkpoints.load(t, "public.patients")
        copy_range(s, t, info, cp.partition_key, CopyOptions())
    with _admin(target_db) as admin:
        assert _count_as(admin, "postgres", "public.patients") == 31
        assert _count_as(admin, "anon", "public.patients") == 0
        assert _count_as(admin, "authenticated", "public.patients") == 0
    again = migrate_schema(manifest, src, tgt)  # a later run: nothing left to protect
    assert again.protected == []


def test_views_do_not_hand_the_api_roles_the_rows_rls_withholds(
    source_db: SourceDb, target_db: TargetDb
) -> None:
    """A view reads its tables as its owner (postgres, who owns them too), past their row
    level security, and a materialized view has none: with Supabase's default privileges anon
    read, and wrote, every patient through them. The schema step takes the API roles'
    privileges on the views it made; the findings name any view still open to them, and a
    security_invoker view, which RLS governs, is not one."""
    from supabase_migration.schema_step import migrate_schema

    with _connect(source_db.url) as conn:
        conn.execute(PATIENTS_SQL)
        conn.execute(
            "CREATE VIEW public.patient_summary AS SELECT id, full_name FROM public.patients; "
            "CREATE MATERIALIZED VIEW public.patient_count AS SELECT count(*) FROM patients; "
            "CREATE VIEW public.own_patients WITH (security_invoker = true) AS "
            "SELECT id FROM public.patients"
        )
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),), schema_mode="dump"
    )
    src = parse_database_url(source_db.url, label="source")
    tgt = parse_database_url(target_db.url, label="target")
    migrate_schema(manifest, src, tgt)
    with _connect(target_db.url) as conn:
        conn.execute(PATIENTS_SQL.split(";", 1)[1])  # the rows, as the copy brings them
        conn.execute("REFRESH MATERIALIZED VIEW public.patient_count")
        assert security_findings_of(conn, manifest, "view_exposed") == []
    with _admin(target_db) as admin:
        for view in ("public.patient_summary", "public.patient_count"):
            for role in ("anon", "authenticated"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    _count_as(admin, role, view)
        assert _count_as(admin, "anon", "public.own_patients") == 0  # RLS: default deny
        assert _count_as(admin, "postgres", "public.patient_summary") == 31

        # a view opened to the API again (by hand, or made so in schema mode none) is named
        admin.execute("GRANT SELECT ON public.patient_summary, public.patient_count TO anon")
    with _connect(target_db.url) as conn:
        named = security_findings_of(conn, manifest, "view_exposed")
    assert [(f["subject"], f["severity"]) for f in named] == [
        ("public.patient_count", "ERROR"),
        ("public.patient_summary", "ERROR"),
    ]
    # a SECURITY DEFINER function in public is callable over /rpc by every role (PUBLIC may
    # execute it), and reads as its owner: named, as a warning (it may be meant as an API)
    with _connect(target_db.url) as conn:
        conn.execute(
            "CREATE FUNCTION public.patient_name(p bigint) RETURNS text LANGUAGE sql "
            "SECURITY DEFINER AS 'SELECT full_name FROM public.patients WHERE id = p'"
        )
        (definer,) = security_findings_of(conn, manifest, "definer_function_exposed")
    assert (definer["subject"], definer["severity"]) == ("public.patient_name(p bigint)", "WARN")
    assert definer["message"].startswith("anon, authenticated can call public.patient_name(")
    assert named[1]["message"] == (
        "anon can use public.patient_summary over the API, and a view reads its tables as its "
        "owner, past their row level security; REVOKE ALL ON public.patient_summary FROM "
        "PUBLIC, anon, authenticated (grant back the app's own roles), or make it "
        "security_invoker."
    )

    # the user makes the view one RLS governs and opens it to the API: a later run's schema
    # step leaves it open (it closes only the views it makes), and nothing is named
    with _admin(target_db) as admin:
        admin.execute(
            "ALTER VIEW public.patient_summary SET (security_invoker = true); "
            "TRUNCATE public.patients"  # rows no run copied would stop its preflight
        )
    migrate_schema(manifest, src, tgt)
    with _admin(target_db) as admin:
        assert _count_as(admin, "anon", "public.patient_summary") == 0  # RLS: default deny
        assert _count_as(admin, "anon", "public.patient_count") == 1  # the user's choice
    with _connect(target_db.url) as conn:
        named = security_findings_of(conn, manifest, "view_exposed")
    assert [f["subject"] for f in named] == ["public.patient_count"]  # named, not undone


def security_findings_of(
    conn: psycopg.Connection, manifest: Manifest, code: str
) -> list[dict[str, str]]:
    return [f for f in security.security_findings(conn, manifest) if f["code"] == code]


def test_schema_mode_none_protects_the_users_tables_it_copies_into(
    source_db: SourceDb, target_db: TargetDb
) -> None:
    """In schema mode none the user made the tables: the step protects the manifest's before
    any row goes in, and leaves the others as they are (the check names them)."""
    from supabase_migration.schema_step import migrate_schema

    with _connect(source_db.url) as conn:
        conn.execute(PATIENTS_SQL)
    with _connect(target_db.url) as conn:
        conn.execute(PATIENTS_SQL.split("INSERT", 1)[0])
        conn.execute("CREATE TABLE public.staff_notes (id int PRIMARY KEY)")
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),), schema_mode="none"
    )
    src = parse_database_url(source_db.url, label="source")
    tgt = parse_database_url(target_db.url, label="target")
    assert migrate_schema(manifest, src, tgt).protected == ["public.patients"]
    with _connect(target_db.url) as conn:
        status = {r.name: r.rls_enabled for r in rls_status(conn, ("public",))}
    assert status == {"public.patients": True, "public.staff_notes": False}


def test_rls_fails_with_the_schema_it_protects(
    source_db: SourceDb, target_db: TargetDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RLS is enabled in the schema's own transaction: when that cannot be done (here a
    security step of another run holds its lock past the timeout), no table is left behind
    without it, and the sentence says the schema went with it; a lock timeout stays worth a
    retry."""
    from supabase_migration.schema_step import migrate_schema

    with _connect(source_db.url) as conn:
        conn.execute(PATIENTS_SQL)
    manifest = Manifest(
        tables=(ManifestTable("public.patients", ("id",), "primary_key"),), schema_mode="dump"
    )
    src = parse_database_url(source_db.url, label="source")
    tgt = parse_database_url(target_db.url, label="target")
    monkeypatch.setattr(security, "LOCK_TIMEOUT", "300ms")
    with _admin(target_db) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('supabase_migration.security'))")
        with pytest.raises(TransientError) as stopped:
            migrate_schema(manifest, src, tgt)
    message = str(stopped.value)
    assert message.endswith("; the schema was rolled back.")
    assert "Enabling row level security failed" in message and "\n" not in message
    with _connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.patients')").fetchone() == (None,)
    outcome = migrate_schema(manifest, src, tgt)  # the retry
    assert outcome.protected == ["public.patients"]


def test_report_findings_adapter(target: psycopg.Connection, target_db: TargetDb) -> None:
    """The shape checks.build_report_asset(security_findings=...) calls: (source, target) URLs."""
    manifest = Manifest(tables=(ManifestTable("public.patients", ("id",), "primary_key"),))
    findings = security.report_findings(manifest)
    url = parse_database_url(target_db.url, label="target")
    before = findings(url, url)
    assert ("ERROR", "rls_disabled_in_public", "public.patients") in [
        (f["severity"], f["code"], f["subject"]) for f in before
    ]
    enable_rls(target, ["public.patients"], exposed_schemas=("public",))
    after = findings(url, url)
    assert not [f for f in after if f["severity"] == "ERROR"]
    assert TARGET_PASSWORD not in repr(after)


def test_definitions_wiring_runs_checks_with_the_finish_job() -> None:
    """What definitions.py should add: the asset, its checks, and SECURITY_KEY in the job."""

    @dg.asset(key=SEQUENCES_KEY)
    def sequences() -> None:
        """Stands in for assets.build_sequences_asset."""

    manifest = Manifest(tables=())
    defs = dg.Definitions(
        assets=[sequences, build_security_asset(manifest)],
        asset_checks=build_security_checks(manifest),
        jobs=[
            dg.define_asset_job(
                "migration_finish",
                selection=dg.AssetSelection.assets(SEQUENCES_KEY, SECURITY_KEY),
            )
        ],
        resources={"target": TargetDatabase(url=dg.EnvVar("SUPABASE_DB_URL"))},
    )
    job = defs.resolve_job_def("migration_finish")
    node_names = {node.name for node in job.graph.nodes}
    assert {
        "migration__sequences",
        "migration__security",
        "migration__security_rls_enabled",
        "migration__security_connection_encrypted",
    } <= node_names


def test_connection_check_warns_for_plain_loopback(
    source_db: SourceDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded demo's target has no SSL: a warning, not an error, on loopback only."""
    monkeypatch.setenv("SUPABASE_DB_URL", source_db.url)
    manifest = Manifest(tables=())
    result = _materialize_security(manifest)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    enc = checks["connection_encrypted"]
    assert not enc.passed and enc.severity == dg.AssetCheckSeverity.WARN
    assert re.search(r"loopback", enc.description or "")


def test_security_asset_fails_with_one_sentence(
    target_db: TargetDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPABASE_DB_URL", target_db.url)
    manifest = Manifest(tables=())
    result = dg.materialize(
        [build_security_asset(manifest)],
        resources={"target": TargetDatabase(url=dg.EnvVar("SUPABASE_DB_URL"))},
        run_config={
            "ops": {"migration__security": {"config": {"policy_file": str(tmp_path / "x.sql")}}}
        },
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    description = failure.step_failure_data.user_failure_data.description  # type: ignore[union-attr]
    assert description == f"The policy file {tmp_path / 'x.sql'} does not exist."
    assert TARGET_PASSWORD not in _events_text(result)


def test_errors_are_migration_errors(target_db: TargetDb) -> None:
    """A dropped connection mid-step becomes a MigrationError, not a raw psycopg error."""
    conn = _connect(target_db.url)
    conn.close()
    with pytest.raises(MigrationError, match="Reading row level security status failed"):
        rls_status(conn, ("public",))


def test_an_extension_in_an_exposed_schema_is_a_warning(target_db: TargetDb) -> None:
    """An app's migration's `CREATE EXTENSION IF NOT EXISTS citext` (alembic mode) lands in
    public on the target, whose functions the API then lists; one in a schema the API does not
    expose, or in `extensions`, is said nothing of."""
    with _connect(target_db.admin_url) as conn:
        conn.execute(
            "CREATE EXTENSION citext SCHEMA public; CREATE SCHEMA util; "
            "CREATE EXTENSION pg_trgm SCHEMA util"
        )
    with _connect(target_db.url) as conn:
        (found,) = security_findings_of(conn, Manifest(tables=()), "extension_in_exposed_schema")
        assert (found["severity"], found["subject"]) == ("WARN", "extension citext")
        assert found["message"].startswith(
            "Extension citext is installed in exposed schema public, so the API lists its functions"
        )
        exposing_util = Manifest(tables=(), exposed_schemas=("public", "util"))
        named = security_findings_of(conn, exposing_util, "extension_in_exposed_schema")
        assert [f["subject"] for f in named] == ["extension citext", "extension pg_trgm"]
