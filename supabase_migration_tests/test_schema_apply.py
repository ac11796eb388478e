"""The schema step against real servers: dump mode (Pagila), alembic mode (the example app), none.

Catalogs are compared with queries written here, independent of the product's own counting.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import textwrap
import urllib.parse
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from supabase_migration import schema_apply
from supabase_migration.conninfo import Endpoint, parse_database_url
from supabase_migration.errors import ConfigError, PreflightError, SchemaError
from supabase_migration.localpg import find_binaries
from supabase_migration.schema_apply import (
    SchemaMode,
    SchemaResult,
    Statement,
    apply_schema,
    dump_batches,
    filter_dump,
    find_pg_dump,
    run_pg_dump,
    split_dump,
)
from supabase_migration.verify import schema_objects

from .testbed import PgBouncer, find_pgbouncer, require

# -- helpers ---------------------------------------------------------------------------------------


def _urls(source_db, target_url: str, endpoint: Endpoint | None = None):
    return (
        parse_database_url(source_db.url, label="source"),
        parse_database_url(target_url, label="target", endpoint=endpoint),
    )


def load_sql_file(url: str, path: Path) -> None:
    """psql -f, as a user would load a dump (COPY ... FROM stdin needs psql)."""
    binaries = find_binaries("system")
    assert binaries is not None
    parsed = parse_database_url(url, label="fixture")
    done = subprocess.run(
        [str(binaries.tool("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
        env={"PATH": "/usr/bin:/bin", **parsed.libpq_env()},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def execute(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)  # type: ignore[arg-type]


# Everything a schema is made of, in a form that compares across servers (names, definitions).
SNAPSHOT_QUERIES = {
    "relations": """
        SELECT c.relname, c.relkind::text FROM pg_class c
        WHERE c.relnamespace = %(nsp)s::regnamespace ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text,
               a.attgenerated::text
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = %(nsp)s::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = %(nsp)s::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relnamespace = %(nsp)s::regnamespace ORDER BY 1""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid) FROM pg_class c
        WHERE c.relnamespace = %(nsp)s::regnamespace AND c.relkind IN ('v', 'm') ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prokind::text,
               md5(coalesce(p.prosrc, '')), pg_get_function_result(p.oid)
        FROM pg_proc p WHERE p.pronamespace = %(nsp)s::regnamespace ORDER BY 1, 2""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = %(nsp)s::regnamespace AND NOT t.tgisinternal ORDER BY 1, 2""",
    "types": """
        SELECT t.typname, t.typtype::text,
               coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                         FROM pg_enum e WHERE e.enumtypid = t.oid), ''),
               coalesce(format_type(nullif(t.typbasetype, 0), t.typtypmod), '')
        FROM pg_type t WHERE t.typnamespace = %(nsp)s::regnamespace
          AND t.typtype IN ('e', 'd', 'c', 'r') ORDER BY 1""",
    "partitions": """
        SELECT i.inhrelid::regclass::text, i.inhparent::regclass::text,
               coalesce(pg_get_expr(c.relpartbound, c.oid), '')
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE c.relnamespace = %(nsp)s::regnamespace ORDER BY 1""",
    "comments": """
        SELECT c.relname, d.objsubid, d.description FROM pg_description d
        JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
        WHERE c.relnamespace = %(nsp)s::regnamespace ORDER BY 1, 2""",
}


def snapshot(url: str, schema: str = "public") -> dict[str, list[tuple]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = public")
        return {
            name: conn.execute(query, {"nsp": schema}).fetchall()  # type: ignore[arg-type]
            for name, query in SNAPSHOT_QUERIES.items()
        }


def bookkeeping_rows(admin_url: str) -> list[tuple]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('supabase_migration.schema_applied')").fetchone()[
            0
        ]:
            return []
        return conn.execute(
            "SELECT mode, dump_hash, revision, objects FROM supabase_migration.schema_applied "
            "ORDER BY id"
        ).fetchall()


def has_schema(url: str, name: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)
            ).fetchone()[0]
        )


def public_tables(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind IN ('r', 'p') ORDER BY 1"
            )
        ]


# -- dump mode -------------------------------------------------------------------------------------


def test_pagila_dump_mode_recreates_every_object_and_is_idempotent(
    source_db, target_db, pagila_dir
):
    load_sql_file(source_db.url, pagila_dir / "pagila-schema.sql")
    load_sql_file(source_db.url, pagila_dir / "pagila-data.sql")
    source, target = _urls(source_db, target_db.url)

    result = apply_schema(SchemaMode.DUMP, source_url=source, target_url=target, schemas=["public"])

    assert result.changed and result.mode is SchemaMode.DUMP
    assert result.dump_hash and len(result.dump_hash) == 64
    assert result.revision is None
    expected = snapshot(source_db.url)
    got = snapshot(target_db.admin_url)
    for kind in SNAPSHOT_QUERIES:
        assert got[kind] == expected[kind], f"{kind} differ between source and target"
    # The things the issue names, present by name (the equality above already implies it).
    relkinds = {kind for _, kind in got["relations"]}
    assert {"r", "p", "v", "m", "S", "i"} <= relkinds
    assert ("b\u0131g\u0131nt", "d", "", "bigint") in got["types"]  # non-ASCII identifier
    assert any(name == "film_fulltext_trigger" for _, name, _ in got["triggers"])
    assert len([p for p in got["partitions"] if p[2].startswith("FOR VALUES")]) == 7
    assert result.objects_created == len(got["relations"]) + 3 + len(got["functions"])
    meta = result.metadata()
    assert meta["mode"] == "dump" and meta["changed"] is True
    assert meta["dump_hash"] == result.dump_hash
    assert bookkeeping_rows(target_db.admin_url) == [
        ("dump", result.dump_hash, None, result.objects_created)
    ]

    again = apply_schema(SchemaMode.DUMP, source_url=source, target_url=target, schemas=["public"])

    assert not again.changed
    assert again.objects_created == 0
    assert again.dump_hash == result.dump_hash
    assert snapshot(target_db.admin_url) == got
    assert len(bookkeeping_rows(target_db.admin_url)) == 1


def test_bookkeeping_schema_is_closed_to_api_roles(source_db, target_db):
    execute(source_db.url, "CREATE TABLE t (id int PRIMARY KEY)")
    source, target = _urls(source_db, target_db.url)
    apply_schema("dump", source_url=source, target_url=target, schemas=["public"])
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        for role in ("anon", "authenticated"):
            usage, select = conn.execute(
                "SELECT has_schema_privilege(%s, 'supabase_migration', 'USAGE'), "
                "has_table_privilege(%s, 'supabase_migration.schema_applied', 'SELECT')",
                (role, role),
            ).fetchone()
            assert not usage and not select, role


SMALL_SCHEMA = """
CREATE SCHEMA clinic;
CREATE TYPE clinic.status AS ENUM ('new', 'done');
CREATE DOMAIN clinic.positive AS integer CHECK (VALUE > 0);
CREATE TABLE clinic.visits (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status clinic.status NOT NULL DEFAULT 'new',
    units clinic.positive,
    note text,
    updated_at timestamptz
);
COMMENT ON TABLE clinic.visits IS 'One row per visit';
COMMENT ON COLUMN clinic.visits.note IS 'Free text; may hold PHI';
CREATE FUNCTION clinic.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();  -- a ; and a -- inside the body
    RETURN NEW;
END $$;
CREATE TRIGGER visits_touch BEFORE UPDATE ON clinic.visits
    FOR EACH ROW EXECUTE FUNCTION clinic.touch();
CREATE VIEW clinic.open_visits AS SELECT id, note FROM clinic.visits WHERE status = 'new';
"""


def test_dump_mode_through_the_transaction_pooler(source_db, target_db):
    execute(source_db.url, SMALL_SCHEMA)
    source, target = _urls(source_db, target_db.pooler_url, Endpoint.TRANSACTION_POOLER)
    assert target.uses_transaction_pooler

    first = apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])
    second = apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])

    assert first.changed and not second.changed
    assert snapshot(target_db.admin_url, "clinic") == snapshot(source_db.url, "clinic")


def test_changed_source_schema_is_refused(source_db, target_db):
    execute(source_db.url, SMALL_SCHEMA)
    source, target = _urls(source_db, target_db.url)
    apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])
    before = snapshot(target_db.admin_url, "clinic")
    execute(source_db.url, "ALTER TABLE clinic.visits ADD COLUMN room text")

    with pytest.raises(ConfigError) as caught:  # the user must choose: bad input, exit 2
        apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])

    message = str(caught.value)
    assert "source schema changed" in message and "--schema-mode none" in message
    assert snapshot(target_db.admin_url, "clinic") == before


def test_objects_the_tool_did_not_create_are_refused(source_db, target_db):
    execute(source_db.url, SMALL_SCHEMA)
    execute(target_db.url, "CREATE SCHEMA clinic; CREATE TABLE clinic.visits (id int)")
    source, target = _urls(source_db, target_db.url)

    with pytest.raises(ConfigError) as caught:
        apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])

    assert "clinic.visits" in str(caught.value)
    assert "--schema-mode none" in str(caught.value)
    assert not has_schema(target_db.admin_url, "supabase_migration")


def test_objects_dump_mode_made_meanwhile_are_not_refused(source_db, target_db, monkeypatch):
    """Two first runs at once: one read no record of a dump, then found the objects the other
    had committed since with its record, and was refused as if they were not the tool's,
    before it reached the lock under which the record decides."""
    execute(source_db.url, SMALL_SCHEMA)
    source, target = _urls(source_db, target_db.url)
    apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert schema_apply.objects_dump_mode_refuses(conn, ["clinic"]) is None
    # and the whole preflight, its read of the record having come before the other's commit
    from supabase_migration import schema_step
    from supabase_migration.manifest import Manifest

    monkeypatch.setattr(schema_step, "applied_before", lambda *_: False)
    manifest = Manifest(tables=(), schemas=("clinic",), schema_mode="dump")
    findings = schema_step.preflight(manifest, source, target)
    assert "target-objects" not in [f.code for f in findings], findings


@pytest.fixture
def source_only_role(source_db):
    """A role that exists on the source server only (roles are cluster-wide: drop it after)."""
    name = "sm_" + source_db.name[-8:] + "_reader"
    execute(source_db.url, f"CREATE ROLE {name} NOLOGIN")
    yield name
    execute(source_db.url, f"DROP OWNED BY {name}; DROP ROLE {name}")


def test_failing_statement_leaves_nothing_and_names_the_statement(
    source_db, target_db, source_only_role
):
    execute(
        source_db.url,
        SMALL_SCHEMA
        + f"""
        ALTER TABLE clinic.visits ENABLE ROW LEVEL SECURITY;
        CREATE POLICY readers ON clinic.visits FOR SELECT TO {source_only_role} USING (true);
        INSERT INTO clinic.visits (note) VALUES ('PHI-VALUE-4711');
        """,
    )
    source, target = _urls(source_db, target_db.url)

    with pytest.raises(SchemaError) as caught:
        apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])

    message = str(caught.value)
    assert "nothing was changed" in message
    assert source_only_role in message and "CREATE POLICY readers" in message
    assert "PHI-VALUE-4711" not in message
    assert not has_schema(target_db.admin_url, "clinic")
    assert not has_schema(target_db.admin_url, "supabase_migration")


def test_extension_in_public_on_the_source_lands_in_extensions(source_db, target_db):
    execute(
        source_db.url,
        """
        CREATE EXTENSION "uuid-ossp" WITH SCHEMA public;
        CREATE EXTENSION pg_trgm WITH SCHEMA public;
        CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT public.uuid_generate_v4(), title text);
        CREATE INDEX docs_title_trgm ON docs USING gin (title public.gin_trgm_ops);
        COMMENT ON TABLE docs IS 'documents';
        CREATE FUNCTION public.new_doc_id() RETURNS uuid LANGUAGE plpgsql SECURITY DEFINER
          SET search_path = public, pg_temp AS $$ BEGIN RETURN uuid_generate_v4(); END $$;
        """,
    )
    # A body line as pg_dump writes a routine's own search_path: the user's, left as it is.
    pinned = "\n    SET search_path TO 'public'\n"
    execute(source_db.url, f"CREATE PROCEDURE public.pin() LANGUAGE sql AS $${pinned}$$")
    source, target = _urls(source_db, target_db.url)

    result = apply_schema("dump", source_url=source, target_url=target, schemas=["public"])

    assert result.changed
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        placed = dict(
            conn.execute(
                "SELECT e.extname, n.nspname FROM pg_extension e "
                "JOIN pg_namespace n ON n.oid = e.extnamespace"
            ).fetchall()
        )
        assert placed["pg_trgm"] == "extensions" and placed["uuid-ossp"] == "extensions"
        conn.execute("SET search_path = public")  # so that definitions show their schemas
        default = conn.execute(
            "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
            "WHERE adrelid = 'public.docs'::regclass"
        ).fetchone()[0]
        assert default == "extensions.uuid_generate_v4()"
        index = conn.execute(
            "SELECT pg_get_indexdef('public.docs_title_trgm'::regclass)"
        ).fetchone()
        assert "extensions.gin_trgm_ops" in index[0]
        conn.execute("INSERT INTO public.docs (title) VALUES ('x')")
        # A routine whose own search_path named public, where it found uuid_generate_v4():
        # it finds it in `extensions` now, and verify sees the same routine.
        assert conn.execute("SELECT public.new_doc_id() IS NOT NULL").fetchone() == (True,)
        config = conn.execute("SELECT proconfig FROM pg_proc WHERE proname = 'new_doc_id'")
        assert config.fetchone() == (["search_path=public, extensions, pg_temp"],)
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'pin'").fetchone()
        assert body == (pinned,)
        with psycopg.connect(source_db.url, autocommit=True) as src:
            objects = schema_objects(src, conn, ["public"])
        assert objects.passed, objects.description


def test_a_table_named_as_a_moved_extensions_function_stays_in_its_schema(source_db, target_db):
    """pgcrypto in public beside a table `digest`: every `public.digest` was rewritten to
    `extensions.digest`, the table's CREATE included (on a target whose postgres may create
    in extensions it would have landed there). Only calls to the function move now."""
    execute(
        source_db.url,
        """
        CREATE EXTENSION pgcrypto WITH SCHEMA public;
        CREATE TABLE public.digest (id serial PRIMARY KEY, body text);
        CREATE VIEW public.digest_v AS
            SELECT d.id, public.digest(d.body, 'sha256') AS h FROM public.digest d;
        """,
    )
    source, target = _urls(source_db, target_db.url)
    apply_schema("dump", source_url=source, target_url=target, schemas=["public"])
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.digest') IS NOT NULL").fetchone()[0]
        conn.execute("INSERT INTO public.digest (body) VALUES ('x')")
        conn.execute("SET search_path = public")  # so that definitions show their schemas
        view = conn.execute("SELECT pg_get_viewdef('public.digest_v'::regclass)").fetchone()[0]
        assert "extensions.digest(" in view and "FROM digest d" in view, view
        assert conn.execute("SELECT count(h) FROM public.digest_v").fetchone() == (1,)


# -- pieces of dump mode ---------------------------------------------------------------------------


def test_split_dump_keeps_sql_standard_bodies_and_rule_actions_whole():
    """`BEGIN ATOMIC ... END` bodies (CASE ... END inside) and a rule's several actions were
    cut at each inner ';': applied in one batch the pieces joined up again, but pieces in two
    batches failed the schema step, and a failure elsewhere in the batch was laid on them."""
    text = textwrap.dedent(
        """\
        CREATE FUNCTION public.grade(a integer) RETURNS text
            LANGUAGE sql
            BEGIN ATOMIC
             SELECT CASE WHEN (a > 1) THEN 'big'::text ELSE 'small'::text END AS "case";
             SELECT 'end;'::text AS t;
            END;
        CREATE PROCEDURE public.note(IN n integer)
            LANGUAGE sql
            BEGIN ATOMIC
             INSERT INTO public.log (id) VALUES (note.n);
             INSERT INTO public.log (id) VALUES ((note.n + 1));
            END;
        CREATE RULE twice AS
            ON INSERT TO public.v DO INSTEAD ( INSERT INTO public.a (id)
          VALUES (new.id);
         INSERT INTO public.b (id)
          VALUES (new.id);
        );
        CREATE TABLE public.weekend (id integer, "end" integer, x integer DEFAULT 1);
        """
    )
    statements = [s.sql for s in split_dump(text)]
    assert [s.split()[1] for s in statements] == ["FUNCTION", "PROCEDURE", "RULE", "TABLE"]
    assert statements[0].endswith("END;") and "'end;'" in statements[0]
    assert statements[1].count("INSERT INTO") == 2 and statements[2].count("INSERT INTO") == 2


def test_dump_mode_applies_sql_standard_bodies_split_across_batches(source_db, target_db):
    """Sixty SQL-standard functions of five statements each: their pieces filled more than one
    of the schema step's batches, and the step failed with a syntax error."""
    body = "\n".join(f"  SELECT a + {i};" for i in range(5))
    execute(
        source_db.url,
        "CREATE TABLE public.log (id int PRIMARY KEY);\n"
        + "\n".join(
            f"CREATE FUNCTION public.f{n}(a int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n"
            f"{body}\nEND;"
            for n in range(60)
        ),
    )
    source, target = _urls(source_db, target_db.url)
    apply_schema(SchemaMode.DUMP, source_url=source, target_url=target, schemas=["public"])
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT public.f0(1), public.f59(1)").fetchone() == (5, 5)


def test_filter_dump_reads_what_a_statement_is_not_what_its_literals_say():
    """An ALTER whose CHECK's literal said 'owner to' was dropped as an ownership change (the
    constraint lost, a domain's silently); a comment on a skipped foreign table was kept (its
    kind read as FOREIGN, its name as 'TABLE ft'), and the schema step failed on it."""
    kept = filter_dump(
        [
            Statement(
                "CREATE FOREIGN TABLE public.ft (id integer) SERVER other;",
                "FOREIGN TABLE",
                "ft",
                "public",
            ),
            Statement(
                "COMMENT ON FOREIGN TABLE public.ft IS 'remote rows';",
                "COMMENT",
                "FOREIGN TABLE ft",
                "public",
            ),
            Statement(
                "ALTER TABLE public.t ADD CONSTRAINT s_chk "
                "CHECK ((s <> 'transfer owner to bob'::text)) NOT VALID;",
                "CHECK CONSTRAINT",
                "t s_chk",
                "public",
            ),
            Statement(
                "ALTER DOMAIN public.note ADD CONSTRAINT note_chk "
                "CHECK ((VALUE <> 'send to owner to x'::text)) NOT VALID;",
                "CONSTRAINT",
                "note note_chk",
                "public",
            ),
            Statement('ALTER TABLE public.t OWNER TO "Some Role";', "TABLE", "t", "public"),
        ],
        target_settings=set(),
        untrusted_languages=set(),
    ).statements
    assert [s.split()[:2] for s in kept] == [["ALTER", "TABLE"], ["ALTER", "DOMAIN"]]
    assert "owner to bob" in kept[0] and "owner to x" in kept[1]


def test_dump_mode_leaves_out_an_untrusted_language_extension_with_its_functions(
    source_db, target_db
):
    """`plan` said a plperlu function would be skipped, then the schema step failed: it tried
    to create the extension, which only a superuser may (and Supabase does not offer). A cast
    made with such a function is left out with it, and said so."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'plperlu'"
        ).fetchone()
        package = f"postgresql-plperl-{conn.info.server_version // 10000}"
        require(available is not None, f"plperlu is not installed (Debian: {package})")
        conn.execute(
            "CREATE EXTENSION plperlu; "
            "CREATE FUNCTION public.hostname() RETURNS text LANGUAGE plperlu AS $$ return 'h'; $$; "
            "CREATE TABLE public.t (id int PRIMARY KEY); "
            "CREATE TYPE public.tag AS (v text); "
            "CREATE FUNCTION public.tag_text(public.tag) RETURNS text LANGUAGE plperlu "
            "AS $$ return 'x'; $$; "
            "CREATE CAST (public.tag AS text) WITH FUNCTION public.tag_text(public.tag)"
        )
    from .test_preflight import preflight

    source, target = _urls(source_db, target_db.url)
    findings = preflight(source_db.url, target_db.url, ["public"], mode="dump")
    (said,) = [f for f in findings if f.code == "untrusted-extension"]
    assert said.message.startswith("Extension plperlu provides an untrusted language")
    untrusted = "its function's language is untrusted, which needs superuser on Supabase"
    (cast,) = [f for f in findings if f.code == "cast"]
    assert cast.subject == "cast (public.tag AS text)" and untrusted in cast.message
    result = apply_schema(SchemaMode.DUMP, source_url=source, target_url=target, schemas=["public"])
    assert any(s.startswith("EXTENSION plperlu: its language is untrusted") for s in result.skipped)
    assert f"cast (public.tag AS text): {untrusted}" in result.skipped
    with psycopg.connect(target_db.url) as conn:
        assert conn.execute("SELECT to_regclass('public.t') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regproc('public.hostname')").fetchone() == (None,)
        assert conn.execute("SELECT to_regtype('public.tag') IS NOT NULL").fetchone() == (True,)
        made = "SELECT count(*) FROM pg_cast WHERE castsource = 'public.tag'::regtype"
        assert conn.execute(made).fetchone() == (0,)


CASTS = """
CREATE TYPE public.pair AS (a int, b int);
CREATE FUNCTION public.pair_text(public.pair) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT $1.a || ':' || $1.b $$;
CREATE CAST (public.pair AS text) WITH FUNCTION public.pair_text(public.pair) AS ASSIGNMENT;
CREATE TYPE public.code AS ENUM ('1', '2');
CREATE CAST (public.code AS integer) WITH INOUT;
CREATE FUNCTION public.loose(text) RETURNS money LANGUAGE sql AS 'SELECT 0::money';
CREATE CAST (text AS money) WITH FUNCTION public.loose(text);
CREATE SCHEMA util;
CREATE FUNCTION util.total(public.pair) RETURNS int LANGUAGE sql AS 'SELECT $1.a + $1.b';
CREATE CAST (public.pair AS int) WITH FUNCTION util.total(public.pair);
CREATE TABLE public.t (id int PRIMARY KEY, p public.pair, c public.code);
ALTER TABLE public.t ENABLE ROW LEVEL SECURITY;
CREATE FUNCTION public.t_text(public.t) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT 'visit ' || $1.id $$;
CREATE CAST (public.t AS text) WITH FUNCTION public.t_text(public.t);
CREATE VIEW public.v AS SELECT id, p::text AS shown, c::integer AS n FROM public.t;
CREATE VIEW public.w AS SELECT t::text AS said FROM public.t;
"""


def test_dump_mode_creates_the_users_casts_before_what_uses_them(source_db, target_db):
    """pg_dump --schema leaves casts out (they belong to no schema). Without the composite's
    cast the view was still made, and showed `(3,4)` where the source shows `3:4`; without
    the enum's, the view failed the schema step. A cast the target's `postgres` cannot make
    (it owns neither type) is said by preflight and in the skipped list."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(CASTS)
    from .test_preflight import preflight

    findings = preflight(source_db.url, target_db.url, ["public"], mode="dump")
    said = {f.subject: f.message for f in findings if f.code == "cast"}
    assert list(said) == ["cast (public.pair AS integer)", "cast (text AS money)"]
    unmade = said["cast (public.pair AS integer)"]
    assert "its function util.total(public.pair) is in schema util" in unmade
    source, target = _urls(source_db, target_db.url)
    result = apply_schema(SchemaMode.DUMP, source_url=source, target_url=target, schemas=["public"])
    assert any(s.startswith("cast (text AS money): creating a cast") for s in result.skipped)
    with psycopg.connect(target_db.url) as conn:
        conn.execute("INSERT INTO public.t VALUES (1, ROW(3, 4), '2')")
        assert conn.execute("TABLE public.v").fetchall() == [(1, "3:4", 2)]
        assert conn.execute("TABLE public.w").fetchall() == [("visit 1",)]
        casts = conn.execute(
            "SELECT format('%s %s %s', castsource::regtype, casttarget::regtype, castcontext) "
            "FROM pg_cast WHERE oid >= 16384 ORDER BY 1"
        ).fetchall()
        assert casts == [("code integer e",), ("pair text a",), ("t text e",)]


def test_split_dump_respects_quoting_and_drops_meta_commands():
    text = textwrap.dedent(
        """\
        --
        -- PostgreSQL database dump
        --

        \\restrict abc123

        SET statement_timeout = 0;
        SET transaction_timeout = 0;
        SELECT pg_catalog.set_config('search_path', '', false);

        --
        -- Name: f(); Type: FUNCTION; Schema: public; Owner: -
        --

        CREATE FUNCTION public.f() RETURNS text
            LANGUAGE plpgsql
            AS $_$ BEGIN RETURN 'a;b' || $x$;--$x$; END $_$;

        --
        -- Name: t; Type: TABLE; Schema: public; Owner: -
        --

        CREATE TABLE public.t (a text DEFAULT E'it\\'s;', "we;ird" int /* ; */);

        --
        -- Name: EXTENSION hstore; Type: COMMENT; Schema: -; Owner: -
        --

        COMMENT ON EXTENSION hstore IS 'data type; for storing';

        \\unrestrict abc123
        """
    )
    statements = split_dump(text)

    assert [s.entry_type for s in statements] == ["", "", "", "FUNCTION", "TABLE", "COMMENT"]
    assert statements[3].sql.endswith("END $_$;") and "$x$;--$x$" in statements[3].sql
    assert statements[4].sql.startswith("CREATE TABLE") and "/* ; */" in statements[4].sql
    assert statements[5].entry_name == "EXTENSION hstore"

    filtered = filter_dump(
        statements, target_settings={"statement_timeout"}, untrusted_languages=set()
    )
    assert filtered.statements[:2] == [
        "SET LOCAL statement_timeout = 0;",
        "SELECT pg_catalog.set_config('search_path', '', true);",
    ]
    assert not any("transaction_timeout" in s or "EXTENSION" in s for s in filtered.statements)
    assert filtered.skipped == ["COMMENT ON EXTENSION hstore: extensions belong to supabase_admin"]


def test_filter_drops_superuser_objects_and_hashes_only_definitions():
    def entry(kind: str, name: str, sql: str, schema: str = "public") -> Statement:
        return Statement(sql, kind, name, schema)

    statements = [
        Statement("SET lock_timeout = 0;"),
        entry("SCHEMA", "app", "CREATE SCHEMA app;", "-"),
        entry("SCHEMA", "public", "CREATE SCHEMA public;", "-"),
        entry("EXTENSION", "hstore", "CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public;"),
        entry(
            "EVENT TRIGGER",
            "ddl_log",
            "CREATE EVENT TRIGGER ddl_log ON ddl_command_end EXECUTE FUNCTION public.log_ddl();",
            "-",
        ),
        entry(
            "FUNCTION",
            "py()",
            "CREATE FUNCTION public.py() RETURNS int\n    LANGUAGE "
            "plpython3u\n    AS $$return 1$$;",
        ),
        entry("COMMENT", "FUNCTION py()", "COMMENT ON FUNCTION public.py() IS 'x';"),
        entry("TABLE", "t", "CREATE TABLE public.t (id int);"),
        entry("TABLE", "t", "ALTER TABLE public.t OWNER TO someone;"),
    ]
    filtered = filter_dump(
        statements, target_settings={"lock_timeout"}, untrusted_languages={"plpython3u", "c"}
    )

    assert filtered.statements == [
        "SET LOCAL lock_timeout = 0;",
        "CREATE SCHEMA IF NOT EXISTS app;",
        "CREATE TABLE public.t (id int);",
    ]
    assert "EVENT TRIGGER ddl_log: needs superuser on Supabase" in filtered.skipped
    assert any(s.startswith("FUNCTION public.py()") for s in filtered.skipped)
    # SET lines (which differ between pg_dump versions) do not change the hash.
    other = filter_dump(statements[1:], target_settings=set(), untrusted_languages={"plpython3u"})
    assert other.digest == filtered.digest
    # Nor do casts: a target made before they were copied is not refused as changed.
    cast = entry("CAST", "(public.pair AS text)", "CREATE CAST (public.pair AS text) WITH INOUT;")
    casted = filter_dump(
        [*statements, cast], target_settings=set(), untrusted_languages={"plpython3u"}
    )
    assert casted.statements[-1] == cast.sql and casted.digest == filtered.digest


def test_pg_dump_gets_the_password_from_the_environment_only(source_db, target_db, monkeypatch):
    secret = "Wr0ng%pass@word"
    wrong = dataclasses.replace(parse_database_url(target_db.url, label="source"), password=secret)
    seen: list[list[str]] = []
    real_run = subprocess.run
    monkeypatch.setenv("SUPABASE_DB_URL", target_db.url)  # as the CLI exports it
    monkeypatch.setenv("SOURCE_DATABASE_URL", source_db.url)
    monkeypatch.setenv("SUPABASE_POOLER_URL", target_db.url)  # an application's, say

    def spy(argv, *args, **kwargs):
        seen.append([str(a) for a in argv])
        if Path(argv[0]).name == "pg_dump":
            env = kwargs["env"]
            assert not {"SUPABASE_DB_URL", "SOURCE_DATABASE_URL", "SUPABASE_POOLER_URL"} & set(env)
            assert target_db.password not in " ".join(env.values())
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(schema_apply.subprocess, "run", spy)
    with pytest.raises(SchemaError) as caught:
        run_pg_dump(find_pg_dump(15), wrong, ["public"])

    assert "password authentication failed" in str(caught.value)
    assert secret not in str(caught.value)
    assert seen and all(secret not in " ".join(argv) for argv in seen)


def test_a_too_new_source_needs_a_newer_pg_dump():
    with pytest.raises(ConfigError) as caught:
        find_pg_dump(99)
    assert "pg_dump 99 or newer" in str(caught.value)


# -- none mode -------------------------------------------------------------------------------------


def test_none_mode_checks_the_target_has_the_tables(source_db, target_db):
    execute(source_db.url, SMALL_SCHEMA)
    source, target = _urls(source_db, target_db.url)

    with pytest.raises(ConfigError) as caught:  # bad input: exit code 2
        apply_schema("none", source_url=source, target_url=target, schemas=["clinic"])
    assert "schema clinic is missing" in str(caught.value)

    apply_schema("dump", source_url=source, target_url=target, schemas=["clinic"])
    result = apply_schema("none", source_url=source, target_url=target, schemas=["clinic"])
    assert result == SchemaResult(mode=SchemaMode.NONE, changed=False, duration_s=result.duration_s)

    execute(source_db.url, "CREATE TABLE clinic.rooms (id int PRIMARY KEY)")
    with pytest.raises(ConfigError) as caught:
        apply_schema("none", source_url=source, target_url=target, schemas=["clinic"])
    assert "clinic.rooms" in str(caught.value)
    # A table the manifest leaves out, and a partition (copied through its parent), are not
    # expected on the target.
    execute(
        source_db.url,
        "CREATE TABLE clinic.log (id int, at date) PARTITION BY RANGE (at); "
        "CREATE TABLE clinic.log_2024 PARTITION OF clinic.log "
        "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    )
    execute(target_db.url, "CREATE TABLE clinic.log (id int, at date) PARTITION BY RANGE (at)")
    chosen = ["clinic.visits", "clinic.log"]
    apply_schema("none", source_url=source, target_url=target, schemas=["clinic"], tables=chosen)


def test_unknown_mode_is_a_config_error(source_db, target_db):
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(ConfigError):
        apply_schema("pg_restore", source_url=source, target_url=target)


# -- alembic mode ----------------------------------------------------------------------------------


def test_example_app_alembic_mode_to_head_then_no_op(source_db, target_db):
    from supabase_migration.example_app import ALEMBIC_INI, HEAD, TABLES

    host_logger = logging.getLogger("supabase_migration_tests.host")
    source, target = _urls(source_db, target_db.url)

    result = apply_schema(
        "alembic", source_url=source, target_url=target, alembic_config=ALEMBIC_INI
    )

    assert result.changed and result.revision == HEAD
    assert result.objects_created > len(TABLES)
    assert sorted(f"public.{t}" for t in public_tables(target_db.admin_url)) == sorted(
        [*TABLES, "public.alembic_version"]
    )
    assert not host_logger.disabled
    before = snapshot(target_db.admin_url)

    again = apply_schema(
        "alembic", source_url=source, target_url=target, alembic_config=ALEMBIC_INI
    )

    assert not again.changed and again.revision == HEAD and again.objects_created == 0
    assert snapshot(target_db.admin_url) == before
    assert [row[0] for row in bookkeeping_rows(target_db.admin_url)] == ["alembic"]

    # A manifest written anew elsewhere says dump mode: the target's tables are this tool's.
    with pytest.raises(ConfigError) as caught:
        apply_schema("dump", source_url=source, target_url=target)
    assert str(caught.value).startswith("The target's schema was set up by this tool in alembic")
    assert str(caught.value).endswith("rerun with --schema-mode alembic (as the migration.yaml "
                                      "of those runs says).")  # fmt: skip
    assert snapshot(target_db.admin_url) == before


def test_example_app_through_the_transaction_pooler(source_db, target_db):
    from supabase_migration.example_app import ALEMBIC_INI, HEAD

    source, target = _urls(source_db, target_db.pooler_url, Endpoint.TRANSACTION_POOLER)
    first = apply_schema(
        "alembic", source_url=source, target_url=target, alembic_config=ALEMBIC_INI
    )
    second = apply_schema(
        "alembic", source_url=source, target_url=target, alembic_config=ALEMBIC_INI
    )
    assert (first.changed, first.revision) == (True, HEAD)
    assert (second.changed, second.revision) == (False, HEAD)


def _alembic_project(root: Path, env_py: str, revisions: list[tuple[str, str]]) -> Path:
    """A minimal Alembic project: alembic.ini with a relative script_location, env.py, revisions."""
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "alembic.ini").write_text(
        "[alembic]\nscript_location = migrations\nsqlalchemy.url = postgresql://nowhere/db\n"
        "\n[loggers]\nkeys = root\n[handlers]\nkeys = console\n[formatters]\nkeys = generic\n"
        "[logger_root]\nlevel = WARNING\nhandlers = console\n"
        "[handler_console]\nclass = StreamHandler\nargs = (sys.stderr,)\nformatter = generic\n"
        "[formatter_generic]\nformat = %%(message)s\n"
    )
    (root / "migrations" / "env.py").write_text(textwrap.dedent(env_py))
    previous = None
    for number, (rev, body) in enumerate(revisions):
        (root / "migrations" / "versions" / f"{number:04d}_{rev}.py").write_text(
            textwrap.dedent(
                f"""\
                from alembic import op
                revision = {rev!r}
                down_revision = {previous!r}
                branch_labels = None
                depends_on = None

                def upgrade():
                    op.execute({body!r})

                def downgrade():
                    pass
                """
            )
        )
        previous = rev
    return root / "alembic.ini"


def _add_revision(ini: Path, revision: str, down: str, upgrade: str, doc: str = "") -> None:
    """One more revision file in the project of `ini`; `upgrade`: its upgrade()'s body."""
    (ini.parent / "migrations" / "versions" / f"{revision}.py").write_text(
        f'"""{doc}"""\nfrom alembic import op\nrevision = {revision!r}\n'
        f"down_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n"
        f"def upgrade():\n{textwrap.indent(textwrap.dedent(upgrade), '    ')}\n"
    )


# The env.py `alembic init` generates: it reads sqlalchemy.url and calls fileConfig.
GENERATED_ENV = """\
from logging.config import fileConfig
from sqlalchemy import engine_from_config, pool
from alembic import context

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

def run_migrations_online():
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()

run_migrations_online()
"""


# The Alembic cookbook's "sharing a connection": env.py only takes the caller's connection.
COOKBOOK_ENV = """\
from alembic import context

config = context.config
context.configure(connection=config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
"""


def test_generated_env_py_reads_the_injected_url(source_db, target_db, tmp_path, monkeypatch):
    ini = _alembic_project(
        tmp_path / "app",
        GENERATED_ENV,
        [("a1", "CREATE TABLE notes (id int PRIMARY KEY)"), ("a2", "CREATE INDEX ON notes (id)")],
    )
    monkeypatch.chdir("/")  # the relative script_location must still be found
    host_logger = logging.getLogger("supabase_migration_tests.generated")
    source, target = _urls(source_db, target_db.url)
    assert "%" in target_db.password  # ConfigParser interpolation must not eat it

    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)

    assert result.changed and result.revision == "a2"
    # notes, its primary key, the new index, alembic_version and its primary key
    assert result.objects_created == 5
    assert not host_logger.disabled
    assert "notes" in public_tables(target_db.admin_url)


def test_failed_migration_rolls_back_every_revision(source_db, target_db, tmp_path):
    ini = _alembic_project(
        tmp_path / "app",
        COOKBOOK_ENV,
        [("b1", "CREATE TABLE first (id int)"), ("b2", "SELECT no_such_function()")],
    )
    source, target = _urls(source_db, target_db.url)

    # The project's migration to fix: exit code 2, as for any bad input
    with pytest.raises(ConfigError) as caught:
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)

    assert "undefined_function" in str(caught.value)
    assert str(caught.value).startswith("Alembic's upgrade failed at revision b2 on the target")
    assert public_tables(target_db.admin_url) == []


@pytest.mark.parametrize("elsewhere", ["the source", "another database of the target's server"])
def test_env_py_with_its_own_url_is_caught(source_db, target_db, tmp_path, elsewhere):
    other = source_db.url
    if elsewhere != "the source":  # the same server (start time), another database (oid)
        name = f"{target_db.name}_other"
        execute(target_db.admin_url, f'DROP DATABASE IF EXISTS "{name}"')
        execute(target_db.admin_url, f'CREATE DATABASE "{name}"')
        parts = urllib.parse.urlsplit(target_db.url)
        other = urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    hard_coded = GENERATED_ENV.replace(
        "config.get_section(config.config_ini_section, {}),",
        f'{{"sqlalchemy.url": {other.replace("postgresql://", "postgresql+psycopg://")!r}}},',
    )
    ini = _alembic_project(
        tmp_path / "app", hard_coded, [("c1", "CREATE TABLE misplaced (id int)")]
    )
    source, target = _urls(source_db, target_db.url)

    checked: list[object] = []

    # Refused before any migration runs: it would have migrated the source (the app's own
    # database, when env.py reads its DATABASE_URL).
    with pytest.raises(ConfigError) as caught:
        apply_schema(
            "alembic",
            source_url=source,
            target_url=target,
            alembic_config=ini,
            before_commit=checked.append,
        )

    assert "connects to another database than the target" in str(caught.value)
    assert "config.attributes['connection']" in str(caught.value)
    assert checked == []
    assert public_tables(source_db.url) == [] and public_tables(target_db.admin_url) == []


def test_the_generated_env_py_is_checked_after_its_own_commit(source_db, target_db, tmp_path):
    """The generated env.py migrates the target on a connection of its own and commits it:
    no check can run in that transaction (one that refused would claim a rollback that did
    not happen), so none is, and the result says so; the cookbook's env.py is checked."""
    checked: list[object] = []
    source, target = _urls(source_db, target_db.url)
    for env_py, name, expected in ((GENERATED_ENV, "own", []), (COOKBOOK_ENV, "shared", [1])):
        ini = _alembic_project(tmp_path / name, env_py, [(f"{name}1", f"CREATE TABLE {name} ()")])
        checked.clear()
        result = apply_schema(
            "alembic",
            source_url=source,
            target_url=target,
            alembic_config=ini,
            before_commit=lambda conn: checked.append(1),
        )
        assert (result.changed, result.checked, checked) == (True, bool(expected), expected)
        execute(target_db.admin_url, "DROP TABLE alembic_version")


def test_the_generated_env_py_is_fit_checked_after_it_commits(source_db, target_db, tmp_path):
    """With the generated env.py the upgrade commits on its own connection: the schema step
    then compares the tables after it, saying so without claiming a rollback, and closes to
    the API roles what it made (RLS) all the same."""
    from supabase_migration.manifest import Manifest, ManifestTable
    from supabase_migration.schema_step import migrate_schema

    ini = _alembic_project(
        tmp_path / "app", GENERATED_ENV, [("k1", "CREATE TABLE items (id int PRIMARY KEY, n text)")]
    )
    execute(source_db.url, "CREATE TABLE items (id int PRIMARY KEY, n bigint)")
    manifest = Manifest(
        tables=(ManifestTable("public.items", ("id",), "primary_key"),),
        schema_mode="alembic",
        alembic_config=str(ini),
    )
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(PreflightError) as caught:
        migrate_schema(manifest, source, target)
    assert str(caught.value).startswith(
        "The target's tables, at the source's Alembic revision, do not fit its rows"
    )
    assert "rolled back" not in str(caught.value)
    with psycopg.connect(target_db.admin_url) as conn:  # committed by env.py, and protected
        assert conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.items'::regclass"
        ).fetchone() == (True,)


def test_the_target_is_brought_to_the_sources_revision(source_db, target_db, tmp_path):
    """The source's rows fit the tables of its own revision, and its version table comes
    along with them: the target is upgraded to the source's revisions, not head (which left
    it ahead of the copied version table, and the next run failed on 'already exists'); a
    revision the project does not have is refused in one sentence, before anything runs."""
    ini = _alembic_project(
        tmp_path / "app",
        COOKBOOK_ENV,
        [("e1", "CREATE TABLE visits (id int)"), ("e2", "CREATE INDEX visits_id ON visits (id)")],
    )
    source, target = _urls(source_db, target_db.url)
    execute(
        source_db.url,
        "CREATE TABLE visits (id int); CREATE TABLE alembic_version (version_num text); "
        "INSERT INTO alembic_version VALUES ('e1')",
    )
    for _ in range(2):  # then a no-op
        result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
        assert result.revision == "e1"
    with psycopg.connect(target_db.admin_url) as conn:
        assert conn.execute("SELECT to_regclass('visits_id')").fetchone() == (None,)
    execute(source_db.url, "UPDATE alembic_version SET version_num = 'e9'")
    with pytest.raises(ConfigError, match="source is at Alembic revision e9, which the project"):
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    # preflight says it too, so `plan` lists it before `run` is refused
    from supabase_migration.manifest import Manifest
    from supabase_migration.schema_step import preflight

    manifest = Manifest(tables=(), schema_mode="alembic", alembic_config=str(ini))
    (found,) = [f for f in preflight(manifest, source, target) if f.code == "alembic-revision"]
    assert found.message.startswith("The source is at Alembic revision e9, which the project")
    # A target already past the source's revision (upgraded by hand, or an earlier release
    # went to head) is not taken back: nothing runs, and the tables are compared as ever.
    execute(source_db.url, "UPDATE alembic_version SET version_num = 'e2'")
    assert (
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini).revision
        == "e2"
    )
    execute(source_db.url, "UPDATE alembic_version SET version_num = 'e1'")
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert (result.changed, result.revision) == (False, "e2")


def test_a_source_at_two_heads_is_upgraded_to_both(source_db, target_db, tmp_path):
    ini = _alembic_project(tmp_path / "app", COOKBOOK_ENV, [("f1", "CREATE TABLE base (id int)")])
    for head in ("f2a", "f2b"):
        _add_revision(ini, head, "f1", f"op.execute('CREATE TABLE t_{head} (id int)')")
    execute(
        source_db.url,
        "CREATE TABLE alembic_version (version_num text); "
        "INSERT INTO alembic_version VALUES ('f2a'), ('f2b')",
    )
    source, target = _urls(source_db, target_db.url)
    result = apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert result.revision == "f2a,f2b"
    assert {"t_f2a", "t_f2b"} <= set(public_tables(target_db.admin_url))


@pytest.mark.parametrize(
    ("upgrade", "doc", "sentence"),
    [
        # the revision named, whatever its message holds
        (
            "op.execute('SELECT no_such_function()')",
            "rename status -> state",
            r"^Alembic's upgrade failed at revision r2 on",
        ),
        # a migration that needs to run outside a transaction: named in one sentence
        (
            "with op.get_context().autocommit_block():\n"
            "    op.execute('CREATE INDEX CONCURRENTLY logs_id ON logs (id)')",
            "",
            r"project at revision r2 runs outside a transaction \(autocommit_block",
        ),
    ],
    ids=["failing", "autocommit_block"],
)
def test_a_failing_revision_is_named_in_one_sentence(
    source_db, target_db, tmp_path, upgrade, doc, sentence
):
    ini = _alembic_project(tmp_path / "app", COOKBOOK_ENV, [("r1", "CREATE TABLE logs (id int)")])
    _add_revision(ini, "r2", "r1", upgrade, doc)
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(ConfigError, match=sentence):  # the project's to fix: exit code 2
        apply_schema("alembic", source_url=source, target_url=target, alembic_config=ini)
    assert public_tables(target_db.admin_url) == []  # r1 rolled back with it


def test_a_check_before_the_commit_rolls_the_upgrade_back(source_db, target_db, tmp_path):
    ini = _alembic_project(
        tmp_path / "app", COOKBOOK_ENV, [("d1", "CREATE TABLE kept_back (id int)")]
    )
    source, target = _urls(source_db, target_db.url)

    def refuse(conn: psycopg.Connection) -> None:
        assert conn.execute("SELECT to_regclass('kept_back')").fetchone() == ("kept_back",)
        raise PreflightError("The upgraded tables do not fit.")

    with pytest.raises(PreflightError, match="do not fit"):
        apply_schema(
            "alembic",
            source_url=source,
            target_url=target,
            alembic_config=ini,
            before_commit=refuse,
        )
    assert public_tables(target_db.admin_url) == []


def test_alembic_mode_needs_a_config(source_db, target_db, tmp_path):
    source, target = _urls(source_db, target_db.url)
    with pytest.raises(ConfigError):
        apply_schema("alembic", source_url=source, target_url=target)
    with pytest.raises(ConfigError):
        apply_schema(
            "alembic", source_url=source, target_url=target, alembic_config=tmp_path / "nope.ini"
        )


def test_schema_ahead_is_taken_once_for_the_same_databases(source_db, target_db):
    """`run` starts the schema step while it opens Dagster; the schema asset takes its outcome
    (or its error) instead of applying the schema again."""
    from supabase_migration.manifest import Manifest
    from supabase_migration.schema_step import start_schema_ahead

    execute(source_db.url, SMALL_SCHEMA)
    source, target = _urls(source_db, target_db.url)
    manifest = Manifest(tables=(), schemas=("clinic",))
    ahead = start_schema_ahead(manifest, source, target)
    assert ahead is not None
    other = dataclasses.replace(target, dbname="postgres")
    assert ahead.take(source, other) is None  # waits; another database: not this outcome
    outcome = ahead.take(source, target)
    assert outcome is not None and outcome.result.changed
    assert snapshot(target_db.admin_url, "clinic") == snapshot(source_db.url, "clinic")
    assert has_schema(target_db.admin_url, "supabase_migration")  # bookkeeping too
    assert ahead.take(source, target) is None  # once: a later run does the step itself

    # An error ahead is raised by `take`, in the asset's run, as the step would have raised it.
    execute(source_db.url, "ALTER TABLE clinic.visits ADD COLUMN room text")
    failing = start_schema_ahead(manifest, source, target)
    assert failing is not None
    with pytest.raises(ConfigError, match="source schema changed"):
        failing.take(source, target)

    # The Alembic mode runs the user's env.py: never in a background thread.
    alembic = dataclasses.replace(manifest, schema_mode="alembic", alembic_config="alembic.ini")
    assert start_schema_ahead(alembic, source, target) is None


def test_money_literals_of_a_german_source_reach_the_target(german_server, target_db):
    """pg_dump wrote a money DEFAULT or CHECK in the source's lc_monetary, '1.234,50 €', which
    the target refused, so the schema step failed. It now writes them as C does."""
    german_server.create_database("money_schema")
    try:
        german_server.execute("ALTER DATABASE money_schema SET lc_monetary = 'de_DE.UTF-8'")
        german_server.execute(
            "CREATE TABLE fees (id int PRIMARY KEY, "
            "amount money DEFAULT '1.234,50' CHECK (amount < '1.000.000'::money))",
            dbname="money_schema",
        )
        source = parse_database_url(german_server.url(dbname="money_schema"), label="source")
        target = parse_database_url(target_db.url, label="target")
        apply_schema("dump", source_url=source, target_url=target, schemas=["public"])
        with psycopg.connect(target_db.url, autocommit=True) as conn:
            conn.execute("INSERT INTO fees (id) VALUES (1)")
            assert conn.execute("SELECT amount::numeric FROM fees").fetchone() == (
                Decimal("1234.50"),
            )
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO fees VALUES (2, 1000001)")
    finally:
        german_server.drop_database("money_schema")


def test_the_schema_dump_passes_a_pooler_that_refuses_options(source_server, source_db, target_db):
    """A source behind a PgBouncer that knows no `options` startup parameter (its default):
    pg_dump is asked for money in C only when the source writes it otherwise, so such a
    pooler still lets the schema through."""
    require(find_pgbouncer() is not None, "pgbouncer is not installed (apt install pgbouncer).")
    execute(source_db.url, "CREATE TABLE fees (id int PRIMARY KEY, amount money DEFAULT '1.5')")
    bouncer = PgBouncer(
        target_port=source_server.port,
        password="any",  # the source trusts loopback logins
        cert=None,
        key=None,
        pool_mode="session",
        ignore_startup_parameters="extra_float_digits",
    )
    try:
        bouncer.start()
        url = f"postgresql://postgres:any@127.0.0.1:{bouncer.port}/{source_db.name}"
        source = parse_database_url(url, label="source")
        target = parse_database_url(target_db.url, label="target")
        apply_schema("dump", source_url=source, target_url=target, schemas=["public"])
    finally:
        bouncer.cleanup()
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("INSERT INTO fees (id) VALUES (1)")
        assert conn.execute("SELECT amount::numeric FROM fees").fetchone() == (Decimal("1.50"),)


def test_dump_mode_keeps_backslashes_on_a_target_without_standard_strings(source_db, target_db):
    """A target database with `standard_conforming_strings = off`: the dump's own SET to on
    travelled in the same batch as the literals, which the server parsed first under off: a
    default 'x\\y' became 'xy', a view's '\\n' a newline; run and verify passed."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            r"CREATE TABLE public.s (id bigint PRIMARY KEY, a text DEFAULT 'x\y' "
            r"CHECK (a !~ '^\d+$')); "
            r"CREATE VIEW public.v AS SELECT id, a || '\n' AS a2 FROM public.s; "
            r"COMMENT ON TABLE public.s IS 'back\slash'"
        )
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{target_db.name}" SET standard_conforming_strings = off')
    source, target = _urls(source_db, target_db.url)
    apply_schema(SchemaMode.DUMP, source_url=source, target_url=target, schemas=["public"])
    query = (
        "SELECT (SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
        "WHERE adrelid = 'public.s'::regclass), pg_get_viewdef('public.v'), "
        "obj_description('public.s'::regclass), "
        "(SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'c' "
        "AND conrelid = 'public.s'::regclass)"
    )
    seen = []
    for url in (source_db.url, target_db.admin_url):
        with psycopg.connect(url, options="-c standard_conforming_strings=on") as conn:
            seen.append(conn.execute(query).fetchone())
    assert seen[0] == seen[1] and "x\\y" in seen[0][0], seen


def test_dump_batches_end_after_each_run_of_settings():
    statements = ["SET LOCAL a = 1;", "SET LOCAL b = 2;", "CREATE TABLE t ();", "SET LOCAL c = 3;"]
    statements += [f"CREATE TABLE t{i} ();" for i in range(450)]
    batches = list(dump_batches(statements))
    assert batches[0] == statements[:2] and batches[1] == statements[2:4]
    assert [len(b) for b in batches[2:]] == [200, 200, 50]
    assert [s for b in batches for s in b] == statements
