"""What a command is given: its settings, the two database URLs and the manifest.

Kept free of Dagster, so that a command which needs Dagster only at its end (`verify`) can
start on the databases while Dagster is imported beside it.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from . import manifest as manifest_io
from .catalog import missing_schemas, read_tables, too_old_a_source, user_schemas
from .connections import borrowed
from .conninfo import INSECURE_ENV, DatabaseUrl, Endpoint, parse_database_url
from .errors import ConfigError, read_user_text
from .manifest import Manifest
from .preflight import watched_tables_left_out
from .verify import DEFAULT_SAMPLE_SIZE

SOURCE_URL_ENV = "SOURCE_DATABASE_URL"
TARGET_URL_ENV = "SUPABASE_DB_URL"
TARGET_ENDPOINT_ENV = "SUPABASE_DB_ENDPOINT"  # override for self-hosted poolers
SSLROOTCERT_ENV = "SUPABASE_SSLROOTCERT"


def insecure_ssl_allowed() -> bool:
    return os.environ.get(INSECURE_ENV, "").lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class Settings:
    """What a command was asked to do; URLs stay in the environment, never here."""

    manifest_path: Path = field(default_factory=manifest_io.default_path)
    workers: int = 1
    batch_size: int | None = None
    schema_mode: str | None = None
    alembic_config: str | None = None
    schemas: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    verify: bool = True
    sample_size: int = DEFAULT_SAMPLE_SIZE
    seed: int | None = None
    repair: bool = False  # also re-sync the ranges the last verification report found different
    new_source: bool = False  # the source moved: record this one instead of refusing it


# -- connections -----------------------------------------------------------------------------


def _env_url(env: str, label: str, flag: str) -> DatabaseUrl:
    text = os.environ.get(env)
    if not text:
        raise ConfigError(f"No {label} database given: set {env} or pass {flag}.")
    endpoint = os.environ.get(TARGET_ENDPOINT_ENV) if label == "target" else None
    return parse_database_url(
        text,
        label=label,
        endpoint=Endpoint.named(endpoint) if endpoint else None,
        allow_insecure=insecure_ssl_allowed(),
        sslrootcert=os.environ.get(SSLROOTCERT_ENV) if label == "target" else None,
    )


def source_url() -> DatabaseUrl:
    return _env_url(SOURCE_URL_ENV, "source", "--source")


def target_url() -> DatabaseUrl:
    return _env_url(TARGET_URL_ENV, "target", "--target")


def check_connections(log: Callable[[str], None] = lambda _: None) -> None:
    """Fail fast with one sentence before any Dagster run starts."""
    with borrowed(source_url()) as source:
        _refuse_too_old_a_source(source)
    with borrowed(target_url()):
        pass
    if target_url().uses_transaction_pooler:
        log(
            "Note: the target is a transaction pooler; it works, but a direct or "
            "session-pooler URL (Supabase's port 5432, not 6543) is faster for bulk loads."
        )


def _refuse_too_old_a_source(source: psycopg.Connection) -> None:
    """Before any catalog of it is read: an older source lacks columns we read."""
    sentence = too_old_a_source(source)
    if sentence:
        raise ConfigError(sentence)


# -- manifest ----------------------------------------------------------------------------------


def init(settings: Settings, *, keep_schemas: bool = False) -> Manifest:
    """Introspect the source and write the manifest: of the schemas given, else (`keep_schemas`,
    a rewrite for new filters) the manifest's, else every schema of the source."""
    try:
        previous = manifest_io.read_if_present(settings.manifest_path)
    except manifest_io.OtherManifestVersion:
        previous = None  # its settings are not this release's to carry over
    with borrowed(source_url()) as source:
        _refuse_too_old_a_source(source)
        missing = missing_schemas(source, settings.schemas)
        if missing:  # refused before the reviewed manifest is replaced by an empty one
            raise ConfigError(
                f"The source has no schema {', '.join(missing)}; check the names given to "
                "--schemas (its schemas with tables: "
                f"{', '.join(user_schemas(source)) or 'none'})."
            )
        # Schemas given, else those of the manifest rewritten, else every schema of the
        # source, as they are now (a manifest of every schema follows the source's).
        every_schema = not settings.schemas and (
            not (previous and keep_schemas) or previous.every_schema
        )
        schemas = (
            list(settings.schemas)
            or (list(previous.schemas) if previous and keep_schemas and not every_schema else [])
            or user_schemas(source)
        )
        tables = read_tables(source, schemas)
    dotted = sorted({t.schema for t in tables if "." in t.schema})
    if dotted:  # tables are named schema.table everywhere: such a name would be misread
        raise ConfigError(
            f"The source's schema {', '.join(repr(d) for d in dotted)} has a dot in its name, "
            "which this tool cannot tell from schema.table; rename it, or list the schemas "
            "to migrate without it with --schemas."
        )
    base = {
        "schema_mode": settings.schema_mode or (previous.schema_mode if previous else "dump"),
        "alembic_config": _as_stored(settings.alembic_config, settings.manifest_path)
        if settings.alembic_config
        else (previous.alembic_config if previous else None),
        "batch_size": settings.batch_size
        or (previous.batch_size if previous else manifest_io.DEFAULT_BATCH_SIZE),
        "every_schema": every_schema,
    }
    _refuse_alembic_without_config(base["schema_mode"], base["alembic_config"])
    if base["alembic_config"]:
        check_alembic_config(
            manifest_io.beside(settings.manifest_path, str(base["alembic_config"]))
        )
    names = [t.qualified_name for t in tables]
    given = [f"--include {p}" for p in settings.include if not manifest_io.matching(p, names)]
    # A table's own name excluded, misspelt, would migrate the table meant to stay behind; a
    # pattern (`public.tmp_*`) may be there for tables that come and go.
    given += [
        f"--exclude {p}"
        for p in settings.exclude
        if not manifest_io.matching(p, names) and not manifest_io.is_pattern(p)
    ]
    if tables and given:
        raise ConfigError(
            f"{' and '.join(given)} match{'es' if len(given) == 1 else ''} none of the "
            f"source's tables in {', '.join(schemas)}; the patterns match schema.table, as in "
            "public.* or *.audit_log."
        )
    include = settings.include or (previous.include if previous else ())
    exclude = settings.exclude or (previous.exclude if previous else ())
    # What only the manifest holds is kept: the schemas given row level security, and each
    # table's own batch size.
    result = manifest_io.from_catalog(
        tables,
        schemas=schemas,
        include=include,
        exclude=exclude,
        batch_sizes={t.name: t.batch_size for t in previous.tables if t.batch_size}
        if previous
        else None,
        exposed_schemas=previous.exposed_schemas if previous else ("public",),
        **base,
    )
    if tables and not result.tables:
        filters = " ".join(
            [f"--include {p}" for p in include] + [f"--exclude {p}" for p in exclude]
        )
        raise ConfigError(
            f"None of the source's {len(tables)} tables in {', '.join(schemas)} is left by "
            f"{filters}; the patterns match schema.table, as in public.* or *.audit_log."
        )
    manifest_io.write(result, settings.manifest_path)
    return manifest_io.read(settings.manifest_path)


def _as_stored(alembic_config: str, manifest_path: Path) -> str:
    """A path given relative to the working directory, as the manifest keeps it: relative to
    its own directory (`Manifest.alembic_config_path`), so that it still names the file when
    a command runs elsewhere and the manifest is committed with the project."""
    given = Path(alembic_config).expanduser()
    if given.is_absolute():
        return alembic_config
    return os.path.relpath(given.absolute(), manifest_path.absolute().parent)


def check_alembic_config(path: object) -> None:
    """The alembic.ini must exist and parse. A parse error is reported by line number only:
    its text would quote the line, and an alembic.ini's lines hold database URLs."""
    if not path:
        return
    file = Path(str(path)).expanduser()
    missing = f"The Alembic configuration {path} does not exist."
    if not file.is_file():
        raise ConfigError(missing)
    text = read_user_text(file, "The Alembic configuration", missing)
    parser = configparser.ConfigParser(defaults={"here": str(file.parent.absolute())})
    try:
        parser.read_string(text, source=str(file))
        # Interpolation fails on reading, not parsing: Alembic reads its own section so (the
        # logging sections' `%(levelname)s` are read raw, by logging), and sqlalchemy.url is
        # replaced by the target's URL.
        if parser.has_section("alembic"):
            for option in parser.options("alembic"):
                if option != "sqlalchemy.url":
                    parser.get("alembic", option)
    except configparser.Error as exc:
        raise ConfigError(
            f"The Alembic configuration {path} is not a valid ini file "
            f"({_parse_problem(exc)}); fix it as `alembic` itself would need."
        ) from None


def _parse_problem(exc: configparser.Error) -> str:
    """What is wrong and where, without the line's text."""
    if isinstance(exc, configparser.InterpolationError):
        return f"a '%' it cannot interpolate in [{exc.section}] {exc.option}; write it as '%%'"
    what = {
        configparser.MissingSectionHeaderError: "a line before any [section] header",
        configparser.ParsingError: "a line it cannot parse",
        configparser.DuplicateSectionError: "a section given twice",
        configparser.DuplicateOptionError: "an option given twice",
    }.get(type(exc), exc.__class__.__name__)
    lines = [n for n, _ in getattr(exc, "errors", [])] or [getattr(exc, "lineno", None)]
    at = ", ".join(str(n) for n in lines if n is not None)
    return f"{what}, line {at}" if at else what


def tables_left_out(manifest: Manifest) -> list[str]:
    """The source's tables made after `init` that the manifest's filters would take."""
    with borrowed(source_url()) as source:
        return watched_tables_left_out(source, manifest)


def _refuse_alembic_without_config(schema_mode: object, alembic_config: object) -> None:
    if schema_mode == "alembic" and not alembic_config:
        raise ConfigError("Schema mode alembic needs --alembic-config PATH to the alembic.ini.")


def ensure_manifest(settings: Settings, log: Callable[[str], None] = lambda _: None) -> Manifest:
    """The manifest, written first if missing or when filters/settings were passed; `log`
    hears when an existing one (users review and commit it) was changed."""
    existing = manifest_io.read_if_present(settings.manifest_path)
    if existing is None or settings.include or settings.exclude or settings.schemas:
        written = init(settings, keep_schemas=True)
        if existing is not None:  # a file users review and commit: say it changed
            log(
                f"Rewrote {written.path} from the source's catalog with the schemas and "
                f"filters given ({len(written.tables)} tables)."
            )
        elif settings.include or settings.exclude:  # they stay: said once, here
            log(
                f"Wrote {written.path} with the filters given: {len(written.tables)} "
                f"table{'' if len(written.tables) == 1 else 's'}. "
                "Later commands keep to them (its include and exclude lists) until they are "
                "changed there or given again."
            )
        return written
    changes: dict[str, object] = {}
    if settings.batch_size:
        changes["batch_size"] = settings.batch_size
    if settings.schema_mode:
        changes["schema_mode"] = settings.schema_mode
    if settings.alembic_config:
        check_alembic_config(settings.alembic_config)
        changes["alembic_config"] = _as_stored(settings.alembic_config, settings.manifest_path)
    changed = {k: v for k, v in changes.items() if getattr(existing, k) != v}
    _refuse_alembic_without_config(  # before the file is written: it would stick there
        changed.get("schema_mode", existing.schema_mode),
        changed.get("alembic_config", existing.alembic_config),
    )
    if (
        changed.get("schema_mode", existing.schema_mode) == "alembic"
        and not settings.alembic_config
    ):
        check_alembic_config(existing.alembic_config_path)  # as `plan` should say, not the run
    if changed:
        existing = existing.with_settings(**changed)
        manifest_io.write(existing, settings.manifest_path)
        shown = ", ".join(f"{k} {v}" for k, v in changed.items())
        log(f"Updated {settings.manifest_path}: {shown}.")
    return existing
