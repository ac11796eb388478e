"""Materialized views: created empty by the schema step, refreshed once their tables are
copied (each after those it reads), again only when a range was copied since, and compared
by verify. Real servers, the CLI as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from supabase_migration.assets import MATVIEWS_KEY

from .test_cli import _logged, cli
from .testbed import cli_env

PHI = "PHIMARK"

# z_base is read by a_summary through a plain view: by name alone a_summary would be
# refreshed first, from an unpopulated z_base, and fail.
SCHEMA = f"""
CREATE TABLE visits (id bigint PRIMARY KEY, clinic int NOT NULL, note text, code text);
INSERT INTO visits SELECT g, g % 7, '{PHI} ' || g, (g % 90)::text FROM generate_series(1, 3000) g;
CREATE MATERIALIZED VIEW z_base AS
  SELECT clinic, count(*) AS visits, max(length(note)) AS longest FROM visits GROUP BY clinic;
CREATE VIEW by_clinic AS SELECT clinic, visits FROM z_base;
CREATE MATERIALIZED VIEW a_summary AS SELECT sum(visits) AS total FROM by_clinic;
CREATE MATERIALIZED VIEW never_filled AS SELECT id FROM visits WITH NO DATA;
CREATE MATERIALIZED VIEW codes AS SELECT id, code::int AS code FROM visits;
"""

RUN = ("run", "--no-progress", "--schema-mode", "dump", "--batch-size", "1000")


@pytest.fixture
def bed(source_db, target_db, tmp_path: Path):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return source_db, target_db, cli_env(source_db.url, target_db.url, tmp_path), tmp_path


def _rows(url: str, view: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"TABLE {view} ORDER BY 1").fetchall()


def _state(url: str) -> dict[str, tuple[bool, int]]:
    """(populated, relfilenode) by name: each REFRESH writes a new relfilenode."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, relispopulated, relfilenode::bigint FROM pg_class "
            "WHERE relkind = 'm' AND relnamespace = 'public'::regnamespace"
        ).fetchall()
    return {name: (populated, node) for name, populated, node in rows}


def _views_checked(tmp_path: Path) -> dict[str, dict]:
    report = json.loads((tmp_path / "migration-report" / "verification_report.json").read_text())
    return {c["table"]: c for c in report["checks"] if c["name"] == "materialized_view_matches"}


def _clean(done) -> str:
    text = done.stdout + done.stderr
    assert "Traceback" not in text and PHI not in text, text
    return text


def test_populated_views_are_refreshed_in_dependency_order_and_verified(bed):
    source_db, target_db, env, tmp_path = bed
    done = cli([*RUN], env, tmp_path, 300)
    assert done.returncode == 0, _clean(done)
    for view in ("z_base", "a_summary", "codes"):
        assert _rows(target_db.url, view) == _rows(source_db.url, view), view
    first = _state(target_db.url)
    assert first["never_filled"][0] is False  # as on the source
    assert all(first[v][0] for v in ("z_base", "a_summary", "codes"))
    checked = _views_checked(tmp_path)
    assert set(checked) == {f"public.{v}" for v in ("z_base", "a_summary", "never_filled", "codes")}
    assert all(c["passed"] for c in checked.values()), checked
    assert checked["public.z_base"]["details"] == {"source_rows": 7, "target_rows": 7}
    report = (tmp_path / "migration-report" / "verification_report.md").read_text()
    tables_and_views = "checks on 1 tables, 4 materialized views and the schemas' views"
    assert tables_and_views in report
    views = report.split("## Materialized views", 1)[1].split("## ", 1)[0]
    assert "| public.z_base | 7 | 7 | PASS |" in views
    tables = report.split("## Tables", 1)[1].split("## ", 1)[0]
    assert "public.visits" in tables and "z_base" not in tables

    # Nothing copied since: nothing refreshed again.
    again = cli([*RUN, "--no-verify"], env, tmp_path, 300)
    assert again.returncode == 0, _clean(again)
    assert _state(target_db.url) == first

    # A row changed on the source (and its views refreshed there): the range is re-synced,
    # so every populated view is refreshed from it.
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE visits SET clinic = 100 WHERE id = 5")
        conn.execute("REFRESH MATERIALIZED VIEW z_base; REFRESH MATERIALIZED VIEW a_summary")
    third = cli([*RUN], env, tmp_path, 300)
    assert third.returncode == 0, _clean(third)
    assert _rows(target_db.url, "z_base") == _rows(source_db.url, "z_base")
    assert (100, 1, len(f"{PHI} 5")) in _rows(target_db.url, "z_base")
    after = _state(target_db.url)
    assert all(after[v][1] != first[v][1] for v in ("z_base", "a_summary", "codes"))
    assert after["never_filled"] == first["never_filled"]


def test_a_view_that_fails_to_refresh_fails_the_run_without_its_value_and_the_next_run_mends(bed):
    """`codes` casts a text column to int: refreshed on the source while every code was a
    number, its table then took a value that is not. The target's refresh fails; the error
    names the view, not the value; the others are refreshed; status says the step is behind;
    with the row fixed, the next run refreshes it, and it alone."""
    source_db, target_db, env, tmp_path = bed
    secret = f"{PHI}-MRN"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE visits SET code = %s WHERE id = 17", (secret,))
    done = cli([*RUN], env, tmp_path, 300)
    assert done.returncode == 1, done.stdout + done.stderr
    text = _clean(done)
    assert "Refreshing the materialized view public.codes failed" in text, text
    assert "invalid_text_representation" in text, text
    state = _state(target_db.url)
    assert state["codes"][0] is False
    assert state["z_base"][0] and state["a_summary"][0]
    status = cli(["status"], env, tmp_path)
    assert "The materialized views step (each refreshed from the copied rows)" in _clean(status)

    # Mended on the target alone, so no range is copied again: the next run refreshes the
    # view that failed, not the others.
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("UPDATE visits SET code = '17' WHERE id = 17")
    again = cli([*RUN, "--no-verify"], env, tmp_path, 300)
    assert again.returncode == 0, _clean(again)
    after = _state(target_db.url)
    assert after["codes"][0] and all(after[v] == state[v] for v in ("z_base", "a_summary"))

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("UPDATE visits SET code = '17' WHERE id = 17")
    mended = cli([*RUN], env, tmp_path, 300)
    assert mended.returncode == 0, _clean(mended)
    assert _rows(target_db.url, "codes") == _rows(source_db.url, "codes")
    assert "materialized views step" not in _clean(cli(["status"], env, tmp_path))


def test_verify_fails_an_unpopulated_view_and_warns_of_one_the_source_did_not_refresh(bed):
    source_db, target_db, env, tmp_path = bed
    assert cli([*RUN, "--no-verify"], env, tmp_path, 300).returncode == 0
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute("REFRESH MATERIALIZED VIEW a_summary WITH NO DATA")
    failed = cli(["verify"], env, tmp_path, 300)
    assert failed.returncode == 1, _clean(failed)
    summary = _views_checked(tmp_path)["public.a_summary"]
    assert not summary["passed"] and summary["severity"] == "ERROR"
    assert "populated on the source but not on the target" in summary["description"]

    # Rows changed on the source, whose view was not refreshed there: the run refreshes the
    # target's from the copied rows, and verify warns (and passes) that they differ.
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("DELETE FROM visits WHERE clinic = 3")
    done = cli([*RUN], env, tmp_path, 300)
    assert done.returncode == 0, _clean(done)
    z_base = _views_checked(tmp_path)["public.z_base"]
    assert not z_base["passed"] and z_base["severity"] == "WARN", z_base
    assert z_base["details"] == {"source_rows": 7, "target_rows": 6}
    assert "not refreshed since they changed" in z_base["description"]
    assert _views_checked(tmp_path)["public.a_summary"]["passed"] is False  # sum differs too

    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("DROP MATERIALIZED VIEW codes")
    gone = cli(["verify"], env, tmp_path, 300)
    assert gone.returncode == 1, _clean(gone)
    codes = _views_checked(tmp_path)["public.codes"]
    assert codes["severity"] == "ERROR" and "does not exist on the target" in codes["description"]


def test_a_view_reading_another_through_a_function_is_refreshed_after_it(
    source_db, target_db, tmp_path
):
    """A function's body leaves no dependency in the catalog: `aa_fn` was refreshed before
    the `zz_only` it reads through one, failed ("not populated"), and the run with it."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); "
            "INSERT INTO t SELECT g, g FROM generate_series(1, 50) g; "
            "CREATE MATERIALIZED VIEW zz_only AS SELECT sum(v) AS s FROM t; "
            "CREATE FUNCTION s_of() RETURNS bigint LANGUAGE sql STABLE "
            "AS $$ SELECT s FROM public.zz_only $$; "
            "CREATE MATERIALIZED VIEW aa_fn AS SELECT s_of() AS s"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli([*RUN], env, tmp_path, 300)
    assert done.returncode == 0, _clean(done)
    assert _rows(target_db.url, "aa_fn") == [(1275,)]


def test_preflight_names_a_view_over_a_table_left_out(source_db, target_db):
    """`run --exclude public.dropped`: the view over it was refreshed from the target's empty
    table, 0 where the source's holds 10, and nothing said why up front."""
    from .test_preflight import by_code, preflight

    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE kept (id int PRIMARY KEY); CREATE TABLE dropped (id int PRIMARY KEY); "
            "CREATE TABLE parts (id int) PARTITION BY RANGE (id); "
            "CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (100); "
            "CREATE VIEW both_ AS SELECT id FROM kept UNION ALL SELECT id FROM dropped; "
            "CREATE MATERIALIZED VIEW mv AS SELECT count(*) AS n FROM both_; "
            "CREATE MATERIALIZED VIEW over_mv AS SELECT n FROM mv; "
            "CREATE MATERIALIZED VIEW of_a_part AS SELECT count(*) AS n FROM parts_1"
        )
    findings = preflight(
        source_db.url, target_db.url, ["public"], tables=["public.kept", "public.parts"]
    )
    said = {f.subject: f.message for f in by_code(findings, "materialized-view-input")}
    assert said == {
        "public.mv": "Materialized view public.mv reads public.dropped, which is not migrated: "
        "refreshed on the target, it will not hold what the source's holds.",
        "public.over_mv": "Materialized view public.over_mv reads public.dropped, which is not "
        "migrated: refreshed on the target, it will not hold what the source's holds.",
    }


def test_schema_mode_none_leaves_a_view_another_role_owns(source_db, target_db, tmp_path):
    """The user's target schema, a view there owned by a role the login is not a member of:
    every run failed on its refresh ("must be owner"), and the steps after it never ran."""
    from .test_preflight import by_code, preflight

    schema = (
        "CREATE TABLE t (id int PRIMARY KEY, v int); "
        "CREATE MATERIALIZED VIEW theirs AS SELECT count(*) AS n FROM t; "
    )
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(schema + "INSERT INTO t SELECT g, g FROM generate_series(1, 30) g")
        conn.execute("REFRESH MATERIALIZED VIEW theirs")
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute(
            schema + "ALTER TABLE t OWNER TO postgres; GRANT SELECT ON theirs TO postgres; "
            "DO $$ BEGIN CREATE ROLE reporting_owner; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$; "
            "ALTER MATERIALIZED VIEW theirs OWNER TO reporting_owner"
        )
    (said,) = by_code(preflight(source_db.url, target_db.url, ["public"], mode="none"),
                      "materialized-view-owner")  # fmt: skip
    assert "owned by reporting_owner, a role the target's login is not a member of" in (
        said.message
    )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli(["run", "--no-progress", "--schema-mode", "none"], env, tmp_path, 300)
    assert done.returncode == 0, _clean(done)
    with psycopg.connect(target_db.admin_url) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (30,)
        steps = conn.execute("SELECT step FROM supabase_migration.migration_steps ORDER BY 1")
        assert {"security", "sequences", "materialized_views"} <= {s for (s,) in steps}
    (view,) = _views_checked(tmp_path).values()
    assert view["severity"] == "WARN" and view["details"] == {"source_rows": 1, "target_rows": 1}
    with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
        conn.execute("REFRESH MATERIALIZED VIEW theirs WITH NO DATA")
    assert cli(["verify"], env, tmp_path, 300).returncode == 1
    (view,) = _views_checked(tmp_path).values()
    assert view["description"].endswith("its owner there, reporting_owner, must refresh it.")


def test_a_view_reading_one_that_stays_unpopulated_ends_the_retries_and_fails_the_run(
    source_db, target_db, tmp_path
):
    """`outer_mv` reads `inner_mv` through a function, and the source emptied `inner_mv`
    (WITH NO DATA) after refreshing `outer_mv`: on the target `inner_mv` stays unpopulated,
    as on the source, so no pass can refresh `outer_mv`. The passes end with the first that
    refreshes nothing, and the run fails naming the view."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); "
            "INSERT INTO t SELECT g, g FROM generate_series(1, 50) g; "
            "CREATE MATERIALIZED VIEW inner_mv AS SELECT sum(v) AS s FROM t; "
            "CREATE FUNCTION s_of() RETURNS bigint LANGUAGE sql STABLE "
            "AS $$ SELECT s FROM public.inner_mv $$; "
            "CREATE MATERIALIZED VIEW outer_mv AS SELECT s_of() AS s; "
            "CREATE MATERIALIZED VIEW other_mv AS SELECT count(*) AS n FROM t; "
            "REFRESH MATERIALIZED VIEW inner_mv WITH NO DATA"
        )
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli([*RUN, "--no-verify"], env, tmp_path, 300)
    assert done.returncode == 1, done.stdout + done.stderr
    said = "Refreshing the materialized view public.outer_mv failed: it reads another that is "
    assert said + "not populated on the target" in _clean(done)
    state = _state(target_db.url)
    assert not state["outer_mv"][0] and not state["inner_mv"][0] and state["other_mv"][0]


def test_a_view_missing_on_the_users_target_is_said_by_the_step(source_db, target_db, tmp_path):
    """Schema mode none, a target schema the user made without one of the source's views:
    the step refreshes the others and says, in its log and its table, which is missing (the
    run goes on; verify fails on it)."""
    table = "CREATE TABLE t (id int PRIMARY KEY, v int); "
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(
            table + "INSERT INTO t SELECT g, g FROM generate_series(1, 30) g; "
            "CREATE MATERIALIZED VIEW kept AS SELECT count(*) AS n FROM t; "
            "CREATE MATERIALIZED VIEW gone AS SELECT sum(v) AS s FROM t"
        )
    with psycopg.connect(target_db.url, autocommit=True) as conn:
        conn.execute(table + "CREATE MATERIALIZED VIEW kept AS SELECT count(*) AS n FROM t")
    env = cli_env(source_db.url, target_db.url, tmp_path)
    done = cli(["run", "--no-progress", "--schema-mode", "none"], env, tmp_path, 300)
    assert done.returncode == 1, _clean(done)  # verify: the view is not there
    assert _rows(target_db.url, "kept") == [(30,)]
    assert "The materialized view public.gone is not on the target." in _logged(env)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (step,) = instance.fetch_materializations(MATVIEWS_KEY, limit=10).records
        table_md = step.asset_materialization.metadata["views"].value
    assert "| public.gone | not on the target |" in table_md
    assert "| public.kept | refreshed |" in table_md
