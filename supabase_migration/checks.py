"""Asset checks on every table asset, and the `verification_report` asset.

Per table, one `@multi_asset_check` carries the seven checks of `verify.CHECK_NAMES`: one op and
one pair of connections per table, `can_subset=True` so the UI can run any single check, and each
check listed on the table asset with its own status, severity, description and metadata.

Why `checksums_match` is a whole-table check that names mismatched partitions in its metadata,
not a partitioned asset check (`partitions_def=`, preview in 1.13), as measured on 1.13.27:
- a partitioned check records a per-partition result only in a single-partition run; in a
  partition-range run (our backfills run 50 ranges per run) it records one unpartitioned result;
- a job of only partitioned checks cannot be launched with `partition_key=` in process
  ("There is no PartitionsDefinition shared by all the provided assets");
- one run per partition costs ~0.15 s of Dagster overhead each, up to 10,000 per table.
So the check verifies every range in one step (the databases do the hashing) and its metadata
lists `partitions_to_rerun`, ready to paste into a backfill of exactly those partitions.

Note: checks do not run inside the copy runs. The table assets yield `AssetMaterialization`s
with `output_required=False`, so Dagster skips every check step that depends on their output.
Run them from the asset's Checks tab, from a job that selects them, or through
`verification_report`, which runs every check and records the results on the table assets.
"""

# No `from __future__ import annotations` here: dagster 1.13.27 compares the `context`
# annotation by identity, so a string annotation fails with "Cannot annotate `context`".
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
import psycopg
from pydantic import Field

from . import checkpoints
from .assets import (
    GROUP_SETUP,
    KINDS,
    SCHEMA_KEY,
    SEQUENCES_KEY,
    TARGET_POOL,
    cancelling_queries,
    live_tables,
    no_manifest_failure,
    step_failure,
    table_asset_key,
)
from .catalog import needs_bytewise_keys
from .conninfo import DatabaseUrl
from .copy import PLAN_FIRST, CopySession
from .errors import ConfigError, MigrationError, listed
from .manifest import LARGEST_COUNT, NO_MANIFEST, Manifest, ManifestTable
from .report import DEFAULT_REPORT_DIR, REPORT_DIR_ENV, Report, markdown_table, report_dir
from .resources import SourceDatabase, TargetDatabase
from .verify import (
    CHECK_DESCRIPTIONS,
    CHECK_NAMES,
    DEFAULT_SAMPLE_SIZE,
    SCHEMA_OBJECTS,
    CheckOutcome,
    ranges_from_checkpoints,
    read_snapshot,
    refuse_a_target_without_them,
    run_verification,
    schema_objects,
    verify_table,
)

REPORT_KEY = dg.AssetKey(["migration", "verification_report"])
REPORT_CHECK = "verification_passed"
MAX_MD_ROWS = 50

SecurityFindings = Callable[[DatabaseUrl, DatabaseUrl], Sequence[Any]]


class VerifyConfig(dg.Config):
    sample_size: int = Field(
        default=DEFAULT_SAMPLE_SIZE,
        ge=1,
        le=LARGEST_COUNT,
        description="Rows compared column by column per table (at least 1).",
    )
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        le=2**63 - 1,
        description="Sample seed; empty picks a random one (recorded in the results).",
    )


# --- metadata -------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        if "key" in value and "columns" in value:
            return f"{value['key']} ({', '.join(value['columns']) or 'row'})"
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def rows_markdown(rows: Sequence[Mapping[str, Any]], limit: int = MAX_MD_ROWS) -> str:
    """A list of flat-ish dicts as a Markdown table (first `limit` rows)."""
    headers = list(dict.fromkeys(k for row in rows for k in row))
    table = markdown_table(headers, [[_cell(row.get(h)) for h in headers] for row in rows[:limit]])
    more = f"\n\n{len(rows) - limit} more not shown." if len(rows) > limit else ""
    return table + more


def outcome_metadata(outcome: CheckOutcome) -> dict[str, dg.MetadataValue]:
    """Details as metadata the UI renders well: ints, text, Markdown tables."""
    metadata: dict[str, dg.MetadataValue] = {
        "duration_s": dg.MetadataValue.float(round(outcome.duration_s, 3)),
    }
    for key, value in outcome.details.items():
        if isinstance(value, bool):
            metadata[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            metadata[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            metadata[key] = dg.MetadataValue.float(value)
        elif isinstance(value, str):
            metadata[key] = dg.MetadataValue.text(value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            metadata[key] = dg.MetadataValue.md(rows_markdown(value))
        elif isinstance(value, list):
            metadata[key] = dg.MetadataValue.text(", ".join(map(str, value)) or "none")
        elif value is not None:
            metadata[key] = dg.MetadataValue.json(value)
    return metadata


def check_result(outcome: CheckOutcome, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=outcome.name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity(outcome.severity),
        description=outcome.description,
        metadata=outcome_metadata(outcome),
    )


def check_evaluation(
    outcome: CheckOutcome, asset_key: dg.AssetKey | None = None
) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=asset_key or table_asset_key(outcome.table),
        check_name=outcome.name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity(outcome.severity),
        description=outcome.description,
        metadata=outcome_metadata(outcome),
    )


def record_check_results(
    instance: dg.DagsterInstance, outcomes: Sequence[CheckOutcome], manifest: Manifest
) -> int:
    """Show a verification's results on the table assets' checks (runless events).

    Lets `verification_report` and `supabase-migrate verify` refresh every table's check status
    in the UI without running the checks a second time. Returns how many were recorded.
    """
    known = {t.name for t in manifest.tables}
    recorded = 0
    for outcome in outcomes:
        if outcome.name == SCHEMA_OBJECTS:
            instance.report_runless_asset_event(check_evaluation(outcome, SCHEMA_KEY))
            recorded += 1
        elif outcome.table in known and outcome.name in CHECK_NAMES:
            instance.report_runless_asset_event(check_evaluation(outcome))
            recorded += 1
    return recorded


# --- per-table checks ---------------------------------------------------------------------


def check_specs(entry: ManifestTable) -> list[dg.AssetCheckSpec]:
    asset_key = table_asset_key(entry.name)
    return [
        dg.AssetCheckSpec(name, asset=asset_key, description=CHECK_DESCRIPTIONS[name])
        for name in CHECK_NAMES
    ]


def build_table_checks(manifest: Manifest, entry: ManifestTable) -> list[dg.AssetChecksDefinition]:
    """The seven checks of one table asset, as one subsettable multi-asset check."""
    asset_key = table_asset_key(entry.name)

    @dg.multi_asset_check(
        specs=check_specs(entry),
        name="verify__" + "__".join(asset_key.path),
        description=f"Verify {entry.name} on the target against the source.",
        can_subset=True,
    )
    @cancelling_queries
    def table_checks(
        context: dg.AssetCheckExecutionContext,
        config: VerifyConfig,
        source: SourceDatabase,
        target: TargetDatabase,
    ) -> Iterator[dg.AssetCheckResult]:
        selected = [k.name for k in context.selected_asset_check_keys]
        try:
            with CopySession(
                source.database_url(), target.database_url(), log=context.log.warning
            ) as session:
                if not checkpoints.planned_among(session.target, [entry.name]):
                    # Its partitions, which a failure names to re-run, do not exist yet.
                    raise ConfigError(f"No run has planned {entry.name} yet; {PLAN_FIRST}")
                with read_snapshot(session.source), read_snapshot(session.target):
                    table = live_tables(session.source, [entry.name])[entry.name]
                    collate_c = needs_bytewise_keys(session.source, session.target)
                outcomes = verify_table(
                    lambda: session.source,
                    lambda: session.target,
                    table,
                    lambda: ranges_from_checkpoints(session.target, table),
                    checks=selected,
                    sample_size=config.sample_size,
                    seed=config.seed,
                    collate_c=collate_c,
                )
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        for outcome in outcomes:
            yield check_result(outcome, asset_key)

    return [table_checks]


def build_all_table_checks(manifest: Manifest) -> list[dg.AssetChecksDefinition]:
    return [c for entry in manifest.tables for c in build_table_checks(manifest, entry)]


def build_schema_objects_check(manifest: Manifest) -> dg.AssetChecksDefinition:
    """The schema asset's check; `verify` and the report record its result here too. Not
    run by the CLI's setup run (it materializes the assets alone): every verification does."""

    @dg.asset_check(
        asset=SCHEMA_KEY,
        name=SCHEMA_OBJECTS,
        blocking=False,
        description=(
            "The views, rules, functions, procedures, aggregates and types (enums, domains, "
            "composite and range types) of the migrated schemas agree by name and definition, "
            "extensions' left out; definitions are compared, never shown."
        ),
    )
    @cancelling_queries
    def schema_objects_match(source: SourceDatabase, target: TargetDatabase) -> dg.AssetCheckResult:
        if manifest is NO_MANIFEST:
            raise no_manifest_failure()
        try:
            with source.connection() as s, target.connection() as t:
                outcome = schema_objects(s, t, manifest.schemas)
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        return check_result(outcome, SCHEMA_KEY)

    return schema_objects_match


# --- the report asset ---------------------------------------------------------------------


def build_report_asset(
    manifest: Manifest,
    *,
    security_findings: SecurityFindings | None = None,
    record_table_checks: bool = True,
    extra_deps: Sequence[dg.AssetKey] = (),
) -> dg.AssetsDefinition:
    """`migration/verification_report`: every check, one PASS/FAIL document, HTML + JSON files.

    `security_findings(source_url, target_url)` supplies findings for the report (issue 7).
    """
    deps = [table_asset_key(t.name) for t in manifest.tables] + [SEQUENCES_KEY, *extra_deps]

    @dg.asset(
        key=REPORT_KEY,
        deps=deps,
        group_name=GROUP_SETUP,
        kinds=KINDS,
        description=(
            "Every verification check on every table (counts, checksums per range, a seeded "
            "sample, indexes, constraints, foreign keys, sequences) and the security findings, "
            f"gathered into one PASS/FAIL report; HTML, JSON and Markdown files are written to "
            f"${REPORT_DIR_ENV} (default ./{DEFAULT_REPORT_DIR})."
        ),
        pool=TARGET_POOL,  # no retry policy: a retry would hash every row again
        check_specs=[
            dg.AssetCheckSpec(
                REPORT_CHECK,
                asset=REPORT_KEY,
                description="No ERROR check failed and no error/critical security finding.",
            )
        ],
    )
    @cancelling_queries
    def verification_report(
        context: dg.AssetExecutionContext,
        config: VerifyConfig,
        source: SourceDatabase,
        target: TargetDatabase,
    ) -> dg.MaterializeResult:
        if manifest is NO_MANIFEST:  # a report of no tables would be no proof of anything
            raise no_manifest_failure()
        try:
            with target.connection() as t:  # before the report files are written over
                refuse_a_target_without_them(t, [m.name for m in manifest.tables])
            source_url, target_url = source.database_url(), target.database_url()
            findings = security_findings(source_url, target_url) if security_findings else ()
            report = run_verification(
                manifest,
                source_url,
                target_url,
                sample_size=config.sample_size,
                seed=config.seed,
                run_id=context.run.run_id,
                security_findings=findings,
                log=context.log.info,
            )
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        try:
            paths = report.write(report_dir())
        except MigrationError as exc:
            raise step_failure(exc) from None
        if record_table_checks:
            record_check_results(context.instance, report.outcomes, manifest)
        return dg.MaterializeResult(
            metadata=report_metadata(report, paths),
            check_results=[
                dg.AssetCheckResult(
                    check_name=REPORT_CHECK,
                    passed=report.passed,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=_report_sentence(report),
                    metadata={
                        "failed_error": len(report.error_failures),
                        "failed_warn": len(report.warnings),
                    },
                )
            ],
        )

    return verification_report


def _report_sentence(report: Report) -> str:
    """The report's check in the UI: what failed by check and table, and the way on there."""
    failed = [f"{o.name} of {o.table}" for o in report.error_failures]
    which = f" ({listed(failed, 5)})" if failed else ""
    rerun = any(o.details.get("partitions_to_rerun") for o in report.error_failures)
    way = (
        "; the tables' own checks name the partitions to re-run, and a backfill of those "
        "partitions with config resync: true re-syncs them"
        if rerun
        else ""
    )
    return (
        f"{report.status}: {len(report.error_failures)} ERROR check(s) failed{which}, "
        f"{len(report.warnings)} warning(s){way}."
    )


def report_metadata(report: Report, paths: Mapping[str, Any]) -> dict[str, Any]:
    summaries = report.table_summaries()
    return {
        "status": report.status,
        "passed": report.passed,
        "tables": len(summaries),
        "checks": len(report.outcomes),
        "failed_error": len(report.error_failures),
        "failed_warn": len(report.warnings),
        "security_findings": len(report.security_findings),
        "source_rows": sum(s.source_rows or 0 for s in summaries),
        "target_rows": sum(s.target_rows or 0 for s in summaries),
        "ranges_verified": sum(s.ranges_verified or 0 for s in summaries),
        "sample_seed": report.seed if report.seed is not None else -1,
        "duration_s": round(report.duration_s, 3),
        "report": dg.MetadataValue.md(report.to_markdown()),
        "html_report": dg.MetadataValue.path(str(paths["html"])),
        "json_report": dg.MetadataValue.path(str(paths["json"])),
    }


__all__ = [
    "REPORT_CHECK",
    "REPORT_KEY",
    "VerifyConfig",
    "build_all_table_checks",
    "build_report_asset",
    "build_table_checks",
    "check_specs",
    "outcome_metadata",
    "record_check_results",
    "run_verification",
]
