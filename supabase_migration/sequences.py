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
from .catalog import take_turn
from .connections import in_one_round_trip, transaction_with

# Whether the values of sequence `s` may be shown: where every column it feeds, as its owner
# (serial, identity) or by a DEFAULT that draws from it, is its table's one-column primary key.
# One feeding another column (an MRN) hands out that column's values, a patient's.
VALUES_SHOWN_SQL = """NOT EXISTS (
    SELECT FROM (
      SELECT refobjid AS rel, refobjsubid AS attnum FROM pg_depend
      WHERE classid = 'pg_class'::regclass AND objid = s.oid
        AND refclassid = 'pg_class'::regclass AND deptype IN ('a', 'i') AND refobjsubid > 0
      UNION ALL
      SELECT ad.adrelid, ad.adnum FROM pg_attrdef ad
      JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = ad.oid
       AND dep.refclassid = 'pg_class'::regclass AND dep.refobjid = s.oid
    ) fed
    WHERE NOT EXISTS (
      SELECT FROM pg_index i WHERE i.indrelid = fed.rel AND i.indisprimary
      AND i.indnkeyatts = 1 AND i.indkey[0] = fed.attnum))"""

# Each sequence of the schemas: its owning column, if any, and its direction and bounds.
_SEQUENCES_SQL = f"""
SELECT n.nspname, s.relname, tn.nspname, t.relname, a.attname, q.seqincrement, q.seqmin,
       q.seqmax, {VALUES_SHOWN_SQL}
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

# The source's sequences: those its login may SELECT are read from the sequence itself; with
# USAGE only, pg_sequences shows last_value once it was used (NULL while is_called is off).
_SOURCE_SQL = """
SELECT n.nspname, s.relname, q.seqincrement, has_table_privilege(s.oid, 'SELECT'),
       p.last_value::numeric + q.seqincrement
FROM pg_class s
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_sequence q ON q.seqrelid = s.oid
JOIN pg_sequences p ON p.schemaname = n.nspname AND p.sequencename = s.relname
WHERE s.relkind = 'S' AND n.nspname = ANY(%s)
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
    shown: bool = True  # its values may be shown (VALUES_SHOWN_SQL)

    @property
    def moved(self) -> bool:
        return self.after is not None and self.after != self.before


def _state(increment: int) -> sql.Composable:
    """The value a sequence hands out next, read from the sequence relation itself (numeric:
    past a bigint's end at its maximum)."""
    return sql.SQL("last_value::numeric + CASE WHEN is_called THEN {} ELSE 0 END").format(
        sql.Literal(increment)
    )


def _next_values(conn: psycopg.Connection, schemas: Sequence[str]) -> dict[str, int]:
    """The value each sequence of the source hands out next, where its login may see it."""
    found = conn.execute(_SOURCE_SQL, (list(schemas),)).fetchall()
    readable = [(schema, name, inc) for schema, name, inc, select, _ in found if select]
    reads = [
        sql.SQL("(SELECT {} FROM {})").format(_state(inc), sql.Identifier(schema, name))
        for schema, name, inc in readable
    ]
    values = dict(zip(readable, _select_all(conn, reads), strict=True))
    positions = {
        f"{schema}.{name}": values.get((schema, name, inc), shown)
        for schema, name, inc, _, shown in found
    }
    return {name: int(v) for name, v in positions.items() if v is not None}


# Two runs finishing together each read a sequence, then set it to the furthest they knew:
# the later could set it back past values the other's step had set. One step at a time, each
# reading what the one before left (setval is not transactional).
ONE_AT_A_TIME = take_turn("supabase_migration.sequences")

# Values asked for in one SELECT list (PostgreSQL allows 1664 columns).
PER_STATEMENT = 500


def sync_sequences(
    source: psycopg.Connection,
    target: psycopg.Connection,
    schemas: Sequence[str],
    *,
    also: Sequence[sql.Composable] = (),
) -> list[SequenceSync]:
    """setval() each target sequence to the furthest of: the source's next value, the one past
    its column's values, its own; `also` runs after them in the same transaction (the step's
    record, then dated before the reads).

    Every sequence's state and column's max (or min) is read in one statement and every setval
    sent in one more, so the round trips do not grow with the number of sequences (a remote
    target is tens of ms away).
    """
    source_next = _next_values(source, schemas)
    results = []
    # max() over a parent by INHERITS includes its children on purpose: they share its
    # serial default. No policy may hide a row from it.
    with transaction_with(
        target, [sqlbuild.NO_STATEMENT_TIMEOUT, sqlbuild.EVERY_ROW, ONE_AT_A_TIME]
    ):
        found = target.execute(_SEQUENCES_SQL, (list(schemas),)).fetchall()
        reads: list[sql.Composable] = []
        for seq_schema, seq_name, tab_schema, tab_name, column, inc, _, _, _ in found:
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
        for seq_schema, seq_name, tab_schema, tab_name, column, inc, low, high, shown in found:
            qualified = f"{seq_schema}.{seq_name}"
            before = int(next(values))
            extreme = next(values) if column else None
            column_next = None if extreme is None else int(extreme) + inc
            # Past its far bound, the column's values cannot be passed: the source's position,
            # which the source's inserts live with, is kept, and the result says so.
            beyond = column_next is not None and (
                column_next > high if inc > 0 else column_next < low
            )
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
                    shown=shown,
                )
            )
        _select_all(target, moves)
        if also:
            in_one_round_trip(target, also)
    return results


def _select_all(conn: psycopg.Connection, values: Sequence[sql.Composable]) -> list:
    """`SELECT value, value, ...` in one round trip per PER_STATEMENT values."""
    row: list = []
    for start in range(0, len(values), PER_STATEMENT):
        chunk = values[start : start + PER_STATEMENT]
        got = conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(chunk))).fetchone()
        row += list(got or ())
    return row
