"""`supabase-migrate verify`: every check, outside any Dagster run.

Dagster is needed only at the end, to put the results on the assets' checks in the UI. Importing
it and opening the instance costs about two seconds of Python, so this module does not import
it: a background thread does, while the databases hash rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import memory
from .connections import borrowed
from .errors import ConfigError
from .inputs import Settings, check_connections, ensure_manifest, source_url, target_url
from .manifest import Manifest
from .report import Report
from .security import report_findings
from .verify import CheckOutcome, refuse_a_target_without_them, run_verification

Recorder = Callable[[Sequence[CheckOutcome], Manifest], None]


def verify(settings: Settings, directory: Path | None, tables: Sequence[str] = ()) -> Report:
    """Run the checks, write the report, and record the results on the assets' checks."""
    check_connections()
    manifest = ensure_manifest(settings)
    unknown = sorted(set(tables) - {t.name for t in manifest.tables})
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} is not in {manifest.path}; see its tables list.")
    with borrowed(target_url()) as target:
        refuse_a_target_without_them(target, list(tables) or [t.name for t in manifest.tables])
    try:
        return _verify_and_record(manifest, settings, directory, tables)
    finally:
        memory.release()  # what the Dagster thread froze (see dagster_recorder)


def _verify_and_record(
    manifest: Manifest, settings: Settings, directory: Path | None, tables: Sequence[str]
) -> Report:
    source, target = source_url(), target_url()
    # One thread imports Dagster and opens the instance, then records each table's results as
    # its checks finish (every event is its own SQLite transaction: a few milliseconds each,
    # 49 for the example app, which would otherwise all wait for the end).
    with ThreadPoolExecutor(1) as dagster:
        recorder = dagster.submit(dagster_recorder)
        recorded: set[str] = set()
        writes: list[Future[None]] = []

        def record(outcomes: Sequence[CheckOutcome]) -> None:
            recorded.update(o.table for o in outcomes)
            writes.append(dagster.submit(lambda: recorder.result()(outcomes, manifest)))

        report = run_verification(
            manifest,
            source,
            target,
            sample_size=settings.sample_size,
            seed=settings.seed,
            security_findings=report_findings(manifest)(source, target),
            tables=tables or None,
            on_table=record,
        )
        record([o for o in report.outcomes if o.table not in recorded])
        report.write(directory)
        for write in writes:
            write.result()
    return report


def dagster_recorder() -> Recorder:
    """Import Dagster and open the DAGSTER_HOME instance; returns what records a report there."""
    with memory.loading_long_lived():
        from .checks import record_check_results
        from .commands import dagster_instance

        instance = dagster_instance()
    return lambda outcomes, manifest: record_check_results(instance, outcomes, manifest)
