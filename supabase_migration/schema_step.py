"""The schema step as one call: preflight, then the schema, then our bookkeeping schema, then
row level security on the exposed tables before any row is copied into them.

Preflight runs before anything is written: an ERROR finding stops the migration with nothing
changed on the target.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psycopg

from .checkpoints import bookkeeping_exists, ensure_bookkeeping, summary
from .connections import borrowed
from .conninfo import DatabaseUrl
from .errors import ConfigError, MigrationError
from .manifest import Manifest
from .preflight import (
    Finding,
    Severity,
    findings_markdown,
    raise_for_errors,
    run_preflight,
    table_mismatches,
)
from .schema_apply import (
    SchemaMode,
    SchemaResult,
    additions_dump_mode_refuses,
    applied_before,
    apply_schema,
    objects_dump_mode_refuses,
    revisions_alembic_mode_refuses,
)
from .security import enable_rls, tables_to_protect, views_to_protect


@dataclass(frozen=True)
class SchemaOutcome:
    result: SchemaResult
    findings: list[Finding]
    protected: list[str] = field(default_factory=list)  # tables given RLS before any copy

    @property
    def findings_markdown(self) -> str:
        return findings_markdown(self.findings)


def preflight(
    manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
) -> list[Finding]:
    with (
        borrowed(source_url) as source,
        borrowed(target_url) as target,
    ):
        findings = run_preflight(
            source,
            target,
            schemas=list(manifest.schemas),
            schema_mode=manifest.schema_mode,
            tables=[t.name for t in manifest.tables],
            manifest=manifest,
        )
        if manifest.schema_mode == SchemaMode.DUMP and not applied_before(target, SchemaMode.DUMP):
            refused = objects_dump_mode_refuses(target, list(manifest.schemas))
            if refused:
                subject = ", ".join(manifest.schemas)
                findings.append(Finding(Severity.ERROR, "target-objects", subject, refused))
        elif manifest.schema_mode == SchemaMode.DUMP:
            tables = [t.name for t in manifest.tables]
            refused = additions_dump_mode_refuses(source, target, manifest.schemas, tables)
            if refused:
                findings.append(Finding(Severity.ERROR, "schema-changed", "tables", refused))
        if manifest.schema_mode == SchemaMode.ALEMBIC:
            config = manifest.alembic_config_path
            refused = revisions_alembic_mode_refuses(source, config, target_url)
            if refused:
                findings.append(Finding(Severity.ERROR, "alembic-revision", "source", refused))
        return findings


def migrate_schema(
    manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
) -> SchemaOutcome:
    findings = preflight(manifest, source_url, target_url)
    raise_for_errors(findings)
    alembic = SchemaMode(manifest.schema_mode) is SchemaMode.ALEMBIC
    # The views the step closes to the API roles are those it makes now: one an earlier run
    # made, and the user opened again, stays as the user left it. Until an Alembic upgrade of
    # ours has completed, though, a view there is one an earlier attempt committed before a
    # later revision failed (an env.py that commits revision by revision), not the user's.
    with borrowed(target_url) as target:
        earlier_views = not alembic or applied_before(target, SchemaMode.ALEMBIC)
        views_before = set(views_to_protect(target, manifest)) if earlier_views else set()
    schemas, tables = list(manifest.schemas), [t.name for t in manifest.tables]

    def fitting(target: psycopg.Connection, stopped: str) -> None:
        """The tables are the migrations', not the source's: a source off head, or changed by
        hand, would otherwise fail its first COPY with "incorrect binary data format"."""
        with borrowed(source_url) as source:
            found = table_mismatches(source, target, schemas=schemas, tables=tables)
        findings.extend(found)
        # `plan` compares no tables in this mode, so the sentence names the other misfits.
        raise_for_errors(found, stopped, plan_lists_them=False)

    protected: list[str] = []

    def protect(target: psycopg.Connection, *, made_now: bool = False) -> None:
        """Supabase's default privileges give anon and authenticated every new table in
        public: without RLS, the REST API would serve each row from the moment it is copied
        until the security step at the end. Default deny from the start (in the schema's own
        transaction, when it made tables); the policies come at the end. The views it makes
        are closed to them there too."""
        actions = enable_rls(
            target,
            tables_to_protect(target, manifest),
            exposed_schemas=manifest.exposed_schemas,
            views=[v for v in views_to_protect(target, manifest) if v not in views_before]
            if made_now
            else (),
        )
        protected.extend(a.subject for a in actions if a.kind == "enable_rls")

    def before_commit(target: psycopg.Connection) -> None:
        if alembic:  # checked inside the upgrade's transaction: a misfit rolls it back
            fitting(
                target,
                "The Alembic upgrade would leave tables the source's rows do not fit, so it "
                "was rolled back",
            )
        try:
            protect(target, made_now=True)
        except MigrationError as exc:  # same kind (a lock timeout stays worth a retry)
            what = "Alembic upgrade" if alembic else "schema"
            raise type(exc)(f"{exc.message.rstrip('.')}; the {what} was rolled back.") from None

    result = apply_schema(
        SchemaMode(manifest.schema_mode),
        source_url=source_url,
        target_url=target_url,
        alembic_config=manifest.alembic_config_path,
        schemas=schemas,
        tables=tables,
        before_commit=before_commit,
    )
    if alembic and not result.checked:
        # Nothing ran to check above: already at the source's revision, or env.py migrated
        # on a connection of its own and committed it.
        at_revision = "The target's tables, at the source's Alembic revision, do not fit its rows"
        with borrowed(target_url) as target:
            if result.changed:  # committed already: closed to the API roles before anything
                protect(target, made_now=True)
            fitting(target, at_revision)
    with borrowed(target_url) as target:
        ensure_bookkeeping(target)
        protect(target)  # tables made earlier, or by the user (mode none); then bookkeeping
    return SchemaOutcome(result=result, findings=findings, protected=protected)


def prepared_for_the_plan(manifest: Manifest, target: psycopg.Connection) -> None:
    """For a plan materialized without this step (the UI allows it): the target must be one
    the step has prepared, whose preflight refused rows this tool did not copy (another
    project's, which a first copy deletes), and each table planned for the first time is
    closed to the API roles now, as the step does before any row is copied."""
    if not bookkeeping_exists(target):
        raise ConfigError(
            "migration/schema has not prepared this target (its preflight checks, row level "
            "security before any row is copied); materialize the migration/schema and "
            "migration/plan assets together (the migration_setup job), or run "
            "`supabase-migrate run`."
        )
    planned = summary(target)
    first = [t.name for t in manifest.tables if t.name not in planned]
    if first:
        enable_rls(target, first, exposed_schemas=manifest.exposed_schemas)


def start_schema_ahead(
    manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
) -> SchemaAhead | None:
    """The schema step started ahead, except in the Alembic mode: that runs the user's env.py,
    which imports their application (and SQLAlchemy, Alembic) while the CLI's main thread is
    importing Dagster's storage, which imports them too; concurrent imports of one package can
    fail on its circular imports, and Alembic's run patches process-wide logging set-up."""
    if SchemaMode(manifest.schema_mode) is SchemaMode.ALEMBIC:
        return None
    return SchemaAhead(manifest, source_url, target_url)


class SchemaAhead:
    """The schema step started by the CLI in a background thread while it opens Dagster.

    Opening the Dagster instance keeps one core busy for 1.5-2 s with both databases idle, and
    the setup run's schema step (preflight, `pg_dump --schema-only`, DDL, 0.4-0.5 s at our
    benchmark's size) then ran alone before any copy could start. The schema asset takes this
    outcome, or raises this error, instead of doing the step again (`take`, once, for the same
    databases), so its run reports it as before. The CLI waits for it before forking its
    workers: no thread may run then. Like the plans read ahead, its connections (one to each
    database) are not counted in Dagster's `supabase_target` pool.
    """

    def __init__(
        self, manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
    ) -> None:
        self._databases = (source_url, target_url)
        self._outcome: SchemaOutcome | None = None
        self._error: Exception | None = None
        self._taken = False
        self._thread = threading.Thread(
            target=self._migrate,
            args=(manifest, source_url, target_url),
            name="schema-ahead",
            daemon=True,
        )
        self._thread.start()

    def _migrate(
        self, manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
    ) -> None:
        try:
            self._outcome = migrate_schema(manifest, source_url, target_url)
        except Exception as exc:  # raised again, in the schema asset's run, by `take`
            self._error = exc

    def wait(self) -> None:
        while self._thread.is_alive():  # a timeout keeps Ctrl-C working while it waits
            self._thread.join(0.2)

    def take(self, source_url: DatabaseUrl, target_url: DatabaseUrl) -> SchemaOutcome | None:
        """The outcome for these databases, once (an error is raised); None otherwise."""
        self.wait()
        if self._taken or (source_url, target_url) != self._databases:
            return None
        self._taken = True
        if self._error is not None:
            raise self._error
        return self._outcome
