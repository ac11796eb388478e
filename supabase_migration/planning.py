"""Split tables into key ranges of about `batch_size` rows.

Integer keys are split arithmetically (density-adjusted, so sparse ids still give full ranges);
uuid, text and composite keys by boundaries read from the source in key order. The first range
is open below and the last open above, so rows added later at either end are picked up by a
re-run. A table never gets more than `max_partitions` ranges: Dagster's UI slows down long before
its 100k-partition limit, so big tables get bigger ranges instead.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import psycopg
import psycopg.errors
from psycopg import sql

from . import checkpoints
from .catalog import KeyKind, TableInfo, needs_bytewise_keys, read_tables, take_turn
from .connections import (
    borrowed,
    connect,
    sever,
    side_by_side,
    stop_queries,
    transaction_with,
)
from .conninfo import DatabaseUrl
from .errors import MigrationError
from .ranges import KeyRange, whole_range
from .sqlbuild import (
    NORMALIZE_TEXT_OUTPUT,
    READING_ROWS,
    Bound,
    compared_as_stored,
    key_order,
    misordered_bounds,
    range_predicate,
    rows_of,
)

DEFAULT_BATCH_SIZE = 100_000
MAX_PARTITIONS_PER_TABLE = 10_000
# A table whose key leads with a column compared bytewise (text keys of databases that order
# text otherwise, see catalog.needs_bytewise_keys) has every range read scan the whole table:
# its key's index orders it otherwise. At most this many ranges keep those scans to a fraction
# of the copy's own work, bigger ranges instead of more of them.
MAX_PARTITIONS_SCANNED = 16
PLAN_CONNECTIONS = 2  # source connections that read several tables' boundaries at once


def _partition_limit(table: TableInfo, max_partitions: int, collate_c: bool) -> int:
    """`max_partitions`, or MAX_PARTITIONS_SCANNED for a key led by a column compared otherwise
    than its index orders it (every read of a range then scans the table)."""
    if compared_as_stored(table.column(table.key[0]), table, collate_c):
        return max_partitions
    return min(max_partitions, MAX_PARTITIONS_SCANNED)


# Integer keys spread over more than this many times their count are split by rows, not by
# arithmetic: a serial key (1, 2, 3... with gaps from rollbacks and deletes) stays arithmetic.
SPARSE_KEYS = 16


def effective_batch_size(rows: int, batch_size: int, max_partitions: int) -> int:
    return max(batch_size, math.ceil(rows / max_partitions)) if rows else batch_size


def plan_table(
    conn: psycopg.Connection,
    table: TableInfo,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_partitions: int = MAX_PARTITIONS_PER_TABLE,
    start: Bound = None,
    first_index: int = 0,
    collate_c: bool = False,
) -> list[KeyRange]:
    """Ranges covering `key >= start` (everything when start is None)."""
    name = table.qualified_name
    if table.key_kind is KeyKind.NONE:
        return [KeyRange(name, first_index, None, None)]
    max_partitions = _partition_limit(table, max_partitions, collate_c)
    # A whole-table read, as every read of rows is (the bounds' text then in the formats every
    # server parses alike: a date in ISO, not the source's DateStyle).
    with transaction_with(conn, [READING_ROWS], commit=False):
        if table.key_kind is KeyKind.INTEGER:
            bounds = _integer_boundaries(conn, table, batch_size, max_partitions, start)
        else:
            bounds = _keyset_boundaries(conn, table, batch_size, max_partitions, start, collate_c)
    edges: list[Bound] = [start, *bounds, None]
    return [KeyRange(name, first_index + i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def plan_tables(
    open_source: Callable[[], AbstractContextManager[psycopg.Connection]],
    tables: Sequence[tuple[TableInfo, int]],
    *,
    max_partitions: int = MAX_PARTITIONS_PER_TABLE,
    collate_c: bool = False,
    connections: int = PLAN_CONNECTIONS,
    on_plan: Callable[[TableInfo, int, list[KeyRange]], None] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, list[KeyRange]]:
    """Whole-table plans of several (table, batch size) pairs, `connections` tables at a time.

    A keyset plan reads the whole key in order and an integer one counts the rows: seconds on
    big tables, independent of each other, and the workers wait for all of them before the
    first copy. Boundaries need no common snapshot (any split covers the table). `on_plan`
    gets each table's plan as soon as it is read; once `stop` is set, tables not yet started
    are left out (both for `FirstPlansAhead`, whose reads may be cancelled midway).
    """
    keep = on_plan or (lambda table, batch_size, ranges: None)
    plans: dict[str, list[KeyRange]] = {}
    for table, batch_size in tables:
        if table.key_kind is KeyKind.NONE:  # one whole-table range, nothing to read
            plans[table.qualified_name] = [whole_range(table.qualified_name)]
            keep(table, batch_size, plans[table.qualified_name])
    # Biggest first, so that the longest read starts first.
    keyed = sorted(
        ((t, b) for t, b in tables if t.key_kind is not KeyKind.NONE),
        key=lambda pair: -pair[0].size_bytes,
    )

    def one(
        conn: psycopg.Connection, item: tuple[TableInfo, int]
    ) -> tuple[str, list[KeyRange]] | None:
        if stop is not None and stop.is_set():
            return None
        table, batch_size = item
        ranges = plan_table(
            conn, table, batch_size=batch_size, max_partitions=max_partitions, collate_c=collate_c
        )
        keep(table, batch_size, ranges)
        return table.qualified_name, ranges

    read = side_by_side(
        open_source,
        keyed,
        one,
        what=lambda item: f"Reading the key ranges of {item[0].qualified_name} on the source",
        connections=connections,
    )
    plans.update(r for r in read if r is not None)
    return plans


class FirstPlansAhead:
    """First plans read from the source in a background thread while the CLI starts Dagster.

    Opening the Dagster instance and building the definitions keep one core busy for 1-2 s
    before the setup run, while the source idles; a first plan's reads take 0.5-1 s at 3M rows
    and grow with the tables. The plan asset takes what was read here (`take`) when its inputs
    are the same, and reads the rest itself. `finish` ends the read-ahead when Dagster is
    ready: reads still running are cancelled, so a big table's long read, an error or Ctrl-C
    at start-up never holds the CLI back, and no thread runs when the workers fork. Any failure
    here is left for the plan asset to meet again and report in its run. Boundaries read a
    little early are as good as any: a plan's ranges cover the table whatever rows come and go.
    """

    def __init__(
        self,
        source_url: DatabaseUrl,
        target_url: DatabaseUrl,
        tables: Sequence[tuple[str, int]],
        schemas: Sequence[str],
    ) -> None:
        self._source_url = source_url
        self._plans: dict[tuple[object, ...], list[KeyRange]] = {}
        self._stopping = threading.Event()
        self._reading: set[psycopg.Connection] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._read,
            args=(target_url, list(tables), list(schemas)),
            name="first-plans-ahead",
            daemon=True,
        )
        self._thread.start()

    @contextmanager
    def _source_connection(self) -> Iterator[psycopg.Connection]:
        """A source connection that `finish` can cancel while it reads. Not one kept for
        reuse: a cancel sent just as a read ends could reach the next user's statement."""
        with connect(self._source_url, autocommit=True) as conn:
            with self._lock:
                self._reading.add(conn)
            try:
                yield conn
            finally:
                with self._lock:
                    self._reading.discard(conn)

    def _read(
        self, target_url: DatabaseUrl, tables: list[tuple[str, int]], schemas: list[str]
    ) -> None:
        try:
            with (
                self._source_connection() as source,
                borrowed(target_url) as target,
            ):
                planned = checkpoints.summary_if_planned(target)
                todo = [(name, batch) for name, batch in tables if name not in planned]
                if not todo:
                    return
                collate_c = needs_bytewise_keys(source, target)
                infos = {t.qualified_name: t for t in read_tables(source, schemas)}

            def keep(info: TableInfo, batch_size: int, ranges: list[KeyRange]) -> None:
                self._plans[_plan_inputs(info, batch_size, collate_c)] = ranges

            plan_tables(
                self._source_connection,
                [(infos[name], batch) for name, batch in todo if name in infos],
                collate_c=collate_c,
                on_plan=keep,
                stop=self._stopping,
            )
        except Exception:  # what was read is kept; the plan asset reads the rest, and reports
            return

    def wait(self) -> None:
        """Until every read is done (tests; `take` waits too)."""
        self._thread.join()

    def finish(self) -> None:
        """Cancel what is still being read, and wait for the thread to end (milliseconds;
        a source that stopped answering has its connections cut, see `stop_queries`)."""
        self._stopping.set()

        def ended(timeout: float) -> bool:
            self._thread.join(timeout)
            return not self._thread.is_alive()

        def reading() -> list[psycopg.Connection]:
            with self._lock:
                return list(self._reading)

        def sever_reading() -> None:
            with self._lock:  # their thread closes them only after it let go of them here
                for conn in self._reading:
                    sever(conn)

        stop_queries(ended, reading, sever_reading)

    def take(
        self, source_url: DatabaseUrl, table: TableInfo, batch_size: int, collate_c: bool
    ) -> list[KeyRange] | None:
        """The ranges read ahead for exactly these inputs, once; None when there are none."""
        self.wait()
        read_from = self._source_url
        if (source_url.host, source_url.port, source_url.dbname) != (
            read_from.host,
            read_from.port,
            read_from.dbname,
        ):
            return None
        return self._plans.pop(_plan_inputs(table, batch_size, collate_c), None)


def _plan_inputs(table: TableInfo, batch_size: int, collate_c: bool) -> tuple[object, ...]:
    """What a first plan depends on: the table, its key (names and types), the batch size."""
    key_types = tuple(table.column(k).type_sql for k in table.key)
    return (table.qualified_name, table.key, key_types, batch_size, collate_c)


def _integer_boundaries(
    conn: psycopg.Connection,
    table: TableInfo,
    batch_size: int,
    max_partitions: int,
    start: Bound,
) -> list[tuple[str, ...]]:
    key = sql.Identifier(table.key[0])
    row = conn.execute(
        sql.SQL("SELECT min({k}), max({k}), count(*) FROM {t} WHERE {w}").format(
            k=key, t=rows_of(table), w=range_predicate(table, start, None)
        )
    ).fetchone()
    assert row is not None
    low, high, rows = row
    if not rows:
        return []
    span = high - low + 1
    size = effective_batch_size(rows, batch_size, max_partitions)
    if span > SPARSE_KEYS * rows and rows > size:
        # Keys far apart (a sentinel id of 10^15, random ids): equal widths would leave one
        # range with nearly every row. Ranges of `size` rows, read from the key's index.
        return every_nth_key(conn, table, size, start, None, collate_c=False)
    width = max(1, math.ceil(size * span / rows))
    width = max(width, math.ceil(span / max_partitions))
    return [(str(b),) for b in range(low + width, high + 1, width)]


def _keyset_boundaries(
    conn: psycopg.Connection,
    table: TableInfo,
    batch_size: int,
    max_partitions: int,
    start: Bound,
    collate_c: bool,
) -> list[tuple[str, ...]]:
    where = range_predicate(table, start, None, collate_c=collate_c)
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {}").format(rows_of(table), where)
    ).fetchone()
    rows = row[0] if row else 0
    size = effective_batch_size(rows, batch_size, max_partitions)
    if rows <= size:
        return []
    return every_nth_key(conn, table, size, start, None, collate_c)


def every_nth_key(
    conn: psycopg.Connection,
    table: TableInfo,
    size: int,
    lower: Bound,
    upper: Bound,
    collate_c: bool,
) -> list[tuple[str, ...]]:
    """The keys that start each run of `size` rows between `lower` and `upper`, the first
    run's excepted, as text (read where text output is pinned: `READING_ROWS`)."""
    order = sql.SQL(", ").join(key_order(table, collate_c=collate_c))
    # The subquery's columns are named here, k0, k1... and n: a key column may be called rn.
    names = [sql.Identifier(f"k{i}") for i in range(len(table.key))]
    query = sql.SQL(
        "SELECT {texts} FROM (SELECT {keys}, row_number() OVER (ORDER BY {order}) AS n "
        "FROM {t} WHERE {w}) s WHERE n > 1 AND n % {size} = 1 ORDER BY n"
    ).format(
        texts=sql.SQL(", ").join(sql.SQL("{}::text").format(name) for name in names),
        keys=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(sql.Identifier(k), name)
            for k, name in zip(table.key, names, strict=True)
        ),
        order=order,
        t=rows_of(table),
        w=range_predicate(table, lower, upper, collate_c=collate_c),
        size=sql.Literal(size),
    )
    return [tuple(r) for r in conn.execute(query)]


def _check_bounds_ascend(
    source: psycopg.Connection,
    table: TableInfo,
    planned: Sequence[checkpoints.Checkpoint],
    collate_c: bool,
) -> None:
    """A plan's bounds must ascend as keys are compared now. One made when they were compared
    otherwise may not: by an earlier release (a WIN1252 source's text keys in its own bytes,
    dates read in the source's DateStyle), or before a server's collation changed. Rows
    between two such bounds belong to no range, and would never be copied."""
    if table.key_kind is not KeyKind.KEYSET:
        return
    bounds = [b for cp in planned for b in (cp.lower_bound, cp.upper_bound) if b is not None]
    if any(len(b) != len(table.key) for b in bounds):
        problem: str | None = f"has range bounds of another key than {', '.join(table.key)}"
    else:
        problem = _misordered(source, table, planned, collate_c)
    if problem is not None:
        raise MigrationError(
            f"{table.qualified_name}: its plan, made when keys were compared otherwise (an "
            f"earlier release, another collation), {problem}; delete the table's rows from "
            "supabase_migration.migration_checkpoints and run again to plan it anew."
        )


def _misordered(
    source: psycopg.Connection,
    table: TableInfo,
    planned: Sequence[checkpoints.Checkpoint],
    collate_c: bool,
) -> str | None:
    """What is wrong with the plan's inner ranges' bounds, if anything (one round trip)."""
    inner = [cp for cp in planned if cp.lower_bound is not None and cp.upper_bound is not None]
    if not inner:
        return None
    arrays: list[list[object]] = [list(range(len(inner)))]
    for side in ("lower_bound", "upper_bound"):
        arrays += [[getattr(cp, side)[j] for cp in inner] for j in range(len(table.key))]
    try:
        with transaction_with(source, [NORMALIZE_TEXT_OUTPUT], commit=False):
            row = source.execute(misordered_bounds(table, collate_c=collate_c), arrays).fetchone()
    except psycopg.errors.DataError:  # its error would quote the bound, a key value
        return "has range bounds that no longer read as its key's values"
    if row is None or row[0] is None:
        return None
    return (
        f"has a range, {inner[row[0]].partition_key}, that ends below where it starts as keys "
        "are compared now"
    )


@dataclass(frozen=True)
class TablePlan:
    table: str
    key_kind: str
    ranges: int
    new_ranges: int
    completed: int
    note: str
    deferred_indexes: int = 0  # indexes built after the load instead of during it


def refresh_plan(
    source: psycopg.Connection,
    target: psycopg.Connection,
    table: TableInfo,
    *,
    batch_size: int,
    max_partitions: int = MAX_PARTITIONS_PER_TABLE,
    collate_c: bool = False,
    first_plan: Sequence[KeyRange] | None = None,
) -> TablePlan:
    """Write pending checkpoint rows for `table`, keeping every range already planned.

    A first plan covers the whole table (`first_plan` when one was read already, see
    `plan_tables`). Later plans keep existing ranges (completed ones stay completed) and only
    split the open-ended last range when rows added since have made it much larger than a
    batch, so partition keys stay stable across runs.
    """
    name = table.qualified_name
    with target.transaction():
        # Another run planning the table at once (a second `run`, another batch size) waits:
        # its plan, read before this one committed, would overlap it for good.
        target.execute(take_turn(f"supabase_migration.plan:{name}"))
        existing = checkpoints.load(target, name)
        if not existing:
            ranges = (
                list(first_plan)
                if first_plan is not None
                else plan_table(
                    source,
                    table,
                    batch_size=batch_size,
                    max_partitions=max_partitions,
                    collate_c=collate_c,
                )
            )
            checkpoints.seed_pending(target, ranges)
            new = len(ranges)
        else:
            _check_bounds_ascend(source, table, existing, collate_c)
            last = existing[-1].key_range()
            new = 0
            if table.key_kind is not KeyKind.NONE and last.upper is None:
                max_partitions = _partition_limit(table, max_partitions, collate_c)
                grown = plan_table(
                    source,
                    table,
                    batch_size=batch_size,
                    max_partitions=max(1, max_partitions - len(existing) + 1),
                    start=last.lower,
                    first_index=last.index,
                    collate_c=collate_c,
                )
                if len(grown) > 2:  # only worth re-keying when the tail holds several batches
                    checkpoints.close_open_range(target, name, last.partition_key, grown[0].upper)  # type: ignore[arg-type]
                    checkpoints.seed_pending(target, grown[1:])
                    new = len(grown) - 1
        rows = checkpoints.load(target, name)
    note = {
        KeyKind.NONE: "no usable key: one whole-table partition, replaced atomically",
        KeyKind.INTEGER: "integer key: arithmetic ranges",
        KeyKind.KEYSET: "keyset ranges read from the source",
    }[table.key_kind]
    if table.key_source == "unique_index":
        note += f" (key from a NOT NULL unique index on {', '.join(table.key)})"
    return TablePlan(
        table=name,
        key_kind=str(table.key_kind),
        ranges=len(rows),
        new_ranges=new,
        completed=sum(1 for r in rows if r.status == checkpoints.Status.COMPLETED),
        note=note,
    )
