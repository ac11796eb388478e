"""Securing the migrated data on Supabase: RLS, encryption in transit, pgaudit, the audit trail.

Why each piece exists:

* Supabase grants ALL on new `public` tables to `anon`/`authenticated` (its API roles) by default
  privileges, and "RLS status on tables is not migrated". Until RLS is enabled, anyone holding
  the project's anon key can read the migrated PHI over the REST API (Supabase's linter calls
  this `rls_disabled_in_public`, level ERROR). `enable_rls` closes that: with RLS on and no
  policy, `anon` and `authenticated` see no rows (default deny); `service_role` has BYPASSRLS
  and keeps working. Policies the user supplies are applied once, recorded by sha256.
* HIPAA wants encryption in transit; `session_encryption` asks the server (`pg_stat_ssl`) as
  well as libpq, because a client-side `sslmode` proves nothing about the session actually made.
* pgaudit on Supabase is configured only at role level (`ALTER ROLE postgres SET pgaudit.*`),
  through supautils' privileged-role allow-list. `pgaudit.log_rows` would copy PHI into the
  logs and `pgaudit.log_parameter` bound values, so neither is ever set; finding either on is a
  finding. pgaudit logs statement text: applications should bind values as parameters.
* Every checkpoint row records who completed which range in which run, and when;
  `migration_audit_trail` summarises it without key bounds (a text key can itself be PHI).

Nothing here imports Dagster; every error is a one-sentence, PHI-free `MigrationError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors
from psycopg import sql

from .catalog import (
    API_ROLES,
    BOOKKEEPING_SCHEMA,
    EXTENSIONS_SCHEMA,
    SCHEMA_LOCK_KEY,
    ext_member,
    table_names,
)
from .checkpoints import REVOKE_BOOKKEEPING
from .connections import borrowed, database_error
from .conninfo import DatabaseUrl, is_loopback_host
from .errors import ConfigError, MigrationError, SchemaError, TransientError, read_user_text
from .redaction import describe_pg_error
from .report import markdown_table

if TYPE_CHECKING:
    from .manifest import Manifest

SERVICE_ROLE = "service_role"
AUDITOR_ROLE = "supabase_migration_auditor"
AUDIT_SETTINGS_ROLE = "postgres"
# DDL and role/privilege changes carry no row values; read/write classes are left to the user.
DEFAULT_AUDIT_LOG = "ddl, role"
# Settings that would write row values (PHI) or bound parameters into the server log.
UNSAFE_AUDIT_SETTINGS = ("pgaudit.log_rows", "pgaudit.log_parameter")
AUDITED_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
APPLIED_POLICIES = sql.Identifier(BOOKKEEPING_SCHEMA, "applied_policies")
CHECKPOINTS_TABLE = f"{BOOKKEEPING_SCHEMA}.migration_checkpoints"
DEFAULT_APPLICATION_NAME = "supabase-migration"
LOCK_TIMEOUT = "30s"

# One advisory lock serialises concurrent security steps (two runs, or the CLI and Dagster).
_LOCK_KEY = "supabase_migration.security"
_AUDIT_CLASSES = {"read", "write", "function", "role", "ddl", "misc", "misc_set", "all", "none"}
_TRUE_WORDS = {"on", "true", "yes", "1"}
# Transaction control in policy SQL would commit part of it outside our transaction. PL/pgSQL's
# own BEGIN/END (in DO blocks and functions) never ends in ';' right after the keyword.
_TRANSACTION_CONTROL = re.compile(
    r"(?im)^\s*(?:"
    r"(?:commit|rollback|abort)(?:\s+(?:work|transaction|and\s+(?:no\s+)?chain))?\s*;"
    r"|(?:commit|rollback)\s+prepared\b|prepare\s+transaction\b|start\s+transaction\b"
    r"|begin(?:\s+(?:work|transaction))?\s*;|end\s+(?:work|transaction)\s*;)"
)

APPLIED_POLICIES_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {BOOKKEEPING_SCHEMA};
REVOKE ALL ON SCHEMA {BOOKKEEPING_SCHEMA} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.applied_policies (
    sha256      text        PRIMARY KEY,
    source      text,
    bytes       integer     NOT NULL,
    run_id      text,
    applied_by  text        NOT NULL DEFAULT current_user,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON {BOOKKEEPING_SCHEMA}.applied_policies FROM PUBLIC;
"""


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class SecurityAction:
    """One thing `enable_rls` did or deliberately did not do, for metadata and the report."""

    kind: str  # enable_rls | rls_already_enabled | not_exposed | missing | apply_policies | ...
    subject: str  # schema.table, the bookkeeping schema, or the policy digest
    detail: str = ""

    @property
    def changed(self) -> bool:
        return self.kind in {"enable_rls", "apply_policies"}


@dataclass(frozen=True)
class TableRls:
    """RLS state of one table in an exposed schema."""

    schema: str
    table: str
    rls_enabled: bool
    rls_forced: bool
    policies: int
    is_partition: bool = False
    api_access: bool | None = None  # anon/authenticated hold a table privilege (None: no roles)
    extension: str | None = None  # the extension it belongs to (made by it, not migrated)

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class SessionEncryption:
    """Encryption of one session, seen by libpq (our socket) and by the server (pg_stat_ssl).

    Behind a pooler the server sees the pooler's link, so both views are kept.
    """

    client_tls: bool
    server_ssl: bool | None  # None: pg_stat_ssl showed no row for this backend
    protocol: str | None = None
    cipher: str | None = None

    @property
    def encrypted(self) -> bool | None:
        if not self.client_tls:
            return False
        return self.server_ssl


@dataclass(frozen=True)
class AuditStatus:
    """What pgaudit looks like on the target right now (read only)."""

    extension_available: bool
    loaded: bool
    installed_version: str | None
    settings_role: str | None
    role_settings: dict[str, str] = field(default_factory=dict)  # pgaudit.* set on that role
    unsafe_settings: tuple[str, ...] = ()  # e.g. "pgaudit.log_rows=on (role postgres)"

    @property
    def auditor_role(self) -> str | None:
        return self.role_settings.get("pgaudit.role") or None


@dataclass(frozen=True)
class AuditOutcome:
    """What `configure_pgaudit` did, or one sentence on why audit logging is not configured."""

    available: bool
    message: str
    configured: bool = False
    extension_version: str | None = None
    auditor_role: str | None = None
    settings_role: str | None = None
    log_classes: str | None = None
    tables: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    unsafe_settings: tuple[str, ...] = ()

    def markdown(self) -> str:
        lines = [self.message]
        if self.configured:
            lines += [
                "",
                f"- extension: pgaudit {self.extension_version or '?'}",
                f"- role-level settings on `{self.settings_role}`: pgaudit.role = "
                f"`{self.auditor_role}`, pgaudit.log = `{self.log_classes}`",
                f"- object auditing ({AUDITED_PRIVILEGES}) on {len(self.tables)} table(s)",
                "- pgaudit.log_rows / pgaudit.log_parameter: never set by this tool",
            ]
        lines += [f"- {action}" for action in self.actions]
        lines += [f"- UNSAFE: {setting}" for setting in self.unsafe_settings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers


def _split(name: str) -> tuple[str, str]:
    if "." not in name:
        raise ConfigError(f"Table name {name!r} must be schema-qualified (schema.table).")
    schema, table = name.split(".", 1)
    return schema, table


def _lock(conn: psycopg.Connection) -> None:
    """Transaction-scoped, so it also works through a transaction pooler. The schema step's
    lock first, as the schema step takes it (it enables RLS in its own transaction), so the
    two never wait on each other crosswise; and under it, since both revoke on the
    bookkeeping schema, and concurrent REVOKEs of one object fail ("tuple concurrently
    updated"). The timeout covers the waits for both."""
    conn.execute(
        sql.SQL(
            "SET LOCAL lock_timeout = {}; SELECT pg_advisory_xact_lock(hashtext({})); "
            "SELECT pg_advisory_xact_lock(hashtext({}))"
        ).format(sql.Literal(LOCK_TIMEOUT), sql.Literal(SCHEMA_LOCK_KEY), sql.Literal(_LOCK_KEY))
    )


def _failure(exc: psycopg.Error, what: str) -> MigrationError:
    """One PHI-free sentence; lock timeouts and lost connections are worth retrying."""
    sentence = f"{what} failed: {describe_pg_error(exc)}."
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return TransientError(sentence)
    return database_error(exc, sentence, SchemaError)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Database errors leave this module only as one-sentence MigrationErrors."""
    try:
        yield
    except psycopg.Error as exc:
        raise _failure(exc, what) from None


def _existing_roles(conn: psycopg.Connection, names: Iterable[str]) -> list[str]:
    wanted = list(names)
    rows = conn.execute(
        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (wanted,)
    ).fetchall()
    found = {r[0] for r in rows}
    return [n for n in wanted if n in found]


def check_exposed_schemas(exposed_schemas: Sequence[str]) -> tuple[str, ...]:
    """The bookkeeping schema must never be exposed over the API."""
    schemas = tuple(exposed_schemas)
    if BOOKKEEPING_SCHEMA in schemas:
        raise ConfigError(
            f"exposed_schemas lists {BOOKKEEPING_SCHEMA}, the migration's bookkeeping schema, "
            "which must never be exposed over the Supabase API; remove it from the manifest."
        )
    return schemas


Relation = tuple[str, str, bool, bool]  # schema, table, RLS on, is a partition


def _relations(conn: psycopg.Connection, names: Sequence[str]) -> dict[str, list[Relation]]:
    """Each table and, if partitioned, every partition below it, in one round trip (a remote
    target is tens of milliseconds away). A table missing on the target has no entry."""
    wanted = [_split(name) for name in names]
    rows = conn.execute(
        "SELECT w.ord, pn.nspname, p.relname, p.relrowsecurity, coalesce(t.level, 0) > 0 "
        "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS w(nsp, rel, ord) "
        "JOIN pg_namespace n ON n.nspname = w.nsp "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel "
        "AND c.relkind IN ('r', 'p') "
        # pg_partition_tree lists nothing for a plain table, and the root first otherwise
        "LEFT JOIN LATERAL pg_partition_tree(c.oid::regclass) t ON true "
        "JOIN pg_class p ON p.oid = coalesce(t.relid, c.oid) AND p.relkind IN ('r', 'p') "
        "JOIN pg_namespace pn ON pn.oid = p.relnamespace "
        "ORDER BY w.ord, coalesce(t.level, 0), 2, 3",
        ([schema for schema, _ in wanted], [table for _, table in wanted]),
    ).fetchall()
    found: dict[str, list[Relation]] = {}
    for ordinal, schema, table, enabled, is_partition in rows:
        found.setdefault(names[ordinal - 1], []).append(
            (schema, table, bool(enabled), bool(is_partition))
        )
    return found


# --------------------------------------------------------------------------------------------
# Row Level Security


def read_policy_file(path: str | Path) -> str:
    """The policy SQL in `path`, or a ConfigError naming the file (never its content)."""
    file = Path(path).expanduser()
    text = read_user_text(file, "The policy file", f"The policy file {file} does not exist.")
    if not text.strip():
        raise ConfigError(f"The policy file {file} is empty.")
    return text


def policy_digest(policy_sql: str) -> str:
    """sha256 of the exact text: any edit makes it a new policy set that is applied again."""
    return hashlib.sha256(policy_sql.encode("utf-8")).hexdigest()


def check_policy_sql(policy_sql: str) -> str:
    """Refuse what cannot run inside our one transaction; returns the sha256 digest."""
    digest = policy_digest(policy_sql)
    if not policy_sql.strip():
        raise ConfigError("The policy SQL is empty.")
    if _TRANSACTION_CONTROL.search(policy_sql):
        raise ConfigError(
            f"The policy SQL (sha256 {digest[:12]}) contains transaction control (BEGIN/COMMIT/"
            "ROLLBACK); remove it: the tool applies the file in one transaction."
        )
    return digest


def tables_to_protect(conn: psycopg.Connection, manifest: Manifest) -> list[str]:
    """The manifest's tables, plus, when our schema step created the schema (alembic or dump
    mode), every other table it created in those schemas: an excluded table is empty but still
    exposed over the REST API, so it gets RLS too. Not an extension's tables (an Alembic
    migration's CREATE EXTENSION postgis puts spatial_ref_sys in public): the extension made
    them, `postgres` may not own them, and RLS would hide PostGIS's reference data from its own
    functions called by the API roles; the findings name them instead."""
    names = [t.name for t in manifest.tables]
    if manifest.schema_mode not in ("alembic", "dump"):
        return names
    listed = set(names)
    return names + [n for n in table_names(conn, manifest.schemas) if n not in listed]


# Views that give rows past row level security: materialized ones, and those that read their
# tables as their owner (not security_invoker, PostgreSQL 15+).
# The views and materialized views of the schemas given (%s) that hand rows past row level
# security: a materialized view, or a view not security_invoker. Follows a SELECT list.
_VIEWS_PAST_RLS = (
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE (c.relkind = 'm' OR c.relkind = 'v' AND NOT EXISTS (SELECT 1 FROM "
    "pg_options_to_table(c.reloptions) o WHERE o.option_name = 'security_invoker' AND "
    "o.option_value IN ('true', 'on', '1', 'yes'))) AND n.nspname = ANY(%s) "
    f"AND NOT {ext_member('pg_class', 'c.oid')} ORDER BY 1"
)


def views_to_protect(conn: psycopg.Connection, manifest: Manifest) -> list[str]:
    """The views and materialized views our schema step created (alembic or dump mode) in the
    migrated schemas that give rows past row level security: a view that reads its tables as
    its owner (not security_invoker), and a materialized view, which has none. Supabase's
    default privileges would give the API roles every row through them. In schema mode none
    they are the user's, and the findings name them."""
    if manifest.schema_mode not in ("alembic", "dump"):
        return []
    rows = conn.execute(
        f"SELECT format('%%s.%%s', n.nspname, c.relname) {_VIEWS_PAST_RLS}",
        [list(manifest.schemas)],
    ).fetchall()
    return [name for (name,) in rows]


def enable_rls(
    target_conn: psycopg.Connection,
    tables: Sequence[str],
    *,
    exposed_schemas: Sequence[str] = ("public",),
    views: Sequence[str] = (),
    policy_sql: str | None = None,
    policy_source: str | None = None,
    run_id: str | None = None,
) -> list[SecurityAction]:
    """Enable RLS on every migrated table (and partition) in an exposed schema; idempotent.
    The API roles lose every privilege on `views` in an exposed schema (see views_to_protect);
    grant them back in the policy SQL where a view is meant to be public, or make the view
    security_invoker.

    Without policies that is default deny for `anon` and `authenticated`; `service_role`
    (BYPASSRLS on Supabase) and the table owner are unaffected, and RLS is never FORCEd.
    Then `anon`/`authenticated` lose every privilege on the bookkeeping schema.

    `policy_sql` is applied afterwards in its own transaction (so a broken policy file never
    leaves tables without RLS) and recorded by sha256 in `supabase_migration.applied_policies`:
    the same text is not applied twice, an edited text is. Write it re-runnable anyway
    (`DROP POLICY IF EXISTS ...; CREATE POLICY ...`), without BEGIN/COMMIT.
    """
    exposed = check_exposed_schemas(exposed_schemas)
    if policy_sql is not None:
        check_policy_sql(policy_sql)  # before anything changes
    actions: list[SecurityAction] = []
    try:
        with target_conn.transaction():
            _lock(target_conn)
            statements: list[sql.Composable] = []
            relations = _relations(target_conn, tables)
            for name in tables:
                needed, alters = _enable_one(name, relations.get(name), exposed)
                actions += needed
                statements += alters
            shut, revokes = _shut_views(target_conn, views, exposed)
            actions += shut
            statements += revokes
            if statements:  # in one round trip: a remote target is tens of ms away
                target_conn.execute(sql.SQL("; ").join(statements))
            actions += _revoke_bookkeeping(target_conn)
            actions += _service_role_note(target_conn)
    except psycopg.Error as exc:
        raise _failure(exc, "Enabling row level security") from None
    if policy_sql is not None:
        actions.append(_apply_policies(target_conn, policy_sql, policy_source, run_id))
    return actions


def _enable_one(
    name: str, relations: list[Relation] | None, exposed: tuple[str, ...]
) -> tuple[list[SecurityAction], list[sql.Composable]]:
    """What to do for `name`, and the ALTERs that does it."""
    if relations is None:
        missing = SecurityAction("missing", name, "not on the target; nothing to protect")
        return [missing], []
    actions = []
    statements: list[sql.Composable] = []
    for schema, table, enabled, is_partition in relations:
        qualified = f"{schema}.{table}"
        suffix = " (partition)" if is_partition else ""
        if schema not in exposed:
            if not is_partition:
                actions.append(
                    SecurityAction("not_exposed", qualified, "schema is not exposed over the API")
                )
            continue
        if enabled:
            actions.append(SecurityAction("rls_already_enabled", qualified, suffix.strip()))
            continue
        statements.append(
            sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(
                sql.Identifier(schema, table)
            )
        )
        actions.append(SecurityAction("enable_rls", qualified, suffix.strip()))
    return actions, statements


def _shut_views(
    conn: psycopg.Connection, views: Sequence[str], exposed: tuple[str, ...]
) -> tuple[list[SecurityAction], list[sql.Composable]]:
    """REVOKEs of the API roles' privileges on the views in exposed schemas."""
    shown = [v for v in views if _split(v)[0] in exposed]
    roles = _existing_roles(conn, API_ROLES) if shown else []
    if not roles:
        return [], []
    grantees = sql.SQL(", ").join(sql.Identifier(r) for r in roles)
    statements = [
        sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(sql.Identifier(*_split(v)), grantees)
        for v in shown
    ]
    detail = f"no privileges for {', '.join(roles)}"
    return [SecurityAction("revoke_view", v, detail) for v in shown], statements


def _revoke_bookkeeping(conn: psycopg.Connection) -> list[SecurityAction]:
    """The API roles may not even look up names in the bookkeeping schema."""
    exists = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (BOOKKEEPING_SCHEMA,)
    ).fetchone()
    roles = _existing_roles(conn, API_ROLES)
    if not (exists and exists[0]) or not roles:
        return []
    conn.execute(REVOKE_BOOKKEEPING)
    return [
        SecurityAction(
            "revoke_bookkeeping", BOOKKEEPING_SCHEMA, f"no privileges for {', '.join(roles)}"
        )
    ]


def _service_role_note(conn: psycopg.Connection) -> list[SecurityAction]:
    row = conn.execute(
        "SELECT rolbypassrls FROM pg_roles WHERE rolname = %s", (SERVICE_ROLE,)
    ).fetchone()
    if row is None or row[0]:
        return []
    return [
        SecurityAction(
            "service_role_no_bypassrls",
            SERVICE_ROLE,
            "service_role lacks BYPASSRLS, so RLS also filters its rows",
        )
    ]


def _apply_policies(
    conn: psycopg.Connection, policy_sql: str, source: str | None, run_id: str | None
) -> SecurityAction:
    digest = check_policy_sql(policy_sql)
    short = digest[:12]
    try:
        with conn.transaction():
            _lock(conn)
            conn.execute(APPLIED_POLICIES_DDL)
            done = conn.execute(
                sql.SQL("SELECT applied_at FROM {} WHERE sha256 = %s").format(APPLIED_POLICIES),
                (digest,),
            ).fetchone()
            if done is not None:
                return SecurityAction(
                    "policies_unchanged", f"sha256:{short}", f"already applied {done[0]:%Y-%m-%d}"
                )
            try:
                with conn.transaction():
                    conn.execute(policy_sql)  # type: ignore[arg-type]  # no params: simple query
            except psycopg.Error as exc:
                raise ConfigError(
                    f"The policy SQL (sha256 {short}) failed and nothing of it was applied: "
                    f"{describe_pg_error(exc)}; fix the policy file and run again."
                ) from None
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (sha256, source, bytes, run_id) VALUES (%s, %s, %s, %s)"
                ).format(APPLIED_POLICIES),
                (digest, source, len(policy_sql.encode("utf-8")), run_id),
            )
            _revoke_bookkeeping(conn)
    except psycopg.Error as exc:
        raise _failure(exc, f"Applying the policy SQL (sha256 {short})") from None
    return SecurityAction("apply_policies", f"sha256:{short}", source or "")


def rls_status(
    target_conn: psycopg.Connection, exposed_schemas: Sequence[str] = ("public",)
) -> list[TableRls]:
    """Every table (and partition) in the exposed schemas: RLS on?, policies, API grants."""
    with _translated("Reading row level security status"):
        return _rls_status(target_conn, exposed_schemas)


def _rls_status(target_conn: psycopg.Connection, exposed_schemas: Sequence[str]) -> list[TableRls]:
    roles = _existing_roles(target_conn, API_ROLES)
    if roles:
        checks = sql.SQL(" OR ").join(
            sql.SQL("has_table_privilege({}, c.oid, 'SELECT, INSERT, UPDATE, DELETE')").format(
                sql.Literal(r)
            )
            for r in roles
        )
    else:
        checks = sql.SQL("NULL")
    query = sql.SQL(
        "SELECT n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity, "
        "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid), c.relispartition, ({}), "
        "(SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid "
        " WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') ORDER BY 1, 2"
    ).format(checks)
    rows = target_conn.execute(query, (list(exposed_schemas),)).fetchall()
    return [
        TableRls(
            schema=r[0],
            table=r[1],
            rls_enabled=bool(r[2]),
            rls_forced=bool(r[3]),
            policies=int(r[4]),
            is_partition=bool(r[5]),
            api_access=None if r[6] is None else bool(r[6]),
            extension=r[7],
        )
        for r in rows
    ]


def views_open_to_api(
    conn: psycopg.Connection, exposed_schemas: Sequence[str]
) -> list[tuple[str, str, str]]:
    """(name, relkind, the API roles that may use it) of each view in an exposed schema that
    hands them rows past row level security: a materialized view, or a view that is not
    security_invoker, on which an API role holds a privilege (its own, or PUBLIC's)."""
    roles = _existing_roles(conn, API_ROLES)
    if not roles:
        return []
    rows = conn.execute(
        "SELECT format('%%s.%%s', n.nspname, c.relname), c.relkind, "
        "array_to_string(array(SELECT r FROM unnest(%s::text[]) r WHERE has_table_privilege("
        f"r, c.oid, 'SELECT, INSERT, UPDATE, DELETE')), ', ') {_VIEWS_PAST_RLS}",
        (roles, list(exposed_schemas)),
    ).fetchall()
    return [(name, kind, who) for name, kind, who in rows if who]


def unexposed_tables_open_to_api(
    conn: psycopg.Connection, tables: Sequence[str], exposed_schemas: Sequence[str]
) -> list[tuple[str, str, str]]:
    """(name, schema, the API roles that may read it) of each of `tables` outside the exposed
    schemas that has no row level security and that an API role may read (USAGE on its
    schema, SELECT on it): the API serves its rows wherever it exposes that schema, which
    the manifest's list may not say (a misspelt `pubic`)."""
    roles = _existing_roles(conn, API_ROLES)
    if not roles or not tables:
        return []
    rows = conn.execute(
        "SELECT format('%%s.%%s', n.nspname, c.relname), n.nspname, array_to_string(array("
        "SELECT r FROM unnest(%s::text[]) r WHERE has_schema_privilege(r, n.oid, 'USAGE') "
        "AND has_table_privilege(r, c.oid, 'SELECT')), ', ') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND n.nspname <> ALL(%s) "
        "AND format('%%s.%%s', n.nspname, c.relname) = ANY(%s) ORDER BY 1",
        (roles, list(exposed_schemas), list(tables)),
    ).fetchall()
    return [(name, schema, who) for name, schema, who in rows if who]


def definer_functions_open_to_api(
    conn: psycopg.Connection, exposed_schemas: Sequence[str]
) -> list[tuple[str, str]]:
    """(signature, the API roles that may call it) of each SECURITY DEFINER function in an
    exposed schema that they may execute (PUBLIC may, by default), extensions' excepted."""
    roles = _existing_roles(conn, API_ROLES)
    if not roles:
        return []
    rows = conn.execute(
        "SELECT format('%%I.%%I(%%s)', n.nspname, p.proname, "
        "pg_get_function_identity_arguments(p.oid)), array_to_string(array(SELECT r FROM "
        "unnest(%s::text[]) r WHERE has_function_privilege(r, p.oid, 'EXECUTE')), ', ') "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.prosecdef AND p.prokind = 'f' AND p.prorettype <> 'trigger'::regtype "
        "AND n.nspname = ANY(%s) "
        f"AND NOT {ext_member('pg_proc', 'p.oid')} ORDER BY 1",
        (roles, list(exposed_schemas)),
    ).fetchall()
    return [(name, who) for name, who in rows if who]


def bookkeeping_exposed_to(target_conn: psycopg.Connection) -> list[str]:
    """API roles that can use the bookkeeping schema (must be empty)."""
    exposed = []
    with _translated("Reading privileges on the bookkeeping schema"):
        for role in _existing_roles(target_conn, API_ROLES):
            row = target_conn.execute(
                "SELECT has_schema_privilege(%s, n.oid, 'USAGE') "
                "FROM pg_namespace n WHERE n.nspname = %s",
                (role, BOOKKEEPING_SCHEMA),
            ).fetchone()
            if row and row[0]:
                exposed.append(role)
    return exposed


# --------------------------------------------------------------------------------------------
# Encryption in transit


def session_encryption(conn: psycopg.Connection) -> SessionEncryption:
    """This session's encryption, from libpq and from the server's pg_stat_ssl."""
    client_tls = bool(conn.pgconn.ssl_in_use)
    with _translated("Reading pg_stat_ssl"):
        row = conn.execute(
            "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    if row is None or row[0] is None:
        return SessionEncryption(client_tls=client_tls, server_ssl=None)
    return SessionEncryption(
        client_tls=client_tls, server_ssl=bool(row[0]), protocol=row[1], cipher=row[2]
    )


def unencrypted_sessions(
    conn: psycopg.Connection, application_name: str = DEFAULT_APPLICATION_NAME
) -> int:
    """The tool's other sessions (same user and application name) that arrived over the
    network without TLS, as the server sees them; unix-socket and loopback ones are not counted.
    """
    with _translated("Reading pg_stat_activity"):
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid "
            "WHERE a.application_name = %s AND a.usename = current_user "
            "AND a.pid <> pg_backend_pid() AND NOT s.ssl AND a.client_addr IS NOT NULL "
            "AND NOT (a.client_addr <<= inet '127.0.0.0/8' OR a.client_addr = inet '::1')",
            (application_name,),
        ).fetchone()
    return int(row[0]) if row else 0


def connection_is_loopback(conn: psycopg.Connection) -> bool:
    """Whether this connection stays on the machine (loopback address or unix socket)."""
    info = conn.info
    hostaddr = getattr(info, "hostaddr", "") or ""
    return is_loopback_host(info.host or "") and (not hostaddr or is_loopback_host(hostaddr))


# --------------------------------------------------------------------------------------------
# pgaudit


def _parse_config(entries: Iterable[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries or ():
        key, _, value = entry.partition("=")
        out[key] = value
    return out


def _is_on(value: str | None) -> bool:
    return (value or "").strip().strip("'\"").lower() in _TRUE_WORDS


def pgaudit_status(
    target_conn: psycopg.Connection, *, settings_role: str | None = None
) -> AuditStatus:
    """Read-only view of pgaudit on the target: available, loaded, installed, role settings,
    and any place where log_rows/log_parameter is on for our role or this database."""
    with _translated("Reading the pgaudit configuration"):
        return _pgaudit_status(target_conn, settings_role)


def _pgaudit_status(conn: psycopg.Connection, settings_role: str | None) -> AuditStatus:
    # In one round trip. Only a preloaded pgaudit defines its settings; an ALTER ROLE ... SET
    # alone does not.
    available, loaded, installed = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgaudit'), "
        "EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log'), "
        "(SELECT extversion FROM pg_extension WHERE extname = 'pgaudit')"
    ).fetchone() or (False, False, None)
    role = settings_role or _default_settings_role(conn)
    role_row = conn.execute(
        "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
        "WHERE r.rolname = %s AND s.setdatabase = 0",
        (role,),
    ).fetchone()
    role_settings = {
        k: v
        for k, v in _parse_config(role_row[0] if role_row else None).items()
        if k.startswith("pgaudit.")
    }
    unsafe: list[str] = []
    # Role-level (any database / this database) and database-level settings that apply to us.
    for setrole, setdatabase, config in conn.execute(
        "SELECT coalesce(r.rolname, ''), coalesce(d.datname, ''), s.setconfig "
        "FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole "
        "LEFT JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE (s.setrole = 0 OR r.rolname = %s) "
        "AND (s.setdatabase = 0 OR d.datname = current_database())",
        (role,),
    ):
        values = _parse_config(config)
        for name in UNSAFE_AUDIT_SETTINGS:
            if _is_on(values.get(name)):
                scope = f"role {setrole}" if setrole else f"database {setdatabase}"
                if setrole and setdatabase:
                    scope += f" in database {setdatabase}"
                unsafe.append(f"{name}=on ({scope})")
    if loaded:
        for name, setting, source in conn.execute(
            "SELECT name, setting, source FROM pg_settings WHERE name = ANY(%s)",
            (list(UNSAFE_AUDIT_SETTINGS),),
        ):
            if _is_on(setting) and source not in {"user", "database", "database user"}:
                unsafe.append(f"{name}=on (server {source})")
    return AuditStatus(
        extension_available=bool(available),
        loaded=bool(loaded),
        installed_version=installed,
        settings_role=role,
        role_settings=role_settings,
        unsafe_settings=tuple(dict.fromkeys(unsafe)),
    )


def _default_settings_role(conn: psycopg.Connection) -> str:
    """`postgres` on Supabase (the role users and this tool log in as), else ourselves."""
    row = conn.execute(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s) "
        "THEN %s ELSE current_user END",
        (AUDIT_SETTINGS_ROLE, AUDIT_SETTINGS_ROLE),
    ).fetchone()
    assert row is not None
    return str(row[0])


def _check_log_classes(log_classes: str) -> str:
    parts = [p.strip().lower() for p in log_classes.split(",") if p.strip()]
    if not parts or any(p.lstrip("-") not in _AUDIT_CLASSES for p in parts):
        raise ConfigError(
            f"pgaudit.log must be a comma-separated list of {', '.join(sorted(_AUDIT_CLASSES))} "
            "(each optionally prefixed with '-')."
        )
    return ", ".join(parts)


def unavailable_message(status: AuditStatus) -> str | None:
    """The sentence the report shows when pgaudit cannot be used, else None."""
    if not status.extension_available:
        return (
            "pgaudit is not available on the target (not in pg_available_extensions), so audit "
            "logging of the PHI tables is not configured; keep the checkpoint table's audit "
            "trail and enable pgaudit (available on Supabase) when the target has it."
        )
    if not status.loaded:
        return (
            "pgaudit is installed on the target but not loaded (it must be in "
            "shared_preload_libraries, as it is on Supabase), so audit logging of the PHI "
            "tables is not configured."
        )
    return None


def configure_pgaudit(
    target_conn: psycopg.Connection,
    tables: Sequence[str],
    *,
    role_name: str = AUDITOR_ROLE,
    settings_role: str | None = None,
    log_classes: str = DEFAULT_AUDIT_LOG,
) -> AuditOutcome:
    """Object-audit the PHI tables with pgaudit, the way Supabase permits (role-level settings).

    When pgaudit is loaded: CREATE EXTENSION IF NOT EXISTS pgaudit (allow-listed on Supabase),
    a NOLOGIN NOINHERIT auditor role, GRANT SELECT, INSERT, UPDATE, DELETE on each table (and
    partition) to it, and `ALTER ROLE postgres SET pgaudit.role = auditor`. `pgaudit.log` is set
    to `log_classes` only where the role has no pgaudit.log yet (a user's choice is kept), and
    an existing pgaudit.role is reused rather than replaced. Never sets log_rows or
    log_parameter. The settings apply to sessions that start afterwards.
    """
    conn = target_conn
    classes = _check_log_classes(log_classes)
    status = pgaudit_status(conn, settings_role=settings_role)
    reason = unavailable_message(status)
    if reason:
        return AuditOutcome(available=False, message=reason, unsafe_settings=status.unsafe_settings)
    role = status.settings_role
    assert role is not None
    actions: list[str] = []
    try:
        with conn.transaction():
            _lock(conn)
            version = status.installed_version
            if version is None:
                try:
                    with conn.transaction():
                        conn.execute("CREATE EXTENSION IF NOT EXISTS pgaudit")
                except psycopg.errors.InsufficientPrivilege:
                    return AuditOutcome(
                        available=False,
                        message=(
                            "pgaudit is loaded on the target but this role may not create the "
                            "extension; enable pgaudit (Supabase dashboard: Database > "
                            "Extensions) and run the security step again."
                        ),
                        unsafe_settings=status.unsafe_settings,
                    )
                row = conn.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'pgaudit'"
                ).fetchone()
                version = row[0] if row else None
                actions.append(f"created extension pgaudit {version}")
            auditor = _auditor(conn, status, role_name, actions)
            audited = _grant_audited(conn, tables, auditor)
            current_log = status.role_settings.get("pgaudit.log")
            try:
                with conn.transaction():
                    if status.auditor_role != auditor:
                        _alter_role_set(conn, role, "pgaudit.role", auditor)
                        actions.append(f"set pgaudit.role = {auditor} on role {role}")
                    if current_log is None:
                        _alter_role_set(conn, role, "pgaudit.log", classes)
                        actions.append(f"set pgaudit.log = '{classes}' on role {role}")
                    else:
                        actions.append(f"kept pgaudit.log = '{current_log}' on role {role}")
            except psycopg.errors.InsufficientPrivilege as exc:
                return AuditOutcome(
                    available=True,
                    message=(
                        f"pgaudit is available but role {role} may not have pgaudit settings "
                        f"set ({describe_pg_error(exc)}); on Supabase run the security step as "
                        "postgres."
                    ),
                    extension_version=version,
                    auditor_role=auditor,
                    tables=tuple(audited),
                    actions=tuple(actions),
                    unsafe_settings=status.unsafe_settings,
                )
    except psycopg.Error as exc:
        raise _failure(exc, "Configuring pgaudit") from None
    message = (
        f"pgaudit object auditing covers {len(audited)} table(s) through role {auditor} "
        f"(pgaudit.role on {role}); statements are logged without row values or parameters."
    )
    if status.unsafe_settings:
        message += " Warning: " + "; ".join(status.unsafe_settings) + " writes values to the log."
    return AuditOutcome(
        available=True,
        configured=True,
        message=message,
        extension_version=version,
        auditor_role=auditor,
        settings_role=role,
        log_classes=current_log if current_log is not None else classes,
        tables=tuple(audited),
        actions=tuple(actions),
        unsafe_settings=status.unsafe_settings,
    )


def _auditor(
    conn: psycopg.Connection, status: AuditStatus, role_name: str, actions: list[str]
) -> str:
    """An existing pgaudit.role is kept (pgaudit has one per session); else ours, made NOLOGIN."""
    existing = status.auditor_role
    if existing and existing != role_name and _existing_roles(conn, [existing]):
        actions.append(f"kept existing pgaudit.role {existing}")
        return existing
    if not _existing_roles(conn, [role_name]):
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(sql.Identifier(role_name)))
        actions.append(f"created role {role_name} (NOLOGIN NOINHERIT)")
    return role_name


def _grant_audited(conn: psycopg.Connection, tables: Sequence[str], auditor: str) -> list[str]:
    relations = _relations(conn, tables)
    found = [(schema, table) for name in tables for schema, table, *_ in relations.get(name, [])]
    if found:  # in one round trip
        conn.execute(
            sql.SQL("; ").join(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(AUDITED_PRIVILEGES),
                    sql.Identifier(schema, table),
                    sql.Identifier(auditor),
                )
                for schema, table in found
            )
        )
    return [f"{schema}.{table}" for schema, table in found]


def _alter_role_set(conn: psycopg.Connection, role: str, setting: str, value: str) -> None:
    assert setting in {"pgaudit.role", "pgaudit.log"}  # never log_rows / log_parameter
    conn.execute(
        sql.SQL("ALTER ROLE {} SET {} = {}").format(
            sql.Identifier(role), sql.SQL(setting), sql.Literal(value)
        )
    )


# --------------------------------------------------------------------------------------------
# The migration's own audit trail


def compact_partitions(keys: Iterable[str]) -> str:
    """'000000, 000001, 000002, 000007' -> '000000-000002, 000007' (order kept for non-numbers)."""
    ordered = sorted(set(keys), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    parts: list[str] = []
    start = prev = None
    for key in ordered:
        if key.isdigit() and prev is not None and prev.isdigit() and int(key) == int(prev) + 1:
            prev = key
            continue
        if start is not None:
            parts.append(start if start == prev else f"{start}-{prev}")
        start = prev = key
    if start is not None:
        parts.append(start if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def migration_audit_trail(target_conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Who completed which ranges in which run, and when, per run (oldest first).

    From `supabase_migration.migration_checkpoints`; it keeps the latest completion of each
    range (Dagster's event log keeps every run). Partition keys only, never key bounds: a text
    key is a value (an email, an MRN) that an audit trail of completed work does not need.
    """
    with _translated("Reading the migration audit trail"):
        exists = target_conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (CHECKPOINTS_TABLE,)
        ).fetchone()
        if not (exists and exists[0]):
            return []
        rows = target_conn.execute(
            sql.SQL(
                "SELECT coalesce(run_id, ''), table_name, status, "
                "array_agg(DISTINCT completed_by) FILTER (WHERE completed_by IS NOT NULL), "
                "min(completed_at), max(completed_at), max(updated_at), "
                "array_agg(partition_key ORDER BY partition_key), "
                "coalesce(sum(records_migrated) FILTER (WHERE status = 'completed'), 0) "
                "FROM {} WHERE status IN ('completed', 'failed') "
                "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
            ).format(sql.Identifier(BOOKKEEPING_SCHEMA, "migration_checkpoints"))
        ).fetchall()
    runs: dict[str, dict[str, Any]] = {}
    for run_id, table, status, users, first, last, updated, keys, rows_done in rows:
        run = runs.setdefault(
            run_id,
            {
                "run_id": run_id or None,
                "completed_by": set(),
                "first_completed_at": None,
                "last_completed_at": None,
                "last_activity_at": None,
                "tables": {},
                "partitions": 0,
                "failed_partitions": 0,
                "rows": 0,
            },
        )
        run["completed_by"].update(users or ())
        for key, value, pick in (
            ("first_completed_at", first, min),
            ("last_completed_at", last, max),
            ("last_activity_at", updated, max),
        ):
            if value is not None:
                run[key] = value if run[key] is None else pick(run[key], value)
        entry = run["tables"].setdefault(table, {"ranges": "", "failed": "", "rows": 0})
        if status == "completed":
            entry["ranges"] = compact_partitions(keys)
            entry["rows"] = int(rows_done)
            run["partitions"] += len(keys)
            run["rows"] += int(rows_done)
        else:
            entry["failed"] = compact_partitions(keys)
            run["failed_partitions"] += len(keys)
    trail = []
    for run in runs.values():
        run["completed_by"] = ", ".join(sorted(run["completed_by"]))
        run["ranges"] = "; ".join(
            f"{t} {e['ranges']}" for t, e in sorted(run["tables"].items()) if e["ranges"]
        )
        for key in ("first_completed_at", "last_completed_at", "last_activity_at"):
            if run[key] is not None:
                run[key] = run[key].isoformat()
        trail.append(run)
    trail.sort(key=lambda r: r["first_completed_at"] or r["last_activity_at"] or "")
    return trail


def audit_trail_markdown(trail: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            r["run_id"] or "(none)",
            r["completed_by"],
            r["first_completed_at"] or "",
            r["last_completed_at"] or "",
            r["partitions"],
            r["failed_partitions"],
            r["rows"],
            r["ranges"],
        ]
        for r in trail
    ]
    headers = ["run", "by", "first", "last", "ranges", "failed", "rows", "partitions"]
    return markdown_table(headers, rows)


EXTENSION_TABLE = "rls_disabled_extension_table"


def unprotected(table: TableRls) -> str:
    """Why an extension's table in an exposed schema is left without RLS, and what to do."""
    return (
        f"Table {table.name} belongs to extension {table.extension}, installed in exposed "
        f"schema {table.schema}, so the API roles can reach it; it holds no migrated rows and "
        "is left as it is (RLS could hide the extension's own data from its functions, and "
        f"postgres may not own it); install {table.extension} in schema extensions to take it "
        "off the API."
    )


def rls_markdown(status: Sequence[TableRls]) -> str:
    rows = [
        [
            t.name + (" (partition)" if t.is_partition else ""),
            "yes" if t.rls_enabled else "**NO**",
            t.policies,
            "default deny"
            if t.rls_enabled and not t.policies
            else (f"extension {t.extension}'s table" if t.extension else ""),
            {True: "yes", False: "no", None: ""}[t.api_access],
        ]
        for t in status
    ]
    return markdown_table(["table", "RLS", "policies", "note", "anon/authenticated grants"], rows)


# --------------------------------------------------------------------------------------------
# Findings for the verification report


def _finding(severity: str, code: str, subject: str, message: str) -> dict[str, str]:
    return {"severity": severity, "code": code, "subject": subject, "message": message}


def security_findings(
    target_conn: psycopg.Connection,
    manifest: Any,
    *,
    is_loopback: bool | None = None,
) -> list[dict[str, str]]:
    """Security findings as plain dicts (severity ERROR/WARN/INFO, code, subject, message).

    Read only. `manifest` needs `exposed_schemas` and `tables` (entries with `.name`);
    `is_loopback` overrides what the connection's host says.
    """
    with _translated("Reading the target's security settings"):
        return _security_findings(target_conn, manifest, is_loopback)


def _security_findings(
    conn: psycopg.Connection, manifest: Any, is_loopback: bool | None
) -> list[dict[str, str]]:
    findings: list[dict[str, str]] = []
    exposed = tuple(getattr(manifest, "exposed_schemas", ("public",)))
    if BOOKKEEPING_SCHEMA in exposed:
        findings.append(
            _finding(
                "ERROR",
                "bookkeeping_exposed",
                BOOKKEEPING_SCHEMA,
                f"exposed_schemas lists {BOOKKEEPING_SCHEMA}; remove it from the manifest.",
            )
        )
        exposed = tuple(s for s in exposed if s != BOOKKEEPING_SCHEMA)

    enc = session_encryption(conn)
    loopback = connection_is_loopback(conn) if is_loopback is None else is_loopback
    if enc.encrypted:
        findings.append(
            _finding(
                "INFO",
                "connection_encrypted",
                "target",
                f"The migration's session to the target is encrypted ({enc.protocol}).",
            )
        )
    elif loopback:
        findings.append(
            _finding(
                "WARN",
                "connection_not_encrypted_loopback",
                "target",
                "The migration's session to the target is not encrypted; acceptable only "
                "because the target is on this machine.",
            )
        )
    else:
        findings.append(
            _finding(
                "ERROR",
                "connection_not_encrypted",
                "target",
                "The migration's session to the target is not encrypted according to "
                + ("the server (pg_stat_ssl)" if enc.client_tls else "libpq")
                + "; use sslmode=verify-full and enforce SSL on the project.",
            )
        )

    migrated = {t.name for t in getattr(manifest, "tables", ())}
    for t in rls_status(conn, exposed):
        if not t.rls_enabled and t.extension:
            findings.append(_finding("WARN", EXTENSION_TABLE, t.name, unprotected(t)))
        elif not t.rls_enabled:
            findings.append(
                _finding(
                    "ERROR",
                    "rls_disabled_in_public",
                    t.name,
                    f"Table {t.name} is in exposed schema {t.schema} but row level security is "
                    "not enabled, so the API roles can read and write it; run the security step "
                    f"or ALTER TABLE {t.name} ENABLE ROW LEVEL SECURITY.",
                )
            )
        elif t.policies == 0 and (t.name in migrated or not migrated):
            findings.append(
                _finding(
                    "INFO",
                    "rls_enabled_no_policy",
                    t.name,
                    f"Table {t.name} has RLS and no policy: anon and authenticated see no rows "
                    "(default deny) until policies are added; service_role is unaffected.",
                )
            )

    for name, schema, roles in unexposed_tables_open_to_api(conn, sorted(migrated), exposed):
        public = schema == "public"  # Supabase's API exposes it unless the project says not
        findings.append(
            _finding(
                "ERROR" if public else "WARN",
                "rls_disabled_open_to_api",
                name,
                f"Table {name} has no row level security and {roles} can read it; its schema "
                f"{schema} is not in the manifest's exposed_schemas"
                + (", yet Supabase's API exposes public by default" if public else "")
                + "; add the schema to exposed_schemas in migration.yaml and run again (RLS, "
                f"default deny), or REVOKE ALL ON {name} FROM anon, authenticated.",
            )
        )
    for name, kind, roles in views_open_to_api(conn, exposed):
        why = (
            "a materialized view has no row level security"
            if kind == "m"
            else "a view reads its tables as its owner, past their row level security"
        )
        findings.append(
            _finding(
                "ERROR",
                "view_exposed",
                name,
                f"{roles} can use {name} over the API, and {why}; REVOKE ALL ON {name} FROM "
                "PUBLIC, anon, authenticated (grant back the app's own roles)"
                + (", or make it security_invoker." if kind == "v" else "."),
            )
        )
    for name, roles in definer_functions_open_to_api(conn, exposed):
        findings.append(
            _finding(
                "WARN",
                "definer_function_exposed",
                name,
                f"{roles} can call {name} over the API (/rpc), and it runs as its owner, past "
                "row level security; if it returns or changes rows they may not see, REVOKE "
                f"EXECUTE ON FUNCTION {name} FROM PUBLIC, anon, authenticated (grant back the "
                "app's roles), or move it to a schema that is not exposed.",
            )
        )
    for extension, schema in conn.execute(_EXTENSIONS_IN_SQL, (list(exposed),)):
        findings.append(
            _finding(
                "WARN",
                "extension_in_exposed_schema",
                f"extension {extension}",
                f"Extension {extension} is installed in exposed schema {schema}, so the API "
                "lists its functions (Supabase's advisor flags it too); move it with ALTER "
                f"EXTENSION {extension} SET SCHEMA {EXTENSIONS_SCHEMA} where it is relocatable, "
                "or drop and create it there.",
            )
        )
    for role in bookkeeping_exposed_to(conn):
        findings.append(
            _finding(
                "ERROR",
                "bookkeeping_exposed",
                BOOKKEEPING_SCHEMA,
                f"Role {role} can use schema {BOOKKEEPING_SCHEMA}; run the security step to "
                "revoke it.",
            )
        )
    for note in _service_role_note(conn):
        findings.append(_finding("WARN", note.kind, note.subject, note.detail.capitalize() + "."))

    audit = pgaudit_status(conn)
    reason = unavailable_message(audit)
    if reason:
        findings.append(_finding("WARN", "pgaudit_unavailable", "pgaudit", reason))
    elif audit.installed_version is None or audit.auditor_role is None:
        findings.append(
            _finding(
                "WARN",
                "pgaudit_not_configured",
                "pgaudit",
                "pgaudit is available on the target but object auditing of the PHI tables is "
                "not configured; run the security step.",
            )
        )
    else:
        findings.append(
            _finding(
                "INFO",
                "pgaudit_configured",
                "pgaudit",
                f"pgaudit {audit.installed_version}: pgaudit.role = {audit.auditor_role}, "
                f"pgaudit.log = {audit.role_settings.get('pgaudit.log', 'none')} on role "
                f"{audit.settings_role}.",
            )
        )
    for setting in audit.unsafe_settings:
        findings.append(
            _finding(
                "ERROR",
                "pgaudit_logs_values",
                setting.split("=", 1)[0],
                f"{setting} writes row values or bound parameters (PHI) into the server log; "
                "turn it off.",
            )
        )
    return findings


# An app's migrations' `CREATE EXTENSION IF NOT EXISTS citext` (alembic mode, or a target made
# by hand) installs it in the first schema of the search_path, public.
_EXTENSIONS_IN_SQL = """
SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE n.nspname = ANY(%s) ORDER BY 1
"""


def report_findings(manifest: Any) -> Callable[[DatabaseUrl, DatabaseUrl], list[dict[str, str]]]:
    """`security_findings` in the shape the verification report asks for: (source, target) URLs
    in, findings out; the target's own URL decides whether it is loopback."""

    def findings(_source: DatabaseUrl, target: DatabaseUrl) -> list[dict[str, str]]:
        with borrowed(target) as conn:
            return security_findings(conn, manifest, is_loopback=target.is_loopback)

    return findings
