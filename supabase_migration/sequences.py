"""Move every sequence on the target at least as far as the source's, and past its column's max.

COPY writes explicit key values, so after a load the target's sequences still stand at 1 and the
application's first insert would collide. Both the source's position and the largest value in
the owning column count: whichever is higher wins, and a sequence never moves backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import sqlbuild
from .connections import transaction_with

_SEQUENCES_SQL = """
SELECT n.nspname, s.relname, tn.nspname, t.relname, a.attname
FROM pg_class s
JOIN pg_namespace n ON n.oid = s.relnamespace
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
     AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
LEFT JOIN pg_class t ON t.oid = d.refobjid
LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
WHERE s.relkind = 'S' AND n.nspname = ANY(%s)
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class SequenceSync:
    sequence: str
    column: str | None
    source_value: int | None
    column_max: int | None
    before: int | None
    after: int | None

    @property
    def moved(self) -> bool:
        return self.after is not None and self.after != self.before


def _positions(conn: psycopg.Connection, schemas: Sequence[str]) -> dict[str, int | None]:
    """last_value of each sequence, None when it was never used."""
    rows = conn.execute(
        "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences "
        "WHERE schemaname = ANY(%s)",
        (list(schemas),),
    ).fetchall()
    return {name: value for name, value in rows}


# Values asked for in one SELECT list (PostgreSQL allows 1664 columns).
PER_STATEMENT = 500


def sync_sequences(
    source: psycopg.Connection, target: psycopg.Connection, schemas: Sequence[str]
) -> list[SequenceSync]:
    """setval() each target sequence to max(source position, owning column max).

    Every column's max is read in one statement and every setval sent in one more, so the
    round trips do not grow with the number of sequences (a remote target is tens of ms away).
    """
    source_positions = _positions(source, schemas)
    target_positions = _positions(target, schemas)
    results = []
    # max() over a parent by INHERITS includes its children on purpose: they share its
    # serial default. No policy may hide a row from it.
    with transaction_with(target, [sqlbuild.NO_STATEMENT_TIMEOUT, sqlbuild.EVERY_ROW]):
        found = target.execute(_SEQUENCES_SQL, (list(schemas),)).fetchall()
        owned = [
            sql.SQL("(SELECT max({})::bigint FROM {})").format(
                sql.Identifier(column), sql.Identifier(tab_schema, tab_name)
            )
            for _, _, tab_schema, tab_name, column in found
            if column
        ]
        maxes = iter(_select_all(target, owned))
        moves: list[sql.Composable] = []
        for seq_schema, seq_name, tab_schema, tab_name, column in found:
            qualified = f"{seq_schema}.{seq_name}"
            column_max = next(maxes) if column else None
            before = target_positions.get(qualified)
            candidates = [
                v for v in (source_positions.get(qualified), column_max, before) if v is not None
            ]
            after = max(candidates) if candidates else None
            if after is not None and after != before:
                moves.append(
                    sql.SQL("setval({}::regclass, {}, true)").format(
                        sql.Literal(sql.Identifier(seq_schema, seq_name).as_string(target)),
                        sql.Literal(after),
                    )
                )
            results.append(
                SequenceSync(
                    sequence=qualified,
                    column=f"{tab_schema}.{tab_name}.{column}" if column else None,
                    source_value=source_positions.get(qualified),
                    column_max=column_max,
                    before=before,
                    after=after,
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
