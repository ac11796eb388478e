"""SQL text for the copy path, built with psycopg.sql so identifiers are always quoted.

Key-range bounds are stored as text (JSON arrays) and cast back to the key columns' types here,
so one code path serves integer, uuid, text, timestamp and composite keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import pairwise

from psycopg import sql

from .catalog import Column, KeyKind, TableInfo, UniqueIndex
from .connections import KeyValue
from .ranges import Bound, KeyRange

# `money` is written and read in the database's lc_monetary: '1.234,50 €' in de_DE, which a
# server in C or en_US refuses, and hashes otherwise than '$1,234.50'. C reads and writes it
# alike everywhere (the stored amount, in hundredths, is never converted).
PLAIN_MONEY = sql.SQL("SET LOCAL lc_monetary = 'C'")

# Row text must render the same on source and target for checksums to be comparable, so every
# transaction that hashes rows pins the settings that change text output.
# Floats as text exactly (shortest exact form); at 0 or below they print rounded, so two
# different values could read alike wherever rows are compared as text.
EXACT_FLOATS = sql.SQL("SET LOCAL extra_float_digits = 1")

NORMALIZE_TEXT_OUTPUT = sql.SQL(
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; "
    "SET LOCAL IntervalStyle = 'postgres'; {}; SET LOCAL bytea_output = 'hex'; {}"
).format(EXACT_FLOATS, PLAIN_MONEY)

# Copies and verification already keep the servers busy with one query per worker; parallel
# workers inside those queries only compete with the other workers for the same cores.
SERIAL_PLANS = sql.SQL("SET LOCAL max_parallel_workers_per_gather = 0")

# Row level security must never filter what is copied or compared: a source role it applies to
# would copy, and verify, only the rows its policies show, and both sides would agree. With it
# off, such a query fails instead ("query would be affected by row-level security policy"), as
# pg_dump's do; preflight names those tables first.
EVERY_ROW = sql.SQL("SET LOCAL row_security = off")

# A source role's own statement_timeout (production roles often have one) would cancel a
# whole-table checksum, a plan's boundary read, or a range's COPY waiting on a slow target,
# again on every retry.
NO_STATEMENT_TIMEOUT = sql.SQL("SET LOCAL statement_timeout = 0")

# The server's side of our connection probes us as ours probes it (connections.KEEPALIVES):
# when a link to us drops, the server ends our transaction within a minute, not after the
# kernel's two hours, with what it holds: a range's checkpoint lock on the target; a snapshot
# and table locks on the source, which would hold back its vacuum and the application's DDL.
# (Behind a pooler it probes the pooler.)
SERVER_KEEPALIVES = sql.SQL(
    "SET LOCAL tcp_keepalives_idle = 30; SET LOCAL tcp_keepalives_interval = 10; "
    "SET LOCAL tcp_keepalives_count = 3"
)

# What every transaction that reads a table's rows sets, right after its BEGIN: the copy's
# source snapshot and its checksum peer, verification's snapshots, the plan's boundary reads.
READING_ROWS = sql.SQL("; ").join(
    [SERIAL_PLANS, EVERY_ROW, NO_STATEMENT_TIMEOUT, NORMALIZE_TEXT_OUTPUT, SERVER_KEEPALIVES]
)


def table_ident(table: TableInfo) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name)


def rows_of(table: TableInfo) -> sql.Composable:
    """The table's own rows, where they are read or deleted, on either side: ONLY for a parent
    by classic inheritance (INHERITS), which would also give its children's, copied as tables
    of their own. Any other table is named as it is, since the target's may be partitioned
    where the source's is not (ONLY would then see none of its rows)."""
    if table.inherited:
        return sql.SQL("ONLY {}").format(table_ident(table))
    return table_ident(table)


def column_list(columns: Sequence[Column], prefix: str | None = None) -> sql.Composable:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, c.name) for c in columns)
    return sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)


def key_order(
    table: TableInfo, alias: str | None = None, collate_c: bool = False
) -> list[sql.Composable]:
    """Each key column as ranges compare it, in the same order on both servers: bytewise
    under `collate_c` (`catalog.needs_bytewise_keys`) or when the column has a collation of
    its own (`Column.own_collation`); as UTF8 bytes for a source not encoded in UTF8
    (`utf8_keys`), whose own bytes order text otherwise than the target's do (WIN1252 puts
    '€' before 'é', UTF8 after it)."""
    return [
        _comparable(
            table,
            table.column(name),
            sql.Identifier(alias, name) if alias else sql.Identifier(name),
            collate_c,
        )
        for name in table.key
    ]


def compared_as_stored(column: Column, table: TableInfo, collate_c: bool) -> bool:
    """Whether ranges compare this key column as the key's index orders it (so that index
    can find a range's rows), not bytewise nor as UTF8 bytes."""
    if not column.collatable:
        return True
    if table.utf8_keys:  # even a column in C: its bytes are the source's encoding's
        return False
    return column.bytes_collation or not (collate_c or column.own_collation)


def _comparable(
    table: TableInfo, column: Column, value: sql.Composable, collate_c: bool
) -> sql.Composable:
    if compared_as_stored(column, table, collate_c):
        return value
    if table.utf8_keys:
        return _as_utf8(value)
    return sql.SQL('{} COLLATE "C"').format(value)


def _as_utf8(value: sql.Composable) -> sql.Composable:
    return sql.SQL("convert_to({}::text, 'UTF8')").format(value)


def _bound(
    table: TableInfo,
    column: Column,
    value: sql.Composable,
    *,
    alone: bool = False,
    collate_c: bool = False,
) -> sql.Composable:
    """A range bound (text cast to the key column's type) as `key_order` compares its column.
    Beside its column, the column's side decides the comparison's collation; `alone` (two
    bounds compared) it needs its own COLLATE "C" where the column is compared bytewise."""
    cast = sql.SQL("CAST({} AS {})").format(value, sql.SQL(column.type_sql))
    if not column.collatable:
        return cast
    if table.utf8_keys:
        return _as_utf8(cast)
    if alone and (column.bytes_collation or not compared_as_stored(column, table, collate_c)):
        return sql.SQL('{} COLLATE "C"').format(cast)
    return cast


def _key_expr(table: TableInfo, alias: str | None, collate_c: bool) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(key_order(table, alias, collate_c)))


def _bound_expr(table: TableInfo, values: Sequence[str]) -> sql.Composable:
    bounds = [
        _bound(table, table.column(k), sql.Literal(v) if table.rows_named else KeyValue(v))
        for k, v in zip(table.key, values, strict=True)
    ]
    return sql.SQL("({})").format(sql.SQL(", ").join(bounds))


def misordered_bounds(table: TableInfo, *, collate_c: bool = False) -> sql.Composed:
    """The first of several ranges whose lower bound is not below its upper one, as keys are
    compared now (`key_order`). Parameters: the ranges' indexes, then each key column's lower
    bounds, then each one's upper bounds, as text arrays."""
    width = len(table.key)
    names = [f"l{j}" for j in range(width)] + [f"h{j}" for j in range(width)]

    def side(prefix: str) -> sql.Composable:
        bounds = [
            _bound(
                table,
                table.column(k),
                sql.Identifier("u", f"{prefix}{j}"),
                alone=True,
                collate_c=collate_c,
            )
            for j, k in enumerate(table.key)
        ]
        return sql.SQL("({})").format(sql.SQL(", ").join(bounds))

    return sql.SQL(
        "SELECT min(u.i) FROM unnest(%s::int[], {}) AS u(i, {}) WHERE NOT ({} < {})"
    ).format(
        sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in names),
        sql.SQL(", ").join(sql.Identifier(n) for n in names),
        side("l"),
        side("h"),
    )


def range_predicate(
    table: TableInfo,
    lower: Bound,
    upper: Bound,
    *,
    alias: str | None = None,
    collate_c: bool = False,
) -> sql.Composable:
    """`lower <= key < upper` as row comparisons; a missing bound is open."""
    if not table.key:
        return sql.SQL("true")
    key = _key_expr(table, alias, collate_c)
    parts: list[sql.Composable] = []
    if lower is not None:
        parts.append(sql.SQL("{} >= {}").format(key, _bound_expr(table, lower)))
    if upper is not None:
        parts.append(sql.SQL("{} < {}").format(key, _bound_expr(table, upper)))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def row_hash(
    table: TableInfo,
    columns: Sequence[Column] | None = None,
    seed: sql.Composable | None = None,
) -> sql.Composable:
    """A 64-bit hash of each row's `columns` (default: the copied ones), equal on both sides.

    On PostgreSQL 14+ `hash_record_extended` hashes each value with its type's own hash
    function (about 2x cheaper than hashing the row's text, 4x cheaper than md5), for types
    where equal hashes mean equal text; intervals, numerics and ranges by their binary form,
    which shows what their text shows (interval text cost a quarter of the example app's
    appointments checksum); other columns are hashed as text under the pinned output
    settings, and text columns bytewise (COLLATE "C"). Older servers hash the row text with
    `hashtextextended`. Both functions back hash partitioning, whose stored partitions rely
    on them staying the same across platforms and major versions.
    """
    columns = table.copy_columns if columns is None else columns
    seed = sql.Literal(0) if seed is None else seed
    if not table.hash_records:
        text = row_text(columns)
        if table.transcode:  # its UTF8 bytes, spelled out in ASCII by the escape format
            text = sql.SQL("encode(convert_to({}, 'UTF8'), 'escape')").format(text)
        return sql.SQL("hashtextextended({}, {})").format(text, seed)
    values = []
    for col in columns:
        ident = sql.Identifier(col.name)
        if col.hash_sent:
            send = sql.Identifier("pg_catalog", col.hash_sent)
            values.append(sql.SQL("{}({})").format(send, ident))
        elif col.blank_padded and table.mixed_rows:  # its text as shown, trailing blanks too
            shown = shown_text(col)
            values.append(
                sql.SQL("convert_to({}, 'UTF8')").format(shown) if table.transcode else shown
            )
        elif table.transcode and (col.collatable or not col.hash_native):
            values.append(sql.SQL("convert_to({}, 'UTF8')").format(_as_text(col)))
        elif not col.hash_native:
            values.append(_as_text(col))
        elif col.collatable:
            values.append(sql.SQL('{} COLLATE "C"').format(ident))
        else:
            values.append(ident)
    arrays = [(i, sql.Identifier(c.name)) for i, c in enumerate(columns) if c.native_array]
    if arrays:
        seed = sql.SQL("{}::bigint # {}").format(seed, _array_shapes(arrays))
    return sql.SQL("hash_record_extended(ROW({}), {})").format(sql.SQL(", ").join(values), seed)


def _as_text(col: Column) -> sql.Composable:
    """A column's value as text; xml (an xml array's elements too) as stored, since its output
    drops an XML declaration."""
    return sql.SQL("{}::text").format(_as_stored(sql.Identifier(col.name), col))


def _array_shapes(arrays: Sequence[tuple[int, sql.Identifier]]) -> sql.Composable:
    """A hash of the shapes of a row's natively hashed arrays that are not one dimension from
    1 (`{{1,2},{3,4}}`, `[0:1]={1,2}`), else 0: the seed of a row with only plain arrays, so a
    checksum recorded before shapes counted still matches where none has another shape."""
    odd = [
        sql.SQL("array_ndims({a}) > 1 OR array_lower({a}, 1) <> 1").format(a=a) for _, a in arrays
    ]
    shapes = sql.SQL(", ").join(
        sql.SQL("{} || array_dims({})").format(sql.Literal(f"{i}:"), a) for i, a in arrays
    )
    return sql.SQL(
        "CASE WHEN {} THEN hashtextextended(concat_ws(' ', VARIADIC ARRAY[{}]::text[]), 0) "
        "ELSE 0 END"
    ).format(sql.SQL(" OR ").join(odd), shapes)


def shown_text(column: Column) -> sql.Composable:
    """A value's text as its output shows it: a bpchar's with its trailing blanks, which its
    cast to text drops (xml's cast keeps the declaration its output drops)."""
    ident = sql.Identifier(column.name)
    if column.blank_padded:
        return sql.SQL("pg_catalog.textin(pg_catalog.bpcharout({}))").format(ident)
    return sql.SQL("{}::text").format(ident)


def text_md5(table: TableInfo, text: sql.Composable) -> sql.Composable:
    """md5 of a text expression, equal on both sides: over its UTF8 bytes when the source's
    database is encoded otherwise (md5 hashes the database's own bytes)."""
    if table.transcode:
        return sql.SQL("md5(convert_to({}, 'UTF8'))").format(text)
    return sql.SQL("md5({})").format(text)


def row_hash_sum(table: TableInfo) -> sql.Composable:
    """Order-independent checksum of a set of rows: the sum of each row's hash, as text. The
    prefix names the method, so a checksum is never compared with one made another way.

    `hash_record_extended` combines its values' hashes linearly (31 * h + h'), so the sum of
    its results over rows is a sum over columns of each column's values: it would not change
    when two rows swap a column's values (two patients' diagnoses). Each row's hash is mixed
    first (`hashint8extended`, not linear), as the row text's hash already is."""
    hashed = row_hash(table)
    if table.hash_records and table.mixed_rows:
        hashed = sql.SQL("hashint8extended({}, 0)").format(hashed)
    return sql.SQL("{} || coalesce(sum({}), 0)::text").format(
        sql.Literal(empty_checksum(table)[0]), hashed
    )


def range_checksum_query(
    table: TableInfo, lower: Bound, upper: Bound, *, collate_c: bool = False
) -> sql.Composed:
    """count, checksum and the largest key of one range, computed inside the database."""
    # uuid has no max(); only integer keys have a meaningful "largest key" worth recording.
    last_key = (
        sql.SQL("max({})::text").format(sql.Identifier(table.key[0]))
        if table.key_kind is KeyKind.INTEGER
        else sql.SQL("NULL::text")
    )
    return sql.SQL("SELECT count(*), {}, {} FROM {} WHERE {}").format(
        row_hash_sum(table),
        last_key,
        rows_of(table),
        range_predicate(table, lower, upper, collate_c=collate_c),
    )


def empty_checksum(table: TableInfo) -> str:
    """What `row_hash_sum` gives for no rows. Its letter names the method: "t" the row's text,
    "r" per-type hashes, "s" per-type hashes with some values in binary form; for a source not
    encoded in UTF8 (`transcode`), "u" per-type hashes and "v" the row's text, both over UTF8
    bytes. Per-type hashes are mixed row by row since this release: "R", "S" and "U"; the
    lower-case letters were recorded before (a checksum recorded another way is measured that
    way again: `hashed_like`)."""
    if not table.hash_records:
        return ("v" if table.transcode else "t") + "0"
    if table.transcode:
        letter = "u"
    else:
        letter = "s" if any(c.hash_sent for c in table.copy_columns) else "r"
    return (letter.upper() if table.mixed_rows else letter) + "0"


def hashed_like(table: TableInfo, checksum: str | None) -> TableInfo:
    """`table` as `checksum` was hashed, by its method letter: a range recorded by an older
    release ("r": numerics, intervals and ranges as text; "s" and "r" also in the source's own
    encoding; "t": the row's text) is measured the same way, so that an upgrade does not read
    as a change of every such range (a change still does). Any other letter: `table` as it
    is."""
    letter = (checksum or "")[:1]
    if letter == empty_checksum(table)[0]:
        return table
    if letter in ("t", "v"):  # the row's text, of a source upgraded to 14+ since
        return dataclasses.replace(table, transcode=letter == "v", hash_records=False)
    if letter not in ("r", "s", "u", "R", "S", "U") or not table.hash_records:
        return table
    table = dataclasses.replace(table, mixed_rows=letter.isupper())
    if letter in ("u", "U"):
        return table
    plain = dataclasses.replace(table, transcode=False)
    if letter in ("s", "S"):
        return plain
    return dataclasses.replace(
        plain, columns=tuple(dataclasses.replace(c, hash_sent="") for c in table.columns)
    )


def can_bucket(table: TableInfo, ranges: Sequence[KeyRange]) -> bool:
    """Whether `bucketed_checksum_query` should measure these ranges in one pass.

    Only single-column uuid or text keys: random uuids do not follow the heap's order, so each
    range's own scan visits pages all over the table (measured: 30-40% slower than one pass at
    450k rows). Integer keys usually follow insertion order, and composite keys often lead with
    a column rows arrive grouped by; their ranges are contiguous scans, cheaper than grouping
    every row (measured: one pass 0-60% slower). The ranges must be contiguous.
    """
    if table.key_kind is not KeyKind.KEYSET or len(table.key) != 1 or len(ranges) < 2:
        return False
    if table.column(table.key[0]).type_sql.endswith("]"):  # ARRAY[bounds] would be 2-D
        return False
    return all(a.upper is not None and a.upper == b.lower for a, b in pairwise(ranges))


def bucketed_checksum_query(
    table: TableInfo, ranges: Sequence[KeyRange], *, collate_c: bool = False
) -> sql.Composed:
    """count and checksum of each of several contiguous ranges, in one scan of their span.

    `width_bucket` finds each row's range by binary search over the inner bounds (any sortable
    type). Rows group by bucket `i`, the i-th range; a range without rows has no row in the
    result.
    """
    key = _key_expr(table, None, collate_c)
    bounds = [_bound_expr(table, r.upper) for r in ranges[:-1]]  # type: ignore[arg-type]
    return sql.SQL(
        "SELECT width_bucket({}, ARRAY[{}]), count(*), {} FROM {} WHERE {} GROUP BY 1"
    ).format(
        key,
        sql.SQL(", ").join(bounds),
        row_hash_sum(table),
        rows_of(table),
        range_predicate(table, ranges[0].lower, ranges[-1].upper, collate_c=collate_c),
    )


def copy_out_query(
    table: TableInfo, lower: Bound, upper: Bound, *, binary: bool, collate_c: bool = False
) -> sql.Composed:
    """Rows in key order: the target's primary key, kept during the load, then takes each
    range's keys side by side instead of all over the index. Random keys (uuid) inserted in
    their heap order cost the target about twice the CPU of the same rows in key order."""
    return _copy_out(table, range_predicate(table, lower, upper, collate_c=collate_c), binary)


def key_texts(table: TableInfo, alias: str | None = None) -> sql.Composable:
    """The key columns as text, to send to the other server (read under NORMALIZE_TEXT_OUTPUT)."""
    return sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(alias, k) if alias else sql.Identifier(k))
        for k in table.key
    )


def keys_in(table: TableInfo) -> sql.Composable:
    """`(k1, k2) IN (...)` over text arrays, one per key column, cast back to the key types."""
    cols = [f"k{i}" for i in range(len(table.key))]
    return sql.SQL("({}) IN (SELECT {} FROM unnest({}) AS u({}))").format(
        sql.SQL(", ").join(sql.Identifier(k) for k in table.key),
        sql.SQL(", ").join(
            sql.SQL("CAST(u.{} AS {})").format(sql.Identifier(c), sql.SQL(table.column(k).type_sql))
            for c, k in zip(cols, table.key, strict=True)
        ),
        sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in cols),
        sql.SQL(", ").join(sql.Identifier(c) for c in cols),
    )


def key_arrays(keys: Sequence[tuple[str, ...]], width: int) -> list[list[str]]:
    """Keys as `key_texts` read them, as the text arrays `keys_in` takes, column by column."""
    return [[k[i] for k in keys] for i in range(width)]


def copy_out_keys(table: TableInfo, keys: Sequence[Sequence[str]], *, binary: bool) -> sql.Composed:
    """The rows of these keys (each as text, column by column), as `copy_out_query` sends a
    range's: the rows a range's upsert takes aside from other ranges (`take_aside_holders`)."""
    listed = sql.SQL(", ").join(
        sql.SQL("({})").format(
            sql.SQL(", ").join(
                sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(table.column(k).type_sql))
                for k, v in zip(table.key, values, strict=True)
            )
        )
        for values in keys
    )
    return _copy_out(
        table,
        sql.SQL("({}) IN ({})").format(column_list([table.column(k) for k in table.key]), listed),
        binary,
    )


def _copy_out(table: TableInfo, where: sql.Composable, binary: bool) -> sql.Composed:
    order = (
        sql.SQL(" ORDER BY {}").format(column_list([table.column(k) for k in table.key]))
        if table.key
        else sql.SQL("")
    )
    return sql.SQL("COPY (SELECT {} FROM {} WHERE {}{}) TO STDOUT {}").format(
        _copied_values(table.copy_columns),
        rows_of(table),
        where,
        order,
        sql.SQL("(FORMAT binary)") if binary else sql.SQL(""),
    )


_XML_AS_TEXT = {"xml": "pg_catalog.text", "xml[]": "pg_catalog.xml[]::pg_catalog.text[]"}


def _copied_values(columns: Sequence[Column]) -> sql.Composable:
    """The values a COPY out sends: the columns, xml as its stored text (see Column.xml_text)."""
    return sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(_as_stored(sql.Identifier(c.name), c), sql.Identifier(c.name))
        if c.xml_text
        else sql.Identifier(c.name)
        for c in columns
    )


def _as_stored(value: sql.Composable, col: Column) -> sql.Composable:
    """`value` of `col`; an xml one (an xml array's elements too) cast to its stored text."""
    if not col.xml_text:
        return value
    return sql.SQL("{}::{}").format(value, sql.SQL(_XML_AS_TEXT[col.xml_text]))


def copy_in_query(
    target: sql.Composable, columns: Sequence[Column], *, binary: bool
) -> sql.Composed:
    listed = sql.SQL(" ({})").format(column_list(columns)) if columns else sql.SQL("")
    return sql.SQL("COPY {}{} FROM STDIN {}").format(
        target, listed, sql.SQL("(FORMAT binary)") if binary else sql.SQL("")
    )


def create_staging(table: TableInfo, staging: str) -> sql.Composed:
    """A temp table of the copied columns, dropped at commit: lives inside one transaction,
    so poolers are fine. Without the table's constraints (NOT NULL on a column only the
    target has) and generated columns (computed for every staged row, they could cost more
    than the copy)."""
    return _temp_like(table, staging, table.copy_columns)


def create_key_table(table: TableInfo, name: str) -> sql.Composed:
    """A temp table of the table's key columns (their types and collations), dropped at commit."""
    return _temp_like(table, name, [table.column(k) for k in table.key])


def _temp_like(table: TableInfo, name: str, columns: Sequence[Column]) -> sql.Composed:
    return sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
        sql.Identifier(name), column_list(columns), table_ident(table)
    )


def delete_missing(
    table: TableInfo, staging: str, lower: Bound, upper: Bound, *, collate_c: bool = False
) -> sql.Composed:
    """Delete target rows in the range whose key the source no longer has."""
    return sql.SQL(
        "DELETE FROM {} AS t WHERE {} AND NOT EXISTS (SELECT 1 FROM {} AS s WHERE {})"
    ).format(
        rows_of(table),
        range_predicate(table, lower, upper, alias="t", collate_c=collate_c),
        sql.Identifier(staging),
        _same_key(table, "s", "t"),
    )


def _same_key(table: TableInfo, left: str, right: str) -> sql.Composable:
    """`left`'s row has `right`'s key (two aliases of the table's rows)."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, k), sql.Identifier(right, k))
        for k in table.key
    )


def upsert_from_staging(
    table: TableInfo,
    staging: str,
    lower: Bound,
    upper: Bound,
    *,
    collate_c: bool = False,
    write_rules: bool = False,
) -> list[sql.Composable]:
    """Insert new rows and update changed ones; rows whose text is identical are not touched.
    One INSERT ... ON CONFLICT, or where the target table has an INSERT or UPDATE rule (which
    ON CONFLICT refuses: an UPDATE rule even where it does not fire, as under replica mode)
    an UPDATE and then an INSERT of the rest: the range's checkpoint lock keeps any other
    writer of its keys out in between."""
    cols = table.copy_columns
    overriding = sql.SQL("OVERRIDING SYSTEM VALUE ") if table.has_identity_always else sql.SQL("")
    # An identity column GENERATED ALWAYS may be updated only to DEFAULT: a row whose value of
    # it changed is replaced instead (`delete_unwritable`), where FK triggers are skipped.
    others = [c for c in cols if c.name not in table.key and c.identity != "a"]
    if write_rules:
        return _update_then_insert(table, staging, lower, upper, collate_c, overriding, others)
    key = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)
    if others:
        assignments = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c.name)) for c in others
        )
        action = sql.SQL("DO UPDATE SET {} WHERE {} IS DISTINCT FROM {}").format(
            assignments, row_text(others, "t"), row_text(others, "excluded")
        )
    else:
        action = sql.SQL("DO NOTHING")
    conflict = sql.SQL(" ON CONFLICT ({}) {}").format(key, action)
    new_or_changed = _new_or_changed(table, lower, upper, collate_c)
    return [_insert_staged(table, staging, overriding, new_or_changed, conflict)]


def _insert_staged(
    table: TableInfo,
    staging: str,
    overriding: sql.Composable,
    condition: sql.Composable,
    conflict: sql.Composable | None = None,
) -> sql.Composed:
    """Insert the staged rows `s` that meet `condition`."""
    return sql.SQL(
        "INSERT INTO {t} AS t ({cols}) {overriding}SELECT {s_cols} FROM {staging} AS s "
        "WHERE {condition}{conflict}"
    ).format(
        t=table_ident(table),
        cols=column_list(table.copy_columns),
        overriding=overriding,
        s_cols=column_list(table.copy_columns, "s"),
        staging=sql.Identifier(staging),
        condition=condition,
        conflict=conflict if conflict is not None else sql.SQL(""),
    )


def _update_then_insert(
    table: TableInfo,
    staging: str,
    lower: Bound,
    upper: Bound,
    collate_c: bool,
    overriding: sql.Composable,
    others: Sequence[Column],
) -> list[sql.Composable]:
    """`upsert_from_staging` without ON CONFLICT: the range's rows whose text differs from
    their staged row's are updated, then the staged rows whose key the range lacks inserted."""
    statements: list[sql.Composable] = []
    if others:
        statements.append(
            sql.SQL(
                "UPDATE {rows} AS t SET {assignments} FROM {staging} AS s "
                "WHERE {in_range} AND {same_key} AND {t_row} IS DISTINCT FROM {s_row}"
            ).format(
                rows=rows_of(table),
                assignments=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c.name), sql.Identifier("s", c.name))
                    for c in others
                ),
                staging=sql.Identifier(staging),
                in_range=range_predicate(table, lower, upper, alias="t", collate_c=collate_c),
                same_key=_same_key(table, "t", "s"),
                t_row=row_text(others, "t"),
                s_row=row_text(others, "s"),
            )
        )
    absent = sql.SQL("NOT EXISTS (SELECT 1 FROM {} AS o WHERE {} AND {})").format(
        rows_of(table),
        range_predicate(table, lower, upper, alias="o", collate_c=collate_c),
        _same_key(table, "o", "s"),
    )
    statements.append(_insert_staged(table, staging, overriding, absent))
    return statements


def row_text(columns: Sequence[Column], alias: str | None = None) -> sql.Composed:
    """A row's text as catch-ups, pre-14 checksums and verify's row diffs compare it: xml as
    its stored text, since its output drops an XML declaration (a change of that alone would
    read as none)."""

    names = (sql.Identifier(alias, c.name) if alias else sql.Identifier(c.name) for c in columns)
    return sql.SQL("ROW({})::text").format(
        sql.SQL(", ").join(_as_stored(name, c) for name, c in zip(names, columns, strict=True))
    )


def unwritable_columns(table: TableInfo) -> list[Column]:
    """The columns an upsert's UPDATE cannot bring to the source's value: the key, where its
    type may call two texts equal (citext 'A' = 'a', numeric 7.0 = 7.00, a nondeterministic
    collation: ON CONFLICT finds the old key and keeps it), and an identity column GENERATED
    ALWAYS (an UPDATE may set it only to DEFAULT). Empty for the usual integer, uuid or text
    keys, whose equality is their text's."""
    keys = [table.column(k) for k in table.key]
    faithful = all(c.hash_native and not c.own_collation and not c.native_array for c in keys)
    always = [c for c in table.copy_columns if c.identity == "a" and c.name not in table.key]
    return ([] if faithful else keys) + always


def delete_unwritable(
    table: TableInfo, staging: str, lower: Bound, upper: Bound, *, collate_c: bool = False
) -> sql.Composed | None:
    """Delete the range's rows whose `unwritable_columns` differ from their staged row's: the
    upsert then inserts them as staged. Every other changed row is updated in place, which
    keeps what a column only the target has holds. Only with FK triggers skipped (replica
    mode) or on a table no foreign key references, or a cascade would take the rows'
    children. None when no column needs it."""
    return _unwritable_rows(
        "DELETE FROM {} AS t USING {} AS s WHERE {}", table, staging, lower, upper, collate_c
    )


def any_unwritable(
    table: TableInfo, staging: str, lower: Bound, upper: Bound, *, collate_c: bool = False
) -> sql.Composed | None:
    """Whether the range has a row `delete_unwritable` would replace (asked where it cannot:
    without replica mode); None when no column needs it."""
    return _unwritable_rows(
        "SELECT EXISTS (SELECT 1 FROM {} AS t JOIN {} AS s ON {})",
        table,
        staging,
        lower,
        upper,
        collate_c,
    )


def _unwritable_rows(
    template: str, table: TableInfo, staging: str, lower: Bound, upper: Bound, collate_c: bool
) -> sql.Composed | None:
    """`template` over the range's rows `t` and their staged rows `s`, where the
    `unwritable_columns` differ."""
    columns = unwritable_columns(table)
    if not columns:
        return None
    where = sql.SQL("{} AND {} AND {} IS DISTINCT FROM {}").format(
        range_predicate(table, lower, upper, alias="t", collate_c=collate_c),
        _same_key(table, "t", "s"),
        row_text(columns, "t"),
        row_text(columns, "s"),
    )
    return sql.SQL(template).format(rows_of(table), sql.Identifier(staging), where)


def _new_or_changed(table: TableInfo, lower: Bound, upper: Bound, collate_c: bool) -> sql.Composed:
    """The staged row `s` is new or changed: no row of the range has its text.

    Only such rows are proposed to the upsert: INSERT checks a proposed row's CHECK
    constraints before it finds the conflict, and an unchanged row the source kept under a
    NOT VALID one would fail it (a changed or new row passed it on the source). Looked up in
    the range's own rows (ONLY those of a parent by inheritance): unbounded, the planner
    hashed the whole target table for each range of 100,000 rows."""
    cols = table.copy_columns
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM {rows} AS o WHERE {in_range} AND {same_row} "
        "AND {o_row} IS NOT DISTINCT FROM {s_row})"
    ).format(
        rows=rows_of(table),
        in_range=range_predicate(table, lower, upper, alias="o", collate_c=collate_c),
        same_row=_same_key(table, "o", "s"),
        o_row=row_text(cols, "o"),
        s_row=row_text(cols, "s"),
    )


def propose(
    table: TableInfo, staging: str, proposed: str, lower: Bound, upper: Bound, *, collate_c: bool
) -> list[sql.Composable]:
    """`proposed` (made like staging) holds again the staged rows the upsert would propose,
    with statistics: usually a few, which the planner then looks up by index."""
    cols = table.copy_columns
    return [
        sql.SQL("DELETE FROM {}").format(sql.Identifier(proposed)),
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} AS s WHERE {}").format(
            sql.Identifier(proposed),
            column_list(cols),
            column_list(cols, "s"),
            sql.Identifier(staging),
            _new_or_changed(table, lower, upper, collate_c),
        ),
        sql.SQL("ANALYZE {}").format(sql.Identifier(proposed)),
    ]


def take_aside_holders(
    table: TableInfo, proposed: str, aside: str, index: UniqueIndex
) -> sql.Composed:
    """Delete the target's rows that hold a value of `index` a proposed row (`propose`) of
    another key now has: a unique value that moved between rows, which the upsert, updating
    row by row, would collide with. Returns each one's key as text and whether a proposed row
    has that key (the upsert then puts it back as the source has it); the keys of the others,
    rows of other ranges, are added to `aside` (made with the key columns)."""
    matches = sql.SQL(" AND ").join(
        sql.SQL(
            "({t} = {s} OR ({t} IS NULL AND {s} IS NULL))"
            if index.nulls_not_distinct
            else "{t} = {s}"
        ).format(t=sql.Identifier("t", c), s=sql.Identifier("s", c))
        for c in index.columns
    )
    keys = [table.column(k) for k in table.key]
    return sql.SQL(
        "WITH gone AS (DELETE FROM {rows} AS t USING {proposed} AS s WHERE {matches} "
        "AND NOT ({same}) RETURNING {t_keys}), "
        "found AS (SELECT {g_keys}, p.{first} IS NOT NULL AS proposed FROM gone AS g "
        "LEFT JOIN {proposed} AS p ON {joined}), "
        "elsewhere AS (INSERT INTO {aside} SELECT {g_keys} FROM found AS g WHERE NOT proposed) "
        "SELECT {texts}, proposed FROM found AS g"
    ).format(
        rows=rows_of(table),
        proposed=sql.Identifier(proposed),
        matches=matches,
        same=_same_key(table, "t", "s"),
        t_keys=column_list(keys, "t"),
        g_keys=column_list(keys, "g"),
        first=sql.Identifier(table.key[0]),
        joined=_same_key(table, "p", "g"),
        aside=sql.Identifier(aside),
        texts=sql.SQL(", ").join(
            sql.SQL("{}::text").format(sql.Identifier("g", k)) for k in table.key
        ),
    )


def ranges_holding(
    table: TableInfo, aside: str, ranges: Sequence[tuple[str, KeyRange]], *, collate_c: bool
) -> sql.Composed:
    """Which of these ranges (by partition key) hold a key of `aside`, as ranges compare
    keys: one SELECT per range, in one statement."""
    return sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {} WHERE EXISTS (SELECT 1 FROM {} AS k WHERE {})").format(
            sql.Literal(partition),
            sql.Identifier(aside),
            range_predicate(table, r.lower, r.upper, alias="k", collate_c=collate_c),
        )
        for partition, r in ranges
    )


def any_row_in_range(
    table: TableInfo, lower: Bound, upper: Bound, *, collate_c: bool = False
) -> sql.Composed:
    return sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(
        rows_of(table), range_predicate(table, lower, upper, collate_c=collate_c)
    )


def delete_range(
    table: TableInfo, lower: Bound, upper: Bound, *, collate_c: bool = False
) -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE {}").format(
        rows_of(table), range_predicate(table, lower, upper, collate_c=collate_c)
    )
