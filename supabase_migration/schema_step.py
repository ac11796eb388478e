"""The schema step as one call: preflight, then the schema, then our bookkeeping schema.

Preflight runs before anything is written: an ERROR finding stops the migration with nothing
changed on the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import ensure_bookkeeping
from .connections import connect
from .conninfo import DatabaseUrl
from .manifest import Manifest
from .preflight import Finding, findings_markdown, raise_for_errors, run_preflight
from .schema_apply import SchemaMode, SchemaResult, apply_schema


@dataclass(frozen=True)
class SchemaOutcome:
    result: SchemaResult
    findings: list[Finding]

    @property
    def findings_markdown(self) -> str:
        return findings_markdown(self.findings)


def preflight(
    manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
) -> list[Finding]:
    with (
        connect(source_url, autocommit=True) as source,
        connect(target_url, autocommit=True) as target,
    ):
        return run_preflight(source, target, schemas=list(manifest.schemas))


def migrate_schema(
    manifest: Manifest, source_url: DatabaseUrl, target_url: DatabaseUrl
) -> SchemaOutcome:
    findings = preflight(manifest, source_url, target_url)
    raise_for_errors(findings)
    alembic_config = Path(manifest.alembic_config) if manifest.alembic_config else None
    result = apply_schema(
        SchemaMode(manifest.schema_mode),
        source_url=source_url,
        target_url=target_url,
        alembic_config=alembic_config,
        schemas=list(manifest.schemas),
    )
    with connect(target_url, autocommit=True) as target:
        ensure_bookkeeping(target)
    return SchemaOutcome(result=result, findings=findings)
