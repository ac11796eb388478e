"""Materialized views: refreshed on the target once their tables are copied, and compared.

The schema step creates them empty: pg_dump's schema says WITH NO DATA, and an Alembic
migration runs before any row is copied. The ones the source holds populated are refreshed
after the copy, each after the materialized views it reads, as `pg_dump | psql` does after
its data. One the source never populated stays so: the application refreshes it itself.
"""

from __future__ import annotations

import contextlib
import graphlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import sqlbuild
from .catalog import IN_PG_CATALOG, ext_member, server_major, takes_callers_search_path
from .connections import database_error, transaction_with
from .errors import MigrationError, listed
from .redaction import describe_pg_error


class RefreshError(MigrationError):
    """A materialized view's query failed on the copied rows."""


class ReadsAnUnpopulatedOne(RefreshError):
    """It reads a materialized view not populated yet through a function, which leaves no
    dependency to order the refreshes by: tried again once the others are refreshed."""


@dataclass(frozen=True)
class MatView:
    schema: str
    name: str
    populated: bool
    oid: int = field(default=0, compare=False)
    owner: str = field(default="", compare=False)
    ours: bool = field(default=True, compare=False)  # the login may refresh it (owner's member)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


_MATVIEWS_SQL = f"""
SELECT n.nspname, c.relname, c.relispopulated, c.oid::bigint, pg_get_userbyid(c.relowner),
       pg_has_role(current_user, c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname = ANY(%s) AND NOT {ext_member("pg_class", "c.oid")}
ORDER BY 1, 2
"""


def materialized_views(conn: psycopg.Connection, schemas: Sequence[str]) -> list[MatView]:
    return [MatView(*row) for row in conn.execute(_MATVIEWS_SQL, (list(schemas),))]


# What each view or materialized view reads: its rule's dependencies on relations, with their
# kind and name.
_READS_SQL = """
SELECT DISTINCT r.ev_class::bigint, d.refobjid::bigint, ref.relkind::text,
       format('%s.%s', n.nspname, root.relname)
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
 AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
JOIN pg_class ref ON ref.oid = d.refobjid AND ref.relkind IN ('v', 'm', 'r', 'p', 'f')
-- a partition is named by its root, the table that is migrated
JOIN pg_class root ON root.oid = CASE WHEN ref.relispartition
                                      THEN pg_partition_root(ref.oid) ELSE ref.oid END
JOIN pg_namespace n ON n.oid = root.relnamespace
"""


@dataclass(frozen=True)
class _Reads:
    """Who reads what, as the catalog's rules say (a function's body says nothing)."""

    edges: dict[int, set[int]]
    kinds: dict[int, str]
    names: dict[int, str]

    @classmethod
    def of(cls, conn: psycopg.Connection) -> _Reads:
        edges: dict[int, set[int]] = {}
        kinds: dict[int, str] = {}
        names: dict[int, str] = {}
        for dependent, referenced, kind, name in conn.execute(_READS_SQL):
            edges.setdefault(dependent, set()).add(referenced)
            kinds[referenced], names[referenced] = kind, name
        return cls(edges, kinds, names)

    def through_views(self, oid: int) -> set[int]:
        """The materialized views and tables `oid` reads, directly or through plain views."""
        found: set[int] = set()
        seen: set[int] = set()
        todo = list(self.edges.get(oid, ()))
        while todo:
            other = todo.pop()
            if other in seen:
                continue
            seen.add(other)
            if self.kinds.get(other) == "v":
                todo.extend(self.edges.get(other, ()))
            else:
                found.add(other)
        return found

    def tables(self, oid: int) -> set[str]:
        """The tables `oid` reads, through views and materialized views alike."""
        found: set[str] = set()
        seen: set[int] = set()
        todo = [oid]
        while todo:
            for other in self.through_views(todo.pop()):
                if other in seen:
                    continue
                seen.add(other)
                if self.kinds.get(other) == "m":
                    todo.append(other)
                else:
                    found.add(self.names[other])
        return found


def tables_read(conn: psycopg.Connection, views: Sequence[MatView]) -> dict[str, set[str]]:
    """The tables each of `views` (of `conn`) reads, through views and materialized views."""
    reads = _Reads.of(conn)
    return {v.qualified: reads.tables(v.oid) for v in views}


def refresh_order(conn: psycopg.Connection, views: Sequence[MatView]) -> list[MatView]:
    """`views` (of `conn`), each after those of them it reads, directly or through views."""
    reads = _Reads.of(conn)
    by_oid = {v.oid: v for v in views}
    sorter: graphlib.TopologicalSorter[int] = graphlib.TopologicalSorter()
    for view in sorted(views, key=lambda v: (v.schema, v.name)):
        sorter.add(view.oid, *sorted(o for o in reads.through_views(view.oid) if o in by_oid))
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
        if exc.sqlstate == "55000":  # object_not_in_prerequisite_state: "… not populated"
            raise ReadsAnUnpopulatedOne(
                f"Refreshing the materialized view {view.qualified} failed: it reads another "
                "that is not populated on the target, perhaps through a function (which gives "
                "no order to refresh them in)."
            ) from None
        hint = _search_path_hint(conn, view) if exc.sqlstate in _NOT_FOUND else ""
        sentence = (
            f"Refreshing the materialized view {view.qualified} failed "
            f"({describe_pg_error(exc)}){hint}; the tables' rows are in place, and the next "
            "run refreshes it again once the cause is fixed."
        )
        raise database_error(exc, sentence, RefreshError) from None


# undefined_table, undefined_function: the name is withheld (a value cast to regclass gives the
# same error), so the catalog says what may be the cause instead.
_NOT_FOUND = frozenset({"42P01", "42883"})

# The routines a view's query calls (its rule's dependencies) that take the caller's search_path
# (`takes_callers_search_path`, extensions' left out: the user cannot alter them).
_UNBOUND_CALLS_SQL = """
SELECT DISTINCT p.oid::regprocedure::text
FROM pg_rewrite w
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
                AND d.refclassid = 'pg_proc'::regclass
JOIN pg_proc p ON p.oid = d.refobjid
JOIN pg_language l ON l.oid = p.prolang
WHERE w.ev_class = %s AND {unbound}
ORDER BY 1
"""


def unbound_calls(conn: psycopg.Connection, view: MatView) -> list[str]:
    """What `view` calls that resolves unqualified names by the caller's search_path: on
    PostgreSQL 17 and later a refresh's is `pg_catalog, pg_temp`, whatever the session's."""
    query = _UNBOUND_CALLS_SQL.format(unbound=takes_callers_search_path(server_major(conn)))
    with transaction_with(conn, [IN_PG_CATALOG], commit=False):
        return [name for (name,) in conn.execute(query, [view.oid])]


def _search_path_hint(conn: psycopg.Connection, view: MatView) -> str:
    """Where the view calls such functions: the likely cause, and the cure."""
    with contextlib.suppress(psycopg.Error):  # the error above is what the user must see
        calls = unbound_calls(conn, view)
        if calls:
            one = len(calls) == 1
            where = (
                "a refresh looks names up in pg_catalog only on PostgreSQL 17 and later"
                if server_major(conn) >= 17
                else "a name given without its schema is looked up in this session's"
            )
            return (
                f": it calls {listed(calls, 3)}, which {'has' if one else 'have'} no "
                f"search_path of {'its' if one else 'their'} own, and {where} (give "
                f"{'it' if one else 'them'} one: ALTER FUNCTION ... SET search_path = ...)"
            )
    return ""


REFRESHED = "refreshed"
UP_TO_DATE = "up to date: no range copied since its last refresh"
UNPOPULATED = "left unpopulated, as on the source"
MISSING = "not on the target"
FAILED = "failed"


def not_ours(view: MatView) -> str:
    return (
        f"left as it is: its owner, {view.owner}, is a role the target's login is not a "
        "member of, which refreshes it"
    )


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
    outcome carries the error. One another role owns (schema mode none) is left to it."""
    on_source = {v.qualified: v for v in materialized_views(source, schemas)}
    on_target = {v.qualified: v for v in materialized_views(target, schemas)}
    outcomes = [Outcome(name, MISSING) for name in on_source if name not in on_target]
    both = [v for name, v in on_target.items() if name in on_source]
    wanted = [
        v
        for v in both
        if on_source[v.qualified].populated and not (v.qualified in fresh and v.populated)
    ]
    for v in both:
        if not on_source[v.qualified].populated:
            outcomes.append(Outcome(v.qualified, UNPOPULATED))
        elif v not in wanted:
            outcomes.append(Outcome(v.qualified, UP_TO_DATE))
        elif not v.ours:
            outcomes.append(Outcome(v.qualified, not_ours(v)))
    todo = refresh_order(target, [v for v in wanted if v.ours])
    while todo:
        waiting: list[tuple[MatView, float, MigrationError]] = []
        for view in todo:
            started = time.monotonic()
            try:
                refresh(target, view, [record(view)])
            except ReadsAnUnpopulatedOne as exc:  # once others are refreshed, it may pass
                waiting.append((view, time.monotonic() - started, exc))
                continue
            except MigrationError as exc:
                outcomes.append(Outcome(view.qualified, FAILED, time.monotonic() - started, exc))
                continue
            outcomes.append(Outcome(view.qualified, REFRESHED, time.monotonic() - started))
        if len(waiting) == len(todo):  # no progress: each waits on one that failed, or another
            outcomes += [Outcome(v.qualified, FAILED, took, exc) for v, took, exc in waiting]
            break
        todo = [v for v, _, _ in waiting]
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
