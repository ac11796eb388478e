"""Connections against the test bed: SSL, the transaction pooler, clear failures, retries."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import select
import signal
import socket
import threading
import time

import psycopg
import psycopg.errors as pg_errors
import pytest
from psycopg import sql
from psycopg.pq import DiagnosticField as F
from sqlalchemy import text

from supabase_migration import connections
from supabase_migration.connections import (
    KEPT_PER_DATABASE,
    ServerUnreachable,
    borrowed,
    close_kept,
    connect,
    connection_error,
    is_transient,
    make_async_engine,
    make_engine,
    retrying,
    side_by_side,
    warn_if_workers_exceed_pool,
)
from supabase_migration.conninfo import DatabaseUrl, Endpoint, parse_database_url
from supabase_migration.errors import (
    ConfigError,
    ConnectionFailed,
    CopyError,
    MigrationError,
    TransientError,
)
from supabase_migration.security import session_encryption

from .testbed import GoingSilent, within

WRONG_PASSWORD = "Wr0ng-p@ss/w%rd#x:1"
REF = "abcdefghijklmnopqrst"


def assert_clear(exc: MigrationError, *secrets: str) -> None:
    """One sentence, and no password anywhere in what a user or a log would see."""
    message = str(exc)
    assert message.endswith("."), message
    assert "\n" not in message, message
    assert not re.search(r"\.\s+[A-Z]", message), message
    for secret in secrets:
        if secret:
            assert secret not in message
            assert secret not in repr(exc)
            assert secret not in str(exc.args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_changes(url: DatabaseUrl, **changes: object) -> DatabaseUrl:
    params = changes.pop("params", None)
    if params is not None:
        changes["params"] = {**url.params, **params}  # type: ignore[dict-item]
    return dataclasses.replace(url, **changes)  # type: ignore[arg-type]


@pytest.fixture
def target(target_db) -> DatabaseUrl:
    return parse_database_url(target_db.url, label="target")


@pytest.fixture
def txn_pooler(target_db) -> DatabaseUrl:
    return parse_database_url(
        target_db.pooler_url, label="target", endpoint=Endpoint.TRANSACTION_POOLER
    )


# -- real connections -----------------------------------------------------------------------------


def test_connects_to_the_target_with_ssl(target):
    with connect(target, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert session_encryption(conn).encrypted is True
        assert conn.execute("SHOW application_name").fetchone() == ("supabase-migration",)
        assert conn.prepare_threshold is None  # never prepared: safe behind any pooler
        assert conn.autocommit


def test_source_without_ssl_is_not_encrypted(source_db):
    url = parse_database_url(source_db.url, label="source")
    with connect(url) as conn:
        assert session_encryption(conn).encrypted is False
        assert not conn.autocommit


def test_transaction_pooler_works_across_transactions(txn_pooler):
    with connect(txn_pooler) as conn:
        assert conn.prepare_threshold is None
        # the test bed's PgBouncer requires client TLS
        assert session_encryption(conn).encrypted is True
        for i in range(12):  # well past psycopg's default prepare threshold of 5
            with conn.transaction():
                row = conn.execute("SELECT %s::int + 1", [i]).fetchone()
            assert row == (i + 1,)
            conn.commit()
    with connect(txn_pooler, autocommit=True) as conn:
        for i in range(12):
            assert conn.execute("SELECT %s::text", [str(i)]).fetchone() == (str(i),)


def test_sqlalchemy_engine_through_the_pooler(txn_pooler):
    engine = make_engine(txn_pooler, pool_size=2, max_overflow=0)
    try:
        for i in range(8):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT :v"), {"v": i}).scalar() == i
        assert engine.url.password is not None and "***" in str(engine.url)
        assert engine.hide_parameters
    finally:
        engine.dispose()


def test_async_engine_through_the_pooler(txn_pooler):
    pytest.importorskip("greenlet", reason="SQLAlchemy's asyncio needs greenlet")

    async def run() -> list[int]:
        engine = make_async_engine(txn_pooler, pool_size=2, max_overflow=0)
        try:
            values = []
            for i in range(8):
                async with engine.connect() as conn:
                    values.append((await conn.execute(text("SELECT :v"), {"v": i})).scalar())
            return values
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == list(range(8))


def test_engine_to_the_target(target):
    engine = make_engine(target)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_setting('application_name')")).scalar() == (
                "supabase-migration"
            )
    finally:
        engine.dispose()


# -- clear failures -------------------------------------------------------------------------------


USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


def _keepalive(conn: psycopg.Connection) -> tuple[int, int, int, int, int | None]:
    """What the kernel was told for this connection's socket."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    with sock:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            # Linux only; elsewhere libpq ignores tcp_user_timeout.
            sock.getsockopt(socket.IPPROTO_TCP, USER_TIMEOUT) if USER_TIMEOUT else None,
        )


def _ms(value: int) -> int | None:
    return value if USER_TIMEOUT else None


def test_every_connection_notices_a_vanished_server_within_a_minute(target, txn_pooler):
    """Keepalives after 30 s of silence, three probes 10 s apart: a query waiting on a server
    whose link dropped fails in a minute (and is retried) instead of the kernel's two hours.
    While we send (a COPY to the target) no keepalive goes out; TCP_USER_TIMEOUT gives
    unacknowledged data the same minute instead of about 15 of retransmissions. Direct,
    through the pooler, and SQLAlchemy's; a URL's own setting wins."""
    for url in (target, txn_pooler):
        with connect(url) as conn:
            assert _keepalive(conn) == (1, 30, 10, 3, _ms(60000))
    engine = make_engine(target, pool_size=1)
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert _keepalive(raw) == (1, 30, 10, 3, _ms(60000))
    finally:
        engine.dispose()
    own = with_changes(
        target, params={**target.params, "keepalives_idle": "5", "tcp_user_timeout": "0"}
    )
    with connect(own) as conn:
        assert _keepalive(conn) == (1, 5, 10, 3, _ms(0))
    # Keepalives tuned in the URL keep their meaning: the kernel would otherwise end them at
    # tcp_user_timeout's minute, not after their own 5 + 2 x 4 seconds.
    tuned = with_changes(
        target,
        params={**target.params, "keepalives_idle": "5", "keepalives_interval": "2",
                "keepalives_count": "4"},
    )  # fmt: skip
    with connect(tuned) as conn:
        assert _keepalive(conn) == (1, 5, 2, 4, _ms(13000))


def test_wrong_password(target, target_db):
    url = with_changes(target, password=WRONG_PASSWORD)
    with pytest.raises(ConnectionFailed, match="password authentication failed") as info:
        connect(url)
    assert info.value.exit_code == 2
    assert_clear(info.value, WRONG_PASSWORD, target_db.password)
    assert str(info.value).startswith(f"Could not connect to the {url.describe()}: ")


def test_wrong_password_through_the_pooler(txn_pooler, target_db):
    with pytest.raises(ConnectionFailed, match="authentication failed") as info:
        connect(with_changes(txn_pooler, password=WRONG_PASSWORD))
    assert_clear(info.value, WRONG_PASSWORD, target_db.password)


def test_a_passfile_that_gives_no_password_is_named(target, target_db, tmp_path):
    """libpq reads a password the URL leaves out from its passfile; when that file is missing,
    or has no line for this server, the sentence named the URL alone."""
    passfile = tmp_path / "pgpass"
    url = with_changes(target, password=None, params={**target.params, "passfile": str(passfile)})
    with pytest.raises(ConnectionFailed) as info:
        connect(url)
    assert str(info.value).endswith(
        f"the server asks for a password, which neither the URL nor the passfile {passfile} "
        "gives (a file that is missing or unreadable, or without a line for this host, port, "
        "database and user); add it to either."
    ), str(info.value)
    assert info.value.exit_code == 2
    secret = target_db.password.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"{target.host}:{target.port}:{target.dbname}:{target.user}:{secret}\n")
    passfile.chmod(0o600)
    with connect(url) as conn:  # the password from the passfile
        assert conn.execute("SELECT current_user").fetchone() == (target.user,)


def test_missing_database(target, target_db):
    with pytest.raises(ConnectionFailed, match="database no_such_db does not exist") as info:
        connect(with_changes(target, dbname="no_such_db"))
    assert_clear(info.value, target_db.password)


def test_refused_port(target, target_db):
    with pytest.raises(ServerUnreachable, match="refused") as info:
        connect(with_changes(target, port=free_port()))
    assert isinstance(info.value, ConnectionFailed)
    assert not is_transient(info.value)
    assert_clear(info.value, target_db.password)


def test_unknown_host(target, target_db):
    url = with_changes(target, host="nonexistent.invalid", params={"sslmode": "require"})
    with pytest.raises(ConnectionFailed, match=r"nonexistent\.invalid does not resolve") as info:
        connect(url)
    assert_clear(info.value, target_db.password)


def test_no_ssl_on_the_source_when_required(source_db):
    url = parse_database_url(
        source_db.url + _joiner(source_db.url) + "sslmode=require", label="source"
    )
    with pytest.raises(ConnectionFailed, match="does not support SSL") as info:
        connect(url)
    assert_clear(info.value, url.password or "")


def test_timeout_when_the_server_never_answers(target):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = with_changes(target, port=silent.getsockname()[1])
        with pytest.raises(ServerUnreachable, match="no answer within 2 s") as info:
            connect(url, connect_timeout=2)
    assert_clear(info.value, target.password or "")


def test_a_port_that_speaks_http_is_named(target):
    """libpq's own text ('invalid response to SSL negotiation: H') says nothing to a user."""
    with socket.socket() as web:
        web.bind(("127.0.0.1", 0))
        web.listen(1)

        def answer() -> None:
            peer, _ = web.accept()
            with peer:
                peer.recv(64)
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        url = with_changes(target, port=web.getsockname()[1])
        with pytest.raises(ConnectionFailed, match="does not answer as PostgreSQL does") as info:
            connect(url, connect_timeout=5)
        server.join(5)
    assert_clear(info.value, target.password or "")


def test_a_wrong_source_database_gets_no_supabase_hint(source_db):
    url = with_changes(parse_database_url(source_db.url, label="source"), dbname="nosuchdb")
    with pytest.raises(ConnectionFailed, match="database nosuchdb does not exist") as info:
        connect(url)
    assert "Supabase" not in str(info.value)


def _joiner(url: str) -> str:
    return "&" if "?" in url else "?"


# -- mapping libpq texts we cannot provoke locally -------------------------------------------------

SUPABASE_DIRECT = parse_database_url(
    f"postgresql://postgres:{WRONG_PASSWORD.replace('@', '%40').replace('#', '%23')}"
    f"@db.{REF}.supabase.co:5432/postgres",
    label="target",
)
SUPABASE_POOLER = parse_database_url(
    f"postgres://postgres.{REF}:hunter2@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",
    label="target",
)
PREFIX = 'connection failed: connection to server at "2600:1f18::1", port 5432 failed: '


@pytest.mark.parametrize(
    ("url", "libpq_text", "cls", "words"),
    [
        (SUPABASE_DIRECT, PREFIX + "Network is unreachable\n\tIs the server running?",
         ConnectionFailed, "IPv6-only"),
        (SUPABASE_DIRECT, PREFIX + "Connection refused", ServerUnreachable, "session pooler"),
        (SUPABASE_DIRECT, PREFIX + "SSL error: certificate verify failed", ConnectionFailed,
         "prod-ca-2021.crt"),
        (SUPABASE_DIRECT, PREFIX + 'root certificate file "/x.crt" does not exist',
         ConnectionFailed, "sslrootcert"),
        (SUPABASE_DIRECT, PREFIX + 'server certificate for "x" does not match host name "y"',
         ConnectionFailed, "host name shown in the dashboard"),
        (SUPABASE_DIRECT, PREFIX + 'FATAL:  no pg_hba.conf entry for host "1.2.3.4", user '
         '"postgres", database "postgres", no encryption', ConnectionFailed, "sslmode=require"),
        (SUPABASE_DIRECT, PREFIX + 'FATAL:  no pg_hba.conf entry for host "1.2.3.4", user '
         '"postgres", database "postgres", SSL encryption', ConnectionFailed, "pg_hba.conf"),
        (SUPABASE_DIRECT, PREFIX + "FATAL:  the database system is starting up",
         TransientError, "starting up"),
        (SUPABASE_DIRECT, PREFIX + "FATAL:  sorry, too many clients already", TransientError,
         "no free connection slots"),
        (SUPABASE_DIRECT, PREFIX + "FATAL:  remaining connection slots are reserved for roles "
         "with the SUPERUSER attribute", TransientError, "no free connection slots"),
        (SUPABASE_POOLER, PREFIX + "FATAL:  Tenant or user not found", ConnectionFailed,
         "postgres.<project-ref>"),
        (SUPABASE_POOLER, PREFIX + "FATAL:  (EDBHANDLEREXITED) MaxClientsInSessionMode: max "
         "clients reached - in Session mode max clients are limited to pool_size",
         TransientError, "lower --workers"),
        (SUPABASE_POOLER, PREFIX + "FATAL:  password authentication failed for user "
         f'"postgres.{REF}"', ConnectionFailed, "postgres.<project-ref>"),
        (SUPABASE_POOLER, "failed to resolve host 'aws-0-eu-central-1.pooler.supabase.com': "
         "[Errno -2] Name or service not known", ConnectionFailed, "region"),
        (SUPABASE_POOLER, PREFIX + "FATAL:  no more connections allowed (max_client_conn)",
         TransientError, "no free connection slots"),
        (SUPABASE_POOLER, PREFIX + "fe_sendauth: no password supplied", ConnectionFailed,
         "has none"),
        (SUPABASE_POOLER, PREFIX + 'FATAL:  role "postgres.x" does not exist', ConnectionFailed,
         "does not exist on that server"),
        (SUPABASE_POOLER, PREFIX + "something new hunter2 happened. Try again",
         ConnectionFailed, "something new *** happened; Try again"),
    ],
)  # fmt: skip
def test_connection_error_mapping(url, libpq_text, cls, words):
    exc = connection_error(url, psycopg.OperationalError(libpq_text))
    assert type(exc) is cls
    assert words in str(exc)
    assert str(exc).startswith(f"Could not connect to the {url.describe()}: ")
    assert_clear(exc, url.password or "", "hunter2")


def test_exit_codes_of_database_errors():
    """A set-up to fix is bad input (2); the tool's own syntax error and the rest are 1."""
    from supabase_migration.connections import database_error, database_error_exit_code
    from supabase_migration.errors import CopyError

    assert database_error_exit_code(pg_errors.InsufficientPrivilege()) == 2
    assert database_error_exit_code(pg_errors.UndefinedTable()) == 2
    assert database_error_exit_code(pg_errors.InvalidPassword()) == 2
    assert database_error_exit_code(pg_errors.SyntaxError()) == 1
    assert database_error_exit_code(pg_errors.DiskFull()) == 1
    assert database_error_exit_code(pg_errors.AdminShutdown()) == 1  # transient
    # The errors the steps raise from them carry the same codes.
    assert type(database_error(pg_errors.InsufficientPrivilege(), "x", CopyError)) is ConfigError
    assert type(database_error(pg_errors.DiskFull(), "x", CopyError)) is CopyError
    assert type(database_error(pg_errors.AdminShutdown(), "x", CopyError)) is TransientError


def test_timeout_exception_class_maps_to_unreachable():
    exc = connection_error(
        SUPABASE_DIRECT,
        pg_errors.ConnectionTimeout("connection timeout expired"),
        connect_timeout=7,
    )
    assert isinstance(exc, ServerUnreachable)
    assert "no answer within 7 s" in str(exc)


# -- transient or not ------------------------------------------------------------------------------


def server_error(cls: type[psycopg.Error], message: str) -> psycopg.Error:
    info = {F.MESSAGE_PRIMARY: message.encode()}
    if cls.sqlstate:
        info[F.SQLSTATE] = cls.sqlstate.encode()
    return cls(message, info=info)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (server_error(pg_errors.SerializationFailure, "could not serialize access"), True),
        (server_error(pg_errors.DeadlockDetected, "deadlock detected"), True),
        (server_error(pg_errors.AdminShutdown, "terminating connection due to admin"), True),
        (server_error(pg_errors.CannotConnectNow, "the database system is starting up"), True),
        (server_error(pg_errors.TooManyConnections, "sorry, too many clients already"), True),
        (server_error(pg_errors.ProtocolViolation, "server conn crashed?"), True),
        (server_error(pg_errors.ProtocolViolation, "server connection closed"), True),
        (server_error(pg_errors.ProtocolViolation, "query_wait_timeout"), True),
        (server_error(pg_errors.ProtocolViolation, "no more connections allowed (max_client_conn)"),
         True),
        (server_error(pg_errors.ProtocolViolation, "no such database: x"), False),
        (psycopg.OperationalError("consuming input failed: server closed the connection "
                                  "unexpectedly"), True),
        (psycopg.OperationalError("the connection is closed"), True),
        (psycopg.OperationalError("SSL SYSCALL error: EOF detected"), True),
        (psycopg.OperationalError("sending copy data failed: SSL error: unexpected eof while "
                                  "reading"), True),
        (psycopg.OperationalError("could not receive data from server: Connection timed out"),
         True),
        (psycopg.OperationalError("SSL SYSCALL error: Connection timed out"), True),
        (psycopg.OperationalError('connection to server at "10.1.2.3", port 5432 failed: '
                                  "Connection timed out"), False),  # unreachable: not a blip
        (psycopg.OperationalError("(EDBHANDLEREXITED) MaxClientsInSessionMode"), True),
        (psycopg.OperationalError("password authentication failed"), False),
        (server_error(pg_errors.UniqueViolation, "duplicate key value"), False),
        (server_error(pg_errors.QueryCanceled, "canceling statement due to statement timeout"),
         False),
        (server_error(pg_errors.LockNotAvailable, "could not obtain lock"), False),
        (TransientError("The pooler hiccuped."), True),
        (ConnectionFailed("Could not connect."), False),
        (CopyError("Copying failed."), False),
        (ValueError("nope"), False),
    ],
)  # fmt: skip
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


# -- retrying -------------------------------------------------------------------------------------


class Flaky:
    def __init__(self, failures: list[BaseException], result: str = "done") -> None:
        self.failures = failures
        self.result = result
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def test_retrying_recovers_after_two_transient_failures():
    delays: list[float] = []
    logs: list[str] = []
    fn = Flaky(
        [
            server_error(pg_errors.SerializationFailure, "could not serialize access"),
            TransientError("The pooler hiccuped."),
        ]
    )
    result = retrying(fn, what="copying a range", log=logs.append, sleep=delays.append)
    assert (result, fn.calls) == ("done", 3)
    assert len(delays) == 2 and 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    assert logs[0].startswith("Copying a range hit a transient error (serialization_failure")
    assert "attempt 2 of 5" in logs[0]


def test_retrying_does_not_retry_permanent_errors():
    error = server_error(pg_errors.UniqueViolation, "duplicate key value")
    fn = Flaky([error])
    with pytest.raises(pg_errors.UniqueViolation) as info:
        retrying(fn, sleep=lambda _: pytest.fail("slept"))
    assert info.value is error and fn.calls == 1
    fn = Flaky([ConnectionFailed("Could not connect: password authentication failed.")])
    with pytest.raises(ConnectionFailed):
        retrying(fn, sleep=lambda _: pytest.fail("slept"))
    assert fn.calls == 1


def test_retrying_gives_up_with_one_sentence():
    errors = [server_error(pg_errors.DeadlockDetected, "deadlock detected") for _ in range(3)]
    delays: list[float] = []
    with pytest.raises(TransientError) as info:
        retrying(Flaky(errors), attempts=3, what="copying a range", sleep=delays.append)
    assert str(info.value) == (
        "Copying a range still failed after 3 attempts: deadlock_detected (40P01): deadlock "
        "detected."
    )
    assert len(delays) == 2


def test_retrying_backoff_is_bounded():
    delays: list[float] = []
    errors = [TransientError("x.") for _ in range(8)]
    with pytest.raises(TransientError):
        retrying(Flaky(errors), attempts=8, base_delay=1, max_delay=3, sleep=delays.append)
    assert len(delays) == 7
    assert all(0.5 <= d <= 3 for d in delays)
    assert max(delays[3:]) <= 3


def test_refused_is_retried_inside_retrying_but_not_outside(target):
    url = with_changes(target, port=free_port())
    calls = 0

    def attempt() -> psycopg.Connection:
        nonlocal calls
        calls += 1
        return connect(url)

    with pytest.raises(ServerUnreachable):
        retrying(attempt, attempts=3, base_delay=0.01, what="connecting to the target")
    assert calls == 3


def test_retrying_reconnects_after_admin_shutdown(target, target_db):
    state: dict[str, psycopg.Connection] = {}

    def query() -> int:
        conn = state.get("conn")
        if conn is None or conn.closed or conn.broken:
            state["conn"] = conn = connect(target, autocommit=True)
        return conn.execute("SELECT 42").fetchone()[0]

    assert query() == 42
    victim = state["conn"].info.backend_pid
    with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [victim])
    logs: list[str] = []
    try:
        assert retrying(query, base_delay=0.05, log=logs.append) == 42
        assert state["conn"].info.backend_pid != victim
    finally:
        state["conn"].close()
    assert len(logs) == 1
    assert "admin_shutdown (57P01)" in logs[0] or "connection" in logs[0]
    assert target_db.password not in logs[0]


# -- connections kept for the next table run ----------------------------------------------------


def _pid(url: DatabaseUrl) -> int:
    with borrowed(url) as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def _wait_readable(conn: psycopg.Connection) -> None:
    """Until the server's goodbye (FATAL, then end of stream) has reached the socket."""
    readable: list = []
    deadline = time.monotonic() + 10
    while not readable and time.monotonic() < deadline:
        readable, _, _ = select.select([conn.fileno()], [], [], 0.05)


def test_a_kept_connection_is_reused_until_its_server_ends_it(target, target_db):
    first = _pid(target)
    assert _pid(target) == first  # no new TLS + SCRAM handshake
    with borrowed(target) as conn:
        with psycopg.connect(target_db.admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [first])
        _wait_readable(conn)
    replaced = _pid(target)  # replaced without a failed statement
    assert replaced != first
    assert _pid(target) == replaced


def test_only_idle_connections_are_kept_and_only_a_few(target):
    with borrowed(target) as conn:
        conn.execute("BEGIN")
    assert conn.closed  # a transaction left open is not handed to the next caller
    opened = [connect(target, autocommit=True) for _ in range(KEPT_PER_DATABASE + 1)]
    for conn in opened:
        connections.keep(target, conn)
    assert [conn.closed for conn in opened] == [False] * KEPT_PER_DATABASE + [True]
    pids = {c.info.backend_pid for c in opened[:KEPT_PER_DATABASE]}
    with borrowed(target) as a, borrowed(target) as b:
        assert {a.info.backend_pid, b.info.backend_pid} == pids
    close_kept()
    assert all(conn.closed for conn in opened)


def test_a_forked_child_leaves_its_parents_kept_connections_alone(target):
    """Workers are forked from the CLI: a child that used (or closed) the parent's kept
    connection would break the parent's session, which shares the socket."""
    parent = _pid(target)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            status = 0 if _pid(target) != parent else 1
        except BaseException:
            status = 2
        os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _pid(target) == parent  # still alive, and still kept


def test_the_cli_closes_its_kept_connections_before_workers_copy(target, tmp_path):
    """Idle through the copy, the CLI's own kept connections would take places that a session
    pooler (15 clients per user and database) owes the workers; units run in this process
    use them instead."""
    from concurrent.futures import ProcessPoolExecutor
    from types import SimpleNamespace

    from supabase_migration import commands

    manifest = SimpleNamespace(path=tmp_path / "migration.yaml")
    with borrowed(target) as conn:
        pass
    commands._execute_all(None, None, manifest, [], None)  # type: ignore[arg-type]
    assert not conn.closed
    with ProcessPoolExecutor(1) as pool:
        commands._execute_all(None, None, manifest, [], pool)  # type: ignore[arg-type]
    assert conn.closed


# -- pool-size warning -----------------------------------------------------------------------------


def test_warn_if_workers_exceed_pool():
    """Each worker's target connection and the run's own one must fit in the pool."""
    assert warn_if_workers_exceed_pool(SUPABASE_POOLER, 14) is None
    warning = warn_if_workers_exceed_pool(SUPABASE_POOLER, 15)
    assert warning is not None and "MaxClientsInSessionMode" in warning
    assert "use --workers 14 or fewer" in warning
    assert warning.endswith(".") and not re.search(r"\.\s+[A-Z]", warning)
    assert warn_if_workers_exceed_pool(SUPABASE_POOLER, 30, pool_size=40) is None
    assert warn_if_workers_exceed_pool(SUPABASE_DIRECT, 64) is None


def test_direct_auth_failure_does_not_mention_the_pooler_user():
    exc = connection_error(
        SUPABASE_DIRECT,
        psycopg.OperationalError(PREFIX + 'FATAL:  password authentication failed for user "x"'),
    )
    assert "check the password" in str(exc) and "pooler" not in str(exc)


def test_side_by_side_overlaps_work_on_reused_connections(source_db):
    """Five reads, two at a time: two connections, each reused, both busy at once, results
    in the order asked for."""
    url = parse_database_url(source_db.url, label="source")
    opened: list[int] = []

    def open_conn():
        conn = connect(url, autocommit=True)
        opened.append(conn.info.backend_pid)
        return conn

    def work(conn: psycopg.Connection, n: int) -> tuple[int, int, int]:
        row = conn.execute(
            "SELECT pg_sleep(0.3), %s::int, pg_backend_pid(), "
            "(SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(0.3)%%')",
            (n,),
        ).fetchone()
        return row[1], row[2], row[3]

    results = side_by_side(open_conn, [1, 2, 3, 4, 5], work, what=lambda n: f"Reading {n}")
    assert [n for n, _, _ in results] == [1, 2, 3, 4, 5]
    assert len(opened) == 2 and {pid for _, pid, _ in results} == set(opened)
    assert max(busy for _, _, busy in results) == 2


HELD_READ = "SELECT count(*) FROM held"


@pytest.mark.parametrize("stop", ["ctrl-c", "error"])
def test_side_by_side_stops_reads_held_behind_a_lock(source_db, stop):
    """Ctrl-C, or an error in a later item, while reads in side_by_side's threads wait behind
    a lock: it comes through at once, the reads are cancelled, and items not started never
    start (before, the command waited for every read to finish)."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE held (n int)")
    url = parse_database_url(source_db.url, label="source")
    started: list[int] = []
    waiting_reads = (
        "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active' "
        "AND datname = current_database()"
    )

    def held_reads() -> int:
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            return conn.execute(waiting_reads, [HELD_READ]).fetchone()[0]

    def work(conn: psycopg.Connection, n: int) -> None:
        started.append(n)
        if n == 3:  # once 1 and 2 wait behind the lock
            while held_reads() < 2:
                time.sleep(0.02)
            if stop == "ctrl-c":
                os.kill(os.getpid(), signal.SIGINT)  # then waits too
            else:
                conn.execute("SELECT 1 / 0")
        conn.execute(HELD_READ)

    opened: list[psycopg.Connection] = []

    def opened_here() -> psycopg.Connection:
        opened.append(connect(url, autocommit=True))
        return opened[-1]

    holder = psycopg.connect(source_db.url)
    holder.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(8.0, holder.rollback)  # a regression fails, it does not hang
    # Python's own Ctrl-C handler: a suite started in the background has SIGINT ignored.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    began = time.monotonic()
    try:
        release.start()
        expected = KeyboardInterrupt if stop == "ctrl-c" else MigrationError
        with pytest.raises(expected):
            side_by_side(
                opened_here,
                [1, 2, 3, 4, 5],
                work,
                what=str,
                connections=3,
            )
        took = time.monotonic() - began
        left = held_reads()
    finally:
        release.cancel()
        signal.signal(signal.SIGINT, before)
        holder.close()
    assert took < 5, took  # the lock was still held: nothing waited for it
    # Item 4 may start on the thread item 3 left before the stop; item 5 never does.
    assert {1, 2, 3} <= set(started) <= {1, 2, 3, 4} and left == 0
    # Closed, not kept: a cancel arriving late must not reach another statement.
    assert len(opened) == 3 and all(conn.closed for conn in opened)


def test_a_stop_cuts_off_reads_from_a_server_that_stopped_answering(source_db, monkeypatch):
    """An error while side_by_side's reads wait on a server that stopped answering: their
    cancels go unanswered too, so after STOP_WAIT_S their connections are cut and the error
    comes through. Before, the stop gave up on the cancels but still waited for the threads,
    which waited on the silent server until TCP gave up: minutes to hours."""
    monkeypatch.setattr(connections, "STOP_WAIT_S", 1.0)
    monkeypatch.setattr(connections, "CANCEL_TIMEOUT_S", 0.5)
    direct = parse_database_url(source_db.url, label="source")
    relay = GoingSilent(direct.port)
    url = with_changes(direct, host="127.0.0.1", port=relay.port)
    sleeping = (
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
        "AND state = 'active' AND datname = current_database()"
    )

    def work(conn: psycopg.Connection, n: int) -> None:
        if n == 3:  # once 1 and 2 wait on the server
            with psycopg.connect(source_db.url, autocommit=True) as watcher:
                while watcher.execute(sleeping).fetchone()[0] < 2:
                    time.sleep(0.02)
            relay.go_silent()
            raise MigrationError("Item 3 failed.")
        conn.execute("SELECT pg_sleep(30)")

    def call() -> None:
        side_by_side(
            lambda: connect(url, autocommit=True), [1, 2, 3], work, what=str, connections=3
        )

    try:
        ended, took, raised = within(20, call)
        assert ended, "side_by_side still waits for a server that went silent"
    finally:
        relay.close()  # ends what still waits on it
    assert [str(exc) for exc in raised] == ["Item 3 failed."]
    assert took < 8, took


def test_side_by_side_failure_is_one_sentence_naming_the_item(source_db):
    """A database error in the work becomes one sentence that names the item: a missing
    privilege is a ConfigError (exit 2), other errors a MigrationError; never a value."""
    role = f"no_read_{source_db.name}"
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE secret (ssn text)")
        conn.execute("INSERT INTO secret VALUES ('123-45-6789')")
        conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
    url = parse_database_url(source_db.url, label="source")

    def work(conn: psycopg.Connection, query: str) -> None:
        conn.execute(f'SET ROLE "{role}"' if "secret" in query else "SELECT 1")
        try:
            conn.execute(query)
        finally:
            conn.execute("RESET ROLE")

    def run(query: str) -> MigrationError:
        with pytest.raises(MigrationError) as caught:
            side_by_side(
                lambda: connect(url, autocommit=True), [query], work, what=lambda _: "Reading it"
            )
        return caught.value

    try:
        denied = run("SELECT * FROM secret")
        assert isinstance(denied, ConfigError) and denied.exit_code == 2
        assert denied.message.startswith("Reading it failed: insufficient_privilege")
        bad = run("SELECT '123-45-6789'::int")
        assert type(bad) is MigrationError and bad.message.startswith("Reading it failed: ")
        for err in (denied, bad):
            assert "123-45-6789" not in err.message and "\n" not in err.message
    finally:
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE "{role}"')


def test_key_values_are_sent_as_parameters_beside_literal_percent_signs(target_db) -> None:
    """A KeyValue leaves the statement's text (the server sees `$1`); every other `%` in it,
    in an identifier or a pattern, still reaches the server as written."""
    url = parse_database_url(target_db.pooler_url, label="target")
    with connections.connect(url, autocommit=True) as conn:
        conn.execute('CREATE TABLE "50%" ("a%s" text PRIMARY KEY)')
        conn.execute("""INSERT INTO "50%" VALUES ('x%1'), ('x%2'), ('y%3')""")
        query = sql.SQL("SELECT {}, current_query() FROM {} WHERE {} >= {} AND {} LIKE 'x%'")
        composed = query.format(
            sql.Identifier("a%s"),
            sql.Identifier("50%"),
            sql.Identifier("a%s"),
            connections.KeyValue("x%2"),
            sql.Identifier("a%s"),
        )
        rows = conn.execute(composed).fetchall()
        assert [r[0] for r in rows] == ["x%2"]
        assert "$1" in rows[0][1] and "x%2" not in rows[0][1]
        with conn.transaction():  # a statement beside it in one round trip goes alone
            found = connections.in_one_round_trip(conn, [sql.SQL("SELECT 1"), composed])
        assert found == [(1,), rows[0]]
        with pytest.raises(TypeError):
            conn.execute(composed, ())
