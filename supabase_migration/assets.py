"""The software-defined assets: schema -> plan -> one partitioned asset per table -> sequences.

Bodies are thin: they open connections through the resources, call the core and turn results
into metadata. Every `MigrationError` becomes a `dg.Failure` carrying its one PHI-free sentence,
retryable only when the cause was transient.
"""

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import dagster as dg
import psycopg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._utils.error import SerializableErrorInfo
from psycopg import errors as pg_errors
from pydantic import Field

from . import checkpoints, deferred, matviews
from .catalog import (
    TableInfo,
    columns_the_target_lacks,
    has_write_rules,
    needs_bytewise_keys,
    read_tables,
    referenced,
)
from .connections import (
    ServerUnreachable,
    database_error_exit_code,
    is_transient,
    retrying,
    side_by_side,
)
from .copy import PLAN_FIRST, CopyOptions, CopySession, RangeResult, replica_mode_allowed
from .errors import (
    ConcurrentRunError,
    ConfigError,
    MigrationError,
    TransientError,
    UniqueCollision,
    listed,
)
from .manifest import MANIFEST_ENV, NO_MANIFEST, Manifest, ManifestTable, default_path
from .planning import (
    MAX_PARTITIONS_PER_TABLE,
    FirstPlansAhead,
    TablePlan,
    plan_tables,
    refresh_plan,
)
from .ranges import KeyRange
from .redaction import describe_pg_error
from .report import markdown_table
from .resources import SourceDatabase, TargetDatabase
from .schema_step import SchemaAhead, migrate_schema, prepared_for_the_plan
from .sequences import sync_sequences

# backfill_policy and pool are marked beta/preview; the warnings would bury real output.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

GROUP_SETUP = "migration"
GROUP_TABLES = "tables"
SCHEMA_KEY = dg.AssetKey(["migration", "schema"])
PLAN_KEY = dg.AssetKey(["migration", "plan"])
INDEXES_KEY = dg.AssetKey(["migration", "deferred_indexes"])
SEQUENCES_KEY = dg.AssetKey(["migration", "sequences"])
MATVIEWS_KEY = dg.AssetKey(["migration", "materialized_views"])
SECURITY_KEY = dg.AssetKey(["migration", "security"])  # its asset: security_assets
TARGET_POOL = "supabase_target"
KINDS = {"postgres", "supabase"}

# Ranges per run in a backfill: large enough that Dagster's per-run cost (~0.2 s) stays small
# against copy time, small enough that one run's failure leaves little to redo.
PARTITIONS_PER_RUN = 50
# The CLI's runs carry its process id and command (see commands.launch_run).
PID_TAG = "supabase_migration/pid"
COMMAND_TAG = "supabase_migration/command"


def started_by_the_cli(run: dg.DagsterRun) -> bool:
    """A run the CLI launched. Re-executed in the UI, a CLI run's tags are inherited: the
    new run is the UI's, and the PID it carries is the CLI's, long gone."""
    return COMMAND_TAG in run.tags and run.parent_run_id is None


COPY_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
# The one-off steps (schema, plan, indexes, sequences, security) are each one transaction or
# idempotent, and short: a transient failure (a restart, a pooler hiccup) is tried again. So is
# an unexpected error, at the cost of a few seconds. Not the verification report: it hashes
# every row, and `verify` is there to run it again.
SETUP_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def _safe(part: str) -> str:
    """Asset key parts allow [A-Za-z0-9_]; other names get a short stable hash suffix. So does
    a name holding "__", which Dagster joins key parts with (op and input names, and ours for
    partitions): schema a__b's table c and schema a's table b__c would be one name."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", part)
    return _suffixed(cleaned, part) if cleaned != part or "__" in part else cleaned


def _suffixed(part: str, name: str) -> str:
    return part + "_" + hashlib.sha1(name.encode()).hexdigest()[:6]


def table_asset_key(name: str) -> dg.AssetKey:
    """[schema, table]; a schema named like our own assets' prefix (`migration`) gets a hash
    suffix, or its table `plan` would be the plan asset."""
    schema, table = name.split(".", 1)
    schema_part = _safe(schema)
    if schema_part == GROUP_SETUP:
        schema_part = _suffixed(schema_part, schema)
    return dg.AssetKey([schema_part, _safe(table)])


def partitions_def_name(name: str) -> str:
    return "ranges__" + "__".join(table_asset_key(name).path)


def partitions_def_for(name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=partitions_def_name(name))


EXIT_CODE_METADATA = "exit_code"
INTERRUPTED_METADATA = "interrupted"
_INTERRUPTS = {"DagsterExecutionInterruptedError", "KeyboardInterrupt"}


Body = TypeVar("Body", bound=Callable[..., Any])


def interruptible(body: Body) -> Body:
    """For every asset body of ours: a Ctrl-C (or the UI's terminate) stops the step for good.

    Dagster retries an interrupted step that has a retry policy, as if a machine had gone
    away; a person who pressed Ctrl-C wants the migration to stop (our runs execute in the
    CLI's processes or under `dagster dev`, where no machine goes away). A retried attempt
    fails at once when its step's latest attempt was interrupted: Dagster's record of the
    error says so, or, when DAGSTER_REDACT_USER_CODE_ERRORS masks that record, the run tag
    this wrapper sets as the interrupt passes through the body. (An interrupt Dagster raises
    between two of a table run's ranges, while it records the first, does not pass through
    the body: with redaction on, that attempt is retried. The CLI's workers end with the CLI
    anyway.) Dagster reads the body's signature through the wrapper (`functools.wraps`).

    While the body's own code runs, Ctrl-C raises KeyboardInterrupt instead of Dagster's
    DagsterExecutionInterruptedError (Dagster takes both for an interrupt): psycopg cancels
    the query it waits on for the first only, and a query left running fails the rollback
    after it with a database error, which the body reported as its own failure (retried, the
    interrupt lost: a deferred index was built again after Ctrl-C). Dagster sets its handler
    again each time it resumes a generator, so a generator's is set for each stretch."""

    cancelling = cancelling_queries(body)
    if inspect.isgeneratorfunction(body):

        @functools.wraps(body)
        def steps(context: dg.AssetExecutionContext, *args: Any, **kwargs: Any) -> Iterator[Any]:
            stop_after_interrupt(context)
            with _noting_interrupts(context):
                yield from cancelling(context, *args, **kwargs)

        return cast(Body, steps)

    @functools.wraps(body)
    def step(context: dg.AssetExecutionContext, *args: Any, **kwargs: Any) -> Any:
        stop_after_interrupt(context)
        with _noting_interrupts(context):
            return cancelling(context, *args, **kwargs)

    return cast(Body, step)


def cancelling_queries(body: Body) -> Body:
    """The body's own code, asset or check, takes Ctrl-C (and a SIGTERM Dagster made an
    interrupt) as KeyboardInterrupt, so that psycopg cancels the query it waits on (see
    `interruptible`)."""
    if inspect.isgeneratorfunction(body):

        @functools.wraps(body)
        def steps(*args: Any, **kwargs: Any) -> Iterator[Any]:
            yield from _stretches_raising_keyboard_interrupt(body(*args, **kwargs))

        return cast(Body, steps)

    @functools.wraps(body)
    def step(*args: Any, **kwargs: Any) -> Any:
        with _raising_keyboard_interrupt():
            return body(*args, **kwargs)

    return cast(Body, step)


# Set when the CLI that started this worker is stopping (`commands._worker_init` puts the
# pool's event here; never set elsewhere). A table run looks between two ranges: a Ctrl-C or
# SIGTERM that reached the CLI alone then ends the run at the next range, instead of its
# copying on until the CLI kills the worker.
cli_stopping: Any = threading.Event()


def _stretches_raising_keyboard_interrupt(body: Iterator[Any]) -> Iterator[Any]:
    try:
        while True:
            with _raising_keyboard_interrupt():
                if cli_stopping.is_set():
                    raise KeyboardInterrupt
                try:
                    item = next(body)
                except StopIteration:
                    return
            yield item
    finally:
        body.close()


@contextlib.contextmanager
def _raising_keyboard_interrupt() -> Iterator[None]:
    """Python's own SIGINT handler inside the block, and on SIGTERM where Dagster made it an
    interrupt too (only the main thread may set handlers; one not set from Python, the
    default or an ignored signal is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        number: handler
        for number in (signal.SIGINT, signal.SIGTERM)
        if callable(handler := signal.getsignal(number))
    }
    for number in previous:
        signal.signal(number, signal.default_int_handler)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def setup_asset(manifest: Manifest, **asset_args: Any) -> Callable[[Body], dg.AssetsDefinition]:
    """`dg.asset` for the one-off steps (schema, plan, indexes, sequences, security): in the
    migration group, on the target's pool, retried by SETUP_RETRY_POLICY, stopped for good by
    Ctrl-C (`interruptible`). Without a manifest (`NO_MANIFEST`) each refuses in one sentence:
    the stand-in's defaults (schema public, dump mode) are nobody's choice."""

    def decorate(body: Body) -> dg.AssetsDefinition:
        return dg.asset(
            group_name=GROUP_SETUP,
            kinds=KINDS,
            pool=TARGET_POOL,
            retry_policy=SETUP_RETRY_POLICY,
            **asset_args,
        )(interruptible(_needing_a_manifest(body) if manifest is NO_MANIFEST else body))

    return decorate


def _needing_a_manifest(body: Body) -> Body:
    @functools.wraps(body)
    def refuse(context: dg.AssetExecutionContext, *args: Any, **kwargs: Any) -> Any:
        raise no_manifest_failure()

    return cast(Body, refuse)


def no_manifest_failure() -> dg.Failure:
    """What an asset built from `NO_MANIFEST` says instead of running."""
    return dg.Failure(
        description=(
            f"There is no manifest this release reads at {default_path()}, so there is "
            "nothing to migrate; run `supabase-migrate init` to write it (or set "
            f"{MANIFEST_ENV} to its path), then reload the code location."
        ),
        allow_retries=False,
    )


def _interrupted_tag(context: dg.AssetExecutionContext) -> str:
    step = re.sub(r"[^A-Za-z0-9_.-]", "_", str(context.op_execution_context.op_handle))
    return f"supabase_migration/interrupted.{step}"[:255]


@contextlib.contextmanager
def _noting_interrupts(context: dg.AssetExecutionContext) -> Iterator[None]:
    try:
        yield
    except (KeyboardInterrupt, DagsterExecutionInterruptedError):
        with contextlib.suppress(Exception):  # a second Ctrl-C, a locked SQLite: Dagster's own
            run_id = context.run.run_id  # as the value: a re-execution copies the tags
            context.instance.add_run_tags(run_id, {_interrupted_tag(context): run_id})
        raise


def stop_after_interrupt(context: dg.AssetExecutionContext) -> None:
    """Fail for good, on a retried attempt, when the step's latest attempt was interrupted."""
    if not context.retry_number:
        return
    step = str(context.op_execution_context.op_handle)
    retries = [
        entry.dagster_event
        for entry in context.instance.all_logs(
            context.run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
        )
        if entry.dagster_event is not None and entry.dagster_event.step_key == step
    ]
    run = context.instance.get_run_by_id(context.run.run_id)
    tagged = run is not None and run.tags.get(_interrupted_tag(context)) == run.run_id
    if tagged or (retries and is_interruption(retries[-1].event_specific_data.error)):
        raise dg.Failure(
            description="Interrupted (Ctrl-C, or the run was terminated).",
            allow_retries=False,
            metadata={INTERRUPTED_METADATA: True},
        )


def is_interruption(error: SerializableErrorInfo | None) -> bool:
    """Whether a step's error, or any error it was raised from, is Ctrl-C (as Dagster saw it)."""
    while error is not None:
        if error.cls_name in _INTERRUPTS:
            return True
        error = error.cause
    return False


def step_failure(exc: MigrationError | psycopg.Error) -> dg.Failure:
    """The sentence for the UI; the exit code lets the CLI tell bad input (2) from failure (1).
    Asset and check bodies raise their errors through this; a table run whose ranges failed
    builds its own (exit code 1: the failed ranges are listed, and a backfill retries them)."""
    if isinstance(exc, psycopg.Error):  # unexpected here: never its raw text (DETAIL has values)
        return dg.Failure(
            description=describe_pg_error(exc) + ".",
            allow_retries=is_transient(exc),
            metadata={EXIT_CODE_METADATA: database_error_exit_code(exc)},
        )
    return dg.Failure(
        description=exc.message,
        allow_retries=isinstance(exc, TransientError),
        metadata={EXIT_CODE_METADATA: exc.exit_code},
    )


class TableCopyConfig(dg.Config):
    resync: bool = Field(
        default=False,
        description=(
            "Re-sync every selected range, completed or not, whatever its source checksum says "
            "(the repair of rows changed on the target, as `supabase-migrate run --repair`). "
            "Off, a completed range whose source is unchanged is skipped after one checksum "
            "on the source (as `supabase-migrate run`): a backfill of every partition copies "
            "only what is missing, failed or changed."
        ),
    )


def build_schema_asset(manifest: Manifest, ahead: SchemaAhead | None = None) -> dg.AssetsDefinition:
    """`ahead`: the schema step the CLI started before this asset's run (see schema_step)."""

    @setup_asset(
        manifest,
        key=SCHEMA_KEY,
        description=(
            "Preflight, then the schema on the target (Alembic upgrade head, pg_dump schema copy, "
            "or none) and the supabase_migration bookkeeping schema."
        ),
    )
    def schema(
        context: dg.AssetExecutionContext, source: SourceDatabase, target: TargetDatabase
    ) -> dg.MaterializeResult:
        try:
            source_url, target_url = source.database_url(), target.database_url()
            outcome = ahead.take(source_url, target_url) if ahead else None
            started_before_run = outcome is not None
            if outcome is None:
                outcome = migrate_schema(manifest, source_url, target_url)
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        metadata = {k: v for k, v in outcome.result.metadata().items() if v is not None}
        # The CLI starts the step while it opens Dagster; this run then reports what it did.
        metadata["started_before_run"] = started_before_run
        metadata["preflight"] = dg.MetadataValue.md(outcome.findings_markdown)
        metadata["findings"] = len(outcome.findings)
        metadata["rls_enabled_before_copy"] = len(outcome.protected)
        return dg.MaterializeResult(metadata=metadata)

    return schema


def build_plan_asset(
    manifest: Manifest, ahead: FirstPlansAhead | None = None
) -> dg.AssetsDefinition:
    """`ahead`: first plans the CLI started reading before this asset's run (see planning)."""
    description = (
        "Split every table into key ranges, write pending checkpoints, register partitions."
    )
    if not manifest.tables:
        description += " No tables yet: run `supabase-migrate init` to write migration.yaml."

    @setup_asset(
        manifest,
        key=PLAN_KEY,
        deps=[SCHEMA_KEY],
        description=description,
    )
    def plan(
        context: dg.AssetExecutionContext, source: SourceDatabase, target: TargetDatabase
    ) -> dg.MaterializeResult:
        try:
            if SCHEMA_KEY not in context.selected_asset_keys:
                with target.connection() as t:
                    prepared_for_the_plan(manifest, t)
            plans = plan_all(
                manifest, source, target, context.instance, log=context.log.warning, ahead=ahead
            )
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        rows = [
            [p.table, p.key_kind, p.ranges, p.new_ranges, p.completed, p.deferred_indexes, p.note]
            for p in plans
        ]
        headers = ["table", "key", "ranges", "new", "completed", "indexes after load", "note"]
        return dg.MaterializeResult(
            metadata={
                "tables": len(plans),
                "partitions": sum(p.ranges for p in plans),
                "deferred_indexes": sum(p.deferred_indexes for p in plans),
                "plan": dg.MetadataValue.md(markdown_table(headers, rows)),
            }
        )

    return plan


def live_tables(source_conn: psycopg.Connection, names: Sequence[str]) -> dict[str, TableInfo]:
    """Current catalog records for the manifest's tables; missing ones are a clear error."""
    schemas = sorted({n.split(".", 1)[0] for n in names})
    found = {t.qualified_name: t for t in read_tables(source_conn, schemas)}
    missing = [n for n in names if n not in found]
    if missing:
        raise ConfigError(
            f"Table {missing[0]} is in the manifest but not in the source"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; run `supabase-migrate init` again."
        )
    return {n: found[n] for n in names}


def plan_all(
    manifest: Manifest,
    source: SourceDatabase,
    target: TargetDatabase,
    instance: dg.DagsterInstance,
    tables: Sequence[ManifestTable] | None = None,
    log: Callable[[str], None] | None = None,
    ahead: FirstPlansAhead | None = None,
) -> list[TablePlan]:
    """Plan every table, then make Dagster know every partition key the checkpoints hold.

    A table with nothing copied yet gets its secondary indexes dropped, to be built after its
    load (see deferred.py).
    """
    chosen = list(tables or manifest.tables)
    plans = []
    with source.connection() as s, target.connection() as t:
        checkpoints.ensure_bookkeeping(t)
        checkpoints.record_source(s, t)
        bytewise = needs_bytewise_keys(s, t)
        infos = live_tables(s, [m.name for m in chosen])
        planned = checkpoints.summary(t)
        unplanned = [
            (infos[m.name], manifest.batch_size_for(m)) for m in chosen if m.name not in planned
        ]
        first_plans: dict[str, list[KeyRange]] = {}
        if ahead is not None:
            url = source.database_url()
            for info, batch in unplanned:
                ranges = ahead.take(url, info, batch, bytewise)
                if ranges is not None:
                    first_plans[info.qualified_name] = ranges
        first_plans.update(
            plan_tables(
                source.connection,
                [(i, b) for i, b in unplanned if i.qualified_name not in first_plans],
                max_partitions=MAX_PARTITIONS_PER_TABLE,
                collate_c=bytewise,
            )
        )
    messages: list[str] = []  # from the writers; logged from this thread once all are done

    def plan_one(
        pair: tuple[psycopg.Connection, psycopg.Connection], entry: ManifestTable
    ) -> tuple[TablePlan, list[str]]:
        s, t = pair
        plan = refresh_plan(
            s,
            t,
            infos[entry.name],
            batch_size=manifest.batch_size_for(entry),
            max_partitions=MAX_PARTITIONS_PER_TABLE,
            collate_c=bytewise,
            first_plan=first_plans.get(entry.name),
        )
        if plan.completed == 0:
            waiting = deferred.defer_for_load(t, infos[entry.name], messages.append)
            plan = dataclasses.replace(plan, deferred_indexes=len(waiting))
        return plan, checkpoints.load(t, entry.name)

    @contextlib.contextmanager
    def pair() -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
        with source.connection() as s, target.connection() as t:
            yield s, t

    # Each table's checkpoint rows and index deferral are a dozen or more round trips to the
    # target: against a remote Supabase (30 ms) one table after the other kept the setup run
    # 4 s longer than on a local server, with the target idle.
    written = side_by_side(
        pair,
        chosen,
        plan_one,
        what=lambda entry: f"Planning {entry.name}",
        connections=PLAN_WRITERS,
    )
    for message in messages:
        if log is not None:
            log(message)
    for entry, (plan, planned_ranges) in zip(chosen, written, strict=True):
        plans.append(plan)
        _partitions_as_planned(instance, entry.name, planned_ranges, log)
    return plans


def _partitions_as_planned(
    instance: dg.DagsterInstance,
    table: str,
    planned: Sequence[checkpoints.Checkpoint],
    log: Callable[[str], None] | None,
) -> None:
    """Make Dagster's partitions of `table` the checkpoints' keys. Keys no checkpoint holds
    (planned before the target's bookkeeping was reset, in other batch sizes) are removed:
    they could only fail. Ranges Dagster shows materialized that this target never got (a
    reset, or another target) are named: "materialize missing" would not select them."""
    name = partitions_def_name(table)
    keys = [cp.partition_key for cp in planned]
    instance.add_dynamic_partitions(name, keys)
    for stale in set(instance.get_dynamic_partitions(name)) - set(keys):
        instance.delete_dynamic_partition(name, stale)
    never_copied = {
        cp.partition_key
        for cp in planned
        if cp.status != checkpoints.Status.COMPLETED and cp.completed_at is None
    }
    if never_copied and log is not None:
        shown = never_copied & instance.get_materialized_partitions(table_asset_key(table))
        if shown:
            log(
                f"{len(shown)} partition(s) of {table} show as materialized, from runs "
                "against this target before its bookkeeping was reset (or against another "
                "target), but were never copied here: backfill every partition of the table "
                "(completed ranges are skipped), or run `supabase-migrate run`."
            )


# Tables planned at once, each on a source and a target connection of its own.
PLAN_WRITERS = 3


def range_description(result: RangeResult) -> str:
    """A re-sync writes only new and changed rows: how many, of the range's."""
    rows = f"{result.rows} rows"
    if result.path == "upsert":
        rows = f"{result.rows_written} of {rows} written and {result.rows_deleted} deleted"
    return f"{result.path}: {rows} in {result.duration_s:.2f} s"


def range_metadata(result: RangeResult, table: TableInfo) -> dict[str, object]:
    """Integer bounds are shown; text/uuid/composite bounds are key values (an email, an MRN)
    that the record of a range copied as planned does not need, so it gets only the partition
    key. Keys are shown where they are needed: verification names the keys of rows that differ
    (rows are identified by primary key only, never by other values). The range's checksum is
    not shown: a hash of its rows, which for one row of a narrow table (a key and an SSN) could
    be matched by trying every value; the checkpoint on the target keeps it."""
    bounds = table.shown_bounds(result.bounds)
    aside = (
        {
            "rows_taken_aside": result.rows_taken_aside,
            "partitions_to_copy_again": ", ".join(result.ranges_copied_again),
        }
        if result.rows_taken_aside
        else {}
    )
    return {
        "path": result.path,
        "rows": result.rows,
        "rows_written": result.rows_written,
        "rows_deleted": result.rows_deleted,
        **aside,
        "bytes": result.bytes,
        "duration_s": round(result.duration_s, 3),
        "key_range": bounds,
        "dagster/partition_row_count": result.rows,
    }


_TRIED_AGAIN = "tried again after the table's other ranges."


def _marked_elsewhere(
    context: dg.AssetExecutionContext, session: CopySession, table: str, keys: Sequence[str]
) -> list[str]:
    """The table's ranges outside `keys` marked to be copied again; none if the target
    cannot say (they wait for a later run)."""
    try:
        return checkpoints.marked_to_copy_again(session.target, table, keys)
    except (MigrationError, psycopg.Error) as exc:
        why = exc.message if isinstance(exc, MigrationError) else describe_pg_error(exc)
        context.log.warning(
            f"Which ranges of {table} are marked to be copied again could not be read "
            f"({why.rstrip('.')}); they wait for a later run."
        )
        return []


def _taken_aside_note(key: str, table_name: str, result: RangeResult) -> str:
    """The take-aside, by count and partitions: the rows' keys and values stay unsaid."""
    rows, again = result.rows_taken_aside, result.ranges_copied_again
    held = (
        "1 row holding a unique value this range's rows now have was"
        if rows == 1
        else f"{rows} rows holding unique values this range's rows now have were"
    )
    note = f"Partition {key} of {table_name}: {held} re-synced from the same snapshot in this "
    if not again:  # the rows were this range's own
        return note + "range's transaction."
    partitions = ("partition " if len(again) == 1 else "partitions ") + ", ".join(again)
    return (
        note + f"range's transaction; {partitions} {'is' if len(again) == 1 else 'are'} "
        "copied again."
    )


def copy_partitions(
    context: dg.AssetExecutionContext,
    manifest: Manifest,
    table_name: str,
    keys: Sequence[str],
    source: SourceDatabase,
    target: TargetDatabase,
    resync: bool,
) -> Iterator[dg.AssetMaterialization]:
    """Copy each range, reporting each one as it completes; fail at the end if any failed.

    Reporting per range means a run that fails on one range still shows the others as
    materialized, exactly as the checkpoint table records them.
    """
    failures: list[MigrationError] = []
    try:
        source_url, target_url = source.database_url(), target.database_url()
    except MigrationError as exc:
        raise step_failure(exc) from None
    # A run the CLI started copies parents and children in one go, skipping FK triggers; one
    # launched in the UI may copy a table alone.
    cli_run = started_by_the_cli(context.run)
    with CopySession(source_url, target_url, log=context.log.warning) as session:

        def prepare() -> tuple[TableInfo, CopyOptions, dict[str, checkpoints.Checkpoint]]:
            checkpoints.refuse_another_source(session.source, session.target)
            table = live_tables(session.source, [table_name])[table_name]
            missing = columns_the_target_lacks(session.target, table)
            if missing:  # every range would fail, its sentence scrubbed of the column's name
                raise ConfigError(
                    f"{table_name} on the target lacks the source's column(s) "
                    f"{listed(missing, 5)}, so no range can be copied; apply the schema change "
                    "on the target (`supabase-migrate run`, or materializing migration/schema, "
                    "applies it or says how to), then materialize the partitions again."
                )
            replica_mode = replica_mode_allowed(session.target)
            options = CopyOptions(
                force=resync,
                replica_mode=replica_mode,
                unreferenced=not replica_mode and not referenced(session.target, table),
                write_rules=has_write_rules(session.target, table),
                collate_c=needs_bytewise_keys(session.source, session.target),
                run_id=context.run.run_id,
            )
            try:
                planned = checkpoints.load(session.target, table_name, keys)
            except pg_errors.UndefinedTable:  # no bookkeeping: nothing planned this target
                raise ConfigError(f"No run has planned the target yet; {PLAN_FIRST}") from None
            if not cli_run:
                _warn_of_parents_not_copied(context, session.target, manifest, table)
            return table, options, {cp.partition_key: cp for cp in planned}

        try:
            # Kept connections may have been ended since the last table run: retried here
            # like a range would be.
            table, options, planned = retrying(
                prepare, what=f"reading the catalog of {table_name}", log=context.log.warning
            )
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        run_id = context.run.run_id
        stopped = False
        queue = list(keys)
        # Ranges whose rows want a unique value a row of another range still held: tried
        # again once the others were copied, last range first (a value shifted up, as when a
        # position is inserted at the top of a list, frees itself from the top), while that
        # frees any.
        collided: dict[str, MigrationError] = {}
        freed = True
        requeued: set[str] = set()  # once each: a source changing all along could ping-pong
        # Ranges of this table outside the run's partitions marked to be copied again (by a
        # take-aside of this run's, an earlier attempt's or another run's): the CLI copies
        # them after its units; a run launched in the UI (a backfill) copies them after its
        # own, as best it can (they stay pending for a later run if that fails). Its own
        # ranges another run held are tried once more at the end: a sibling run of the same
        # backfill may have been copying one of them so.
        look_elsewhere = not cli_run
        elsewhere: list[str] = []
        held: list[str] = []
        held_once: set[str] = set()
        while queue or (collided and freed) or look_elsewhere or elsewhere or held:
            if not queue:
                if collided and freed:
                    queue, freed = sorted(collided, reverse=True), False
                elif look_elsewhere:
                    look_elsewhere = False
                    found = _marked_elsewhere(context, session, table_name, keys)
                    elsewhere += [k for k in found if k not in requeued]
                    requeued.update(found)
                    continue
                elif elsewhere:
                    queue = [elsewhere.pop(0)]
                else:
                    queue, held = held, []
            key = queue.pop(0)
            checkpoint = planned.get(key)
            if (
                context.retry_number
                and checkpoint is not None
                and checkpoint.status == checkpoints.Status.COMPLETED
                and checkpoint.run_id == run_id
            ):
                continue  # an earlier attempt of this step completed it
            try:
                result = session.copy(table, key, options, checkpoint)
            except MigrationError as exc:
                planned.pop(key, None)  # failed now: read again
                if key not in keys:  # left pending, for the run that holds it or a later one
                    if isinstance(exc, ConcurrentRunError):  # that run copies it
                        context.log.info(exc.message)
                    else:
                        context.log.warning(
                            f"{exc.message.rstrip('.')}; partition {key}, outside this run, "
                            "stays pending for a later run."
                        )
                    if _unreachable(exc):
                        break
                    continue
                if isinstance(exc, UniqueCollision):
                    if key not in collided:
                        context.log.info(f"{exc.message.rstrip('.')}; {_TRIED_AGAIN}")
                    collided[key] = exc
                    continue
                if isinstance(exc, ConcurrentRunError) and key not in held_once:
                    context.log.info(f"{exc.message.rstrip('.')}; {_TRIED_AGAIN}")
                    held_once.add(key)
                    held.append(key)
                    continue
                context.log.error(exc.message)
                failures.append(exc)
                if _unreachable(exc):
                    # Every further range would wait out the same outage; the step's retry
                    # policy starts over later and skips what this run already completed.
                    stopped = True
                    break
                continue
            freed = collided.pop(key, None) is not None or freed
            if result.rows_taken_aside:
                context.log.info(_taken_aside_note(key, table_name, result))
            for other in result.ranges_copied_again:
                planned.pop(other, None)  # marked to copy again: its checkpoint is read anew
                if other not in keys:
                    look_elsewhere = not cli_run
                elif not (other in queue or other in collided or other in requeued):
                    queue.append(other)
                    requeued.add(other)
            yield dg.AssetMaterialization(
                asset_key=context.asset_key,
                partition=key,
                description=range_description(result),
                metadata=range_metadata(result, table),
            )
        for exc in collided.values():
            context.log.error(exc.message)
            failures.append(exc)
        if not failures:
            try:
                built = deferred.rebuild_if_complete(
                    session.target, table_name, context.log.warning
                )
            except (MigrationError, psycopg.Error) as exc:
                raise step_failure(exc) from None
            if built:
                context.log.info(f"Built {len(built)} index(es) of {table_name} after its load.")
    if failures:
        raise dg.Failure(
            description=(
                f"{len(failures)} of {len(keys)} ranges of {table_name} failed"
                + ("; a database became unreachable, the rest wait for a retry" if stopped else "")
                + f"; first: {failures[0].message}"
            ),
            allow_retries=all(_unreachable(f) for f in failures),
        )


def _warn_of_parents_not_copied(
    context: dg.AssetExecutionContext,
    target: psycopg.Connection,
    manifest: Manifest,
    table: TableInfo,
) -> None:
    """Copied before its parents, a table's foreign keys point at rows the target lacks (where
    FK triggers are skipped; elsewhere the copy fails on them)."""
    migrated = {t.name for t in manifest.tables}
    parents = [p for p in table.parents if p != table.qualified_name and p in migrated]
    waiting = checkpoints.not_fully_copied(target, parents) if parents else []
    if waiting:
        context.log.warning(
            f"{table.qualified_name} is copied before its parent table(s) "
            f"{', '.join(waiting)} are: its foreign keys point at rows the target has only "
            "once they are copied too (materialize them; verification checks every foreign "
            "key)."
        )


def _unreachable(exc: MigrationError) -> bool:
    """Lost or refused connections that outlived the per-range retries: worth a later retry."""
    return isinstance(exc, TransientError | ServerUnreachable)


def build_table_asset(manifest: Manifest, entry: ManifestTable) -> dg.AssetsDefinition:
    deps = [dg.AssetDep(PLAN_KEY)] + [
        dg.AssetDep(table_asset_key(parent), partition_mapping=dg.AllPartitionMapping())
        for parent in entry.parents
        if parent != entry.name
    ]
    key_text = ", ".join(entry.key) if entry.key else "none (whole-table partition)"

    @dg.asset(
        key=table_asset_key(entry.name),
        deps=deps,
        partitions_def=partitions_def_for(entry.name),
        group_name=GROUP_TABLES,
        kinds=KINDS | {"table"},
        description=(
            f"Rows of {entry.name} on the target. Each partition is one key range "
            f"(key: {key_text}), copied with COPY in one transaction and checkpointed."
        ),
        metadata={
            "table": entry.name,
            "key": key_text,
            "estimated_rows": entry.estimated_rows if entry.estimated_rows is not None else -1,
        },
        output_required=False,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN),
        retry_policy=COPY_RETRY_POLICY,
        pool=TARGET_POOL,
    )
    @interruptible
    def table_asset(
        context: dg.AssetExecutionContext,
        config: TableCopyConfig,
        source: SourceDatabase,
        target: TargetDatabase,
    ) -> Iterator[dg.AssetMaterialization]:
        yield from copy_partitions(
            context, manifest, entry.name, context.partition_keys, source, target, config.resync
        )

    return table_asset


def fail_if_any(
    failures: Sequence[MigrationError], several: str, kind: type[MigrationError]
) -> None:
    """A step that went on past its failures (one table's, one view's) fails with the first
    one's sentence, and says how many there were: retried only if every one was transient."""
    if len(failures) > 1:
        retried = all(isinstance(f, TransientError) for f in failures)
        said = several.format(len(failures))
        raise step_failure(
            (TransientError if retried else kind)(
                f"{said[0].upper()}{said[1:]}; first: {failures[0].message}"
            )
        )
    if failures:
        raise step_failure(failures[0])


def build_indexes_asset(manifest: Manifest) -> dg.AssetsDefinition:
    @setup_asset(
        manifest,
        key=INDEXES_KEY,
        deps=[table_asset_key(t.name) for t in manifest.tables] or [PLAN_KEY],
        description=(
            "Secondary indexes and unique constraints dropped for a table's first load, built "
            "once every range of the table is copied (a table usually builds its own after its "
            "last range; this catches any left over)."
        ),
    )
    def deferred_indexes(
        context: dg.AssetExecutionContext, target: TargetDatabase
    ) -> dg.MaterializeResult:
        started = time.monotonic()
        names = [t.name for t in manifest.tables]
        rows: list[list[object]] = []
        failures: list[MigrationError] = []  # one table's failure leaves the others' to build
        try:
            with target.connection() as t:
                for table_name in sorted({d.table_name for d in deferred.pending(t, names)}):
                    try:
                        built = deferred.rebuild_if_complete(t, table_name, context.log.warning)
                    except MigrationError as exc:
                        context.log.error(exc.message)
                        failures.append(exc)
                        continue
                    rows += [[table_name, name, "built"] for name in built]
                waiting = deferred.pending(t, names)
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        fail_if_any(
            failures, "the indexes of {} tables could not be built", deferred.IndexBuildError
        )
        rows += [[d.table_name, d.index_name, "waiting: table not fully copied"] for d in waiting]
        if waiting:
            context.log.warning(
                f"{len(waiting)} index(es) wait for their tables' remaining ranges."
            )
        return dg.MaterializeResult(
            metadata={
                "built": len(rows) - len(waiting),
                "waiting": len(waiting),
                "duration_s": round(time.monotonic() - started, 3),
                "indexes": dg.MetadataValue.md(markdown_table(["table", "index", "state"], rows)),
            }
        )

    return deferred_indexes


def after_the_copy(
    manifest: Manifest, key: dg.AssetKey, description: str, after: Sequence[dg.AssetKey] = ()
) -> Callable[[Body], dg.AssetsDefinition]:
    """`setup_asset` for a step that runs once every table is copied and indexed (and the
    steps `after` have run); before that it refuses (`_once_copied`)."""
    decorate = setup_asset(
        manifest,
        key=key,
        deps=[table_asset_key(t.name) for t in manifest.tables] + [INDEXES_KEY, *after],
        description=description,
    )
    return lambda body: decorate(_once_copied(manifest, body))


def _once_copied(manifest: Manifest, body: Body) -> Body:
    """Refuse while a table has a range not copied, or none planned where a plan has run:
    "Materialize all" on a new target ran these steps with the tables' partitions not yet
    planned (the plan makes them), and the whole migration showed green with no row copied.
    A target no run has planned (no bookkeeping) has nothing to wait for."""

    @functools.wraps(body)
    def guarded(context: dg.AssetExecutionContext, *args: Any, **kwargs: Any) -> Any:
        target: TargetDatabase = kwargs["target"]
        try:
            with target.connection() as t:
                planned = checkpoints.bookkeeping_exists(t)  # else no range to wait for
                names = [e.name for e in manifest.tables]
                waiting = checkpoints.not_fully_copied(t, names) if planned else []
        except (MigrationError, psycopg.Error) as exc:
            raise step_failure(exc) from None
        if waiting:
            raise dg.Failure(
                description=(
                    f"{_plural_tables(waiting)} not fully copied yet ({listed(waiting, 5)}), "
                    f"and {context.asset_key.to_user_string()} runs once every one is: "
                    "materialize their missing and failed partitions first (a backfill of "
                    "the tables' assets, or `supabase-migrate run`), then this step."
                ),
                allow_retries=False,
            )
        return body(context, *args, **kwargs)

    return cast(Body, guarded)


def _plural_tables(names: Sequence[str]) -> str:
    return "1 table is" if len(names) == 1 else f"{len(names)} tables are"


@contextlib.contextmanager
def source_and_target(
    source: SourceDatabase, target: TargetDatabase
) -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
    """A step's two connections, the target's bookkeeping current (the step may run alone,
    in the UI, on an older one); its errors fail the step in their one sentence."""
    try:
        with source.connection() as s, target.connection() as t:
            checkpoints.ensure_bookkeeping(t)
            yield s, t
    except (MigrationError, psycopg.Error) as exc:
        raise step_failure(exc) from None


def build_matviews_asset(manifest: Manifest) -> dg.AssetsDefinition:
    @after_the_copy(
        manifest,
        MATVIEWS_KEY,
        "The materialized views the source holds populated, refreshed from the copied rows "
        "(each after those it reads), once every table is copied and indexed; again whenever "
        "a range was copied since. One the source never populated stays so. Last: a refresh "
        "that fails (on the copied rows, or its own query) holds back no other step.",
        after=[SECURITY_KEY],
    )
    def materialized_views(
        context: dg.AssetExecutionContext, source: SourceDatabase, target: TargetDatabase
    ) -> dg.MaterializeResult:
        started = time.monotonic()
        with source_and_target(source, target) as (s, t):
            row = t.execute("SELECT clock_timestamp()").fetchone()
            assert row is not None
            each = f"{checkpoints.MATVIEWS_STEP}:"
            outcomes = matviews.refresh_after_copy(
                s,
                t,
                manifest.schemas,
                fresh=checkpoints.steps_since_last_copy(t, each),
                record=lambda v: checkpoints.step_finished(each + v.qualified, context.run.run_id),
            )
            failures = [o.error for o in outcomes if o.error is not None]
            if not failures:  # else status says the step is behind, till one refreshes them
                step = checkpoints.MATVIEWS_STEP
                checkpoints.record_step(t, step, context.run.run_id, at=row[0])
        for o in outcomes:
            if o.state == matviews.MISSING:
                context.log.warning(f"The materialized view {o.view} is not on the target.")
            if o.error is not None:
                context.log.error(o.error.message)
        fail_if_any(failures, "{} materialized views could not be refreshed", matviews.RefreshError)
        return dg.MaterializeResult(
            metadata={
                "refreshed": sum(1 for o in outcomes if o.state == matviews.REFRESHED),
                "materialized_views": len(outcomes),
                "duration_s": round(time.monotonic() - started, 3),
                "views": dg.MetadataValue.md(
                    markdown_table(
                        ["materialized view", "state", "seconds"],
                        [[o.view, o.state, round(o.duration_s, 3)] for o in outcomes],
                    )
                ),
            }
        )

    return materialized_views


def build_sequences_asset(manifest: Manifest) -> dg.AssetsDefinition:
    @after_the_copy(
        manifest,
        SEQUENCES_KEY,
        "Every sequence and identity on the target moved to at least the source's position "
        "and past its column's values, so the application's next insert cannot collide.",
    )
    def sequences(
        context: dg.AssetExecutionContext, source: SourceDatabase, target: TargetDatabase
    ) -> dg.MaterializeResult:
        started = time.monotonic()
        with source_and_target(source, target) as (s, t):
            finished = checkpoints.step_finished(checkpoints.SEQUENCES_STEP, context.run.run_id)
            results = sync_sequences(s, t, manifest.schemas, also=[finished])
        for r in results:
            if r.exhausted:
                context.log.warning(
                    f"{r.column}'s values reach past the bounds of {r.sequence}, which cannot "
                    "pass them; it keeps the source's position."
                )
        rows = [
            [
                r.sequence,
                r.column or "",
                *(
                    [
                        r.source_next,
                        f"{r.column_next} (past the sequence's bound)"
                        if r.exhausted
                        else r.column_next,
                        r.before,
                        r.after,
                    ]
                    if r.shown
                    else ["(not shown: not a primary key)", "", "", "moved" if r.moved else ""]
                ),
            ]
            for r in results
        ]
        return dg.MaterializeResult(
            metadata={
                "sequences": len(results),
                "moved": sum(1 for r in results if r.moved),
                "duration_s": round(time.monotonic() - started, 3),
                "sequences_table": dg.MetadataValue.md(
                    markdown_table(
                        [
                            "sequence",
                            "column",
                            "source's next",
                            "next past the column",
                            "next before",
                            "next after",
                        ],
                        rows,
                    )
                ),
            }
        )

    return sequences
