"""Split tables into key ranges of about `batch_size` rows.

Integer keys are split arithmetically (density-adjusted, so sparse ids still give full ranges);
uuid, text and composite keys by boundaries read from the source in key order. The first range
is open below and the last open above, so rows added later at either end are picked up by a
re-run. A table never gets more than `max_partitions` ranges: Dagster's UI slows down long before
its 100k-partition limit, so big tables get bigger ranges instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import psycopg
import psycopg.errors
from psycopg import sql

from . import checkpoints
from .catalog import KeyKind, TableInfo
from .connections import side_by_side
from .ranges import KeyRange, whole_range
from .sqlbuild import Bound, range_predicate, table_ident

DEFAULT_BATCH_SIZE = 50_000
MAX_PARTITIONS_PER_TABLE = 10_000
PLAN_CONNECTIONS = 2  # source connections that read several tables' boundaries at once


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
) -> dict[str, list[KeyRange]]:
    """Whole-table plans of several (table, batch size) pairs, `connections` tables at a time.

    A keyset plan reads the whole key in order and an integer one counts the rows: seconds on
    big tables, independent of each other, and the workers wait for all of them before the
    first copy. Boundaries need no common snapshot (any split covers the table).
    """
    # Biggest first, so that the longest read starts first.
    keyed = sorted(
        ((t, b) for t, b in tables if t.key_kind is not KeyKind.NONE),
        key=lambda pair: -pair[0].size_bytes,
    )
    plans = {  # no key: one whole-table range, nothing to read
        t.qualified_name: [whole_range(t.qualified_name)]
        for t, _ in tables
        if t.key_kind is KeyKind.NONE
    }

    def one(conn: psycopg.Connection, item: tuple[TableInfo, int]) -> tuple[str, list[KeyRange]]:
        table, batch_size = item
        ranges = plan_table(
            conn, table, batch_size=batch_size, max_partitions=max_partitions, collate_c=collate_c
        )
        return table.qualified_name, ranges

    plans.update(
        side_by_side(
            open_source,
            keyed,
            one,
            what=lambda item: f"Reading the key ranges of {item[0].qualified_name} on the source",
            connections=connections,
        )
    )
    return plans


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
            k=key, t=table_ident(table), w=range_predicate(table, start, None)
        )
    ).fetchone()
    assert row is not None
    low, high, rows = row
    if not rows:
        return []
    span = high - low + 1
    size = effective_batch_size(rows, batch_size, max_partitions)
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
        sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table_ident(table), where)
    ).fetchone()
    rows = row[0] if row else 0
    size = effective_batch_size(rows, batch_size, max_partitions)
    if rows <= size:
        return []
    order = sql.SQL(", ").join(
        sql.SQL('{} COLLATE "C"').format(sql.Identifier(k))
        if collate_c and table.column(k).collatable
        else sql.Identifier(k)
        for k in table.key
    )
    texts = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in table.key)
    query = sql.SQL(
        "SELECT {texts} FROM (SELECT {keys}, row_number() OVER (ORDER BY {order}) AS rn "
        "FROM {t} WHERE {w}) s WHERE rn > 1 AND rn % {size} = 1 ORDER BY rn"
    ).format(
        texts=texts,
        keys=sql.SQL(", ").join(sql.Identifier(k) for k in table.key),
        order=order,
        t=table_ident(table),
        w=where,
        size=sql.Literal(size),
    )
    return [tuple(r) for r in conn.execute(query)]


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
            last = existing[-1].key_range()
            new = 0
            if table.key_kind is not KeyKind.NONE and last.upper is None:
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
