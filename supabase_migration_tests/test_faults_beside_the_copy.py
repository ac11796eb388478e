"""Faults beside the bulk copy of ranges: the schema step, the deferred index build,
verification and the CLI's own reads between its steps; and what `status`, `resume` and `run`
make of them afterwards. The copy's own faults are test_faults.py's.

Each test drives the real CLI against the test bed (the target's sessions ended while they
wait on a lock held for the purpose, the pooler restarted, a connection cut off silently).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from . import test_faults
from .compare import assert_tables_equal
from .test_faults import (
    GRP_INDEX,
    TABLES,
    assert_clean_exit,
    cli,
    explain,
    finish,
    migration_env,
    report_status,
    seed_source,
    start_cli,
    target_indexes,
)

dagster_home = test_faults.dagster_home
pycache_prefix = test_faults.pycache_prefix

DEFERRED = "supabase_migration.deferred_indexes"
RUN = ["run", "--schema-mode", "dump", "--batch-size", "500", "--no-progress"]


def _run_beside(saboteur, env, workdir) -> subprocess.CompletedProcess[str]:
    """`run` while `saboteur` (a thread with `stop` and `error`) does its work beside it."""
    process = start_cli(RUN, env, workdir)
    saboteur.start()
    try:
        done = finish(process, timeout=150)
    finally:
        saboteur.stop.set()
        saboteur.join(30)
    assert saboteur.error is None, repr(saboteur.error)
    return done


@pytest.fixture
def bed(source_db, target_db, tmp_path: Path, dagster_home, pycache_prefix):
    seed_source(source_db.url, 6_000)
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(GRP_INDEX)
    env = migration_env(source_db.url, target_db.url, tmp_path, dagster_home, pycache_prefix)
    return source_db, target_db, env, tmp_path


def _waiting_index_build(conn: psycopg.Connection) -> list[int]:
    return [
        pid
        for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND usename = 'postgres' AND wait_event_type = 'Lock' "
            "AND query ILIKE 'CREATE INDEX%%'"
        ).fetchall()
    ]


def _deferred_recorded(conn: psycopg.Connection) -> bool:
    try:
        return bool(conn.execute(f"SELECT count(*) FROM {DEFERRED}").fetchone()[0])
    except psycopg.errors.UndefinedTable:
        return False


class Beside(threading.Thread):
    """Work done beside the CLI on two connections of the target's superuser: a `probe` that
    watches and a `holder` that holds locks (let go at the end). `stop` ends it early; what
    it raised is kept in `error`."""

    def __init__(self, admin_url: str) -> None:
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                psycopg.connect(self.admin_url, autocommit=True) as probe,
                psycopg.connect(self.admin_url) as holder,
            ):
                self.work(probe, holder)
                holder.rollback()
        except BaseException as exc:
            self.error = exc

    def work(self, probe: psycopg.Connection, holder: psycopg.Connection) -> None:
        raise NotImplementedError


class IndexBuildBlocker(Beside):
    """Once the plan has deferred items' index, holds a lock on items that CREATE INDEX waits
    for (an application's open write transaction); `terminate`: then ends the waiting index
    build's backend, as an admin or a pooler restart would, and lets go of the lock."""

    def __init__(self, admin_url: str, *, terminate: bool, hold_s: float = 0.0) -> None:
        super().__init__(admin_url)
        self.terminate = terminate
        self.hold_s = hold_s
        self.blocked: list[int] = []
        self.killed: list[int] = []

    def work(self, probe: psycopg.Connection, holder: psycopg.Connection) -> None:
        while not self.stop.is_set() and not _deferred_recorded(probe):
            time.sleep(0.01)
        holder.execute("LOCK TABLE public.items IN ROW EXCLUSIVE MODE")
        while not self.stop.is_set() and not self.blocked:
            self.blocked = _waiting_index_build(probe)
            time.sleep(0.01)
        if self.terminate:
            for pid in self.blocked:
                probe.execute("SELECT pg_terminate_backend(%s)", [pid])
                self.killed.append(pid)
            time.sleep(0.2)
        else:
            self.stop.wait(self.hold_s)


def test_index_build_whose_connection_is_dropped_is_tried_again(bed):
    """The target ends the session that builds a deferred index (a restart, a pooler
    failover, an admin's pg_terminate_backend): the run failed with every range copied
    ("fix the cause and resume"), sequences and security undone. A transient failure, which
    the steps retry: the run ends complete, verified, with the index in place."""
    source_db, target_db, env, workdir = bed
    blocker = IndexBuildBlocker(target_db.admin_url, terminate=True)
    done = _run_beside(blocker, env, workdir)
    assert blocker.killed, "no index build was caught waiting; the test proved nothing"
    assert_clean_exit(done)
    assert report_status(workdir) == "PASS"
    assert "items_grp_idx" in target_indexes(target_db.url)
    assert_tables_equal(source_db.url, target_db.url, TABLES)


def _started_until_the_build_waits(blocker: IndexBuildBlocker, env, workdir) -> subprocess.Popen:
    """`run` started, returned once its index build waits for `blocker`'s lock."""
    process = start_cli(RUN, env, workdir)
    blocker.start()
    deadline = time.monotonic() + 90
    while not blocker.blocked and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    if not blocker.blocked:
        blocker.stop.set()
        pytest.fail(explain(finish(process)))
    return process


def test_index_build_cut_off_by_a_pooler_restart_is_tried_again(bed, pooler):
    """The same through Supabase's transaction pooler (PgBouncer here), restarted while the
    index is being built."""
    source_db, target_db, env, workdir = bed
    env = {**env, "SUPABASE_DB_URL": target_db.pooler_url}
    env["SUPABASE_DB_ENDPOINT"] = "transaction_pooler"
    blocker = IndexBuildBlocker(target_db.admin_url, terminate=False, hold_s=60)
    process = _started_until_the_build_waits(blocker, env, workdir)
    try:
        pooler.restart()
        time.sleep(0.5)
        blocker.stop.set()
        done = finish(process, timeout=120)
    finally:
        blocker.stop.set()
        blocker.join(30)
    assert blocker.error is None, repr(blocker.error)
    assert_clean_exit(done)
    assert report_status(workdir) == "PASS"
    assert "items_grp_idx" in target_indexes(target_db.url)
    assert_tables_equal(source_db.url, target_db.url, TABLES)


def finish_within(process, seconds: float) -> subprocess.CompletedProcess[str]:
    """The started CLI's result; TimeoutExpired (the CLI left running) if it takes longer."""
    out, err = process.communicate(timeout=seconds)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _status(env, workdir) -> dict:
    done = cli(["status", "--json"], env, workdir)
    assert_clean_exit(done)
    return json.loads(done.stdout)["tables"]


def _all_copied_and_built(conn: psycopg.Connection) -> bool:
    try:
        (left,) = conn.execute(
            "SELECT (SELECT count(*) FROM supabase_migration.migration_checkpoints "
            "        WHERE status <> 'completed') "
            f"    + (SELECT count(*) FROM {DEFERRED}) "
            "    + (SELECT CASE WHEN count(*) = 0 THEN 1 ELSE 0 END "
            "       FROM supabase_migration.migration_checkpoints)"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return False
    return left == 0


class LockAndTerminate(Beside):
    """Once `ready` holds, takes `lock` on items; the first of the tool's statements that
    waits for it (matching `pattern`) has its backend terminated, then the lock is let go."""

    def __init__(
        self, admin_url: str, ready, pattern: str, lock: str = "ACCESS EXCLUSIVE", times: int = 1
    ):
        super().__init__(admin_url)
        self.ready, self.pattern, self.lock, self.times = ready, pattern, lock, times
        self.killed: list[str] = []

    def work(self, probe: psycopg.Connection, holder: psycopg.Connection) -> None:
        while not self.stop.is_set() and not self.ready(probe):
            time.sleep(0.005)
        if self.lock.startswith(("SELECT", "LOCK")):
            holder.execute(self.lock)
        else:
            holder.execute(f"LOCK TABLE public.items IN {self.lock} MODE")
        while not self.stop.is_set() and len(self.killed) < self.times:
            rows = probe.execute(
                "SELECT pid, query FROM pg_stat_activity "
                "WHERE datname = current_database() AND usename = 'postgres' "
                "AND wait_event_type = 'Lock' AND query ILIKE %s",
                [self.pattern],
            ).fetchall()
            for pid, query in rows:
                probe.execute("SELECT pg_terminate_backend(%s)", [pid])
                self.killed.append(query[:80])
            time.sleep(0.005)
        time.sleep(0.2)


def _sequence_set(conn: psycopg.Connection) -> bool:
    try:
        (value,) = conn.execute("SELECT last_value FROM public.items_id_seq").fetchone()
    except psycopg.Error:
        return False
    return value >= 6_000


def test_verification_whose_connection_is_dropped_does_not_report_differences(bed):
    """One of verification's target sessions is ended (a restart, a failover, a pooler
    restart) while every row is in place: the check it ran failed as "could not run", and
    the run said "verification FAILED; see ... for what differs", where nothing differed. The
    check runs once more on new connections."""
    source_db, target_db, _, workdir = bed
    # The whole-table count and checksum that verification reads first.
    saboteur = LockAndTerminate(target_db.admin_url, _sequence_set, "SELECT count(*), %")
    done = _run_beside(saboteur, bed[2], bed[3])
    assert saboteur.killed, "nothing was caught; the test proved nothing"
    assert_tables_equal(source_db.url, target_db.url, TABLES)  # nothing differs
    assert_clean_exit(done)
    assert report_status(workdir) == "PASS"


SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('supabase_migration.schema'))"


def test_schema_step_whose_connection_is_dropped_is_tried_again(bed):
    """The target ends the session applying the dumped schema (its one transaction rolls
    back): dump mode failed the run (exit 1), where Alembic mode and every other one-off step
    retry a transient failure. It is retried, and the run completes."""
    _, target_db, _, workdir = bed
    saboteur = LockAndTerminate(
        target_db.admin_url, lambda _: True, "%supabase_migration.schema%", SCHEMA_LOCK
    )
    done = _run_beside(saboteur, bed[2], bed[3])
    assert saboteur.killed, "nothing was caught; the test proved nothing"
    assert_clean_exit(done)
    assert report_status(workdir) == "PASS"
    assert "items_grp_idx" in target_indexes(target_db.url)


class LossyRelay:
    """A TCP relay to the target whose existing connections can be cut off silently
    (`blackhole`): nothing more passes either way and a client's close never reaches the
    server, as when a NAT or load balancer between them drops its state. Connections made
    afterwards pass as usual."""

    def __init__(self, port: int) -> None:
        import socket

        self._socket = socket
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._server_port = port
        self._pairs: list[tuple] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> int:
        for _, _, dead in self._pairs:
            dead.set()
        return len(self._pairs)

    def close(self) -> None:
        self._closed.set()
        for sock in [self._listener, *(s for a, b, _ in self._pairs for s in (a, b))]:
            with contextlib.suppress(OSError):
                sock.shutdown(self._socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = self._socket.create_connection(("127.0.0.1", self._server_port))
            dead = threading.Event()
            self._pairs.append((client, server, dead))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pass, args=(a, b, dead), daemon=True).start()

    def _pass(self, source, sink, dead: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                if not dead.is_set():
                    sink.sendall(data)
        except OSError:
            return
        if not dead.is_set():  # an orderly close passes on; a black-holed one never arrives
            with contextlib.suppress(OSError):
                sink.shutdown(self._socket.SHUT_WR)


def test_index_build_lost_silently_does_not_hang_every_later_run(bed):
    """The CLI dies (SIGKILL, or its machine) while the target's session that builds a
    deferred index is cut off silently: the session lives on at the target, idle in its
    transaction with the table's lock and the build's advisory lock. The next build waited
    for it without bound, so `resume` hung, saying nothing, for as long as the target kept
    that session (hours: the server's TCP keepalive). A build of ours idle in its
    transaction for 10 s has lost its client, and is ended."""
    from urllib.parse import urlsplit, urlunsplit

    _, target_db, env, workdir = bed
    parts = urlsplit(target_db.url)
    relay = LossyRelay(parts.port)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{relay.port}"
    env = {**env, "SUPABASE_DB_URL": urlunsplit(parts._replace(netloc=netloc))}
    blocker = IndexBuildBlocker(target_db.admin_url, terminate=False, hold_s=120)
    process = _started_until_the_build_waits(blocker, env, workdir)
    try:
        assert relay.blackhole()
        process.kill()
        process.wait()
        blocker.stop.set()  # the application lets go: the lost session builds, then idles
        blocker.join(30)
        assert blocker.error is None, repr(blocker.error)
        with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                (idle,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND usename = 'postgres' AND state = 'idle in transaction' "
                    "AND query ILIKE 'CREATE INDEX%%'"
                ).fetchone()
                if idle:
                    break
                time.sleep(0.05)
            assert idle, "the lost session did not go on to idle in its transaction"
        tables = _status(env, workdir)
        assert tables["public.items"]["indexes_waiting"] == 1, tables
        resuming = start_cli(["resume", "--no-progress"], env, workdir)
        try:
            resumed = finish_within(resuming, 40)
        except subprocess.TimeoutExpired:
            with psycopg.connect(target_db.admin_url, autocommit=True) as conn:
                waits = conn.execute(
                    "SELECT wait_event_type, wait_event, left(query, 90) "
                    "FROM pg_stat_activity WHERE datname = current_database() "
                    "AND usename = 'postgres' AND wait_event_type = 'Lock'"
                ).fetchall()
            resuming.kill()
            _, err = resuming.communicate()
            pytest.fail(
                "`resume` was still waiting after 40 s, for the lost session's lock: "
                f"{waits}; its output so far: {err[-500:]!r}"
            )
        assert_clean_exit(resumed)
        assert "items_grp_idx" in target_indexes(target_db.url)
    finally:
        if process.poll() is None:
            process.kill()
        blocker.stop.set()
        relay.close()


class PoolerOutage(threading.Thread):
    """Once `ready` holds, the pooler is down for `down_s` seconds (a restart, a failover)."""

    def __init__(self, admin_url: str, pooler, ready, down_s: float) -> None:
        super().__init__(daemon=True)
        self.admin_url, self.pooler, self.ready, self.down_s = admin_url, pooler, ready, down_s
        self.stop = threading.Event()
        self.happened = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as probe:
                while not self.stop.is_set() and not self.ready(probe):
                    time.sleep(0.005)
            if self.stop.is_set():
                return
            self.pooler.stop()
            self.happened = True
            time.sleep(self.down_s)
        except BaseException as exc:
            self.error = exc
        finally:
            self.pooler.start()


def test_pooler_down_for_a_moment_as_the_copy_ends(bed, pooler):
    """PgBouncer restarts (down 1.5 s) just as the last range and its index are done. Every
    step retries a refused connection, and so does the copy (test_faults restarts the pooler
    mid-copy); the CLI's own reads between the steps did not: exit 2, "Could not connect to
    the target", with sequences, security and verification undone."""
    _, target_db, env, workdir = bed
    env = {**env, "SUPABASE_DB_URL": target_db.pooler_url}
    env["SUPABASE_DB_ENDPOINT"] = "transaction_pooler"
    outage = PoolerOutage(target_db.admin_url, pooler, _all_copied_and_built, down_s=1.5)
    done = _run_beside(outage, env, workdir)
    assert outage.happened
    assert_clean_exit(done)
    assert report_status(workdir) == "PASS"
