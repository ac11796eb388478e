"""An independent row-by-row comparison, deliberately sharing no code with the product."""

from __future__ import annotations

import psycopg

_NORMALIZE = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
    "SET extra_float_digits = 1; SET bytea_output = 'hex'"
)


def table_rows(url: str, table: str) -> list[str]:
    """Every row of `table` as text, sorted: equal lists mean equal tables. A table's own rows
    only (ONLY), not its inheritance children's; a partitioned table's are its partitions'."""
    schema, name = table.split(".", 1)
    ident = psycopg.sql.Identifier(schema, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_NORMALIZE)
        kind = conn.execute(
            "SELECT relkind FROM pg_class WHERE oid = %s::regclass", (ident.as_string(conn),)
        ).fetchone()
        only = "" if kind == ("p",) else "ONLY "
        # ROW(t.*): a bare `t` would be a column of that name, where the table has one.
        query = psycopg.sql.SQL("SELECT ROW(t.*)::text FROM " + only + "{} AS t").format(ident)
        return sorted(r[0] for r in conn.execute(query))


def assert_tables_equal(source_url: str, target_url: str, tables: list[str]) -> None:
    for table in tables:
        src, tgt = table_rows(source_url, table), table_rows(target_url, table)
        assert len(src) == len(tgt), f"{table}: {len(src)} source rows vs {len(tgt)} target rows"
        assert src == tgt, f"{table}: contents differ"


def index_definitions(url: str, schemas: list[str]) -> dict[tuple[str, str], str]:
    """(table, index) -> definition for every index in `schemas`."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename, indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = ANY(%s)",
            (schemas,),
        )
        return {(table, index): definition for table, index, definition in rows}


def assert_indexes_equal(source_url: str, target_url: str, schemas: list[str]) -> None:
    """The same indexes, by name and definition: none left unbuilt after a load."""
    source, target = index_definitions(source_url, schemas), index_definitions(target_url, schemas)
    assert source, "the source has no indexes: the comparison would prove nothing"
    assert sorted(set(source) - set(target)) == [], "indexes missing on the target"
    assert target == source
