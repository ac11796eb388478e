"""The one place Dagster definitions are assembled, from `migration.yaml`.

Nothing here touches a database: `dagster dev` must load with the source offline. Without a
manifest the code location still loads, with only the setup assets and a pointer to
`supabase-migrate init`.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from .assets import (
    INDEXES_KEY,
    MATVIEWS_KEY,
    PLAN_KEY,
    SCHEMA_KEY,
    SEQUENCES_KEY,
    build_indexes_asset,
    build_matviews_asset,
    build_plan_asset,
    build_schema_asset,
    build_sequences_asset,
    build_table_asset,
)
from .checks import (
    REPORT_KEY,
    build_all_table_checks,
    build_report_asset,
    build_schema_objects_check,
)
from .manifest import NO_MANIFEST, Manifest, OtherManifestVersion, read_if_present
from .planning import FirstPlansAhead
from .resources import default_resources
from .schema_step import SchemaAhead
from .security import report_findings
from .security_assets import SECURITY_KEY, build_security_asset, build_security_checks


def build_definitions(
    manifest: Manifest | None = None,
    first_plans: FirstPlansAhead | None = None,
    schema_ahead: SchemaAhead | None = None,
) -> dg.Definitions:
    manifest = manifest or NO_MANIFEST
    table_assets = [build_table_asset(manifest, t) for t in manifest.tables]
    assets = [
        build_schema_asset(manifest, schema_ahead),
        build_plan_asset(manifest, first_plans),
        *table_assets,
        build_indexes_asset(manifest),
        build_matviews_asset(manifest),
        build_sequences_asset(manifest),
        build_security_asset(manifest),
        build_report_asset(
            manifest,
            security_findings=report_findings(manifest),
            extra_deps=[MATVIEWS_KEY, SECURITY_KEY],
        ),
    ]
    jobs = [
        dg.define_asset_job(
            "migration_setup",
            selection=dg.AssetSelection.assets(SCHEMA_KEY, PLAN_KEY),
            description="Preflight, schema and plan: run before copying partitions.",
        ),
        dg.define_asset_job(
            "migration_finish",
            selection=dg.AssetSelection.assets(
                INDEXES_KEY, SEQUENCES_KEY, SECURITY_KEY, MATVIEWS_KEY, REPORT_KEY
            ),
            description=(
                "After every partition is copied: deferred indexes, sequences, row level "
                "security and audit, materialized views, then the verification report."
            ),
        ),
        dg.define_asset_job(
            "migration_verify",
            selection=dg.AssetSelection.assets(REPORT_KEY),
            description="Re-run every verification check and rewrite the report.",
        ),
    ]
    checks = [
        *build_all_table_checks(manifest),
        build_schema_objects_check(manifest),
        *build_security_checks(manifest),
    ]
    return dg.Definitions(
        assets=assets, asset_checks=checks, jobs=jobs, resources=default_resources()
    )


def load_definitions(path: Path | None = None) -> dg.Definitions:
    """The definitions of the manifest; of none when another release wrote it (the plan
    asset then says to run `supabase-migrate init`, which writes it anew)."""
    try:
        return build_definitions(read_if_present(path))
    except OtherManifestVersion:
        return build_definitions(None)


defs = load_definitions()
