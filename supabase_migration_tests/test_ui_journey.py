"""What a user working in the Dagster UI meets, asset by asset: the steps materialized alone
or out of order, backfills with the default config, and the checks' words. In process
(`dg.materialize`, a job of the checks), against the test bed's real servers."""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest

from supabase_migration import assets
from supabase_migration.catalog import read_tables
from supabase_migration.checks import REPORT_KEY
from supabase_migration.definitions import build_definitions
from supabase_migration.manifest import from_catalog
from supabase_migration.resources import SourceDatabase, TargetDatabase
from supabase_migration.security_assets import SECURITY_KEY

SCHEMA = """
CREATE TABLE patients (id bigint PRIMARY KEY, full_name text NOT NULL, ssn text);
"""
SEED = (
    "INSERT INTO patients SELECT g, 'Name ' || g, lpad(g::text, 9, '0') "
    "FROM generate_series(1, {n}) g"
)
TABLE = "public.patients"
KEY = assets.table_asset_key(TABLE)
CHECKS = (
    "row_count_matches",
    "checksums_match",
    "sample_rows_match",
    "indexes_match",
    "constraints_match",
    "foreign_keys_valid",
    "sequence_ahead",
)


class Bed:
    def __init__(
        self, source_db, target_db, tmp_path, monkeypatch, rows=1000, batch=300, mode="none"
    ):
        self.source, self.target = source_db, target_db
        monkeypatch.setenv("SUPABASE_MIGRATION_REPORT_DIR", str(tmp_path / "report"))
        with psycopg.connect(source_db.url, autocommit=True) as c:
            c.execute(SCHEMA)
            c.execute(SEED.format(n=rows))
        if mode == "none":
            with psycopg.connect(target_db.url, autocommit=True) as c:
                c.execute(SCHEMA)
        with psycopg.connect(source_db.url, autocommit=True) as s:
            self.manifest = from_catalog(
                read_tables(s, ["public"]), schemas=["public"], schema_mode=mode, batch_size=batch
            )
        self.defs = build_definitions(self.manifest)
        self.resources = {
            "source": SourceDatabase(url=source_db.url),
            "target": TargetDatabase(url=target_db.url),
        }
        self.instance = dg.DagsterInstance.ephemeral()

    def sql_source(self, q):
        with psycopg.connect(self.source.url, autocommit=True) as c:
            c.execute(q)

    def sql_target(self, q, admin=False):
        with psycopg.connect(
            self.target.admin_url if admin else self.target.url, autocommit=True
        ) as c:
            cur = c.execute(q)
            return cur.fetchall() if cur.description else None

    def asset(self, key):
        return self.defs.get_assets_def(key)

    def setup(self):
        r = dg.materialize(
            [self.asset(assets.SCHEMA_KEY), self.asset(assets.PLAN_KEY)],
            instance=self.instance,
            resources=self.resources,
            raise_on_error=False,
        )
        assert r.success, self.failures(r)
        return r

    def step_failure(self, key) -> str:
        """The one step failure's sentence, materializing `key` alone."""
        result = dg.materialize(
            [self.asset(key)],
            instance=self.instance,
            resources=self.resources,
            raise_on_error=False,
        )
        (said,) = [f[1] for f in self.failures(result) if f[0] == "STEP_FAILURE"]
        return said

    def keys(self):
        return self.instance.get_dynamic_partitions(assets.partitions_def_name(TABLE))

    def one(self, key, config=None, table=TABLE):
        return dg.materialize(
            [self.asset(assets.table_asset_key(table))],
            instance=self.instance,
            resources=self.resources,
            partition_key=key,
            raise_on_error=False,
            run_config=config,
        )

    def range_run(self, first, last, table=TABLE):
        """What a backfill launches under BackfillPolicy.multi_run: one run over a range."""
        return dg.materialize(
            [self.asset(assets.table_asset_key(table))],
            instance=self.instance,
            resources=self.resources,
            raise_on_error=False,
            tags={
                "dagster/asset_partition_range_start": first,
                "dagster/asset_partition_range_end": last,
            },
        )

    def checks(self, names=CHECKS):
        sel = [dg.AssetCheckKey(KEY, n) for n in names]
        job = dg.define_asset_job("hunt_checks", selection=dg.AssetSelection.checks(*sel))
        d2 = dg.Definitions.merge(self.defs, dg.Definitions(jobs=[job]))
        r = d2.resolve_job_def("hunt_checks").execute_in_process(
            instance=self.instance, raise_on_error=False, resources=self.resources
        )
        return r, {e.check_name: e for e in r.get_asset_check_evaluations()}

    def materialized(self):
        return self.instance.get_materialized_partitions(KEY)

    def statuses(self):
        return dict(
            self.sql_target(
                "SELECT partition_key, status FROM supabase_migration.migration_checkpoints "
                f"WHERE table_name = '{TABLE}' ORDER BY 1"
            )
        )

    def failures(self, r):
        out = []
        for e in self.instance.all_logs(r.run_id):
            ev = e.dagster_event
            if ev is not None and ev.event_type_value in ("STEP_FAILURE", "RUN_FAILURE"):
                d = ev.event_specific_data
                ufd = getattr(d, "user_failure_data", None)
                err = getattr(d, "error", None)
                out.append(
                    (
                        ev.event_type_value,
                        ufd.description if ufd else None,
                        err.to_string() if err else None,
                    )
                )
        return out

    def logs(self, r, level=None):
        return [
            e.user_message
            for e in self.instance.all_logs(r.run_id)
            if e.dagster_event is None and (level is None or e.level >= level)
        ]


@pytest.fixture
def bed(source_db, target_db, tmp_path, monkeypatch):
    b = Bed(source_db, target_db, tmp_path, monkeypatch)
    yield b
    b.instance.dispose()


def test_the_plan_alone_is_refused_on_a_target_the_schema_step_has_not_prepared(bed):
    """migration/plan materialized on its own (the asset graph allows it, or SUPABASE_DB_URL
    changed under a Dagster home showing migration/schema materialized): the schema step's
    preflight, which refuses a target whose tables hold rows this tool did not copy (the
    wrong project), never ran; the plan wrote checkpoints, a backfill deleted those rows,
    and copied the others into a table the API roles could read."""
    others = "SELECT count(*) FROM patients WHERE id > 5000"
    bed.sql_target("GRANT SELECT ON patients TO anon")  # Supabase's default privileges
    bed.sql_target(
        "INSERT INTO patients SELECT g, 'Other ' || g, NULL FROM generate_series(5001, 5020) g"
    )
    refused = dg.materialize(
        [bed.asset(assets.SCHEMA_KEY)],
        instance=bed.instance,
        resources=bed.resources,
        raise_on_error=False,
    )
    assert "already holds rows this tool did not copy" in bed.failures(refused)[0][1]
    said = bed.step_failure(assets.PLAN_KEY)
    assert said.startswith("migration/schema has not prepared this target"), said
    assert bed.keys() == [] and bed.sql_target(others)[0][0] == 20


def test_a_table_planned_alone_for_the_first_time_is_closed_to_the_api_first(bed):
    """A table added to the manifest after the first run, planned in the UI without the
    schema step: its rows were copied into a table Supabase's default privileges let the API
    roles read, until migration/security ran at the end."""
    bed.setup()
    visits = "CREATE TABLE visits (id bigint PRIMARY KEY, note text)"
    bed.sql_source(visits + "; INSERT INTO visits SELECT g, 'n' || g FROM generate_series(1, 50) g")
    bed.sql_target(visits + "; GRANT SELECT ON visits TO anon")
    with psycopg.connect(bed.source.url) as s:
        bed.manifest = from_catalog(read_tables(s, ["public"]), schemas=["public"])
    bed.defs = build_definitions(bed.manifest)
    plan = dg.materialize(
        [bed.asset(assets.PLAN_KEY)],
        instance=bed.instance,
        resources=bed.resources,
        raise_on_error=False,
    )
    assert plan.success, bed.failures(plan)
    (rls,) = bed.sql_target("SELECT relrowsecurity FROM pg_class WHERE oid = 'visits'::regclass")
    assert rls == (True,)


def test_a_backfill_of_every_partition_skips_the_completed_ranges_as_the_plan_says(bed):
    """After a target reset the plan warns, in the UI: "backfill every partition of the table
    (completed ranges are skipped)", and the README says so too. A UI materialization's config
    defaulted to resync: true, so every completed, unchanged range was read whole from the
    source, staged and compared on the target again."""
    bed.setup()
    keys = bed.keys()
    assert bed.range_run(keys[0], keys[-1]).success
    again = bed.range_run(keys[0], keys[-1])  # the backfill, launched with the default config
    assert again.success
    paths = {
        e.partition: e.materialization.metadata["path"].value
        for e in again.get_asset_materialization_events()
    }
    assert set(paths) == set(keys)
    restaged = sorted(k for k, path in paths.items() if path != "unchanged")
    assert not restaged, f"completed, unchanged ranges copied again: {paths}"


def test_a_deferred_index_that_failed_to_build_is_not_called_waiting_for_ranges(bed):
    """Every range copied, the deferred unique index failed to build (duplicates the source
    allows). The table's indexes_match check in the UI said the index was "not built yet;
    `supabase-migrate run` builds them once every range is copied": every range was copied,
    the build had failed, and neither `run` nor a UI re-run builds it until the duplicates
    go."""
    bed.sql_target("CREATE UNIQUE INDEX patients_ssn_key ON patients (ssn)")
    bed.sql_source("UPDATE patients SET ssn = '000000001' WHERE id = 500")
    bed.setup()
    keys = bed.keys()
    copied = bed.range_run(keys[0], keys[-1])
    assert not copied.success  # the build failed, naming the index
    assert "could not create unique index" in bed.failures(copied)[0][1]
    assert set(bed.statuses().values()) == {"completed"}
    _, found = bed.checks(["indexes_match"])
    said = found["indexes_match"].description
    assert not found["indexes_match"].passed
    assert "once every range is copied" not in said, said


def test_checks_of_a_table_never_planned_say_to_plan_it_first(bed):
    """Run from the UI before any plan (or for a table added to the manifest since), the
    checks failed saying "re-run partitions 000000", ready to paste into a backfill, though
    Dagster has no partition of the table: what to do is to materialize migration/plan."""
    result, found = bed.checks(["row_count_matches", "checksums_match"])
    assert not result.success and found == {}
    (said,) = [f[1] for f in bed.failures(result) if f[0] == "STEP_FAILURE"]
    assert said.startswith("No run has planned public.patients yet; materialize the "), said


def test_the_report_asset_refuses_a_target_missing_a_copied_table_as_verify_does(bed, tmp_path):
    """`supabase-migrate verify` names a copied table since dropped on the target, with the
    way out, in one sentence; the report asset in the UI failed each of its checks with
    "does not exist on the target" and wrote that report over the last one."""
    bed.setup()
    keys = bed.keys()
    assert bed.range_run(keys[0], keys[-1]).success
    bed.sql_target("DROP TABLE patients")
    said = bed.step_failure(REPORT_KEY)
    assert said.startswith("public.patients was copied but no longer exists on the target"), said
    assert not (tmp_path / "report").exists()


def test_the_report_asset_refuses_a_target_with_none_of_the_tables(bed, tmp_path):
    """Not yet migrated, or the wrong project: one sentence, not seven failed checks."""
    bed.sql_target("DROP TABLE patients")
    said = bed.step_failure(REPORT_KEY)
    assert said.startswith("The target has none of the 1 tables to verify"), said
    assert not (tmp_path / "report").exists()


def test_materialize_all_on_a_new_target_stops_before_the_steps_after_the_copy(bed):
    """The UI's "Materialize all" on a new target: the tables' assets have no partition yet
    (the plan makes them), so only the steps without partitions ran, and the sequences,
    security and materialized views showed materialized, the migration green, with no row
    copied. The steps after the copy now refuse until every range is copied."""
    keys = [
        assets.SCHEMA_KEY,
        assets.PLAN_KEY,
        assets.INDEXES_KEY,
        assets.SEQUENCES_KEY,
        SECURITY_KEY,
        assets.MATVIEWS_KEY,
    ]
    result = dg.materialize(
        [bed.asset(k) for k in keys],
        instance=bed.instance,
        resources=bed.resources,
        raise_on_error=False,
    )
    done = {e.asset_key for e in result.get_asset_materialization_events()}
    assert done == {assets.SCHEMA_KEY, assets.PLAN_KEY, assets.INDEXES_KEY}
    (said,) = [f[1] for f in bed.failures(result) if f[0] == "STEP_FAILURE"]
    assert said == (
        "1 table is not fully copied yet (public.patients), and migration/sequences runs once "
        "every one is: materialize their missing and failed partitions first (a backfill of "
        "the tables' assets, or `supabase-migrate run`), then this step."
    )
    keys_planned = bed.keys()
    assert bed.range_run(keys_planned[0], keys_planned[-1]).success
    again = dg.materialize(
        [bed.asset(k) for k in keys[2:]],
        instance=bed.instance,
        resources=bed.resources,
        raise_on_error=False,
    )
    assert again.success, bed.failures(again)


def test_a_column_the_target_lacks_is_named_before_any_range_is_tried(bed):
    """The source gained a column after the schema step; a backfill in the UI failed every
    range with `column "…" does not exist` (PostgreSQL's sentence, scrubbed of the name) and
    marked each one failed. The table run now names the column once and tries no range."""
    bed.setup()
    keys = bed.keys()
    assert bed.range_run(keys[0], keys[-1]).success
    bed.sql_source("ALTER TABLE patients ADD COLUMN email text DEFAULT 'x@example.org'")
    result = bed.range_run(keys[0], keys[-1])
    (said,) = [f[1] for f in bed.failures(result) if f[0] == "STEP_FAILURE"]
    assert said.startswith(
        "public.patients on the target lacks the source's column(s) email, so no range can "
        "be copied;"
    ), said
    assert set(bed.statuses().values()) == {"completed"}
