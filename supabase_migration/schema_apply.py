"""Put the source's schema on the target: the user's Alembic project, a filtered pg_dump, or none.

Every mode is idempotent and all-or-nothing:

- `alembic` upgrades the target to the source's revisions (its version table's; every head
  when it has none) through Alembic's Python API on one connection we open to the target,
  inside one transaction. The target goes to env.py two ways, so no env.py needs editing in
  the usual cases: as an open SQLAlchemy connection in `config.attributes["connection"]` (the
  Alembic cookbook's pattern: the upgrade is then ours to check and roll back) and as the
  `sqlalchemy.url` option (what the generated env.py reads, on a connection of its own that
  it commits). An env.py that connects to another database (say from an environment
  variable) is refused before any migration runs; it needs one line changed, e.g.::

      connectable = config.attributes.get("connection") or engine_from_config(...)

  A run that leaves the target short of the source's revisions is caught and reported.
- `dump` runs `pg_dump --schema-only` on the source (a pg_dump at least as new as the source
  server), drops what Supabase owns or what needs a superuser (roles, owners, grants, the
  `extensions` schema, extensions themselves, their comments, event triggers, publications,
  untrusted-language functions, foreign tables), creates the extensions the source uses in
  schema `extensions`, and applies the rest in ONE target transaction. The sha256 of the
  filtered SQL is recorded in `supabase_migration.schema_applied`: the same hash again is a
  no-op; a different hash means the source schema changed, which we refuse to diff.
  Limitation: references to objects of an extension that sits in another schema on the source
  (commonly `public.uuid_generate_v4()`) are rewritten to the extension's schema on the
  target when they are schema-qualified, as pg_dump writes them; unqualified references inside
  function bodies rely on the search_path, which on Supabase includes `extensions`.
- `none`: the user made the schema; we only check that the schemas and tables are there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging.config
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .catalog import (
    BOOKKEEPING_SCHEMA,
    EXTENSIONS_SCHEMA,
    SCHEMA_APPLIED,
    SCHEMA_LOCK_KEY,
    ext_member,
    reaching_moved_extensions,
    server_major,
)
from .checkpoints import REVOKE_BOOKKEEPING
from .connections import borrowed, connect, database_error, is_transient
from .conninfo import DatabaseUrl
from .errors import ConfigError, MigrationError, SchemaError, TransientError, listed
from .inputs import check_alembic_config
from .preflight import (
    BUILTIN_EXTENSIONS,
    UserCast,
    available_extensions,
    installed_extensions,
    is_reserved_schema,
    source_schemas,
    table_shapes,
    untrusted_language_extensions,
    user_casts,
)
from .redaction import describe_pg_error, redact_text, redacted_output

log = logging.getLogger(__name__)

PG_DUMP_TIMEOUT_S = 3600
# Two schema steps never interleave on one target.
_LOCK_SQL = f"SELECT pg_advisory_xact_lock(hashtext('{SCHEMA_LOCK_KEY}'))"


class SchemaMode(StrEnum):
    ALEMBIC = "alembic"
    DUMP = "dump"
    NONE = "none"


@dataclass(frozen=True)
class SchemaResult:
    """What the schema step did, for the materialization's metadata."""

    mode: SchemaMode
    revision: str | None = None
    dump_hash: str | None = None
    objects_created: int = 0
    changed: bool = False
    checked: bool = False  # before_commit ran inside the schema's own transaction
    skipped: list[str] = field(default_factory=list)  # "what: why", left out on purpose
    duration_s: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """Plain values (str/int/float/bool/None) for Dagster metadata."""
        return {
            "mode": self.mode.value,
            "revision": self.revision,
            "dump_hash": self.dump_hash,
            "objects_created": self.objects_created,
            "changed": self.changed,
            "skipped": "\n".join(f"- {s}" for s in self.skipped) if self.skipped else None,
            "skipped_count": len(self.skipped),
            "duration_s": round(self.duration_s, 3),
        }


def apply_schema(
    mode: SchemaMode | str,
    *,
    source_url: DatabaseUrl,
    target_url: DatabaseUrl,
    alembic_config: Path | None = None,
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    before_commit: Callable[[psycopg.Connection], None] | None = None,
) -> SchemaResult:
    """Bring the target's schema to the source's, in `mode`; see the module docstring.
    `tables`: the ones to migrate (mode none checks that they exist; default: all).
    `before_commit` (modes alembic and dump): called with the schema's own connection after
    the migrations or the dump ran, before they commit; whatever it raises rolls them back."""
    started = time.monotonic()
    try:
        mode = SchemaMode(mode)
    except ValueError:
        raise ConfigError(
            f"Unknown schema mode {mode!r}; use one of alembic, dump or none."
        ) from None
    try:
        if mode is SchemaMode.ALEMBIC:
            result = _apply_alembic(source_url, target_url, alembic_config, schemas, before_commit)
        elif mode is SchemaMode.DUMP:
            result = _apply_dump(source_url, target_url, schemas, before_commit)
        else:
            result = _check_none(source_url, target_url, schemas, tables)
    except psycopg.Error as exc:
        # Catalog reads and bookkeeping outside the apply transaction; nothing half-done.
        sentence = f"The schema step ({mode.value} mode) failed: {describe_pg_error(exc)}."
        raise database_error(exc, sentence, SchemaError) from None
    return replace(result, duration_s=time.monotonic() - started)


# -- bookkeeping ---------------------------------------------------------------------------------

_BOOKKEEPING_DDL = sql.SQL(
    """
CREATE SCHEMA IF NOT EXISTS {schema};
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {table} (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mode        text        NOT NULL,
    dump_hash   text,
    revision    text,
    schemas     text[]      NOT NULL DEFAULT '{{}}',
    objects     integer     NOT NULL DEFAULT 0,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON {table} FROM PUBLIC;
{revoke};
"""
).format(
    schema=sql.Identifier(BOOKKEEPING_SCHEMA),
    table=sql.Identifier(BOOKKEEPING_SCHEMA, SCHEMA_APPLIED),
    revoke=REVOKE_BOOKKEEPING,
)


def _ensure_bookkeeping(conn: psycopg.Connection) -> None:
    conn.execute(_BOOKKEEPING_DDL)


def _last_record(conn: psycopg.Connection, mode: SchemaMode) -> tuple[str | None, Any] | None:
    """(hash or revision, applied_at) of the last apply in `mode`, when the table exists."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{BOOKKEEPING_SCHEMA}.{SCHEMA_APPLIED}",)
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT coalesce(dump_hash, revision), applied_at FROM {} WHERE mode = %s "
            "ORDER BY id DESC LIMIT 1"
        ).format(sql.Identifier(BOOKKEEPING_SCHEMA, SCHEMA_APPLIED)),
        (mode.value,),
    ).fetchone()
    return (row[0], row[1]) if row else None


def applied_before(conn: psycopg.Connection, mode: SchemaMode) -> bool:
    """Whether a schema step in `mode` has completed on this target."""
    return _last_record(conn, mode) is not None


def _record(
    conn: psycopg.Connection,
    mode: SchemaMode,
    *,
    dump_hash: str | None = None,
    revision: str | None = None,
    schemas: Sequence[str],
    objects: int,
) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (mode, dump_hash, revision, schemas, objects) "
            "VALUES (%s, %s, %s, %s, %s)"
        ).format(sql.Identifier(BOOKKEEPING_SCHEMA, SCHEMA_APPLIED)),
        (mode.value, dump_hash, revision, list(schemas), objects),
    )


# -- catalog counts ------------------------------------------------------------------------------

_COUNT_SQL = f"""
SELECT
  (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY(%(schemas)s) AND NOT {ext_member("pg_class", "c.oid")})
+ (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = ANY(%(schemas)s) AND t.typtype IN ('b', 'd', 'e', 'r')
      AND t.typcategory <> 'A' AND NOT {ext_member("pg_type", "t.oid")})
+ (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = ANY(%(schemas)s) AND NOT {ext_member("pg_proc", "p.oid")})
"""


def count_objects(conn: psycopg.Connection, schemas: Sequence[str]) -> int:
    """Relations (tables, indexes, views, sequences), types and functions in `schemas`."""
    row = conn.execute(_COUNT_SQL, {"schemas": list(schemas)}).fetchone()
    return int(row[0]) if row else 0


def _existing_objects(conn: psycopg.Connection, schemas: Sequence[str]) -> list[str]:
    """Up to a few qualified names of user relations/types/functions already in `schemas`."""
    rows = conn.execute(
        f"""
        SELECT n.nspname || '.' || c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
          AND NOT {ext_member("pg_class", "c.oid")}
        UNION ALL
        SELECT n.nspname || '.' || t.typname FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = ANY(%(schemas)s) AND t.typtype IN ('b', 'd', 'e', 'r')
          AND t.typcategory <> 'A' AND NOT {ext_member("pg_type", "t.oid")}
        UNION ALL
        SELECT n.nspname || '.' || p.proname || '()' FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = ANY(%(schemas)s) AND NOT {ext_member("pg_proc", "p.oid")}
        ORDER BY 1
        """,
        {"schemas": list(schemas)},
    ).fetchall()
    return [r[0] for r in rows]


# Dump mode's other way forward after a schema change: the record of the dump and the
# checkpoints live in our bookkeeping schema, so dropping the tables alone is not enough.
_START_OVER = (
    "; or, to start over, drop what it created in the migrated schemas and the "
    f"{BOOKKEEPING_SCHEMA} schema (the record of the dump and the checkpoints) on the target, "
    "then run again."
)


def objects_dump_mode_refuses(conn: psycopg.Connection, schemas: Sequence[str]) -> str | None:
    """The sentence refusing a target whose migrated schemas already hold objects, where dump
    mode has not applied the schema before (preflight says it too, so `plan` does); None
    when they are empty, or dump mode made them after the caller read no record of it."""
    existing = _existing_objects(conn, schemas)
    if not existing:
        return None
    # Another run started at the same time committed the objects with their record in one
    # transaction: a record read after the objects cannot miss them. The locked apply decides.
    if _last_record(conn, SchemaMode.DUMP) is not None:
        return None
    for mode in (SchemaMode.ALEMBIC, SchemaMode.NONE):
        if (made := _last_record(conn, mode)) is not None:  # a manifest written anew elsewhere
            return (
                f"The target's schema was set up by this tool in {mode} mode on "
                f"{made[1]:%Y-%m-%d %H:%M %Z}, not in dump mode; rerun with --schema-mode "
                f"{mode} (as the migration.yaml of those runs says)."
            )
    shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
    return (
        f"The target already has {len(existing)} object{'s' if len(existing) > 1 else ''} "
        f"in the migrated schemas ({shown}) that this tool did not create; if you made the "
        "schema yourself, rerun with --schema-mode none (schema_mode in migration.yaml, for "
        "the UI), otherwise check that "
        "SUPABASE_DB_URL names the right project before you drop anything there."
    )


def additions_dump_mode_refuses(
    source: psycopg.Connection,
    target: psycopg.Connection,
    schemas: Sequence[str],
    tables: Sequence[str],
) -> str | None:
    """The sentence refusing migrated tables or columns the target lacks where dump mode set
    the target up: the step finds the source's schema changed (a new migration) only once the
    run has started, and refuses it then; preflight says it first, so `plan` does."""
    applied = _last_record(target, SchemaMode.DUMP)
    if applied is None:
        return None
    there, wanted = table_shapes(target, list(schemas)), set(tables)
    gained: list[str] = []
    for table, shape in sorted(table_shapes(source, list(schemas)).items()):
        if table not in wanted:
            continue
        if table not in there:
            gained.append(table)
        else:
            gained += [f"{table}.{c}" for c in shape.columns if c not in there[table].columns]
    if not gained:
        return None
    return (
        f"The target lacks {listed(gained, 5)}, which the source has, and dump mode, which set "
        f"up the target's schema on {applied[1]:%Y-%m-%d %H:%M %Z}, does not change it (this "
        "tool does not diff schemas): apply the change on the target yourself (for example "
        "with your migrations) and rerun with --schema-mode none (schema_mode in "
        f"migration.yaml, for the UI){_START_OVER}"
    )


def target_user_schemas(conn: psycopg.Connection) -> list[str]:
    """Schemas on the target that are neither PostgreSQL's, Supabase's, ours nor an extension's."""
    return [s for s in source_schemas(conn) if not is_reserved_schema(s)]


# -- alembic -------------------------------------------------------------------------------------


def _alembic_project(
    alembic_config: Path | None, target_url: DatabaseUrl
) -> tuple[Any, Any, _ProjectFiles]:
    """The user's Alembic configuration (pointed at the target), its script directory with
    every revision read, and its files (to tell its errors from ours)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if alembic_config is None:
        raise ConfigError(
            "Schema mode alembic needs the project's Alembic configuration: pass "
            "--alembic-config PATH (its alembic.ini) or set alembic_config in migration.yaml."
        )
    cfg = alembic_configuration(Path(alembic_config), target_url)
    project = _ProjectFiles(Path(alembic_config))
    try:
        script = ScriptDirectory.from_config(cfg)
        script.get_heads()  # reads every revision file
    except CommandError as exc:
        raise ConfigError(
            f"The Alembic project at {alembic_config} cannot be read: {_one_line(exc)}."
        ) from None
    except Exception as exc:  # a revision file that does not compile or import
        raise ConfigError(
            f"The Alembic project at {alembic_config} cannot be read: {project.describe(exc)}."
        ) from None
    project.roots.append(Path(script.dir))
    return cfg, script, project


def revisions_alembic_mode_refuses(
    source: psycopg.Connection, alembic_config: Path | None, target_url: DatabaseUrl
) -> str | None:
    """Preflight's (so `plan` says it too): the sentence refusing a source at a revision the
    project lacks, read from `alembic_version` where the source's search_path finds it (an
    env.py keeping it elsewhere is read when the step runs)."""
    _, script, _ = _alembic_project(alembic_config, target_url)
    found = _alembic_revisions_or_none(source, "alembic_version", None) or set()
    return _unknown_revisions(found, {r.revision for r in script.walk_revisions()}, alembic_config)


def _unknown_revisions(found: set[str], known: set[str], alembic_config: object) -> str | None:
    unknown = sorted(found - known)
    if not unknown:
        return None
    return (
        f"The source is at Alembic revision {', '.join(unknown)}, which the project at "
        f"{alembic_config} does not have; check out the project's revision the source "
        "runs (or newer), then run again."
    )


def _apply_alembic(
    source_url: DatabaseUrl,
    target_url: DatabaseUrl,
    alembic_config: Path | None,
    schemas: Sequence[str] | None,
    before_commit: Callable[[psycopg.Connection], None] | None = None,
) -> SchemaResult:
    """Upgrade the target to the source's Alembic revisions (head when the source has no
    version table), in one transaction with `before_commit` when env.py migrates on the
    connection it is given; refused before anything runs when env.py connects elsewhere."""
    # Imported here: only this mode needs Alembic and SQLAlchemy's engine machinery.
    from alembic import command
    from alembic.runtime.environment import EnvironmentContext

    from .connections import make_engine

    cfg, script, project = _alembic_project(alembic_config, target_url)
    heads = set(script.get_heads())
    known = {revision.revision for revision in script.walk_revisions()}
    secrets = [target_url.password or ""]

    def probe() -> tuple[str, str | None, bool]:
        """Where env.py keeps the revision (it may configure another table or schema), and
        whether it migrates on the connection it is given (else its own, to the target)."""
        found: list[tuple[str, str | None, bool]] = []

        def read(rev: Any, context: Any) -> list[Any]:
            used = context.connection
            # Read while env.py's own connection is open: it closes it on return.
            if used not in (None, connection) and _database_of(used) != _database_of(connection):
                raise ConfigError(
                    f"The Alembic project's env.py ({alembic_config}) connects to another "
                    "database than the target (a URL of its own, such as the app's "
                    "DATABASE_URL), so its migrations would run there; make it use "
                    "config.attributes['connection'] when that is set, or the "
                    "sqlalchemy.url option, then run again."
                )
            # Unqualified, the version table is where the target's search_path puts it: read
            # there on the source too (its login's search_path may differ, or start with a
            # schema holding another project's alembic_version), since the copy lays that
            # table over the target's.
            schema = context.version_table_schema or (
                (used if used is not None else connection)
                .exec_driver_sql("SELECT current_schema()")
                .scalar()
            )
            found.append((context.version_table, schema, used is connection))
            return []

        with engine.connect() as connection:
            cfg.attributes["connection"] = connection
            try:
                with EnvironmentContext(cfg, script, fn=read, dont_mutate=True):
                    script.run_env()
            finally:
                cfg.attributes.pop("connection", None)
                connection.rollback()
        return found[0] if found else ("alembic_version", None, False)

    engine = make_engine(target_url, pool_size=1, max_overflow=0)
    try:
        with (
            _alembic_errors(target_url, secrets, project) as applying,
            _quiet_logging_config(),
            _env_py_engines_like_ours(),
            redacted_output(secrets),
        ):
            table, table_schema, shared = probe()
            applying.shared = shared
            wanted = _source_revisions(source_url, table, table_schema, known, alembic_config)
            wanted = heads if wanted is None else wanted
            with borrowed(target_url) as conn:
                # Read on our own connection: an env.py that connects elsewhere cannot fool it.
                before_or_none = _alembic_revisions_or_none(conn, table, table_schema)
                before = before_or_none or set()
                if before - known:  # else Alembic's "Can't locate revision", of no database
                    raise ConfigError(
                        f"The target is at Alembic revision {_revision(before - known)}, which "
                        f"the project at {alembic_config} does not have (a newer checkout "
                        "upgraded it); check out that revision or a later one, then run again."
                    )
                before_schemas = list(schemas) if schemas is not None else target_user_schemas(conn)
                count_before = count_objects(conn, before_schemas)
            # At the source's revisions, or past them (a target someone upgraded further):
            # nothing to apply, and the tables are compared with the source's all the same.
            # A source at base (an empty version table) still needs the table on the target.
            if wanted <= _with_ancestors(script, before) and (wanted or before_or_none is not None):
                return SchemaResult(
                    mode=SchemaMode.ALEMBIC, revision=_revision(before), changed=False
                )
            with engine.begin() as connection:
                # One schema change at a time: a second run waits, then finds it applied.
                connection.exec_driver_sql(_LOCK_SQL)
                # Supabase caps statements at 2 min; a migration may build a big index.
                connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                cfg.attributes["connection"] = connection
                try:
                    # The source's revisions, not head: its rows fit its tables, and the
                    # version table the copy brings along then says what the target has.
                    for target_revision in (
                        ["base"] if not wanted else ["heads"] if wanted == heads else sorted(wanted)
                    ):
                        command.upgrade(cfg, target_revision)
                finally:
                    cfg.attributes.pop("connection", None)
                upgraded = connection.connection.driver_connection
                # Only when the upgrade ran on this connection, in this transaction: the
                # standard env.py migrates on its own connection and commits it, so a check
                # here could roll nothing back (migrate_schema checks after it instead).
                checked = shared and before_commit is not None
                if checked:
                    assert before_commit is not None
                    before_commit(upgraded)
    finally:
        engine.dispose()
    with connect(target_url) as conn, conn.transaction():
        after = _alembic_revisions(conn, table, table_schema)
        if not wanted <= _with_ancestors(script, after):
            raise SchemaError(
                f"Alembic ran but the target is at revision {_revision(after) or 'none'} "
                f"instead of the source's {_revision(wanted)}; the project's env.py probably "
                "connects with its own URL: make it use config.attributes['connection'] or "
                "the sqlalchemy.url option."
            )
        after_schemas = list(schemas) if schemas is not None else target_user_schemas(conn)
        created = max(count_objects(conn, after_schemas) - count_before, 0)
        conn.execute(_LOCK_SQL)
        _ensure_bookkeeping(conn)
        _record(
            conn,
            SchemaMode.ALEMBIC,
            revision=_revision(after),
            schemas=after_schemas,
            objects=created,
        )
    return SchemaResult(
        mode=SchemaMode.ALEMBIC,
        revision=_revision(after),
        objects_created=created,
        changed=before != after,
        checked=checked,
    )


def _with_ancestors(script: Any, revisions: set[str]) -> set[str]:
    """`revisions` and every revision they were upgraded through (an unknown one: itself)."""
    from alembic.script.revision import RevisionError

    seen: set[str] = set()
    todo = list(revisions)
    while todo:
        revision = todo.pop()
        if revision in seen:
            continue
        seen.add(revision)
        try:
            found = script.get_revision(revision)
        except RevisionError:  # not the project's: no ancestors known
            found = None
        down = found.down_revision if found is not None else None
        todo += [down] if isinstance(down, str) else list(down or ())
    return seen


def _database_of(connection: Any) -> tuple[Any, ...]:
    """Which server and database a SQLAlchemy connection reaches: the server's start time
    tells two clusters apart (any role may read it), the database's oid two databases."""
    return tuple(
        connection.exec_driver_sql(
            "SELECT pg_postmaster_start_time(), oid FROM pg_database "
            "WHERE datname = current_database()"
        ).one()
    )


def _source_revisions(
    source_url: DatabaseUrl,
    table: str,
    schema: str | None,
    known: set[str],
    alembic_config: Path | None,
) -> set[str] | None:
    """The source's Alembic revisions (None without a version table), each one the project
    has: a source off the project's revisions (ahead of this checkout) is refused."""
    with borrowed(source_url) as source:
        found = _alembic_revisions_or_none(source, table, schema)
    if found is None:
        return None
    refused = _unknown_revisions(found, known, alembic_config)
    if refused:
        raise ConfigError(refused)
    return found


def _alembic_revisions(conn: psycopg.Connection, table: str, schema: str | None) -> set[str]:
    return _alembic_revisions_or_none(conn, table, schema) or set()


def _alembic_revisions_or_none(
    conn: psycopg.Connection, table: str, schema: str | None
) -> set[str] | None:
    """The revisions in a database's Alembic version table (empty when there is none)."""
    ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    # Unqualified (no version_table_schema) resolves through the search_path, as in Alembic.
    found = conn.execute("SELECT to_regclass(%s)", (ident.as_string(conn),))
    row = found.fetchone()
    if not row or row[0] is None:
        return None
    return {r[0] for r in conn.execute(sql.SQL("SELECT version_num FROM {}").format(ident))}


def alembic_configuration(path: Path, target_url: DatabaseUrl) -> Any:
    """Load the user's alembic.ini and point it at the target, without touching the file."""
    from alembic.config import Config

    check_alembic_config(path)
    path = path.expanduser()
    # `alembic init -t pyproject` keeps the options (script_location ...) in pyproject.toml's
    # [tool.alembic] beside alembic.ini, which `alembic` reads from the project directory.
    toml = path.parent / "pyproject.toml"
    cfg = Config(str(path), toml_file=str(toml) if toml.is_file() else None)
    # Flask-Migrate's convention, honoured by many env.py files: leave the host's logging alone.
    cfg.attributes["configure_logger"] = False
    # ConfigParser interpolates '%': a percent-encoded password (%40 ...) must be doubled.
    url = target_url.sqlalchemy_url().render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # A relative script_location is relative to the working directory in Alembic; the user
    # ran `alembic` from the project directory, we may not have.
    location = cfg.get_alembic_option("script_location")
    if isinstance(location, str) and location and not _is_package_resource(location):
        resolved = Path(location)
        if not resolved.is_absolute() and not resolved.exists():
            candidate = path.parent.absolute() / location
            if candidate.exists():
                cfg.set_main_option("script_location", str(candidate).replace("%", "%%"))
    # So is `prepend_sys_path = .` (alembic init writes it, for env.py to import the app's
    # models). Given to ScriptDirectory resolved, without rewriting the option, whose
    # separator Alembic reads from other options.
    prepend = cfg.get_prepend_sys_paths_list() or []
    here = path.parent.absolute()
    resolved = [entry if Path(entry).is_absolute() else str(here / entry) for entry in prepend]
    cfg.get_prepend_sys_paths_list = lambda: resolved
    return cfg


def _is_package_resource(location: str) -> bool:
    return bool(re.fullmatch(r"[\w.]+:[\w./]+", location))


def _revision(heads: set[str]) -> str | None:
    return ",".join(sorted(heads)) if heads else None


@contextlib.contextmanager
def _quiet_logging_config() -> Iterator[None]:
    """Keep env.py's `fileConfig(alembic.ini)` from replacing the host's (Dagster's) logging.

    The generated env.py calls logging.config.fileConfig, which closes every handler and
    disables existing loggers; those sections are meant for the alembic CLI, not for us.
    """
    original = logging.config.fileConfig
    logging.config.fileConfig = _no_file_config  # type: ignore[assignment]
    try:
        yield
    finally:
        logging.config.fileConfig = original  # type: ignore[assignment]


@contextlib.contextmanager
def _env_py_engines_like_ours() -> Iterator[None]:
    """An engine env.py makes itself (the generated env.py's, from sqlalchemy.url) connects
    as the tool's own do: no statement_timeout in its transactions (Supabase caps statements
    at 2 minutes; a migration may build a big index), `SET LOCAL` so that nothing outlives
    the transaction behind a pooler, and no server-side prepared statements. Every
    PostgreSQL engine env.py may use is the target's: one reaching elsewhere is refused first."""
    from sqlalchemy import event
    from sqlalchemy.engine import Connection, Engine

    def lift(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")

    def unprepared(dbapi_connection: Any, _: Any) -> None:
        # No server-side prepared statements, as on the tool's own connections: behind a
        # transaction pooler the next transaction may reach a server that lacks them.
        if isinstance(dbapi_connection, psycopg.Connection):
            dbapi_connection.prepare_threshold = None

    event.listen(Engine, "begin", lift)
    event.listen(Engine, "connect", unprepared)
    try:
        yield
    finally:
        event.remove(Engine, "begin", lift)
        event.remove(Engine, "connect", unprepared)


def _no_file_config(*args: Any, **kwargs: Any) -> None:
    log.debug("Skipped logging.config.fileConfig from the Alembic env.py.")


@contextlib.contextmanager
def _alembic_errors(
    target_url: DatabaseUrl, secrets: list[str], project: _ProjectFiles
) -> Iterator[_RevisionsApplied]:
    """Turn whatever the user's migrations raise into one PHI-free sentence naming the
    revision being applied: a ConfigError (exit 2) for the project's own errors, a database
    error as `database_error` classes it."""
    import sqlalchemy.exc
    from alembic.util import CommandError

    applying = _RevisionsApplied()
    migration_log = logging.getLogger("alembic.runtime.migration")
    level, propagate = migration_log.level, migration_log.propagate
    migration_log.addHandler(applying)
    migration_log.setLevel(logging.INFO)
    migration_log.propagate = False  # heard here only, not on the host's handlers
    try:
        yield applying
    except (MigrationError, psycopg.Error):
        raise  # ours, or a database error of our own reads: apply_schema says which
    except sqlalchemy.exc.DBAPIError as exc:
        cause = exc.orig if isinstance(exc.orig, BaseException) else exc
        failure = redact_text(describe_pg_error(cause), secrets)
        if applying.shared:
            sentence = (
                f"Alembic's upgrade failed{applying.at} on the {target_url.describe()} and was "
                f"rolled back: {failure}."
            )
        else:
            sentence = (
                f"Alembic's upgrade failed{applying.at} on the {target_url.describe()}: "
                f"{failure}; any revision the project's env.py committed before it, on a "
                "connection of its own, stays there, and the next run goes on from it."
            )
        if isinstance(cause, psycopg.Error):  # worth a retry, a migration to fix (exit 2)...
            raise database_error(cause, sentence, SchemaError) from None
        raise SchemaError(sentence) from None
    # The project's own errors (its configuration, env.py, a script): the user's to fix
    except CommandError as exc:
        raise ConfigError(
            f"Alembic's upgrade failed{applying.at}: {redact_text(_one_line(exc), secrets)}."
        ) from None
    except (Exception, SystemExit) as exc:
        if _raised_in(exc, "autocommit_block"):
            raise ConfigError(
                f"A migration of the Alembic project{applying.at} runs outside a transaction "
                "(autocommit_block, as CREATE INDEX CONCURRENTLY needs), and this tool applies "
                "the upgrade in one transaction so that a failure leaves nothing behind; apply "
                "that revision on the target yourself (alembic upgrade), then run again."
            ) from None
        raise ConfigError(
            f"Alembic's upgrade failed{applying.at} in the project's env.py or a migration "
            f"script: {redact_text(project.describe(exc), secrets)}."
        ) from None
    finally:
        migration_log.removeHandler(applying)
        migration_log.setLevel(level)
        migration_log.propagate = propagate


class _RevisionsApplied(logging.Handler):
    """Hears Alembic's "Running upgrade a -> b, ..." to know which revision was applied last."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.revision: str | None = None
        self.shared = True  # the upgrade runs in the tool's transaction (else env.py's own)

    def emit(self, record: logging.LogRecord) -> None:
        # "Running upgrade a1 -> b2, its message" (which may hold "->" itself)
        found = re.match(r"Running upgrade .*? -> ([^,\s]+)", record.getMessage())
        if found:
            self.revision = found.group(1)

    @property
    def at(self) -> str:
        """' at revision x' (its migration), or nothing before any was applied."""
        return f" at revision {self.revision}" if self.revision else ""


class _ProjectFiles:
    """Says where in the user's Alembic project an exception was raised, never its text:
    a data migration's exception may carry a row's values (`KeyError(123456789)`, an MRN in
    a ValueError), an env.py's its URL. The class, the file and line, and for an import or a
    syntax error the module or file, are code's names, which the user needs to fix it."""

    def __init__(self, alembic_config: Path) -> None:
        self.roots = [alembic_config.resolve().parent]

    def describe(self, exc: BaseException) -> str:
        kind = type(exc).__name__
        if isinstance(exc, SyntaxError) and exc.filename:
            return f"{kind} in {self._shown(exc.filename)}, line {exc.lineno}"
        if isinstance(exc, ImportError) and exc.name:
            kind = f"{kind} (module {exc.name})"
        where = self._raised_where(exc)
        return f"{kind} raised {where}" if where else f"{kind} (its text is not shown)"

    def _raised_where(self, exc: BaseException) -> str | None:
        """The innermost frame of the traceback in the project's files."""
        found = None
        frame = exc.__traceback__
        while frame is not None:
            filename = frame.tb_frame.f_code.co_filename
            if self._shown(filename) != filename:
                found = f"at {self._shown(filename)}, line {frame.tb_lineno}"
            frame = frame.tb_next
        return found

    def _shown(self, filename: str) -> str:
        """A project file's path relative to its root (the alembic.ini's directory, or the
        script location); any other file as is."""
        path = Path(filename).resolve()
        for root in self.roots:
            if path.is_relative_to(root.resolve()):
                return str(path.relative_to(root.resolve()))
        return filename


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether `exc` was raised inside a function of that name (seen in its traceback)."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == function:
            return True
        frame = frame.tb_next
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")


# -- dump: finding pg_dump -----------------------------------------------------------------------


@dataclass(frozen=True)
class PgDump:
    path: Path
    major: int


def pg_dump_candidates() -> list[PgDump]:
    """Every pg_dump we can find: localpg's system and embedded builds, Debian's, PATH."""
    paths: list[Path] = []
    try:
        from . import localpg

        for prefer in ("system", "embedded"):
            found = localpg.find_binaries(prefer)  # type: ignore[arg-type]
            if found is not None:
                paths.append(found.tool("pg_dump"))
    except (ImportError, MigrationError):
        pass
    paths += sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))
    on_path = shutil.which("pg_dump")
    if on_path:
        paths.append(Path(on_path))
    seen: set[Path] = set()
    result: list[PgDump] = []
    for path in paths:
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        major = _pg_dump_major(path)
        if major:
            result.append(PgDump(path, major))
    return result


# What pg_dump may inherit: where programs, libraries and temporary files are, the locale and
# time zone, Kerberos and OpenSSL set-up (Windows needs its own two). Not the user's PG*
# settings, nor any URL with a password (the CLI keeps the source's and the target's in its
# environment for Dagster's EnvVar; an application may have more).
_PG_DUMP_INHERITS = (
    "PATH",
    "HOME",
    "TMPDIR",
    "TZ",
    "LANG",
    "LANGUAGE",
    "LD_LIBRARY_PATH",
    "DYLD_LIBRARY_PATH",
    "KRB5CCNAME",
    "KRB5_CONFIG",
    "KRB5_KTNAME",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "OPENSSL_CONF",
    "SYSTEMROOT",
    "APPDATA",
)


def _pg_dump_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _PG_DUMP_INHERITS or k.startswith("LC_")}


def _pg_dump_major(path: Path) -> int | None:
    try:
        done = subprocess.run(
            [str(path), "--version"],
            env=_pg_dump_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", done.stdout)
    return int(match.group(1)) if match and done.returncode == 0 else None


def find_pg_dump(source_major: int) -> PgDump:
    """The oldest pg_dump at least as new as the source server: closest to its SQL dialect."""
    candidates = pg_dump_candidates()
    usable = [c for c in candidates if c.major >= source_major]
    if not usable:
        found = ", ".join(sorted({str(c.major) for c in candidates})) or "none"
        raise ConfigError(
            f"Dump mode needs pg_dump {source_major} or newer for the source's PostgreSQL "
            f"{source_major} (found: {found}); install postgresql-client-{source_major}, "
            "install the embedded build (pip install 'supabase-migration[embedded]'), or use "
            "--schema-mode alembic or none."
        )
    return min(usable, key=lambda c: c.major)


def _writes_plain_money(lc_monetary: str) -> bool:
    return lc_monetary in ("C", "POSIX") or lc_monetary.startswith("C.")


def run_pg_dump(
    pg_dump: PgDump, source_url: DatabaseUrl, schemas: Sequence[str], *, plain_money: bool = True
) -> str:
    """The source's schema as SQL; the password travels in PGPASSWORD, never on argv.
    `plain_money`: the source writes money as C does already (else pg_dump is asked to)."""
    argv = [
        str(pg_dump.path),
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--no-publications",
        "--no-subscriptions",
        "--no-security-labels",
        "--no-tablespaces",
        "--encoding=UTF8",
        "--lock-wait-timeout=60000",
    ]
    for schema in schemas:
        # -n takes a pattern: quote the name so it matches exactly that schema.
        argv += ["--schema", '"' + schema.replace('"', '""') + '"']
    env = _pg_dump_env() | source_url.libpq_env()
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    if not plain_money:
        # money literals (a DEFAULT, a CHECK) as C writes them, '$1,234.50', which the target
        # reads, not in the source's lc_monetary ('1.234,50 €'); see sqlbuild.PLAIN_MONEY.
        # Only then: a pooler in front of the source may refuse the `options` it travels in.
        env["PGOPTIONS"] = " ".join(filter(None, [env.get("PGOPTIONS"), "-c lc_monetary=C"]))
    secrets = [s for s in (source_url.password, source_url.params.get("sslpassword")) if s]
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, timeout=PG_DUMP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise SchemaError(
            f"pg_dump did not finish dumping the schema of the {source_url.describe()} within "
            f"{PG_DUMP_TIMEOUT_S} s; check for locks held on the source's tables."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"pg_dump at {pg_dump.path} could not be started: {exc.strerror}."
        ) from None
    if done.returncode != 0:
        stderr = done.stderr.decode("utf-8", "replace")
        raise SchemaError(
            f"pg_dump {pg_dump.major} could not dump the schema of the {source_url.describe()}: "
            f"{_pg_dump_reason(stderr, secrets)}."
        )
    return done.stdout.decode("utf-8")


def _pg_dump_reason(stderr: str, secrets: Sequence[str]) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line] or lines or ["exit status non-zero"]
    reason = re.sub(r"^pg_dump:\s*(?:error:\s*)?", "", errors[0])
    return redact_text(reason, secrets).rstrip(".")


# -- dump: reading and filtering the SQL ---------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One SQL statement of a plain pg_dump, with the TOC entry it belongs to."""

    sql: str
    entry_type: str = ""  # e.g. "TABLE", "FK CONSTRAINT", "COMMENT"; "" before the first entry
    entry_name: str = ""
    entry_schema: str = ""


_HEADER = re.compile(
    r"-- (?:Data for )?Name: (?P<name>.*?); Type: (?P<type>[A-Z][A-Z ]*); "
    r"Schema: (?P<schema>.*?); Owner: .*$"
)
_SCAN = re.compile(
    r"--|/\*|'|\"|\$(?:[^\W\d]\w*)?\$|;|^\\|[()]|(?<![\w$.])(?:begin|case|end)(?![\w$])",
    re.MULTILINE | re.IGNORECASE,
)
# A function or procedure whose body is SQL-standard (`BEGIN ATOMIC stmt; stmt; END`), whose
# semicolons do not end it. As psql does: BEGIN and END counted at parenthesis depth 0 in
# such a statement, and CASE inside the body too (it ends with END).
_ROUTINE = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE)\b", re.IGNORECASE)


def split_dump(text: str) -> list[Statement]:
    """Split pg_dump's plain output into statements, quoting-aware, dropping psql meta-commands.

    Strings ('', E''), quoted identifiers, dollar-quoted bodies and comments are skipped over,
    so a ';' or '--' inside a function body never splits it; nor one inside parentheses (a
    rule's several actions) or a SQL-standard body (`BEGIN ATOMIC ... END`). A `-- Name: ...;
    Type: ...` comment between statements starts a new TOC entry; `\\restrict`-style lines are
    dropped.
    """
    statements: list[Statement] = []
    entry = ("", "", "")
    start: int | None = None  # where the current statement began
    parens = atomic = 0  # depths inside it
    pos = 0
    n = len(text)
    while pos < n:
        match = _SCAN.search(text, pos)
        if match is None:
            break
        token, at = match.group(), match.start()
        if start is None and text[pos:at].strip():
            start = pos + (len(text[pos:at]) - len(text[pos:at].lstrip()))
        if token == "--":
            end = text.find("\n", at)
            end = n if end < 0 else end
            if start is None:
                header = _HEADER.match(text, at, end)
                if header:
                    entry = (header["type"], header["name"], header["schema"])
            pos = end
        elif token == "/*":
            pos = _skip_block_comment(text, at)
        elif token == "\\":
            # psql meta-command (pg_dump 17+/15.14+: \restrict KEY); only between statements.
            end = text.find("\n", at)
            end = n if end < 0 else end
            if start is not None:
                raise SchemaError(
                    "The pg_dump output has a psql meta-command inside a statement, which this "
                    "tool cannot apply; use --schema-mode none and restore the schema yourself."
                )
            pos = end
        elif token == ";":
            pos = at + 1
            if parens or atomic:
                continue
            if start is not None:
                statements.append(Statement(text[start : at + 1].strip(), *entry))
            start = None
        else:
            if start is None:
                start = at
            if token in "()":
                parens = max(0, parens + (1 if token == "(" else -1))
                pos = at + 1
            elif token[0].isalpha():  # BEGIN, CASE or END
                if not parens and _ROUTINE.match(text, start):
                    word = token.lower()
                    if word == "begin" or (word == "case" and atomic):
                        atomic += 1
                    elif word == "end" and atomic:
                        atomic -= 1
                pos = at + len(token)
            elif token == "'":
                escaped = at > 0 and text[at - 1] in "eE" and (at < 2 or not _ident(text[at - 2]))
                pos = _skip_string(text, at, escaped)
            elif token == '"':
                pos = _skip_quoted(text, at, '"')
            elif at > 0 and _ident(text[at - 1]):
                pos = at + 1  # a '$' inside an identifier such as a$b
            else:
                close = text.find(token, match.end())
                if close < 0:
                    raise SchemaError("The pg_dump output has an unterminated dollar-quoted body.")
                pos = close + len(token)
    if start is not None and text[start:].strip():
        statements.append(Statement(text[start:].strip(), *entry))
    return statements


def _ident(ch: str) -> bool:
    return ch.isalnum() or ch in "_$"


def _skip_block_comment(text: str, at: int) -> int:
    depth, pos = 0, at
    while True:
        match = re.compile(r"/\*|\*/").search(text, pos)
        if match is None:
            return len(text)
        depth += 1 if match.group() == "/*" else -1
        pos = match.end()
        if depth == 0:
            return pos


def _skip_quoted(text: str, at: int, quote: str) -> int:
    pos = at + 1
    while True:
        close = text.find(quote, pos)
        if close < 0:
            return len(text)
        if text.startswith(quote * 2, close):
            pos = close + 2
            continue
        return close + 1


def _skip_string(text: str, at: int, escaped: bool) -> int:
    if not escaped:
        return _skip_quoted(text, at, "'")
    match = re.compile(r"(?:[^'\\]|\\.|'')*'", re.DOTALL).match(text, at + 1)
    return match.end() if match else len(text)


@dataclass(frozen=True)
class FilteredDump:
    statements: list[str]  # to apply, in order, SETs included
    skipped: list[str]
    digest: str  # sha256 of the statements that define objects (SETs left out)


# TOC entry types left out, with the reason shown in the materialization.
_SKIP_TYPES = {
    "EXTENSION": "",  # created in schema extensions instead (or already there)
    "EVENT TRIGGER": "needs superuser on Supabase",
    "PROCEDURAL LANGUAGE": "needs superuser on Supabase",
    "PUBLICATION": "publications are not migrated",
    "PUBLICATION TABLE": "publications are not migrated",
    "PUBLICATION TABLES IN SCHEMA": "publications are not migrated",
    "SUBSCRIPTION": "needs superuser on Supabase",
    "FOREIGN DATA WRAPPER": "needs superuser on Supabase",
    "SERVER": "foreign servers hold credentials and are not migrated",
    "USER MAPPING": "foreign servers hold credentials and are not migrated",
    "FOREIGN TABLE": "its foreign server is not migrated",
    "SECURITY LABEL": "",
    "ACL": "",
    "DEFAULT ACL": "",
    "DATABASE": "",
    "DATABASE PROPERTIES": "",
}
# Statements dropped wherever they appear: roles, ownership, grants, extension management.
# An ownership change is the whole statement, ending with the role: `OWNER TO` inside one of
# the statement's string literals (a CHECK's) must not drop it.
_DROP_STATEMENT = re.compile(
    r"^(?:ALTER\s.*\sOWNER\s+TO\s+(?:\"(?:[^\"]|\"\")+\"|[\w$]+);$|GRANT\s|REVOKE\s"
    r"|CREATE\s+EXTENSION\s|ALTER\s+EXTENSION\s"
    r"|COMMENT\s+ON\s+EXTENSION\s|(?:CREATE|ALTER|DROP)\s+(?:ROLE|USER|GROUP)\s"
    r"|SECURITY\s+LABEL\s|ALTER\s+DEFAULT\s+PRIVILEGES\s|(?:CREATE|ALTER)\s+EVENT\s+TRIGGER\s"
    r"|(?:CREATE|ALTER)\s+(?:PUBLICATION|SUBSCRIPTION)\s|ALTER\s+SCHEMA\s+public\s)",
    re.IGNORECASE | re.DOTALL,
)
# What a COMMENT entry of pg_dump names: its object's kind (some of two or three words) and name.
_COMMENTED = re.compile(
    r"^(FOREIGN TABLE|FOREIGN DATA WRAPPER|MATERIALIZED VIEW|EVENT TRIGGER|ACCESS METHOD"
    r"|TEXT SEARCH \w+|[A-Z]+) (.*)$",
    re.DOTALL,
)


def _commented(name: str) -> tuple[str, str]:
    found = _COMMENTED.match(name)
    return (found.group(1), found.group(2)) if found else ("", name)


_SET = re.compile(r"^SET\s+(\w+)\s*(?:=|\s+TO\s)\s*(.*);$", re.IGNORECASE | re.DOTALL)
_SET_CONFIG = re.compile(
    r"^SELECT\s+pg_catalog\.set_config\('(\w+)',\s*'(.*)',\s*false\);$", re.IGNORECASE
)
# Session-level SETs that must not be sent: psycopg owns the client encoding, and PG 17+'s
# transaction_timeout must not be copied onto an older target (the target's list decides).
_NEVER_SET = frozenset({"client_encoding", "transaction_timeout"})
_LANGUAGE = re.compile(r"\n\s*LANGUAGE\s+\"?(\w+)\"?", re.IGNORECASE)


def filter_dump(
    statements: Sequence[Statement],
    *,
    target_settings: set[str],
    untrusted_languages: set[str],
) -> FilteredDump:
    """Keep what the non-superuser `postgres` may create; SETs become SET LOCAL (pooler-safe)."""
    kept: list[str] = []
    skipped: list[str] = []
    defining: list[str] = []
    gone: set[tuple[str, str]] = set()  # (schema, name) of skipped entries, for their comments

    def skip(what: str, why: str) -> None:
        if why and f"{what}: {why}" not in skipped:
            skipped.append(f"{what}: {why}")

    for st in statements:
        text, kind, name, schema = st.sql, st.entry_type, st.entry_name, st.entry_schema
        set_match = _SET.match(text)
        if set_match:
            setting = set_match.group(1).lower()
            if setting not in _NEVER_SET and setting in target_settings:
                kept.append(f"SET LOCAL {setting} = {set_match.group(2)};")
            continue
        config_match = _SET_CONFIG.match(text)
        if config_match:
            kept.append(
                f"SELECT pg_catalog.set_config('{config_match.group(1)}', "
                f"'{config_match.group(2)}', true);"
            )
            continue
        if kind in _SKIP_TYPES:
            skip(f"{kind} {_qualified(schema, name)}", _SKIP_TYPES[kind])
            gone.add((schema, name))
            continue
        if schema == EXTENSIONS_SCHEMA or (kind == "SCHEMA" and name == EXTENSIONS_SCHEMA):
            skip(f"{kind} {_qualified(schema, name)}", "schema extensions belongs to Supabase")
            continue
        if kind == "SCHEMA" and name == "public":
            continue  # exists on every target
        if kind == "COMMENT":
            target_kind, target_name = _commented(name)
            if target_kind == "EXTENSION":
                skip(f"COMMENT ON EXTENSION {target_name}", "extensions belong to supabase_admin")
                continue
            if name == "SCHEMA public":
                continue
            base = re.sub(r"\(.*$", "", target_name).split(".", 1)[0]
            if (schema, target_name) in gone or (schema, base) in gone:
                continue
        if kind in {"FUNCTION", "PROCEDURE"}:
            language = _LANGUAGE.search(text)
            if language and language.group(1).lower() in untrusted_languages:
                skip(
                    f"{kind} {_qualified(schema, name)}",
                    f"language {language.group(1)} needs superuser on Supabase",
                )
                gone.add((schema, name))
                continue
        if _DROP_STATEMENT.match(text):
            continue
        if kind == "SCHEMA":
            text = re.sub(
                r"^CREATE\s+SCHEMA\s+(?!IF\s+NOT\s+EXISTS)",
                "CREATE SCHEMA IF NOT EXISTS ",
                text,
                flags=re.IGNORECASE,
            )
        kept.append(text)
        if kind != "CAST":  # a target made before casts were copied keeps its digest
            defining.append(text)
    digest = hashlib.sha256("\n".join(defining).encode("utf-8")).hexdigest()
    return FilteredDump(statements=kept, skipped=skipped, digest=digest)


def _qualified(schema: str, name: str) -> str:
    return name if schema in {"", "-"} else f"{schema}.{name}"


# -- dump: references to extension objects -------------------------------------------------------

_EXTENSION_MEMBERS_SQL = """
SELECT e.extname, n.nspname, m.kind, m.name
FROM pg_depend d
JOIN pg_extension e ON e.oid = d.refobjid AND d.refclassid = 'pg_extension'::regclass
CROSS JOIN LATERAL (
    SELECT 'function' AS kind, p.proname::text AS name, p.pronamespace AS nsp FROM pg_proc p
    WHERE d.classid = 'pg_proc'::regclass AND p.oid = d.objid
    UNION ALL
    SELECT 'name', t.typname::text, t.typnamespace FROM pg_type t
    WHERE d.classid = 'pg_type'::regclass AND t.oid = d.objid
    UNION ALL
    SELECT 'name', c.relname::text, c.relnamespace FROM pg_class c
    WHERE d.classid = 'pg_class'::regclass AND c.oid = d.objid
    UNION ALL
    SELECT 'name', o.opcname::text, o.opcnamespace FROM pg_opclass o
    WHERE d.classid = 'pg_opclass'::regclass AND o.oid = d.objid
    UNION ALL
    SELECT 'name', f.opfname::text, f.opfnamespace FROM pg_opfamily f
    WHERE d.classid = 'pg_opfamily'::regclass AND f.oid = d.objid
    UNION ALL
    SELECT 'name', c.cfgname::text, c.cfgnamespace FROM pg_ts_config c
    WHERE d.classid = 'pg_ts_config'::regclass AND c.oid = d.objid
    UNION ALL
    SELECT 'name', t.dictname::text, t.dictnamespace FROM pg_ts_dict t
    WHERE d.classid = 'pg_ts_dict'::regclass AND t.oid = d.objid
    UNION ALL
    SELECT 'operator', o.oprname::text, o.oprnamespace FROM pg_operator o
    WHERE d.classid = 'pg_operator'::regclass AND o.oid = d.objid
) m
JOIN pg_namespace n ON n.oid = m.nsp
WHERE d.deptype = 'e'
"""


def _quote_ident(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


# The user's own tables, views and types (their row types too) in these schemas: one named as
# an extension's function (a table `digest` beside pgcrypto's digest()) is no member of it.
_USER_NAMES_SQL = f"""
SELECT n.nspname, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND NOT {ext_member("pg_class", "c.oid")}
UNION
SELECT n.nspname, t.typname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = ANY(%s) AND NOT {ext_member("pg_type", "t.oid")}
"""


def extension_rewriter(
    source: psycopg.Connection, moves: dict[str, tuple[str, str]]
) -> Callable[[str], str]:
    """A function rewriting `old_schema.member` to `new_schema.member` for moved extensions.

    `moves` is {extension: (schema on the source, schema on the target)}. pg_dump qualifies
    every reference (its search_path is empty), so qualified names are what appear.
    """
    moved = {ext: pair for ext, pair in moves.items() if pair[0] != pair[1]}
    if not moved:
        return lambda text: text
    names: dict[tuple[str, str], set[str]] = {}
    calls: dict[tuple[str, str], set[str]] = {}  # functions named as one of the user's objects
    operators: dict[tuple[str, str], set[str]] = {}
    old_schemas = sorted({old for old, _ in moved.values()})
    taken = set(source.execute(_USER_NAMES_SQL, (old_schemas, old_schemas)).fetchall())
    for ext, schema, kind, name in source.execute(_EXTENSION_MEMBERS_SQL):
        if ext not in moved or schema != moved[ext][0]:
            continue
        if kind == "operator":
            bucket = operators
        else:
            bucket = calls if kind == "function" and (schema, name) in taken else names
        bucket.setdefault(moved[ext], set()).add(name)
    patterns: list[tuple[re.Pattern[str], str]] = []
    # A name the user's table or type also has is rewritten only where it is called: pg_dump
    # writes a call as name( and a table or type otherwise (name (, name, name.).
    for bucket, after in ((names, r"(?![\w$])"), (calls, r"(?=\()")):
        for (old, new), members in bucket.items():
            alternatives = "|".join(
                re.escape(_quote_ident(m)) for m in sorted(members, key=len, reverse=True)
            )
            patterns.append(
                (
                    re.compile(
                        rf'(?<![\w$".]){re.escape(_quote_ident(old))}\.({alternatives}){after}'
                    ),
                    _quote_ident(new) + r".\1",
                )
            )
    for (old, new), members in operators.items():
        alternatives = "|".join(re.escape(m) for m in sorted(members, key=len, reverse=True))
        patterns.append(
            (
                re.compile(rf"OPERATOR\({re.escape(_quote_ident(old))}\.({alternatives})\)"),
                f"OPERATOR({_quote_ident(new)}.\\1)",
            )
        )

    homes = list(moved.values())

    def rewrite(text: str) -> str:
        for pattern, replacement in patterns:
            text = pattern.sub(replacement, text)
        return _routine_paths_reaching(text, homes)

    return rewrite


# A routine as pg_dump writes it: its header, its own settings one per line, then its body.
_ROUTINE_HEAD = re.compile(r"CREATE (?:OR REPLACE )?(?:FUNCTION|PROCEDURE) ")
_ROUTINE_BODY = re.compile(r"^    (?:AS |BEGIN ATOMIC|RETURN )", re.MULTILINE)
_ROUTINE_SEARCH_PATH = re.compile(
    r"^(    SET search_path TO )('(?:[^']|'')*'(?:, '(?:[^']|'')*')*)$", re.MULTILINE
)
_QUOTED = re.compile(r"'((?:[^']|'')*)'")


def _routine_paths_reaching(text: str, homes: Sequence[tuple[str, str]]) -> str:
    """A routine's own search_path (in its header: a body's lines are the user's) reaching
    each moved extension (`catalog.reaching_moved_extensions`)."""
    if not _ROUTINE_HEAD.match(text):
        return text
    body = _ROUTINE_BODY.search(text)
    cut = body.start() if body else len(text)

    def reaching(found: re.Match[str]) -> str:
        path = [m.replace("''", "'") for m in _QUOTED.findall(found.group(2))]
        path = reaching_moved_extensions(path, homes)
        return found.group(1) + ", ".join("'" + m.replace("'", "''") + "'" for m in path)

    return _ROUTINE_SEARCH_PATH.sub(reaching, text[:cut]) + text[cut:]


# -- dump: applying ------------------------------------------------------------------------------


# The TOC entries that make a type: a cast on a table's row type waits for its TABLE entry,
# not for the table's post-data entries of the same name (its ROW SECURITY).
_TYPE_DEFINING = frozenset({"TYPE", "SHELL TYPE", "DOMAIN", "TABLE", "VIEW", "MATERIALIZED VIEW"})


def with_casts(statements: Sequence[Statement], casts: Sequence[UserCast]) -> list[Statement]:
    """Each cast right after the last statement of what it needs (its function, its types),
    so before any view, default or routine that uses it, as a whole-database pg_dump orders
    it. A view that casts a composite to text without it would still be made, reading
    otherwise (record_out's text)."""
    out = list(statements)
    for cast in casts:

        def needed(st: Statement, cast: UserCast = cast) -> bool:
            if st.entry_type in _TYPE_DEFINING and (st.entry_schema, st.entry_name) in cast.types:
                return True
            return (
                cast.function is not None
                and st.entry_type == "FUNCTION"
                and st.entry_schema == cast.function[0]
                and st.entry_name.startswith(f"{cast.function[1]}(")
            )

        after = [i for i, st in enumerate(out) if needed(st)]
        at = max(after) + 1 if after else len(out)
        out.insert(at, Statement(cast.statement, "CAST", cast.name.removeprefix("cast ")))
    return out


def _apply_dump(
    source_url: DatabaseUrl,
    target_url: DatabaseUrl,
    schemas: Sequence[str] | None,
    before_commit: Callable[[psycopg.Connection], None] | None = None,
) -> SchemaResult:
    with borrowed(source_url) as source:
        schemas = list(schemas) if schemas is not None else source_schemas(source)
        untrusted_ext = untrusted_language_extensions(source)
        casts = user_casts(source, schemas)
        source_ext = {
            name: info
            for name, info in installed_extensions(source).items()
            if name not in BUILTIN_EXTENSIONS
        }
        untrusted = {
            r[0] for r in source.execute("SELECT lanname FROM pg_language WHERE NOT lanpltrusted")
        }
        pg_dump = find_pg_dump(server_major(source))
        monetary = source.execute("SELECT current_setting('lc_monetary')").fetchone()
        plain_money = monetary is None or _writes_plain_money(str(monetary[0]))
        raw = run_pg_dump(pg_dump, source_url, schemas, plain_money=plain_money)
        with borrowed(target_url) as probe:
            settings = {r[0] for r in probe.execute("SELECT name FROM pg_settings")}
            target_ext = installed_extensions(probe)
        # Left out, as their functions are, unless the target has them already.
        untrusted_ext -= set(target_ext)
        source_ext = {n: info for n, info in source_ext.items() if n not in untrusted_ext}
        dump = filter_dump(
            with_casts(split_dump(raw), [c for c in casts if not c.not_copied]),
            target_settings=settings,
            untrusted_languages=untrusted,
        )
        moves = {
            name: (schema, target_ext[name][0] if name in target_ext else EXTENSIONS_SCHEMA)
            for name, (schema, _) in source_ext.items()
        }
        rewrite = extension_rewriter(source, moves)
    skipped = (
        list(dump.skipped)
        + [
            f"EXTENSION {name}: its language is untrusted, which needs superuser on Supabase"
            for name in sorted(untrusted_ext)
        ]
        + [f"{c.name}: {c.not_copied}" for c in casts if c.not_copied]
    )
    created: int | None = None
    with connect(target_url) as target:
        try:
            with target.transaction():
                created = _apply_dump_in_transaction(
                    target, target_url, dump, rewrite, schemas, source_ext
                )
                if created is not None and before_commit is not None:
                    before_commit(target)
        except psycopg.Error as exc:
            sentence = (
                f"The schema could not be applied to the {target_url.describe()}, so nothing "
                f"was changed: {describe_pg_error(exc)}{_failed_entry(exc)}."
            )
            if is_transient(exc):  # the connection ended: the step's retry applies it again
                raise TransientError(sentence) from None
            raise SchemaError(sentence) from None
    return SchemaResult(
        mode=SchemaMode.DUMP,
        dump_hash=dump.digest,
        objects_created=max(created or 0, 0),
        changed=created is not None,
        skipped=skipped,
    )


def _apply_dump_in_transaction(
    conn: psycopg.Connection,
    target_url: DatabaseUrl,
    dump: FilteredDump,
    rewrite: Callable[[str], str],
    schemas: Sequence[str],
    source_ext: dict[str, tuple[str, str]],
) -> int | None:
    """Apply inside the caller's transaction; None when this dump was applied before."""
    conn.execute("SET LOCAL statement_timeout = 0")
    conn.execute(_LOCK_SQL)
    previous = _last_record(conn, SchemaMode.DUMP)
    if previous is not None:
        digest, applied_at = previous
        if digest == dump.digest:
            raise psycopg.Rollback()  # a no-op, and provably so: nothing is committed
        raise ConfigError(  # the user must choose what to do: bad input, exit code 2
            f"The source schema changed since dump mode applied it to the target on "
            f"{applied_at:%Y-%m-%d %H:%M %Z} (hash {str(digest)[:12]}, now {dump.digest[:12]}); "
            "this tool does not diff schemas: apply the change on the target yourself (for "
            "example with a migration) and rerun with --schema-mode none (schema_mode in "
            f"migration.yaml, for the UI){_START_OVER}"
        )
    refused = objects_dump_mode_refuses(conn, schemas)
    if refused:
        raise ConfigError(refused)  # the wrong target, or the wrong mode: exit code 2
    before = count_objects(conn, schemas)
    _create_extensions(conn, target_url, source_ext)
    _execute_dump(conn, [rewrite(s) for s in dump.statements])
    # The dump's settings were SET LOCAL: restore ours for the bookkeeping statements.
    conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")
    created = count_objects(conn, schemas) - before
    _ensure_bookkeeping(conn)
    _record(conn, SchemaMode.DUMP, dump_hash=dump.digest, schemas=schemas, objects=created)
    return created


def _create_extensions(
    conn: psycopg.Connection,
    target_url: DatabaseUrl,
    source_ext: dict[str, tuple[str, str]],
) -> None:
    present = installed_extensions(conn)
    available = available_extensions(conn)
    missing = [name for name in sorted(source_ext) if name not in present]
    if not missing:
        return
    for name in missing:
        if name not in available:
            raise SchemaError(
                f"Extension {name} is used on the source but the {target_url.describe()} does "
                "not offer it; run `supabase-migrate plan` for the preflight findings."
            )
    conn.execute(
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(EXTENSIONS_SCHEMA))
    )
    for name in missing:
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {} CASCADE").format(
                        sql.Identifier(name), sql.Identifier(EXTENSIONS_SCHEMA)
                    )
                )
        except psycopg.Error as exc:
            raise SchemaError(
                f"Extension {name} could not be created in schema extensions on the "
                f"{target_url.describe()} ({describe_pg_error(exc)}); enable it from the "
                "Supabase dashboard (Database, Extensions, schema extensions) and run again."
            ) from None


# Statements per round trip; a failing batch is replayed one statement at a time (inside a
# savepoint) to name the statement that failed.
_BATCH = 200


# A statement that changes a setting (pg_dump's SETs, made SET LOCAL, and set_config calls).
_SETTING = re.compile(r"^(?:SET\s|SELECT\s+pg_catalog\.set_config\()", re.IGNORECASE)


def dump_batches(statements: Sequence[str]) -> Iterator[list[str]]:
    """The statements in batches of at most _BATCH, each ending after a run of settings: the
    server parses a whole batch before it runs any of it, so a literal sent with
    `SET standard_conforming_strings = on` would be read under the database's own setting
    (off on some: a default 'x\\y' became 'xy', and verification passed)."""
    batch: list[str] = []
    for i, statement in enumerate(statements):
        batch.append(statement)
        setting_ends = _SETTING.match(statement) and not (
            i + 1 < len(statements) and _SETTING.match(statements[i + 1])
        )
        if len(batch) >= _BATCH or setting_ends:
            yield batch
            batch = []
    if batch:
        yield batch


def _execute_dump(conn: psycopg.Connection, statements: Sequence[str]) -> None:
    """Run the statements in batches (simple query protocol: several per round trip)."""
    for batch in dump_batches(statements):
        try:
            with conn.transaction():
                conn.execute("\n".join(batch))  # type: ignore[call-overload]
        except psycopg.Error as exc:
            failed = _failing_statement(conn, batch)
            if failed is not None:
                exc.add_note(f"statement: {_statement_head(failed)}")
            raise


def _failing_statement(conn: psycopg.Connection, batch: Sequence[str]) -> str | None:
    for statement in batch:
        try:
            with conn.transaction():
                conn.execute(statement)  # type: ignore[call-overload]
        except psycopg.Error:
            return statement
    return None


def _statement_head(statement: str) -> str:
    """The statement's leading keywords and object name, never literals or bodies."""
    head = re.split(r"[('$]|\bAS\b|\bDEFAULT\b", statement, maxsplit=1)[0]
    return " ".join(head.split())[:120]


def _failed_entry(exc: psycopg.Error) -> str:
    for note in getattr(exc, "__notes__", []) or []:
        if note.startswith("statement: "):
            return f" (in {note.removeprefix('statement: ')})"
    return ""


# -- none ----------------------------------------------------------------------------------------

# Partitions are copied through their parent: the target may partition differently.
_TABLES_SQL = f"""
SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND NOT {ext_member("pg_class", "c.oid")}
"""


def _check_none(
    source_url: DatabaseUrl,
    target_url: DatabaseUrl,
    schemas: Sequence[str] | None,
    tables: Sequence[str] | None,
) -> SchemaResult:
    with borrowed(source_url) as source:
        schemas = list(schemas) if schemas is not None else source_schemas(source)
        wanted = {r[0] for r in source.execute(_TABLES_SQL, (schemas,))}
    if tables is not None:
        wanted &= set(tables)
    with borrowed(target_url) as target:
        present_schemas = {
            r[0]
            for r in target.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (schemas,)
            )
        }
        have = {r[0] for r in target.execute(_TABLES_SQL, (schemas,))}
    absent_schemas = [s for s in schemas if s not in present_schemas]
    if absent_schemas:
        raise ConfigError(
            f"Schema mode none expects the schema to exist on the target, but schema "
            f"{absent_schemas[0]} is missing there; create it (for example with your "
            "migrations) or use --schema-mode dump or alembic."
        )
    missing = sorted(wanted - have)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"Schema mode none expects every source table on the target, but {len(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} missing ({shown}); create them or use "
            "--schema-mode dump or alembic."
        )
    return SchemaResult(mode=SchemaMode.NONE, changed=False)
