"""Move every sequence on the target at least as far as the source's, and past its column's values.

COPY writes explicit key values, so after a load the target's sequences still stand at their
start and the application's first insert would collide. What counts is the value each would
hand out next: the source's, and the one past the owning column's values (its max, or its min
for a descending sequence); the furthest in the sequence's direction wins, and a sequence never
moves back. A sequence restarted and not used since has its next value in `last_value` with
`is_called` false, which `pg_sequences` does not show: it is read from the sequence itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import sqlbuild
from .connections import transaction_with

# Each sequence of the schemas: its owning column, if any, and its direction and bounds.
_SEQUENCES_SQL = """
SELECT n.nspname, s.relname, tn.nspname, t.relname, a.attname, q.seqincrement, q.seqmin,
       q.seqmax
FROM pg_class s
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_sequence q ON q.seqrelid = s.oid
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
     AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
LEFT JOIN pg_class t ON t.oid = d.refobjid
LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
WHERE s.relkind = 'S' AND n.nspname = ANY(%s)
ORDER BY 1, 2
"""

# The source's sequences its login may read (others are left to the column's values).
_READABLE_SQL = """
SELECT n.nspname, s.relname, q.seqincrement FROM pg_class s
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_sequence q ON q.seqrelid = s.oid
WHERE s.relkind = 'S' AND n.nspname = ANY(%s) AND has_table_privilege(s.oid, 'SELECT')
"""


@dataclass(frozen=True)
class SequenceSync:
    """Values each sequence would hand out next: on the source, past its column's values,
    on the target before and after. `exhausted`: the column's values reach past the
    sequence's bound, so they cannot be passed; the source's position is kept."""

    sequence: str
    column: str | None
    source_next: int | None
    column_next: int | None
    before: int | None
    after: int | None
    exhausted: bool = False

    @property
    def moved(self) -> bool:
        return self.after is not None and self.after != self.before


def _state(increment: int) -> sql.Composable:
    """The value a sequence hands out next, read from the sequence relation itself."""
    return sql.SQL("last_value + CASE WHEN is_called THEN {} ELSE 0 END").format(
        sql.Literal(increment)
    )


def _next_values(conn: psycopg.Connection, schemas: Sequence[str]) -> dict[str, int]:
    """The value each readable sequence of the source hands out next."""
    readable = conn.execute(_READABLE_SQL, (list(schemas),)).fetchall()
    reads = [
        sql.SQL("(SELECT {} FROM {})").format(_state(inc), sql.Identifier(schema, name))
        for schema, name, inc in readable
    ]
    values = _select_all(conn, reads)
    return {f"{schema}.{name}": v for (schema, name, _), v in zip(readable, values, strict=True)}


# Values asked for in one SELECT list (PostgreSQL allows 1664 columns).
PER_STATEMENT = 500


def sync_sequences(
    source: psycopg.Connection, target: psycopg.Connection, schemas: Sequence[str]
) -> list[SequenceSync]:
    """setval() each target sequence to the furthest of: the source's next value, the one past
    its column's values, its own.

    Every sequence's state and column's max (or min) is read in one statement and every setval
    sent in one more, so the round trips do not grow with the number of sequences (a remote
    target is tens of ms away).
    """
    source_next = _next_values(source, schemas)
    results = []
    # max() over a parent by INHERITS includes its children on purpose: they share its
    # serial default. No policy may hide a row from it.
    with transaction_with(target, [sqlbuild.NO_STATEMENT_TIMEOUT, sqlbuild.EVERY_ROW]):
        found = target.execute(_SEQUENCES_SQL, (list(schemas),)).fetchall()
        reads: list[sql.Composable] = []
        for seq_schema, seq_name, tab_schema, tab_name, column, inc, _, _ in found:
            reads.append(
                sql.SQL("(SELECT {} FROM {})").format(
                    _state(inc), sql.Identifier(seq_schema, seq_name)
                )
            )
            if column:
                reads.append(
                    sql.SQL("(SELECT {}({})::numeric FROM {})").format(
                        sql.SQL("max" if inc > 0 else "min"),
                        sql.Identifier(column),
                        sql.Identifier(tab_schema, tab_name),
                    )
                )
        values = iter(_select_all(target, reads))
        moves: list[sql.Composable] = []
        for seq_schema, seq_name, tab_schema, tab_name, column, inc, low, high in found:
            qualified = f"{seq_schema}.{seq_name}"
            before = next(values)
            extreme = next(values) if column else None
            column_next = None if extreme is None else int(extreme) + inc
            # Past its bound, the column's values cannot be passed: the source's position,
            # which the source's inserts live with, is kept, and the result says so.
            beyond = column_next is not None and not low <= column_next <= high
            candidates = [
                v
                for v in (source_next.get(qualified), None if beyond else column_next)
                if v is not None and low <= v <= high
            ]
            after = (max if inc > 0 else min)([before, *candidates])
            if after != before:  # setval(v, false): the next nextval hands out v
                moves.append(
                    sql.SQL("setval({}::regclass, {}, false)").format(
                        sql.Literal(sql.Identifier(seq_schema, seq_name).as_string(target)),
                        sql.Literal(after),
                    )
                )
            results.append(
                SequenceSync(
                    sequence=qualified,
                    column=f"{tab_schema}.{tab_name}.{column}" if column else None,
                    source_next=source_next.get(qualified),
                    column_next=column_next,
                    before=before,
                    after=after,
                    exhausted=beyond,
                )
            )
        _select_all(target, moves)
    return results


def _select_all(conn: psycopg.Connection, values: Sequence[sql.Composable]) -> list:
    """`SELECT value, value, ...` in one round trip per PER_STATEMENT values."""
    row: list = []
    for start in range(0, len(values), PER_STATEMENT):
        chunk = values[start : start + PER_STATEMENT]
        got = conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(chunk))).fetchone()
        row += list(got or ())
    return row
