"""Preflight: what the source uses that Supabase cannot take, found before anything is written.

Both catalogs are read (never a row of user data) and every finding is one sentence naming
objects only. An ERROR stops the migration before the schema step writes anything; WARNINGs
name what will be left out or changed; INFO documents what will happen. The same list is what
`supabase-migrate plan` prints and what the schema materialization shows as a Markdown table.

Supabase facts behind the checks (shared/docs/supabase-facts.md in the workspace): the target's
`postgres` role is not a superuser; extensions live in schema `extensions` and belong to
`supabase_admin`; there is no `lo` extension; Supabase owns the `auth`, `storage`, `realtime`,
`extensions`, `graphql*`, `vault`, `pgsodium`, `net` and `supabase_*` schemas.
"""

from __future__ import annotations

import contextlib
import graphlib
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import psycopg
from psycopg import sql

from . import checkpoints
from .catalog import (
    BOOKKEEPING_SCHEMA,
    EXTENSIONS_SCHEMA,
    IN_PG_CATALOG,
    TableInfo,
    enum_labels_sql,
    ext_member,
    missing_schemas,
    own_collation_sql,
    read_tables,
    search_path_elements,
    server_major,
    table_names,
    takes_callers_search_path,
    too_old_a_source,
    user_schemas,
)
from .connections import database_error, transaction_with
from .conninfo import is_loopback_host
from .copy import replica_mode_allowed
from .errors import ConfigError, PreflightError, listed
from .manifest import Manifest
from .matviews import materialized_views, tables_read, unbound_calls
from .redaction import describe_pg_error
from .sqlbuild import READING_ROWS, key_arrays, key_texts, keys_in, rows_of


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


@dataclass(frozen=True)
class Finding:
    """One observation: `message` is one sentence with identifiers only, never row values."""

    severity: Severity
    code: str
    subject: str
    message: str


# Schemas Supabase creates or reserves (plus ours); a source schema of that name would collide.
RESERVED_SCHEMAS = frozenset(
    {
        "auth",
        "storage",
        "realtime",
        "_realtime",
        "_analytics",
        "extensions",
        "graphql",
        "graphql_public",
        "vault",
        "pgsodium",
        "pgsodium_masks",
        "net",
        "pgbouncer",
        BOOKKEEPING_SCHEMA,
    }
)

# OID-valued types: their binary form is a catalog OID that means something else on the target.
REG_TYPES = frozenset(
    {
        "regclass",
        "regcollation",
        "regconfig",
        "regdictionary",
        "regnamespace",
        "regoper",
        "regoperator",
        "regproc",
        "regprocedure",
        "regrole",
        "regtype",
    }
)

# Extensions every PostgreSQL has, which never need to be created.
BUILTIN_EXTENSIONS = frozenset({"plpgsql"})


def is_reserved_schema(name: str) -> bool:
    return name in RESERVED_SCHEMAS or name.startswith("supabase_")


# -- catalog helpers shared with schema_apply -----------------------------------------------------


def source_schemas(conn: psycopg.Connection) -> list[str]:
    """Default schemas to migrate: every non-system schema except extension-created ones.

    Our own bookkeeping schema is left out (a source that was once a target has one);
    Supabase's reserved names are kept so that preflight can stop on them.
    """
    rows = conn.execute(
        f"""
        SELECT n.nspname FROM pg_namespace n
        WHERE n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema'
          AND n.nspname <> %s
          AND NOT {ext_member("pg_namespace", "n.oid")}
        ORDER BY n.nspname
        """,
        (BOOKKEEPING_SCHEMA,),
    ).fetchall()
    return [r[0] for r in rows]


def installed_extensions(conn: psycopg.Connection) -> dict[str, tuple[str, str]]:
    """{name: (schema, version)} of the extensions created in the connected database."""
    rows = conn.execute(
        """
        SELECT e.extname, n.nspname, e.extversion
        FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        ORDER BY e.extname
        """
    ).fetchall()
    return {name: (schema, version) for name, schema, version in rows}


def untrusted_language_extensions(conn: psycopg.Connection) -> set[str]:
    """The extensions that provide an untrusted language (plperlu, plpython3u): only a
    superuser may create them, and Supabase offers none; their functions are left out too."""
    rows = conn.execute(
        """
        SELECT DISTINCT e.extname FROM pg_extension e
        JOIN pg_depend d ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
         AND d.classid = 'pg_language'::regclass AND d.deptype = 'e'
        JOIN pg_language l ON l.oid = d.objid
        WHERE NOT l.lanpltrusted
        """
    ).fetchall()
    return {name for (name,) in rows}


def available_extensions(conn: psycopg.Connection) -> dict[str, str | None]:
    """{name: default_version} the server could create (its control files)."""
    rows = conn.execute("SELECT name, default_version FROM pg_available_extensions").fetchall()
    return {name: version for name, version in rows}


# -- the checks ------------------------------------------------------------------------------------


@dataclass
class _Context:
    source: psycopg.Connection
    target: psycopg.Connection
    schemas: list[str]
    source_ext: dict[str, tuple[str, str]]
    target_ext: dict[str, tuple[str, str]]
    target_available: dict[str, str | None]
    findings: list[Finding]
    schema_mode: str = "dump"
    tables: list[str] | None = None  # the manifest's; None: every table of the schemas
    manifest: Manifest | None = None  # the one `tables` come from, with its filters

    def add(self, severity: Severity, code: str, subject: str, message: str) -> None:
        self.findings.append(Finding(severity, code, subject, message))

    def migrates(self, table: str) -> bool:
        """Whether `table` (schema.name) is one to migrate."""
        return self.tables is None or table in self.tables

    def migrated(self, conn: psycopg.Connection, query: str) -> Iterator[tuple[str, tuple]]:
        """(schema.name, the other columns) of each row of `query`, which takes the schemas
        and leads with schema and table, whose table is one to migrate."""
        for schema, table, *rest in conn.execute(query, (self.schemas,)):
            name = f"{schema}.{table}"
            if self.migrates(name):
                yield name, tuple(rest)

    @cached_property
    def source_tables(self) -> list[TableInfo]:
        """The source's tables of the schemas, read once for every check that needs them."""
        return read_tables(self.source, self.schemas)

    @cached_property
    def target_shapes(self) -> dict[str, _TableShape]:
        return table_shapes(self.target, self.schemas)

    def missing_extensions(self) -> set[str]:
        return {
            name
            for name in self.source_ext
            if name not in BUILTIN_EXTENSIONS
            and name not in self.target_ext
            and name not in self.target_available
        }


def run_preflight(
    source: psycopg.Connection,
    target: psycopg.Connection,
    *,
    schemas: Sequence[str] | None = None,
    schema_mode: str = "dump",
    tables: Sequence[str] | None = None,
    manifest: Manifest | None = None,
) -> list[Finding]:
    """Compare the source's catalog with what the target can take; write nothing anywhere.

    `schemas` are the user schemas to migrate (default: every non-system schema of the source).
    In schema mode `none` the target's tables must already take the source's rows as they are.
    The findings come back sorted: errors first.
    """
    too_old = too_old_a_source(source)
    if too_old:  # the other checks' queries would fail on its catalogs
        return [Finding(Severity.ERROR, "source-version", "source", too_old)]
    with _reading_catalogs("Preflight"):
        return _run_checks(source, target, schemas, schema_mode, tables, manifest)


@contextlib.contextmanager
def _reading_catalogs(who: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:  # read only: a lost connection is simply worth another try
        sentence = f"{who} could not read the catalogs: {describe_pg_error(exc)}."
        raise database_error(exc, sentence) from None


def _run_checks(
    source: psycopg.Connection,
    target: psycopg.Connection,
    schemas: Sequence[str] | None,
    schema_mode: str,
    tables: Sequence[str] | None = None,
    manifest: Manifest | None = None,
) -> list[Finding]:
    ctx = _Context(
        source=source,
        target=target,
        schemas=list(schemas) if schemas is not None else source_schemas(source),
        source_ext=installed_extensions(source),
        target_ext=installed_extensions(target),
        target_available=available_extensions(target),
        findings=[],
        schema_mode=schema_mode,
        tables=list(tables) if tables is not None else None,
        manifest=manifest,
    )
    for check in (
        _check_versions,
        _check_tables_exist,
        _check_encryption,
        _check_encoding,
        _check_date_style,
        _check_target_writable,
        _check_alembic_search_path,
        _check_schemas,
        _check_extensions,
        _check_types,
        _check_casts,
        _check_leakproof_functions,
        _check_function_search_paths,
        _check_source_settings,
        _check_refresh_search_path,
        _check_columns,
        _check_keys,
        _check_tables_left_out,
        _check_exposed_schemas,
        _check_owners,
        _check_policies,
        _check_source_rls,
        _check_table_behaviour,
        _check_without_replica_mode,
        _check_large_objects,
        _check_superuser_objects,
        _check_materialized_views,
        _check_privileges,
        _check_target_objects,
        _check_existing_tables,
        _check_rows_not_copied_here,
        _check_target_privileges,
        _check_rls_owners,
        _check_audit,
    ):
        check(ctx)
    return _by_severity(ctx.findings)


def _by_severity(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then warnings, then the rest, each in the order found."""
    return sorted(findings, key=lambda f: _ORDER[f.severity])


def _check_versions(ctx: _Context) -> None:
    src, tgt = server_major(ctx.source), server_major(ctx.target)
    src_text = ctx.source.info.parameter_status("server_version") or str(src)
    tgt_text = ctx.target.info.parameter_status("server_version") or str(tgt)
    ctx.add(
        Severity.INFO,
        "server-version",
        "servers",
        f"Source runs PostgreSQL {_short_version(src_text)} and the target "
        f"{_short_version(tgt_text)}.",
    )
    if tgt < src:
        # Supabase offers 15 and 17: a 16 source into 15 usually works, so warn, and the schema
        # step applies everything in one transaction, so a feature the target lacks leaves
        # nothing behind.
        ctx.add(
            Severity.WARNING,
            "version-downgrade",
            "servers",
            f"The target's major version {tgt} is older than the source's {src}, so objects "
            "using newer features may fail to apply; prefer a target of the same major or newer.",
        )


def _short_version(text: str) -> str:
    return text.split(" ", 1)[0]


def _check_encryption(ctx: _Context) -> None:
    for label, conn, remote_severity in (
        ("target", ctx.target, Severity.ERROR),
        ("source", ctx.source, Severity.WARNING),
    ):
        if conn.pgconn.ssl_in_use:
            ctx.add(
                Severity.INFO,
                "ssl",
                label,
                f"The connection to the {label} is encrypted with TLS.",
            )
            continue
        local = is_loopback_host(conn.info.host)
        severity = Severity.WARNING if local else remote_severity
        where = "a local server" if local else f"host {conn.info.host}"
        ctx.add(
            severity,
            "ssl",
            label,
            f"The connection to the {label} ({where}) is not encrypted; PHI must travel over "
            "TLS, so use sslmode=verify-full (or require) in its URL.",
        )


def _check_encoding(ctx: _Context) -> None:
    query = (
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()"
    )
    src = ctx.source.execute(query).fetchone()
    tgt = ctx.target.execute(query).fetchone()
    if src and tgt and src[0] != tgt[0]:
        severity = Severity.ERROR if tgt[0] == "SQL_ASCII" else Severity.WARNING
        ctx.add(
            severity,
            "encoding",
            "database",
            f"The source database is encoded {src[0]} and the target {tgt[0]}; "
            + (
                # SQL_ASCII stores whatever bytes it was given: nothing to convert from.
                "the source never checked its text, so a range holding text that is not "
                f"valid {tgt[0]} fails its copy (named by partition); fix those rows on the "
                "source, and run again."
                if src[0] == "SQL_ASCII"
                else "text is converted on the way and characters the target encoding lacks "
                "fail the copy."
            ),
        )


def _check_date_style(ctx: _Context) -> None:
    """The tool reads the target's checkpoints, timestamps included, in sessions it leaves as
    the database sets them (a transaction pooler keeps no session settings), and psycopg reads
    dates as text only in the ISO style: any other made every step fail unexplained."""
    style = ctx.target.info.parameter_status("DateStyle") or "ISO"
    if not style.upper().startswith("ISO"):
        order = style.split(",")[-1].strip() if "," in style else "MDY"
        ctx.add(
            Severity.ERROR,
            "date-style",
            "database",
            f"The target database shows dates in the {style} style, and this tool reads them "
            "only in ISO; set it for the migration (ALTER DATABASE ... SET DateStyle = "
            f"'ISO, {order}', which keeps how dates are read), then run again.",
        )


def _check_target_writable(ctx: _Context) -> None:
    """A read-only target (a replica's URL, or `default_transaction_read_only` on, as Supabase
    sets it when a project's disk is full) failed the schema step with the server's words."""
    row = ctx.target.execute(
        "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()"
    ).fetchone()
    read_only, replica = row if row else (False, False)
    if replica:
        ctx.add(
            Severity.ERROR,
            "target-read-only",
            "database",
            "The target URL names a read replica (the server is in recovery); use the "
            "primary's URL.",
        )
    elif read_only:
        ctx.add(
            Severity.ERROR,
            "target-read-only",
            "database",
            "The target database is read-only for its login (default_transaction_read_only "
            "is on, as Supabase sets it when a project's disk is full); free space or reset "
            "it (ALTER ROLE ... IN DATABASE ... RESET default_transaction_read_only), then run "
            "again.",
        )


def _check_alembic_search_path(ctx: _Context) -> None:
    """An Alembic migration creates its tables in the login's current schema: a search_path
    that selects none, or one the login may not create in, failed the upgrade in the
    server's words (`no schema has been selected to create in`)."""
    if ctx.schema_mode != "alembic":
        return
    row = ctx.target.execute(
        "SELECT current_setting('search_path'), current_schema(), "
        "coalesce(has_schema_privilege(current_schema(), 'CREATE'), false)"
    ).fetchone()
    if row is None or row[2]:
        return
    path, schema, _ = row
    where = (
        f"its first schema, {schema}, is one it may not create tables in"
        if schema
        else "it names no schema that exists"
    )
    ctx.add(
        Severity.ERROR,
        "search-path",
        "database",
        f"The target login's search_path is '{path}', and {where}: an Alembic migration "
        "creates its tables there. Reset it (ALTER ROLE ... IN DATABASE ... RESET "
        "search_path), then run again.",
    )


def _check_schemas(ctx: _Context) -> None:
    missing = missing_schemas(ctx.source, ctx.schemas)
    for schema in ctx.schemas:
        if schema in missing:
            ctx.add(
                Severity.ERROR,
                "schema-missing",
                f"schema {schema}",
                f"Schema {schema} is listed for migration but does not exist on the source; "
                "fix the schema list in migration.yaml.",
            )
        elif is_reserved_schema(schema):
            ctx.add(
                Severity.ERROR,
                "reserved-schema",
                f"schema {schema}",
                f"Schema {schema} on the source has a name Supabase reserves for its own "
                "services, so it would collide on the target; rename it on the source or "
                "exclude it from the migration.",
            )


def _check_extensions(ctx: _Context) -> None:
    present: list[str] = []
    untrusted = untrusted_language_extensions(ctx.source) if ctx.source_ext else set()
    for name, (schema, version) in ctx.source_ext.items():
        if name in BUILTIN_EXTENSIONS:
            continue
        if name in untrusted and name not in ctx.target_ext:
            ctx.add(
                Severity.WARNING,
                "untrusted-extension",
                f"extension {name}",
                f"Extension {name} provides an untrusted language, which only a superuser may "
                "create and Supabase does not offer; dump mode leaves it out, with its functions.",
            )
            continue
        if name in ctx.target_ext:
            target_schema, target_version = ctx.target_ext[name]
            present.append(name)
            if target_schema != schema:
                ctx.add(
                    Severity.INFO,
                    "extension-schema",
                    f"extension {name}",
                    f"Extension {name} is in schema {schema} on the source and in "
                    f"{target_schema} on the target; dump mode rewrites {schema}-qualified "
                    f"references to its objects, other code must find them through search_path.",
                )
            if target_version != version:
                ctx.add(
                    Severity.INFO,
                    "extension-version",
                    f"extension {name}",
                    f"Extension {name} is version {version} on the source and "
                    f"{target_version} on the target.",
                )
        elif name in ctx.target_available:
            ctx.add(
                Severity.INFO,
                "extension-install",
                f"extension {name}",
                f"Extension {name} is available on the target but not installed; dump mode "
                "creates it in schema extensions (alembic mode leaves it to your migrations).",
            )
            default = ctx.target_available[name]
            if default and default != version:
                ctx.add(
                    Severity.INFO,
                    "extension-version",
                    f"extension {name}",
                    f"Extension {name} is version {version} on the source and the target "
                    f"offers {default}.",
                )
        else:
            hint = (
                "Supabase has no lo extension: store the data in bytea columns instead"
                if name == "lo"
                else "ask for it to be enabled on the target, or drop it from the source if "
                "nothing uses it"
            )
            ctx.add(
                Severity.ERROR,
                "extension-missing",
                f"extension {name}",
                f"Extension {name} is installed on the source but the target does not offer "
                f"it; {hint}.",
            )
    if present:
        ctx.add(
            Severity.INFO,
            "extensions-present",
            "extensions",
            f"Extensions already on the target: {', '.join(sorted(present))}.",
        )
    commented = ctx.source.execute(
        """
        SELECT count(*) FROM pg_extension e
        JOIN pg_description d ON d.objoid = e.oid AND d.classoid = 'pg_extension'::regclass
        WHERE e.extname <> ALL(%s)
        """,
        (list(BUILTIN_EXTENSIONS),),
    ).fetchone()
    if commented and commented[0]:
        ctx.add(
            Severity.INFO,
            "extension-comment",
            "extensions",
            "Comments on extensions are skipped: on Supabase extensions belong to "
            "supabase_admin and postgres is not a superuser.",
        )


_TYPES_SQL = f"""
SELECT n.nspname, t.typname, t.typtype
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = ANY(%s)
  AND t.typtype IN ('b', 'c', 'd', 'e', 'r')
  AND NOT (t.typtype = 'b' AND t.typcategory = 'A')
  AND (t.typtype <> 'c' OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
  AND NOT {ext_member("pg_type", "t.oid")}
ORDER BY 1, 2
"""

_TYPE_KINDS = {"e": "enum", "d": "domain", "c": "composite type", "r": "range type"}


def _check_types(ctx: _Context) -> None:
    counts: dict[str, int] = defaultdict(int)
    for schema, name, kind in ctx.source.execute(_TYPES_SQL, (ctx.schemas,)):
        if kind == "b":
            ctx.add(
                Severity.ERROR,
                "base-type",
                f"{schema}.{name}",
                f"Type {schema}.{name} is a base type with C input/output functions, which "
                "only a superuser can create and Supabase does not allow; replace it with a "
                "domain or a column of a built-in type.",
            )
        else:
            counts[_TYPE_KINDS[kind]] += 1
    if counts:
        summary = ", ".join(
            f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(counts.items())
        )
        ctx.add(
            Severity.INFO,
            "custom-types",
            "types",
            f"The migrated schemas define {summary}; they are created with the schema.",
        )


# Each search_path a function of the migrated schemas sets for itself.
_FUNCTION_PATHS_SQL = f"""
SELECT n.nspname || '.' || p.proname, substr(cfg, length('search_path=') + 1)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
CROSS JOIN LATERAL unnest(p.proconfig) AS cfg
WHERE n.nspname = ANY(%s) AND cfg LIKE 'search_path=%%' AND NOT {ext_member("pg_proc", "p.oid")}
ORDER BY 1
"""


def _check_function_search_paths(ctx: _Context) -> None:
    """Extensions are in schema `extensions` on Supabase: a function that sets its own
    search_path to an extension's schema on the source no longer finds the extension's
    functions there. Dump mode adds the new schema to that search_path (schema_apply); a
    schema made otherwise must."""
    moved = {
        schema
        for name, (schema, _) in ctx.source_ext.items()
        if name not in BUILTIN_EXTENSIONS
        and ctx.target_ext.get(name, (EXTENSIONS_SCHEMA,))[0] != schema
    }
    for function, setting in ctx.source.execute(_FUNCTION_PATHS_SQL, (ctx.schemas,)):
        path = search_path_elements(setting)
        if EXTENSIONS_SCHEMA in path or not moved.intersection(path):
            continue
        said = f"Function {function} sets its search_path to {setting}, where extensions it "
        if ctx.schema_mode == "dump":
            ctx.add(
                Severity.INFO,
                "function-search-path",
                function,
                said + "may call are on the source; dump mode adds the schema they are in on "
                "the target to it, right after theirs on the source.",
            )
            continue
        ctx.add(
            Severity.WARNING,
            "function-search-path",
            function,
            said + "may call are on the source; on the target they are in schema extensions, "
            "so its unqualified calls to them fail: add extensions to its search_path there.",
        )


# Settings the source gives the sessions of its database: ALTER DATABASE ... SET, ALTER ROLE
# ... IN DATABASE ... SET, ALTER ROLE ALL SET, and ALTER ROLE ... SET of a role that may log in
# (an application's role usually gets its search_path so). (role or '', in this database only,
# the role is the source's login, setting entry).
_SOURCE_SETTINGS_SQL = """
SELECT coalesce(r.rolname::text, ''), s.setdatabase <> 0,
       coalesce(r.rolname = current_user, false), cfg
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
CROSS JOIN LATERAL unnest(s.setconfig) AS cfg
WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
   OR (s.setdatabase = 0 AND (s.setrole = 0 OR r.rolcanlogin))
ORDER BY 1, 2 DESC, 4
"""
# A search_path of only these finds on Supabase what it found on the source.
_SUPABASE_PATH = frozenset({"$user", "public", "extensions", "pg_catalog", "pg_temp"})


def _routines_without_a_search_path(ctx: _Context) -> list[str]:
    """The user's functions and procedures in the migrated schemas that take the caller's
    search_path (`takes_callers_search_path`), as `unbound_calls` names them."""
    query = f"""
        SELECT CASE p.prokind WHEN 'p' THEN 'procedure ' ELSE '' END
               || p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        JOIN pg_language l ON l.oid = p.prolang
        WHERE n.nspname = ANY(%s) AND {takes_callers_search_path(server_major(ctx.source))}
        ORDER BY 1
        """
    with transaction_with(ctx.source, [IN_PG_CATALOG], commit=False):
        rows = ctx.source.execute(query, (ctx.schemas,)).fetchall()
    return [name for (name,) in rows]


def _settings_scope(role: str, in_database: bool) -> tuple[str, str]:
    """Whose settings they are, and the statement that set them."""
    if not role:
        if in_database:
            return "database", "ALTER DATABASE ... SET"
        return "cluster (every role)", "ALTER ROLE ALL SET"
    if in_database:
        return f"role {role} (in this database)", "ALTER ROLE ... IN DATABASE ... SET"
    return f"role {role}", "ALTER ROLE ... SET"


def _check_source_settings(ctx: _Context) -> None:
    """The source's database and role settings are no part of its schema: neither pg_dump nor
    Alembic carries them. A search_path set there let functions and the application name
    tables without their schema; on the target a materialized view's refresh then failed
    with `relation "…" does not exist` (its name withheld: a value cast to regclass gives
    the same error)."""
    by_scope: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    listed_all: set[tuple[str, str]] = set()  # whose other settings are listed too
    for role, in_database, ours, entry in ctx.source.execute(_SOURCE_SETTINGS_SQL).fetchall():
        name, _, value = entry.partition("=")
        scope = _settings_scope(role, in_database)
        by_scope[scope][name.lower()] = value
        if not role or in_database or ours:  # not every login's of a shared server
            listed_all.add(scope)
    unbound: list[str] | None = None
    for (whose, how), settings in by_scope.items():
        subject = f"source {whose}"
        path = settings.pop("search_path", None)
        schemas = {part.strip().strip('"') for part in (path or "").split(",")} - {""}
        if path is not None and not schemas <= _SUPABASE_PATH:
            if unbound is None:
                unbound = _routines_without_a_search_path(ctx)
            routines, advice = "", ""
            alter = f"(ALTER FUNCTION or ALTER PROCEDURE ... SET search_path = {path})"
            if len(unbound) == 1:
                routines = f", and {unbound[0]}, which sets no search_path of its own,"
                advice = f"give it one {alter} before migrating if it names tables, and "
            elif unbound:
                routines = (
                    f", and any of the {len(unbound)} functions and procedures that set none "
                    f"of their own ({listed(unbound, 3)}),"
                )
                advice = f"give those that name tables their own {alter} before migrating, and "
            ctx.add(
                Severity.WARNING,
                "source-search-path",
                subject,
                f"The source {whose} sets search_path to {path} ({how}), which no migration "
                'carries: on the target, sessions take their login\'s (on Supabase "$user", '
                f"public, extensions), so the application's queries{routines} will not find "
                f"there a table they name without its schema; {advice}set the application's "
                "role's on the target (ALTER ROLE ... SET search_path).",
            )
        if settings and (whose, how) in listed_all:
            # Names only: a custom setting's value may be a secret (a JWT secret, a key).
            ctx.add(
                Severity.INFO,
                "source-settings",
                subject,
                f"The source {whose} sets {listed(sorted(settings), 5)} ({how}), which no "
                "migration carries; set on the target, for the application's role, those it "
                "relies on.",
            )


def _check_refresh_search_path(ctx: _Context) -> None:
    """From PostgreSQL 17 a refresh runs with search_path `pg_catalog, pg_temp`, whatever the
    session's: a populated view calling a function that names a table without its schema,
    refreshed on an older source, fails on such a target (after the whole copy)."""
    if server_major(ctx.target) < 17 or server_major(ctx.source) >= 17:
        return
    for view in materialized_views(ctx.source, ctx.schemas):
        calls = unbound_calls(ctx.source, view) if view.populated else []
        if calls:
            one = len(calls) == 1
            ctx.add(
                Severity.WARNING,
                "materialized-view-search-path",
                view.qualified,
                f"Materialized view {view.qualified} calls {listed(calls, 3)}, which "
                f"{'sets' if one else 'set'} no search_path of {'its' if one else 'their'} "
                "own: the target's PostgreSQL refreshes it with search_path pg_catalog only, "
                "so a table named there without its schema is not found and the refresh "
                f"fails; give {'it' if one else 'them'} one (ALTER FUNCTION ... SET "
                "search_path = ...) on the source before migrating.",
            )


def _check_leakproof_functions(ctx: _Context) -> None:
    """Only a superuser may mark a function LEAKPROOF: the schema step failed on the first."""
    if ctx.schema_mode != "dump":
        return
    for (function,) in ctx.source.execute(
        f"""
        SELECT n.nspname || '.' || p.proname FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = ANY(%s) AND p.proleakproof AND NOT {ext_member("pg_proc", "p.oid")}
        ORDER BY 1
        """,
        (ctx.schemas,),
    ):
        ctx.add(
            Severity.ERROR,
            "leakproof-function",
            function,
            f"Function {function} is LEAKPROOF, which only a superuser may mark and Supabase "
            "does not allow; make it NOT LEAKPROOF on the source (ALTER FUNCTION ... NOT "
            "LEAKPROOF), or create it on the target yourself and use --schema-mode none.",
        )


# The user's casts that touch the schemas given (%s): their types or function (a cast belongs
# to no schema, so pg_dump --schema leaves it out). Names are read under search_path
# pg_catalog, so every one outside pg_catalog comes qualified.
_CASTS_SQL = f"""
SELECT format_type(c.castsource, NULL), format_type(c.casttarget, NULL), c.castmethod,
       c.castcontext, CASE WHEN c.castfunc <> 0 THEN c.castfunc::regprocedure::text END,
       pn.nspname, p.proname, coalesce(l.lanpltrusted, true),
       sn.nspname, s.typname, sn.nspname = ANY(%s) AND NOT {ext_member("pg_type", "s.oid")},
       tn.nspname, t.typname, tn.nspname = ANY(%s) AND NOT {ext_member("pg_type", "t.oid")}
FROM pg_cast c
JOIN pg_type s0 ON s0.oid = c.castsource JOIN pg_type t0 ON t0.oid = c.casttarget
-- an array type is made with its element: what the cast waits for, and who owns it
JOIN pg_type s ON s.oid = CASE WHEN s0.typcategory = 'A' THEN s0.typelem ELSE s0.oid END
JOIN pg_type t ON t.oid = CASE WHEN t0.typcategory = 'A' THEN t0.typelem ELSE t0.oid END
JOIN pg_namespace sn ON sn.oid = s.typnamespace JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_proc p ON p.oid = c.castfunc
LEFT JOIN pg_namespace pn ON pn.oid = p.pronamespace
LEFT JOIN pg_language l ON l.oid = p.prolang
WHERE c.oid >= 16384 AND NOT {ext_member("pg_cast", "c.oid")}
  AND ARRAY[sn.nspname, tn.nspname, coalesce(pn.nspname, '')]::text[] && %s::text[]
ORDER BY 1, 2
"""
_CAST_CONTEXT = {"e": "", "a": " AS ASSIGNMENT", "i": " AS IMPLICIT"}


@dataclass(frozen=True)
class UserCast:
    """A cast of the user's: pg_dump of schemas leaves every one out (a cast belongs to no
    schema), so dump mode creates it, after its function and types, where the target's
    `postgres` may: it owns one of the cast's types (one the schema step creates)."""

    source_type: str
    target_type: str
    statement: str
    function: tuple[str, str] | None  # (schema, name)
    types: tuple[tuple[str, str], ...]  # (schema, name) of those the schema step creates
    not_copied: str  # why dump mode cannot create it on the target, or ""

    @property
    def name(self) -> str:
        return f"cast ({self.source_type} AS {self.target_type})"


def user_casts(conn: psycopg.Connection, schemas: Sequence[str]) -> list[UserCast]:
    with transaction_with(conn, [IN_PG_CATALOG], commit=False):
        rows = conn.execute(_CASTS_SQL, (list(schemas),) * 3).fetchall()
    casts = []
    for (
        source_type, target_type, method, context, function, f_schema, f_name, trusted,
        s_schema, s_name, s_ours, t_schema, t_name, t_ours,
    ) in rows:  # fmt: skip
        how = {"f": f"WITH FUNCTION {function}", "i": "WITH INOUT"}.get(method, "WITHOUT FUNCTION")
        not_copied = (
            "a binary-coercible cast (WITHOUT FUNCTION) needs superuser on Supabase"
            if method == "b"
            else "creating a cast needs ownership of one of its types, and neither is one "
            "the schema step creates"
            if not (s_ours or t_ours)
            else f"its function {function} is in schema {f_schema}, which is not migrated"
            if function and f_schema != "pg_catalog" and f_schema not in schemas
            else "its function's language is untrusted, which needs superuser on Supabase"
            if not trusted
            else ""
        )
        casts.append(
            UserCast(
                source_type,
                target_type,
                f"CREATE CAST ({source_type} AS {target_type}) {how}{_CAST_CONTEXT[context]};",
                (f_schema, f_name) if function else None,
                tuple(
                    (sc, n)
                    for sc, n, ours in [(s_schema, s_name, s_ours), (t_schema, t_name, t_ours)]
                    if ours
                ),
                not_copied,
            )
        )
    return casts


def _check_casts(ctx: _Context) -> None:
    if ctx.schema_mode != "dump":
        return  # alembic mode: the migrations make it; none: the user made the schema
    for cast in user_casts(ctx.source, ctx.schemas):
        if cast.not_copied:
            ctx.add(
                Severity.WARNING,
                "cast",
                cast.name,
                f"The {cast.name} is not copied: {cast.not_copied}. A view, default or "
                "function that uses it fails, or behaves otherwise, on the target: rewrite "
                "those without it, or make the schema yourself and use --schema-mode none.",
            )


# Each column's type, followed through domains and arrays down to the types it is made of.
_COLUMN_TYPES_SQL = f"""
WITH RECURSIVE cols AS (
    SELECT n.nspname, c.relname, a.attname, a.atttypid AS typid, a.atttypid AS orig
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND n.nspname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
      AND NOT {ext_member("pg_class", "c.oid")}
), chain AS (
    SELECT * FROM cols
    UNION ALL
    SELECT ch.nspname, ch.relname, ch.attname,
           CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END, ch.orig
    FROM chain ch JOIN pg_type t ON t.oid = ch.typid
    WHERE t.typtype = 'd' OR (t.typcategory = 'A' AND t.typelem <> 0)
)
SELECT DISTINCT ch.nspname, ch.relname, ch.attname, format_type(ch.orig, NULL),
       t.typname, tn.nspname, e.extname
FROM chain ch
JOIN pg_type t ON t.oid = ch.typid
JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
LEFT JOIN pg_extension e ON e.oid = d.refobjid
WHERE (tn.nspname = 'pg_catalog' AND (t.typname = 'oid' OR t.typname = ANY(%s)))
   OR e.extname IS NOT NULL
ORDER BY 1, 2, 3
"""


def _check_columns(ctx: _Context) -> None:
    missing = ctx.missing_extensions()
    parts: dict[tuple[str, str, str], list[tuple[str, str, str | None]]] = defaultdict(list)
    for schema, table, column, type_sql, typname, _, extname in ctx.source.execute(
        _COLUMN_TYPES_SQL, (ctx.schemas, list(REG_TYPES))
    ):
        parts[(schema, table, column)].append((type_sql, typname, extname))
    for (schema, table, column), rows in parts.items():
        subject = f"{schema}.{table}.{column}"
        type_sql = rows[0][0]
        lacking = sorted({ext for _, _, ext in rows if ext in missing})
        if lacking:
            ctx.add(
                Severity.ERROR,
                "extension-type",
                subject,
                f"Column {subject} has type {type_sql} from extension {lacking[0]}, which the "
                "target does not offer, so the table cannot be created there.",
            )
        elif any(ext is None and name in REG_TYPES for _, name, ext in rows):
            ctx.add(
                Severity.ERROR,
                "reg-type",
                subject,
                f"Column {subject} has type {type_sql}, which stores catalog OIDs that differ "
                "on the target; change the column to text (the object's name) before migrating.",
            )
        elif any(ext is None and name == "oid" for _, name, ext in rows):
            ctx.add(
                Severity.WARNING,
                "oid-column",
                subject,
                f"Column {subject} has type {type_sql}: its numbers are copied as they are, so "
                "any that point at large objects or catalog rows will not match on the target.",
            )


def _check_tables_exist(ctx: _Context) -> None:
    """A manifest table the source lacks (a typo, a table renamed since `init`): said first,
    rather than what follows from it (its children's foreign keys to a table not migrated)."""
    if ctx.tables is None:
        return
    known = {t.qualified_name: t for t in ctx.source_tables}
    for name in ctx.tables:
        if name not in known:
            ctx.add(
                Severity.ERROR,
                "table-missing",
                name,
                f"Table {name} is in the manifest but not in the source; fix its name there, "
                "or run `supabase-migrate init` again.",
            )
    entries = {t.name: t for t in ctx.manifest.tables} if ctx.manifest is not None else {}
    for name, entry in entries.items():
        source = known.get(name)
        if source is not None and entry.key != source.key:  # the ranges are the source's key's
            said = ", ".join(entry.key) or "none"
            ctx.add(
                Severity.ERROR,
                "manifest-key",
                name,
                f"The manifest gives {name} the key ({said}), but its ranges are keyed by the "
                f"source's ({', '.join(source.key) or 'none'}: its primary key, or else a unique "
                "index on NOT NULL columns); if the source's key changed since `init`, run "
                "`supabase-migrate init` again, else put the manifest's back.",
            )


def _check_keys(ctx: _Context) -> None:
    """Keys that make ranges, and foreign keys whose parent is left behind: the copied rows
    would break them on the target, and verification could never pass."""
    tables = ctx.source_tables
    # Only parents the user could migrate: a table of another schema, or an extension's
    # (PostGIS's spatial_ref_sys), is the target's to have.
    known = {t.qualified_name for t in tables}
    for table in tables:
        name = table.qualified_name
        for parent in table.parents if ctx.migrates(name) else ():
            if parent in known and not ctx.migrates(parent):
                ctx.add(
                    Severity.ERROR,
                    "parent-left-out",
                    name,
                    f"{name} has a foreign key to {parent}, which is not migrated, so its "
                    f"copied rows would break it on the target; migrate {parent} too, or leave "
                    f"{name} out as well.",
                )
        if table.key_source == "none":
            ctx.add(
                Severity.WARNING,
                "no-key",
                table.qualified_name,
                f"Table {table.qualified_name} has no primary key or NOT NULL unique index, so "
                "it is copied as one whole-table partition replaced atomically (add a primary "
                "key to copy it in resumable ranges).",
            )


_OWNERS_SQL = f"""
SELECT r.rolname, count(*) FROM (
    SELECT n.nspowner AS owner FROM pg_namespace n
    WHERE n.nspname = ANY(%(schemas)s)
    UNION ALL
    SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
      AND NOT {ext_member("pg_class", "c.oid")}
    UNION ALL
    SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = ANY(%(schemas)s) AND t.typtype IN ('b', 'd', 'e', 'r')
      AND t.typcategory <> 'A' AND NOT {ext_member("pg_type", "t.oid")}
    UNION ALL
    SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = ANY(%(schemas)s) AND NOT {ext_member("pg_proc", "p.oid")}
) o JOIN pg_roles r ON r.oid = o.owner
GROUP BY r.rolname ORDER BY r.rolname
"""


def watched_tables_left_out(source: psycopg.Connection, manifest: Manifest) -> list[str]:
    """The source's tables the manifest's filters would take but it does not list: in its
    schemas, and in schemas made since if it was written for every schema. Made after `init`,
    or taken out of the manifest by hand (`removed_from_the_manifest` tells them apart)."""
    schemas = list(manifest.schemas)
    if manifest.every_schema:
        schemas += [s for s in user_schemas(source) if s not in schemas]
    return manifest.left_out(table_names(source, schemas))


def removed_from_the_manifest(
    target: psycopg.Connection, left_out: Sequence[str]
) -> tuple[list[str], list[str]]:
    """`left_out` split into tables the source gained (nothing migrates them: verify fails)
    and tables earlier runs copied, which the user took out of the manifest (a warning)."""
    removed = checkpoints.planned_among(target, left_out)
    return [name for name in left_out if name not in removed], removed


def _check_tables_left_out(ctx: _Context) -> None:
    """Tables the source gained after `init`: nothing would migrate them, and verify fails."""
    if ctx.manifest is None:
        return
    gained, removed = removed_from_the_manifest(
        ctx.target, watched_tables_left_out(ctx.source, ctx.manifest)
    )
    if gained:
        sentence = ctx.manifest.left_out_sentence(gained)
        ctx.add(Severity.WARNING, "tables-left-out", "manifest", sentence)
    if removed:
        sentence = ctx.manifest.removed_sentence(removed)
        ctx.add(Severity.INFO, "tables-removed", "manifest", sentence)


def _check_exposed_schemas(ctx: _Context) -> None:
    """The manifest's exposed_schemas decide which migrated tables get row level security
    before any row is copied: a misspelt one (`pubic`) left public's tables readable by the
    API roles, and every check passed."""
    if ctx.manifest is None:
        return
    from .security import check_exposed_schemas  # here: security imports verify, verify this

    exposed = list(ctx.manifest.exposed_schemas)
    try:  # the schema step's own rule, said here before anything is written
        check_exposed_schemas(exposed)
    except ConfigError as exc:
        ctx.add(Severity.ERROR, "bookkeeping-exposed", f"schema {BOOKKEEPING_SCHEMA}", exc.message)
        exposed.remove(BOOKKEEPING_SCHEMA)
    on_target = {
        name
        for (name,) in ctx.target.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (exposed,)
        )
    }
    for schema in exposed:
        if schema not in ctx.schemas and schema not in on_target:
            ctx.add(
                Severity.ERROR,
                "exposed-schema-unknown",
                f"schema {schema}",
                f"exposed_schemas in migration.yaml lists {schema}, which is neither a "
                "migrated schema nor a schema of the target; fix the name (the tables of the "
                "schemas the API exposes get row level security from the start).",
            )
    if "public" in ctx.schemas and "public" not in exposed:
        ctx.add(
            Severity.WARNING,
            "public-not-exposed",
            "schema public",
            "exposed_schemas in migration.yaml leaves out public, which Supabase's API "
            "exposes unless the project was set otherwise, so public's tables get no row "
            "level security from this tool; add public unless the API does not expose it.",
        )


def _target_roles(ctx: _Context) -> set[str]:
    return {r[0] for r in ctx.target.execute("SELECT rolname FROM pg_roles")}


def _check_owners(ctx: _Context) -> None:
    roles = _target_roles(ctx)
    for role, count in ctx.source.execute(_OWNERS_SQL, {"schemas": ctx.schemas}):
        if role not in roles:
            ctx.add(
                Severity.WARNING,
                "missing-owner",
                f"role {role}",
                f"{count} object{'s' if count > 1 else ''} in the migrated schemas "
                f"{'are' if count > 1 else 'is'} owned by role {role}, which does not exist "
                "on the target; ownership goes to postgres.",
            )


_POLICY_ROLES_SQL = """
SELECT DISTINCT n.nspname, c.relname, p.polname, r.rolname
FROM pg_policy p
JOIN pg_class c ON c.oid = p.polrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL unnest(p.polroles) AS pr(oid)
JOIN pg_roles r ON r.oid = pr.oid
WHERE n.nspname = ANY(%s)
ORDER BY 1, 2, 3, 4
"""


def _check_policies(ctx: _Context) -> None:
    roles = _target_roles(ctx)
    for schema, table, policy, role in ctx.source.execute(_POLICY_ROLES_SQL, (ctx.schemas,)):
        if role not in roles:
            ctx.add(
                Severity.WARNING,
                "policy-role",
                f"{schema}.{table}",
                f"Policy {policy} on {schema}.{table} applies to role {role}, which does not "
                "exist on the target; create that role there first or the schema step fails.",
            )


# Tables whose rows row level security would filter for the source login: on with no BYPASSRLS
# or superuser, and the login not the owner (or the owner, with FORCE). Partitions are read
# through their parent, whose policies are the ones that apply.
_SOURCE_RLS_SQL = f"""
SELECT n.nspname, c.relname, c.relforcerowsecurity
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
  AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user)
  AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2
"""


def _check_source_rls(ctx: _Context) -> None:
    for name, (forced,) in ctx.migrated(ctx.source, _SOURCE_RLS_SQL):
        ctx.add(
            Severity.ERROR,
            "source-rls",
            name,
            f"Row level security applies to the source login on {name}"
            + (" (FORCE ROW LEVEL SECURITY: even for its owner)" if forced else "")
            + ", so it can read only the rows its policies show and the copy would stop; "
            "connect as a superuser or a role with BYPASSRLS"
            + ("" if forced else ", or as the table's owner")
            + ".",
        )


# Triggers that fire even in the copy's session_replication_role = replica (ENABLE ALWAYS),
# on the tables that define the target's (the source's, unless schema mode none).
# A partition's are named by the table the manifest lists, its root.
_ALWAYS_TRIGGERS_SQL = f"""
SELECT DISTINCT n.nspname, r.relname, t.tgname, t.tgenabled = 'R' FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT t.tgisinternal
  AND t.tgenabled IN ('A', 'R') AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2, 3
"""

# Triggers that fire on the copy's writes where it cannot set session_replication_role.
_ORIGIN_TRIGGERS_SQL = f"""
SELECT DISTINCT n.nspname, r.relname FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT t.tgisinternal
  AND t.tgenabled IN ('O', 'A') AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2
"""
# A table's rules on INSERT, UPDATE or DELETE: a re-sync's writes are those statements (the
# first load's COPY fires none). Like triggers, session_replication_role = replica skips
# those enabled ordinarily ('O'); with `replica`, those that act under it ('A', 'R').
_WRITE_RULES_SQL = f"""
SELECT n.nspname, c.relname, w.rulename, w.ev_enabled = 'R' FROM pg_rewrite w
JOIN pg_class c ON c.oid = w.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND w.ev_type IN ('2', '3', '4')
  AND w.ev_enabled IN ({{enabled}}) AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2, 3
"""
_ALWAYS_RULES_SQL = _WRITE_RULES_SQL.format(enabled="'A', 'R'")
_ORIGIN_RULES_SQL = _WRITE_RULES_SQL.format(enabled="'O', 'A'")
_FOREIGN_KEYS_SQL = """
SELECT cn.nspname, c.relname, pn.nspname || '.' || p.relname FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE k.contype = 'f' AND k.conparentid = 0 AND cn.nspname = ANY(%s)
"""

_UNLOGGED_SQL = f"""
SELECT DISTINCT n.nspname, r.relname FROM pg_class c
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND c.relpersistence = 'u'
  AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2
"""


def _check_table_behaviour(ctx: _Context) -> None:
    """What a table on the target does to the copied rows, or to them after the copy."""
    defining = ctx.target if ctx.schema_mode == "none" else ctx.source
    for name, (trigger, replica) in ctx.migrated(defining, _ALWAYS_TRIGGERS_SQL):
        ctx.add(
            Severity.WARNING,
            "always-trigger",
            name,
            f"Trigger {trigger} on {name} is "
            + (
                "ENABLE REPLICA: it fires only under session_replication_role = replica, "
                "as the copy runs"
                if replica
                else "ENABLE ALWAYS: it fires even under the copy's session_replication_role"
                " = replica, which skips ordinary triggers"
            )
            + ", for every row the copy writes, and may change or add rows; verify names "
            "any row it changed, and ENABLE on the target keeps it from running during the "
            "migration.",
        )
    for name, (rule, replica) in ctx.migrated(defining, _ALWAYS_RULES_SQL):
        ctx.add(
            Severity.WARNING,
            "always-rule",
            name,
            f"Rule {rule} on {name} is ENABLE {'REPLICA' if replica else 'ALWAYS'}: it acts "
            "even under the copy's session_replication_role = replica on the rows a re-sync "
            "inserts, updates or deletes (a first load's COPY sets off no rule), and may change "
            "or add rows; verify names any row it changed, and ENABLE RULE on the target keeps "
            "it from acting during the migration.",
        )
    for name, _ in ctx.migrated(defining, _UNLOGGED_SQL):
        ctx.add(
            Severity.WARNING,
            "unlogged-table",
            name,
            f"Table {name} is UNLOGGED: after a crash of the target it is empty, and its "
            "rows are in neither Supabase's backups nor point-in-time recovery; for PHI, "
            f"ALTER TABLE {name} SET LOGGED.",
        )


def _check_without_replica_mode(ctx: _Context) -> None:
    """Where the target login may not set session_replication_role (a target that is not
    Supabase, whose postgres may), the copy runs with the target's triggers and foreign keys
    live: triggers fire on every copied row (changing it, or writing elsewhere), and a table
    referencing itself or tables referencing each other fail the ranges whose parents come
    later, run after run. Said before anything is written."""
    if replica_mode_allowed(ctx.target):
        return
    defining = ctx.target if ctx.schema_mode == "none" else ctx.source
    way = (
        "migrate as a login that may set session_replication_role (a superuser; Supabase's "
        "postgres may)"
    )
    fired = [name for name, _ in ctx.migrated(defining, _ORIGIN_TRIGGERS_SQL)]
    if fired:
        ctx.add(
            Severity.ERROR,
            "triggers-would-fire",
            listed(fired, 3),
            f"The target login may not set session_replication_role, so the triggers of "
            f"{listed(fired, 3)} would fire on every row the copy writes; {way}, or leave "
            "the triggers out of the target until the copy is done (schema mode none).",
        )
    acting = sorted({name for name, _ in ctx.migrated(defining, _ORIGIN_RULES_SQL)})
    if acting:
        ctx.add(
            Severity.ERROR,
            "rules-would-act",
            listed(acting, 3),
            f"The target login may not set session_replication_role, so the rules of "
            f"{listed(acting, 3)} would act on the rows a re-sync inserts, updates or deletes "
            f"(rewriting or adding to what it writes); {way}, or leave the rules out of the "
            "target until the copy is done (schema mode none).",
        )
    parents: dict[str, set[str]] = {}
    for name, (parent,) in ctx.migrated(defining, _FOREIGN_KEYS_SQL):
        if ctx.migrates(parent):
            parents.setdefault(name, set()).add(parent)
    try:
        graphlib.TopologicalSorter(parents).prepare()
    except graphlib.CycleError as exc:
        cycle = sorted(set(exc.args[1]))
        ctx.add(
            Severity.ERROR,
            "foreign-key-cycle",
            listed(cycle, 3),
            f"The target login may not set session_replication_role, so the foreign keys of "
            f"{listed(cycle, 3)} (referencing {'itself' if len(cycle) == 1 else 'each other'})"
            f" would be checked as each range is copied, and a row whose parent comes in a "
            f"later range would fail its range; {way}.",
        )


def _check_large_objects(ctx: _Context) -> None:
    row = ctx.source.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    count = row[0] if row else 0
    if count:
        ctx.add(
            Severity.ERROR,
            "large-objects",
            "large objects",
            f"The source database holds {count} large object{'s' if count > 1 else ''} "
            "(pg_largeobject), which this tool does not copy and Supabase cannot manage "
            "without the lo extension; move their contents into bytea columns on the source "
            "first.",
        )


def _count(conn: psycopg.Connection, query: str, params: Iterable[object] = ()) -> int:
    row = conn.execute(query, tuple(params)).fetchone()
    return int(row[0]) if row else 0


def _check_superuser_objects(ctx: _Context) -> None:
    skipped = "skipped: it needs a superuser, and postgres is not one on Supabase"
    n = _count(
        ctx.source,
        "SELECT count(*) FROM pg_event_trigger e "
        f"WHERE NOT {ext_member('pg_event_trigger', 'e.oid')}",
    )
    if n:
        ctx.add(
            Severity.WARNING,
            "event-trigger",
            "event triggers",
            f"{n} event trigger{'s are' if n > 1 else ' is'} {skipped}.",
        )
    for lang, n in ctx.source.execute(
        f"""
        SELECT l.lanname, count(*) FROM pg_proc p
        JOIN pg_namespace ns ON ns.oid = p.pronamespace
        JOIN pg_language l ON l.oid = p.prolang
        WHERE ns.nspname = ANY(%s) AND NOT l.lanpltrusted AND p.prokind <> 'a'
          AND NOT {ext_member("pg_proc", "p.oid")}
        GROUP BY l.lanname ORDER BY 1
        """,
        (ctx.schemas,),
    ):
        ctx.add(
            Severity.WARNING,
            "untrusted-function",
            f"language {lang}",
            f"{n} function{'s' if n > 1 else ''} in untrusted language {lang} "
            f"{'are' if n > 1 else 'is'} {skipped}; objects that use them fail to apply.",
        )
    n = _count(ctx.source, "SELECT count(*) FROM pg_foreign_server")
    if n:
        ctx.add(
            Severity.WARNING,
            "foreign-server",
            "foreign servers",
            f"{n} foreign server{'s' if n > 1 else ''} and their user mappings are not "
            "migrated (they hold credentials); create them on the target yourself.",
        )
    for schema, table in ctx.source.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'f' AND n.nspname = ANY(%s) ORDER BY 1, 2
        """,
        (ctx.schemas,),
    ):
        ctx.add(
            Severity.WARNING,
            "foreign-table",
            f"{schema}.{table}",
            f"Foreign table {schema}.{table} is skipped: its server is not migrated.",
        )
    n = _count(ctx.source, "SELECT count(*) FROM pg_publication")
    if n:
        ctx.add(
            Severity.INFO,
            "publication",
            "publications",
            f"{n} publication{'s are' if n > 1 else ' is'} not migrated; on Supabase, manage "
            "replication from the dashboard.",
        )
    n = _count(
        ctx.source,
        "SELECT count(*) FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        "WHERE d.datname = current_database()",
    )
    if n:
        ctx.add(
            Severity.INFO,
            "subscription",
            "subscriptions",
            f"{n} subscription{'s are' if n > 1 else ' is'} {skipped}.",
        )


def _check_materialized_views(ctx: _Context) -> None:
    views = materialized_views(ctx.source, ctx.schemas)
    reads = tables_read(ctx.source, views)
    # Mode none: the user's views on the target, which another role may own.
    there = (
        {v.qualified: v for v in materialized_views(ctx.target, ctx.schemas)}
        if ctx.schema_mode == "none"
        else {}
    )
    for view in views:
        name = view.qualified
        ctx.add(
            Severity.INFO,
            "materialized-view",
            name,
            f"Materialized view {name} is refreshed on the target once its tables are copied."
            if view.populated
            else f"Materialized view {name} is not populated on the source; it is left so on "
            "the target.",
        )
        if not view.populated:
            continue
        left_out = sorted(
            t for t in reads[name] if t.split(".", 1)[0] not in ctx.schemas or not ctx.migrates(t)
        )
        if left_out:
            ctx.add(
                Severity.WARNING,
                "materialized-view-input",
                name,
                f"Materialized view {name} reads {listed(left_out, 3)}, which "
                f"{'is' if len(left_out) == 1 else 'are'} not migrated: refreshed on the "
                "target, it will not hold what the source's holds.",
            )
        if name in there and not there[name].ours:
            owner = there[name].owner
            ctx.add(
                Severity.WARNING,
                "materialized-view-owner",
                name,
                f"Materialized view {name} on the target is owned by {owner}, a role the "
                f"target's login is not a member of: the run leaves it as it is; have {owner} "
                "refresh it after the copy.",
            )


def _check_privileges(ctx: _Context) -> None:
    n = _count(
        ctx.source,
        """
        SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%s) AND c.relacl IS NOT NULL AND c.relkind IN ('r', 'p', 'v', 'm')
        """,
        (ctx.schemas,),
    )
    if n:
        ctx.add(
            Severity.INFO,
            "privileges",
            "grants",
            f"GRANTs on {n} relation{'s' if n > 1 else ''} are not copied (roles differ on "
            "Supabase); grant what the application needs on the target, and keep PHI tables "
            "away from anon and authenticated.",
        )


def _check_target_objects(ctx: _Context) -> None:
    for schema, n in ctx.target.execute(
        f"""
        SELECT n.nspname, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p')
          AND NOT {ext_member("pg_class", "c.oid")}
        GROUP BY 1 ORDER BY 1
        """,
        (ctx.schemas,),
    ):
        ctx.add(
            Severity.INFO,
            "target-not-empty",
            f"schema {schema}",
            f"The target already has {n} table{'s' if n > 1 else ''} in schema {schema}; "
            + _WHAT_MODES_DO_WITH_TABLES[ctx.schema_mode],
        )


_WHAT_MODES_DO_WITH_TABLES = {
    "dump": "dump mode applies the schema only where it applied it before or nothing is there.",
    "alembic": "alembic mode upgrades them to the source's revision.",
    "none": "schema mode none copies into them as they are.",
}

# The tables of the schemas (partitions are copied through their parent) and their columns in
# order; a table without columns still has one row. `writable`: the login role may read and
# write it (has_table_privilege with a list would be true for any one of them).
_TABLE_COLUMNS_SQL = f"""
SELECT n.nspname || '.' || c.relname,
       has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')
       AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE'),
       c.relkind = 'p', c.relkind = 'r' AND c.relhassubclass,
       a.attname, b.typname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '',
       a.attnotnull, a.attnotnull AND NOT a.atthasdef AND a.attidentity = ''
       AND a.attgenerated = '', a.attidentity = 'a',
       {enum_labels_sql("b")}, {own_collation_sql("a", "t", "co")}
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_collation co ON co.oid = a.attcollation
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, a.attnum
"""


@dataclass(frozen=True)
class _ColumnShape:
    type_name: str  # its type's (a domain's base type's) name, whichever schema it is in
    type_sql: str  # with its modifiers, as format_type shows it
    generated: bool
    not_null: bool
    required: bool  # NOT NULL with no default, identity or generation: a row must bring it
    identity_always: bool
    labels: str | None = None  # an enum's (or an enum array's) labels, in their order
    collation: str | None = None  # a collation of its own, not its type's


@dataclass
class _TableShape:
    writable: bool
    partitioned: bool = False
    inherited: bool = False  # a parent by INHERITS
    columns: dict[str, _ColumnShape] = field(default_factory=dict)


def table_shapes(conn: psycopg.Connection, schemas: list[str]) -> dict[str, _TableShape]:
    """Each table's columns and kind, in one catalog query (dump mode's preflight too)."""
    tables: dict[str, _TableShape] = {}
    rows = conn.execute(_TABLE_COLUMNS_SQL, (schemas,))
    for table, writable, partitioned, inherited, column, *shape in rows:
        entry = tables.setdefault(
            table, _TableShape(bool(writable), bool(partitioned), bool(inherited))
        )
        if column is not None:
            entry.columns[column] = _ColumnShape(*shape)
    return tables


# Binary COPY moves any of these into any other; bpchar pads and citext compares without case.
_TEXT_TYPES = ("text", "varchar", "bpchar", "citext")


def _check_target_privileges(ctx: _Context) -> None:
    """What the schema step and the bookkeeping need of the target's login role, found here
    rather than as "permission denied" once the run has started."""
    user, create_schemas, bookkeeping = ctx.target.execute(
        "SELECT current_user, has_database_privilege(current_database(), 'CREATE'), "
        "EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)",
        (BOOKKEEPING_SCHEMA,),
    ).fetchone() or ("?", True, True)
    fix = "grant it, or connect as the project's postgres role"

    def refused(subject: str, what: str) -> None:
        ctx.add(
            Severity.ERROR, "target-privilege", subject, f"The target role {user} {what}; {fix}."
        )

    if not bookkeeping and not create_schemas:
        refused(
            "database",
            f"may not create schemas (CREATE on the database), so the tool's bookkeeping "
            f"schema {BOOKKEEPING_SCHEMA} cannot be made",
        )
    if ctx.schema_mode == "none":  # the tables are there: see _check_existing_tables
        return
    for schema, exists, create_tables in ctx.target.execute(
        "SELECT s.name, n.oid IS NOT NULL, has_schema_privilege(n.oid, 'CREATE') "
        "FROM unnest(%s::text[]) AS s(name) LEFT JOIN pg_namespace n ON n.nspname = s.name",
        (ctx.schemas,),
    ):
        if exists and not create_tables:
            refused(f"schema {schema}", f"may not create tables in schema {schema}")
        elif not exists and not create_schemas:
            refused(f"schema {schema}", f"may not create schema {schema} (CREATE on the database)")


# The target's tables (and partitions) in the exposed schemas without row level security,
# which only their owner may turn on, and which the login role does not own (as a member of
# the owning role, pg_has_role's USAGE, it would); with the table they are copied through.
_RLS_NOT_OURS_SQL = f"""
SELECT rn.nspname, rn.nspname || '.' || r.relname, n.nspname || '.' || c.relname,
       pg_get_userbyid(c.relowner), current_user
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = CASE WHEN c.relispartition THEN pg_partition_root(c.oid) ELSE c.oid END
JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT c.relrowsecurity
  AND NOT pg_has_role(c.relowner, 'USAGE') AND NOT {ext_member("pg_class", "r.oid")}
ORDER BY 3
"""


def _check_rls_owners(ctx: _Context) -> None:
    """The schema step turns row level security on for the migrated tables of the exposed
    schemas before any row is copied; on a table there already (schema mode none, or made
    by someone else) only its owner may, which failed the step once the run had started."""
    exposed = list(ctx.manifest.exposed_schemas) if ctx.manifest is not None else ["public"]
    # In alembic and dump mode the step protects every table of the migrated schemas, the
    # excluded ones too (`security.tables_to_protect`).
    every_table = ctx.schema_mode in ("alembic", "dump")
    rows = ctx.target.execute(_RLS_NOT_OURS_SQL, (exposed,))
    for schema, table, relation, owner, user in rows:
        if ctx.migrates(table) or (every_table and schema in ctx.schemas):
            ctx.add(
                Severity.ERROR,
                "target-privilege",
                relation,
                f"Row level security is off on {relation} on the target, and only its owner "
                f"{owner} may turn it on, which the target's login role {user} is not; turn "
                f"it on as {owner} (ALTER TABLE {relation} ENABLE ROW LEVEL SECURITY), or "
                f"make {user} its owner.",
            )


def table_mismatches(
    source: psycopg.Connection,
    target: psycopg.Connection,
    *,
    schemas: Sequence[str],
    tables: Sequence[str] | None = None,
) -> list[Finding]:
    """What keeps the target's tables (made by the user, or by their migrations) from taking
    the source's rows as they are: the checks of schema mode none, errors first."""
    ctx = _Context(
        source=source,
        target=target,
        schemas=list(schemas),
        source_ext={},
        target_ext={},
        target_available={},
        findings=[],
        schema_mode="none",
        tables=list(tables) if tables is not None else None,
    )
    with _reading_catalogs("Comparing the tables"):
        _check_existing_tables(ctx)
    return _by_severity(ctx.findings)


def _check_existing_tables(ctx: _Context) -> None:
    """Schema mode none copies into the target's tables as they are: every table to migrate
    must be there, writable by the login role, with every copied column of the same type
    (text and varchar differ only in their limit), and nothing the copy cannot fill."""
    if ctx.schema_mode != "none":
        return
    source = table_shapes(ctx.source, ctx.schemas)
    target = ctx.target_shapes
    wanted = ctx.tables if ctx.tables is not None else list(source)
    for table in wanted:
        there = target.get(table)
        if table not in source:
            continue  # gone from the source, or a partition: other checks say so
        if there is None:
            ctx.add(
                Severity.ERROR,
                "missing-table",
                table,
                f"{table} is not on the target, where the copy needs it already (schema mode "
                "none, or made by your migrations); create it, or use --schema-mode dump.",
            )
            continue
        if source[table].inherited and there.partitioned:
            ctx.add(
                Severity.ERROR,
                "table-kind",
                table,
                f"{table} is a parent by inheritance on the source, whose own rows are copied "
                "without its children's, but partitioned on the target, where its rows are "
                "its partitions'; make it a plain table on the target, or copy its children "
                "into it as rows of its own first.",
            )
        if not there.writable:
            ctx.add(
                Severity.ERROR,
                "target-privilege",
                table,
                f"The target's login role may not read and write {table} (SELECT, INSERT, "
                "UPDATE, DELETE); grant them, or connect as the project's postgres role.",
            )
        _compare_columns(ctx, table, source[table].columns, there.columns)


def _check_rows_not_copied_here(ctx: _Context) -> None:
    """A table's first copy makes it equal to the source, deleting the rows the source lacks.
    Rows in the tables of a target this tool has never copied into were put there by someone
    else (the app, another tool, or this is the wrong project): refused, not silently deleted.
    Once a run has planned the target, its tables are trusted: a table whose checkpoint rows
    were deleted to plan it anew holds the rows copied before. Alembic's version table is left
    out: its row is the schema's revision, put there by the migrations that made the tables."""
    if checkpoints.planned_anything(ctx.target):
        return
    shapes = ctx.target_shapes
    candidates = [
        name
        for name, shape in shapes.items()
        if ctx.migrates(name) and shape.writable and list(shape.columns) != ["version_num"]
    ]
    if not candidates:
        return
    probes = [
        sql.SQL("SELECT {} WHERE EXISTS (SELECT 1 FROM {}{})").format(
            sql.Literal(name),
            sql.SQL("" if shapes[name].partitioned else "ONLY "),
            sql.Identifier(*name.split(".", 1)),
        )
        for name in candidates
    ]
    occupied = [r[0] for r in ctx.target.execute(sql.SQL(" UNION ALL ").join(probes))]
    if not occupied:
        return
    infos = {t.qualified_name: t for t in ctx.source_tables}
    for table in occupied:
        info = infos.get(table)
        if info is not None and not _keys_the_source_lacks(ctx, info):
            continue  # rows the source has too (lookup rows its migrations seeded): kept
        ctx.add(
            Severity.ERROR,
            "target-rows",
            table,
            f"{table} on the target already holds rows this tool did not copy, and its first "
            "copy would delete those the source lacks; empty it on the target if that is what "
            "you want, or check that SUPABASE_DB_URL names the right project.",
        )


# Target rows of a table this tool has not copied into, compared key by key with the source's
# when there are at most this many; more are refused without looking.
ROWS_COMPARED = 10_000


def _keys_the_source_lacks(ctx: _Context, table: TableInfo) -> bool:
    """Whether the target's rows of `table` include a key the source lacks (or too many rows
    to tell, or no key to tell by)."""
    if not table.key:
        return True
    rows = rows_of(table)  # a parent's own rows by inheritance, as the copy deletes them
    try:
        with transaction_with(ctx.target, [READING_ROWS], commit=False):
            keys = ctx.target.execute(
                sql.SQL("SELECT {} FROM {} LIMIT {}").format(
                    key_texts(table), rows, sql.Literal(ROWS_COMPARED + 1)
                )
            ).fetchall()
        if len(keys) > ROWS_COMPARED:
            return True
        if not keys:
            return False
        found = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(rows, keys_in(table))
        with transaction_with(ctx.source, [READING_ROWS], commit=False):
            row = ctx.source.execute(found, key_arrays(keys, len(table.key))).fetchone()
            return row is None or row[0] < len(keys)  # the keys are a key's: each one once
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            raise  # a lost connection is no finding: it ends preflight as one
        # A target table without the source's key columns; a key the source's type or domain
        # cannot even hold (its error would quote it), a table or column the source lacks or
        # may not read: not shown to be the source's.
        return True


def _compare_columns(
    ctx: _Context,
    table: str,
    source: dict[str, _ColumnShape],
    target: dict[str, _ColumnShape],
) -> None:
    def error(code: str, name: str, what: str) -> None:
        ctx.add(Severity.ERROR, code, f"{table}.{name}", f"Column {table}.{name} {what}.")

    for name, src in source.items():
        tgt = target.get(name)
        if src.generated:  # not copied: the target must compute it too
            if tgt is not None and not tgt.generated:
                error(
                    "generated-column",
                    name,
                    "is generated on the source, so its values are not copied, but a plain "
                    "column on the target, which would be left empty; make it generated there",
                )
        elif tgt is None:
            error(
                "missing-column",
                name,
                "is not on the target, whose tables the copy takes as they are; add it, or "
                "use --schema-mode dump",
            )
        elif tgt.generated:
            error(
                "generated-column",
                name,
                "is generated on the target but not on the source, so the copied values "
                "cannot go in; make it a plain column there",
            )
        elif tgt.identity_always and not src.identity_always:
            error(
                "identity-column",
                name,
                "is GENERATED ALWAYS AS IDENTITY on the target but not on the source, so "
                "re-syncs cannot write it; make it GENERATED BY DEFAULT there",
            )
        else:
            _compare_types(ctx, f"{table}.{name}", src, tgt)
            if tgt.not_null and not src.not_null:
                ctx.add(
                    Severity.WARNING,
                    "not-null",
                    f"{table}.{name}",
                    f"Column {table}.{name} is NOT NULL on the target but not on the source: "
                    "a NULL there stops its range.",
                )
    for name, tgt in target.items():
        if tgt.required and name not in source:
            error(
                "required-column",
                name,
                "on the target is NOT NULL without a default and the source has no such "
                "column, so no row could be copied; give it a default",
            )


def _compare_types(ctx: _Context, subject: str, src: _ColumnShape, tgt: _ColumnShape) -> None:
    both = f"Column {subject} is {tgt.type_sql} on the target but {src.type_sql} on the source"
    texts = src.type_name in _TEXT_TYPES and tgt.type_name in _TEXT_TYPES
    if src.type_name != tgt.type_name and not texts:
        ctx.add(
            Severity.ERROR,
            "column-type",
            subject,
            f"{both}; make them the same (the copy moves rows as they are).",
        )
        return
    if {src.type_name, tgt.type_name} & {"bpchar", "citext"} and src.type_name != tgt.type_name:
        ctx.add(
            Severity.WARNING,
            "column-kind",
            subject,
            f"{both}: char pads values and citext ignores case, so the copy may change what "
            "verification compares, or a unique index may refuse rows.",
        )
    # Ranges are read by key order on each side, and a key ordered otherwise on the target
    # selects other rows there: each range's copy deleted rows of the next (half a table
    # lost, every range completed). Other columns then read otherwise to the app, and
    # verification fails on their type.
    if src.labels != tgt.labels:
        ctx.add(
            Severity.ERROR,
            "column-order",
            subject,
            f"Column {subject}'s enum has other labels, or its labels in another order, on "
            "the target than on the source; make them the same, in the same order (key ranges "
            "and comparisons follow it, and a missing label stops its range).",
        )
    if src.collation != tgt.collation:
        shown = [
            f'COLLATE "{c}"' if c else "its type's collation"
            for c in (tgt.collation, src.collation)
        ]
        ctx.add(
            Severity.ERROR,
            "column-order",
            subject,
            f"Column {subject} has {shown[0]} on the target but {shown[1]} on the source; "
            "make them the same (key ranges, unique indexes and ORDER BY follow it: a key "
            "ordered otherwise makes each range select other rows on the target).",
        )
    source_limits, target_limits = _limits(src.type_sql), _limits(tgt.type_sql)
    narrower = bool(target_limits) and (
        not source_limits or any(t < s for t, s in zip(target_limits, source_limits, strict=False))
    )
    if narrower:
        ctx.add(
            Severity.WARNING,
            "column-limit",
            subject,
            f"{both}: a value that does not fit stops its range, and a rounded one fails "
            "verification.",
        )


def _limits(type_sql: str) -> tuple[int, ...]:
    """varchar(20) -> (20,), numeric(10,2) -> (10, 2), timestamp(3) ... -> (3,)."""
    match = re.search(r"\(([\d,\s]+)\)", type_sql)
    return tuple(int(n) for n in match.group(1).split(",")) if match else ()


def _check_audit(ctx: _Context) -> None:
    """HIPAA projects audit with pgaudit; row logging would copy PHI into the logs."""
    if "pgaudit" not in ctx.target_ext:
        if "pgaudit" in ctx.target_available:
            ctx.add(
                Severity.INFO,
                "pgaudit",
                "target",
                "The pgaudit extension is available on the target but not enabled; HIPAA "
                "projects usually enable it (never with pgaudit.log_rows).",
            )
        return
    row = ctx.target.execute("SELECT current_setting('pgaudit.log_rows', true)").fetchone()
    if row and row[0] == "on":
        ctx.add(
            Severity.WARNING,
            "pgaudit",
            "target",
            "pgaudit.log_rows is on for the target, so audit logs would hold copied row values "
            "(PHI); turn it off for the migration role.",
        )


# -- reporting ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|")


def findings_markdown(findings: Sequence[Finding]) -> str:
    """A Markdown table for the Dagster UI and `supabase-migrate plan`."""
    lines = ["| severity | code | subject | message |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {f.severity.value} | {_cell(f.code)} | {_cell(f.subject)} | {_cell(f.message)} |"
        for f in findings
    ]
    return "\n".join(lines)


def raise_for_errors(
    findings: Sequence[Finding],
    stopped: str = "Preflight stopped the migration before anything was written",
    *,
    plan_lists_them: bool = True,
) -> None:
    """Stop before any data moves when a finding is an ERROR, in one sentence: the first one,
    and where the others are (`plan` runs preflight; otherwise their subjects are named)."""
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if not errors:
        return
    first = errors[0].message.rstrip(".")
    more = len(errors) - 1
    where = (
        "`supabase-migrate plan` lists them"
        if plan_lists_them
        else ", ".join(f.subject for f in errors[1:])
    )
    tail = f" (and {more} more error{'s' if more > 1 else ''}: {where})" if more else ""
    raise PreflightError(f"{stopped}: {first}{tail}.")
