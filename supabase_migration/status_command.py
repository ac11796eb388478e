"""`supabase-migrate status`: the target's bookkeeping, read without Dagster.

Dagster's import and instance cost about two seconds; a status read is a few queries.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoints, deferred
from . import manifest as manifest_io
from .connections import borrowed
from .inputs import target_url


def status_note(tables: dict[str, dict[str, int]], manifest_path: Path | None) -> str | None:
    """What the partitions' table cannot show: copied tables since dropped on the target by
    hand, steps after the copy not run since it ended, or the manifest's tables on a target
    without bookkeeping."""
    if not tables:
        return unrecorded_note(manifest_path)
    copied = all(not t["pending"] and not t["failed"] for t in tables.values())
    with borrowed(target_url()) as target:
        dropped = checkpoints.dropped_since_copied(target, sorted(tables))
        behind = checkpoints.steps_behind(target) if copied else []
    said = [
        *([checkpoints.dropped_sentence(dropped)] if dropped else []),
        *([checkpoints.steps_behind_sentence(behind)] if behind else []),
    ]
    return " ".join(said) or None


def unrecorded_note(manifest_path: Path | None = None) -> str | None:
    """What to say of a target with the manifest's tables and no bookkeeping, if it is one,
    or of one a run left right after its schema step."""
    manifest = manifest_io.read_if_present(manifest_path)
    if manifest is None:
        return None
    names = [t.name for t in manifest.tables]
    with borrowed(target_url()) as target:
        if checkpoints.stopped_after_schema_step(target):
            return checkpoints.STOPPED_AFTER_SCHEMA_STEP
        found = checkpoints.unrecorded_tables(target, names)
    return checkpoints.unrecorded_sentence(found, len(names)) if found else None


def status() -> dict[str, dict[str, int]]:
    """Partitions by state per table, and indexes still to be built after the load."""
    with borrowed(target_url()) as target:
        if not checkpoints.bookkeeping_exists(target):
            return {}
        tables = checkpoints.summary(target)
        for waiting in deferred.pending(target):
            entry = tables.get(waiting.table_name)
            if entry is not None:
                entry["indexes_waiting"] = entry.get("indexes_waiting", 0) + 1
        return tables
