"""Materialized views: refreshed on the target once their tables are copied, and compared.

The schema step creates them empty: pg_dump's schema says WITH NO DATA, and an Alembic
migration runs before any row is copied. The ones the source holds populated are refreshed
after the copy, each after the materialized views it reads, as `pg_dump | psql` does after
its data. One the source never populated stays so: the application refreshes it itself.
"""

from __future__ import annotations

import graphlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import sqlbuild
from .catalog import ext_member
from .connections import database_error, transaction_with
from .errors import MigrationError
from .redaction import describe_pg_error


class RefreshError(MigrationError):
    """A materialized view's query failed on the copied rows (or its owner is another role)."""


@dataclass(frozen=True)
class MatView:
    schema: str
    name: str
    populated: bool
    oid: int = field(default=0, compare=False)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


_MATVIEWS_SQL = f"""
SELECT n.nspname, c.relname, c.relispopulated, c.oid::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname = ANY(%s) AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2
"""


def materialized_views(conn: psycopg.Connection, schemas: Sequence[str]) -> list[MatView]:
    return [
        MatView(schema, name, populated, oid)
        for schema, name, populated, oid in conn.execute(_MATVIEWS_SQL, (list(schemas),))
    ]


# Which views and materialized views each view or materialized view reads (its rule's
# dependencies on relations of those kinds).
_READS_SQL = """
SELECT DISTINCT r.ev_class::bigint, d.refobjid::bigint
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
 AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
JOIN pg_class ref ON ref.oid = d.refobjid AND ref.relkind IN ('v', 'm')
"""

_ALL_MATVIEWS_SQL = "SELECT oid::bigint FROM pg_class WHERE relkind = 'm'"


def refresh_order(conn: psycopg.Connection, views: Sequence[MatView]) -> list[MatView]:
    """`views` (of `conn`), each after those of them it reads, directly or through views."""
    reads: dict[int, set[int]] = {}
    for dependent, referenced in conn.execute(_READS_SQL):
        reads.setdefault(dependent, set()).add(referenced)
    # Every materialized view, whatever its schema: one in another schema can sit between two
    # of the migrated ones.
    matview_oids = {oid for (oid,) in conn.execute(_ALL_MATVIEWS_SQL)}
    by_oid = {v.oid: v for v in views}

    def matviews_read(oid: int) -> set[int]:
        found: set[int] = set()
        seen: set[int] = set()
        todo = list(reads.get(oid, ()))
        while todo:
            other = todo.pop()
            if other in seen:
                continue
            seen.add(other)
            if other in matview_oids:
                found.add(other)
            else:  # a plain view: what it reads counts
                todo.extend(reads.get(other, ()))
        return found

    sorter: graphlib.TopologicalSorter[int] = graphlib.TopologicalSorter()
    for view in sorted(views, key=lambda v: (v.schema, v.name)):
        sorter.add(view.oid, *sorted(o for o in matviews_read(view.oid) if o in by_oid))
    return [by_oid[oid] for oid in sorter.static_order()]


def refresh(conn: psycopg.Connection, view: MatView, also: Sequence[sql.Composable] = ()) -> None:
    """REFRESH one materialized view in its own transaction, with `also` after it (its
    record). Row level security must not narrow what it reads: with it off, a policy that
    would fails the refresh instead."""
    refresh = sql.SQL("REFRESH MATERIALIZED VIEW {}").format(view.ident)
    try:
        with transaction_with(conn, [sqlbuild.NO_STATEMENT_TIMEOUT, sqlbuild.EVERY_ROW]):
            conn.execute(sql.SQL("; ").join([refresh, *also]))
    except psycopg.Error as exc:
        sentence = (
            f"Refreshing the materialized view {view.qualified} failed "
            f"({describe_pg_error(exc)}); the tables' rows are in place, and the next run "
            "refreshes it again once the cause is fixed."
        )
        raise database_error(exc, sentence, RefreshError) from None


REFRESHED = "refreshed"
UP_TO_DATE = "up to date: no range copied since its last refresh"
UNPOPULATED = "left unpopulated, as on the source"
MISSING = "not on the target"
FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    view: str
    state: str
    duration_s: float = 0.0
    error: MigrationError | None = None


def refresh_after_copy(
    source: psycopg.Connection,
    target: psycopg.Connection,
    schemas: Sequence[str],
    *,
    fresh: set[str],
    record: Callable[[MatView], sql.Composable],
) -> list[Outcome]:
    """Refresh on the target each materialized view the source holds populated, unless it is
    `fresh` (refreshed since the last range was copied) and populated there. Each refresh
    commits with its `record`, dated by its transaction's start, before its read: a run
    after one failure refreshes that one only. A failure leaves the others to refresh; its
    outcome carries the error."""
    on_source = {v.qualified: v for v in materialized_views(source, schemas)}
    on_target = {v.qualified: v for v in materialized_views(target, schemas)}
    outcomes = [Outcome(name, MISSING) for name in on_source if name not in on_target]
    wanted = [
        v
        for name, v in on_target.items()
        if name in on_source and on_source[name].populated and not (name in fresh and v.populated)
    ]
    outcomes += [
        Outcome(name, UNPOPULATED if not on_source[name].populated else UP_TO_DATE)
        for name, v in on_target.items()
        if name in on_source and v not in wanted
    ]
    for view in refresh_order(target, wanted):
        started = time.monotonic()
        try:
            refresh(target, view, [record(view)])
        except MigrationError as exc:
            outcomes.append(Outcome(view.qualified, FAILED, time.monotonic() - started, exc))
            continue
        outcomes.append(Outcome(view.qualified, REFRESHED, time.monotonic() - started))
    return sorted(outcomes, key=lambda o: o.view)


# --- comparison (verify) --------------------------------------------------------------------


def content(conn: psycopg.Connection, view: MatView) -> tuple[int, str]:
    """(rows, an order-free hash of the rows' text) of a populated one. Runs in the caller's
    snapshot, whose pinned text output is the same on both sides."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || left(md5(m::text), 16))::bit(64)::bigint"
            "::numeric), 0)::text FROM {} AS m"
        ).format(view.ident)
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])
