"""The Dagster layer of the security step: the `migration/security` asset and its checks.

The asset runs after every table and the sequences are loaded: RLS on every migrated table in
an exposed schema (plus user policies, applied once), pgaudit where the target has it, and the
audit trail as metadata. The checks re-read the target, so they also catch a table someone
created or altered later. Metadata holds names, counts and digests only: no URL, no password,
no policy text, no row value.

No `from __future__ import annotations` here: Dagster reads the `config` parameter's annotation
as an object, and a string annotation fails to resolve ("SecurityConfig cannot be resolved").
"""

import os
from pathlib import Path

import dagster as dg
import psycopg
from pydantic import Field

from . import checkpoints
from .assets import (
    SECURITY_KEY,
    SEQUENCES_KEY,
    setup_asset,
    step_failure,
    table_asset_key,
)
from .errors import MigrationError
from .manifest import Manifest
from .resources import TargetDatabase
from .security import (
    EXTENSION_TABLE,
    audit_trail_markdown,
    configure_pgaudit,
    enable_rls,
    migration_audit_trail,
    policy_digest,
    read_policy_file,
    rls_markdown,
    rls_status,
    session_encryption,
    tables_to_protect,
    unencrypted_sessions,
    unprotected,
)

POLICY_FILE_ENV = "SUPABASE_MIGRATION_POLICY_FILE"


class SecurityConfig(dg.Config):
    policy_file: str | None = Field(
        default=None,
        description=(
            "SQL file of RLS policies, applied once per content (sha256). Overrides "
            f"${POLICY_FILE_ENV}. Write it re-runnable: DROP POLICY IF EXISTS + CREATE POLICY."
        ),
    )
    pgaudit: bool = Field(
        default=True,
        description="Configure pgaudit object auditing of the migrated tables when available.",
    )


def resolve_policy_file(configured: str | None) -> Path | None:
    """The run config's path wins over the environment variable; neither means no policies."""
    chosen = configured or os.environ.get(POLICY_FILE_ENV) or None
    return Path(chosen).expanduser() if chosen else None


def build_security_asset(manifest: Manifest) -> dg.AssetsDefinition:
    deps = [table_asset_key(t.name) for t in manifest.tables] + [SEQUENCES_KEY]
    tables = [t.name for t in manifest.tables]
    exposed = ", ".join(manifest.exposed_schemas)

    @setup_asset(
        manifest,
        key=SECURITY_KEY,
        deps=deps,
        description=(
            f"Row level security on every migrated table in the exposed schemas ({exposed}): "
            "default deny for anon/authenticated unless policies are supplied, service_role "
            "unaffected; bookkeeping schema closed to the API roles; pgaudit object auditing "
            "of the migrated tables where the target has pgaudit."
        ),
    )
    def security(
        context: dg.AssetExecutionContext, config: SecurityConfig, target: TargetDatabase
    ) -> dg.MaterializeResult:
        policy_path = resolve_policy_file(config.policy_file)
        try:
            policy_sql = read_policy_file(policy_path) if policy_path else None
            with target.connection() as conn:
                actions = enable_rls(
                    conn,
                    tables_to_protect(conn, manifest),
                    exposed_schemas=manifest.exposed_schemas,
                    policy_sql=policy_sql,
                    policy_source=policy_path.name if policy_path else None,
                    run_id=context.run.run_id,
                )
                audit = configure_pgaudit(conn, tables) if config.pgaudit else None
                status = rls_status(conn, manifest.exposed_schemas)
                trail = migration_audit_trail(conn)
                checkpoints.record_step(conn, checkpoints.SECURITY_STEP, context.run.run_id)
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        if audit is not None and not audit.configured:
            context.log.warning(audit.message)
        for action in actions:
            if action.kind in {"missing", "service_role_no_bypassrls"}:
                context.log.warning(f"{action.subject}: {action.detail}")
        policy_action = next(
            (a for a in actions if a.kind in {"apply_policies", "policies_unchanged"}), None
        )
        metadata: dict[str, dg.RawMetadataValue] = {
            "exposed_schemas": exposed,
            "exposed_tables": len(status),
            "rls_enabled": sum(1 for t in status if t.rls_enabled),
            "rls_missing": sum(1 for t in status if not t.rls_enabled),
            "rls_enabled_now": sum(1 for a in actions if a.kind == "enable_rls"),
            "rls": dg.MetadataValue.md(rls_markdown(status)),
            "policies": (
                f"{policy_action.kind} {policy_action.subject}"
                if policy_action
                else "none supplied"
            ),
            "pgaudit": dg.MetadataValue.md(
                audit.markdown() if audit else "Skipped (pgaudit: false in the run config)."
            ),
            "pgaudit_configured": bool(audit and audit.configured),
            "audit_trail": dg.MetadataValue.md(audit_trail_markdown(trail)),
            "runs_in_audit_trail": len(trail),
        }
        if policy_sql is not None:
            metadata["policy_sha256"] = policy_digest(policy_sql)
        return dg.MaterializeResult(metadata=metadata)

    return security


def build_security_checks(manifest: Manifest) -> list[dg.AssetChecksDefinition]:
    exposed = tuple(manifest.exposed_schemas)

    @dg.asset_check(
        asset=SECURITY_KEY,
        name="rls_enabled",
        # Not blocking: the verification report downstream names the same tables and fails
        # on them; skipping it would hide every other result of the run's end from the UI.
        blocking=False,
        description=(
            "Every table in the exposed schemas has row level security enabled (Supabase "
            "linter 0013 rls_disabled_in_public)."
        ),
    )
    def rls_enabled(target: TargetDatabase) -> dg.AssetCheckResult:
        try:
            with target.connection() as conn:
                status = rls_status(conn, exposed)
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        missing = [t.name for t in status if not t.rls_enabled and not t.extension]
        extensions = [t for t in status if not t.rls_enabled and t.extension]
        metadata: dict[str, dg.RawMetadataValue] = {
            "exposed_tables": len(status),
            "without_rls": len(missing) + len(extensions),
            "rls": dg.MetadataValue.md(rls_markdown(status)),
        }
        if missing:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=(
                    f"rls_disabled_in_public: {len(missing)} exposed table(s) without row level "
                    f"security, readable through the Supabase API: {', '.join(missing)}."
                ),
                metadata=metadata,
            )
        if extensions:  # not the migration's data, and not for it to alter: a warning
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{EXTENSION_TABLE}: " + " ".join(map(unprotected, extensions)),
                metadata=metadata,
            )
        return dg.AssetCheckResult(
            passed=True,
            description=f"All {len(status)} table(s) in {', '.join(exposed)} have RLS enabled.",
            metadata=metadata,
        )

    @dg.asset_check(
        asset=SECURITY_KEY,
        name="connection_encrypted",
        description=(
            "The migration's own session to the target is TLS, confirmed by libpq and by the "
            "server (pg_stat_ssl); no other session of the tool reached it unencrypted."
        ),
    )
    def connection_encrypted(target: TargetDatabase) -> dg.AssetCheckResult:
        try:
            url = target.database_url()
            with target.connection() as conn:
                enc = session_encryption(conn)
                others = unencrypted_sessions(conn, url.application_name)
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        metadata: dict[str, dg.RawMetadataValue] = {
            "target": url.describe(),
            "client_tls": enc.client_tls,
            "server_ssl": "unknown" if enc.server_ssl is None else enc.server_ssl,
            "protocol": enc.protocol or "",
            "cipher": enc.cipher or "",
            "unencrypted_tool_sessions": others,
        }
        if others:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=(
                    f"{others} other session(s) of the tool reached the target over the network "
                    "without TLS."
                ),
                metadata=metadata,
            )
        if enc.encrypted:
            return dg.AssetCheckResult(
                passed=True,
                description=f"Encrypted ({enc.protocol}), confirmed by the server.",
                metadata=metadata,
            )
        if not enc.client_tls and url.is_loopback:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=(
                    "Not encrypted, but the target is on this machine (loopback), as in the "
                    "local demo; a real target must use SSL."
                ),
                metadata=metadata,
            )
        if enc.client_tls:
            # Our socket is TLS; the server sees a pooler's (or proxy's) onward link.
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=(
                    "Our link is TLS but the server reports this session "
                    + ("as unencrypted" if enc.server_ssl is False else "without SSL details")
                    + f", so a pooler or proxy forwards it ({url.endpoint.display_name} "
                    "endpoint); use the direct host to confirm end to end."
                ),
                metadata=metadata,
            )
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"The session to the {url.describe()} is not encrypted; use "
                "sslmode=verify-full and enforce SSL on the project."
            ),
            metadata=metadata,
        )

    return [rls_enabled, connection_encrypted]
