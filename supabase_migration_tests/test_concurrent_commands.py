# ruff: noqa: F811  (fixtures imported from test_faults)
"""Commands of this tool running at the same time against one target and Dagster home."""

from __future__ import annotations

import os
import time

import psycopg
import pytest

from .compare import assert_tables_equal
from .test_faults import (  # noqa: F401  (fixtures)
    TABLES,
    assert_clean_exit,
    cli,
    dagster_home,
    explain,
    finish,
    migration_env,
    pycache_prefix,
    seed_source,
    start_cli,
    wait_until,
)


def _waiting_on_lock(conn, pattern: str) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query ILIKE %s",
        [pattern],
    ).fetchone()[0]


class _Drained:
    """A started CLI's stdout and stderr, read as they come (a full pipe would stop it)."""

    def __init__(self, process) -> None:
        import threading

        self.process = process
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(pipe, into), daemon=True)
            for pipe, into in ((process.stdout, self._out), (process.stderr, self._err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe, into: list[str]) -> None:
        for line in pipe:
            into.append(line)

    def err(self) -> str:
        return "".join(list(self._err))

    def ended(self, timeout: float):
        """What it wrote, once it ends (killed, and the test failed, after `timeout` s)."""
        import subprocess

        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the CLI did not end within {timeout} s:\n{explain(self.finished())}")
        return self.finished()

    def finished(self):
        """What it wrote, once it has ended."""
        import subprocess

        for reader in self._readers:
            reader.join(10)
        out = "".join(self._out)
        return subprocess.CompletedProcess(self.process.args, self.process.poll(), out, self.err())


def _activity(conn) -> str:
    """The target's sessions and the locks they wait for: what a stuck command waits on."""
    rows = conn.execute(
        """SELECT a.pid, a.state, a.wait_event_type, a.wait_event, left(a.query, 120),
             (SELECT string_agg(concat_ws(' ', l.locktype, l.mode, l.relation::regclass,
                                          l.objid), ', ')
              FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)
           FROM pg_stat_activity a
           WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"""
    ).fetchall()
    return "\n".join(map(repr, rows))


def test_runs_waiting_for_the_pool_beside_a_stuck_run_stop_and_go_on(
    source_db, target_db, tmp_path, dagster_home, pycache_prefix
):
    """`run --workers 4` has each worker inside a range that does not end (waiting on a
    lock): every slot of the `supabase_target` pool (4) is taken.

    A second `run` in the same DAGSTER_HOME waited for a slot inside Dagster's setup run,
    which holds Ctrl-C and SIGTERM until a step starts: a signal did not stop it. The CLI
    waits for a free slot itself, saying so, where a signal stops it.

    A third `run` waits while the first is stopped (SIGTERM, as a supervisor does): its
    workers were SIGKILLed after the 5-second grace, their Dagster runs left STARTED with the
    4 slots claimed, so the third waited for ever, its target idle. The first frees them as
    it kills its workers."""
    import signal
    import subprocess

    seed_source(source_db.url, 6_000)
    env = migration_env(source_db.url, target_db.url, tmp_path, dagster_home, pycache_prefix)
    assert_clean_exit(cli(["init", "--schema-mode", "dump", "--batch-size", "50"], env, tmp_path))
    old = start_cli(["run", "--no-progress", "--workers", "4"], env, tmp_path)
    old_output = _Drained(old)  # read as it comes: a full pipe would stop it, holding locks
    waiting = None
    third = None
    try:
        with (
            psycopg.connect(target_db.admin_url) as gate,
            psycopg.connect(target_db.admin_url, autocommit=True) as probe,
        ):

            def four_workers_stuck() -> bool:
                if not probe.execute("SELECT to_regclass('public.tags')").fetchone()[0]:
                    return False
                if gate.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    gate.execute("LOCK TABLE public.items, public.tags IN SHARE MODE")
                return _waiting_on_lock(probe, "COPY%") >= 4

            stuck = wait_until(four_workers_stuck, [old], timeout=80)
            assert stuck, explain(old_output.ended(60))
            # Python's fault handler: SIGABRT prints where each of its threads is.
            waiting = start_cli(
                ["run", "--no-progress"], {**env, "PYTHONFAULTHANDLER": "1"}, tmp_path
            )
            said = "Waiting for a slot of the supabase_target pool: all 4 are held"
            # Signalled once it says it waits: a fixed sleep signalled a loaded machine's CLI
            # before it got there (Dagster's setup run then held the signal).
            output = _Drained(waiting)
            if not wait_until(lambda: said in output.err(), [waiting], timeout=150, fail=False):
                waiting.send_signal(signal.SIGABRT)
                waiting.wait(10)
                pytest.fail(
                    "the second run did not say it waits for a slot (within 150 s, or before it "
                    f"ended)\n"
                    f"{_activity(probe)}\n{output.finished()}"
                )
            waiting.send_signal(signal.SIGTERM)
            try:
                waiting.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail("SIGTERM did not stop a run waiting for a pool slot within 20 s")
            stopped = output.finished()
            assert_clean_exit(stopped, allowed=(1,))
            third = start_cli(["run", "--no-progress"], env, tmp_path)
            time.sleep(3)
            old.send_signal(signal.SIGTERM)
            assert_clean_exit(old_output.ended(60), allowed=(1,))
            gate.commit()
        done = finish(third, 60)
    finally:
        for p in (old, waiting, third):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert_clean_exit(done)
    assert_tables_equal(source_db.url, target_db.url, TABLES)


@pytest.fixture
def second_target(target_server):
    from supabase_migration.localpg import SUPABASE_ADMIN, prepare_supabase_database

    from .testbed import TARGET_PASSWORD

    name = f"tgt_second_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    target_server.create_database(name, owner=SUPABASE_ADMIN)
    prepare_supabase_database(target_server, name)
    yield target_server.url(
        user="postgres", password=TARGET_PASSWORD, dbname=name, sslmode="require"
    )
    target_server.start()
    target_server.drop_database(name)


def test_a_plan_of_another_target_in_the_same_dagster_home_during_a_run(
    source_db, target_db, second_target, tmp_path, dagster_home, pycache_prefix
):
    """Two migrations share one DAGSTER_HOME (the default ./.dagster of one directory;
    the README's "another project under the same DAGSTER_HOME"), here staging planned with
    3,000-row ranges and production with 500. While production's `run` copies, staging's
    `run` plans: `_partitions_as_planned` deletes every partition key its own target's
    checkpoints lack, i.e. production's 000002..000011 of items and 000001 of tags.
    Production's next unit named partitions Dagster no longer had, and the CLI ended with
    Dagster's traceback. It puts its own keys back, and goes on."""
    seed_source(source_db.url, 6_000)
    staging_dir, prod_dir = tmp_path / "staging", tmp_path / "prod"
    staging_dir.mkdir()
    prod_dir.mkdir()
    staging = migration_env(source_db.url, second_target, staging_dir, dagster_home, pycache_prefix)
    prod = migration_env(source_db.url, target_db.url, prod_dir, dagster_home, pycache_prefix)
    done = cli(
        ["run", "--schema-mode", "dump", "--batch-size", "3000", "--no-progress", "--no-verify"],
        staging,
        staging_dir,
    )
    assert_clean_exit(done)
    assert_clean_exit(cli(["init", "--schema-mode", "dump", "--batch-size", "500"], prod, prod_dir))
    runs = [start_cli(["run", "--no-progress", "--workers", "1"], prod, prod_dir)]
    try:
        with (
            psycopg.connect(target_db.admin_url) as gate,
            psycopg.connect(target_db.admin_url, autocommit=True) as probe,
        ):

            def copying_items() -> bool:
                if not probe.execute("SELECT to_regclass('public.items')").fetchone()[0]:
                    return False
                if gate.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    gate.execute("LOCK TABLE public.items IN SHARE MODE")
                return _waiting_on_lock(probe, "COPY%") >= 1

            assert wait_until(copying_items, runs, timeout=80), explain(finish(runs[0]))
            again = cli(["run", "--no-progress", "--no-verify"], staging, staging_dir)
            assert_clean_exit(again)
            gate.commit()
        done = finish(runs[0], 120)
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert_clean_exit(done)
    final = cli(["run", "--no-progress"], prod, prod_dir)
    assert_clean_exit(final)
    assert_tables_equal(source_db.url, target_db.url, TABLES)


def test_a_slot_dagster_has_assigned_but_not_claimed_is_waited_for(dagster_home, monkeypatch):
    """Dagster admits a step while the pool's slots outnumber the steps it has assigned one,
    claimed or not. Counting claims alone, the CLI saw a slot free that Dagster would not
    give, went on, and waited inside Dagster's run, which holds SIGTERM (caught in CI by the
    test above). It waits itself, saying so, until the assigned step lets go."""
    import threading

    from supabase_migration.assets import TARGET_POOL
    from supabase_migration.commands import _wait_for_a_target_slot, dagster_instance

    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    instance = dagster_instance()
    storage = instance.event_log_storage
    storage.set_concurrency_slots(TARGET_POOL, 1)
    storage.add_pending_step(TARGET_POOL, "another-run", "copy_step", should_assign=True)
    info = storage.get_concurrency_info(TARGET_POOL)
    assert (info.active_slot_count, info.assigned_step_count) == (0, 1)  # assigned, unclaimed
    said: list[str] = []
    waiting = threading.Thread(target=_wait_for_a_target_slot, args=(instance, said.append))
    waiting.start()
    waiting.join(3)
    assert waiting.is_alive(), "went on while Dagster had assigned the only slot"
    assert said and said[0].startswith(
        "Waiting for a slot of the supabase_target pool: all 1 are held by other runs in this "
        "DAGSTER_HOME (another-run;"
    ), said
    storage.free_concurrency_slots_for_run("another-run")
    waiting.join(10)
    assert not waiting.is_alive(), "still waiting once the slot was given back"
